//! Scheduled sources, end to end: real origins on 127.0.0.1, real files,
//! Larder started in-process (cachepump mode) or `Sources` started alone for
//! the scheduling details. Every wait polls with a deadline; nothing sleeps
//! for a fixed time to let something happen.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{Origin, eventually, get, get_with, send, served, start_larder, start_origin, wasm};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use larder::http::body;
use larder::http::error::RequestError;
use larder::plugins::PluginHost;
use larder::sources::{SourceRead, Sources};

/// Starts only the sources of `yaml` (no listeners), as the server would.
async fn start_sources(yaml: &str) -> Arc<Sources> {
    let config = larder::config::load_str(yaml, "test.yml").unwrap_or_else(|e| panic!("{e}"));
    let plugins = PluginHost::load(&config.plugins, &config.plugin_limits)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    Sources::start(&config.sources, plugins, None)
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What a client gets for a source's answer or refusal.
async fn read(answer: Result<SourceRead, RequestError>) -> Answer {
    let answer = match answer {
        Ok(read) => read.response().await,
        Err(error) => Err(error),
    };
    let response = answer.unwrap_or_else(RequestError::into_response);
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut builder = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).expect("request")
}

async fn key(sources: &Sources, name: &str) -> Answer {
    read(sources.serve_by_key(&request("GET", &format!("/?key={name}"), &[]))).await
}

/// Waits until `name` answers 200 and returns the body.
async fn value_of(sources: &Sources, name: &str) -> String {
    eventually(&format!("a value for {name}"), || async {
        let answer = key(sources, name).await;
        (answer.status == StatusCode::OK).then(|| answer.text())
    })
    .await
}

/// The status entry of one source.
fn status(sources: &Sources, name: &str) -> serde_json::Value {
    let all = sources.status();
    all["sources"]
        .as_array()
        .and_then(|list| list.iter().find(|s| s["name"] == name).cloned())
        .unwrap_or_else(|| panic!("{name} is not in the status: {all}"))
}

fn counter(sources: &Sources, name: &str, field: &str) -> u64 {
    status(sources, name)[field].as_u64().unwrap_or(0)
}

/// A request an origin received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// An origin that records every request and answers `status` with `body`.
async fn recording_origin(status: u16, body: &'static str) -> (Origin, Log) {
    let log: Log = Arc::default();
    let seen = log.clone();
    let origin = start_origin(move |request: Request<hyper::body::Incoming>| {
        let seen = seen.clone();
        async move {
            let (parts, incoming) = request.into_parts();
            let bytes = incoming
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            seen.lock().unwrap().push(Seen {
                method: parts.method.to_string(),
                path: parts.uri.to_string(),
                headers: parts.headers,
                body: bytes,
            });
            Response::builder()
                .status(status)
                .body(body::full(body))
                .unwrap()
        }
    })
    .await;
    (origin, log)
}

/// An origin whose answer the test can change while it runs.
async fn switchable_origin(initial: (u16, &str)) -> (Origin, Arc<Mutex<(u16, String)>>) {
    let answer = Arc::new(Mutex::new((initial.0, initial.1.to_string())));
    let current = answer.clone();
    let origin = start_origin(move |_request| {
        let (status, body) = current.lock().unwrap().clone();
        async move {
            Response::builder()
                .status(status)
                .body(body::full(body))
                .unwrap()
        }
    })
    .await;
    (origin, answer)
}

// ---------------------------------------------------------------------------
// cachepump's README examples, through a running Larder in cachepump mode.

