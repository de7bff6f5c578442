//! Freshness and staleness (RFC 9111 section 4, RFC 5861) as pure
//! functions of a stored response's metadata, the request's directives and
//! `now`: whether a stored response may answer, may answer stale, or must be
//! validated, and how long the store keeps it.
//!
//! Must not read the clock itself or touch the store.

use std::time::{Duration, SystemTime};

use http::StatusCode;

use super::outcome::Fwd;
use super::policy;
use super::store::Meta;
use crate::http::cache_control::RequestDirectives;

/// Stale entries with a validator are kept this long for revalidation.
const VALIDATOR_RETENTION: Duration = Duration::from_secs(60 * 60);
/// No entry is kept longer than this, whatever its freshness (an Expires in
/// the year 9999 must not become an overflowing timer).
const MAX_RETENTION: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Every entry outlives its freshness by at least this (for max-stale).
const MIN_STALE_RETENTION: Duration = Duration::from_secs(60);

/// What a stored response can do for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    Fresh,
    /// Stale, but the request's `max-stale` accepts it.
    StaleAccepted,
    /// Stale within stale-while-revalidate: serve now, refresh behind.
    StaleWhileRevalidate,
    Validate(Fwd),
}

/// Decides how a stored response may be used (RFC 9111 section 4, RFC 5861).
pub fn decide(meta: &Meta, request: &RequestDirectives, now: SystemTime) -> Use {
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
pub fn stale_if_error_allows(meta: &Meta, request: &RequestDirectives, now: SystemTime) -> bool {
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
pub fn disconnected_grace_allows(
    meta: &Meta,
    request: &RequestDirectives,
    now: SystemTime,
) -> bool {
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

/// Upstream statuses that count as errors for stale-if-error (RFC 5861 section 4).
pub fn is_error_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

pub fn ttl_seconds(meta: &Meta, now: SystemTime) -> i64 {
    let lifetime = i64::try_from(meta.lifetime.as_secs()).unwrap_or(i64::MAX);
    let age = i64::try_from(meta.timing.current_age(now).as_secs()).unwrap_or(i64::MAX);
    lifetime.saturating_sub(age)
}

/// How long moka keeps an entry: its remaining freshness plus the time it
/// can still serve stale or be revalidated.
pub fn retention(meta: &Meta, now: SystemTime) -> Duration {
    let remaining = meta.lifetime.saturating_sub(meta.timing.current_age(now));
    let validation = if policy::has_validator(&meta.headers) {
        VALIDATOR_RETENTION
    } else {
        Duration::ZERO
    };
    let after_stale = meta
        .stale_while_revalidate
        .max(meta.stale_if_error)
        .max(validation)
        .max(MIN_STALE_RETENTION);
    (remaining + after_stale).min(MAX_RETENTION)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy::Timing;
    use crate::http::cache_control::ResponseDirectives;
    use http::StatusCode;
    use http::header::{self, HeaderMap, HeaderValue};

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
}
