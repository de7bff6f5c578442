//! The one wasmtime engine of the process and everything a call's `Store`
//! holds: the engine's configuration (component model, pooling allocator,
//! epoch interruption with a 10 ms ticker), the linker with the host
//! imports, the on-disk cache of precompiled components, the per-store
//! sandbox (WASI with nothing granted, memory limiter, CPU budget) and the
//! sink that copies guest stdout/stderr into the host log.
//!
//! Must not grant a guest files, environment, arguments or sockets.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter,
    Store, UpdateDeadline,
};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::SourceValues;
use super::bindings;
use super::http_client::HttpGrant;

/// How often the epoch advances; the granularity of every CPU limit.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Guest output kept per call for the failure log (the tail of stderr).
const STDERR_TAIL_BYTES: usize = 2048;
/// Guest output lines written to the host log per call; the rest is dropped.
const MAX_LOG_LINES_PER_CALL: u32 = 200;
/// Low bytes of a linear memory reset in place when its slot is reused: a
/// Rust guest's shadow stack (1 MiB) plus its static data and first heap.
const RESET_IN_PLACE_BYTES: usize = 2 << 20;

/// Plugin calls running at once; more wait their turn. Below the pool's
/// [`POOL_INSTANCES`], leaving room for instances parked between a request's
/// hooks and `reuse: true` idle ones, so a burst queues instead of failing
/// to instantiate.
const MAX_CONCURRENT_CALLS: usize = 900;
/// Instances parked between a request's `on-request` and its `on-response`
/// at once. Each holds a pool slot while the upstream answers; past the cap,
/// the request's `on-response` simply gets another fresh instance.
const MAX_PARKED_INSTANCES: usize = 256;
/// Live component instances the pool holds: running calls, parked ones and
/// idle reused ones.
const POOL_INSTANCES: u32 = 1300;

/// The process-wide engine, its linker and the artifact cache directory.
pub struct PluginEngine {
    pub engine: Engine,
    pub linker: Linker<StoreState>,
    /// One permit per running plugin call.
    pub calls: tokio::sync::Semaphore,
    /// One permit per instance parked between a request's hooks.
    pub parking: Arc<tokio::sync::Semaphore>,
    cache_dir: Option<PathBuf>,
}

static SHARED: OnceLock<Result<Arc<PluginEngine>, String>> = OnceLock::new();

/// The engine every plugin host of this process uses (built on first use,
/// with its epoch ticker thread).
pub fn shared() -> Result<Arc<PluginEngine>, String> {
    SHARED
        .get_or_init(|| PluginEngine::build().map(Arc::new))
        .clone()
}

impl PluginEngine {
    fn build() -> Result<Self, String> {
        let engine = match Engine::new(&engine_config(true)) {
            Ok(engine) => engine,
            Err(error) => {
                tracing::warn!(%error, "the pooling allocator could not reserve its memory; plugins use on-demand allocation");
                Engine::new(&engine_config(false)).map_err(|e| e.to_string())?
            }
        };
        start_epoch_ticker(&engine)?;
        let linker = build_linker(&engine).map_err(|e| format!("linking host imports: {e}"))?;
        Ok(Self {
            engine,
            linker,
            calls: tokio::sync::Semaphore::new(MAX_CONCURRENT_CALLS),
            parking: Arc::new(tokio::sync::Semaphore::new(MAX_PARKED_INSTANCES)),
            cache_dir: artifact_cache_dir(),
        })
    }

    /// Compiles `wasm` or loads its precompiled artifact. Blocking: call it
    /// from `spawn_blocking`. Returns whether a compilation happened.
    pub fn compile(&self, wasm: &[u8]) -> Result<(Component, bool), String> {
        let artifact = self
            .cache_dir
            .as_ref()
            .map(|dir| dir.join(format!("{}.cwasm", self.artifact_key(wasm))));
        if let Some(path) = artifact.as_deref().filter(|path| path.is_file()) {
            // SAFETY: the file is one this host wrote with `precompile_component`
            // under a name that includes the engine's compatibility hash.
            match unsafe { Component::deserialize_file(&self.engine, path) } {
                Ok(component) => return Ok((component, false)),
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "precompiled plugin artifact unusable; compiling again");
                }
            }
        }
        let compiled = self
            .engine
            .precompile_component(wasm)
            .map_err(|e| format!("not a valid component: {e:#}"))?;
        // SAFETY: the bytes were produced just now by this engine.
        let component = unsafe { Component::deserialize(&self.engine, &compiled) }
            .map_err(|e| format!("loading the compiled component: {e:#}"))?;
        if let Some(path) = artifact
            && let Err(error) = write_atomically(&path, &compiled)
        {
            tracing::warn!(path = %path.display(), %error, "could not store the precompiled plugin; the next start compiles again");
        }
        Ok((component, true))
    }

    /// sha256 of the wasm bytes plus the engine's compatibility hash, so an
    /// artifact from another wasmtime build or setting is never loaded.
    fn artifact_key(&self, wasm: &[u8]) -> String {
        use std::hash::Hash as _;
        let mut hasher = ShaHasher(Sha256::new());
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        let engine_hash = hex::encode(&hasher.0.finalize()[..8]);
        format!("{}-{engine_hash}", hex::encode(Sha256::digest(wasm)))
    }
}

