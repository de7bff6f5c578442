//! The shared cache as a client sees it: real hyper origins that count
//! requests, a real HTTP listener in front of `Cache::serve`, real clients.
//!
//! The front listener here plays the proxy's part (ClientAddr, an `Origin`
//! that forwards over a real connection with a head timeout) so every RFC 9111
//! rule is checked on the wire: status, body, `Age`, `Cache-Status`, and how
//! often the origin was asked.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use larder::body::{self, Body};
use larder::cache::{Cache, Origin};
use larder::config::units::{ByteSize, HumanDuration};
use larder::config::{CacheConfig, PurgeConfig, RouteCache};
use larder::error::ProxyError;
use larder::proxy::ClientAddr;
use tokio::net::TcpListener;
use tokio::sync::Notify;

mod common;

// ---------------------------------------------------------------- harness

/// A hyper origin on 127.0.0.1:0 counting requests and keeping their headers.
struct TestOrigin {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl TestOrigin {
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn last_request(&self) -> HeaderMap {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_default()
    }

    /// Stops accepting: later connections are refused.
    fn stop(&self) {
        self.accept.abort();
    }
}

async fn start_origin<F, Fut>(handler: F) -> TestOrigin
where
    F: Fn(Request<Incoming>, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = Arc::new(handler);
    let (hits2, seen2) = (Arc::clone(&hits), Arc::clone(&seen));
    let accept = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (handler, hits, seen) =
                (Arc::clone(&handler), Arc::clone(&hits2), Arc::clone(&seen2));
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let n = hits.fetch_add(1, Ordering::SeqCst) + 1;
                    seen.lock().unwrap().push(request.headers().clone());
                    let response = handler(request, n);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    TestOrigin {
        addr,
        hits,
        seen,
        accept,
    }
}

/// Forwards over a fresh connection each time (so a stopped origin refuses),
/// with a head timeout, mapping failures as the proxy does.
struct Forward {
    origin: SocketAddr,
    client: Client<HttpConnector, Body>,
    timeout: Duration,
}

impl Origin for Forward {
    fn fetch(
        &self,
        request: Request<Body>,
    ) -> BoxFuture<'static, Result<Response<Body>, ProxyError>> {
        let (mut parts, body) = request.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        parts.uri = format!("http://{}{}", self.origin, path).parse().unwrap();
        let client = self.client.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let sent = client.request(Request::from_parts(parts, body));
            match tokio::time::timeout(timeout, sent).await {
                Err(_) => Err(ProxyError::UpstreamTimeout {
                    upstream: "test".into(),
                    timeout_ms: timeout.as_millis() as u64,
                }),
                Ok(Err(error)) => Err(ProxyError::UpstreamUnavailable {
                    upstream: "test".into(),
                    reason: error.to_string(),
                }),
                Ok(Ok(response)) => Ok(response.map(body::boxed)),
            }
        })
    }
}

/// A listener in front of the cache, as the proxy would run it.
struct Front {
    addr: SocketAddr,
    cache: Arc<Cache>,
}

