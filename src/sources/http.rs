//! The `http` kind: one request per run (cachepump's semantics: `method`
//! empty means GET, `body` is sent even with GET, `header` replaces the
//! default headers, basic auth when a user or password is set, redirects
//! followed up to 10 like Go's client). The response body is capped
//! (`max_body`); a redirect that leaves the endpoint's origin loses the
//! credentials (Authorization, Cookie, Proxy-Authorization and the
//! configured `secret_headers`), and one from https to http is refused
//! while credentials are set.
//!
//! Must never log or display the password: the Authorization header is
//! marked sensitive and `Debug` prints `*****`; endpoints lose any userinfo
//! before they reach a log line or an error.

use std::fmt;

use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::run::{Fetched, SourceError};
use crate::config::{Endpoint, HttpSource};
use crate::http::error_chain;

/// Go's `http.Client` stops after this many redirects.
const MAX_REDIRECTS: usize = 10;

/// One pooled client shared by every http source.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds the shared client: http and https, with the one outbound trust
/// policy (`http::tls`).
pub fn build_client() -> HttpClient {
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = match crate::http::tls::client_config(None) {
        Ok(config) => builder.with_tls_config(config),
        Err(error) => {
            tracing::warn!(%error, "TLS setup failed; http sources trust the bundled webpki roots");
            builder.with_webpki_roots()
        }
    };
    let connector = builder.https_or_http().enable_http1().build();
    Client::builder(TokioExecutor::new()).build(connector)
}

pub struct HttpProvider {
    endpoint: Uri,
    /// The endpoint without userinfo, for logs and errors.
    shown_endpoint: String,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
    accept_status: Option<Vec<StatusCode>>,
    auth_user: Option<String>,
    max_body: u64,
    /// Fields that go when a redirect leaves the endpoint's origin.
    credentials: Vec<HeaderName>,
    client: HttpClient,
}

impl fmt::Debug for HttpProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpProvider")
            .field("endpoint", &self.shown_endpoint)
            .field("method", &self.method)
            .field("header_names", &self.headers.keys().collect::<Vec<_>>())
            .field(
                "auth",
                &self
                    .auth_user
                    .as_ref()
                    .map(|user| format!("{{User:{user} Password:*****}}")),
            )
            .field("body_bytes", &self.body.len())
            .finish()
    }
}

impl HttpProvider {
    /// Pre-builds the request parts from the parsed settings.
    pub fn new(
        config: &HttpSource,
        endpoint: &Endpoint,
        accept_status: Option<Vec<StatusCode>>,
        client: HttpClient,
    ) -> Self {
        let mut headers = config.header.clone();
        let mut auth_user = None;
        if let Some(auth) = config
            .auth
            .as_ref()
            .filter(|a| !a.user.is_empty() || !a.password.is_empty())
        {
            let token = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", auth.user, auth.password));
            // Base64 is always a valid header value.
            if let Ok(mut value) = HeaderValue::from_str(&format!("Basic {token}")) {
                value.set_sensitive(true);
                headers.insert(header::AUTHORIZATION, value);
            }
            auth_user = Some(auth.user.clone());
        }
        if !headers.contains_key(header::USER_AGENT) {
            headers.insert(
                header::USER_AGENT,
                HeaderValue::from_static(concat!("larder/", env!("CARGO_PKG_VERSION"))),
            );
        }
        let mut credentials = vec![
            header::AUTHORIZATION,
            header::COOKIE,
            header::PROXY_AUTHORIZATION,
        ];
        credentials.extend(config.secret_headers.iter().cloned());
        Self {
            shown_endpoint: redact(endpoint.as_str()),
            endpoint: endpoint.uri.clone(),
            method: config.method.clone(),
            headers,
            body: Bytes::from(config.body.clone()),
            accept_status,
            auth_user,
            max_body: config.max_body,
            credentials,
            client,
        }
    }

    pub async fn fetch(&self) -> Result<Fetched, SourceError> {
        let mut uri = self.endpoint.clone();
        let mut method = self.method.clone();
        let mut body = self.body.clone();
        let mut headers = self.headers.clone();
        // Go sends at most ten requests: the tenth redirect is an error.
        for _ in 0..MAX_REDIRECTS {
            let request = build_request(&method, &uri, &headers, body.clone());
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| self.request_error(&e))?;
            let status = response.status();
            if let Some(location) = redirect_target(&uri, status, response.headers()) {
                // Go: 301/302/303 turn into a GET without a body; 307/308 repeat as sent.
                if matches!(
                    status,
                    StatusCode::MOVED_PERMANENTLY | StatusCode::FOUND | StatusCode::SEE_OTHER
                ) && method != Method::HEAD
                {
                    method = Method::GET;
                    body = Bytes::new();
                    headers.remove(header::CONTENT_TYPE);
                }
                let carries_credentials = self
                    .credentials
                    .iter()
                    .any(|name| headers.contains_key(name));
                if carries_credentials && is_downgrade(&uri, &location) {
                    return Err(SourceError::InsecureRedirect {
                        endpoint: self.shown_endpoint.clone(),
                    });
                }
                // As Go's client (and curl): credentials stay with the
                // origin they were configured for.
                if !same_origin(&location, &self.endpoint) {
                    for name in &self.credentials {
                        headers.remove(name);
                    }
                }
                uri = location;
                continue;
            }
            let content_type = response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|value| value.to_str().ok())
                .map(str::to_string);
            let limit = usize::try_from(self.max_body).unwrap_or(usize::MAX);
            let bytes = Limited::new(response.into_body(), limit)
                .collect()
                .await
                .map_err(|error| {
                    if error.is::<http_body_util::LengthLimitError>() {
                        SourceError::TooLarge {
                            endpoint: self.shown_endpoint.clone(),
                            limit: self.max_body,
                        }
                    } else {
                        self.request_error(&*error)
                    }
                })?
                .to_bytes();
            if !self.is_accepted(status) {
                return Err(SourceError::Status {
                    endpoint: self.shown_endpoint.clone(),
                    status: status.as_u16(),
                });
            }
            return Ok(Fetched::Updated {
                body: bytes,
                content_type,
                headers: Vec::new(),
            });
        }
        Err(SourceError::TooManyRedirects {
            endpoint: self.shown_endpoint.clone(),
        })
    }

    fn is_accepted(&self, status: StatusCode) -> bool {
        match &self.accept_status {
            Some(accepted) => accepted.contains(&status),
            None => status.is_success(),
        }
    }

    fn request_error(&self, error: &(dyn std::error::Error + 'static)) -> SourceError {
        SourceError::Request {
            endpoint: self.shown_endpoint.clone(),
            reason: error_chain(error),
        }
    }
}