/// Feeds `Hash` output into sha256, which (unlike `DefaultHasher`) is stable.
struct ShaHasher(Sha256);

impl std::hash::Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

fn engine_config(pooling: bool) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    if pooling {
        // Sized for a proxy box (e.g. 24 GiB): up to POOL_INSTANCES live
        // instances at once (concurrent requests x plugins). Slots reserve
        // address space, not RAM; memory is committed only as guests touch
        // it, and each store's own limiter enforces the plugin's
        // `limits.memory`. Fiber stacks are needed only by running calls.
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(POOL_INSTANCES)
            .total_core_instances(2 * POOL_INSTANCES)
            .total_memories(POOL_INSTANCES)
            .total_tables(2 * POOL_INSTANCES)
            .total_stacks(1000)
            .max_memory_size(4 << 30)
            .max_unused_warm_slots(100)
            // A fresh instance per request is the default, so resetting a
            // slot is on the hot path. With PAGEMAP_SCAN (Linux 6.7+) only
            // the pages the last guest dirtied are zeroed with memset and
            // stay resident, instead of an madvise that makes the next
            // guest fault every page back in.
            .pagemap_scan(Enabled::Auto)
            .linear_memory_keep_resident(RESET_IN_PLACE_BYTES)
            .table_keep_resident(64 << 10);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    config
}

fn start_epoch_ticker(engine: &Engine) -> Result<(), String> {
    let engine = engine.weak();
    std::thread::Builder::new()
        .name("larder-plugin-epoch".to_string())
        .spawn(move || {
            while let Some(engine) = engine.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .map(|_| ())
        .map_err(|e| format!("starting the epoch ticker: {e}"))
}

fn build_linker(engine: &Engine) -> wasmtime::Result<Linker<StoreState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    bindings::transformer::larder::plugin::types::add_to_linker::<_, HasSelf<_>>(
        &mut linker,
        |s| s,
    )?;
    bindings::transformer::larder::plugin::log::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    bindings::fetcher::larder::plugin::http_client::add_to_linker::<_, HasSelf<_>>(
        &mut linker,
        |s| s,
    )?;
    bindings::fetcher::larder::plugin::cache::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    Ok(linker)
}

/// `$LARDER_CACHE_DIR`, else `$XDG_CACHE_HOME/larder`, else `~/.cache/larder`;
/// `None` (with a warning) when none is writable.
fn artifact_cache_dir() -> Option<PathBuf> {
    let env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let base = env("LARDER_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|dir| dir.join("larder")))
        .or_else(|| env("HOME").map(|dir| dir.join(".cache").join("larder")));
    let Some(dir) = base.map(|base| base.join("plugins")) else {
        tracing::warn!(
            "no cache directory (set LARDER_CACHE_DIR); plugins are compiled at every start"
        );
        return None;
    };
    match std::fs::create_dir_all(&dir).and_then(|()| probe_writable(&dir)) {
        Ok(()) => Some(dir),
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "plugin cache directory not writable; plugins are compiled at every start");
            None
        }
    }
}

fn probe_writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(probe)
}

/// Writes to a temporary name unique to this process and call, then renames:
/// concurrent writers (two loads, two processes) never mix their bytes.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let write = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temporary = path.with_extension(format!("tmp-{}-{write}", std::process::id()));
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

