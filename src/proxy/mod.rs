//! Routing, forwarding and header hygiene: the request path from a client's
//! request to the upstream's response.
//!
//! [`Proxy`] is built from one config and swapped whole on reload. Its
//! [`Proxy::handle`] reads as the phases of a request: `route`, `on_request`
//! plugins, then a source, the cache (which calls back into [`RouteOrigin`])
//! or the upstream, then `on_response` plugins and `respond`.
//! Asks `cache` for cached answers but never decides cacheability itself.

mod access;
mod guard;
mod headers;
mod pool;
mod route_metrics;
mod router;
mod upgrade;
mod upstream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::BoxFuture;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;

use crate::body::{self, Body};
use crate::cache::{self, Cache};
use crate::config::{Config, PluginPhase, Route, RouteCache, Upstream};
use crate::error::ProxyError;
use crate::plugins::{ParkedInstances, PluginHost};
use crate::sources::Sources;

pub use guard::{BodyFault, BodyGuard};
use route_metrics::RouteMetrics;
pub use upstream::UpstreamClient;

/// The client's address, in the extensions of requests that go to the
/// cache (its PURGE allow-list reads it). Only there: an extension costs two
/// allocations per request.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// More passes through Larder than any sane chain of proxies makes: the
/// request is looping (an upstream points back at Larder).
const MAX_LARDER_HOPS: usize = 8;

/// The shared parts a [`Proxy`] is built around; they outlive reloads.
#[derive(Clone)]
pub struct Shared {
    pub cache: Arc<Cache>,
    pub sources: Arc<Sources>,
    pub plugins: Arc<PluginHost>,
}

/// Where a route sends its requests.
enum Target {
    Upstream(Arc<RouteOrigin>),
    Source(String),
}

/// One compiled `routes:` entry.
struct RouteEntry {
    matcher: router::Matcher,
    metrics: RouteMetrics,
    target: Target,
    cache: RouteCache,
    plugins: Arc<[String]>,
    max_request_body: Option<u64>,
}

/// The upstream behind one route, as the cache calls it: forwards, then runs
/// the route's cache-store phase plugins on what came back (once per fill).
pub struct RouteOrigin {
    upstream: Arc<UpstreamClient>,
    plugins: Arc<PluginHost>,
    chain: Arc<[String]>,
}

impl cache::Origin for RouteOrigin {
    fn fetch(
        &self,
        request: Request<Body>,
    ) -> BoxFuture<'static, Result<Response<Body>, ProxyError>> {
        let upstream = self.upstream.clone();
        let plugins = self.plugins.clone();
        let chain = self.chain.clone();
        Box::pin(async move {
            let head = (!chain.is_empty()).then(|| copy_head(&request));
            let response = forward(&upstream, request).await?;
            match head {
                Some(head) => {
                    Box::pin(plugins.on_response(&chain, PluginPhase::CacheStore, &head, response))
                        .await
                }
                None => Ok(response),
            }
        })
    }
}

/// Sends a cleaned request upstream and cleans the response's headers.
async fn forward(
    upstream: &UpstreamClient,
    request: Request<Body>,
) -> Result<Response<Body>, ProxyError> {
    let guard = request.extensions().get::<BodyGuard>().cloned();
    match upstream.send(request).await {
        Ok(mut response) => {
            headers::strip_hop_by_hop(response.headers_mut(), false);
            Ok(response)
        }
        // The upstream call failed because the client's body was cut off:
        // that is the client's fault, not the upstream's.
        Err(error) => match guard.and_then(|guard| guard.fault()) {
            Some(BodyFault::TooLarge { limit }) => Err(ProxyError::BodyTooLarge { limit }),
            Some(BodyFault::Idle { timeout }) => Err(ProxyError::BadRequest(format!(
                "the client sent no request body data for {} s",
                timeout.as_secs()
            ))),
            None => Err(error),
        },
    }
}

/// The request path for one config. Immutable; a reload builds a new one.
pub struct Proxy {
    /// `None`: no `routes:` key, cachepump mode.
    routes: Option<Vec<RouteEntry>>,
    shared: Shared,
    upstreams: BTreeMap<String, Arc<UpstreamClient>>,
    max_request_body: Option<u64>,
    access_log: bool,
    /// Metrics of requests no route answered.
    unrouted: RouteMetrics,
}

