//! The proxy end to end over real sockets: routing, forwarding, header
//! hygiene, errors, streaming, upgrades, TLS upstreams, h2c and shutdown.

mod common;

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    assert_problem, connect, get, get_with, respond, send, start_larder, start_numbered_origin,
    start_origin, wait_until,
};
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tokio::sync::{Notify, oneshot};

const DEADLINE: Duration = Duration::from_secs(10);

fn one_upstream(origin_url: &str, extra_route: &str) -> String {
    format!(
        "upstreams:\n  app:\n    servers: [\"{origin_url}\"]\nroutes:\n  - upstream: app\n{extra_route}"
    )
}

/// An origin that answers with its method, URI and chosen request headers.
async fn echo_origin() -> common::Origin {
    start_origin(|request| async move {
        let mut lines = vec![format!("{} {}", request.method(), request.uri())];
        for (name, value) in request.headers() {
            lines.push(format!("{name}: {}", value.to_str().unwrap_or("?")));
        }
        let body = request
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        lines.push(String::new());
        lines.push(String::from_utf8_lossy(&body).into_owned());
        respond(200, &[], lines.join("\n"))
    })
    .await
}

#[tokio::test]
async fn forwards_method_path_query_headers_and_body() {
    let origin = echo_origin().await;
    let larder = start_larder(&one_upstream(&origin.url(), "")).await;
    let reply = send(
        "POST",
        &larder.url("/a/b?c=1&d=two"),
        &[("x-custom", "kept"), ("content-type", "text/plain")],
        "payload bytes",
    )
    .await;
    assert_eq!(reply.status, 200);
    let text = reply.text();
    assert!(text.starts_with("POST /a/b?c=1&d=two\n"), "{text}");
    assert!(text.contains("x-custom: kept"), "{text}");
    assert!(text.ends_with("\npayload bytes"), "{text}");
    assert_eq!(origin.hits(), 1);
    larder.stop().await;
}

#[tokio::test]
async fn route_header_rules_apply_to_misses_hits_and_plugin_answers_alike() {
    let origin = start_origin(|_| async {
        respond(
            200,
            &[
                ("cache-control", "max-age=60"),
                ("server", "origin/1.0"),
                ("x-frame-options", "SAMEORIGIN"),
            ],
            "page",
        )
    })
    .await;
    let larder = start_larder(&format!(
        "upstreams:\n  app:\n    servers: [\"{}\"]\nroutes:\n  - upstream: app\n    cache: {{ enabled: true }}\n    headers:\n      set: {{ x-frame-options: DENY, x-served-by: larder }}\n      remove: [server]\n",
        origin.url()
    ))
    .await;
    for round in ["miss", "hit"] {
        let reply = get(&larder.url("/page")).await;
        assert_eq!(reply.status, 200, "{round}");
        assert_eq!(reply.header("x-served-by"), Some("larder"), "{round}");
        assert_eq!(
            reply.headers.get_all("x-frame-options").iter().count(),
            1,
            "{round}: set replaces the origin's field"
        );
        assert_eq!(reply.header("x-frame-options"), Some("DENY"), "{round}");
        assert_eq!(reply.header("server"), None, "{round}: removed");
        assert_eq!(reply.text(), "page", "{round}");
    }
    assert_eq!(origin.hits(), 1, "the second request was a hit");
    larder.stop().await;
}

#[tokio::test]
async fn routes_by_host_and_prefix_with_the_first_match_winning() {
    let api = start_origin(|_| async { respond(200, &[], "api") }).await;
    let wild = start_origin(|_| async { respond(200, &[], "wildcard") }).await;
    let fallback = start_origin(|_| async { respond(200, &[], "fallback") }).await;
    let yaml = format!(
        r#"
upstreams:
  api: {{ servers: ["{}"] }}
  wild: {{ servers: ["{}"] }}
  fallback: {{ servers: ["{}"] }}
routes:
  - match: {{ host: API.example.com, path_prefix: /v1/ }}
    upstream: api
  - match: {{ host: "*.example.com" }}
    upstream: wild
  - match: {{ path_prefix: /v1/ }}
    upstream: api
  - match: {{ path_prefix: / }}
    upstream: fallback
"#,
        api.url(),
        wild.url(),
        fallback.url()
    );
    let larder = start_larder(&yaml).await;
    let url = larder.url("/v1/items");
    let by_host = |host: &'static str| {
        let url = url.clone();
        async move { get_with(&url, &[("host", host)]).await.text() }
    };
    assert_eq!(by_host("api.example.com:8080").await, "api");
    assert_eq!(by_host("Api.Example.Com").await, "api");
    assert_eq!(by_host("www.example.com").await, "wildcard");
    assert_eq!(by_host("other.test").await, "api");
    assert_eq!(
        get_with(&larder.url("/elsewhere"), &[("host", "api.example.com")])
            .await
            .text(),
        "wildcard",
        "the prefix must match too"
    );
    assert_eq!(get(&larder.url("/x")).await.text(), "fallback");
    larder.stop().await;
}