/// What one store grants its guest, fixed before the guest runs.
pub struct Grants {
    pub plugin: Arc<str>,
    pub memory_bytes: usize,
    pub cpu_budget: Duration,
    pub http: Option<HttpGrant>,
    pub source_values: Option<Arc<SourceValues>>,
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
    pub source_values: Option<Arc<SourceValues>>,
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
pub fn new_store(engine: &PluginEngine, grants: Grants) -> Store<StoreState> {
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
    let mut store = Store::new(&engine.engine, state);
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

#[derive(Clone, Copy)]
enum OutputKind {
    Stdout,
    Stderr,
}

/// Guest stdout/stderr: each complete line goes to the host log tagged with
/// the plugin; the tail of stderr is kept for the failure report.
#[derive(Clone)]
pub struct GuestOutput {
    inner: Arc<Mutex<OutputBuffers>>,
}

struct OutputBuffers {
    plugin: Arc<str>,
    partial: [Vec<u8>; 2],
    stderr_tail: Vec<u8>,
    lines: u32,
}

impl GuestOutput {
    fn new(plugin: Arc<str>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(OutputBuffers {
                plugin,
                partial: [Vec::new(), Vec::new()],
                stderr_tail: Vec::new(),
                lines: 0,
            })),
        }
    }

    fn stream(&self, kind: OutputKind) -> GuestStream {
        GuestStream {
            output: self.clone(),
            kind,
        }
    }

    fn write(&self, kind: OutputKind, bytes: &[u8]) {
        let Ok(mut buffers) = self.inner.lock() else {
            return;
        };
        if matches!(kind, OutputKind::Stderr) {
            buffers.stderr_tail.extend_from_slice(bytes);
            let excess = buffers.stderr_tail.len().saturating_sub(STDERR_TAIL_BYTES);
            buffers.stderr_tail.drain(..excess);
        }
        let index = kind as usize;
        buffers.partial[index].extend_from_slice(bytes);
        while let Some(end) = buffers.partial[index].iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffers.partial[index].drain(..=end).collect();
            buffers.emit(kind, &line);
        }
        if buffers.partial[index].len() > 4096 {
            let line = std::mem::take(&mut buffers.partial[index]);
            buffers.emit(kind, &line);
        }
    }

    /// Logs what is left of unterminated lines (a call ended or trapped).
    pub fn flush(&self) {
        let Ok(mut buffers) = self.inner.lock() else {
            return;
        };
        for kind in [OutputKind::Stdout, OutputKind::Stderr] {
            let line = std::mem::take(&mut buffers.partial[kind as usize]);
            if !line.is_empty() {
                buffers.emit(kind, &line);
            }
        }
    }

    /// The last stderr bytes of this call, for the failure log.
    pub fn stderr_tail(&self) -> String {
        self.inner
            .lock()
            .map(|buffers| {
                String::from_utf8_lossy(&buffers.stderr_tail)
                    .trim()
                    .to_string()
            })
            .unwrap_or_default()
    }

    fn reset_tail(&self) {
        if let Ok(mut buffers) = self.inner.lock() {
            buffers.stderr_tail.clear();
            buffers.lines = 0;
        }
    }
}

impl OutputBuffers {
    fn emit(&mut self, kind: OutputKind, line: &[u8]) {
        let text = escape_controls(String::from_utf8_lossy(line).trim_end());
        if text.is_empty() {
            return;
        }
        self.lines += 1;
        if self.lines > MAX_LOG_LINES_PER_CALL {
            return;
        }
        let plugin = &*self.plugin;
        match kind {
            OutputKind::Stdout => tracing::info!(plugin, stream = "stdout", "{text}"),
            OutputKind::Stderr => tracing::warn!(plugin, stream = "stderr", "{text}"),
        }
    }
}

/// Escapes control characters (`\r`, `\x1b`, ...) in guest text bound for
/// the log, so a guest cannot forge lines or terminal sequences.
pub fn escape_controls(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// One WASI output stream (stdout or stderr) of a guest.
#[derive(Clone)]
struct GuestStream {
    output: GuestOutput,
    kind: OutputKind,
}

impl IsTerminal for GuestStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for GuestStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.output.write(self.kind, &bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestStream {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for GuestStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.output.write(self.kind, buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
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
    fn guest_text_cannot_forge_log_lines() {
        assert_eq!(
            escape_controls("ok\r\nFAKE\x1b[31m"),
            "ok\\r\\nFAKE\\u{1b}[31m"
        );
        assert_eq!(escape_controls("plain text"), "plain text");
    }

    #[test]
    fn restarting_a_reused_store_refills_the_budget() {
        let mut budget = CpuBudget::new(Duration::from_millis(20));
        ticks_until_stopped(&mut budget);
        budget.restart();
        assert!(budget.charge_tick());
    }
}
