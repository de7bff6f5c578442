//! Cache keys and Vary secondary keys.
//!
//! A primary key is the normalized effective URL (`scheme://authority/path?query`,
//! lowercase host, default port dropped), with the route's query rules applied,
//! followed by `\n name:value` for each header the route adds to the key.
//! GET and HEAD share keys; nothing else is keyed. Header values count by
//! their bytes (0x80-0xFF included, escaped in the key). Vary values too,
//! case-sensitively except for the fields whose values are case-insensitive
//! by their RFCs; only the list syntax is normalised (lines combined,
//! whitespace around commas dropped, RFC 9110 sections 5.3 and 5.6.1).
//! Pure functions only.

use http::header::{self, HeaderMap, HeaderName};
use http::{Uri, uri::Authority};

use crate::config::CacheKeyConfig;
use crate::http::cache_control::split_list;

/// Separates the URL from route-added header values in a primary key.
pub const KEY_HEADER_SEPARATOR: char = '\n';

/// The request's effective URL: the URI's own scheme and authority when
/// absolute, else `http` and the Host header.
pub fn effective_url(uri: &Uri, headers: &HeaderMap) -> String {
    let scheme = uri.scheme_str().unwrap_or("http").to_ascii_lowercase();
    let authority = uri
        .authority()
        .map(Authority::as_str)
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or("");
    let path_and_query = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let path_and_query = if path_and_query.is_empty() {
        "/"
    } else {
        path_and_query
    };
    let mut url = String::with_capacity(scheme.len() + authority.len() + path_and_query.len() + 3);
    url.push_str(&scheme);
    url.push_str("://");
    url.push_str(&normalize_authority(&scheme, authority));
    url.push_str(path_and_query);
    url
}

/// Lowercase host, default port dropped.
fn normalize_authority(scheme: &str, authority: &str) -> String {
    let authority = authority.trim().to_ascii_lowercase();
    let default_port = match scheme {
        "https" => ":443",
        _ => ":80",
    };
    match authority.strip_suffix(default_port) {
        // An IPv6 literal keeps its brackets; only a trailing ":port" goes.
        Some(host) if !host.is_empty() => host.to_string(),
        _ => authority,
    }
}

/// The primary key for a request on a route.
pub fn primary_key(uri: &Uri, headers: &HeaderMap, config: &CacheKeyConfig) -> String {
    let mut key = effective_url(uri, headers);
    if !config.ignore_query.is_empty() || config.sort_query {
        key = rewrite_query(&key, config);
    }
    for name in &config.headers {
        key.push(KEY_HEADER_SEPARATOR);
        key.push_str(name.as_str());
        key.push(':');
        if let Some(value) = join_field(headers, name) {
            push_escaped(&mut key, &value);
        }
    }
    key
}

/// Appends `bytes` to a key so that different bytes give different text:
/// visible ASCII as is, `%` and anything else as `%XX`.
fn push_escaped(key: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &byte in bytes {
        if (0x21..=0x7e).contains(&byte) && byte != b'%' || byte == b' ' {
            key.push(char::from(byte));
        } else {
            key.push('%');
            key.push(char::from(HEX[usize::from(byte >> 4)]));
            key.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
    }
}

/// Appends parts the caller adds to the key (a transformer plugin's, say).
/// They sit after the URL like route-added headers, so purge by URL still
/// reaches them.
pub fn append_extra_parts(key: &mut String, parts: &[String]) {
    for part in parts {
        key.push(KEY_HEADER_SEPARATOR);
        key.push_str("plugin:");
        key.push_str(part);
    }
}

/// Drops ignored query parameters and sorts the rest when asked.
fn rewrite_query(url: &str, config: &CacheKeyConfig) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let mut pairs: Vec<&str> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(n, _)| n);
            !config.ignore_query.iter().any(|ignored| ignored == name)
        })
        .collect();
    if config.sort_query {
        pairs.sort_unstable();
    }
    if pairs.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", pairs.join("&"))
    }
}

/// Normalizes an operator-given URL the way request keys are built, for purge.
pub fn normalize_url(url: &str) -> Option<String> {
    let uri: Uri = url.trim().parse().ok()?;
    uri.authority()?;
    Some(effective_url(&uri, &HeaderMap::new()))
}

/// The URL part of a primary key (without route-added header values).
pub fn url_part(key: &str) -> &str {
    key.split_once(KEY_HEADER_SEPARATOR)
        .map_or(key, |(url, _)| url)
}

/// The path-and-query part of a URL key (`/a?b` of `http://h/a?b`).
pub fn path_part(url: &str) -> &str {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    after_scheme
        .find('/')
        .map_or("/", |slash| &after_scheme[slash..])
}

