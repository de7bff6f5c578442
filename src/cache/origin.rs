//! What the cache needs from the outside to fill itself: one [`Origin`]
//! fetch, and the [`OriginError`] it may end in, classified the way the
//! stale-serving rules need (RFC 5861: an unreachable or timed-out origin
//! lets stale content answer; anything else does not).

use futures_util::future::BoxFuture;
use http::{Request, Response};

use crate::http::body::Body;
use crate::http::error::RequestError;

/// One upstream fetch, as the caller performs it (forwarding, timeouts and
/// whatever else belongs to fetching, such as the proxy's cache-store
/// plugin phase). The cache decides when to call it and never looks inside.
pub trait Origin: Send + Sync + 'static {
    fn fetch(
        &self,
        request: Request<Body>,
    ) -> BoxFuture<'static, Result<Response<Body>, OriginError>>;
}

/// Why a fetch produced no response, as far as the cache's rules care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginErrorKind {
    /// No connection, or it broke before a response.
    Unreachable,
    /// No response within the origin's timeout.
    TimedOut,
    /// Anything else (a plugin, a client's body): stale content does not cover it.
    Other,
}

/// A failed fetch: the cache's classification, and the error the client is
/// told about, handed back unchanged. Cloned once per coalesced waiter.
#[derive(Debug, Clone)]
pub struct OriginError {
    pub kind: OriginErrorKind,
    pub error: RequestError,
}

impl OriginError {
    /// The origin could not be reached or did not answer in time: the
    /// failures stale-if-error and the disconnected grace cover.
    pub fn is_origin_down(&self) -> bool {
        matches!(
            self.kind,
            OriginErrorKind::Unreachable | OriginErrorKind::TimedOut
        )
    }
}
