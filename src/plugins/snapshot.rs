//! Pre-initialised transformers: a 0.2.0 transformer that imports nothing
//! but Larder's own interfaces is instantiated once, given its config
//! through `init`, and snapshotted (wasmtime-wizer), so every fresh
//! instance starts with its config already applied and calls no `init`.
//! Isolation is unchanged: each request still gets an instance of its own,
//! made from the snapshot's bytes as it would be from the original's.
//!
//! The snapshot is compiled once and kept in the artifact cache under a key
//! of the wasm, the config and the engine, so a restart loads it as it loads
//! any precompiled plugin.
//!
//! Owns taking and caching the snapshot. Must not run anything in the guest
//! but `init` and wizer's state accessors; when to use a snapshot (and what
//! to do when one cannot be taken) is the loader's.

use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use wasmtime::component::{Component, Instance, Lift, WasmList};
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wizer::{ComponentInstanceState, Wizer};

use super::bindings::transformer_v2::Transformer;
use super::engine::PluginEngine;
use super::store::{CallStyle, CpuMeter, Grants, GuestRunning, StoreState, new_store};

/// Why a transformer runs `init` per instance instead of starting from a
/// snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot instrument the component: {0:#}")]
    Instrument(wasmtime::Error),
    #[error("cannot compile the instrumented component: {0:#}")]
    Compile(wasmtime::Error),
    #[error("cannot instantiate the instrumented component: {0:#}")]
    Instantiate(wasmtime::Error),
    #[error("init failed on the instrumented component: {0}")]
    Init(String),
    #[error("cannot read the initialised state: {0}")]
    Read(String),
}

/// The component to instantiate for `wasm` configured with `config`: the
/// cached snapshot, or one taken now (instantiating in the pool slot the
/// caller holds, `init` stopped after `budget` of wall time). Blocking:
/// call it from `spawn_blocking`. Returns whether a snapshot was taken.
pub fn pre_initialised(
    engine: &PluginEngine,
    wasm: &[u8],
    config: &[(String, String)],
    grants: Grants,
    budget: Duration,
) -> Result<(Component, bool), SnapshotError> {
    let key = engine.snapshot_key(wasm, config);
    if let Some(component) = engine.cached(&key) {
        return Ok((component, false));
    }
    let snapshot = take(engine, wasm, config, grants, budget)?;
    let component = engine
        .compile_under(&key, &snapshot)
        .map_err(SnapshotError::Compile)?;
    Ok((component, true))
}

/// Instruments `wasm`, runs its `init(config)` and writes the initialised
/// memories and globals into a new component.
fn take(
    engine: &PluginEngine,
    wasm: &[u8],
    config: &[(String, String)],
    grants: Grants,
    budget: Duration,
) -> Result<Vec<u8>, SnapshotError> {
    let wizer = Wizer::new();
    let (context, instrumented) = wizer
        .instrument_component(wasm)
        .map_err(SnapshotError::Instrument)?;
    let component =
        Component::new(&engine.engine, &instrumented).map_err(SnapshotError::Compile)?;
    let mut store = new_store(
        &engine.engine,
        grants,
        CpuMeter::new(budget),
        CallStyle::Sync,
    );
    stop_after(&mut store, budget);
    // Counted as a running guest, so the epoch ticks every millisecond.
    let _running = GuestRunning::start();
    let instance = engine
        .sync_linker
        .instantiate(&mut store, &component)
        .map_err(SnapshotError::Instantiate)?;
    let bindings = Transformer::new(&mut store, &instance).map_err(SnapshotError::Instantiate)?;
    match bindings
        .larder_plugin_transform()
        .call_init(&mut store, &config.to_vec())
    {
        Ok(Ok(_hooks)) => {}
        Ok(Err(refused)) => return Err(SnapshotError::Init(format!("{refused:?}"))),
        Err(trap) => return Err(SnapshotError::Init(format!("{trap:#}"))),
    }
    store.data().output.flush();
    let mut state = InitialisedState {
        store: &mut store,
        instance,
        error: None,
    };
    let snapshot = finish_now(wizer.snapshot_component(&context, &mut state))
        .ok_or_else(|| SnapshotError::Read("the snapshot waited for something".into()))?
        .map_err(|error| SnapshotError::Read(format!("{error:#}")))?;
    match state.error {
        Some(error) => Err(SnapshotError::Read(error)),
        None => Ok(snapshot),
    }
}

/// A plain call cannot yield, and the CPU meter charges only calls it runs:
/// here the epoch ticks themselves (one per millisecond while a guest runs)
/// bound `init`.
fn stop_after(store: &mut Store<StoreState>, budget: Duration) {
    let mut ticks_left = budget.as_millis().max(1);
    store.epoch_deadline_callback(move |_| {
        ticks_left = ticks_left.saturating_sub(1);
        if ticks_left == 0 {
            Err(wasmtime::format_err!(
                "init ran past its CPU budget while being snapshotted"
            ))
        } else {
            Ok(UpdateDeadline::Continue(1))
        }
    });
    store.set_epoch_deadline(1);
}

/// Drives a future that never waits (every step of the snapshot is a plain
/// call into the instance) to its end; `None` if it did wait.
fn finish_now<F: Future>(future: F) -> Option<F::Output> {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => Some(output),
        Poll::Pending => None,
    }
}

/// Wizer's view of the initialised instance: its accessor exports called
/// as plain functions. The trait's methods cannot fail, so the first error
/// is kept and the snapshot discarded for it.
struct InitialisedState<'a> {
    store: &'a mut Store<StoreState>,
    instance: Instance,
    error: Option<String>,
}

impl InitialisedState<'_> {
    fn call<R: Lift + 'static>(&mut self, instance: &str, func: &str) -> Option<R> {
        let found = self
            .instance
            .get_export_index(&mut *self.store, None, instance)
            .and_then(|exported| {
                self.instance
                    .get_export_index(&mut *self.store, Some(&exported), func)
            });
        let Some(index) = found else {
            self.error
                .get_or_insert(format!("no export {instance}#{func}"));
            return None;
        };
        let called = self
            .instance
            .get_typed_func::<(), (R,)>(&mut *self.store, index)
            .and_then(|typed| typed.call(&mut *self.store, ()));
        match called {
            Ok((value,)) => Some(value),
            Err(error) => {
                self.error
                    .get_or_insert(format!("{instance}#{func}: {error:#}"));
                None
            }
        }
    }
}

impl ComponentInstanceState for InitialisedState<'_> {
    async fn call_func_ret_list_u8(
        &mut self,
        instance: &str,
        func: &str,
        contents: impl FnOnce(&[u8]) + Send,
    ) {
        match self.call::<WasmList<u8>>(instance, func) {
            Some(list) => contents(list.as_le_slice(&*self.store)),
            None => contents(&[]),
        }
    }

    async fn call_func_ret_s32(&mut self, instance: &str, func: &str) -> i32 {
        self.call(instance, func).unwrap_or_default()
    }

    async fn call_func_ret_s64(&mut self, instance: &str, func: &str) -> i64 {
        self.call(instance, func).unwrap_or_default()
    }

    async fn call_func_ret_f32(&mut self, instance: &str, func: &str) -> u32 {
        self.call::<f32>(instance, func)
            .unwrap_or_default()
            .to_bits()
    }

    async fn call_func_ret_f64(&mut self, instance: &str, func: &str) -> u64 {
        self.call::<f64>(instance, func)
            .unwrap_or_default()
            .to_bits()
    }
}
