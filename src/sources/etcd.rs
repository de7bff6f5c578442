//! The `etcd` kind: a full in-memory copy of the keys below a prefix
//! (tailetc's idea), kept current by watching instead of polling.
//!
//! The copy is loaded at one revision (in pages), then a watch starts at
//! the next revision with progress notifications; only events newer than
//! what was seen are applied. A cancelled watch or a compaction means
//! events were lost: load again and watch again (etcd-io/etcd#8668). A
//! lost connection keeps the last good copy served, marks the mirror
//! degraded, and reconnects with backoff.
//!
//! Owns the mirror's task, its keys and its status record. Must not block
//! readers: each change builds a new `StoredValue` and swaps it into the slot.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{Client, ConnectOptions, GetOptions, KeyValue, WatchOptions, WatchResponse};
use tokio::task::JoinHandle;

use super::members::MemberSet;
use super::mirror::{self, Backoff, Resync};
use super::runner::Slot;
use crate::config::EtcdSource;

/// The largest reply taken from etcd (tonic's default is 4 MiB): a page of
/// large values or a big transaction's events must not stop the mirror.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// How long one page of the initial load may take.
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 pings on the connection: a server that stops answering (a
/// partition, a stopped process) ends the watch within interval + timeout.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// The mirror of one source: its settings, its slot, and its copy.
pub struct Mirror {
    config: EtcdSource,
    slot: Arc<Slot>,
    generation: u64,
    content_type: Option<String>,
    keys: MemberSet,
    /// The newest revision seen (load or event): older events are ignored.
    seen: i64,
}

impl Mirror {
    pub fn new(
        config: EtcdSource,
        slot: Arc<Slot>,
        generation: u64,
        content_type: Option<String>,
    ) -> Self {
        Self {
            keys: MemberSet::new(config.decode),
            config,
            slot,
            generation,
            content_type,
            seen: 0,
        }
    }

    pub fn spawn(self, runtime: &tokio::runtime::Handle) -> JoinHandle<()> {
        runtime.spawn(self.run())
    }

    /// Connects, loads, watches; on any failure keeps the copy and tries again.
    async fn run(mut self) {
        let mut backoff = Backoff::new();
        let mut resync = None;
        loop {
            if !self.slot.is_current(self.generation) {
                return;
            }
            let error = match self.connect().await {
                Ok(client) => self.session(client, &mut resync, &mut backoff).await,
                Err(error) => error,
            };
            mirror::degraded(&self.slot, "etcd", &error);
            resync = Some(Resync::Reconnect);
            backoff.wait().await;
        }
    }

    async fn connect(&self) -> Result<Client, String> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.config.connect_timeout.get())
            .with_keep_alive(KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true);
        if let Some(auth) = &self.config.auth {
            options = options.with_user(auth.user.clone(), auth.password.clone());
        }
        let connect = Client::connect(&self.config.endpoints, Some(options));
        match tokio::time::timeout(self.config.connect_timeout.get(), connect).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(error)) => Err(format!("connecting: {error}")),
            Err(_) => Err("connecting: timed out".to_string()),
        }
    }

    /// Watches from where the copy stops (after a reconnect, the copy in
    /// hand is resumed; otherwise the prefix is loaded first) and applies
    /// the events; loads again when the watch lost events. Returns why the
    /// connection failed.
    async fn session(
        &mut self,
        mut client: Client,
        resync: &mut Option<Resync>,
        backoff: &mut Backoff,
    ) -> String {
        let mut resume = self.seen > 0;
        loop {
            let revision = if resume {
                self.seen
            } else {
                match self.load(&mut client).await {
                    Ok(revision) => revision,
                    Err(error) => return error,
                }
            };
            resume = false;
            let options = WatchOptions::new()
                .with_range(range_end(&self.config.prefix))
                .with_start_revision(revision + 1)
                .with_progress_notify();
            let mut watch_client = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
            let mut stream = match watch_client.watch(self.prefix(), Some(options)).await {
                Ok(stream) => stream,
                Err(error) => return format!("starting the watch: {error}"),
            };
            let reason = loop {
                if !self.slot.is_current(self.generation) {
                    return "the source was changed or removed".to_string();
                }
                let response = match stream.message().await {
                    Ok(Some(response)) => response,
                    Ok(None) => return "the watch stream ended".to_string(),
                    Err(error) => return format!("watching: {error}"),
                };
                let behind = response
                    .header()
                    .is_some_and(|header| header.revision() < self.seen);
                if response.created() && behind {
                    // A store with fewer revisions than the copy: etcd was
                    // restored or replaced, and the events after its revision
                    // are not the copy's. Load again.
                    break Resync::Reconnect;
                }
                if response.created() && !response.canceled() {
                    if let Some(reason) = resync.take() {
                        mirror::count_resync(&self.slot, reason);
                    }
                    mirror::connected(&self.slot, "etcd", self.keys.len());
                }
                if let Some(reason) = self.apply(&response) {
                    break reason;
                }
                if !response.created() {
                    // Events or a progress notification: the watch works.
                    backoff.reset();
                }
            };
            tracing::info!(source = %self.slot.name, reason = reason.label(), "etcd watch lost events; loading the prefix again");
            if reason != Resync::Compaction {
                // A cancel that keeps coming back (a permission, a member
                // that stays behind) must not become a loop of full loads.
                backoff.wait().await;
            }
            *resync = Some(reason);
        }
    }

    fn prefix(&self) -> Vec<u8> {
        if self.config.prefix.is_empty() {
            vec![0]
        } else {
            self.config.prefix.as_bytes().to_vec()
        }
    }

    /// Reads every key below the prefix at one revision, page by page, and
    /// installs the copy; returns that revision.
    async fn load(&mut self, client: &mut Client) -> Result<i64, String> {
        let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
        let prefix = self.prefix();
        let range_end = range_end(&self.config.prefix);
        let mut revision = 0;
        let mut from = prefix;
        let mut loaded = MemberSet::new(self.config.decode);
        loop {
            let mut options = GetOptions::new()
                .with_range(range_end.clone())
                .with_limit(i64::from(self.config.page_size));
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let page = tokio::time::timeout(LOAD_TIMEOUT, kv.get(from.clone(), Some(options)))
                .await
                .map_err(|_| "loading the prefix: timed out".to_string())?
                .map_err(|error| format!("loading the prefix: {error}"))?;
            if revision == 0 {
                revision = page.header().map_or(0, |header| header.revision());
            }
            for kv in page.kvs() {
                let key = self.member_name(kv.key());
                loaded.insert(key, value_of(kv), Some(kv.mod_revision()));
            }
            match page.kvs().last() {
                Some(last) if page.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        self.keys = loaded;
        self.seen = revision;
        mirror::loaded(&self.slot, self.keys.len(), Some(revision));
        self.publish(revision);
        Ok(revision)
    }

    /// Applies one watch response; `Some` when the copy must be loaded again.
    fn apply(&mut self, response: &WatchResponse) -> Option<Resync> {
        if response.compact_revision() > 0 {
            tracing::warn!(source = %self.slot.name, compacted_to = response.compact_revision(), "etcd compacted the revisions this watch needed");
            return Some(Resync::Compaction);
        }
        if response.canceled() {
            tracing::warn!(source = %self.slot.name, reason = %response.cancel_reason(), "etcd cancelled the watch");
            return Some(Resync::Cancel);
        }
        let mut applied = 0;
        let mut newest = self.seen;
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            if kv.mod_revision() <= self.seen {
                continue;
            }
            let key = self.member_name(kv.key());
            // A deletion's kv has version 0 (etcd resets it); every put has
            // a version of 1 or more. (Asking the event its type panics on
            // a type this client does not know.)
            if kv.version() == 0 {
                self.keys.remove(&key);
            } else {
                self.keys.insert(key, value_of(kv), Some(kv.mod_revision()));
            }
            newest = newest.max(kv.mod_revision());
            applied += 1;
        }
        self.seen = newest;
        // A progress notification (no events) says the copy is current at its
        // revision. Recorded before the value shows, so a reader woken by the
        // change sees it counted.
        let header_revision = response.header().map_or(0, |header| header.revision());
        let current = header_revision.max(self.seen);
        mirror::applied(&self.slot, applied, self.keys.len(), Some(current));
        if applied > 0 {
            self.publish(newest);
        }
        None
    }

    /// The key below the prefix, as a member's name; a `/` left after a
    /// prefix written without one (`/flags` for `/flags/a`) is dropped, so
    /// the member reads as `<route>/a`.
    fn member_name(&self, key: &[u8]) -> String {
        let below = key
            .strip_prefix(self.config.prefix.as_bytes())
            .unwrap_or(key);
        let below = match self.config.prefix.ends_with('/') {
            true => below,
            false => below.strip_prefix(b"/").unwrap_or(below),
        };
        String::from_utf8_lossy(below).into_owned()
    }

    /// Builds the whole object and swaps it in (unless its bytes are the
    /// ones served already), versioned by `revision`.
    fn publish(&self, revision: i64) {
        if !self.slot.is_current(self.generation) {
            return;
        }
        let value = self
            .keys
            .value(self.content_type.as_deref(), Some(revision));
        let previous = self.slot.value.load_full();
        if previous.is_some_and(|old| old.body == value.body) {
            // A reload that found what is served: same ETag, nobody woken.
            return;
        }
        self.slot.set_value(value, true);
        self.slot.update_age_gauge();
    }
}

fn value_of(kv: &KeyValue) -> Bytes {
    Bytes::copy_from_slice(kv.value())
}

/// The end of the key range of `prefix` (etcd's "prefix end"): the prefix
/// with its last byte below 0xff incremented and what follows dropped;
/// `\0` (every key) when there is no such byte.
fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_end_of_a_prefix_covers_exactly_the_keys_below_it() {
        assert_eq!(range_end("/flags/"), b"/flags0".to_vec());
        assert_eq!(range_end("a"), b"b".to_vec());
        assert_eq!(range_end(""), vec![0]);
    }
}
