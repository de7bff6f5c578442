//! Turning a `plugins:` entry into a ready plugin: read the `.wasm`,
//! compile it off the async runtime (or load its precompiled artifact),
//! link it, tell transformer from fetcher, and probe `init` with its config.
//! Also rebuilding a plugin whose `.wasm` changed on disk.
//!
//! Must not swap in a build that failed to compile or to initialise.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use wasmtime::Store;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::Component;

use super::bindings::GuestError;
use super::bindings::fetcher::FetcherPre;
use super::bindings::transformer::{Transformer, TransformerPre};
use super::bindings::transformer_v2::larder::plugin::types::{
    Hooks as WitHooks, PluginError as GuestErrorV2,
};
use super::bindings::transformer_v2::{
    Transformer as TransformerV2, TransformerPre as TransformerV2Pre,
};
use super::bindings::transformer_v2_async::{
    Transformer as TransformerV2Async, TransformerPre as TransformerV2AsyncPre,
};
use super::call::{Failure, Turn, settle};
use super::engine::{CORE_INSTANCES_PER_SLOT, EngineError, PluginEngine, TABLES_PER_SLOT};
use super::http_client::{AllowList, HttpGrant, InvalidOrigin};
use super::snapshot;
use super::store::{CallStyle, CpuMeter, Grants, StoreState, new_store};
use super::{PluginError, SourceValues};
use crate::config::PluginConfig;

/// A live transformer instance with its store and the pool slots it holds.
pub struct TransformerInstance {
    pub store: Store<StoreState>,
    pub bindings: TransformerBindings,
    /// The plugin's weight in [`PluginEngine::slots`], given back on drop.
    _slots: OwnedSemaphorePermit,
}

/// Idle instances kept per plugin with `reuse: true`.
const MAX_IDLE_INSTANCES: usize = 8;

/// What kind of plugin a component is, by the world it exports.
pub enum Kind {
    Transformer(TransformerLink),
    Fetcher(FetcherPre<StoreState>),
}

impl Kind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Transformer(_) => "transformer",
            Self::Fetcher(_) => "fetcher",
        }
    }

    /// How calls enter the guest: sync only for a 0.2.0 transformer that
    /// imports nothing but Larder's own interfaces.
    pub fn call_style(&self) -> CallStyle {
        match self {
            Self::Transformer(TransformerLink::Sync(_)) => CallStyle::Sync,
            Self::Transformer(_) | Self::Fetcher(_) => CallStyle::Async,
        }
    }

    /// The WIT package version the plugin was built against.
    pub fn wit_version(&self) -> &'static str {
        match self {
            Self::Transformer(TransformerLink::Sync(_) | TransformerLink::Async(_)) => "0.2.0",
            Self::Transformer(TransformerLink::V1(_)) | Self::Fetcher(_) => "0.1.0",
        }
    }
}

/// A transformer, linked by its WIT version and how it is called.
pub enum TransformerLink {
    /// `larder:plugin@0.1.0`: whole heads cross the boundary; on fibers.
    V1(TransformerPre<StoreState>),
    /// 0.2.0, importing WASI: on fibers.
    Async(TransformerV2AsyncPre<StoreState>),
    /// 0.2.0, importing only `larder:plugin`: plain calls.
    Sync(TransformerV2Pre<StoreState>),
}

/// The exports of a live transformer instance, as linked.
pub enum TransformerBindings {
    V1(Transformer),
    Async(TransformerV2Async),
    Sync(TransformerV2),
}

/// The hooks a transformer has, as its `init` declared them at load
/// (a 0.1.0 plugin has them all and always gets the body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hooks {
    pub on_request: bool,
    pub on_response: bool,
    pub response_body: bool,
    pub request_in_response: bool,
}

impl Hooks {
    pub const ALL: Self = Self {
        on_request: true,
        on_response: true,
        response_body: true,
        request_in_response: true,
    };

