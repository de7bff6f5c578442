//! What a fill does with the second tier: look there before the origin (a
//! usable record answers the fill as the origin would have), and write what
//! it stored locally behind the response. Also the purge generation: a
//! purge raises it in the tier, and until that is done this instance does
//! not read the tier at all, so purged content cannot come back from it.
//!
//! Must not wait on the tier for anything but the one lookup (bounded by the
//! tier's read timeout); a tier that fails is a miss.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Response, header};

use super::Cache;
use super::fill::Fill;
use super::freshness::{self, Use};
use super::policy::Timing;
use super::store::Meta;
use super::tier::{
    self, GENERATION, Lookup, PurgeLog, Record, SecondTier, decode_generation, decode_vary,
    record_name, revalidation_name, variant_id, vary_name,
};
use crate::http::body::{self, Body};

impl Fill {
    /// Looks the key up in the tier: the generation, the record of a
    /// response without Vary and the Vary names in one round trip, and the
    /// variant's record in a second one only when the key has Vary.
    pub(super) async fn look_up_tier(&mut self) -> Lookup {
        let Some(shared) = &self.tier else {
            return Lookup::Miss;
        };
        if self.cache.tier.purge_pending() {
            return Lookup::Miss;
        }
        let tier = Arc::clone(&shared.tier);
        let plain = record_name(&self.key, "");
        let names = vec![GENERATION.to_string(), vary_name(&self.key), plain.clone()];
        let Ok(values) = tier.get_many(names).await else {
            tier_count("error");
            return Lookup::Miss;
        };
        let [generation, vary, record]: [Option<Bytes>; 3] = match values.try_into() {
            Ok(three) => three,
            Err(_) => return Lookup::Miss,
        };
        let Some(generation) = decode_generation(generation.as_ref()) else {
            tier_count("corrupt");
            return Lookup::Miss;
        };
        let generation = generation.max(self.cache.tier.generation.load(Ordering::Acquire));
        if let Some(shared) = &mut self.tier {
            shared.generation = Some(generation);
        }
        let (name, record) = match (record, vary.as_deref().and_then(decode_vary)) {
            (Some(record), _) => (plain, record),
            (None, Some(names)) if !names.is_empty() => {
                let name = record_name(&self.key, &variant_id(&names, &self.request_headers));
                match tier.get_many(vec![name.clone()]).await {
                    Ok(mut values) => match values.pop().flatten() {
                        Some(record) => (name, record),
                        None => return self.tier_miss(),
                    },
                    Err(_) => {
                        tier_count("error");
                        return Lookup::Miss;
                    }
                }
            }
            _ => return self.tier_miss(),
        };
        let record = match Record::decode(&self.key, record) {
            Ok(record) => record,
            Err(why) => {
                tracing::warn!(key = %self.key, why, "a shared-tier record did not decode; deleted");
                tier_count("corrupt");
                tier.delete(name);
                return Lookup::Miss;
            }
        };
        if record.generation < generation {
            // Filled before a purge that has run since.
            tier_count("purged");
            return Lookup::Miss;
        }
        let now = self.cache.clock.now();
        match self.usable(record, now) {
            Some((response, stale)) => {
                tier_count(if stale { "stale_hit" } else { "hit" });
                if let Some(shared) = &mut self.tier {
                    shared.hit = true;
                }
                Lookup::Hit(response)
            }
            None => {
                tier_count("stale");
                Lookup::Miss
            }
        }
    }

    fn tier_miss(&self) -> Lookup {
        tier_count("miss");
        Lookup::Miss
    }

    /// The record as a response, if it may answer this request: the Vary
    /// values match, and it is fresh, or (for a plain miss) stale within its
    /// stale-while-revalidate window or the request's `max-stale`: then it
    /// is served as a local stale entry would be, and the next request's
    /// background revalidation refreshes it (one instance for all). The
    /// flag says it is stale.
    fn usable(&self, record: Record, now: SystemTime) -> Option<(Response<Body>, bool)> {
        let age = record.age_at(now);
        let mut headers = record.headers;
        headers.insert(header::AGE, HeaderValue::from(age.as_secs()));
        let timing = Timing::new(now, now, &headers);
        let meta = self.meta(record.status, headers.clone(), timing);
        if !meta.matches(&super::key::vary_values(
            &meta.vary_names,
            &self.request_headers,
        )) {
            return None;
        }
        let stale = match freshness::decide(&meta, &self.request_directives, now) {
            Use::Fresh => false,
            Use::StaleWhileRevalidate | Use::StaleAccepted if self.stale.is_none() => true,
            _ => return None,
        };
        let mut response = Response::new(body::full(record.body));
        *response.status_mut() = record.status;
        *response.headers_mut() = headers;
        Some((response, stale))
    }

