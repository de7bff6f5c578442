//! The shared cache as a client sees it, through the whole proxy: each test
//! starts Larder from YAML with a cache-enabled route in front of a real
//! hyper origin that counts and records its requests, and checks on the wire
//! what the client got (status, body, `Age`, `Cache-Status`) and how often
//! the origin was asked. Purges, entry counts and the fills in flight go
//! through the admin API.
//!
//! Nothing sleeps for time to pass: a response meant to be stale arrives
//! with a `Date` in the past, and a coalescing test releases its origin once
//! the admin API shows the expected requests waiting on the fill.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use common::{
    ADMIN_BLOCK, ADMIN_TOKEN, AccessLog, DEADLINE, Larder, Origin, Reply, eventually, get,
    get_with, http_date, respond, send, start_dateless_origin, start_numbered_origin, start_origin,
    streamed, wait_until,
};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use larder::http::body::Body;
use tokio::sync::Notify;

// ---------------------------------------------------------------- harness

/// A `Date` offset (seconds) that makes a `max-age=60` response 30 s stale
/// on arrival: inside the 60 s stale windows the tests give, and inside the
/// minute Larder keeps any stale entry.
const STALE: i64 = -90;

/// Larder in front of `upstream` with one cache-enabled route: `route_cache`
/// adds lines under the route's `cache:` (six spaces in), `global` top-level
/// lines such as a `cache:` block. The upstream times out after 1 s.
fn larder_yaml(upstream: &str, route_cache: &str, global: &str) -> String {
    yaml_with_timeout(upstream, "1s", route_cache, global)
}

fn yaml_with_timeout(upstream: &str, timeout: &str, route_cache: &str, global: &str) -> String {
    format!(
        "{ADMIN_BLOCK}{global}upstreams:\n  app:\n    servers: [\"{upstream}\"]\n    timeout: {timeout}\n\
         routes:\n  - upstream: app\n    cache:\n      enabled: true\n{route_cache}"
    )
}

async fn front_with(origin: &Origin, route_cache: &str, global: &str) -> Larder {
    common::start_larder(&larder_yaml(&origin.url(), route_cache, global)).await
}

async fn front(origin: &Origin) -> Larder {
    front_with(origin, "", "").await
}

/// Larder in front of an origin that holds its answers until the test
/// releases them: the upstream timeout is long enough never to race the
/// test's own waiting for requests to join the fill (on a busy machine
/// that can take longer than 1 s).
async fn held_front(origin: &Origin, global: &str) -> Larder {
    common::start_larder(&yaml_with_timeout(&origin.url(), "30s", "", global)).await
}

/// An origin answering with `handler(request, n)` (n from 1) and Larder in
/// front of it.
async fn setup<F, Fut>(handler: F) -> (Origin, Larder)
where
    F: Fn(Request<Incoming>, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let origin = start_numbered_origin(handler).await;
    let front = front(&origin).await;
    (origin, front)
}

/// An origin answering every request the same way, numbering its bodies.
async fn fixed(status: u16, headers: &'static [(&'static str, &'static str)]) -> (Origin, Larder) {
    setup(move |_, n| async move { respond(status, headers, format!("body {n}")) }).await
}

/// As [`fixed`], every response dated `date` seconds from now.
async fn fixed_dated(
    status: u16,
    headers: &'static [(&'static str, &'static str)],
    date: i64,
) -> (Origin, Larder) {
    setup(move |_, n| async move { dated(status, headers, date, format!("body {n}")) }).await
}

/// A response with `headers` and a `Date` `date` seconds from now.
fn dated(
    status: u16,
    headers: &[(&str, &str)],
    date: i64,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let date = http_date(date);
    let mut all = headers.to_vec();
    all.push(("date", &date));
    respond(status, &all, body)
}

