//! The request pipeline: the only module that knows routing, plugins, the
//! cache, sources and upstreams together.
//!
//! [`Proxy`] is built from one config and swapped whole on reload.
//! [`Proxy::handle`] runs one request through named phases, each a method
//! below it, in the order they run (Pingora's `process_request` shape):
//!
//! ```text
//! route         request checks, loop detection, the path normalised, host +
//!               path -> RouteEntry
//! prepare       body limit, an allowed Upgrade kept (others refused or
//!               dropped), hop-by-hop out, untrusted forwarding headers out,
//!               X-Forwarded-*/Via in, body guard
//! on_request    the route's transformers; may answer, may add cache-key parts
//! target        a tunnel (an allowed Upgrade, after the plugins let it through)
//!               | a source | the cache (Cache::serve with the route's RouteOrigin)
//!               | the upstream (RouteOrigin::fetch: forward, then the
//!               cache-store plugin phase; for cached routes the cache calls it)
//! on_response   the route's downstream-phase transformers, hits included
//! respond       errors to problem+json, Via, metrics, the access log
//! ```
//!
//! Per-request state lives in one [`RequestCtx`]. Must not decide
//! cacheability (the cache does) or build problem+json itself
//! (`http::error` does).

mod access;
mod ctx;
mod errors;
mod forwarded;
mod guard;
mod https;
mod origin;
mod path;
mod purge;
mod route_metrics;
mod router;
mod upgrade;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use ipnet::IpNet;

use crate::cache::{self, Cache};
use crate::config::{Config, PluginPhase, Route, RouteCache, RouteHeaders, RouteTarget, Upstream};
use crate::http::body::{self, Body};
use crate::http::error::{ErrorKind, RequestError};
use crate::http::{copy_head, hop_by_hop, method_only};
use crate::plugins::PluginHost;
use crate::sources::Sources;
use crate::upstream::UpstreamClient;

use ctx::RequestCtx;
pub use guard::{BodyFault, BodyGuard};
use origin::RouteOrigin;
use route_metrics::RouteMetrics;

/// More passes through Larder than any sane chain of proxies makes: the
/// request is looping (an upstream points back at Larder).
const MAX_LARDER_HOPS: usize = 8;

/// Where a route sends its requests.
enum Target {
    Upstream {
        origin: Arc<RouteOrigin>,
        /// The same origin, as the cache calls it.
        cache_origin: Arc<dyn cache::Origin>,
    },
    Source {
        name: String,
        /// The route's path prefix: what follows it names a mirror's key.
        route_prefix: String,
    },
}

/// One compiled `routes:` entry.
pub struct RouteEntry {
    matcher: router::Matcher,
    metrics: RouteMetrics,
    target: Target,
    cache: RouteCache,
    /// `Upgrade` protocols tunnelled (lowercase).
    upgrades: Vec<String>,
    /// The upstream speaks HTTP/2: a client's `TE: trailers` goes on to it
    /// (gRPC servers require it; other TE values are still dropped).
    keeps_te_trailers: bool,
    strip_request_headers: Vec<http::HeaderName>,
    plugins: Arc<[String]>,
    skip_unavailable_plugins: bool,
    max_request_body: Option<u64>,
    /// Static response header rules, applied after the plugins.
    headers: RouteHeaders,
}

/// What routing found for a request.
enum Routed<'p> {
    Route(&'p RouteEntry),
    /// Answered without a route: `/health`.
    Answer(Response<Body>),
    /// cachepump's `/?key=`, which may wait for the source's next change.
    Source(crate::sources::SourceRead),
}

/// What the `on-request` plugins decided.
enum OnRequest {
    Continue(Request<Body>),
    Answer(Response<Body>),
}

/// The long-lived parts a request path is built around; they outlive reloads.
#[derive(Clone)]
pub struct Services {
    pub cache: Arc<Cache>,
    pub sources: Arc<Sources>,
    pub plugins: Arc<PluginHost>,
    /// Open upgrade tunnels, counted across reloads.
    pub tunnels: Arc<upgrade::Tunnels>,
}

/// Why a request path could not be built from a config.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Upstream(#[from] crate::upstream::SetupError),
    #[error("a route names upstream {0}, which is not defined")]
    UnknownUpstream(String),
}

