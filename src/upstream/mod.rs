//! Outbound to origins: one configured upstream's servers in round robin, a
//! pooled keep-alive client (http:// and https://, the one trust policy of
//! `http::tls` plus `ca_file`) or, for `protocol: h2`/`h2c`, one shared
//! HTTP/2 connection per server (`h2`), the connect and response-head
//! timeouts, and which failures may be sent again ([`UpstreamError`]
//! carries that as data).
//!
//! Must not know about routes or the cache, or decide what a client is told:
//! the proxy maps an [`UpstreamError`] to a status.

mod balance;
mod h2;
mod health;
mod pool;

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::config::{ServerAddr, Upstream, UpstreamProtocol};
use crate::http::body::{self, Body, BoxError};
use crate::http::error::Retry;
use crate::http::{copy_head, error_chain, io_error_kind, tls};
use pool::{Pool, SendError};

/// How long a pooled connection must have been idle before a failure on it
/// counts as the server's close crossing our request (servers close idle
/// connections after a few seconds: Node.js after 5, nginx after 75).
const CLOSE_RACE_AFTER_IDLE: Duration = Duration::from_secs(1);

/// One `servers:` entry, parsed once, with its idle connections.
struct Server {
    authority: Authority,
    /// `scheme://authority/`, what the connector dials.
    base: Uri,
    pool: Arc<Pool>,
    /// The shared HTTP/2 connection (`protocol: h2` or `h2c`); `None` for
    /// HTTP/1.1, which uses `pool`.
    h2: Option<Arc<h2::H2Pool>>,
    /// Milliseconds since [`clock_origin`] until which this server is skipped;
    /// 0 when it is up.
    down_until_ms: AtomicU64,
    /// What the active health checks last said (always healthy without).
    health: Arc<health::Health>,
    /// Requests sent and not yet answered with a head (least requests).
    in_flight: AtomicUsize,
    /// Gateway failures since the last good answer (passive ejection).
    failures_in_a_row: AtomicU32,
    /// A stable hash of the server's address (consistent hash).
    id: u64,
}

impl Server {
    /// Not skipped after a failure (the clock is read only for a server
    /// that was marked down).
    fn is_up(&self) -> bool {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        until == 0 || until <= now_ms()
    }

    /// Up and, when checked, healthy.
    fn takes_traffic(&self) -> bool {
        self.health.is_healthy() && self.is_up()
    }

    fn mark_down(&self, now_ms: u64, eject_for: Duration) {
        let until = now_ms.saturating_add(u64::try_from(eject_for.as_millis()).unwrap_or(u64::MAX));
        self.down_until_ms.store(until, Ordering::Relaxed);
        self.failures_in_a_row.store(0, Ordering::Relaxed);
    }

    /// A good answer: up, and the failure count starts again. Writes only
    /// what changed (this runs on every forwarded request).
    fn mark_up(&self) {
        if self.down_until_ms.load(Ordering::Relaxed) != 0 {
            self.down_until_ms.store(0, Ordering::Relaxed);
        }
        if self.failures_in_a_row.load(Ordering::Relaxed) != 0 {
            self.failures_in_a_row.store(0, Ordering::Relaxed);
        }
    }

    /// One more gateway failure in a row; the count it reached.
    fn count_failure(&self) -> u32 {
        self.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// A process-wide monotonic origin for the servers' down marks.
fn clock_origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(clock_origin().elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Why an upstream call failed; also the `kind` label of
/// `larder_upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// No connection could be made.
    Connect,
    /// No response head within the timeout.
    Timeout,
    /// The connection closed before a complete response head.
    Reset,
    /// The client's request body broke while it was sent (a malformed
    /// chunk, the client gone mid-upload): the client's fault, not counted
    /// as the upstream's.
    RequestBody,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Reset => "reset",
            Self::RequestBody => "request_body",
        }
    }
}

/// Why an upstream client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("upstream {0} has no servers")]
    NoServers(String),
    #[error("upstream {upstream}: server {server}: {reason}")]
    Server {
        upstream: String,
        server: String,
        reason: http::Error,
    },
    #[error("upstream {upstream}: {cause}")]
    Tls {
        upstream: String,
        cause: tls::TlsError,
    },
}