#[tokio::test]
async fn readme_static_example_serves_both_keys() {
    let larder = start_larder(
        r#"
version: '1.0'
sources:
  hello:
    rule: '* * * * * *'
    static: 
      value: '{"data":"Hello world!"}'
  haelth_check:
    rule: '* * * * * *'
    static: 
      value: '{"status":200}'
"#,
    )
    .await;
    let hello = served(&larder.url("/?key=hello")).await;
    assert_eq!(hello.text(), r#"{"data":"Hello world!"}"#);
    assert_eq!(hello.header("content-type"), Some("application/json"));
    let health = served(&larder.url("/?key=haelth_check")).await;
    assert_eq!(health.text(), r#"{"status":200}"#);
    larder.stop().await;
}

#[tokio::test]
async fn readme_http_example_posts_the_sql_with_basic_auth() {
    let (origin, log) = recording_origin(200, "673936523").await;
    let yaml = r#"
version: '1.0'
sources:
  count_202103:
    rule: '0 */2 * * * *'
    http:
      endpoint: ENDPOINT
      method: POST
      header:
      auth:
        user: admin
        password: 'adminadmin'
      body: >
        SELECT date, count(*) 
        FROM DB.Raw_Data
        PREWHERE toYYYYMM(date) = 202103
        GROUP BY date
        ORDER BY date
"#
    .replace("ENDPOINT", &origin.url());
    let larder = start_larder(&yaml).await;
    let answer = served(&larder.url("/?key=count_202103")).await;
    assert_eq!(answer.text(), "673936523");
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; charset=utf-8")
    );

    let seen = log.lock().unwrap()[0].clone();
    assert_eq!(seen.method, "POST");
    // base64("admin:adminadmin")
    assert_eq!(
        seen.headers.get("authorization").unwrap(),
        "Basic YWRtaW46YWRtaW5hZG1pbg=="
    );
    let sql = String::from_utf8_lossy(&seen.body).into_owned();
    assert!(sql.starts_with("SELECT date, count(*)"), "{sql:?}");
    assert!(
        sql.contains("FROM DB.Raw_Data PREWHERE toYYYYMM(date) = 202103 GROUP BY date"),
        "{sql:?}"
    );
    assert!(
        sql.ends_with("ORDER BY date\n"),
        "folded YAML ends in a newline: {sql:?}"
    );
    larder.stop().await;
}

#[tokio::test]
async fn readme_file_example_serves_the_csv_report() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("my_report_file.csv");
    let report =
        "date,user,count_events\n2022-01-01,user1,10\n2022-01-01,user2,14\n2022-01-03,user6,120\n";
    std::fs::write(&path, report).unwrap();
    let yaml = format!(
        r#"
version: '1.0'
sources:
  report_from_elt:
    rule: '0 */2 * * * *'
    file:
      path: {}
"#,
        path.display()
    );
    let larder = start_larder(&yaml).await;
    let answer = served(&larder.url("/?key=report_from_elt")).await;
    assert_eq!(answer.text(), report);
    assert_eq!(
        answer.header("content-type"),
        Some("text/csv; charset=utf-8")
    );
    larder.stop().await;
}

// ---------------------------------------------------------------------------
// cachepump's API answers, over HTTP.

#[tokio::test]
async fn api_answers_keep_cachepumps_statuses_and_texts() {
    let larder = start_larder(
        r#"
sources:
  hello:
    rule: '@every 1s'
    static: { value: 'hi' }
"#,
    )
    .await;
    served(&larder.url("/?key=hello")).await;
    let missing = get(&larder.url("/")).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(missing.text(), "Parametor 'key' is not found");
    let empty = get(&larder.url("/?key=")).await;
    assert_eq!(empty.status, StatusCode::BAD_REQUEST);
    assert_eq!(empty.text(), "Parametor 'key' is not found");
    let unknown = get(&larder.url("/?key=nope")).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.text(), "key is not found");
    let post = send("POST", &larder.url("/?key=hello"), &[], "x").await;
    assert_eq!(post.status, StatusCode::BAD_REQUEST);
    assert_eq!(post.text(), "Method is not supported");
    let health = get(&larder.url("/health")).await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.text(), r#"{"status":"ok"}"#);
    larder.stop().await;
}

#[tokio::test]
async fn head_answers_like_get_without_a_body() {
    let larder = start_larder(
        r#"
sources:
  hello:
    rule: '@every 1s'
    static: { value: '{"data":"Hello world!"}' }
"#,
    )
    .await;
    let got = served(&larder.url("/?key=hello")).await;
    let head = send("HEAD", &larder.url("/?key=hello"), &[], "").await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(head.header("etag"), got.header("etag"));
    assert_eq!(head.header("content-type"), Some("application/json"));
    assert_eq!(head.header("content-length"), Some("23"));
    larder.stop().await;
}

#[tokio::test]
async fn etag_revalidation_answers_304_over_http() {
    let larder = start_larder(
        r#"
sources:
  hello:
    rule: '@every 1s'
    static: { value: 'hi' }
"#,
    )
    .await;
    let first = served(&larder.url("/?key=hello")).await;
    let etag = first.header("etag").expect("an ETag").to_string();
    assert!(
        etag.starts_with('"') && etag.ends_with('"'),
        "strong ETag: {etag}"
    );
    let again = get_with(&larder.url("/?key=hello"), &[("if-none-match", &etag)]).await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    assert!(again.body.is_empty());
    let other = get_with(&larder.url("/?key=hello"), &[("if-none-match", "\"x\"")]).await;
    assert_eq!(other.status, StatusCode::OK);
    let last_modified = first
        .header("last-modified")
        .expect("Last-Modified")
        .to_string();
    let since = get_with(
        &larder.url("/?key=hello"),
        &[("if-modified-since", &last_modified)],
    )
    .await;
    assert_eq!(since.status, StatusCode::NOT_MODIFIED);
    larder.stop().await;
}

