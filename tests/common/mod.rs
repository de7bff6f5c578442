//! Test support shared by every integration test file: start Larder in
//! process from a YAML string on 127.0.0.1:0, start real hyper origins that
//! count their requests, and send requests over real sockets.
//!
//! Each test file uses a different part of this module.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use larder::app::Server;
use larder::http::body::Body;
use tokio::net::{TcpListener, TcpStream};

const LOOPBACK_ANY_PORT: &str = "127.0.0.1:0";

/// A Larder running in this process.
pub struct Larder {
    pub addr: SocketAddr,
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

    /// Applies a new config; the listeners keep their ports.
    pub async fn reload(&self, yaml: &str) -> Result<(), String> {
        let mut config = larder::config::load_str(yaml, "test.yml").map_err(|e| e.to_string())?;
        config.listen = self.addr;
        if let (Some(admin), Some(addr)) = (config.admin.as_mut(), self.admin_addr) {
            admin.listen = addr;
        }
        self.server.reload(config).await
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
    if let Ok(level) = std::env::var("LARDER_TEST_LOG") {
        larder::telemetry::init(&level, larder::config::LogFormat::Text);
    }
    let mut config = larder::config::load_str(yaml, "test.yml")
        .unwrap_or_else(|errors| panic!("invalid test config:\n{errors}\n---\n{yaml}"));
    let any_port: SocketAddr = LOOPBACK_ANY_PORT.parse().expect("loopback address");
    config.listen = any_port;
    if let Some(admin) = config.admin.as_mut() {
        admin.listen = any_port;
    }
    let server = larder::app::start(config, larder::app::Options::default())
        .await
        .unwrap_or_else(|error| panic!("larder did not start: {error}"));
    Larder {
        addr: server.proxy_addr,
        admin_addr: server.admin_addr,
        server,
    }
}

/// A real HTTP/1.1 origin on 127.0.0.1:0 that counts the requests it answers.
pub struct Origin {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
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
}

/// Starts an origin that answers every request with `handler`. It runs until
/// the test's runtime ends.
pub async fn start_origin<F, Fut>(handler: F) -> Origin
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind(LOOPBACK_ANY_PORT)
        .await
        .expect("bind a test origin");
    let addr = listener.local_addr().expect("origin address");
    let hits = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let handler = Arc::new(handler);
    let counter = hits.clone();
    let accepted = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            accepted.fetch_add(1, Ordering::SeqCst);
            let handler = handler.clone();
            let counter = counter.clone();
            let service = service_fn(move |request: Request<Incoming>| {
                counter.fetch_add(1, Ordering::SeqCst);
                let response = handler(request);
                async move { Ok::<_, std::convert::Infallible>(response.await) }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Origin {
        addr,
        hits,
        connections,
    }
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
    let response = sender
        .send_request(request)
        .await
        .unwrap_or_else(|e| panic!("{method} {url} failed: {e}"));
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
