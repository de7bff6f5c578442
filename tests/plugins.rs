//! Wasm plugins, end to end with the real components from `plugins/`
//! (build them first: `cd plugins && cargo build --release`): transforms,
//! direct answers, fetchers and their allow-list, contained faults under
//! both `on_error` settings, the circuit breaker, the precompiled cache and
//! hot reload.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Origin, get, get_with, respond, start_larder, start_origin, wasm};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use larder::config::{PluginConfig, PluginPhase, PluginTotals};
use larder::http::body::{self, Body};
use larder::http::error::RequestError;
use larder::plugins::{
    FailureKind, FetchContext, FetchOutcome, PluginError, PluginHost, PluginLoadError,
    RequestState, SourceValue, SourceValues,
};

fn plugin(yaml: &str) -> PluginConfig {
    serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("bad test plugin config: {e}\n{yaml}"))
}

async fn host(plugins: &[(&str, PluginConfig)]) -> Arc<PluginHost> {
    let map: BTreeMap<String, PluginConfig> = plugins
        .iter()
        .map(|(name, config)| (name.to_string(), config.clone()))
        .collect();
    PluginHost::load(&map, &PluginTotals::default())
        .await
        .unwrap_or_else(|e| panic!("plugins failed to load: {e}"))
}

fn chain(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn request(headers: &[(&str, &str)]) -> http::request::Parts {
    let mut builder = Request::builder()
        .method("GET")
        .uri("http://shop.test/items?page=2");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).expect("valid test request").into_parts().0
}

fn response(content_type: &str, body_text: &str) -> Response<Body> {
    Response::builder()
        .status(200)
        .header("content-type", content_type)
        .header("content-length", body_text.len())
        .header("server", "origin/1.0")
        .body(body::full(body_text.to_string()))
        .expect("valid test response")
}

async fn text(response: Response<Body>) -> (http::response::Parts, String) {
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    (parts, String::from_utf8_lossy(&bytes).into_owned())
}

fn fault_config(name: &str, on_error: &str) -> PluginConfig {
    plugin(&format!(
        "path: {}\non_error: {on_error}\nlimits: {{ memory: 32MiB, timeout: 100ms }}\nconfig: {{ mib: '512' }}",
        wasm(name).display()
    ))
}

fn add_headers(config: &str) -> PluginConfig {
    plugin(&format!(
        "path: {}\nconfig: {config}",
        wasm("add_headers").display()
    ))
}

#[tokio::test]
async fn add_headers_sets_and_removes_headers_on_both_sides() {
    let host = host(&[(
        "hdr",
        add_headers(
            "{ set: 'x-served-by: larder; access-control-allow-origin: *', remove: 'server', request_set: 'x-from-plugin: yes' }",
        ),
    )])
    .await;
    let mut parts = request(&[("accept", "text/html")]);
    let answered = host
        .on_request(
            &chain(&["hdr"]),
            &mut parts,
            &mut RequestState::default(),
            false,
        )
        .await;
    assert!(matches!(answered, Ok(None)), "on-request carries on");
    assert_eq!(parts.headers["x-from-plugin"], "yes");
    assert_eq!(parts.headers["accept"], "text/html", "other headers kept");
    assert_eq!(
        parts.uri.path_and_query().map(|p| p.as_str()),
        Some("/items?page=2")
    );

    let out = host
        .on_response(
            &chain(&["hdr"]),
            PluginPhase::Downstream,
            &parts,
            response("text/plain", "hello"),
            None,
        )
        .await
        .expect("plugin runs");
    let (head, body) = text(out).await;
    assert_eq!(head.headers["x-served-by"], "larder");
    assert_eq!(head.headers["access-control-allow-origin"], "*");
    assert!(
        head.headers.get("server").is_none(),
        "server header removed"
    );
    assert_eq!(body, "hello", "body untouched when the plugin returns none");
    assert_eq!(head.headers["content-length"], "5");
}

#[tokio::test]
async fn on_response_runs_only_the_plugins_of_the_given_phase() {
    let mut store_phase = add_headers("{ set: 'cache-control: s-maxage=60; surrogate-key: news' }");
    store_phase.phase = PluginPhase::CacheStore;
    let host = host(&[("ttl", store_phase)]).await;
    let parts = request(&[]);
    let downstream = host
        .on_response(
            &chain(&["ttl"]),
            PluginPhase::Downstream,
            &parts,
            response("text/plain", "x"),
            None,
        )
        .await
        .expect("no plugin runs");
    assert!(downstream.headers().get("cache-control").is_none());
    let stored = host
        .on_response(
            &chain(&["ttl"]),
            PluginPhase::CacheStore,
            &parts,
            response("text/plain", "x"),
            None,
        )
        .await
        .expect("plugin runs");
    assert_eq!(stored.headers()["cache-control"], "s-maxage=60");
    assert_eq!(stored.headers()["surrogate-key"], "news");
}

#[tokio::test]
async fn on_request_can_answer_directly() {
    let guard = plugin(&format!(
        "path: {}\nconfig: {{ require: x-api-key, status: '401' }}",
        wasm("answer_direct").display()
    ));
    let host = host(&[("guard", guard)]).await;
    let mut without = request(&[]);
    let answer = host
        .on_request(
            &chain(&["guard"]),
            &mut without,
            &mut RequestState::default(),
            false,
        )
        .await
        .expect("plugin runs")
        .expect("plugin answers directly");
    let (head, body) = text(answer).await;
    assert_eq!(head.status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, "missing x-api-key header\n");
    assert_eq!(
        head.headers["content-length"],
        body.len().to_string().as_str()
    );

    let mut with = request(&[("x-api-key", "k")]);
    let carried_on = host
        .on_request(
            &chain(&["guard"]),
            &mut with,
            &mut RequestState::default(),
            false,
        )
        .await;
    assert!(matches!(carried_on, Ok(None)));
}

#[tokio::test]
async fn on_request_can_add_cache_key_parts() {
    let host = host(&[("device", add_headers("{ cache_key_from: x-device }"))]).await;
    let mut parts = request(&[("x-device", "mobile")]);
    let mut state = RequestState::default();
    host.on_request(&chain(&["device"]), &mut parts, &mut state, false)
        .await
        .expect("plugin runs");
    assert_eq!(state.cache_key_extra, vec!["mobile".to_string()]);
    let mut plain = request(&[]);
    let mut plain_state = RequestState::default();
    host.on_request(&chain(&["device"]), &mut plain, &mut plain_state, false)
        .await
        .expect("plugin runs");
    assert!(plain_state.cache_key_extra.is_empty());
}

