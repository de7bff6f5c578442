//! The operator listener: /health, /ready, /metrics, purge, sources and cache status.
//!
//! Binds to loopback unless configured otherwise (the server warns when it
//! does not). /health, /ready and the sources' values (`GET /?key=NAME`, which
//! cachepump served to anyone) answer without a token; everything else
//! (metrics, sources status, purge) needs the bearer token, and without a
//! configured token those endpoints answer 403. Purges call the cache's purge
//! API; this module never touches entries itself.

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::sync::Arc;

use crate::body::{self, Body};
use crate::cache::Cache;
use crate::config::AdminConfig;
use crate::error::problem_response;
use crate::proxy::{Shared, health};
use crate::sources::Sources;

/// Purge requests are a line of JSON; anything bigger is a mistake.
const MAX_PURGE_BODY: usize = 64 * 1024;

/// The admin API for one config (the token may change on reload).
pub struct Admin {
    /// SHA-256 of the token, so comparing takes the same time for any guess.
    token_digest: Option<[u8; 32]>,
    cache: Arc<Cache>,
    sources: Arc<Sources>,
}

/// `POST /purge` body: exactly one of the three.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    url: Option<String>,
    prefix: Option<String>,
    tag: Option<String>,
}

impl Admin {
    pub fn new(config: Option<&AdminConfig>, shared: &Shared) -> Self {
        Self {
            token_digest: config
                .and_then(|admin| admin.token.as_deref())
                .filter(|token| !token.is_empty())
                .map(digest),
            cache: shared.cache.clone(),
            sources: shared.sources.clone(),
        }
    }

    pub async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path();
        match path {
            "/health" => return health(),
            "/ready" => return json(StatusCode::OK, r#"{"status":"ready"}"#.to_string()),
            "/" if matches!(*request.method(), Method::GET | Method::HEAD) => {
                return self.sources.serve_by_key(&request);
            }
            _ => {}
        }
        if let Some(refusal) = self.refusal(&request) {
            return refusal;
        }
        match (request.method(), path) {
            (&Method::GET, "/metrics") => metrics(),
            (&Method::GET, "/sources") => json(StatusCode::OK, self.sources.status().to_string()),
            (&Method::GET, "/cache") => json(StatusCode::OK, self.cache_status().to_string()),
            (&Method::POST, "/purge") => self.purge(request).await,
            (_, "/metrics" | "/sources" | "/cache" | "/" | "/purge") => {
                problem_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
            }
            _ => problem_response(StatusCode::NOT_FOUND, "no such admin endpoint"),
        }
    }

    /// `None` when the request carries the right token; else the 401/403 to send.
    fn refusal<B>(&self, request: &Request<B>) -> Option<Response<Body>> {
        let Some(expected) = &self.token_digest else {
            return Some(problem_response(
                StatusCode::FORBIDDEN,
                "this endpoint needs admin.token to be set in the config",
            ));
        };
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(|token| digest(token.trim()));
        match presented {
            Some(presented) if constant_time_eq(&presented, expected) => None,
            _ => {
                let mut response = problem_response(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token (Authorization: Bearer <admin.token>)",
                );
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                Some(response)
            }
        }
    }

    /// `GET /cache`: what the cache holds and which fills are in progress,
    /// with how many requests wait on each (coalesced misses).
    fn cache_status(&self) -> serde_json::Value {
        // Exact counts: moka applies evictions and counts lazily.
        self.cache.run_pending_tasks();
        let in_flight: Vec<serde_json::Value> = self
            .cache
            .in_flight()
            .into_iter()
            .map(|(key, waiters)| serde_json::json!({ "key": key, "waiters": waiters }))
            .collect();
        serde_json::json!({
            "entries": self.cache.entry_count(),
            "bytes": self.cache.weighted_size(),
            "in_flight": in_flight,
        })
    }

    async fn purge(&self, request: Request<Incoming>) -> Response<Body> {
        let bytes = match Limited::new(request.into_body(), MAX_PURGE_BODY)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(_) => {
                return problem_response(
                    StatusCode::BAD_REQUEST,
                    "the purge body could not be read or is over 64 KiB",
                );
            }
        };
        let purge: PurgeRequest = match serde_json::from_slice(&bytes) {
            Ok(purge) => purge,
            Err(error) => {
                return problem_response(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        r#"expected {{"url": ...}}, {{"prefix": ...}} or {{"tag": ...}}: {error}"#
                    ),
                );
            }
        };
        let purged = match (purge.url, purge.prefix, purge.tag) {
            (Some(url), None, None) => self.cache.purge_url(&url),
            (None, Some(prefix), None) => self.cache.purge_prefix(&prefix),
            (None, None, Some(tag)) => self.cache.purge_tag(&tag),
            _ => {
                return problem_response(
                    StatusCode::BAD_REQUEST,
                    "give exactly one of url, prefix and tag",
                );
            }
        };
        tracing::info!(purged, "purge done");
        json(
            StatusCode::OK,
            serde_json::json!({ "purged": purged }).to_string(),
        )
    }
}

fn metrics() -> Response<Body> {
    let mut response = Response::new(body::full(crate::telemetry::render_metrics()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

fn json(status: StatusCode, text: String) -> Response<Body> {
    let mut response = Response::new(body::full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_needs_every_byte() {
        let a = digest("secret");
        assert!(constant_time_eq(&a, &digest("secret")));
        assert!(!constant_time_eq(&a, &digest("secreT")));
        assert!(!constant_time_eq(&a, &digest("")));
    }
}
