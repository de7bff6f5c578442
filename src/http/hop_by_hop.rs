//! Hop-by-hop header fields (RFC 9110 section 7.6.1): the one list, the
//! fields a `Connection` header names, and stripping them. Used on requests
//! and responses by the proxy and on stored responses by the cache.

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};
use smallvec::SmallVec;

/// Removes hop-by-hop headers and every header named in `Connection`.
/// With `keep_upgrade`, `Upgrade` and `Connection: upgrade` survive (the
/// WebSocket handshake must reach the other side).
pub fn strip(headers: &mut HeaderMap, keep_upgrade: bool) {
    let doomed = hop_by_hop_names(headers, keep_upgrade);
    if doomed.is_empty() {
        return;
    }
    for name in doomed {
        headers.remove(name);
    }
    if keep_upgrade && headers.contains_key(header::UPGRADE) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// The hop-by-hop names present in `headers`: the fixed ones and those
/// `Connection` lists, found in one pass over the names (most messages carry
/// one or none; a lookup per candidate costs more). Inline for up to four
/// names: this runs twice per forwarded request.
pub fn hop_by_hop_names(headers: &HeaderMap, keep_upgrade: bool) -> SmallVec<[HeaderName; 4]> {
    let listed = connection_tokens(headers);
    let mut doomed = SmallVec::new();
    for name in headers.keys() {
        if keep_upgrade && name == header::UPGRADE {
            continue;
        }
        let named = || {
            listed
                .iter()
                .any(|token| token.eq_ignore_ascii_case(name.as_str().as_bytes()))
        };
        if is_hop_by_hop(name) || named() {
            doomed.push(name.clone());
        }
    }
    doomed
}

/// The hop-by-hop headers of RFC 9110 section 7.6.1, plus the non-standard
/// ones proxies have always dropped: the one list.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
    )
}

/// The comma-separated tokens of every `Connection` line, trimmed, as bytes
/// (a token that is not ASCII matches no header name anyway).
fn connection_tokens(headers: &HeaderMap) -> SmallVec<[&[u8]; 4]> {
    let mut tokens = SmallVec::new();
    for value in headers.get_all(header::CONNECTION) {
        for token in value.as_bytes().split(|byte| *byte == b',') {
            let token = token.trim_ascii();
            if !token.is_empty() {
                tokens.push(token);
            }
        }
    }
    tokens
}

/// Whether a request's `TE` lists `trailers` (RFC 9110 section 10.1.4):
/// the one TE value that may go on to an HTTP/2 server, where gRPC
/// requires it.
pub fn te_accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|byte| *byte == b','))
        .any(|item| {
            let coding = item.split(|byte| *byte == b';').next().unwrap_or(item);
            coding.trim_ascii().eq_ignore_ascii_case(b"trailers")
        })
}

/// Whether the request asks for a protocol upgrade (WebSocket).
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && connection_tokens(headers)
            .iter()
            .any(|token| token.eq_ignore_ascii_case(b"upgrade"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn strips_standard_and_connection_named_headers() {
        let mut headers = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic abc"),
            ("upgrade", "h2c"),
            ("accept", "*/*"),
        ]);
        strip(&mut headers, false);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("accept"));
    }

    #[test]
    fn each_hop_by_hop_header_alone_is_stripped() {
        for name in [
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
        ] {
            let mut headers = map(&[(name, "x"), ("accept", "*/*")]);
            strip(&mut headers, false);
            assert!(!headers.contains_key(name), "{name} survived");
            assert!(headers.contains_key("accept"));
        }
    }

    #[test]
    fn te_trailers_is_found_among_other_codings() {
        assert!(te_accepts_trailers(&map(&[("te", "trailers")])));
        assert!(te_accepts_trailers(&map(&[("te", "gzip;q=0.5, Trailers")])));
        assert!(!te_accepts_trailers(&map(&[("te", "gzip")])));
        assert!(!te_accepts_trailers(&map(&[("accept", "trailers")])));
    }

    #[test]
    fn keeps_upgrade_for_websocket() {
        let mut headers = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade_request(&headers));
        strip(&mut headers, true);
        assert_eq!(headers["upgrade"], "websocket");
        assert_eq!(headers["connection"], "upgrade");
    }
}
