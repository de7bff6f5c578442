//! One call's sandbox: what a `Store` holds and grants (WASI with nothing
//! granted, the memory limiter, the CPU budget counted in epoch ticks, the
//! http-client grant, the fetcher's view of its values), made fresh per
//! store and reset between calls of a reused one.
//!
//! Must not grant a guest files, environment, arguments or sockets.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime::{Engine, ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::SourceValues;
use super::http_client::HttpGrant;
use super::output::{GuestOutput, OutputKind};

/// How often the engine's epoch advances: the granularity of every CPU
/// limit (the engine's ticker thread moves it).
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// What one store grants its guest, fixed before the guest runs.
pub struct Grants {
    pub plugin: Arc<str>,
    pub memory_bytes: usize,
    pub cpu_budget: Duration,
    pub http: Option<HttpGrant>,
    pub source_values: Option<Arc<dyn SourceValues>>,
}

/// The data of one `Store`: the sandbox and what the host imports need.
pub struct StoreState {
    pub plugin: Arc<str>,
    wasi: WasiCtx,
    table: ResourceTable,
    pub limits: MemoryLimiter,
    pub budget: CpuBudget,
    pub output: GuestOutput,
    pub http: Option<HttpGrant>,
    pub source_values: Option<Arc<dyn SourceValues>>,
    pub log_lines: u32,
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A new store: no files, env, args or network; stdout/stderr into the log.
pub fn new_store(engine: &Engine, grants: Grants) -> Store<StoreState> {
    let output = GuestOutput::new(grants.plugin.clone());
    let wasi = WasiCtx::builder()
        .stdout(output.stream(OutputKind::Stdout))
        .stderr(output.stream(OutputKind::Stderr))
        .build();
    let state = StoreState {
        plugin: grants.plugin,
        wasi,
        table: ResourceTable::new(),
        limits: MemoryLimiter::new(grants.memory_bytes),
        budget: CpuBudget::new(grants.cpu_budget),
        output,
        http: grants.http,
        source_values: grants.source_values,
        log_lines: 0,
    };
    let mut store = Store::new(engine, state);
    store.limiter(|state| &mut state.limits);
    store.epoch_deadline_callback(|mut context| {
        if context.data_mut().budget.charge_tick() {
            // Hand the thread back to tokio every tick: a busy guest never
            // holds a runtime worker for its whole budget. The deadline is
            // set again after the yield, so time spent waiting for the
            // runtime is not charged.
            Ok(UpdateDeadline::Yield(1))
        } else {
            Err(CpuBudgetExceeded.into())
        }
    });
    start_call(&mut store);
    store
}

/// Resets the per-call state of a (possibly reused) store.
pub fn start_call(store: &mut Store<StoreState>) {
    store.data_mut().budget.restart();
    store.data_mut().log_lines = 0;
    store.data_mut().limits.refused_growth = false;
    store.data_mut().output.reset_tail();
    store.set_epoch_deadline(1);
}

/// The trap raised when a guest used up its CPU budget.
#[derive(Debug, thiserror::Error)]
#[error("the plugin ran past its time limit")]
pub struct CpuBudgetExceeded;

/// The CPU a guest may use in one call, counted in epoch ticks observed
/// while its code runs. Counting ticks rather than wall time keeps the
/// limit fair on a busy box: time spent preempted, yielded to the runtime
/// or waiting on an http-client call is not charged.
pub struct CpuBudget {
    ticks_allowed: u64,
    ticks_used: u64,
    io_returned: bool,
}

impl CpuBudget {
    fn new(limit: Duration) -> Self {
        let ticks = limit.as_nanos().div_ceil(EPOCH_TICK.as_nanos()).max(1);
        Self {
            ticks_allowed: u64::try_from(ticks).unwrap_or(u64::MAX),
            ticks_used: 0,
            io_returned: false,
        }
    }

    fn restart(&mut self) {
        self.ticks_used = 0;
        self.io_returned = false;
    }

    /// Called when a host I/O call returns to the guest: the deadline most
    /// likely passed while waiting, and that tick is not the guest's.
    pub fn forgive_next_tick(&mut self) {
        self.io_returned = true;
    }

    /// Charges one tick; false once the budget is used up.
    fn charge_tick(&mut self) -> bool {
        if std::mem::take(&mut self.io_returned) {
            return true;
        }
        self.ticks_used += 1;
        self.ticks_used < self.ticks_allowed
    }
}

/// The plugin's memory cap; remembers a refused growth so a failure can be
/// reported as out-of-memory rather than as a generic trap.
pub struct MemoryLimiter {
    max_bytes: usize,
    pub refused_growth: bool,
}

impl MemoryLimiter {
    fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            refused_growth: false,
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= self.max_bytes;
        if !allowed {
            self.refused_growth = true;
        }
        Ok(allowed)
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

    fn ticks_until_stopped(budget: &mut CpuBudget) -> u64 {
        (1..=1000).find(|_| !budget.charge_tick()).unwrap_or(0)
    }

    #[test]
    fn a_budget_allows_its_limit_in_ticks() {
        assert_eq!(
            ticks_until_stopped(&mut CpuBudget::new(Duration::from_millis(50))),
            5
        );
        assert_eq!(
            ticks_until_stopped(&mut CpuBudget::new(Duration::from_millis(55))),
            6
        );
        assert_eq!(
            ticks_until_stopped(&mut CpuBudget::new(Duration::from_millis(1))),
            1
        );
    }

    #[test]
    fn the_tick_after_host_io_is_not_charged() {
        let mut budget = CpuBudget::new(Duration::from_millis(20));
        assert!(budget.charge_tick());
        budget.forgive_next_tick();
        assert!(budget.charge_tick(), "the I/O tick is free");
        assert!(!budget.charge_tick());
    }

    #[test]
    fn restarting_a_reused_store_refills_the_budget() {
        let mut budget = CpuBudget::new(Duration::from_millis(20));
        ticks_until_stopped(&mut budget);
        budget.restart();
        assert!(budget.charge_tick());
    }
}
