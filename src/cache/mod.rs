//! The shared HTTP cache (RFC 9111): store, keys and variants, freshness and
//! validation, request coalescing, the tee into the store, purge and tags.
//!
//! [`Cache::serve`] answers one request of a cache-enabled route: it takes
//! the route's settings, the request, extra key parts and an [`Origin`] to
//! call on a miss, and returns the response (or the error to answer with)
//! and a [`CacheOutcome`]. [`Cache::purge`] applies a [`Purge`], whatever
//! asked for it. Does no network I/O itself and never calls back into the
//! proxy: what a fetch involves is the [`Origin`]'s business.
//!
//! One file per concern: `serve` (method dispatch, lookup, ranges, unsafe
//! methods), `freshness` (RFC 9111 section 4 as pure functions of `now`),
//! `coalesce` (one fetch per key: lead or wait), `fill` (the fetch's task and
//! the tee into the store), `fallback` (stale content when the origin fails),
//! `respond` (responses from stored entries), `purge`, `outcome`; below them
//! `policy` (storability, Age, 304s), `key`, `store`, `flight`, `clock`.
//! Must not import the proxy or plugins, or parse config text per request.

mod clock;
mod coalesce;
mod fallback;
mod fill;
mod flight;
mod freshness;
mod key;
mod origin;
mod outcome;
mod policy;
mod purge;
mod respond;
mod serve;
mod store;
mod tier;
mod tier_fill;

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::HeaderName;
use http::{Request, Response};
use parking_lot::{Mutex, MutexGuard};

use crate::config::{CacheConfig, RouteCache};
use crate::http::body::Body;
use crate::http::error::RequestError;
use flight::Flight;
use store::Store;

pub use clock::{Clock, ManualClock, SystemClock};
pub use origin::{Origin, OriginError, OriginErrorKind};
pub use outcome::{CacheOutcome, Fwd, StaleReason};
pub use purge::Purge;
pub use respond::append_cache_status;
pub use tier::{GENERATION, PurgeLog, SecondTier, TierError, TierFuture};
pub use tier_fill::PurgeReach;

/// Settings that may change on reload without touching the entries.
struct Settings {
    max_size: u64,
    max_object_size: u64,
    tag_headers: Vec<HeaderName>,
    fill_timeout: std::time::Duration,
    fill_idle_timeout: std::time::Duration,
    fill_memory: u64,
    targeted_fields: Vec<HeaderName>,
}

impl Settings {
    fn from_config(config: &CacheConfig) -> Self {
        Self {
            max_size: config.max_size.0,
            max_object_size: config.max_object_size.0,
            tag_headers: config.tag_headers.clone(),
            fill_timeout: config.fill_timeout,
            fill_idle_timeout: config.fill_idle_timeout,
            fill_memory: config.fill_memory,
            targeted_fields: config.targeted_fields.clone(),
        }
    }
}

/// The in-memory cache shared by every route; lives across config reloads.
pub struct Cache {
    store: ArcSwap<Store>,
    settings: ArcSwap<Settings>,
    /// The fill in progress per primary key, joined by concurrent misses.
    flights: Mutex<HashMap<String, Arc<Flight>>>,
    clock: Arc<dyn Clock>,
    stats: outcome::CacheStats,
    /// Bytes the fills in progress hold for the store (`cache.fill_memory`).
    fill_bytes: std::sync::atomic::AtomicU64,
    /// The second tier (`shared:`) and the purges on their way to it.
    tier: Arc<tier_fill::TierState>,
}

/// What the cache did with one request: the response (or the error to
/// answer with) and the outcome that labels it.
pub struct Served {
    pub result: Result<Response<Body>, RequestError>,
    pub outcome: CacheOutcome,
}

impl Served {
    fn ok(response: Response<Body>, outcome: CacheOutcome) -> Self {
        Self {
            result: Ok(response),
            outcome,
        }
    }

    fn err(error: RequestError, outcome: CacheOutcome) -> Self {
        Self {
            result: Err(error),
            outcome,
        }
    }
}

impl Cache {
    pub fn new(config: &CacheConfig, clock: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(Self {
            store: ArcSwap::from_pointee(Store::new(config.max_size.0)),
            settings: ArcSwap::from_pointee(Settings::from_config(config)),
            flights: Mutex::new(HashMap::new()),
            clock,
            stats: outcome::CacheStats::default(),
            fill_bytes: std::sync::atomic::AtomicU64::new(0),
            tier: Arc::default(),
        })
    }

    /// The second tier's state for the admin API: `null` without one.
    pub fn tier_status(&self) -> serde_json::Value {
        match self.tier.handle.load().as_ref() {
            None => serde_json::Value::Null,
            Some(handle) => serde_json::json!({
                "state": if handle.tier.degraded() { "degraded" } else { "ok" },
                "purge_pending": self.tier.purge_pending(),
            }),
        }
    }