/// Whether a response's Vary field lists only field names (or `*`): one
/// that cannot be read cannot say which requests may share the response.
pub fn vary_is_well_formed(response: &HeaderMap) -> bool {
    response.get_all(header::VARY).iter().all(|value| {
        value.to_str().is_ok_and(|text| {
            split_list(text)
                .all(|name| name == "*" || HeaderName::from_bytes(name.as_bytes()).is_ok())
        })
    })
}

/// The request headers named by a response's Vary field, lowercased, in order.
pub fn vary_names(response: &HeaderMap) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = response
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(split_list)
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    names.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    names
}

/// The values of the selecting headers in a request, by their bytes, list
/// syntax normalised, lowercased only for the fields whose values are
/// case-insensitive; `None` for an absent header, which only matches an
/// absent header.
pub fn vary_values(names: &[HeaderName], request: &HeaderMap) -> Vec<Option<Vec<u8>>> {
    names
        .iter()
        .map(|name| {
            let value = join_field(request, name)?;
            Some(normalize_vary_value(&value, is_case_insensitive_list(name)))
        })
        .collect()
}

/// Request fields whose values are case-insensitive lists: content codings
/// (RFC 9110 section 8.4.1), media types (8.3.1), charsets (8.3.2) and
/// language ranges (RFC 4647 section 2).
fn is_case_insensitive_list(name: &HeaderName) -> bool {
    *name == header::ACCEPT
        || *name == header::ACCEPT_ENCODING
        || *name == header::ACCEPT_LANGUAGE
        || *name == header::ACCEPT_CHARSET
}

/// Trims, collapses whitespace runs and removes it around commas (and
/// lowercases ASCII letters when `fold_case`): equal lists compare equal.
/// Bytes above 0x7F are kept as they are.
pub fn normalize_vary_value(value: &[u8], fold_case: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    for (i, item) in value.split(|byte| *byte == b',').enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let mut first = true;
        for word in item
            .split(|byte| byte.is_ascii_whitespace())
            .filter(|word| !word.is_empty())
        {
            if !first {
                out.push(b' ');
            }
            first = false;
            if fold_case {
                out.extend(word.iter().map(u8::to_ascii_lowercase));
            } else {
                out.extend_from_slice(word);
            }
        }
    }
    out
}

/// All field lines of `name`, by their bytes, joined with ", " as RFC 9110
/// section 5.3 combines them.
fn join_field(headers: &HeaderMap, name: &HeaderName) -> Option<Vec<u8>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let mut joined = first.as_bytes().to_vec();
    for more in values {
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(more.as_bytes());
    }
    Some(joined)
}