#[tokio::test]
async fn json_filter_rewrites_the_body_and_fixes_content_length() {
    let mut filter = plugin(&format!(
        "path: {}\nconfig: {{ keep: 'id,name' }}\nphase: cache_store",
        wasm("json_filter").display()
    ));
    filter.phase = PluginPhase::CacheStore;
    let host = host(&[("slim", filter)]).await;
    let parts = request(&[]);
    let upstream = r#"[{"id":1,"name":"a","secret":"x"},{"id":2,"name":"b","internal":true}]"#;
    let out = host
        .on_response(
            &chain(&["slim"]),
            PluginPhase::CacheStore,
            &parts,
            response("application/json", upstream),
            None,
        )
        .await
        .expect("plugin runs");
    let (head, body) = text(out).await;
    assert_eq!(body, r#"[{"id":1,"name":"a"},{"id":2,"name":"b"}]"#);
    assert_eq!(
        head.headers["content-length"],
        body.len().to_string().as_str()
    );

    let html = host
        .on_response(
            &chain(&["slim"]),
            PluginPhase::CacheStore,
            &parts,
            response("text/html", "<p>hi</p>"),
            None,
        )
        .await
        .expect("plugin runs");
    assert_eq!(text(html).await.1, "<p>hi</p>", "non-JSON passes through");
}

#[tokio::test]
async fn a_no_transform_response_keeps_its_body_but_gets_header_changes() {
    let mut filter = plugin(&format!(
        "path: {}\nconfig: {{ keep: 'id' }}",
        wasm("json_filter").display()
    ));
    filter.phase = PluginPhase::CacheStore;
    let mut stamp = add_headers("{ set: 'x-stamped: yes' }");
    stamp.phase = PluginPhase::CacheStore;
    let host = host(&[("slim", filter), ("stamp", stamp)]).await;
    let upstream = r#"{"id":1,"secret":"x"}"#;
    let mut protected = response("application/json", upstream);
    protected.headers_mut().insert(
        "cache-control",
        http::HeaderValue::from_static("max-age=60, no-transform"),
    );
    let out = host
        .on_response(
            &chain(&["slim", "stamp"]),
            PluginPhase::CacheStore,
            &request(&[]),
            protected,
            None,
        )
        .await
        .expect("plugins run");
    let (head, body) = text(out).await;
    assert_eq!(
        body, upstream,
        "RFC 9110 7.7: the content is not transformed"
    );
    assert_eq!(
        head.headers["content-length"],
        upstream.len().to_string().as_str()
    );
    assert_eq!(
        head.headers["x-stamped"], "yes",
        "header changes still apply"
    );
}

#[tokio::test]
async fn one_request_makes_one_fresh_instance_for_both_hooks() {
    let both = add_headers("{ set: 'x-stamped: yes', request_set: 'x-asked: 1' }");
    let host = host(&[("stamp", both)]).await;
    for round in 1..=3u64 {
        let mut parts = request(&[]);
        let mut state = RequestState::default();
        let answer = host
            .on_request(&chain(&["stamp"]), &mut parts, &mut state, false)
            .await
            .expect("plugin runs");
        assert!(answer.is_none());
        let out = host
            .on_response(
                &chain(&["stamp"]),
                PluginPhase::Downstream,
                &parts,
                response("text/plain", "hi"),
                Some(&mut state),
            )
            .await
            .expect("plugin runs");
        assert_eq!(out.headers()["x-stamped"], "yes");
        let stats = host.stats("stamp").expect("loaded");
        assert_eq!(stats.invocations, 2 * round);
        assert_eq!(
            stats.instances_created, round,
            "on-response reuses the instance its request's on-request made; requests never share one"
        );
    }
}

#[tokio::test]
async fn a_bad_plugin_config_is_a_load_error_naming_the_plugin() {
    let map = BTreeMap::from([(
        "broken-cors".to_string(),
        add_headers("{ set: 'no colon here' }"),
    )]);
    match PluginHost::load(&map, &PluginTotals::default()).await {
        Err(PluginLoadError { plugin, reason }) => {
            assert_eq!(plugin, "broken-cors");
            let reason = reason.to_string();
            assert!(reason.contains("not `name: value`"), "reason: {reason}");
        }
        Ok(_) => panic!("a bad config must not load"),
    }
    let garbage = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(garbage.path(), b"not wasm at all").expect("write");
    let map = BTreeMap::from([(
        "junk".to_string(),
        plugin(&format!("path: {}", garbage.path().display())),
    )]);
    assert!(
        matches!(PluginHost::load(&map, &PluginTotals::default()).await, Err(PluginLoadError { plugin, .. }) if plugin == "junk")
    );
}

/// A real HTTP origin on 127.0.0.1 answering every request with JSON `body`.
async fn json_origin(body: &'static str) -> Origin {
    start_origin(
        move |_| async move { respond(200, &[("content-type", "application/json")], body) },
    )
    .await
}

/// What the sources lend a fetcher run: the values it produced before.
#[derive(Default)]
struct Values(std::sync::Mutex<BTreeMap<String, SourceValue>>);

impl SourceValues for Values {
    fn get(&self, source: &str) -> Option<SourceValue> {
        self.0.lock().unwrap().get(source).cloned()
    }
}

fn no_values() -> Arc<dyn SourceValues> {
    Arc::new(Values::default())
}

fn fetch_context(source: &str, url: &str) -> FetchContext {
    FetchContext {
        source: source.to_string(),
        scheduled_at: 0,
        previous_etag: None,
        config: BTreeMap::from([("url".to_string(), url.to_string())]),
    }
}

#[tokio::test]
async fn a_fetcher_fills_a_source_through_an_allowed_origin() {
    let weather = json_origin(r#"{"data":{"temp":21,"unit":"C"},"meta":1}"#).await;
    let addr = weather.addr;
    let fetcher = plugin(&format!(
        "path: {}\nconfig: {{ pointer: /data }}\nallow_hosts: ['http://{addr}']",
        wasm("http_json").display()
    ));
    let host = host(&[("weather", fetcher)]).await;
    let url = format!("http://{addr}/now");
    let values = Arc::new(Values::default());
    match host
        .fetch("weather", fetch_context("w", &url), values.clone())
        .await
    {
        Ok(FetchOutcome::Updated {
            content_type,
            body,
            headers,
        }) => {
            assert_eq!(body, Bytes::from_static(br#"{"temp":21,"unit":"C"}"#));
            assert_eq!(content_type.as_deref(), Some("application/json"));
            // What the sources keep of a run, as they would.
            values.0.lock().unwrap().insert(
                "w".to_string(),
                SourceValue {
                    headers,
                    body,
                    produced_at: Instant::now(),
                },
            );
        }
        other => panic!("expected a value, got {other:?}"),
    }
    // The plugin sees its own last value through `cache.get` and reports no change.
    let again = host
        .fetch("weather", fetch_context("w", &url), values)
        .await;
    assert!(
        matches!(again, Ok(FetchOutcome::NotModified)),
        "got {again:?}"
    );
    assert_eq!(weather.hits(), 2);
}

#[tokio::test]
async fn a_fetcher_cannot_reach_origins_outside_allow_hosts() {
    let allowed = json_origin("{}").await.addr;
    let other_origin = json_origin(r#"{"secret":1}"#).await;
    let other = other_origin.addr;
    let fetcher = plugin(&format!(
        "path: {}\nallow_hosts: ['http://{allowed}']",
        wasm("http_json").display()
    ));
    let host = host(&[("f", fetcher)]).await;
    for url in [
        format!("http://{other}/"),
        format!("http://{allowed}@{other}/"),
        format!("http://user@{allowed}/"),
        format!("https://{allowed}/"),
    ] {
        match host.fetch("f", fetch_context("s", &url), no_values()).await {
            Err(PluginError { detail: reason, .. }) => {
                assert!(reason.contains("denied"), "{url}: {reason}")
            }
            other => panic!("{url} must be denied, got {other:?}"),
        }
    }
    assert_eq!(
        other_origin.hits(),
        0,
        "the other origin was never contacted"
    );
}

async fn assert_contained(name: &str, kind: &str, detail: &str) {
    let open = fault_config(name, "open");
    let closed = fault_config(name, "closed");
    let host = host(&[
        ("fault-open", open),
        ("fault-closed", closed),
        ("hdr", add_headers("{ request_set: 'x-ok: 1' }")),
    ])
    .await;
    let started = Instant::now();
    let mut parts = request(&[]);
    let skipped = host
        .on_request(
            &chain(&["fault-open", "hdr"]),
            &mut parts,
            &mut RequestState::default(),
            false,
        )
        .await;
    assert!(matches!(skipped, Ok(None)), "{name} under open is skipped");
    assert_eq!(
        parts.headers["x-ok"], "1",
        "the rest of the chain still ran"
    );

    let mut parts = request(&[]);
    match host
        .on_request(
            &chain(&["fault-closed", "hdr"]),
            &mut parts,
            &mut RequestState::default(),
            false,
        )
        .await
    {
        Err(error) => {
            assert_eq!(&*error.plugin, "fault-closed");
            let error = RequestError::from(error);
            assert_eq!(error.status(), StatusCode::BAD_GATEWAY);
            let (head, body) = text(error.into_response()).await;
            assert_eq!(head.headers["content-type"], "application/problem+json");
            assert!(body.contains("fault-closed"), "{body}");
        }
        other => panic!("{name} under closed must fail the request, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "contained promptly"
    );
    for plugin in ["fault-open", "fault-closed"] {
        let stats = host.stats(plugin).expect("stats");
        assert_eq!(
            (stats.invocations, stats.failures),
            (1, 1),
            "{plugin}: {stats:?}"
        );
        assert_eq!(stats.last_failure_kind, Some(kind), "{plugin}: {stats:?}");
        assert_eq!(
            stats.calls, "sync",
            "the fault fixtures are built on the SDK (no WASI): contained on the sync path"
        );
        let described = stats.last_failure.unwrap_or_default();
        assert!(described.contains(detail), "{plugin}: {described}");
    }
    // Other plugins of the same host keep working.
    let mut parts = request(&[]);
    host.on_request(
        &chain(&["hdr"]),
        &mut parts,
        &mut RequestState::default(),
        false,
    )
    .await
    .expect("healthy plugin runs");
    assert_eq!(parts.headers["x-ok"], "1");
}

#[tokio::test]
async fn a_guest_without_wasi_is_called_sync_and_a_std_guest_async() {
    let host = host(&[
        ("sdk", add_headers("{ set: 'x-sdk: 1' }")),
        (
            "std",
            plugin(&format!("path: {}", wasm("misbehave").display())),
        ),
    ])
    .await;
    assert_eq!(host.stats("sdk").expect("stats").calls, "sync");
    assert_eq!(host.stats("std").expect("stats").calls, "async");
    // Both paths answer the same way: a std guest still works.
    let changed = host
        .on_response(
            &chain(&["std", "sdk"]),
            PluginPhase::Downstream,
            &request(&[]),
            response("text/plain", "hello"),
            None,
        )
        .await
        .expect("both run");
    assert_eq!(changed.headers()["x-sdk"], "1");
    assert_eq!(host.stats("std").expect("stats").invocations, 1);
}

#[tokio::test]
async fn an_endless_loop_is_stopped_by_the_time_limit() {
    assert_contained("spin_forever", "timeout", "time limit").await;
}

#[tokio::test]
async fn a_memory_hog_is_stopped_by_the_memory_limit() {
    assert_contained("eat_memory", "oom", "memory allocation").await;
}

#[tokio::test]
async fn a_panicking_plugin_is_contained() {
    assert_contained("panic", "trap", "boom: deliberate panic").await;
}

#[tokio::test]
async fn a_plugin_that_fails_in_on_response_leaves_the_response_alone_under_open() {
    let mut config = fault_config("panic", "open");
    config
        .config
        .insert("when".to_string(), "response".to_string());
    let host = host(&[("p", config)]).await;
    let out = host
        .on_response(
            &chain(&["p"]),
            PluginPhase::Downstream,
            &request(&[]),
            response("text/plain", "intact"),
            None,
        )
        .await
        .expect("open skips the plugin");
    let (head, body) = text(out).await;
    assert_eq!(body, "intact");
    assert_eq!(head.headers["server"], "origin/1.0");
}

#[tokio::test]
async fn repeated_failures_open_the_circuit() {
    let host = host(&[("p", fault_config("panic", "open"))]).await;
    for _ in 0..5 {
        let mut parts = request(&[]);
        let result = host
            .on_request(
                &chain(&["p"]),
                &mut parts,
                &mut RequestState::default(),
                false,
            )
            .await;
        assert!(
            matches!(result, Ok(None)),
            "a failure is skipped under open"
        );
    }
    for _ in 0..4 {
        let mut parts = request(&[]);
        let refused = host
            .on_request(
                &chain(&["p"]),
                &mut parts,
                &mut RequestState::default(),
                false,
            )
            .await;
        // The plugin may guard the route: not running it is not "carry on".
        let Err(error) = refused else {
            panic!("an open circuit refuses unless the route skips unavailable plugins")
        };
        assert_eq!(error.kind, FailureKind::CircuitOpen);
        assert!(error.retry_after.is_some());
    }
    for _ in 0..3 {
        let mut parts = request(&[]);
        let skipped = host
            .on_request(
                &chain(&["p"]),
                &mut parts,
                &mut RequestState::default(),
                true,
            )
            .await;
        assert!(matches!(skipped, Ok(None)), "the route said skip");
    }
    let stats = host.stats("p").expect("stats");
    assert!(stats.circuit_open, "{stats:?}");
    assert_eq!(
        stats.invocations, 5,
        "the plugin is not called once the circuit opened"
    );
    assert_eq!(stats.skipped, 7);
}

#[tokio::test]
async fn bodies_over_the_cap_skip_a_body_reader_under_open_and_fail_under_closed() {
    let big = format!("[\"{}\"]", "x".repeat(larder::plugins::MAX_BODY_BYTES));
    let filter = |on_error: &str| {
        plugin(&format!(
            "path: {}\non_error: {on_error}\nconfig: {{ keep: 'id' }}",
            wasm("json_filter").display()
        ))
    };
    let host = host(&[
        ("open", filter("open")),
        ("closed", filter("closed")),
        // Declares no body: it still runs, and the body streams past it.
        ("stamp", add_headers("{ set: 'x-seen: 1' }")),
    ])
    .await;
    let out = host
        .on_response(
            &chain(&["open", "stamp"]),
            PluginPhase::Downstream,
            &request(&[]),
            response("application/json", &big),
            None,
        )
        .await
        .expect("skipped under open");
    let (head, body) = text(out).await;
    assert_eq!(head.headers["x-seen"], "1", "a plugin without the body ran");
    assert_eq!(body.len(), big.len(), "the body streams through whole");
    let failed = host
        .on_response(
            &chain(&["closed"]),
            PluginPhase::Downstream,
            &request(&[]),
            response("application/json", &big),
            None,
        )
        .await;
    assert!(matches!(failed, Err(PluginError { plugin, .. }) if &*plugin == "closed"));
}

#[tokio::test]
async fn a_response_only_plugin_gets_no_on_request_call() {
    let host = host(&[("stamp", add_headers("{ set: 'x-stamped: yes' }"))]).await;
    let stats = host.stats("stamp").expect("loaded");
    assert_eq!(stats.hooks, ["on_response"], "what its init declared");
    assert_eq!(stats.wit, "0.2.0");
    let mut parts = request(&[]);
    let mut state = RequestState::default();
    host.on_request(&chain(&["stamp"]), &mut parts, &mut state, false)
        .await
        .expect("nothing to run");
    let out = host
        .on_response(
            &chain(&["stamp"]),
            PluginPhase::Downstream,
            &parts,
            response("text/plain", "hi"),
            Some(&mut state),
        )
        .await
        .expect("plugin runs");
    assert_eq!(out.headers()["x-stamped"], "yes");
    let stats = host.stats("stamp").expect("loaded");
    assert_eq!(stats.invocations, 1, "on-response only: {stats:?}");
    assert_eq!(stats.instances_created, 1);
}

#[tokio::test]
async fn reused_instances_give_the_same_answers() {
    let mut config = add_headers("{ set: 'x-reused: yes' }");
    config.reuse = true;
    let host = host(&[("r", config)]).await;
    for _ in 0..5 {
        let out = host
            .on_response(
                &chain(&["r"]),
                PluginPhase::Downstream,
                &request(&[]),
                response("text/plain", "a"),
                None,
            )
            .await
            .expect("plugin runs");
        assert_eq!(out.headers()["x-reused"], "yes");
    }
}

/// The `x-handled` value (responses the instance has handled) of `rounds`
/// responses through `plugin`, and its stats after them.
async fn handled_counts(host: &PluginHost, plugin: &str, rounds: usize) -> Vec<String> {
    let mut counts = Vec::new();
    for _ in 0..rounds {
        let out = host
            .on_response(
                &chain(&[plugin]),
                PluginPhase::Downstream,
                &request(&[]),
                response("text/plain", "a"),
                None,
            )
            .await
            .expect("plugin runs");
        assert_eq!(out.headers()["x-stamped"], "yes", "the config applies");
        counts.push(
            out.headers()["x-handled"]
                .to_str()
                .expect("ascii")
                .to_string(),
        );
    }
    counts
}

#[tokio::test]
async fn a_guest_without_wasi_starts_from_a_snapshot_configured_and_requests_share_nothing() {
    let counted = "{ set: 'x-stamped: yes', count_in: x-handled }";
    let host = host(&[("fresh", add_headers(counted))]).await;
    let loaded = host.stats("fresh").expect("stats");
    assert!(loaded.pre_initialised, "{loaded:?}");
    assert_eq!(loaded.init_calls, 1, "only the load-time check ran init");

    assert_eq!(handled_counts(&host, "fresh", 3).await, ["1", "1", "1"]);
    let stats = host.stats("fresh").expect("stats");
    assert_eq!(stats.instances_created, 3, "one instance per request");
    assert_eq!(
        stats.init_calls, 1,
        "instances start configured from the snapshot, without calling init"
    );

    // The same plugin with reuse keeps its instance: the count shows it.
    let mut reused = add_headers(counted);
    reused.reuse = true;
    let host = self::host(&[("reused", reused)]).await;
    assert_eq!(handled_counts(&host, "reused", 3).await, ["1", "2", "3"]);
}

#[tokio::test]
async fn a_guest_with_wasi_calls_init_on_each_instance() {
    let host = host(&[(
        "std",
        plugin(&format!("path: {}", wasm("misbehave").display())),
    )])
    .await;
    for _ in 0..2 {
        host.on_response(
            &chain(&["std"]),
            PluginPhase::Downstream,
            &request(&[]),
            response("text/plain", "a"),
            None,
        )
        .await
        .expect("plugin runs");
    }
    let stats = host.stats("std").expect("stats");
    assert!(!stats.pre_initialised, "{stats:?}");
    assert_eq!(stats.instances_created, 2);
    assert_eq!(
        stats.init_calls, 3,
        "the load-time check and one per instance"
    );
}

/// The component bytes plus a custom section, so its hash is new to the cache.
fn unique_copy(name: &str, dir: &Path) -> PathBuf {
    let mut bytes = std::fs::read(wasm(name)).expect("read wasm");
    let nonce = format!("{:?}{}", Instant::now(), std::process::id());
    let section_name = b"larder-test";
    let payload_len = 1 + section_name.len() + nonce.len();
    assert!(payload_len < 128, "one-byte LEB128 lengths");
    bytes.push(0);
    bytes.push(payload_len as u8);
    bytes.push(section_name.len() as u8);
    bytes.extend_from_slice(section_name);
    bytes.extend_from_slice(nonce.as_bytes());
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, bytes).expect("write wasm");
    path
}

#[tokio::test]
async fn a_restart_loads_the_precompiled_artifact_instead_of_compiling() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = unique_copy("add_headers", dir.path());
    let config = plugin(&format!(
        "path: {}\nconfig: {{ set: 'x-a: 1' }}",
        path.display()
    ));
    let first = host(&[("a", config.clone())]).await;
    assert_eq!(
        first.stats("a").map(|s| s.compiled),
        Some(true),
        "new bytes are compiled"
    );
    drop(first);
    let second = host(&[("a", config)]).await;
    let stats = second.stats("a").expect("stats");
    assert!(
        !stats.compiled,
        "unchanged bytes load precompiled: {stats:?}"
    );
    assert_eq!(stats.compilations, 0);
}

#[tokio::test]
async fn a_changed_plugin_file_is_swapped_in_and_a_broken_one_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("live.wasm");
    std::fs::copy(wasm("add_headers"), &path).expect("copy");
    let host = host(&[("live", plugin(&format!("path: {}", path.display())))]).await;
    let answers_directly = |host: Arc<PluginHost>| async move {
        let mut parts = request(&[]);
        matches!(
            host.on_request(
                &chain(&["live"]),
                &mut parts,
                &mut RequestState::default(),
                false
            )
            .await,
            Ok(Some(_))
        )
    };
    assert!(!answers_directly(host.clone()).await);

    std::fs::write(&path, std::fs::read(wasm("answer_direct")).expect("read")).expect("overwrite");
    common::eventually("the new build answers directly", async || {
        answers_directly(host.clone()).await
    })
    .await;

    std::fs::write(&path, b"\0asm garbage").expect("overwrite with garbage");
    common::eventually("the broken build is refused", async || {
        host.stats("live").is_some_and(|s| s.rejected_builds > 0)
    })
    .await;
    assert!(
        answers_directly(host.clone()).await,
        "the previous build keeps serving"
    );
}

#[tokio::test]
async fn larder_check_rejects_a_bad_plugin_config_naming_the_plugin() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("larder.yml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nplugins:\n  bad-cors:\n    path: {}\n    config: {{ set: 'missing the colon' }}\n",
            wasm("add_headers").display()
        ),
    )
    .expect("write config");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_larder"))
        .args(["check", "-c"])
        .arg(&config)
        .output()
        .expect("run larder check");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("bad-cors"), "names the plugin: {stderr}");
    assert!(stderr.contains("missing the colon"), "says why: {stderr}");
}

