//! The threads that serve the proxy listener's connections: each runs a
//! Tokio current-thread runtime, and each accepted connection is handed to
//! one of them in turn and stays there.
//!
//! Why not the multi-thread runtime everything else runs on: its workers
//! keep the tasks they wake in a local queue of 256 and push the rest to a
//! shared queue that they look at only every few dozen polls. With a
//! thousand busy keep-alive connections the same few hundred were served
//! again and again while the others waited in the shared queue: p50 2.5 ms,
//! p99 160 ms (nginx: 10 / 11 ms). A current-thread runtime's queue is one
//! FIFO, so every ready connection gets its turn (docs/proxy.md, "Threads
//! and tuning").
//!
//! Owns: starting the threads, picking one per connection, stopping them
//! when the last user lets go. Must not accept, parse or route: the
//! listener does.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::watch;

/// The serving threads; they stop when this is dropped (after the listener
/// that uses them drained).
pub struct ServingThreads {
    runtimes: Vec<Handle>,
    next: AtomicUsize,
    stop: watch::Sender<bool>,
}

impl ServingThreads {
    /// Starts `count` threads (at least one).
    pub fn start(count: usize) -> std::io::Result<Arc<Self>> {
        let (stop, stopped) = watch::channel(false);
        let mut runtimes = Vec::with_capacity(count.max(1));
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtimes.push(runtime.handle().clone());
            let mut stopped = stopped.clone();
            std::thread::Builder::new()
                .name(format!("larder-serve-{index}"))
                .spawn(move || {
                    // The runtime runs its tasks while this waits; dropping
                    // it afterwards cancels what is left (nothing, once the
                    // listener drained).
                    runtime.block_on(async {
                        let _ = stopped.wait_for(|stop| *stop).await;
                    });
                })?;
        }
        tracing::debug!(threads = runtimes.len(), "serving threads started");
        Ok(Arc::new(Self {
            runtimes,
            next: AtomicUsize::new(0),
            stop,
        }))
    }

    /// The runtime the next connection goes to (round robin).
    pub fn pick(&self) -> &Handle {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        &self.runtimes[turn % self.runtimes.len()]
    }

    pub fn len(&self) -> usize {
        self.runtimes.len()
    }
}

impl Drop for ServingThreads {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// `server.threads`, or one per CPU the process may use (an affinity mask
/// or a cgroup CPU limit counts).
pub fn thread_count(configured: Option<usize>) -> usize {
    configured.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
