//! What to answer when a fetch's response is not shared or the origin
//! failed: the origin's own response, stale content where stale-if-error
//! (RFC 5861) or the disconnected grace (RFC 9111 section 4.2.4) allows it,
//! a 504 for a stored response that could not be revalidated, or the error.
//!
//! Pure decisions over the request, its stored entry and `now`.

use std::time::SystemTime;

use http::StatusCode;
use http::request::Parts;

use super::freshness;
use super::origin::OriginError;
use super::outcome::{CacheOutcome, Fwd, StaleReason};
use super::serve::Forward;
use super::store::Entry;
use super::{Served, respond};
use crate::http::body::Body;
use crate::http::error::{ErrorKind, RequestError};

/// The leader's answer when the fill did not share its result: its own
/// response, stale content for an origin error status when stale-if-error
/// allows, or what an origin failure leaves.
pub fn finish_unshared(
    forward: &Forward<'_>,
    fetched: Result<http::Response<Body>, OriginError>,
    now: SystemTime,
) -> Served {
    match fetched {
        Ok(response) => {
            let status = response.status();
            if freshness::is_error_status(status)
                && let Some(stale) = forward.stale.as_deref().filter(|stale| {
                    freshness::stale_if_error_allows(&stale.meta, &forward.directives, now)
                })
            {
                return stale_on_error(stale, &forward.parts, now, Some(status));
            }
            let outcome = CacheOutcome::Forwarded {
                fwd: forward.fwd,
                upstream_status: status,
                stored: false,
                collapsed: false,
            };
            Served::ok(respond::pass_through(response, &forward.parts), outcome)
        }
        Err(error) => after_origin_error(forward, error, now, false),
    }
}

/// A waiter's answer when the flight it joined failed.
pub fn after_failed_flight(forward: &Forward<'_>, error: OriginError, now: SystemTime) -> Served {
    after_origin_error(forward, error, now, true)
}

/// Stale content when stale-if-error or the disconnected grace allows it
/// and the origin was down; else 504 for a stored response that could not
/// be revalidated; else the error.
fn after_origin_error(
    forward: &Forward<'_>,
    error: OriginError,
    now: SystemTime,
    collapsed: bool,
) -> Served {
    let failed = CacheOutcome::Failed {
        fwd: forward.fwd,
        collapsed,
    };
    let Some(stale) = forward.stale.as_deref().filter(|_| error.is_origin_down()) else {
        return Served::err(error.error, failed);
    };
    if freshness::stale_if_error_allows(&stale.meta, &forward.directives, now) {
        return stale_on_error(stale, &forward.parts, now, None);
    }
    if forward.fwd == Fwd::Stale
        && freshness::disconnected_grace_allows(&stale.meta, &forward.directives, now)
    {
        tracing::info!(error = %error.error, "origin unreachable; serving a just-stale response");
        let outcome = CacheOutcome::Stale {
            reason: StaleReason::Disconnected,
            ttl: freshness::ttl_seconds(&stale.meta, now),
            upstream_status: None,
        };
        return Served::ok(respond::stored(stale, &forward.parts, now), outcome);
    }
    // RFC 9111 sections 4.2.4 and 5.2.2.2: a stale response that could not
    // be revalidated is answered with 504.
    tracing::info!(error = %error.error, "stale entry could not be revalidated");
    Served::err(
        RequestError::from(ErrorKind::StaleNotRevalidated),
        CacheOutcome::Failed {
            fwd: Fwd::Stale,
            collapsed,
        },
    )
}

fn stale_on_error(
    stale: &Entry,
    parts: &Parts,
    now: SystemTime,
    upstream_status: Option<StatusCode>,
) -> Served {
    let outcome = CacheOutcome::Stale {
        reason: StaleReason::Error,
        ttl: freshness::ttl_seconds(&stale.meta, now),
        upstream_status,
    };
    Served::ok(respond::stored(stale, parts, now), outcome)
}