#[tokio::test]
async fn no_matching_route_is_404_problem_json() {
    let origin = echo_origin().await;
    let yaml = format!(
        "upstreams:\n  app: {{ servers: [\"{}\"] }}\nroutes:\n  - match: {{ path_prefix: /api/ }}\n    upstream: app\n",
        origin.url()
    );
    let larder = start_larder(&yaml).await;
    let reply = get(&larder.url("/other")).await;
    assert_problem(&reply, 404);
    assert_eq!(origin.hits(), 0);
    // A route-less /health still answers on the proxy listener.
    let health = get(&larder.url("/health")).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");
    larder.stop().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways_and_forwarding_headers_added() {
    let origin = start_origin(|request| async move {
        let seen: Vec<String> = request
            .headers()
            .iter()
            .map(|(name, value)| format!("{name}={}", value.to_str().unwrap_or("?")))
            .collect();
        respond(
            200,
            &[
                ("connection", "x-origin-private"),
                ("x-origin-private", "secret"),
                ("keep-alive", "timeout=5"),
                ("proxy-authenticate", "Basic"),
                ("x-end-to-end", "kept"),
                ("server", "origin/1.0"),
            ],
            seen.join("\n"),
        )
    })
    .await;
    // The test client is a trusted proxy: its X-Forwarded-For is kept and
    // appended to (tests/hostile.rs checks that an untrusted one's is not).
    let yaml = format!(
        "server:\n  trusted_proxies: [127.0.0.1]\n{}",
        one_upstream(&origin.url(), "")
    );
    let larder = start_larder(&yaml).await;
    let reply = get_with(
        &larder.url("/h"),
        &[
            ("host", "shop.example"),
            ("connection", "x-client-private"),
            ("x-client-private", "secret"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic abc"),
            ("x-forwarded-for", "10.1.2.3"),
            ("x-end-to-end", "kept"),
        ],
    )
    .await;
    assert_eq!(reply.status, 200);
    let seen = reply.text();
    let lines: Vec<&str> = seen.lines().collect();
    for absent in ["x-client-private=", "te=", "proxy-authorization="] {
        assert!(
            !lines.iter().any(|l| l.starts_with(absent)),
            "{absent} reached the origin: {seen}"
        );
    }
    assert!(lines.contains(&"x-end-to-end=kept"), "{seen}");
    assert!(lines.contains(&"host=shop.example"), "{seen}");
    assert!(
        lines.contains(&"x-forwarded-for=10.1.2.3, 127.0.0.1"),
        "{seen}"
    );
    assert!(lines.contains(&"x-forwarded-proto=http"), "{seen}");
    assert!(lines.contains(&"x-forwarded-host=shop.example"), "{seen}");
    assert!(lines.contains(&"via=1.1 larder"), "{seen}");

    assert_eq!(reply.header("x-origin-private"), None);
    assert_eq!(reply.header("keep-alive"), None);
    assert_eq!(reply.header("proxy-authenticate"), None);
    assert_eq!(reply.header("x-end-to-end"), Some("kept"));
    assert_eq!(reply.header("server"), Some("origin/1.0"));
    assert_eq!(reply.header("via"), Some("1.1 larder"));
    larder.stop().await;
}

#[tokio::test]
async fn upstream_host_replaces_the_client_host() {
    let origin = echo_origin().await;
    let yaml = format!(
        "upstreams:\n  app:\n    servers: [\"{}\"]\n    host: internal.app\nroutes:\n  - upstream: app\n",
        origin.url()
    );
    let larder = start_larder(&yaml).await;
    let reply = get_with(&larder.url("/"), &[("host", "public.example")]).await;
    let text = reply.text();
    assert!(text.contains("host: internal.app"), "{text}");
    assert!(text.contains("x-forwarded-host: public.example"), "{text}");
    larder.stop().await;
}

#[tokio::test]
async fn refused_upstream_is_502_problem_json() {
    // Bind then drop: the port is closed when Larder connects.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = closed.local_addr().expect("addr");
    drop(closed);
    let yaml = format!(
        "upstreams:\n  refusing: {{ servers: [\"http://{addr}\"] }}\nroutes:\n  - upstream: refusing\n"
    );
    let larder = start_larder(&yaml).await;
    let reply = get(&larder.url("/")).await;
    assert_problem(&reply, 502);
    assert!(
        reply.json()["detail"]
            .as_str()
            .unwrap_or("")
            .contains("refusing")
    );
    let metrics = larder::telemetry::render_metrics();
    assert!(
        metrics.contains(r#"larder_upstream_errors_total{upstream="refusing",kind="connect"} 1"#),
        "{metrics}"
    );
    larder.stop().await;
}

#[tokio::test]
async fn upstream_that_resets_is_502() {
    let (addr, _) = tcp_origin(|stream| async move { drop(stream) }).await;
    let yaml = format!(
        "upstreams:\n  resetting: {{ servers: [\"http://{addr}\"] }}\nroutes:\n  - upstream: resetting\n"
    );
    let larder = start_larder(&yaml).await;
    assert_problem(&get(&larder.url("/")).await, 502);
    let metrics = larder::telemetry::render_metrics();
    assert!(
        metrics.contains(r#"larder_upstream_errors_total{upstream="resetting",kind="reset"}"#),
        "{metrics}"
    );
    larder.stop().await;
}

#[tokio::test]
async fn upstream_slower_than_its_timeout_is_504() {
    let origin = start_origin(|_| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        respond(200, &[], "too late")
    })
    .await;
    let yaml = format!(
        "upstreams:\n  app:\n    servers: [\"{}\"]\n    timeout: 200ms\nroutes:\n  - upstream: app\n",
        origin.url()
    );
    let larder = start_larder(&yaml).await;
    let reply = get(&larder.url("/")).await;
    assert_problem(&reply, 504);
    larder.stop().await;
}

#[tokio::test]
async fn body_over_the_declared_limit_is_413_before_the_upstream_sees_it() {
    let origin = echo_origin().await;
    let yaml = format!(
        "server:\n  max_request_body: 1KiB\nupstreams:\n  app: {{ servers: [\"{}\"] }}\nroutes:\n  - match: {{ path_prefix: /big/ }}\n    upstream: app\n    max_request_body: 4KiB\n  - upstream: app\n",
        origin.url()
    );
    let larder = start_larder(&yaml).await;
    let reply = send("POST", &larder.url("/small"), &[], vec![b'x'; 2000]).await;
    assert_problem(&reply, 413);
    assert_eq!(origin.hits(), 0);
    let reply = send("POST", &larder.url("/big/ok"), &[], vec![b'x'; 2000]).await;
    assert_eq!(
        reply.status, 200,
        "the route's limit overrides the server's"
    );
    larder.stop().await;
}

#[tokio::test]
async fn chunked_body_over_the_limit_is_cut_off_with_413() {
    let origin = echo_origin().await;
    let yaml = format!(
        "server:\n  max_request_body: 1KiB\n{}",
        one_upstream(&origin.url(), "")
    );
    let larder = start_larder(&yaml).await;
    let chunks = futures_util::stream::iter(
        (0..8)
            .map(|_| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![b'y'; 500])))),
    );
    let request = Request::post("/upload")
        .header("host", larder.addr.to_string())
        .body(StreamBody::new(chunks))
        .expect("request");
    let mut sender = connect(&larder.addr.to_string()).await;
    let response = sender.send_request(request).await.expect("a response");
    assert_eq!(response.status(), 413);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let problem: serde_json::Value = serde_json::from_slice(&body).expect("problem json");
    assert_eq!(problem["status"], 413);
    larder.stop().await;
}

