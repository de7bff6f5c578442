//! What a client is told when an upstream or a plugin fails: the other
//! modules' error values mapped onto the one client-facing [`RequestError`].

use std::sync::Arc;

use crate::http::error::{ErrorKind, RequestError};
use crate::plugins::{FailureKind, PluginError};
use crate::upstream::{self, UpstreamError};

pub fn from_upstream(error: UpstreamError) -> RequestError {
    let kind = match error.kind {
        upstream::FailureKind::Timeout => ErrorKind::UpstreamTimeout {
            upstream: error.upstream,
            timeout_ms: u64::try_from(error.waited.as_millis()).unwrap_or(u64::MAX),
        },
        upstream::FailureKind::Connect => ErrorKind::UpstreamUnavailable {
            upstream: error.upstream,
            reason: "connection failed".to_string(),
        },
        upstream::FailureKind::Reset => ErrorKind::UpstreamUnavailable {
            upstream: error.upstream,
            reason: "connection closed before a complete response head".to_string(),
        },
        upstream::FailureKind::RequestBody => ErrorKind::BadRequest(
            "the request body could not be read (malformed chunked encoding, or cut short)"
                .to_string(),
        ),
    };
    let mut mapped = RequestError::from(kind);
    mapped.retry = error.retry;
    mapped
}

/// `upstream` is the route's upstream, if any: a response body that broke
/// while a plugin waited for it is that upstream's failure.
pub fn from_plugin(error: PluginError, upstream: Option<&Arc<str>>) -> RequestError {
    match (error.kind, upstream) {
        (FailureKind::BodyUnreadable, Some(upstream)) => ErrorKind::UpstreamUnavailable {
            upstream: upstream.clone(),
            reason: error.detail,
        }
        .into(),
        _ => error.into(),
    }
}

/// A plugin's failure, told to the client as the plugin's (502), or as
/// 503 with `Retry-After` when the plugin could not run at all.
impl From<PluginError> for RequestError {
    fn from(error: PluginError) -> Self {
        let reason = format!("{}: {}", error.kind.as_str(), error.detail);
        match error.retry_after {
            Some(after) if error.kind.is_unavailable() => ErrorKind::PluginUnavailable {
                plugin: error.plugin,
                reason,
                retry_after_secs: after.as_secs().max(1),
            },
            _ => ErrorKind::PluginFailed {
                plugin: error.plugin,
                reason,
            },
        }
        .into()
    }
}