impl Front {
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

fn route() -> RouteCache {
    RouteCache {
        enabled: true,
        ..Default::default()
    }
}

async fn start_front(origin: &TestOrigin, route: RouteCache, config: CacheConfig) -> Front {
    let cache = Cache::new(&config);
    let forward: Arc<dyn Origin> = Arc::new(Forward {
        origin: origin.addr,
        client: Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http(),
        timeout: Duration::from_secs(1),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let route = Arc::new(route);
    let served = Arc::clone(&cache);
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let (cache, route, forward) = (
                Arc::clone(&served),
                Arc::clone(&route),
                Arc::clone(&forward),
            );
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let (cache, route, forward) =
                        (Arc::clone(&cache), Arc::clone(&route), Arc::clone(&forward));
                    async move {
                        let mut request = request.map(body::boxed);
                        request.extensions_mut().insert(ClientAddr(peer));
                        let response = match cache.serve(&route, request, forward).await {
                            Ok(response) => response,
                            Err(error) => error.into_response(),
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Front { addr, cache }
}

async fn setup<F, Fut>(handler: F) -> (TestOrigin, Front)
where
    F: Fn(Request<Incoming>, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let origin = start_origin(handler).await;
    let front = start_front(&origin, route(), CacheConfig::default()).await;
    (origin, front)
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    fn cache_status(&self) -> &str {
        self.header("cache-status").unwrap_or("")
    }
    fn age(&self) -> u64 {
        self.header("age")
            .and_then(|a| a.parse().ok())
            .expect("an Age header")
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn send(method: &str, url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = client()
        .request(builder.body(body::empty()).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

async fn get(url: &str) -> Reply {
    send("GET", url, &[]).await
}

async fn get_with(url: &str, headers: &[(&str, &str)]) -> Reply {
    send("GET", url, headers).await
}

fn reply(status: u16, headers: &[(&str, &str)], body_text: &str) -> Response<Body> {
    let mut response = Response::new(body::full(body_text.to_string()));
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    for (name, value) in headers {
        response.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    response
}

/// An origin answering every request the same way, numbering its bodies.
async fn fixed(
    status: u16,
    headers: &'static [(&'static str, &'static str)],
) -> (TestOrigin, Front) {
    setup(move |_, n| async move { reply(status, headers, &format!("body {n}")) }).await
}

fn http_date(offset_secs: i64) -> String {
    let now = SystemTime::now();
    let time = if offset_secs >= 0 {
        now + Duration::from_secs(offset_secs as u64)
    } else {
        now - Duration::from_secs(offset_secs.unsigned_abs())
    };
    httpdate::fmt_http_date(time)
}

/// Polls `check` until it holds, for at most 10 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- freshness

#[tokio::test]
async fn max_age_response_is_served_from_cache() {
    let (origin, front) = fixed(200, &[("cache-control", "max-age=60")]).await;
    let first = get(&front.url("/a")).await;
    assert_eq!(first.text(), "body 1");
    assert!(
        first.cache_status().contains("fwd=uri-miss"),
        "{}",
        first.cache_status()
    );
    assert!(first.cache_status().contains("stored"));
    let second = get(&front.url("/a")).await;
    assert_eq!(second.text(), "body 1");
    assert!(
        second.cache_status().starts_with("larder; hit; ttl="),
        "{}",
        second.cache_status()
    );
    assert!(second.header("age").is_some());
    assert_eq!(origin.hits(), 1);
}

#[tokio::test]
async fn s_maxage_wins_over_max_age_for_a_shared_cache() {
    let (origin, front) = fixed(200, &[("cache-control", "max-age=0, s-maxage=60")]).await;
    get(&front.url("/s")).await;
    let second = get(&front.url("/s")).await;
    assert!(second.cache_status().contains("hit"));
    assert_eq!(origin.hits(), 1);
}

#[tokio::test]
async fn max_age_wins_over_expires() {
    let (origin, front) = setup(|_, n| async move {
        reply(
            200,
            &[
                ("cache-control", "max-age=0"),
                ("expires", &http_date(3600)),
                ("etag", "\"e\""),
            ],
            &format!("b{n}"),
        )
    })
    .await;
    get(&front.url("/me")).await;
    let second = get(&front.url("/me")).await;
    assert_eq!(origin.hits(), 2, "max-age=0 must override a future Expires");
    assert!(second.cache_status().contains("fwd=stale"));
}

#[tokio::test]
async fn expires_minus_date_gives_freshness() {
    let (origin, front) = setup(|_, n| async move {
        reply(
            200,
            &[("date", &http_date(0)), ("expires", &http_date(120))],
            &format!("b{n}"),
        )
    })
    .await;
    get(&front.url("/e")).await;
    let second = get(&front.url("/e")).await;
    assert_eq!(second.text(), "b1");
    assert_eq!(origin.hits(), 1);
}

#[tokio::test]
async fn invalid_expires_is_stored_but_already_stale() {
    let (origin, front) = fixed(200, &[("expires", "0"), ("etag", "\"x\"")]).await;
    get(&front.url("/e0")).await;
    let second = get(&front.url("/e0")).await;
    assert_eq!(origin.hits(), 2);
    assert_eq!(origin.last_request().get("if-none-match").unwrap(), "\"x\"");
    assert!(second.cache_status().contains("fwd=stale"));
}

#[tokio::test]
async fn last_modified_gives_heuristic_freshness() {
    let (origin, front) = setup(|_, n| async move {
        reply(
            200,
            &[("last-modified", &http_date(-10 * 86400))],
            &format!("b{n}"),
        )
    })
    .await;
    get(&front.url("/h")).await;
    let second = get(&front.url("/h")).await;
    assert!(second.cache_status().contains("hit"));
    assert_eq!(origin.hits(), 1);
}

#[tokio::test]
async fn heuristics_apply_only_to_heuristically_cacheable_statuses() {
    let (origin, front) = setup(|_, n| async move {
        reply(
            302,
            &[
                ("location", "/x"),
                ("last-modified", &http_date(-10 * 86400)),
            ],
            &format!("b{n}"),
        )
    })
    .await;
    get(&front.url("/r")).await;
    get(&front.url("/r")).await;
    assert_eq!(origin.hits(), 2);
}

#[tokio::test]
async fn response_without_freshness_or_validator_is_not_stored() {
    let (origin, front) = fixed(200, &[]).await;
    get(&front.url("/n")).await;
    let second = get(&front.url("/n")).await;
    assert_eq!(origin.hits(), 2);
    assert!(!second.cache_status().contains("stored"));
}

#[tokio::test]
async fn cacheable_by_default_statuses_are_stored_with_explicit_freshness() {
    for status in [203u16, 204, 300, 301, 308, 404, 405, 410, 414, 501] {
        let (origin, front) =
            setup(move |_, _| async move { reply(status, &[("cache-control", "max-age=60")], "") })
                .await;
        get(&front.url("/st")).await;
        let second = get(&front.url("/st")).await;
        assert_eq!(second.status.as_u16(), status);
        assert_eq!(origin.hits(), 1, "status {status} should be cached");
    }
}

#[tokio::test]
async fn partial_content_is_never_stored() {
    let (origin, front) = fixed(
        206,
        &[
            ("cache-control", "max-age=60"),
            ("content-range", "bytes 0-5/10"),
        ],
    )
    .await;
    get(&front.url("/p")).await;
    get(&front.url("/p")).await;
    assert_eq!(origin.hits(), 2);
}

#[tokio::test]
async fn entry_goes_stale_after_max_age() {
    let (origin, front) = fixed(200, &[("cache-control", "max-age=1")]).await;
    get(&front.url("/t")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while origin.hits() < 2 {
        assert!(Instant::now() < deadline, "entry never expired");
        get(&front.url("/t")).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------- Age and Date

#[tokio::test]
async fn age_from_upstream_is_carried_and_grows() {
    let (origin, front) = fixed(200, &[("cache-control", "max-age=600"), ("age", "10")]).await;
    let first = get(&front.url("/age")).await;
    assert!(first.age() >= 10, "age {}", first.age());
    let second = get(&front.url("/age")).await;
    assert!(second.age() >= 10);
    assert_eq!(origin.hits(), 1);
}

#[tokio::test]
async fn old_date_counts_as_apparent_age() {
    let (_origin, front) = setup(|_, _| async move {
        reply(
            200,
            &[("cache-control", "max-age=600"), ("date", &http_date(-100))],
            "x",
        )
    })
    .await;
    get(&front.url("/d")).await;
    let hit = get(&front.url("/d")).await;
    assert!(hit.age() >= 99, "age {}", hit.age());
}

#[tokio::test]
async fn age_past_max_age_makes_the_response_stale() {
    let (origin, front) = fixed(200, &[("cache-control", "max-age=60"), ("age", "120")]).await;
    get(&front.url("/old")).await;
    get(&front.url("/old")).await;
    assert_eq!(origin.hits(), 2);
}

#[tokio::test]
async fn date_is_added_when_the_origin_sends_none() {
    let (_origin, front) = setup(|_, _| async move {
        let mut response = reply(200, &[("cache-control", "max-age=60")], "x");
        response.headers_mut().remove("date");
        response
    })
    .await;
    get(&front.url("/nd")).await;
    let hit = get(&front.url("/nd")).await;
    assert!(hit.header("date").is_some());
}

// ---------------------------------------------------------------- response directives

#[tokio::test]
async fn no_store_response_is_not_stored() {
    let (origin, front) = fixed(200, &[("cache-control", "no-store, max-age=60")]).await;
    get(&front.url("/ns")).await;
    get(&front.url("/ns")).await;
    assert_eq!(origin.hits(), 2);
}

#[tokio::test]
async fn private_response_is_not_stored_by_a_shared_cache() {
    let (origin, front) = fixed(200, &[("cache-control", "private, max-age=60")]).await;
    get(&front.url("/pr")).await;
    get(&front.url("/pr")).await;
    assert_eq!(origin.hits(), 2);
    // The qualified form keeps only the named fields out (RFC 9111 5.2.2.7).
    let (origin, front) = fixed(
        200,
        &[
            ("cache-control", "private=\"x-user\", max-age=60"),
            ("x-user", "alice"),
        ],
    )
    .await;
    let first = get(&front.url("/pr")).await;
    assert_eq!(first.header("x-user"), Some("alice"));
    let hit = get(&front.url("/pr")).await;
    assert_eq!(origin.hits(), 1);
    assert_eq!(hit.header("x-user"), None);
}

#[tokio::test]
async fn no_cache_response_is_revalidated_on_every_use() {
    let (origin, front) = setup(|request, n| async move {
        if request
            .headers()
            .get("if-none-match")
            .is_some_and(|v| v == "\"v1\"")
        {
            return reply(304, &[("etag", "\"v1\"")], "");
        }
        reply(
            200,
            &[
                ("cache-control", "no-cache, max-age=60"),
                ("etag", "\"v1\""),
            ],
            &format!("b{n}"),
        )
    })
    .await;
    get(&front.url("/nc")).await;
    let second = get(&front.url("/nc")).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.text(), "b1");
    assert_eq!(origin.hits(), 2);
    assert!(
        second.cache_status().contains("fwd-status=304"),
        "{}",
        second.cache_status()
    );
}

#[tokio::test]
async fn set_cookie_responses_are_stored_only_when_public() {
    let (origin, front) = fixed(
        200,
        &[("cache-control", "max-age=60"), ("set-cookie", "a=b")],
    )
    .await;
    get(&front.url("/c")).await;
    get(&front.url("/c")).await;
    assert_eq!(origin.hits(), 2);
    let (origin, front) = fixed(
        200,
        &[
            ("cache-control", "public, max-age=60"),
            ("set-cookie", "a=b"),
        ],
    )
    .await;
    get(&front.url("/c")).await;
    get(&front.url("/c")).await;
    assert_eq!(origin.hits(), 1);
}

#[tokio::test]
async fn must_revalidate_answers_504_when_the_origin_is_gone() {
    let (origin, front) = fixed(
        200,
        &[
            (
                "cache-control",
                "max-age=1, must-revalidate, stale-if-error=60",
            ),
            ("etag", "\"m\""),
        ],
    )
    .await;
    get(&front.url("/mr")).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    origin.stop();
    let reply = get(&front.url("/mr")).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test]
async fn proxy_revalidate_forbids_serving_stale() {
    let (origin, front) = fixed(
        200,
        &[
            ("cache-control", "max-age=1, proxy-revalidate"),
            ("etag", "\"p\""),
        ],
    )
    .await;
    get(&front.url("/pv")).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let reply = get_with(&front.url("/pv"), &[("cache-control", "max-stale=60")]).await;
    assert_eq!(origin.hits(), 2);
    assert_eq!(reply.status, StatusCode::OK);
}

// ---------------------------------------------------------------- request directives

#[tokio::test]
async fn request_no_cache_forwards_and_may_store() {
    let (origin, front) = fixed(200, &[("cache-control", "max-age=60")]).await;
    get(&front.url("/rq")).await;
    let forced = get_with(&front.url("/rq"), &[("cache-control", "no-cache")]).await;
    assert_eq!(forced.text(), "body 2");
    assert!(forced.cache_status().contains("fwd=request"));
    let after = get(&front.url("/rq")).await;
    assert_eq!(
        after.text(),
        "body 2",
        "the forced response replaces the stored one"
    );
    assert_eq!(origin.hits(), 2);
}

#[tokio::test]
async fn pragma_no_cache_acts_as_no_cache_without_cache_control() {
    let (origin, front) = fixed(200, &[("cache-control", "max-age=60")]).await;
    get(&front.url("/pg")).await;
    get_with(&front.url("/pg"), &[("pragma", "no-cache")]).await;
    assert_eq!(origin.hits(), 2);
}

#[tokio::test]
async fn request_no_store_is_not_stored() {
    let (origin, front) = fixed(200, &[("cache-control", "max-age=60")]).await;
    get_with(&front.url("/rns"), &[("cache-control", "no-store")]).await;
    get(&front.url("/rns")).await;
    assert_eq!(origin.hits(), 2);
}

#[tokio::test]
async fn request_max_age_and_min_fresh_limit_reuse() {
    let (origin, front) = fixed(200, &[("cache-control", "max-age=60"), ("age", "30")]).await;
    get(&front.url("/ma")).await;
    get_with(&front.url("/ma"), &[("cache-control", "max-age=10")]).await;
    assert_eq!(origin.hits(), 2, "max-age=10 refuses a 30 s old response");
    get_with(&front.url("/ma"), &[("cache-control", "min-fresh=50")]).await;
    assert_eq!(
        origin.hits(),
        3,
        "min-fresh=50 refuses 30 s of remaining freshness"
    );
    let ok = get_with(&front.url("/ma"), &[("cache-control", "max-age=100")]).await;
    assert!(ok.cache_status().contains("hit"));
    assert_eq!(origin.hits(), 3);
}

#[tokio::test]
async fn max_stale_accepts_stale_responses() {
    let (origin, front) = fixed(200, &[("cache-control", "max-age=1")]).await;
    get(&front.url("/ms")).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let stale = get_with(&front.url("/ms"), &[("cache-control", "max-stale")]).await;
    assert_eq!(stale.text(), "body 1");
    assert!(
        stale.cache_status().contains("ttl=-"),
        "{}",
        stale.cache_status()
    );
    let bounded = get_with(&front.url("/ms"), &[("cache-control", "max-stale=100")]).await;
    assert_eq!(bounded.text(), "body 1");
    assert_eq!(origin.hits(), 1);
}

#[tokio::test]
async fn only_if_cached_answers_504_on_a_miss_and_200_on_a_hit() {
    let (origin, front) = fixed(200, &[("cache-control", "max-age=60")]).await;
    let miss = get_with(&front.url("/oic"), &[("cache-control", "only-if-cached")]).await;
    assert_eq!(miss.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(origin.hits(), 0);
    get(&front.url("/oic")).await;
    let hit = get_with(&front.url("/oic"), &[("cache-control", "only-if-cached")]).await;
    assert_eq!(hit.status, StatusCode::OK);
    assert_eq!(origin.hits(), 1);
}

// ---------------------------------------------------------------- Authorization

#[tokio::test]
async fn authorized_requests_are_not_stored_unless_the_response_allows() {
    let (origin, front) = fixed(200, &[("cache-control", "max-age=60")]).await;
    get_with(&front.url("/au"), &[("authorization", "Bearer a")]).await;
    get_with(&front.url("/au"), &[("authorization", "Bearer a")]).await;
    assert_eq!(origin.hits(), 2);
    let (origin, front) = fixed(200, &[("cache-control", "public, max-age=60")]).await;
    get_with(&front.url("/au"), &[("authorization", "Bearer a")]).await;
    get_with(&front.url("/au"), &[("authorization", "Bearer b")]).await;
    assert_eq!(origin.hits(), 1);
}

#[tokio::test]
async fn stored_response_is_not_reused_for_an_authorized_request_unless_allowed() {
    let (origin, front) = fixed(200, &[("cache-control", "max-age=60")]).await;
    get(&front.url("/au2")).await;
    get_with(&front.url("/au2"), &[("authorization", "Bearer a")]).await;
    assert_eq!(origin.hits(), 2);
}

// ---------------------------------------------------------------- Vary

#[tokio::test]
async fn vary_stores_one_variant_per_selecting_value() {
    let (origin, front) = setup(|request, _| async move {
        let encoding = request
            .headers()
            .get("accept-encoding")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        reply(
            200,
            &[("cache-control", "max-age=60"), ("vary", "Accept-Encoding")],
            &format!("for {encoding}"),
        )
    })
    .await;
    let gzip = get_with(&front.url("/v"), &[("accept-encoding", "gzip")]).await;
    let br = get_with(&front.url("/v"), &[("accept-encoding", "br")]).await;
    assert_eq!(
        (gzip.text().as_str(), br.text().as_str()),
        ("for gzip", "for br")
    );
    assert!(
        br.cache_status().contains("fwd=vary-miss"),
        "{}",
        br.cache_status()
    );
    let again = get_with(&front.url("/v"), &[("accept-encoding", " GZIP ")]).await;
    assert_eq!(again.text(), "for gzip");
    assert!(again.cache_status().contains("hit"));
    let absent = get(&front.url("/v")).await;
    assert_eq!(absent.text(), "for ");
    assert_eq!(origin.hits(), 3);
}

#[tokio::test]
async fn vary_values_are_normalized_before_comparison() {
    let (origin, front) = fixed(
        200,
        &[("cache-control", "max-age=60"), ("vary", "accept-language")],
    )
    .await;
    get_with(&front.url("/vn"), &[("accept-language", "en-US,  fr")]).await;
    get_with(&front.url("/vn"), &[("accept-language", "en-us , fr")]).await;
    assert_eq!(origin.hits(), 1);
}

#[tokio::test]
async fn vary_star_is_never_stored() {
    let (origin, front) = fixed(200, &[("cache-control", "max-age=60"), ("vary", "*")]).await;
    get(&front.url("/vs")).await;
    get(&front.url("/vs")).await;
    assert_eq!(origin.hits(), 2);
}

// ---------------------------------------------------------------- validation

#[tokio::test]
async fn not_modified_updates_the_stored_headers() {
    let (origin, front) = setup(|request, n| async move {
        if request.headers().get("if-none-match").is_some() {
            return reply(
                304,
                &[
                    ("etag", "\"v1\""),
                    ("x-version", "2"),
                    ("cache-control", "max-age=60"),
                ],
                "",
            );
        }
        reply(
            200,
            &[
                ("etag", "\"v1\""),
                ("x-version", "1"),
                ("cache-control", "max-age=1"),
            ],
            &format!("body {n}"),
        )
    })
    .await;
    get(&front.url("/304")).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let revalidated = get(&front.url("/304")).await;
    assert_eq!(revalidated.status, StatusCode::OK);
    assert_eq!(revalidated.text(), "body 1");
    assert_eq!(revalidated.header("x-version"), Some("2"));
    assert!(
        revalidated
            .cache_status()
            .contains("fwd=stale; fwd-status=304"),
        "{}",
        revalidated.cache_status()
    );
    let hit = get(&front.url("/304")).await;
    assert_eq!(hit.header("x-version"), Some("2"));
    assert!(hit.cache_status().contains("hit"));
    assert_eq!(origin.hits(), 2);
}

#[tokio::test]
async fn last_modified_is_revalidated_with_if_modified_since() {
    let modified: &'static str = Box::leak(http_date(-86400 * 100).into_boxed_str());
    let (origin, front) = setup(move |request, n| async move {
        if request.headers().get("if-modified-since").is_some() {
            return reply(304, &[], "");
        }
        reply(
            200,
            &[("last-modified", modified), ("cache-control", "max-age=0")],
            &format!("body {n}"),
        )
    })
    .await;
    get(&front.url("/ims")).await;
    let second = get(&front.url("/ims")).await;
    assert_eq!(second.text(), "body 1");
    assert_eq!(
        origin.last_request().get("if-modified-since").unwrap(),
        modified
    );
}

#[tokio::test]
async fn client_conditionals_are_answered_from_a_fresh_entry() {
    let (origin, front) = fixed(
        200,
        &[("cache-control", "max-age=60"), ("etag", "W/\"tag\"")],
    )
    .await;
    let miss = get_with(&front.url("/cond"), &[("if-none-match", "\"tag\"")]).await;
    assert_eq!(
        miss.status,
        StatusCode::NOT_MODIFIED,
        "conditional answered after a fill"
    );
    assert!(
        origin.last_request().get("if-none-match").is_none(),
        "the fill asks for a full response"
    );
    let hit = get_with(
        &front.url("/cond"),
        &[("if-none-match", "\"other\", W/\"tag\"")],
    )
    .await;
    assert_eq!(hit.status, StatusCode::NOT_MODIFIED);
    assert_eq!(hit.header("etag"), Some("W/\"tag\""));
    assert!(hit.header("cache-control").is_some());
    let full = get_with(&front.url("/cond"), &[("if-none-match", "\"other\"")]).await;
    assert_eq!(full.status, StatusCode::OK);
    assert_eq!(full.text(), "body 1");
    assert_eq!(origin.hits(), 1);
}

// ---------------------------------------------------------------- methods

#[tokio::test]
async fn head_is_answered_from_a_stored_get() {
    let (origin, front) = fixed(200, &[("cache-control", "max-age=60")]).await;
    get(&front.url("/hd")).await;
    let head = send("HEAD", &front.url("/hd"), &[]).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert!(head.cache_status().contains("hit"));
    assert_eq!(origin.hits(), 1);
}

#[tokio::test]
async fn head_miss_is_forwarded_and_not_stored() {
    let (origin, front) = fixed(200, &[("cache-control", "max-age=60")]).await;
    send("HEAD", &front.url("/hm"), &[]).await;
    let get_after = get(&front.url("/hm")).await;
    assert!(get_after.cache_status().contains("uri-miss"));
    assert_eq!(origin.hits(), 2);
}

#[tokio::test]
async fn unsafe_methods_invalidate_the_target_and_locations() {
    let (origin, front) = setup(|request, n| async move {
        if request.method() == http::Method::POST {
            return reply(
                201,
                &[
                    ("location", "/other"),
                    ("content-location", "http://elsewhere.example/x"),
                ],
                "made",
            );
        }
        reply(
            200,
            &[("cache-control", "max-age=60")],
            &format!("body {n}"),
        )
    })
    .await;
    get(&front.url("/target")).await;
    get(&front.url("/other")).await;
    let post = send("POST", &front.url("/target"), &[]).await;
    assert!(post.cache_status().contains("fwd=method"));
    let target = get(&front.url("/target")).await;
    let other = get(&front.url("/other")).await;
    assert!(target.cache_status().contains("uri-miss"));
    assert!(other.cache_status().contains("uri-miss"));
    assert_eq!(origin.hits(), 5);
}

#[tokio::test]
async fn failed_unsafe_requests_do_not_invalidate() {
    let (origin, front) = setup(|request, _| async move {
        if request.method() == http::Method::DELETE {
            return reply(500, &[], "no");
        }
        reply(200, &[("cache-control", "max-age=60")], "kept")
    })
    .await;
    get(&front.url("/keep")).await;
    send("DELETE", &front.url("/keep"), &[]).await;
    let after = get(&front.url("/keep")).await;
    assert!(after.cache_status().contains("hit"));
    assert_eq!(origin.hits(), 2);
}

#[tokio::test]
async fn range_requests_are_served_from_a_fresh_entry_and_otherwise_pass_through() {
    let (origin, front) = fixed(200, &[("cache-control", "max-age=60")]).await;
    let miss = get_with(&front.url("/rg"), &[("range", "bytes=0-1")]).await;
    assert!(miss.cache_status().contains("fwd=bypass"));
    get(&front.url("/rg")).await;
    let ranged = get_with(&front.url("/rg"), &[("range", "bytes=0-1")]).await;
    assert_eq!(ranged.status, 206);
    assert!(ranged.cache_status().contains("hit"));
    let several = get_with(&front.url("/rg"), &[("range", "bytes=0-1,3-4")]).await;
    assert!(several.cache_status().contains("fwd=bypass"));
    assert_eq!(origin.hits(), 3);
}

// ---------------------------------------------------------------- stale serving

#[tokio::test]
async fn stale_while_revalidate_answers_at_once_and_refreshes_once() {
    let (origin, front) = fixed(
        200,
        &[("cache-control", "max-age=1, stale-while-revalidate=60")],
    )
    .await;
    get(&front.url("/swr")).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let url = front.url("/swr");
    let replies = futures_util::future::join_all((0..10).map(|_| get(&url))).await;
    // Each answer comes from the cache at once: the stale copy, or (for a
    // request that arrived after the refresh landed) the refreshed one.
    let mut stale_answers = 0;
    for reply in &replies {
        assert!(
            reply.cache_status().contains("; hit; ttl="),
            "{}",
            reply.cache_status()
        );
        if reply.text() == "body 1" {
            assert!(
                reply.cache_status().contains("ttl=-"),
                "{}",
                reply.cache_status()
            );
            stale_answers += 1;
        } else {
            assert_eq!(reply.text(), "body 2");
        }
    }
    assert!(stale_answers > 0);
    eventually("the background refresh", || origin.hits() == 2).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fresh = get(&front.url("/swr")).await;
        if fresh.text() == "body 2" {
            break;
        }
        assert!(Instant::now() < deadline, "refresh never stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(origin.hits(), 2, "exactly one background refresh");
}

#[tokio::test]
async fn route_default_stale_while_revalidate_applies_when_the_origin_is_silent() {
    let origin = start_origin(|_, n| async move {
        reply(200, &[("cache-control", "max-age=1")], &format!("body {n}"))
    })
    .await;
    let mut route = route();
    route.stale_while_revalidate = Some(HumanDuration(Duration::from_secs(60)));
    let front = start_front(&origin, route, CacheConfig::default()).await;
    get(&front.url("/rswr")).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let stale = get(&front.url("/rswr")).await;
    assert_eq!(stale.text(), "body 1");
    eventually("the background refresh", || origin.hits() == 2).await;
}

async fn stale_if_error_with_failure(failing_status: u16) {
    let (origin, front) = setup(move |_, n| async move {
        if n == 1 {
            reply(
                200,
                &[("cache-control", "max-age=1, stale-if-error=60")],
                "good",
            )
        } else {
            reply(failing_status, &[], "bad")
        }
    })
    .await;
    get(&front.url("/sie")).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let stale = get(&front.url("/sie")).await;
    assert_eq!(stale.status, StatusCode::OK, "status {failing_status}");
    assert_eq!(stale.text(), "good");
    assert!(
        stale
            .cache_status()
            .contains(&format!("fwd-status={failing_status}")),
        "{}",
        stale.cache_status()
    );
    assert_eq!(origin.hits(), 2);
}

#[tokio::test]
async fn stale_if_error_covers_500() {
    stale_if_error_with_failure(500).await;
}

#[tokio::test]
async fn stale_if_error_covers_502() {
    stale_if_error_with_failure(502).await;
}

#[tokio::test]
async fn stale_if_error_covers_503() {
    stale_if_error_with_failure(503).await;
}

#[tokio::test]
async fn stale_if_error_covers_504() {
    stale_if_error_with_failure(504).await;
}

#[tokio::test]
async fn stale_if_error_covers_a_refused_connection() {
    let (origin, front) = fixed(200, &[("cache-control", "max-age=1, stale-if-error=60")]).await;
    get(&front.url("/sier")).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    origin.stop();
    let stale = get(&front.url("/sier")).await;
    assert_eq!(stale.status, StatusCode::OK);
    assert_eq!(stale.text(), "body 1");
    assert!(stale.cache_status().contains("detail=stale-if-error"));
}

#[tokio::test]
async fn stale_if_error_covers_an_upstream_timeout() {
    let (_origin, front) = setup(|_, n| async move {
        if n > 1 {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        reply(
            200,
            &[("cache-control", "max-age=1, stale-if-error=60")],
            &format!("body {n}"),
        )
    })
    .await;
    get(&front.url("/siet")).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let stale = get(&front.url("/siet")).await;
    assert_eq!(stale.status, StatusCode::OK);
    assert_eq!(stale.text(), "body 1");
}

#[tokio::test]
async fn stale_if_error_from_the_route_default() {
    let origin = start_origin(|_, n| async move {
        if n == 1 {
            reply(200, &[("cache-control", "max-age=1")], "good")
        } else {
            reply(503, &[], "bad")
        }
    })
    .await;
    let mut route = route();
    route.stale_if_error = Some(HumanDuration(Duration::from_secs(60)));
    let front = start_front(&origin, route, CacheConfig::default()).await;
    get(&front.url("/rsie")).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(get(&front.url("/rsie")).await.text(), "good");
}

#[tokio::test]
async fn stale_if_error_does_not_reach_past_its_window() {
    let (_origin, front) = setup(|_, n| async move {
        if n == 1 {
            reply(
                200,
                &[("cache-control", "max-age=1, stale-if-error=1")],
                "good",
            )
        } else {
            reply(503, &[], "bad")
        }
    })
    .await;
    get(&front.url("/siew")).await;
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let reply = get(&front.url("/siew")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.text(), "bad");
}

#[tokio::test]
async fn without_stale_if_error_the_client_gets_the_error() {
    let (_origin, front) = setup(|_, n| async move {
        if n == 1 {
            reply(200, &[("cache-control", "max-age=1")], "good")
        } else {
            reply(502, &[], "bad")
        }
    })
    .await;
    get(&front.url("/nosie")).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        get(&front.url("/nosie")).await.status,
        StatusCode::BAD_GATEWAY
    );
}

// ---------------------------------------------------------------- coalescing and streaming

/// An origin that holds every response until `release` is notified.
async fn gated(
    headers: &'static [(&'static str, &'static str)],
    release: Arc<Notify>,
) -> (TestOrigin, Front) {
    setup(move |_, n| {
        let release = Arc::clone(&release);
        async move {
            release.notified().await;
            release.notify_one();
            reply(200, headers, &format!("body {n}"))
        }
    })
    .await
}

#[tokio::test]
async fn concurrent_misses_make_one_upstream_request() {
    let release = Arc::new(Notify::new());
    let (origin, front) = gated(&[("cache-control", "max-age=60")], Arc::clone(&release)).await;
    let url: &'static str = Box::leak(front.url("/co").into_boxed_str());
    let requests: Vec<_> = (0..200).map(|_| tokio::spawn(get(url))).collect();
    eventually("the leader reaches the origin", || origin.hits() == 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    release.notify_one();
    let mut collapsed = 0;
    for request in requests {
        let reply = request.await.unwrap();
        assert_eq!(reply.text(), "body 1");
        if reply.cache_status().contains("collapsed") {
            collapsed += 1;
        }
    }
    assert_eq!(origin.hits(), 1);
    assert!(collapsed > 0, "some requests joined the flight");
}

#[tokio::test]
async fn private_responses_are_not_shared_between_waiters() {
    let release = Arc::new(Notify::new());
    let (origin, front) = gated(
        &[("cache-control", "private, max-age=60")],
        Arc::clone(&release),
    )
    .await;
    let url: &'static str = Box::leak(front.url("/priv").into_boxed_str());
    let requests: Vec<_> = (0..5).map(|_| tokio::spawn(get(url))).collect();
    eventually("the leader reaches the origin", || origin.hits() == 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    release.notify_one();
    let mut bodies = Vec::new();
    for request in requests {
        bodies.push(request.await.unwrap().text());
    }
    assert_eq!(origin.hits(), 5);
    bodies.sort();
    bodies.dedup();
    assert_eq!(
        bodies.len(),
        5,
        "each client got its own response: {bodies:?}"
    );
}

/// An origin streaming "first-" at once and "last" once `release` fires.
async fn two_part_origin(
    release: Arc<Notify>,
    headers: &'static [(&'static str, &'static str)],
) -> (TestOrigin, Front) {
    setup(move |_, _| {
        let release = Arc::clone(&release);
        async move {
            let (sender, receiver) = tokio::sync::mpsc::channel::<
                Result<http_body::Frame<Bytes>, larder::body::BoxError>,
            >(4);
            tokio::spawn(async move {
                let _ = sender
                    .send(Ok(http_body::Frame::data(Bytes::from_static(b"first-"))))
                    .await;
                release.notified().await;
                let _ = sender
                    .send(Ok(http_body::Frame::data(Bytes::from_static(b"last"))))
                    .await;
            });
            let stream = futures_util::stream::unfold(receiver, |mut r| async move {
                r.recv().await.map(|f| (f, r))
            });
            let mut response = Response::new(body::boxed(http_body_util::StreamBody::new(stream)));
            for (name, value) in headers {
                response.headers_mut().insert(*name, value.parse().unwrap());
            }
            response
        }
    })
    .await
}

async fn first_chunk(url: &str) -> (Bytes, Incoming) {
    let response = client()
        .request(Request::get(url).body(body::empty()).unwrap())
        .await
        .unwrap();
    let mut body = response.into_body();
    let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("first chunk in time")
        .unwrap()
        .unwrap();
    (frame.into_data().unwrap(), body)
}

async fn rest(mut body: Incoming) -> Result<Bytes, String> {
    let mut collected = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            collected.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(collected))
}

#[tokio::test]
async fn misses_stream_before_the_origin_finishes_and_waiters_share_the_stream() {
    let release = Arc::new(Notify::new());
    let (origin, front) =
        two_part_origin(Arc::clone(&release), &[("cache-control", "max-age=60")]).await;
    let (first, leader) = first_chunk(&front.url("/stream")).await;
    assert_eq!(first, "first-");
    let (waiter_first, waiter) = first_chunk(&front.url("/stream")).await;
    assert_eq!(
        waiter_first, "first-",
        "a late joiner replays from the start"
    );
    let (quitter_first, quitter) = first_chunk(&front.url("/stream")).await;
    assert_eq!(quitter_first, "first-");
    drop(quitter);
    release.notify_one();
    assert_eq!(rest(leader).await.unwrap(), "last");
    assert_eq!(rest(waiter).await.unwrap(), "last");
    let hit = get(&front.url("/stream")).await;
    assert_eq!(hit.text(), "first-last");
    assert!(hit.cache_status().contains("hit"));
    assert_eq!(origin.hits(), 1);
}

#[tokio::test]
async fn fill_continues_after_every_client_left_when_storable() {
    let release = Arc::new(Notify::new());
    let (origin, front) =
        two_part_origin(Arc::clone(&release), &[("cache-control", "max-age=60")]).await;
    let (_, body) = first_chunk(&front.url("/left")).await;
    drop(body);
    tokio::time::sleep(Duration::from_millis(100)).await;
    release.notify_one();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = get_with(&front.url("/left"), &[("cache-control", "only-if-cached")]).await;
        if reply.status == StatusCode::OK {
            assert_eq!(reply.text(), "first-last");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the abandoned fill was not completed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(origin.hits(), 1);
}

#[tokio::test]
async fn upstream_abort_mid_body_truncates_the_client_and_stores_nothing() {
    let (origin, front) = setup(|_, _| async move {
        // The head and first chunk go out before the origin dies.
        let stream = futures_util::stream::unfold(0, |step| async move {
            match step {
                0 => Some((
                    Ok(http_body::Frame::data(Bytes::from_static(b"partial"))),
                    1,
                )),
                1 => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Some((
                        Err::<http_body::Frame<Bytes>, larder::body::BoxError>(
                            "origin died".into(),
                        ),
                        2,
                    ))
                }
                _ => None,
            }
        });
        let mut response = Response::new(body::boxed(http_body_util::StreamBody::new(stream)));
        response
            .headers_mut()
            .insert("cache-control", "max-age=60".parse().unwrap());
        response
            .headers_mut()
            .insert("content-length", "100".parse().unwrap());
        response
    })
    .await;
    let response = client()
        .request(
            Request::get(front.url("/trunc"))
                .body(body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(
        rest(response.into_body()).await.is_err(),
        "the client must see the truncation"
    );
    let next = get_with(&front.url("/trunc"), &[("cache-control", "only-if-cached")]).await;
    assert_eq!(
        next.status,
        StatusCode::GATEWAY_TIMEOUT,
        "nothing was stored"
    );
    assert_eq!(origin.hits(), 1);
}

// ---------------------------------------------------------------- purge

#[tokio::test]
async fn purge_method_needs_configuration_and_an_allowed_client() {
    let (origin, front) = fixed(200, &[("cache-control", "max-age=60")]).await;
    get(&front.url("/pu")).await;
    assert_eq!(
        send("PURGE", &front.url("/pu"), &[]).await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );

    let mut denied = route();
    denied.purge = Some(PurgeConfig {
        allow: vec!["10.0.0.0/8".into()],
    });
    let front = start_front(&origin, denied, CacheConfig::default()).await;
    assert_eq!(
        send("PURGE", &front.url("/pu"), &[]).await.status,
        StatusCode::FORBIDDEN
    );

    let mut allowed = route();
    allowed.purge = Some(PurgeConfig {
        allow: vec!["127.0.0.1/32".into()],
    });
    let front = start_front(&origin, allowed, CacheConfig::default()).await;
    get(&front.url("/pu")).await;
    let purged = send("PURGE", &front.url("/pu"), &[]).await;
    assert_eq!(purged.status, StatusCode::OK);
    assert_eq!(purged.text(), r#"{"purged":1}"#);
    let after = get(&front.url("/pu")).await;
    assert!(after.cache_status().contains("uri-miss"));
}

#[tokio::test]
async fn purge_by_url_prefix_and_tag_removes_every_variant() {
    let (_origin, front) = setup(|request, _| async move {
        let tag = if request.uri().path().starts_with("/blog") {
            "blog posts"
        } else {
            "shop"
        };
        reply(
            200,
            &[
                ("cache-control", "max-age=60"),
                ("vary", "accept"),
                ("surrogate-key", tag),
            ],
            "x",
        )
    })
    .await;
    for path in ["/blog/1", "/blog/2", "/shop/1"] {
        get_with(&front.url(path), &[("accept", "a")]).await;
        get_with(&front.url(path), &[("accept", "b")]).await;
    }
    let host = front.addr.to_string();
    assert_eq!(front.cache.purge_url(&format!("http://{host}/blog/1")), 2);
    assert_eq!(front.cache.purge_tag("posts"), 2);
    assert_eq!(front.cache.purge_prefix("/shop/"), 2);
    let again = get_with(&front.url("/shop/1"), &[("accept", "a")]).await;
    assert!(again.cache_status().contains("uri-miss"));
}

// ---------------------------------------------------------------- size limits

#[tokio::test]
async fn objects_over_max_object_size_stream_through_uncached() {
    let origin = start_origin(|_, _| async move {
        reply(200, &[("cache-control", "max-age=60")], &"x".repeat(4096))
    })
    .await;
    let config = CacheConfig {
        max_object_size: ByteSize(1024),
        ..CacheConfig::default()
    };
    let front = start_front(&origin, route(), config).await;
    assert_eq!(get(&front.url("/big")).await.body.len(), 4096);
    assert_eq!(get(&front.url("/big")).await.body.len(), 4096);
    assert_eq!(origin.hits(), 2);
}

#[tokio::test]
async fn memory_stays_bounded_under_a_flood_of_keys() {
    let origin = start_origin(|_, _| async move {
        reply(
            200,
            &[("cache-control", "max-age=600")],
            &"y".repeat(16 * 1024),
        )
    })
    .await;
    let bound = 1024 * 1024;
    let config = CacheConfig {
        max_size: ByteSize(bound),
        ..CacheConfig::default()
    };
    let front = start_front(&origin, route(), config).await;
    for i in 0..500 {
        get(&front.url(&format!("/flood/{i}"))).await;
    }
    front.cache.run_pending_tasks();
    assert!(
        front.cache.weighted_size() <= bound,
        "{} > {bound}",
        front.cache.weighted_size()
    );
    assert!(front.cache.entry_count() * 16 * 1024 <= bound);
    assert!(
        front.cache.entry_count() > 10,
        "the cache still holds entries"
    );
}

#[tokio::test]
async fn a_purge_during_a_fill_is_not_undone_by_it() {
    let release = Arc::new(Notify::new());
    let (origin, front) =
        two_part_origin(Arc::clone(&release), &[("cache-control", "max-age=60")]).await;
    let (_, body) = first_chunk(&front.url("/racing")).await;
    front.cache.purge_url(&front.url("/racing"));
    release.notify_one();
    assert_eq!(rest(body).await.unwrap(), "last");
    let next = get_with(
        &front.url("/racing"),
        &[("cache-control", "only-if-cached")],
    )
    .await;
    assert_eq!(
        next.status,
        StatusCode::GATEWAY_TIMEOUT,
        "the purged response came back"
    );
    assert_eq!(origin.hits(), 1);
}

// ---------------------------------------------------------------- through the whole proxy

fn larder_yaml(upstream: &str, extra_route: &str) -> String {
    format!(
        "admin:\n  token: secret\nupstreams:\n  app:\n    servers: [\"{upstream}\"]\n    timeout: 2s\n\
         routes:\n  - upstream: app\n    cache:\n      enabled: true\n{extra_route}"
    )
}

#[tokio::test]
async fn larder_serves_hits_and_labels_them() {
    let origin = common::start_origin(|_| async move {
        common::respond(200, &[("cache-control", "max-age=60")], "hello")
    })
    .await;
    let larder = common::start_larder(&larder_yaml(&origin.url(), "")).await;
    let first = common::get(&larder.url("/hello")).await;
    assert!(
        first
            .header("cache-status")
            .unwrap_or("")
            .contains("fwd=uri-miss")
    );
    let second = common::get(&larder.url("/hello")).await;
    assert_eq!(second.text(), "hello");
    assert!(second.header("cache-status").unwrap_or("").contains("hit"));
    assert!(second.header("age").is_some());
    assert_eq!(origin.hits(), 1);
    larder.stop().await;
}

#[tokio::test]
async fn admin_purge_needs_the_token_and_removes_by_url_prefix_and_tag() {
    let origin = common::start_origin(|request| async move {
        let tag = if request.uri().path().starts_with("/news") {
            "news"
        } else {
            "other"
        };
        common::respond(
            200,
            &[("cache-control", "max-age=60"), ("cache-tag", tag)],
            "x",
        )
    })
    .await;
    let larder = common::start_larder(&larder_yaml(&origin.url(), "")).await;
    for path in ["/news/1", "/news/2", "/shop/1", "/shop/2"] {
        common::get(&larder.url(path)).await;
    }
    let purge = |body: String, token: Option<&'static str>| {
        let url = larder.admin_url("/purge");
        async move {
            let auth = token.map(|t| format!("Bearer {t}"));
            let mut headers = vec![("content-type", "application/json")];
            if let Some(auth) = &auth {
                headers.push(("authorization", auth.as_str()));
            }
            common::send("POST", &url, &headers, body).await
        }
    };
    let refused = purge(r#"{"tag":"news"}"#.to_string(), None).await;
    assert_eq!(refused.status, 401);
    let by_tag = purge(r#"{"tag":"news"}"#.to_string(), Some("secret")).await;
    assert_eq!(by_tag.json()["purged"], 2);
    let by_url = purge(
        format!(r#"{{"url":"{}"}}"#, larder.url("/shop/1")),
        Some("secret"),
    )
    .await;
    assert_eq!(by_url.json()["purged"], 1);
    let by_prefix = purge(r#"{"prefix":"/shop/"}"#.to_string(), Some("secret")).await;
    assert_eq!(by_prefix.json()["purged"], 1);
    for path in ["/news/1", "/shop/1", "/shop/2"] {
        let again = common::get(&larder.url(path)).await;
        assert!(
            again
                .header("cache-status")
                .unwrap_or("")
                .contains("uri-miss"),
            "{path}"
        );
    }
    larder.stop().await;
}

#[tokio::test]
async fn purge_method_through_larder_for_allowed_clients() {
    let origin = common::start_origin(|_| async move {
        common::respond(200, &[("cache-control", "max-age=60")], "x")
    })
    .await;
    let route = "      purge:\n        allow: [\"127.0.0.0/8\"]\n";
    let larder = common::start_larder(&larder_yaml(&origin.url(), route)).await;
    common::get(&larder.url("/p")).await;
    let purged = common::send("PURGE", &larder.url("/p"), &[], "").await;
    assert_eq!(purged.status, 200);
    assert_eq!(purged.json()["purged"], 1);
    common::get(&larder.url("/p")).await;
    assert_eq!(origin.hits(), 2);
    larder.stop().await;
}

#[tokio::test]
async fn stale_if_error_survives_a_reload_onto_a_dead_upstream() {
    let origin = common::start_origin(|_| async move {
        common::respond(
            200,
            &[("cache-control", "max-age=1, stale-if-error=60")],
            "kept",
        )
    })
    .await;
    let larder = common::start_larder(&larder_yaml(&origin.url(), "")).await;
    common::get(&larder.url("/sie")).await;
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    larder.reload(&larder_yaml(&dead_url, "")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let stale = common::get(&larder.url("/sie")).await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.text(), "kept");
    assert!(
        stale
            .header("cache-status")
            .unwrap_or("")
            .contains("stale-if-error")
    );
    larder.stop().await;
}

// ---------------------------------------------------------------- more sharing rules and keys

/// An origin sending "first-" and then nothing until its body is dropped,
/// which it records.
async fn origin_noticing_abandon(
    cache_control: &'static str,
) -> (TestOrigin, Arc<std::sync::atomic::AtomicBool>) {
    let upstream_gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen_gone = Arc::clone(&upstream_gone);
    let origin = start_origin(move |_, _| {
        let gone = Arc::clone(&seen_gone);
        async move {
            let (sender, receiver) = tokio::sync::mpsc::channel::<
                Result<http_body::Frame<Bytes>, larder::body::BoxError>,
            >(1);
            tokio::spawn(async move {
                let _ = sender
                    .send(Ok(http_body::Frame::data(Bytes::from_static(b"first-"))))
                    .await;
                sender.closed().await;
                gone.store(true, Ordering::SeqCst);
            });
            let stream = futures_util::stream::unfold(receiver, |mut r| async move {
                r.recv().await.map(|f| (f, r))
            });
            let mut response = Response::new(body::boxed(http_body_util::StreamBody::new(stream)));
            response
                .headers_mut()
                .insert("cache-control", cache_control.parse().unwrap());
            response
        }
    })
    .await;
    (origin, upstream_gone)
}

#[tokio::test]
async fn a_fill_that_outgrew_max_object_size_is_abandoned_when_its_last_client_leaves() {
    let (origin, upstream_gone) = origin_noticing_abandon("max-age=60").await;
    let config = CacheConfig {
        max_object_size: ByteSize(4),
        ..CacheConfig::default()
    };
    let front = start_front(&origin, route(), config).await;
    let (first, body) = first_chunk(&front.url("/abandon")).await;
    assert_eq!(first, "first-");
    assert!(!upstream_gone.load(Ordering::SeqCst));
    drop(body);
    eventually("the upstream body to be dropped", || {
        upstream_gone.load(Ordering::SeqCst)
    })
    .await;
}

#[tokio::test]
async fn an_unshared_response_is_dropped_upstream_when_its_client_leaves() {
    let (origin, upstream_gone) = origin_noticing_abandon("private").await;
    let front = start_front(&origin, route(), CacheConfig::default()).await;
    let (_, body) = first_chunk(&front.url("/abandon")).await;
    drop(body);
    eventually("the upstream body to be dropped", || {
        upstream_gone.load(Ordering::SeqCst)
    })
    .await;
}

#[tokio::test]
async fn waiters_with_other_vary_values_fetch_on_their_own() {
    let release = Arc::new(Notify::new());
    let gate = Arc::clone(&release);
    let (origin, front) = setup(move |request, _| {
        let gate = Arc::clone(&gate);
        async move {
            gate.notified().await;
            gate.notify_one();
            let language = request
                .headers()
                .get("accept-language")
                .map(|v| v.to_str().unwrap_or("").to_string())
                .unwrap_or_default();
            reply(
                200,
                &[("cache-control", "max-age=60"), ("vary", "accept-language")],
                &language,
            )
        }
    })
    .await;
    let url: &'static str = Box::leak(front.url("/lang").into_boxed_str());
    let english = tokio::spawn(get_with(url, &[("accept-language", "en")]));
    eventually("the leader reaches the origin", || origin.hits() == 1).await;
    let french = tokio::spawn(get_with(url, &[("accept-language", "fr")]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    release.notify_one();
    assert_eq!(english.await.unwrap().text(), "en");
    assert_eq!(french.await.unwrap().text(), "fr");
    assert_eq!(origin.hits(), 2);
}

#[tokio::test]
async fn route_key_rules_share_or_split_entries() {
    let origin = start_origin(|request, n| async move {
        let _ = request;
        reply(
            200,
            &[("cache-control", "max-age=60")],
            &format!("body {n}"),
        )
    })
    .await;
    let mut route = route();
    route.key.ignore_query = vec!["utm_source".into()];
    route.key.sort_query = true;
    route.key.headers = vec!["x-tenant".into()];
    let front = start_front(&origin, route, CacheConfig::default()).await;
    let blue = [("x-tenant", "blue")];
    get_with(&front.url("/k?b=2&a=1&utm_source=mail"), &blue).await;
    let same = get_with(&front.url("/k?a=1&b=2"), &blue).await;
    assert!(
        same.cache_status().contains("hit"),
        "{}",
        same.cache_status()
    );
    let other_tenant = get_with(&front.url("/k?a=1&b=2"), &[("x-tenant", "red")]).await;
    assert!(other_tenant.cache_status().contains("uri-miss"));
    assert_eq!(origin.hits(), 2);
    assert_eq!(front.cache.purge_url(&front.url("/k?a=1&b=2")), 2);
}

#[tokio::test]
async fn upstream_cache_status_members_are_kept_before_ours() {
    let (_origin, front) = fixed(
        200,
        &[
            ("cache-control", "max-age=60"),
            ("cache-status", "origin-cache; hit"),
        ],
    )
    .await;
    get(&front.url("/chain")).await;
    let hit = get(&front.url("/chain")).await;
    assert!(
        hit.cache_status()
            .starts_with("origin-cache; hit, larder; hit"),
        "{}",
        hit.cache_status()
    );
}

#[tokio::test]
async fn must_understand_stores_an_understood_status_despite_no_store() {
    let (origin, front) = fixed(
        200,
        &[("cache-control", "must-understand, no-store, max-age=60")],
    )
    .await;
    get(&front.url("/mu")).await;
    get(&front.url("/mu")).await;
    assert_eq!(origin.hits(), 1);
}

#[tokio::test]
async fn a_purge_of_another_url_does_not_stop_a_fill_from_storing() {
    let release = Arc::new(Notify::new());
    let (origin, front) =
        two_part_origin(Arc::clone(&release), &[("cache-control", "max-age=60")]).await;
    let (_, body) = first_chunk(&front.url("/kept")).await;
    front.cache.purge_url(&front.url("/unrelated"));
    release.notify_one();
    assert_eq!(rest(body).await.unwrap(), "last");
    let next = get_with(&front.url("/kept"), &[("cache-control", "only-if-cached")]).await;
    assert_eq!(next.status, StatusCode::OK);
    assert_eq!(origin.hits(), 1);
}

#[tokio::test]
async fn entries_survive_a_reload_that_resizes_the_cache() {
    let (origin, front) = fixed(200, &[("cache-control", "max-age=60")]).await;
    get(&front.url("/resize")).await;
    front.cache.apply(&CacheConfig {
        max_size: ByteSize(64 * 1024 * 1024),
        ..CacheConfig::default()
    });
    let hit = get(&front.url("/resize")).await;
    assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
    assert_eq!(origin.hits(), 1);
}

#[tokio::test]
async fn concurrent_requests_for_an_object_too_big_to_store_still_share_one_fetch() {
    let release = Arc::new(Notify::new());
    let gate = Arc::clone(&release);
    let origin = start_origin(move |_, _| {
        let gate = Arc::clone(&gate);
        async move {
            gate.notified().await;
            gate.notify_one();
            reply(200, &[("cache-control", "max-age=60")], &"z".repeat(4096))
        }
    })
    .await;
    let config = CacheConfig {
        max_object_size: ByteSize(1024),
        ..CacheConfig::default()
    };
    let front = start_front(&origin, route(), config).await;
    let url: &'static str = Box::leak(front.url("/big-herd").into_boxed_str());
    let requests: Vec<_> = (0..5).map(|_| tokio::spawn(get(url))).collect();
    eventually("the leader reaches the origin", || origin.hits() == 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    release.notify_one();
    for request in requests {
        let reply = request.await.unwrap();
        assert_eq!(reply.body.len(), 4096);
        assert!(
            !reply.cache_status().contains("stored"),
            "{}",
            reply.cache_status()
        );
    }
    assert_eq!(origin.hits(), 1);
    get(url).await;
    assert_eq!(origin.hits(), 2, "nothing was stored");
}

#[tokio::test]
async fn request_no_cache_revalidates_with_the_stored_validator() {
    let (origin, front) = setup(|request, n| async move {
        if request
            .headers()
            .get("if-none-match")
            .is_some_and(|v| v == "\"r1\"")
        {
            return reply(304, &[("etag", "\"r1\"")], "");
        }
        reply(
            200,
            &[("cache-control", "max-age=60"), ("etag", "\"r1\"")],
            &format!("body {n}"),
        )
    })
    .await;
    get(&front.url("/ccreq")).await;
    let validated = get_with(&front.url("/ccreq"), &[("cache-control", "no-cache")]).await;
    assert_eq!(validated.text(), "body 1");
    assert_eq!(
        origin.last_request().get("if-none-match").unwrap(),
        "\"r1\""
    );
    assert!(
        validated
            .cache_status()
            .contains("fwd=request; fwd-status=304"),
        "{}",
        validated.cache_status()
    );
    assert_eq!(origin.hits(), 2);
}

#[tokio::test]
async fn head_on_a_stale_entry_revalidates_it_with_a_get() {
    let methods = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&methods);
    let (_origin, front) = setup(move |request, n| {
        seen.lock().unwrap().push(request.method().to_string());
        async move { reply(200, &[("cache-control", "max-age=1")], &format!("body {n}")) }
    })
    .await;
    get(&front.url("/hs")).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let head = send("HEAD", &front.url("/hs"), &[]).await;
    assert!(head.body.is_empty());
    assert!(
        head.cache_status().contains("fwd=stale"),
        "{}",
        head.cache_status()
    );
    assert_eq!(*methods.lock().unwrap(), vec!["GET", "GET"]);
    // The GET fill behind the HEAD stored the new body (the next GET either
    // hits it or joins that fill while it commits).
    let refreshed = get(&front.url("/hs")).await;
    assert_eq!(refreshed.text(), "body 2");
    assert_eq!(methods.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn extreme_dates_and_ages_are_handled() {
    let (origin, front) = fixed(
        200,
        &[
            ("expires", "Fri, 31 Dec 9999 23:59:59 GMT"),
            ("date", "Mon, 01 Jan 0001 00:00:00 GMT"),
        ],
    )
    .await;
    get(&front.url("/far")).await;
    get(&front.url("/far")).await;
    let (aged, aged_front) = fixed(
        200,
        &[
            ("cache-control", "max-age=60"),
            ("age", "99999999999999999999999"),
        ],
    )
    .await;
    let reply = get(&aged_front.url("/aged")).await;
    assert_eq!(reply.status, StatusCode::OK);
    get(&aged_front.url("/aged")).await;
    assert_eq!(aged.hits(), 2, "an enormous Age makes the response stale");
    assert_eq!(
        origin.hits(),
        1,
        "an Expires in the year 9999 is simply fresh"
    );
}

#[tokio::test]
async fn a_304_for_another_representation_is_not_merged() {
    let (origin, front) = setup(|request, n| async move {
        if request.headers().contains_key("if-none-match") {
            return reply(
                304,
                &[("etag", "\"v2\""), ("cache-control", "max-age=60")],
                "",
            );
        }
        let etag = if n == 1 { "\"v1\"" } else { "\"v2\"" };
        reply(
            200,
            &[("etag", etag), ("cache-control", "max-age=1")],
            &format!("body {n}"),
        )
    })
    .await;
    get(&front.url("/mismatch")).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let reply = get(&front.url("/mismatch")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "body 3", "the full response, fetched again");
    assert_eq!(reply.header("etag"), Some("\"v2\""));
    assert_eq!(origin.hits(), 3);
}
