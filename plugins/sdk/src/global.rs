//! State a plugin keeps between `init` and its hooks, without std's
//! `thread_local!`.

use core::cell::RefCell;

/// A global value for a single-threaded guest: `init` stores the parsed
/// config, the hooks read it. Never assume it survives to the next request
/// (a fresh instance starts from scratch).
pub struct Global<T>(RefCell<T>);

// SAFETY: a wasm32 guest instance runs on one thread; Larder never enters
// an instance from two threads at once.
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    pub const fn new(value: T) -> Self {
        Self(RefCell::new(value))
    }

    /// Runs `f` with the value (a hook reading the config).
    pub fn with<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        f(&self.0.borrow())
    }

    /// Replaces the value (`init` storing the config).
    pub fn set(&self, value: T) {
        *self.0.borrow_mut() = value;
    }

    /// Runs `f` with the value mutably.
    pub fn with_mut<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        f(&mut self.0.borrow_mut())
    }
}
