//! The per-plugin circuit breaker: after repeated consecutive failures the
//! plugin is not called for a backoff period (5 s, doubling up to 60 s);
//! then one trial call is let through (half-open), and its outcome closes
//! the circuit or opens it again for longer.
//!
//! A trial that never reports (its call was cancelled: the client left, an
//! HTTP/2 stream was reset, a source run timed out) is released, so the next
//! call becomes the trial: the breaker cannot stay open for good.
//!
//! Must not decide what a skipped call means: the caller applies `on_error`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Consecutive failures that open the circuit.
pub const FAILURE_THRESHOLD: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Call,
    /// The one call let through while half-open: its outcome decides. A
    /// caller that ends without recording one calls [`Breaker::release_trial`].
    Trial,
    /// The circuit is open: do not call the plugin.
    Skip,
}

#[derive(Debug)]
pub struct Breaker {
    state: Mutex<BreakerState>,
    /// Nothing on record (no failure since the last success, closed, no
    /// trial): the usual case, answered without the lock or the clock.
    clear: AtomicBool,
}

#[derive(Debug)]
struct BreakerState {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    backoff: Duration,
    trial_in_flight: bool,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            state: Mutex::new(BreakerState {
                consecutive_failures: 0,
                open_until: None,
                backoff: FIRST_BACKOFF,
                trial_in_flight: false,
            }),
            clear: AtomicBool::new(true),
        }
    }
}

impl BreakerState {
    fn is_clear(&self) -> bool {
        self.consecutive_failures == 0 && self.open_until.is_none() && !self.trial_in_flight
    }
}

impl Breaker {
    fn is_clear(&self) -> bool {
        self.clear.load(Ordering::Acquire)
    }

    fn publish(&self, state: &BreakerState) {
        self.clear.store(state.is_clear(), Ordering::Release);
    }

    /// [`Self::admit`] at the present time; the clock is read only when
    /// the breaker has something on record.
    pub fn admit_now(&self) -> Admission {
        if self.is_clear() {
            return Admission::Call;
        }
        self.admit(Instant::now())
    }

    /// [`Self::is_skipping`] at the present time, reading the clock only
    /// when the breaker has something on record.
    pub fn is_skipping_now(&self) -> bool {
        !self.is_clear() && self.is_skipping(Instant::now())
    }

    pub fn admit(&self, now: Instant) -> Admission {
        let mut state = self.state.lock();
        match state.open_until {
            None => Admission::Call,
            Some(until) if now < until => Admission::Skip,
            Some(_) if state.trial_in_flight => Admission::Skip,
            Some(_) => {
                state.trial_in_flight = true;
                self.publish(&state);
                Admission::Trial
            }
        }
    }

    /// Whether a call now would be skipped, without taking the trial.
    pub fn is_skipping(&self, now: Instant) -> bool {
        let state = self.state.lock();
        match state.open_until {
            None => false,
            Some(until) => now < until || state.trial_in_flight,
        }
    }

    /// A trial ended without an outcome (cancelled, or it failed for want
    /// of capacity rather than by the plugin): the next call tries again.
    pub fn release_trial(&self) {
        let mut state = self.state.lock();
        state.trial_in_flight = false;
        self.publish(&state);
    }

    /// Closes the circuit and forgets past failures (a new build of the
    /// plugin, or a reload that changed it, starts with a clean record).
    pub fn reset(&self) {
        let mut state = self.state.lock();
        state.consecutive_failures = 0;
        state.open_until = None;
        state.backoff = FIRST_BACKOFF;
        state.trial_in_flight = false;
        self.publish(&state);
    }