/// The request path for one config. Immutable; a reload builds a new one.
pub struct Proxy {
    /// `None`: no `routes:` key, cachepump mode.
    routes: Option<Vec<RouteEntry>>,
    /// Whether any route matches on the host (else routing never reads it).
    routes_match_host: bool,
    cache: Arc<Cache>,
    sources: Arc<Sources>,
    plugins: Arc<PluginHost>,
    tunnels: Arc<upgrade::Tunnels>,
    upstreams: BTreeMap<String, Arc<UpstreamClient>>,
    max_request_body: Option<u64>,
    trusted_proxies: Vec<IpNet>,
    max_tunnels: usize,
    tunnel_idle_timeout: std::time::Duration,
    /// The access log's format; `None`: no access log.
    access_log: Option<crate::config::AccessLogFormat>,
    /// Metrics of requests no route answered.
    unrouted: RouteMetrics,
    /// The HTTPS listener's port, when plain requests are redirected to it.
    redirect_to_https: Option<u16>,
}

impl Proxy {
    /// Builds the request path for `config` on the long-lived parts,
    /// reusing the clients (and their connection pools) of `previous` whose
    /// upstream config is unchanged.
    pub fn build(
        config: &Config,
        services: &Services,
        previous: Option<&Proxy>,
    ) -> Result<Self, BuildError> {
        let Services {
            cache,
            sources,
            plugins,
            tunnels,
        } = services.clone();
        let mut upstreams = BTreeMap::new();
        for (name, upstream) in &config.upstreams {
            upstreams.insert(name.clone(), reuse_or_build(name, upstream, previous)?);
        }
        let routes = match &config.routes {
            None => None,
            Some(routes) => Some(
                routes
                    .iter()
                    .map(|route| compile_route(route, &upstreams, &plugins, &config.cache))
                    .collect::<Result<Vec<_>, BuildError>>()?,
            ),
        };
        let routes_match_host = routes
            .iter()
            .flatten()
            .any(|route| route.matcher.matches_host());
        let unrouted = RouteMetrics::new(if routes.is_some() {
            "none"
        } else {
            "cachepump"
        });
        Ok(Self {
            unrouted,
            routes,
            routes_match_host,
            cache,
            sources,
            plugins,
            tunnels,
            upstreams,
            max_request_body: config.server.max_request_body.map(|size| size.0),
            trusted_proxies: config.server.trusted_proxies.clone(),
            max_tunnels: config.server.max_tunnels,
            tunnel_idle_timeout: config.server.tunnel_idle_timeout.get(),
            access_log: config
                .log
                .access_log
                .then_some(config.log.access_log_format),
            redirect_to_https: config
                .tls
                .as_ref()
                .filter(|tls| tls.redirect_http)
                .map(|tls| tls.listen.port()),
        })
    }

    /// The upstreams this proxy forwards to, by name.
    pub fn upstream(&self, name: &str) -> Option<&Arc<UpstreamClient>> {
        self.upstreams.get(name)
    }

    /// Every upstream, by name (the admin API shows their servers' state).
    pub fn upstreams(&self) -> BTreeMap<String, Arc<UpstreamClient>> {
        self.upstreams.clone()
    }

