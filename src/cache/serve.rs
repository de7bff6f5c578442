//! Serving one request: which path its method takes (cacheable, range,
//! pass, unsafe), the key and variant lookup, and what a stored response can
//! do for it; misses and validations go on to `coalesce`.
//!
//! Must not build responses itself (`respond` does) or decide freshness
//! (`freshness` does).

use std::sync::Arc;

use http::header::{self, HeaderMap};
use http::request::Parts;
use http::{Method, Request};

use super::freshness::{self, Use};
use super::outcome::{CacheOutcome, Fwd, StaleReason};
use super::store::{Entry, Variants};
use super::{Cache, Origin, Served, key, policy, respond};
use crate::config::RouteCache;
use crate::http::body::Body;
use crate::http::cache_control::RequestDirectives;
use crate::http::error::{ErrorKind, RequestError};

/// A cacheable request that goes to the origin: a miss, or a stored
/// response to validate (`stale`).
pub struct Forward<'a> {
    pub route: &'a RouteCache,
    pub parts: Parts,
    pub directives: RequestDirectives,
    pub key: String,
    pub stale: Option<Arc<Entry>>,
    pub fwd: Fwd,
}

impl Cache {
    /// Sends each method its way: GET and HEAD to the store, ranges and
    /// preconditions only the origin can judge past it, unsafe methods
    /// through with invalidation.
    pub(super) async fn dispatch(
        self: &Arc<Self>,
        route: &RouteCache,
        request: Request<Body>,
        key_extra: &[String],
        origin: &Arc<dyn Origin>,
    ) -> Served {
        let method = request.method();
        if method == Method::GET || method == Method::HEAD {
            if route.bypass_with_credentials && carries_credentials(request.headers()) {
                return pass(request, origin, Fwd::Bypass).await;
            }
            if has_origin_only_preconditions(request.headers()) {
                // Checked only here, so a plain GET pays nothing for ranges.
                if method == Method::GET && is_plain_range(request.headers()) {
                    return self.serve_range(route, request, key_extra, origin).await;
                }
                return pass(request, origin, Fwd::Bypass).await;
            }
            return self
                .serve_cacheable(route, request, key_extra, origin)
                .await;
        }
        if method == Method::OPTIONS || method == Method::TRACE {
            return pass(request, origin, Fwd::Method).await;
        }
        self.serve_unsafe(route, request, origin).await
    }

    async fn serve_cacheable(
        self: &Arc<Self>,
        route: &RouteCache,
        request: Request<Body>,
        key_extra: &[String],
        origin: &Arc<dyn Origin>,
    ) -> Served {
        let (parts, request_body) = request.into_parts();
        let now = self.clock.now();
        let (key, variants, selected) = self.lookup(route, &parts, key_extra);
        let directives = RequestDirectives::parse(&parts.headers);
        let (stale, fwd) = match selected {
            None if variants.is_some() => (None, Fwd::VaryMiss),
            None => (None, Fwd::UriMiss),
            Some(entry) => match freshness::decide(&entry.meta, &directives, now) {
                Use::Fresh => {
                    let ttl = freshness::ttl_seconds(&entry.meta, now);
                    let response = respond::stored(&entry, &parts, now);
                    return Served::ok(response, CacheOutcome::Hit { ttl });
                }
                Use::StaleAccepted => {
                    return serve_stale(&entry, &parts, now, StaleReason::MaxStale);
                }
                Use::StaleWhileRevalidate => {
                    self.refresh_in_background(route, &parts, &key, &entry, origin);
                    return serve_stale(&entry, &parts, now, StaleReason::WhileRevalidate);
                }
                Use::Validate(fwd) => (Some(entry), fwd),
            },
        };
        if directives.only_if_cached {
            return not_cached();
        }
        // A HEAD miss fills nothing (there is no body to store); a request
        // that says no-store keeps the response out of the store.
        if (stale.is_none() && parts.method == Method::HEAD) || directives.no_store {
            return pass(Request::from_parts(parts, request_body), origin, fwd).await;
        }
        let forward = Forward {
            route,
            parts,
            directives,
            key,
            stale,
            fwd,
        };
        self.fetch_via_flight(forward, origin).await
    }

