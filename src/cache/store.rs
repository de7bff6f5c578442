//! The in-memory store: a moka cache from primary key to the stored variants
//! of that URL, weighed in bytes, plus the tag index used by purge.
//!
//! Entries are immutable and shared (`Arc`); an update builds a new variant
//! list. Must not decide cacheability or freshness: callers hand it finished
//! entries and a retention time.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, StatusCode};
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use parking_lot::Mutex;

use super::key::{KEY_HEADER_SEPARATOR, path_part, url_part};
use super::policy::Timing;
use crate::http::cache_control::ResponseDirectives;

/// Variants kept per URL; the oldest goes first beyond this.
const MAX_VARIANTS: usize = 16;
/// Bookkeeping bytes counted per entry on top of its headers and body.
const ENTRY_OVERHEAD: usize = 256;

/// Everything about a stored response except its body.
#[derive(Debug)]
pub struct Meta {
    pub status: StatusCode,
    /// As replayed to clients: Date present, no Age, no hop-by-hop fields.
    pub headers: HeaderMap,
    pub directives: ResponseDirectives,
    pub timing: Timing,
    pub lifetime: Duration,
    pub vary_names: Vec<HeaderName>,
    pub vary_values: Vec<Option<Vec<u8>>>,
    /// From the response or the route default when the response is silent.
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub tags: Vec<String>,
}

impl Meta {
    /// Whether this variant was stored for requests with these selecting values.
    pub fn matches(&self, request_values: &[Option<Vec<u8>>]) -> bool {
        self.vary_values == request_values
    }

    fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        headers + self.tags.iter().map(String::len).sum::<usize>() + ENTRY_OVERHEAD
    }
}

/// A stored response.
#[derive(Debug)]
pub struct Entry {
    pub meta: Arc<Meta>,
    pub body: Bytes,
}

/// The variants stored under one primary key.
#[derive(Debug)]
pub struct Variants {
    pub entries: Vec<Arc<Entry>>,
    /// How long moka keeps this key from its last write.
    retain: Duration,
}

impl Variants {
    /// The newest variant whose Vary selecting headers match the request.
    pub fn select(&self, request: &HeaderMap) -> Option<&Arc<Entry>> {
        // Newest first: of several matching responses the most recent is used.
        self.entries.iter().rev().find(|entry| {
            let meta = &entry.meta;
            meta.vary_names.is_empty()
                || meta.matches(&super::key::vary_values(&meta.vary_names, request))
        })
    }

    fn weight(&self, key: &str) -> u32 {
        let total: usize = key.len()
            + self
                .entries
                .iter()
                .map(|e| e.body.len() + e.meta.weight())
                .sum::<usize>();
        u32::try_from(total).unwrap_or(u32::MAX)
    }
}

struct Retention;

impl moka::Expiry<String, Arc<Variants>> for Retention {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<Variants>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.retain)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &Arc<Variants>,
        _updated_at: Instant,
        _remaining: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.retain)
    }
}

/// A name (a tag, a URL) to the keys stored under it.
type KeyIndex = Arc<Mutex<HashMap<String, HashSet<String>>>>;

pub struct Store {
    entries: moka::sync::Cache<String, Arc<Variants>>,
    tags: KeyIndex,
    /// URL to the keys with added parts (route headers, plugin parts) stored
    /// for it, so a URL purge (and an unsafe method's invalidation) finds
    /// them without scanning the store.
    urls: KeyIndex,
}

