//! The one wasmtime engine of the process: its configuration (component
//! model, pooling allocator, epoch interruption with a ticker that ticks
//! every 1 ms while a guest runs), the
//! linker with the host imports, the instance slots that keep live
//! instances within the pool, the memory budget all instances share, and
//! the on-disk cache of precompiled components. What a single call's
//! `Store` holds is `store`'s; guest output is `output`'s.
//!
//! Must not grant a guest anything: grants are made per store.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings;
use super::store::{self, MemoryBudget, StoreState};

/// Low bytes of a linear memory reset in place when its slot is reused: a
/// Rust guest's shadow stack (1 MiB) plus its static data and first heap.
const RESET_IN_PLACE_BYTES: usize = 2 << 20;

/// Instances parked between a request's `on-request` and its `on-response`
/// at once. Each holds a pool slot while the upstream answers; past the cap,
/// the request's `on-response` simply gets another fresh instance.
const MAX_PARKED_INSTANCES: usize = 256;
/// Instance slots of the pool: one slot holds a component with up to
/// [`CORE_INSTANCES_PER_SLOT`] core instances, one memory and
/// [`TABLES_PER_SLOT`] tables; a larger component takes several slots (its
/// weight, counted at load). Running calls, parked instances and idle
/// reused ones all hold their slots, so the pool cannot run out under load:
/// a call waits for a slot (up to its plugin's `queue_timeout`) instead.
pub const POOL_SLOTS: u32 = 1300;
pub const CORE_INSTANCES_PER_SLOT: u32 = 4;
pub const TABLES_PER_SLOT: u32 = 4;

/// The process-wide engine, its linker and the artifact cache directory.
pub struct PluginEngine {
    pub engine: Engine,
    /// Every host import, WASI included, for guests called async.
    pub linker: Linker<StoreState>,
    /// The 0.2.0 transformer imports only, all sync: a guest that links
    /// against it is called without fibers.
    pub sync_linker: Linker<StoreState>,
    /// [`POOL_SLOTS`] permits; a live instance holds its plugin's weight.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// One permit per instance parked between a request's hooks.
    pub parking: Arc<tokio::sync::Semaphore>,
    /// Linear memory of every live instance together.
    pub memory: Arc<MemoryBudget>,
    cache_dir: Option<PathBuf>,
}

static SHARED: OnceLock<Result<Arc<PluginEngine>, EngineError>> = OnceLock::new();

/// Why the engine could not start (kept as text: the one engine's error is
/// shared by every later caller).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the wasm engine could not start: {0}")]
pub struct EngineError(String);

/// The engine every plugin host of this process uses (built on first use,
/// with its epoch ticker thread).
pub fn shared() -> Result<Arc<PluginEngine>, EngineError> {
    SHARED
        .get_or_init(|| PluginEngine::build().map(Arc::new))
        .clone()
}

impl PluginEngine {
    fn build() -> Result<Self, EngineError> {
        let engine = match Engine::new(&engine_config(true)) {
            Ok(engine) => engine,
            Err(error) => {
                tracing::warn!(%error, "the pooling allocator could not reserve its memory; plugins use on-demand allocation");
                Engine::new(&engine_config(false)).map_err(|e| EngineError(format!("{e:#}")))?
            }
        };
        start_epoch_ticker(&engine)
            .map_err(|e| EngineError(format!("starting the epoch ticker: {e}")))?;
        let linker = build_linker(&engine)
            .map_err(|e| EngineError(format!("linking host imports: {e:#}")))?;
        let sync_linker = build_sync_linker(&engine)
            .map_err(|e| EngineError(format!("linking host imports: {e:#}")))?;
        Ok(Self {
            engine,
            linker,
            sync_linker,
            slots: Arc::new(tokio::sync::Semaphore::new(POOL_SLOTS as usize)),
            parking: Arc::new(tokio::sync::Semaphore::new(MAX_PARKED_INSTANCES)),
            memory: MemoryBudget::new(usize::MAX),
            cache_dir: artifact_cache_dir(),
        })
    }

