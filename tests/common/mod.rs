//! Test support shared by every integration test file: start Larder in
//! process from a YAML string on 127.0.0.1:0, start real hyper origins that
//! count and record their requests, send requests over real sockets, and
//! poll for a condition with a deadline.
//!
//! Each test file uses a different part of this module.
#![allow(dead_code)]

pub mod raw_http;
pub mod redis_server;

use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use larder::app::Server;
use larder::http::body::{Body, BoxError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const LOOPBACK_ANY_PORT: &str = "127.0.0.1:0";

/// How long a polling helper waits for its condition before failing.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// How often a polling helper checks its condition.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// The bearer token of the admin block [`ADMIN_BLOCK`].
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// An `admin:` block with [`ADMIN_TOKEN`], to start a test config with;
/// [`Larder::admin`] then sends admin requests with that token.
pub const ADMIN_BLOCK: &str = "admin:\n  token: test-admin-token\n";

/// A Larder running in this process.
pub struct Larder {
    pub addr: SocketAddr,
    /// The HTTPS listener, when the config has `tls:`.
    pub tls_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    server: Server,
}

impl Larder {
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    pub fn admin_url(&self, path_and_query: &str) -> String {
        let addr = self
            .admin_addr
            .expect("this Larder was started without an admin: block");
        format!("http://{addr}{path_and_query}")
    }

    /// `method path` on the admin listener with the bearer [`ADMIN_TOKEN`]
    /// (the config needs [`ADMIN_BLOCK`]); a non-empty `body` goes as JSON.
    pub async fn admin(&self, method: &str, path: &str, body: impl Into<Bytes>) -> Reply {
        let body = body.into();
        let authorization = format!("Bearer {ADMIN_TOKEN}");
        let mut headers = vec![("authorization", authorization.as_str())];
        if !body.is_empty() {
            headers.push(("content-type", "application/json"));
        }
        send(method, &self.admin_url(path), &headers, body).await
    }

    /// Applies a new config; the listeners keep their ports.
    pub async fn reload(&self, yaml: &str) -> Result<(), String> {
        let mut config = larder::config::load_str(yaml, "test.yml").map_err(|e| e.to_string())?;
        config.listen = self.addr;
        if let (Some(tls), Some(addr)) = (config.tls.as_mut(), self.tls_addr) {
            tls.listen = addr;
        }
        if let (Some(admin), Some(addr)) = (config.admin.as_mut(), self.admin_addr) {
            admin.listen = addr;
        }
        self.server.reload(config).await.map_err(|e| e.to_string())
    }

    /// Graceful shutdown: in-flight requests finish, new connections are refused.
    pub async fn stop(self) {
        self.server.shutdown().await;
    }
}

/// Starts Larder from `yaml` with both listeners on 127.0.0.1:0. Panics with
/// the config errors if the YAML is invalid (test-only). Set
/// `LARDER_TEST_LOG=debug` to see the logs.
pub async fn start_larder(yaml: &str) -> Larder {
    start_larder_with(yaml, larder::app::Options::default()).await
}

/// [`start_larder`] with start options (a manual cache clock, say).
pub async fn start_larder_with(yaml: &str, options: larder::app::Options) -> Larder {
    if let Ok(level) = std::env::var("LARDER_TEST_LOG") {
        larder::telemetry::init(&level, larder::config::LogFormat::Text);
    }
    let mut config = larder::config::load_str(yaml, "test.yml")
        .unwrap_or_else(|errors| panic!("invalid test config:\n{errors}\n---\n{yaml}"));
    let any_port: SocketAddr = LOOPBACK_ANY_PORT.parse().expect("loopback address");
    config.listen = any_port;
    if let Some(tls) = config.tls.as_mut() {
        tls.listen = any_port;
    }
    if let Some(admin) = config.admin.as_mut() {
        admin.listen = any_port;
    }
    let server = larder::app::start(config, options)
        .await
        .unwrap_or_else(|error| panic!("larder did not start: {error}"));
    Larder {
        addr: server.proxy_addr,
        tls_addr: server.tls_addr,
        admin_addr: server.admin_addr,
        server,
    }
}

/// What an origin saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

/// A real HTTP/1.1 origin on 127.0.0.1:0 that counts the requests it
/// answers and keeps what it saw of each.
pub struct Origin {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    accept: Mutex<Option<JoinHandle<()>>>,
    open: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// After [`Origin::stop`]: the port, bound and never listening.
    held_port: Mutex<Option<tokio::net::TcpSocket>>,
}

impl Origin {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Every request answered so far, in arrival order.
    pub fn requests(&self) -> Vec<Seen> {
        lock(&self.seen).clone()
    }

    /// The latest request; panics when there was none.
    pub fn last_request(&self) -> Seen {
        lock(&self.seen)
            .last()
            .cloned()
            .expect("the origin has not seen a request")
    }

    /// Stops the origin: its port refuses connections from now on and every
    /// connection it had open (e.g. one Larder keeps in its pool) is closed.
    ///
    /// The port stays bound (never listening) until the origin is dropped:
    /// a port merely closed could be handed to another test's origin, which
    /// would then answer in place of "nothing listens here". To bring an
    /// origin back on it with [`start_origin_at`], drop this one first.
    pub async fn stop(&self) {
        let accept = lock(&self.accept).take();
        if let Some(accept) = accept {
            accept.abort();
            let _ = accept.await;
        }
        let open = std::mem::take(&mut *lock(&self.open));
        for connection in open {
            connection.abort();
            let _ = connection.await;
        }
        *lock(&self.held_port) = hold_port(self.addr);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Starts an origin that answers every request with `handler`. It runs until
/// the test's runtime ends or [`Origin::stop`].
pub async fn start_origin<F, Fut>(handler: F) -> Origin
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    serve_origin(LOOPBACK_ANY_PORT, true, move |request, _| handler(request)).await
}

/// As [`start_origin`], listening on `addr`: to bring an origin back on the
/// port Larder was told about after [`Origin::stop`].
pub async fn start_origin_at<F, Fut>(addr: SocketAddr, handler: F) -> Origin
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    serve_origin(&addr.to_string(), true, move |request, _| handler(request)).await
}

/// As [`start_origin`], the handler also getting the request's number (the
/// first request is 1).
pub async fn start_numbered_origin<F, Fut>(handler: F) -> Origin
where
    F: Fn(Request<Incoming>, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    serve_origin(LOOPBACK_ANY_PORT, true, handler).await
}

/// As [`start_numbered_origin`], without the `Date` hyper adds to every
/// response: the responses carry a `Date` only if the handler sets one.
pub async fn start_dateless_origin<F, Fut>(handler: F) -> Origin
where
    F: Fn(Request<Incoming>, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    serve_origin(LOOPBACK_ANY_PORT, false, handler).await
}

async fn serve_origin<F, Fut>(bind: &str, auto_date: bool, handler: F) -> Origin
where
    F: Fn(Request<Incoming>, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind(bind)
        .await
        .unwrap_or_else(|e| panic!("bind a test origin on {bind}: {e}"));
    let addr = listener.local_addr().expect("origin address");
    let hits = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let open: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
    let handler = Arc::new(handler);
    let (counter, accepted, log, tasks) = (
        hits.clone(),
        connections.clone(),
        seen.clone(),
        open.clone(),
    );
    let accept = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of descriptors, say: let the connections that hold
                // them finish rather than spin.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            accepted.fetch_add(1, Ordering::SeqCst);
            let (handler, counter, log) = (handler.clone(), counter.clone(), log.clone());
            let service = service_fn(move |request: Request<Incoming>| {
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                lock(&log).push(Seen {
                    method: request.method().clone(),
                    uri: request.uri().clone(),
                    headers: request.headers().clone(),
                });
                let response = handler(request, n);
                async move { Ok::<_, std::convert::Infallible>(response.await) }
            });
            let connection = tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .auto_date_header(auto_date)
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
            let mut open = lock(&tasks);
            open.retain(|task| !task.is_finished());
            open.push(connection);
        }
    });
    Origin {
        addr,
        hits,
        connections,
        seen,
        accept: Mutex::new(Some(accept)),
        open,
        held_port: Mutex::new(None),
    }
}

