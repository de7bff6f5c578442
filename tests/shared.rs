//! The shared tier on Redis, through real Larders and a real `redis-server`
//! (started by each test on a Unix socket in a temporary directory, stopped
//! by PID): a miss on one instance is a hit on another, local hits make no
//! Redis calls, Vary variants, namespaces, size caps, corrupt records,
//! purges, and Redis going away.

mod common;

use std::path::Path;

use common::redis_server::Redis;
use common::{
    ADMIN_BLOCK, Larder, eventually, get_with, respond, start_larder, start_numbered_origin,
    start_origin,
};
use http::Request;

/// A Larder with the shared tier on `redis` in `namespace`; `extra` adds
/// lines under `shared:`.
fn config(origin: &str, redis_url: &str, namespace: &str, extra: &str) -> String {
    format!(
        "{ADMIN_BLOCK}shared:\n  url: '{redis_url}'\n  namespace: {namespace}\n{extra}upstreams:\n  app:\n    servers: [\"{origin}\"]\nroutes:\n  - match: {{ path_prefix: / }}\n    upstream: app\n    cache: {{ enabled: true }}\n"
    )
}

/// An origin whose answers are cacheable for a minute; `/vary/*` varies on
/// Accept-Language, `/big/*` is 4 KiB.
async fn cacheable_origin() -> common::Origin {
    start_origin(|request: Request<hyper::body::Incoming>| async move {
        let path = request.uri().path().to_string();
        if path.starts_with("/vary/") {
            let language = request
                .headers()
                .get("accept-language")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_string();
            return respond(
                200,
                &[("cache-control", "max-age=60"), ("vary", "accept-language")],
                format!("{path} in {language}"),
            );
        }
        if path.starts_with("/big/") {
            return respond(200, &[("cache-control", "max-age=60")], vec![b'b'; 4096]);
        }
        respond(
            200,
            &[("cache-control", "max-age=60")],
            format!("body of {path}"),
        )
    })
    .await
}

/// Waits until the tier holds `count` records under `namespace`.
async fn records_written(redis: &Redis, namespace: &str, count: usize) -> Vec<String> {
    let pattern = format!("larder:{namespace}:obj:*");
    eventually(format!("{count} record(s) in redis"), async || {
        let keys = redis.keys(&pattern).await;
        (keys.len() >= count).then_some(keys)
    })
    .await
}

/// The host every instance is asked for, as behind one load balancer (the
/// cache key includes it; each test Larder listens on a port of its own).
const SITE: &str = "shop.example";

/// GETs `path` from `larder` as a request for [`SITE`].
async fn fetch(larder: &Larder, path: &str) -> common::Reply {
    get_with(&larder.url(path), &[("host", SITE)]).await
}

async fn fetch_with(larder: &Larder, path: &str, header: (&str, &str)) -> common::Reply {
    get_with(&larder.url(path), &[("host", SITE), header]).await
}

fn assert_tier_hit(reply: &common::Reply, body: &str) {
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), body);
    assert!(
        reply.cache_status().contains("hit") && reply.cache_status().contains("detail=shared"),
        "{}",
        reply.cache_status()
    );
}

