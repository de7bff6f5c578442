//! One call's sandbox: what a `Store` holds and grants (WASI with nothing
//! granted, the memory limiter under the plugin's cap and the process-wide
//! budget, the CPU meter, the http-client grant, the fetcher's view of its
//! values), made fresh per store and reset between calls of a reused one.
//!
//! Must not grant a guest files, environment, arguments or sockets.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime::{Engine, ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::SourceValues;
use super::exchange::Exchange;
use super::http_client::HttpGrant;
use super::output::{GuestOutput, OutputKind};

/// How often the engine's epoch advances while a guest runs (the engine's
/// ticker thread moves it): the granularity of every CPU limit, and the
/// longest a running guest keeps a runtime thread from other requests
/// before it yields.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// The longest the ticker sleeps when no guest code was running at its
/// last tick. Waking a thread every millisecond for nothing costs a busy proxy
/// about 3% of its cache hits through a reused plugin (two context switches
/// and a timer interrupt each time, on the one core it runs on).
const IDLE_TICK_MAX: Duration = Duration::from_millis(10);

/// Guest code running right now (polls of metered calls, snapshot `init`),
/// counted per thread so that threads calling guests never write to a
/// shared cache line; the ticker sums them.
static RUNNING: [RunningShard; RUNNING_SHARDS] =
    [const { RunningShard(AtomicUsize::new(0)) }; RUNNING_SHARDS];
const RUNNING_SHARDS: usize = 16;

#[repr(align(128))]
struct RunningShard(AtomicUsize);

/// The shortest CPU budget any call has had, in nanoseconds.
static SHORTEST_BUDGET_NANOS: AtomicU64 = AtomicU64::new(u64::MAX);

fn running_shard() -> &'static AtomicUsize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % RUNNING_SHARDS;
    }
    &RUNNING[SHARD.with(|shard| *shard)].0
}

/// Marks guest code as running on this thread until dropped.
pub struct GuestRunning(&'static AtomicUsize);

impl GuestRunning {
    pub fn start() -> Self {
        let shard = running_shard();
        shard.fetch_add(1, Ordering::Relaxed);
        Self(shard)
    }
}

impl Drop for GuestRunning {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long the ticker may sleep before its next tick. While guest code is
/// running on any thread at the moment of asking, [`EPOCH_TICK`]. Otherwise up to
/// [`IDLE_TICK_MAX`], never longer than the shortest budget: a call that
/// starts while the ticker sleeps is checked for the first time before its
/// budget can run out, and from then on every [`EPOCH_TICK`], so a guest
/// is still stopped within its budget plus one tick.
pub fn next_tick() -> Duration {
    let running: usize = RUNNING
        .iter()
        .map(|shard| shard.0.load(Ordering::Relaxed))
        .sum();
    if running > 0 {
        return EPOCH_TICK;
    }
    let shortest = Duration::from_nanos(SHORTEST_BUDGET_NANOS.load(Ordering::Relaxed));
    shortest.clamp(EPOCH_TICK, IDLE_TICK_MAX)
}

fn note_budget(nanos: u64) {
    // A plain load first: budgets rarely get shorter, and a read-modify-write
    // per call would make every thread write this line.
    if nanos < SHORTEST_BUDGET_NANOS.load(Ordering::Relaxed) {
        SHORTEST_BUDGET_NANOS.fetch_min(nanos, Ordering::Relaxed);
    }
}

/// What one store grants its guest, fixed before the guest runs.
pub struct Grants {
    pub plugin: Arc<str>,
    pub memory_bytes: usize,
    /// The process-wide budget every store's memory also counts against.
    pub memory_budget: Arc<MemoryBudget>,
    pub http: Option<HttpGrant>,
    pub source_values: Option<Arc<dyn SourceValues>>,
}

/// The data of one `Store`: the sandbox and what the host imports need.
pub struct StoreState {
    pub plugin: Arc<str>,
    /// Built on the guest's first WASI call: most transformers make none,
    /// and a guest without WASI imports cannot.
    wasi: Option<WasiCtx>,
    table: ResourceTable,
    pub limits: MemoryLimiter,
    pub cpu: Arc<CpuMeter>,
    pub output: GuestOutput,
    pub http: Option<HttpGrant>,
    pub source_values: Option<Arc<dyn SourceValues>>,
    pub log_lines: u32,
    /// The message a 0.2.0 transformer's hook reads and edits.
    pub exchange: Exchange,
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let output = &self.output;
        let wasi = self.wasi.get_or_insert_with(|| {
            WasiCtx::builder()
                .stdout(output.stream(OutputKind::Stdout))
                .stderr(output.stream(OutputKind::Stderr))
                .build()
        });
        WasiCtxView {
            ctx: wasi,
            table: &mut self.table,
        }
    }
}

/// How a store's guest is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallStyle {
    /// On a fiber (`call_async`): the guest imports WASI or `http-client`,
    /// whose host side may wait. A busy guest yields its thread every tick.
    Async,
    /// A plain call on the caller's thread: the guest imports nothing that
    /// waits. It cannot yield, so it holds its thread until it returns or
    /// its CPU budget stops it.
    Sync,
}

