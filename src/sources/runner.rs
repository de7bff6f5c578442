//! One source's schedule: a tokio task that waits for each tick of the rule
//! and starts a run, never two at once; a run fetches, retries with backoff
//! until shortly before the next tick, and swaps a new value in on success.
//! With a shared store (`shared`), a run first claims its tick: the winner
//! fetches and publishes, the others wait for its value and install it.
//!
//! Owns the `Slot` (value + run record) a source's readers see. Must not
//! block readers: the value is an `ArcSwapOption`, the record a short
//! mutex that is never held across an await.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use chrono::{DateTime, TimeDelta, Utc};
use parking_lot::{Mutex, MutexGuard};
use tokio::task::JoinHandle;

use super::provider::Provider;
use super::run::{Fetched, RunInput, SourceError};
use super::shared::{SharedHandle, SharedValue};
use super::value::StoredValue;
use super::{FetcherView, Slots};
use crate::plugins::PluginHost;
use crate::schedule::Rule;

/// The first retry waits this long; each next one twice as long.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// A retry is not started if it would begin this close to the next tick.
const RETRY_MARGIN: Duration = Duration::from_millis(500);
/// The value-age gauge is refreshed at least this often while waiting.
const GAUGE_REFRESH: Duration = Duration::from_secs(15);
/// A claim outlives its tick's period by this much, so an instance whose
/// clock is a little behind cannot claim the same tick again.
const CLAIM_SKEW: Duration = Duration::from_secs(10);
/// An instance waiting for another's value looks this often even without
/// a message (messages can be lost).
const FOLLOW_POLL: Duration = Duration::from_millis(500);

/// What a source shows to readers; shared by the scheduler, its runs and
/// `Sources`. Survives edits of the source (a reload keeps the value).
pub struct Slot {
    pub name: String,
    pub value: ArcSwapOption<StoredValue>,
    pub settings: ArcSwap<Settings>,
    /// Unix milliseconds of the next tick; `i64::MIN` when there is none.
    next_run_ms: AtomicI64,
    /// Bumped on every edit, so a run of the old settings cannot commit.
    generation: AtomicU64,
    /// The tick (Unix ms) of the shared value this one is, `i64::MIN` when
    /// none: an older one is never installed over it.
    shared_tick: AtomicI64,
    record: Mutex<RunRecord>,
    /// Woken when the value changes: what waiting readers park on.
    changed: tokio::sync::Notify,
    /// Set when the source is removed or Larder shuts down: waiting
    /// readers are answered at once.
    waits_ended: AtomicBool,
}

/// The parts of a source's settings that readers need.
#[derive(Debug, Clone)]
pub struct Settings {
    pub kind: &'static str,
    pub rule: String,
    pub content_type: Option<String>,
    /// The fetcher plugin that feeds this source, for kind `plugin`.
    pub fetcher: Option<String>,
    /// Watched or mirrored: the value changes at any moment, not on ticks.
    pub live: bool,
}

/// Counters and last results for `GET /sources`.
#[derive(Debug, Default, Clone)]
pub struct RunRecord {
    pub last_success: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub runs: u64,
    pub failures: u64,
    pub skipped: u64,
    pub not_modified: u64,
    /// Values another instance fetched and this one installed.
    pub installed: u64,
    /// Reloads of a watched file.
    pub file_changes: u64,
    /// A mirror's connection and progress (kind `etcd`).
    pub mirror: Option<MirrorRecord>,
}

/// A mirror's state for `GET /sources`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MirrorRecord {
    /// Holds a current copy and a live watch or subscription.
    pub connected: bool,
    /// The revision the copy is current at (etcd; progress notifications advance it).
    pub revision: Option<i64>,
    pub keys: usize,
    /// Changes applied (etcd events newer than the copy, Redis messages).
    pub events: u64,
    pub resyncs_compaction: u64,
    pub resyncs_cancel: u64,
    pub resyncs_reconnect: u64,
    pub resyncs_reread: u64,
    pub last_event: Option<DateTime<Utc>>,
}

