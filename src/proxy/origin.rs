//! The upstream behind one route, as the pipeline and the cache fetch from
//! it: forward the cleaned request to the upstream, then run the route's
//! cache-store phase plugins on what came back. For a cached route the cache
//! calls this (once per fill, through [`cache::Origin`]), so cache-store
//! plugins run exactly once per stored response.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use http::request::Parts;
use http::{Request, Response};

use super::errors;
use crate::cache::{self, OriginError, OriginErrorKind};
use crate::config::PluginPhase;
use crate::http::body::{self, Body};
use crate::http::error::{ErrorKind, RequestError};
use crate::http::{copy_head, hop_by_hop};
use crate::plugins::PluginHost;
use crate::upstream::UpstreamClient;

#[derive(Clone)]
pub struct RouteOrigin {
    upstream: Arc<UpstreamClient>,
    plugins: Arc<PluginHost>,
    chain: Arc<[String]>,
    /// When set, the upstream's body fails once it sends nothing this long.
    body_idle_timeout: Option<std::time::Duration>,
}

impl RouteOrigin {
    pub fn new(
        upstream: Arc<UpstreamClient>,
        plugins: Arc<PluginHost>,
        chain: Arc<[String]>,
    ) -> Self {
        Self {
            upstream,
            plugins,
            chain,
            body_idle_timeout: None,
        }
    }

    /// This origin with upstream bodies that fail after `idle` without data.
    pub fn with_body_idle_timeout(&self, idle: std::time::Duration) -> Self {
        Self {
            body_idle_timeout: Some(idle),
            ..self.clone()
        }
    }

    pub fn upstream(&self) -> &Arc<UpstreamClient> {
        &self.upstream
    }

    /// The two steps of an origin fetch: forward, then the cache-store phase.
    pub async fn fetch(&self, request: Request<Body>) -> Result<Response<Body>, RequestError> {
        if self.chain.is_empty() {
            return self.forward(request).await;
        }
        let (head, body) = request.into_parts();
        let plugin_head = copy_head(&head);
        let response = self.forward(Request::from_parts(head, body)).await?;
        self.cache_store_phase(&plugin_head, response).await
    }

    /// Sends a cleaned request upstream and cleans the response's headers.
    async fn forward(&self, request: Request<Body>) -> Result<Response<Body>, RequestError> {
        let mut response = self
            .upstream
            .send(request)
            .await
            .map_err(errors::from_upstream)?;
        hop_by_hop::strip(response.headers_mut(), false);
        if let Some(idle) = self.body_idle_timeout {
            response = response.map(|body| body::with_idle_timeout(body, idle));
        }
        Ok(response)
    }

    /// The route's `phase: cache-store` transformers, on the upstream's
    /// response before the cache stores it.
    async fn cache_store_phase(
        &self,
        head: &Parts,
        response: Response<Body>,
    ) -> Result<Response<Body>, RequestError> {
        let phase =
            self.plugins
                .on_response(&self.chain, PluginPhase::CacheStore, head, response, None);
        Box::pin(phase)
            .await
            .map_err(|error| errors::from_plugin(error, Some(self.upstream.name())))
    }
}

impl cache::Origin for RouteOrigin {
    fn fetch(
        &self,
        request: Request<Body>,
    ) -> BoxFuture<'static, Result<Response<Body>, OriginError>> {
        let origin = self.clone();
        Box::pin(async move {
            origin.fetch(request).await.map_err(|error| OriginError {
                kind: match error.kind {
                    ErrorKind::UpstreamUnavailable { .. } => OriginErrorKind::Unreachable,
                    ErrorKind::UpstreamTimeout { .. } => OriginErrorKind::TimedOut,
                    _ => OriginErrorKind::Other,
                },
                error,
            })
        })
    }
}