/// Sends `json` to the admin `POST /purge`; the number of variants purged.
async fn purge(front: &Larder, json: serde_json::Value) -> u64 {
    let reply = front.admin("POST", "/purge", json.to_string()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()["purged"]
        .as_u64()
        .unwrap_or_else(|| panic!("no count in {}", reply.text()))
}

/// The admin `GET /cache` answer.
async fn cache_state(front: &Larder) -> serde_json::Value {
    let reply = front.admin("GET", "/cache", "").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()
}

/// Waits until `waiters` requests have joined the fill in flight for `url`,
/// as the admin `GET /cache` reports it.
async fn joined(front: &Larder, url: &str, waiters: u64) {
    eventually(
        format!("{waiters} requests waiting on the fill of {url}"),
        async || {
            let state = cache_state(front).await;
            state["in_flight"]
                .as_array()
                .expect("an in_flight list")
                .iter()
                .any(|flight| flight["key"] == url && flight["waiters"] == waiters)
        },
    )
    .await;
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
        respond(
            200,
            &[
                ("cache-control", "max-age=0"),
                ("expires", &http_date(3600)),
                ("etag", "\"e\""),
            ],
            format!("b{n}"),
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
        respond(
            200,
            &[("date", &http_date(0)), ("expires", &http_date(120))],
            format!("b{n}"),
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
    assert_eq!(origin.last_request().header("if-none-match"), Some("\"x\""));
    assert!(second.cache_status().contains("fwd=stale"));
}

#[tokio::test]
async fn last_modified_gives_heuristic_freshness() {
    let (origin, front) = setup(|_, n| async move {
        respond(
            200,
            &[("last-modified", &http_date(-10 * 86400))],
            format!("b{n}"),
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
        respond(
            302,
            &[
                ("location", "/x"),
                ("last-modified", &http_date(-10 * 86400)),
            ],
            format!("b{n}"),
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
            setup(
                move |_, _| async move { respond(status, &[("cache-control", "max-age=60")], "") },
            )
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
    // max-age=60 and 57 s old on arrival: 2 to 3 s of freshness left (the
    // Date has whole seconds), so the entry expires while the test polls.
    let (origin, front) = fixed_dated(200, &[("cache-control", "max-age=60")], -57).await;
    get(&front.url("/t")).await;
    let fresh = get(&front.url("/t")).await;
    assert!(
        fresh.cache_status().contains("hit"),
        "{}",
        fresh.cache_status()
    );
    let expired = eventually("the entry to expire", async || {
        let reply = get(&front.url("/t")).await;
        (origin.hits() >= 2).then_some(reply)
    })
    .await;
    assert!(
        expired.cache_status().contains("fwd=stale"),
        "{}",
        expired.cache_status()
    );
    assert_eq!(origin.hits(), 2);
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
    let (_origin, front) = fixed_dated(200, &[("cache-control", "max-age=600")], -100).await;
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
    let origin = start_dateless_origin(|_, _| async move {
        respond(200, &[("cache-control", "max-age=60")], "x")
    })
    .await;
    let front = front(&origin).await;
    let miss = get(&front.url("/nd")).await;
    let added = httpdate::parse_http_date(miss.header("date").expect("a Date on the miss"))
        .expect("a valid Date");
    // Larder's listeners give any response without a Date one made now:
    // wait for the clock's next second, so such a Date would be newer.
    let later = eventually("the next second on Larder's clock", async || {
        let health = get(&front.admin_url("/health")).await;
        let date = httpdate::parse_http_date(health.header("date")?).ok()?;
        (date > added).then_some(date)
    })
    .await;
    let hit = get(&front.url("/nd")).await;
    assert!(hit.header("date").is_some());
    let kept = httpdate::parse_http_date(hit.header("date").unwrap()).expect("a valid Date");
    assert!(
        kept < later,
        "the hit carries the Date added on arrival, not one made now"
    );
    assert_eq!(origin.hits(), 1);
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
            return respond(304, &[("etag", "\"v1\"")], "");
        }
        respond(
            200,
            &[
                ("cache-control", "no-cache, max-age=60"),
                ("etag", "\"v1\""),
            ],
            format!("b{n}"),
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
    let (origin, front) = fixed_dated(
        200,
        &[
            (
                "cache-control",
                "max-age=60, must-revalidate, stale-if-error=60",
            ),
            ("etag", "\"m\""),
        ],
        STALE,
    )
    .await;
    get(&front.url("/mr")).await;
    origin.stop().await;
    let reply = get(&front.url("/mr")).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test]
async fn proxy_revalidate_forbids_serving_stale() {
    let (origin, front) = fixed_dated(
        200,
        &[
            ("cache-control", "max-age=60, proxy-revalidate"),
            ("etag", "\"p\""),
        ],
        STALE,
    )
    .await;
    get(&front.url("/pv")).await;
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
    let (origin, front) = fixed_dated(200, &[("cache-control", "max-age=60")], STALE).await;
    get(&front.url("/ms")).await;
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
        respond(
            200,
            &[("cache-control", "max-age=60"), ("vary", "Accept-Encoding")],
            format!("for {encoding}"),
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
    // The full response arrives stale; the 304 comes with a fresh Date.
    let (origin, front) = setup(|request, n| async move {
        if request.headers().get("if-none-match").is_some() {
            return dated(
                304,
                &[
                    ("etag", "\"v1\""),
                    ("x-version", "2"),
                    ("cache-control", "max-age=60"),
                ],
                0,
                "",
            );
        }
        dated(
            200,
            &[
                ("etag", "\"v1\""),
                ("x-version", "1"),
                ("cache-control", "max-age=60"),
            ],
            STALE,
            format!("body {n}"),
        )
    })
    .await;
    get(&front.url("/304")).await;
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
    let modified = http_date(-86400 * 100);
    let sent = modified.clone();
    let (origin, front) = setup(move |request, n| {
        let modified = sent.clone();
        async move {
            if request.headers().get("if-modified-since").is_some() {
                return respond(304, &[], "");
            }
            respond(
                200,
                &[("last-modified", &modified), ("cache-control", "max-age=0")],
                format!("body {n}"),
            )
        }
    })
    .await;
    get(&front.url("/ims")).await;
    let second = get(&front.url("/ims")).await;
    assert_eq!(second.text(), "body 1");
    assert_eq!(
        origin.last_request().header("if-modified-since"),
        Some(modified.as_str())
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
        origin.last_request().header("if-none-match").is_none(),
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
    let head = send("HEAD", &front.url("/hd"), &[], "").await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert!(head.cache_status().contains("hit"));
    assert_eq!(origin.hits(), 1);
}

#[tokio::test]
async fn head_miss_is_forwarded_and_not_stored() {
    let (origin, front) = fixed(200, &[("cache-control", "max-age=60")]).await;
    send("HEAD", &front.url("/hm"), &[], "").await;
    let get_after = get(&front.url("/hm")).await;
    assert!(get_after.cache_status().contains("uri-miss"));
    assert_eq!(origin.hits(), 2);
}

#[tokio::test]
async fn unsafe_methods_invalidate_the_target_and_locations() {
    let (origin, front) = setup(|request, n| async move {
        if request.method() == http::Method::POST {
            return respond(
                201,
                &[
                    ("location", "/other"),
                    ("content-location", "http://elsewhere.example/x"),
                ],
                "made",
            );
        }
        respond(200, &[("cache-control", "max-age=60")], format!("body {n}"))
    })
    .await;
    get(&front.url("/target")).await;
    get(&front.url("/other")).await;
    let post = send("POST", &front.url("/target"), &[], "").await;
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
            return respond(500, &[], "no");
        }
        respond(200, &[("cache-control", "max-age=60")], "kept")
    })
    .await;
    get(&front.url("/keep")).await;
    send("DELETE", &front.url("/keep"), &[], "").await;
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
    // The first response arrives stale; the refresh brings a fresh one.
    let (origin, front) = setup(|_, n| async move {
        let date = if n == 1 { STALE } else { 0 };
        dated(
            200,
            &[("cache-control", "max-age=60, stale-while-revalidate=60")],
            date,
            format!("body {n}"),
        )
    })
    .await;
    get(&front.url("/swr")).await;
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
    wait_until("the background refresh", || origin.hits() == 2).await;
    eventually("the refresh to be stored", async || {
        get(&front.url("/swr")).await.text() == "body 2"
    })
    .await;
    assert_eq!(origin.hits(), 2, "exactly one background refresh");
}

#[tokio::test]
async fn route_default_stale_while_revalidate_applies_when_the_origin_is_silent() {
    let origin = start_numbered_origin(|_, n| async move {
        let date = if n == 1 { STALE } else { 0 };
        dated(
            200,
            &[("cache-control", "max-age=60")],
            date,
            format!("body {n}"),
        )
    })
    .await;
    let front = front_with(&origin, "      stale_while_revalidate: 60s\n", "").await;
    get(&front.url("/rswr")).await;
    let stale = get(&front.url("/rswr")).await;
    assert_eq!(stale.text(), "body 1");
    wait_until("the background refresh", || origin.hits() == 2).await;
}

async fn stale_if_error_with_failure(failing_status: u16) {
    let (origin, front) = setup(move |_, n| async move {
        if n == 1 {
            dated(
                200,
                &[("cache-control", "max-age=60, stale-if-error=60")],
                STALE,
                "good",
            )
        } else {
            respond(failing_status, &[], "bad")
        }
    })
    .await;
    get(&front.url("/sie")).await;
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
    let (origin, front) = fixed_dated(
        200,
        &[("cache-control", "max-age=60, stale-if-error=60")],
        STALE,
    )
    .await;
    get(&front.url("/sier")).await;
    origin.stop().await;
    let stale = get(&front.url("/sier")).await;
    assert_eq!(stale.status, StatusCode::OK);
    assert_eq!(stale.text(), "body 1");
    assert!(stale.cache_status().contains("detail=stale-if-error"));
}

#[tokio::test]
async fn stale_if_error_covers_an_upstream_timeout() {
    let (_origin, front) = setup(|_, n| async move {
        if n > 1 {
            // Never answers: the upstream's 1 s timeout is what is tested.
            std::future::pending::<()>().await;
        }
        dated(
            200,
            &[("cache-control", "max-age=60, stale-if-error=60")],
            STALE,
            format!("body {n}"),
        )
    })
    .await;
    get(&front.url("/siet")).await;
    let stale = get(&front.url("/siet")).await;
    assert_eq!(stale.status, StatusCode::OK);
    assert_eq!(stale.text(), "body 1");
}

#[tokio::test]
async fn stale_if_error_from_the_route_default() {
    let origin = start_numbered_origin(|_, n| async move {
        if n == 1 {
            dated(200, &[("cache-control", "max-age=60")], STALE, "good")
        } else {
            respond(503, &[], "bad")
        }
    })
    .await;
    let front = front_with(&origin, "      stale_if_error: 60s\n", "").await;
    get(&front.url("/rsie")).await;
    assert_eq!(get(&front.url("/rsie")).await.text(), "good");
}

#[tokio::test]
async fn stale_if_error_does_not_reach_past_its_window() {
    // 30 s stale on arrival, with a window of 1 s.
    let (_origin, front) = setup(|_, n| async move {
        if n == 1 {
            dated(
                200,
                &[("cache-control", "max-age=60, stale-if-error=1")],
                STALE,
                "good",
            )
        } else {
            respond(503, &[], "bad")
        }
    })
    .await;
    get(&front.url("/siew")).await;
    let reply = get(&front.url("/siew")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.text(), "bad");
    assert!(
        reply.cache_status().contains("fwd=stale"),
        "the stale entry was there: {}",
        reply.cache_status()
    );
}

#[tokio::test]
async fn without_stale_if_error_the_client_gets_the_error() {
    let (_origin, front) = setup(|_, n| async move {
        if n == 1 {
            dated(200, &[("cache-control", "max-age=60")], STALE, "good")
        } else {
            respond(502, &[], "bad")
        }
    })
    .await;
    get(&front.url("/nosie")).await;
    assert_eq!(
        get(&front.url("/nosie")).await.status,
        StatusCode::BAD_GATEWAY
    );
}

// ---------------------------------------------------------------- coalescing and streaming

/// An origin that holds every response until `release` is notified (each
/// released response then lets the next one go), numbering its bodies,
/// and Larder in front of it.
async fn gated(
    headers: &'static [(&'static str, &'static str)],
    release: Arc<Notify>,
) -> (Origin, Larder) {
    let origin = start_numbered_origin(move |_, n| {
        let release = Arc::clone(&release);
        async move {
            release.notified().await;
            release.notify_one();
            respond(200, headers, format!("body {n}"))
        }
    })
    .await;
    let front = held_front(&origin, "").await;
    (origin, front)
}

type Pending = tokio::task::JoinHandle<common::Reply>;

/// Starts `count` GETs of `url` at once, each in its own task.
fn spawn_gets(url: &str, count: usize) -> Vec<Pending> {
    (0..count)
        .map(|_| {
            let url = url.to_string();
            tokio::spawn(async move { get(&url).await })
        })
        .collect()
}

/// Sends a first GET of `url`, waits until it reaches the held `origin`,
/// then sends `waiters` more and waits until all of them have joined its
/// fill. They go in waves of at most 100, each waited for: more connections
/// at once than Larder's listen backlog (128) would leave some to the
/// kernel's SYN retries, a second or more later.
async fn pile_up(front: &Larder, origin: &Origin, url: &str, waiters: usize) -> Vec<Pending> {
    let mut requests = spawn_gets(url, 1);
    wait_until("the leader reaches the origin", || origin.hits() == 1).await;
    while requests.len() <= waiters {
        let wave = (waiters + 1 - requests.len()).min(100);
        requests.extend(spawn_gets(url, wave));
        joined(front, url, (requests.len() - 1) as u64).await;
    }
    requests
}

#[tokio::test]
async fn concurrent_misses_make_one_upstream_request() {
    let release = Arc::new(Notify::new());
    let (origin, front) = gated(&[("cache-control", "max-age=60")], Arc::clone(&release)).await;
    let url = front.url("/co");
    let requests = pile_up(&front, &origin, &url, 199).await;
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
    assert_eq!(collapsed, 199, "every request but the leader's joined it");
}

#[tokio::test]
async fn private_responses_are_not_shared_between_waiters() {
    let release = Arc::new(Notify::new());
    let (origin, front) = gated(
        &[("cache-control", "private, max-age=60")],
        Arc::clone(&release),
    )
    .await;
    let url = front.url("/priv");
    let requests = pile_up(&front, &origin, &url, 4).await;
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
) -> (Origin, Larder) {
    setup(move |_, _| {
        let release = Arc::clone(&release);
        async move {
            let (body, response) = streamed(200, headers);
            tokio::spawn(async move {
                body.chunk("first-").await;
                release.notified().await;
                body.chunk("last").await;
            });
            response
        }
    })
    .await
}

/// GETs `url` and reads the response's first chunk; the rest of the body
/// stays to be read.
async fn first_chunk(url: &str) -> (Bytes, Incoming) {
    tokio::time::timeout(DEADLINE, async {
        let mut body = common::open("GET", url, &[], Bytes::new())
            .await
            .into_body();
        let frame = body
            .frame()
            .await
            .expect("a first chunk")
            .expect("a chunk, not an error");
        (frame.into_data().expect("a data frame"), body)
    })
    .await
    .expect("first chunk in time")
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
    let (origin, _) =
        two_part_origin(Arc::clone(&release), &[("cache-control", "max-age=60")]).await;
    // Connections served on this test's thread, where the access log is
    // captured.
    let options = larder::app::Options {
        connections_on_caller: true,
        ..Default::default()
    };
    let front = common::start_larder_with(&larder_yaml(&origin.url(), "", ""), options).await;
    let cached_only = [("cache-control", "only-if-cached")];
    let url = front.url("/left");
    // The probe is a 504 from the cache: no origin request, nothing stored.
    let access_log = AccessLog::capture(async || {
        get_with(&url, &cached_only).await;
    })
    .await;
    let (_, body) = first_chunk(&url).await;
    drop(body);
    // Larder logs a request when its response body is dropped.
    wait_until("Larder to log the client's departure", || {
        access_log
            .lines()
            .iter()
            .any(|line| line.contains("path=/left") && line.contains("complete=false"))
    })
    .await;
    release.notify_one();
    eventually("the abandoned fill to be completed", async || {
        let reply = get_with(&url, &cached_only).await;
        if reply.status != StatusCode::OK {
            return false;
        }
        assert_eq!(reply.text(), "first-last");
        true
    })
    .await;
    assert_eq!(origin.hits(), 1);
}

#[tokio::test]
async fn upstream_abort_mid_body_truncates_the_client_and_stores_nothing() {
    let die = Arc::new(Notify::new());
    let origin_dies = Arc::clone(&die);
    let (origin, front) = setup(move |_, _| {
        let dies = Arc::clone(&origin_dies);
        async move {
            // The head and first chunk go out before the origin dies.
            let (body, response) = streamed(
                200,
                &[("cache-control", "max-age=60"), ("content-length", "100")],
            );
            tokio::spawn(async move {
                body.chunk("partial").await;
                dies.notified().await;
                body.fail("origin died").await;
            });
            response
        }
    })
    .await;
    let (first, body) = first_chunk(&front.url("/trunc")).await;
    assert_eq!(first, "partial");
    die.notify_one();
    assert!(
        rest(body).await.is_err(),
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
        send("PURGE", &front.url("/pu"), &[], "").await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );

    let denied = "      purge:\n        allow: [\"10.0.0.0/8\"]\n";
    let front = front_with(&origin, denied, "").await;
    assert_eq!(
        send("PURGE", &front.url("/pu"), &[], "").await.status,
        StatusCode::FORBIDDEN
    );

    let allowed = "      purge:\n        allow: [\"127.0.0.1/32\"]\n";
    let front = front_with(&origin, allowed, "").await;
    get(&front.url("/pu")).await;
    let purged = send("PURGE", &front.url("/pu"), &[], "").await;
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
        respond(
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
    let blog_1 = format!("http://{host}/blog/1");
    assert_eq!(purge(&front, serde_json::json!({ "url": blog_1 })).await, 2);
    assert_eq!(
        purge(&front, serde_json::json!({ "tag": "posts" })).await,
        2
    );
    assert_eq!(
        purge(&front, serde_json::json!({ "prefix": "/shop/" })).await,
        2
    );
    let again = get_with(&front.url("/shop/1"), &[("accept", "a")]).await;
    assert!(again.cache_status().contains("uri-miss"));
}

// ---------------------------------------------------------------- size limits

#[tokio::test]
async fn objects_over_max_object_size_stream_through_uncached() {
    let origin = start_origin(|_| async move {
        respond(200, &[("cache-control", "max-age=60")], "x".repeat(4096))
    })
    .await;
    let front = front_with(&origin, "", "cache:\n  max_object_size: 1024\n").await;
    assert_eq!(get(&front.url("/big")).await.body.len(), 4096);
    assert_eq!(get(&front.url("/big")).await.body.len(), 4096);
    assert_eq!(origin.hits(), 2);
}

#[tokio::test]
async fn memory_stays_bounded_under_a_flood_of_keys() {
    let origin = start_origin(|_| async move {
        respond(
            200,
            &[("cache-control", "max-age=600")],
            "y".repeat(16 * 1024),
        )
    })
    .await;
    let bound: u64 = 1024 * 1024;
    // Real config validation wants max_object_size <= max_size.
    let cache = format!("cache:\n  max_size: {bound}\n  max_object_size: {bound}\n");
    let front = front_with(&origin, "", &cache).await;
    for i in 0..500 {
        get(&front.url(&format!("/flood/{i}"))).await;
    }
    // The admin API runs moka's pending tasks first: the counts are exact.
    let state = cache_state(&front).await;
    let bytes = state["bytes"].as_u64().expect("bytes");
    let entries = state["entries"].as_u64().expect("entries");
    assert!(bytes <= bound, "{bytes} > {bound}");
    assert!(entries * 16 * 1024 <= bound);
    assert!(entries > 10, "the cache still holds entries");
}

#[tokio::test]
async fn a_purge_during_a_fill_is_not_undone_by_it() {
    let release = Arc::new(Notify::new());
    let (origin, front) =
        two_part_origin(Arc::clone(&release), &[("cache-control", "max-age=60")]).await;
    let (_, body) = first_chunk(&front.url("/racing")).await;
    purge(&front, serde_json::json!({ "url": front.url("/racing") })).await;
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

#[tokio::test]
async fn larder_serves_hits_and_labels_them() {
    let origin =
        start_origin(|_| async move { respond(200, &[("cache-control", "max-age=60")], "hello") })
            .await;
    let larder = front(&origin).await;
    let first = get(&larder.url("/hello")).await;
    assert!(first.cache_status().contains("fwd=uri-miss"));
    let second = get(&larder.url("/hello")).await;
    assert_eq!(second.text(), "hello");
    assert!(second.cache_status().contains("hit"));
    assert!(second.header("age").is_some());
    assert_eq!(origin.hits(), 1);
    larder.stop().await;
}

#[tokio::test]
async fn admin_purge_needs_the_token_and_removes_by_url_prefix_and_tag() {
    let origin = start_origin(|request| async move {
        let tag = if request.uri().path().starts_with("/news") {
            "news"
        } else {
            "other"
        };
        respond(
            200,
            &[("cache-control", "max-age=60"), ("cache-tag", tag)],
            "x",
        )
    })
    .await;
    let larder = front(&origin).await;
    for path in ["/news/1", "/news/2", "/shop/1", "/shop/2"] {
        get(&larder.url(path)).await;
    }
    let purge = |body: String, token: Option<&'static str>| {
        let url = larder.admin_url("/purge");
        async move {
            let auth = token.map(|t| format!("Bearer {t}"));
            let mut headers = vec![("content-type", "application/json")];
            if let Some(auth) = &auth {
                headers.push(("authorization", auth.as_str()));
            }
            send("POST", &url, &headers, body).await
        }
    };
    let refused = purge(r#"{"tag":"news"}"#.to_string(), None).await;
    assert_eq!(refused.status, 401);
    let by_tag = purge(r#"{"tag":"news"}"#.to_string(), Some(ADMIN_TOKEN)).await;
    assert_eq!(by_tag.json()["purged"], 2);
    let by_url = purge(
        format!(r#"{{"url":"{}"}}"#, larder.url("/shop/1")),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(by_url.json()["purged"], 1);
    let by_prefix = purge(r#"{"prefix":"/shop/"}"#.to_string(), Some(ADMIN_TOKEN)).await;
    assert_eq!(by_prefix.json()["purged"], 1);
    for path in ["/news/1", "/shop/1", "/shop/2"] {
        let again = get(&larder.url(path)).await;
        assert!(again.cache_status().contains("uri-miss"), "{path}");
    }
    larder.stop().await;
}

#[tokio::test]
async fn purge_method_through_larder_for_allowed_clients() {
    let origin =
        start_origin(|_| async move { respond(200, &[("cache-control", "max-age=60")], "x") })
            .await;
    let route = "      purge:\n        allow: [\"127.0.0.0/8\"]\n";
    let larder = front_with(&origin, route, "").await;
    get(&larder.url("/p")).await;
    let purged = send("PURGE", &larder.url("/p"), &[], "").await;
    assert_eq!(purged.status, 200);
    assert_eq!(purged.json()["purged"], 1);
    get(&larder.url("/p")).await;
    assert_eq!(origin.hits(), 2);
    larder.stop().await;
}

#[tokio::test]
async fn stale_if_error_survives_a_reload_onto_a_dead_upstream() {
    let origin = start_origin(|_| async move {
        dated(
            200,
            &[("cache-control", "max-age=60, stale-if-error=60")],
            STALE,
            "kept",
        )
    })
    .await;
    let larder = front(&origin).await;
    get(&larder.url("/sie")).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    larder
        .reload(&larder_yaml(&dead_url, "", ""))
        .await
        .unwrap();
    let stale = get(&larder.url("/sie")).await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.text(), "kept");
    assert!(stale.cache_status().contains("stale-if-error"));
    larder.stop().await;
}

// ---------------------------------------------------------------- more sharing rules and keys

/// An origin sending "first-" and then nothing until its body is dropped,
/// which it records.
async fn origin_noticing_abandon(cache_control: &'static str) -> (Origin, Arc<AtomicBool>) {
    let upstream_gone = Arc::new(AtomicBool::new(false));
    let seen_gone = Arc::clone(&upstream_gone);
    let origin = start_origin(move |_| {
        let gone = Arc::clone(&seen_gone);
        async move {
            let (body, response) = streamed(200, &[("cache-control", cache_control)]);
            tokio::spawn(async move {
                body.chunk("first-").await;
                body.closed().await;
                gone.store(true, Ordering::SeqCst);
            });
            response
        }
    })
    .await;
    (origin, upstream_gone)
}

#[tokio::test]
async fn a_fill_that_outgrew_max_object_size_is_abandoned_when_its_last_client_leaves() {
    let (origin, upstream_gone) = origin_noticing_abandon("max-age=60").await;
    let front = front_with(&origin, "", "cache:\n  max_object_size: 4\n").await;
    let (first, body) = first_chunk(&front.url("/abandon")).await;
    assert_eq!(first, "first-");
    assert!(!upstream_gone.load(Ordering::SeqCst));
    drop(body);
    wait_until("the upstream body to be dropped", || {
        upstream_gone.load(Ordering::SeqCst)
    })
    .await;
}

#[tokio::test]
async fn an_unshared_response_is_dropped_upstream_when_its_client_leaves() {
    let (origin, upstream_gone) = origin_noticing_abandon("private").await;
    let front = front(&origin).await;
    let (_, body) = first_chunk(&front.url("/abandon")).await;
    drop(body);
    wait_until("the upstream body to be dropped", || {
        upstream_gone.load(Ordering::SeqCst)
    })
    .await;
}

#[tokio::test]
async fn waiters_with_other_vary_values_fetch_on_their_own() {
    let release = Arc::new(Notify::new());
    let gate = Arc::clone(&release);
    let origin = start_numbered_origin(move |request, _| {
        let gate = Arc::clone(&gate);
        async move {
            gate.notified().await;
            gate.notify_one();
            let language = request
                .headers()
                .get("accept-language")
                .map(|v| v.to_str().unwrap_or("").to_string())
                .unwrap_or_default();
            respond(
                200,
                &[("cache-control", "max-age=60"), ("vary", "accept-language")],
                language,
            )
        }
    })
    .await;
    let front = held_front(&origin, "").await;
    let url = front.url("/lang");
    let english = {
        let url = url.clone();
        tokio::spawn(async move { get_with(&url, &[("accept-language", "en")]).await })
    };
    wait_until("the leader reaches the origin", || origin.hits() == 1).await;
    let french = {
        let url = url.clone();
        tokio::spawn(async move { get_with(&url, &[("accept-language", "fr")]).await })
    };
    joined(&front, &url, 1).await;
    release.notify_one();
    assert_eq!(english.await.unwrap().text(), "en");
    assert_eq!(french.await.unwrap().text(), "fr");
    assert_eq!(origin.hits(), 2);
}

#[tokio::test]
async fn route_key_rules_share_or_split_entries() {
    let origin = start_numbered_origin(|_, n| async move {
        respond(200, &[("cache-control", "max-age=60")], format!("body {n}"))
    })
    .await;
    let key = "      key:\n        ignore_query: [utm_source]\n        sort_query: true\n        headers: [x-tenant]\n";
    let front = front_with(&origin, key, "").await;
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
    assert_eq!(
        purge(
            &front,
            serde_json::json!({ "url": front.url("/k?a=1&b=2") })
        )
        .await,
        2
    );
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
    purge(
        &front,
        serde_json::json!({ "url": front.url("/unrelated") }),
    )
    .await;
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
    front
        .reload(&larder_yaml(
            &origin.url(),
            "",
            "cache:\n  max_size: 64MiB\n",
        ))
        .await
        .unwrap();
    let hit = get(&front.url("/resize")).await;
    assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
    assert_eq!(origin.hits(), 1);
}

#[tokio::test]
async fn concurrent_requests_for_an_object_too_big_to_store_still_share_one_fetch() {
    let release = Arc::new(Notify::new());
    let gate = Arc::clone(&release);
    let origin = start_origin(move |_| {
        let gate = Arc::clone(&gate);
        async move {
            gate.notified().await;
            gate.notify_one();
            respond(200, &[("cache-control", "max-age=60")], "z".repeat(4096))
        }
    })
    .await;
    let front = held_front(&origin, "cache:\n  max_object_size: 1024\n").await;
    let url = front.url("/big-herd");
    let requests = pile_up(&front, &origin, &url, 4).await;
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
    get(&url).await;
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
            return respond(304, &[("etag", "\"r1\"")], "");
        }
        respond(
            200,
            &[("cache-control", "max-age=60"), ("etag", "\"r1\"")],
            format!("body {n}"),
        )
    })
    .await;
    get(&front.url("/ccreq")).await;
    let validated = get_with(&front.url("/ccreq"), &[("cache-control", "no-cache")]).await;
    assert_eq!(validated.text(), "body 1");
    assert_eq!(
        origin.last_request().header("if-none-match"),
        Some("\"r1\"")
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
    // The first response arrives stale; the revalidation brings a fresh one.
    let (origin, front) = setup(|_, n| async move {
        let date = if n == 1 { STALE } else { 0 };
        dated(
            200,
            &[("cache-control", "max-age=60")],
            date,
            format!("body {n}"),
        )
    })
    .await;
    let methods = || -> Vec<String> {
        origin
            .requests()
            .iter()
            .map(|seen| seen.method.to_string())
            .collect()
    };
    get(&front.url("/hs")).await;
    let head = send("HEAD", &front.url("/hs"), &[], "").await;
    assert!(head.body.is_empty());
    assert!(
        head.cache_status().contains("fwd=stale"),
        "{}",
        head.cache_status()
    );
    assert_eq!(methods(), vec!["GET", "GET"]);
    // The GET fill behind the HEAD stored the new body (the next GET either
    // hits it or joins that fill while it commits).
    let refreshed = get(&front.url("/hs")).await;
    assert_eq!(refreshed.text(), "body 2");
    assert_eq!(methods().len(), 2);
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
    // The first response arrives stale and the 304 names another ETag.
    let (origin, front) = setup(|request, n| async move {
        if request.headers().contains_key("if-none-match") {
            return respond(
                304,
                &[("etag", "\"v2\""), ("cache-control", "max-age=60")],
                "",
            );
        }
        let (etag, date) = if n == 1 {
            ("\"v1\"", STALE)
        } else {
            ("\"v2\"", 0)
        };
        dated(
            200,
            &[("etag", etag), ("cache-control", "max-age=60")],
            date,
            format!("body {n}"),
        )
    })
    .await;
    get(&front.url("/mismatch")).await;
    let reply = get(&front.url("/mismatch")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "body 3", "the full response, fetched again");
    assert_eq!(reply.header("etag"), Some("\"v2\""));
    assert_eq!(origin.hits(), 3);
}

// ---------------------------------------------------------------- counts and the clock

/// The cache's per-instance counts, as the admin `GET /cache` reports them.
async fn stats(front: &Larder) -> serde_json::Value {
    cache_state(front).await["stats"].clone()
}

#[tokio::test]
async fn a_just_stale_answer_for_an_unreachable_origin_is_counted_as_disconnected() {
    // 65 s old with max-age=60: 5 s stale, inside the 10 s disconnected grace.
    let (origin, front) = fixed_dated(200, &[("cache-control", "max-age=60")], -65).await;
    get(&front.url("/grace")).await;
    origin.stop().await;
    let reply = get(&front.url("/grace")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.cache_status().contains("detail=origin-unreachable"),
        "{}",
        reply.cache_status()
    );
    let stats = stats(&front).await;
    assert_eq!(stats["stale_served"]["disconnected"], 1, "{stats}");
    assert_eq!(stats["requests"]["stale"], 1, "{stats}");
    // The Prometheus counter has the label too (it was never registered).
    let metrics = front.admin("GET", "/metrics", "").await.text();
    assert!(
        metrics.contains(r#"larder_cache_stale_served_total{reason="disconnected"}"#),
        "{metrics}"
    );
}

/// A raw TCP origin that reads each request head, waits for `release`,
/// then closes the connection without answering.
async fn hanging_up_origin(release: Arc<Notify>) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&heads);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (release, counted) = (Arc::clone(&release), Arc::clone(&counted));
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buffer = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buffer[..n]),
                    }
                }
                counted.fetch_add(1, Ordering::SeqCst);
                release.notified().await;
                release.notify_one();
            });
        }
    });
    (addr, heads)
}