/// Binds `addr` without listening: connections to it are refused, and the
/// kernel hands the port to no other socket bound to port 0. SO_REUSEADDR
/// lets the bind succeed over the stopped origin's TIME_WAIT connections.
fn hold_port(addr: SocketAddr) -> Option<tokio::net::TcpSocket> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.set_reuseaddr(true).ok()?;
    socket.bind(addr).ok()?;
    Some(socket)
}

/// A whole response, as a client saw it.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON (problem+json, admin answers).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    /// The `Cache-Status` header, or "" without one.
    pub fn cache_status(&self) -> &str {
        self.header("cache-status").unwrap_or("")
    }

    /// The `Age` header in seconds; panics without a valid one.
    pub fn age(&self) -> u64 {
        self.header("age")
            .and_then(|age| age.parse().ok())
            .unwrap_or_else(|| panic!("no valid Age in {:?}", self.headers))
    }
}

/// Asserts `reply` is an RFC 9457 problem with `status`, a title and a detail.
pub fn assert_problem(reply: &Reply, status: u16) {
    assert_eq!(reply.status, status, "body: {}", reply.text());
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
    let problem = reply.json();
    assert_eq!(problem["status"], status);
    assert!(problem["title"].is_string());
    assert!(
        problem["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "problem without detail: {problem}"
    );
}

/// Waits until `GET url` answers 200 and returns that reply.
pub async fn served(url: &str) -> Reply {
    eventually(&format!("200 from {url}"), || async {
        let reply = get(url).await;
        (reply.status == StatusCode::OK).then_some(reply)
    })
    .await
}

pub async fn get(url: &str) -> Reply {
    send("GET", url, &[], Bytes::new()).await
}

pub async fn get_with(url: &str, headers: &[(&str, &str)]) -> Reply {
    send("GET", url, headers, Bytes::new()).await
}

/// Sends one request on a fresh HTTP/1.1 connection and reads the whole reply.
pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let response = open(method, url, headers, body).await;
    let (parts, incoming) = response.into_parts();
    let body = incoming
        .collect()
        .await
        .unwrap_or_else(|e| panic!("reading the body of {method} {url} failed: {e}"))
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Sends one request on a fresh HTTP/1.1 connection and returns the response
/// once its head has arrived; the body streams as the server sends it.
pub async fn open(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<Incoming> {
    let uri: http::Uri = url
        .parse()
        .unwrap_or_else(|e| panic!("bad test URL {url}: {e}"));
    let authority = uri.authority().expect("test URL has a host").clone();
    let mut builder = Request::builder()
        .method(method)
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()));
    let mut has_host = false;
    for (name, value) in headers {
        has_host |= name.eq_ignore_ascii_case("host");
        builder = builder.header(*name, *value);
    }
    if !has_host {
        builder = builder.header("host", authority.as_str());
    }
    let request = builder
        .body(Full::new(body.into()))
        .expect("valid test request");
    let mut sender = connect(authority.as_str()).await;
    sender
        .send_request(request)
        .await
        .unwrap_or_else(|e| panic!("{method} {url} failed: {e}"))
}

