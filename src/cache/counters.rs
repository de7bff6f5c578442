//! The cache's metrics, registered once so the request path only does an
//! atomic add (no label vector, no registry lookup per request).
//!
//! Handles are taken from the recorder installed when they are first used;
//! the server installs its recorder before it serves anything.

use std::sync::OnceLock;

use metrics::Counter;

/// `status` label values of `larder_cache_requests_total`.
const STATUSES: [&str; 6] = ["hit", "stale", "miss", "revalidate", "bypass", "error"];
/// `reason` label values of `larder_cache_stale_served_total`.
const STALE_REASONS: [&str; 3] = ["swr", "error", "max-stale"];

struct Counters {
    requests: Vec<(&'static str, Counter)>,
    stale_served: Vec<(&'static str, Counter)>,
    coalesced: Counter,
    stored: Counter,
}

fn counters() -> &'static Counters {
    static COUNTERS: OnceLock<Counters> = OnceLock::new();
    COUNTERS.get_or_init(|| Counters {
        requests: STATUSES
            .iter()
            .map(|s| {
                (
                    *s,
                    metrics::counter!("larder_cache_requests_total", "status" => *s),
                )
            })
            .collect(),
        stale_served: STALE_REASONS
            .iter()
            .map(|r| {
                (
                    *r,
                    metrics::counter!("larder_cache_stale_served_total", "reason" => *r),
                )
            })
            .collect(),
        coalesced: metrics::counter!("larder_cache_coalesced_total"),
        stored: metrics::counter!("larder_cache_stored_total"),
    })
}

fn bump(table: &[(&'static str, Counter)], label: &str) {
    if let Some((_, counter)) = table.iter().find(|(name, _)| *name == label) {
        counter.increment(1);
    }
}

/// One request answered, by outcome (`hit`, `stale`, `miss`, ...).
pub fn request(status: &'static str) {
    bump(&counters().requests, status);
}

/// One stale response served, by why (`swr`, `error`, `max-stale`).
pub fn stale_served(reason: &'static str) {
    bump(&counters().stale_served, reason);
}

pub fn coalesced() {
    counters().coalesced.increment(1);
}

pub fn stored() {
    counters().stored.increment(1);
}