/// One upstream call that produced no response.
#[derive(Debug, Clone, thiserror::Error)]
#[error("upstream {upstream}: {} ({cause})", .kind.as_str())]
pub struct UpstreamError {
    pub upstream: Arc<str>,
    pub kind: FailureKind,
    /// How long was waited: the connect timeout or the response timeout.
    pub waited: Duration,
    /// Whether another server may be tried with the same request.
    pub retry: Retry,
    /// What the transport said, for the log.
    pub cause: String,
}

/// A running upstream. Built from [`Upstream`]; reused across reloads when
/// its config did not change, so its connection pool survives.
pub struct UpstreamClient {
    name: Arc<str>,
    config: Upstream,
    servers: Vec<Server>,
    /// Moves on with every pick: the round-robin turn, the random draw.
    next: AtomicUsize,
    /// A round of smooth weighted round robin over `servers`.
    schedule: Vec<usize>,
    /// Each server's weight and identity hash, in the order of `servers`.
    weights: Vec<u32>,
    ids: Vec<u64>,
    connector: HttpsConnector<HttpConnector>,
    host: Option<HeaderValue>,
    duration: metrics::Histogram,
    /// The active health checks' task, stopped with this client.
    checks: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for UpstreamClient {
    fn drop(&mut self) {
        if let Some(checks) = &self.checks {
            checks.abort();
        }
    }
}

impl UpstreamClient {
    pub fn new(name: &str, config: &Upstream) -> Result<Self, SetupError> {
        // The config parsed servers and host; what can still fail is what
        // the file system can change (the CA bundle).
        let connector = build_connector(config).map_err(|cause| SetupError::Tls {
            upstream: name.to_string(),
            cause,
        })?;
        let servers = config
            .servers
            .iter()
            .map(|addr| {
                server_of(addr, config, &connector).map_err(|reason| SetupError::Server {
                    upstream: name.to_string(),
                    server: addr.to_string(),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if servers.is_empty() {
            return Err(SetupError::NoServers(name.to_string()));
        }
        let host = config.host.clone();
        let name: Arc<str> = Arc::from(name);
        let checks = config.health_check.as_ref().and_then(|check| {
            let runtime = tokio::runtime::Handle::try_current().ok()?;
            let probed = servers
                .iter()
                .map(|server| health::Probed {
                    authority: server.authority.clone(),
                    base: server.base.clone(),
                    health: Arc::clone(&server.health),
                })
                .collect();
            Some(runtime.spawn(health::run(
                name.clone(),
                check.clone(),
                host.clone(),
                connector.clone(),
                config.protocol.is_http2(),
                probed,
            )))
        });
        Ok(Self {
            duration: metrics::histogram!("larder_upstream_duration_seconds", "upstream" => name.clone()),
            connector,
            name,
            config: config.clone(),
            schedule: balance::smooth_schedule(&weights_of(config, servers.len())),
            weights: weights_of(config, servers.len()),
            ids: servers.iter().map(|server| server.id).collect(),
            servers,
            next: AtomicUsize::new(0),
            host,
            checks,
        })
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Whether requests go out as HTTP/2 streams (`protocol: h2` or `h2c`).
    pub fn speaks_http2(&self) -> bool {
        self.config.protocol.is_http2()
    }

    /// Whether this client can serve `config` as it is. One with a `ca_file`
    /// is always rebuilt, so a reload picks up a renewed CA bundle.
    pub fn is_built_from(&self, config: &Upstream) -> bool {
        &self.config == config && config.ca_file.is_none()
    }

    /// The server `balance` picks among those healthy and not marked down
    /// (other than `except`); when none is, among those not marked down,
    /// then among all (fail open, as Envoy's panic threshold: better a try,
    /// and the cache's stale-if-error, than no answer).
    fn pick(&self, affinity: u64, except: Option<usize>) -> usize {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        if self.servers.len() == 1 {
            return 0;
        }
        let in_flight = |index: usize| self.servers[index].in_flight.load(Ordering::Relaxed);
        let tiers: [&dyn Fn(&Server) -> bool; 3] =
            [&Server::takes_traffic, &Server::is_up, &|_| true];
        for tier in tiers {
            let eligible = |index: usize| Some(index) != except && tier(&self.servers[index]);
            let candidates = balance::Candidates {
                eligible: &eligible,
                weights: &self.weights,
                in_flight: &in_flight,
                ids: &self.ids,
                schedule: &self.schedule,
            };
            if let Some(index) = balance::choose(self.config.balance, &candidates, turn, affinity) {
                return index;
            }
        }
        except.map_or(0, |except| (except + 1) % self.servers.len())
    }

    /// The servers' state for the admin API: weight, health by the active
    /// checks, whether passive ejection skips it, requests in flight.
    pub fn status(&self) -> serde_json::Value {
        let servers: Vec<serde_json::Value> = self
            .servers
            .iter()
            .zip(&self.weights)
            .map(|(server, weight)| {
                serde_json::json!({
                    "server": server.authority.as_str(),
                    "weight": weight,
                    "healthy": server.health.is_healthy(),
                    "skipped": !server.is_up(),
                    "in_flight": server.in_flight.load(Ordering::Relaxed),
                })
            })
            .collect();
        let balance = match self.config.balance {
            crate::config::Balance::RoundRobin => "round_robin",
            crate::config::Balance::LeastRequests => "least_requests",
            crate::config::Balance::ConsistentHash => "consistent_hash",
        };
        serde_json::json!({
            "balance": balance,
            "protocol": self.config.protocol.as_str(),
            "health_check": self.config.health_check.is_some(),
            "servers": servers,
        })
    }

    /// The request's affinity for consistent hashing: its host, path and
    /// query (0 for the other policies, which ignore it).
    fn affinity(&self, request: &Request<Body>) -> u64 {
        if self.config.balance != crate::config::Balance::ConsistentHash {
            return 0;
        }
        let host = request
            .headers()
            .get(header::HOST)
            .map_or(&b""[..], HeaderValue::as_bytes);
        let target = request
            .uri()
            .path_and_query()
            .map_or("/", PathAndQuery::as_str);
        balance::fnv1a(&[host, target.as_bytes()])
    }

    /// Sends `request` (headers already cleaned) to the server `balance`
    /// picks and waits for the response head, up to the upstream's
    /// `timeout`. An idempotent request without a body tries another server
    /// once when no connection could be made (nothing was sent yet), as
    /// nginx's `proxy_next_upstream error`.
    pub async fn send(&self, request: Request<Body>) -> Result<Response<Body>, UpstreamError> {
        let affinity = self.affinity(&request);
        let mut request = request;
        // A copy to send to another server, when there is one to try.
        let spare = if self.servers.len() > 1 && is_replayable(&request) {
            let (head, body) = request.into_parts();
            let spare = copy_head(&head);
            request = Request::from_parts(head, body);
            Some(spare)
        } else {
            None
        };
        let first = self.pick(affinity, None);
        let error = match self.attempt(first, request).await {
            Ok(response) => return Ok(response),
            Err(error) => error,
        };
        match spare {
            Some(spare) if error.retry == Retry::NothingSent => {
                let second = self.pick(affinity, Some(first));
                tracing::debug!(upstream = %self.name, server = %self.servers[second].authority, "trying another server");
                self.attempt(second, Request::from_parts(spare, body::empty()))
                    .await
            }
            _ => Err(error),
        }
    }

    /// One try on server `index`: marks it up when it answered; ejects it
    /// for `ejection.duration` when it could not be reached (at once, as
    /// nginx's `max_fails=1`) or failed `ejection.consecutive_failures`
    /// times in a row (Envoy's consecutive gateway failures).
    async fn attempt(
        &self,
        index: usize,
        request: Request<Body>,
    ) -> Result<Response<Body>, UpstreamError> {
        let server = &self.servers[index];
        let outcome = self.send_to(server, request).await;
        let failure = match &outcome {
            Ok(response) if is_gateway_status(response.status()) => {
                Some(("failing", server.count_failure()))
            }
            Ok(_) => {
                server.mark_up();
                None
            }
            // Nothing reached the server: it is not there.
            Err(error) if error.retry == Retry::NothingSent => Some(("unreachable", u32::MAX)),
            // The client's body broke: not the server's failure.
            Err(error) if error.kind == FailureKind::RequestBody => None,
            Err(_) => Some(("failing", server.count_failure())),
        };
        if let Some((reason, in_a_row)) = failure
            && in_a_row >= self.config.ejection.consecutive_failures
            && self.servers.len() > 1
        {
            let eject_for = self.config.ejection.duration.get();
            tracing::warn!(upstream = %self.name, server = %server.authority, reason, eject_for = ?eject_for, "server ejected");
            metrics::counter!("larder_upstream_ejections_total", "upstream" => self.name.clone(), "reason" => reason)
                .increment(1);
            server.mark_down(now_ms(), eject_for);
        }
        outcome
    }

    /// Sends an Upgrade request on a connection of its own (after `101` it
    /// belongs to the tunnel), to the next server in round robin.
    pub async fn send_upgrade(
        &self,
        mut request: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        if self.config.protocol.is_http2() {
            // The config gives such a route no upgrades; this is a backstop.
            return Err(self.failure(
                FailureKind::Connect,
                Duration::ZERO,
                Retry::No,
                format!(
                    "an upgrade needs HTTP/1.1 and this upstream speaks {}",
                    self.config.protocol.as_str()
                ),
            ));
        }
        let server = &self.servers[self.pick(self.affinity(&request), None)];
        self.address_to(server, &mut request);
        let exchange = async {
            let mut sender = pool::connect_for_upgrade(
                &self.connector,
                &server.base,
                self.config.connect_timeout.0,
            )
            .await
            .map_err(Attempt::Connect)?;
            sender.send_request(request).await.map_err(Attempt::Send)
        };
        let outcome = tokio::time::timeout(self.config.timeout.0, exchange).await;
        self.settle(outcome)
    }

    async fn send_to(
        &self,
        server: &Server,
        mut request: Request<Body>,
    ) -> Result<Response<Body>, UpstreamError> {
        self.address_to(server, &mut request);
        let started = Instant::now();
        server.in_flight.fetch_add(1, Ordering::Relaxed);
        let _answered = InFlight(&server.in_flight);
        // Boxed once here so the futures of every caller above stay small
        // (each layer would otherwise carry and copy this one's kilobytes).
        let outcome = Box::pin(self.exchange_with_head_timeout(server, request)).await;
        self.duration.record(started.elapsed().as_secs_f64());
        self.settle(outcome)
    }

    /// Points a cleaned request at `server`: origin-form target, HTTP/1.1
    /// (whatever the client spoke to us), and the upstream's `host` if set.
    /// For HTTP/2, see [`Self::address_to_h2`].
    fn address_to(&self, server: &Server, request: &mut Request<Body>) {
        if server.h2.is_some() {
            return self.address_to_h2(server, request);
        }
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *request.uri_mut() = Uri::from(path);
        *request.version_mut() = Version::HTTP_11;
        if let Some(host) = &self.host {
            request.headers_mut().insert(header::HOST, host.clone());
        } else if !request.headers().contains_key(header::HOST)
            && let Ok(host) = HeaderValue::from_str(server.authority.as_str())
        {
            request.headers_mut().insert(header::HOST, host);
        }
    }

    /// An HTTP/2 request: absolute target (the server's scheme, the Host the
    /// HTTP/1.1 path would send as `:authority`, the path), no Host header
    /// (RFC 9113 section 8.3.1: `:authority` replaces it).
    fn address_to_h2(&self, server: &Server, request: &mut Request<Body>) {
        let host = match &self.host {
            Some(host) => Some(host.clone()),
            None => request.headers_mut().remove(header::HOST),
        };
        request.headers_mut().remove(header::HOST);
        let authority = host
            .and_then(|host| Authority::try_from(host.as_bytes()).ok())
            .unwrap_or_else(|| server.authority.clone());
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let scheme = server
            .base
            .scheme()
            .cloned()
            .unwrap_or(http::uri::Scheme::HTTP);
        if let Ok(uri) = Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query(path.clone())
            .build()
        {
            *request.uri_mut() = uri;
        } else {
            *request.uri_mut() = Uri::from(path);
        }
        *request.version_mut() = Version::HTTP_2;
    }

    /// Sends `request` and waits up to `timeout` for the response head,
    /// counted from the end of the request body: a slow upload is not a slow
    /// upstream. (An upstream that answers before reading the whole body is
    /// still answered.)
    async fn exchange_with_head_timeout(
        &self,
        server: &Server,
        request: Request<Body>,
    ) -> Result<Result<Response<Body>, Attempt>, tokio::time::error::Elapsed> {
        let body_sent = (!http_body::Body::is_end_stream(request.body()))
            .then(|| Arc::new(tokio::sync::Notify::new()));
        let request = match &body_sent {
            Some(signal) => {
                let signal = signal.clone();
                request.map(|inner| body::boxed(NotifyAtEnd::new(inner, signal)))
            }
            None => request,
        };
        // One exchange future for both cases: it is the bulk of this one.
        let response = self.exchange(server, request);
        tokio::pin!(response);
        if let Some(body_sent) = &body_sent {
            tokio::select! {
                outcome = &mut response => return Ok(outcome),
                () = body_sent.notified() => {}
            }
        }
        tokio::time::timeout(self.config.timeout.0, response).await
    }

    /// One request on a pooled connection, or on a new one. A pooled
    /// connection the server closed before our request went out is passed
    /// over for the next (the request was not sent, so this is safe for any
    /// method). One that had sat idle and fails before any answer may have
    /// been closed by the server just as our request went out: an idempotent
    /// request without a body is sent once more on a new connection, as
    /// nginx does.
    async fn exchange(
        &self,
        server: &Server,
        mut request: Request<Body>,
    ) -> Result<Response<Body>, Attempt> {
        if let Some(h2) = &server.h2 {
            // Boxed: the HTTP/1.1 path's future stays as it was.
            return Box::pin(exchange_h2(h2, request)).await;
        }
        let mut may_use_pool = true;
        loop {
            let conn = match may_use_pool.then(|| server.pool.checkout()).flatten() {
                Some(conn) => conn,
                // Boxed: connecting is the rare case, and its future (TCP,
                // TLS, handshake) would otherwise make every request's larger.
                None => Box::pin(pool::connect(
                    &self.connector,
                    &server.base,
                    self.config.connect_timeout.0,
                ))
                .await
                .map_err(Attempt::Connect)?,
            };
            let reused = conn.reused;
            // Busy connections skip the copy: the race needs an idle one.
            let replay =
                if reused && conn.idle_for >= CLOSE_RACE_AFTER_IDLE && is_replayable(&request) {
                    let (head, body) = request.into_parts();
                    let copy = Request::from_parts(copy_head(&head), body::empty());
                    request = Request::from_parts(head, body);
                    Some(copy)
                } else {
                    None
                };
            let error = match pool::send(&server.pool, conn, request).await {
                Ok(response) => return Ok(response),
                Err(SendError::NotSent(unsent, _)) if reused => {
                    request = *unsent;
                    continue;
                }
                Err(SendError::NotSent(_, error) | SendError::Failed(error)) => error,
            };
            match replay {
                Some(copy) if closed_before_answering(&error) => {
                    tracing::debug!(upstream = %self.name, %error, "an idle upstream connection closed under the request; sending it again on a new one");
                    request = copy;
                    may_use_pool = false;
                }
                _ => return Err(Attempt::Send(error)),
            }
        }
    }

    /// Maps an attempt's outcome to the response or to the error a client sees.
    fn settle<T>(
        &self,
        outcome: Result<Result<T, Attempt>, tokio::time::error::Elapsed>,
    ) -> Result<T, UpstreamError> {
        let timeout = self.config.timeout.0;
        match outcome {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(Attempt::Connect(error))) => Err(self.failure(
                classify(&*error, FailureKind::Connect),
                self.config.connect_timeout.0,
                Retry::NothingSent,
                error_chain(&*error),
            )),
            Ok(Err(Attempt::Send(error))) if error.is_user() => Err(UpstreamError {
                upstream: self.name.clone(),
                kind: FailureKind::RequestBody,
                waited: timeout,
                retry: Retry::No,
                cause: error_chain(&error),
            }),
            Ok(Err(Attempt::Send(error))) => Err(self.failure(
                classify(&error, FailureKind::Reset),
                timeout,
                Retry::No,
                error_chain(&error),
            )),
            Err(_) => Err(self.failure(
                FailureKind::Timeout,
                timeout,
                Retry::No,
                "no response head in time".to_string(),
            )),
        }
    }

    fn failure(
        &self,
        kind: FailureKind,
        waited: Duration,
        retry: Retry,
        cause: String,
    ) -> UpstreamError {
        metrics::counter!("larder_upstream_errors_total", "upstream" => self.name.clone(), "kind" => kind.as_str())
            .increment(1);
        tracing::warn!(upstream = %self.name, kind = kind.as_str(), cause, "upstream request failed");
        UpstreamError {
            upstream: self.name.clone(),
            kind,
            waited,
            retry,
            cause,
        }
    }
}

pin_project_lite::pin_project! {
    /// A request body that signals when its last frame has been read.
    struct NotifyAtEnd {
        #[pin]
        inner: Body,
        sent: Option<Arc<tokio::sync::Notify>>,
    }
}

impl NotifyAtEnd {
    fn new(inner: Body, sent: Arc<tokio::sync::Notify>) -> Self {
        Self {
            inner,
            sent: Some(sent),
        }
    }
}

impl http_body::Body for NotifyAtEnd {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        // hyper stops polling a body that says it has ended, so the end is
        // either `None`, an error, or a frame after which `is_end_stream` holds.
        let ended = match &polled {
            std::task::Poll::Ready(None | Some(Err(_))) => true,
            std::task::Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            std::task::Poll::Pending => false,
        };
        if ended && let Some(sent) = this.sent.take() {
            sent.notify_one();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Why one exchange with a server failed.
enum Attempt {
    /// No connection could be made: nothing was sent.
    Connect(BoxError),
    Send(hyper::Error),
}

/// One request as a stream on the server's shared HTTP/2 connection. A
/// connection found closed before the request went out (the server sent
/// GOAWAY, or closed it) is replaced and the request sent on the new one:
/// it was not sent, so this is safe for any method. A connection that had
/// served requests and dies under an idempotent request without a body
/// (the server restarted, say, and our request crossed its close) gets
/// that request sent once more on a new connection, as the HTTP/1.1 path
/// does.
async fn exchange_h2(
    h2: &h2::H2Pool,
    mut request: Request<Body>,
) -> Result<Response<Body>, Attempt> {
    let mut may_retry = true;
    loop {
        let mut checkout = h2
            .checkout()
            .await
            .map_err(|error| Attempt::Connect(error.into_box()))?;
        let retry = may_retry && checkout.reused;
        let replay = if may_retry && http_body::Body::is_end_stream(request.body()) {
            let (head, body) = request.into_parts();
            let copy = Request::from_parts(copy_head(&head), body::empty());
            request = Request::from_parts(head, body);
            Some(copy)
        } else {
            None
        };
        let error = match h2::send(&mut checkout.sender, request).await {
            Ok(response) => return Ok(response),
            Err(h2::SendError::NotSent(unsent, error)) => {
                h2.discard(checkout.generation);
                if !retry {
                    return Err(Attempt::Send(error));
                }
                request = *unsent;
                may_retry = false;
                continue;
            }
            Err(h2::SendError::Failed(error)) => error,
        };
        // A stream's own error leaves the connection to the others.
        match replay {
            Some(copy) if refused_stream(&error) => {
                tracing::debug!(%error, "the upstream refused the stream before processing it; sending the request again");
                if checkout.sender.is_closed() {
                    h2.discard(checkout.generation);
                }
                request = copy;
                may_retry = false;
            }
            Some(copy)
                if retry
                    && is_replayable(&copy)
                    && !error.is_user()
                    && (checkout.sender.is_closed() || closed_before_answering(&error)) =>
            {
                tracing::debug!(%error, "the upstream HTTP/2 connection closed under the request; sending it again on a new one");
                h2.discard(checkout.generation);
                request = copy;
                may_retry = false;
            }
            _ => return Err(Attempt::Send(error)),
        }
    }
}

/// What a server says when it, or what is behind it, cannot answer
/// (Envoy's gateway failures).
fn is_gateway_status(status: http::StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504)
}

/// Whether `request` may be sent twice: an idempotent method (RFC 9110
/// 9.2.2; nginx's list) and no body to replay.
fn is_replayable(request: &Request<Body>) -> bool {
    use http::Method;
    matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    ) && http_body::Body::is_end_stream(request.body())
}

/// The server reset the stream with REFUSED_STREAM: it processed none of
/// the request, which may therefore be sent again whatever its method (RFC
/// 9113 8.7), as a server at its stream limit or shutting down does.
fn refused_stream(error: &hyper::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if let Some(stream_error) = current.downcast_ref::<::h2::Error>() {
            return stream_error.is_remote()
                && stream_error.reason() == Some(::h2::Reason::REFUSED_STREAM);
        }
        cause = current.source();
    }
    false
}

/// A failure before any byte of an answer: the connection was closed or
/// reset under the request.
fn closed_before_answering(error: &hyper::Error) -> bool {
    error.is_incomplete_message()
        || matches!(
            io_error_kind(error),
            Some(
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            )
        )
}

/// Counts a request in flight until it is dropped (answered, failed or
/// cancelled).
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Each server's weight (1 when the config gave none for it).
fn weights_of(config: &Upstream, servers: usize) -> Vec<u32> {
    (0..servers)
        .map(|index| config.weights.get(index).copied().unwrap_or(1))
        .collect()
}

/// A server's state, from its parsed address.
fn server_of(
    addr: &ServerAddr,
    config: &Upstream,
    connector: &HttpsConnector<HttpConnector>,
) -> Result<Server, http::Error> {
    let base = Uri::builder()
        .scheme(addr.scheme.clone())
        .authority(addr.authority.clone())
        .path_and_query("/")
        .build()?;
    let h2 = config
        .protocol
        .is_http2()
        .then(|| h2::H2Pool::new(connector.clone(), base.clone(), config.connect_timeout.0));
    Ok(Server {
        authority: addr.authority.clone(),
        base,
        pool: Pool::new(),
        h2,
        down_until_ms: AtomicU64::new(0),
        health: health::Health::new(),
        in_flight: AtomicUsize::new(0),
        failures_in_a_row: AtomicU32::new(0),
        id: balance::fnv1a(&[addr.authority.as_str().as_bytes()]),
    })
}

fn build_connector(config: &Upstream) -> Result<HttpsConnector<HttpConnector>, tls::TlsError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(config.connect_timeout.0));
    let tls = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls::client_config(config.ca_file.as_deref())?)
        .https_or_http();
    // ALPN: nothing for HTTP/1.1 (as before), only `h2` for `protocol: h2`
    // (the connection checks the server selected it).
    Ok(match config.protocol {
        UpstreamProtocol::H2 => tls.enable_http2().wrap_connector(http),
        UpstreamProtocol::Http1 | UpstreamProtocol::H2c => tls.enable_http1().wrap_connector(http),
    })
}

/// `otherwise`, unless the I/O error in the error's chain is a timeout.
fn classify(error: &(dyn std::error::Error + 'static), otherwise: FailureKind) -> FailureKind {
    match io_error_kind(error) {
        Some(std::io::ErrorKind::TimedOut) => FailureKind::Timeout,
        _ => otherwise,
    }
}
