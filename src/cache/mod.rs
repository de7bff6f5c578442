//! The shared HTTP cache (RFC 9111): store, keys and variants, freshness and
//! validation, request coalescing, the tee into the store, purge and tags.
//!
//! [`Cache::serve`] is the one entry point of the request path; the admin API
//! calls the `purge_*` functions. Does no I/O to upstreams itself: the proxy
//! hands it an [`Origin`] to call. The RFC rules live as pure functions in
//! `directives`, `policy` and `key`; `store` keeps entries, `flight` shares one
//! fetch between concurrent requests, `fill` runs that fetch.

mod counters;
mod directives;
mod fill;
mod flight;
mod key;
mod policy;
mod store;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use tokio::sync::oneshot;

use crate::body::{self, Body};
use crate::config::{CacheConfig, RouteCache};
use crate::error::{ProxyError, problem_response};
use crate::proxy::ClientAddr;
use directives::RequestDirectives;
use fill::FillJob;
use flight::{Flight, FlightBody, Head};
use store::{Entry, Meta, Store, Variants};

/// One upstream fetch, as the proxy performs it (forwarding, timeouts, the
/// cache-store phase of plugins). The cache decides when to call it.
pub trait Origin: Send + Sync + 'static {
    fn fetch(
        &self,
        request: Request<Body>,
    ) -> BoxFuture<'static, Result<Response<Body>, ProxyError>>;
}

/// Whether a response's `Cache-Control` says `no-transform`: a proxy must
/// then not change its content (RFC 9110 section 7.7), plugins included.
pub fn forbids_transform(headers: &HeaderMap) -> bool {
    directives::ResponseDirectives::parse(headers).no_transform
}

/// The name this cache uses in `Cache-Status` (RFC 9211).
const CACHE_NAME: &str = "larder";

/// Settings that may change on reload without touching the entries.
struct Settings {
    max_size: u64,
    max_object_size: u64,
    tag_headers: Vec<HeaderName>,
}

impl Settings {
    fn from_config(config: &CacheConfig) -> Self {
        Self {
            max_size: config.max_size.0,
            max_object_size: config.max_object_size.0,
            tag_headers: config
                .tag_headers
                .iter()
                .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
                .collect(),
        }
    }
}

struct Inner {
    store: ArcSwap<Store>,
    settings: ArcSwap<Settings>,
    /// The fill in progress per primary key, joined by concurrent misses.
    flights: Mutex<HashMap<String, Arc<Flight>>>,
}

impl Inner {
    /// Marks the fills in progress for matching keys so they do not commit,
    /// and makes their keys free for new fills: a purge must not be undone by
    /// a response fetched before it, nor served to requests that came after.
    fn doom_flights(&self, matches: impl Fn(&str) -> bool) {
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        flights.retain(|key, flight| {
            if matches(key) {
                flight.doom();
                return false;
            }
            true
        });
    }

    fn doom_url(&self, url: &str) {
        self.doom_flights(|key| key::url_part(key) == url);
    }
}

/// The in-memory cache shared by every route; lives across config reloads.
pub struct Cache {
    inner: Arc<Inner>,
}

/// How a request was forwarded, in RFC 9211 `fwd` words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fwd {
    UriMiss,
    VaryMiss,
    /// The request asked for validation (`no-cache`, `max-age`, `min-fresh`).
    Request,
    Stale,
    Method,
    Bypass,
}

impl Fwd {
    fn as_str(self) -> &'static str {
        match self {
            Self::UriMiss => "uri-miss",
            Self::VaryMiss => "vary-miss",
            Self::Request => "request",
            Self::Stale => "stale",
            Self::Method => "method",
            Self::Bypass => "bypass",
        }
    }

    fn metric(self) -> &'static str {
        match self {
            Self::UriMiss | Self::VaryMiss => "miss",
            Self::Request | Self::Stale => "revalidate",
            Self::Method | Self::Bypass => "bypass",
        }
    }
}

/// What a stored response can do for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    Fresh,
    /// Stale, but the request's `max-stale` accepts it.
    StaleAccepted,
    /// Stale within stale-while-revalidate: serve now, refresh behind.
    StaleWhileRevalidate,
    Validate(Fwd),
}

/// Decides how a stored response may be used (RFC 9111 section 4, RFC 5861).
fn decide(meta: &Meta, request: &RequestDirectives, now: SystemTime) -> Use {
    let age = meta.timing.current_age(now);
    if request.no_cache {
        return Use::Validate(Fwd::Request);
    }
    if meta.directives.no_cache {
        return Use::Validate(Fwd::Stale);
    }
    if request
        .max_age
        .is_some_and(|max| age > Duration::from_secs(max))
    {
        return Use::Validate(Fwd::Request);
    }
    if meta.lifetime > age {
        let left = meta.lifetime - age;
        if request
            .min_fresh
            .is_some_and(|min| left < Duration::from_secs(min))
        {
            return Use::Validate(Fwd::Request);
        }
        return Use::Fresh;
    }
    if meta.directives.forbids_stale() {
        return Use::Validate(Fwd::Stale);
    }
    let staleness = age - meta.lifetime;
    // s-maxage carries proxy-revalidate for a shared cache (RFC 9111 section
    // 5.2.2.10): a client's max-stale cannot override it.
    if let Some(max_stale) = request.max_stale
        && meta.directives.s_maxage.is_none()
        && max_stale.is_none_or(|max| staleness <= Duration::from_secs(max))
    {
        return Use::StaleAccepted;
    }
    if staleness < meta.stale_while_revalidate {
        return Use::StaleWhileRevalidate;
    }
    Use::Validate(Fwd::Stale)
}

