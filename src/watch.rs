//! Watching one file for changes, debounced: the config file and each
//! plugin's `.wasm` are reloaded through this. The file's directory is
//! watched, because editors save by writing a new file and renaming it, and
//! Kubernetes swaps a mounted ConfigMap by replacing its `..data` symlink.
//!
//! Must not read or act on the file: callers decide what a change means.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// How long a burst of events (a save in several writes) settles before it
/// counts as one change.
const SETTLE: Duration = Duration::from_millis(200);

/// Keeps the watch alive; dropping it ends the [`Changes`] stream.
pub struct FileWatch {
    _watcher: notify::RecommendedWatcher,
}

/// The changes of one watched file.
pub struct Changes {
    events: mpsc::Receiver<()>,
}

impl Changes {
    /// Waits for the next change and lets its burst settle; `false` once
    /// the watch is gone.
    pub async fn next(&mut self) -> bool {
        if self.events.recv().await.is_none() {
            return false;
        }
        tokio::time::sleep(SETTLE).await;
        while self.events.try_recv().is_ok() {}
        true
    }
}

/// Watches `path` for changes: writes, renames and removals of the file
/// itself or of a `..data` entry beside it.
pub fn file(path: &Path) -> Result<(FileWatch, Changes), notify::Error> {
    let name: OsString = path
        .file_name()
        .ok_or_else(|| notify::Error::generic("the path names no file").add_path(path.into()))?
        .to_owned();
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (sender, events) = mpsc::channel(1);
    let handler = move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        let is_ours = |file: &std::ffi::OsStr| file == name.as_os_str() || file == "..data";
        if event
            .paths
            .iter()
            .any(|p| p.file_name().is_some_and(is_ours))
        {
            // Full means a change is already pending: one is enough.
            let _ = sender.try_send(());
        }
    };
    let mut watcher = notify::recommended_watcher(handler)?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| e.add_path(dir))?;
    Ok((FileWatch { _watcher: watcher }, Changes { events }))
}
