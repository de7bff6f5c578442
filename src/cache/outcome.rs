//! What the cache did for one request, as one value ([`CacheOutcome`]): the
//! metric label, the `Cache-Status` member (RFC 9211) and the access log's
//! `cache` field all come from it, so they cannot drift apart. Also the
//! cache's counters: Prometheus handles registered once for every label
//! value (the request path only does an atomic add), and the same counts
//! per cache instance for the admin API.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use http::StatusCode;
use metrics::Counter;

/// The name this cache uses in `Cache-Status`.
pub const CACHE_NAME: &str = "larder";

/// How a request was forwarded, in RFC 9211 `fwd` words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fwd {
    UriMiss,
    VaryMiss,
    /// The request asked for validation (`no-cache`, `max-age`, `min-fresh`).
    Request,
    Stale,
    Method,
    Bypass,
}

impl Fwd {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UriMiss => "uri-miss",
            Self::VaryMiss => "vary-miss",
            Self::Request => "request",
            Self::Stale => "stale",
            Self::Method => "method",
            Self::Bypass => "bypass",
        }
    }

    fn label(self) -> Label {
        match self {
            Self::UriMiss | Self::VaryMiss => Label::Miss,
            Self::Request | Self::Stale => Label::Revalidate,
            Self::Method | Self::Bypass => Label::Bypass,
        }
    }
}

/// Why a stale response answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleReason {
    /// The request's `max-stale` accepted it.
    MaxStale,
    /// Within stale-while-revalidate; a refresh runs behind it.
    WhileRevalidate,
    /// The origin failed and stale-if-error allowed it.
    Error,
    /// The origin could not be reached and the disconnected grace allowed it.
    Disconnected,
}

impl StaleReason {
    const ALL: [Self; 4] = [
        Self::MaxStale,
        Self::WhileRevalidate,
        Self::Error,
        Self::Disconnected,
    ];

    /// The `reason` label of `larder_cache_stale_served_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxStale => "max-stale",
            Self::WhileRevalidate => "swr",
            Self::Error => "error",
            Self::Disconnected => "disconnected",
        }
    }
}

/// The `status` label of `larder_cache_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    Hit,
    Stale,
    Miss,
    Revalidate,
    Bypass,
    Error,
}

impl Label {
    const ALL: [Self; 6] = [
        Self::Hit,
        Self::Stale,
        Self::Miss,
        Self::Revalidate,
        Self::Bypass,
        Self::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Stale => "stale",
            Self::Miss => "miss",
            Self::Revalidate => "revalidate",
            Self::Bypass => "bypass",
            Self::Error => "error",
        }
    }
}

/// What the cache did for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// A fresh stored response; `ttl` seconds of freshness left.
    Hit { ttl: i64 },
    /// A stale stored response (`ttl` is negative: how long past fresh).
    Stale {
        reason: StaleReason,
        ttl: i64,
        /// The origin's error status, when stale-if-error answered one.
        upstream_status: Option<StatusCode>,
    },
    /// Forwarded to the origin; `stored` when the response is being
    /// stored, `collapsed` when this request joined another one's fetch.
    Forwarded {
        fwd: Fwd,
        upstream_status: StatusCode,
        stored: bool,
        collapsed: bool,
    },
    /// Forwarded, and the origin failed with nothing stale to answer.
    Failed { fwd: Fwd, collapsed: bool },
    /// Not stored here, but fresh in the second tier (`shared:`): copied
    /// into this cache and served, without the origin.
    TierHit { ttl: i64, collapsed: bool },
    /// `only-if-cached` and nothing usable stored.
    NotCached,
}

impl CacheOutcome {
    pub fn label(&self) -> Label {
        match self {
            Self::Hit { .. } | Self::TierHit { .. } => Label::Hit,
            Self::Stale { .. } => Label::Stale,
            Self::Forwarded { fwd, .. } => fwd.label(),
            Self::Failed { .. } => Label::Error,
            Self::NotCached => Label::Miss,
        }
    }

