//! The `http-client` host import for fetchers: the allow-list of origins a
//! plugin was granted (`allow_hosts`), and the buffered outbound call with
//! its caps (timeout, response size, requests per run).
//!
//! Must not reach an origin that is not on the plugin's list: URLs are
//! parsed with `url` (IDNA, case, default ports), user information is
//! refused and redirects are never followed.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::rt::TokioExecutor;
use url::{Host, Url};

/// The largest response body a plugin may receive.
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;
/// Calls one run (or one request) may make.
pub const MAX_REQUESTS_PER_CALL: u32 = 16;
/// The longest a single outbound call may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// An `allow_hosts` entry that is not an origin, and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("`{entry}`: {reason}")]
pub struct InvalidOrigin {
    pub entry: String,
    pub reason: String,
}

/// One `allow_hosts` entry: scheme, host (exact, or `*.` for subdomains)
/// and port.
#[derive(Debug, Clone, PartialEq)]
pub struct AllowedOrigin {
    scheme: String,
    host: HostPattern,
    port: u16,
}

#[derive(Debug, Clone, PartialEq)]
enum HostPattern {
    Exact(Host<String>),
    /// `*.example.com`: any subdomain of `example.com`, not itself.
    Subdomains(String),
}

impl AllowedOrigin {
    /// Parses `https://api.example.com`, `http://127.0.0.1:8080`, `https://*.example.com`.
    pub fn parse(entry: &str) -> Result<Self, InvalidOrigin> {
        let invalid = |reason: String| InvalidOrigin {
            entry: entry.to_string(),
            reason,
        };
        let url = Url::parse(entry).map_err(|e| invalid(format!("not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("only http and https origins can be allowed".into()));
        }
        if has_userinfo(&url) {
            return Err(invalid("an origin has no user information".into()));
        }
        if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
            return Err(invalid(
                "give an origin (scheme, host, optional port) without a path".into(),
            ));
        }
        let host = match url.host() {
            Some(Host::Domain(domain)) if domain.starts_with("*.") => {
                HostPattern::Subdomains(domain[1..].to_string())
            }
            Some(host) if !host.to_string().contains('*') => HostPattern::Exact(host.to_owned()),
            _ => return Err(invalid("`*` is only allowed as a leading `*.`".into())),
        };
        let port = url
            .port_or_known_default()
            .ok_or_else(|| invalid("no port".into()))?;
        Ok(Self {
            scheme: url.scheme().to_string(),
            host,
            port,
        })
    }

    fn allows(&self, url: &Url) -> bool {
        let host_matches = match (&self.host, url.host()) {
            (HostPattern::Exact(allowed), Some(host)) => *allowed == host.to_owned(),
            (HostPattern::Subdomains(suffix), Some(Host::Domain(domain))) => {
                domain.len() > suffix.len() && domain.ends_with(suffix.as_str())
            }
            _ => false,
        };
        host_matches
            && self.scheme == url.scheme()
            && Some(self.port) == url.port_or_known_default()
    }
}

fn has_userinfo(url: &Url) -> bool {
    !url.username().is_empty() || url.password().is_some()
}

/// A plugin's parsed `allow_hosts`. Empty: no outbound HTTP at all.
#[derive(Debug, Clone, Default)]
pub struct AllowList(Vec<AllowedOrigin>);

impl AllowList {
    pub fn parse(entries: &[String]) -> Result<Self, InvalidOrigin> {
        entries
            .iter()
            .map(|entry| AllowedOrigin::parse(entry))
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// The parsed URL if the plugin may call it, else why not.
    pub fn check(&self, raw: &str) -> Result<Url, SendError> {
        let url =
            Url::parse(raw).map_err(|e| SendError::Denied(format!("`{raw}` is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(SendError::Denied(format!(
                "scheme `{}` is not allowed",
                url.scheme()
            )));
        }
        if has_userinfo(&url) {
            return Err(SendError::Denied(
                "URLs with user information are refused".to_string(),
            ));
        }
        if self.0.iter().any(|origin| origin.allows(&url)) {
            Ok(url)
        } else {
            Err(SendError::Denied(format!(
                "{} is not in allow_hosts",
                url.origin().ascii_serialization()
            )))
        }
    }
}

/// What a store's guest may do over HTTP, and how much it has done.
pub struct HttpGrant {
    pub allow: Arc<AllowList>,
    pub requests_made: u32,
}

/// Why an outbound call did not produce a response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("denied: {0}")]
    Denied(String),
    #[error("timed out")]
    Timeout,
    #[error("response larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
    #[error("connection failed: {0}")]
    Connection(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("more than {MAX_REQUESTS_PER_CALL} requests in one call")]
    TooManyRequests,
}