impl CallStyle {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Async => "async",
            Self::Sync => "sync",
        }
    }
}

/// A new store for a call metered by `cpu`: no files, env, args or
/// network; stdout/stderr into the log.
pub fn new_store(
    engine: &Engine,
    grants: Grants,
    cpu: Arc<CpuMeter>,
    style: CallStyle,
) -> Store<StoreState> {
    let output = GuestOutput::new(grants.plugin.clone());
    let state = StoreState {
        plugin: grants.plugin,
        wasi: None,
        table: ResourceTable::new(),
        limits: MemoryLimiter::new(grants.memory_bytes, grants.memory_budget),
        cpu: cpu.clone(),
        output,
        http: grants.http,
        source_values: grants.source_values,
        log_lines: 0,
        exchange: Exchange::default(),
    };
    let mut store = Store::new(engine, state);
    store.limiter(|state| &mut state.limits);
    store.epoch_deadline_callback(move |context| {
        if !context.data().cpu.within_budget() {
            Err(CpuBudgetExceeded.into())
        } else if style == CallStyle::Async {
            // Hand the thread back to tokio every tick: a busy guest never
            // holds a runtime worker for its whole budget.
            Ok(UpdateDeadline::Yield(1))
        } else {
            // A sync call cannot yield (it would trap): it keeps the thread
            // and is checked again next tick.
            Ok(UpdateDeadline::Continue(1))
        }
    });
    start_call(&mut store, cpu);
    store
}

/// Resets the per-call state of a (possibly reused) store for a call
/// metered by `cpu`.
pub fn start_call(store: &mut Store<StoreState>, cpu: Arc<CpuMeter>) {
    let state = store.data_mut();
    state.cpu = cpu;
    state.log_lines = 0;
    state.limits.refused = None;
    state.output.reset_tail();
    store.set_epoch_deadline(1);
}

/// The trap raised when a guest used up its CPU budget.
#[derive(Debug, thiserror::Error)]
#[error("the plugin ran past its time limit")]
pub struct CpuBudgetExceeded;

/// The CPU one call may use, measured as the CPU time of the thread that
/// polls the call (guest code, instantiation and the host imports it calls
/// alike), so that neither a busy box (time preempted or queued behind other
/// tasks is not the guest's) nor a guest that calls into the host in a loop
/// (the host's work is charged) bends the limit. Checked at every epoch
/// tick: a guest is stopped within its budget plus one tick. Time spent
/// waiting on I/O is not CPU and is bounded by the call's outer deadline.
///
/// Reading a thread's CPU clock is a system call that costs more than a
/// whole plugin call on a reused instance, and most polls end well within
/// a tick. So a poll is timed by the monotonic clock (read without a system
/// call) until the first tick checks it; from then on by the thread's CPU
/// clock. Time preempted in a poll's first tick is charged; after it, not.
pub struct CpuMeter {
    allowed_nanos: u64,
    /// Charged by finished polls.
    used_nanos: AtomicU64,
    /// The running poll: when it started (monotonic nanoseconds, 0 between
    /// polls), what it was charged up to the first check, and the thread's
    /// CPU clock at that check (0 before it).
    poll_started_nanos: AtomicU64,
    poll_charged_nanos: AtomicU64,
    poll_cpu_base_nanos: AtomicU64,
}