    /// Answers one request (`tls`: it came over HTTPS); never fails: errors
    /// become responses in `respond`.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        client: SocketAddr,
        tls: bool,
    ) -> Response<Body> {
        // Skip the access log's bookkeeping when its level is off anyway.
        let logging = self.access_log.filter(|format| {
            *format != crate::config::AccessLogFormat::Log
                || tracing::enabled!(target: "larder::access", tracing::Level::INFO)
        });
        let mut ctx = RequestCtx::new(client, tls, &request, logging);
        crate::traffic::record(
            router::request_host(&request).unwrap_or(""),
            request.uri().path(),
        );
        let result = self.process(request, &mut ctx).await;
        self.respond(result, ctx)
    }

    /// The phases, in order; each may end the request with an answer or an error.
    async fn process<'p>(
        &'p self,
        request: Request<Incoming>,
        ctx: &mut RequestCtx<'p>,
    ) -> Result<Response<Body>, RequestError> {
        let mut request = request;
        let route = match self.route(&mut request, ctx)? {
            Routed::Route(route) => route,
            Routed::Answer(response) => return Ok(response),
            Routed::Source(read) => return read.response().await,
        };
        self.check_body_limit(route, &request)?;
        let upgrade = upgrade::accept(&route.upgrades, route.target.origin(), &mut request)?;
        let request = self.prepare(route, request, ctx, upgrade.is_some());
        let request = match self.on_request(route, request, ctx).await? {
            OnRequest::Continue(request) => request,
            // A plugin's own answer still goes through the downstream
            // on-response hooks, as the WIT promises.
            OnRequest::Answer(response) => return self.on_response(route, response, ctx).await,
        };
        if let (Some(client_side), Some(origin)) = (upgrade, route.target.origin()) {
            return self.tunnel(origin, request, client_side).await;
        }
        let response = self.target(route, request, ctx).await?;
        self.on_response(route, response, ctx).await
    }

    /// Refuses what no origin should see, detects loops, normalises the
    /// path (what routes match and upstreams get), and finds the route.
    fn route<'p>(
        &'p self,
        request: &mut Request<Incoming>,
        ctx: &mut RequestCtx<'p>,
    ) -> Result<Routed<'p>, RequestError> {
        check_request(request)?;
        let hops = forwarded::larder_hops(request.headers());
        if hops >= MAX_LARDER_HOPS {
            return Err(ErrorKind::Loop { hops }.into());
        }
        normalize_path(request)?;
        // Before the target may become absolute: only a client's own
        // absolute-form target marks it as a forward-proxy request.
        let absolute_form = request.version() < Version::HTTP_2 && request.uri().scheme().is_some();
        if ctx.tls {
            https::name_https(request);
        } else if let Some(port) = self.redirect_to_https
            && request.uri().path() != "/health"
        {
            return https::redirect(request, port).map(Routed::Answer);
        }
        let request = &*request;
        let host = self
            .routes_match_host
            .then(|| router::request_host(request))
            .flatten();
        let path = request.uri().path();
        let Some(routes) = &self.routes else {
            if path == "/health" {
                return Ok(Routed::Answer(crate::http::health()));
            }
            return self.sources.serve_by_key(request).map(Routed::Source);
        };
        let Some(route) = routes
            .iter()
            .find(|route| route.matcher.is_match(host, path))
        else {
            if path == "/health" {
                return Ok(Routed::Answer(crate::http::health()));
            }
            if absolute_form {
                return Err(RequestError::bad_request(
                    "absolute-form request for a host this proxy does not serve; Larder is not a forward proxy",
                ));
            }
            let host = router::request_host(request).unwrap_or("");
            return Err(ErrorKind::NoRoute(format!("{host}{path}")).into());
        };
        ctx.route = Some(route);
        if let Target::Upstream { origin, .. } = &route.target {
            ctx.upstream = Some(origin.upstream().name().clone());
        }
        Ok(Routed::Route(route))
    }

    /// 413 for a declared body over the route's (or the server's) limit.
    fn check_body_limit(
        &self,
        route: &RouteEntry,
        request: &Request<Incoming>,
    ) -> Result<(), RequestError> {
        let limit = route.max_request_body.or(self.max_request_body);
        match (limit, crate::http::content_length(request.headers())) {
            (Some(limit), Some(length)) if length > limit => {
                Err(ErrorKind::BodyTooLarge { limit }.into())
            }
            _ => Ok(()),
        }
    }

    /// Header hygiene and the body guard: what any target gets.
    fn prepare(
        &self,
        route: &RouteEntry,
        mut request: Request<Incoming>,
        ctx: &mut RequestCtx<'_>,
        keep_upgrade: bool,
    ) -> Request<Body> {
        crate::http::remove_all_named(request.headers_mut(), &route.strip_request_headers);
        let trusted = is_trusted(&self.trusted_proxies, ctx.client.ip());
        let te_trailers =
            route.keeps_te_trailers && hop_by_hop::te_accepts_trailers(request.headers());
        prepare_request_headers(&mut request, ctx, keep_upgrade, trusted);
        if te_trailers {
            request
                .headers_mut()
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        let (parts, incoming) = request.into_parts();
        let body = if http_body::Body::is_end_stream(&incoming) {
            // Nothing to read: an empty body, which boxes without allocating.
            body::empty()
        } else {
            let guard = BodyGuard::default();
            ctx.body_guard = Some(guard.clone());
            let limit = route.max_request_body.or(self.max_request_body);
            body::boxed(guard::GuardedBody::new(
                incoming,
                limit,
                guard::CLIENT_BODY_IDLE_TIMEOUT,
                guard,
            ))
        };
        Request::from_parts(parts, body)
    }

    /// The route's transformers' `on-request`, in order.
    async fn on_request(
        &self,
        route: &RouteEntry,
        request: Request<Body>,
        ctx: &mut RequestCtx<'_>,
    ) -> Result<OnRequest, RequestError> {
        if route.plugins.is_empty() {
            return Ok(OnRequest::Continue(request));
        }
        let needs = self.plugins.prepare(&route.plugins, &mut ctx.plugins);
        let (mut parts, body) = request.into_parts();
        let answer = if needs.on_request {
            // Boxed: the plugin host's futures are several KiB, and a request
            // future that embeds them is memmoved per request.
            Box::pin(self.plugins.on_request(
                &route.plugins,
                &mut parts,
                &mut ctx.plugins,
                route.skip_unavailable_plugins,
            ))
            .await
            .map_err(|error| errors::from_plugin(error, ctx.upstream.as_ref()))?
        } else {
            None
        };
        // `on-response` always needs the method (a HEAD keeps its length);
        // the rest only for a plugin that reads the request.
        ctx.request_head = Some(if needs.request_in_response {
            copy_head(&parts)
        } else {
            method_only(&parts)
        });
        Ok(match answer {
            Some(response) => OnRequest::Answer(response),
            None => OnRequest::Continue(Request::from_parts(parts, body)),
        })
    }

    /// Where the route sends the request: a source, the cache, or the upstream.
    async fn target(
        &self,
        route: &RouteEntry,
        request: Request<Body>,
        ctx: &mut RequestCtx<'_>,
    ) -> Result<Response<Body>, RequestError> {
        match &route.target {
            Target::Source { name, route_prefix } => {
                let read = self.sources.serve_source(name, route_prefix, &request)?;
                // A read may wait minutes for a change: keep only what it needs.
                drop(request);
                read.response().await
            }
            Target::Upstream { .. } if route.cache.enabled && request.method() == "PURGE" => {
                let (parts, _) = request.into_parts();
                purge::answer(&self.cache, &route.cache, &parts, ctx.client).await
            }
            Target::Upstream { cache_origin, .. } if route.cache.enabled => {
                let key_extra = &ctx.plugins.cache_key_extra;
                let serve = self
                    .cache
                    .serve(&route.cache, request, key_extra, cache_origin);
                let served = Box::pin(serve).await;
                ctx.cache_outcome = Some(served.outcome);
                served.result
            }
            Target::Upstream { origin, .. } => origin.fetch(request).await,
        }
    }

    /// The route's downstream-phase transformers' `on-response`, then its
    /// `headers:` rules.
    async fn on_response(
        &self,
        route: &RouteEntry,
        response: Response<Body>,
        ctx: &mut RequestCtx<'_>,
    ) -> Result<Response<Body>, RequestError> {
        let mut response = self.downstream_plugins(route, response, ctx).await?;
        if !route.headers.is_empty() {
            route.headers.apply(response.headers_mut());
        }
        Ok(response)
    }

    async fn downstream_plugins(
        &self,
        route: &RouteEntry,
        response: Response<Body>,
        ctx: &mut RequestCtx<'_>,
    ) -> Result<Response<Body>, RequestError> {
        let RequestCtx {
            request_head: Some(head),
            plugins,
            upstream,
            ..
        } = ctx
        else {
            return Ok(response);
        };
        let phase = self.plugins.on_response(
            &route.plugins,
            PluginPhase::Downstream,
            head,
            response,
            Some(plugins),
        );
        Box::pin(phase)
            .await
            .map_err(|error| errors::from_plugin(error, upstream.as_ref()))
    }

    /// An allowed Upgrade (WebSocket) that the plugins let through goes to
    /// the upstream on a connection of its own and becomes a tunnel, capped
    /// in number and closed when idle.
    async fn tunnel(
        &self,
        origin: &RouteOrigin,
        request: Request<Body>,
        client_side: hyper::upgrade::OnUpgrade,
    ) -> Result<Response<Body>, RequestError> {
        let Some(permit) = self.tunnels.open(self.max_tunnels) else {
            return Err(ErrorKind::Unavailable("too many open tunnels").into());
        };
        let tunnel = upgrade::Tunnel {
            client_side,
            permit,
            idle_timeout: self.tunnel_idle_timeout,
        };
        Box::pin(tunnel.open(origin.upstream(), request))
            .await
            .map_err(errors::from_upstream)
    }

    /// The one place a request ends: errors become problem+json (labelled
    /// with the cache's outcome when there is one), `Via` is added, the
    /// route's metrics count it, and the access log line is set up.
    fn respond(
        &self,
        result: Result<Response<Body>, RequestError>,
        ctx: RequestCtx<'_>,
    ) -> Response<Body> {
        let mut response = match result {
            Ok(response) => response,
            Err(error) => {
                let error = ctx.blame_body_faults(error);
                error.log(&ctx.method);
                let mut response = error.into_response();
                if let Some(outcome) = &ctx.cache_outcome {
                    cache::append_cache_status(response.headers_mut(), &outcome.member());
                }
                response
            }
        };
        forwarded::append_via(response.headers_mut());
        let status = response.status();
        let metrics = ctx.route.map_or(&self.unrouted, |route| &route.metrics);
        metrics.record(status, ctx.started.elapsed());
        let (Some(line), Some(format)) = (ctx.log_line, self.access_log) else {
            return response;
        };
        let entry = access::AccessEntry {
            format,
            client: ctx.client.ip(),
            method: ctx.method,
            line,
            status,
            upstream: ctx.upstream,
            cache_status: ctx.cache_outcome.map(|outcome| outcome.member()),
            started: ctx.started,
        };
        response.map(|inner| body::boxed(access::LoggedBody::new(inner, entry)))
    }
}