    /// Compiles `wasm` or loads its precompiled artifact. Blocking: call it
    /// from `spawn_blocking`. Returns whether a compilation happened.
    pub fn compile(&self, wasm: &[u8]) -> wasmtime::Result<(Component, bool)> {
        let key = self.artifact_key(wasm);
        if let Some(component) = self.cached(&key) {
            return Ok((component, false));
        }
        Ok((self.compile_under(&key, wasm)?, true))
    }

    /// The precompiled artifact stored under `key`, if there is one this
    /// process may trust.
    pub fn cached(&self, key: &str) -> Option<Component> {
        let path = self.artifact_path(key)?;
        match read_trusted_artifact(&path) {
            Ok(Some(bytes)) => {
                // SAFETY: the bytes are ones this user wrote with
                // `precompile_component` (owner, mode and hash checked)
                // under a name that includes the engine's compatibility hash.
                match unsafe { Component::deserialize(&self.engine, &bytes) } {
                    Ok(component) => Some(component),
                    Err(error) => {
                        tracing::warn!(path = %path.display(), %error, "precompiled plugin artifact unusable; compiling again");
                        None
                    }
                }
            }
            Ok(None) => None,
            Err(why) => {
                tracing::warn!(path = %path.display(), %why, "precompiled plugin artifact not trusted; compiling again");
                None
            }
        }
    }

    /// Compiles `wasm` and stores the artifact under `key` (when there is a
    /// cache directory). Blocking.
    pub fn compile_under(&self, key: &str, wasm: &[u8]) -> wasmtime::Result<Component> {
        let compiled = self.engine.precompile_component(wasm)?;
        // SAFETY: the bytes were produced just now by this engine.
        let component = unsafe { Component::deserialize(&self.engine, &compiled) }?;
        if let Some(path) = self.artifact_path(key)
            && let Err(error) = write_atomically(&path, &compiled)
        {
            tracing::warn!(path = %path.display(), %error, "could not store the precompiled plugin; the next start compiles again");
        }
        Ok(component)
    }

    fn artifact_path(&self, key: &str) -> Option<PathBuf> {
        self.cache_dir
            .as_ref()
            .map(|dir| dir.join(format!("{key}.cwasm")))
    }

    /// sha256 of the wasm bytes plus the engine's compatibility hash, so an
    /// artifact from another wasmtime build or setting is never loaded.
    fn artifact_key(&self, wasm: &[u8]) -> String {
        format!(
            "{}-{}",
            hex::encode(Sha256::digest(wasm)),
            self.engine_hash()
        )
    }

    /// The key of a transformer's snapshot taken after `init(config)`: the
    /// wasm, the config (each string length-prefixed, so no two configs
    /// collide) and the engine.
    pub fn snapshot_key(&self, wasm: &[u8], config: &[(String, String)]) -> String {
        let mut hasher = Sha256::new();
        hasher.update(Sha256::digest(wasm));
        for (key, value) in config {
            for text in [key, value] {
                hasher.update((text.len() as u64).to_le_bytes());
                hasher.update(text.as_bytes());
            }
        }
        format!(
            "snapshot-{}-{}",
            hex::encode(hasher.finalize()),
            self.engine_hash()
        )
    }

    fn engine_hash(&self) -> String {
        use std::hash::Hash as _;
        let mut hasher = ShaHasher(Sha256::new());
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        hex::encode(&hasher.0.finalize()[..8])
    }
}

/// Feeds `Hash` output into sha256, which (unlike `DefaultHasher`) is stable.
struct ShaHasher(Sha256);

impl std::hash::Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