    /// For a background revalidation: claims the key, so that one instance
    /// of the namespace goes to the origin. When another holds the claim,
    /// waits for its result to reach the tier and returns it; `None` means
    /// this instance revalidates (it won, the tier did not answer, or the
    /// other's result did not come within [`REVALIDATION_HOLD`]).
    pub(super) async fn revalidated_elsewhere(&mut self) -> Option<Response<Body>> {
        let shared = self.tier.as_ref().filter(|shared| shared.revalidation)?;
        let tier = Arc::clone(&shared.tier);
        let claimed = tier
            .try_claim(revalidation_name(&self.key), REVALIDATION_HOLD)
            .await;
        if claimed != Ok(false) {
            revalidation_count(if claimed.is_ok() { "won" } else { "unclaimed" });
            return None;
        }
        let until = tokio::time::Instant::now() + REVALIDATION_HOLD;
        let mut pause = Duration::from_millis(25);
        while tokio::time::Instant::now() + pause < until {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
            if let Lookup::Hit(response) = self.look_up_tier().await {
                revalidation_count("elsewhere");
                return Some(response);
            }
        }
        revalidation_count("waited_out");
        None
    }

    /// Writes a response this fill stored locally to the tier, behind the
    /// response: only when the lookup answered (so the generation is
    /// known), the response did not come from there, and it is small enough.
    pub(super) fn write_behind(&self, meta: &Meta, body: &Bytes) {
        let Some(shared) = &self.tier else { return };
        let Some(generation) = shared.generation else {
            return;
        };
        if shared.hit || body.len() as u64 > shared.max_object_size {
            return;
        }
        let now = self.cache.clock.now();
        let ttl = freshness::retention(meta, now);
        if ttl.is_zero() {
            return;
        }
        let record = Record {
            key: self.key.clone(),
            generation,
            status: meta.status,
            headers: meta.headers.clone(),
            age: meta.timing.current_age(now),
            written: now,
            body: body.clone(),
        };
        let variant = variant_id(&meta.vary_names, &self.request_headers);
        if !meta.vary_names.is_empty() {
            shared.tier.put(
                vary_name(&self.key),
                tier::encode_vary(&meta.vary_names),
                ttl,
            );
        }
        shared
            .tier
            .put(record_name(&self.key, &variant), record.encode(), ttl);
    }
}

/// The tier a cache has, and the purges on their way to it.
pub struct TierState {
    pub handle: ArcSwapOption<TierHandle>,
    /// This instance, as its purges name it (so it skips its own).
    instance: u64,
    /// The highest purge generation this instance raised the tier to.
    generation: AtomicU64,
    /// Purges applied here and not yet published, oldest first; the tier
    /// is not read while there are any.
    outbox: parking_lot::Mutex<std::collections::VecDeque<Bytes>>,
    /// A task is publishing the outbox.
    publishing: AtomicBool,
    /// Told when the outbox has emptied.
    published: tokio::sync::Notify,
}

impl Default for TierState {
    fn default() -> Self {
        use std::hash::{BuildHasher as _, Hasher as _};
        // A random id per process start: RandomState is seeded randomly.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        Self {
            handle: ArcSwapOption::empty(),
            instance: hasher.finish(),
            generation: AtomicU64::new(0),
            outbox: parking_lot::Mutex::default(),
            publishing: AtomicBool::new(false),
            published: tokio::sync::Notify::new(),
        }
    }
}

/// Whether a purge reached the other instances' view of the tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeReach {
    /// No shared tier: the purge was local only.
    Local,
    /// The tier's generation is raised: no instance reads what it removed.
    Published,
    /// The tier did not answer in time; the purge goes out when it does
    /// (meanwhile this instance does not read the tier).
    Queued,
}

impl PurgeReach {
    /// A purge's JSON answer: `{"purged": n}`, with `"shared"` when there
    /// is a shared tier.
    pub fn answer(self, purged: usize) -> serde_json::Value {
        match self {
            Self::Local => serde_json::json!({ "purged": purged }),
            reach => serde_json::json!({ "purged": purged, "shared": reach.as_str() }),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Published => "published",
            Self::Queued => "queued",
        }
    }
}

impl TierState {
    /// Whether a purge has not reached the tier yet: until it has, the tier
    /// may still hold what it removed, so it is not read.
    pub fn purge_pending(&self) -> bool {
        self.publishing.load(Ordering::Acquire)
    }