    /// Whole seconds until the next trial may run (at least 1), for a
    /// client's `Retry-After`.
    pub fn retry_after(&self, now: Instant) -> u64 {
        let state = self.state.lock();
        let remaining = state
            .open_until
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(now));
        remaining.as_secs().max(1)
    }

    /// Records a success; returns true when the breaker had something on
    /// record (its circuit may have closed).
    pub fn record_success(&self) -> bool {
        if self.is_clear() {
            return false;
        }
        let mut state = self.state.lock();
        state.consecutive_failures = 0;
        state.open_until = None;
        state.backoff = FIRST_BACKOFF;
        state.trial_in_flight = false;
        self.publish(&state);
        true
    }

    /// Records a failure; returns true when this failure opened the circuit.
    pub fn record_failure(&self, now: Instant) -> bool {
        let mut state = self.state.lock();
        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        self.publish(&state);
        if state.trial_in_flight {
            state.trial_in_flight = false;
            state.backoff = (state.backoff * 2).min(MAX_BACKOFF);
            state.open_until = Some(now + state.backoff);
            return true;
        }
        if state.open_until.is_none() && state.consecutive_failures >= FAILURE_THRESHOLD {
            state.open_until = Some(now + state.backoff);
            return true;
        }
        false
    }

    pub fn is_open(&self) -> bool {
        !self.is_clear() && self.state.lock().open_until.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(breaker: &Breaker, now: Instant, times: u32) {
        for _ in 0..times {
            assert_ne!(breaker.admit(now), Admission::Skip);
            breaker.record_failure(now);
        }
    }

    #[test]
    fn stays_closed_below_the_threshold_and_a_success_resets_the_count() {
        let breaker = Breaker::default();
        let now = Instant::now();
        fail(&breaker, now, FAILURE_THRESHOLD - 1);
        breaker.record_success();
        fail(&breaker, now, FAILURE_THRESHOLD - 1);
        assert!(!breaker.is_open());
        assert_eq!(breaker.admit(now), Admission::Call);
    }

    #[test]
    fn opens_after_the_threshold_and_skips_until_the_backoff_ends() {
        let breaker = Breaker::default();
        let now = Instant::now();
        fail(&breaker, now, FAILURE_THRESHOLD);
        assert!(breaker.is_open());
        assert_eq!(breaker.admit(now + Duration::from_secs(4)), Admission::Skip);
        assert_eq!(breaker.admit(now + FIRST_BACKOFF), Admission::Trial);
        // Only one trial at a time while half-open.
        assert_eq!(breaker.admit(now + FIRST_BACKOFF), Admission::Skip);
    }

    #[test]
    fn a_failed_trial_doubles_the_backoff_and_a_good_one_closes() {
        let breaker = Breaker::default();
        let start = Instant::now();
        fail(&breaker, start, FAILURE_THRESHOLD);
        let trial = start + FIRST_BACKOFF;
        assert_eq!(breaker.admit(trial), Admission::Trial);
        assert!(breaker.record_failure(trial));
        assert_eq!(breaker.admit(trial + FIRST_BACKOFF), Admission::Skip);
        let second_trial = trial + FIRST_BACKOFF * 2;
        assert_eq!(breaker.admit(second_trial), Admission::Trial);
        breaker.record_success();
        assert!(!breaker.is_open());
        assert_eq!(breaker.admit(second_trial), Admission::Call);
    }

    #[test]
    fn backoff_never_exceeds_the_maximum() {
        let breaker = Breaker::default();
        let mut now = Instant::now();
        fail(&breaker, now, FAILURE_THRESHOLD);
        for _ in 0..10 {
            now += MAX_BACKOFF;
            assert_eq!(breaker.admit(now), Admission::Trial);
            breaker.record_failure(now);
        }
        assert_eq!(breaker.admit(now + MAX_BACKOFF), Admission::Trial);
    }

    #[test]
    fn a_released_trial_lets_the_next_call_try() {
        let breaker = Breaker::default();
        let now = Instant::now();
        fail(&breaker, now, FAILURE_THRESHOLD);
        let trial = now + FIRST_BACKOFF;
        assert_eq!(breaker.admit(trial), Admission::Trial);
        assert_eq!(breaker.admit(trial), Admission::Skip);
        breaker.release_trial();
        assert_eq!(breaker.admit(trial), Admission::Trial);
    }

    #[test]
    fn only_a_breaker_with_nothing_on_record_skips_its_lock() {
        let breaker = Breaker::default();
        let now = Instant::now();
        assert!(breaker.is_clear());
        assert!(!breaker.record_success(), "nothing to clear");
        fail(&breaker, now, 1);
        assert!(!breaker.is_clear());
        assert!(breaker.record_success());
        assert!(breaker.is_clear());
        fail(&breaker, now, FAILURE_THRESHOLD);
        assert!(breaker.is_skipping_now());
        assert_eq!(breaker.admit_now(), Admission::Skip);
        let trial = now + FIRST_BACKOFF;
        assert_eq!(breaker.admit(trial), Admission::Trial);
        breaker.release_trial();
        assert!(!breaker.is_clear(), "still open: failures on record");
    }

    #[test]
    fn a_reset_closes_the_circuit() {
        let breaker = Breaker::default();
        let now = Instant::now();
        fail(&breaker, now, FAILURE_THRESHOLD);
        assert_eq!(breaker.retry_after(now), FIRST_BACKOFF.as_secs());
        breaker.reset();
        assert!(!breaker.is_open());
        assert_eq!(breaker.admit(now), Admission::Call);
        fail(&breaker, now, FAILURE_THRESHOLD - 1);
        assert!(!breaker.is_open(), "the count started again");
    }
}
