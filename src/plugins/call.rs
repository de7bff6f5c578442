//! What can go wrong in one call into a guest, named: a returned error, a
//! trap (panic, unreachable), the time limit, the memory limit, a body too
//! large to hand over, an open circuit, no capacity to run it. Also a
//! call's turn: the plugin's concurrency permit and the pool slots, both
//! waited for at most `queue_timeout`.
//!
//! Must not keep a store that failed: a trapped instance cannot be entered
//! again, so every failure drops it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::time::Instant;
use wasmtime::Store;

use super::bindings::GuestError;
use super::engine::PluginEngine;
use super::store::{CpuBudgetExceeded, Refusal, StoreState};

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
    /// No turn, pool slot or memory was free in time: the process is at
    /// capacity. Not the plugin's fault; it does not count toward its breaker.
    Capacity,
    /// The guest's answer broke a rule for output (too many or too large
    /// headers, a body over the cap, a status that is not final).
    BadOutput,
    /// The response body broke while it was read for the guest: the
    /// upstream's fault, not the plugin's, but the request cannot go on.
    BodyUnreadable,
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
            Self::Capacity => "capacity",
            Self::BadOutput => "bad_output",
            Self::BodyUnreadable => "body_unreadable",
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
        let kind = if state.limits.refused == Some(Refusal::TotalBudget)
            || error
                .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
                .is_some()
        {
            FailureKind::Capacity
        } else if state.limits.refused == Some(Refusal::PluginCap) {
            FailureKind::Oom
        } else if error.downcast_ref::<CpuBudgetExceeded>().is_some() {
            FailureKind::Timeout
        } else if error.downcast_ref::<wasmtime::Trap>().is_some() {
            FailureKind::Trap
        } else {
            FailureKind::Error
        };
        // The error and its causes (the wasm backtrace among them), without
        // the host's own stack trace that `{:?}` adds under RUST_BACKTRACE.
        let mut detail = format!("{error:#}");
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

impl FailureKind {
    /// Whether the plugin could not run at all (rather than ran and failed):
    /// such a call proves nothing about the plugin's health.
    pub fn is_unavailable(self) -> bool {
        matches!(self, Self::CircuitOpen | Self::Capacity)
    }
}

/// One call's right to run: a permit of its plugin's `limits.concurrency`,
/// and the deadline (`limits.queue_timeout` from the start of the wait)
/// for anything else it must wait for before the guest runs.
pub struct Turn {
    permit: Option<OwnedSemaphorePermit>,
    /// `None` when the turn was free at once: nothing has waited yet, and
    /// a later wait starts the clock.
    deadline: Option<Instant>,
    /// The `queue_timeout` the deadline came from, for the failure text.
    wait: Duration,
}

impl Turn {
    /// Waits for one of a plugin's `turns`, at most `wait` (its `queue_timeout`).
    pub async fn take(turns: &Arc<Semaphore>, wait: Duration) -> Result<Self, Failure> {
        // The usual case, a free turn, costs neither a clock read nor a timer.
        match Arc::clone(turns).try_acquire_owned() {
            Ok(permit) => {
                return Ok(Self {
                    permit: Some(permit),
                    deadline: None,
                    wait,
                });
            }
            Err(TryAcquireError::Closed) => return Err(unloading()),
            Err(TryAcquireError::NoPermits) => {}
        }
        let deadline = Instant::now() + wait;
        let permit = tokio::time::timeout_at(deadline, Arc::clone(turns).acquire_owned())
            .await
            .map_err(|_| queue_timeout("a turn", wait))?
            .map_err(|_| unloading())?;
        Ok(Self {
            permit: Some(permit),
            deadline: Some(deadline),
            wait,
        })
    }

    /// Takes the concurrency permit out, for a caller that must hold it
    /// past the call: the breaker records a call's outcome before the next
    /// queued call gets its turn and asks the breaker.
    pub fn take_permit(&mut self) -> Option<OwnedSemaphorePermit> {
        self.permit.take()
    }

    /// Waits (until the turn's deadline) for the pool slots one instance
    /// takes (its plugin's `weight`); the permit goes with the instance.
    pub async fn instance_slots(
        &self,
        engine: &PluginEngine,
        weight: u32,
    ) -> Result<OwnedSemaphorePermit, Failure> {
        match Arc::clone(&engine.slots).try_acquire_many_owned(weight) {
            Ok(permit) => return Ok(permit),
            Err(TryAcquireError::Closed) => return Err(shutting_down()),
            Err(TryAcquireError::NoPermits) => {}
        }
        let deadline = self.deadline.unwrap_or_else(|| Instant::now() + self.wait);
        let slots = Arc::clone(&engine.slots).acquire_many_owned(weight);
        tokio::time::timeout_at(deadline, slots)
            .await
            .map_err(|_| queue_timeout("an instance slot", self.wait))?
            .map_err(|_| shutting_down())
    }
}

fn shutting_down() -> Failure {
    Failure::new(FailureKind::Capacity, "the plugin engine is shutting down")
}

fn unloading() -> Failure {
    Failure::new(FailureKind::Capacity, "the plugin is unloading")
}

fn queue_timeout(what: &str, wait: Duration) -> Failure {
    Failure::new(
        FailureKind::Capacity,
        format!(
            "no {what} free within {} ms (queue_timeout)",
            wait.as_millis()
        ),
    )
}
