//! Turning a `plugins:` entry into a ready plugin: read the `.wasm`,
//! compile it off the async runtime (or load its precompiled artifact),
//! link it, tell transformer from fetcher, and probe `init` with its config.
//! Also the file watcher that reloads a plugin whose `.wasm` changed.
//!
//! Must not swap in a build that failed to compile or to initialise.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use notify::Watcher as _;
use sha2::{Digest, Sha256};
use wasmtime::Store;

use super::SourceValues;
use super::bindings::fetcher::FetcherPre;
use super::bindings::transformer::{Transformer, TransformerPre};
use super::breaker::Breaker;
use super::call::{self, Hook};
use super::engine::{Grants, PluginEngine, StoreState, new_store};
use super::http_client::{AllowList, HttpGrant};
use crate::config::PluginConfig;

/// What kind of plugin a component is, by the world it exports.
pub enum Kind {
    Transformer(TransformerPre<StoreState>),
    Fetcher(FetcherPre<StoreState>),
}

impl Kind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Transformer(_) => "transformer",
            Self::Fetcher(_) => "fetcher",
        }
    }
}

/// A live transformer instance with its store, kept only with `reuse: true`.
pub struct TransformerInstance {
    pub store: Store<StoreState>,
    pub bindings: Transformer,
}

/// Idle instances kept per plugin with `reuse: true`.
const MAX_IDLE_INSTANCES: usize = 8;

/// The fresh instances a request's plugins made in `on-request`, kept for
/// the same request's `on-response` so that one request pays one
/// instantiation per plugin rather than two. Travels in the request's
/// extensions; dropping it (request done or abandoned) frees the slots.
#[derive(Clone, Default)]
pub struct ParkedInstances(Arc<Mutex<Vec<Parked>>>);

struct Parked {
    plugin: Arc<LoadedPlugin>,
    instance: TransformerInstance,
    /// One of [`PluginEngine::parking`]'s permits, given back on drop.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl ParkedInstances {
    /// Keeps `instance` of `plugin` for this request if the engine has a
    /// parking permit left; otherwise drops it.
    pub fn park(
        &self,
        engine: &PluginEngine,
        plugin: &Arc<LoadedPlugin>,
        instance: TransformerInstance,
    ) {
        let Ok(permit) = engine.parking.clone().try_acquire_owned() else {
            return;
        };
        if let Ok(mut all) = self.0.lock() {
            all.push(Parked {
                plugin: plugin.clone(),
                instance,
                _permit: permit,
            });
        }
    }

    /// The instance this request parked for exactly this build of `plugin`
    /// (a reload in between means a new build and a new instance).
    pub fn take(&self, plugin: &LoadedPlugin) -> Option<TransformerInstance> {
        let mut all = self.0.lock().ok()?;
        let index = all
            .iter()
            .position(|parked| std::ptr::eq(Arc::as_ptr(&parked.plugin), plugin))?;
        Some(all.swap_remove(index).instance)
    }

    pub fn is_empty(&self) -> bool {
        self.0.lock().map_or(true, |all| all.is_empty())
    }
}

/// One build of one plugin, ready to instantiate. Immutable: a reload
/// builds a new one and swaps it in; calls in flight keep the old one.
pub struct LoadedPlugin {
    pub name: Arc<str>,
    pub config: PluginConfig,
    pub kind: Kind,
    pub allow: Arc<AllowList>,
    pub guest_config: Vec<(String, String)>,
    pub wasm_sha256: String,
    /// Whether this build was compiled (false: loaded precompiled).
    pub compiled: bool,
    idle: Mutex<Vec<TransformerInstance>>,
    /// Transformer instances made for calls (the load-time probe excluded).
    instances_created: AtomicU64,
}

impl LoadedPlugin {
    pub fn grants(&self, source_values: Option<Arc<SourceValues>>) -> Grants {
        let is_fetcher = matches!(self.kind, Kind::Fetcher(_));
        Grants {
            plugin: self.name.clone(),
            memory_bytes: usize::try_from(self.config.limits.memory.0).unwrap_or(usize::MAX),
            cpu_budget: self.config.limits.timeout.0,
            http: is_fetcher.then(|| HttpGrant {
                allow: self.allow.clone(),
                requests_made: 0,
            }),
            source_values: if is_fetcher { source_values } else { None },
        }
    }

    pub fn count_instance(&self) {
        self.instances_created.fetch_add(1, Ordering::Relaxed);
    }

    pub fn take_idle(&self) -> Option<TransformerInstance> {
        self.idle.lock().ok()?.pop()
    }

    pub fn put_idle(&self, instance: TransformerInstance) {
        if !self.config.reuse {
            return;
        }
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < MAX_IDLE_INSTANCES
        {
            idle.push(instance);
        }
    }
}

