//! The admin listener over real sockets: open health endpoints, the bearer
//! token (401 without it, 403 when none is configured), metrics, sources and
//! purge through the cache.

mod common;

use std::time::{Duration, Instant};

use common::{Reply, assert_problem, get, get_with, respond, send, start_larder, start_origin};

const TOKEN: &str = "s3cret-token";

fn bearer() -> (&'static str, String) {
    ("authorization", format!("Bearer {TOKEN}"))
}

async fn admin_get(url: &str) -> Reply {
    let (name, value) = bearer();
    get_with(url, &[(name, value.as_str())]).await
}

#[tokio::test]
async fn health_and_ready_answer_without_a_token() {
    let larder = start_larder(&format!("admin:\n  token: {TOKEN}\nroutes: []\n")).await;
    let health = get(&larder.admin_url("/health")).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");
    let ready = get(&larder.admin_url("/ready")).await;
    assert_eq!(ready.status, 200);
    larder.stop().await;
}

#[tokio::test]
async fn endpoints_refuse_a_missing_or_wrong_token_with_401() {
    let larder = start_larder(&format!("admin:\n  token: {TOKEN}\nroutes: []\n")).await;
    let missing = get(&larder.admin_url("/metrics")).await;
    assert_problem(&missing, 401);
    assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
    let wrong = get_with(
        &larder.admin_url("/metrics"),
        &[("authorization", "Bearer not-it")],
    )
    .await;
    assert_problem(&wrong, 401);
    let purge = send(
        "POST",
        &larder.admin_url("/purge"),
        &[("content-type", "application/json")],
        r#"{"prefix": "/"}"#,
    )
    .await;
    assert_problem(&purge, 401);
    assert_eq!(admin_get(&larder.admin_url("/metrics")).await.status, 200);
    larder.stop().await;
}

#[tokio::test]
async fn without_a_configured_token_protected_endpoints_answer_403() {
    let larder = start_larder("admin: {}\nroutes: []\n").await;
    let reply = admin_get(&larder.admin_url("/metrics")).await;
    assert_problem(&reply, 403);
    assert!(reply.text().contains("admin.token"), "{}", reply.text());
    assert_eq!(get(&larder.admin_url("/health")).await.status, 200);
    larder.stop().await;
}

#[tokio::test]
async fn metrics_count_proxied_requests_by_route_and_status() {
    let origin = start_origin(|_| async { respond(200, &[], "ok") }).await;
    let yaml = format!(
        "admin:\n  token: {TOKEN}\nupstreams:\n  app: {{ servers: [\"{}\"] }}\nroutes:\n  - match: {{ path_prefix: /metrics-test/ }}\n    upstream: app\n",
        origin.url()
    );
    let larder = start_larder(&yaml).await;
    for _ in 0..3 {
        assert_eq!(get(&larder.url("/metrics-test/a")).await.status, 200);
    }
    let reply = admin_get(&larder.admin_url("/metrics")).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain"))
    );
    let text = reply.text();
    let requests = text
        .lines()
        .find(|line| {
            line.starts_with("larder_requests_total{")
                && line.contains(r#"route="/metrics-test/""#)
                && line.contains(r#"status="200""#)
        })
        .unwrap_or_else(|| panic!("no request counter for the route:\n{text}"));
    let count: f64 = requests
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unparsable line {requests}"));
    // Tests share one process-wide recorder; this route label is only used here.
    assert_eq!(count, 3.0, "{requests}");
    assert!(
        text.contains("larder_request_duration_seconds_bucket"),
        "durations must be histograms:\n{text}"
    );
    assert!(text.contains("larder_upstream_duration_seconds_bucket{"));
    assert!(text.contains("# HELP larder_requests_total "), "{text}");
    larder.stop().await;
}

#[tokio::test]
async fn source_values_are_open_but_their_status_needs_the_token() {
    let yaml = format!(
        "admin:\n  token: {TOKEN}\nroutes: []\nsources:\n  greeting:\n    rule: '@every 1h'\n    static: {{ value: hello }}\n"
    );
    let larder = start_larder(&yaml).await;
    assert_problem(&get(&larder.admin_url("/sources")).await, 401);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // cachepump served values to anyone; so does the admin listener.
        let reply = get(&larder.admin_url("/?key=greeting")).await;
        if reply.status == 200 {
            assert_eq!(reply.text(), "hello");
            break;
        }
        assert!(Instant::now() < deadline, "source never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = admin_get(&larder.admin_url("/sources")).await;
    assert_eq!(status.status, 200);
    assert!(status.text().contains("greeting"), "{}", status.text());
    larder.stop().await;
}

#[tokio::test]
async fn purge_by_url_prefix_and_tag_empties_the_cache() {
    let origin = start_origin(|request| async move {
        let tag = if request.uri().path().starts_with("/tagged") {
            "blue"
        } else {
            "red"
        };
        respond(
            200,
            &[("cache-control", "max-age=300"), ("surrogate-key", tag)],
            format!("body of {}", request.uri().path()),
        )
    })
    .await;
    let yaml = format!(
        "admin:\n  token: {TOKEN}\nupstreams:\n  app: {{ servers: [\"{}\"] }}\nroutes:\n  - upstream: app\n    cache: {{ enabled: true }}\n",
        origin.url()
    );
    let larder = start_larder(&yaml).await;
    let url = larder.url("/items/1");
    get(&url).await;
    get(&url).await;
    assert_eq!(origin.hits(), 1, "the second request is a cache hit");

    let purge = |body: String| {
        let admin = larder.admin_url("/purge");
        async move {
            let (name, value) = bearer();
            send("POST", &admin, &[(name, value.as_str())], body).await
        }
    };
    let reply = purge(format!(r#"{{"url": "{url}"}}"#)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["purged"], 1);
    get(&url).await;
    assert_eq!(origin.hits(), 2, "purged by URL: fetched again");

    get(&larder.url("/tagged/a")).await;
    let reply = purge(r#"{"tag": "blue"}"#.to_string()).await;
    assert_eq!(reply.json()["purged"], 1);
    get(&larder.url("/tagged/a")).await;
    assert_eq!(origin.hits(), 4, "purged by tag: fetched again");

    get(&larder.url("/items/2")).await;
    let prefix = larder.url("/items/");
    let reply = purge(format!(r#"{{"prefix": "{prefix}"}}"#)).await;
    assert_eq!(reply.json()["purged"], 2, "both /items/ entries");
    get(&url).await;
    assert_eq!(origin.hits(), 6, "purged by prefix: fetched again");

    let reply = purge(r#"{"nonsense": 1}"#.to_string()).await;
    assert_problem(&reply, 400);
    let reply = purge(r#"{"url": "a", "tag": "b"}"#.to_string()).await;
    assert_problem(&reply, 400);
    larder.stop().await;
}