    fn from_wit(hooks: WitHooks) -> Self {
        Self {
            on_request: hooks.contains(WitHooks::ON_REQUEST),
            on_response: hooks.contains(WitHooks::ON_RESPONSE),
            response_body: hooks.contains(WitHooks::RESPONSE_BODY),
            request_in_response: hooks.contains(WitHooks::REQUEST_IN_RESPONSE),
        }
    }
}

/// A 0.2.0 guest's error as the 0.1.0 one (the same cases).
pub fn guest_error_v2(error: GuestErrorV2) -> GuestError {
    match error {
        GuestErrorV2::InvalidConfig(why) => GuestError::InvalidConfig(why),
        GuestErrorV2::Upstream(why) => GuestError::Upstream(why),
        GuestErrorV2::Internal(why) => GuestError::Internal(why),
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
    /// Pool slots one instance takes (see [`PluginEngine::slots`]).
    pub weight: u32,
    /// `limits.concurrency` turns: calls of this build running at once.
    pub turns: Arc<Semaphore>,
    /// What `init` declared at load.
    pub hooks: Hooks,
    /// Instances start from a snapshot taken after `init` with this
    /// build's config (see `snapshot`), so none of them calls `init`.
    pub pre_initialised: bool,
    /// `init` calls on instances of this build (the load-time probe included).
    init_calls: AtomicU64,
}

impl LoadedPlugin {
    pub fn grants(
        &self,
        engine: &PluginEngine,
        source_values: Option<Arc<dyn SourceValues>>,
    ) -> Grants {
        let is_fetcher = matches!(self.kind, Kind::Fetcher(_));
        Grants {
            plugin: self.name.clone(),
            memory_bytes: usize::try_from(self.config.limits.memory.0).unwrap_or(usize::MAX),
            memory_budget: engine.memory.clone(),
            http: is_fetcher.then(|| HttpGrant {
                allow: self.allow.clone(),
                requests_made: 0,
            }),
            source_values: if is_fetcher { source_values } else { None },
        }
    }

    /// The hooks a transformer runs, by name (none for a fetcher).
    pub fn declared_hooks(&self) -> Vec<&'static str> {
        if matches!(self.kind, Kind::Fetcher(_)) {
            return vec!["run"];
        }
        let hooks = self.hooks;
        [
            (hooks.on_request, "on_request"),
            (hooks.on_response, "on_response"),
            (hooks.response_body, "response_body"),
            (hooks.request_in_response, "request_in_response"),
        ]
        .into_iter()
        .filter_map(|(declared, name)| declared.then_some(name))
        .collect()
    }

    /// Waits for one of this plugin's turns, at most its `queue_timeout`.
    pub async fn take_turn(&self) -> Result<Turn, Failure> {
        Turn::take(&self.turns, self.config.limits.queue_timeout.0).await
    }

    /// A `larder:plugin@0.1.0` transformer (whole heads cross the boundary).
    pub fn is_v1(&self) -> bool {
        matches!(self.kind, Kind::Transformer(TransformerLink::V1(_)))
    }

    pub fn count_instance(&self) {
        self.instances_created.fetch_add(1, Ordering::Relaxed);
    }

    fn count_init(&self) {
        self.init_calls.fetch_add(1, Ordering::Relaxed);
    }

    /// A meter for one call, with this plugin's CPU budget.
    pub fn cpu_meter(&self) -> Arc<CpuMeter> {
        CpuMeter::new(self.config.limits.timeout.0)
    }

    /// The outer deadline around a call: a backstop for time spent outside
    /// the guest's epoch checks (host calls, instantiation).
    pub fn backstop(&self) -> Duration {
        let budget = self.config.limits.timeout.0;
        let io = match self.kind {
            Kind::Fetcher(_) => super::http_client::REQUEST_TIMEOUT * 2,
            Kind::Transformer(_) => Duration::ZERO,
        };
        budget * 2 + io + Duration::from_secs(1)
    }

    /// The error a caller acts on for a failed call of this plugin.
    pub fn error(&self, failure: Failure) -> PluginError {
        PluginError {
            plugin: self.name.clone(),
            kind: failure.kind,
            on_error: self.config.on_error,
            detail: failure.describe(),
            retry_after: None,
        }
    }

    pub fn instances_created(&self) -> u64 {
        self.instances_created.load(Ordering::Relaxed)
    }

    pub fn init_calls(&self) -> u64 {
        self.init_calls.load(Ordering::Relaxed)
    }

    pub fn take_idle(&self) -> Option<TransformerInstance> {
        self.idle.lock().pop()
    }

    pub fn put_idle(&self, instance: TransformerInstance) {
        if !self.config.reuse {
            return;
        }
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE_INSTANCES {
            idle.push(instance);
        }
    }
}