impl Proxy {
    /// Builds the request path for `config`, reusing the clients (and their
    /// connection pools) of `previous` whose upstream config is unchanged.
    pub fn build(
        config: &Config,
        shared: Shared,
        previous: Option<&Proxy>,
    ) -> Result<Self, String> {
        let mut upstreams = BTreeMap::new();
        for (name, upstream) in &config.upstreams {
            upstreams.insert(name.clone(), reuse_or_build(name, upstream, previous)?);
        }
        let routes = match &config.routes {
            None => None,
            Some(routes) => Some(
                routes
                    .iter()
                    .map(|route| compile_route(route, &upstreams, &shared.plugins))
                    .collect::<Result<Vec<_>, String>>()?,
            ),
        };
        let unrouted = RouteMetrics::new(if routes.is_some() {
            "none"
        } else {
            "cachepump"
        });
        Ok(Self {
            unrouted,
            routes,
            shared,
            upstreams,
            max_request_body: config.server.max_request_body.map(|size| size.0),
            access_log: config.log.access_log,
        })
    }

    /// Answers one request; never fails: errors become problem+json here.
    pub async fn handle(&self, request: Request<Incoming>, client: SocketAddr) -> Response<Body> {
        let started = Instant::now();
        let method = request.method().clone();
        // Skip the line's bookkeeping when the level filter would drop it anyway.
        let logging =
            self.access_log && tracing::enabled!(target: "larder::access", tracing::Level::INFO);
        let path = if logging {
            request.uri().path().to_string()
        } else {
            String::new()
        };
        let mut outcome = Outcome::default();
        let mut response = match self.dispatch(request, client, &mut outcome).await {
            Ok(response) => response,
            Err(error) => {
                log_error(&error, &method);
                error.into_response()
            }
        };
        headers::append_via(response.headers_mut());
        let status = response.status();
        let route = outcome.route.unwrap_or(&self.unrouted);
        route.record(status, started.elapsed());
        if !logging {
            return response;
        }
        let entry = access::AccessEntry {
            method,
            path,
            status,
            upstream: outcome.upstream,
            cache_status: response
                .headers()
                .get("cache-status")
                .and_then(|value| value.to_str().ok())
                .map(str::to_string),
            started,
        };
        response.map(|inner| body::boxed(access::LoggedBody::new(inner, entry)))
    }

