//! Purges as values: by URL, URL prefix, tag or everything. Whatever asks
//! for one (the admin API, the proxy's `PURGE`, an unsafe method's
//! invalidation, later another instance), [`Cache::purge`] applies it the
//! same way: fills in progress that match are doomed so they cannot store a
//! response fetched before the purge, then the store drops the entries.

use http::header::{self, HeaderMap};
use http::request::Parts;

use super::{Cache, key, update_gauges};
use crate::config::RouteCache;

/// What to remove from the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purge {
    /// Every variant stored for a URL (`scheme://authority/path?query`,
    /// normalized as request keys are).
    Url(String),
    /// Entries whose URL starts with the prefix; one starting with `/`
    /// matches the path (and query) on any host.
    Prefix(String),
    /// Entries tagged by a `cache.tag_headers` header (exact match).
    Tag(String),
    All,
}

impl Purge {
    /// The URL purge for a request on a cache-enabled route (a `PURGE`):
    /// its key's URL, with the route's query rules applied.
    pub fn of_request(route: &RouteCache, request: &Parts) -> Self {
        let key = key::primary_key(&request.uri, &request.headers, &route.key);
        Self::Url(key::url_part(&key).to_string())
    }
}

impl Cache {
    /// Applies `purge` here and publishes it to the other instances (when
    /// there is a shared tier); returns how many stored variants went here.
    pub fn purge(&self, purge: &Purge) -> usize {
        let purged = self.purge_local(purge);
        self.tier.publish(purge);
        purged
    }

    /// Applies `purge` to this instance's memory only.
    pub(super) fn purge_local(&self, purge: &Purge) -> usize {
        let store = self.store.load();
        let purged = match purge {
            Purge::Url(url) => {
                let Some(url) = key::normalize_url(url) else {
                    return 0;
                };
                self.doom_flights(|key| key::url_part(key) == url);
                store.purge_url(&url)
            }
            Purge::Prefix(prefix) if prefix.is_empty() => return 0,
            Purge::Prefix(prefix) => {
                // Prefix and tag purges are rare operator actions: every fill
                // in progress is kept out of the store rather than matched
                // precisely (a fill's tags are not known until its head).
                self.doom_flights(|_| true);
                store.purge_prefix(prefix)
            }
            Purge::Tag(tag) => {
                self.doom_flights(|_| true);
                store.purge_tag(tag.trim())
            }
            Purge::All => {
                self.doom_flights(|_| true);
                store.purge_all()
            }
        };
        update_gauges(&store);
        purged
    }

    /// After a successful unsafe request (RFC 9111 section 4.4): the
    /// request's own URL goes, and the `Location` and `Content-Location`
    /// targets when they share its origin.
    pub(super) fn invalidate_after_unsafe(
        &self,
        route: &RouteCache,
        request_url: &str,
        own_key: &str,
        response: &HeaderMap,
    ) {
        let mut removed = self.purge(&Purge::Url(key::url_part(own_key).to_string()));
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let target = response
                .get(&name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| key::same_origin_target(request_url, v));
            if let Some(target) = target.and_then(|t| t.parse::<http::Uri>().ok()) {
                let target_key = key::primary_key(&target, &HeaderMap::new(), &route.key);
                removed += self.purge(&Purge::Url(key::url_part(&target_key).to_string()));
            }
        }
        if removed > 0 {
            tracing::debug!(url = %request_url, removed, "cache entries invalidated by an unsafe method");
        }
    }
}