/// Counters a test or the admin side can read for one plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginStats {
    /// Calls that reached the guest.
    pub invocations: u64,
    pub failures: u64,
    /// Calls not made because the circuit was open.
    pub skipped: u64,
    /// Builds compiled from wasm (as opposed to loaded precompiled).
    pub compilations: u64,
    /// Changed plugin files whose new build was refused (the old one kept).
    pub rejected_builds: u64,
    /// Whether the current build was compiled (false: loaded precompiled).
    pub compiled: bool,
    /// Instances the current build made for calls.
    pub instances_created: u64,
    pub circuit_open: bool,
    /// `trap`, `timeout`, `oom`, `error` or `too_large` of the latest failure.
    pub last_failure_kind: Option<&'static str>,
    /// The latest failure's detail, with the guest's stderr.
    pub last_failure: Option<String>,
    pub kind: &'static str,
    pub wasm_sha256: String,
}

#[derive(Default)]
pub struct Counters {
    pub invocations: std::sync::atomic::AtomicU64,
    pub failures: std::sync::atomic::AtomicU64,
    pub skipped: std::sync::atomic::AtomicU64,
    pub compilations: std::sync::atomic::AtomicU64,
    pub rejected_builds: std::sync::atomic::AtomicU64,
    /// Kind and description of the latest failure.
    pub last_failure: Mutex<Option<(&'static str, String)>>,
}

/// A plugin by name: its current build, breaker, counters and watcher.
/// Lives across reloads of the build.
pub struct PluginSlot {
    pub name: Arc<str>,
    pub current: ArcSwap<LoadedPlugin>,
    breakers: [Breaker; 3],
    pub counters: Counters,
    pub metrics: SlotMetrics,
    pub source_values: Arc<SourceValues>,
    watcher: Mutex<Option<notify::RecommendedWatcher>>,
}

/// The plugin's metric handles, registered once: looking them up by label
/// on every call would cost more than a reused instance's whole call.
pub struct SlotMetrics {
    invocations: [metrics::Counter; 3],
    pub duration: metrics::Histogram,
    pub circuit_open: metrics::Gauge,
}

impl SlotMetrics {
    fn new(plugin: &str) -> Self {
        let invocations = |hook: Hook| metrics::counter!("larder_plugin_invocations_total", "plugin" => plugin.to_string(), "hook" => hook.as_str());
        Self {
            invocations: [
                invocations(Hook::OnRequest),
                invocations(Hook::OnResponse),
                invocations(Hook::Run),
            ],
            duration: metrics::histogram!("larder_plugin_duration_seconds", "plugin" => plugin.to_string()),
            circuit_open: metrics::gauge!("larder_plugin_circuit_open", "plugin" => plugin.to_string()),
        }
    }

    pub fn invocations(&self, hook: Hook) -> &metrics::Counter {
        &self.invocations[hook as usize]
    }
}

impl PluginSlot {
    pub fn new(plugin: LoadedPlugin) -> Arc<Self> {
        let slot = Arc::new(Self {
            name: plugin.name.clone(),
            counters: Counters::default(),
            metrics: SlotMetrics::new(&plugin.name),
            breakers: Default::default(),
            source_values: Arc::new(SourceValues::default()),
            current: ArcSwap::from_pointee(plugin),
            watcher: Mutex::new(None),
        });
        slot.count_build(&slot.current.load());
        slot
    }

    pub fn swap(&self, plugin: LoadedPlugin) {
        self.count_build(&plugin);
        self.current.store(Arc::new(plugin));
    }

