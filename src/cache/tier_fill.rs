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

use super::fill::Fill;
use super::freshness::{self, Use};
use super::policy::Timing;
use super::store::Meta;
use super::tier::{
    self, GENERATION, Lookup, Record, SecondTier, decode_generation, decode_vary, record_name,
    variant_id, vary_name,
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
                return self.tier_miss();
            }
        };
        if record.generation < generation {
            // Filled before a purge that has run since.
            tier_count("purged");
            return self.tier_miss();
        }
        let now = self.cache.clock.now();
        match self.usable(record, now) {
            Some(response) => {
                tier_count("hit");
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

    /// The record as a response, if it may answer this request fresh: the
    /// Vary values match, and the request's own directives allow it.
    fn usable(&self, record: Record, now: SystemTime) -> Option<Response<Body>> {
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
        if freshness::decide(&meta, &self.request_directives, now) != Use::Fresh {
            return None;
        }
        let mut response = Response::new(body::full(record.body));
        *response.status_mut() = record.status;
        *response.headers_mut() = headers;
        Some(response)
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
#[derive(Default)]
pub struct TierState {
    pub handle: ArcSwapOption<TierHandle>,
    /// The highest purge generation this instance raised the tier to.
    generation: AtomicU64,
    /// A purge is on its way to the tier; the tier is not read meanwhile.
    bumping: AtomicBool,
    /// A purge came after the running generation bump started.
    bump_wanted: AtomicBool,
    /// Told when the purges so far have reached the tier.
    published: tokio::sync::Notify,
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
        self.bumping.load(Ordering::Acquire)
    }

    /// After a local purge: raises the tier's generation, retrying until it
    /// answers (one task for all purges that come meanwhile).
    pub fn raise_generation(self: &Arc<Self>) {
        if self.handle.load().is_none() {
            return;
        }
        self.bump_wanted.store(true, Ordering::Release);
        if self.bumping.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.bumping.store(false, Ordering::Release);
            return;
        };
        runtime.spawn(Arc::clone(self).bump_until_done());
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

    async fn bump_until_done(self: Arc<Self>) {
        loop {
            let Some(handle) = self.handle.load_full() else {
                self.bumping.store(false, Ordering::Release);
                return;
            };
            self.bump_wanted.store(false, Ordering::Release);
            match handle.tier.bump_generation().await {
                Ok(generation) => {
                    self.generation.fetch_max(generation, Ordering::AcqRel);
                    metrics::counter!("larder_shared_purges_total", "result" => "published")
                        .increment(1);
                    if self.bump_wanted.load(Ordering::Acquire) {
                        continue;
                    }
                    self.bumping.store(false, Ordering::Release);
                    // A purge between the check and the store started no
                    // task of its own: look once more.
                    if self.bump_wanted.load(Ordering::Acquire)
                        && !self.bumping.swap(true, Ordering::AcqRel)
                    {
                        continue;
                    }
                    self.published.notify_waiters();
                    return;
                }
                Err(error) => {
                    self.bump_wanted.store(true, Ordering::Release);
                    metrics::counter!("larder_shared_purges_total", "result" => "retrying")
                        .increment(1);
                    tracing::debug!(%error, "a purge could not reach the shared tier yet; retrying");
                    tokio::time::sleep(RETRY_BUMP).await;
                }
            }
        }
    }
}

/// How often a purge retries reaching a tier that did not answer.
const RETRY_BUMP: Duration = Duration::from_millis(500);

fn tier_count(result: &'static str) {
    metrics::counter!("larder_shared_lookups_total", "result" => result).increment(1);
}

/// The tier a cache has, with what fills need of it.
pub struct TierHandle {
    pub tier: Arc<dyn SecondTier>,
    pub max_object_size: u64,
}
