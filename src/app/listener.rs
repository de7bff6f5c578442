//! The listeners' accept loop: each connection in its own task (HTTP/1.1
//! and h2c on the same port), accept errors that never end the loop, the
//! limits that keep idle or slow clients from holding the listener (a cap on
//! open connections, a deadline for each request head, an idle timeout, a
//! send timeout for peers that stop reading, HTTP/2 stream and reset
//! limits), and the graceful drain on shutdown.
//!
//! The deadlines are kept by one timer per connection, not one per request:
//! hyper's own header timeout boxes and registers a timer for every request
//! head, which at a thousand connections cost a fifth of a cache hit's
//! throughput (docs/proxy.md, "Threads and tuning").

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use super::serving::ServingThreads;
use super::tls::Tls;
use crate::http::body::Body;

/// HTTP/2 streams one connection may have open at once.
const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// The largest HTTP/2 header list a client may send (HTTP/1.1's limit is
/// hyper's: 100 headers, ~400 KiB of head).
const H2_MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
/// Streams a client may reset before the server accepted them, at once
/// (CVE-2023-44487, "rapid reset"): past this the connection is closed.
const H2_MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams the server may reset because of client errors, per connection,
/// before it closes the connection.
const H2_MAX_LOCAL_ERROR_RESETS: usize = 256;
/// An HTTP/2 peer that does not answer a PING within this is gone.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// The timeouts connections get; replaced on reload (new connections use
/// the new ones).
#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    /// A connection must send a complete first request head within this;
    /// for HTTP/1.1 also each later one, counted from the previous response.
    pub header_timeout: Duration,
    /// A connection with no request in progress for this long is closed
    /// (gracefully: an HTTP/2 GOAWAY).
    pub idle_timeout: Duration,
    /// A connection whose peer takes no bytes for this long while Larder
    /// has some to send is closed.
    pub send_timeout: Duration,
}

/// One listening socket and how its connections are served.
pub struct Listener {
    /// For logs: `proxy`, `https`, `admin`.
    pub name: &'static str,
    pub socket: TcpListener,
    /// No more connections than this at once; the rest wait in the
    /// kernel's backlog.
    pub max_connections: Option<usize>,
    /// Each connection served on one of these threads, else on the runtime
    /// the accept loop runs on.
    pub serving: Option<Arc<ServingThreads>>,
    /// Connections shake hands with this first (HTTPS).
    pub tls: Option<Arc<Tls>>,
}

/// Accepts until told to stop, then drains the open connections for up to
/// the drain timeout it was told. Accept errors never end the loop. The
/// handler gets each request with the client's address and whether the
/// connection is TLS.
pub async fn accept_loop<H, F>(
    listener: Listener,
    mut stopped: watch::Receiver<Option<Duration>>,
    settings: Arc<ArcSwap<ConnSettings>>,
    handler: H,
) where
    H: Fn(Request<Incoming>, SocketAddr, bool) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let Listener {
        name,
        socket: listener,
        max_connections,
        serving,
        tls,
    } = listener;
    let mut connections = tokio::task::JoinSet::new();
    let places = max_connections.map(|max| Arc::new(Semaphore::new(max)));
    loop {
        let place = match &places {
            Some(places) => tokio::select! {
                place = Arc::clone(places).acquire_owned() => match place {
                    Ok(place) => Some(place),
                    Err(_) => break,
                },
                _ = stopped.changed() => break,
            },
            None => None,
        };
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
        let settings = **settings.load();
        let (handler, stopping, tls) = (handler.clone(), stopped.clone(), tls.clone());
        match &serving {
            None => {
                connections.spawn(async move {
                    let _place = place;
                    connection(stream, peer, tls, settings, handler, stopping).await;
                });
            }
            // The socket moves to the serving thread's own event loop.
            Some(serving) => match stream.into_std() {
                Ok(stream) => {
                    connections.spawn_on(
                        async move {
                            let _place = place;
                            match TcpStream::from_std(stream) {
                                Ok(stream) => {
                                    connection(stream, peer, tls, settings, handler, stopping)
                                        .await;
                                }
                                Err(error) => {
                                    tracing::warn!(%peer, %error, "a connection could not move to its serving thread");
                                }
                            }
                        },
                        serving.pick(),
                    );
                }
                Err(error) => {
                    tracing::warn!(%peer, %error, "a connection could not leave the accepting thread");
                }
            },
        }
        // Reap finished connection tasks so the set holds only live ones.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let drain_timeout = stopped
        .borrow()
        .unwrap_or(crate::config::ServerConfig::default().drain_timeout.0);
    tracing::info!(listener = name, connections = connections.len(), "draining");
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(drain_timeout, drained).await.is_err() {
        tracing::warn!(listener = name, timeout = ?drain_timeout, remaining = connections.len(), "drain timeout passed; closing the remaining connections");
        connections.shutdown().await;
    }
}