impl Target {
    fn origin(&self) -> Option<&RouteOrigin> {
        match self {
            Self::Upstream { origin, .. } => Some(origin),
            Self::Source { .. } => None,
        }
    }
}

/// Rewrites the request target's path to its normal form (RFC 3986
/// section 6); 400 for a path that has none.
fn normalize_path<B>(request: &mut Request<B>) -> Result<(), RequestError> {
    let normal = match path::normalize(request.uri().path()) {
        Ok(std::borrow::Cow::Borrowed(_)) => return Ok(()),
        Ok(std::borrow::Cow::Owned(normal)) => normal,
        Err(why) => return Err(RequestError::bad_request(why.to_string())),
    };
    let uri = request.uri();
    let path_and_query = match uri.query() {
        Some(query) => format!("{normal}?{query}"),
        None => normal,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        path_and_query
            .parse()
            .map_err(|_| RequestError::bad_request("the normalised path is not a valid target"))?,
    );
    *request.uri_mut() = http::Uri::from_parts(parts)
        .map_err(|_| RequestError::bad_request("the normalised path is not a valid target"))?;
    Ok(())
}

/// Whether `ip` may vouch for earlier hops in forwarding headers.
fn is_trusted(trusted: &[IpNet], ip: std::net::IpAddr) -> bool {
    if trusted.is_empty() {
        return false;
    }
    let canonical = ip.to_canonical();
    trusted
        .iter()
        .any(|net| net.contains(&ip) || net.contains(&canonical))
}

