//! Keep-alive HTTP/1.1 connections to one upstream server, driven by the
//! request that uses them.
//!
//! hyper-util's pooled client runs every connection as a task of its own, so
//! each forwarded request hops between two tasks (often two threads) and
//! through channels for its head and each body chunk. Here a connection is a
//! plain value: the task of the request that checked it out writes the
//! request, reads the response head, and the response body carries the
//! connection along, polling it until the last byte; then it goes back to the
//! idle list. (Measured on the pass-through bench: see docs/proxy.md.)
//!
//! Owns: opening connections (TCP or TLS through the upstream's connector),
//! the idle list (most recently used first, an idle timeout, a cap), and
//! noticing connections the server closed while they sat idle. Must not pick
//! servers, retry across them or turn failures into statuses: `upstream` does.

use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use parking_lot::{Mutex, MutexGuard};
use tokio::net::TcpStream;
use tower_service::Service;

use crate::http::body::{self, Body, BoxError};

/// How long an unused connection is kept (hyper-util's default, which the
/// previous client used).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Idle connections kept per server; more are closed when they come back.
/// As Envoy's default connection limit per cluster: a thousand client
/// connections each with a request in flight (the serving threads take them
/// in turn) need as many upstream connections, and with 256 kept the rest
/// were opened and closed again for every request (pass-through at 1,000
/// connections: 45k → 29k req/s).
const MAX_IDLE: usize = 1024;

/// How often idle connections are checked for expiry and for a close by
/// the server, so none lingers half-closed on a quiet upstream.
const SWEEP_EVERY: Duration = Duration::from_secs(15);

type Stream = MaybeHttpsStream<TokioIo<TcpStream>>;
type Connection = http1::Connection<Stream, Body>;

/// One open connection: the half that sends requests and the half that does
/// the reading and writing.
pub struct Conn {
    sender: http1::SendRequest<Body>,
    connection: Connection,
    /// Whether it served a request before (a failure to send on it then may
    /// be a close by the server that crossed our request).
    pub reused: bool,
    /// How long it sat in the pool before this checkout.
    pub idle_for: Duration,
}

struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

impl Conn {
    /// Polls the connection once without a task to wake. True while it can
    /// take another request: it is open and waiting for one.
    fn still_usable(&mut self) -> bool {
        let mut context = Context::from_waker(Waker::noop());
        match self.connection.poll_without_shutdown(&mut context) {
            Poll::Ready(_) => false,
            Poll::Pending => self.sender.is_ready(),
        }
    }
}

/// The idle connections to one server.
pub struct Pool {
    idle: Mutex<Vec<Idle>>,
}

impl Pool {
    /// A pool whose idle connections are swept in the background when a
    /// Tokio runtime is running (without one, expiry is still checked on
    /// every checkout and return).
    pub fn new() -> Arc<Self> {
        let pool = Arc::new(Self {
            idle: Mutex::new(Vec::new()),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep(Arc::downgrade(&pool)));
        }
        pool
    }

    /// The most recently returned connection that is still open, if any.
    pub fn checkout(&self) -> Option<Box<Conn>> {
        let mut idle = self.lock();
        while let Some(mut entry) = idle.pop() {
            let idle_for = entry.since.elapsed();
            if idle_for < IDLE_TIMEOUT && entry.conn.still_usable() {
                entry.conn.reused = true;
                entry.conn.idle_for = idle_for;
                return Some(entry.conn);
            }
        }
        None
    }

    /// Keeps a connection whose response was read to the end. Its state is
    /// not polled here: a connection the server is closing ("Connection:
    /// close") is found out at the next checkout, which polls anyway (one
    /// poll per request instead of two).
    fn checkin(&self, conn: Box<Conn>) {
        if conn.sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() >= MAX_IDLE {
            // The oldest goes: the newest is the warmest.
            idle.remove(0);
        }
        idle.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// Closes expired connections and those the server closed.
    fn sweep_once(&self) {
        self.lock()
            .retain_mut(|entry| entry.since.elapsed() < IDLE_TIMEOUT && entry.conn.still_usable());
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Idle>> {
        self.idle.lock()
    }
}

async fn sweep(pool: Weak<Pool>) {
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

/// Opens a connection to `server` (`scheme://authority/`) through `connector`;
/// `timeout` bounds TCP and TLS together (the connector's own bounds TCP
/// only, so a server that stalls its handshake would otherwise hold the
/// request for the whole response timeout). Boxed: with a TLS session
/// inside it is several KiB, and it moves from the pool to a request to its
/// response body and back.
pub async fn connect(
    connector: &HttpsConnector<HttpConnector>,
    server: &Uri,
    timeout: Duration,
) -> Result<Box<Conn>, BoxError> {
    let stream = tokio::time::timeout(timeout, connector.clone().call(server.clone()))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no connection (TCP and TLS) within the connect timeout",
            )
        })??;
    let (sender, connection) = http1::Builder::new().handshake(stream).await?;
    Ok(Box::new(Conn {
        sender,
        connection,
        reused: false,
        idle_for: Duration::ZERO,
    }))
}

