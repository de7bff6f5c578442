//! The composition root: builds the long-lived parts (plugins, cache,
//! sources) once, the request path ([`Proxy`]) and admin API from each
//! config, binds the listeners, reloads and shuts down. Knows no caching or
//! routing rules: it only wires the modules that do.
//!
//! [`start`] brings everything up; [`Server::reload`] builds a new request
//! path from a new config and swaps it in (in-flight requests finish on the
//! one they started with); [`Server::shutdown`] stops accepting and drains up
//! to `server.drain_timeout`; [`Server::run_until_signal`] adds signals and
//! the config file watch.

mod listener;
pub mod probe;
mod serving;
mod systemd;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;

use crate::shared::RedisTier;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::cache::{Cache, Clock, SystemClock};
use crate::config::Config;
use crate::plugins::{PluginHost, PluginLoadError};
use crate::proxy::{BuildError, Proxy, Services};
use crate::sources::Sources;
use listener::{ConnSettings, Listener, accept_loop};
use serving::ServingThreads;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Plugins(#[from] PluginLoadError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(#[from] BuildError),
    #[error("shared.url: {0}")]
    Shared(#[from] redis::RedisError),
    #[error("cannot start the serving threads: {0}")]
    Threads(std::io::Error),
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Proxy(#[from] BuildError),
    #[error(transparent)]
    Plugins(#[from] PluginLoadError),
    #[error("shared.url: {0}")]
    Shared(#[from] redis::RedisError),
}

/// The parts that outlive reloads.
struct App {
    services: Services,
    /// The console's chart: the last minutes of counters.
    history: Arc<crate::admin::console::History>,
}

impl App {
    fn proxy(&self, config: &Config, previous: Option<&Proxy>) -> Result<Proxy, BuildError> {
        Proxy::build(config, &self.services, previous)
    }

    fn admin(&self, config: &Config, proxy: &Proxy) -> Admin {
        Admin::new(
            config.admin.as_ref(),
            self.services.cache.clone(),
            self.services.sources.clone(),
            self.services.plugins.clone(),
            proxy.upstreams(),
            self.history.clone(),
        )
    }
}

/// What both listeners read per request; replaced whole on reload.
struct Live {
    proxy: ArcSwap<Proxy>,
    admin: ArcSwap<Admin>,
    /// Timeouts for new connections.
    conn_settings: Arc<ArcSwap<ConnSettings>>,
    /// The HTTPS listener's certificates (reloads change them).
    tls: Option<Arc<tls::Tls>>,
    app: App,
    /// The config now running: reload compares against it.
    config: Mutex<Config>,
}

/// What a process may choose when it starts Larder; the defaults are what
/// runs in production.
pub struct Options {
    /// The file the config came from: reloads read it again.
    pub config_path: Option<PathBuf>,
    /// The cache's clock (tests move a manual one instead of sleeping).
    pub clock: Arc<dyn Clock>,
    /// Serve the proxy listener's connections on the runtime that called
    /// [`start`] instead of on serving threads (`server.threads` is then
    /// ignored): for a test that captures what its own thread logs.
    pub connections_on_caller: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            config_path: None,
            clock: Arc::new(SystemClock),
            connections_on_caller: false,
        }
    }
}

/// A running Larder.
pub struct Server {
    pub proxy_addr: SocketAddr,
    /// The HTTPS listener's address, when `tls:` is configured.
    pub tls_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    live: Arc<Live>,
    config_path: Option<PathBuf>,
    /// `Some(drain_timeout)` tells the listeners to stop and drain.
    stop: watch::Sender<Option<Duration>>,
    listeners: Vec<JoinHandle<()>>,
}

/// Starts everything `config` describes; nothing is left running on error.
pub async fn start(mut config: Config, options: Options) -> Result<Server, StartError> {
    crate::telemetry::metrics();
    let plugins = PluginHost::load(&config.plugins, &config.plugin_limits).await?;
    let shared = connect_shared(config.shared.as_ref())?;
    let cache = Cache::new(&config.cache, options.clock);
    cache.set_tier(cache_tier(&shared, config.shared.as_ref()));
    let history = crate::admin::console::History::start(cache.clone());
    let app = App {
        history,
        services: Services {
            cache,
            sources: Sources::start(&config.sources, plugins.clone(), source_tier(&shared)),
            plugins,
            tunnels: Arc::default(),
        },
    };
    let proxy_listener = bind(config.listen).await?;
    let proxy_addr = local_addr(&proxy_listener, config.listen)?;
    let https = match &mut config.tls {
        Some(tls_config) => {
            let listener = bind(tls_config.listen).await?;
            // What redirects name: the port bound, when the config said 0.
            tls_config.listen = local_addr(&listener, tls_config.listen)?;
            Some((listener, tls::Tls::start(tls_config)?))
        }
        None => None,
    };
    let tls_addr = config.tls.as_ref().map(|tls| tls.listen);
    let proxy = app.proxy(&config, None)?;
    let admin = app.admin(&config, &proxy);
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

    let max_connections = config
        .server
        .max_connections
        .unwrap_or_else(default_max_connections);
    tracing::debug!(max_connections, "connection limit of the proxy listener");
    let serving = if options.connections_on_caller {
        None
    } else {
        let threads = ServingThreads::start(serving::thread_count(config.server.threads))
            .map_err(StartError::Threads)?;
        tracing::debug!(
            threads = threads.len(),
            "threads serving the proxy listener"
        );
        Some(threads)
    };
    let live = Arc::new(Live {
        proxy: ArcSwap::from_pointee(proxy),
        admin: ArcSwap::from_pointee(admin),
        conn_settings: Arc::new(ArcSwap::from_pointee(conn_settings(&config))),
        tls: https.as_ref().map(|(_, tls)| Arc::clone(tls)),
        app,
        config: Mutex::new(config),
    });
    let (stop, stopped) = watch::channel(None);
    let mut listeners = Vec::new();
    let proxy_live = live.clone();
    let proxy_handler = move |request, peer, tls| {
        let proxy = proxy_live.proxy.load_full();
        async move { proxy.handle(request, peer, tls).await }
    };
    // Both proxy listeners share the connection cap and serving threads.
    if let Some((listener, tls)) = https {
        listeners.push(tokio::spawn(accept_loop(
            Listener {
                name: "https",
                socket: listener,
                max_connections: Some(max_connections),
                serving: serving.clone(),
                tls: Some(tls),
            },
            stopped.clone(),
            live.conn_settings.clone(),
            proxy_handler.clone(),
        )));
    }
    listeners.push(tokio::spawn(accept_loop(
        Listener {
            name: "proxy",
            socket: proxy_listener,
            max_connections: Some(max_connections),
            serving,
            tls: None,
        },
        stopped.clone(),
        live.conn_settings.clone(),
        proxy_handler,
    )));
    if let Some(listener) = admin_listener {
        let admin_live = live.clone();
        listeners.push(tokio::spawn(accept_loop(
            Listener {
                name: "admin",
                socket: listener,
                max_connections: None,
                serving: None,
                tls: None,
            },
            stopped,
            live.conn_settings.clone(),
            move |request, _peer, _tls| {
                let admin = admin_live.admin.load_full();
                async move { admin.handle(request).await }
            },
        )));
    }
    tracing::info!(listen = %proxy_addr, https = ?tls_addr, admin = ?admin_addr, "larder started");
    Ok(Server {
        proxy_addr,
        tls_addr,
        admin_addr,
        live,
        config_path: options.config_path,
        stop,
        listeners,
    })
}

/// The shared tier `shared` describes, if any. Connecting is lazy: Larder
/// starts and serves without Redis.
fn connect_shared(
    shared: Option<&crate::config::SharedConfig>,
) -> Result<Option<Arc<RedisTier>>, redis::RedisError> {
    let Some(config) = shared else {
        return Ok(None);
    };
    let tier = RedisTier::start(config)?;
    tracing::info!(namespace = %config.namespace, "shared tier on Redis");
    Ok(Some(tier))
}

/// The shared tier as the cache's second tier, with its size cap.
fn cache_tier(
    tier: &Option<Arc<RedisTier>>,
    shared: Option<&crate::config::SharedConfig>,
) -> Option<(Arc<dyn crate::cache::SecondTier>, u64)> {
    let tier = tier.clone()?;
    let max_object_size = shared?.max_object_size;
    Some((tier, max_object_size))
}

/// The shared tier as where the sources of the namespace meet.
fn source_tier(tier: &Option<Arc<RedisTier>>) -> Option<Arc<dyn crate::sources::SharedSources>> {
    tier.clone()
        .map(|tier| tier as Arc<dyn crate::sources::SharedSources>)
}

/// The accept queue a listener asks the kernel for (which caps it at
/// `net.core.somaxconn`, 4096 by default). Tokio's `bind` asks for 128,
/// which a burst of a thousand new connections overflows: the kernel drops
/// their SYNs and the clients retry a second later. nginx asks for 511,
/// HAProxy and Envoy for more.
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let listen = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As tokio's own bind does: a restart can take the port over from
        // connections still in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|source| StartError::Bind { addr, source })
}

fn local_addr(listener: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, StartError> {
    listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })
}