fn engine_config(pooling: bool) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    if pooling {
        // Sized for a proxy box (e.g. 24 GiB): up to POOL_SLOTS live
        // instances at once (concurrent requests x plugins). Slots reserve
        // address space, not RAM; memory is committed only as guests touch
        // it, and each store's own limiter enforces the plugin's
        // `limits.memory` and the shared budget. Fiber stacks are needed
        // only by running calls.
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(POOL_SLOTS)
            .total_core_instances(CORE_INSTANCES_PER_SLOT * POOL_SLOTS)
            .total_memories(POOL_SLOTS)
            .total_tables(TABLES_PER_SLOT * POOL_SLOTS)
            .total_stacks(POOL_SLOTS)
            .max_memory_size(4 << 30)
            .max_unused_warm_slots(100)
            // A fresh instance per request is the default, so resetting a
            // slot is on the hot path. With PAGEMAP_SCAN (Linux 6.7+) only
            // the pages the last guest dirtied are zeroed with memset and
            // stay resident, instead of an madvise that makes the next
            // guest fault every page back in.
            .pagemap_scan(Enabled::Auto)
            .linear_memory_keep_resident(RESET_IN_PLACE_BYTES)
            .table_keep_resident(64 << 10);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    config
}

fn start_epoch_ticker(engine: &Engine) -> std::io::Result<()> {
    let engine = engine.weak();
    std::thread::Builder::new()
        .name("larder-plugin-epoch".to_string())
        .spawn(move || {
            while let Some(engine) = engine.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(store::next_tick());
            }
        })
        .map(|_| ())
}

fn build_linker(engine: &Engine) -> wasmtime::Result<Linker<StoreState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    bindings::transformer::larder::plugin::types::add_to_linker::<_, HasSelf<_>>(
        &mut linker,
        |s| s,
    )?;
    bindings::transformer::larder::plugin::log::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    bindings::fetcher::larder::plugin::http_client::add_to_linker::<_, HasSelf<_>>(
        &mut linker,
        |s| s,
    )?;
    bindings::fetcher::larder::plugin::cache::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    add_v2_imports(&mut linker)?;
    Ok(linker)
}

/// The 0.2.0 transformer imports (all sync: none of them waits).
fn add_v2_imports(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    use bindings::transformer_v2::larder::plugin::{log, request, response, types};
    types::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    log::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    request::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    response::add_to_linker::<_, HasSelf<_>>(linker, |s| s)
}

fn build_sync_linker(engine: &Engine) -> wasmtime::Result<Linker<StoreState>> {
    let mut linker = Linker::new(engine);
    add_v2_imports(&mut linker)?;
    Ok(linker)
}

/// `$LARDER_CACHE_DIR`, else `$XDG_CACHE_HOME/larder`, else `~/.cache/larder`;
/// `None` (with a warning) when none is writable.
fn artifact_cache_dir() -> Option<PathBuf> {
    let env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let base = env("LARDER_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|dir| dir.join("larder")))
        .or_else(|| env("HOME").map(|dir| dir.join(".cache").join("larder")));
    let Some(dir) = base.map(|base| base.join("plugins")) else {
        tracing::warn!(
            "no cache directory (set LARDER_CACHE_DIR); plugins are compiled at every start"
        );
        return None;
    };
    match make_private_dir(&dir).and_then(|()| probe_writable(&dir)) {
        Ok(()) => Some(dir),
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "plugin cache directory not usable; plugins are compiled at every start");
            None
        }
    }
}

/// Creates `dir` (mode 0700) or checks the one there: a directory owned by
/// this user; its mode is narrowed to 0700. Machine code loaded from a
/// directory someone else can write to would run as Larder.
fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let metadata = std::fs::symlink_metadata(dir)?;
    if !metadata.is_dir() {
        return Err(std::io::Error::other("not a directory (a symbolic link?)"));
    }
    if metadata.uid() != current_uid() {
        return Err(std::io::Error::other(format!(
            "owned by uid {}, not by this user ({})",
            metadata.uid(),
            current_uid()
        )));
    }
    if metadata.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn current_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The artifact's bytes if it may be loaded: a regular file owned by this