pub struct OutboundRequest {
    pub method: String,
    pub url: Url,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Option<Vec<u8>>,
    pub timeout: Duration,
}

pub struct OutboundResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
}

type HttpsClient =
    Client<hyper_rustls::HttpsConnector<HttpConnector<GuardedResolver>>, Full<Bytes>>;

fn client() -> &'static HttpsClient {
    static CLIENT: OnceLock<HttpsClient> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let mut http = HttpConnector::new_with_resolver(GuardedResolver(GaiResolver::new()));
        http.enforce_http(false);
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match crate::http::tls::client_config(None) {
            Ok(config) => builder.with_tls_config(config),
            Err(error) => {
                tracing::warn!(%error, "TLS setup failed; plugin https calls trust the bundled webpki roots");
                builder.with_webpki_roots()
            }
        };
        let connector = builder
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Client::builder(TokioExecutor::new()).build(connector)
    })
}

/// Whether an address is one a host name must never lead a plugin to:
/// unspecified, link-local (where cloud metadata services live) and the
/// well-known metadata addresses. An operator who really means one lists
/// the IP literal in `allow_hosts` (literals are not resolved).
fn is_forbidden_target(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            v4.is_unspecified() || v4.is_link_local() || v4 == Ipv4Addr::new(100, 100, 100, 200)
        }
        IpAddr::V6(v6) => {
            v6.is_unspecified()
                || v6.is_unicast_link_local()
                || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
        }
    }
}

/// DNS for plugin calls: the system resolver, minus forbidden addresses, so
/// an allowed name re-pointed at a metadata service (DNS rebinding) leads
/// nowhere. The check applies to the addresses actually connected to.
#[derive(Clone)]
struct GuardedResolver(GaiResolver);

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let resolving = self.0.call(name.clone());
        Box::pin(async move {
            let addresses: Vec<SocketAddr> = resolving
                .await?
                .filter(|address| !is_forbidden_target(address.ip()))
                .collect();
            if addresses.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "{name} resolves only to link-local, unspecified or metadata addresses"
                    ),
                ));
            }
            Ok(addresses.into_iter())
        })
    }
}

/// Headers a plugin may not set: the client manages them.
fn is_managed_header(name: &str) -> bool {
    matches!(
        name,
        "host"
            | "connection"
            | "content-length"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "keep-alive"
    )
}