fn build_request(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri.clone();
    *request.headers_mut() = headers.clone();
    request
}

/// Whether two URLs share an origin: scheme, host and port (default ports
/// filled in, host case ignored).
fn same_origin(a: &Uri, b: &Uri) -> bool {
    let origin = |uri: &Uri| {
        let scheme = uri.scheme_str().unwrap_or("http").to_ascii_lowercase();
        let host = uri.host().unwrap_or("").to_ascii_lowercase();
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        (scheme, host, port)
    };
    origin(a) == origin(b)
}

/// A redirect from https to plain http.
fn is_downgrade(from: &Uri, to: &Uri) -> bool {
    from.scheme_str() == Some("https") && to.scheme_str() != Some("https")
}

/// The absolute target of a redirect, if `status` is one with a usable Location.
fn redirect_target(current: &Uri, status: StatusCode, headers: &HeaderMap) -> Option<Uri> {
    if !matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
        return None;
    }
    let location = headers.get(header::LOCATION)?.to_str().ok()?;
    let base = url::Url::parse(&current.to_string()).ok()?;
    let target = base.join(location).ok()?;
    if !matches!(target.scheme(), "http" | "https") {
        return None;
    }
    target.as_str().parse().ok()
}

/// `endpoint` without a password in its userinfo.
fn redact(endpoint: &str) -> String {
    match url::Url::parse(endpoint) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("*****"));
            url.to_string()
        }
        _ => endpoint.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BasicAuth;

    fn source() -> HttpSource {
        HttpSource {
            endpoint: None,
            method: Method::GET,
            header: HeaderMap::new(),
            auth: None,
            body: String::new(),
            max_body: 1 << 20,
            secret_headers: Vec::new(),
        }
    }

    #[test]
    fn origins_compare_scheme_host_and_port() {
        let uri = |text: &str| text.parse::<Uri>().unwrap_or_default();
        assert!(same_origin(
            &uri("http://A.example/x"),
            &uri("http://a.example:80/y")
        ));
        assert!(!same_origin(
            &uri("http://a.example/"),
            &uri("https://a.example/")
        ));
        assert!(!same_origin(
            &uri("http://a.example/"),
            &uri("http://a.example:8080/")
        ));
        assert!(!same_origin(
            &uri("http://a.example/"),
            &uri("http://b.example/")
        ));
        assert!(is_downgrade(
            &uri("https://a.example/"),
            &uri("http://a.example/")
        ));
        assert!(!is_downgrade(
            &uri("http://a.example/"),
            &uri("https://a.example/")
        ));
    }

    #[tokio::test]
    async fn debug_output_masks_the_password() {
        let mut config = source();
        config.auth = Some(BasicAuth {
            user: "admin".to_string(),
            password: "adminadmin".to_string(),
        });
        let url = "http://127.0.0.1:1/";
        let endpoint = Endpoint::new(url.parse().unwrap(), url);
        let provider = HttpProvider::new(&config, &endpoint, None, build_client());
        let shown = format!("{provider:?}");
        assert!(!shown.contains("adminadmin"), "{shown}");
        assert!(!shown.contains("YWRtaW46YWRtaW5hZG1pbg"), "{shown}");
        assert!(shown.contains("Password:*****"), "{shown}");
    }

    #[test]
    fn passwords_in_endpoints_are_redacted() {
        assert_eq!(
            redact("http://admin:secret@db.local:8123/q"),
            "http://admin:*****@db.local:8123/q"
        );
        assert_eq!(redact("http://db.local/"), "http://db.local/");
    }

    #[test]
    fn redirects_resolve_relative_locations() {
        let current: Uri = "http://a.example/x/y?q=1".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::LOCATION, HeaderValue::from_static("../z"));
        let target = redirect_target(&current, StatusCode::FOUND, &headers).unwrap();
        assert_eq!(target, "http://a.example/z");
        assert!(redirect_target(&current, StatusCode::OK, &headers).is_none());
    }
}