#[tokio::test]
async fn waiters_of_a_failed_leader_are_counted_as_errors() {
    let release = Arc::new(Notify::new());
    let (addr, heads) = hanging_up_origin(Arc::clone(&release)).await;
    let front =
        common::start_larder(&yaml_with_timeout(&format!("http://{addr}"), "30s", "", "")).await;
    let url = front.url("/doomed");
    let mut requests = spawn_gets(&url, 1);
    wait_until("the leader reaches the origin", || {
        heads.load(Ordering::SeqCst) == 1
    })
    .await;
    requests.extend(spawn_gets(&url, 3));
    joined(&front, &url, 3).await;
    release.notify_one();
    for request in requests {
        let reply = request.await.unwrap();
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    }
    let stats = stats(&front).await;
    assert_eq!(
        stats["requests"]["error"], 4,
        "the leader and its three waiters: {stats}"
    );
    assert_eq!(stats["coalesced"], 3, "{stats}");
}

#[tokio::test]
async fn a_moved_clock_makes_a_stored_response_stale_without_waiting() {
    let clock = Arc::new(larder::cache::ManualClock::default());
    let origin = start_numbered_origin(|_, n| async move {
        respond(200, &[("cache-control", "max-age=60")], format!("body {n}"))
    })
    .await;
    let options = larder::app::Options {
        clock: clock.clone(),
        ..Default::default()
    };
    let front = common::start_larder_with(&larder_yaml(&origin.url(), "", ""), options).await;
    get(&front.url("/clock")).await;
    let fresh = get(&front.url("/clock")).await;
    assert!(
        fresh.cache_status().contains("hit"),
        "{}",
        fresh.cache_status()
    );
    assert_eq!(origin.hits(), 1);
    clock.advance(std::time::Duration::from_secs(61));
    let stale = get(&front.url("/clock")).await;
    assert_eq!(stale.text(), "body 2");
    assert!(
        stale.cache_status().contains("fwd=stale"),
        "{}",
        stale.cache_status()
    );
    assert_eq!(origin.hits(), 2);
}