#[tokio::test]
async fn with_routes_a_source_is_served_at_its_route_and_by_key_on_the_admin_listener() {
    let larder = start_larder(
        r#"
admin:
  listen: 127.0.0.1:9901
  token: s3cret
routes:
  - match: { path_prefix: /reports/ }
    source: report
sources:
  report:
    rule: '@every 1s'
    static: { value: "a,b\n1,2\n" }
"#,
    )
    .await;
    let routed = served(&larder.url("/reports/today")).await;
    assert_eq!(routed.text(), "a,b\n1,2\n");
    assert_eq!(
        routed.header("content-type"),
        Some("text/csv; charset=utf-8")
    );
    assert!(routed.header("etag").is_some());
    // The proxy's admin API asks for the token on everything but /health and /ready.
    let auth = [("authorization", "Bearer s3cret")];
    let by_key = get_with(&larder.admin_url("/?key=report"), &auth).await;
    assert_eq!(by_key.status, StatusCode::OK);
    assert_eq!(by_key.body, routed.body);
    let status = get_with(&larder.admin_url("/sources"), &auth).await;
    assert_eq!(status.status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_slice(&status.body).expect("JSON status");
    assert_eq!(json["sources"][0]["name"], "report");
    assert_eq!(json["sources"][0]["kind"], "static");
    assert_eq!(json["sources"][0]["value_size"], 8);
    larder.stop().await;
}

// ---------------------------------------------------------------------------
// Reload, through a running Larder.

#[tokio::test]
async fn reload_adds_edits_and_removes_sources() {
    let larder = start_larder(
        r#"
sources:
  kept:
    rule: '@every 1s'
    static: { value: 'kept' }
  edited:
    rule: '@every 1s'
    static: { value: 'before' }
  removed:
    rule: '@every 1s'
    static: { value: 'gone soon' }
"#,
    )
    .await;
    for (name, value) in [
        ("kept", "kept"),
        ("edited", "before"),
        ("removed", "gone soon"),
    ] {
        let reply = served(&larder.url(&format!("/?key={name}"))).await;
        assert_eq!(reply.text(), value);
    }
    larder
        .reload(
            r#"
sources:
  kept:
    rule: '@every 1s'
    static: { value: 'kept' }
  edited:
    rule: '@every 1s'
    static: { value: 'after' }
  added:
    rule: '@every 1s'
    static: { value: 'new' }
"#,
        )
        .await
        .expect("reload");
    eventually("the edited value", || async {
        let reply = get(&larder.url("/?key=edited")).await;
        (reply.text() == "after").then_some(())
    })
    .await;
    eventually("the added source", || async {
        let reply = get(&larder.url("/?key=added")).await;
        (reply.text() == "new").then_some(())
    })
    .await;
    let removed = get(&larder.url("/?key=removed")).await;
    assert_eq!(
        removed.status,
        StatusCode::NOT_FOUND,
        "a removed key's value is deleted"
    );
    assert_eq!(get(&larder.url("/?key=kept")).await.text(), "kept");
    larder.stop().await;
}

#[tokio::test]
async fn a_broken_reload_keeps_the_running_sources() {
    let larder = start_larder(
        r#"
sources:
  hello:
    rule: '@every 1s'
    static: { value: 'still here' }
"#,
    )
    .await;
    served(&larder.url("/?key=hello")).await;
    let error = larder
        .reload(
            r#"
sources:
  hello:
    rule: '0 0 9 * * 8'
    static: { value: 'never' }
"#,
        )
        .await
        .expect_err("a rule with day-of-week 8 is refused");
    assert!(
        error.contains("day-of-week 8 is out of range 0-7"),
        "{error}"
    );
    let reply = get(&larder.url("/?key=hello")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "still here");
    larder.stop().await;
}

// ---------------------------------------------------------------------------
// The kinds and the scheduler, with `Sources` alone.

#[tokio::test]
async fn http_headers_replace_the_defaults_and_a_get_carries_its_body() {
    let (origin, log) = recording_origin(200, "ok").await;
    let sources = start_sources(&format!(
        r#"
sources:
  q:
    rule: '0 0 0 1 1 *'
    http:
      endpoint: {}/query?db=x
      header:
        X-Token: [abc, def]
        User-Agent: [reporting/1.0]
      body: 'SELECT 1'
"#,
        origin.url()
    ))
    .await;
    assert_eq!(value_of(&sources, "q").await, "ok");
    let seen = log.lock().unwrap()[0].clone();
    assert_eq!(seen.method, "GET", "an empty method means GET");
    assert_eq!(seen.path, "/query?db=x");
    let tokens: Vec<_> = seen.headers.get_all("x-token").iter().collect();
    assert_eq!(tokens, ["abc", "def"]);
    assert_eq!(seen.headers.get("user-agent").unwrap(), "reporting/1.0");
    assert!(
        seen.headers.get("authorization").is_none(),
        "no auth unless configured"
    );
    assert_eq!(seen.body, "SELECT 1", "the body is sent even with GET");
}

#[tokio::test]
async fn a_failing_origin_keeps_the_last_good_value() {
    let (origin, answer) = switchable_origin((200, "good")).await;
    let sources = start_sources(&format!(
        "sources:\n  s:\n    rule: '@every 1s'\n    http: {{ endpoint: '{}' }}\n",
        origin.url()
    ))
    .await;
    assert_eq!(value_of(&sources, "s").await, "good");
    *answer.lock().unwrap() = (503, "maintenance page".to_string());
    let failures_before = counter(&sources, "s", "failures");
    eventually("a failed run", || async {
        (counter(&sources, "s", "failures") > failures_before).then_some(())
    })
    .await;
    let served = key(&sources, "s").await;
    assert_eq!(served.status, StatusCode::OK);
    assert_eq!(
        served.text(),
        "good",
        "a 503 body must not replace the value"
    );
    let error = status(&sources, "s")["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains("503"), "{error}");

    *answer.lock().unwrap() = (200, "fresh".to_string());
    eventually("recovery", || async {
        (key(&sources, "s").await.text() == "fresh").then_some(())
    })
    .await;
    assert!(status(&sources, "s")["last_error"].is_null());
}

#[tokio::test]
async fn accept_status_widens_what_replaces_the_value() {
    let (origin, _log) = recording_origin(404, "not there").await;
    let sources = start_sources(&format!(
        "sources:\n  s:\n    rule: '0 0 0 1 1 *'\n    accept_status: [200, 404]\n    http: {{ endpoint: '{}' }}\n",
        origin.url()
    ))
    .await;
    assert_eq!(value_of(&sources, "s").await, "not there");
}

#[tokio::test]
async fn an_unreachable_endpoint_leaves_the_key_absent_and_says_why() {
    // Bind and drop a listener to get a port nobody answers on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sources = start_sources(&format!(
        "sources:\n  s:\n    rule: '0 0 0 1 1 *'\n    http: {{ endpoint: 'http://127.0.0.1:{port}/' }}\n"
    ))
    .await;
    let error = eventually("the error", || async {
        status(&sources, "s")["last_error"]
            .as_str()
            .map(str::to_string)
    })
    .await;
    assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");
    assert_eq!(key(&sources, "s").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_slow_origin_times_out_and_the_old_value_stays() {
    let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow_flag = slow.clone();
    let slow_origin = start_origin(move |_request| {
        let slow = slow_flag.load(Ordering::SeqCst);
        async move {
            if slow {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Response::new(body::full("quick answer"))
        }
    })
    .await;
    let sources = start_sources(&format!(
        "sources:\n  s:\n    rule: '@every 1s'\n    timeout: 300ms\n    http: {{ endpoint: '{}' }}\n",
        slow_origin.url()
    ))
    .await;
    assert_eq!(value_of(&sources, "s").await, "quick answer");
    slow.store(true, Ordering::SeqCst);
    let error = eventually("a timeout", || async {
        status(&sources, "s")["last_error"]
            .as_str()
            .filter(|e| e.contains("timeout"))
            .map(str::to_string)
    })
    .await;
    assert!(error.contains("300ms"), "{error}");
    assert_eq!(key(&sources, "s").await.text(), "quick answer");
}

#[tokio::test]
async fn a_failed_run_is_retried_with_backoff_before_the_next_tick() {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    // Fails twice, then answers: the retries (after 1 s, then 2 s) must bring
    // the value long before the rule's next tick (next New Year).
    let origin = start_origin(move |_request| {
        let attempt = counted.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            let status = if attempt <= 2 { 500 } else { 200 };
            Response::builder()
                .status(status)
                .body(body::full(format!("attempt {attempt}")))
                .unwrap()
        }
    })
    .await;
    let sources = start_sources(&format!(
        "sources:\n  s:\n    rule: '0 0 0 1 1 *'\n    http: {{ endpoint: '{}' }}\n",
        origin.url()
    ))
    .await;
    assert_eq!(value_of(&sources, "s").await, "attempt 3");
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    let entry = status(&sources, "s");
    assert_eq!(entry["failures"], 2);
    assert_eq!(entry["runs"], 3);
}

#[tokio::test]
async fn runs_never_overlap_and_busy_ticks_are_skipped() {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (now, peak) = (in_flight.clone(), most.clone());
    let origin = start_origin(move |_request| {
        let (now, peak) = (now.clone(), peak.clone());
        async move {
            let current = now.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(current, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(2500)).await;
            now.fetch_sub(1, Ordering::SeqCst);
            Response::new(body::full("slow"))
        }
    })
    .await;
    let sources = start_sources(&format!(
        "sources:\n  s:\n    rule: '* * * * * *'\n    http: {{ endpoint: '{}' }}\n",
        origin.url()
    ))
    .await;
    assert_eq!(value_of(&sources, "s").await, "slow");
    eventually("skipped ticks", || async {
        (counter(&sources, "s", "skipped") >= 2).then_some(())
    })
    .await;
    assert_eq!(
        most.load(Ordering::SeqCst),
        1,
        "the origin saw concurrent runs"
    );
    assert!(origin.hits() >= 1);
}

#[tokio::test]
async fn run_on_start_false_waits_for_the_first_tick() {
    let sources = start_sources(
        r#"
sources:
  eager:
    rule: '0 0 0 1 1 *'
    static: { value: 'now' }
  lazy:
    rule: '0 0 0 1 1 *'
    run_on_start: false
    static: { value: 'next year' }
  lazy_ticking:
    rule: '@every 1s'
    run_on_start: false
    static: { value: 'after a tick' }
"#,
    )
    .await;
    assert_eq!(value_of(&sources, "eager").await, "now");
    assert_eq!(value_of(&sources, "lazy_ticking").await, "after a tick");
    assert_eq!(key(&sources, "lazy").await.status, StatusCode::NOT_FOUND);
    assert_eq!(counter(&sources, "lazy", "runs"), 0);
}

#[tokio::test]
async fn cache_control_max_age_counts_down_to_the_next_run() {
    let sources = start_sources(
        r#"
sources:
  yearly:
    rule: '0 0 0 1 1 *'
    static: { value: 'y' }
  every_second:
    rule: '* * * * * *'
    static: { value: 's' }
"#,
    )
    .await;
    value_of(&sources, "yearly").await;
    value_of(&sources, "every_second").await;
    let yearly = key(&sources, "yearly").await;
    let max_age: u64 = yearly
        .header("cache-control")
        .and_then(|v| v.strip_prefix("max-age="))
        .and_then(|v| v.parse().ok())
        .expect("max-age");
    let now = chrono::Utc::now();
    let next_new_year = chrono::NaiveDate::from_ymd_opt(chrono::Datelike::year(&now) + 1, 1, 1)
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let expected = (next_new_year - now).num_seconds() as u64;
    assert!(
        max_age.abs_diff(expected) <= 2,
        "max-age {max_age}, expected about {expected}"
    );
    let often = key(&sources, "every_second").await;
    let max_age = often.header("cache-control").unwrap_or_default();
    assert!(matches!(max_age, "max-age=0" | "max-age=1"), "{max_age}");
}

#[tokio::test]
async fn unchanged_bytes_keep_etag_and_last_modified_across_runs() {
    let sources =
        start_sources("sources:\n  s:\n    rule: '* * * * * *'\n    static: { value: 'same' }\n")
            .await;
    value_of(&sources, "s").await;
    let first = key(&sources, "s").await;
    eventually("two more runs", || async {
        (counter(&sources, "s", "runs") >= 3).then_some(())
    })
    .await;
    let later = key(&sources, "s").await;
    assert_eq!(first.header("etag"), later.header("etag"));
    assert_eq!(first.header("last-modified"), later.header("last-modified"));
    let revalidated = read(sources.serve_by_key(&request(
        "GET",
        "/?key=s",
        &[("if-none-match", first.header("etag").unwrap())],
    )))
    .await;
    assert_eq!(revalidated.status, StatusCode::NOT_MODIFIED);
}

#[tokio::test]
async fn a_file_that_disappears_keeps_its_last_content() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.txt");
    std::fs::write(&path, "version 1").unwrap();
    let sources = start_sources(&format!(
        "sources:\n  f:\n    rule: '@every 1s'\n    file: {{ path: '{}' }}\n",
        path.display()
    ))
    .await;
    assert_eq!(value_of(&sources, "f").await, "version 1");
    std::fs::write(&path, "version 2").unwrap();
    eventually("the new content", || async {
        (key(&sources, "f").await.text() == "version 2").then_some(())
    })
    .await;
    std::fs::remove_file(&path).unwrap();
    let error = eventually("a read error", || async {
        status(&sources, "f")["last_error"]
            .as_str()
            .map(str::to_string)
    })
    .await;
    assert!(error.contains("data.txt"), "{error}");
    assert_eq!(key(&sources, "f").await.text(), "version 2");
}

#[tokio::test]
async fn provider_order_is_static_http_file_and_empty_static_is_unset() {
    let (origin, _log) = recording_origin(200, "from http").await;
    let sources = start_sources(&format!(
        r#"
sources:
  both:
    rule: '0 0 0 1 1 *'
    static: {{ value: 'from static' }}
    http: {{ endpoint: '{url}' }}
  empty_static:
    rule: '0 0 0 1 1 *'
    static: {{ value: '' }}
    http: {{ endpoint: '{url}' }}
  nothing:
    rule: '0 0 0 1 1 *'
"#,
        url = origin.url()
    ))
    .await;
    assert_eq!(value_of(&sources, "both").await, "from static");
    assert_eq!(value_of(&sources, "empty_static").await, "from http");
    let error = eventually("the unsupported source's error", || async {
        status(&sources, "nothing")["last_error"]
            .as_str()
            .map(str::to_string)
    })
    .await;
    assert!(error.contains("no supported provider"), "{error}");
    assert_eq!(status(&sources, "nothing")["kind"], "none");
}

#[tokio::test]
async fn redirects_are_followed_and_303_turns_a_post_into_a_get() {
    let (origin, log) = recording_origin(200, "final").await;
    let target = format!("{}/final", origin.url());
    let redirector = start_origin(move |_request| {
        let target = target.clone();
        async move {
            Response::builder()
                .status(303)
                .header("location", target)
                .body(body::empty())
                .unwrap()
        }
    })
    .await;
    let sources = start_sources(&format!(
        "sources:\n  r:\n    rule: '0 0 0 1 1 *'\n    http: {{ endpoint: '{}/start', method: POST, body: 'q' }}\n",
        redirector.url()
    ))
    .await;
    assert_eq!(value_of(&sources, "r").await, "final");
    let seen = log.lock().unwrap()[0].clone();
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.path, "/final");
    assert!(seen.body.is_empty());
}

