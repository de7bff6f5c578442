//! The operator listener: /health, /ready, /metrics, purge, sources and cache status.
//!
//! Binds to loopback unless configured otherwise (the server warns when it
//! does not). /health, /ready and the sources' values (`GET /?key=NAME`, which
//! cachepump served to anyone; `admin.public_key_api: false` puts it behind
//! the token) answer without a token; everything else (metrics, sources
//! status, purge) needs the bearer token, and without a configured token
//! those endpoints answer 403. A request naming a host in `Host` that is not
//! an IP address, `localhost` or one of `admin.hosts` is refused: a web page
//! cannot reach the API through DNS rebinding. Purges hand the cache a
//! [`Purge`]; this module never touches entries itself. Refusals go through
//! the one error mapping (`http::error`).
//!
//! `/console` (module `console`) is the same information for a person: a
//! page, its sign-in form and session cookie.
//!
//! Must not import the proxy.

pub mod console;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::cache::{Cache, Purge};
use crate::config::AdminConfig;
use crate::http::body::{self, Body};
use crate::http::error::{ErrorKind, RequestError};
use crate::http::{health, json};
use crate::plugins::PluginHost;
use crate::sources::Sources;
use crate::upstream::UpstreamClient;

/// Purge requests are a line of JSON; anything bigger is a mistake.
const MAX_PURGE_BODY: usize = 64 * 1024;

/// A sign-in form holds one token.
const MAX_SIGN_IN_BODY: usize = 4 * 1024;

/// The admin API for one config (the token may change on reload).
pub struct Admin {
    /// SHA-256 of the token, so comparing takes the same time for any guess.
    token_digest: Option<[u8; 32]>,
    public_key_api: bool,
    /// Host names besides IP addresses and `localhost`, lowercase.
    hosts: Vec<String>,
    cache: Arc<Cache>,
    sources: Arc<Sources>,
    plugins: Arc<PluginHost>,
    /// The running config's upstreams, for `GET /upstreams`.
    upstreams: BTreeMap<String, Arc<UpstreamClient>>,
    /// What the console's chart draws.
    history: Arc<console::History>,
}

/// `POST /purge` body: exactly one of the four.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    url: Option<String>,
    prefix: Option<String>,
    tag: Option<String>,
    #[serde(default)]
    all: bool,
}

impl Admin {
    pub fn new(
        config: Option<&AdminConfig>,
        cache: Arc<Cache>,
        sources: Arc<Sources>,
        plugins: Arc<PluginHost>,
        upstreams: BTreeMap<String, Arc<UpstreamClient>>,
        history: Arc<console::History>,
    ) -> Self {
        Self {
            token_digest: config
                .and_then(|admin| admin.token.as_deref())
                .filter(|token| !token.is_empty())
                .map(digest),
            public_key_api: config.is_none_or(|admin| admin.public_key_api),
            hosts: config
                .map(|admin| {
                    admin
                        .hosts
                        .iter()
                        .map(|host| host.trim().to_ascii_lowercase())
                        .collect()
                })
                .unwrap_or_default(),
            cache,
            sources,
            plugins,
            upstreams,
            history,
        }
    }