/// One buffered request; the URL was already checked against the allow-list.
pub async fn send(request: OutboundRequest) -> Result<OutboundResponse, SendError> {
    let method = http::Method::from_bytes(request.method.as_bytes())
        .map_err(|_| SendError::InvalidRequest(format!("method `{}`", request.method)))?;
    let mut builder = http::Request::builder()
        .method(method)
        .uri(request.url.as_str());
    for (name, value) in &request.headers {
        let name = name.to_ascii_lowercase();
        if !is_managed_header(&name) {
            builder = builder.header(name, value.as_slice());
        }
    }
    let body = Full::new(Bytes::from(request.body.unwrap_or_default()));
    let outgoing = builder
        .body(body)
        .map_err(|e| SendError::InvalidRequest(e.to_string()))?;
    let exchange = async {
        let response = client()
            .request(outgoing)
            .await
            .map_err(|e| SendError::Connection(format!("{e:#}")))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    SendError::TooLarge
                } else {
                    SendError::Connection(e.to_string())
                }
            })?
            .to_bytes();
        let headers = parts
            .headers
            .iter()
            .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec()))
            .collect();
        Ok(OutboundResponse {
            status: parts.status.as_u16(),
            headers,
            body,
        })
    };
    tokio::time::timeout(request.timeout, exchange)
        .await
        .unwrap_or(Err(SendError::Timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowList {
        let entries: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
        AllowList::parse(&entries).expect("valid allow list")
    }

    #[test]
    fn allows_the_listed_origin_with_any_path() {
        let allow = list(&["https://api.example.com"]);
        assert!(allow.check("https://api.example.com/v1/items?x=1").is_ok());
        assert!(allow.check("https://api.example.com:443/").is_ok());
    }

    #[test]
    fn refuses_other_scheme_or_port() {
        let allow = list(&["https://api.example.com"]);
        assert!(allow.check("http://api.example.com/").is_err());
        assert!(allow.check("https://api.example.com:8443/").is_err());
        let local = list(&["http://127.0.0.1:8080"]);
        assert!(local.check("http://127.0.0.1:8080/x").is_ok());
        assert!(local.check("http://127.0.0.1:8081/x").is_err());
        assert!(local.check("http://127.0.0.1/x").is_err());
    }

    #[test]
    fn refuses_userinfo_tricks() {
        let allow = list(&["https://api.example.com", "http://127.0.0.1:8080"]);
        assert!(
            allow
                .check("https://api.example.com@evil.example.org/")
                .is_err()
        );
        assert!(allow.check("http://127.0.0.1:8080@evil.invalid/").is_err());
        assert!(allow.check("https://user:pw@api.example.com/").is_err());
        assert!(AllowedOrigin::parse("https://user@api.example.com").is_err());
    }

    #[test]
    fn matches_hosts_case_insensitively_and_through_idna() {
        let allow = list(&["https://API.Example.COM", "https://bücher.example"]);
        assert!(allow.check("https://api.example.com/").is_ok());
        assert!(allow.check("https://xn--bcher-kva.example/").is_ok());
        assert!(allow.check("https://BÜCHER.example/").is_ok());
        assert!(allow.check("https://bucher.example/").is_err());
    }

    #[test]
    fn wildcard_covers_subdomains_only() {
        let allow = list(&["https://*.example.com"]);
        assert!(allow.check("https://a.example.com/").is_ok());
        assert!(allow.check("https://a.b.example.com/").is_ok());
        assert!(allow.check("https://example.com/").is_err());
        assert!(allow.check("https://evilexample.com/").is_err());
    }

    #[test]
    fn an_empty_list_allows_nothing() {
        assert!(
            AllowList::default()
                .check("https://api.example.com/")
                .is_err()
        );
    }

    #[test]
    fn refuses_non_http_schemes_and_bad_entries() {
        let allow = list(&["https://api.example.com"]);
        assert!(allow.check("file:///etc/passwd").is_err());
        assert!(AllowedOrigin::parse("ftp://example.com").is_err());
        assert!(AllowedOrigin::parse("https://example.com/path").is_err());
        assert!(AllowedOrigin::parse("https://a*.example.com").is_err());
        assert!(AllowedOrigin::parse("example.com").is_err());
    }

    #[test]
    fn names_never_lead_to_link_local_or_metadata_addresses() {
        for forbidden in [
            "169.254.169.254",
            "169.254.0.1",
            "0.0.0.0",
            "100.100.100.200",
            "fe80::1",
            "::",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
        ] {
            let ip: IpAddr = forbidden.parse().expect("test address");
            assert!(is_forbidden_target(ip), "{forbidden}");
        }
        for allowed in [
            "127.0.0.1",
            "10.1.2.3",
            "93.184.216.34",
            "::1",
            "2001:db8::1",
        ] {
            let ip: IpAddr = allowed.parse().expect("test address");
            assert!(!is_forbidden_target(ip), "{allowed}");
        }
    }

    #[test]
    fn ip_literals_match_exactly() {
        let allow = list(&["http://[::1]:9000"]);
        assert!(allow.check("http://[0:0:0:0:0:0:0:1]:9000/").is_ok());
        assert!(allow.check("http://127.0.0.1:9000/").is_err());
    }
}