impl Server {
    /// Applies a new config: plugins, cache settings and sources in place,
    /// then a new request path swapped in. On error the running config stays.
    pub async fn reload(&self, mut config: Config) -> Result<(), ReloadError> {
        let mut running = self.live.config.lock().await;
        if config.listen != running.listen {
            tracing::warn!(old = %running.listen, new = %config.listen, "listen changed; it takes effect on restart");
        }
        if config.tls.is_some() != running.tls.is_some() {
            tracing::warn!(
                "tls was added or removed; the HTTPS listener starts or stops on restart"
            );
        }
        if self.live.tls.is_none() {
            // No redirects to a listener that is not there.
            config.tls = None;
        }
        if config.server.threads != running.server.threads {
            tracing::warn!(old = ?running.server.threads, new = ?config.server.threads, "server.threads changed; it takes effect on restart");
        }
        if config.admin.as_ref().map(|a| a.listen) != running.admin.as_ref().map(|a| a.listen) {
            tracing::warn!(
                "admin.listen changed or admin was added or removed; listeners change on restart, the token applies now"
            );
        }
        let app = &self.live.app;
        let previous = self.live.proxy.load_full();
        let proxy = app.proxy(&config, Some(&previous))?;
        app.services
            .plugins
            .apply(&config.plugins, &config.plugin_limits)
            .await?;
        if config.shared != running.shared {
            let shared = connect_shared(config.shared.as_ref())?;
            app.services
                .cache
                .set_tier(cache_tier(&shared, config.shared.as_ref()));
            app.services.sources.set_shared(source_tier(&shared));
        }
        app.services.cache.apply(&config.cache);
        app.services.sources.apply(&config.sources);
        let admin = app.admin(&config, &proxy);
        self.live.proxy.store(Arc::new(proxy));
        self.live.admin.store(Arc::new(admin));
        self.live
            .conn_settings
            .store(Arc::new(conn_settings(&config)));
        if let (Some(tls), Some(tls_config)) = (&self.live.tls, &config.tls) {
            tls.apply(tls_config);
        }
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
        self.live.app.services.sources.shutdown().await;
        tracing::info!("larder stopped");
    }

