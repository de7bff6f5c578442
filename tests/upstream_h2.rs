//! HTTP/2 to upstreams end to end over real sockets: `protocol: h2c` and
//! `h2` (TLS with ALPN) origins built on hyper's HTTP/2 server, requests
//! multiplexed on one connection, a gRPC-style exchange with trailers, a
//! server that only speaks HTTP/1.1, a restarted origin, and config errors.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::{assert_problem, get, respond, start_larder};
use http::{HeaderMap, Request, Response, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use larder::http::body::{self, Body, BoxError};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const DEADLINE: Duration = Duration::from_secs(10);

/// What an HTTP/2 origin saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    version: Version,
    uri: http::Uri,
    headers: HeaderMap,
}

type Handler = Arc<
    dyn Fn(Request<Incoming>) -> futures_util::future::BoxFuture<'static, Response<Body>>
        + Send
        + Sync,
>;

/// A real HTTP/2-only origin on 127.0.0.1 (cleartext with prior knowledge,
/// or TLS when given an acceptor) that counts the TCP connections it
/// accepts and records each request.
struct H2Origin {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl H2Origin {
    async fn start(handler: Handler) -> Self {
        Self::start_at("127.0.0.1:0".parse().expect("address"), None, handler).await
    }

    async fn start_at(
        addr: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
        handler: Handler,
    ) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind an h2 origin");
        let addr = listener.local_addr().expect("origin address");
        let connections = Arc::new(AtomicUsize::new(0));
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (accepted, log, open) = (connections.clone(), seen.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                // As real HTTP/2 servers do: small frames go out at once.
                let _ = stream.set_nodelay(true);
                let (handler, log, tls) = (handler.clone(), log.clone(), tls.clone());
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    lock(&log).push(Seen {
                        version: request.version(),
                        uri: request.uri().clone(),
                        headers: request.headers().clone(),
                    });
                    let response = handler(request);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let connection = tokio::spawn(async move {
                    let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(stream).await else {
                                return;
                            };
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
                lock(&open).push(connection);
            }
        });
        lock(&tasks).push(accept);
        Self {
            addr,
            connections,
            seen,
            tasks,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<Seen> {
        lock(&self.seen).clone()
    }

    /// Stops listening and drops every open connection (abruptly, as a
    /// crashed or restarted server does).
    async fn stop(&self) {
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    Arc::new(move |request| Box::pin(f(request)))
}

fn h2c_upstream(origin_url: &str) -> String {
    format!(
        "upstreams:\n  grpc:\n    protocol: h2c\n    servers: [\"{origin_url}\"]\nroutes:\n  - upstream: grpc\n"
    )
}

#[tokio::test]
async fn h2c_upstream_multiplexes_concurrent_requests_on_one_connection() {
    const REQUESTS: usize = 20;
    // Each handler waits until all twenty are in: that can only happen if
    // the requests are open at once, i.e. multiplexed on the one connection.
    let barrier = Arc::new(tokio::sync::Barrier::new(REQUESTS));
    let origin = H2Origin::start(handler(move |request: Request<Incoming>| {
        let barrier = barrier.clone();
        async move {
            let path = request.uri().path().to_string();
            match tokio::time::timeout(DEADLINE, barrier.wait()).await {
                Ok(_) => respond(200, &[], format!("answered {path}")),
                Err(_) => respond(500, &[], "not all requests arrived together"),
            }
        }
    }))
    .await;
    let larder = start_larder(&h2c_upstream(&origin.url())).await;
    let requests = (0..REQUESTS).map(|i| {
        let url = larder.url(&format!("/item/{i}"));
        async move { tokio::time::timeout(DEADLINE * 2, get(&url)).await }
    });
    let replies = futures_util::future::join_all(requests).await;
    for (i, reply) in replies.into_iter().enumerate() {
        let reply = reply.expect("an answer in time");
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.text(), format!("answered /item/{i}"));
    }
    let seen = origin.requests();
    assert_eq!(seen.len(), REQUESTS);
    assert!(
        seen.iter()
            .all(|request| request.version == Version::HTTP_2),
        "{seen:?}"
    );
    assert_eq!(
        origin.connections(),
        1,
        "all requests share one HTTP/2 connection"
    );
    // The client's Host travels as :authority, the scheme as the server's.
    let first = &seen[0];
    assert_eq!(first.uri.scheme_str(), Some("http"), "{first:?}");
    assert_eq!(
        first.uri.authority().map(|a| a.as_str().to_string()),
        Some(larder.addr.to_string()),
        "{first:?}"
    );
    larder.stop().await;
}

/// A length-prefixed gRPC message (uncompressed).
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.put_u8(0);
    frame.put_u32(u32::try_from(message.len()).expect("small message"));
    frame.put_slice(message);
    frame.freeze()
}

#[tokio::test]
async fn grpc_exchange_streams_bodies_and_relays_trailers() {
    // The origin echoes the request body and ends with gRPC's trailers.
    let origin = H2Origin::start(handler(|request: Request<Incoming>| async move {
        let echoed = request
            .into_body()
            .collect()
            .await
            .map(|collected| collected.to_bytes())
            .unwrap_or_default();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().expect("value"));
        trailers.insert("grpc-message", "ok".parse().expect("value"));
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            vec![Ok(Frame::data(echoed)), Ok(Frame::trailers(trailers))];
        Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .body(body::boxed(StreamBody::new(futures_util::stream::iter(
                frames,
            ))))
            .expect("response")
    }))
    .await;
    let larder = start_larder(&h2c_upstream(&origin.url())).await;

