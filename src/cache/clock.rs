//! The cache's wall clock: freshness, `Age` and retention read the time
//! through [`Clock`], so tests can move time instead of sleeping and
//! instances with skewed clocks can be simulated.

use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

/// Where the cache reads "now".
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The system's clock: what runs in production.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that starts at the system time and moves only when told to.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<SystemTime>,
}

impl Default for ManualClock {
    fn default() -> Self {
        Self {
            now: Mutex::new(SystemTime::now()),
        }
    }
}

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        *self.now.lock() += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.lock()
    }
}