/// An HTTP/1.1 client connection to `authority`, driven in the background.
pub async fn connect<B>(authority: &str) -> hyper::client::conn::http1::SendRequest<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(authority)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {authority}: {e}"));
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap_or_else(|e| panic!("HTTP handshake with {authority} failed: {e}"));
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    sender
}

/// A response with `status`, `body` and extra `headers`, for origin handlers.
pub fn respond(status: u16, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Response<Body> {
    let mut builder = Response::builder().status(status);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(larder::http::body::full(body))
        .expect("valid test response")
}

/// Feeds the body of a [`streamed`] response.
pub struct BodySender(mpsc::Sender<Result<Frame<Bytes>, BoxError>>);

impl BodySender {
    /// Sends one chunk; false once the body's reader has gone.
    pub async fn chunk(&self, data: impl Into<Bytes>) -> bool {
        self.0.send(Ok(Frame::data(data.into()))).await.is_ok()
    }

    /// Breaks the body: an origin's server then cuts the connection
    /// mid-body, without the end of the message.
    pub async fn fail(self, why: &str) {
        let _ = self.0.send(Err(why.to_string().into())).await;
    }

    /// Resolves once the body's reader has dropped it (for an origin: the
    /// connection the response was going out on has gone).
    pub async fn closed(&self) {
        self.0.closed().await;
    }
}

/// A response with `status` and `headers` whose body is what is sent
/// through the returned [`BodySender`], ending when that is dropped.
pub fn streamed(status: u16, headers: &[(&str, &str)]) -> (BodySender, Response<Body>) {
    let (sender, receiver) = mpsc::channel(1);
    let frames = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|frame| (frame, receiver))
    });
    let mut response = respond(status, headers, Bytes::new());
    *response.body_mut() = larder::http::body::boxed(StreamBody::new(frames));
    (BodySender(sender), response)
}

