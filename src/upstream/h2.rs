//! HTTP/2 to one upstream server (`protocol: h2` over TLS with ALPN, or
//! `h2c` over cleartext TCP with prior knowledge): one shared connection
//! that every request to the server multiplexes its streams on.
//!
//! Unlike the HTTP/1.1 pool (`pool`), where the request that checked a
//! connection out drives it, an HTTP/2 connection carries many requests at
//! once, so it runs as a task of its own and requests hold a cheap clone of
//! its `SendRequest`. Streams beyond the server's
//! `SETTINGS_MAX_CONCURRENT_STREAMS` wait in hyper for a free one.
//!
//! Owns: opening the connection (TCP, TLS with `h2` checked as the ALPN
//! outcome, the HTTP/2 handshake, all within the connect timeout), sharing
//! it, coalescing concurrent opens into one (a burst of requests on a cold
//! or closed connection opens one connection and all share its outcome),
//! replacing a connection that closed or went away, and dropping one that
//! sat unused for the idle timeout. Must not pick servers, retry across
//! them or turn failures into statuses: `upstream` does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared};
use http::{Request, Response, Uri};
use hyper::client::conn::http2;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use parking_lot::Mutex;
use tower_service::Service;

use crate::http::body::{self, Body, BoxError};

/// How long a connection with no new request is kept (as the HTTP/1.1
/// pool's idle connections).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How often an unused connection is checked for expiry.
const SWEEP_EVERY: Duration = Duration::from_secs(15);

/// PING interval while streams are open, and how long its answer may take:
/// a peer that vanished without a close (a dropped NAT entry, a dead host)
/// fails its streams instead of leaving long gRPC calls hanging.
const PING_EVERY: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an HTTP/2 connection could not be opened. Cloned for every request
/// that waited on the same open.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Connect(#[source] SharedError),
    #[error(
        "the server did not select h2 in the TLS handshake (ALPN); it may speak HTTP/1.1 only: use protocol http1 for it"
    )]
    NotH2,
    #[error("no connection within {0:?}")]
    TimedOut(Duration),
}

impl OpenError {
    /// As a boxed error whose chain the upstream's classification walks
    /// (a timeout shows as an I/O error of kind `TimedOut`).
    pub fn into_box(self) -> BoxError {
        match self {
            Self::TimedOut(_) => Box::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                self.to_string(),
            )),
            other => Box::new(other),
        }
    }
}

/// A connect error shared by every request that waited for the open. Its
/// source is the error itself, so a walk of the chain (for an I/O error's
/// kind, say) sees it.
#[derive(Debug, Clone)]
pub struct SharedError(Arc<BoxError>);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&**self.0)
    }
}

type Opening = Shared<BoxFuture<'static, Result<http2::SendRequest<Body>, OpenError>>>;

/// The connection in use and the open in progress, if any.
#[derive(Default)]
struct Slot {
    current: Option<Current>,
    /// With the generation its connection will have.
    opening: Option<(Opening, u64)>,
}

struct Current {
    sender: http2::SendRequest<Body>,
    /// Which open made it, so a request that found it closed replaces this
    /// one and not a newer one another request opened meanwhile.
    generation: u64,
    last_used: Instant,
}

/// A sender for one request and whether it came from a connection that
/// served requests before (a connection that closed under it may be
/// replaced and the request sent again when it did not go out).
pub struct Checkout {
    pub sender: http2::SendRequest<Body>,
    pub generation: u64,
    pub reused: bool,
}