#[tokio::test]
async fn credentials_stay_with_their_origin_across_redirects() {
    let (elsewhere, elsewhere_log) = recording_origin(200, "from elsewhere").await;
    let (home, home_log) = {
        let log: Log = Arc::default();
        let seen = log.clone();
        let away = format!("{}/final", elsewhere.url());
        let origin = start_origin(move |request: Request<hyper::body::Incoming>| {
            seen.lock().unwrap().push(Seen {
                method: request.method().to_string(),
                path: request.uri().to_string(),
                headers: request.headers().clone(),
                body: Bytes::new(),
            });
            // First a redirect within the origin, then one to another origin.
            let location = if request.uri().path() == "/start" {
                "/same".to_string()
            } else {
                away.clone()
            };
            async move {
                Response::builder()
                    .status(302)
                    .header("location", location)
                    .body(body::empty())
                    .unwrap()
            }
        })
        .await;
        (origin, log)
    };
    let sources = start_sources(&format!(
        "sources:\n  r:\n    rule: '0 0 0 1 1 *'\n    http:\n      endpoint: '{}/start'\n      auth: {{ user: u, password: secret }}\n      header: {{ x-api-key: [k3y], cookie: [session=1], x-trace: [t] }}\n      secret_headers: [x-api-key]\n",
        home.url()
    ))
    .await;
    assert_eq!(value_of(&sources, "r").await, "from elsewhere");
    let home_seen = home_log.lock().unwrap().clone();
    assert_eq!(home_seen.len(), 2);
    let same = &home_seen[1];
    assert_eq!(same.path, "/same");
    assert!(
        same.headers.contains_key("authorization"),
        "same origin keeps them"
    );
    assert_eq!(same.headers["x-api-key"], "k3y");
    let away = elsewhere_log.lock().unwrap()[0].clone();
    for secret in [
        "authorization",
        "cookie",
        "x-api-key",
        "proxy-authorization",
    ] {
        assert!(
            !away.headers.contains_key(secret),
            "{secret} followed the redirect to another origin: {:?}",
            away.headers
        );
    }
    assert_eq!(away.headers["x-trace"], "t", "other headers still go");
}