/// user, writable by nobody else, whose sha256 matches the one written
/// beside it. `None` when there is no artifact (yet).
fn read_trusted_artifact(path: &Path) -> Result<Option<Vec<u8>>, String> {
    use std::os::unix::fs::MetadataExt as _;
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error.to_string()),
    };
    if !metadata.is_file() {
        return Err("not a regular file".to_string());
    }
    if metadata.uid() != current_uid() {
        return Err(format!("owned by uid {}, not by this user", metadata.uid()));
    }
    if metadata.mode() & 0o022 != 0 {
        return Err("writable by others".to_string());
    }
    let expected = std::fs::read_to_string(hash_path(path))
        .map_err(|error| format!("no recorded hash: {error}"))?;
    let bytes = std::fs::read(path).map_err(|error| error.to_string())?;
    if hex::encode(Sha256::digest(&bytes)) != expected.trim() {
        return Err("its sha256 does not match the recorded one".to_string());
    }
    Ok(Some(bytes))
}

/// Where an artifact's sha256 is recorded.
fn hash_path(artifact: &Path) -> PathBuf {
    artifact.with_extension("cwasm.sha256")
}

fn probe_writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(probe)
}

/// Writes the artifact and then its hash, each to a temporary name unique
/// to this process and call and renamed into place: concurrent writers (two
/// loads, two processes) never mix their bytes, and a reader that finds a
/// hash finds the artifact it describes (or a newer identical one).
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_file_atomically(path, bytes)?;
    let hash = hex::encode(Sha256::digest(bytes));
    write_file_atomically(&hash_path(path), hash.as_bytes())
}

fn write_file_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let write = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temporary = path.with_extension(format!("tmp-{}-{write}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).map_or(0, |m| m.permissions().mode() & 0o777)
    }

    #[test]
    fn the_cache_directory_is_made_private() {
        let base = tempfile::tempdir().expect("temp dir");
        let created = base.path().join("larder").join("plugins");
        make_private_dir(&created).expect("created");
        assert_eq!(mode(&created), 0o700);
        let loose = base.path().join("loose");
        std::fs::create_dir(&loose).expect("dir");
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        make_private_dir(&loose).expect("ours, narrowed");
        assert_eq!(mode(&loose), 0o700);
    }

    #[test]
    fn an_artifact_loads_only_with_its_recorded_hash_and_private_mode() {
        let dir = tempfile::tempdir().expect("temp dir");
        let artifact = dir.path().join("x.cwasm");
        assert_eq!(read_trusted_artifact(&artifact), Ok(None), "none yet");
        write_atomically(&artifact, b"machine code").expect("written");
        assert_eq!(mode(&artifact), 0o600);
        assert_eq!(
            read_trusted_artifact(&artifact),
            Ok(Some(b"machine code".to_vec()))
        );
        // Swapped bytes (a truncated write, another writer): not loaded.
        std::fs::write(&artifact, b"other code").expect("overwrite");
        assert!(read_trusted_artifact(&artifact).is_err());
        write_atomically(&artifact, b"machine code").expect("written");
        std::fs::set_permissions(&artifact, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        assert_eq!(
            read_trusted_artifact(&artifact),
            Err("writable by others".to_string())
        );
        std::fs::set_permissions(&artifact, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::remove_file(hash_path(&artifact)).expect("remove hash");
        assert!(
            read_trusted_artifact(&artifact).is_err(),
            "no recorded hash"
        );
    }

    #[test]
    fn an_artifact_or_directory_of_another_user_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let artifact = dir.path().join("x.cwasm");
        write_atomically(&artifact, b"machine code").expect("written");
        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs).expect("dir");
        // Giving files away needs root (CI runs as root); as anyone else
        // this check cannot be staged, and the test says so.
        let nobody = 65534;
        if std::os::unix::fs::chown(&artifact, Some(nobody), None).is_err() {
            eprintln!("not root: cannot stage another user's files; skipped");
            return;
        }
        std::os::unix::fs::chown(&theirs, Some(nobody), None).expect("chown");
        let refused = read_trusted_artifact(&artifact).expect_err("not ours");
        assert!(refused.contains("owned by uid 65534"), "{refused}");
        assert!(make_private_dir(&theirs).is_err());
    }
}
