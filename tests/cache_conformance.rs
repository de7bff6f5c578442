//! RFC 9111 conformance of the shared cache, seen by a client of the whole
//! proxy: each case starts Larder with a cache-enabled route in front of a
//! real origin that answers from a script, then checks what the client got
//! and how many requests reached the origin.
//!
//! The cases follow what the http-tests "cache-tests" suite checks of a
//! shared cache, grouped by RFC section. Where that suite pauses for a
//! response to become stale, these cases send a `Date` in the past instead,
//! so nothing here sleeps.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::{Larder, Origin, Reply};
use http::{HeaderMap, Method, Response};
use larder::http::body::Body;

// ---------------------------------------------------------------- harness

/// What the origin saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    headers: HeaderMap,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn is_conditional(&self) -> bool {
        self.headers.contains_key("if-none-match") || self.headers.contains_key("if-modified-since")
    }
}

type Headers = Vec<(&'static str, String)>;

/// Larder with one cache-enabled route in front of a scripted origin.
struct Case {
    larder: Larder,
    origin: Origin,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Case {
    /// `script(n, request)` answers the origin's n-th request (from 0).
    async fn start<F>(script: F) -> Self
    where
        F: Fn(usize, &Seen) -> Response<Body> + Send + Sync + 'static,
    {
        Self::start_with("", script).await
    }

    /// As [`Case::start`], with extra YAML lines under the route's `cache:`.
    async fn start_with<F>(route_cache: &str, script: F) -> Self
    where
        F: Fn(usize, &Seen) -> Response<Body> + Send + Sync + 'static,
    {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = Arc::clone(&seen);
        let origin = common::start_origin(move |request| {
            let request = Seen {
                method: request.method().clone(),
                headers: request.headers().clone(),
            };
            let n = {
                let mut log = log.lock().unwrap();
                log.push(request.clone());
                log.len() - 1
            };
            let response = script(n, &request);
            async move { response }
        })
        .await;
        let larder = common::start_larder(&larder_yaml(&origin.url(), route_cache)).await;
        Self {
            larder,
            origin,
            seen,
        }
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        common::get_with(&self.larder.url(path), headers).await
    }

    async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        common::send(method, &self.larder.url(path), headers, "abc").await
    }

    fn hits(&self) -> usize {
        self.origin.hits()
    }

    /// The n-th request the origin saw.
    fn request(&self, n: usize) -> Seen {
        self.seen.lock().unwrap()[n].clone()
    }
}

fn larder_yaml(upstream: &str, route_cache: &str) -> String {
    format!(
        "upstreams:\n  app:\n    servers: [\"{upstream}\"]\n    timeout: 2s\n\
         routes:\n  - upstream: app\n    cache:\n      enabled: true\n{route_cache}"
    )
}

/// An HTTP-date `offset` seconds from now.
fn at(offset: i64) -> String {
    let now = SystemTime::now();
    let time = if offset >= 0 {
        now + Duration::from_secs(offset.unsigned_abs())
    } else {
        now - Duration::from_secs(offset.unsigned_abs())
    };
    httpdate::fmt_http_date(time)
}

/// `response n` as the body (none for 204 and 304), so a test can tell
/// which origin response a client received.
fn response(status: u16, headers: &[(&'static str, String)], n: usize) -> Response<Body> {
    let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let body = if status == 204 || status == 304 {
        Bytes::new()
    } else {
        Bytes::from(format!("response {n}"))
    };
    common::respond(status, &pairs, body)
}

/// The same response to every request.
fn always(status: u16, headers: Headers) -> impl Fn(usize, &Seen) -> Response<Body> {
    move |n, _| response(status, &headers, n)
}

/// `first` to the first request, `later` to every other one.
fn then(first: (u16, Headers), later: (u16, Headers)) -> impl Fn(usize, &Seen) -> Response<Body> {
    move |n, _| match n {
        0 => response(first.0, &first.1, n),
        _ => response(later.0, &later.1, n),
    }
}

/// A 304 to a conditional request, else `full`.
fn validating(
    status: u16,
    full: Headers,
    not_modified: Headers,
) -> impl Fn(usize, &Seen) -> Response<Body> {
    move |n, seen| {
        if n > 0 && seen.is_conditional() {
            response(304, &not_modified, n)
        } else {
            response(status, &full, n)
        }
    }
}

fn h(pairs: &[(&'static str, &str)]) -> Headers {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

/// Whether a second plain GET was answered without the origin.
async fn reused(status: u16, headers: Headers) -> bool {
    let case = Case::start(always(status, headers)).await;
    let first = case.get("/", &[]).await;
    assert_eq!(first.status.as_u16(), status);
    let second = case.get("/", &[]).await;
    assert_eq!(second.status.as_u16(), status);
    match case.hits() {
        1 => {
            assert_eq!(second.body, first.body, "a reused response keeps its body");
            true
        }
        2 => false,
        hits => panic!("two requests made {hits} origin requests"),
    }
}

fn age(reply: &Reply) -> u64 {
    reply
        .header("age")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Age on {:?}", reply.headers))
}

// ------------------------------------------- RFC 9111 section 3: storing responses

#[tokio::test]
async fn a_response_without_freshness_or_validator_is_not_reused() {
    assert!(!reused(200, vec![]).await);
}

#[tokio::test]
async fn no_store_in_any_case_is_not_stored_even_with_max_age_and_expires() {
    for cc in ["no-store", "No-StOrE", "max-age=10000, no-store"] {
        let headers = vec![
            ("cache-control", cc.to_string()),
            ("expires", at(10_000)),
            ("date", at(0)),
        ];
        assert!(!reused(200, headers).await, "{cc}");
    }
}

#[tokio::test]
async fn private_is_not_stored_by_a_shared_cache() {
    assert!(!reused(200, h(&[("cache-control", "private, max-age=3600")])).await);
    assert!(!reused(200, h(&[("cache-control", "PRIVATE, max-age=3600")])).await);
}

#[tokio::test]
async fn directives_are_found_whatever_the_whitespace_and_line_splitting() {
    for cache_control in [
        &["  max-age=3600  ,  private  "][..],
        &["max-age=3600,no-store"],
        &["max-age=3600", "\tno-store"],
        &["max-age=3600,,, ,PRIVATE"],
    ] {
        let headers = cache_control
            .iter()
            .map(|value| ("cache-control", value.to_string()))
            .collect();
        assert!(!reused(200, headers).await, "{cache_control:?}");
    }
    assert!(reused(200, h(&[("cache-control", " public ,  max-age=3600 ")])).await);
}

#[tokio::test]
async fn a_response_to_a_request_with_authorization_is_not_reused() {
    let case = Case::start(always(
        200,
        vec![("expires", at(30 * 86400)), ("date", at(0))],
    ))
    .await;
    case.get("/", &[("authorization", "FOO")]).await;
    assert_eq!(case.request(0).header("authorization"), Some("FOO"));
    case.get("/", &[]).await;
    case.get("/", &[("authorization", "FOO")]).await;
    assert_eq!(case.hits(), 3);
}

#[tokio::test]
async fn public_s_maxage_or_must_revalidate_let_an_authorized_response_be_reused() {
    for cc in [
        "max-age=3600, public",
        "max-age=3600, must-revalidate",
        "s-maxage=3600",
    ] {
        let case = Case::start(always(
            200,
            vec![("cache-control", cc.to_string()), ("date", at(0))],
        ))
        .await;
        case.get("/", &[("authorization", "FOO")]).await;
        let second = case.get("/", &[]).await;
        assert_eq!(case.hits(), 1, "{cc}");
        assert_eq!(second.text(), "response 0");
    }
}

#[tokio::test]
async fn heuristically_cacheable_statuses_with_last_modified_are_reused() {
    for status in [200, 203, 204, 404, 405, 410, 414, 501] {
        let headers = vec![("last-modified", at(-86400)), ("date", at(0))];
        assert!(reused(status, headers).await, "{status}");
    }
}

#[tokio::test]
async fn other_statuses_are_not_heuristically_fresh() {
    for status in [201, 202, 403, 502, 503, 504, 599] {
        let headers = vec![("last-modified", at(-86400)), ("date", at(0))];
        assert!(!reused(status, headers).await, "{status}");
    }
}

#[tokio::test]
async fn public_makes_any_status_heuristically_cacheable() {
    let headers = vec![
        ("last-modified", at(-86400)),
        ("date", at(0)),
        ("cache-control", "public".to_string()),
    ];
    assert!(reused(599, headers).await);
}

const EXPLICITLY_CACHED_STATUSES: [u16; 18] = [
    200, 203, 204, 299, 301, 302, 303, 307, 308, 400, 404, 410, 499, 500, 502, 503, 504, 599,
];

#[tokio::test]
async fn any_final_status_with_explicit_freshness_is_reused_while_fresh() {
    for status in EXPLICITLY_CACHED_STATUSES {
        let headers = vec![
            ("expires", at(100_000)),
            ("cache-control", "max-age=100000".to_string()),
            ("last-modified", at(0)),
            ("date", at(0)),
        ];
        assert!(reused(status, headers).await, "{status}");
    }
}

#[tokio::test]
async fn no_status_is_reused_once_stale() {
    for status in EXPLICITLY_CACHED_STATUSES {
        let headers = vec![
            ("expires", at(-5000)),
            ("last-modified", at(-100_000)),
            ("date", at(0)),
        ];
        assert!(!reused(status, headers).await, "{status}");
    }
}

#[tokio::test]
async fn a_fresh_response_with_set_cookie_is_stored_only_when_explicitly_public() {
    // Larder's documented habit (docs/cache.md): a cookie is not handed to
    // other users unless the origin opted in with `public` or `s-maxage`.
    assert!(
        !reused(
            200,
            h(&[("cache-control", "max-age=3600"), ("set-cookie", "a=b")])
        )
        .await
    );
    assert!(
        reused(
            200,
            h(&[
                ("cache-control", "max-age=3600, public"),
                ("set-cookie", "a=b")
            ])
        )
        .await
    );
}

#[tokio::test]
async fn a_request_cookie_does_not_prevent_reuse() {
    let case = Case::start(always(200, h(&[("cache-control", "max-age=3600")]))).await;
    case.get("/", &[]).await;
    case.get("/", &[("cookie", "a=b")]).await;
    assert_eq!(case.hits(), 1);
}

#[tokio::test]
async fn content_disposition_attachment_does_not_prevent_reuse() {
    assert!(
        reused(
            200,
            h(&[
                ("cache-control", "max-age=3600"),
                ("content-disposition", "attachment; filename=example.txt")
            ])
        )
        .await
    );
}

#[tokio::test]
async fn different_query_strings_are_different_entries() {
    let case = Case::start(always(200, h(&[("cache-control", "max-age=3600")]))).await;
    case.get("/?test=1", &[]).await;
    case.get("/?test=2", &[]).await;
    assert_eq!(case.hits(), 2);
    let again = case.get("/?test=1", &[]).await;
    assert_eq!(case.hits(), 2);
    assert_eq!(again.text(), "response 0");
}

// ------------------------------------------- section 3.1: storing header fields

#[tokio::test]
async fn fields_named_by_connection_are_not_replayed_from_the_cache() {
    let case = Case::start(always(
        200,
        h(&[
            ("connection", "a, b"),
            ("a", "1"),
            ("b", "2"),
            ("c", "3"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("cache-control", "max-age=3600"),
        ]),
    ))
    .await;
    case.get("/", &[]).await;
    let hit = case.get("/", &[]).await;
    assert_eq!(case.hits(), 1);
    assert_eq!(hit.header("c"), Some("3"));
    for gone in ["a", "b", "keep-alive", "proxy-connection"] {
        assert_eq!(hit.header(gone), None, "{gone} was replayed");
    }
    assert_ne!(hit.header("connection"), Some("a, b"));
}

#[tokio::test]
async fn end_to_end_fields_are_stored_and_replayed() {
    let case = Case::start(always(
        200,
        h(&[
            ("test-header", "x"),
            ("content-type", "text/plain"),
            ("x-frame-options", "deny"),
            ("www-authenticate", "Basic"),
            ("strict-transport-security", "max-age=1"),
            ("cache-control", "max-age=3600"),
        ]),
    ))
    .await;
    case.get("/", &[]).await;
    let hit = case.get("/", &[]).await;
    assert_eq!(case.hits(), 1);
    assert_eq!(hit.header("test-header"), Some("x"));
    assert_eq!(hit.header("content-type"), Some("text/plain"));
    assert_eq!(hit.header("x-frame-options"), Some("deny"));
    assert_eq!(hit.header("www-authenticate"), Some("Basic"));
    assert_eq!(hit.header("strict-transport-security"), Some("max-age=1"));
}

#[tokio::test]
async fn fields_named_by_a_qualified_no_cache_are_left_out_and_the_rest_is_reused() {
    for (qualified, gone, kept) in [
        ("no-cache=\"a\"", &["a"][..], &["b", "c"][..]),
        ("no-cache=\"a, b\"", &["a", "b"], &["c"]),
        ("No-Cache=\"A\"", &["a"], &["b", "c"]),
    ] {
        let case = Case::start(always(
            200,
            vec![
                ("cache-control", qualified.to_string()),
                ("a", "1".to_string()),
                ("b", "2".to_string()),
                ("c", "3".to_string()),
                ("cache-control", "max-age=3600".to_string()),
                ("date", at(0)),
            ],
        ))
        .await;
        let first = case.get("/", &[]).await;
        assert_eq!(
            first.header("a"),
            Some("1"),
            "{qualified}: the response that brought it keeps it"
        );
        let hit = case.get("/", &[]).await;
        assert_eq!(case.hits(), 1, "{qualified}: reused without revalidation");
        for name in gone {
            assert_eq!(hit.header(name), None, "{qualified}: {name} replayed");
        }
        for name in kept {
            assert!(hit.header(name).is_some(), "{qualified}: {name} missing");
        }
    }
}

#[tokio::test]
async fn fields_named_by_a_qualified_private_are_left_out_and_the_rest_is_shared() {
    let case = Case::start(always(
        200,
        h(&[
            (
                "cache-control",
                "private=\"set-cookie, x-user\", max-age=3600",
            ),
            ("set-cookie", "session=1"),
            ("x-user", "alice"),
            ("x-shared", "yes"),
        ]),
    ))
    .await;
    let first = case.get("/", &[]).await;
    assert_eq!(first.header("set-cookie"), Some("session=1"));
    assert_eq!(first.header("x-user"), Some("alice"));
    let hit = case.get("/", &[]).await;
    assert_eq!(case.hits(), 1);
    assert_eq!(hit.header("set-cookie"), None);
    assert_eq!(hit.header("x-user"), None);
    assert_eq!(hit.header("x-shared"), Some("yes"));
}

#[tokio::test]
async fn fields_named_by_private_in_a_304_reach_only_the_revalidating_client() {
    let case = Case::start(validating(
        200,
        vec![
            (
                "cache-control",
                "private=\"set-cookie\", max-age=1".to_string(),
            ),
            ("etag", "\"v\"".to_string()),
            ("date", at(-5)),
        ],
        h(&[
            ("cache-control", "private=\"set-cookie\", max-age=3600"),
            ("etag", "\"v\""),
            ("set-cookie", "session=2"),
        ]),
    ))
    .await;
    case.get("/", &[]).await;
    let revalidated = case.get("/", &[]).await;
    assert_eq!(case.hits(), 2);
    assert_eq!(revalidated.header("set-cookie"), Some("session=2"));
    let hit = case.get("/", &[]).await;
    assert_eq!(case.hits(), 2);
    assert_eq!(hit.header("set-cookie"), None);
    assert_eq!(hit.text(), "response 0");
}

#[tokio::test]
async fn a_concurrent_request_never_receives_the_fields_named_by_private() {
    let (release, gate) = tokio::sync::watch::channel(false);
    let case = Case::start(move |n, _| {
        let mut gate = gate.clone();
        let headers = h(&[
            ("cache-control", "private=\"x-user\", max-age=3600"),
            ("x-user", "alice"),
        ]);
        let (sender, body) = tokio::sync::mpsc::channel::<
            Result<http_body::Frame<Bytes>, std::convert::Infallible>,
        >(1);
        tokio::spawn(async move {
            let _ = gate.wait_for(|open| *open).await;
            let _ = sender
                .send(Ok(http_body::Frame::data(Bytes::from(format!(
                    "response {n}"
                )))))
                .await;
        });
        let mut builder = Response::builder().status(200);
        for (name, value) in &headers {
            builder = builder.header(*name, value.as_str());
        }
        let stream = futures_util::stream::unfold(body, |mut body| async move {
            body.recv().await.map(|frame| (frame, body))
        });
        builder
            .body(larder::http::body::boxed(http_body_util::StreamBody::new(
                stream,
            )))
            .unwrap()
    })
    .await;
    let url = case.larder.url("/");
    let leader = tokio::spawn({
        let url = url.clone();
        async move { common::get(&url).await }
    });
    common::wait_until("the leader reaches the origin", || case.hits() == 1).await;
    let waiter = tokio::spawn(async move { common::get(&url).await });
    // Gives the second request time to join the fill in progress. Nothing
    // depends on it: a request that arrives after the release is a hit, and
    // a hit must not carry the field either.
    tokio::time::sleep(Duration::from_millis(100)).await;
    release.send(true).unwrap();
    let leader = leader.await.unwrap();
    let waiter = waiter.await.unwrap();
    assert_eq!(leader.header("x-user"), Some("alice"));
    assert_eq!(waiter.header("x-user"), None);
    assert_eq!(waiter.text(), leader.text());
}

// ------------------------------------------- section 4.1: Vary

fn vary_headers(vary: &[&str]) -> Headers {
    let mut headers = vec![
        ("expires", at(5000)),
        ("last-modified", at(-3000)),
        ("date", at(0)),
    ];
    for value in vary {
        headers.push(("vary", value.to_string()));
    }
    headers
}

/// Stores with the `first` request headers, then asks with `second`:
/// whether the second was answered from the cache.
async fn vary_reused(vary: &[&str], first: &[(&str, &str)], second: &[(&str, &str)]) -> bool {
    let case = Case::start(always(200, vary_headers(vary))).await;
    case.get("/", first).await;
    case.get("/", second).await;
    case.hits() == 1
}

#[tokio::test]
async fn a_vary_response_is_reused_only_when_the_selecting_headers_match() {
    assert!(vary_reused(&["Foo"], &[("foo", "1")], &[("foo", "1")]).await);
    assert!(!vary_reused(&["Foo"], &[("foo", "1")], &[("foo", "2")]).await);
    assert!(!vary_reused(&["Foo"], &[("foo", "1")], &[]).await);
}

#[tokio::test]
async fn headers_not_named_by_vary_are_not_part_of_the_key() {
    assert!(
        vary_reused(
            &["Foo"],
            &[("foo", "1"), ("other", "2")],
            &[("foo", "1"), ("other", "3")]
        )
        .await
    );
}

#[tokio::test]
async fn a_new_variant_does_not_invalidate_the_existing_one() {
    let case = Case::start(always(200, vary_headers(&["Foo"]))).await;
    case.get("/", &[("foo", "1")]).await;
    let two = case.get("/", &[("foo", "2")]).await;
    assert_eq!(two.text(), "response 1");
    let one = case.get("/", &[("foo", "1")]).await;
    assert_eq!(one.text(), "response 0");
    let two_again = case.get("/", &[("foo", "2")]).await;
    assert_eq!(two_again.text(), "response 1");
    assert_eq!(case.hits(), 2);
}

#[tokio::test]
async fn two_and_three_way_vary_match_every_selecting_header() {
    let both = [("foo", "1"), ("bar", "abc")];
    assert!(vary_reused(&["Foo, Bar"], &both, &both).await);
    assert!(!vary_reused(&["Foo, Bar"], &both, &[("foo", "2"), ("bar", "abc")]).await);
    assert!(!vary_reused(&["Foo, Bar"], &[("foo", "1")], &[]).await);
    let three = [("foo", "1"), ("bar", "abc"), ("baz", "789")];
    assert!(vary_reused(&["Foo, Bar, Baz"], &three, &three).await);
    assert!(
        !vary_reused(
            &["Foo, Bar, Baz"],
            &three,
            &[("foo", "2"), ("bar", "abc"), ("baz", "789")]
        )
        .await
    );
    assert!(
        !vary_reused(
            &["Foo, Bar, Baz"],
            &[("foo", "1"), ("bar", "abc4"), ("baz", "789")],
            &three
        )
        .await
    );
    let omitted = [("foo", "1"), ("baz", "789")];
    assert!(vary_reused(&["Foo, Bar, Baz"], &omitted, &omitted).await);
}

#[tokio::test]
async fn vary_names_on_several_field_lines_and_in_any_case_all_count() {
    let both = [("foo", "1"), ("bar", "abc")];
    assert!(vary_reused(&["Foo", "BAR"], &both, &both).await);
    assert!(!vary_reused(&["Foo", "BAR"], &both, &[("foo", "1"), ("bar", "x")]).await);
}

#[tokio::test]
async fn vary_star_in_any_position_is_never_reused() {
    let request = [("foo", "1"), ("baz", "789")];
    for vary in [
        &["*"][..],
        &["*, *"],
        &["*", "*"],
        &[", *"],
        &["", "*"],
        &["*, Foo"],
        &["Foo, *"],
    ] {
        assert!(!vary_reused(vary, &request, &request).await, "{vary:?}");
    }
}

#[tokio::test]
async fn selecting_header_values_are_normalized_for_whitespace_and_combined_lines() {
    assert!(vary_reused(&["Foo"], &[("foo", "1,2")], &[("foo", " 1, 2 ")]).await);
    assert!(vary_reused(&["Foo"], &[("foo", "1, 2")], &[("foo", "1"), ("foo", "2")]).await);
}

// ------------------------------------------- section 4.2.1: freshness lifetime

/// A response from 5 s ago (by its `Date`) with this Cache-Control, and
/// whether a second request was answered from the cache.
async fn reused_after_5s(cache_control: &[&str]) -> bool {
    let mut headers = vec![("date", at(-5))];
    for value in cache_control {
        headers.push(("cache-control", value.to_string()));
    }
    reused(200, headers).await
}

#[tokio::test]
async fn max_age_is_parsed_case_insensitively_quoted_and_with_leading_zeros() {
    for cc in [
        "max-age=3600",
        "max-age=\"3600\"",
        "MaX-aGe=3600",
        "max-age=003600",
        "foobar, max-age=3600",
        "max-age=2147483648",
        "max-age=99999999999",
    ] {
        assert!(reused_after_5s(&[cc]).await, "{cc}");
    }
}

#[tokio::test]
async fn invalid_max_age_values_make_the_response_stale() {
    for cc in [
        "max-age=0",
        "max-age=1",
        "max-age='3600'",
        "max-age=a100",
        "max-age=100a",
        "max-age=-100",
        "max-age =100",
        "max-age= 100",
        "max-age=3600.5",
    ] {
        assert!(!reused_after_5s(&[cc]).await, "{cc}");
    }
}

#[tokio::test]
async fn max_age_inside_a_quoted_string_is_not_a_directive() {
    for cc in [
        "extension=\"max-age=3600\", max-age=1",
        "max-age=1, extension=\"max-age=3600\"",
        "extension=\"max-age=3600\", max-age=\"1\"",
        "max-age=\"1\", extension=\"max-age=3600\"",
    ] {
        assert!(!reused_after_5s(&[cc]).await, "{cc}");
    }
}

#[tokio::test]
async fn of_two_max_age_directives_the_first_counts() {
    assert!(reused_after_5s(&["max-age=1800, max-age=1"]).await);
    assert!(reused_after_5s(&["max-age=1800", "max-age=1"]).await);
    assert!(!reused_after_5s(&["max-age=1, max-age=1800"]).await);
}

#[tokio::test]
async fn s_maxage_is_used_by_a_shared_cache_and_wins_over_max_age() {
    assert!(reused_after_5s(&["s-maxage=3600"]).await);
    assert!(reused_after_5s(&["max-age=1, s-maxage=3600"]).await);
    assert!(!reused_after_5s(&["max-age=3600, s-maxage=1"]).await);
    assert!(!reused_after_5s(&["s-maxage=1, max-age=3600"]).await);
    assert!(!reused_after_5s(&["max-age=3600", "s-maxage=1"]).await);
}

#[tokio::test]
async fn max_age_wins_over_expires_whatever_its_value() {
    for expires in [at(-10_000), "0".to_string()] {
        let headers = vec![
            ("cache-control", "max-age=3600".to_string()),
            ("expires", expires.clone()),
            ("date", at(0)),
        ];
        assert!(reused(200, headers).await, "{expires}");
    }
    let zero = vec![
        ("cache-control", "max-age=0".to_string()),
        ("expires", at(10_000)),
        ("date", at(0)),
    ];
    assert!(!reused(200, zero).await);
}

#[tokio::test]
async fn an_age_above_max_age_makes_the_response_stale() {
    let headers = h(&[("cache-control", "max-age=10"), ("age", "15")]);
    assert!(!reused(200, headers).await);
}

#[tokio::test]
async fn expires_in_the_future_is_fresh_and_at_or_before_date_is_stale() {
    assert!(reused(200, vec![("expires", at(30 * 86400)), ("date", at(0))]).await);
    assert!(!reused(200, vec![("expires", at(-30 * 86400)), ("date", at(0))]).await);
    assert!(!reused(200, vec![("expires", at(0)), ("date", at(0))]).await);
    assert!(!reused(200, vec![("expires", at(300)), ("date", at(400))]).await);
}

#[tokio::test]
async fn an_invalid_expires_means_already_expired() {
    for expires in [
        "0",
        "Thu, 18 Aug 2050 02:01:18 UTC",
        "Thu, 18 Aug 50 02:01:18 GMT",
        "Thu 18 Aug 2050 02:01:18 GMT",
        "Thu, 18  Aug  2050 02:01:18 GMT",
        "Thu, 18-Aug-2050 02:01:18 GMT",
        "Thu, 18 Aug 2050 02.01.18 GMT",
        "Thu, 18 Aug 2050 2:01:18 GMT",
    ] {
        let headers = vec![("expires", expires.to_string()), ("date", at(0))];
        assert!(!reused(200, headers).await, "{expires}");
    }
}

#[tokio::test]
async fn expires_with_wrongly_cased_names_is_still_understood() {
    for expires in [
        "THU, 18 Aug 2050 02:01:18 GMT",
        "Thu, 18 AUG 2050 02:01:18 GMT",
        "Thu, 18 Aug 2050 02:01:18 gMT",
    ] {
        let headers = vec![("expires", expires.to_string()), ("date", at(0))];
        assert!(reused(200, headers).await, "{expires}");
    }
}

#[tokio::test]
async fn expires_with_an_invalid_date_counts_from_the_response_time() {
    assert!(reused(200, vec![("date", "foo".to_string()), ("expires", at(10))]).await);
}

#[tokio::test]
async fn an_age_above_expires_minus_date_makes_the_response_stale() {
    let slow = vec![
        ("date", at(-10)),
        ("expires", at(10)),
        ("age", "25".to_string()),
    ];
    assert!(!reused(200, slow).await);
    let fast = vec![
        ("date", at(10)),
        ("expires", at(20)),
        ("age", "15".to_string()),
    ];
    assert!(!reused(200, fast).await);
}

// ------------------------------------------- section 4.2.3 and 5.1: Age; Date

#[tokio::test]
async fn a_stored_response_carries_age_including_the_upstream_age() {
    for freshness in [
        ("cache-control", "max-age=600".to_string()),
        ("expires", at(30 * 86400)),
    ] {
        let case = Case::start(always(
            200,
            vec![
                freshness.clone(),
                ("date", at(0)),
                ("age", "30".to_string()),
            ],
        ))
        .await;
        case.get("/", &[]).await;
        let hit = case.get("/", &[]).await;
        assert_eq!(case.hits(), 1, "{freshness:?}");
        assert!(age(&hit) >= 30, "{freshness:?}: Age {}", age(&hit));
    }
}

#[tokio::test]
async fn age_grows_from_the_origin_date() {
    let case = Case::start(always(
        200,
        vec![("expires", at(30 * 86400)), ("date", at(-3))],
    ))
    .await;
    case.get("/", &[]).await;
    let hit = case.get("/", &[]).await;
    assert_eq!(case.hits(), 1);
    assert!(age(&hit) >= 3, "Age {}", age(&hit));
}

#[tokio::test]
async fn the_origin_date_is_kept_on_a_cached_response() {
    let date = at(-3);
    let case = Case::start(always(
        200,
        vec![("expires", at(30 * 86400)), ("date", date.clone())],
    ))
    .await;
    case.get("/", &[]).await;
    let hit = case.get("/", &[]).await;
    assert_eq!(case.hits(), 1);
    assert_eq!(hit.header("date"), Some(date.as_str()));
}

#[tokio::test]
async fn invalid_or_repeated_upstream_age_values_use_the_first_valid_member() {
    for age_value in ["abc", "-7200", "0, 7200"] {
        let headers = vec![
            ("cache-control", "max-age=3600".to_string()),
            ("date", at(0)),
            ("age", age_value.to_string()),
        ];
        assert!(reused(200, headers).await, "Age: {age_value}");
    }
    let headers = vec![
        ("cache-control", "max-age=3600".to_string()),
        ("date", at(0)),
        ("age", "7200, 0".to_string()),
    ];
    assert!(!reused(200, headers).await);
}

// ------------------------------------------- section 4.2.4 and 5.2.2: serving stale

#[tokio::test]
async fn no_cache_responses_are_revalidated_on_every_use() {
    for cc in [
        "max-age=10000, no-cache",
        "max-age=10000, No-CaChE",
        "no-cache",
    ] {
        let case = Case::start(validating(
            200,
            vec![
                ("cache-control", cc.to_string()),
                ("expires", at(10_000)),
                ("date", at(0)),
                ("etag", "\"abcd\"".to_string()),
            ],
            h(&[("etag", "\"abcd\"")]),
        ))
        .await;
        case.get("/", &[]).await;
        let second = case.get("/", &[]).await;
        assert_eq!(case.hits(), 2, "{cc}");
        assert_eq!(case.request(1).header("if-none-match"), Some("\"abcd\""));
        assert_eq!(
            second.text(),
            "response 0",
            "{cc}: the stored body after a 304"
        );
    }
}

#[tokio::test]
async fn must_revalidate_is_reused_while_fresh_and_revalidated_once_stale() {
    assert!(
        reused(
            200,
            h(&[
                ("cache-control", "max-age=10000, must-revalidate"),
                ("etag", "\"abcd\"")
            ])
        )
        .await
    );
    let case = Case::start(validating(
        200,
        vec![
            ("cache-control", "max-age=2, must-revalidate".to_string()),
            ("etag", "\"abcd\"".to_string()),
            ("date", at(-5)),
        ],
        h(&[("etag", "\"abcd\"")]),
    ))
    .await;
    case.get("/", &[]).await;
    let second = case.get("/", &[]).await;
    assert_eq!(case.hits(), 2);
    assert_eq!(case.request(1).header("if-none-match"), Some("\"abcd\""));
    assert_eq!(second.status, 200);
}

#[tokio::test]
async fn directives_that_forbid_stale_keep_stale_if_error_from_applying() {
    for cc in [
        "max-age=1, must-revalidate",
        "max-age=1, proxy-revalidate",
        "max-age=1, no-cache",
        "max-age=1, s-maxage=1",
    ] {
        let case = Case::start_with(
            "      stale_if_error: 1h\n",
            then(
                (
                    200,
                    vec![("cache-control", cc.to_string()), ("date", at(-5))],
                ),
                (503, vec![]),
            ),
        )
        .await;
        case.get("/", &[]).await;
        let second = case.get("/", &[]).await;
        assert_eq!(case.hits(), 2, "{cc}");
        assert_eq!(second.status, 503, "{cc}: stale content must not be served");
    }
}

#[tokio::test]
async fn a_stale_response_that_may_be_served_stale_is_served_when_the_origin_errors() {
    let case = Case::start_with(
        "      stale_if_error: 1h\n",
        then(
            (
                200,
                vec![("cache-control", "max-age=1".to_string()), ("date", at(-5))],
            ),
            (503, vec![]),
        ),
    )
    .await;
    case.get("/", &[]).await;
    let second = case.get("/", &[]).await;
    assert_eq!(case.hits(), 2);
    assert_eq!(second.status, 200);
    assert_eq!(second.text(), "response 0");
}

/// Stores a response, then points the route at an address nothing listens
/// on, and asks again.
async fn after_the_origin_is_gone(headers: Headers, route_cache: &str) -> Reply {
    let case = Case::start_with(route_cache, always(200, headers)).await;
    case.get("/", &[]).await;
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    case.larder
        .reload(&larder_yaml(&dead, route_cache))
        .await
        .unwrap();
    case.get("/", &[]).await
}

#[tokio::test]
async fn a_just_stale_response_answers_while_the_origin_is_unreachable() {
    let reply = after_the_origin_is_gone(
        vec![("cache-control", "max-age=1".to_string()), ("date", at(-3))],
        "",
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "response 0");
    let status = reply.header("cache-status").unwrap_or_default();
    assert!(status.contains("detail=origin-unreachable"), "{status}");
}

#[tokio::test]
async fn a_just_stale_response_answers_when_the_origin_closes_the_connection_on_the_request() {
    let case = Case::start(always(
        200,
        vec![("cache-control", "max-age=1".to_string()), ("date", at(-3))],
    ))
    .await;
    case.get("/", &[]).await;
    let closing = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closing_url = format!("http://{}", closing.local_addr().unwrap());
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        while let Ok((mut stream, _)) = closing.accept().await {
            let mut buffer = [0u8; 1024];
            let _ = stream.read(&mut buffer).await;
        }
    });
    case.larder
        .reload(&larder_yaml(&closing_url, ""))
        .await
        .unwrap();
    let reply = case.get("/", &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "response 0");
}

#[tokio::test]
async fn an_unreachable_origin_gets_504_once_the_grace_or_an_explicit_window_has_passed() {
    let long_stale = vec![
        ("cache-control", "max-age=1".to_string()),
        ("date", at(-60)),
    ];
    let reply = after_the_origin_is_gone(long_stale, "").await;
    assert_eq!(reply.status, 504);
    let windowed = vec![
        ("cache-control", "max-age=1, stale-if-error=1".to_string()),
        ("date", at(-5)),
    ];
    let reply = after_the_origin_is_gone(windowed, "").await;
    assert_eq!(reply.status, 504);
}

#[tokio::test]
async fn directives_that_forbid_stale_answer_504_while_the_origin_is_unreachable() {
    for cc in [
        "max-age=1, must-revalidate",
        "max-age=1, proxy-revalidate",
        "max-age=1, no-cache",
        "s-maxage=1",
    ] {
        let headers = vec![("cache-control", cc.to_string()), ("date", at(-3))];
        let reply = after_the_origin_is_gone(headers, "").await;
        assert_eq!(reply.status, 504, "{cc}");
        assert_ne!(reply.text(), "response 0");
    }
}

// ------------------------------------------- section 4.3: validation

#[tokio::test]
async fn a_stale_response_is_revalidated_with_its_strong_or_weak_etag() {
    for etag in ["\"abcdef\"", "W/\"abcdef\""] {
        let case = Case::start(validating(
            200,
            vec![
                ("cache-control", "max-age=2".to_string()),
                ("date", at(-5)),
                ("etag", etag.to_string()),
            ],
            vec![("etag", etag.to_string())],
        ))
        .await;
        case.get("/", &[]).await;
        let second = case.get("/", &[]).await;
        assert_eq!(case.hits(), 2);
        assert_eq!(case.request(1).header("if-none-match"), Some(etag));
        assert_eq!(second.status, 200);
        assert_eq!(second.text(), "response 0");
    }
}

#[tokio::test]
async fn a_revalidation_carries_the_request_headers_named_by_vary() {
    let case = Case::start(validating(
        200,
        vec![
            ("expires", at(-4)),
            ("etag", "\"abcdef\"".to_string()),
            ("date", at(-5)),
            ("vary", "Abc".to_string()),
        ],
        h(&[("etag", "\"abcdef\"")]),
    ))
    .await;
    case.get("/", &[("abc", "123")]).await;
    case.get("/", &[("abc", "123")]).await;
    assert_eq!(case.hits(), 2);
    let revalidation = case.request(1);
    assert_eq!(revalidation.header("if-none-match"), Some("\"abcdef\""));
    assert_eq!(revalidation.header("abc"), Some("123"));
}

#[tokio::test]
async fn a_request_with_another_vary_value_does_not_revalidate_the_stored_variant() {
    let case = Case::start(always(
        200,
        vec![
            ("expires", at(10_000)),
            ("etag", "\"abcdef\"".to_string()),
            ("date", at(0)),
            ("vary", "Abc".to_string()),
        ],
    ))
    .await;
    case.get("/", &[("abc", "123")]).await;
    case.get("/", &[("abc", "456")]).await;
    assert_eq!(case.hits(), 2);
    assert_eq!(case.request(1).header("if-none-match"), None);
}

/// Checks that a 304 replaces `name` in both the response it answers and
/// the stored response, for each kind of validator.
async fn check_304_updates(name: &'static str, old: &str, new: &str) {
    for (validator, value) in [
        ("etag", "\"v1\"".to_string()),
        ("last-modified", at(-86400)),
    ] {
        let lifetime = |seconds: u32| ("cache-control", format!("max-age={seconds}"));
        let mut first = vec![lifetime(1), ("date", at(-5)), (validator, value.clone())];
        let mut update = vec![lifetime(3600), ("date", at(0)), (validator, value.clone())];
        if name == "cache-control" {
            first.retain(|(n, _)| *n != "cache-control");
            update.retain(|(n, _)| *n != "cache-control");
        }
        first.push((name, old.to_string()));
        update.push((name, new.to_string()));
        let case = Case::start(validating(200, first, update)).await;
        case.get("/", &[]).await;
        let revalidated = case.get("/", &[]).await;
        assert_eq!(case.hits(), 2, "{name} via {validator}");
        assert!(case.request(1).is_conditional());
        assert_eq!(
            revalidated.header(name),
            Some(new),
            "{name} via {validator}: returned"
        );
        assert_eq!(revalidated.text(), "response 0");
        let hit = case.get("/", &[]).await;
        assert_eq!(
            case.hits(),
            2,
            "{name} via {validator}: fresh after the 304"
        );
        assert_eq!(
            hit.header(name),
            Some(new),
            "{name} via {validator}: stored"
        );
    }
}

#[tokio::test]
async fn a_304_updates_end_to_end_fields() {
    check_304_updates("test-header", "a", "b").await;
    check_304_updates("x-test-header", "a", "b").await;
    check_304_updates("x-frame-options", "deny", "sameorigin").await;
    check_304_updates(
        "content-security-policy",
        "default-src 'self'",
        "default-src 'self' cdn.example.com",
    )
    .await;
}

#[tokio::test]
async fn a_304_updates_content_fields_other_than_content_length() {
    check_304_updates("content-foo", "a", "b").await;
    check_304_updates("x-content-foo", "a", "b").await;
    check_304_updates("content-type", "text/plain", "text/plain;charset=utf-8").await;
    check_304_updates("content-location", "/foo", "/bar").await;
    check_304_updates(
        "content-md5",
        "rL0Y20zC+Fzt72VPzMSk2A==",
        "N7UdGUp1E+RbVvZSTy1R8g==",
    )
    .await;
}

#[tokio::test]
async fn a_304_updates_cache_control_and_expires() {
    check_304_updates("cache-control", "max-age=1", "max-age=3600").await;
}

#[tokio::test]
async fn a_304_that_omits_a_field_keeps_the_stored_one() {
    let case = Case::start(validating(
        200,
        vec![
            ("cache-control", "max-age=1".to_string()),
            ("last-modified", at(-86400)),
            ("date", at(-5)),
            ("test-header", "a".to_string()),
        ],
        vec![
            ("cache-control", "max-age=3600".to_string()),
            ("date", at(0)),
        ],
    ))
    .await;
    case.get("/", &[]).await;
    let revalidated = case.get("/", &[]).await;
    assert_eq!(case.hits(), 2);
    assert_eq!(revalidated.header("test-header"), Some("a"));
    assert_eq!(revalidated.header("content-length"), Some("10"));
}

// ------------------------------------------- section 4.3.2: client conditionals

fn fresh_with(extra: &[(&'static str, &str)]) -> Headers {
    let mut headers = vec![
        ("expires", at(100_000)),
        ("cache-control", "max-age=100000".to_string()),
        ("date", at(0)),
    ];
    headers.extend(h(extra));
    headers
}

async fn conditional(stored: Headers, request: &[(&str, &str)]) -> (Reply, usize) {
    let case = Case::start(always(200, stored)).await;
    case.get("/", &[]).await;
    let reply = case.get("/", request).await;
    (reply, case.hits())
}

#[tokio::test]
async fn if_none_match_is_answered_304_from_a_fresh_response_with_its_etag() {
    for (etag, inm) in [
        ("\"abcdef\"", "\"abcdef\""),
        ("W/\"abcdef\"", "W/\"abcdef\""),
        ("\"abcdef\"", "W/\"abcdef\""),
        ("\"abcdef\"", "\"abcdef\", \"1234\", \"5678\""),
        ("\"abcdef\"", "\"1234\", \"abcdef\", \"5678\""),
        ("\"abcdef\"", "\"1234\", \"5678\", \"abcdef\""),
        ("\"abcdef\"", "*"),
    ] {
        let (reply, hits) =
            conditional(fresh_with(&[("etag", etag)]), &[("if-none-match", inm)]).await;
        assert_eq!(hits, 1, "{inm}");
        assert_eq!(reply.status, 304, "{etag} / {inm}");
        assert_eq!(reply.header("etag"), Some(etag));
        assert!(reply.body.is_empty());
    }
    let (reply, hits) = conditional(
        fresh_with(&[("etag", "\"abcdef\"")]),
        &[("if-none-match", "\"other\"")],
    )
    .await;
    assert_eq!((reply.status.as_u16(), hits), (200, 1));
}

#[tokio::test]
async fn if_none_match_takes_precedence_over_if_modified_since() {
    let stored = fresh_with(&[("etag", "\"abcdef\"")]);
    let mut stored = stored;
    stored.push(("last-modified", at(-5000)));
    let since = at(-1);
    let (reply, _) = conditional(
        stored.clone(),
        &[
            ("if-none-match", "\"abcdef\""),
            ("if-modified-since", &since),
        ],
    )
    .await;
    assert_eq!(reply.status, 304);
    let (reply, _) = conditional(
        stored,
        &[
            ("if-none-match", "\"other\""),
            ("if-modified-since", &since),
        ],
    )
    .await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn if_modified_since_is_answered_304_when_not_modified_since() {
    let modified = at(-3000);
    for since in [at(-3000), at(-2000)] {
        let mut stored = vec![
            ("cache-control", "max-age=100000".to_string()),
            ("date", at(0)),
        ];
        stored.push(("last-modified", modified.clone()));
        let (reply, hits) = conditional(stored, &[("if-modified-since", &since)]).await;
        assert_eq!((reply.status.as_u16(), hits), (304, 1), "{since}");
    }
    let stored = vec![
        ("cache-control", "max-age=100000".to_string()),
        ("date", at(0)),
        ("last-modified", modified),
    ];
    let (reply, _) = conditional(stored, &[("if-modified-since", &at(-4000))]).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn if_modified_since_in_rfc850_form_is_understood() {
    let modified = SystemTime::now() - Duration::from_secs(3000);
    let rfc850 = chrono::DateTime::<chrono::Utc>::from(modified)
        .format("%A, %d-%b-%y %H:%M:%S GMT")
        .to_string();
    let stored = vec![
        ("cache-control", "max-age=100000".to_string()),
        ("date", at(0)),
        ("last-modified", httpdate::fmt_http_date(modified)),
    ];
    let (reply, _) = conditional(stored, &[("if-modified-since", &rfc850)]).await;
    assert_eq!(reply.status, 304);
}

#[tokio::test]
async fn a_conditional_on_a_stale_response_is_answered_304_after_revalidation() {
    let modified = at(-3000);
    let case = Case::start(validating(
        200,
        vec![
            ("cache-control", "max-age=2".to_string()),
            ("last-modified", modified.clone()),
            ("date", at(-5)),
        ],
        vec![("last-modified", modified.clone())],
    ))
    .await;
    case.get("/", &[]).await;
    let reply = case.get("/", &[("if-modified-since", &modified)]).await;
    assert_eq!(case.hits(), 2);
    assert_eq!(
        case.request(1).header("if-modified-since"),
        Some(modified.as_str())
    );
    assert_eq!(reply.status, 304);
}

// ------------------------------------------- section 4.4: invalidation

fn by_method(
    fresh: Headers,
    unsafe_status: u16,
    unsafe_headers: Headers,
) -> impl Fn(usize, &Seen) -> Response<Body> {
    move |n, seen| {
        if seen.method == Method::GET {
            response(200, &fresh, n)
        } else {
            response(unsafe_status, &unsafe_headers, n)
        }
    }
}

#[tokio::test]
async fn a_successful_unsafe_request_invalidates_its_url() {
    for method in ["POST", "PUT", "DELETE", "M-SEARCH"] {
        let case = Case::start(by_method(fresh_with(&[]), 200, vec![])).await;
        case.get("/", &[]).await;
        let unsafe_reply = case.send(method, "/", &[]).await;
        assert_eq!(unsafe_reply.status, 200, "{method}");
        let after = case.get("/", &[]).await;
        assert_eq!(case.hits(), 3, "{method}");
        assert_eq!(after.text(), "response 2");
    }
}

#[tokio::test]
async fn a_failed_unsafe_request_invalidates_nothing() {
    for method in ["POST", "PUT", "DELETE", "M-SEARCH"] {
        let case = Case::start(by_method(fresh_with(&[]), 500, vec![])).await;
        case.get("/", &[]).await;
        case.send(method, "/", &[]).await;
        case.get("/", &[]).await;
        assert_eq!(case.hits(), 2, "{method}");
    }
}

#[tokio::test]
async fn an_unsafe_request_invalidates_its_location_and_content_location_urls() {
    for method in ["POST", "PUT", "DELETE", "M-SEARCH"] {
        let case = Case::start(by_method(
            fresh_with(&[]),
            200,
            h(&[
                ("location", "location_target"),
                ("content-location", "content_location_target"),
            ]),
        ))
        .await;
        case.get("/dir/location_target", &[]).await;
        case.get("/dir/content_location_target", &[]).await;
        case.get("/dir/other", &[]).await;
        case.send(method, "/dir/post", &[]).await;
        assert_eq!(case.hits(), 4);
        case.get("/dir/location_target", &[]).await;
        case.get("/dir/content_location_target", &[]).await;
        case.get("/dir/other", &[]).await;
        assert_eq!(
            case.hits(),
            6,
            "{method}: both targets refetched, the other kept"
        );
    }
}

#[tokio::test]
async fn a_location_on_another_origin_is_not_invalidated() {
    let case = Case::start(by_method(
        fresh_with(&[]),
        200,
        h(&[("location", "http://elsewhere.example/target")]),
    ))
    .await;
    case.get("/target", &[]).await;
    case.send("POST", "/post", &[]).await;
    case.get("/target", &[]).await;
    assert_eq!(case.hits(), 2);
}

// ------------------------------------------- section 5.2.1: request directives

#[tokio::test]
async fn request_max_age_asks_for_a_response_no_older_than_it() {
    let case = Case::start(always(200, fresh_with(&[]))).await;
    case.get("/", &[]).await;
    case.get("/", &[("cache-control", "max-age=0")]).await;
    assert_eq!(case.hits(), 2);

    let aged = h(&[("cache-control", "max-age=3600"), ("age", "1800")]);
    let case = Case::start(always(200, aged)).await;
    case.get("/", &[]).await;
    case.get("/", &[("cache-control", "max-age=600")]).await;
    assert_eq!(case.hits(), 2);
    case.get("/", &[("cache-control", "max-age=3000")]).await;
    assert_eq!(case.hits(), 2);
}

#[tokio::test]
async fn request_max_stale_accepts_a_stale_response_within_its_bound() {
    let case = Case::start(always(
        200,
        vec![("cache-control", "max-age=1".to_string()), ("date", at(-5))],
    ))
    .await;
    case.get("/", &[]).await;
    let reply = case.get("/", &[("cache-control", "max-stale=1000")]).await;
    assert_eq!(case.hits(), 1);
    assert_eq!(reply.text(), "response 0");

    let aged = h(&[("cache-control", "max-age=1500"), ("age", "2000")]);
    let case = Case::start(always(200, aged)).await;
    case.get("/", &[]).await;
    case.get("/", &[("cache-control", "max-stale=1000")]).await;
    assert_eq!(case.hits(), 1);
    case.get("/", &[("cache-control", "max-stale=100")]).await;
    assert_eq!(case.hits(), 2);
}

#[tokio::test]
async fn request_min_fresh_refuses_a_response_not_fresh_for_that_long() {
    let case = Case::start(always(200, h(&[("cache-control", "max-age=1500")]))).await;
    case.get("/", &[]).await;
    case.get("/", &[("cache-control", "min-fresh=2000")]).await;
    assert_eq!(case.hits(), 2);

    let aged = h(&[("cache-control", "max-age=1500"), ("age", "1000")]);
    let case = Case::start(always(200, aged)).await;
    case.get("/", &[]).await;
    case.get("/", &[("cache-control", "min-fresh=1000")]).await;
    assert_eq!(case.hits(), 2);
}

#[tokio::test]
async fn request_no_cache_revalidates_with_the_stored_validators() {
    let case = Case::start(always(200, h(&[("cache-control", "max-age=3600")]))).await;
    case.get("/", &[]).await;
    case.get("/", &[("cache-control", "no-cache")]).await;
    assert_eq!(case.hits(), 2);

    let modified = at(-10_000);
    let case = Case::start(validating(
        200,
        vec![
            ("cache-control", "max-age=3600".to_string()),
            ("last-modified", modified.clone()),
            ("date", at(0)),
        ],
        vec![],
    ))
    .await;
    case.get("/", &[]).await;
    case.get("/", &[("cache-control", "no-cache")]).await;
    assert_eq!(
        case.request(1).header("if-modified-since"),
        Some(modified.as_str())
    );

    let case = Case::start(validating(
        200,
        h(&[("cache-control", "max-age=3600"), ("etag", "\"abc\"")]),
        vec![],
    ))
    .await;
    case.get("/", &[]).await;
    case.get("/", &[("cache-control", "no-cache")]).await;
    assert_eq!(case.request(1).header("if-none-match"), Some("\"abc\""));
}

#[tokio::test]
async fn request_only_if_cached_answers_504_when_nothing_is_stored() {
    let case = Case::start(always(200, fresh_with(&[]))).await;
    let reply = case.get("/", &[("cache-control", "only-if-cached")]).await;
    assert_eq!(reply.status, 504);
    assert_eq!(case.hits(), 0);
    case.get("/", &[]).await;
    let reply = case.get("/", &[("cache-control", "only-if-cached")]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(case.hits(), 1);
}

#[tokio::test]
async fn response_pragma_does_not_affect_reuse() {
    for pragma in ["no-cache", "unrecognised-extension"] {
        let headers = h(&[("cache-control", "max-age=3600"), ("pragma", pragma)]);
        assert!(reused(200, headers).await, "{pragma}");
    }
}

// ------------------------------------------- RFC 9110 section 14 / RFC 9111 section 3.4: ranges

/// An origin that sends `body` in full to plain requests and `206` with
/// the first five bytes to requests with `Range`.
fn ranged_origin(
    body: &'static str,
    cache_control: &'static str,
) -> impl Fn(usize, &Seen) -> Response<Body> {
    move |_, seen| {
        if seen.headers.contains_key("range") {
            common::respond(
                206,
                &[
                    ("cache-control", cache_control),
                    ("content-range", "bytes 0-4/11"),
                ],
                &body.as_bytes()[..5],
            )
        } else {
            common::respond(200, &[("cache-control", cache_control)], body)
        }
    }
}

#[tokio::test]
async fn a_byte_range_of_a_fresh_stored_response_is_served_from_the_cache() {
    let case = Case::start(ranged_origin("0123456789A", "max-age=3600")).await;
    case.get("/", &[]).await;
    for (range, text, content_range) in [
        ("bytes=0-1", "01", "bytes 0-1/11"),
        ("bytes=1-", "123456789A", "bytes 1-10/11"),
        ("bytes=-1", "A", "bytes 10-10/11"),
    ] {
        let reply = case.get("/", &[("range", range)]).await;
        assert_eq!(reply.status, 206, "{range}");
        assert_eq!(reply.text(), text, "{range}");
        assert_eq!(reply.header("content-range"), Some(content_range));
        assert_eq!(
            reply.header("content-length"),
            Some(text.len().to_string().as_str())
        );
        assert!(reply.header("age").is_some());
    }
    assert_eq!(case.hits(), 1);
}

#[tokio::test]
async fn a_range_request_on_a_miss_goes_to_the_origin_and_its_206_is_not_stored() {
    let case = Case::start(ranged_origin("0123456789A", "max-age=3600")).await;
    let partial = case.get("/", &[("range", "bytes=0-4")]).await;
    assert_eq!(partial.status, 206);
    assert_eq!(case.request(0).header("range"), Some("bytes=0-4"));
    let full = case.get("/", &[]).await;
    assert_eq!(full.status, 200);
    assert_eq!(full.text(), "0123456789A");
    assert_eq!(case.hits(), 2);
}

#[tokio::test]
async fn several_ranges_unsatisfiable_ranges_and_stale_entries_go_to_the_origin() {
    let case = Case::start(ranged_origin("0123456789A", "max-age=3600")).await;
    case.get("/", &[]).await;
    case.get("/", &[("range", "bytes=0-1, 3-4")]).await;
    case.get("/", &[("range", "bytes=20-")]).await;
    case.get("/", &[("range", "bytes=0-1"), ("if-range", "\"x\"")])
        .await;
    assert_eq!(case.hits(), 4);

    let case = Case::start(ranged_origin("0123456789A", "max-age=0")).await;
    case.get("/", &[]).await;
    case.get("/", &[("range", "bytes=0-1")]).await;
    assert_eq!(case.hits(), 2);
    let cached_only = case
        .get(
            "/",
            &[("range", "bytes=0-1"), ("cache-control", "only-if-cached")],
        )
        .await;
    assert_eq!(cached_only.status, 504);
    assert_eq!(case.hits(), 2);
}

// ------------------------------------------- RFC 5861: stale-while-revalidate, stale-if-error

#[tokio::test]
async fn stale_while_revalidate_answers_stale_and_refreshes_in_the_background() {
    let case = Case::start(then(
        (
            200,
            h(&[
                ("cache-control", "max-age=0, stale-while-revalidate=3600"),
                ("etag", "\"abc\""),
            ]),
        ),
        (
            200,
            h(&[("cache-control", "max-age=3600"), ("etag", "\"def\"")]),
        ),
    ))
    .await;
    case.get("/", &[]).await;
    let stale = case.get("/", &[]).await;
    assert_eq!(stale.header("etag"), Some("\"abc\""));
    assert_eq!(stale.text(), "response 0");
    common::eventually("the refreshed ETag", async || {
        case.get("/", &[]).await.header("etag") == Some("\"def\"")
    })
    .await;
    let fresh = case.get("/", &[]).await;
    assert_eq!(fresh.header("cache-control"), Some("max-age=3600"));
    assert_eq!(fresh.text(), "response 1");
    assert_eq!(case.hits(), 2);
}

#[tokio::test]
async fn response_stale_if_error_serves_stale_on_a_500_within_its_window_only() {
    let case = Case::start(then(
        (
            200,
            h(&[("cache-control", "max-age=0, stale-if-error=3600")]),
        ),
        (500, vec![]),
    ))
    .await;
    case.get("/", &[]).await;
    let reply = case.get("/", &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "response 0");

    let case = Case::start(then(
        (
            200,
            vec![
                ("cache-control", "max-age=0, stale-if-error=1".to_string()),
                ("date", at(-5)),
            ],
        ),
        (500, vec![]),
    ))
    .await;
    case.get("/", &[]).await;
    let reply = case.get("/", &[]).await;
    assert_eq!(reply.status, 500);
}

#[tokio::test]
async fn request_stale_if_error_serves_stale_on_a_500_within_its_window_only() {
    let case = Case::start(then(
        (
            200,
            vec![("cache-control", "max-age=0".to_string()), ("date", at(-5))],
        ),
        (500, vec![]),
    ))
    .await;
    case.get("/", &[]).await;
    let reply = case
        .get("/", &[("cache-control", "stale-if-error=3600")])
        .await;
    assert_eq!(reply.status, 200);
    let reply = case
        .get("/", &[("cache-control", "stale-if-error=1")])
        .await;
    assert_eq!(reply.status, 500);
}

#[tokio::test]
async fn a_stale_while_revalidate_refresh_answered_304_freshens_the_entry() {
    let case = Case::start(validating(
        200,
        h(&[
            ("cache-control", "max-age=0, stale-while-revalidate=3600"),
            ("etag", "\"abc\""),
            ("x-version", "1"),
        ]),
        h(&[
            ("cache-control", "max-age=3600"),
            ("etag", "\"abc\""),
            ("x-version", "2"),
        ]),
    ))
    .await;
    case.get("/", &[]).await;
    let stale = case.get("/", &[]).await;
    assert_eq!(stale.header("x-version"), Some("1"));
    common::eventually("the refreshed x-version", async || {
        case.get("/", &[]).await.header("x-version") == Some("2")
    })
    .await;
    let fresh = case.get("/", &[]).await;
    assert_eq!(fresh.text(), "response 0");
    assert_eq!(case.hits(), 2);
    assert_eq!(case.request(1).header("if-none-match"), Some("\"abc\""));
}

// ------------------------------------------- RFC 9111 section 4: serving, HEAD, methods

#[tokio::test]
async fn a_stale_entry_answered_in_full_is_replaced_by_the_new_response() {
    let case = Case::start(then(
        (
            200,
            vec![("cache-control", "max-age=1".to_string()), ("date", at(-5))],
        ),
        (200, h(&[("cache-control", "max-age=3600")])),
    ))
    .await;
    case.get("/", &[]).await;
    let refreshed = case.get("/", &[]).await;
    assert_eq!(refreshed.text(), "response 1");
    let hit = case.get("/", &[]).await;
    assert_eq!(hit.text(), "response 1");
    assert_eq!(case.hits(), 2);
}

#[tokio::test]
async fn head_is_answered_from_a_stored_get_with_its_headers_and_no_body() {
    let case = Case::start(always(
        200,
        h(&[("cache-control", "max-age=3600"), ("x-a", "1")]),
    ))
    .await;
    case.get("/", &[]).await;
    let head = case.send("HEAD", "/", &[]).await;
    assert_eq!(case.hits(), 1);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("x-a"), Some("1"));
    assert!(head.body.is_empty());
}

#[tokio::test]
async fn a_post_response_is_not_stored_for_later_gets() {
    // RFC 9110 section 9.3.3 allows it with explicit freshness and a
    // matching Content-Location; Larder does not (docs/cache.md).
    let case = Case::start(by_method(
        fresh_with(&[]),
        200,
        vec![
            ("expires", at(30 * 86400)),
            ("content-location", "/".to_string()),
            ("date", at(0)),
        ],
    ))
    .await;
    case.send("POST", "/", &[("content-type", "text/plain")])
        .await;
    let after = case.get("/", &[]).await;
    assert_eq!(after.text(), "response 1");
    assert_eq!(case.hits(), 2);
}

#[tokio::test]
async fn options_and_trace_pass_through_without_touching_the_cache() {
    let case = Case::start(always(200, fresh_with(&[]))).await;
    case.get("/", &[]).await;
    case.send("OPTIONS", "/", &[]).await;
    case.get("/", &[]).await;
    assert_eq!(case.hits(), 2);
}

// ------------------------------------------- RFC 9211: Cache-Status

#[tokio::test]
async fn cache_status_tells_a_miss_from_a_hit() {
    let case = Case::start(always(200, h(&[("cache-control", "max-age=3600")]))).await;
    let miss = case.get("/", &[]).await;
    let status = miss.header("cache-status").unwrap_or_default().to_string();
    assert!(status.starts_with("larder; fwd=uri-miss"), "{status}");
    assert!(status.contains("stored"), "{status}");
    let hit = case.get("/", &[]).await;
    let status = hit.header("cache-status").unwrap_or_default().to_string();
    assert!(status.starts_with("larder; hit; ttl="), "{status}");
}

#[tokio::test]
async fn cache_status_marks_revalidations_and_stale_content() {
    let case = Case::start_with("      stale_if_error: 1h\n", move |n, _| match n {
        0 => response(
            200,
            &[
                ("cache-control", "max-age=1".to_string()),
                ("date", at(-5)),
                ("etag", "\"v\"".to_string()),
            ],
            n,
        ),
        1 => response(304, &[("etag", "\"v\"".to_string()), ("date", at(-5))], n),
        _ => response(503, &[], n),
    })
    .await;
    case.get("/", &[]).await;
    let revalidated = case.get("/", &[]).await;
    let status = revalidated.header("cache-status").unwrap_or_default();
    assert!(
        status.contains("fwd=stale") && status.contains("fwd-status=304"),
        "{status}"
    );
    let stale = case.get("/", &[]).await;
    assert_eq!(stale.status, 200);
    let status = stale.header("cache-status").unwrap_or_default();
    assert!(
        status.contains("fwd-status=503") && status.contains("ttl=-"),
        "{status}"
    );
}