/// Whether stale-if-error lets this stored response answer after a failure.
fn stale_if_error_allows(meta: &Meta, request: &RequestDirectives, now: SystemTime) -> bool {
    if meta.directives.forbids_stale() {
        return false;
    }
    let window = request
        .stale_if_error
        .filter(|_| meta.directives.s_maxage.is_none())
        .map(Duration::from_secs)
        .unwrap_or(Duration::ZERO)
        .max(meta.stale_if_error);
    let staleness = meta.timing.current_age(now).saturating_sub(meta.lifetime);
    !window.is_zero() && staleness <= window
}

/// How long past its freshness a response may still answer when the origin
/// cannot be reached and no stale-if-error window was given (by the response,
/// the request or the route): RFC 9111 section 4.2.4 lets a disconnected
/// cache serve stale content; this is Varnish's default grace.
const DISCONNECTED_GRACE: Duration = Duration::from_secs(10);

/// Whether a stale response may answer because the origin is unreachable.
/// Never when the response forbids stale serving (`must-revalidate`,
/// `proxy-revalidate`, `no-cache`, `s-maxage`), and never in place of an
/// explicit stale-if-error window, which then governs alone.
fn disconnected_grace_allows(meta: &Meta, request: &RequestDirectives, now: SystemTime) -> bool {
    if meta.directives.forbids_stale()
        || meta.directives.s_maxage.is_some()
        || !meta.stale_if_error.is_zero()
        || request.stale_if_error.is_some()
    {
        return false;
    }
    let staleness = meta.timing.current_age(now).saturating_sub(meta.lifetime);
    staleness <= DISCONNECTED_GRACE
}

/// The origin could not be reached or did not answer in time: the failures
/// stale-if-error covers (a plugin's failure is not the origin's).
fn is_origin_failure(error: &ProxyError) -> bool {
    matches!(
        error,
        ProxyError::UpstreamUnavailable { .. } | ProxyError::UpstreamTimeout { .. }
    )
}

/// Upstream statuses that count as errors for stale-if-error (RFC 5861 section 4).
fn is_error_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

fn ttl_seconds(meta: &Meta, now: SystemTime) -> i64 {
    let lifetime = i64::try_from(meta.lifetime.as_secs()).unwrap_or(i64::MAX);
    let age = i64::try_from(meta.timing.current_age(now).as_secs()).unwrap_or(i64::MAX);
    lifetime.saturating_sub(age)
}