/// The shared HTTP/2 connection to one server.
pub struct H2Pool {
    slot: Mutex<Slot>,
    generations: AtomicU64,
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`, what the connector dials.
    base: Uri,
    connect_timeout: Duration,
    /// `h2`: the TLS handshake must have selected h2.
    over_tls: bool,
}

impl H2Pool {
    /// A pool for `base`; an unused connection is dropped in the background
    /// when a Tokio runtime is running.
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        base: Uri,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        let over_tls = base.scheme() == Some(&http::uri::Scheme::HTTPS);
        let pool = Arc::new(Self {
            slot: Mutex::new(Slot::default()),
            generations: AtomicU64::new(0),
            connector,
            base,
            connect_timeout,
            over_tls,
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep(Arc::downgrade(&pool)));
        }
        pool
    }

    /// The open connection, or the one being opened (opening it when no
    /// open is in progress).
    pub async fn checkout(&self) -> Result<Checkout, OpenError> {
        let (opening, generation) = {
            let mut slot = self.slot.lock();
            if let Some(current) = &mut slot.current {
                if !current.sender.is_closed() {
                    current.last_used = Instant::now();
                    return Ok(Checkout {
                        sender: current.sender.clone(),
                        generation: current.generation,
                        reused: true,
                    });
                }
                slot.current = None;
            }
            slot.opening
                .get_or_insert_with(|| {
                    let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
                    (self.open().boxed().shared(), generation)
                })
                .clone()
        };
        let outcome = opening.clone().await;
        let mut slot = self.slot.lock();
        // The first waiter to see the outcome publishes it; a failure is
        // not kept, so the next request tries again.
        if slot
            .opening
            .as_ref()
            .is_some_and(|(pending, _)| pending.ptr_eq(&opening))
        {
            slot.opening = None;
            if let Ok(sender) = &outcome {
                slot.current = Some(Current {
                    sender: sender.clone(),
                    generation,
                    last_used: Instant::now(),
                });
            }
        }
        drop(slot);
        outcome.map(|sender| Checkout {
            sender,
            generation,
            reused: false,
        })
    }

    /// Forgets the connection of `generation` (it closed under a request),
    /// unless a newer one replaced it already.
    pub fn discard(&self, generation: u64) {
        let mut slot = self.slot.lock();
        if slot
            .current
            .as_ref()
            .is_some_and(|current| current.generation == generation)
        {
            slot.current = None;
        }
    }

    /// Drops a connection unused for the idle timeout or closed; it ends
    /// once its last stream does.
    fn sweep_once(&self) {
        let mut slot = self.slot.lock();
        if slot.current.as_ref().is_some_and(|current| {
            current.sender.is_closed() || current.last_used.elapsed() >= IDLE_TIMEOUT
        }) {
            slot.current = None;
        }
    }

    /// A future that opens a connection; it owns what it needs, since it is
    /// shared by every request waiting for it and outlives any one of them.
    fn open(&self) -> impl Future<Output = Result<http2::SendRequest<Body>, OpenError>> + use<> {
        let connector = self.connector.clone();
        let base = self.base.clone();
        let (timeout, over_tls) = (self.connect_timeout, self.over_tls);
        async move {
            match tokio::time::timeout(timeout, connect(connector, base, over_tls)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(OpenError::TimedOut(timeout)),
            }
        }
    }
}

async fn sweep(pool: Weak<H2Pool>) {
    let mut ticks = tokio::time::interval(SWEEP_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        match pool.upgrade() {
            Some(pool) => pool.sweep_once(),
            None => return,
        }
    }
}

/// The HTTP/2 client settings: hyper's flow control adapts its windows to
/// the measured bandwidth-delay product (a large download is not held to
/// 64 KiB per round trip), and PINGs find a dead peer while streams wait.
fn builder() -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .adaptive_window(true)
        .keep_alive_interval(PING_EVERY)
        .keep_alive_timeout(PING_TIMEOUT)
        .keep_alive_while_idle(false);
    builder
}

/// Opens a connection to `base` and runs it as a task of its own; it ends
/// when the server closes it, or when every sender is dropped and its last
/// stream is done.
async fn connect(
    mut connector: HttpsConnector<HttpConnector>,
    base: Uri,
    over_tls: bool,
) -> Result<http2::SendRequest<Body>, OpenError> {
    let boxed = |error: BoxError| OpenError::Connect(SharedError(Arc::new(error)));
    let stream = connector.call(base).await.map_err(boxed)?;
    if over_tls && !stream.connected().is_negotiated_h2() {
        return Err(OpenError::NotH2);
    }
    let (sender, connection) = builder()
        .handshake(stream)
        .await
        .map_err(|error| boxed(Box::new(error)))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "upstream HTTP/2 connection ended with an error");
        }
    });
    Ok(sender)
}

/// Opens a connection of its own, sends one request on it and returns the
/// response's status without reading its body (health probes: a probe
/// checks that a new connection can be made, whatever the shared one does).
/// The connection closes once the status is in.
pub async fn send_once(
    connector: &HttpsConnector<HttpConnector>,
    base: &Uri,
    request: Request<Body>,
) -> Result<http::StatusCode, BoxError> {
    let over_tls = base.scheme() == Some(&http::uri::Scheme::HTTPS);
    let mut sender = connect(connector.clone(), base.clone(), over_tls)
        .await
        .map_err(OpenError::into_box)?;
    let response = sender.send_request(request).await?;
    Ok(response.status())
}

/// Why a request could not be sent on a connection.
pub enum SendError {
    /// The connection was closed before the request went out; the request
    /// comes back untouched and may go out on another connection.
    NotSent(Box<Request<Body>>, hyper::Error),
    Failed(hyper::Error),
}

/// Sends `request` (absolute URI, no Host header) as a stream and waits for
/// the response head. The response body is the stream's: data and
/// trailers as the server sent them.
pub async fn send(
    sender: &mut http2::SendRequest<Body>,
    request: Request<Body>,
) -> Result<Response<Body>, SendError> {
    match sender.try_send_request(request).await {
        Ok(response) => Ok(response.map(body::boxed)),
        Err(mut error) => Err(match error.take_message() {
            Some(request) => SendError::NotSent(Box::new(request), error.into_error()),
            None => SendError::Failed(error.into_error()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;

    use super::*;
    use crate::http::io_error_kind;

    #[test]
    fn open_errors_keep_what_classifies_them() {
        let refused = std::io::Error::new(ErrorKind::ConnectionRefused, "refused");
        let shared = OpenError::Connect(SharedError(Arc::new(Box::new(refused))));
        let error = shared.clone().into_box();
        assert_eq!(io_error_kind(&*error), Some(ErrorKind::ConnectionRefused));
        assert_eq!(error.to_string(), "refused");
        let timeout = OpenError::TimedOut(Duration::from_millis(250)).into_box();
        assert_eq!(io_error_kind(&*timeout), Some(ErrorKind::TimedOut));
    }
}
