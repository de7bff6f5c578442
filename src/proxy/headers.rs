//! Header hygiene: hop-by-hop headers out (both directions), X-Forwarded-*
//! and Via in. Pure functions over a `HeaderMap`.

use std::net::IpAddr;

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};

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
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if keep_upgrade && name == header::UPGRADE {
            continue;
        }
        headers.remove(name);
    }
    let upgrade = if keep_upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::PROXY_AUTHORIZATION);
    if let Some(upgrade) = upgrade {
        headers.insert(header::UPGRADE, upgrade);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
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
    client: Option<IpAddr>,
    proto: &'static str,
    original_host: Option<HeaderValue>,
) {
    if let Some(client) = client {
        use std::fmt::Write;
        let earlier = match headers.get(X_FORWARDED_FOR).map(HeaderValue::to_str) {
            Some(Ok(earlier)) if !earlier.trim().is_empty() => earlier,
            _ => "",
        };
        // One allocation: room for the earlier hops and an IPv6 address.
        let mut value = String::with_capacity(earlier.len() + 48);
        if !earlier.is_empty() {
            value.push_str(earlier);
            value.push_str(", ");
        }
        let _ = write!(value, "{client}");
        if let Ok(value) = HeaderValue::try_from(value) {
            headers.insert(X_FORWARDED_FOR, value);
        }
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(host) = original_host {
        headers.insert(X_FORWARDED_HOST, host);
    }
    append_via(headers);
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
    fn keeps_upgrade_for_websocket() {
        let mut headers = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade_request(&headers));
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers["upgrade"], "websocket");
        assert_eq!(headers["connection"], "upgrade");
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
        let client = "127.0.0.1".parse().ok();
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