    pub async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let method = request.method().clone();
        match self.route(request).await {
            Ok(response) => response,
            Err(error) => {
                error.log(&method);
                error.into_response()
            }
        }
    }

    async fn route(&self, request: Request<Incoming>) -> Result<Response<Body>, RequestError> {
        self.check_host(&request)?;
        let path = request.uri().path();
        match path {
            "/health" => return Ok(health()),
            "/ready" => return Ok(json(StatusCode::OK, r#"{"status":"ready"}"#)),
            "/" if self.public_key_api
                && matches!(*request.method(), Method::GET | Method::HEAD) =>
            {
                return self.sources.serve_by_key(&request)?.response().await;
            }
            "/console/app.js" => return Ok(console::script()),
            "/console" => return Ok(self.console_page(&request)),
            "/console/login" if request.method() == Method::POST => {
                return self.sign_in(request).await;
            }
            "/console/logout" if request.method() == Method::POST => {
                return Ok(console::signed_out());
            }
            _ => {}
        }
        self.check_token(&request)?;
        match (request.method(), path) {
            (&Method::GET, "/metrics") => Ok(metrics()),
            (&Method::GET, "/sources") => {
                Ok(json(StatusCode::OK, self.sources.status().to_string()))
            }
            (&Method::GET, "/cache") => Ok(json(StatusCode::OK, self.cache_status().to_string())),
            (&Method::GET, "/plugins") => {
                Ok(json(StatusCode::OK, self.plugins.status().to_string()))
            }
            (&Method::GET, "/upstreams") => {
                let status: serde_json::Map<String, serde_json::Value> = self
                    .upstreams
                    .iter()
                    .map(|(name, upstream)| (name.clone(), upstream.status()))
                    .collect();
                Ok(json(
                    StatusCode::OK,
                    serde_json::json!({ "upstreams": status }).to_string(),
                ))
            }
            (&Method::GET | &Method::HEAD, "/") => {
                self.sources.serve_by_key(&request)?.response().await
            }
            (&Method::POST, "/purge") => self.purge(request).await,
            (&Method::GET, "/console/data") => {
                Ok(json(StatusCode::OK, self.console_data().to_string()))
            }
            (_, "/metrics" | "/sources" | "/cache" | "/plugins" | "/upstreams" | "/") => {
                Err(ErrorKind::MethodNotAllowed {
                    allow: "GET",
                    reason: "method not allowed here",
                }
                .into())
            }
            (_, "/purge") => Err(ErrorKind::MethodNotAllowed {
                allow: "POST",
                reason: "method not allowed here",
            }
            .into()),
            _ => Err(ErrorKind::NotFound("no such admin endpoint".to_string()).into()),
        }
    }

    /// Refuses a request whose `Host` names something other than an IP
    /// address, `localhost` or a configured admin host: a browser tricked by
    /// DNS rebinding sends the attacker's name.
    fn check_host<B>(&self, request: &Request<B>) -> Result<(), RequestError> {
        let Some(host) = request.uri().host().map(str::to_string).or_else(|| {
            let value = request.headers().get(header::HOST)?.to_str().ok()?;
            Some(host_of(value).to_string())
        }) else {
            // HTTP/1.0 without Host: no browser sends that.
            return Ok(());
        };
        let host = host.to_ascii_lowercase();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let allowed = bare.parse::<std::net::IpAddr>().is_ok()
            || host == "localhost"
            || self.hosts.contains(&host);
        if allowed {
            Ok(())
        } else {
            Err(ErrorKind::Forbidden(
                "this Host is not one of the admin API's (an IP address, localhost or admin.hosts)",
            )
            .into())
        }
    }

    /// The console page when the request is signed in (or carries the
    /// token), else the sign-in form.
    fn console_page<B>(&self, request: &Request<B>) -> Response<Body> {
        if self.token_digest.is_none() {
            return console::sign_in(
                StatusCode::FORBIDDEN,
                "The console needs <code>admin.token</code> to be set in the config.",
            );
        }
        match self.check_token(request) {
            Ok(()) => console::page(),
            Err(_) => console::sign_in(StatusCode::UNAUTHORIZED, ""),
        }
    }

    /// `POST /console/login` with the token from the form: a session cookie
    /// and on to the console, or the form again.
    async fn sign_in(&self, request: Request<Incoming>) -> Result<Response<Body>, RequestError> {
        let Some(expected) = &self.token_digest else {
            return Ok(self.console_page(&request));
        };
        let form = Limited::new(request.into_body(), MAX_SIGN_IN_BODY)
            .collect()
            .await
            .map_err(|_| {
                RequestError::bad_request("the sign-in form could not be read or is over 4 KiB")
            })?
            .to_bytes();
        let presented = console::token_from_form(&form).map(|token| digest(&token));
        match presented {
            Some(presented) if constant_time_eq(&presented, expected) => {
                tracing::info!("console sign-in");
                Ok(console::signed_in(expected))
            }
            _ => {
                tracing::warn!("console sign-in with a wrong token");
                Ok(console::sign_in(
                    StatusCode::UNAUTHORIZED,
                    "That is not the admin token.",
                ))
            }
        }
    }

    /// What the console page polls.
    fn console_data(&self) -> serde_json::Value {
        self.cache.run_pending_tasks();
        let waiting: u64 = self
            .cache
            .in_flight()
            .into_iter()
            .map(|(_, waiters)| waiters)
            .sum();
        // A fold from +0.0: f64's `sum` starts at -0.0, shown as "-0".
        let requests_total = crate::telemetry::samples("larder_requests_total")
            .iter()
            .fold(0.0, |total, sample| total + sample.value);
        let upstreams: serde_json::Map<String, serde_json::Value> = self
            .upstreams
            .iter()
            .map(|(name, upstream)| (name.clone(), upstream.status()))
            .collect();
        let mut data = console::history_json(&self.history);
        data["requests_total"] = requests_total.into();
        data["cache"] = serde_json::json!({
            "entries": self.cache.entry_count(),
            "bytes": self.cache.weighted_size(),
            "waiting": waiting,
            "stats": self.cache.stats(),
        });
        data["shared"] = self.cache.tier_status();
        data["upstreams"] = upstreams.into();
        data["sources"] = self.sources.status();
        data["plugins"] = self.plugins.status();
        data
    }

    /// Passes a request that carries the right bearer token, or the
    /// console's session cookie (for a change, with the console's header
    /// too); 401 or 403 otherwise.
    fn check_token<B>(&self, request: &Request<B>) -> Result<(), RequestError> {
        let Some(expected) = &self.token_digest else {
            return Err(ErrorKind::Forbidden(
                "this endpoint needs admin.token to be set in the config",
            )
            .into());
        };
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(|token| digest(token.trim()));
        let from_console = || {
            let reads = matches!(*request.method(), Method::GET | Method::HEAD);
            (reads || request.headers().contains_key(console::CONSOLE_HEADER))
                && console::has_session(request.headers(), expected, std::time::SystemTime::now())
        };
        match presented {
            Some(presented) if constant_time_eq(&presented, expected) => Ok(()),
            None if from_console() => Ok(()),
            _ => Err(ErrorKind::Unauthorized(
                "missing or wrong bearer token (Authorization: Bearer <admin.token>)",
            )
            .into()),
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
            "fill_bytes": self.cache.fill_bytes(),
            "shared": self.cache.tier_status(),
            "in_flight": in_flight,
            "stats": self.cache.stats(),
        })
    }

    async fn purge(&self, request: Request<Incoming>) -> Result<Response<Body>, RequestError> {
        let bytes = Limited::new(request.into_body(), MAX_PURGE_BODY)
            .collect()
            .await
            .map_err(|_| {
                RequestError::bad_request("the purge body could not be read or is over 64 KiB")
            })?
            .to_bytes();
        let asked: PurgeRequest = serde_json::from_slice(&bytes).map_err(|error| {
            RequestError::bad_request(format!(
                r#"expected {{"url": ...}}, {{"prefix": ...}}, {{"tag": ...}} or {{"all": true}}: {error}"#
            ))
        })?;
        let purge = match (asked.url, asked.prefix, asked.tag, asked.all) {
            (Some(url), None, None, false) => Purge::Url(url),
            (None, Some(prefix), None, false) => Purge::Prefix(prefix),
            (None, None, Some(tag), false) => Purge::Tag(tag),
            (None, None, None, true) => Purge::All,
            _ => {
                return Err(RequestError::bad_request(
                    "give exactly one of url, prefix, tag and all",
                ));
            }
        };
        let purged = self.cache.purge(&purge);
        let shared = self.cache.purge_reach(PURGE_REACH_WAIT).await;
        tracing::info!(?purge, purged, shared = shared.as_str(), "purge done");
        Ok(json(StatusCode::OK, shared.answer(purged).to_string()))
    }
}

/// How long a purge's answer waits for the purge to reach the shared tier
/// before saying it is queued.
const PURGE_REACH_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

fn metrics() -> Response<Body> {
    let mut response = Response::new(body::full(crate::telemetry::render_metrics()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// The host part of a `Host` value (`[::1]:80` -> `[::1]`, `a.b:80` -> `a.b`).
fn host_of(value: &str) -> &str {
    let value = value.trim();
    if value.starts_with('[') {
        return value.find(']').map_or(value, |end| &value[..=end]);
    }
    value.rsplit_once(':').map_or(value, |(host, _)| host)
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
