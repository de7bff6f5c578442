//! What the mirror kinds (`etcd`, `redis`) share: the reasons they read
//! their store again, their reconnect backoff, and how
//! connecting, degrading and applying changes show in the slot's record,
//! the metrics and the log.
//!
//! Must not talk to a store: each kind's module does.

use std::time::Duration;

use chrono::Utc;

use super::runner::Slot;

/// The first reconnect waits this long; each next one twice as long.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(3);

/// Why a mirror read its store again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resync {
    /// The revision to watch from was compacted away (etcd).
    Compaction,
    /// The server cancelled the watch (etcd).
    Cancel,
    /// The connection was lost (or never made), and is back.
    Reconnect,
    /// A periodic re-read found a change no message announced (Redis).
    Reread,
}

impl Resync {
    pub fn label(self) -> &'static str {
        match self {
            Self::Compaction => "compaction",
            Self::Cancel => "cancel",
            Self::Reconnect => "reconnect",
            Self::Reread => "reread",
        }
    }
}

/// Waits between reconnects: 0.2 s doubling to 3 s, reset once connected.
pub struct Backoff(Duration);

impl Backoff {
    pub fn new() -> Self {
        Self(FIRST_BACKOFF)
    }

    pub fn reset(&mut self) {
        self.0 = FIRST_BACKOFF;
    }

    pub async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
    }
}

/// The mirror of `slot` is current and listening to its store (`store`
/// names it in the log).
pub fn connected(slot: &Slot, store: &str, keys: usize) {
    let name = &slot.name;
    metrics::gauge!("larder_source_mirror_connected", "source" => name.clone()).set(1.0);
    let mut record = slot.lock_record();
    let was_connected = record.mirror.as_ref().is_some_and(|m| m.connected);
    record.last_success = Some(Utc::now());
    record.last_error = None;
    let mirror = record.mirror.get_or_insert_default();
    mirror.connected = true;
    mirror.keys = keys;
    let revision = mirror.revision;
    drop(record);
    if !was_connected {
        tracing::info!(source = %name, store, ?revision, keys, "mirror current; listening for changes");
    }
}

/// The mirror of `slot` lost its store: the last copy stays served.
pub fn degraded(slot: &Slot, store: &str, error: &str) {
    let name = &slot.name;
    metrics::gauge!("larder_source_mirror_connected", "source" => name.clone()).set(0.0);
    let mut record = slot.lock_record();
    let was_connected = record.mirror.as_ref().is_none_or(|m| m.connected);
    if record.last_error.as_deref() != Some(error) {
        record.failures += 1;
    }
    record.last_error = Some(error.to_string());
    record.mirror.get_or_insert_default().connected = false;
    drop(record);
    if was_connected {
        tracing::warn!(source = %name, store, error, kept_value = slot.value.load().is_some(), "mirror degraded; serving the last copy and reconnecting");
    } else {
        tracing::debug!(source = %name, store, error, "mirror's store still unreachable");
    }
}

pub fn count_resync(slot: &Slot, reason: Resync) {
    metrics::counter!("larder_source_mirror_resyncs_total", "source" => slot.name.clone(), "reason" => reason.label())
        .increment(1);
    let mut record = slot.lock_record();
    let mirror = record.mirror.get_or_insert_default();
    match reason {
        Resync::Compaction => mirror.resyncs_compaction += 1,
        Resync::Cancel => mirror.resyncs_cancel += 1,
        Resync::Reconnect => mirror.resyncs_reconnect += 1,
        Resync::Reread => mirror.resyncs_reread += 1,
    }
}

/// `events` changes were applied; the copy holds `keys` keys and (etcd) is
/// current at `revision`.
pub fn applied(slot: &Slot, events: u64, keys: usize, revision: Option<i64>) {
    if events > 0 {
        metrics::counter!("larder_source_mirror_events_total", "source" => slot.name.clone())
            .increment(events);
    }
    let mut record = slot.lock_record();
    let mirror = record.mirror.get_or_insert_default();
    mirror.events += events;
    if events > 0 {
        mirror.last_event = Some(Utc::now());
    }
    mirror.keys = keys;
    if let Some(revision) = revision {
        let current = mirror.revision.unwrap_or(0).max(revision);
        mirror.revision = Some(current);
        metrics::gauge!("larder_source_mirror_revision", "source" => slot.name.clone())
            .set(current as f64);
    }
}

/// A load of the whole store: counted as a run.
pub fn loaded(slot: &Slot, keys: usize, revision: Option<i64>) {
    let mut record = slot.lock_record();
    record.runs += 1;
    let mirror = record.mirror.get_or_insert_default();
    mirror.keys = keys;
    if revision.is_some() {
        mirror.revision = revision;
    }
    drop(record);
    if let Some(revision) = revision {
        metrics::gauge!("larder_source_mirror_revision", "source" => slot.name.clone())
            .set(revision as f64);
    }
}