/// Why a plugin did not load.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("allow_hosts: {0}")]
    AllowHosts(#[from] InvalidOrigin),
    #[error("not a valid component: {0:#}")]
    Compile(wasmtime::Error),
    #[error("compilation task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("cannot link (does it import only larder:plugin and WASI?): {0:#}")]
    Link(wasmtime::Error),
    #[error("exports neither larder:plugin/transform nor larder:plugin/fetch: {0:#}")]
    NoWorld(wasmtime::Error),
    #[error("{kind} init failed ({}): {}", .failure.kind.as_str(), .failure.describe())]
    Init {
        kind: &'static str,
        failure: Failure,
    },
    #[error("init did not finish within {} ms", .0.as_millis())]
    InitTimeout(Duration),
}

/// Reads, compiles, links and probes one plugin.
pub async fn load_plugin(
    engine: &Arc<PluginEngine>,
    name: &str,
    config: &PluginConfig,
) -> Result<LoadedPlugin, LoadError> {
    let wasm = tokio::fs::read(&config.path)
        .await
        .map_err(|source| LoadError::Read {
            path: config.path.clone(),
            source,
        })?;
    load_bytes(engine, name, config, wasm).await
}

pub async fn load_bytes(
    engine: &Arc<PluginEngine>,
    name: &str,
    config: &PluginConfig,
    wasm: Vec<u8>,
) -> Result<LoadedPlugin, LoadError> {
    let allow = AllowList::parse(&config.allow_hosts)?;
    let wasm_sha256 = hex::encode(Sha256::digest(&wasm));
    let core_instances = count_core_instances(&wasm);
    let started = Instant::now();
    let compiling = engine.clone();
    let (wasm, component, compiled) = tokio::task::spawn_blocking(move || {
        compiling
            .compile(&wasm)
            .map(|(component, compiled)| (wasm, component, compiled))
    })
    .await?
    .map_err(LoadError::Compile)?;
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
    let weight = slot_weight(&component, core_instances);
    let kind = link(engine, &component)?;
    let mut plugin = LoadedPlugin {
        name: Arc::from(name),
        guest_config: config.config.clone().into_iter().collect(),
        config: config.clone(),
        kind,
        allow: Arc::new(allow),
        wasm_sha256,
        compiled,
        idle: Mutex::new(Vec::new()),
        instances_created: AtomicU64::new(0),
        weight,
        turns: Arc::new(Semaphore::new(
            usize::try_from(config.limits.concurrency).unwrap_or(usize::MAX),
        )),
        hooks: Hooks::ALL,
        pre_initialised: false,
        init_calls: AtomicU64::new(0),
    };
    if let Some(hooks) = probe_init(engine, &plugin).await? {
        plugin.hooks = hooks;
    }
    if matches!(plugin.kind, Kind::Transformer(TransformerLink::Sync(_))) {
        pre_initialise(engine, &mut plugin, wasm).await;
    }
    Ok(plugin)
}