    /// After a local purge: publishes it (the tier raises its generation and
    /// tells the other instances), retrying until the tier answers; one task
    /// publishes every purge that comes meanwhile, in order.
    pub fn publish(self: &Arc<Self>, purge: &super::Purge) {
        if self.handle.load().is_none() {
            return;
        }
        self.outbox
            .lock()
            .push_back(tier::encode_purge(self.instance, purge));
        if self.publishing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.publishing.store(false, Ordering::Release);
            return;
        };
        runtime.spawn(Arc::clone(self).publish_until_done());
    }

    /// Waits (up to `limit`) for the purges so far to reach the tier.
    pub async fn reach(&self, limit: Duration) -> PurgeReach {
        if self.handle.load().is_none() {
            return PurgeReach::Local;
        }
        let wait = async {
            loop {
                let published = self.published.notified();
                if !self.purge_pending() {
                    return;
                }
                published.await;
            }
        };
        match tokio::time::timeout(limit, wait).await {
            Ok(()) => PurgeReach::Published,
            Err(_) => PurgeReach::Queued,
        }
    }

    async fn publish_until_done(self: Arc<Self>) {
        loop {
            let Some(handle) = self.handle.load_full() else {
                self.outbox.lock().clear();
                self.publishing.store(false, Ordering::Release);
                self.published.notify_waiters();
                return;
            };
            let next = self.outbox.lock().front().cloned();
            let Some(payload) = next else {
                self.publishing.store(false, Ordering::Release);
                // A purge queued between the look and the store started no
                // task of its own: look once more.
                if !self.outbox.lock().is_empty() && !self.publishing.swap(true, Ordering::AcqRel) {
                    continue;
                }
                self.published.notify_waiters();
                return;
            };
            match handle.tier.publish_purge(payload).await {
                Ok(generation) => {
                    self.generation.fetch_max(generation, Ordering::AcqRel);
                    self.outbox.lock().pop_front();
                    metrics::counter!("larder_shared_purges_total", "result" => "published")
                        .increment(1);
                }
                Err(error) => {
                    metrics::counter!("larder_shared_purges_total", "result" => "retrying")
                        .increment(1);
                    tracing::debug!(%error, "a purge could not reach the shared tier yet; retrying");
                    tokio::time::sleep(RETRY_BUMP).await;
                }
            }
        }
    }
}

impl Cache {
    /// Applies the purges other instances publish, for as long as `handle`
    /// is this cache's tier: on each signal from the tier and at least every
    /// [`PURGE_POLL`], it asks for the purges after the last generation seen.
    /// A generation that went down (Redis lost its data) or purges missing
    /// from the tier's log flush this instance's memory.
    pub(super) async fn follow_purges(cache: std::sync::Weak<Cache>, handle: Arc<TierHandle>) {
        let signal = handle.tier.purge_signal();
        let mut seen: Option<(u64, Bytes)> = None;
        let mut looks: u64 = 0;
        loop {
            let Some(this) = cache.upgrade() else { return };
            let current = this.tier.handle.load();
            if !current.as_ref().is_some_and(|h| Arc::ptr_eq(h, &handle)) {
                return;
            }
            drop(current);
            let after = seen
                .as_ref()
                .map_or(u64::MAX, |(generation, _)| *generation);
            looks += 1;
            let fresh_epoch = format!("{:x}-{looks:x}", this.tier.instance);
            if let Ok(log) = handle.tier.purges_since(after, fresh_epoch).await {
                seen = Some(this.catch_up(seen, log));
            }
            drop(this);
            tokio::select! {
                () = signal.notified() => {}
                () = tokio::time::sleep(PURGE_POLL) => {}
            }
        }
    }

    /// Applies the purges after the generation `seen` and returns what is
    /// seen now.
    fn catch_up(&self, seen: Option<(u64, Bytes)>, log: PurgeLog) -> (u64, Bytes) {
        let PurgeLog {
            generation,
            purges,
            epoch,
        } = log;
        let Some((last, last_epoch)) = seen else {
            // The first look: start from here, nothing to replay.
            return (generation, epoch);
        };
        let reset = epoch != last_epoch || generation < last;
        let missing = !reset
            && generation > last
            && purges.first().is_none_or(|(first, _)| *first > last + 1);
        if reset || missing {
            let reason = if reset { "reset" } else { "gap" };
            tracing::warn!(
                reason,
                "shared tier purges could not be followed one by one; this instance's cache is flushed"
            );
            metrics::counter!("larder_shared_resyncs_total", "reason" => reason).increment(1);
            self.purge_local(&super::Purge::All);
            return (generation, epoch);
        }
        for (_, payload) in purges {
            match tier::decode_purge(&payload) {
                Some((instance, _)) if instance == self.tier.instance => {}
                Some((_, purge)) => {
                    self.purge_local(&purge);
                    metrics::counter!("larder_shared_purges_total", "result" => "received")
                        .increment(1);
                }
                None => tracing::warn!("a shared tier purge of an unknown form; ignored"),
            }
        }
        (generation, epoch)
    }
}

/// How often an instance looks for purges it may have missed.
pub const PURGE_POLL: Duration = Duration::from_secs(1);

/// How often a purge retries reaching a tier that did not answer.
const RETRY_BUMP: Duration = Duration::from_millis(500);

/// How long a background revalidation holds its claim on a key, and the
/// longest the other instances wait for its result before revalidating
/// themselves (an origin slower than this is revalidated again).
const REVALIDATION_HOLD: Duration = Duration::from_secs(5);

fn revalidation_count(result: &'static str) {
    metrics::counter!("larder_shared_revalidations_total", "result" => result).increment(1);
}

fn tier_count(result: &'static str) {
    metrics::counter!("larder_shared_lookups_total", "result" => result).increment(1);
}

/// The tier a cache has, with what fills need of it.
pub struct TierHandle {
    pub tier: Arc<dyn SecondTier>,
    pub max_object_size: u64,
}