    // An HTTP/2 client (h2c with prior knowledge), as gRPC clients are.
    let stream = tokio::net::TcpStream::connect(larder.addr)
        .await
        .expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(connection);
    let message = grpc_frame(b"\x0a\x05hello");
    let request = Request::post(format!("http://{}/pkg.Svc/Method", larder.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(message.clone()))
        .expect("request");
    let response = tokio::time::timeout(DEADLINE, sender.send_request(request))
        .await
        .expect("a response head in time")
        .expect("h2 response");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/grpc");
    let collected = tokio::time::timeout(DEADLINE, response.into_body().collect())
        .await
        .expect("the body in time")
        .expect("body");
    let trailers = collected.trailers().cloned().expect("trailers relayed");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
    assert_eq!(
        trailers.get("grpc-message").map(|v| v.as_bytes()),
        Some(&b"ok"[..])
    );
    assert_eq!(
        collected.to_bytes(),
        message,
        "the message comes back unchanged"
    );

    let seen = origin.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, Version::HTTP_2);
    assert_eq!(seen[0].uri.path(), "/pkg.Svc/Method");
    assert_eq!(
        seen[0].headers.get("te").map(|v| v.as_bytes()),
        Some(&b"trailers"[..]),
        "gRPC servers require TE: trailers"
    );
    larder.stop().await;
}

#[tokio::test]
async fn a_restarted_h2c_origin_gets_a_new_connection() {
    let answer = || handler(|_| async { respond(200, &[], "up") });
    let first = H2Origin::start(answer()).await;
    let larder = start_larder(&h2c_upstream(&first.url())).await;
    let reply = get(&larder.url("/before")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(first.connections(), 1);

    // The origin goes away with Larder's connection to it, and comes back.
    first.stop().await;
    let second = H2Origin::start_at(first.addr, None, answer()).await;
    for round in 0..3 {
        let reply = tokio::time::timeout(DEADLINE, get(&larder.url("/after")))
            .await
            .expect("an answer in time");
        assert_eq!(reply.status, 200, "round {round}: {}", reply.text());
        assert_eq!(reply.text(), "up");
    }
    assert_eq!(
        second.connections(),
        1,
        "one new connection, then shared by the later requests"
    );
    larder.stop().await;
}

/// A CA, and a server config for 127.0.0.1 signed by it offering `alpn`.
struct Tls {
    _dir: tempfile::TempDir,
    ca_path: std::path::PathBuf,
    acceptor: tokio_rustls::TlsAcceptor,
}

fn tls_with_alpn(alpn: &[&[u8]]) -> Tls {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("leaf params")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf cert");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).expect("write ca");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .expect("server tls config");
    config.alpn_protocols = alpn.iter().map(|name| name.to_vec()).collect();
    Tls {
        _dir: dir,
        ca_path,
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    }
}

fn h2_upstream(addr: SocketAddr, ca_path: &std::path::Path) -> String {
    format!(
        "upstreams:\n  secure:\n    protocol: h2\n    servers: [\"https://127.0.0.1:{}\"]\n    ca_file: {}\nroutes:\n  - upstream: secure\n",
        addr.port(),
        ca_path.display()
    )
}

#[tokio::test]
async fn h2_upstream_over_tls_negotiates_http2_with_alpn() {
    let tls = tls_with_alpn(&[b"h2"]);
    let origin = H2Origin::start_at(
        "127.0.0.1:0".parse().expect("address"),
        Some(tls.acceptor.clone()),
        handler(|_| async { respond(200, &[], "over h2") }),
    )
    .await;
    let larder = start_larder(&h2_upstream(origin.addr, &tls.ca_path)).await;
    for _ in 0..2 {
        let reply = tokio::time::timeout(DEADLINE, get(&larder.url("/secure")))
            .await
            .expect("an answer in time");
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.text(), "over h2");
    }
    let seen = origin.requests();
    assert!(
        seen.iter()
            .all(|request| request.version == Version::HTTP_2),
        "{seen:?}"
    );
    assert_eq!(seen[0].uri.scheme_str(), Some("https"));
    assert_eq!(origin.connections(), 1);
    larder.stop().await;
}