#[tokio::test]
async fn malformed_requests_get_400_problem_json() {
    let origin = echo_origin().await;
    let larder = start_larder(&one_upstream(&origin.url(), "")).await;
    let reply = get_with(&larder.url("/"), &[("host", "bad host/x")]).await;
    assert_problem(&reply, 400);
    // Raw HTTP/1.1 without a Host header.
    let raw = raw_exchange(&larder.addr.to_string(), "GET / HTTP/1.1\r\n\r\n").await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(raw.contains("application/problem+json"), "{raw}");
    // Two Host headers.
    let raw = raw_exchange(
        &larder.addr.to_string(),
        "GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    // User information smuggled into an absolute-form target.
    let raw = raw_exchange(
        &larder.addr.to_string(),
        "GET http://user@a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert_eq!(origin.hits(), 0);
    larder.stop().await;
}

#[tokio::test]
async fn absolute_form_request_for_an_unserved_host_is_400() {
    let origin = echo_origin().await;
    let yaml = format!(
        "upstreams:\n  app: {{ servers: [\"{}\"] }}\nroutes:\n  - match: {{ host: served.test }}\n    upstream: app\n",
        origin.url()
    );
    let larder = start_larder(&yaml).await;
    let raw = raw_exchange(
        &larder.addr.to_string(),
        "GET http://elsewhere.test/ HTTP/1.1\r\nHost: elsewhere.test\r\n\r\n",
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(raw.contains("not a forward proxy"), "{raw}");
    assert_eq!(origin.hits(), 0);
    larder.stop().await;
}

/// Writes `request` on a new connection and reads until the server closes
/// or a whole problem body has arrived.
async fn raw_exchange(addr: &str, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        let read = tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buffer)).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
            Err(_) if !received.is_empty() => break,
            Err(_) => {}
        }
        if received.ends_with(b"}") {
            break;
        }
    }
    String::from_utf8_lossy(&received).into_owned()
}

/// A body whose chunks the test sends one at a time.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}

fn channel_body() -> (tokio::sync::mpsc::Sender<Bytes>, ChannelBody) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    (tx, ChannelBody(rx))
}

#[tokio::test]
async fn downloads_stream_before_the_origin_has_finished() {
    let release = Arc::new(Notify::new());
    let origin_release = release.clone();
    let origin = start_origin(move |_| {
        let release = origin_release.clone();
        async move {
            let (sender, body) = channel_body();
            tokio::spawn(async move {
                let _ = sender.send(Bytes::from_static(b"first chunk;")).await;
                release.notified().await;
                let _ = sender.send(Bytes::from_static(b"the rest")).await;
            });
            http::Response::new(larder::http::body::boxed(body))
        }
    })
    .await;
    let larder = start_larder(&one_upstream(&origin.url(), "")).await;
    let mut sender = connect(&larder.addr.to_string()).await;
    let request = Request::get("/download")
        .header("host", "x")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = tokio::time::timeout(DEADLINE, sender.send_request(request))
        .await
        .expect("the head arrives while the origin still holds the rest")
        .expect("response");
    let mut body = response.into_body();
    let first = tokio::time::timeout(DEADLINE, body.frame())
        .await
        .expect("the first chunk arrives while the origin still holds the rest")
        .expect("a frame")
        .expect("no error");
    assert_eq!(
        first.into_data().ok(),
        Some(Bytes::from_static(b"first chunk;"))
    );
    release.notify_one();
    let rest = body.collect().await.expect("rest").to_bytes();
    assert_eq!(rest, Bytes::from_static(b"the rest"));
    larder.stop().await;
}

#[tokio::test]
async fn uploads_stream_before_the_client_has_finished() {
    let (first_seen_tx, first_seen_rx) = oneshot::channel::<Bytes>();
    let first_seen = Arc::new(Mutex::new(Some(first_seen_tx)));
    let origin = start_origin(move |request| {
        let first_seen = first_seen.clone();
        async move {
            let mut body = request.into_body();
            let mut total = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(data) = frame.data_ref() {
                    total += data.len();
                    if let Some(tx) = first_seen.lock().ok().and_then(|mut slot| slot.take()) {
                        let _ = tx.send(data.clone());
                    }
                }
            }
            respond(200, &[], format!("received {total}"))
        }
    })
    .await;
    let larder = start_larder(&one_upstream(&origin.url(), "")).await;
    let (body_tx, body) = channel_body();
    let mut sender = connect(&larder.addr.to_string()).await;
    let request = Request::post("/upload")
        .header("host", "x")
        .body(body)
        .expect("request");
    let response = tokio::spawn(async move { sender.send_request(request).await });
    body_tx
        .send(Bytes::from_static(b"part one"))
        .await
        .expect("send the first part");
    let seen = tokio::time::timeout(DEADLINE, first_seen_rx)
        .await
        .expect("the origin sees the first part while the client still holds the rest")
        .expect("first part");
    assert!(b"part one".starts_with(&seen), "{seen:?}");
    body_tx
        .send(Bytes::from_static(b" and part two"))
        .await
        .expect("send the rest");
    drop(body_tx);
    let response = response.await.expect("task").expect("response");
    let text = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(text, Bytes::from_static(b"received 21"));
    larder.stop().await;
}

/// An origin answering `name` on every path but `/healthz`, which answers
/// with the status in `health`.
async fn checked_origin(name: &'static str, health: Arc<AtomicU16>) -> common::Origin {
    start_origin(move |request| {
        let health = Arc::clone(&health);
        async move {
            if request.uri().path() == "/healthz" {
                respond(health.load(Ordering::SeqCst), &[], "probe")
            } else {
                respond(200, &[], name)
            }
        }
    })
    .await
}

/// The `larder_upstream_healthy` gauge of `server` from `/metrics`.
async fn healthy_gauge(larder: &common::Larder, server: &common::Origin) -> Option<String> {
    let metrics = larder.admin("GET", "/metrics", "").await.text();
    let server = format!("server=\"{}\"", server.addr);
    metrics
        .lines()
        .find(|line| line.starts_with("larder_upstream_healthy{") && line.contains(&server))
        .and_then(|line| line.rsplit(' ').next())
        .map(str::to_string)
}

