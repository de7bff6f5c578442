//! Header hygiene: hop-by-hop headers out (both directions), X-Forwarded-*
//! and Via in. Pure functions over a `HeaderMap`.

use std::net::IpAddr;

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};
use smallvec::SmallVec;

/// The hop-by-hop headers of RFC 9110 7.6.1, plus the non-standard ones
/// proxies have always dropped.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const VIA_VALUE: HeaderValue = HeaderValue::from_static("1.1 larder");

/// Removes hop-by-hop headers and every header named in `Connection`.
/// With `keep_upgrade`, `Upgrade` and `Connection: upgrade` survive (the
/// WebSocket handshake must reach the other side).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
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

/// The hop-by-hop names present in `headers`, found in one pass over the
/// names (most messages carry one or none; a lookup per candidate costs more).
/// Inline for up to four names: this runs twice per forwarded request.
fn hop_by_hop_names(headers: &HeaderMap, keep_upgrade: bool) -> SmallVec<[HeaderName; 4]> {
    let listed: SmallVec<[&str; 4]> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .collect();
    headers
        .keys()
        .filter(|name| !(keep_upgrade && **name == header::UPGRADE))
        .filter(|name| {
            is_hop_by_hop(name)
                || listed
                    .iter()
                    .any(|token| token.eq_ignore_ascii_case(name.as_str()))
        })
        .cloned()
        .collect()
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::PROXY_AUTHORIZATION || HOP_BY_HOP.contains(name)
}

/// Whether the request asks for a protocol upgrade (WebSocket).
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Adds `X-Forwarded-For` (appended to any earlier hops), `X-Forwarded-Proto`,
/// `X-Forwarded-Host` (the host the client asked for) and `Via`.
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client: IpAddr,
    proto: &'static str,
    original_host: Option<HeaderValue>,
) {
    // Room for the (up to) four headers added here: one growth at most.
    headers.reserve(4);
    let earlier = match headers.get(X_FORWARDED_FOR).map(HeaderValue::to_str) {
        Some(Ok(earlier)) if !earlier.trim().is_empty() => earlier,
        _ => "",
    };
    let forwarded_for = if earlier.is_empty() {
        ip_header_value(client)
    } else {
        HeaderValue::try_from(format!("{earlier}, {client}")).ok()
    };
    if let Some(value) = forwarded_for {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(host) = original_host {
        headers.insert(X_FORWARDED_HOST, host);
    }
    append_via(headers);
}

/// An IP address as a header value, without the formatting machinery for
/// the common IPv4 case (this runs on every forwarded request).
fn ip_header_value(ip: IpAddr) -> Option<HeaderValue> {
    let IpAddr::V4(v4) = ip else {
        return HeaderValue::try_from(ip.to_string()).ok();
    };
    let mut text = [0u8; 15];
    let mut len = 0;
    for (index, octet) in v4.octets().into_iter().enumerate() {
        if index > 0 {
            text[len] = b'.';
            len += 1;
        }
        let digits = [octet / 100, octet / 10 % 10, octet % 10];
        let skip = if octet >= 100 {
            0
        } else if octet >= 10 {
            1
        } else {
            2
        };
        for digit in &digits[skip..] {
            text[len] = b'0' + digit;
            len += 1;
        }
    }
    HeaderValue::from_bytes(&text[..len]).ok()
}

/// How many `Via` entries name Larder: each pass through a Larder adds one.
pub fn larder_hops(headers: &HeaderMap) -> usize {
    headers
        .get_all(header::VIA)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter(|entry| entry.trim().ends_with(" larder"))
        .count()
}

/// Appends `1.1 larder` to `Via` (kept as a separate field line, which means
/// the same as a comma-joined list).
pub fn append_via(headers: &mut HeaderMap) {
    headers.append(header::VIA, VIA_VALUE);
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
        strip_hop_by_hop(&mut headers, false);
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
            strip_hop_by_hop(&mut headers, false);
            assert!(!headers.contains_key(name), "{name} survived");
            assert!(headers.contains_key("accept"));
        }
    }

    #[test]
    fn keeps_upgrade_for_websocket() {
        let mut headers = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade_request(&headers));
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers["upgrade"], "websocket");
        assert_eq!(headers["connection"], "upgrade");
    }

    #[test]
    fn ip_addresses_format_as_header_values() {
        for text in [
            "127.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "10.20.100.9",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = text.parse().expect("test address");
            let value = ip_header_value(ip).expect("a valid header value");
            assert_eq!(value.to_str().ok(), Some(text));
        }
    }

    #[test]
    fn counts_larder_hops_in_via() {
        let headers = map(&[("via", "1.1 larder, 1.0 squid"), ("via", "1.1 larder")]);
        assert_eq!(larder_hops(&headers), 2);
        assert_eq!(larder_hops(&map(&[("via", "1.1 notlarder")])), 0);
    }

    #[test]
    fn forwarded_for_appends_to_earlier_hops() {
        let mut headers = map(&[("x-forwarded-for", "10.0.0.1")]);
        let client = IpAddr::from([127, 0, 0, 1]);
        add_forwarded(
            &mut headers,
            client,
            "http",
            Some(HeaderValue::from_static("a.test")),
        );
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["x-forwarded-host"], "a.test");
        assert_eq!(headers["via"], "1.1 larder");
    }
}