/// Resolves a Location/Content-Location value against the request URL and
/// returns it only when it has the same origin (RFC 9111 section 4.4).
pub fn same_origin_target(request_url: &str, reference: &str) -> Option<String> {
    let base = url::Url::parse(request_url).ok()?;
    let target = base.join(reference.trim()).ok()?;
    let same = target.scheme() == base.scheme()
        && target.host_str() == base.host_str()
        && target.port_or_known_default() == base.port_or_known_default();
    same.then(|| normalize_url(target.as_str())).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn host(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn origin_form_uses_host_and_drops_default_port() {
        let uri: Uri = "/a/b?x=1".parse().unwrap();
        assert_eq!(
            effective_url(&uri, &host("Example.COM:80")),
            "http://example.com/a/b?x=1"
        );
        assert_eq!(
            effective_url(&uri, &host("example.com:8080")),
            "http://example.com:8080/a/b?x=1"
        );
        let absolute: Uri = "https://EX.com:443/p".parse().unwrap();
        assert_eq!(
            effective_url(&absolute, &HeaderMap::new()),
            "https://ex.com/p"
        );
    }

    #[test]
    fn route_key_rules_drop_sort_and_add_headers() {
        let uri: Uri = "/p?utm_source=x&b=2&a=1".parse().unwrap();
        let mut headers = host("h");
        headers.insert("x-tenant", HeaderValue::from_static("blue"));
        let config = CacheKeyConfig {
            ignore_query: vec!["utm_source".into()],
            sort_query: true,
            headers: vec![HeaderName::from_static("x-tenant")],
        };
        assert_eq!(
            primary_key(&uri, &headers, &config),
            "http://h/p?a=1&b=2\nx-tenant:blue"
        );
        let only_ignored: Uri = "/p?utm_source=x".parse().unwrap();
        let plain = CacheKeyConfig {
            ignore_query: vec!["utm_source".into()],
            ..Default::default()
        };
        assert_eq!(primary_key(&only_ignored, &headers, &plain), "http://h/p");
    }

    #[test]
    fn vary_values_are_normalized() {
        assert_eq!(
            normalize_vary_value(b"  GZIP ,  br,deflate  ", true),
            b"gzip,br,deflate"
        );
        assert_eq!(
            normalize_vary_value(b"en-US,  fr  ;q=0.5", true),
            b"en-us,fr ;q=0.5"
        );
        assert_eq!(normalize_vary_value(b" Abc,  d\xff ", false), b"Abc,d\xff");
        let mut request = HeaderMap::new();
        request.append("accept-language", HeaderValue::from_static("en"));
        request.append("accept-language", HeaderValue::from_static("fr"));
        let names = vec![
            HeaderName::from_static("accept-language"),
            HeaderName::from_static("x-missing"),
        ];
        assert_eq!(
            vary_values(&names, &request),
            vec![Some(b"en,fr".to_vec()), None]
        );
    }

    #[test]
    fn vary_names_are_lowercased_and_deduplicated() {
        let mut response = HeaderMap::new();
        response.append(
            header::VARY,
            HeaderValue::from_static("Accept-Encoding, accept"),
        );
        response.append(header::VARY, HeaderValue::from_static("ACCEPT"));
        let names = vary_names(&response);
        assert_eq!(
            names,
            vec![
                HeaderName::from_static("accept"),
                HeaderName::from_static("accept-encoding")
            ]
        );
    }

    #[test]
    fn invalidation_targets_must_share_the_origin() {
        let base = "http://h/a/b";
        assert_eq!(
            same_origin_target(base, "/c").as_deref(),
            Some("http://h/c")
        );
        assert_eq!(
            same_origin_target(base, "d").as_deref(),
            Some("http://h/a/d")
        );
        assert_eq!(same_origin_target(base, "http://other/c"), None);
    }

    #[test]
    fn plugin_parts_split_the_key_but_not_its_url() {
        let uri: Uri = "/p".parse().unwrap();
        let mut phone = primary_key(&uri, &host("a.example"), &CacheKeyConfig::default());
        let mut tablet = phone.clone();
        append_extra_parts(&mut phone, &["phone".to_string()]);
        append_extra_parts(&mut tablet, &["tablet".to_string()]);
        assert_ne!(phone, tablet);
        assert_eq!(url_part(&phone), url_part(&tablet));
    }

    #[test]
    fn key_parts() {
        assert_eq!(url_part("http://h/p\nx:1"), "http://h/p");
        assert_eq!(path_part("http://h:81/p?q"), "/p?q");
        assert_eq!(path_part("http://h"), "/");
        assert_eq!(
            normalize_url("HTTP://H:80/x").as_deref(),
            Some("http://h/x")
        );
        assert_eq!(normalize_url("/relative"), None);
    }

    mod properties {
        use super::*;
        use http::HeaderValue;
        use proptest::prelude::*;

        fn with(name: &'static str, value: &[u8]) -> Option<HeaderMap> {
            let mut headers = host("h");
            headers.insert(name, HeaderValue::from_bytes(value).ok()?);
            Some(headers)
        }

        proptest! {
            /// Different bytes of a keyed header never give the same key,
            /// and an absent header differs from any present one.
            #[test]
            fn keys_tell_header_bytes_apart(a in proptest::collection::vec(any::<u8>(), 0..24),
                                            b in proptest::collection::vec(any::<u8>(), 0..24)) {
                let config = CacheKeyConfig {
                    headers: vec![HeaderName::from_static("x-tenant")],
                    ..Default::default()
                };
                let uri: Uri = "/p".parse().unwrap();
                if let (Some(ha), Some(hb)) = (with("x-tenant", &a), with("x-tenant", &b)) {
                    let (ka, kb) = (primary_key(&uri, &ha, &config), primary_key(&uri, &hb, &config));
                    prop_assert_eq!(ka == kb, a == b);
                    prop_assert_eq!(url_part(&ka), url_part(&kb));
                }
            }

            /// A Vary value with any bytes selects only itself (case folded
            /// only for case-insensitive fields); absent never matches present.
            #[test]
            fn vary_values_keep_their_bytes(a in proptest::collection::vec(any::<u8>(), 1..24)) {
                let names = vec![HeaderName::from_static("cookie")];
                if let Some(headers) = with("cookie", &a) {
                    let values = vary_values(&names, &headers);
                    prop_assert!(values[0].is_some(), "present never reads as absent");
                    prop_assert_ne!(&values, &vary_values(&names, &HeaderMap::new()));
                    let upper: Vec<u8> = a.iter().map(u8::to_ascii_uppercase).collect();
                    if upper != a && let Some(shouted) = with("cookie", &upper) {
                        let trimmed = |v: &[u8]| normalize_vary_value(v, false);
                        if trimmed(&upper) != trimmed(&a) {
                            prop_assert_ne!(values, vary_values(&names, &shouted));
                        }
                    }
                }
            }
        }
    }
}