/// The answers to `n` requests.
async fn answers(larder: &common::Larder, n: usize) -> Vec<String> {
    let mut answers = Vec::new();
    for _ in 0..n {
        let reply = get(&larder.url("/")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        answers.push(reply.text());
    }
    answers
}

#[tokio::test]
async fn a_server_failing_its_health_check_gets_no_traffic_until_it_passes_again() {
    let (a_health, b_health) = (Arc::new(AtomicU16::new(200)), Arc::new(AtomicU16::new(200)));
    let a = checked_origin("a", Arc::clone(&a_health)).await;
    let b = checked_origin("b", Arc::clone(&b_health)).await;
    let yaml = format!(
        "{}upstreams:\n  app:\n    servers: [\"{}\", \"{}\"]\n    health_check:\n      path: /healthz\n      interval: 50ms\n      timeout: 50ms\n      unhealthy_threshold: 2\n      healthy_threshold: 2\nroutes:\n  - upstream: app\n",
        common::ADMIN_BLOCK,
        a.url(),
        b.url()
    );
    let larder = start_larder(&yaml).await;
    let both = answers(&larder, 6).await;
    assert!(
        both.contains(&"a".to_string()) && both.contains(&"b".to_string()),
        "{both:?}"
    );

    a_health.store(503, Ordering::SeqCst);
    common::eventually("a to be judged unhealthy", async || {
        healthy_gauge(&larder, &a).await.as_deref() == Some("0")
    })
    .await;
    assert_eq!(healthy_gauge(&larder, &b).await.as_deref(), Some("1"));
    let status = larder.admin("GET", "/upstreams", "").await.json();
    let servers = status["upstreams"]["app"]["servers"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("no servers in {status}"));
    let healthy_of = |origin: &common::Origin| {
        servers
            .iter()
            .find(|server| server["server"] == origin.addr.to_string())
            .map(|server| server["healthy"].clone())
    };
    assert_eq!(healthy_of(&a), Some(serde_json::json!(false)), "{status}");
    assert_eq!(healthy_of(&b), Some(serde_json::json!(true)), "{status}");
    assert_eq!(answers(&larder, 8).await, vec!["b"; 8], "no traffic to a");

    a_health.store(200, Ordering::SeqCst);
    common::eventually("a to pass again", async || {
        healthy_gauge(&larder, &a).await.as_deref() == Some("1")
    })
    .await;
    let back = answers(&larder, 6).await;
    assert!(
        back.contains(&"a".to_string()),
        "a back in rotation: {back:?}"
    );

    // Every server unhealthy: requests still try them (fail open).
    a_health.store(500, Ordering::SeqCst);
    b_health.store(500, Ordering::SeqCst);
    common::eventually("both to be judged unhealthy", async || {
        healthy_gauge(&larder, &a).await.as_deref() == Some("0")
            && healthy_gauge(&larder, &b).await.as_deref() == Some("0")
    })
    .await;
    let open = answers(&larder, 4).await;
    assert!(
        open.iter().all(|answer| answer == "a" || answer == "b"),
        "{open:?}"
    );
    larder.stop().await;
}

#[test]
fn health_check_settings_out_of_range_are_load_errors_at_their_key() {
    let upstream = |check: &str| {
        format!(
            "upstreams:\n  app:\n    servers: [\"http://127.0.0.1:9\"]\n    health_check:\n{check}routes:\n  - upstream: app\n"
        )
    };
    for (check, key) in [
        ("      path: healthz\n", "upstreams.app.health_check.path"),
        (
            "      path: /h\n      interval: 1s\n      timeout: 2s\n",
            "upstreams.app.health_check.timeout",
        ),
        (
            "      path: /h\n      unhealthy_threshold: 0\n",
            "upstreams.app.health_check.unhealthy_threshold",
        ),
        (
            "      path: /h\n      expected_statuses: [200, 1000]\n",
            "upstreams.app.health_check.expected_statuses[1]",
        ),
    ] {
        let yaml = upstream(check);
        let errors = larder::config::load_str(&yaml, "t.yml").expect_err(&yaml).0;
        assert!(
            errors.iter().any(|error| error.path == key),
            "{key}: {errors:#?}"
        );
    }
    let config =
        larder::config::load_str(&upstream("      path: /healthz\n"), "t.yml").expect("defaults");
    let check = config.upstreams["app"]
        .health_check
        .clone()
        .expect("a check");
    assert_eq!(check.interval, Duration::from_secs(5));
    assert_eq!((check.healthy_threshold, check.unhealthy_threshold), (2, 3));
}

/// An origin answering `name` to everything, counting what it saw.
async fn named_origin(name: &'static str) -> common::Origin {
    start_origin(move |_| async move { respond(200, &[], name) }).await
}

#[tokio::test]
async fn weighted_round_robin_gives_each_server_its_share_in_turn() {
    let a = named_origin("a").await;
    let b = named_origin("b").await;
    let yaml = format!(
        "upstreams:\n  app:\n    servers: [\"{}\", {{ url: \"{}\", weight: 3 }}]\nroutes:\n  - upstream: app\n",
        a.url(),
        b.url()
    );
    let larder = start_larder(&yaml).await;
    let got = answers(&larder, 40).await;
    assert_eq!(got.iter().filter(|answer| *answer == "a").count(), 10);
    assert_eq!(got.iter().filter(|answer| *answer == "b").count(), 30);
    assert_eq!(&got[..4], ["b", "a", "b", "b"], "spread, not in runs");
    larder.stop().await;
}

#[tokio::test]
async fn least_requests_sends_nothing_more_to_a_server_busy_with_one() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = Arc::clone(&gate);
    let slow = start_origin(move |_| {
        let held = Arc::clone(&held);
        async move {
            held.acquire().await.expect("gate").forget();
            respond(200, &[], "slow")
        }
    })
    .await;
    let fast = named_origin("fast").await;
    let yaml = format!(
        "upstreams:\n  app:\n    servers: [\"{}\", \"{}\"]\n    balance: least_requests\nroutes:\n  - upstream: app\n",
        slow.url(),
        fast.url()
    );
    let larder = start_larder(&yaml).await;
    let mut pending = Vec::new();
    for n in 0..16 {
        let url = larder.url(&format!("/{n}"));
        let request = tokio::spawn(async move { get(&url).await });
        // Either the slow server holds it or the answer is back: the next
        // pick sees every count settled.
        let slow_before = slow.hits();
        wait_until("the request to be held or answered", || {
            slow.hits() > slow_before || request.is_finished()
        })
        .await;
        pending.push(request);
    }
    assert!(
        slow.hits() <= 1,
        "a second request went to the busy server: {}",
        slow.hits()
    );
    assert_eq!(slow.hits() + fast.hits(), 16);
    gate.add_permits(16);
    for request in pending {
        assert_eq!(request.await.expect("request").status, 200);
    }
    larder.stop().await;
}

#[tokio::test]
async fn consistent_hash_keeps_a_key_on_its_server_when_a_server_is_added() {
    let origins = [
        named_origin("a").await,
        named_origin("b").await,
        named_origin("c").await,
        named_origin("d").await,
    ];
    let front = |count: usize| {
        let servers: Vec<String> = origins[..count]
            .iter()
            .map(|origin| format!("\"{}\"", origin.url()))
            .collect();
        format!(
            "upstreams:\n  app:\n    servers: [{}]\n    balance: consistent_hash\nroutes:\n  - upstream: app\n",
            servers.join(", ")
        )
    };
    // Two instances, as a tier of Larders would be: the second with one
    // server more.
    let three = start_larder(&front(3)).await;
    let four = start_larder(&front(4)).await;
    let mut per_server = std::collections::BTreeMap::<String, usize>::new();
    // The same site name through both (the hash covers host, path, query).
    let site = [("host", "site.test")];
    for key in 0..90 {
        let path = format!("/object/{key}");
        let before = get_with(&three.url(&path), &site).await.text();
        let again = get_with(&three.url(&path), &site).await.text();
        assert_eq!(again, before, "{path} moved");
        let after = get_with(&four.url(&path), &site).await.text();
        assert!(
            after == before || after == "d",
            "{path} moved from {before} to {after}, not to the new server"
        );
        *per_server.entry(before).or_default() += 1;
    }
    assert_eq!(per_server.len(), 3, "{per_server:?}");
    assert!(
        per_server.values().all(|&n| n >= 15),
        "spread: {per_server:?}"
    );
    three.stop().await;
    four.stop().await;
}