#[tokio::test]
async fn a_reload_applies_plugin_changes_all_or_nothing() {
    let host = host(&[]).await;
    let header_after = |host: Arc<PluginHost>| async move {
        let out = host
            .on_response(
                &chain(&["hdr"]),
                PluginPhase::Downstream,
                &request(&[]),
                response("text/plain", "x"),
                None,
            )
            .await
            .expect("plugin runs");
        out.headers()
            .get("x-version")
            .map(|v| v.to_str().unwrap_or_default().to_string())
    };
    let config = |set: &str| BTreeMap::from([("hdr".to_string(), add_headers(set))]);

    host.apply(&config("{ set: 'x-version: 1' }"), &PluginTotals::default())
        .await
        .expect("added");
    assert_eq!(header_after(host.clone()).await.as_deref(), Some("1"));
    host.apply(&config("{ set: 'x-version: 2' }"), &PluginTotals::default())
        .await
        .expect("changed");
    assert_eq!(header_after(host.clone()).await.as_deref(), Some("2"));

    match host
        .apply(&config("{ set: 'broken' }"), &PluginTotals::default())
        .await
    {
        Err(PluginLoadError { plugin, .. }) => assert_eq!(plugin, "hdr"),
        other => panic!("a bad config must be refused, got {other:?}"),
    }
    assert_eq!(
        header_after(host.clone()).await.as_deref(),
        Some("2"),
        "the previous build keeps running"
    );
    let mut half_good = config("{ set: 'x-version: 3' }");
    half_good.insert("other".to_string(), add_headers("{ remove: 'not a name' }"));
    assert!(
        host.apply(&half_good, &PluginTotals::default())
            .await
            .is_err()
    );
    assert_eq!(
        header_after(host.clone()).await.as_deref(),
        Some("2"),
        "a reload with one bad plugin changes none"
    );
    assert!(host.stats("other").is_none());
    host.apply(&BTreeMap::new(), &PluginTotals::default())
        .await
        .expect("removed");
    assert!(host.stats("hdr").is_none());
}

