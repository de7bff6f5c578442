//! The thread sources run on: a tokio runtime of their own on an OS thread
//! of lower priority. A thousand sources on the same second make a burst of
//! work (reads, hashing, swaps); in the proxy's runtime that burst would
//! queue ahead of requests and show up as tail latency. Here the kernel
//! lets a waking request worker go first.
//!
//! Must not hold anything the request path waits on: requests read the
//! sources' values through lock-free snapshots.

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// How much lower than the proxy's threads the sources' threads run (a
/// nice value; blocking-pool threads inherit it).
const NICENESS: i32 = 10;

/// The sources' runtime; dropping it stops the thread and every task on it.
pub struct Background {
    handle: Handle,
    _stop: Option<oneshot::Sender<()>>,
}

impl Background {
    /// Starts the thread; if that fails, the sources share the caller's
    /// runtime, which works, only with worse tail latency under bursts.
    pub fn start() -> Self {
        match Self::spawn_thread() {
            Ok(background) => background,
            Err(error) => {
                tracing::warn!(%error, "no separate thread for sources; they run on the proxy's runtime");
                Self {
                    handle: Handle::current(),
                    _stop: None,
                }
            }
        }
    }

    fn spawn_thread() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("larder-sources")
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("larder-sources".to_string())
            .spawn(move || {
                lower_priority();
                // Sender dropped (the sources are gone) ends the wait.
                let _ = runtime.block_on(stopped);
                runtime.shutdown_background();
            })?;
        Ok(Self {
            handle,
            _stop: Some(stop),
        })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

#[cfg(target_os = "linux")]
fn lower_priority() {
    // SAFETY: setpriority takes plain integers and touches no memory of
    // ours. On Linux the nice value is per thread, and `who = 0` names the
    // calling thread only, so the proxy's threads keep theirs.
    let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, NICENESS) };
    if result != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "sources thread keeps the normal priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}