#[test]
fn a_weight_outside_1_to_100_is_a_load_error_at_its_key() {
    let yaml = "upstreams:\n  app:\n    servers: [{ url: \"http://127.0.0.1:9\", weight: 0 }]\n    balance: least_requests\nroutes:\n  - upstream: app\n";
    let errors = larder::config::load_str(yaml, "t.yml")
        .expect_err("weight 0")
        .0;
    assert!(
        errors
            .iter()
            .any(|error| error.path == "upstreams.app.servers[0].weight"),
        "{errors:#?}"
    );
    let unknown = yaml.replace("least_requests", "random");
    let errors = larder::config::load_str(&unknown, "t.yml")
        .expect_err("unknown policy")
        .0;
    assert!(
        errors
            .iter()
            .any(|error| error.path.starts_with("upstreams.app.balance")),
        "{errors:#?}"
    );
}

#[tokio::test]
async fn round_robin_spreads_requests_over_the_servers() {
    let first = start_origin(|_| async { respond(200, &[], "first") }).await;
    let second = start_origin(|_| async { respond(200, &[], "second") }).await;
    let yaml = format!(
        "upstreams:\n  app:\n    servers: [\"{}\", \"{}\"]\nroutes:\n  - upstream: app\n",
        first.url(),
        second.url()
    );
    let larder = start_larder(&yaml).await;
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(get(&larder.url("/")).await.text());
    }
    assert_eq!(first.hits(), 2);
    assert_eq!(second.hits(), 2);
    assert_ne!(answers[0], answers[1]);
    larder.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_the_request_in_flight() {
    let release = Arc::new(Notify::new());
    let origin_release = release.clone();
    let origin = start_origin(move |_| {
        let release = origin_release.clone();
        async move {
            release.notified().await;
            respond(200, &[], "finished")
        }
    })
    .await;
    let yaml = format!(
        "server:\n  drain_timeout: 10s\n{}",
        one_upstream(&origin.url(), "")
    );
    let larder = start_larder(&yaml).await;
    let addr = larder.addr;
    let url = larder.url("/slow");
    let in_flight = tokio::spawn(async move { get(&url).await });
    wait_until("the request to reach the origin", || origin.hits() == 1).await;

    let stopping = tokio::spawn(larder.stop());
    let deadline = Instant::now() + DEADLINE;
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "new connections still accepted");
        tokio::task::yield_now().await;
    }
    assert!(!stopping.is_finished(), "stop returned before the drain");
    release.notify_one();
    let reply = in_flight.await.expect("request task");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "finished");
    tokio::time::timeout(DEADLINE, stopping)
        .await
        .expect("stop returns once drained")
        .expect("stop task");
}

#[tokio::test]
async fn connections_on_every_serving_thread_are_served_on_keep_alive_and_drained() {
    const CONNECTIONS: usize = 9;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let origin_gate = gate.clone();
    let origin = start_origin(move |request| {
        let gate = origin_gate.clone();
        async move {
            if request.uri().path() == "/held" {
                gate.acquire().await.expect("gate open").forget();
            }
            respond(200, &[], format!("done {}", request.uri().path()))
        }
    })
    .await;
    let yaml = format!(
        "server:\n  threads: 3\n  drain_timeout: 10s\n{}",
        one_upstream(&origin.url(), "")
    );
    let larder = start_larder(&yaml).await;
    let authority = larder.addr.to_string();
    let mut held = Vec::new();
    for n in 0..CONNECTIONS {
        // Connections go to the three threads in turn: each thread serves
        // three of them, several requests each.
        let mut sender = connect::<Full<Bytes>>(&authority).await;
        for turn in 0..3 {
            let path = format!("/c{n}/r{turn}");
            let request = Request::get(&path)
                .header("host", "larder.test")
                .body(Full::new(Bytes::new()))
                .expect("request");
            let response = sender.send_request(request).await.expect("answer");
            assert_eq!(response.status(), 200);
            let body = response.into_body().collect().await.expect("body");
            assert_eq!(body.to_bytes(), format!("done {path}").as_bytes());
        }
        held.push(tokio::spawn(async move {
            let request = Request::get("/held")
                .header("host", "larder.test")
                .body(Full::new(Bytes::new()))
                .expect("request");
            let response = sender.send_request(request).await.expect("answer");
            let status = response.status();
            let body = response.into_body().collect().await.expect("body");
            (status, body.to_bytes())
        }));
    }
    wait_until(
        "every connection's held request to reach the origin",
        || origin.hits() == CONNECTIONS * 4,
    )
    .await;
    let addr = larder.addr;
    let stopping = tokio::spawn(larder.stop());
    let deadline = Instant::now() + DEADLINE;
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "new connections still accepted");
        tokio::task::yield_now().await;
    }
    // Stop waits for the connections on every thread.
    assert!(!stopping.is_finished(), "stop returned before the drain");
    gate.add_permits(CONNECTIONS);
    for task in held {
        let (status, body) = task.await.expect("held request");
        assert_eq!(status, 200);
        assert_eq!(body, "done /held".as_bytes());
    }
    tokio::time::timeout(DEADLINE, stopping)
        .await
        .expect("stop returns once drained")
        .expect("stop task");
}

/// A drain closes a keep-alive connection that sits between requests at
/// once: it neither waits for the idle timeout nor holds shutdown until
/// the drain timeout.
#[tokio::test]
async fn shutdown_closes_idle_keep_alive_connections_at_once() {
    let origin = start_origin(|_| async { respond(200, &[], "ok") }).await;
    let yaml = format!(
        "server:\n  drain_timeout: 60s\n  idle_timeout: 10m\n{}",
        one_upstream(&origin.url(), "")
    );
    let larder = start_larder(&yaml).await;
    use common::raw_http::{parse_responses, read_responses};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A raw socket, so that the test sees the server's close itself (a read
    // returns end-of-file) rather than a client library's view of it.
    let mut client = tokio::net::TcpStream::connect(larder.addr)
        .await
        .expect("connect");
    client
        .write_all(b"GET /one HTTP/1.1\r\nhost: larder.test\r\n\r\n")
        .await
        .expect("send request");
    let mut answer = Vec::new();
    read_responses(&mut client, &mut answer, 1).await;
    assert_eq!(parse_responses(&answer, false)[0].status, 200);

    tokio::time::timeout(DEADLINE, larder.stop())
        .await
        .expect("stop returns without waiting out the drain timeout for an idle connection");
    let after_stop = tokio::time::timeout(DEADLINE, client.read(&mut [0u8; 64]))
        .await
        .expect("the idle connection was closed by the drain, not left open");
    assert!(
        matches!(after_stop, Ok(0) | Err(_)),
        "nothing but the close follows the answer: {after_stop:?}"
    );
}

