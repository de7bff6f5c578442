//! Hostile clients, end to end over real sockets: each defence Larder has
//! against a client that lies, stalls or smuggles is shown from where a
//! client or an operator would notice it (a status, a header, what the
//! origin saw, how often it was asked, a connection that was closed).
//!
//! Requests a client library would refuse to send (dot segments, bad
//! framing, bare LF, NUL) go over raw `TcpStream`s; the smuggling corpus
//! uses a raw-TCP origin that parses what reaches it strictly and keeps the
//! exact bytes, so a request Larder let through unframed shows up there.
//! The only real waits are where elapsed time is the behaviour under test
//! (a 1 s timeout firing), each with a comment saying so.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::raw_http::{RawResponse, decode_chunked, find, parse_responses, read_responses};
use common::{
    ADMIN_BLOCK, ADMIN_TOKEN, DEADLINE, Larder, Origin, Reply, assert_problem, eventually, get,
    get_with, http_date, respond, start_larder, start_numbered_origin, start_origin, wait_until,
    wasm,
};
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use larder::http::body::Body;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type WebSocket = tokio_tungstenite::WebSocketStream<TcpStream>;

// ---------------------------------------------------------------- harness

/// Larder in front of `origin` with one route; `route` adds lines under it
/// (four spaces in), `global` top-level lines before `upstreams:`.
fn one_route(origin: &str, route: &str, global: &str) -> String {
    format!(
        "{global}upstreams:\n  app:\n    servers: [\"{origin}\"]\n    timeout: 30s\nroutes:\n  - upstream: app\n{route}"
    )
}

/// A `plugins:` block with `answer_direct` as `gate`, answering 401 to
/// requests without `x-api-key`.
fn api_key_gate() -> String {
    format!(
        "plugins:\n  gate:\n    path: {}\n    on_error: closed\n    config: {{ require: x-api-key, status: '401' }}\n",
        wasm("answer_direct").display()
    )
}

/// GET `url` with header values given as bytes (0x80-0xFF included, which
/// `&str` headers cannot carry) on a fresh connection.
async fn get_bytes(url: &str, headers: &[(&str, &[u8])]) -> Reply {
    let uri: http::Uri = url.parse().expect("test URL");
    let authority = uri.authority().expect("a host").to_string();
    let mut builder = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header("host", authority.as_str());
    for (name, value) in headers {
        builder = builder.header(*name, HeaderValue::from_bytes(value).expect("header value"));
    }
    let request = builder.body(Full::new(Bytes::new())).expect("request");
    let mut sender = common::connect(&authority).await;
    let response = sender.send_request(request).await.expect("response");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// The `Set-Cookie` a reply carries, if any.
fn set_cookie(reply: &Reply) -> Option<&str> {
    reply.header("set-cookie")
}

/// `bytes` with everything outside printable ASCII escaped, for messages.
fn shown(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

// ------------------------------------------------- raw HTTP/1.1 on the wire

/// What came back on a raw connection.
struct Exchange {
    responses: Vec<RawResponse>,
    /// The server closed (or reset) the connection.
    closed: bool,
    received: Vec<u8>,
}

impl Exchange {
    fn statuses(&self) -> Vec<u16> {
        self.responses.iter().map(|r| r.status).collect()
    }

    fn first(&self) -> &RawResponse {
        self.responses
            .first()
            .unwrap_or_else(|| panic!("no response; the server sent {:?}", shown(&self.received)))
    }
}

/// Writes `request` on a new connection to `addr` and reads until the
/// server closes it, `until` whole responses have arrived, or the deadline.
async fn exchange(addr: SocketAddr, request: &[u8], until: usize) -> Exchange {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // A server that refuses early may close before it has read everything.
    let _ = stream.write_all(request).await;
    let mut received = Vec::new();
    let mut closed = false;
    let deadline = Instant::now() + DEADLINE;
    let mut buffer = [0u8; 8192];
    while parse_responses(&received, false).len() < until {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => break,
            Ok(Ok(0) | Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
        }
    }
    Exchange {
        responses: parse_responses(&received, closed),
        closed,
        received,
    }
}

/// One request as a strict HTTP/1.1 server parsed it.
#[derive(Debug, Clone)]
struct RawRequest {
    line: String,
    body: Vec<u8>,
}

/// One request parsed strictly off the front of `bytes` (RFC 9112: CRLF
/// lines, no obs-fold, no NUL, one framing, `chunked` last): the request and
/// the bytes it took, `None` while incomplete, an error for anything a
/// strict server would refuse.
fn parse_request(bytes: &[u8]) -> Result<Option<(RawRequest, usize)>, String> {
    let Some(head_end) = find(bytes, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head_bytes = &bytes[..head_end];
    if head_bytes.contains(&0) {
        return Err("a NUL in the head".to_string());
    }
    let head = String::from_utf8_lossy(head_bytes).into_owned();
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default().to_string();
    let parts: Vec<&str> = line.split(' ').collect();
    if parts.len() != 3 || parts[2] != "HTTP/1.1" || !parts[1].starts_with('/') {
        return Err(format!("bad request line {line:?}"));
    }
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for header in lines {
        let Some((name, value)) = header.split_once(':') else {
            return Err(format!("bad header line {header:?}"));
        };
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) || header.contains('\n')
        {
            return Err(format!("bad header line {header:?}"));
        }
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => {
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("bad content-length {value:?}"));
                }
                let parsed: usize = value.parse().map_err(|_| "content-length overflow")?;
                if length.is_some_and(|previous| previous != parsed) {
                    return Err("two different content-lengths".to_string());
                }
                length = Some(parsed);
            }
            "transfer-encoding" => {
                let last = value.rsplit(',').next().unwrap_or("").trim();
                if !last.eq_ignore_ascii_case("chunked") {
                    return Err(format!("transfer-encoding {value:?} without chunked last"));
                }
                chunked = true;
            }
            _ => {}
        }
    }
    if chunked && length.is_some() {
        return Err("both content-length and transfer-encoding".to_string());
    }
    let after = &bytes[head_end + 4..];
    let (body, used) = if chunked {
        match decode_chunked(after)? {
            Some(decoded) => decoded,
            None => return Ok(None),
        }
    } else {
        let length = length.unwrap_or(0);
        if after.len() < length {
            return Ok(None);
        }
        (after[..length].to_vec(), length)
    };
    Ok(Some((RawRequest { line, body }, head_end + 4 + used)))
}

/// What a [`RawOrigin`] saw.
#[derive(Default)]
struct RawLog {
    /// Every byte received, all connections, in arrival order.
    received: Vec<u8>,
    requests: Vec<RawRequest>,
    /// Bytes a strict server would have refused, and why.
    faults: Vec<String>,
    /// Bytes left unparsed when a connection ended.
    incomplete: Vec<Vec<u8>>,
}

/// A raw-TCP origin that parses what reaches it strictly, keeps the exact
/// bytes, and answers each whole request (`200` unless told otherwise) with
/// `origin saw <line>`.
struct RawOrigin {
    addr: SocketAddr,
    log: Arc<Mutex<RawLog>>,
}

impl RawOrigin {
    async fn start() -> Self {
        Self::start_with(|_| 200).await
    }

    /// An origin answering each request with the status `status(line)`.
    async fn start_with(status: fn(&str) -> u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let log: Arc<Mutex<RawLog>> = Arc::default();
        let shared = log.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_raw(stream, shared.clone(), status));
            }
        });
        Self { addr, log }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<RawRequest> {
        self.log.lock().unwrap().requests.clone()
    }

    /// Everything the origin has seen, for failure messages.
    fn report(&self) -> String {
        let log = self.log.lock().unwrap();
        let requests: Vec<String> = log
            .requests
            .iter()
            .map(|request| format!("{} with body {:?}", request.line, shown(&request.body)))
            .collect();
        format!(
            "origin parsed {requests:?} from {:?}; faults {:?}; incomplete {:?}",
            shown(&log.received),
            log.faults,
            log.incomplete.iter().map(|b| shown(b)).collect::<Vec<_>>()
        )
    }
}