#[tokio::test]
async fn a_body_over_max_body_fails_the_run_and_keeps_the_value() {
    let (origin, answer) = switchable_origin((200, "small")).await;
    let sources = start_sources(&format!(
        "sources:\n  s:\n    rule: '@every 1s'\n    http: {{ endpoint: '{}', max_body: 1KiB }}\n",
        origin.url()
    ))
    .await;
    assert_eq!(value_of(&sources, "s").await, "small");
    *answer.lock().unwrap() = (200, "x".repeat(1025));
    let error = eventually("the run over max_body", || async {
        status(&sources, "s")["last_error"]
            .as_str()
            .map(str::to_string)
    })
    .await;
    assert!(error.contains("over the limit of 1024 bytes"), "{error}");
    assert_eq!(key(&sources, "s").await.text(), "small");
    *answer.lock().unwrap() = (200, "x".repeat(1024));
    eventually("a body at the limit replaces it", || async {
        (key(&sources, "s").await.text().len() == 1024).then_some(())
    })
    .await;
}

#[tokio::test]
async fn endless_redirects_stop_after_ten() {
    let looping = start_origin(|_request| async {
        Response::builder()
            .status(302)
            .header("location", "/again")
            .body(body::empty())
            .unwrap()
    })
    .await;
    let sources = start_sources(&format!(
        "sources:\n  r:\n    rule: '0 0 0 1 1 *'\n    http: {{ endpoint: '{}/' }}\n",
        looping.url()
    ))
    .await;
    let error = eventually("the redirect error", || async {
        status(&sources, "r")["last_error"]
            .as_str()
            .map(str::to_string)
    })
    .await;
    assert!(error.contains("10 redirects"), "{error}");
    // Go's client: ten requests, the tenth redirect is not followed.
    assert_eq!(looping.hits(), 10);
}