/// Serves one accepted connection until it ends, after its TLS handshake
/// if the listener has TLS.
async fn connection<H, F>(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<Arc<Tls>>,
    settings: ConnSettings,
    handler: H,
    stopping: watch::Receiver<Option<Duration>>,
) where
    H: Fn(Request<Incoming>, SocketAddr, bool) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    // The clock starts at accept: the handshake counts against the header
    // timeout, so a client that opens a connection and stalls mid-handshake
    // holds it no longer than one that sends no request.
    let activity = Arc::new(Activity::new());
    let Some(tls) = tls else {
        return serve_stream(stream, peer, false, activity, settings, handler, stopping).await;
    };
    let handshake = tokio::time::timeout(settings.header_timeout, tls.acceptor.accept(stream));
    match handshake.await {
        Ok(Ok(stream)) => {
            serve_stream(stream, peer, true, activity, settings, handler, stopping).await;
        }
        Ok(Err(error)) => {
            metrics::counter!("larder_tls_handshake_failures_total").increment(1);
            tracing::debug!(%peer, %error, "TLS handshake failed");
        }
        Err(_) => {
            metrics::counter!("larder_tls_handshake_failures_total").increment(1);
            tracing::debug!(%peer, "no TLS handshake within the header timeout; closed");
        }
    }
}

/// Serves HTTP on a connection (plain or after its handshake).
async fn serve_stream<S, H, F>(
    stream: S,
    peer: SocketAddr,
    is_tls: bool,
    activity: Arc<Activity>,
    settings: ConnSettings,
    handler: H,
    stopping: watch::Receiver<Option<Duration>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, SocketAddr, bool) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let tracked = Arc::clone(&activity);
    let service = service_fn(move |request: Request<Incoming>| {
        let in_progress = tracked.begin();
        // Boxed: hyper moves the service future into its connection
        // state, and the unboxed one is a few KiB copied per request.
        let response = Box::pin(handler(request, peer, is_tls));
        async move {
            // The request is in progress until its body has gone out: a
            // long download is not an idle connection.
            let response = response.await.map(|body| {
                BodyExt::boxed(InProgressBody {
                    body,
                    _in_progress: in_progress,
                })
            });
            Ok::<_, Infallible>(response)
        }
    });
    let builder = builder();
    let connection = builder.serve_connection_with_upgrades(
        TokioIo::new(ClientStream::new(
            stream,
            settings.send_timeout,
            Arc::clone(&activity),
        )),
        service,
    );
    serve(connection, activity, settings, stopping, peer).await;
}

fn builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The header timeout is `serve`'s, from the connection's `Activity`.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(H2_MAX_HEADER_LIST_SIZE)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS)
        .keep_alive_interval(H2_KEEP_ALIVE)
        .keep_alive_timeout(H2_KEEP_ALIVE);
    builder
}