async fn serve_raw(mut stream: TcpStream, log: Arc<Mutex<RawLog>>, status: fn(&str) -> u16) {
    let mut pending = Vec::new();
    let mut buffer = [0u8; 8192];
    loop {
        let read = match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => {
                if !pending.is_empty() {
                    log.lock().unwrap().incomplete.push(pending);
                }
                return;
            }
            Ok(n) => n,
        };
        log.lock()
            .unwrap()
            .received
            .extend_from_slice(&buffer[..read]);
        pending.extend_from_slice(&buffer[..read]);
        loop {
            match parse_request(&pending) {
                Ok(Some((request, used))) => {
                    pending.drain(..used);
                    let body = format!("origin saw {}", request.line);
                    let status = status(&request.line);
                    log.lock().unwrap().requests.push(request);
                    let answer = format!(
                        "HTTP/1.1 {status} Answer\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(why) => {
                    log.lock()
                        .unwrap()
                        .faults
                        .push(format!("{why}: {}", shown(&pending)));
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------- upgrades

/// An origin that completes WebSocket handshakes (and echoes text and
/// binary messages) and answers anything else `200` with
/// `plain <method> <target>`; it records every request like any [`Origin`].
async fn websocket_origin() -> Origin {
    start_origin(|mut request| async move {
        let websocket = request
            .headers()
            .get("upgrade")
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"websocket"));
        if !websocket {
            return respond(
                200,
                &[],
                format!("plain {} {}", request.method(), request.uri()),
            );
        }
        let key = request
            .headers()
            .get("sec-websocket-key")
            .map(|key| key.as_bytes().to_vec())
            .unwrap_or_default();
        let accept = tungstenite::handshake::derive_accept_key(&key);
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else {
                return;
            };
            let mut socket = tokio_tungstenite::WebSocketStream::from_raw_socket(
                hyper_util::rt::TokioIo::new(upgraded),
                tungstenite::protocol::Role::Server,
                None,
            )
            .await;
            while let Some(Ok(message)) = socket.next().await {
                if message.is_text() || message.is_binary() {
                    let _ = socket.send(message).await;
                }
            }
        });
        respond(
            101,
            &[
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-accept", &accept),
            ],
            "",
        )
    })
    .await
}

/// A WebSocket handshake with Larder at `addr` (path `/chat`) with extra
/// `headers`.
async fn websocket(
    addr: SocketAddr,
    headers: &[(&str, &str)],
) -> Result<WebSocket, tungstenite::Error> {
    let mut request = format!("ws://{addr}/chat")
        .into_client_request()
        .expect("websocket request");
    for (name, value) in headers {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
            HeaderValue::from_str(value).expect("value"),
        );
    }
    let stream = TcpStream::connect(addr).await.expect("connect");
    tokio_tungstenite::client_async(request, stream)
        .await
        .map(|(socket, _)| socket)
}

/// The status of a handshake Larder (or the origin) refused.
fn refused_with(outcome: Result<WebSocket, tungstenite::Error>) -> u16 {
    match outcome {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("the handshake failed without an HTTP answer: {other}"),
        Ok(_) => panic!("the handshake succeeded"),
    }
}

/// GETs `url` in a task of its own.
fn spawn_get(url: String) -> tokio::task::JoinHandle<Reply> {
    tokio::spawn(async move { get(&url).await })
}

/// Sends `text` and waits for its echo.
async fn echo(socket: &mut WebSocket, text: &str) {
    socket
        .send(tungstenite::Message::text(text))
        .await
        .expect("send");
    let echoed = tokio::time::timeout(DEADLINE, socket.next())
        .await
        .expect("echo in time")
        .expect("a message")
        .expect("no error");
    assert_eq!(echoed.into_text().expect("text").as_str(), text);
}

#[tokio::test]
async fn the_route_plugins_judge_an_upgrade_before_anything_reaches_the_origin() {
    let origin = websocket_origin().await;
    let yaml = format!(
        "{}{}",
        api_key_gate(),
        one_route(&origin.url(), "    plugins: [gate]\n", "")
    );
    let larder = start_larder(&yaml).await;

    let foo = get_with(
        &larder.url("/foo"),
        &[("connection", "upgrade"), ("upgrade", "foo")],
    )
    .await;
    assert_eq!(foo.status, 401, "{}", foo.text());
    assert_eq!(foo.text(), "missing x-api-key header\n");
    assert_eq!(
        refused_with(websocket(larder.addr, &[]).await),
        401,
        "a WebSocket handshake without the key gets the plugin's answer"
    );
    assert_eq!(origin.hits(), 0, "neither reached the origin");

    let mut socket = websocket(larder.addr, &[("x-api-key", "k")])
        .await
        .expect("the handshake with the key is tunnelled");
    echo(&mut socket, "hello").await;
    echo(&mut socket, "again").await;
    assert_eq!(origin.hits(), 1);
    assert_eq!(origin.last_request().header("upgrade"), Some("websocket"));
    let _ = socket.close(None).await;
    larder.stop().await;
}