#[tokio::test]
async fn an_edit_keeps_the_value_until_the_new_settings_deliver() {
    let (origin, _log) = recording_origin(200, "from http").await;
    let sources =
        start_sources("sources:\n  s:\n    rule: '0 0 0 1 1 *'\n    static: { value: 'old' }\n")
            .await;
    assert_eq!(value_of(&sources, "s").await, "old");
    let mut edited = BTreeMap::new();
    let config = larder::config::load_str(
        &format!(
            "sources:\n  s:\n    rule: '0 0 0 1 1 *'\n    content_type: text/x-report\n    http: {{ endpoint: '{}' }}\n",
            origin.url()
        ),
        "edit.yml",
    )
    .unwrap();
    edited.extend(config.sources);
    sources.apply(&edited);
    let served = key(&sources, "s").await;
    assert_eq!(
        served.status,
        StatusCode::OK,
        "the old value stays during the edit"
    );
    eventually("the edited source's value", || async {
        let answer = key(&sources, "s").await;
        (answer.text() == "from http").then_some(answer)
    })
    .await;
    let answer = key(&sources, "s").await;
    assert_eq!(answer.header("content-type"), Some("text/x-report"));
    assert_eq!(status(&sources, "s")["kind"], "http");
}

#[tokio::test]
async fn status_lists_every_source_with_its_schedule_and_counts() {
    let sources = start_sources(
        r#"
sources:
  b:
    rule: '@every 1s'
    static: { value: '12345' }
  a:
    rule: '0 0 9 * * 1-5'
    run_on_start: false
    static: { value: 'x' }
"#,
    )
    .await;
    value_of(&sources, "b").await;
    let all = sources.status();
    let names: Vec<&str> = all["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"]);
    let b = status(&sources, "b");
    assert_eq!(b["kind"], "static");
    assert_eq!(b["rule"], "@every 1s");
    assert_eq!(b["value_size"], 5);
    assert!(b["runs"].as_u64().unwrap() >= 1);
    assert!(b["last_success"].as_str().unwrap().ends_with('Z'));
    let a = status(&sources, "a");
    assert!(a["last_success"].is_null());
    assert!(a["value_size"].is_null());
    let next = a["next_run"].as_str().expect("next_run");
    let next = chrono::DateTime::parse_from_rfc3339(next).unwrap();
    assert!(matches!(
        chrono::Datelike::weekday(&next),
        chrono::Weekday::Mon
            | chrono::Weekday::Tue
            | chrono::Weekday::Wed
            | chrono::Weekday::Thu
            | chrono::Weekday::Fri
    ));
    assert_eq!(chrono::Timelike::hour(&next), 9);
}