// ---------------------------------------------------------------- targeted Cache-Control (RFC 9213)

/// Two GETs of one path from a Larder (top-level lines `global`) in front
/// of an origin answering with `headers`: the second reply and how many
/// requests reached the origin.
async fn twice_with(headers: &[(&str, &str)], global: &str) -> (Reply, usize) {
    let headers: Arc<Vec<(String, String)>> = Arc::new(
        headers
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect(),
    );
    let origin = start_numbered_origin(move |_, n| {
        let headers = Arc::clone(&headers);
        async move {
            let pairs: Vec<(&str, &str)> = headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str()))
                .collect();
            respond(200, &pairs, format!("body {n}"))
        }
    })
    .await;
    let front = front_with(&origin, "", global).await;
    let first = get(&front.url("/targeted")).await;
    assert_eq!(first.status, 200);
    let second = get(&front.url("/targeted")).await;
    (second, origin.hits())
}

#[tokio::test]
async fn cdn_cache_control_takes_precedence_over_cache_control_and_both_pass_through() {
    let (reply, hits) = twice_with(
        &[
            ("cache-control", "no-store"),
            ("cdn-cache-control", "max-age=60"),
        ],
        "",
    )
    .await;
    assert_eq!(hits, 1, "stored by CDN-Cache-Control despite no-store");
    assert_eq!(reply.text(), "body 1");
    assert_eq!(
        reply.header("cache-control"),
        Some("no-store"),
        "for browsers"
    );
    assert_eq!(reply.header("cdn-cache-control"), Some("max-age=60"));

    let (_, hits) = twice_with(
        &[
            ("cache-control", "max-age=60"),
            ("cdn-cache-control", "no-store"),
        ],
        "",
    )
    .await;
    assert_eq!(hits, 2, "CDN-Cache-Control: no-store wins over max-age=60");
}