impl Cache {
    pub fn new(config: &CacheConfig) -> Arc<Self> {
        Arc::new(Self {
            inner: Arc::new(Inner {
                store: ArcSwap::from_pointee(Store::new(config.max_size.0)),
                settings: ArcSwap::from_pointee(Settings::from_config(config)),
                flights: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Applies changed settings on reload; entries survive. A new `max_size`
    /// moves the entries into a store of the new size (the excess is evicted).
    pub fn apply(&self, config: &CacheConfig) {
        let settings = Settings::from_config(config);
        if settings.max_size != self.inner.settings.load().max_size {
            let resized = Store::new(settings.max_size);
            self.inner.store.load().drain_into(&resized);
            self.inner.store.store(Arc::new(resized));
            tracing::info!(max_size = settings.max_size, "cache resized");
        }
        self.inner.settings.store(Arc::new(settings));
    }

    /// Answers a request on a cache-enabled route: from the store, by joining
    /// a flight, or through `origin`.
    pub async fn serve(
        &self,
        route: &RouteCache,
        request: Request<Body>,
        origin: Arc<dyn Origin>,
    ) -> Result<Response<Body>, ProxyError> {
        let method = request.method();
        if method.as_str() == "PURGE" {
            return Ok(self.purge_request(route, &request));
        }
        if method == Method::GET || method == Method::HEAD {
            if has_origin_only_preconditions(request.headers()) {
                // Checked only here, so a plain GET pays nothing for ranges.
                if method == Method::GET && is_plain_range(request.headers()) {
                    return self.serve_range(route, request, origin).await;
                }
                return pass(request, origin, Fwd::Bypass).await;
            }
            return self.serve_cacheable(route, request, origin).await;
        }
        if method == Method::OPTIONS || method == Method::TRACE {
            return pass(request, origin, Fwd::Method).await;
        }
        self.serve_unsafe(route, request, origin).await
    }

    async fn serve_cacheable(
        &self,
        route: &RouteCache,
        request: Request<Body>,
        origin: Arc<dyn Origin>,
    ) -> Result<Response<Body>, ProxyError> {
        let (parts, request_body) = request.into_parts();
        let now = SystemTime::now();
        let (key, variants, selected) = self.lookup(route, &parts);
        let directives = RequestDirectives::parse(&parts.headers);

        let Some(entry) = selected else {
            let fwd = if variants.is_some() {
                Fwd::VaryMiss
            } else {
                Fwd::UriMiss
            };
            if directives.only_if_cached {
                return Ok(not_cached());
            }
            if parts.method == Method::HEAD || directives.no_store {
                let request = Request::from_parts(parts, request_body);
                return pass(request, origin, fwd).await;
            }
            let job = Lookup {
                route,
                parts,
                directives,
                key,
                stale: None,
                fwd,
            };
            return self.fetch_via_flight(job, origin).await;
        };

        match decide(&entry.meta, &directives, now) {
            Use::Fresh => {
                count("hit");
                let status = format!("{CACHE_NAME}; hit; ttl={}", ttl_seconds(&entry.meta, now));
                Ok(respond_stored(&entry, &parts, now, status))
            }
            Use::StaleAccepted => Ok(self.serve_stale(&entry, &parts, now, "max-stale")),
            Use::StaleWhileRevalidate => {
                self.refresh_in_background(route, &parts, &key, &entry, origin);
                Ok(self.serve_stale(&entry, &parts, now, "swr"))
            }
            Use::Validate(fwd) => {
                if directives.only_if_cached {
                    return Ok(not_cached());
                }
                if directives.no_store {
                    let request = Request::from_parts(parts, request_body);
                    return pass(request, origin, fwd).await;
                }
                let job = Lookup {
                    route,
                    parts,
                    directives,
                    key,
                    stale: Some(entry),
                    fwd,
                };
                self.fetch_via_flight(job, origin).await
            }
        }
    }

    /// The primary key, what is stored under it, and the variant this
    /// request may use (Vary selection, Authorization rules).
    fn lookup(
        &self,
        route: &RouteCache,
        parts: &Parts,
    ) -> (String, Option<Arc<Variants>>, Option<Arc<Entry>>) {
        let mut key = key::primary_key(&parts.uri, &parts.headers, &route.key);
        if let Some(extra) = parts.extensions.get::<crate::plugins::CacheKeyExtra>() {
            key::append_plugin_parts(&mut key, &extra.0);
        }
        let variants = self.inner.store.load().get(&key);
        let authorized = parts.headers.contains_key(header::AUTHORIZATION);
        let selected = variants
            .as_ref()
            .and_then(|v| v.select(&parts.headers))
            .filter(|e| !authorized || e.meta.directives.allows_authorized())
            .cloned();
        (key, variants, selected)
    }

    /// A GET with `Range`: one byte range of a fresh stored 200 is answered
    /// `206` from memory (RFC 9110 section 14.2); everything else (a miss, a
    /// stale entry, several ranges, an unsatisfiable one) goes to the origin
    /// as it is, and its answer is not stored.
    async fn serve_range(
        &self,
        route: &RouteCache,
        request: Request<Body>,
        origin: Arc<dyn Origin>,
    ) -> Result<Response<Body>, ProxyError> {
        let now = SystemTime::now();
        let (parts, request_body) = request.into_parts();
        let directives = RequestDirectives::parse(&parts.headers);
        if let (_, _, Some(entry)) = self.lookup(route, &parts)
            && entry.meta.status == StatusCode::OK
            && decide(&entry.meta, &directives, now) == Use::Fresh
        {
            let status = format!("{CACHE_NAME}; hit; ttl={}", ttl_seconds(&entry.meta, now));
            // Conditionals come before Range (RFC 9110 section 13.2.2).
            if policy::is_not_modified(&parts.headers, entry.meta.status, &entry.meta.headers) {
                count("hit");
                return Ok(respond_stored(&entry, &parts, now, status));
            }
            if let Some(range) = policy::single_byte_range(&parts.headers, entry.body.len()) {
                count("hit");
                return Ok(respond_partial(&entry, range, now, status));
            }
        }
        if directives.only_if_cached {
            return Ok(not_cached());
        }
        pass(
            Request::from_parts(parts, request_body),
            origin,
            Fwd::Bypass,
        )
        .await
    }

    fn serve_stale(
        &self,
        entry: &Entry,
        parts: &Parts,
        now: SystemTime,
        reason: &'static str,
    ) -> Response<Body> {
        count("stale");
        counters::stale_served(reason);
        let status = format!("{CACHE_NAME}; hit; ttl={}", ttl_seconds(&entry.meta, now));
        respond_stored(entry, parts, now, status)
    }

    /// Joins the fill in flight for this key, or leads a new one.
    async fn fetch_via_flight(
        &self,
        lookup: Lookup<'_>,
        origin: Arc<dyn Origin>,
    ) -> Result<Response<Body>, ProxyError> {
        let joined = {
            let mut flights = self.flights();
            match flights.get(&lookup.key) {
                Some(flight) => Ok(Arc::clone(flight)),
                None => {
                    let flight = Flight::new();
                    flights.insert(lookup.key.clone(), Arc::clone(&flight));
                    Err(flight)
                }
            }
        };
        match joined {
            Ok(flight) => self.wait_on(flight, lookup, origin).await,
            Err(flight) => self.lead(flight, lookup, origin, true).await,
        }
    }

    /// Runs a fill for `flight` and answers from it; `registered` says the
    /// flight is in the map (joinable).
    async fn lead(
        &self,
        flight: Arc<Flight>,
        lookup: Lookup<'_>,
        origin: Arc<dyn Origin>,
        registered: bool,
    ) -> Result<Response<Body>, ProxyError> {
        // The leader reads from the first chunk, whatever happens to the replay buffer.
        let reader = flight.reader();
        let leader = self.start_fill(&flight, &lookup, origin, registered);
        let head = flight.wait_head().await;
        if let Head::Shared {
            meta,
            stored,
            upstream_status,
            leader_headers,
        } = head
        {
            count(lookup.fwd.metric());
            let status = forwarded_status(lookup.fwd, upstream_status, stored, false);
            // The request that brought the response gets all of it, including
            // fields kept from other clients.
            let headers = leader_headers.as_deref().unwrap_or(&meta.headers);
            return Ok(respond_from_flight(
                reader,
                &meta,
                headers,
                &lookup.parts,
                status,
            ));
        }
        drop(reader);
        let outcome = leader
            .await
            .unwrap_or_else(|_| Err(ProxyError::Internal("the cache fill stopped".into())));
        finish_unshared(&lookup, outcome)
    }

    async fn wait_on(
        &self,
        flight: Arc<Flight>,
        lookup: Lookup<'_>,
        origin: Arc<dyn Origin>,
    ) -> Result<Response<Body>, ProxyError> {
        counters::coalesced();
        flight.join();
        // Attached before the head arrives, so a response that is streamed
        // without a replay copy still reaches this waiter from its first byte.
        let reader = flight.reader();
        match flight.wait_head().await {
            Head::Shared {
                meta,
                stored,
                upstream_status,
                ..
            } if may_share(&meta, &lookup.parts.headers) => match reader {
                Some(reader) => {
                    count(lookup.fwd.metric());
                    let status = forwarded_status(lookup.fwd, upstream_status, stored, true);
                    Ok(respond_from_flight(
                        Some(reader),
                        &meta,
                        &meta.headers,
                        &lookup.parts,
                        status,
                    ))
                }
                None => self.lead(Flight::new(), lookup, origin, false).await,
            },
            Head::Failed(failed) => {
                let error = failed.to_error();
                if !is_origin_failure(&error) {
                    return Err(error);
                }
                answer_unreachable(&lookup, error, SystemTime::now())
            }
            _ => self.lead(Flight::new(), lookup, origin, false).await,
        }
    }

    fn start_fill(
        &self,
        flight: &Arc<Flight>,
        lookup: &Lookup<'_>,
        origin: Arc<dyn Origin>,
        registered: bool,
    ) -> oneshot::Receiver<Result<Response<Body>, ProxyError>> {
        let (leader, receiver) = oneshot::channel();
        let job = FillJob {
            inner: Arc::clone(&self.inner),
            flight: Arc::clone(flight),
            key: lookup.key.clone(),
            registered,
            request_headers: lookup.parts.headers.clone(),
            request_directives: lookup.directives.clone(),
            fetch: fill_request(&lookup.parts, lookup.stale.as_deref()),
            refetch: lookup
                .stale
                .as_ref()
                .map(|_| fill_request(&lookup.parts, None)),
            origin,
            stale: lookup.stale.clone(),
            route_stale_while_revalidate: lookup.route.stale_while_revalidate.map(|d| d.0),
            route_stale_if_error: lookup.route.stale_if_error.map(|d| d.0),
            leader,
        };
        tokio::spawn(fill::run(job));
        receiver
    }

    /// Starts one background revalidation for the key unless one is running.
    fn refresh_in_background(
        &self,
        route: &RouteCache,
        parts: &Parts,
        key: &str,
        entry: &Arc<Entry>,
        origin: Arc<dyn Origin>,
    ) {
        let flight = {
            let mut flights = self.flights();
            if flights.contains_key(key) {
                return;
            }
            let flight = Flight::new();
            flights.insert(key.to_string(), Arc::clone(&flight));
            flight
        };
        let lookup = Lookup {
            route,
            parts: clone_parts(parts),
            directives: RequestDirectives::default(),
            key: key.to_string(),
            stale: Some(Arc::clone(entry)),
            fwd: Fwd::Stale,
        };
        // Nobody waits for this fill: its leader channel is dropped at once.
        drop(self.start_fill(&flight, &lookup, origin, true));
    }

    async fn serve_unsafe(
        &self,
        route: &RouteCache,
        request: Request<Body>,
        origin: Arc<dyn Origin>,
    ) -> Result<Response<Body>, ProxyError> {
        let url = key::effective_url(request.uri(), request.headers());
        let own_key = key::primary_key(request.uri(), request.headers(), &route.key);
        let response = pass(request, origin, Fwd::Method).await?;
        let status = response.status();
        if status.is_success() || status.is_redirection() {
            let store = self.inner.store.load();
            self.inner.doom_url(key::url_part(&own_key));
            let mut removed = store.purge_url(key::url_part(&own_key));
            for name in [header::LOCATION, header::CONTENT_LOCATION] {
                let target = response
                    .headers()
                    .get(&name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| key::same_origin_target(&url, v));
                if let Some(target) = target.and_then(|t| t.parse::<http::Uri>().ok()) {
                    let target_key = key::primary_key(&target, &HeaderMap::new(), &route.key);
                    self.inner.doom_url(key::url_part(&target_key));
                    removed += store.purge_url(key::url_part(&target_key));
                }
            }
            if removed > 0 {
                tracing::debug!(url = %url, removed, "cache entries invalidated by an unsafe method");
            }
            update_gauges(&store);
        }
        Ok(response)
    }

    /// PURGE on the proxy listener (the Varnish habit), for allowed clients.
    fn purge_request(&self, route: &RouteCache, request: &Request<Body>) -> Response<Body> {
        let Some(purge) = &route.purge else {
            let mut response = problem_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "PURGE is not enabled on this route",
            );
            response.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"),
            );
            return response;
        };
        let client = request.extensions().get::<ClientAddr>().map(|c| c.0.ip());
        let allowed = client.is_some_and(|ip| purge.allow.iter().any(|rule| ip_allowed(rule, ip)));
        if !allowed {
            tracing::info!(client = ?client, "PURGE refused: client not in purge.allow");
            return problem_response(StatusCode::FORBIDDEN, "this client may not PURGE");
        }
        let key = key::primary_key(request.uri(), request.headers(), &route.key);
        self.inner.doom_url(key::url_part(&key));
        let store = self.inner.store.load();
        let purged = store.purge_url(key::url_part(&key));
        update_gauges(&store);
        tracing::info!(url = key::url_part(&key), purged, "PURGE");
        purged_response(purged)
    }

    /// Removes every variant stored for `url` (`scheme://authority/path?query`,
    /// matched after the same normalization as request keys). Returns how many went.
    pub fn purge_url(&self, url: &str) -> usize {
        let Some(url) = key::normalize_url(url) else {
            return 0;
        };
        self.inner.doom_url(&url);
        let store = self.inner.store.load();
        let purged = store.purge_url(&url);
        update_gauges(&store);
        purged
    }

    /// Removes entries whose URL starts with `prefix`: a prefix starting with
    /// `/` matches the path (and query) on any host; otherwise it is matched
    /// against `scheme://authority/path?query`.
    pub fn purge_prefix(&self, prefix: &str) -> usize {
        if prefix.is_empty() {
            return 0;
        }
        // Prefix and tag purges are rare operator actions: every fill in
        // progress is kept out of the store rather than matched precisely.
        self.inner.doom_flights(|_| true);
        let store = self.inner.store.load();
        let purged = store.purge_prefix(prefix);
        update_gauges(&store);
        purged
    }

    /// Removes entries tagged `tag` (exact match) by a `cache.tag_headers` header.
    pub fn purge_tag(&self, tag: &str) -> usize {
        self.inner.doom_flights(|_| true);
        let store = self.inner.store.load();
        let purged = store.purge_tag(tag.trim());
        update_gauges(&store);
        purged
    }

    /// Bytes held (moka's weighted size; exact after [`Cache::run_pending_tasks`]).
    pub fn weighted_size(&self) -> u64 {
        self.inner.store.load().weighted_size()
    }

    pub fn entry_count(&self) -> u64 {
        self.inner.store.load().entry_count()
    }

    /// Runs moka's deferred maintenance (eviction, counts) now.
    pub fn run_pending_tasks(&self) {
        let store = self.inner.store.load();
        store.run_pending_tasks();
        update_gauges(&store);
    }

    /// The fills in progress: each key with the requests waiting on it.
    pub fn in_flight(&self) -> Vec<(String, u64)> {
        let mut flights: Vec<(String, u64)> = self
            .flights()
            .iter()
            .map(|(key, flight)| (key.clone(), flight.waiters()))
            .collect();
        flights.sort();
        flights
    }

    fn flights(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Flight>>> {
        self.inner.flights.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A cacheable request on its way through lookup and fill.
struct Lookup<'a> {
    route: &'a RouteCache,
    parts: Parts,
    directives: RequestDirectives,
    key: String,
    stale: Option<Arc<Entry>>,
    fwd: Fwd,
}

/// Forwards a request the cache does not handle, labelling the response.
async fn pass(
    request: Request<Body>,
    origin: Arc<dyn Origin>,
    fwd: Fwd,
) -> Result<Response<Body>, ProxyError> {
    count(fwd.metric());
    let mut response = origin.fetch(request).await?;
    let status = format!(
        "{CACHE_NAME}; fwd={}; fwd-status={}",
        fwd.as_str(),
        response.status().as_u16()
    );
    add_cache_status(response.headers_mut(), &status);
    Ok(response)
}

/// The answer when a fill's response was not shared: the leader's own
/// response, or stale content when stale-if-error allows, or the error.
fn finish_unshared(
    lookup: &Lookup<'_>,
    outcome: Result<Response<Body>, ProxyError>,
) -> Result<Response<Body>, ProxyError> {
    let now = SystemTime::now();
    let stale_allowed = lookup
        .stale
        .as_ref()
        .filter(|s| stale_if_error_allows(&s.meta, &lookup.directives, now));
    match outcome {
        Ok(response) => {
            let status = response.status();
            if let Some(stale) = stale_allowed
                && is_error_status(status)
            {
                return Ok(serve_stale_on_error(
                    stale,
                    &lookup.parts,
                    now,
                    Some(status),
                ));
            }
            count(lookup.fwd.metric());
            let label = forwarded_status(lookup.fwd, status, false, false);
            Ok(pass_through(response, &lookup.parts, label))
        }
        Err(error) if !is_origin_failure(&error) => {
            count("error");
            Err(error)
        }
        Err(error) => answer_unreachable(lookup, error, now),
    }
}

/// The answer when the origin could not be reached or timed out: stale
/// content when stale-if-error or the disconnected grace allows it, else 504
/// for a stored response that could not be revalidated, else the error.
fn answer_unreachable(
    lookup: &Lookup<'_>,
    error: ProxyError,
    now: SystemTime,
) -> Result<Response<Body>, ProxyError> {
    let Some(stale) = &lookup.stale else {
        count("error");
        return Err(error);
    };
    if stale_if_error_allows(&stale.meta, &lookup.directives, now) {
        return Ok(serve_stale_on_error(stale, &lookup.parts, now, None));
    }
    if lookup.fwd == Fwd::Stale && disconnected_grace_allows(&stale.meta, &lookup.directives, now) {
        tracing::info!(%error, "origin unreachable; serving a just-stale response");
        return Ok(serve_stale_disconnected(stale, &lookup.parts, now));
    }
    // RFC 9111 sections 4.2.4 and 5.2.2.2: a stale response that could not
    // be revalidated is answered with 504.
    count("error");
    tracing::info!(%error, "stale entry could not be revalidated");
    let mut response = problem_response(
        StatusCode::GATEWAY_TIMEOUT,
        "the stored response is stale and the origin could not be reached to revalidate it",
    );
    add_cache_status(response.headers_mut(), &format!("{CACHE_NAME}; fwd=stale"));
    Ok(response)
}

fn serve_stale_disconnected(stale: &Entry, parts: &Parts, now: SystemTime) -> Response<Body> {
    count("stale");
    counters::stale_served("disconnected");
    let ttl = ttl_seconds(&stale.meta, now);
    let status = format!("{CACHE_NAME}; fwd=stale; ttl={ttl}; detail=origin-unreachable");
    respond_stored(stale, parts, now, status)
}

fn serve_stale_on_error(
    stale: &Entry,
    parts: &Parts,
    now: SystemTime,
    upstream_status: Option<StatusCode>,
) -> Response<Body> {
    count("stale");
    counters::stale_served("error");
    let ttl = ttl_seconds(&stale.meta, now);
    let status = match upstream_status {
        Some(code) => format!(
            "{CACHE_NAME}; fwd=stale; fwd-status={}; ttl={ttl}; detail=stale-if-error",
            code.as_u16()
        ),
        None => format!("{CACHE_NAME}; fwd=stale; ttl={ttl}; detail=stale-if-error"),
    };
    respond_stored(stale, parts, now, status)
}

/// `Cache-Status` for a forwarded request.
fn forwarded_status(
    fwd: Fwd,
    upstream_status: StatusCode,
    stored: bool,
    collapsed: bool,
) -> String {
    let mut value = format!(
        "{CACHE_NAME}; fwd={}; fwd-status={}",
        fwd.as_str(),
        upstream_status.as_u16()
    );
    if stored {
        value.push_str("; stored");
    }
    if collapsed {
        value.push_str("; collapsed");
    }
    value
}

/// The 504 for `only-if-cached` when nothing usable is stored.
fn not_cached() -> Response<Body> {
    count("miss");
    let mut response = ProxyError::NotCached.into_response();
    add_cache_status(
        response.headers_mut(),
        &format!("{CACHE_NAME}; detail=only-if-cached"),
    );
    response
}

/// A `Range` request the cache may answer from a stored response: no
/// `If-Range` or other precondition only the origin can evaluate.
fn is_plain_range(headers: &HeaderMap) -> bool {
    headers.contains_key(header::RANGE)
        && ![
            header::IF_MATCH,
            header::IF_UNMODIFIED_SINCE,
            header::IF_RANGE,
        ]
        .iter()
        .any(|name| headers.contains_key(name))
}

/// Range requests and preconditions the cache must not evaluate itself
/// (RFC 9111 section 4.3.2) go to the origin untouched.
fn has_origin_only_preconditions(headers: &HeaderMap) -> bool {
    [
        header::RANGE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
        header::IF_RANGE,
    ]
    .iter()
    .any(|name| headers.contains_key(name))
}

/// A waiter may take the leader's response only when it is what the cache
/// would have served it: same Vary selection, Authorization rules met.
fn may_share(meta: &Meta, request: &HeaderMap) -> bool {
    if request.contains_key(header::AUTHORIZATION) && !meta.directives.allows_authorized() {
        return false;
    }
    meta.vary_names.is_empty() || meta.matches(&key::vary_values(&meta.vary_names, request))
}

/// The request the fill sends: always GET, the client's conditionals removed
/// (the cache wants a full response), the stored validators added.
fn fill_request(parts: &Parts, stale: Option<&Entry>) -> Request<Body> {
    let mut headers = parts.headers.clone();
    for name in policy::CLIENT_CONDITIONALS {
        headers.remove(name);
    }
    // The fill sends no body, whatever the client's request framed.
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::TRANSFER_ENCODING);
    if let Some(stale) = stale {
        policy::add_validators(&mut headers, &stale.meta.headers);
    }
    let mut request = Request::new(body::empty());
    *request.method_mut() = Method::GET;
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = headers;
    *request.extensions_mut() = parts.extensions.clone();
    request
}

fn clone_parts(parts: &Parts) -> Parts {
    let mut request = Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    *request.extensions_mut() = parts.extensions.clone();
    request.into_parts().0
}

/// A response from a stored entry: Age computed now, 304 for a matching
/// conditional, no body for HEAD.
fn respond_stored(entry: &Entry, parts: &Parts, now: SystemTime, status: String) -> Response<Body> {
    let age = entry.meta.timing.current_age(now).as_secs();
    let meta = &entry.meta;
    respond_with(meta, &meta.headers, parts, age, status, || {
        body::full(entry.body.clone())
    })
}

/// `206` with one byte range of a stored 200 (the body is shared, not copied).
fn respond_partial(
    entry: &Entry,
    range: std::ops::RangeInclusive<usize>,
    now: SystemTime,
    status: String,
) -> Response<Body> {
    let (first, last) = (*range.start(), *range.end());
    let total = entry.body.len();
    let mut response = Response::new(body::full(entry.body.slice(first..=last)));
    *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    let headers = response.headers_mut();
    *headers = entry.meta.headers.clone();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(last - first + 1));
    if let Ok(value) = HeaderValue::try_from(format!("bytes {first}-{last}/{total}")) {
        headers.insert(header::CONTENT_RANGE, value);
    }
    let age = entry.meta.timing.current_age(now).as_secs();
    headers.insert(header::AGE, HeaderValue::from(age));
    add_cache_status(headers, &status);
    response
}

fn respond_from_flight(
    reader: Option<FlightBody>,
    meta: &Meta,
    headers: &HeaderMap,
    parts: &Parts,
    status: String,
) -> Response<Body> {
    let age = meta.timing.current_age(SystemTime::now()).as_secs();
    respond_with(meta, headers, parts, age, status, move || match reader {
        Some(reader) => body::boxed(reader),
        None => body::empty(),
    })
}

/// `headers` are the fields to answer with: the stored ones, or for the
/// request that brought the response, its complete set.
fn respond_with(
    meta: &Meta,
    headers: &HeaderMap,
    parts: &Parts,
    age: u64,
    status: String,
    body: impl FnOnce() -> Body,
) -> Response<Body> {
    let mut response = if policy::is_not_modified(&parts.headers, meta.status, headers) {
        let mut response = Response::new(body::empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        *response.headers_mut() = policy::not_modified_headers(headers);
        response
    } else {
        let body = if parts.method == Method::HEAD {
            body::empty()
        } else {
            body()
        };
        let mut response = Response::new(body);
        *response.status_mut() = meta.status;
        *response.headers_mut() = headers.clone();
        response
    };
    response
        .headers_mut()
        .insert(header::AGE, HeaderValue::from(age));
    add_cache_status(response.headers_mut(), &status);
    response
}

/// An unshared upstream response, answered as is (304 if the client's
/// conditional matches it, no body for HEAD).
fn pass_through(response: Response<Body>, parts: &Parts, status: String) -> Response<Body> {
    let (mut head, body) = response.into_parts();
    let not_modified = head.status.is_success()
        && (parts.method == Method::GET || parts.method == Method::HEAD)
        && policy::is_not_modified(&parts.headers, head.status, &head.headers);
    let body = if not_modified {
        head.headers = policy::not_modified_headers(&head.headers);
        head.status = StatusCode::NOT_MODIFIED;
        body::empty()
    } else if parts.method == Method::HEAD {
        body::empty()
    } else {
        body
    };
    add_cache_status(&mut head.headers, &status);
    Response::from_parts(head, body)
}

/// Appends this cache's member to `Cache-Status`, keeping upstream caches' ones
/// first (RFC 9211 section 2: ordered from the origin towards the client).
fn add_cache_status(headers: &mut HeaderMap, value: &str) {
    let name = HeaderName::from_static("cache-status");
    let combined = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.trim().is_empty() => format!("{existing}, {value}"),
        _ => value.to_string(),
    };
    // From a String: the bytes move into the header value without a copy.
    if let Ok(value) = HeaderValue::try_from(combined) {
        headers.insert(name, value);
    }
}

fn purged_response(purged: usize) -> Response<Body> {
    let json = serde_json::json!({ "purged": purged }).to_string();
    let mut response = Response::new(body::full(Bytes::from(json)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `rule` is an address (`10.0.0.1`) or a CIDR block (`10.0.0.0/8`, `::1/128`).
fn ip_allowed(rule: &str, ip: IpAddr) -> bool {
    let (address, bits) = match rule.trim().split_once('/') {
        Some((address, bits)) => (address, bits.trim().parse::<u32>().ok()),
        None => (rule.trim(), None),
    };
    let Ok(network) = address.parse::<IpAddr>() else {
        return false;
    };
    match (network.to_canonical(), ip.to_canonical()) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => {
            let bits = bits.unwrap_or(32).min(32);
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            u32::from(net) & mask == u32::from(ip) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) => {
            let bits = bits.unwrap_or(128).min(128);
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(net) & mask == u128::from(ip) & mask
        }
        _ => false,
    }
}

fn count(status: &'static str) {
    counters::request(status);
}

fn update_gauges(store: &Store) {
    metrics::gauge!("larder_cache_bytes").set(store.weighted_size() as f64);
    metrics::gauge!("larder_cache_entries").set(store.entry_count() as f64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use directives::ResponseDirectives;
    use policy::Timing;

    fn meta(cache_control: &str, lifetime: u64, age: u64, swr: u64) -> Meta {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_str(cache_control).unwrap(),
        );
        let now = SystemTime::now();
        let stored_at = now - Duration::from_secs(age);
        Meta {
            status: StatusCode::OK,
            directives: ResponseDirectives::parse(&headers),
            headers,
            timing: Timing::new(stored_at, stored_at, &HeaderMap::new()),
            lifetime: Duration::from_secs(lifetime),
            vary_names: Vec::new(),
            vary_values: Vec::new(),
            stale_while_revalidate: Duration::from_secs(swr),
            stale_if_error: Duration::from_secs(swr),
            tags: Vec::new(),
        }
    }

    fn request(cache_control: &str) -> RequestDirectives {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_str(cache_control).unwrap(),
        );
        RequestDirectives::parse(&headers)
    }

    #[test]
    fn decide_follows_freshness_and_request_directives() {
        let now = SystemTime::now();
        let fresh = meta("max-age=100", 100, 10, 0);
        assert_eq!(decide(&fresh, &request(""), now), Use::Fresh);
        assert_eq!(
            decide(&fresh, &request("no-cache"), now),
            Use::Validate(Fwd::Request)
        );
        assert_eq!(
            decide(&fresh, &request("max-age=5"), now),
            Use::Validate(Fwd::Request)
        );
        assert_eq!(
            decide(&fresh, &request("min-fresh=95"), now),
            Use::Validate(Fwd::Request)
        );
        let stale = meta("max-age=10", 10, 20, 0);
        assert_eq!(decide(&stale, &request(""), now), Use::Validate(Fwd::Stale));
        assert_eq!(
            decide(&stale, &request("max-stale"), now),
            Use::StaleAccepted
        );
        assert_eq!(
            decide(&stale, &request("max-stale=5"), now),
            Use::Validate(Fwd::Stale)
        );
        let must = meta("max-age=10, must-revalidate", 10, 20, 60);
        assert_eq!(
            decide(&must, &request("max-stale"), now),
            Use::Validate(Fwd::Stale)
        );
        let swr = meta("max-age=10", 10, 20, 60);
        assert_eq!(decide(&swr, &request(""), now), Use::StaleWhileRevalidate);
        let no_cache = meta("no-cache", 100, 0, 0);
        assert_eq!(
            decide(&no_cache, &request(""), now),
            Use::Validate(Fwd::Stale)
        );
    }

    #[test]
    fn s_maxage_refuses_client_granted_staleness() {
        let now = SystemTime::now();
        let shared = meta("s-maxage=10", 10, 20, 0);
        assert_eq!(
            decide(&shared, &request("max-stale"), now),
            Use::Validate(Fwd::Stale)
        );
        assert!(!stale_if_error_allows(
            &shared,
            &request("stale-if-error=60"),
            now
        ));
        let explicit = meta("s-maxage=10, stale-if-error=60", 10, 20, 60);
        assert!(stale_if_error_allows(&explicit, &request(""), now));
    }

    #[test]
    fn stale_if_error_windows() {
        let now = SystemTime::now();
        assert!(stale_if_error_allows(
            &meta("max-age=10", 10, 20, 60),
            &request(""),
            now
        ));
        assert!(!stale_if_error_allows(
            &meta("max-age=10", 10, 100, 60),
            &request(""),
            now
        ));
        assert!(stale_if_error_allows(
            &meta("max-age=10", 10, 100, 0),
            &request("stale-if-error=200"),
            now
        ));
        assert!(!stale_if_error_allows(
            &meta("max-age=10, proxy-revalidate", 10, 20, 60),
            &request(""),
            now
        ));
    }

    #[test]
    fn a_just_stale_response_may_answer_for_an_unreachable_origin() {
        let now = SystemTime::now();
        let none = request("");
        assert!(disconnected_grace_allows(
            &meta("max-age=10", 10, 15, 0),
            &none,
            now
        ));
        assert!(!disconnected_grace_allows(
            &meta("max-age=10", 10, 30, 0),
            &none,
            now
        ));
        for forbidding in [
            "max-age=10, must-revalidate",
            "max-age=10, proxy-revalidate",
            "s-maxage=10",
            "no-cache",
        ] {
            assert!(
                !disconnected_grace_allows(&meta(forbidding, 10, 15, 0), &none, now),
                "{forbidding}"
            );
        }
        // An explicit stale-if-error window governs alone.
        assert!(!disconnected_grace_allows(
            &meta("max-age=10", 10, 15, 1),
            &none,
            now
        ));
        assert!(!disconnected_grace_allows(
            &meta("max-age=10", 10, 15, 0),
            &request("stale-if-error=1"),
            now
        ));
    }

    #[test]
    fn purge_allow_rules_accept_addresses_and_cidrs() {
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(ip_allowed("127.0.0.1", local));
        assert!(ip_allowed("127.0.0.0/8", local));
        assert!(!ip_allowed("10.0.0.0/8", local));
        assert!(ip_allowed("0.0.0.0/0", local));
        assert!(ip_allowed(
            "127.0.0.1/32",
            "::ffff:127.0.0.1".parse().unwrap()
        ));
        assert!(ip_allowed("::1", "::1".parse().unwrap()));
        assert!(!ip_allowed("garbage", local));
    }

    #[test]
    fn cache_status_appends_after_upstream_members() {
        let mut headers = HeaderMap::new();
        add_cache_status(&mut headers, "larder; hit");
        assert_eq!(headers.get("cache-status").unwrap(), "larder; hit");
        let mut upstream = HeaderMap::new();
        upstream.insert(
            "cache-status",
            HeaderValue::from_static("origin-cache; hit"),
        );
        add_cache_status(&mut upstream, "larder; fwd=uri-miss");
        assert_eq!(
            upstream.get("cache-status").unwrap(),
            "origin-cache; hit, larder; fwd=uri-miss"
        );
    }
}
