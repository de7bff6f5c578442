//! Listeners, connection tasks, graceful shutdown and the hot swap of the
//! running config. Knows nothing of caching.
//!
//! [`start`] builds the long-lived parts (plugins, cache, sources), binds the
//! proxy and admin listeners and serves each connection in its own task
//! (HTTP/1.1 and h2c on the same port). [`Server::reload`] builds a new
//! request path from a new config and swaps it in; in-flight requests finish
//! on the one they started with. [`Server::shutdown`] stops accepting and
//! drains up to `server.drain_timeout`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::body::Body;
use crate::cache::Cache;
use crate::config::Config;
use crate::plugins::{PluginError, PluginHost};
use crate::proxy::{Proxy, Shared};
use crate::sources::Sources;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Plugins(#[from] PluginError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// What both listeners read per request; replaced whole on reload.
struct Live {
    proxy: ArcSwap<Proxy>,
    admin: ArcSwap<Admin>,
    shared: Shared,
    /// The config now running: reload compares against it.
    config: Mutex<Config>,
}

/// A running Larder.
pub struct Server {
    pub proxy_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    live: Arc<Live>,
    config_path: Option<PathBuf>,
    /// `Some(drain_timeout)` tells the listeners to stop and drain.
    stop: watch::Sender<Option<Duration>>,
    listeners: Vec<JoinHandle<()>>,
}

/// Starts everything `config` describes; nothing is left running on error.
pub async fn start(config: Config, config_path: Option<PathBuf>) -> Result<Server, StartError> {
    crate::telemetry::metrics();
    let plugins = PluginHost::load(&config.plugins).await?;
    let cache = Cache::new(&config.cache);
    let sources = Sources::start(&config.sources, plugins.clone());
    let shared = Shared {
        cache,
        sources,
        plugins,
    };
    let proxy = Proxy::build(&config, shared.clone(), None).map_err(StartError::Config)?;
    let admin = Admin::new(config.admin.as_ref(), &shared);

    let proxy_listener = bind(config.listen).await?;
    let proxy_addr = local_addr(&proxy_listener, config.listen)?;
    let admin_listener = match &config.admin {
        Some(admin) => {
            if !admin.listen.ip().is_loopback() {
                tracing::warn!(listen = %admin.listen, "the admin API listens beyond loopback; keep admin.token secret and the port firewalled");
            }
            Some(bind(admin.listen).await?)
        }
        None => None,
    };
    let admin_addr = match (&admin_listener, &config.admin) {
        (Some(listener), Some(admin)) => Some(local_addr(listener, admin.listen)?),
        _ => None,
    };

    let live = Arc::new(Live {
        proxy: ArcSwap::from_pointee(proxy),
        admin: ArcSwap::from_pointee(admin),
        shared,
        config: Mutex::new(config),
    });
    let (stop, stopped) = watch::channel(None);
    let mut listeners = Vec::new();
    let proxy_live = live.clone();
    listeners.push(tokio::spawn(accept_loop(
        "proxy",
        proxy_listener,
        stopped.clone(),
        move |request, peer| {
            let proxy = proxy_live.proxy.load_full();
            async move { proxy.handle(request, peer).await }
        },
    )));
    if let Some(listener) = admin_listener {
        let admin_live = live.clone();
        listeners.push(tokio::spawn(accept_loop(
            "admin",
            listener,
            stopped,
            move |request, _peer| {
                let admin = admin_live.admin.load_full();
                async move { admin.handle(request).await }
            },
        )));
    }
    tracing::info!(listen = %proxy_addr, admin = ?admin_addr, "larder started");
    Ok(Server {
        proxy_addr,
        admin_addr,
        live,
        config_path,
        stop,
        listeners,
    })
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

fn local_addr(listener: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, StartError> {
    listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })
}

/// Accepts until told to stop, then drains the open connections for up to
/// the drain timeout it was told. Accept errors never end the loop.
async fn accept_loop<H, F>(
    name: &'static str,
    listener: TcpListener,
    mut stopped: watch::Receiver<Option<Duration>>,
    handler: H,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    builder.http2().timer(TokioTimer::new());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(listener = name, %error, "accept failed");
                    // Out of file descriptors and the like: give the process a moment.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => break,
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%peer, %error, "could not set TCP_NODELAY");
        }
        let handler = handler.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            // Boxed: hyper moves the service future into its connection
            // state, and the unboxed one is a few KiB copied per request.
            let response = Box::pin(handler(request, peer));
            async move { Ok::<_, Infallible>(response.await) }
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
        // Reap finished connection tasks so the set holds only live ones.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let drain_timeout = stopped
        .borrow()
        .unwrap_or(crate::config::ServerConfig::default().drain_timeout.0);
    tracing::info!(listener = name, connections = graceful.count(), "draining");
    if tokio::time::timeout(drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(listener = name, timeout = ?drain_timeout, remaining = connections.len(), "drain timeout passed; closing the remaining connections");
        connections.shutdown().await;
    }
}