    pub fn stale_reason(&self) -> Option<StaleReason> {
        match self {
            Self::Stale { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    /// This cache's `Cache-Status` member, e.g. `larder; hit; ttl=42`.
    pub fn member(&self) -> String {
        let mut member = String::with_capacity(48);
        member.push_str(CACHE_NAME);
        match self {
            Self::Hit { ttl }
            | Self::Stale {
                reason: StaleReason::MaxStale | StaleReason::WhileRevalidate,
                ttl,
                ..
            } => push(&mut member, format_args!("; hit; ttl={ttl}")),
            Self::Stale {
                reason: StaleReason::Error,
                ttl,
                upstream_status,
            } => {
                member.push_str("; fwd=stale");
                if let Some(status) = upstream_status {
                    push(
                        &mut member,
                        format_args!("; fwd-status={}", status.as_u16()),
                    );
                }
                push(
                    &mut member,
                    format_args!("; ttl={ttl}; detail=stale-if-error"),
                );
            }
            Self::Stale {
                reason: StaleReason::Disconnected,
                ttl,
                ..
            } => push(
                &mut member,
                format_args!("; fwd=stale; ttl={ttl}; detail=origin-unreachable"),
            ),
            Self::Forwarded {
                fwd,
                upstream_status,
                stored,
                collapsed,
            } => {
                push(
                    &mut member,
                    format_args!(
                        "; fwd={}; fwd-status={}",
                        fwd.as_str(),
                        upstream_status.as_u16()
                    ),
                );
                if *stored {
                    member.push_str("; stored");
                }
                if *collapsed {
                    member.push_str("; collapsed");
                }
            }
            Self::Failed { fwd, collapsed } => {
                push(&mut member, format_args!("; fwd={}", fwd.as_str()));
                if *collapsed {
                    member.push_str("; collapsed");
                }
            }
            Self::TierHit { ttl, collapsed } => {
                push(&mut member, format_args!("; hit; ttl={ttl}; detail=shared"));
                if *collapsed {
                    member.push_str("; collapsed");
                }
            }
            Self::NotCached => member.push_str("; detail=only-if-cached"),
        }
        member
    }

    /// Counts this outcome once: in Prometheus and in `stats`.
    pub fn record(&self, stats: &CacheStats) {
        let label = self.label();
        let counters = counters();
        counters.requests[label as usize].increment(1);
        stats.requests[label as usize].fetch_add(1, Ordering::Relaxed);
        if let Some(reason) = self.stale_reason() {
            counters.stale_served[reason as usize].increment(1);
            stats.stale_served[reason as usize].fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl std::fmt::Display for CacheOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.member())
    }
}

fn push(text: &mut String, args: std::fmt::Arguments<'_>) {
    use std::fmt::Write as _;
    let _ = text.write_fmt(args);
}

/// One cache instance's counts, for the admin API (Prometheus has the same
/// numbers summed over the process).
#[derive(Debug, Default)]
pub struct CacheStats {
    requests: [AtomicU64; Label::ALL.len()],
    stale_served: [AtomicU64; StaleReason::ALL.len()],
    coalesced: AtomicU64,
    stored: AtomicU64,
}

impl CacheStats {
    pub fn coalesced(&self) {
        counters().coalesced.increment(1);
        self.coalesced.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stored(&self) {
        counters().stored.increment(1);
        self.stored.fetch_add(1, Ordering::Relaxed);
    }

    /// `{"requests": {"hit": N, ...}, "stale_served": {...}, "coalesced": N, "stored": N}`
    pub fn to_json(&self) -> serde_json::Value {
        let requests: serde_json::Map<String, serde_json::Value> = Label::ALL
            .iter()
            .map(|label| {
                let count = self.requests[*label as usize].load(Ordering::Relaxed);
                (label.as_str().to_string(), count.into())
            })
            .collect();
        let stale: serde_json::Map<String, serde_json::Value> = StaleReason::ALL
            .iter()
            .map(|reason| {
                let count = self.stale_served[*reason as usize].load(Ordering::Relaxed);
                (reason.as_str().to_string(), count.into())
            })
            .collect();
        serde_json::json!({
            "requests": requests,
            "stale_served": stale,
            "coalesced": self.coalesced.load(Ordering::Relaxed),
            "stored": self.stored.load(Ordering::Relaxed),
        })
    }
}

/// The process's Prometheus handles, one per label value, indexed by the
/// enums' discriminants.
struct Counters {
    requests: Vec<Counter>,
    stale_served: Vec<Counter>,
    coalesced: Counter,
    stored: Counter,
}

fn counters() -> &'static Counters {
    static COUNTERS: OnceLock<Counters> = OnceLock::new();
    COUNTERS.get_or_init(|| Counters {
        requests: Label::ALL
            .iter()
            .map(|label| metrics::counter!("larder_cache_requests_total", "status" => label.as_str()))
            .collect(),
        stale_served: StaleReason::ALL
            .iter()
            .map(|reason| {
                metrics::counter!("larder_cache_stale_served_total", "reason" => reason.as_str())
            })
            .collect(),
        coalesced: metrics::counter!("larder_cache_coalesced_total"),
        stored: metrics::counter!("larder_cache_stored_total"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_enum_value_has_its_counter_slot() {
        for (index, label) in Label::ALL.iter().enumerate() {
            assert_eq!(*label as usize, index);
        }
        for (index, reason) in StaleReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index, "{}", reason.as_str());
        }
    }

    #[test]
    fn members_use_rfc_9211_words() {
        let forwarded = CacheOutcome::Forwarded {
            fwd: Fwd::UriMiss,
            upstream_status: StatusCode::OK,
            stored: true,
            collapsed: true,
        };
        assert_eq!(
            forwarded.member(),
            "larder; fwd=uri-miss; fwd-status=200; stored; collapsed"
        );
        assert_eq!(forwarded.label(), Label::Miss);
        let stale = CacheOutcome::Stale {
            reason: StaleReason::Error,
            ttl: -5,
            upstream_status: Some(StatusCode::SERVICE_UNAVAILABLE),
        };
        assert_eq!(
            stale.member(),
            "larder; fwd=stale; fwd-status=503; ttl=-5; detail=stale-if-error"
        );
        assert_eq!(CacheOutcome::Hit { ttl: 3 }.member(), "larder; hit; ttl=3");
        assert_eq!(
            CacheOutcome::NotCached.member(),
            "larder; detail=only-if-cached"
        );
        assert_eq!(
            CacheOutcome::Failed {
                fwd: Fwd::Stale,
                collapsed: false
            }
            .label(),
            Label::Error
        );
    }
}