/// Purges through `larder`'s admin API; what its answer says of the shared tier.
async fn purge(larder: &Larder, json: serde_json::Value) -> String {
    let reply = larder.admin("POST", "/purge", json.to_string()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()["shared"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn a_miss_on_one_instance_is_a_hit_on_another_and_local_hits_call_no_redis() {
    let redis = Redis::start().await;
    let origin = cacheable_origin().await;
    let yaml = config(&origin.url(), &redis.url(), "shop", "");
    let (a, b) = (start_larder(&yaml).await, start_larder(&yaml).await);

    let first = fetch(&a, "/page").await;
    assert_eq!(first.text(), "body of /page");
    assert!(
        first.cache_status().contains("fwd=uri-miss"),
        "{}",
        first.cache_status()
    );
    records_written(&redis, "shop", 1).await;

    let shared = fetch(&b, "/page").await;
    assert_tier_hit(&shared, "body of /page");
    assert_eq!(origin.hits(), 1, "one origin request for both instances");

    // B keeps its copy: from now on its hits are local, with no Redis call.
    let before = redis.command_calls().await;
    for _ in 0..20 {
        let local = fetch(&b, "/page").await;
        assert_eq!(local.text(), "body of /page");
        assert!(
            !local.cache_status().contains("detail=shared"),
            "{}",
            local.cache_status()
        );
        let local = fetch(&a, "/page").await;
        assert_eq!(local.text(), "body of /page");
    }
    let after = redis.command_calls().await;
    let mut calls: Vec<(String, u64)> = after
        .iter()
        .map(|(name, calls)| (name.clone(), calls - before.get(name).copied().unwrap_or(0)))
        .filter(|(name, calls)| *calls > 0 && name != "info")
        .collect();
    calls.sort();
    assert!(
        calls.is_empty(),
        "Redis commands during local hits: {calls:?}"
    );
    assert_eq!(origin.hits(), 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn vary_variants_are_shared_each_under_its_own_values() {
    let redis = Redis::start().await;
    let origin = cacheable_origin().await;
    let yaml = config(&origin.url(), &redis.url(), "vary", "");
    let (a, b) = (start_larder(&yaml).await, start_larder(&yaml).await);
    for language in ["en", "fr"] {
        let reply = fetch_with(&a, "/vary/x", ("accept-language", language)).await;
        assert_eq!(reply.text(), format!("/vary/x in {language}"));
    }
    records_written(&redis, "vary", 2).await;
    for language in ["fr", "en"] {
        let reply = fetch_with(&b, "/vary/x", ("accept-language", language)).await;
        assert_tier_hit(&reply, &format!("/vary/x in {language}"));
    }
    assert_eq!(origin.hits(), 2);
    // A language nobody asked for yet is the origin's.
    let german = fetch_with(&b, "/vary/x", ("accept-language", "de")).await;
    assert_eq!(german.text(), "/vary/x in de");
    assert!(!german.cache_status().contains("detail=shared"));
    assert_eq!(origin.hits(), 3);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn namespaces_on_one_redis_do_not_share_and_big_objects_stay_local() {
    let redis = Redis::start().await;
    let origin = cacheable_origin().await;
    let a = start_larder(&config(
        &origin.url(),
        &redis.url(),
        "one",
        "  max_object_size: 1KiB\n",
    ))
    .await;
    let other = start_larder(&config(&origin.url(), &redis.url(), "two", "")).await;
    let b = start_larder(&config(
        &origin.url(),
        &redis.url(),
        "one",
        "  max_object_size: 1KiB\n",
    ))
    .await;

    assert_eq!(fetch(&a, "/small").await.status, 200);
    assert_eq!(fetch(&a, "/big/1").await.status, 200);
    records_written(&redis, "one", 1).await;
    let in_other = fetch(&other, "/small").await;
    assert!(
        !in_other.cache_status().contains("detail=shared"),
        "{}",
        in_other.cache_status()
    );
    assert_eq!(origin.hits(), 3, "another namespace fetches for itself");

    assert_tier_hit(&fetch(&b, "/small").await, "body of /small");
    let big = fetch(&b, "/big/1").await;
    assert_eq!(big.body.len(), 4096);
    assert!(
        !big.cache_status().contains("detail=shared"),
        "over shared.max_object_size: {}",
        big.cache_status()
    );
    assert_eq!(origin.hits(), 4);
    assert_eq!(
        redis.keys("larder:one:obj:*").await.len(),
        1,
        "the big object was not written"
    );
    for larder in [a, other, b] {
        larder.stop().await;
    }
}

#[tokio::test]
async fn a_corrupt_record_is_a_miss_and_is_replaced() {
    let redis = Redis::start().await;
    let origin = cacheable_origin().await;
    let yaml = config(&origin.url(), &redis.url(), "junk", "");
    let (a, b) = (start_larder(&yaml).await, start_larder(&yaml).await);
    assert_eq!(fetch(&a, "/page").await.status, 200);
    let keys = records_written(&redis, "junk", 1).await;
    let junk: &[u8] = b"LDR1 not really";
    redis.set_raw(&keys[0], junk).await;

    let reply = fetch(&b, "/page").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "body of /page");
    assert!(
        !reply.cache_status().contains("detail=shared"),
        "{}",
        reply.cache_status()
    );
    assert_eq!(origin.hits(), 2, "the corrupt record was a miss");
    // B wrote a good record in its place (behind its response, so wait for
    // it): a third instance hits it.
    eventually("B's record in place of the junk", async || {
        for key in redis.keys("larder:junk:obj:*").await {
            if redis.get_raw(&key).await.is_some_and(|raw| raw != junk) {
                return true;
            }
        }
        false
    })
    .await;
    let c = start_larder(&yaml).await;
    let reply = fetch(&c, "/page").await;
    assert_eq!(reply.text(), "body of /page");
    assert!(
        reply.cache_status().contains("detail=shared"),
        "{}",
        reply.cache_status()
    );
    assert_eq!(origin.hits(), 2);
    for larder in [a, b, c] {
        larder.stop().await;
    }
}

#[tokio::test]
async fn after_a_purge_no_instance_gets_the_purged_response_from_redis() {
    let redis = Redis::start().await;
    // Each fetch is a new version: "v1", "v2", ...
    let origin = start_numbered_origin(|_, n| async move {
        respond(200, &[("cache-control", "max-age=60")], format!("v{n}"))
    })
    .await;
    let yaml = config(&origin.url(), &redis.url(), "purge", "");
    let a = start_larder(&yaml).await;
    assert_eq!(fetch(&a, "/page").await.text(), "v1");
    records_written(&redis, "purge", 1).await;

    let reach = purge(
        &a,
        serde_json::json!({ "url": format!("http://{SITE}/page") }),
    )
    .await;
    assert_eq!(reach, "published");
    let again = fetch(&a, "/page").await;
    assert_eq!(
        again.text(),
        "v2",
        "the purged copy came back from redis: {}",
        again.cache_status()
    );
    // Nor does an instance that never had it get it from Redis, where it
    // still is (the purge raised the generation rather than find records).
    let b = start_larder(&yaml).await;
    assert_ne!(fetch(&b, "/page").await.text(), "v1");
    for kind in [
        serde_json::json!({ "prefix": format!("http://{SITE}/") }),
        serde_json::json!({ "tag": "none" }),
        serde_json::json!({ "all": true }),
    ] {
        let c = start_larder(&yaml).await;
        let before = fetch(&c, "/page").await.text();
        assert_eq!(purge(&a, kind.clone()).await, "published");
        let d = start_larder(&yaml).await;
        assert_ne!(fetch(&d, "/page").await.text(), before, "after {kind}");
        c.stop().await;
        d.stop().await;
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn without_redis_larder_starts_and_serves_and_a_redis_that_dies_costs_no_request() {
    let origin = cacheable_origin().await;
    // Nothing listens on this socket.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let absent = format!(
        "redis+unix://{}",
        Path::new(dir.path()).join("none.sock").display()
    );
    let lonely = start_larder(&config(&origin.url(), &absent, "alone", "")).await;
    for i in 0..10 {
        let reply = fetch(&lonely, &format!("/p/{i}")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(fetch(&lonely, &format!("/p/{i}")).await.status, 200);
    }
    assert_eq!(origin.hits(), 10, "cached locally all the same");
    assert_eq!(lonely.admin("GET", "/health", "").await.status, 200);
    lonely.stop().await;

    let mut redis = Redis::start().await;
    let yaml = config(&origin.url(), &redis.url(), "dies", "");
    let a = start_larder(&yaml).await;
    assert_eq!(fetch(&a, "/before").await.status, 200);
    records_written(&redis, "dies", 1).await;
    redis.kill();
    let hits = origin.hits();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let url = a.url(&format!("/after/{}", i % 10));
            tokio::spawn(async move { get_with(&url, &[("host", SITE)]).await })
        })
        .collect();
    for task in tasks {
        let reply = task.await.expect("a request task");
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert!(origin.hits() >= hits + 10);
    assert_eq!(fetch(&a, "/before").await.status, 200);
    a.stop().await;
}

/// An origin whose every fetch is a new version ("v1", "v2", ...), tagged
/// `t1` for tag purges.
async fn versioned_origin() -> common::Origin {
    start_numbered_origin(|_, n| async move {
        respond(
            200,
            &[("cache-control", "max-age=60"), ("surrogate-key", "t1")],
            format!("v{n}"),
        )
    })
    .await
}

/// Makes `larder` hold `/page` in its own memory; the version it holds.
async fn held_locally(larder: &Larder) -> String {
    let first = fetch(larder, "/page").await.text();
    let again = fetch(larder, "/page").await;
    assert_eq!(again.text(), first);
    assert!(
        again.cache_status().contains("hit") && !again.cache_status().contains("detail=shared"),
        "{}",
        again.cache_status()
    );
    first
}

#[tokio::test]
async fn a_purge_on_one_instance_reaches_the_memory_of_the_others() {
    let redis = Redis::start().await;
    let origin = versioned_origin().await;
    let yaml = config(&origin.url(), &redis.url(), "reach", "");
    let (a, b) = (start_larder(&yaml).await, start_larder(&yaml).await);
    for kind in [
        serde_json::json!({ "url": format!("http://{SITE}/page") }),
        serde_json::json!({ "prefix": format!("http://{SITE}/") }),
        serde_json::json!({ "tag": "t1" }),
        serde_json::json!({ "all": true }),
    ] {
        let held = held_locally(&b).await;
        assert_eq!(purge(&a, kind.clone()).await, "published");
        eventually(format!("B to drop {held} after {kind}"), async || {
            fetch(&b, "/page").await.text() != held
        })
        .await;
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_purge_whose_message_was_lost_still_reaches_the_others() {
    let redis = Redis::start().await;
    let origin = versioned_origin().await;
    let yaml = config(&origin.url(), &redis.url(), "lost", "");
    let (a, b) = (start_larder(&yaml).await, start_larder(&yaml).await);
    let held = held_locally(&b).await;
    // Every subscriber's connection goes: a message published now reaches
    // nobody; the instances find the purge in the log when they look.
    let killed = redis
        .try_command(&["CLIENT", "KILL", "TYPE", "pubsub"])
        .await
        .expect("CLIENT KILL");
    assert_ne!(killed, redis::Value::Int(0), "no subscriber to kill");
    assert_eq!(
        purge(
            &a,
            serde_json::json!({ "url": format!("http://{SITE}/page") })
        )
        .await,
        "published"
    );
    eventually("B to drop the purged copy", async || {
        fetch(&b, "/page").await.text() != held
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_redis_that_lost_its_data_flushes_every_instance() {
    let redis = Redis::start().await;
    let origin = versioned_origin().await;
    let yaml = config(&origin.url(), &redis.url(), "flushed", "");
    let b = start_larder(&yaml).await;
    let held = held_locally(&b).await;
    eventually("B to have looked at redis", async || {
        !redis.keys("larder:flushed:epoch").await.is_empty()
    })
    .await;
    redis.try_command(&["FLUSHALL"]).await.expect("FLUSHALL");
    eventually("B to flush its memory", async || {
        fetch(&b, "/page").await.text() != held
    })
    .await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_costs_no_request_and_a_purge_meanwhile_reaches_it_when_it_answers() {
    let redis = Redis::start().await;
    let origin = start_numbered_origin(|_, n| async move {
        respond(200, &[("cache-control", "max-age=60")], format!("v{n}"))
    })
    .await;
    let yaml = config(&origin.url(), &redis.url(), "hung", "");
    let a = start_larder(&yaml).await;
    assert_eq!(fetch(&a, "/page").await.text(), "v1");
    records_written(&redis, "hung", 1).await;

    redis.freeze(true);
    // Misses go to the origin after at most the read timeout; none fails.
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let url = a.url(&format!("/other/{}", i % 8));
            tokio::spawn(async move { get_with(&url, &[("host", SITE)]).await })
        })
        .collect();
    for task in tasks {
        let reply = task.await.expect("a request task");
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let state = a.admin("GET", "/cache", "").await.json();
    assert_eq!(state["shared"]["state"], "degraded", "{state}");
    // A purge cannot reach Redis now: it is queued, and applied here.
    let reach = purge(
        &a,
        serde_json::json!({ "url": format!("http://{SITE}/page") }),
    )
    .await;
    assert_eq!(reach, "queued");
    let after = fetch(&a, "/page").await;
    assert_ne!(after.text(), "v1", "purged here at once");

    // Redis answers again: the queued purge goes out, so an instance that
    // never had /page does not get v1 from Redis, where it still is.
    redis.freeze(false);
    let b = start_larder(&yaml).await;
    eventually("the queued purge to reach redis", async || {
        let mut connection = redis.connection().await.ok()?;
        let generation: Option<u64> = redis::cmd("GET")
            .arg("larder:hung:gen")
            .query_async(&mut connection)
            .await
            .ok()?;
        generation.filter(|g| *g >= 1)
    })
    .await;
    assert_ne!(fetch(&b, "/page").await.text(), "v1");
    eventually("the shared tier to be ok again", async || {
        a.admin("GET", "/cache", "").await.json()["shared"]["state"] == "ok"
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_shared_entry_is_revalidated_by_one_instance_while_the_others_serve_it() {
    let redis = Redis::start().await;
    // The revalidation takes a while, so the instances' refreshes overlap.
    // No Date: the instances' clock is moved, the origin's would not be.
    let origin = common::start_dateless_origin(|_, n| async move {
        if n > 1 {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
        respond(
            200,
            &[("cache-control", "max-age=10, stale-while-revalidate=60")],
            format!("v{n}"),
        )
    })
    .await;
    let clock = std::sync::Arc::new(larder::cache::ManualClock::default());
    let yaml = config(&origin.url(), &redis.url(), "reval", "");
    let start = async || {
        let options = larder::app::Options {
            clock: clock.clone(),
            ..Default::default()
        };
        common::start_larder_with(&yaml, options).await
    };
    let (a, b, c) = (start().await, start().await, start().await);
    assert_eq!(fetch(&a, "/page").await.text(), "v1");
    records_written(&redis, "reval", 1).await;
    assert_tier_hit(&fetch(&b, "/page").await, "v1");

    clock.advance(std::time::Duration::from_secs(20));
    // C has no copy of its own: the stale record is served as a stale hit.
    let from_tier = fetch(&c, "/page").await;
    assert_eq!(from_tier.text(), "v1");
    assert!(
        from_tier.cache_status().contains("ttl=-")
            && from_tier.cache_status().contains("detail=shared"),
        "{}",
        from_tier.cache_status()
    );
    // All three serve their stale copy at once and refresh it behind.
    let (ra, rb, rc) = tokio::join!(fetch(&a, "/page"), fetch(&b, "/page"), fetch(&c, "/page"));
    for reply in [ra, rb, rc] {
        assert_eq!(reply.text(), "v1", "{}", reply.cache_status());
    }
    for larder in [&a, &b, &c] {
        eventually(
            "every instance to hold the revalidated response",
            async || fetch(larder, "/page").await.text() == "v2",
        )
        .await;
    }
    assert_eq!(origin.hits(), 2, "one revalidation for the three instances");
    for larder in [a, b, c] {
        larder.stop().await;
    }
}

/// A config of `sources` only, shared in `namespace` on `redis`.
fn sources_config(redis_url: &str, namespace: &str, sources: &str) -> String {
    let sources = if sources.is_empty() { " {}\n" } else { sources };
    format!(
        "{ADMIN_BLOCK}shared:\n  url: '{redis_url}'\n  namespace: {namespace}\nsources:\n{sources}"
    )
}

/// An HTTP source named `clock` on `origin`, fired by `rule`.
fn clock_source(origin: &common::Origin, rule: &str) -> String {
    format!(
        "  clock:\n    rule: '{rule}'\n    http:\n      endpoint: '{}/clock'\n",
        origin.url()
    )
}

/// What `/sources` on `larder` says of its source `name`, once it has a value.
async fn source_status(larder: &Larder, name: &str) -> serde_json::Value {
    eventually(format!("source {name} to have a value"), async || {
        let status = larder.admin("GET", "/sources", "").await.json();
        status["sources"]
            .as_array()?
            .iter()
            .find(|source| source["name"] == name && !source["etag"].is_null())
            .cloned()
    })
    .await
}

async fn instance_of(larder: &Larder) -> String {
    let status = larder.admin("GET", "/sources", "").await.json();
    status["instance"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_fetch_a_source_once_per_tick_and_hold_the_same_value() {
    let redis = Redis::start().await;
    let origin =
        start_numbered_origin(|_, n| async move { respond(200, &[], format!("v{n}")) }).await;
    let yaml = sources_config(&redis.url(), "ticks", &clock_source(&origin, "* * * * * *"));
    let larders = [
        start_larder(&yaml).await,
        start_larder(&yaml).await,
        start_larder(&yaml).await,
    ];
    for larder in &larders {
        source_status(larder, "clock").await;
    }
    // Ten seconds of ticks, measured: one fetch per tick for the three,
    // where each fetching for itself would make thirty.
    let before = origin.hits();
    let window = std::time::Instant::now();
    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
    let fetched = origin.hits() - before;
    let ticks = window.elapsed().as_secs() as usize;
    assert!(
        (ticks - 2..=ticks + 1).contains(&fetched),
        "{fetched} origin requests in {ticks} ticks of three instances"
    );

    let mut instances = Vec::new();
    for larder in &larders {
        instances.push(instance_of(larder).await);
    }
    assert_eq!(
        instances
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        3,
        "{instances:?}"
    );
    let values = eventually("the three instances to hold the same value", async || {
        let mut values = Vec::new();
        for larder in &larders {
            let status = source_status(larder, "clock").await;
            values.push((status["etag"].clone(), status["fetched_by"].clone()));
        }
        values
            .iter()
            .all(|value| *value == values[0])
            .then_some(values)
    })
    .await;
    let fetched_by = values[0].1.as_str().unwrap_or_default().to_string();
    assert!(
        instances.contains(&fetched_by),
        "{fetched_by} is not one of {instances:?}"
    );
    for larder in larders {
        larder.stop().await;
    }
}

#[tokio::test]
async fn a_cluster_that_starts_together_fetches_each_source_once() {
    let redis = Redis::start().await;
    let origin =
        start_numbered_origin(|_, n| async move { respond(200, &[], format!("v{n}")) }).await;
    let yaml = sources_config(&redis.url(), "start", &clock_source(&origin, "0 0 0 1 1 *"));
    let (a, b, c) = tokio::join!(
        start_larder(&yaml),
        start_larder(&yaml),
        start_larder(&yaml)
    );
    let etags = [
        source_status(&a, "clock").await["etag"].clone(),
        source_status(&b, "clock").await["etag"].clone(),
        source_status(&c, "clock").await["etag"].clone(),
    ];
    assert_eq!(origin.hits(), 1, "one fetch for the cluster");
    assert!(etags.iter().all(|etag| *etag == etags[0]), "{etags:?}");
    // One that starts later installs the stored value, and fetches nothing.
    let late = start_larder(&yaml).await;
    assert_eq!(source_status(&late, "clock").await["etag"], etags[0]);
    assert_eq!(origin.hits(), 1);
    for larder in [a, b, c, late] {
        larder.stop().await;
    }
}

#[tokio::test]
async fn without_redis_every_instance_fetches_its_sources_itself() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let absent = format!("redis+unix://{}", dir.path().join("none.sock").display());
    let origin =
        start_numbered_origin(|_, n| async move { respond(200, &[], format!("v{n}")) }).await;
    let opted_out =
        "  own:\n    rule: '0 0 0 1 1 *'\n    shared: false\n    static:\n      value: mine\n";
    let yaml = sources_config(
        &absent,
        "alone",
        &(clock_source(&origin, "0 0 0 1 1 *") + opted_out),
    );
    let (a, b) = (start_larder(&yaml).await, start_larder(&yaml).await);
    for larder in [&a, &b] {
        assert!(source_status(larder, "clock").await["fetched_by"].is_string());
        assert!(source_status(larder, "own").await["fetched_by"].is_null());
    }
    assert_eq!(origin.hits(), 2, "each instance fetched for itself");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_value_of_an_older_tick_never_replaces_a_newer_one() {
    use larder::sources::SharedSources as _;
    let redis = Redis::start().await;
    let yaml = sources_config(&redis.url(), "fence", "");
    let config = larder::config::load_str(&yaml, "fence.yml").expect("a valid config");
    let shared = config.shared.expect("a shared block");
    let tier = larder::shared::RedisTier::start(&shared).expect("a tier");
    let hold = std::time::Duration::from_secs(5);
    assert_eq!(tier.claim("s", 2_000, hold).await, Ok(true));
    assert_eq!(
        tier.claim("s", 2_000, hold).await,
        Ok(false),
        "claimed once"
    );
    assert_eq!(tier.publish("s", 2_000, "new".into()).await, Ok(true));
    // An instance that was slow with tick 1000 publishes after 2000's value.
    assert_eq!(tier.publish("s", 1_000, "old".into()).await, Ok(false));
    assert_eq!(tier.publish("s", 2_000, "again".into()).await, Ok(false));
    assert_eq!(tier.read("s").await, Ok(Some((2_000, "new".into()))));
    assert_eq!(tier.read("t").await, Ok(None));
}

#[test]
fn the_shared_block_is_checked() {
    let errors = larder::config::load_str(
        "shared:\n  url: 'http://127.0.0.1:6379'\n  namespace: 'a b'\n  read_timeout: 0s\n",
        "bad.yml",
    )
    .expect_err("a bad shared block");
    let text = errors.to_string();
    for key in ["shared.url", "shared.namespace", "shared.read_timeout"] {
        assert!(text.contains(key), "{key} missing from:\n{text}");
    }
    assert!(text.contains("bad.yml:2"), "{text}");
    let missing = larder::config::load_str("shared:\n  url: 'redis://127.0.0.1'\n", "m.yml")
        .expect_err("no namespace");
    assert!(missing.to_string().contains("namespace"), "{missing}");
}
