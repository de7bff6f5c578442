//! What a proxy adds to a forwarded request: `X-Forwarded-*` and `Via`, and
//! the loop check that reads `Via` back. Pure functions over a `HeaderMap`;
//! hop-by-hop fields are `http::hop_by_hop`'s.

use std::net::IpAddr;

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const VIA_VALUE: HeaderValue = HeaderValue::from_static("1.1 larder");

/// The forwarding headers a client may forge to make an origin believe
/// something about the original request (its address, scheme, host, prefix).
static FORWARDING: [HeaderName; 9] = [
    header::FORWARDED,
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-server"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-real-ip"),
];

/// Removes the forwarding headers a client sent: only a trusted proxy's
/// are kept (`server.trusted_proxies`).
pub fn remove_forwarding(headers: &mut HeaderMap) {
    crate::http::remove_all_named(headers, &FORWARDING);
}

/// Adds `X-Forwarded-For` (appended to any earlier hops), `X-Forwarded-Proto`
/// and `X-Forwarded-Host` (the scheme and host the client asked for) unless
/// a trusted proxy set them already, and `Via`.
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
    if !headers.contains_key(X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if let Some(host) = original_host
        && !headers.contains_key(X_FORWARDED_HOST)
    {
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