// ---- Through the proxy: real Larder, real origins, real sockets ----

const ADMIN_TOKEN: &str = "plugins-test-token";

/// `plugins:` YAML entries for (name, wasm file, extra YAML lines).
fn plugins_yaml(entries: &[(&str, &str, &str)]) -> String {
    let mut yaml = String::from("plugins:\n");
    for (name, file, extra) in entries {
        yaml.push_str(&format!("  {name}:\n    path: {}\n", wasm(file).display()));
        for line in extra.lines().filter(|l| !l.trim().is_empty()) {
            yaml.push_str(&format!("    {line}\n"));
        }
    }
    yaml
}

/// The value of one counter line of the admin `/metrics` text, 0 if absent.
async fn metric(larder: &common::Larder, name: &str, labels: &[(&str, &str)]) -> f64 {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let reply = get_with(&larder.admin_url("/metrics"), &[("authorization", &auth)]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let text = reply.text();
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .find(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn proxied_responses_get_plugin_headers_on_a_miss_and_on_a_hit() {
    let origin = start_origin(|_| async {
        respond(
            200,
            &[("cache-control", "max-age=60"), ("server", "origin/1.0")],
            "hello",
        )
    })
    .await;
    let yaml = format!(
        "upstreams:\n  app: {{ servers: [\"{}\"] }}\nroutes:\n  - upstream: app\n    cache: {{ enabled: true }}\n    plugins: [cors]\n{}",
        origin.url(),
        plugins_yaml(&[(
            "cors",
            "add_headers",
            "config: { set: 'access-control-allow-origin: *', remove: server }"
        )])
    );
    let larder = start_larder(&yaml).await;
    let miss = get(&larder.url("/page")).await;
    let hit = get(&larder.url("/page")).await;
    for reply in [&miss, &hit] {
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), "hello");
        assert_eq!(reply.header("access-control-allow-origin"), Some("*"));
        assert_eq!(reply.header("server"), None, "removed by the plugin");
    }
    assert!(
        hit.header("cache-status").unwrap_or("").contains("hit"),
        "second answer comes from the cache: {:?}",
        hit.header("cache-status")
    );
    assert_eq!(origin.hits(), 1);
    larder.stop().await;
}

/// The proxy keeps a copy of the request for `on-response` only when a
/// plugin of the route reads it; every other route still gets the method
/// (a HEAD keeps its declared length).
#[tokio::test]
async fn on_response_plugins_read_the_request_or_its_method_through_the_proxy() {
    let origin = start_origin(|_| async {
        respond(
            200,
            &[
                ("cache-control", "max-age=60"),
                ("content-type", "application/json"),
            ],
            r#"[{"id":1,"secret":"x"}]"#,
        )
    })
    .await;
    let yaml = format!(
        "upstreams:\n  app: {{ servers: [\"{}\"] }}\nroutes:\n  - match: {{ path_prefix: /copied }}\n    upstream: app\n    cache: {{ enabled: true }}\n    plugins: [copy, stamp]\n  - match: {{ path_prefix: /slim }}\n    upstream: app\n    cache: {{ enabled: true }}\n    plugins: [slim]\n{}",
        origin.url(),
        plugins_yaml(&[
            (
                "copy",
                "add_headers",
                "config: { copy_from_request: x-request-id }"
            ),
            ("stamp", "add_headers", "config: { set: 'x-stamp: 1' }"),
            ("slim", "json_filter", "config: { keep: id }"),
        ])
    );
    let larder = start_larder(&yaml).await;
    for id in ["first", "second"] {
        let reply = get_with(&larder.url("/copied"), &[("x-request-id", id)]).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-request-id"), Some(id), "miss, then hit");
        assert_eq!(reply.header("x-stamp"), Some("1"));
    }
    let full = get(&larder.url("/slim")).await;
    assert_eq!(full.text(), r#"[{"id":1}]"#);
    // A plugin that reads no body leaves a HEAD the length the upstream
    // declared (seen as a GET, the empty body would have made it `0`).
    let head = common::send("HEAD", &larder.url("/copied"), &[], bytes::Bytes::new()).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("content-length"),
        Some("23"),
        "a HEAD keeps the length the upstream declared"
    );
    // One that filters bodies gets none on a HEAD, so the length a GET
    // would have (10, not the stored 23) is unknown: none is stated.
    let head = common::send("HEAD", &larder.url("/slim"), &[], bytes::Bytes::new()).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("content-length"),
        None,
        "a HEAD states no length a GET would not send (the GET sent {})",
        full.body.len()
    );
    larder.stop().await;
}