    /// Waits (up to `limit`) for the purges applied so far to reach the
    /// second tier; says whether they did.
    pub async fn purge_reach(&self, limit: std::time::Duration) -> PurgeReach {
        self.tier.reach(limit).await
    }

    /// Puts a second tier behind the store (or takes it away): responses
    /// of up to `max_object_size` bytes stored here are written there too,
    /// and a local miss looks there before the origin.
    pub fn set_tier(self: &Arc<Self>, tier: Option<(Arc<dyn SecondTier>, u64)>) {
        let handle = tier.map(|(tier, max_object_size)| {
            Arc::new(tier_fill::TierHandle {
                tier,
                max_object_size,
            })
        });
        self.tier.handle.store(handle.clone());
        if let Some(handle) = handle
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(Self::follow_purges(Arc::downgrade(self), handle));
        }
    }

    /// Bytes the fills in progress buffer for the store.
    pub fn fill_bytes(&self) -> u64 {
        self.fill_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Takes `bytes` from the fill memory budget; false when it is spent.
    fn reserve_fill_bytes(&self, bytes: u64) -> bool {
        use std::sync::atomic::Ordering;
        let limit = self.settings.load().fill_memory;
        let reserved = self
            .fill_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= limit)
            })
            .is_ok();
        if reserved {
            metrics::gauge!("larder_cache_fill_bytes").increment(bytes as f64);
        }
        reserved
    }

    fn release_fill_bytes(&self, bytes: u64) {
        if bytes > 0 {
            self.fill_bytes
                .fetch_sub(bytes, std::sync::atomic::Ordering::AcqRel);
            metrics::gauge!("larder_cache_fill_bytes").decrement(bytes as f64);
        }
    }

    /// How long a coalesced request waits for its fill's head.
    fn head_wait(&self) -> std::time::Duration {
        self.settings.load().fill_timeout
    }

    /// Applies changed settings on reload; entries survive. A new `max_size`
    /// moves the entries into a store of the new size (the excess is evicted).
    pub fn apply(&self, config: &CacheConfig) {
        let settings = Settings::from_config(config);
        if settings.max_size != self.settings.load().max_size {
            let resized = Store::new(settings.max_size);
            self.store.load().drain_into(&resized);
            self.store.store(Arc::new(resized));
            tracing::info!(max_size = settings.max_size, "cache resized");
        }
        self.settings.store(Arc::new(settings));
    }

    /// Answers a request on a cache-enabled route: from the store, by joining
    /// a fetch in flight, or through `origin`. `key_extra` are parts added to
    /// the key (a plugin's device class, say). The outcome is counted here,
    /// once, and labels a response with this cache's `Cache-Status` member;
    /// an error is left for the caller to answer, labelled by `outcome`.
    pub async fn serve(
        self: &Arc<Self>,
        route: &RouteCache,
        request: Request<Body>,
        key_extra: &[String],
        origin: &Arc<dyn Origin>,
    ) -> Served {
        let mut served = self.dispatch(route, request, key_extra, origin).await;
        served.outcome.record(&self.stats);
        if let Ok(response) = &mut served.result {
            append_cache_status(response.headers_mut(), &served.outcome.member());
        }
        served
    }

    /// Bytes held (moka's weighted size; exact after [`Cache::run_pending_tasks`]).
    pub fn weighted_size(&self) -> u64 {
        self.store.load().weighted_size()
    }

    pub fn entry_count(&self) -> u64 {
        self.store.load().entry_count()
    }

    /// Runs moka's deferred maintenance (eviction, counts) now.
    pub fn run_pending_tasks(&self) {
        let store = self.store.load();
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

    /// This cache's request, stale, coalesced and stored counts as JSON.
    pub fn stats(&self) -> serde_json::Value {
        self.stats.to_json()
    }

    fn flights(&self) -> MutexGuard<'_, HashMap<String, Arc<Flight>>> {
        self.flights.lock()
    }

    /// Marks the fills in progress for matching keys so they do not commit,
    /// and makes their keys free for new fills: a purge must not be undone by
    /// a response fetched before it, nor served to requests that came after.
    fn doom_flights(&self, matches: impl Fn(&str) -> bool) {
        self.flights().retain(|key, flight| {
            if matches(key) {
                flight.doom();
                return false;
            }
            true
        });
    }
}

fn update_gauges(store: &Store) {
    metrics::gauge!("larder_cache_bytes").set(store.weighted_size() as f64);
    metrics::gauge!("larder_cache_entries").set(store.entry_count() as f64);
}