/// Sends one request on `conn`, which is closed afterwards, and returns
/// the response's status without reading its body (health probes).
pub async fn send_once(
    conn: Box<Conn>,
    request: Request<Body>,
) -> Result<http::StatusCode, hyper::Error> {
    let Conn {
        mut sender,
        connection,
        ..
    } = *conn;
    let send = sender.send_request(request);
    tokio::pin!(send);
    tokio::pin!(connection);
    let mut driving = true;
    loop {
        tokio::select! {
            response = &mut send => return response.map(|response| response.status()),
            ended = &mut connection, if driving => {
                driving = false;
                ended?;
            }
        }
    }
}

/// Opens a connection for an Upgrade request: it runs as its own task and is
/// never pooled, since after `101` it belongs to the tunnel.
pub async fn connect_for_upgrade(
    connector: &HttpsConnector<HttpConnector>,
    server: &Uri,
    timeout: Duration,
) -> Result<http1::SendRequest<Body>, BoxError> {
    let Conn {
        sender, connection, ..
    } = *connect(connector, server, timeout).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%error, "upstream connection for an upgrade ended with an error");
        }
    });
    Ok(sender)
}

/// Why a request could not be sent on a connection.
pub enum SendError {
    /// The connection was closed before the request was written; the request
    /// comes back untouched and may go out on another connection.
    NotSent(Box<Request<Body>>, hyper::Error),
    Failed(hyper::Error),
}

/// Sends `request` (origin-form URI, Host set) on `conn` and waits for the
/// response head, driving the connection in the caller's task. The response
/// body keeps driving it and hands it back to `pool` once read to the end.
pub async fn send(
    pool: &Arc<Pool>,
    mut conn: Box<Conn>,
    request: Request<Body>,
) -> Result<Response<Body>, SendError> {
    let mut closed = false;
    let sending = conn.sender.try_send_request(request);
    tokio::pin!(sending);
    let outcome = std::future::poll_fn(|cx| {
        if !closed && conn.connection.poll_without_shutdown(cx).is_ready() {
            // Any error reaches the response future too; just stop polling.
            closed = true;
        }
        sending.as_mut().poll(cx)
    })
    .await;
    let response = match outcome {
        Ok(response) => response,
        Err(mut error) => {
            return Err(match error.take_message() {
                Some(request) => SendError::NotSent(Box::new(request), error.into_error()),
                None => SendError::Failed(error.into_error()),
            });
        }
    };
    let conn = (!closed).then_some(conn);
    Ok(response.map(|incoming| {
        body::boxed(DrivingBody {
            incoming,
            conn,
            pool: Arc::downgrade(pool),
            ended: false,
        })
    }))
}

/// A response body that polls its connection as it is read and returns the
/// connection to its pool when the body was read to the end.
struct DrivingBody {
    incoming: Incoming,
    conn: Option<Box<Conn>>,
    pool: Weak<Pool>,
    ended: bool,
}

impl http_body::Body for DrivingBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(conn) = &mut this.conn
            && conn.connection.poll_without_shutdown(cx).is_ready()
        {
            // Closed or failed: the body sees the same end or error.
            this.conn = None;
        }
        let polled = Pin::new(&mut this.incoming).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.ended = true,
            Poll::Ready(Some(Ok(_))) => this.ended = this.incoming.is_end_stream(),
            Poll::Ready(Some(Err(_))) => this.conn = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.incoming.size_hint()
    }
}

impl Drop for DrivingBody {
    fn drop(&mut self) {
        // A body dropped before its end leaves the response half-read on the
        // wire: that connection cannot carry another request, so it closes.
        if !(self.ended || http_body::Body::is_end_stream(&self.incoming)) {
            return;
        }
        if let (Some(conn), Some(pool)) = (self.conn.take(), self.pool.upgrade()) {
            pool.checkin(conn);
        }
    }
}