/// Moves a sync transformer onto a snapshot taken after its `init` (cached
/// with the precompiled artifacts). Its config was just accepted by the
/// probe; if no snapshot can be taken, each instance calls `init` as before.
async fn pre_initialise(engine: &Arc<PluginEngine>, plugin: &mut LoadedPlugin, wasm: Vec<u8>) {
    let started = Instant::now();
    let held = match plugin.take_turn().await {
        Ok(turn) => turn
            .instance_slots(engine, plugin.weight)
            .await
            .map(|slots| (turn, slots)),
        Err(failure) => Err(failure),
    };
    let held = match held {
        Ok(held) => held,
        Err(failure) => {
            tracing::warn!(plugin = %plugin.name, reason = %failure.describe(), "no snapshot (no instance slot free); each instance runs init");
            return;
        }
    };
    let snapshotting = engine.clone();
    let config = plugin.guest_config.clone();
    let grants = plugin.grants(engine, None);
    let budget = plugin.config.limits.timeout.0;
    let made = tokio::task::spawn_blocking(move || {
        snapshot::pre_initialised(&snapshotting, &wasm, &config, grants, budget)
    })
    .await;
    drop(held);
    let linked = match made {
        Ok(Ok((component, taken))) => engine
            .sync_linker
            .instantiate_pre(&component)
            .and_then(TransformerV2Pre::new)
            .map(|pre| (pre, taken))
            .map_err(|error| format!("{error:#}")),
        Ok(Err(error)) => Err(error.to_string()),
        Err(panicked) => Err(format!("taking the snapshot panicked: {panicked}")),
    };
    match linked {
        Ok((pre, taken)) => {
            plugin.kind = Kind::Transformer(TransformerLink::Sync(pre));
            plugin.pre_initialised = true;
            tracing::info!(
                plugin = %plugin.name,
                elapsed_ms = started.elapsed().as_millis() as u64,
                cached = !taken,
                "instances start from a snapshot taken after init"
            );
        }
        Err(reason) => {
            tracing::warn!(plugin = %plugin.name, %reason, "no snapshot; each instance runs init");
        }
    }
}

/// Links `component` as a sync transformer if it imports nothing but
/// Larder's own transformer interfaces, else with every host import (WASI
/// included) as an async transformer or a fetcher.
fn link(engine: &PluginEngine, component: &Component) -> Result<Kind, LoadError> {
    if let Ok(pre) = engine.sync_linker.instantiate_pre(component)
        && let Ok(transformer) = TransformerV2Pre::new(pre)
    {
        return Ok(Kind::Transformer(TransformerLink::Sync(transformer)));
    }
    let pre = engine
        .linker
        .instantiate_pre(component)
        .map_err(LoadError::Link)?;
    if let Ok(transformer) = TransformerV2AsyncPre::new(pre.clone()) {
        return Ok(Kind::Transformer(TransformerLink::Async(transformer)));
    }
    Ok(match TransformerPre::new(pre.clone()) {
        Ok(transformer) => Kind::Transformer(TransformerLink::V1(transformer)),
        Err(_) => Kind::Fetcher(FetcherPre::new(pre).map_err(LoadError::NoWorld)?),
    })
}

/// Core instances a component creates when instantiated (its `core
/// instance` entries that instantiate a module), at least one.
fn count_core_instances(wasm: &[u8]) -> u32 {
    use wasmtime::wasmparser::{Instance, Parser, Payload};
    let mut count: u32 = 0;
    for payload in Parser::new(0).parse_all(wasm) {
        if let Ok(Payload::InstanceSection(instances)) = payload {
            let instantiated = instances
                .into_iter()
                .filter(|instance| matches!(instance, Ok(Instance::Instantiate { .. })))
                .count();
            count = count.saturating_add(u32::try_from(instantiated).unwrap_or(u32::MAX));
        }
    }
    count.max(1)
}

/// Pool slots one instance of `component` takes: by its core instances,
/// memories and tables, whichever needs the most slots.
fn slot_weight(component: &Component, core_instances: u32) -> u32 {
    let (memories, tables) = component
        .resources_required()
        .map_or((1, TABLES_PER_SLOT), |needed| {
            (needed.num_memories, needed.num_tables)
        });
    core_instances
        .div_ceil(CORE_INSTANCES_PER_SLOT)
        .max(memories)
        .max(tables.div_ceil(TABLES_PER_SLOT))
        .max(1)
}