#[tokio::test]
async fn larder_cache_control_comes_first_in_the_target_list() {
    let (_, hits) = twice_with(
        &[
            ("cdn-cache-control", "max-age=60"),
            ("larder-cache-control", "no-store"),
        ],
        "",
    )
    .await;
    assert_eq!(hits, 2, "Larder-Cache-Control: no-store wins");
    let (reply, hits) = twice_with(
        &[
            ("cache-control", "private"),
            ("cdn-cache-control", "no-store"),
            ("larder-cache-control", "max-age=60"),
        ],
        "",
    )
    .await;
    assert_eq!(hits, 1, "Larder-Cache-Control: max-age=60 wins");
    assert_eq!(reply.text(), "body 1");
}

#[tokio::test]
async fn an_invalid_targeted_field_is_ignored_as_a_whole() {
    // Not structured-field dictionaries (no value after `=`; an uppercase
    // key): the field counts as absent and Cache-Control rules.
    for invalid in ["no-store, max-age=", "No-Store"] {
        let (_, hits) = twice_with(
            &[
                ("cache-control", "max-age=60"),
                ("cdn-cache-control", invalid),
            ],
            "",
        )
        .await;
        assert_eq!(hits, 1, "{invalid:?} ignored: stored by Cache-Control");
    }
    // An invalid Larder-Cache-Control falls through to CDN-Cache-Control.
    let (_, hits) = twice_with(
        &[
            ("cache-control", "max-age=60"),
            ("larder-cache-control", "\"max-age=60\""),
            ("cdn-cache-control", "no-store"),
        ],
        "",
    )
    .await;
    assert_eq!(hits, 2, "the next field on the list applies");
}