fn compile_route(
    route: &Route,
    upstreams: &BTreeMap<String, Arc<UpstreamClient>>,
    plugins: &Arc<PluginHost>,
    cache: &crate::config::CacheConfig,
) -> Result<RouteEntry, BuildError> {
    let fill_idle_timeout = cache.fill_idle_timeout;
    let chain: Arc<[String]> = route.plugins.clone().into();
    let mut keeps_te_trailers = false;
    let target = match &route.target {
        RouteTarget::Upstream(name) => {
            let upstream = upstreams
                .get(name)
                .ok_or_else(|| BuildError::UnknownUpstream(name.clone()))?;
            keeps_te_trailers = upstream.speaks_http2();
            let origin = RouteOrigin::new(upstream.clone(), plugins.clone(), chain.clone());
            Target::Upstream {
                // The cache reads what it fills as it arrives: a body that
                // stalls there (or while a cache-store plugin collects it)
                // fails the fill instead of holding its waiters.
                cache_origin: Arc::new(origin.with_body_idle_timeout(fill_idle_timeout)),
                origin: Arc::new(origin),
            }
        }
        RouteTarget::Source(source) => Target::Source {
            name: source.clone(),
            route_prefix: route.matcher.path_prefix.clone().unwrap_or_default(),
        },
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
        upgrades: route.upgrades.clone(),
        keeps_te_trailers,
        strip_request_headers: route.strip_request_headers.clone(),
        plugins: chain,
        skip_unavailable_plugins: route.skip_unavailable_plugins,
        max_request_body: route.max_request_body.map(|size| size.0),
        headers: response_header_rules(route, cache),
    })
}