impl Store {
    pub fn new(max_size: u64) -> Self {
        let tags: KeyIndex = Arc::default();
        let urls: KeyIndex = Arc::default();
        let listener_tags = Arc::clone(&tags);
        let listener_urls = Arc::clone(&urls);
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_size)
            .weigher(|key: &String, value: &Arc<Variants>| value.weight(key))
            .expire_after(Retention)
            .eviction_listener(move |key: Arc<String>, value: Arc<Variants>, cause| {
                if cause.was_evicted() {
                    let reason = if cause == RemovalCause::Size {
                        "size"
                    } else {
                        "expired"
                    };
                    metrics::counter!("larder_cache_evicted_total", "reason" => reason)
                        .increment(1);
                }
                if cause != RemovalCause::Replaced {
                    for tag in value.entries.iter().flat_map(|e| e.meta.tags.iter()) {
                        forget(&listener_tags, tag, &key);
                    }
                    if url_part(&key) != key.as_str() {
                        forget(&listener_urls, url_part(&key), &key);
                    }
                }
            })
            .build();
        Self {
            entries,
            tags,
            urls,
        }
    }

    pub fn get(&self, key: &str) -> Option<Arc<Variants>> {
        self.entries.get(key)
    }

    /// Stores `entry`, replacing the variant with the same selecting values.
    pub fn put(&self, key: &str, entry: Arc<Entry>, retain: Duration) {
        if key.contains(KEY_HEADER_SEPARATOR) {
            remember(&self.urls, url_part(key), key);
        }
        for tag in &entry.meta.tags {
            remember(&self.tags, tag, key);
        }
        self.entries.entry_by_ref(key).and_compute_with(|existing| {
            let existing = existing.map(|e| e.into_value());
            // Other variants keep at least the retention they had.
            let retain = existing
                .as_ref()
                .map_or(retain, |old| old.retain.max(retain));
            let mut list: Vec<Arc<Entry>> =
                existing.map(|old| old.entries.clone()).unwrap_or_default();
            // The newest response's Vary governs: variants selected by other
            // headers, and the one it replaces, go.
            list.retain(|old| {
                old.meta.vary_names == entry.meta.vary_names
                    && !old.meta.matches(&entry.meta.vary_values)
            });
            if list.len() >= MAX_VARIANTS {
                list.remove(0);
            }
            list.push(entry);
            Op::Put(Arc::new(Variants {
                entries: list,
                retain,
            }))
        });
    }

    /// Removes one stored variant (identified by pointer), e.g. after its
    /// revalidation produced something that may not be stored.
    pub fn remove_entry(&self, key: &str, stale: &Arc<Entry>) {
        self.entries.entry_by_ref(key).and_compute_with(|existing| {
            let Some(existing) = existing else {
                return Op::Nop;
            };
            let current = existing.into_value();
            let list: Vec<Arc<Entry>> = current
                .entries
                .iter()
                .filter(|e| !Arc::ptr_eq(e, stale))
                .cloned()
                .collect();
            if list.is_empty() {
                Op::Remove
            } else {
                Op::Put(Arc::new(Variants {
                    entries: list,
                    retain: current.retain,
                }))
            }
        });
    }

    /// Removes every variant under `key`; returns how many went.
    pub fn remove_key(&self, key: &str) -> usize {
        self.entries
            .remove(key)
            .map_or(0, |variants| variants.entries.len())
    }

    /// Removes the URL's entries, including those with route-added header
    /// values in their key. `url` must already be normalized.
    pub fn purge_url(&self, url: &str) -> usize {
        let with_parts = self.urls.lock().remove(url).unwrap_or_default();
        let removed: usize = with_parts.iter().map(|key| self.remove_key(key)).sum();
        removed + self.remove_key(url)
    }

    /// Removes entries whose URL starts with `prefix`; a prefix starting with
    /// `/` is matched against the path of every host.
    pub fn purge_prefix(&self, prefix: &str) -> usize {
        if prefix.starts_with('/') {
            self.remove_where(|key| path_part(url_part(key)).starts_with(prefix))
        } else {
            let prefix = lowercase_origin(prefix);
            self.remove_where(|key| url_part(key).starts_with(prefix.as_str()))
        }
    }

    /// Removes every variant tagged `tag`.
    pub fn purge_tag(&self, tag: &str) -> usize {
        let keys = self.tags.lock().remove(tag).unwrap_or_default();
        let mut removed = 0;
        for key in keys {
            self.entries
                .entry_by_ref(&key)
                .and_compute_with(|existing| {
                    let Some(existing) = existing else {
                        return Op::Nop;
                    };
                    let current = existing.into_value();
                    let (gone, kept): (Vec<_>, Vec<_>) = current
                        .entries
                        .iter()
                        .cloned()
                        .partition(|e| e.meta.tags.iter().any(|t| t == tag));
                    removed += gone.len();
                    if gone.is_empty() {
                        Op::Nop
                    } else if kept.is_empty() {
                        Op::Remove
                    } else {
                        Op::Put(Arc::new(Variants {
                            entries: kept,
                            retain: current.retain,
                        }))
                    }
                });
        }
        removed
    }

    /// Removes everything; returns how many variants went.
    pub fn purge_all(&self) -> usize {
        self.remove_where(|_| true)
    }

    fn remove_where(&self, doomed: impl Fn(&str) -> bool) -> usize {
        let keys: Vec<Arc<String>> = self
            .entries
            .iter()
            .filter(|(key, _)| doomed(key))
            .map(|(key, _)| key)
            .collect();
        keys.iter().map(|key| self.remove_key(key)).sum()
    }

    pub fn weighted_size(&self) -> u64 {
        self.entries.weighted_size()
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }

    pub fn run_pending_tasks(&self) {
        self.entries.run_pending_tasks();
    }

    /// Every key and its variants, for moving entries into a resized store.
    pub fn drain_into(&self, other: &Store) {
        for (key, variants) in self.entries.iter() {
            for entry in &variants.entries {
                other.put(&key, Arc::clone(entry), variants.retain);
            }
        }
    }
}