/// An HTTPS origin speaking HTTP/1.1 only, offering `alpn` (maybe none).
async fn http1_tls_origin(acceptor: tokio_rustls::TlsAcceptor) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, Infallible>(respond(200, &[], "http/1.1 only"))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn h2_to_a_server_that_offers_only_http1_is_a_502_not_a_hang() {
    // One offers http/1.1 in ALPN (the handshake fails: no common
    // protocol), the other no ALPN at all (the handshake succeeds without
    // h2, which Larder then refuses).
    for alpn in [&[&b"http/1.1"[..]][..], &[][..]] {
        let tls = tls_with_alpn(alpn);
        let addr = http1_tls_origin(tls.acceptor.clone()).await;
        let larder = start_larder(&h2_upstream(addr, &tls.ca_path)).await;
        let reply = tokio::time::timeout(DEADLINE, get(&larder.url("/")))
            .await
            .expect("an answer in time, not a hang");
        assert_problem(&reply, 502);
        larder.stop().await;
    }
}

fn config_errors(yaml: &str) -> Vec<larder::config::ConfigError> {
    larder::config::load_str(yaml, "t.yml")
        .expect_err("the config should be rejected")
        .0
}

#[test]
fn protocol_and_server_schemes_must_agree() {
    let h2_cleartext = "upstreams:\n  app:\n    protocol: h2\n    servers: [\"http://127.0.0.1:9\"]\nroutes:\n  - upstream: app\n";
    let errors = config_errors(h2_cleartext);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].path, "upstreams.app.protocol");
    assert_eq!(errors[0].line, Some(3));
    assert!(
        errors[0].to_string().contains("use h2c for cleartext"),
        "{}",
        errors[0]
    );

    let h2c_tls = h2_cleartext
        .replace("protocol: h2", "protocol: h2c")
        .replace("http://", "https://");
    let errors = config_errors(&h2c_tls);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].path, "upstreams.app.protocol");
    assert!(
        errors[0].to_string().contains("use h2 for https"),
        "{}",
        errors[0]
    );

    let unknown = h2_cleartext.replace("protocol: h2", "protocol: http3");
    let errors = config_errors(&unknown);
    assert!(
        errors
            .iter()
            .any(|error| error.path.starts_with("upstreams.app.protocol")),
        "{errors:#?}"
    );

    let fine = h2_cleartext.replace("protocol: h2", "protocol: h2c");
    let config = larder::config::load_str(&fine, "t.yml").expect("h2c with http:// loads");
    let routes = config.routes.expect("routes");
    assert!(
        routes[0].upgrades.is_empty(),
        "a route to an HTTP/2 upstream tunnels nothing by default"
    );
}

#[test]
fn a_route_to_an_http2_upstream_may_not_list_upgrades() {
    let yaml = "upstreams:\n  app:\n    protocol: h2c\n    servers: [\"http://127.0.0.1:9\"]\nroutes:\n  - upstream: app\n    upgrades: [websocket]\n";
    let errors = config_errors(yaml);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].path, "routes[0].upgrades");
    assert!(errors[0].to_string().contains("HTTP/1.1"), "{}", errors[0]);
    let none = yaml.replace("[websocket]", "[]");
    assert!(larder::config::load_str(&none, "t.yml").is_ok());
}