#[tokio::test]
async fn a_route_serves_its_source_and_refuses_writes() {
    let sources =
        start_sources("sources:\n  s:\n    rule: '@every 1s'\n    static: { value: 'routed' }\n")
            .await;
    value_of(&sources, "s").await;
    let answer = read(sources.serve_source(
        "s",
        "/reports",
        &request("GET", "/reports/today?key=other", &[]),
    ))
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "routed");
    let post =
        read(sources.serve_source("s", "/reports", &request("POST", "/reports/today", &[]))).await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    let missing = read(sources.serve_source("nope", "/", &request("GET", "/", &[]))).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_fetcher_plugin_fills_a_source_and_not_modified_keeps_it() {
    let (origin, log) = recording_origin(200, r#"{"data":{"temp":21},"meta":1}"#).await;
    let sources = start_sources(&format!(
        r#"
plugins:
  weather-fetcher:
    path: {wasm}
    config: {{ pointer: /data }}
    allow_hosts: ['{url}']
    limits: {{ timeout: 2s }}
sources:
  weather:
    rule: '@every 1s'
    plugin:
      name: weather-fetcher
      config: {{ url: '{url}/now' }}
"#,
        wasm = wasm("http_json").display(),
        url = origin.url()
    ))
    .await;
    assert_eq!(value_of(&sources, "weather").await, r#"{"temp":21}"#);
    let first = key(&sources, "weather").await;
    assert_eq!(first.header("content-type"), Some("application/json"));
    eventually("a not-modified run", || async {
        (counter(&sources, "weather", "not_modified") >= 1).then_some(())
    })
    .await;
    let again = key(&sources, "weather").await;
    assert_eq!(again.text(), r#"{"temp":21}"#);
    assert_eq!(again.header("last-modified"), first.header("last-modified"));
    assert_eq!(status(&sources, "weather")["kind"], "plugin");
    let seen = log.lock().unwrap()[0].clone();
    assert_eq!(
        seen.path, "/now",
        "the source's plugin.config reached the plugin"
    );
}

#[tokio::test]
async fn runs_are_counted_in_prometheus_metrics() {
    let larder = start_larder(
        r#"
admin:
  listen: 127.0.0.1:9901
  token: s3cret
sources:
  metered:
    rule: '@every 1s'
    static: { value: 'm' }
"#,
    )
    .await;
    served(&larder.url("/?key=metered")).await;
    let auth = [("authorization", "Bearer s3cret")];
    let has_line = |text: &str, name: &str, labels: &[&str]| {
        text.lines()
            .any(|line| line.starts_with(name) && labels.iter().all(|label| line.contains(label)))
    };
    let text = eventually("source metrics", || async {
        let text = get_with(&larder.admin_url("/metrics"), &auth).await.text();
        has_line(
            &text,
            "larder_source_runs_total{",
            &["source=\"metered\"", "outcome=\"ok\""],
        )
        .then_some(text)
    })
    .await;
    assert!(
        has_line(
            &text,
            "larder_source_run_duration_seconds",
            &["source=\"metered\""]
        ),
        "{text}"
    );
    assert!(
        has_line(
            &text,
            "larder_source_value_age_seconds{",
            &["source=\"metered\""]
        ),
        "{text}"
    );
    larder.stop().await;
}

#[tokio::test]
async fn an_http_sources_content_type_comes_from_its_endpoint_unless_configured() {
    let origin = start_origin(|_request| async {
        Response::builder()
            .header("content-type", "text/tab-separated-values; charset=UTF-8")
            .body(body::full("2021-03-01\t42\n"))
            .unwrap()
    })
    .await;
    let sources = start_sources(&format!(
        r#"
sources:
  from_endpoint:
    rule: '0 0 0 1 1 *'
    http: {{ endpoint: '{url}' }}
  configured:
    rule: '0 0 0 1 1 *'
    content_type: text/plain; charset=utf-8
    http: {{ endpoint: '{url}' }}
"#,
        url = origin.url()
    ))
    .await;
    value_of(&sources, "from_endpoint").await;
    value_of(&sources, "configured").await;
    assert_eq!(
        key(&sources, "from_endpoint").await.header("content-type"),
        Some("text/tab-separated-values; charset=UTF-8")
    );
    assert_eq!(
        key(&sources, "configured").await.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
}

/// Refreshes run on the sources' own thread: a proxy runtime that is busy
/// (here: not driven at all after startup) neither delays nor stops them, and
/// a burst of refreshes cannot queue ahead of requests.
#[test]
fn sources_keep_refreshing_while_the_proxy_runtime_is_stalled() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let sources = runtime.block_on(start_sources(
        "sources:\n  tick: { rule: '* * * * * *', static: { value: 'x' } }\n",
    ));
    // From here on the test thread only sleeps: nothing drives `runtime`.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let runs = loop {
        let runs = counter(&sources, "tick", "runs");
        if runs >= 3 || std::time::Instant::now() > deadline {
            break runs;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        runs >= 3,
        "only {runs} runs while the caller's runtime was stalled"
    );
    drop(sources);
    drop(runtime);
}