/// The route's `headers:` rules, with the targeted cache-control fields
/// removed first when `cache.remove_targeted_fields` says so.
fn response_header_rules(route: &Route, cache: &crate::config::CacheConfig) -> RouteHeaders {
    let mut rules = route.headers.clone();
    if cache.remove_targeted_fields {
        rules.remove.extend(cache.targeted_fields.iter().cloned());
    }
    rules
}

fn reuse_or_build(
    name: &str,
    config: &Upstream,
    previous: Option<&Proxy>,
) -> Result<Arc<UpstreamClient>, BuildError> {
    if let Some(existing) = previous.and_then(|proxy| proxy.upstream(name))
        && existing.is_built_from(config)
    {
        return Ok(existing.clone());
    }
    Ok(Arc::new(UpstreamClient::new(name, config)?))
}

/// Refuses requests no origin should see: a Host header that is not a valid
/// authority, several Host headers, user information in the target, or an
/// HTTP/1.1 request without any host.
fn check_request<B>(request: &Request<B>) -> Result<(), RequestError> {
    let host_headers = request.headers().get_all(header::HOST);
    let mut count = 0;
    for value in host_headers {
        count += 1;
        if !is_valid_host(value.as_bytes()) {
            return Err(RequestError::bad_request(
                "the Host header is not a valid host",
            ));
        }
    }
    if request
        .uri()
        .authority()
        .is_some_and(|authority| authority.as_str().contains('@'))
    {
        return Err(RequestError::bad_request(
            "user information in the request target is not allowed",
        ));
    }
    if count > 1 {
        return Err(RequestError::bad_request("more than one Host header"));
    }
    if count == 0 && request.version() == Version::HTTP_11 && request.uri().authority().is_none() {
        return Err(RequestError::bad_request(
            "HTTP/1.1 request without a Host header",
        ));
    }
    Ok(())
}

/// Whether a Host value is an authority (RFC 3986) with a host and no user
/// information. The common `name[:port]` is checked byte by byte; anything
/// else goes through the `http` crate's parser.
fn is_valid_host(value: &[u8]) -> bool {
    let (host, port) = match value.iter().rposition(|b| *b == b':') {
        Some(colon) => (&value[..colon], &value[colon + 1..]),
        None => (value, &[][..]),
    };
    let plain_name = !host.is_empty()
        && host
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'.' || *b == b'-')
        && port.iter().all(u8::is_ascii_digit);
    if plain_name {
        return true;
    }
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse::<http::uri::Authority>().ok())
        .is_some_and(|authority| !authority.host().is_empty() && !authority.as_str().contains('@'))
}

/// Hop-by-hop out, forwarding headers in, and a Host header that names what
/// the client asked for (HTTP/2 and absolute-form carry it in the URI).
/// `trusted`: the client is a proxy whose forwarding headers are kept.
fn prepare_request_headers<B>(
    request: &mut Request<B>,
    ctx: &RequestCtx<'_>,
    keep_upgrade: bool,
    trusted: bool,
) {
    let original_host = match request.uri().authority() {
        Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
        None => request.headers().get(header::HOST).cloned(),
    };
    let headers = request.headers_mut();
    hop_by_hop::strip(headers, keep_upgrade);
    // Back if `Connection` named it, or in from the URI (HTTP/2, absolute form).
    if let Some(host) = &original_host
        && headers.get(header::HOST) != Some(host)
    {
        headers.insert(header::HOST, host.clone());
    }
    if !trusted {
        forwarded::remove_forwarding(headers);
    }
    let proto = if ctx.tls { "https" } else { "http" };
    forwarded::add_forwarded(headers, ctx.client.ip(), proto, original_host);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_values_are_authorities_without_user_information() {
        for valid in [
            "example.com",
            "a.b-c.test:8080",
            "127.0.0.1:80",
            "[::1]:8080",
            "x:",
        ] {
            assert!(is_valid_host(valid.as_bytes()), "{valid}");
        }
        for invalid in ["", ":80", "user@host", "a b", "host/x", "[::1", "a:b:c"] {
            assert!(!is_valid_host(invalid.as_bytes()), "{invalid}");
        }
    }
}
