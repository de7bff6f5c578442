//! A plugin by name across reloads: its current build, one circuit
//! breaker per hook, its counters and metric handles, and the watch on its
//! `.wasm` file.
//!
//! Must not judge failures: `attempt` in the host records them here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use super::breaker::Breaker;
use super::call::Hook;
use super::engine::PluginEngine;
use super::loader::{LoadedPlugin, load_bytes};
use crate::watch::FileWatch;

/// One plugin's counters, as the admin side and tests read them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginStats {
    /// Calls that reached the guest, including those running now.
    pub invocations: u64,
    pub failures: u64,
    /// Calls not made because the circuit was open.
    pub skipped: u64,
    /// Calls that could not run for want of capacity (a turn, a pool slot
    /// or memory within the total budget); not counted as failures.
    pub capacity: u64,
    /// Builds compiled from wasm (as opposed to loaded precompiled).
    pub compilations: u64,
    /// Changed plugin files whose new build was refused (the old one kept).
    pub rejected_builds: u64,
    /// Whether the current build was compiled (false: loaded precompiled).
    pub compiled: bool,
    /// Instances the current build made for calls.
    pub instances_created: u64,
    /// `init` calls on the current build's instances, the load-time check
    /// included (a pre-initialised build makes only that one).
    pub init_calls: u64,
    /// Whether the current build's instances start from a snapshot taken
    /// after `init`.
    pub pre_initialised: bool,
    pub circuit_open: bool,
    /// `trap`, `timeout`, `oom`, `error` or `too_large` of the latest failure.
    pub last_failure_kind: Option<&'static str>,
    /// The latest failure's detail, with the guest's stderr.
    pub last_failure: Option<String>,
    pub kind: &'static str,
    /// `sync` (a guest without WASI, called without fibers) or `async`.
    pub calls: &'static str,
    /// The `larder:plugin` version the plugin was built against.
    pub wit: &'static str,
    /// The hooks the plugin declared (`on_request`, `on_response`, ...).
    pub hooks: Vec<&'static str>,
    pub wasm_sha256: String,
}

#[derive(Default)]
pub struct Counters {
    pub invocations: AtomicU64,
    pub failures: AtomicU64,
    pub skipped: AtomicU64,
    pub capacity: AtomicU64,
    pub compilations: AtomicU64,
    pub rejected_builds: AtomicU64,
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
    /// The watch on the `.wasm` file; replaced when the path changes.
    pub watch: Mutex<Option<FileWatch>>,
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

impl PluginStats {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": self.kind,
            "calls": self.calls,
            "wit": self.wit,
            "hooks": self.hooks,
            "invocations": self.invocations,
            "failures": self.failures,
            "skipped": self.skipped,
            "capacity": self.capacity,
            "circuit_open": self.circuit_open,
            "last_failure_kind": self.last_failure_kind,
            "last_failure": self.last_failure,
            "instances_created": self.instances_created,
            "init_calls": self.init_calls,
            "pre_initialised": self.pre_initialised,
            "compilations": self.compilations,
            "rejected_builds": self.rejected_builds,
            "compiled": self.compiled,
            "wasm_sha256": self.wasm_sha256,
        })
    }
}

impl PluginSlot {
    pub fn new(plugin: LoadedPlugin) -> Arc<Self> {
        let slot = Arc::new(Self {
            name: plugin.name.clone(),
            counters: Counters::default(),
            metrics: SlotMetrics::new(&plugin.name),
            breakers: Default::default(),
            current: ArcSwap::from_pointee(plugin),
            watch: Mutex::new(None),
        });
        slot.count_build(&slot.current.load());
        slot
    }

    /// Puts a new build in place; its breakers start closed (the failures
    /// were the old build's, or its old configuration's).
    pub fn swap(&self, plugin: LoadedPlugin) {
        self.count_build(&plugin);
        self.current.store(Arc::new(plugin));
        for breaker in &self.breakers {
            breaker.reset();
        }
        self.metrics.circuit_open.set(0.0);
    }

    fn count_build(&self, plugin: &LoadedPlugin) {
        if plugin.compiled {
            self.counters.compilations.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn breaker(&self, hook: Hook) -> &Breaker {
        &self.breakers[hook as usize]
    }

    /// Whether any of the plugin's hooks is currently not being called.
    pub fn is_circuit_open(&self) -> bool {
        self.breakers.iter().any(Breaker::is_open)
    }

    /// Sets `larder_plugin_circuit_open` after a breaker changed.
    pub fn publish_circuit(&self) {
        let open = if self.is_circuit_open() { 1.0 } else { 0.0 };
        self.metrics.circuit_open.set(open);
    }

    pub fn stats(&self) -> PluginStats {
        use std::sync::atomic::Ordering::Relaxed;
        let current = self.current.load();
        let last_failure = self.counters.last_failure.lock().clone();
        PluginStats {
            last_failure_kind: last_failure.as_ref().map(|(kind, _)| *kind),
            last_failure: last_failure.map(|(_, detail)| detail),
            invocations: self.counters.invocations.load(Relaxed),
            failures: self.counters.failures.load(Relaxed),
            skipped: self.counters.skipped.load(Relaxed),
            capacity: self.counters.capacity.load(Relaxed),
            compilations: self.counters.compilations.load(Relaxed),
            rejected_builds: self.counters.rejected_builds.load(Relaxed),
            compiled: current.compiled,
            instances_created: current.instances_created(),
            init_calls: current.init_calls(),
            pre_initialised: current.pre_initialised,
            circuit_open: self.is_circuit_open(),
            kind: current.kind.as_str(),
            calls: current.kind.call_style().as_str(),
            wit: current.kind.wit_version(),
            hooks: current.declared_hooks(),
            wasm_sha256: current.wasm_sha256.clone(),
        }
    }
}

/// Watches the plugin's file and rebuilds it when it changes. The watch
/// lives in the slot; the task ends when the slot is dropped.
pub fn watch(engine: Arc<PluginEngine>, slot: &Arc<PluginSlot>) {
    let path = slot.current.load().config.path.clone();
    let (file_watch, mut changes) = match crate::watch::file(&path) {
        Ok(watch) => watch,
        Err(error) => {
            tracing::warn!(plugin = &*slot.name, %error, "cannot watch the plugin file; edits need a reload");
            return;
        }
    };
    *slot.watch.lock() = Some(file_watch);
    let slot: Weak<PluginSlot> = Arc::downgrade(slot);
    tokio::spawn(async move {
        while changes.next().await {
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
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(plugin = &*slot.name, %reason, "plugin file changed but the new build is broken; keeping the running build");
        }
    }
}
