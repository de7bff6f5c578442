//! The errors a client can see, and the one place they become responses.
//!
//! Every module maps its own failures into [`ProxyError`]; [`ProxyError::into_response`]
//! turns them into `application/problem+json` bodies (RFC 9457) with a status that
//! follows from who is to blame. Internal detail never reaches the client.

use http::{Response, StatusCode, header};

use crate::body::{self, Body};

/// Who caused a failure: decides the status code and the log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    Client,
    Upstream,
    Plugin,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches {0}")]
    NoRoute(String),
    #[error("malformed request: {0}")]
    BadRequest(String),
    #[error("request body larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("upstream {upstream} could not be reached: {reason}")]
    UpstreamUnavailable { upstream: String, reason: String },
    #[error("upstream {upstream} did not answer within {timeout_ms} ms")]
    UpstreamTimeout { upstream: String, timeout_ms: u64 },
    #[error("the response is not in the cache and the request said only-if-cached")]
    NotCached,
    #[error("plugin {plugin} failed: {reason}")]
    PluginFailed { plugin: String, reason: String },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    pub fn blame(&self) -> Blame {
        match self {
            Self::NoRoute(_)
            | Self::BadRequest(_)
            | Self::BodyTooLarge { .. }
            | Self::NotFound(_) => Blame::Client,
            Self::UpstreamUnavailable { .. } | Self::UpstreamTimeout { .. } | Self::NotCached => {
                Blame::Upstream
            }
            Self::PluginFailed { .. } => Blame::Plugin,
            Self::Internal(_) => Blame::Internal,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute(_) | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UpstreamUnavailable { .. } | Self::PluginFailed { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. } | Self::NotCached => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// What the client is told: internal and plugin detail stays in the log.
    fn detail(&self) -> String {
        match self {
            Self::Internal(_) => "an internal error occurred; see the proxy's log".to_string(),
            Self::PluginFailed { plugin, .. } => format!("plugin {plugin} failed"),
            other => other.to_string(),
        }
    }

    /// The `application/problem+json` response for this error.
    pub fn into_response(self) -> Response<Body> {
        problem_response(self.status(), &self.detail())
    }
}

/// An RFC 9457 problem response with the status's reason as its title.
pub fn problem_response(status: StatusCode, detail: &str) -> Response<Body> {
    let json = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut response = Response::new(body::full(json.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/problem+json"),
    );
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}