impl CpuMeter {
    pub fn new(budget: Duration) -> Arc<Self> {
        let allowed_nanos = u64::try_from(budget.as_nanos()).unwrap_or(u64::MAX);
        note_budget(allowed_nanos);
        Arc::new(Self {
            allowed_nanos,
            used_nanos: AtomicU64::new(0),
            poll_started_nanos: AtomicU64::new(0),
            poll_charged_nanos: AtomicU64::new(0),
            poll_cpu_base_nanos: AtomicU64::new(0),
        })
    }

    /// Runs `call`, charging the time of each of its polls.
    pub async fn run<F: Future>(&self, call: F) -> F::Output {
        let mut call = std::pin::pin!(call);
        std::future::poll_fn(|context| {
            self.poll_cpu_base_nanos.store(0, Ordering::Relaxed);
            self.poll_charged_nanos.store(0, Ordering::Relaxed);
            self.poll_started_nanos
                .store(monotonic_nanos(), Ordering::Relaxed);
            let running = GuestRunning::start();
            let polled = call.as_mut().poll(context);
            drop(running);
            let spent = self.running_poll();
            self.poll_started_nanos.store(0, Ordering::Relaxed);
            self.used_nanos.fetch_add(spent, Ordering::Relaxed);
            polled
        })
        .await
    }

    /// What the running poll has used so far (0 between polls).
    fn running_poll(&self) -> u64 {
        let started = self.poll_started_nanos.load(Ordering::Relaxed);
        if started == 0 {
            return 0;
        }
        let base = self.poll_cpu_base_nanos.load(Ordering::Relaxed);
        if base == 0 {
            monotonic_nanos().saturating_sub(started)
        } else {
            let charged = self.poll_charged_nanos.load(Ordering::Relaxed);
            charged.saturating_add(thread_cpu_nanos().saturating_sub(base))
        }
    }

    /// At a check: from now on the running poll is timed by the thread's
    /// CPU clock.
    fn switch_to_cpu_clock(&self) {
        let started = self.poll_started_nanos.load(Ordering::Relaxed);
        if started != 0 && self.poll_cpu_base_nanos.load(Ordering::Relaxed) == 0 {
            let charged = monotonic_nanos().saturating_sub(started);
            self.poll_charged_nanos.store(charged, Ordering::Relaxed);
            self.poll_cpu_base_nanos
                .store(thread_cpu_nanos(), Ordering::Relaxed);
        }
    }

    /// CPU used so far, the running poll included.
    pub fn used(&self) -> Duration {
        Duration::from_nanos(
            self.used_nanos
                .load(Ordering::Relaxed)
                .saturating_add(self.running_poll()),
        )
    }

    fn within_budget(&self) -> bool {
        self.switch_to_cpu_clock();
        u64::try_from(self.used().as_nanos()).unwrap_or(u64::MAX) < self.allowed_nanos
    }
}

/// Monotonic nanoseconds since the first call (never 0), read through the
/// vDSO: no system call.
fn monotonic_nanos() -> u64 {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(std::time::Instant::now);
    u64::try_from(origin.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// The calling thread's CPU time in nanoseconds (never 0: 0 means "not
/// read yet" in [`CpuMeter`]).
fn thread_cpu_nanos() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID
    // is supported by every Linux and BSD kernel Larder runs on.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    if status != 0 {
        return 1;
    }
    let nanos = u64::try_from(now.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(now.tv_nsec).unwrap_or(0));
    nanos.max(1)
}

/// Bytes of linear memory every plugin instance of the process may hold
/// together (`plugin_limits.total_memory`). Each store reserves its growth
/// here as well as under its own cap, and gives it back when dropped.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: AtomicUsize,
    used: AtomicUsize,
}

impl MemoryBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: AtomicUsize::new(limit),
            used: AtomicUsize::new(0),
        })
    }

    /// A reload may change the limit; stores over it keep what they have.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_reserve(&self, bytes: usize) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= limit)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Why a memory growth was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Past the plugin's own `limits.memory`: the plugin's failure.
    PluginCap,
    /// Past the process-wide budget: a capacity problem, not the plugin's.
    TotalBudget,
}

/// The plugin's memory cap and its share of the process-wide budget;
/// remembers a refused growth so a failure can be reported as out of
/// memory (or of capacity) rather than as a generic trap.
pub struct MemoryLimiter {
    max_bytes: usize,
    budget: Arc<MemoryBudget>,
    /// Bytes this store reserved in `budget`, given back on drop.
    reserved: usize,
    /// The last growth reserved, given back if the growth itself fails.
    pending: usize,
    pub refused: Option<Refusal>,
}