impl Server {
    /// Applies a new config: plugins, cache settings and sources in place,
    /// then a new request path swapped in. On error the running config stays.
    pub async fn reload(&self, config: Config) -> Result<(), String> {
        let mut running = self.live.config.lock().await;
        if config.listen != running.listen {
            tracing::warn!(old = %running.listen, new = %config.listen, "listen changed; it takes effect on restart");
        }
        if config.admin.as_ref().map(|a| a.listen) != running.admin.as_ref().map(|a| a.listen) {
            tracing::warn!(
                "admin.listen changed or admin was added or removed; listeners change on restart, the token applies now"
            );
        }
        let shared = &self.live.shared;
        let previous = self.live.proxy.load_full();
        let proxy = Proxy::build(&config, shared.clone(), Some(&previous))?;
        shared
            .plugins
            .apply(&config.plugins)
            .await
            .map_err(|error| error.to_string())?;
        shared.cache.apply(&config.cache);
        shared.sources.apply(&config.sources);
        self.live.proxy.store(Arc::new(proxy));
        self.live
            .admin
            .store(Arc::new(Admin::new(config.admin.as_ref(), shared)));
        *running = config;
        tracing::debug!("configuration swapped in");
        Ok(())
    }

    /// Stops accepting, lets in-flight requests finish (up to
    /// `server.drain_timeout`), stops the sources' schedules.
    pub async fn shutdown(self) {
        let drain_timeout = self.live.config.lock().await.server.drain_timeout.0;
        let _ = self.stop.send(Some(drain_timeout));
        for listener in self.listeners {
            if let Err(error) = listener.await {
                tracing::error!(%error, "a listener task failed");
            }
        }
        self.live.shared.sources.shutdown().await;
        tracing::info!("larder stopped");
    }

    /// Serves until SIGTERM or SIGINT, then shuts down gracefully (a second
    /// signal cuts the drain short). SIGHUP and changes to the config file
    /// reload it; a broken file keeps the running config and logs every error.
    pub async fn run_until_signal(self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut hangup = signal(SignalKind::hangup())?;
        let (changed_tx, mut changed) = tokio::sync::mpsc::channel::<()>(1);
        let _watcher = self
            .config_path
            .as_deref()
            .and_then(|path| watch_config(path, changed_tx));
        loop {
            tokio::select! {
                _ = terminate.recv() => { tracing::info!(signal = "SIGTERM", "shutting down"); break; }
                _ = interrupt.recv() => { tracing::info!(signal = "SIGINT", "shutting down"); break; }
                _ = hangup.recv() => self.reload_from_file("SIGHUP").await,
                Some(()) = changed.recv() => {
                    // Editors write in several steps: wait for the file to settle.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    while changed.try_recv().is_ok() {}
                    self.reload_from_file("file changed").await;
                }
            }
        }
        // A second signal means the operator will not wait for the drain.
        tokio::select! {
            () = self.shutdown() => {}
            _ = terminate.recv() => tracing::warn!("second signal; exiting without finishing the drain"),
            _ = interrupt.recv() => tracing::warn!("second signal; exiting without finishing the drain"),
        }
        Ok(())
    }

    async fn reload_from_file(&self, reason: &str) {
        let Some(path) = &self.config_path else {
            tracing::warn!(reason, "no config file to reload from");
            return;
        };
        let mut config = match crate::config::load_file(path) {
            Ok(config) => config,
            Err(errors) => {
                for error in &errors.0 {
                    tracing::error!(%error, "config error");
                }
                tracing::error!(path = %path.display(), reason, count = errors.0.len(), "config not reloaded; the running config stays");
                return;
            }
        };
        // Overrides from the command line (-e, -l) outlive a reload.
        {
            let running = self.live.config.lock().await;
            config.listen = running.listen;
            config.log.level = running.log.level.clone();
        }
        match self.reload(config).await {
            Ok(()) => tracing::info!(path = %path.display(), reason, "config reloaded"),
            Err(error) => {
                tracing::error!(path = %path.display(), reason, %error, "config not reloaded; the running config stays")
            }
        }
    }
}

/// Watches the config file's directory (editors replace files by rename) and
/// signals `changed` for events on the file.
fn watch_config(
    path: &Path,
    changed: tokio::sync::mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let file = path.file_name()?.to_owned();
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let handler = move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        // `..data` is how Kubernetes swaps a mounted ConfigMap: the file
        // itself is a symlink that never changes.
        let is_ours = |name: &std::ffi::OsStr| name == file.as_os_str() || name == "..data";
        if event
            .paths
            .iter()
            .any(|p| p.file_name().is_some_and(is_ours))
        {
            let _ = changed.try_send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(watcher) => watcher,
        Err(error) => {
            tracing::warn!(%error, "cannot watch the config file; reload with SIGHUP");
            return None;
        }
    };
    if let Err(error) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!(dir = %dir.display(), %error, "cannot watch the config directory; reload with SIGHUP");
        return None;
    }
    tracing::info!(path = %path.display(), "watching the config file; SIGHUP also reloads it");
    Some(watcher)
}