    fn count_build(&self, plugin: &LoadedPlugin) {
        if plugin.compiled {
            self.counters
                .compilations
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub fn breaker(&self, hook: Hook) -> &Breaker {
        &self.breakers[hook as usize]
    }

    /// Whether any of the plugin's hooks is currently not being called.
    pub fn is_circuit_open(&self) -> bool {
        self.breakers.iter().any(Breaker::is_open)
    }

    pub fn stats(&self) -> PluginStats {
        use std::sync::atomic::Ordering::Relaxed;
        let current = self.current.load();
        let last_failure = self
            .counters
            .last_failure
            .lock()
            .ok()
            .and_then(|last| last.clone());
        PluginStats {
            last_failure_kind: last_failure.as_ref().map(|(kind, _)| *kind),
            last_failure: last_failure.map(|(_, detail)| detail),
            invocations: self.counters.invocations.load(Relaxed),
            failures: self.counters.failures.load(Relaxed),
            skipped: self.counters.skipped.load(Relaxed),
            compilations: self.counters.compilations.load(Relaxed),
            rejected_builds: self.counters.rejected_builds.load(Relaxed),
            compiled: current.compiled,
            instances_created: current.instances_created.load(Relaxed),
            circuit_open: self.is_circuit_open(),
            kind: current.kind.as_str(),
            wasm_sha256: current.wasm_sha256.clone(),
        }
    }
}

/// Reads, compiles, links and probes one plugin.
pub async fn load_plugin(
    engine: &Arc<PluginEngine>,
    name: &str,
    config: &PluginConfig,
) -> Result<LoadedPlugin, String> {
    let wasm = tokio::fs::read(&config.path)
        .await
        .map_err(|e| format!("cannot read {}: {e}", config.path.display()))?;
    load_bytes(engine, name, config, wasm).await
}

async fn load_bytes(
    engine: &Arc<PluginEngine>,
    name: &str,
    config: &PluginConfig,
    wasm: Vec<u8>,
) -> Result<LoadedPlugin, String> {
    let allow = AllowList::parse(&config.allow_hosts).map_err(|e| format!("allow_hosts: {e}"))?;
    let wasm_sha256 = hex::encode(Sha256::digest(&wasm));
    let started = Instant::now();
    let compiling = engine.clone();
    let (component, compiled) = tokio::task::spawn_blocking(move || compiling.compile(&wasm))
        .await
        .map_err(|e| format!("compilation task failed: {e}"))??;
    if compiled {
        metrics::counter!("larder_plugin_compilations_total", "plugin" => name.to_string())
            .increment(1);
        tracing::info!(
            plugin = name,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "compiled plugin"
        );
    } else {
        tracing::info!(
            plugin = name,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "loaded precompiled plugin"
        );
    }
    let pre = engine
        .linker
        .instantiate_pre(&component)
        .map_err(|e| format!("cannot link (does it import only larder:plugin and WASI?): {e:#}"))?;
    let kind = match TransformerPre::new(pre.clone()) {
        Ok(transformer) => Kind::Transformer(transformer),
        Err(_) => Kind::Fetcher(FetcherPre::new(pre).map_err(|e| {
            format!("exports neither larder:plugin/transform nor larder:plugin/fetch: {e:#}")
        })?),
    };
    let plugin = LoadedPlugin {
        name: Arc::from(name),
        guest_config: config.config.clone().into_iter().collect(),
        config: config.clone(),
        kind,
        allow: Arc::new(allow),
        wasm_sha256,
        compiled,
        idle: Mutex::new(Vec::new()),
        instances_created: AtomicU64::new(0),
    };
    call::probe_init(engine, &plugin).await?;
    Ok(plugin)
}

/// A fresh transformer instance with `init` already called.
pub async fn instantiate_transformer(
    engine: &PluginEngine,
    plugin: &LoadedPlugin,
    pre: &TransformerPre<StoreState>,
) -> Result<TransformerInstance, call::Failure> {
    let mut store = new_store(engine, plugin.grants(None));
    let bindings = match pre.instantiate_async(&mut store).await {
        Ok(bindings) => bindings,
        Err(error) => return Err(call::Failure::from_wasmtime(error, &store)),
    };
    let init = bindings
        .larder_plugin_transform()
        .call_init(&mut store, &plugin.guest_config)
        .await;
    call::settle(init, &store, "init")?;
    Ok(TransformerInstance { store, bindings })
}

/// Watches the plugin's file and reloads it when it changes. The watcher
/// lives in the slot; the task ends when the slot is dropped.
pub fn watch(engine: Arc<PluginEngine>, slot: &Arc<PluginSlot>) {
    let path = slot.current.load().config.path.clone();
    let Some(file_name) = path.file_name().map(|name| name.to_os_string()) else {
        return;
    };
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => Path::new(".").to_path_buf(),
    };
    let (changed, mut changes) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let is_ours = event.is_ok_and(|event| {
            !event.kind.is_access()
                && event
                    .paths
                    .iter()
                    .any(|p| p.file_name() == Some(file_name.as_os_str()))
        });
        if is_ours {
            let _ = changed.send(());
        }
    });
    let mut watcher = match watcher {
        Ok(watcher) => watcher,
        Err(error) => {
            tracing::warn!(plugin = &*slot.name, %error, "cannot watch the plugin file; edits need a reload");
            return;
        }
    };
    if let Err(error) = watcher.watch(&directory, notify::RecursiveMode::NonRecursive) {
        tracing::warn!(plugin = &*slot.name, dir = %directory.display(), %error, "cannot watch the plugin file; edits need a reload");
        return;
    }
    if let Ok(mut slot_watcher) = slot.watcher.lock() {
        *slot_watcher = Some(watcher);
    }
    let slot: Weak<PluginSlot> = Arc::downgrade(slot);
    tokio::spawn(async move {
        while changes.recv().await.is_some() {
            // Let a write in progress finish: one rebuild per burst of events.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while changes.try_recv().is_ok() {}
            let Some(slot) = slot.upgrade() else { break };
            reload_from_disk(&engine, &slot).await;
        }
    });
}

/// Rebuilds a plugin whose file changed; keeps the old build on failure.
async fn reload_from_disk(engine: &Arc<PluginEngine>, slot: &PluginSlot) {
    let current = slot.current.load_full();
    let Ok(wasm) = tokio::fs::read(&current.config.path).await else {
        tracing::warn!(plugin = &*slot.name, path = %current.config.path.display(), "plugin file unreadable; keeping the running build");
        return;
    };
    if hex::encode(Sha256::digest(&wasm)) == current.wasm_sha256 {
        return;
    }
    match load_bytes(engine, &slot.name, &current.config, wasm).await {
        Ok(plugin) => {
            tracing::info!(plugin = &*slot.name, sha256 = %plugin.wasm_sha256, "plugin file changed; new build swapped in");
            slot.swap(plugin);
        }
        Err(reason) => {
            slot.counters
                .rejected_builds
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(plugin = &*slot.name, %reason, "plugin file changed but the new build is broken; keeping the running build");
        }
    }
}