impl MemoryLimiter {
    fn new(max_bytes: usize, budget: Arc<MemoryBudget>) -> Self {
        Self {
            max_bytes,
            budget,
            reserved: 0,
            pending: 0,
            refused: None,
        }
    }
}

impl Drop for MemoryLimiter {
    fn drop(&mut self) {
        self.budget.release(self.reserved);
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.refused = Some(Refusal::PluginCap);
            return Ok(false);
        }
        let growth = desired.saturating_sub(current);
        if !self.budget.try_reserve(growth) {
            self.refused = Some(Refusal::TotalBudget);
            return Ok(false);
        }
        self.reserved += growth;
        self.pending = growth;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        let pending = std::mem::take(&mut self.pending);
        self.reserved -= pending;
        self.budget.release(pending);
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ticker_ticks_every_millisecond_while_a_guest_runs_and_never_sleeps_past_a_budget() {
        let running = GuestRunning::start();
        assert_eq!(next_tick(), EPOCH_TICK);
        drop(running);
        // Other tests may be running guests: idle or not, the next tick
        // comes before the shortest budget seen can run out.
        let _meter = CpuMeter::new(Duration::from_millis(3));
        assert!(next_tick() <= Duration::from_millis(3));
        assert!(next_tick() >= EPOCH_TICK);
    }

    #[test]
    fn the_total_budget_refuses_growth_past_it_and_gets_it_back_on_drop() {
        let budget = MemoryBudget::new(3 << 20);
        let mut first = MemoryLimiter::new(2 << 20, budget.clone());
        assert!(first.memory_growing(0, 2 << 20, None).unwrap_or(false));
        let mut second = MemoryLimiter::new(2 << 20, budget.clone());
        assert!(!second.memory_growing(0, 2 << 20, None).unwrap_or(true));
        assert_eq!(second.refused, Some(Refusal::TotalBudget));
        assert!(!first.memory_growing(2 << 20, 3 << 20, None).unwrap_or(true));
        assert_eq!(first.refused, Some(Refusal::PluginCap));
        drop(first);
        assert_eq!(budget.used(), 0);
        assert!(second.memory_growing(0, 2 << 20, None).unwrap_or(false));
    }

    #[test]
    fn a_failed_growth_gives_its_reservation_back() {
        let budget = MemoryBudget::new(4 << 20);
        let mut limiter = MemoryLimiter::new(4 << 20, budget.clone());
        assert!(limiter.memory_growing(0, 1 << 20, None).unwrap_or(false));
        assert!(
            limiter
                .memory_growing(1 << 20, 3 << 20, None)
                .unwrap_or(false)
        );
        limiter
            .memory_grow_failed(wasmtime::Error::msg("no memory"))
            .unwrap_or(());
        assert_eq!(budget.used(), 1 << 20);
    }

    #[tokio::test]
    async fn the_meter_charges_cpu_spent_in_polls_and_not_time_asleep() {
        let meter = CpuMeter::new(Duration::from_millis(20));
        meter
            .run(tokio::time::sleep(Duration::from_millis(40)))
            .await;
        assert!(meter.within_budget(), "sleeping is not CPU");
        meter
            .run(async {
                // 30 ms of this thread's CPU, however busy the machine is,
                // checked as the epoch ticks would check it.
                let started = thread_cpu_nanos();
                while thread_cpu_nanos() - started < 30_000_000 {
                    meter.within_budget();
                    std::hint::black_box(0u64);
                }
            })
            .await;
        assert!(meter.used() >= Duration::from_millis(30));
        assert!(!meter.within_budget());
    }

    #[tokio::test]
    async fn after_its_first_check_a_poll_is_charged_cpu_not_time_asleep() {
        let meter = CpuMeter::new(Duration::from_millis(20));
        meter
            .run(async {
                assert!(meter.within_budget(), "the first check switches clocks");
                // The thread sleeps (as when preempted): no CPU is charged.
                std::thread::sleep(Duration::from_millis(40));
            })
            .await;
        assert!(
            meter.used() < Duration::from_millis(20),
            "{:?}",
            meter.used()
        );
    }
}