#[tokio::test]
async fn a_cache_store_transform_runs_once_per_fill_and_its_output_is_served_on_hits() {
    let origin = start_origin(|_| async {
        respond(
            200,
            &[
                ("content-type", "application/json"),
                ("cache-control", "max-age=60"),
            ],
            r#"{"id":7,"name":"kettle","cost_price":3.2}"#,
        )
    })
    .await;
    let yaml = format!(
        "admin:\n  token: {ADMIN_TOKEN}\nupstreams:\n  app: {{ servers: [\"{}\"] }}\nroutes:\n  - upstream: app\n    cache: {{ enabled: true }}\n    plugins: [slim-once]\n{}",
        origin.url(),
        plugins_yaml(&[(
            "slim-once",
            "json_filter",
            "config: { drop: cost_price }\nphase: cache_store"
        )])
    );
    let larder = start_larder(&yaml).await;
    for _ in 0..5 {
        let reply = get(&larder.url("/product/7")).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), r#"{"id":7,"name":"kettle"}"#);
        assert_eq!(reply.header("content-length"), Some("24"));
    }
    assert_eq!(origin.hits(), 1);
    let on_response = metric(
        &larder,
        "larder_plugin_invocations_total",
        &[("plugin", "slim-once"), ("hook", "on_response")],
    )
    .await;
    assert_eq!(on_response, 1.0, "the transform ran once, for the one fill");
    let on_request = metric(
        &larder,
        "larder_plugin_invocations_total",
        &[("plugin", "slim-once"), ("hook", "on_request")],
    )
    .await;
    assert_eq!(
        on_request, 0.0,
        "hits do not instantiate a cache-store plugin"
    );
    larder.stop().await;
}