    async fn dispatch<'a>(
        &'a self,
        request: Request<Incoming>,
        client: SocketAddr,
        outcome: &mut Outcome<'a>,
    ) -> Result<Response<Body>, ProxyError> {
        check_request(&request)?;
        let hops = headers::larder_hops(request.headers());
        if hops >= MAX_LARDER_HOPS {
            tracing::error!(hops, path = %request.uri().path(), "request loop: an upstream points back at Larder");
            return Ok(crate::error::problem_response(
                StatusCode::LOOP_DETECTED,
                &format!(
                    "the request has passed through Larder {hops} times; an upstream points back at it"
                ),
            ));
        }
        let host = router::request_host(&request);
        let path = request.uri().path();
        let Some(routes) = &self.routes else {
            if path == "/health" {
                return Ok(health());
            }
            return Ok(self.shared.sources.serve_by_key(&request));
        };
        let Some(route) = routes
            .iter()
            .find(|route| route.matcher.is_match(host, path))
        else {
            if path == "/health" {
                return Ok(health());
            }
            if request.version() < Version::HTTP_2 && request.uri().scheme().is_some() {
                return Err(ProxyError::BadRequest(
                    "absolute-form request for a host this proxy does not serve; Larder is not a forward proxy".to_string(),
                ));
            }
            return Err(ProxyError::NoRoute(format!(
                "{}{}",
                host.unwrap_or(""),
                path
            )));
        };
        outcome.route = Some(&route.metrics);
        self.serve_route(route, request, client, outcome).await
    }

    async fn serve_route(
        &self,
        route: &RouteEntry,
        mut request: Request<Incoming>,
        client: SocketAddr,
        outcome: &mut Outcome<'_>,
    ) -> Result<Response<Body>, ProxyError> {
        let limit = route.max_request_body.or(self.max_request_body);
        if let Some(limit) = limit {
            check_content_length(&request, limit)?;
        }
        if let Target::Upstream(origin) = &route.target {
            outcome.upstream = Some(origin.upstream.name().clone());
            if headers::is_upgrade_request(request.headers()) {
                prepare_request_headers(&mut request, client, true);
                return Box::pin(upgrade::tunnel(&origin.upstream, request)).await;
            }
        }
        prepare_request_headers(&mut request, client, false);
        if route.cache.enabled {
            request.extensions_mut().insert(ClientAddr(client));
        }
        let (mut parts, incoming) = request.into_parts();
        let body = if http_body::Body::is_end_stream(&incoming) {
            // Nothing to read: an empty body, which boxes without allocating.
            body::empty()
        } else {
            let guard = BodyGuard::default();
            parts.extensions.insert(guard.clone());
            body::boxed(guard::GuardedBody::new(
                incoming,
                limit,
                guard::CLIENT_BODY_IDLE_TIMEOUT,
                guard,
            ))
        };
        // The cache's and the plugins' futures are boxed: they are several KiB
        // each, and a request future that embeds them is memmoved per request.
        let plugins = &self.shared.plugins;
        let (direct_answer, head) = if route.plugins.is_empty() {
            (None, None)
        } else {
            let answer = Box::pin(plugins.on_request(&route.plugins, &mut parts)).await?;
            let mut head = copy_head_parts(&parts);
            // Instances on-request made wait for this request's on-response.
            if let Some(parked) = parts.extensions.remove::<ParkedInstances>() {
                head.extensions.insert(parked);
            }
            (answer, Some(head))
        };
        let request = Request::from_parts(parts, body);
        // A plugin's own answer still goes through the downstream
        // on-response hooks, as the WIT promises.
        let response = match direct_answer {
            Some(answer) => answer,
            None => match &route.target {
                Target::Source(name) => self.shared.sources.serve_source(name, &request),
                Target::Upstream(origin) if route.cache.enabled => {
                    let origin: Arc<dyn cache::Origin> = origin.clone();
                    Box::pin(self.shared.cache.serve(&route.cache, request, origin)).await?
                }
                Target::Upstream(origin) => cache::Origin::fetch(origin.as_ref(), request).await?,
            },
        };
        match head {
            Some(head) => {
                Box::pin(plugins.on_response(
                    &route.plugins,
                    PluginPhase::Downstream,
                    &head,
                    response,
                ))
                .await
            }
            None => Ok(response),
        }
    }

    /// The upstreams this proxy forwards to, by name.
    pub fn upstream(&self, name: &str) -> Option<&Arc<UpstreamClient>> {
        self.upstreams.get(name)
    }
}

/// What the access log and metrics learn while a request is dispatched.
#[derive(Default)]
struct Outcome<'a> {
    route: Option<&'a RouteMetrics>,
    upstream: Option<Arc<str>>,
}

fn compile_route(
    route: &Route,
    upstreams: &BTreeMap<String, Arc<UpstreamClient>>,
    plugins: &Arc<PluginHost>,
) -> Result<RouteEntry, String> {
    let chain: Arc<[String]> = route.plugins.clone().into();
    let target = match (&route.upstream, &route.source) {
        (Some(name), _) => {
            let upstream = upstreams
                .get(name)
                .ok_or_else(|| format!("a route names upstream {name}, which is not defined"))?;
            Target::Upstream(Arc::new(RouteOrigin {
                upstream: upstream.clone(),
                plugins: plugins.clone(),
                chain: chain.clone(),
            }))
        }
        (None, Some(source)) => Target::Source(source.clone()),
        (None, None) => return Err("a route needs an upstream or a source".to_string()),
    };
    let label = format!(
        "{}{}",
        route.matcher.host.as_deref().unwrap_or(""),
        route.matcher.path_prefix.as_deref().unwrap_or("/")
    );
    Ok(RouteEntry {
        matcher: router::Matcher::new(&route.matcher),
        metrics: RouteMetrics::new(&label),
        target,
        cache: route.cache.clone(),
        plugins: chain,
        max_request_body: route.max_request_body.map(|size| size.0),
    })
}

