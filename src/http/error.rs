//! The errors a client can see, and the one place they become responses.
//!
//! Every module that answers clients (the proxy, the cache, sources, the
//! admin API) describes a refusal or failure as a [`RequestError`]: what
//! happened ([`ErrorKind`]), who is to blame ([`Blame`]: decides the log
//! level) and whether it could be retried ([`Retry`]). [`RequestError::into_response`]
//! is the only producer of `application/problem+json` (RFC 9457); internal
//! and plugin detail never reaches the client. It lives in this leaf module
//! so that the admin API and sources use the same mapping without importing
//! the proxy.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};

use super::body::{self, Body};

/// Who caused a failure: decides the log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    Client,
    Upstream,
    Plugin,
    /// Larder itself, or its configuration.
    Internal,
}

/// Whether sending the same request again (to another server) is safe, as
/// Pingora's `RetryType`: decided where the failure happened, carried as data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The request may have reached the upstream, or retrying cannot help.
    No,
    /// Nothing was sent (no connection could be made): safe for any method.
    NothingSent,
}

/// What went wrong, with the detail a client may see.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ErrorKind {
    #[error("no route matches {0}")]
    NoRoute(String),
    #[error("malformed request: {0}")]
    BadRequest(String),
    #[error("request body larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("the request has passed through Larder {hops} times; an upstream points back at it")]
    Loop { hops: usize },
    /// `allow` is the `Allow` header's value.
    #[error("{reason}")]
    MethodNotAllowed {
        allow: &'static str,
        reason: &'static str,
    },
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("upstream {upstream} could not be reached: {reason}")]
    UpstreamUnavailable { upstream: Arc<str>, reason: String },
    #[error("upstream {upstream} did not answer within {timeout_ms} ms")]
    UpstreamTimeout { upstream: Arc<str>, timeout_ms: u64 },
    #[error("the response is not in the cache and the request said only-if-cached")]
    NotCached,
    #[error("the stored response is stale and the origin could not be reached to revalidate it")]
    StaleNotRevalidated,
    #[error("plugin {plugin} failed: {reason}")]
    PluginFailed { plugin: Arc<str>, reason: String },
    /// A plugin the route needs could not run (its circuit is open, or no
    /// capacity was free): try again after `retry_after_secs`.
    #[error("plugin {plugin} is unavailable: {reason}")]
    PluginUnavailable {
        plugin: Arc<str>,
        reason: String,
        retry_after_secs: u64,
    },
    /// The origin did not deliver a complete response for the cache in time.
    #[error("the origin did not complete the response within {timeout_ms} ms")]
    OriginTimeout { timeout_ms: u64 },
    /// Larder itself is at a limit (open tunnels, say): try again later.
    #[error("{0}")]
    Unavailable(&'static str),
    /// cachepump's plain-text answers on `/?key=`, kept byte for byte
    /// because its clients may match them.
    #[error("{text}")]
    PlainText {
        status: StatusCode,
        text: &'static str,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ErrorKind {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute(_) | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Loop { .. } => StatusCode::LOOP_DETECTED,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::UpstreamUnavailable { .. } | Self::PluginFailed { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. }
            | Self::OriginTimeout { .. }
            | Self::NotCached
            | Self::StaleNotRevalidated => StatusCode::GATEWAY_TIMEOUT,
            Self::PluginUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::PlainText { status, .. } => *status,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Who is to blame unless the caller knows better.
    fn blame(&self) -> Blame {
        match self {
            Self::NoRoute(_)
            | Self::BadRequest(_)
            | Self::BodyTooLarge { .. }
            | Self::MethodNotAllowed { .. }
            | Self::Unauthorized(_)
            | Self::Forbidden(_)
            | Self::NotFound(_)
            | Self::NotCached
            | Self::PlainText { .. } => Blame::Client,
            Self::UpstreamUnavailable { .. }
            | Self::UpstreamTimeout { .. }
            | Self::StaleNotRevalidated => Blame::Upstream,
            Self::PluginFailed { .. } | Self::PluginUnavailable { .. } => Blame::Plugin,
            Self::OriginTimeout { .. } => Blame::Upstream,
            // A loop is an upstream pointing back at Larder: configuration.
            Self::Loop { .. } | Self::Internal(_) | Self::Unavailable(_) => Blame::Internal,
        }
    }
}

/// A failure to answer a request as asked.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind}")]
pub struct RequestError {
    pub kind: ErrorKind,
    pub blame: Blame,
    pub retry: Retry,
}

impl From<ErrorKind> for RequestError {
    fn from(kind: ErrorKind) -> Self {
        Self {
            blame: kind.blame(),
            kind,
            retry: Retry::No,
        }
    }
}

impl RequestError {
    pub fn bad_request(detail: impl Into<String>) -> Self {
        ErrorKind::BadRequest(detail.into()).into()
    }

    pub fn internal(detail: impl Into<String>) -> Self {
        ErrorKind::Internal(detail.into()).into()
    }

    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    /// What the client is told: internal and plugin detail stays in the log.
    fn detail(&self) -> String {
        match &self.kind {
            ErrorKind::Internal(_) => "an internal error occurred; see the proxy's log".to_string(),
            ErrorKind::PluginFailed { plugin, .. } => format!("plugin {plugin} failed"),
            ErrorKind::PluginUnavailable { plugin, .. } => {
                format!("plugin {plugin} is unavailable; try again later")
            }
            other => other.to_string(),
        }
    }

    /// Client faults at DEBUG, upstream and plugin faults at WARN, ours at ERROR.
    pub fn log(&self, method: &Method) {
        let status = self.status().as_u16();
        let retry = self.retry == Retry::NothingSent;
        match self.blame {
            Blame::Client => tracing::debug!(%method, status, error = %self, "request refused"),
            Blame::Upstream | Blame::Plugin => {
                tracing::warn!(%method, status, retry, error = %self, "request failed")
            }
            Blame::Internal => tracing::error!(%method, status, error = %self, "request failed"),
        }
    }

    /// The response for this error: `application/problem+json` with the
    /// status's reason as its title, never stored; cachepump's plain-text
    /// answers as they always were.
    pub fn into_response(self) -> Response<Body> {
        let status = self.status();
        let mut response = match &self.kind {
            ErrorKind::PlainText { text, .. } => plain_text(text),
            _ => problem(status, &self.detail()),
        };
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match &self.kind {
            ErrorKind::MethodNotAllowed { allow, .. } => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            ErrorKind::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ErrorKind::PluginUnavailable {
                retry_after_secs, ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            ErrorKind::Unavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

/// An RFC 9457 problem document.
fn problem(status: StatusCode, detail: &str) -> Response<Body> {
    let json = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut response = Response::new(body::full(json.to_string()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

fn plain_text(text: &'static str) -> Response<Body> {
    let mut response = Response::new(body::full(text));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(text.len()));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_blame_follow_the_kind() {
        let error = RequestError::from(ErrorKind::UpstreamTimeout {
            upstream: Arc::from("api"),
            timeout_ms: 10,
        });
        assert_eq!(error.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(error.blame, Blame::Upstream);
        let refused = RequestError::from(ErrorKind::MethodNotAllowed {
            allow: "GET, HEAD",
            reason: "a source answers GET and HEAD only",
        })
        .into_response();
        assert_eq!(refused.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(refused.headers()["allow"], "GET, HEAD");
        assert_eq!(
            refused.headers()["content-type"],
            "application/problem+json"
        );
    }

    #[test]
    fn internal_detail_stays_in_the_log() {
        let error = RequestError::internal("the flight map is poisoned");
        assert_eq!(
            error.detail(),
            "an internal error occurred; see the proxy's log"
        );
    }
}