impl MirrorRecord {
    pub fn status(&self, now: DateTime<Utc>) -> serde_json::Value {
        serde_json::json!({
            "state": if self.connected { "connected" } else { "degraded" },
            "revision": self.revision,
            "keys": self.keys,
            "events_applied": self.events,
            "resyncs": {
                "compaction": self.resyncs_compaction,
                "cancel": self.resyncs_cancel,
                "reconnect": self.resyncs_reconnect,
                "reread": self.resyncs_reread,
            },
            "last_event_age_seconds": self.last_event.map(|at| (now - at).num_milliseconds().max(0) as f64 / 1000.0),
        })
    }
}

impl Slot {
    pub fn new(name: &str, settings: Settings) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_string(),
            value: ArcSwapOption::empty(),
            settings: ArcSwap::from_pointee(settings),
            next_run_ms: AtomicI64::new(i64::MIN),
            generation: AtomicU64::new(0),
            shared_tick: AtomicI64::new(i64::MIN),
            record: Mutex::new(RunRecord::default()),
            changed: tokio::sync::Notify::new(),
            waits_ended: AtomicBool::new(false),
        })
    }

    /// Answers every waiting reader now (and any later one at once).
    pub fn end_waits(&self) {
        self.waits_ended.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    pub fn waits_ended(&self) -> bool {
        self.waits_ended.load(Ordering::SeqCst)
    }

    /// Swaps `value` in; readers waiting for a change are woken when its
    /// bytes differ from the last value's.
    pub fn set_value(&self, value: StoredValue, changed: bool) {
        self.value.store(Some(Arc::new(value)));
        if changed {
            self.changed.notify_waiters();
        }
    }

    /// Resolves at the next change of the value. Enable it (or poll it
    /// once) before looking at the value, so a change in between is not missed.
    pub fn next_change(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    pub fn next_run(&self) -> Option<DateTime<Utc>> {
        match self.next_run_ms.load(Ordering::Relaxed) {
            i64::MIN => None,
            millis => DateTime::from_timestamp_millis(millis),
        }
    }

    fn set_next_run(&self, next: Option<DateTime<Utc>>) {
        let millis = next.map_or(i64::MIN, |t| t.timestamp_millis());
        self.next_run_ms.store(millis, Ordering::Relaxed);
    }

    pub fn record(&self) -> RunRecord {
        self.lock_record().clone()
    }

    pub fn lock_record(&self) -> MutexGuard<'_, RunRecord> {
        self.record.lock()
    }

    /// Starts a new generation for edited settings; returns its number.
    pub fn begin_generation(&self, settings: Settings) -> u64 {
        if let Some(value) = self.value.load_full() {
            // The content type may have changed: rebuild the headers, keep the bytes and times.
            let rebuilt = value.with_content_type(settings.content_type.as_deref());
            self.value.store(Some(Arc::new(rebuilt)));
        }
        self.settings.store(Arc::new(settings));
        self.generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn is_current(&self, generation: u64) -> bool {
        self.generation.load(Ordering::SeqCst) == generation
    }

    pub fn update_age_gauge(&self) {
        if let Some(value) = self.value.load().as_ref() {
            let age = (Utc::now() - value.changed_at).num_milliseconds().max(0) as f64 / 1000.0;
            metrics::gauge!("larder_source_value_age_seconds", "source" => self.name.clone())
                .set(age);
        }
    }
}

/// Everything a source's task needs.
pub struct Runner {
    pub slot: Arc<Slot>,
    pub rule: Rule,
    pub provider: Arc<Provider>,
    pub plugins: Arc<PluginHost>,
    /// Every source's slot: what a fetcher's view reads.
    pub slots: Arc<Slots>,
    pub timeout: Duration,
    pub run_on_start: bool,
    pub generation: u64,
    /// The store shared with other instances, when there is one and this
    /// source uses it (then `rule` is aligned: every instance names a run
    /// by the same tick).
    pub shared: Option<Arc<SharedHandle>>,
    /// A file whose changes start a run too (`file.watch`).
    pub watch: Option<std::path::PathBuf>,
}

/// What ended a wait in the schedule.
enum Woken {
    Tick,
    FileChanged,
    WatchEnded,
}

/// How a run in shared mode begins.
enum Claim {
    /// This instance fetches the tick and publishes the value.
    Won(Arc<SharedHandle>),
    /// Another instance fetches it.
    Lost(Arc<SharedHandle>),
    /// The store did not answer: fetch here, publish if it is back by then.
    Unanswered(Arc<SharedHandle>),
}

/// Aborts the run it holds when dropped, so stopping the schedule stops its run.
struct RunHandle(JoinHandle<()>);

impl Drop for RunHandle {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Runner {
    /// Spawns the schedule; aborting the returned handle stops it and its run.
    pub fn spawn(self, runtime: &tokio::runtime::Handle) -> JoinHandle<()> {
        runtime.spawn(self.schedule())
    }

    async fn schedule(self) {
        let runner = Arc::new(self);
        let mut current: Option<RunHandle> = None;
        if let Some(shared) = &runner.shared {
            // What the cluster fetched already: a cluster that starts
            // together fetches each source once, not once per instance.
            runner.install_stored(shared).await;
        }
        if let Some(tick) = runner.start_tick() {
            current = Some(RunHandle(tokio::spawn(
                runner.clone().run_with_retries(tick),
            )));
        }
        let mut watch = runner.watch_file();
        let mut after = Utc::now();
        loop {
            let Some(tick) = runner.rule.next_after(after) else {
                runner.slot.set_next_run(None);
                if let Some((_, changes)) = &mut watch {
                    // No more ticks, but the file is still watched.
                    if changes.next().await {
                        current = Some(runner.clone().run_for_file_change(current.take()).await);
                        continue;
                    }
                }
                tracing::warn!(source = %runner.slot.name, rule = %runner.rule.text(), "rule never fires again; source stops");
                return;
            };
            runner.slot.set_next_run(Some(tick));
            let woken = match &mut watch {
                Some((_, changes)) => tokio::select! {
                    () = runner.wait_until(tick) => Woken::Tick,
                    alive = changes.next() => if alive { Woken::FileChanged } else { Woken::WatchEnded },
                },
                None => {
                    runner.wait_until(tick).await;
                    Woken::Tick
                }
            };
            match woken {
                Woken::Tick => {}
                Woken::FileChanged => {
                    // The tick is still ahead: the loop waits for it again.
                    current = Some(runner.clone().run_for_file_change(current.take()).await);
                    continue;
                }
                Woken::WatchEnded => {
                    watch = None;
                    continue;
                }
            }
            // Catch up without a burst when the process was suspended.
            let now = Utc::now();
            after = if now - tick > TimeDelta::seconds(1) {
                now
            } else {
                tick
            };
            if current.as_ref().is_some_and(|run| !run.0.is_finished()) {
                runner.record_skipped();
                continue;
            }
            current = Some(RunHandle(tokio::spawn(
                runner.clone().run_with_retries(tick),
            )));
        }
    }

    /// The watch on the source's file, when it asks for one; a file that
    /// cannot be watched is still read on the rule's ticks.
    fn watch_file(&self) -> Option<(crate::watch::FileWatch, crate::watch::Changes)> {
        let path = self.watch.as_ref()?;
        match crate::watch::file(path) {
            Ok(watch) => Some(watch),
            Err(error) => {
                tracing::warn!(source = %self.slot.name, path = %path.display(), %error, "cannot watch the file; it is read on the rule's ticks only");
                None
            }
        }
    }

    /// A run for a change of the watched file, in place of the run in
    /// progress: that one may have read the file before the change, or be
    /// waiting to retry a file that was missing until now.
    async fn run_for_file_change(self: Arc<Self>, running: Option<RunHandle>) -> RunHandle {
        if let Some(mut run) = running {
            run.0.abort();
            // Wait for it to be gone, so it cannot store a value after ours.
            let _ = (&mut run.0).await;
        }
        self.slot.lock_record().file_changes += 1;
        metrics::counter!("larder_source_file_changes_total", "source" => self.slot.name.clone())
            .increment(1);
        tracing::debug!(source = %self.slot.name, "watched file changed; reading it");
        RunHandle(tokio::spawn(self.run_with_retries(Utc::now())))
    }

    /// The tick of the run at start, if one is due. Alone: now. Shared: the
    /// rule's last firing, unless the stored value is of that tick already.
    fn start_tick(&self) -> Option<DateTime<Utc>> {
        if !self.run_on_start {
            return None;
        }
        let now = Utc::now();
        if self.shared.is_none() {
            return Some(now);
        }
        let tick = self.rule.last_at_or_before(now).unwrap_or(now);
        let installed = self.slot.shared_tick.load(Ordering::Acquire);
        (installed < tick.timestamp_millis()).then_some(tick)
    }

    /// Sleeps until the wall clock reaches `tick`, refreshing the age gauge.
    async fn wait_until(&self, tick: DateTime<Utc>) {
        loop {
            let remaining = (tick - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            if remaining.is_zero() {
                return;
            }
            tokio::time::sleep(remaining.min(GAUGE_REFRESH)).await;
            self.slot.update_age_gauge();
        }
    }

    /// One run: attempts with exponential backoff while the next tick is far enough.
    async fn run_with_retries(self: Arc<Self>, tick: DateTime<Utc>) {
        let publish_to = match self.claim(tick).await {
            None => None,
            Some(Claim::Won(shared) | Claim::Unanswered(shared)) => Some(shared),
            Some(Claim::Lost(shared)) => {
                if self.follow(&shared, tick).await {
                    return;
                }
                // The store went away while waiting: fetch here.
                Some(shared)
            }
        };
        let mut delay = FIRST_RETRY;
        loop {
            let error = match self.attempt(tick).await {
                Ok(()) => {
                    if let Some(shared) = &publish_to {
                        self.publish(shared, tick).await;
                    }
                    return;
                }
                Err(error) => error,
            };
            if !error.is_retryable() {
                return;
            }
            let now = Utc::now();
            let retry_at = now + TimeDelta::from_std(delay + RETRY_MARGIN).unwrap_or_default();
            if self.next_tick(now).is_some_and(|next| retry_at >= next) {
                return;
            }
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2);
        }
    }

    /// The scheduler's next tick when it has been set, else the rule's.
    fn next_tick(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.slot
            .next_run()
            .filter(|tick| *tick > now)
            .or_else(|| self.rule.next_after(now))
    }

    /// Claims `tick` in the shared store; `None` when this source is not shared.
    async fn claim(&self, tick: DateTime<Utc>) -> Option<Claim> {
        let shared = self.shared.clone()?;
        let next = self.rule.next_after(tick).unwrap_or(tick);
        let hold = (next - tick).to_std().unwrap_or_default() + CLAIM_SKEW;
        let claimed = shared
            .store
            .claim(&self.slot.name, tick.timestamp_millis(), hold)
            .await;
        let (claim, label) = match claimed {
            Ok(true) => (Claim::Won(shared), "won"),
            Ok(false) => (Claim::Lost(shared), "lost"),
            Err(_) => (Claim::Unanswered(shared), "unavailable"),
        };
        metrics::counter!("larder_shared_source_claims_total", "source" => self.slot.name.clone(), "result" => label)
            .increment(1);
        Some(claim)
    }

    /// Waits for the value another instance fetches for `tick` and installs
    /// it; gives up shortly before the next tick (keeping the value it has).
    /// False when the store stopped answering, so this instance fetches.
    async fn follow(&self, shared: &SharedHandle, tick: DateTime<Utc>) -> bool {
        let name = &self.slot.name;
        let deadline = match self.next_tick(tick) {
            Some(next) => next - TimeDelta::from_std(RETRY_MARGIN).unwrap_or_default(),
            None => tick + TimeDelta::from_std(self.timeout + CLAIM_SKEW).unwrap_or_default(),
        };
        let published = shared.store.published(name);
        loop {
            let message = published.notified();
            tokio::pin!(message);
            message.as_mut().enable();
            match shared.store.read(name).await {
                Ok(Some((stored, record))) if stored >= tick.timestamp_millis() => {
                    self.install(stored, record);
                    return true;
                }
                Ok(_) => {}
                Err(_) => {
                    tracing::debug!(source = %name, "shared store unavailable while waiting for another instance's value; fetching here");
                    return false;
                }
            }
            let left = (deadline - Utc::now()).to_std().unwrap_or_default();
            if left.is_zero() {
                tracing::debug!(source = %name, tick = %tick, "the instance that claimed this tick published no value; the last one is kept");
                return true;
            }
            tokio::select! {
                () = &mut message => {}
                () = tokio::time::sleep(left.min(FOLLOW_POLL)) => {}
            }
        }
    }

    /// Installs the stored value at start (before any run).
    async fn install_stored(&self, shared: &SharedHandle) {
        if let Ok(Some((tick, record))) = shared.store.read(&self.slot.name).await {
            self.install(tick, record);
        }
    }

    /// Installs another instance's value for `tick`, unless this one holds
    /// the value of that tick or a later one.
    fn install(&self, tick: i64, record: bytes::Bytes) {
        let name = &self.slot.name;
        let Some(shared) = SharedValue::decode(record) else {
            tracing::warn!(source = %name, "the shared value of this source is not a record this version reads; ignored");
            return;
        };
        if !self.slot.is_current(self.generation) {
            return;
        }
        if self.slot.shared_tick.fetch_max(tick, Ordering::AcqRel) >= tick {
            return;
        }
        let previous = self.slot.value.load_full();
        let settings = self.slot.settings.load();
        let content_type = settings
            .content_type
            .as_deref()
            .or(shared.content_type.as_deref());
        let (mut value, changed) = StoredValue::next(
            previous.as_deref(),
            shared.body,
            content_type,
            shared.changed_at,
        );
        value.fetcher_headers = shared.fetcher_headers;
        value.fetched_by = Some(Arc::from(shared.fetched_by.as_str()));
        metrics::counter!("larder_shared_source_installs_total", "source" => name.clone())
            .increment(1);
        {
            // Recorded before the value shows, so a reader woken by it sees the record too.
            let mut record = self.slot.lock_record();
            record.installed += 1;
            record.last_success = Some(Utc::now());
            record.last_error = None;
        }
        self.slot.set_value(value, changed);
        self.slot.update_age_gauge();
        if changed {
            tracing::info!(source = %name, fetched_by = %shared.fetched_by, "source updated from another instance");
        }
    }

    /// Publishes this instance's value for `tick`; if a later tick's value
    /// is stored already, installs that one instead.
    async fn publish(&self, shared: &SharedHandle, tick: DateTime<Utc>) {
        if !self.slot.is_current(self.generation) {
            // The settings changed during the run: the value is not this run's.
            return;
        }
        let Some(value) = self.slot.value.load_full() else {
            return;
        };
        let record = SharedValue {
            fetched_by: shared.store.instance().to_string(),
            changed_at: value.changed_at,
            content_type: Some(value.content_type().to_string()),
            fetcher_headers: value.fetcher_headers.clone(),
            body: value.body.clone(),
        };
        let tick = tick.timestamp_millis();
        let name = &self.slot.name;
        match shared.store.publish(name, tick, record.encode()).await {
            Ok(true) => {
                self.slot.shared_tick.fetch_max(tick, Ordering::AcqRel);
            }
            Ok(false) => {
                tracing::debug!(source = %name, "a later tick's value is stored; installing it instead of this one");
                if let Ok(Some((stored, record))) = shared.store.read(name).await {
                    self.install(stored, record);
                }
            }
            Err(_) => {
                tracing::debug!(source = %name, "shared store unavailable; the value stays on this instance");
            }
        }
    }

    async fn attempt(&self, tick: DateTime<Utc>) -> Result<(), SourceError> {
        let name = &self.slot.name;
        let previous = self.slot.value.load_full();
        let fetcher = self.slot.settings.load().fetcher.clone();
        let input = RunInput {
            source: name,
            scheduled_at: tick.timestamp().max(0) as u64,
            previous_etag: previous.as_ref().map(|v| v.etag().to_string()),
            plugins: &self.plugins,
            values: Arc::new(FetcherView {
                slots: self.slots.clone(),
                plugin: fetcher.unwrap_or_default(),
            }),
        };
        let started = Instant::now();
        let result = self.provider.fetch(input, self.timeout).await;
        let elapsed = started.elapsed();
        metrics::histogram!("larder_source_run_duration_seconds", "source" => name.clone())
            .record(elapsed.as_secs_f64());
        if !self.slot.is_current(self.generation) {
            // Settings changed while this run was in flight; its result is for the old ones.
            return Ok(());
        }
        match result {
            Ok(Fetched::Updated {
                body,
                content_type,
                headers,
            }) => {
                let settings = self.slot.settings.load();
                let content_type = settings.content_type.as_deref().or(content_type.as_deref());
                let bytes = body.len();
                let (mut value, changed) =
                    StoredValue::next(previous.as_deref(), body, content_type, Utc::now());
                value.fetcher_headers = headers;
                value.fetched_by = self
                    .shared
                    .as_ref()
                    .map(|shared| Arc::from(shared.store.instance()));
                // Recorded before the value shows, so a reader woken by it sees the run too.
                self.record_outcome("ok", None);
                self.slot.set_value(value, changed);
                self.slot.update_age_gauge();
                let duration_ms = elapsed.as_millis() as u64;
                if changed {
                    tracing::info!(source = %name, bytes, duration_ms, "source updated");
                } else {
                    // Every-second sources would flood INFO with identical values.
                    tracing::debug!(source = %name, bytes, duration_ms, "source fetched; value unchanged");
                }
                Ok(())
            }
            Ok(Fetched::NotModified) => {
                self.record_outcome("not_modified", None);
                self.slot.update_age_gauge();
                tracing::debug!(source = %name, duration_ms = elapsed.as_millis() as u64, "source not modified");
                Ok(())
            }
            Err(SourceError::NoProvider) => {
                // cachepump: `Source with name %q is not supported`, on every firing.
                tracing::warn!(source = %name, "source \"{name}\" has no supported provider");
                self.record_outcome("error", Some(SourceError::NoProvider.to_string()));
                Err(SourceError::NoProvider)
            }
            Err(error) => {
                tracing::warn!(source = %name, error = %error, kept_value = previous.is_some(), "source run failed");
                self.record_outcome("error", Some(error.to_string()));
                Err(error)
            }
        }
    }

    fn record_outcome(&self, outcome: &'static str, error: Option<String>) {
        metrics::counter!("larder_source_runs_total", "source" => self.slot.name.clone(), "outcome" => outcome)
            .increment(1);
        let mut record = self.slot.lock_record();
        record.runs += 1;
        match error {
            Some(error) => {
                record.failures += 1;
                record.last_error = Some(error);
            }
            None => {
                record.last_success = Some(Utc::now());
                record.last_error = None;
                if outcome == "not_modified" {
                    record.not_modified += 1;
                }
            }
        }
    }

    fn record_skipped(&self) {
        metrics::counter!("larder_source_runs_total", "source" => self.slot.name.clone(), "outcome" => "skipped")
            .increment(1);
        self.slot.lock_record().skipped += 1;
        tracing::debug!(source = %self.slot.name, "previous run still going; tick skipped");
    }
}
