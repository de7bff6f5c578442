//! One source's schedule: a tokio task that waits for each tick of the rule
//! and starts a run, never two at once; a run fetches, retries with backoff
//! until shortly before the next tick, and swaps a new value in on success.
//!
//! Owns the `Slot` (value + run record) a source's readers see. Must not
//! block readers: the value is an `ArcSwapOption`, the record a short
//! mutex that is never held across an await.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use chrono::{DateTime, TimeDelta, Utc};
use parking_lot::{Mutex, MutexGuard};
use tokio::task::JoinHandle;

use super::provider::Provider;
use super::run::{Fetched, RunInput, SourceError};
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
    record: Mutex<RunRecord>,
}

/// The parts of a source's settings that readers need.
#[derive(Debug, Clone)]
pub struct Settings {
    pub kind: &'static str,
    pub rule: String,
    pub content_type: Option<String>,
    /// The fetcher plugin that feeds this source, for kind `plugin`.
    pub fetcher: Option<String>,
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
}

impl Slot {
    pub fn new(name: &str, settings: Settings) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_string(),
            value: ArcSwapOption::empty(),
            settings: ArcSwap::from_pointee(settings),
            next_run_ms: AtomicI64::new(i64::MIN),
            generation: AtomicU64::new(0),
            record: Mutex::new(RunRecord::default()),
        })
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

    fn lock_record(&self) -> MutexGuard<'_, RunRecord> {
        self.record.lock()
    }

    /// Starts a new generation for edited settings; returns its number.
    pub fn begin_generation(&self, settings: Settings) -> u64 {
        if let Some(value) = self.value.load_full() {
            // The content type may have changed: rebuild the headers, keep the bytes and times.
            let rebuilt = StoredValue::new(
                value.body.clone(),
                settings.content_type.as_deref(),
                value.changed_at,
            );
            self.value.store(Some(Arc::new(rebuilt)));
        }
        self.settings.store(Arc::new(settings));
        self.generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn is_current(&self, generation: u64) -> bool {
        self.generation.load(Ordering::SeqCst) == generation
    }

    fn update_age_gauge(&self) {
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
        if runner.run_on_start {
            current = Some(RunHandle(tokio::spawn(
                runner.clone().run_with_retries(Utc::now()),
            )));
        }
        let mut after = Utc::now();
        loop {
            let Some(tick) = runner.rule.next_after(after) else {
                runner.slot.set_next_run(None);
                tracing::warn!(source = %runner.slot.name, rule = %runner.rule.text(), "rule never fires again; source stops");
                return;
            };
            runner.slot.set_next_run(Some(tick));
            runner.wait_until(tick).await;
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
        let mut delay = FIRST_RETRY;
        loop {
            let error = match self.attempt(tick).await {
                Ok(()) => return,
                Err(error) => error,
            };
            if !error.is_retryable() {
                return;
            }
            let now = Utc::now();
            let retry_at = now + TimeDelta::from_std(delay + RETRY_MARGIN).unwrap_or_default();
            // The scheduler's next tick when it has been set, else the rule's.
            let next_tick = self
                .slot
                .next_run()
                .filter(|tick| *tick > now)
                .or_else(|| self.rule.next_after(now));
            if next_tick.is_some_and(|next| retry_at >= next) {
                return;
            }
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2);
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
                self.slot.value.store(Some(Arc::new(value)));
                self.record_outcome("ok", None);
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