#[tokio::test]
async fn websocket_upgrade_is_tunnelled_both_ways() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let origin_addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    if message.is_text() || message.is_binary() {
                        let _ = socket.send(message).await;
                    }
                }
            });
        }
    });
    let larder = start_larder(&one_upstream(&format!("http://{origin_addr}"), "")).await;
    let stream = tokio::net::TcpStream::connect(larder.addr)
        .await
        .expect("connect");
    let (mut socket, response) =
        tokio_tungstenite::client_async(format!("ws://{}/echo", larder.addr), stream)
            .await
            .expect("websocket handshake through larder");
    assert_eq!(response.status(), 101);
    for text in ["hello", "again"] {
        socket
            .send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .expect("send");
        let echoed = tokio::time::timeout(DEADLINE, socket.next())
            .await
            .expect("echo in time")
            .expect("a message")
            .expect("no error");
        assert_eq!(echoed.into_text().expect("text").as_str(), text);
    }
    let _ = socket.close(None).await;
    larder.stop().await;
}

#[tokio::test]
async fn https_upstream_is_trusted_through_ca_file() {
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
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .expect("server tls config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let origin_addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(respond(200, &[], "over tls"))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    let yaml = format!(
        "upstreams:\n  secure:\n    servers: [\"https://127.0.0.1:{}\"]\n    ca_file: {}\nroutes:\n  - upstream: secure\n",
        origin_addr.port(),
        ca_path.display()
    );
    let larder = start_larder(&yaml).await;
    let reply = get(&larder.url("/")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "over tls");
    larder.stop().await;

    // Without the CA the same upstream is refused: the certificate is not trusted.
    let untrusted = format!(
        "upstreams:\n  secure:\n    servers: [\"https://127.0.0.1:{}\"]\nroutes:\n  - upstream: secure\n",
        origin_addr.port()
    );
    let larder = start_larder(&untrusted).await;
    assert_problem(&get(&larder.url("/")).await, 502);
    larder.stop().await;
}

#[tokio::test]
async fn h2c_with_prior_knowledge_is_served() {
    let origin = echo_origin().await;
    let larder = start_larder(&one_upstream(&origin.url(), "")).await;
    let stream = tokio::net::TcpStream::connect(larder.addr)
        .await
        .expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2c handshake");
    tokio::spawn(connection);
    let request = Request::get("http://h2.example/over/h2?x=1")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = sender.send_request(request).await.expect("h2 response");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(text.starts_with("GET /over/h2?x=1\n"), "{text}");
    assert!(text.contains("host: h2.example"), "{text}");
    larder.stop().await;
}

#[tokio::test]
async fn cachepump_mode_serves_sources_by_key_and_health() {
    let larder = start_larder(
        "sources:\n  hello:\n    rule: '@every 1h'\n    static: { value: 'hi there' }\n",
    )
    .await;
    let health = get(&larder.url("/health")).await;
    assert_eq!(health.json()["status"], "ok");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reply = get(&larder.url("/?key=hello")).await;
        if reply.status == 200 {
            assert_eq!(reply.text(), "hi there");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "source never served: {}",
            reply.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&larder.url("/?key=nope")).await.status, 404);
    larder.stop().await;
}

#[tokio::test]
async fn reload_swaps_routes_without_dropping_the_listener() {
    let before = start_origin(|_| async { respond(200, &[], "before") }).await;
    let after = start_origin(|_| async { respond(200, &[], "after") }).await;
    let larder = start_larder(&one_upstream(&before.url(), "")).await;
    assert_eq!(get(&larder.url("/")).await.text(), "before");
    larder
        .reload(&one_upstream(&after.url(), ""))
        .await
        .expect("reload");
    assert_eq!(get(&larder.url("/")).await.text(), "after");
    let broken = "routes:\n  - upstream: missing\n";
    assert!(larder.reload(broken).await.is_err());
    assert_eq!(
        get(&larder.url("/")).await.text(),
        "after",
        "a failed reload keeps the running config"
    );
    larder.stop().await;
}

/// The real binary: a config file edit and SIGHUP reload it (a broken file
/// keeps the running config), SIGTERM drains and exits 0.
#[tokio::test]
async fn the_binary_reloads_its_file_and_exits_0_on_sigterm() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("larder.yml");
    let config = |value: &str| {
        format!(
            "listen: 127.0.0.1:0\nlog: {{ format: json }}\nroutes:\n  - match: {{ path_prefix: /hello }}\n    source: greeting\nsources:\n  greeting:\n    rule: '@every 1h'\n    static: {{ value: {value} }}\n"
        )
    };
    std::fs::write(&path, config("one")).expect("write config");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_larder"))
        .arg("-c")
        .arg(&path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the larder binary");
    let stderr = child.stderr.take().expect("stderr");
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            // Shown only when the test fails.
            eprintln!("larder stderr: {line}");
            let _ = lines_tx.send(line);
        }
    });
    let mut next_event = async |message: &str| -> serde_json::Value {
        loop {
            let line = tokio::time::timeout(DEADLINE, lines.recv())
                .await
                .unwrap_or_else(|_| panic!("no {message:?} log line in time"))
                .unwrap_or_else(|| panic!("larder exited before logging {message:?}"));
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if event["message"] == message {
                return event;
            }
        }
    };
    let started = next_event("larder started").await;
    let addr = started["listen"]
        .as_str()
        .expect("listen field")
        .to_string();
    let url = format!("http://{addr}/hello");
    wait_for_body(&url, "one").await;
    // Edits before the watcher is in place would go unnoticed.
    next_event("watching the config file; SIGHUP also reloads it").await;

    std::fs::write(&path, config("two")).expect("rewrite config");
    wait_for_body(&url, "two").await;

    std::fs::write(&path, "routes: [\n").expect("break config");
    let pid = child.id().to_string();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("send SIGHUP");
    assert!(hup.success());
    next_event("config not reloaded; the running config stays").await;
    assert_eq!(get(&url).await.text(), "two");

    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("send SIGTERM");
    assert!(term.success());
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("larder did not exit after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}");
}

/// Polls `url` until it answers 200 with `expected`.
async fn wait_for_body(url: &str, expected: &str) {
    common::eventually(format!("{url} to answer {expected:?}"), async || {
        let reply = get(url).await;
        reply.status == 200 && reply.text() == expected
    })
    .await;
}

