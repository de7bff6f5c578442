//! Route matching: host (port ignored, case-insensitive, `*.example.com`
//! wildcards) and path prefix, first match wins. Lookup allocates nothing.

use http::Request;

use crate::config::RouteMatch;

/// How a route's `match.host` compares with a request's host.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMatch {
    Any,
    /// Lowercased exact host.
    Exact(String),
    /// `*.example.com` stored as `.example.com`: any subdomain, not the apex.
    Subdomains(String),
}

impl HostMatch {
    fn new(pattern: Option<&str>) -> Self {
        match pattern {
            None => Self::Any,
            Some(pattern) => {
                let pattern = strip_port(pattern.trim()).to_ascii_lowercase();
                match pattern.strip_prefix('*') {
                    Some(suffix) if suffix.starts_with('.') => Self::Subdomains(suffix.to_string()),
                    _ => Self::Exact(pattern),
                }
            }
        }
    }

    fn is_match(&self, host: Option<&str>) -> bool {
        match (self, host) {
            (Self::Any, _) => true,
            (_, None) => false,
            (Self::Exact(exact), Some(host)) => exact.eq_ignore_ascii_case(host),
            (Self::Subdomains(suffix), Some(host)) => {
                host.len() > suffix.len()
                    && host.is_char_boundary(host.len() - suffix.len())
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }
}

/// One route's match rule.
#[derive(Debug, Clone)]
pub struct Matcher {
    host: HostMatch,
    path_prefix: String,
}

impl Matcher {
    pub fn new(config: &RouteMatch) -> Self {
        Self {
            host: HostMatch::new(config.host.as_deref()),
            path_prefix: config.path_prefix.clone().unwrap_or_default(),
        }
    }

    /// Whether this rule looks at the host at all.
    pub fn matches_host(&self) -> bool {
        self.host != HostMatch::Any
    }

    pub fn is_match(&self, host: Option<&str>, path: &str) -> bool {
        path.starts_with(self.path_prefix.as_str()) && self.host.is_match(host)
    }
}

/// The request's host without port: the URI authority (absolute-form and
/// HTTP/2 `:authority`) first, else the Host header.
pub fn request_host<B>(request: &Request<B>) -> Option<&str> {
    if let Some(host) = request.uri().host() {
        return Some(host);
    }
    request
        .headers()
        .get(http::header::HOST)
        .and_then(|value| value.to_str().ok())
        .map(strip_port)
}

/// `example.com:8080` -> `example.com`; `[::1]:80` -> `[::1]`.
fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => &authority[..=end],
            None => authority,
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(host: Option<&str>, prefix: Option<&str>) -> Matcher {
        Matcher::new(&RouteMatch {
            host: host.map(str::to_string),
            path_prefix: prefix.map(str::to_string),
        })
    }

    #[test]
    fn exact_host_ignores_case_and_port() {
        let m = matcher(Some("Example.COM:8080"), None);
        assert!(m.is_match(Some("example.com"), "/"));
        assert!(m.is_match(Some("EXAMPLE.com"), "/x"));
        assert!(!m.is_match(Some("www.example.com"), "/"));
        assert!(!m.is_match(None, "/"));
    }

    #[test]
    fn wildcard_matches_subdomains_but_not_the_apex() {
        let m = matcher(Some("*.example.com"), Some("/api"));
        assert!(m.is_match(Some("a.example.com"), "/api/v1"));
        assert!(m.is_match(Some("a.b.EXAMPLE.com"), "/api"));
        assert!(!m.is_match(Some("example.com"), "/api"));
        assert!(!m.is_match(Some("badexample.com"), "/api"));
        assert!(!m.is_match(Some("a.example.com"), "/other"));
    }

    #[test]
    fn strip_port_handles_ipv6_and_plain_hosts() {
        assert_eq!(strip_port("example.com:80"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }

    #[test]
    fn host_comes_from_absolute_uri_before_header() {
        let request = Request::builder()
            .uri("http://a.test:81/x")
            .header("host", "b.test")
            .body(())
            .expect("test request");
        assert_eq!(request_host(&request), Some("a.test"));
        let request = Request::builder()
            .uri("/x")
            .header("host", "b.test:99")
            .body(())
            .expect("test request");
        assert_eq!(request_host(&request), Some("b.test"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any host pattern and request: no panic; a route without a
            /// host rule matches on the path prefix alone.
            #[test]
            fn matching_never_panics(pattern in ".{0,20}", host in ".{0,20}", prefix in "/.{0,8}", path in "/.{0,16}") {
                let with_host = matcher(Some(&pattern), Some(&prefix));
                let _ = with_host.is_match(Some(&host), &path);
                let any_host = matcher(None, Some(&prefix));
                prop_assert_eq!(any_host.is_match(Some(&host), &path), path.starts_with(prefix.as_str()));
                let _ = strip_port(&host);
            }
        }
    }
}