#[tokio::test]
async fn a_plugin_answers_requests_itself_without_the_upstream() {
    let origin = start_origin(|_| async { respond(200, &[], "secret stuff") }).await;
    let yaml = format!(
        "upstreams:\n  app: {{ servers: [\"{}\"] }}\nroutes:\n  - upstream: app\n    plugins: [gate, stamp]\n{}",
        origin.url(),
        plugins_yaml(&[
            ("gate", "answer_direct", "config: { require: x-api-key }"),
            ("stamp", "add_headers", "config: { set: 'x-stamped: yes' }"),
        ])
    );
    let larder = start_larder(&yaml).await;
    let refused = get(&larder.url("/private")).await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.text(), "missing x-api-key header\n");
    assert_eq!(
        refused.header("x-stamped"),
        Some("yes"),
        "a direct answer still passes the downstream on-response hooks"
    );
    assert_eq!(origin.hits(), 0);
    let allowed = get_with(&larder.url("/private"), &[("x-api-key", "k")]).await;
    assert_eq!(allowed.status, 200);
    assert_eq!(allowed.text(), "secret stuff");
    assert_eq!(origin.hits(), 1);
    larder.stop().await;
}

#[tokio::test]
async fn misbehaving_plugins_are_contained_under_both_on_error_settings() {
    let origin = start_origin(|_| async { respond(200, &[], "from origin") }).await;
    let faults = ["spin_forever", "eat_memory", "panic"];
    let mut routes = String::new();
    let mut entries = Vec::new();
    for fault in faults {
        for on_error in ["open", "closed"] {
            let name = format!("{fault}-{on_error}");
            routes.push_str(&format!(
                "  - match: {{ path_prefix: /{name}/ }}\n    upstream: app\n    plugins: [{name}]\n"
            ));
            entries.push((
                name,
                fault,
                format!(
                    "on_error: {on_error}\nlimits: {{ memory: 32MiB, timeout: 100ms }}\nconfig: {{ mib: '512' }}"
                ),
            ));
        }
    }
    let entries: Vec<(&str, &str, &str)> = entries
        .iter()
        .map(|(name, file, extra)| (name.as_str(), *file, extra.as_str()))
        .collect();
    let yaml = format!(
        "upstreams:\n  app: {{ servers: [\"{}\"] }}\nroutes:\n{routes}  - upstream: app\n{}",
        origin.url(),
        plugins_yaml(&entries)
    );
    let larder = start_larder(&yaml).await;
    for fault in faults {
        let open = get(&larder.url(&format!("/{fault}-open/x"))).await;
        assert_eq!(open.status, 200, "{fault} under open is skipped");
        assert_eq!(open.text(), "from origin");
        let closed = get(&larder.url(&format!("/{fault}-closed/x"))).await;
        assert_eq!(closed.status, 502, "{fault} under closed fails the request");
        assert_eq!(
            closed.header("content-type"),
            Some("application/problem+json")
        );
        assert!(closed.text().contains(&format!("{fault}-closed")));
        let plain = get(&larder.url("/plain")).await;
        assert_eq!(plain.status, 200, "other requests keep succeeding");
    }
    larder.stop().await;
}

#[tokio::test]
async fn the_circuit_opens_after_repeated_failures_and_requests_carry_on() {
    let origin = start_origin(|_| async { respond(200, &[], "fine") }).await;
    let yaml = format!(
        "admin:\n  token: {ADMIN_TOKEN}\nupstreams:\n  app: {{ servers: [\"{}\"] }}\nroutes:\n  - match: {{ path_prefix: /guarded }}\n    upstream: app\n    plugins: [flaky-breaker]\n  - upstream: app\n    plugins: [flaky-breaker]\n    skip_unavailable_plugins: true\n{}",
        origin.url(),
        plugins_yaml(&[("flaky-breaker", "panic", "on_error: open")])
    );
    let larder = start_larder(&yaml).await;
    for _ in 0..12 {
        assert_eq!(get(&larder.url("/x")).await.text(), "fine");
    }
    // Where the route does not say so, an open circuit is not "let it through".
    let guarded = get(&larder.url("/guarded/x")).await;
    assert_eq!(guarded.status, 503, "{}", guarded.text());
    let retry_after: u64 = guarded
        .header("retry-after")
        .and_then(|value| value.parse().ok())
        .expect("a Retry-After in seconds");
    assert!((1..=5).contains(&retry_after), "{retry_after}");
    assert!(guarded.text().contains("flaky-breaker"));
    let labels = [("plugin", "flaky-breaker"), ("hook", "on_request")];
    let calls = metric(&larder, "larder_plugin_invocations_total", &labels).await;
    assert_eq!(calls, 5.0, "not called once the circuit opened");
    assert_eq!(
        metric(&larder, "larder_plugin_circuit_open", &labels[..1]).await,
        1.0
    );
    assert_eq!(origin.hits(), 12);
    larder.stop().await;
}

