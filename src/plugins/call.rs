//! What can go wrong in one call into a guest, named: a returned error, a
//! trap (panic, unreachable), the time limit, the memory limit, a body too
//! large to hand over, an open circuit. Also the load-time `init` probe.
//!
//! Must not keep a store that failed: a trapped instance cannot be entered
//! again, so every failure drops it.

use std::time::Duration;

use wasmtime::Store;

use super::bindings::GuestError;
use super::engine::{CpuBudgetExceeded, PluginEngine, StoreState, new_store};
use super::loader::{Kind, LoadedPlugin, instantiate_transformer};

/// Longest failure detail kept for the log.
const MAX_DETAIL_BYTES: usize = 4096;

/// The export being called; each has its own circuit breaker, so a plugin
/// that always fails in one hook cannot be kept "healthy" by another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    OnRequest = 0,
    OnResponse = 1,
    Run = 2,
}

impl Hook {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OnRequest => "on_request",
            Self::OnResponse => "on_response",
            Self::Run => "run",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The guest returned a `plugin-error`.
    Error,
    Trap,
    Timeout,
    Oom,
    /// The body was too large to hand to the guest.
    TooLarge,
    /// The circuit breaker is open; the guest was not called.
    CircuitOpen,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Trap => "trap",
            Self::Timeout => "timeout",
            Self::Oom => "oom",
            Self::TooLarge => "too_large",
            Self::CircuitOpen => "circuit_open",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: FailureKind,
    pub detail: String,
    /// The tail of what the guest wrote to stderr during the call.
    pub stderr: String,
}

impl Failure {
    pub fn new(kind: FailureKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            stderr: String::new(),
        }
    }

    /// Classifies a wasmtime error from a call into `store`.
    pub fn from_wasmtime(error: wasmtime::Error, store: &Store<StoreState>) -> Self {
        let state = store.data();
        state.output.flush();
        let kind = if state.limits.refused_growth {
            FailureKind::Oom
        } else if error.downcast_ref::<CpuBudgetExceeded>().is_some() {
            FailureKind::Timeout
        } else if error.downcast_ref::<wasmtime::Trap>().is_some() {
            FailureKind::Trap
        } else {
            FailureKind::Error
        };
        let mut detail = format!("{error:?}");
        truncate(&mut detail);
        Self {
            kind,
            detail,
            stderr: state.output.stderr_tail(),
        }
    }

    pub fn from_guest(error: GuestError, store: &Store<StoreState>, during: &str) -> Self {
        store.data().output.flush();
        let detail = match error {
            GuestError::InvalidConfig(why) => format!("{during}: invalid config: {why}"),
            GuestError::Upstream(why) => format!("{during}: upstream: {why}"),
            GuestError::Internal(why) => format!("{during}: {why}"),
        };
        Self {
            kind: FailureKind::Error,
            detail,
            stderr: store.data().output.stderr_tail(),
        }
    }

    pub fn timed_out(limit: Duration) -> Self {
        Self::new(
            FailureKind::Timeout,
            format!("no answer within {} ms (outer limit)", limit.as_millis()),
        )
    }

    /// One line for the log: the detail, and the guest's stderr if any.
    pub fn describe(&self) -> String {
        if self.stderr.is_empty() {
            self.detail.clone()
        } else {
            format!("{} (guest stderr: {})", self.detail, self.stderr)
        }
    }
}

fn truncate(text: &mut String) {
    if text.len() > MAX_DETAIL_BYTES {
        let mut end = MAX_DETAIL_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

/// Turns the result of one export call into the value or a [`Failure`].
pub fn settle<T>(
    result: wasmtime::Result<Result<T, GuestError>>,
    store: &Store<StoreState>,
    during: &str,
) -> Result<T, Failure> {
    store.data().output.flush();
    match result {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(guest)) => Err(Failure::from_guest(guest, store, during)),
        Err(error) => Err(Failure::from_wasmtime(error, store)),
    }
}

/// Waits for a free instance slot (see [`PluginEngine::calls`]).
pub async fn permit(engine: &PluginEngine) -> Result<tokio::sync::SemaphorePermit<'_>, Failure> {
    engine
        .calls
        .acquire()
        .await
        .map_err(|_| Failure::new(FailureKind::Error, "the plugin engine is shutting down"))
}

/// The outer deadline around a call: a backstop for time spent outside the
/// guest's epoch checks (host calls, instantiation).
pub fn backstop(plugin: &LoadedPlugin) -> Duration {
    let budget = plugin.config.limits.timeout.0;
    let io = match plugin.kind {
        Kind::Fetcher(_) => super::http_client::REQUEST_TIMEOUT * 2,
        Kind::Transformer(_) => Duration::ZERO,
    };
    budget * 2 + io + Duration::from_secs(1)
}

/// Calls `init` with the plugin's config on a throwaway instance: a plugin
/// that refuses its config, traps or hangs here is not loaded.
pub async fn probe_init(engine: &PluginEngine, plugin: &LoadedPlugin) -> Result<(), String> {
    let limit = backstop(plugin);
    let probe = async {
        match &plugin.kind {
            Kind::Transformer(pre) => instantiate_transformer(engine, plugin, pre)
                .await
                .map(|_| ()),
            Kind::Fetcher(pre) => {
                let mut store = new_store(engine, plugin.grants(None));
                let bindings = pre
                    .instantiate_async(&mut store)
                    .await
                    .map_err(|e| Failure::from_wasmtime(e, &store))?;
                let init = bindings
                    .larder_plugin_fetch()
                    .call_init(&mut store, &plugin.guest_config)
                    .await;
                settle(init, &store, "init")
            }
        }
    };
    match tokio::time::timeout(limit, probe).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(failure)) => Err(format!(
            "{} init failed ({}): {}",
            plugin.kind.as_str(),
            failure.kind.as_str(),
            failure.describe()
        )),
        Err(_) => Err(format!(
            "init did not finish within {} ms",
            limit.as_millis()
        )),
    }
}