#[tokio::test]
async fn health_checks_probe_an_h2c_server_over_http2() {
    let origin = H2Origin::start(handler(|_| async { respond(200, &[], "fine") })).await;
    let yaml = format!(
        "{}upstreams:\n  grpc:\n    protocol: h2c\n    servers: [\"{}\"]\n    health_check:\n      path: /healthz\n      interval: 50ms\n      timeout: 50ms\n      unhealthy_threshold: 1\nroutes:\n  - upstream: grpc\n",
        common::ADMIN_BLOCK,
        origin.url()
    );
    let larder = start_larder(&yaml).await;
    // Probes go one after another: a third one seen means two were judged.
    common::wait_until("three probes over HTTP/2", || {
        let probes = origin
            .requests()
            .into_iter()
            .filter(|seen| seen.uri.path() == "/healthz")
            .collect::<Vec<_>>();
        assert!(
            probes.iter().all(|seen| seen.version == Version::HTTP_2),
            "{probes:?}"
        );
        probes.len() >= 3
    })
    .await;
    let status = larder.admin("GET", "/upstreams", "").await.json();
    let upstream = &status["upstreams"]["grpc"];
    assert_eq!(upstream["protocol"], "h2c", "{status}");
    assert_eq!(upstream["servers"][0]["healthy"], true, "{status}");
    let reply = get(&larder.url("/")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    larder.stop().await;
}

#[tokio::test]
async fn the_connect_timeout_covers_the_tls_handshake() {
    // Accepts TCP connections and never answers the TLS handshake.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            open.push(stream);
        }
    });
    let tls = tls_with_alpn(&[b"h2"]);
    let yaml = h2_upstream(addr, &tls.ca_path).replace(
        "    protocol: h2\n",
        "    protocol: h2\n    connect_timeout: 200ms\n    timeout: 60s\n",
    );
    let larder = start_larder(&yaml).await;
    let reply = tokio::time::timeout(DEADLINE, get(&larder.url("/")))
        .await
        .expect("an answer within the connect timeout, not the 60 s response timeout");
    assert!(
        reply.status == 504 || reply.status == 502,
        "{} {}",
        reply.status,
        reply.text()
    );
    larder.stop().await;
    held.abort();
}

#[tokio::test]
async fn an_upgrade_to_an_http2_upstream_is_served_as_a_plain_request() {
    let origin = H2Origin::start(handler(|_| async { respond(200, &[], "plain") })).await;
    let larder = start_larder(&h2c_upstream(&origin.url())).await;
    let reply = common::get_with(
        &larder.url("/socket"),
        &[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "plain");
    let seen = origin.requests();
    assert_eq!(seen.len(), 1);
    assert!(!seen[0].headers.contains_key("upgrade"), "{seen:?}");
    larder.stop().await;
}

/// An h2c origin (the `h2` crate's server, which can reset a stream) that
/// refuses the first stream with REFUSED_STREAM and answers every later
/// one with what it was sent. Stops serving when dropped.
struct RefusingOrigin {
    url: String,
    seen: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl RefusingOrigin {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let task = tokio::spawn(serve_refusing_first(listener, seen.clone()));
        Self { url, seen, task }
    }

    /// The streams it was sent, as "METHOD /path", refused ones included.
    fn seen(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for RefusingOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `RefusingOrigin`'s accept loop: every stream is logged to `log`, the
/// first refused, the rest answered.
async fn serve_refusing_first(listener: TcpListener, log: Arc<Mutex<Vec<String>>>) {
    while let Ok((stream, _)) = listener.accept().await {
        let log = log.clone();
        tokio::spawn(async move {
            let Ok(mut connection) = h2::server::handshake(stream).await else {
                return;
            };
            while let Some(Ok((request, mut respond))) = connection.accept().await {
                let (head, mut body) = request.into_parts();
                let mut received = Vec::new();
                let first = {
                    let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
                    log.push(format!("{} {}", head.method, head.uri.path()));
                    log.len() == 1
                };
                if first {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    continue;
                }
                while let Some(Ok(chunk)) = body.data().await {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    received.extend_from_slice(&chunk);
                }
                let answer = format!(
                    "{} {} ({} body bytes)",
                    head.method,
                    head.uri.path(),
                    received.len()
                );
                let response = http::Response::builder()
                    .status(200)
                    .body(())
                    .expect("response");
                if let Ok(mut out) = respond.send_response(response, false) {
                    let _ = out.send_data(Bytes::from(answer), true);
                }
            }
        });
    }
}

#[tokio::test]
async fn a_stream_the_upstream_refused_is_sent_again_once() {
    let origin = RefusingOrigin::start().await;
    let larder = start_larder(&h2c_upstream(&origin.url)).await;
    // RFC 9113 8.7: a refused stream was not processed, so even a POST may
    // go again, as long as there is no body to replay.
    let reply = common::send("POST", &larder.url("/refused-once"), &[], "").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "POST /refused-once (0 body bytes)");
    assert_eq!(
        origin.seen(),
        ["POST /refused-once", "POST /refused-once"],
        "refused, then sent again"
    );
    larder.stop().await;
}

#[tokio::test]
async fn a_refused_stream_with_a_body_is_not_replayed() {
    let origin = RefusingOrigin::start().await;
    let larder = start_larder(&h2c_upstream(&origin.url)).await;
    let reply = common::send("PUT", &larder.url("/with-body"), &[], "payload").await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(
        origin.seen(),
        ["PUT /with-body"],
        "the body went with the refused stream: nothing to send again"
    );
    // The connection stays usable: the next request is answered on it.
    let next = get(&larder.url("/after")).await;
    assert_eq!(next.status, 200, "{}", next.text());
    larder.stop().await;
}