/// An HTTP-date `offset_secs` seconds from now (negative: in the past).
pub fn http_date(offset_secs: i64) -> String {
    let now = SystemTime::now();
    let offset = Duration::from_secs(offset_secs.unsigned_abs());
    let time = if offset_secs >= 0 {
        now + offset
    } else {
        now - offset
    };
    httpdate::fmt_http_date(time)
}

/// What a polled condition gives: `true`, or `Some(value)`, once it holds.
pub trait Outcome {
    type Value;
    fn ready(self) -> Option<Self::Value>;
}

impl Outcome for bool {
    type Value = ();
    fn ready(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn ready(self) -> Option<T> {
        self
    }
}

/// Checks `condition` every 20 ms until it holds and returns what it gave;
/// fails "timed out waiting for {what}" after [`DEADLINE`]. For conditions
/// that only look (counters, flags); see [`eventually`] for ones that await.
pub async fn wait_until<O: Outcome>(
    what: impl Display,
    mut condition: impl FnMut() -> O,
) -> O::Value {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = condition().ready() {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// As [`wait_until`], for a condition that awaits (a request, a lookup);
/// a check still pending at the deadline fails the same way.
pub async fn eventually<O: Outcome>(
    what: impl Display,
    mut condition: impl AsyncFnMut() -> O,
) -> O::Value {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let checked = tokio::time::timeout_at(deadline, condition()).await;
        if let Some(value) = checked.ok().and_then(Outcome::ready) {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// The access-log lines (target `larder::access`: one per request, written
/// when its response body has ended or been dropped) that Larder writes on
/// this thread while this value lives, as `field=value` pairs. Larder
/// started with `Options::connections_on_caller` in a plain
/// `#[tokio::test]` serves on the test's own thread, so these are that
/// test's requests; on serving threads or a multi-thread runtime lines are
/// missed.
pub struct AccessLog {
    lines: Arc<Mutex<Vec<String>>>,
    _scope: tracing::subscriber::DefaultGuard,
}

impl AccessLog {
    /// Starts capturing and returns once the access log reaches the capture:
    /// `probe` sends a request Larder logs (one that changes nothing the
    /// test checks) until its line shows up. tracing decides once per log
    /// statement, for the whole process, whether anyone listens, and with
    /// only thread-scoped listeners it asks whichever thread reaches the
    /// statement first: another test's thread answers no. Deciding again
    /// once the statement has been reached makes it ask this thread.
    pub async fn capture(mut probe: impl AsyncFnMut()) -> Self {
        use tracing_subscriber::layer::SubscriberExt;
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let subscriber = tracing_subscriber::registry().with(AccessLayer(lines.clone()));
        let log = Self {
            lines,
            _scope: tracing::subscriber::set_default(subscriber),
        };
        eventually("the access log to reach the capture", async || {
            tracing::callsite::rebuild_interest_cache();
            probe().await;
            !log.lines().is_empty()
        })
        .await;
        log
    }

    pub fn lines(&self) -> Vec<String> {
        lock(&self.lines).clone()
    }
}

struct AccessLayer(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for AccessLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() == "larder::access" {
            let mut line = Fields(String::new());
            event.record(&mut line);
            lock(&self.0).push(line.0);
        }
    }
}

/// An event's fields as `name=value` separated by spaces.
struct Fields(String);

impl Fields {
    fn push(&mut self, name: &str, value: std::fmt::Arguments<'_>) {
        use std::fmt::Write;
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        let _ = write!(self.0, "{name}={value}");
    }
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.push(field.name(), format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.push(field.name(), format_args!("{value:?}"));
    }
}

/// A plugin component built from `plugins/`; fails (never skips) when it
/// was not built.
pub fn wasm(name: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("plugins/target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: build the plugins first with `cd plugins && cargo build --release --target wasm32-wasip2`",
        path.display()
    );
    path
}