/// Drives one connection: closes it when no first request arrived within
/// the header timeout (counted from accept, before the protocol is even
/// known), shuts it down when a later HTTP/1.1 head took longer than that
/// (counted from its first byte) or when it sat idle past the idle timeout,
/// and when the listener drains.
async fn serve<C, E>(
    connection: C,
    activity: Arc<Activity>,
    settings: ConnSettings,
    mut stopped: watch::Receiver<Option<Duration>>,
    peer: SocketAddr,
) where
    C: Future<Output = Result<(), E>> + GracefulShutdown,
    E: std::fmt::Display,
{
    tokio::pin!(connection);
    let mut closing = stopped.borrow().is_some();
    if closing {
        connection.as_mut().shut_down();
    }
    // One timer for the connection's life, looked at only when it fires:
    // requests coming and going touch two atomics, not the timer wheel. It
    // fires no later than either timeout could run out, and is then moved
    // to the exact deadline.
    let check_every = settings.header_timeout.min(settings.idle_timeout);
    let timer = tokio::time::sleep_until(Instant::now() + check_every);
    tokio::pin!(timer);
    let mut timer_registered = false;
    // The drain signal is looked at the same way: its future is polled
    // once to be woken by a change, then only when a clone of the receiver
    // sees one (a shared counter, not this connection's place in the
    // signal's waiting list).
    let watcher = stopped.clone();
    let stop = stopped.changed();
    tokio::pin!(stop);
    let mut stop_registered = false;
    loop {
        tokio::select! {
            // The connection first: it is why the task woke nearly always.
            biased;
            outcome = connection.as_mut() => {
                if let Err(error) = outcome {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
                return;
            }
            () = std::future::poll_fn(|context| {
                let due = Instant::now() >= timer.deadline();
                poll_when_due(timer.as_mut(), due, &mut timer_registered, context)
            }), if !closing => {
                timer_registered = false;
                let now = Instant::now();
                match activity.deadline(settings) {
                    // A request in progress: look again later.
                    None => timer.as_mut().reset(now + check_every),
                    // A request ended since the timer was set.
                    Some(deadline) if deadline > now => timer.as_mut().reset(deadline),
                    Some(_) if !activity.has_served() => {
                        tracing::debug!(%peer, "no complete request within the header timeout; closed");
                        return;
                    }
                    // hyper closes a connection at once when a graceful
                    // shutdown finds it between requests, a partial head
                    // read, and finishes a response still being sent.
                    Some(_) if activity.head_started().is_some() => {
                        tracing::debug!(%peer, "no complete request head within the header timeout; closing");
                        connection.as_mut().shut_down();
                        closing = true;
                    }
                    Some(_) => {
                        tracing::debug!(%peer, "connection idle; closing it");
                        connection.as_mut().shut_down();
                        closing = true;
                    }
                }
            }
            _ = std::future::poll_fn(|context| {
                let due = !matches!(watcher.has_changed(), Ok(false));
                poll_when_due(stop.as_mut(), due, &mut stop_registered, context)
            }), if !closing => {
                connection.as_mut().shut_down();
                closing = true;
            }
        }
    }
}

/// Polls `signal` (a timer, the drain signal) only when it is `due`, or
/// once after it was set up, which registers the connection's task to be
/// woken when it fires. Polling them on every wake-up of the connection
/// touched their state for every request: at a thousand connections, where
/// none of it stays in the CPU's cache, that was 4% of a cache hit's
/// throughput. A timer is due once the clock passed its deadline: Tokio
/// rounds a deadline up to its next millisecond and fires no earlier, so a
/// timer that woke the task is always due.
fn poll_when_due<F: Future>(
    signal: std::pin::Pin<&mut F>,
    due: bool,
    registered: &mut bool,
    context: &mut std::task::Context<'_>,
) -> std::task::Poll<F::Output> {
    if *registered && !due {
        return std::task::Poll::Pending;
    }
    *registered = true;
    signal.poll(context)
}

/// What hyper-util's connection offers for a graceful end.
trait GracefulShutdown {
    fn shut_down(self: std::pin::Pin<&mut Self>);
}

impl<I, S, E> GracefulShutdown for auto::UpgradeableConnection<'_, I, S, E>
where
    S: hyper::service::HttpService<Incoming, ResBody = Body>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    E: auto::HttpServerConnExec<S::Future, Body>,
{
    fn shut_down(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// The HTTP/2 connection preface's start: a connection that opens with it
/// reads frames between requests, not request heads.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// One connection's requests: how many are in progress, when the last one
/// ended, whether there was one at all, when the bytes of the next HTTP/1.1
/// head began to arrive. Only the connection's own task touches it (the
/// atomics are for `Arc`, not for contention).
struct Activity {
    started: Instant,
    in_progress: AtomicUsize,
    /// Milliseconds from `started` to the end of the last request, plus one
    /// (0: no request has ended yet).
    last_end: AtomicU64,
    /// Milliseconds from `started` to the first byte read after the last
    /// request began, plus one (0: none read since).
    head_started: AtomicU64,
    http2: AtomicBool,
    served: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            in_progress: AtomicUsize::new(0),
            last_end: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            served: AtomicUsize::new(0),
        }
    }

    fn begin(self: &Arc<Self>) -> InProgress {
        self.served.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(0, Ordering::Relaxed);
        self.in_progress.fetch_add(1, Ordering::AcqRel);
        InProgress(Arc::clone(self))
    }

    fn in_progress(&self) -> usize {
        self.in_progress.load(Ordering::Acquire)
    }

    fn has_served(&self) -> bool {
        self.served.load(Ordering::Relaxed) > 0
    }

    /// Notes bytes read from the client: the first bytes after a request
    /// (with none in progress) start the next head's clock. Before the
    /// first request the clock runs from accept; an HTTP/2 connection has
    /// none (its idle reads are frames such as PING).
    fn bytes_read(&self, bytes: &[u8]) {
        if !self.has_served() {
            if bytes.starts_with(H2_PREFACE) {
                self.http2.store(true, Ordering::Relaxed);
            }
            return;
        }
        if self.in_progress() == 0
            && self.head_started.load(Ordering::Relaxed) == 0
            && !self.is_http2()
        {
            self.head_started.store(
                self.millis_since_start().saturating_add(1),
                Ordering::Relaxed,
            );
        }
    }

    fn is_http2(&self) -> bool {
        self.http2.load(Ordering::Relaxed)
    }

    /// When the bytes of a head not yet complete began to arrive.
    fn head_started(&self) -> Option<Duration> {
        match self.head_started.load(Ordering::Relaxed) {
            0 => None,
            plus_one => Some(Duration::from_millis(plus_one - 1)),
        }
    }

    fn millis_since_start(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// When the connection is due to close if nothing happens: none while
    /// a request is in progress.
    fn deadline(&self, settings: ConnSettings) -> Option<Instant> {
        if self.in_progress() > 0 {
            return None;
        }
        if !self.has_served() {
            return Some(self.started + settings.header_timeout);
        }
        if let Some(head) = self.head_started() {
            return Some(self.started + head + settings.header_timeout);
        }
        let ended = self.last_end.load(Ordering::Acquire).saturating_sub(1);
        // An HTTP/1.1 connection between requests waits for the next head:
        // the header timeout also bounds how long it may sit idle.
        let idle = if self.is_http2() {
            settings.idle_timeout
        } else {
            settings.idle_timeout.min(settings.header_timeout)
        };
        Some(self.started + Duration::from_millis(ended) + idle)
    }
}

/// A response body that holds its request in progress until hyper has
/// sent (or dropped) it.
struct InProgressBody {
    body: Body,
    _in_progress: InProgress,
}

impl http_body::Body for InProgressBody {
    type Data = bytes::Bytes;
    type Error = crate::http::body::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A request in progress on a connection; its end is recorded on drop.
struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        let activity = &self.0;
        let millis = activity.millis_since_start();
        activity
            .last_end
            .store(millis.saturating_add(1), Ordering::Release);
        activity.in_progress.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A client's connection: its writes fail once the peer has accepted no
/// bytes for `limit` (its receive window stayed full), so a client that
/// stops reading cannot hold a connection, a place under `max_connections`
/// and a response's buffers for as long as it likes; its reads tell the
/// connection's `Activity` when a request head begins.
struct ClientStream<S> {
    inner: S,
    stalled: std::pin::Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
    /// Whether `stalled` runs: from the first write that could not proceed.
    waiting: bool,
    activity: Arc<Activity>,
}

impl<S> ClientStream<S> {
    fn new(inner: S, limit: Duration, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            stalled: Box::pin(tokio::time::sleep(limit)),
            limit,
            waiting: false,
            activity,
        }
    }

    /// Passes a write's result on, starting the stall timer on the first
    /// `Pending` and failing the write when it runs out.
    fn watch<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        polled: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future as _;
        use std::task::Poll;
        match polled {
            Poll::Ready(result) => {
                self.waiting = false;
                Poll::Ready(result)
            }
            Poll::Pending => {
                if !self.waiting {
                    self.waiting = true;
                    self.stalled.as_mut().reset(Instant::now() + self.limit);
                }
                if self.stalled.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client took no data for the send timeout",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for ClientStream<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Some(read) = buf.filled().get(before..).filter(|read| !read.is_empty()) {
            this.activity.bytes_read(read);
        }
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for ClientStream<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, polled)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, polled)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