fn reuse_or_build(
    name: &str,
    config: &Upstream,
    previous: Option<&Proxy>,
) -> Result<Arc<UpstreamClient>, String> {
    if let Some(existing) = previous.and_then(|proxy| proxy.upstream(name))
        && existing.is_built_from(config)
    {
        return Ok(existing.clone());
    }
    UpstreamClient::new(name, config).map(Arc::new)
}

/// Refuses requests no origin should see: a Host header that is not a valid
/// authority, several Host headers, user information in the target, or an
/// HTTP/1.1 request without any host.
fn check_request<B>(request: &Request<B>) -> Result<(), ProxyError> {
    let host_headers = request.headers().get_all(header::HOST);
    let mut count = 0;
    for value in host_headers {
        count += 1;
        let valid = value
            .to_str()
            .ok()
            .and_then(|text| text.parse::<http::uri::Authority>().ok())
            .is_some_and(|authority| {
                !authority.host().is_empty() && !authority.as_str().contains('@')
            });
        if !valid {
            return Err(ProxyError::BadRequest(
                "the Host header is not a valid host".to_string(),
            ));
        }
    }
    if request
        .uri()
        .authority()
        .is_some_and(|authority| authority.as_str().contains('@'))
    {
        return Err(ProxyError::BadRequest(
            "user information in the request target is not allowed".to_string(),
        ));
    }
    if count > 1 {
        return Err(ProxyError::BadRequest(
            "more than one Host header".to_string(),
        ));
    }
    if count == 0 && request.version() == Version::HTTP_11 && request.uri().authority().is_none() {
        return Err(ProxyError::BadRequest(
            "HTTP/1.1 request without a Host header".to_string(),
        ));
    }
    Ok(())
}

fn check_content_length<B>(request: &Request<B>, limit: u64) -> Result<(), ProxyError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.trim().parse::<u64>().ok());
    match declared {
        Some(length) if length > limit => Err(ProxyError::BodyTooLarge { limit }),
        _ => Ok(()),
    }
}

/// Hop-by-hop out, forwarding headers in, and a Host header that names what
/// the client asked for (HTTP/2 and absolute-form carry it in the URI).
fn prepare_request_headers<B>(request: &mut Request<B>, client: SocketAddr, keep_upgrade: bool) {
    let original_host = match request.uri().authority() {
        Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
        None => request.headers().get(header::HOST).cloned(),
    };
    let headers = request.headers_mut();
    headers::strip_hop_by_hop(headers, keep_upgrade);
    // Back if `Connection` named it, or in from the URI (HTTP/2, absolute form).
    if let Some(host) = &original_host
        && headers.get(header::HOST) != Some(host)
    {
        headers.insert(header::HOST, host.clone());
    }
    headers::add_forwarded(headers, client.ip(), "http", original_host);
}

/// A copy of a request head, without its extensions: for plugins that look
/// at it after the request itself has gone upstream.
fn copy_head_parts(parts: &Parts) -> Parts {
    head_copy(&parts.method, &parts.uri, parts.version, &parts.headers)
}

/// The same for a whole request (also how a request is copied to be sent again).
fn copy_head<B>(request: &Request<B>) -> Parts {
    head_copy(
        request.method(),
        request.uri(),
        request.version(),
        request.headers(),
    )
}

fn head_copy(
    method: &Method,
    uri: &http::Uri,
    version: Version,
    headers: &http::HeaderMap,
) -> Parts {
    let (mut head, ()) = Request::new(()).into_parts();
    head.method = method.clone();
    head.uri = uri.clone();
    head.version = version;
    head.headers = headers.clone();
    head
}

/// `{"status":"ok"}`: the process is up and serving.
pub fn health() -> Response<Body> {
    let mut response = Response::new(body::full(r#"{"status":"ok"}"#));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Client faults at DEBUG, upstream and plugin faults at WARN, ours at ERROR.
fn log_error(error: &ProxyError, method: &Method) {
    use crate::error::Blame;
    let status = error.status().as_u16();
    match error.blame() {
        Blame::Client => tracing::debug!(%method, status, %error, "request refused"),
        Blame::Upstream | Blame::Plugin => {
            tracing::warn!(%method, status, %error, "request failed")
        }
        Blame::Internal => tracing::error!(%method, status, %error, "request failed"),
    }
}