#[tokio::test]
async fn a_targeted_field_makes_expires_irrelevant() {
    // must-revalidate alone gives no lifetime; Expires would give an hour,
    // but a cache using a targeted field ignores it (RFC 9213 section 2.1).
    let in_an_hour = http_date(3600);
    let (_, hits) = twice_with(
        &[
            ("cdn-cache-control", "must-revalidate"),
            ("expires", &in_an_hour),
        ],
        "",
    )
    .await;
    assert_eq!(hits, 2, "not fresh by Expires");
    let (_, hits) = twice_with(&[("expires", &in_an_hour)], "").await;
    assert_eq!(hits, 1, "without the targeted field Expires applies");
}

#[tokio::test]
async fn targeted_fields_are_removed_only_when_configured_and_the_list_is_configurable() {
    let (reply, hits) = twice_with(
        &[
            ("cache-control", "no-store"),
            ("cdn-cache-control", "max-age=60"),
            ("larder-cache-control", "max-age=60"),
        ],
        "cache:\n  remove_targeted_fields: true\n",
    )
    .await;
    assert_eq!(hits, 1);
    assert_eq!(reply.header("cdn-cache-control"), None);
    assert_eq!(reply.header("larder-cache-control"), None);
    assert_eq!(reply.header("cache-control"), Some("no-store"));

    // A target list of one other field: CDN-Cache-Control is only passed on.
    let (reply, hits) = twice_with(
        &[
            ("cache-control", "max-age=60"),
            ("cdn-cache-control", "no-store"),
            ("edge-control", "max-age=60"),
        ],
        "cache:\n  targeted_fields: [Edge-Control]\n",
    )
    .await;
    assert_eq!(hits, 1, "Edge-Control: max-age=60 applies");
    assert_eq!(reply.header("cdn-cache-control"), Some("no-store"));
    let (_, hits) = twice_with(
        &[
            ("cache-control", "max-age=60"),
            ("edge-control", "no-store"),
        ],
        "cache:\n  targeted_fields: []\n",
    )
    .await;
    assert_eq!(hits, 1, "with no target list Cache-Control rules");
}