    /// Serves until SIGTERM or SIGINT, then shuts down gracefully (a second
    /// signal cuts the drain short). SIGHUP and changes to the config file
    /// reload it; a broken file keeps the running config and logs every error.
    /// Under systemd (`Type=notify`) it reports ready, reloading and stopping.
    pub async fn run_until_signal(self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut hangup = signal(SignalKind::hangup())?;
        let mut watch = self.config_path.as_deref().and_then(watch_config);
        // The listeners are bound: connections are accepted from now on.
        systemd::notify("READY=1");
        loop {
            let changed = async {
                match &mut watch {
                    Some((_, changes)) => changes.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = terminate.recv() => { tracing::info!(signal = "SIGTERM", "shutting down"); break; }
                _ = interrupt.recv() => { tracing::info!(signal = "SIGINT", "shutting down"); break; }
                _ = hangup.recv() => self.reload_from_file("SIGHUP").await,
                true = changed => self.reload_from_file("file changed").await,
            }
        }
        systemd::notify("STOPPING=1");
        // A second signal means the operator will not wait for the drain.
        tokio::select! {
            () = self.shutdown() => {}
            _ = terminate.recv() => tracing::warn!("second signal; exiting without finishing the drain"),
            _ = interrupt.recv() => tracing::warn!("second signal; exiting without finishing the drain"),
        }
        Ok(())
    }

    async fn reload_from_file(&self, reason: &str) {
        systemd::reloading();
        self.reload_file(reason).await;
        systemd::notify("READY=1");
    }

    async fn reload_file(&self, reason: &str) {
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
            // The HTTPS listener stays where it was bound until a restart
            // (a port 0 in the file meant the one chosen at start).
            if let (Some(tls), Some(bound)) = (&mut config.tls, &running.tls) {
                if tls.listen != bound.listen && tls.listen.port() != 0 {
                    tracing::warn!(old = %bound.listen, new = %tls.listen, "tls.listen changed; it takes effect on restart");
                }
                tls.listen = bound.listen;
            }
        }
        match self.reload(config).await {
            Ok(()) => tracing::info!(path = %path.display(), reason, "config reloaded"),
            Err(error) => {
                tracing::error!(path = %path.display(), reason, %error, "config not reloaded; the running config stays")
            }
        }
    }
}

fn conn_settings(config: &Config) -> ConnSettings {
    ConnSettings {
        header_timeout: config.server.header_timeout.get(),
        idle_timeout: config.server.idle_timeout.get(),
        send_timeout: config.server.send_timeout.get(),
    }
}

/// Without `server.max_connections`: half the process's file descriptors
/// (each client connection may need one to its upstream), less a reserve
/// for listeners, plugins, sources and logs; at least 64.
fn default_max_connections() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given and nothing else.
    let known = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    let descriptors = if !known || limit.rlim_cur == libc::RLIM_INFINITY {
        65_536
    } else {
        usize::try_from(limit.rlim_cur).unwrap_or(65_536)
    };
    (descriptors.saturating_sub(256) / 2).max(64)
}

/// The config file's watch, or `None` (with a warning) when it cannot be
/// watched: SIGHUP still reloads.
fn watch_config(
    path: &std::path::Path,
) -> Option<(crate::watch::FileWatch, crate::watch::Changes)> {
    match crate::watch::file(path) {
        Ok(watch) => {
            tracing::info!(path = %path.display(), "watching the config file; SIGHUP also reloads it");
            Some(watch)
        }
        Err(error) => {
            tracing::warn!(%error, "cannot watch the config file; reload with SIGHUP");
            None
        }
    }
}