#[tokio::test]
async fn an_upstream_pointing_back_at_larder_is_cut_off_with_508() {
    let origin = echo_origin().await;
    let larder = start_larder(&one_upstream(&origin.url(), "")).await;
    let own_url = format!("http://{}", larder.addr);
    larder
        .reload(&one_upstream(&own_url, ""))
        .await
        .expect("reload");
    let reply = get(&larder.url("/loop")).await;
    assert_problem(&reply, 508);
    assert_eq!(origin.hits(), 0);
    larder.stop().await;
}

/// A port on 127.0.0.1 that refuses connections for as long as the returned
/// socket lives. The socket is bound but never listens: a port that was
/// merely closed could be handed to another test's origin running at the
/// same time, which would then answer in the dead server's place.
fn closed_port() -> (tokio::net::TcpSocket, std::net::SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("loopback"))
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    (socket, addr)
}

#[tokio::test]
async fn a_refused_server_is_retried_elsewhere_then_skipped_for_a_while() {
    let live = start_origin(|_| async { respond(200, &[], "live") }).await;
    let (_held, dead) = closed_port();
    let yaml = format!(
        "upstreams:\n  skipping:\n    servers: [\"http://{dead}\", \"{}\"]\nroutes:\n  - upstream: skipping\n",
        live.url()
    );
    let larder = start_larder(&yaml).await;
    for _ in 0..4 {
        let reply = get(&larder.url("/")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.text(), "live");
    }
    assert_eq!(live.hits(), 4);
    let metrics = larder::telemetry::render_metrics();
    assert!(
        metrics.contains(r#"larder_upstream_errors_total{upstream="skipping",kind="connect"} 1"#),
        "the dead server is tried once, then skipped:\n{metrics}"
    );
    larder.stop().await;
}

#[tokio::test]
async fn a_request_with_a_body_is_not_replayed_on_another_server() {
    let live = start_origin(|_| async { respond(200, &[], "live") }).await;
    let (_held, dead) = closed_port();
    let yaml = format!(
        "upstreams:\n  app:\n    servers: [\"http://{dead}\", \"{}\"]\nroutes:\n  - upstream: app\n",
        live.url()
    );
    let larder = start_larder(&yaml).await;
    // Round robin starts at the dead server: the body may be gone, so 502.
    let first = send("POST", &larder.url("/"), &[], "body").await;
    assert_problem(&first, 502);
    assert_eq!(live.hits(), 0);
    // The dead server is now skipped.
    let second = send("POST", &larder.url("/"), &[], "body").await;
    assert_eq!(second.status, 200);
    assert_eq!(live.hits(), 1);
    larder.stop().await;
}

#[tokio::test]
async fn shutdown_gives_up_on_requests_after_the_drain_timeout() {
    let origin = start_origin(|_| async {
        // Far longer than the drain timeout; the test never waits for it.
        tokio::time::sleep(Duration::from_secs(60)).await;
        respond(200, &[], "never")
    })
    .await;
    let yaml = format!(
        "server:\n  drain_timeout: 200ms\n{}",
        one_upstream(&origin.url(), "")
    );
    let larder = start_larder(&yaml).await;
    let mut sender = connect(&larder.addr.to_string()).await;
    let request = Request::get("/stuck")
        .header("host", "x")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let in_flight = tokio::spawn(async move { sender.send_request(request).await });
    wait_until("the request to reach the origin", || origin.hits() == 1).await;
    tokio::time::timeout(DEADLINE, larder.stop())
        .await
        .expect("stop returns once the drain timeout has passed");
    let outcome = tokio::time::timeout(DEADLINE, in_flight)
        .await
        .expect("the stuck request ends")
        .expect("task");
    assert!(
        outcome.is_err(),
        "the connection is closed, not answered: {outcome:?}"
    );
}

#[tokio::test]
async fn the_response_timeout_counts_from_the_end_of_a_slow_upload() {
    let origin = start_origin(|request| async move {
        let slow_answer = request.uri().path() == "/slow-answer";
        let body = request
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        if slow_answer {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        respond(200, &[], format!("received {}", body.len()))
    })
    .await;
    let yaml = format!(
        "upstreams:\n  app:\n    servers: [\"{}\"]\n    timeout: 300ms\nroutes:\n  - upstream: app\n",
        origin.url()
    );
    let larder = start_larder(&yaml).await;
    let (body_tx, body) = channel_body();
    let mut sender = connect(&larder.addr.to_string()).await;
    let request = Request::post("/upload")
        .header("host", "x")
        .body(body)
        .expect("request");
    let response = tokio::spawn(async move { sender.send_request(request).await });
    body_tx
        .send(Bytes::from_static(b"slow "))
        .await
        .expect("first part");
    // The client itself is slow: twice the upstream timeout between parts.
    tokio::time::sleep(Duration::from_millis(600)).await;
    body_tx
        .send(Bytes::from_static(b"upload"))
        .await
        .expect("second part");
    drop(body_tx);
    let response = response.await.expect("task").expect("response");
    assert_eq!(response.status(), 200);
    let text = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(text, Bytes::from_static(b"received 11"));

    // Once the body is sent, an upstream slower than the timeout is still 504.
    let reply = send("POST", &larder.url("/slow-answer"), &[], "quick body").await;
    assert_problem(&reply, 504);
    larder.stop().await;
}

// Upstream keep-alive: connections are pooled, and only clean ones go back.

/// A bare TCP origin for behaviour a well-behaved HTTP server would not show:
/// each accepted connection goes to `serve` in its own task. Returns the
/// address and a count of the connections accepted so far.
async fn tcp_origin<F, Fut>(serve: F) -> (std::net::SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(stream));
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn one_upstream_connection_serves_many_requests_of_every_shape() {
    let origin = start_origin(|request| async move {
        match request.uri().path() {
            "/not-modified" => respond(304, &[("etag", "\"v1\"")], ""),
            "/no-content" => respond(204, &[], ""),
            "/chunked" => {
                let (sender, body) = channel_body();
                tokio::spawn(async move {
                    let _ = sender.send(Bytes::from_static(b"chunk one,")).await;
                    let _ = sender.send(Bytes::from_static(b"chunk two")).await;
                });
                http::Response::new(larder::http::body::boxed(body))
            }
            _ => respond(200, &[], "sized body"),
        }
    })
    .await;
    let larder = start_larder(&one_upstream(
        &origin.url(),
        "    cache: { enabled: false }\n",
    ))
    .await;
    for round in 0..3 {
        let sized = get(&larder.url("/sized")).await;
        assert_eq!(
            (sized.status.as_u16(), sized.text().as_str()),
            (200, "sized body"),
            "round {round}"
        );
        let head = send("HEAD", &larder.url("/sized"), &[], Bytes::new()).await;
        assert_eq!(head.status, 200);
        assert!(head.body.is_empty());
        let not_modified =
            get_with(&larder.url("/not-modified"), &[("if-none-match", "\"v1\"")]).await;
        assert_eq!(not_modified.status, 304);
        assert_eq!(get(&larder.url("/no-content")).await.status, 204);
        let chunked = get(&larder.url("/chunked")).await;
        assert_eq!(chunked.text(), "chunk one,chunk two");
    }
    assert_eq!(origin.hits(), 15);
    assert_eq!(
        origin.connections(),
        1,
        "every response was read to its end, so the one connection went back to the pool each time"
    );
    larder.stop().await;
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_is_not_reused() {
    // An origin that closes each connection 100 ms after accepting it,
    // without saying so in the response (no `Connection: close`).
    let (addr, accepted) = tcp_origin(|stream| async move {
        let service = hyper::service::service_fn(|_request| async {
            Ok::<_, std::convert::Infallible>(respond(200, &[], "fresh"))
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let _ = tokio::time::timeout(Duration::from_millis(100), connection).await;
    })
    .await;
    let larder = start_larder(&one_upstream(&format!("http://{addr}"), "")).await;
    for _ in 0..3 {
        let reply = get(&larder.url("/")).await;
        assert_eq!(
            (reply.status.as_u16(), reply.text().as_str()),
            (200, "fresh")
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    larder.stop().await;
}

#[tokio::test]
async fn a_response_the_client_abandoned_midway_does_not_leave_its_connection_in_the_pool() {
    let origin = start_origin(|request| async move {
        if request.uri().path() == "/endless" {
            let (sender, body) = channel_body();
            tokio::spawn(async move {
                while sender
                    .send(Bytes::from(vec![b'x'; 16 * 1024]))
                    .await
                    .is_ok()
                {}
            });
            return http::Response::new(larder::http::body::boxed(body));
        }
        respond(200, &[], "small")
    })
    .await;
    let larder = start_larder(&one_upstream(&origin.url(), "")).await;
    let mut sender = connect(&larder.addr.to_string()).await;
    let request = Request::get("/endless")
        .header("host", "x")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = tokio::time::timeout(DEADLINE, sender.send_request(request))
        .await
        .expect("head in time")
        .expect("response");
    let mut body = response.into_body();
    tokio::time::timeout(DEADLINE, body.frame())
        .await
        .expect("a first chunk in time")
        .expect("a frame")
        .expect("no error");
    drop(body);
    drop(sender);
    // The half-read connection is closed, not pooled: the next request gets
    // its own answer on a new connection, not the rest of the endless body.
    let reply = tokio::time::timeout(DEADLINE, get(&larder.url("/small")))
        .await
        .expect("the next request is answered");
    assert_eq!(
        (reply.status.as_u16(), reply.text().as_str()),
        (200, "small")
    );
    assert_eq!(origin.connections(), 2);
    larder.stop().await;
}

/// An origin that answers the first request on each connection and closes
/// the connection, unanswered, when a second one arrives: the server's idle
/// close crossing a request, made deterministic.
async fn answer_once_per_connection(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    let mut answered = false;
    loop {
        let Ok(read) = stream.read(&mut buffer).await else {
            return;
        };
        if read == 0 {
            return;
        }
        seen.extend_from_slice(&buffer[..read]);
        if !seen.windows(4).any(|window| window == b"\r\n\r\n") {
            continue;
        }
        if answered {
            return; // the second request: close without a word
        }
        answered = true;
        seen.clear();
        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nanswered";
        if stream.write_all(reply).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn an_idempotent_request_crossed_by_an_idle_close_is_sent_again_on_a_new_connection() {
    let (addr, accepted) = tcp_origin(answer_once_per_connection).await;
    let larder = start_larder(&one_upstream(
        &format!("http://{addr}"),
        "    cache: { enabled: false }\n",
    ))
    .await;
    let first = get(&larder.url("/a")).await;
    assert_eq!(
        (first.status.as_u16(), first.text().as_str()),
        (200, "answered")
    );
    // Idle long enough for a close by the server to be a plausible race.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let second = get(&larder.url("/b")).await;
    assert_eq!(
        (second.status.as_u16(), second.text().as_str()),
        (200, "answered"),
        "the GET went out again on a new connection"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    // A POST is not idempotent: it is not sent twice, the client gets the 502.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let post = send("POST", &larder.url("/c"), &[], Bytes::new()).await;
    assert_problem(&post, 502);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    larder.stop().await;
}

#[tokio::test]
async fn the_connect_timeout_covers_an_https_servers_handshake() {
    // Accepts TCP connections and never answers the TLS handshake.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            open.push(stream);
        }
    });
    let yaml = format!(
        "upstreams:\n  app:\n    servers: [\"https://{addr}\"]\n    connect_timeout: 200ms\n    timeout: 60s\nroutes:\n  - upstream: app\n"
    );
    let larder = start_larder(&yaml).await;
    let reply = tokio::time::timeout(DEADLINE, get(&larder.url("/")))
        .await
        .expect("an answer within the connect timeout, not the 60 s response timeout");
    assert_eq!(reply.status, 504, "{}", reply.text());
    larder.stop().await;
    held.abort();
}

#[tokio::test]
async fn a_server_failing_requests_in_a_row_is_ejected_and_one_that_recovers_between_is_not() {
    let failing = start_origin(|_| async { respond(503, &[], "overloaded") }).await;
    let flaky = start_numbered_origin(|_, n| async move {
        // Every other answer fails: never two in a row.
        if n % 2 == 1 {
            respond(502, &[], "bad gateway")
        } else {
            respond(200, &[], "flaky ok")
        }
    })
    .await;
    let good = start_origin(|_| async { respond(200, &[], "good") }).await;
    let yaml = format!(
        "upstreams:\n  ejecting:\n    servers: [\"{}\", \"{}\", \"{}\"]\n    ejection: {{ consecutive_failures: 2, duration: 60s }}\nroutes:\n  - upstream: ejecting\n",
        failing.url(),
        flaky.url(),
        good.url()
    );
    let larder = start_larder(&yaml).await;
    let mut answers = Vec::new();
    for _ in 0..30 {
        answers.push(get(&larder.url("/")).await.status.as_u16());
    }
    // Round robin: the failing server's first two requests fail, then it
    // is out for a minute; the flaky one never fails twice in a row.
    assert_eq!(failing.hits(), 2, "{answers:?}");
    assert_eq!(answers.iter().filter(|status| **status == 503).count(), 2);
    assert!(
        flaky.hits() >= 13,
        "flaky got {}: {answers:?}",
        flaky.hits()
    );
    let status = larder::telemetry::render_metrics();
    assert!(
        status
            .contains(r#"larder_upstream_ejections_total{upstream="ejecting",reason="failing"} 1"#),
        "{status}"
    );
    larder.stop().await;
}
