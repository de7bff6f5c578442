//! The per-plugin circuit breaker: after repeated consecutive failures the
//! plugin is not called for a backoff period (5 s, doubling up to 60 s);
//! then one trial call is let through (half-open), and its outcome closes
//! the circuit or opens it again for longer.
//!
//! Must not decide what a skipped call means: the caller applies `on_error`.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Consecutive failures that open the circuit.
pub const FAILURE_THRESHOLD: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Call,
    /// The circuit is open: do not call the plugin.
    Skip,
}

#[derive(Debug)]
pub struct Breaker {
    state: Mutex<BreakerState>,
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
        }
    }
}

impl Breaker {
    pub fn admit(&self, now: Instant) -> Admission {
        let mut state = self.state.lock();
        match state.open_until {
            None => Admission::Call,
            Some(until) if now < until => Admission::Skip,
            Some(_) if state.trial_in_flight => Admission::Skip,
            Some(_) => {
                state.trial_in_flight = true;
                Admission::Call
            }
        }
    }

    pub fn record_success(&self) {
        let mut state = self.state.lock();
        state.consecutive_failures = 0;
        state.open_until = None;
        state.backoff = FIRST_BACKOFF;
        state.trial_in_flight = false;
    }

    /// Records a failure; returns true when this failure opened the circuit.
    pub fn record_failure(&self, now: Instant) -> bool {
        let mut state = self.state.lock();
        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
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
        self.state.lock().open_until.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(breaker: &Breaker, now: Instant, times: u32) {
        for _ in 0..times {
            assert_eq!(breaker.admit(now), Admission::Call);
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
        assert_eq!(breaker.admit(now + FIRST_BACKOFF), Admission::Call);
        // Only one trial at a time while half-open.
        assert_eq!(breaker.admit(now + FIRST_BACKOFF), Admission::Skip);
    }

    #[test]
    fn a_failed_trial_doubles_the_backoff_and_a_good_one_closes() {
        let breaker = Breaker::default();
        let start = Instant::now();
        fail(&breaker, start, FAILURE_THRESHOLD);
        let trial = start + FIRST_BACKOFF;
        assert_eq!(breaker.admit(trial), Admission::Call);
        assert!(breaker.record_failure(trial));
        assert_eq!(breaker.admit(trial + FIRST_BACKOFF), Admission::Skip);
        let second_trial = trial + FIRST_BACKOFF * 2;
        assert_eq!(breaker.admit(second_trial), Admission::Call);
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
            assert_eq!(breaker.admit(now), Admission::Call);
            breaker.record_failure(now);
        }
        assert_eq!(breaker.admit(now + MAX_BACKOFF), Admission::Call);
    }
}