#[tokio::test]
async fn an_unlisted_upgrade_is_served_as_a_plain_request_through_the_cache() {
    let origin = start_numbered_origin(|request, n| async move {
        let upgrade = request
            .headers()
            .get("upgrade")
            .map_or("none".to_string(), |v| shown(v.as_bytes()));
        respond(
            200,
            &[("cache-control", "max-age=60")],
            format!("body {n}, upgrade {upgrade}"),
        )
    })
    .await;
    let larder = start_larder(&one_route(
        &origin.url(),
        "    cache: { enabled: true }\n",
        "",
    ))
    .await;
    let headers = [("connection", "upgrade"), ("upgrade", "foo")];
    let first = get_with(&larder.url("/page"), &headers).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.text(), "body 1, upgrade none");
    let seen = origin.last_request();
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.header("upgrade"), None);
    assert!(
        seen.header("connection")
            .is_none_or(|value| !value.to_ascii_lowercase().contains("upgrade")),
        "{:?}",
        seen.headers
    );
    let second = get_with(&larder.url("/page"), &headers).await;
    assert_eq!(second.text(), "body 1, upgrade none", "the cache applies");
    // Only the first protocol counts: this is not a WebSocket handshake.
    let websocket_second = get_with(
        &larder.url("/page"),
        &[
            ("connection", "upgrade"),
            ("upgrade", "foo, websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
    )
    .await;
    assert_eq!(websocket_second.status, 200);
    assert_eq!(websocket_second.text(), "body 1, upgrade none");
    assert_eq!(origin.hits(), 1);
    larder.stop().await;
}

#[tokio::test]
async fn an_upgrade_the_origin_declines_leaves_no_raw_tunnel_behind() {
    // The origin answers the handshake 426 (as a WebSocket server does for a
    // version it does not speak) and keeps its connection open: a proxy that
    // took the attempt for a tunnel would pass the client's next bytes to
    // the origin unrouted, past the plugin guarding /internal.
    let origin = RawOrigin::start_with(|line| {
        if line.starts_with("GET /ws ") {
            426
        } else {
            200
        }
    })
    .await;
    let yaml = format!(
        "{}upstreams:\n  app: {{ servers: [\"{}\"] }}\nroutes:\n  - match: {{ path_prefix: /internal }}\n    upstream: app\n    plugins: [gate]\n  - upstream: app\n",
        api_key_gate(),
        origin.url()
    );
    let larder = start_larder(&yaml).await;
    let handshake =
        b"GET /ws HTTP/1.1\r\nHost: larder.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
        Sec-WebSocket-Version: 1337\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let mut stream = TcpStream::connect(larder.addr).await.expect("connect");
    stream.write_all(handshake).await.expect("write");
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let mut read_answers = async |stream: &mut TcpStream, count: usize| {
        while parse_responses(&received, false).len() < count {
            let read = tokio::time::timeout(DEADLINE, stream.read(&mut buffer))
                .await
                .expect("an answer in time")
                .expect("read");
            if read == 0 {
                break;
            }
            received.extend_from_slice(&buffer[..read]);
        }
        parse_responses(&received, false)
            .iter()
            .map(|response| response.status)
            .collect::<Vec<_>>()
    };
    assert_eq!(read_answers(&mut stream, 1).await, vec![426]);
    stream
        .write_all(
            b"GET /internal/secrets HTTP/1.1\r\nHost: larder.test\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("write");
    assert_eq!(
        read_answers(&mut stream, 2).await,
        vec![426, 401],
        "the next request went through routing and the plugin"
    );
    let lines: Vec<String> = origin.requests().into_iter().map(|r| r.line).collect();
    assert_eq!(
        lines,
        vec!["GET /ws HTTP/1.1".to_string()],
        "{}",
        origin.report()
    );
    larder.stop().await;
}

#[tokio::test]
async fn an_h2c_upgrade_is_refused_with_400() {
    let origin = websocket_origin().await;
    let larder = start_larder(&one_route(&origin.url(), "", "")).await;
    let answer = exchange(
        larder.addr,
        b"GET / HTTP/1.1\r\nHost: larder.test\r\nConnection: Upgrade, HTTP2-Settings\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        1,
    )
    .await;
    assert_eq!(answer.first().status, 400, "{:?}", answer.first());
    let listed_later = exchange(
        larder.addr,
        b"GET / HTTP/1.1\r\nHost: larder.test\r\nConnection: Upgrade\r\n\
          Upgrade: websocket, h2c\r\n\r\n",
        1,
    )
    .await;
    assert_eq!(
        listed_later.first().status,
        400,
        "{:?}",
        listed_later.first()
    );
    assert_eq!(origin.hits(), 0);
    larder.stop().await;
}

#[tokio::test]
async fn a_route_without_upgrades_sends_a_websocket_handshake_as_a_plain_get() {
    let origin = websocket_origin().await;
    let larder = start_larder(&one_route(&origin.url(), "    upgrades: []\n", "")).await;
    let answer = get_with(
        &larder.url("/chat"),
        &[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), "plain GET /chat");
    let seen = origin.last_request();
    assert_eq!(seen.header("upgrade"), None, "{:?}", seen.headers);
    assert!(
        seen.header("connection")
            .is_none_or(|value| !value.to_ascii_lowercase().contains("upgrade")),
        "{:?}",
        seen.headers
    );
    assert_eq!(origin.hits(), 1);
    larder.stop().await;
}

#[tokio::test]
async fn tunnels_beyond_max_tunnels_get_503_until_one_closes() {
    let origin = websocket_origin().await;
    let larder = start_larder(&one_route(&origin.url(), "", "server:\n  max_tunnels: 1\n")).await;
    let mut first = websocket(larder.addr, &[]).await.expect("the first tunnel");
    echo(&mut first, "one").await;
    assert_eq!(refused_with(websocket(larder.addr, &[]).await), 503);
    echo(&mut first, "the first tunnel still works").await;

    first.close(None).await.expect("close");
    // The close handshake completes and both sides go away.
    while let Ok(Some(Ok(_))) = tokio::time::timeout(DEADLINE, first.next()).await {}
    drop(first);
    let mut again = eventually("a new tunnel once the first has closed", async || {
        websocket(larder.addr, &[]).await.ok()
    })
    .await;
    echo(&mut again, "two").await;
    let _ = again.close(None).await;
    larder.stop().await;
}

#[tokio::test]
async fn a_silent_tunnel_is_closed_after_the_tunnel_idle_timeout() {
    let origin = websocket_origin().await;
    let larder = start_larder(&one_route(
        &origin.url(),
        "",
        "server:\n  tunnel_idle_timeout: 1s\n",
    ))
    .await;
    let mut socket = websocket(larder.addr, &[]).await.expect("tunnel");
    echo(&mut socket, "alive").await;
    let quiet_since = Instant::now();
    // Real time: nothing moves, and the 1 s idle timeout is what closes it.
    let ended = tokio::time::timeout(DEADLINE, socket.next())
        .await
        .expect("Larder closes the idle tunnel");
    let idle = quiet_since.elapsed();
    assert!(
        !matches!(ended, Some(Ok(ref message)) if !message.is_close()),
        "a message instead of the end: {ended:?}"
    );
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_secs(5),
        "closed after {idle:?}"
    );
    larder.stop().await;
}

// ---------------------------------------------------------------- paths

/// Two routes: `/admin` to one origin, everything else to another.
async fn admin_and_public() -> (Origin, Origin, Larder) {
    let admin =
        start_origin(
            |request| async move { respond(200, &[], format!("admin {}", request.uri())) },
        )
        .await;
    let public =
        start_origin(
            |request| async move { respond(200, &[], format!("public {}", request.uri())) },
        )
        .await;
    let yaml = format!(
        "upstreams:\n  admin: {{ servers: [\"{}\"] }}\n  public: {{ servers: [\"{}\"] }}\n\
         routes:\n  - match: {{ path_prefix: /admin }}\n    upstream: admin\n  - upstream: public\n",
        admin.url(),
        public.url()
    );
    let larder = start_larder(&yaml).await;
    (admin, public, larder)
}

/// `GET target` over a raw socket, the only way to send it unnormalised.
async fn raw_get(larder: &Larder, target: &str) -> Exchange {
    let request =
        format!("GET {target} HTTP/1.1\r\nHost: larder.test\r\nConnection: close\r\n\r\n");
    exchange(larder.addr, request.as_bytes(), 1).await
}

#[tokio::test]
async fn paths_are_normalised_before_routing_and_sent_upstream_normalised() {
    let (admin, public, larder) = admin_and_public().await;
    for (target, upstream) in [
        ("/%61dmin", "/admin"),
        ("//admin", "/admin"),
        ("/x/../admin", "/admin"),
        ("/x/%2e%2e/admin", "/admin"),
        ("/x/%2E%2E/admin/./panel", "/admin/panel"),
        (
            "/%61dmin//%c3%a9?next=%2f%2e%2e%2F%61",
            "/admin/%C3%A9?next=%2f%2e%2e%2F%61",
        ),
    ] {
        let answer = raw_get(&larder, target).await;
        let response = answer.first();
        assert_eq!(response.status, 200, "{target}: {response:?}");
        assert_eq!(
            String::from_utf8_lossy(&response.body),
            format!("admin {upstream}"),
            "{target}"
        );
        assert_eq!(admin.last_request().uri, upstream, "{target}");
    }
    assert_eq!(public.hits(), 0, "nothing went to the catch-all route");
    larder.stop().await;
}

#[tokio::test]
async fn paths_that_cannot_be_normalised_safely_get_400_and_reach_no_origin() {
    let (admin, public, larder) = admin_and_public().await;
    for target in [
        "/admin%2Fsecret",
        "/public%2f..%2fadmin",
        "/admin%00",
        "/admin/%zz",
        "/admin/%4",
        "/../admin",
        "/x/../../admin",
        "/%2e%2e/admin",
    ] {
        let answer = raw_get(&larder, target).await;
        let response = answer.first();
        assert_eq!(response.status, 400, "{target}: {response:?}");
        assert!(
            response.head.contains("application/problem+json"),
            "{target}: {response:?}"
        );
    }
    assert_eq!(admin.hits(), 0);
    assert_eq!(public.hits(), 0);
    larder.stop().await;
}

// ---------------------------------------------------------------- connections

/// Reads `stream` until the server closes it; how long after `since` that
/// was. Fails after the deadline.
async fn closed_after(mut stream: impl tokio::io::AsyncRead + Unpin, since: Instant) -> Duration {
    let mut buffer = [0u8; 1024];
    loop {
        match tokio::time::timeout(DEADLINE, stream.read(&mut buffer)).await {
            Err(_) => panic!("the connection is still open after {DEADLINE:?}"),
            Ok(Ok(0) | Err(_)) => return since.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn connections_without_a_whole_request_head_are_closed_after_the_header_timeout() {
    let origin = start_origin(|_| async { respond(200, &[], "fine") }).await;
    let larder = start_larder(&one_route(
        &origin.url(),
        "",
        "server:\n  header_timeout: 1s\n",
    ))
    .await;
    let mut slow = Vec::new();
    for (what, bytes) in [
        ("nothing", &b""[..]),
        (
            "a partial head",
            &b"GET / HTTP/1.1\r\nHost: larder.test\r\n"[..],
        ),
        ("only P", &b"P"[..]),
    ] {
        let started = Instant::now();
        let mut stream = TcpStream::connect(larder.addr).await.expect("connect");
        stream.write_all(bytes).await.expect("write");
        slow.push((what, started, stream));
    }
    for _ in 0..3 {
        let reply = get(&larder.url("/")).await;
        assert_eq!(reply.status, 200, "a normal client is served meanwhile");
        assert_eq!(reply.text(), "fine");
    }
    for (what, started, stream) in slow {
        // Real time: the 1 s header timeout is what closes these.
        let after = closed_after(stream, started).await;
        assert!(
            after >= Duration::from_millis(900) && after < Duration::from_secs(5),
            "a connection that sent {what} was closed after {after:?}"
        );
    }
    assert_eq!(origin.hits(), 3);
    larder.stop().await;
}

/// Larder with `server:` lines `server` in front of an origin answering "fine".
async fn with_server_settings(server: &str) -> (Origin, Larder) {
    let origin = start_origin(|_| async { respond(200, &[], "fine") }).await;
    let larder = start_larder(&one_route(&origin.url(), "", &format!("server:\n{server}"))).await;
    (origin, larder)
}

#[tokio::test]
async fn a_head_trickled_a_byte_at_a_time_is_cut_off_at_the_header_timeout() {
    let (_origin, larder) = with_server_settings("  header_timeout: 1s\n").await;
    let started = Instant::now();
    let stream = TcpStream::connect(larder.addr).await.expect("connect");
    let (reader, mut writer) = stream.into_split();
    let trickle = tokio::spawn(async move {
        let mut head = b"GET / HTTP/1.1\r\nHost: larder.test\r\nX-Slow: ".to_vec();
        head.extend(std::iter::repeat_n(b'a', 1000));
        for byte in head {
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
            // Real time: a byte every 100 ms is the attack.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let after = closed_after(reader, started).await;
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(5),
        "a trickling head was closed after {after:?}"
    );
    trickle.abort();
    larder.stop().await;
}

#[tokio::test]
async fn a_later_request_head_on_a_kept_alive_connection_also_has_the_header_timeout() {
    let (origin, larder) =
        with_server_settings("  header_timeout: 1s\n  idle_timeout: 60s\n").await;
    let mut stream = TcpStream::connect(larder.addr).await.expect("connect");
    stream
        .write_all(b"GET /one HTTP/1.1\r\nHost: larder.test\r\n\r\n")
        .await
        .expect("write");
    let mut received = Vec::new();
    read_responses(&mut stream, &mut received, 1).await;
    assert_eq!(parse_responses(&received, false)[0].status, 200);
    let started = Instant::now();
    stream
        .write_all(b"GET /two HTTP/1.1\r\nHost: larder.test\r\n")
        .await
        .expect("write");
    // Real time: the second head never ends; the 1 s header timeout (not
    // the 60 s idle timeout) is what must close the connection.
    let after = closed_after(stream, started).await;
    assert!(after < Duration::from_secs(5), "closed after {after:?}");
    assert_eq!(origin.hits(), 1);
    larder.stop().await;
}

#[tokio::test]
async fn an_idle_http1_connection_is_closed_after_the_idle_timeout() {
    let (_origin, larder) = with_server_settings("  idle_timeout: 1s\n").await;
    let mut stream = TcpStream::connect(larder.addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: larder.test\r\n\r\n")
        .await
        .expect("write");
    let mut received = Vec::new();
    read_responses(&mut stream, &mut received, 1).await;
    let idle_since = Instant::now();
    // Real time: the connection sits idle and the 1 s idle timeout ends it.
    let after = closed_after(stream, idle_since).await;
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(5),
        "closed after {after:?}"
    );
    larder.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_after_the_send_timeout() {
    // 64 MiB: far more than the socket buffers on both sides hold.
    let big = Bytes::from(vec![b'x'; 64 << 20]);
    let origin = start_origin(move |_| {
        let big = big.clone();
        async move { respond(200, &[], big) }
    })
    .await;
    let larder = start_larder(&one_route(
        &origin.url(),
        "",
        "server:\n  send_timeout: 1s\n  idle_timeout: 60s\n",
    ))
    .await;
    let mut stalled = TcpStream::connect(larder.addr).await.expect("connect");
    stalled
        .write_all(b"GET /big HTTP/1.1\r\nHost: larder.test\r\n\r\n")
        .await
        .expect("write");
    // Read the start of the answer, then stop reading.
    let mut first = [0u8; 1024];
    let read = tokio::time::timeout(DEADLINE, stalled.read(&mut first))
        .await
        .expect("an answer starts")
        .expect("read");
    assert!(shown(&first[..read]).starts_with("HTTP/1.1 200"));
    let stopped_reading = Instant::now();
    // Meanwhile another client gets the whole body.
    let other = get(&larder.url("/big")).await;
    assert_eq!(other.status, 200);
    assert_eq!(other.body.len(), 64 << 20);
    // Real time: this client takes nothing for 2 s (the attack); the 1 s
    // send timeout must end its connection meanwhile.
    tokio::time::sleep_until(stopped_reading + Duration::from_secs(2)).await;
    // Reading
    // now drains what was buffered, then finds the connection closed short
    // of the 64 MiB.
    let mut received = read;
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        match tokio::time::timeout(DEADLINE, stalled.read(&mut buffer)).await {
            Err(_) => panic!("the stalled connection is still open after {DEADLINE:?}"),
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => {
                received += n;
                if received >= 64 << 20 {
                    break;
                }
            }
        }
    }
    assert!(
        received < 64 << 20,
        "the stalled client still got the whole body ({received} bytes)"
    );
    larder.stop().await;
}

#[tokio::test]
async fn an_http2_connection_that_never_sends_a_request_is_closed_after_the_header_timeout() {
    let (origin, larder) = with_server_settings("  header_timeout: 1s\n").await;
    let started = Instant::now();
    let stream = TcpStream::connect(larder.addr).await.expect("connect");
    let (sender, connection) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    // Real time: preface and settings only; the 1 s header timeout ends it.
    let _ended = tokio::time::timeout(DEADLINE, connection)
        .await
        .expect("Larder closes a connection without a request");
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(5),
        "closed after {after:?}"
    );
    drop(sender);
    assert_eq!(origin.hits(), 0);
    larder.stop().await;
}

#[tokio::test]
async fn a_download_longer_than_the_header_timeout_keeps_its_connection_alive() {
    let origin = start_origin(|request| async move {
        if request.uri().path() != "/long" {
            return respond(200, &[], "short");
        }
        let (body, response) = common::streamed(200, &[]);
        tokio::spawn(async move {
            // Real time: the body takes 2.5 s, past the 1 s header timeout.
            for _ in 0..10 {
                body.chunk("0123456789").await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        response
    })
    .await;
    let larder = start_larder(&one_route(
        &origin.url(),
        "",
        "server:\n  header_timeout: 1s\n  idle_timeout: 60s\n",
    ))
    .await;
    let mut sender = common::connect::<Full<Bytes>>(&larder.addr.to_string()).await;
    let request = |path: &str| {
        Request::get(path)
            .header("host", "larder.test")
            .body(Full::new(Bytes::new()))
            .expect("request")
    };
    let long = sender.send_request(request("/long")).await.expect("head");
    let body = long.into_body().collect().await.expect("the whole body");
    assert_eq!(body.to_bytes().len(), 100);
    sender.ready().await.expect("the connection is kept alive");
    let next = sender
        .send_request(request("/next"))
        .await
        .expect("a second request on the same connection");
    assert_eq!(next.status(), 200);
    larder.stop().await;
}

#[tokio::test]
async fn an_idle_http2_connection_whose_client_pings_is_not_cut_off_by_the_header_timeout() {
    let (origin, larder) =
        with_server_settings("  header_timeout: 1s\n  idle_timeout: 60s\n").await;
    let stream = TcpStream::connect(larder.addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_millis(200))
            .keep_alive_while_idle(true)
            .handshake::<_, Full<Bytes>>(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    let connection = tokio::spawn(connection);
    let request = || {
        Request::get(format!("http://{}/", larder.addr))
            .body(Full::new(Bytes::new()))
            .expect("request")
    };
    let first = sender.send_request(request()).await.expect("first answer");
    assert_eq!(first.status(), 200);
    // Real time: between requests the client's PINGs arrive every 200 ms
    // for well past the 1 s header timeout; they are frames, not the start
    // of a request head, so only the 60 s idle timeout applies.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!connection.is_finished(), "the connection was closed");
    let second = sender
        .send_request(request())
        .await
        .expect("a second answer on the same connection");
    assert_eq!(second.status(), 200);
    assert_eq!(origin.hits(), 2);
    larder.stop().await;
}

#[tokio::test]
async fn max_connections_holds_further_clients_back_but_not_the_admin_listener() {
    let release = Arc::new(Notify::new());
    let held = release.clone();
    let origin = start_numbered_origin(move |_, n| {
        let held = held.clone();
        async move {
            if n <= 2 {
                held.notified().await;
            }
            respond(200, &[], format!("body {n}"))
        }
    })
    .await;
    let larder = start_larder(&one_route(
        &origin.url(),
        "",
        &format!("{ADMIN_BLOCK}server:\n  max_connections: 2\n  header_timeout: 30s\n"),
    ))
    .await;
    let first = spawn_get(larder.url("/a"));
    let second = spawn_get(larder.url("/b"));
    wait_until("two requests held at the origin", || origin.hits() == 2).await;
    let mut third = spawn_get(larder.url("/c"));

    let health = get(&larder.admin_url("/health")).await;
    assert_eq!(health.status, 200, "the admin listener has its own places");
    // A negative: half a second is ample for an answer on loopback, and the
    // third client must still have none.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut third)
            .await
            .is_err(),
        "the third client was answered while two connections were open"
    );
    assert_eq!(origin.hits(), 2);

    release.notify_one();
    let done = tokio::select! {
        reply = first => reply,
        reply = second => reply,
    };
    assert_eq!(done.expect("request task").status, 200);
    let third = tokio::time::timeout(DEADLINE, third)
        .await
        .expect("the third client is answered once a place is free")
        .expect("request task");
    assert_eq!(
        (third.status.as_u16(), third.text().as_str()),
        (200, "body 3")
    );
    release.notify_one();
    larder.stop().await;
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let origin = start_origin(|_| async { respond(200, &[], "over h2") }).await;
    let larder = start_larder(&one_route(
        &origin.url(),
        "",
        "server:\n  idle_timeout: 1s\n",
    ))
    .await;
    let stream = TcpStream::connect(larder.addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    let mut connection = tokio::spawn(connection);
    let request = Request::get(larder.url("/"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(body, "over h2");
    let idle_since = Instant::now();
    // Real time: the connection sits idle and the 1 s idle timeout ends it.
    let _ended = tokio::time::timeout(DEADLINE, &mut connection)
        .await
        .expect("Larder closes the idle connection")
        .expect("connection task");
    let idle = idle_since.elapsed();
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_secs(5),
        "closed after {idle:?}"
    );
    drop(sender);
    larder.stop().await;
}

// ---------------------------------------------------------------- cache safety

/// Larder with a cache-enabled route (`route_cache`: more lines under its
/// `cache:`, six spaces in) and the admin block.
async fn cached_front(origin: &Origin, route_cache: &str, global: &str) -> Larder {
    start_larder(&one_route(
        &origin.url(),
        &format!("    cache:\n      enabled: true\n{route_cache}"),
        &format!("{ADMIN_BLOCK}{global}"),
    ))
    .await
}

/// A response with `headers`, a `Date` `date` seconds from now, and a
/// `Set-Cookie` numbered like its body.
fn with_cookie(cache_control: &str, date: i64, n: usize) -> Response<Body> {
    respond(
        200,
        &[
            ("cache-control", cache_control),
            ("date", &http_date(date)),
            ("set-cookie", &format!("sid=secret-{n}")),
        ],
        format!("body {n}"),
    )
}

/// A `Date` that makes a `max-age=60` response 30 s stale on arrival.
const STALE: i64 = -90;

#[tokio::test]
async fn set_cookie_goes_only_to_the_client_whose_request_brought_it() {
    let origin =
        start_numbered_origin(|_, n| async move { with_cookie("public, max-age=60", 0, n) }).await;
    let front = cached_front(&origin, "", "").await;
    let first = get(&front.url("/c")).await;
    assert_eq!(first.text(), "body 1");
    assert_eq!(set_cookie(&first), Some("sid=secret-1"));
    let hit = get(&front.url("/c")).await;
    assert_eq!(hit.text(), "body 1");
    assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
    assert_eq!(
        set_cookie(&hit),
        None,
        "a hit carries someone else's cookie"
    );
    assert_eq!(origin.hits(), 1);
    front.stop().await;
}

/// Waits until `waiters` requests have joined the fill of `url`, as the
/// admin `GET /cache` shows it.
async fn joined(front: &Larder, url: &str, waiters: u64) {
    eventually(
        format!("{waiters} requests waiting on the fill of {url}"),
        async || {
            let state = front.admin("GET", "/cache", "").await.json();
            state["in_flight"].as_array().is_some_and(|flights| {
                flights
                    .iter()
                    .any(|flight| flight["key"] == url && flight["waiters"] == waiters)
            })
        },
    )
    .await;
}

#[tokio::test]
async fn set_cookie_is_not_shared_with_coalesced_waiters() {
    let release = Arc::new(Notify::new());
    let held = release.clone();
    let origin = start_numbered_origin(move |_, n| {
        let held = held.clone();
        async move {
            held.notified().await;
            with_cookie("public, max-age=60", 0, n)
        }
    })
    .await;
    let front = cached_front(&origin, "", "").await;
    let url = front.url("/co");
    let mut requests = vec![spawn_get(url.clone())];
    wait_until("the leader reaches the origin", || origin.hits() == 1).await;
    for _ in 0..3 {
        requests.push(spawn_get(url.clone()));
    }
    joined(&front, &url, 3).await;
    release.notify_one();
    let mut cookies = Vec::new();
    for request in requests {
        let reply = request.await.expect("request task");
        assert_eq!(reply.text(), "body 1");
        cookies.extend(set_cookie(&reply).map(str::to_string));
    }
    assert_eq!(origin.hits(), 1, "the waiters shared the leader's fill");
    assert_eq!(
        cookies,
        vec!["sid=secret-1".to_string()],
        "only the leader gets the cookie"
    );
    front.stop().await;
}

#[tokio::test]
async fn waiters_on_an_unstorable_set_cookie_response_get_their_own() {
    // Without `public`, a response with Set-Cookie is not stored; the
    // requests that waited on its fill must each fetch their own.
    let release = Arc::new(Notify::new());
    let held = release.clone();
    let origin = start_numbered_origin(move |_, n| {
        let held = held.clone();
        async move {
            held.notified().await;
            held.notify_one();
            with_cookie("max-age=60", 0, n)
        }
    })
    .await;
    let front = cached_front(&origin, "", "").await;
    let url = front.url("/own");
    let mut requests = vec![spawn_get(url.clone())];
    wait_until("the leader reaches the origin", || origin.hits() == 1).await;
    for _ in 0..3 {
        requests.push(spawn_get(url.clone()));
    }
    joined(&front, &url, 3).await;
    release.notify_one();
    for request in requests {
        let reply = request.await.expect("request task");
        let n = reply
            .text()
            .strip_prefix("body ")
            .map(str::to_string)
            .unwrap_or_default();
        assert_eq!(
            set_cookie(&reply),
            Some(format!("sid=secret-{n}").as_str()),
            "a cookie with someone else's response"
        );
    }
    assert_eq!(origin.hits(), 4, "each waiter fetched its own");
    front.stop().await;
}

#[tokio::test]
async fn set_cookie_is_not_replayed_with_a_stale_while_revalidate_answer() {
    let origin = start_numbered_origin(|_, n| async move {
        let date = if n == 1 { STALE } else { 0 };
        with_cookie("public, max-age=60, stale-while-revalidate=60", date, n)
    })
    .await;
    let front = cached_front(&origin, "", "").await;
    let first = get(&front.url("/swr")).await;
    assert_eq!(set_cookie(&first), Some("sid=secret-1"));
    let stale = get(&front.url("/swr")).await;
    assert_eq!(stale.text(), "body 1");
    assert!(
        stale.cache_status().contains("ttl=-"),
        "{}",
        stale.cache_status()
    );
    assert_eq!(set_cookie(&stale), None, "{:?}", stale.headers);
    wait_until("the background refresh", || origin.hits() == 2).await;
    let refreshed = eventually("the refresh to be stored", async || {
        let reply = get(&front.url("/swr")).await;
        (reply.text() == "body 2").then_some(reply)
    })
    .await;
    assert_eq!(
        set_cookie(&refreshed),
        None,
        "the refresh's cookie went to no client and must go to none"
    );
    front.stop().await;
}

#[tokio::test]
async fn set_cookie_is_not_replayed_with_a_stale_if_error_answer() {
    let origin = start_numbered_origin(|_, n| async move {
        if n == 1 {
            with_cookie("public, max-age=60, stale-if-error=60", STALE, n)
        } else {
            respond(503, &[], "down")
        }
    })
    .await;
    let front = cached_front(&origin, "", "").await;
    let first = get(&front.url("/sie")).await;
    assert_eq!(set_cookie(&first), Some("sid=secret-1"));
    let stale = get(&front.url("/sie")).await;
    assert_eq!(
        (stale.status.as_u16(), stale.text().as_str()),
        (200, "body 1")
    );
    assert!(
        stale.cache_status().contains("stale-if-error")
            || stale.cache_status().contains("fwd-status=503"),
        "{}",
        stale.cache_status()
    );
    assert_eq!(set_cookie(&stale), None, "{:?}", stale.headers);
    assert_eq!(origin.hits(), 2);
    front.stop().await;
}

#[tokio::test]
async fn set_cookie_is_not_kept_from_a_revalidation() {
    let origin = start_numbered_origin(|request, n| async move {
        if request.headers().contains_key("if-none-match") {
            let cookie = format!("sid=secret-{n}");
            return respond(
                304,
                &[
                    ("cache-control", "public, max-age=60"),
                    ("etag", "\"v1\""),
                    ("set-cookie", &cookie),
                ],
                "",
            );
        }
        let mut response = with_cookie("public, max-age=60", STALE, n);
        response
            .headers_mut()
            .insert("etag", HeaderValue::from_static("\"v1\""));
        response
    })
    .await;
    let front = cached_front(&origin, "", "").await;
    let first = get(&front.url("/rv")).await;
    assert_eq!(set_cookie(&first), Some("sid=secret-1"));
    let revalidated = get(&front.url("/rv")).await;
    assert_eq!(revalidated.text(), "body 1");
    assert_eq!(origin.hits(), 2, "the stale entry was revalidated");
    assert_ne!(
        set_cookie(&revalidated),
        Some("sid=secret-1"),
        "the first client's cookie was replayed"
    );
    let hit = get(&front.url("/rv")).await;
    assert_eq!(hit.text(), "body 1");
    assert_eq!(origin.hits(), 2);
    assert_eq!(set_cookie(&hit), None, "{:?}", hit.headers);
    front.stop().await;
}

/// An origin numbering its bodies, every response with `headers`.
async fn numbered(headers: &'static [(&'static str, &'static str)]) -> Origin {
    start_numbered_origin(move |_, n| async move { respond(200, headers, format!("body {n}")) })
        .await
}

#[tokio::test]
async fn a_vary_value_with_bytes_above_0x7f_is_a_variant_of_its_own() {
    let origin = numbered(&[("cache-control", "max-age=60"), ("vary", "Cookie")]).await;
    let front = cached_front(&origin, "", "").await;
    let url = front.url("/v");
    let a = get_bytes(&url, &[("cookie", b"sid=x\xff")]).await;
    assert_eq!(a.text(), "body 1");
    let none = get(&url).await;
    assert_eq!(
        none.text(),
        "body 2",
        "a client without Cookie got A's response"
    );
    let ascii = get_with(&url, &[("cookie", "sid=x")]).await;
    assert_eq!(
        ascii.text(),
        "body 3",
        "a client with another Cookie got A's response"
    );
    let escaped = get_with(&url, &[("cookie", "sid=x%FF")]).await;
    assert_eq!(escaped.text(), "body 4");
    let a_again = get_bytes(&url, &[("cookie", b"sid=x\xff")]).await;
    assert_eq!(a_again.text(), "body 1", "A's variant was stored");
    assert_eq!(origin.hits(), 4);
    front.stop().await;
}

#[tokio::test]
async fn a_key_header_value_with_bytes_above_0x7f_is_a_key_of_its_own() {
    let origin = numbered(&[("cache-control", "max-age=60")]).await;
    let front = cached_front(&origin, "      key: { headers: [x-tenant] }\n", "").await;
    let url = front.url("/k");
    let a = get_bytes(&url, &[("x-tenant", b"blue\xff")]).await;
    assert_eq!(a.text(), "body 1");
    let none = get(&url).await;
    assert_eq!(
        none.text(),
        "body 2",
        "a client without X-Tenant got A's response"
    );
    let ascii = get_with(&url, &[("x-tenant", "blue")]).await;
    assert_eq!(ascii.text(), "body 3");
    let escaped = get_with(&url, &[("x-tenant", "blue%FF")]).await;
    assert_eq!(
        escaped.text(),
        "body 4",
        "the escaped spelling is another key"
    );
    let a_again = get_bytes(&url, &[("x-tenant", b"blue\xff")]).await;
    assert_eq!(a_again.text(), "body 1");
    assert_eq!(origin.hits(), 4);
    front.stop().await;
}

#[tokio::test]
async fn vary_values_compare_case_sensitively_except_for_case_insensitive_fields() {
    let origin = start_numbered_origin(|request, n| async move {
        let vary = if request.uri().path() == "/case" {
            "X-Case"
        } else {
            "Accept-Encoding"
        };
        respond(
            200,
            &[("cache-control", "max-age=60"), ("vary", vary)],
            format!("body {n}"),
        )
    })
    .await;
    let front = cached_front(&origin, "", "").await;
    let case = front.url("/case");
    assert_eq!(get_with(&case, &[("x-case", "Abc")]).await.text(), "body 1");
    assert_eq!(get_with(&case, &[("x-case", "abc")]).await.text(), "body 2");
    assert_eq!(get_with(&case, &[("x-case", "Abc")]).await.text(), "body 1");
    assert_eq!(origin.hits(), 2, "Abc and abc are two variants");

    let encoding = front.url("/encoding");
    let upper = get_with(&encoding, &[("accept-encoding", "GZIP")]).await;
    assert_eq!(upper.text(), "body 3");
    let lower = get_with(&encoding, &[("accept-encoding", "gzip")]).await;
    assert_eq!(
        lower.text(),
        "body 3",
        "content codings are case-insensitive"
    );
    assert_eq!(origin.hits(), 3);
    front.stop().await;
}

#[tokio::test]
async fn responses_with_unreadable_cache_control_or_vary_are_not_stored() {
    let origin = start_numbered_origin(|request, n| async move {
        let lines: &[(&str, &[u8])] = match request.uri().path() {
            "/cc-byte" => &[
                ("cache-control", b"public, max-age=60"),
                ("cache-control", b"private\xff"),
            ],
            "/cc-quote" => &[("cache-control", b"public, max-age=60, x=\"unterminated")],
            "/vary-space" => &[("cache-control", b"public, max-age=60"), ("vary", b"a b")],
            _ => &[("cache-control", b"public, max-age=60")],
        };
        let mut response = respond(200, &[], format!("body {n}"));
        for (name, value) in lines {
            response
                .headers_mut()
                .append(*name, HeaderValue::from_bytes(value).expect("value"));
        }
        response
    })
    .await;
    let front = cached_front(&origin, "", "").await;
    get(&front.url("/control")).await;
    let control = get(&front.url("/control")).await;
    assert_eq!(
        control.text(),
        "body 1",
        "the same response without the fault is stored"
    );
    for path in ["/cc-byte", "/cc-quote", "/vary-space"] {
        let before = origin.hits();
        for _ in 0..3 {
            let reply = get(&front.url(path)).await;
            assert_eq!(reply.status, 200, "{path}");
        }
        assert_eq!(
            origin.hits() - before,
            3,
            "{path} was served from the cache"
        );
    }
    front.stop().await;
}

#[tokio::test]
async fn url_rewriting_and_method_override_headers_never_reach_the_origin() {
    let origin = start_origin(|_| async { respond(200, &[], "ok") }).await;
    let larder = start_larder(&one_route(&origin.url(), "", "")).await;
    let reply = get_with(
        &larder.url("/public"),
        &[
            ("x-original-url", "/admin"),
            ("x-rewrite-url", "/admin"),
            ("x-http-method-override", "DELETE"),
            ("x-http-method", "DELETE"),
            ("x-method-override", "DELETE"),
            ("x-host", "evil.example"),
            ("x-original-host", "evil.example"),
            ("x-custom", "kept"),
        ],
    )
    .await;
    assert_eq!(reply.status, 200);
    let seen = origin.last_request();
    for stripped in [
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-host",
        "x-original-host",
    ] {
        assert_eq!(
            seen.header(stripped),
            None,
            "{stripped}: {:?}",
            seen.headers
        );
    }
    assert_eq!(seen.header("x-custom"), Some("kept"));
    assert_eq!(seen.uri, "/public");
    assert_eq!(seen.method, "GET");
    larder.stop().await;
}

const FORGED: [(&str, &str); 9] = [
    ("forwarded", "for=10.1.2.3;proto=https;host=evil.example"),
    ("x-forwarded-for", "10.1.2.3"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-host", "evil.example"),
    ("x-forwarded-port", "443"),
    ("x-forwarded-prefix", "/evil"),
    ("x-forwarded-server", "evil.example"),
    ("x-forwarded-scheme", "https"),
    ("x-real-ip", "10.1.2.3"),
];

#[tokio::test]
async fn forwarding_headers_from_an_untrusted_client_are_replaced() {
    let origin = start_origin(|_| async { respond(200, &[], "ok") }).await;
    let larder = start_larder(&one_route(&origin.url(), "", "")).await;
    let reply = get_with(&larder.url("/"), &FORGED).await;
    assert_eq!(reply.status, 200);
    let seen = origin.last_request();
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("127.0.0.1"),
        "{:?}",
        seen.headers
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(
        seen.header("x-forwarded-host"),
        Some(larder.addr.to_string().as_str()),
        "the host the client asked for, not the one it claimed"
    );
    for dropped in [
        "forwarded",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-server",
        "x-forwarded-scheme",
        "x-real-ip",
    ] {
        assert_eq!(seen.header(dropped), None, "{dropped}: {:?}", seen.headers);
    }
    larder.stop().await;
}

#[tokio::test]
async fn forwarding_headers_from_a_trusted_proxy_are_kept_and_appended_to() {
    let origin = start_origin(|_| async { respond(200, &[], "ok") }).await;
    let larder = start_larder(&one_route(
        &origin.url(),
        "",
        "server:\n  trusted_proxies: [127.0.0.1]\n",
    ))
    .await;
    let reply = get_with(&larder.url("/"), &FORGED).await;
    assert_eq!(reply.status, 200);
    let seen = origin.last_request();
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("10.1.2.3, 127.0.0.1"),
        "{:?}",
        seen.headers
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    larder.stop().await;
}

#[tokio::test]
async fn bypass_with_credentials_sends_every_credentialed_request_to_the_origin() {
    let origin = numbered(&[("cache-control", "public, max-age=60")]).await;
    let front = cached_front(&origin, "      bypass_with_credentials: true\n", "").await;
    let url = front.url("/me");
    assert_eq!(
        get_with(&url, &[("cookie", "sid=a")]).await.text(),
        "body 1"
    );
    assert_eq!(
        get_with(&url, &[("cookie", "sid=a")]).await.text(),
        "body 2"
    );
    assert_eq!(
        get_with(&url, &[("authorization", "Bearer a")])
            .await
            .text(),
        "body 3"
    );
    let anonymous = get(&url).await;
    assert_eq!(
        anonymous.text(),
        "body 4",
        "a credentialed answer was served to another client"
    );
    assert_eq!(
        get(&url).await.text(),
        "body 4",
        "anonymous requests are cached as usual"
    );
    assert_eq!(origin.hits(), 4);
    front.stop().await;
}

#[tokio::test]
async fn without_bypass_with_credentials_the_usual_cache_rules_apply() {
    let origin = numbered(&[("cache-control", "public, max-age=60")]).await;
    let front = cached_front(&origin, "", "").await;
    let url = front.url("/me");
    assert_eq!(
        get_with(&url, &[("cookie", "sid=a")]).await.text(),
        "body 1"
    );
    assert_eq!(
        get_with(&url, &[("cookie", "sid=b")]).await.text(),
        "body 1"
    );
    assert_eq!(get(&url).await.text(), "body 1");
    assert_eq!(origin.hits(), 1);
    front.stop().await;
}

// ---------------------------------------------------------------- admin

#[tokio::test]
async fn the_admin_api_refuses_a_host_that_is_not_its_own() {
    let larder = start_larder(&format!(
        "{ADMIN_BLOCK}  hosts: [admin.internal]\nroutes: []\n"
    ))
    .await;
    let port = larder.admin_addr.expect("admin listener").port();
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    for path in ["/health", "/ready", "/metrics", "/cache"] {
        let reply = get_with(
            &larder.admin_url(path),
            &[("host", "evil.example"), ("authorization", &bearer)],
        )
        .await;
        assert_problem(&reply, 403);
        let other = get_with(
            &larder.admin_url(path),
            &[("host", "other.internal:9901"), ("authorization", &bearer)],
        )
        .await;
        assert_eq!(other.status, 403, "{path}");
    }
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "localhost".to_string(),
        format!("admin.internal:{port}"),
    ] {
        let reply = get_with(&larder.admin_url("/health"), &[("host", &host)]).await;
        assert_eq!(reply.status, 200, "Host: {host}: {}", reply.text());
        let metrics = get_with(
            &larder.admin_url("/metrics"),
            &[("host", &host), ("authorization", &bearer)],
        )
        .await;
        assert_eq!(metrics.status, 200, "Host: {host}");
    }
    larder.stop().await;
}

const GREETING_SOURCE: &str =
    "sources:\n  greeting:\n    rule: '@every 1s'\n    static: { value: 'hi' }\n";

#[tokio::test]
async fn public_key_api_false_puts_source_values_behind_the_token() {
    let larder = start_larder(&format!(
        "{ADMIN_BLOCK}  public_key_api: false\n{GREETING_SOURCE}"
    ))
    .await;
    let url = larder.admin_url("/?key=greeting");
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let with_token = eventually("the source's value", async || {
        let reply = get_with(&url, &[("authorization", &bearer)]).await;
        (reply.status == 200).then_some(reply)
    })
    .await;
    assert_eq!(with_token.text(), "hi");
    assert_problem(&get(&url).await, 401);
    larder.stop().await;

    let open = start_larder(&format!("{ADMIN_BLOCK}{GREETING_SOURCE}")).await;
    let url = open.admin_url("/?key=greeting");
    let reply = eventually("the source's value without a token", async || {
        let reply = get(&url).await;
        (reply.status == 200).then_some(reply)
    })
    .await;
    assert_eq!(reply.text(), "hi", "public by default");
    open.stop().await;
}

// ---------------------------------------------------------------- config

#[test]
fn durations_over_100_years_and_sizes_over_1_pib_are_load_errors_at_their_key() {
    for (yaml, path) in [
        ("server:\n  header_timeout: 101y\n", "server.header_timeout"),
        (
            "server:\n  tunnel_idle_timeout: 36600d\n",
            "server.tunnel_idle_timeout",
        ),
        (
            "server:\n  max_request_body: 2PiB\n",
            "server.max_request_body",
        ),
    ] {
        let errors = larder::config::load_str(yaml, "t.yml").expect_err(yaml).0;
        assert!(
            errors.iter().any(|error| error.path == path),
            "{yaml}: {errors:#?}"
        );
    }
    assert!(larder::config::load_str("server:\n  header_timeout: 100y\n", "t.yml").is_ok());
}

#[test]
fn h2c_in_a_route_upgrades_list_is_a_load_error_at_its_key() {
    let yaml = "upstreams:\n  app: { servers: [\"http://127.0.0.1:9000\"] }\n\
                routes:\n  - upstream: app\n    upgrades: [websocket, H2C]\n";
    let errors = larder::config::load_str(yaml, "t.yml").expect_err("h2c").0;
    let paths: Vec<&str> = errors.iter().map(|error| error.path.as_str()).collect();
    assert_eq!(paths, vec!["routes[0].upgrades[1]"], "{errors:#?}");
}

#[test]
fn an_admin_host_with_a_port_is_a_config_error() {
    let yaml =
        "admin:\n  token: t\n  hosts: [admin.internal, \"admin.internal:9901\"]\nroutes: []\n";
    let errors = larder::config::load_str(yaml, "t.yml")
        .expect_err("a host with a port never matches")
        .0;
    let paths: Vec<&str> = errors.iter().map(|error| error.path.as_str()).collect();
    assert_eq!(paths, vec!["admin.hosts[1]"], "{errors:#?}");
}

#[test]
fn an_open_downstream_plugin_on_a_route_is_warned_about() {
    let text = format!(
        "plugins:\n  \
           open_gate: {{ path: {gate}, on_error: open }}\n  \
           closed_gate: {{ path: {gate} }}\n  \
           open_store: {{ path: {gate}, phase: cache_store, on_error: open }}\n\
         upstreams:\n  app: {{ servers: [\"http://127.0.0.1:9000\"] }}\n\
         routes:\n  \
           - match: {{ path_prefix: /open }}\n    upstream: app\n    plugins: [open_gate]\n  \
           - match: {{ path_prefix: /closed }}\n    upstream: app\n    plugins: [closed_gate, open_store]\n",
        gate = wasm("answer_direct").display()
    );
    let config = larder::config::load_str(&text, "t.yml").unwrap_or_else(|e| panic!("{e}"));
    let warnings = larder::config::warnings_str(&text, "t.yml", &config);
    let about_plugins: Vec<&str> = warnings
        .iter()
        .map(|warning| warning.path.as_str())
        .filter(|path| path.contains("plugins"))
        .collect();
    assert_eq!(about_plugins, vec!["routes[0].plugins[0]"], "{warnings:#?}");
}

// ---------------------------------------------------------------- smuggling

/// The well-formed request each attack is followed by on its connection.
const SECOND: &[u8] = b"GET /second HTTP/1.1\r\nHost: larder.test\r\nConnection: close\r\n\r\n";

/// The request hidden in each attack: it must never reach the origin.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: larder.test\r\n\r\n";

/// Sends `attack` then [`SECOND`] on one fresh connection to `front` (in
/// front of `origin`) and judges what happened: either the front refused
/// (an answer that is a 4xx or the last before it closed the connection) or
/// the origin got exactly the requests the client sent, each well framed,
/// each answered, and never the smuggled one.
async fn smuggling_verdict(
    front: SocketAddr,
    origin: &RawOrigin,
    attack: &[u8],
    client_requests: &[&str],
) -> Result<(), String> {
    let mut bytes = attack.to_vec();
    bytes.extend_from_slice(SECOND);
    let answer = exchange(front, &bytes, usize::MAX).await;
    let context = format!(
        "sent {:?}\ngot {:?}\n{}",
        shown(&bytes),
        shown(&answer.received),
        origin.report()
    );
    let fail = |why: &str| Err(format!("{why}\n{context}"));
    if !answer.closed {
        return fail("the connection was neither closed nor finished");
    }
    if !origin.log.lock().unwrap().faults.is_empty() {
        return fail("the origin got a request a strict server refuses");
    }
    let seen = origin.requests();
    if seen.iter().any(|request| request.line.contains("smuggled")) {
        return fail("a smuggled request reached the origin");
    }
    let mut lines: Vec<&str> = seen.iter().map(|request| request.line.as_str()).collect();
    lines.sort_unstable();
    let before = lines.len();
    lines.dedup();
    if before != lines.len() {
        return fail("a request reached the origin twice");
    }
    if let Some(line) = lines
        .iter()
        .find(|line| !client_requests.contains(line) && **line != "GET /second HTTP/1.1")
    {
        return fail(&format!(
            "the origin got {line:?}, which the client did not send"
        ));
    }
    if answer.responses.len() > client_requests.len() + 1 {
        return fail("more answers than requests");
    }
    let statuses = answer.statuses();
    if statuses.iter().filter(|status| **status == 200).count() != seen.len() {
        return fail("the 200s are not one per request the origin answered");
    }
    let last = statuses.len().saturating_sub(1);
    for (i, status) in statuses.iter().enumerate() {
        if *status != 200 && !(400..500).contains(status) && i != last {
            return fail(&format!("a {status} the connection went on after"));
        }
    }
    Ok(())
}

/// [`smuggling_verdict`] for a Larder in front of a fresh [`RawOrigin`].
async fn smuggling_attempt(attack: &[u8], client_requests: &[&str]) {
    let origin = RawOrigin::start().await;
    let larder = start_larder(&one_route(
        &origin.url(),
        "    cache: { enabled: false }\n",
        "",
    ))
    .await;
    if let Err(why) = smuggling_verdict(larder.addr, &origin, attack, client_requests).await {
        panic!("{why}");
    }
    larder.stop().await;
}

/// `POST /first` with `headers` (each line with its own ending) and `body`.
fn post_first(headers: &str, body: &str) -> Vec<u8> {
    format!("POST /first HTTP/1.1\r\nHost: larder.test\r\n{headers}\r\n{body}").into_bytes()
}

/// A body that hides [`SMUGGLED`] after an empty chunked body.
fn chunked_then_smuggled() -> String {
    format!("0\r\n\r\n{SMUGGLED}")
}

/// The request line every attack but the NUL one starts with.
const POST: &[&str] = &["POST /first HTTP/1.1"];

/// CL.TE: read by Content-Length the body is the hidden request; read as
/// chunked it ends at once and the hidden request is next.
fn cl_te() -> Vec<u8> {
    let body = chunked_then_smuggled();
    post_first(
        &format!(
            "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
            body.len()
        ),
        &body,
    )
}

/// TE.CL: read as chunked the hidden request is the body; read by the short
/// Content-Length it is next.
fn te_cl() -> Vec<u8> {
    let size = format!("{:x}\r\n", SMUGGLED.len());
    post_first(
        &format!(
            "Transfer-Encoding: chunked\r\nContent-Length: {}\r\n",
            size.len()
        ),
        &format!("{size}{SMUGGLED}\r\n0\r\n\r\n"),
    )
}

/// `chunked` not the last coding: a request body without a length.
fn chunked_then_identity() -> Vec<u8> {
    post_first(
        "Transfer-Encoding: chunked, identity\r\n",
        &chunked_then_smuggled(),
    )
}

/// An unknown coding before `chunked`, with a Content-Length beside it.
fn identity_then_chunked() -> Vec<u8> {
    let body = chunked_then_smuggled();
    post_first(
        &format!(
            "Transfer-Encoding: identity, chunked\r\nContent-Length: {}\r\n",
            body.len()
        ),
        &body,
    )
}

/// Two Content-Lengths: the first one read hides nothing, the second does.
fn two_content_lengths() -> Vec<u8> {
    let body = format!("hello{SMUGGLED}");
    post_first(
        &format!("Content-Length: 5\r\nContent-Length: {}\r\n", body.len()),
        &body,
    )
}

/// A Content-Length with a sign, which a lenient parser reads as 5.
fn signed_content_length() -> Vec<u8> {
    post_first("Content-Length: +5\r\n", &format!("hello{SMUGGLED}"))
}

/// A bare LF inside the head: read as a line end, the body is the hidden
/// request; read with CRLF only, there is no Content-Length and it is next.
fn bare_lf() -> Vec<u8> {
    post_first(
        &format!("X-Note: a\nContent-Length: {}\r\n", SMUGGLED.len()),
        SMUGGLED,
    )
}

/// A NUL in a header value.
fn nul_in_value() -> Vec<u8> {
    b"GET /first HTTP/1.1\r\nHost: larder.test\r\nX-Note: a\0b\r\n\r\n".to_vec()
}

/// A chunk size of 0x10000000000000005, which 64-bit arithmetic wraps to 5.
fn chunk_size_overflow() -> Vec<u8> {
    post_first(
        "Transfer-Encoding: chunked\r\n",
        &format!("10000000000000005\r\nhello\r\n0\r\n\r\n{SMUGGLED}"),
    )
}

/// obs-fold: unfolded, the continuation line is a Transfer-Encoding of its
/// own and the hidden request is next.
fn obs_fold() -> Vec<u8> {
    let body = chunked_then_smuggled();
    post_first(
        &format!(
            "X-Note: a\r\n Transfer-Encoding: chunked\r\nContent-Length: {}\r\n",
            body.len()
        ),
        &body,
    )
}

#[tokio::test]
async fn content_length_with_chunked_smuggles_nothing() {
    smuggling_attempt(&cl_te(), POST).await;
}

#[tokio::test]
async fn chunked_with_a_short_content_length_smuggles_nothing() {
    smuggling_attempt(&te_cl(), POST).await;
}

#[tokio::test]
async fn chunked_that_is_not_the_last_coding_smuggles_nothing() {
    smuggling_attempt(&chunked_then_identity(), POST).await;
}

#[tokio::test]
async fn identity_before_chunked_with_a_content_length_smuggles_nothing() {
    smuggling_attempt(&identity_then_chunked(), POST).await;
}

#[tokio::test]
async fn two_different_content_lengths_smuggle_nothing() {
    smuggling_attempt(&two_content_lengths(), POST).await;
}

#[tokio::test]
async fn a_signed_content_length_smuggles_nothing() {
    smuggling_attempt(&signed_content_length(), POST).await;
}

#[tokio::test]
async fn a_bare_lf_in_the_head_smuggles_nothing() {
    smuggling_attempt(&bare_lf(), POST).await;
}

#[tokio::test]
async fn a_nul_in_a_header_value_smuggles_nothing() {
    // The origin's strict parser counts a NUL in a head as a fault.
    smuggling_attempt(&nul_in_value(), &["GET /first HTTP/1.1"]).await;
}

#[tokio::test]
async fn a_chunk_size_over_64_bits_smuggles_nothing() {
    smuggling_attempt(&chunk_size_overflow(), POST).await;
}

#[tokio::test]
async fn an_obs_folded_header_smuggles_nothing() {
    smuggling_attempt(&obs_fold(), POST).await;
}

/// A front that passes bytes on as they come, as a naive TCP proxy would.
async fn verbatim_relay(origin: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut upstream) = TcpStream::connect(origin).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn the_smuggling_witness_catches_every_attack_a_verbatim_relay_passes_on() {
    let corpus: [(&str, Vec<u8>); 10] = [
        ("CL.TE", cl_te()),
        ("TE.CL", te_cl()),
        ("chunked, identity", chunked_then_identity()),
        ("identity, chunked", identity_then_chunked()),
        ("two Content-Lengths", two_content_lengths()),
        ("Content-Length: +5", signed_content_length()),
        ("bare LF", bare_lf()),
        ("NUL", nul_in_value()),
        ("chunk size overflow", chunk_size_overflow()),
        ("obs-fold", obs_fold()),
    ];
    for (name, attack) in corpus {
        let origin = RawOrigin::start().await;
        let relay = verbatim_relay(origin.addr).await;
        let verdict = smuggling_verdict(relay, &origin, &attack, POST).await;
        assert!(
            verdict.is_err(),
            "{name} through a verbatim relay was judged safe"
        );
    }
}

#[tokio::test]

async fn a_malformed_chunked_body_is_the_clients_fault_not_the_upstreams() {
    let origin = RawOrigin::start().await;
    let larder = start_larder(&format!(
        "{ADMIN_BLOCK}upstreams:\n  chunk_victim: {{ servers: [\"{}\"] }}\nroutes:\n  - upstream: chunk_victim\n",
        origin.url()
    ))
    .await;
    let attack = post_first(
        "Transfer-Encoding: chunked\r\nConnection: close\r\n",
        "10000000000000005\r\nhello\r\n0\r\n\r\n",
    );
    let answer = exchange(larder.addr, &attack, 1).await;
    let response = answer.first();
    let metrics = larder.admin("GET", "/metrics", "").await.text();
    let upstream_errors: Vec<&str> = metrics
        .lines()
        .filter(|line| {
            line.starts_with("larder_upstream_errors_total") && line.contains("chunk_victim")
        })
        .collect();
    assert_eq!(
        (response.status, upstream_errors.as_slice()),
        (400, &[][..]),
        "a malformed chunk size is a bad request, not an upstream error; answer: {}",
        String::from_utf8_lossy(&response.body)
    );
    larder.stop().await;
}