/// A fresh transformer instance with `init` already called, in pool slots
/// taken within `turn`'s deadline, and the hooks its `init` declared.
pub async fn instantiate_transformer(
    engine: &PluginEngine,
    plugin: &LoadedPlugin,
    link: &TransformerLink,
    turn: &Turn,
    cpu: Arc<CpuMeter>,
) -> Result<(TransformerInstance, Hooks), Failure> {
    let slots = turn.instance_slots(engine, plugin.weight).await?;
    let grants = plugin.grants(engine, None);
    let config = &plugin.guest_config;
    let (store, bindings, hooks) = match link {
        TransformerLink::V1(pre) => {
            let mut store = new_store(&engine.engine, grants, cpu, CallStyle::Async);
            let bindings = match pre.instantiate_async(&mut store).await {
                Ok(bindings) => bindings,
                Err(error) => return Err(Failure::from_wasmtime(error, &store)),
            };
            plugin.count_init();
            let guest = bindings.larder_plugin_transform();
            let init = guest.call_init(&mut store, config).await;
            settle(init, &store, "init")?;
            (store, TransformerBindings::V1(bindings), Hooks::ALL)
        }
        TransformerLink::Async(pre) => {
            let mut store = new_store(&engine.engine, grants, cpu, CallStyle::Async);
            let bindings = match pre.instantiate_async(&mut store).await {
                Ok(bindings) => bindings,
                Err(error) => return Err(Failure::from_wasmtime(error, &store)),
            };
            plugin.count_init();
            let guest = bindings.larder_plugin_transform();
            let init = guest.call_init(&mut store, config).await;
            let hooks = settle(init.map(|r| r.map_err(guest_error_v2)), &store, "init")?;
            (
                store,
                TransformerBindings::Async(bindings),
                Hooks::from_wit(hooks),
            )
        }
        TransformerLink::Sync(pre) => {
            let mut store = new_store(&engine.engine, grants, cpu, CallStyle::Sync);
            let bindings = match pre.instantiate(&mut store) {
                Ok(bindings) => bindings,
                Err(error) => return Err(Failure::from_wasmtime(error, &store)),
            };
            let hooks = if plugin.pre_initialised {
                plugin.hooks
            } else {
                plugin.count_init();
                let guest = bindings.larder_plugin_transform();
                let init = guest.call_init(&mut store, config);
                Hooks::from_wit(settle(
                    init.map(|r| r.map_err(guest_error_v2)),
                    &store,
                    "init",
                )?)
            };
            (store, TransformerBindings::Sync(bindings), hooks)
        }
    };
    let instance = TransformerInstance {
        store,
        bindings,
        _slots: slots,
    };
    Ok((instance, hooks))
}

/// Calls `init` with the plugin's config on a throwaway instance: a plugin
/// that refuses its config, traps or hangs here is not loaded.
async fn probe_init(
    engine: &PluginEngine,
    plugin: &LoadedPlugin,
) -> Result<Option<Hooks>, LoadError> {
    let limit = plugin.backstop();
    let cpu = plugin.cpu_meter();
    let probe = async {
        let turn = plugin.take_turn().await?;
        match &plugin.kind {
            Kind::Transformer(link) => {
                instantiate_transformer(engine, plugin, link, &turn, cpu.clone())
                    .await
                    .map(|(_, hooks)| Some(hooks))
            }
            Kind::Fetcher(pre) => {
                let _slots = turn.instance_slots(engine, plugin.weight).await?;
                let grants = plugin.grants(engine, None);
                let mut store = new_store(&engine.engine, grants, cpu.clone(), CallStyle::Async);
                let bindings = pre
                    .instantiate_async(&mut store)
                    .await
                    .map_err(|e| Failure::from_wasmtime(e, &store))?;
                let init = bindings
                    .larder_plugin_fetch()
                    .call_init(&mut store, &plugin.guest_config)
                    .await;
                settle(init, &store, "init").map(|()| None)
            }
        }
    };
    match tokio::time::timeout(limit, cpu.run(probe)).await {
        Ok(Ok(hooks)) => Ok(hooks),
        Ok(Err(failure)) => Err(LoadError::Init {
            kind: plugin.kind.as_str(),
            failure,
        }),
        Err(_) => Err(LoadError::InitTimeout(limit)),
    }
}