#[tokio::test]
async fn a_fetcher_plugin_fills_a_source_and_cannot_reach_other_origins() {
    let api = json_origin(r#"{"data":{"temp":21},"meta":"x"}"#).await;
    let elsewhere = json_origin(r#"{"data":"stolen"}"#).await;
    let api_host = api.addr;
    let other = elsewhere.addr;
    let yaml = format!(
        "routes:\n  - match: {{ path_prefix: /weather }}\n    source: weather\n  - match: {{ path_prefix: /sneaky }}\n    source: sneaky\nsources:\n  weather:\n    rule: '@every 1s'\n    plugin: {{ name: wx, config: {{ url: 'http://{api_host}/now' }} }}\n  sneaky:\n    rule: '@every 1s'\n    plugin: {{ name: wx, config: {{ url: 'http://{api_host}@{other}/now' }} }}\n{}",
        plugins_yaml(&[(
            "wx",
            "http_json",
            &format!("config: {{ pointer: /data }}\nallow_hosts: ['http://{api_host}']")
        )])
    );
    let larder = start_larder(&yaml).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let weather = loop {
        let reply = get(&larder.url("/weather")).await;
        if reply.status == 200 {
            break reply;
        }
        assert!(
            Instant::now() < deadline,
            "the source never filled: {}",
            reply.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(weather.text(), r#"{"temp":21}"#);
    assert_eq!(weather.header("content-type"), Some("application/json"));
    let sneaky = get(&larder.url("/sneaky")).await;
    assert_ne!(sneaky.status, 200, "{}", sneaky.text());
    assert_eq!(elsewhere.hits(), 0, "the userinfo trick reached nobody");
    larder.stop().await;
}

#[tokio::test]
async fn a_cache_store_plugin_sets_the_ttl_and_purge_tags_of_what_is_stored() {
    // The origin says nothing about caching; the plugin decides.
    let origin = start_origin(|_| async { respond(200, &[], "front page") }).await;
    let yaml = format!(
        "admin:\n  token: {ADMIN_TOKEN}\nupstreams:\n  app: {{ servers: [\"{}\"] }}\nroutes:\n  - upstream: app\n    cache: {{ enabled: true }}\n    plugins: [ttl]\n{}",
        origin.url(),
        plugins_yaml(&[(
            "ttl",
            "add_headers",
            "config: { set: 'cache-control: s-maxage=300; surrogate-key: front news' }\nphase: cache_store"
        )])
    );
    let larder = start_larder(&yaml).await;
    for _ in 0..3 {
        let reply = get(&larder.url("/")).await;
        assert_eq!(reply.text(), "front page");
    }
    assert_eq!(origin.hits(), 1, "stored for the plugin's s-maxage");
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let purged = common::send(
        "POST",
        &larder.admin_url("/purge"),
        &[("authorization", &auth)],
        r#"{"tag": "news"}"#,
    )
    .await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    get(&larder.url("/")).await;
    assert_eq!(origin.hits(), 2, "purged by the plugin's tag");
    larder.stop().await;
}

/// Log output captured from the current thread's tracing subscriber.
#[derive(Clone, Default)]
struct CapturedLog(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut log) = self.0.lock() {
            log.extend_from_slice(bytes);
        }
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLog {
    fn text(&self) -> String {
        self.0
            .lock()
            .map(|log| String::from_utf8_lossy(&log).into_owned())
            .unwrap_or_default()
    }
}

/// The log of this whole test process (a global subscriber: a thread-scoped
/// one misses events whose callsites other threads hit first).
fn captured_log() -> &'static CapturedLog {
    static LOG: std::sync::OnceLock<CapturedLog> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let log = CapturedLog::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in this test binary (unset LARDER_TEST_LOG)");
        log
    })
}

#[tokio::test]
async fn guest_logs_and_stderr_reach_the_host_log_tagged_with_the_plugin() {
    let captured = captured_log();

    let host = host(&[
        // Built on the SDK (no WASI): its panic handler logs through `log`.
        ("log-crashy", fault_config("panic", "open")),
        // std (WASI): Rust's panic message goes to stderr.
        (
            "log-crashy-std",
            plugin(&format!(
                "path: {}\non_error: open\nconfig: {{ do: panic }}",
                wasm("misbehave").display()
            )),
        ),
        (
            "log-gate",
            plugin(&format!("path: {}", wasm("answer_direct").display())),
        ),
    ])
    .await;
    let mut parts = request(&[]);
    host.on_request(
        &chain(&["log-crashy", "log-crashy-std", "log-gate"]),
        &mut parts,
        &mut RequestState::default(),
        false,
    )
    .await
    .expect("open skips the crash; the gate answers");

    // Other tests log into the same process-wide log: look for this test's
    // plugin names only.
    let log = captured.text();
    let line_with = |plugin: &str, needle: &str| {
        log.lines()
            .find(|line| {
                line.contains(needle)
                    && (line.contains(&format!("plugin={plugin} "))
                        || line.contains(&format!("plugin=\"{plugin}\"")))
            })
            .unwrap_or_else(|| panic!("no log line of {plugin} with {needle:?} in:\n{log}"))
            .to_string()
    };
    let logged = line_with("log-crashy", "boom: deliberate panic");
    assert!(logged.contains("ERROR"), "{logged}");
    let stderr = line_with("log-crashy-std", "boom: deliberate panic");
    assert!(stderr.contains("stream=\"stderr\""), "{stderr}");
    for crashy in ["log-crashy", "log-crashy-std"] {
        let failure = line_with(crashy, "plugin call failed");
        assert!(
            failure.contains("kind=\"trap\"") || failure.contains("kind=trap"),
            "{failure}"
        );
    }
    line_with("log-gate", "refusing GET /items?page=2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_each_get_their_own_instance() {
    let host = host(&[("device", add_headers("{ cache_key_from: x-device }"))]).await;
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let host = host.clone();
            tokio::spawn(async move {
                let device = format!("device-{i}");
                let mut parts = request(&[("x-device", &device)]);
                let mut state = RequestState::default();
                host.on_request(&chain(&["device"]), &mut parts, &mut state, false)
                    .await
                    .map(|_| (device, state.cache_key_extra))
            })
        })
        .collect();
    for task in tasks {
        let (device, extra) = task.await.expect("task").expect("plugin runs");
        assert_eq!(extra, vec![device]);
    }
    assert_eq!(host.stats("device").map(|s| s.failures), Some(0));
}

#[tokio::test]
async fn a_transformed_chunked_body_gets_a_content_length() {
    let host = host(&[(
        "slim",
        plugin(&format!(
            "path: {}\nconfig: {{ drop: b }}",
            wasm("json_filter").display()
        )),
    )])
    .await;
    let chunks = futures_util::stream::iter([r#"{"a":1,"#, r#""b":2}"#].map(|chunk| {
        Ok::<_, larder::http::body::BoxError>(hyper::body::Frame::data(Bytes::from(chunk)))
    }));
    let streamed = Response::builder()
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(http_body_util::BodyExt::boxed(
            http_body_util::StreamBody::new(chunks),
        ))
        .expect("response");
    let out = host
        .on_response(
            &chain(&["slim"]),
            PluginPhase::Downstream,
            &request(&[]),
            streamed,
            None,
        )
        .await
        .expect("plugin runs");
    let (head, body) = text(out).await;
    assert_eq!(body, r#"{"a":1}"#);
    assert_eq!(head.headers["content-length"], "7");
    assert!(head.headers.get("transfer-encoding").is_none());
}

#[tokio::test]
async fn a_fetcher_gets_no_redirects_followed_and_no_oversized_bodies() {
    let elsewhere = json_origin(r#"{"data":"elsewhere"}"#).await;
    let target = format!("{}/loot", elsewhere.url());
    let redirecting = start_origin(move |_| {
        let target = target.clone();
        async move { respond(302, &[("location", target.as_str())], "") }
    })
    .await;
    let huge = start_origin(|_| async {
        respond(
            200,
            &[("content-type", "application/json")],
            vec![b' '; 9 * 1024 * 1024],
        )
    })
    .await;
    let fetcher = plugin(&format!(
        "path: {}\nallow_hosts: ['{}', '{}', '{}']",
        wasm("http_json").display(),
        redirecting.url(),
        huge.url(),
        elsewhere.url(),
    ));
    let host = host(&[("f", fetcher)]).await;
    match host
        .fetch(
            "f",
            fetch_context("s", &format!("{}/", redirecting.url())),
            no_values(),
        )
        .await
    {
        Err(PluginError { detail: reason, .. }) => {
            assert!(reason.contains("status 302"), "{reason}")
        }
        other => panic!("a redirect is handed back, not followed: {other:?}"),
    }
    assert_eq!(elsewhere.hits(), 0);
    match host
        .fetch(
            "f",
            fetch_context("s", &format!("{}/", huge.url())),
            no_values(),
        )
        .await
    {
        Err(PluginError { detail: reason, .. }) => {
            assert!(reason.contains("too large"), "{reason}")
        }
        other => panic!("a 9 MiB body is over the cap: {other:?}"),
    }
}

#[tokio::test]
async fn a_fetcher_reaches_an_allowed_host_name_through_the_guarded_resolver() {
    let api = json_origin(r#"{"data":[1,2]}"#).await;
    let origin = format!("http://localhost:{}", api.addr.port());
    let fetcher = plugin(&format!(
        "path: {}\nconfig: {{ pointer: /data }}\nallow_hosts: ['{origin}']",
        wasm("http_json").display()
    ));
    let host = host(&[("named", fetcher)]).await;
    match host
        .fetch(
            "named",
            fetch_context("n", &format!("{origin}/x")),
            no_values(),
        )
        .await
    {
        Ok(FetchOutcome::Updated { body, .. }) => assert_eq!(body, Bytes::from_static(b"[1,2]")),
        other => panic!("localhost is allowed by name: {other:?}"),
    }
    assert_eq!(api.hits(), 1);
}

#[tokio::test]
async fn a_plugin_within_its_memory_limit_runs_normally() {
    let mut frugal = fault_config("eat_memory", "closed");
    frugal.config.insert("mib".to_string(), "8".to_string());
    let host = host(&[("frugal", frugal)]).await;
    let mut parts = request(&[]);
    let result = host
        .on_request(
            &chain(&["frugal"]),
            &mut parts,
            &mut RequestState::default(),
            false,
        )
        .await;
    assert!(
        matches!(result, Ok(None)),
        "8 MiB fits in 32 MiB: {result:?}"
    );
    assert_eq!(host.stats("frugal").map(|s| s.failures), Some(0));
}

#[tokio::test]
async fn a_config_reload_swaps_plugin_settings_and_refuses_a_broken_plugin() {
    let origin = start_origin(|_| async { respond(200, &[], "ok") }).await;
    let yaml = |set: &str| {
        format!(
            "upstreams:\n  app: {{ servers: [\"{}\"] }}\nroutes:\n  - upstream: app\n    plugins: [stamp]\n{}",
            origin.url(),
            plugins_yaml(&[(
                "stamp",
                "add_headers",
                &format!("config: {{ set: '{set}' }}")
            )])
        )
    };
    let larder = start_larder(&yaml("x-release: one")).await;
    assert_eq!(get(&larder.url("/")).await.header("x-release"), Some("one"));
    larder
        .reload(&yaml("x-release: two"))
        .await
        .expect("reload with new plugin settings");
    assert_eq!(get(&larder.url("/")).await.header("x-release"), Some("two"));
    let refused = larder.reload(&yaml("no colon")).await;
    let error = refused.expect_err("a plugin refusing its config fails the reload");
    assert!(error.contains("stamp"), "{error}");
    assert_eq!(
        get(&larder.url("/")).await.header("x-release"),
        Some("two"),
        "the running plugin is kept"
    );
    larder.stop().await;
}

#[tokio::test]
async fn a_plugins_cache_key_parts_keep_variants_apart() {
    let origin = start_origin(|request: Request<hyper::body::Incoming>| async move {
        let device = request
            .headers()
            .get("x-device")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_string();
        respond(
            200,
            &[("cache-control", "max-age=60")],
            format!("page for {device}"),
        )
    })
    .await;
    let yaml = format!(
        "upstreams:\n  app: {{ servers: [\"{}\"] }}\nroutes:\n  - upstream: app\n    cache: {{ enabled: true }}\n    plugins: [by-device]\n{}",
        origin.url(),
        plugins_yaml(&[(
            "by-device",
            "add_headers",
            "config: { cache_key_from: x-device }"
        )])
    );
    let larder = start_larder(&yaml).await;
    let url = larder.url("/home");
    for _ in 0..3 {
        let phone = get_with(&url, &[("x-device", "phone")]).await;
        assert_eq!(phone.text(), "page for phone");
        let tablet = get_with(&url, &[("x-device", "tablet")]).await;
        assert_eq!(tablet.text(), "page for tablet");
    }
    assert_eq!(origin.hits(), 2, "one fill per device, hits after that");
    larder.stop().await;
}

#[tokio::test]
async fn a_plugin_sets_ttl_and_tags_and_reads_the_request_in_on_response() {
    let mut store = add_headers("{ ttl: '60', tags: 'news sport' }");
    store.phase = PluginPhase::CacheStore;
    let copy = add_headers("{ copy_from_request: 'x-request-id' }");
    let host = host(&[("store", store), ("copy", copy)]).await;
    assert_eq!(
        host.stats("copy").expect("stats").hooks,
        ["on_response", "request_in_response"]
    );
    let mut upstream = response("text/plain", "hi");
    upstream.headers_mut().insert(
        "cache-control",
        http::HeaderValue::from_static("public, s-maxage=5"),
    );
    upstream
        .headers_mut()
        .insert("surrogate-key", http::HeaderValue::from_static("news"));
    let stored = host
        .on_response(
            &chain(&["store"]),
            PluginPhase::CacheStore,
            &request(&[]),
            upstream,
            None,
        )
        .await
        .expect("plugin runs");
    assert_eq!(stored.headers()["cache-control"], "public, s-maxage=60");
    assert_eq!(stored.headers()["surrogate-key"], "news sport");

    let copied = host
        .on_response(
            &chain(&["copy"]),
            PluginPhase::Downstream,
            &request(&[("x-request-id", "abc-1")]),
            response("text/plain", "hi"),
            None,
        )
        .await
        .expect("plugin runs");
    assert_eq!(copied.headers()["x-request-id"], "abc-1");
}