    /// The primary key, what is stored under it, and the variant this
    /// request may use (Vary selection, Authorization rules).
    fn lookup(
        &self,
        route: &RouteCache,
        parts: &Parts,
        key_extra: &[String],
    ) -> (String, Option<Arc<Variants>>, Option<Arc<Entry>>) {
        let mut key = key::primary_key(&parts.uri, &parts.headers, &route.key);
        key::append_extra_parts(&mut key, key_extra);
        let variants = self.store.load().get(&key);
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
        key_extra: &[String],
        origin: &Arc<dyn Origin>,
    ) -> Served {
        let now = self.clock.now();
        let (parts, request_body) = request.into_parts();
        let directives = RequestDirectives::parse(&parts.headers);
        if let (_, _, Some(entry)) = self.lookup(route, &parts, key_extra)
            && entry.meta.status == http::StatusCode::OK
            && freshness::decide(&entry.meta, &directives, now) == Use::Fresh
        {
            let hit = CacheOutcome::Hit {
                ttl: freshness::ttl_seconds(&entry.meta, now),
            };
            // Conditionals come before Range (RFC 9110 section 13.2.2).
            if policy::is_not_modified(&parts.headers, entry.meta.status, &entry.meta.headers) {
                return Served::ok(respond::stored(&entry, &parts, now), hit);
            }
            if let Some(range) = policy::single_byte_range(&parts.headers, entry.body.len()) {
                return Served::ok(respond::partial(&entry, range, now), hit);
            }
        }
        if directives.only_if_cached {
            return not_cached();
        }
        pass(
            Request::from_parts(parts, request_body),
            origin,
            Fwd::Bypass,
        )
        .await
    }

    /// An unsafe method goes to the origin; a success invalidates what it
    /// may have changed (RFC 9111 section 4.4).
    async fn serve_unsafe(
        &self,
        route: &RouteCache,
        request: Request<Body>,
        origin: &Arc<dyn Origin>,
    ) -> Served {
        let url = key::effective_url(request.uri(), request.headers());
        let own_key = key::primary_key(request.uri(), request.headers(), &route.key);
        let served = pass(request, origin, Fwd::Method).await;
        if let Ok(response) = &served.result {
            let status = response.status();
            if status.is_success() || status.is_redirection() {
                self.invalidate_after_unsafe(route, &url, &own_key, response.headers());
            }
        }
        served
    }
}

/// Forwards a request the cache does not store, labelling what came back.
pub async fn pass(request: Request<Body>, origin: &Arc<dyn Origin>, fwd: Fwd) -> Served {
    match origin.fetch(request).await {
        Ok(response) => {
            let outcome = CacheOutcome::Forwarded {
                fwd,
                upstream_status: response.status(),
                stored: false,
                collapsed: false,
            };
            Served::ok(response, outcome)
        }
        Err(failed) => Served::err(
            failed.error,
            CacheOutcome::Failed {
                fwd,
                collapsed: false,
            },
        ),
    }
}

fn serve_stale(
    entry: &Entry,
    parts: &Parts,
    now: std::time::SystemTime,
    reason: StaleReason,
) -> Served {
    let outcome = CacheOutcome::Stale {
        reason,
        ttl: freshness::ttl_seconds(&entry.meta, now),
        upstream_status: None,
    };
    Served::ok(respond::stored(entry, parts, now), outcome)
}

/// The 504 for `only-if-cached` when nothing usable is stored.
fn not_cached() -> Served {
    Served::err(
        RequestError::from(ErrorKind::NotCached),
        CacheOutcome::NotCached,
    )
}

/// A request that identifies its user (Varnish's builtin test).
fn carries_credentials(headers: &HeaderMap) -> bool {
    headers.contains_key(header::COOKIE) || headers.contains_key(header::AUTHORIZATION)
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