fn remember(index: &KeyIndex, name: &str, key: &str) {
    index
        .lock()
        .entry(name.to_string())
        .or_default()
        .insert(key.to_string());
}

fn forget(index: &KeyIndex, name: &str, key: &str) {
    let mut index = index.lock();
    if let Some(keys) = index.get_mut(name) {
        keys.remove(key);
        if keys.is_empty() {
            index.remove(name);
        }
    }
}

/// Lowercases the scheme and authority of a URL prefix, leaving the path alone.
fn lowercase_origin(prefix: &str) -> String {
    let Some((scheme, rest)) = prefix.split_once("://") else {
        return prefix.to_string();
    };
    let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
    format!(
        "{}://{}{}",
        scheme.to_ascii_lowercase(),
        authority.to_ascii_lowercase(),
        path
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn entry(tags: &[&str], body: usize) -> Arc<Entry> {
        Arc::new(Entry {
            meta: Arc::new(Meta {
                status: StatusCode::OK,
                headers: HeaderMap::new(),
                directives: ResponseDirectives::default(),
                timing: Timing::new(SystemTime::now(), SystemTime::now(), &HeaderMap::new()),
                lifetime: Duration::from_secs(60),
                vary_names: Vec::new(),
                vary_values: Vec::new(),
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::ZERO,
                tags: tags.iter().map(|t| t.to_string()).collect(),
            }),
            body: Bytes::from(vec![b'x'; body]),
        })
    }

    #[test]
    fn purges_by_url_prefix_and_tag() {
        let store = Store::new(1 << 20);
        let minute = Duration::from_secs(60);
        store.put("http://a/x/1", entry(&["t1"], 1), minute);
        store.put("http://a/x/2", entry(&["t2"], 1), minute);
        store.put("http://b/x/3\nx-tenant:blue", entry(&["t1"], 1), minute);
        store.put("http://b/y", entry(&[], 1), minute);
        assert_eq!(store.purge_tag("t1"), 2);
        assert_eq!(store.purge_tag("t1"), 0);
        assert_eq!(store.purge_prefix("/x/"), 1);
        assert_eq!(store.purge_url("http://b/y"), 1);
        assert!(store.get("http://b/y").is_none());
    }

    #[test]
    fn url_purge_reaches_header_keyed_entries() {
        let store = Store::new(1 << 20);
        let minute = Duration::from_secs(60);
        store.put("http://a/p\nx-tenant:blue", entry(&[], 1), minute);
        store.put("http://a/p\nx-tenant:red", entry(&[], 1), minute);
        store.put("http://a/pp", entry(&[], 1), minute);
        assert_eq!(store.purge_url("http://a/p"), 2);
        assert!(store.get("http://a/pp").is_some());
    }

    #[test]
    fn the_url_index_forgets_keys_that_left_the_store() {
        let store = Store::new(1 << 20);
        let minute = Duration::from_secs(60);
        store.put("http://a/p\nx-tenant:blue", entry(&[], 1), minute);
        assert_eq!(store.remove_key("http://a/p\nx-tenant:blue"), 1);
        store.run_pending_tasks();
        assert!(store.urls.lock().is_empty(), "the index follows the store");
        assert_eq!(store.purge_url("http://a/p"), 0);
    }

    #[test]
    fn weight_stays_under_the_bound() {
        let store = Store::new(64 * 1024);
        for i in 0..100 {
            store.put(
                &format!("http://a/{i}"),
                entry(&[], 4096),
                Duration::from_secs(60),
            );
        }
        store.run_pending_tasks();
        assert!(store.weighted_size() <= 64 * 1024);
        assert!(store.entry_count() > 0);
    }

    #[test]
    fn prefix_origin_is_case_insensitive() {
        assert_eq!(lowercase_origin("HTTP://A.com/Path"), "http://a.com/Path");
    }
}
