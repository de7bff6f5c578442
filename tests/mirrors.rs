//! Mirrored sources, end to end: a real `etcd` (Debian's `etcd-server`)
//! started by each test on free loopback ports with a temporary data dir,
//! Larder in process (or its binary, where its memory and threads are
//! measured), real files swapped by rename, and clients that wait for the
//! next change. Every wait is for an event or polls with a deadline.

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::redis_server::Redis;
use common::{
    ADMIN_BLOCK, ADMIN_TOKEN, Larder, eventually, get, get_with, respond, served, start_larder,
    start_origin,
};
use http::StatusCode;

/// One etcd member on 127.0.0.1, stopped (SIGKILL) when dropped.
struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free loopback port")
}

impl Etcd {
    async fn start() -> Self {
        let mut etcd = Self {
            child: None,
            dir: tempfile::tempdir().expect("a temporary directory"),
            client_port: free_port(),
            peer_port: free_port(),
        };
        etcd.run_on(etcd.client_port).await;
        etcd
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the member (again, on its data dir) serving clients on `port`.
    async fn run_on(&mut self, port: u16) {
        let client_url = format!("http://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .args([
                "--name",
                "larder-test",
                "--logger",
                "zap",
                "--log-level",
                "error",
            ])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("larder-test={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (apt-get install etcd-server)");
        self.child = Some(child);
        let endpoint = format!("127.0.0.1:{port}");
        eventually(
            "etcd to answer",
            async || match etcd_client::Client::connect([endpoint.as_str()], None).await {
                Ok(mut client) => client.get("ping", None).await.is_ok(),
                Err(_) => false,
            },
        )
        .await;
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    async fn client_on(port: u16) -> etcd_client::Client {
        etcd_client::Client::connect([format!("127.0.0.1:{port}")], None)
            .await
            .expect("connect to etcd")
    }

    async fn client(&self) -> etcd_client::Client {
        Self::client_on(self.client_port).await
    }

    /// Puts `key`; returns the revision of the put.
    async fn put(&self, key: &str, value: &str) -> i64 {
        let response = self
            .client()
            .await
            .put(key, value, None)
            .await
            .expect("etcd put");
        response.header().expect("header").revision()
    }

    async fn delete(&self, key: &str) {
        self.client()
            .await
            .delete(key, None)
            .await
            .expect("etcd delete");
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Larder with the source `flags` mirroring `prefix` of `etcd`, served at
/// `/flags` (and `/flags/<key>`), with the admin API.
fn mirror_config(etcd: &Etcd, prefix: &str, extra: &str) -> String {
    format!(
        "{ADMIN_BLOCK}routes:\n  - match: {{ path_prefix: /flags }}\n    source: flags\nsources:\n  flags:\n    etcd:\n      endpoints: ['{}']\n      prefix: '{prefix}'\n{extra}",
        etcd.endpoint()
    )
}

/// The mirror's entry in `GET /sources`.
async fn mirror_status(larder: &Larder) -> serde_json::Value {
    let sources = larder.admin("GET", "/sources", "").await.json();
    sources["sources"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == "flags"))
        .cloned()
        .expect("the flags source in /sources")
}

/// Waits until `/flags` serves `expected` (as JSON) and returns its ETag.
async fn serves(larder: &Larder, expected: serde_json::Value) -> String {
    let url = larder.url("/flags");
    eventually(format!("/flags to serve {expected}"), async || {
        let reply = get(&url).await;
        (reply.status == StatusCode::OK
            && serde_json::from_slice::<serde_json::Value>(&reply.body).ok()
                == Some(expected.clone()))
        .then(|| reply.header("etag").unwrap_or_default().to_string())
    })
    .await
}

/// A GET that waits for a change of the version `etag`, for `wait`.
async fn wait_for_change(url: &str, etag: &str, wait: &str) -> common::Reply {
    let url = format!("{url}?version={}&wait={wait}", etag.trim_matches('"'));
    get(&url).await
}

#[tokio::test]
async fn a_put_reaches_a_waiting_client_and_a_delete_removes_the_member() {
    let etcd = Etcd::start().await;
    etcd.put("/flags/dark-mode", "on").await;
    let loaded_at = etcd.put("/other/ignored", "x").await;
    let larder = start_larder(&mirror_config(&etcd, "/flags/", "")).await;
    let etag = serves(&larder, serde_json::json!({ "dark-mode": "on" })).await;
    assert_eq!(
        etag,
        format!("\"{loaded_at}\""),
        "the ETag is the revision the copy was loaded at"
    );

    // A client waiting on the current version is answered by the put (the
    // wait is far longer than any test: a 304 would mean the put was missed).
    let url = larder.url("/flags");
    let waiting = tokio::spawn({
        let (url, etag) = (url.clone(), etag.clone());
        async move { wait_for_change(&url, &etag, "60s").await }
    });
    eventually("the client to be waiting", async || {
        mirror_waiters(&larder).await == 1.0
    })
    .await;
    let second = etcd.put("/flags/beta", "{\"pct\": 5}").await;
    let reply = waiting.await.expect("the waiting client");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("etag"), Some(format!("\"{second}\"").as_str()));
    assert_eq!(
        reply.json(),
        serde_json::json!({ "beta": "{\"pct\": 5}", "dark-mode": "on" })
    );
    assert_eq!(reply.header("cache-control"), Some("no-cache"));

    etcd.delete("/flags/dark-mode").await;
    serves(&larder, serde_json::json!({ "beta": "{\"pct\": 5}" })).await;
    let status = mirror_status(&larder).await;
    assert_eq!(status["kind"], "etcd");
    assert_eq!(status["mirror"]["state"], "connected");
    assert_eq!(status["mirror"]["keys"], 1);
    assert_eq!(status["mirror"]["events_applied"], 2);
    larder.stop().await;
}

/// `larder_source_waiting_clients` for `flags`, from `/metrics`.
async fn mirror_waiters(larder: &Larder) -> f64 {
    waiting_clients(&larder.admin("GET", "/metrics", "").await.text(), "flags")
}

fn waiting_clients(metrics: &str, source: &str) -> f64 {
    let label = format!("source=\"{source}\"");
    metrics
        .lines()
        .find(|line| line.starts_with("larder_source_waiting_clients{") && line.contains(&label))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn values_decode_as_json_when_asked_and_each_key_reads_alone_with_its_own_etag() {
    let etcd = Etcd::start().await;
    let a = etcd.put("/cfg/limits", "{\"rps\": 100}").await;
    let b = etcd.put("/cfg/motd", "hello").await;
    let yaml = format!(
        "routes:\n  - match: {{ path_prefix: /cfg }}\n    source: cfg\nsources:\n  cfg:\n    etcd:\n      endpoints: ['{}']\n      prefix: /cfg/\n      decode: json\n",
        etcd.endpoint()
    );
    let larder = start_larder(&yaml).await;
    let whole = served(&larder.url("/cfg")).await;
    assert_eq!(
        whole.json(),
        serde_json::json!({ "limits": { "rps": 100 }, "motd": "hello" }),
        "JSON values are parsed, others stay strings"
    );

    let limits = get(&larder.url("/cfg/limits")).await;
    assert_eq!(limits.status, StatusCode::OK);
    assert_eq!(limits.text(), "{\"rps\": 100}");
    assert_eq!(limits.header("content-type"), Some("application/json"));
    assert_eq!(limits.header("etag"), Some(format!("\"{a}\"").as_str()));
    let motd = get(&larder.url("/cfg/motd")).await;
    assert_eq!(motd.text(), "hello");
    assert_eq!(motd.header("etag"), Some(format!("\"{b}\"").as_str()));
    let again = get_with(
        &larder.url("/cfg/motd"),
        &[("if-none-match", &format!("\"{b}\""))],
    )
    .await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    assert_eq!(
        get(&larder.url("/cfg/nope")).await.status,
        StatusCode::NOT_FOUND
    );

    // A change of one key changes that key's ETag only; a client waiting
    // on the other key keeps waiting until its own wait runs out.
    let waiting_on_motd = tokio::spawn({
        let url = larder.url("/cfg/motd");
        async move { wait_for_change(&url, &b.to_string(), "1s").await }
    });
    let c = etcd.put("/cfg/limits", "{\"rps\": 200}").await;
    let limits = eventually("the new limits", async || {
        let reply = get(&larder.url("/cfg/limits")).await;
        (reply.text() == "{\"rps\": 200}").then_some(reply)
    })
    .await;
    assert_eq!(limits.header("etag"), Some(format!("\"{c}\"").as_str()));
    let motd = waiting_on_motd.await.expect("the waiting client");
    assert_eq!(motd.status, StatusCode::NOT_MODIFIED, "motd did not change");
    assert_eq!(motd.header("etag"), Some(format!("\"{b}\"").as_str()));
    larder.stop().await;
}

#[tokio::test]
async fn a_thousand_keys_load_at_start_in_pages() {
    let etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    for i in 0..1000 {
        client
            .put(format!("/many/{i:04}"), format!("v{i}"), None)
            .await
            .expect("put");
    }
    let yaml = format!(
        "{ADMIN_BLOCK}routes:\n  - match: {{ path_prefix: /flags }}\n    source: flags\nsources:\n  flags:\n    etcd:\n      endpoints: ['{}']\n      prefix: /many/\n      page_size: 64\n",
        etcd.endpoint()
    );
    let larder = start_larder(&yaml).await;
    let reply = served(&larder.url("/flags")).await;
    let value = reply.json();
    let members = value.as_object().expect("an object");
    assert_eq!(members.len(), 1000);
    assert_eq!(members["0000"], "v0");
    assert_eq!(members["0999"], "v999");
    assert_eq!(mirror_status(&larder).await["mirror"]["keys"], 1000);
    larder.stop().await;
}

#[tokio::test]
async fn etcd_down_keeps_the_copy_served_and_the_mirror_catches_up_after_restart() {
    let mut etcd = Etcd::start().await;
    etcd.put("/flags/a", "1").await;
    let larder = start_larder(&mirror_config(&etcd, "/flags/", "")).await;
    serves(&larder, serde_json::json!({ "a": "1" })).await;

    etcd.kill();
    serves_its_copy_while_down(&larder, r#"{"a":"1"}"#).await;
    let port = etcd.client_port;
    etcd.run_on(port).await;
    etcd.put("/flags/b", "2").await;
    serves(&larder, serde_json::json!({ "a": "1", "b": "2" })).await;
    assert_reconnected(&larder).await;
    larder.stop().await;
}

/// With its store gone, the mirror of `/flags` reports degraded and keeps
/// answering every read with its last copy, `copy`.
async fn serves_its_copy_while_down(larder: &Larder, copy: &str) {
    eventually("the mirror to report degraded", async || {
        mirror_status(larder).await["mirror"]["state"] == "degraded"
    })
    .await;
    for _ in 0..50 {
        let reply = get(&larder.url("/flags")).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "served while the store is down"
        );
        assert_eq!(reply.text(), copy);
    }
}

/// The mirror is connected again, after at least one reconnect.
async fn assert_reconnected(larder: &Larder) {
    let status = mirror_status(larder).await;
    assert_eq!(status["mirror"]["state"], "connected");
    assert!(
        status["mirror"]["resyncs"]["reconnect"].as_u64() >= Some(1),
        "{status}"
    );
}

#[tokio::test]
async fn a_compaction_while_disconnected_is_followed_by_a_full_reload() {
    let mut etcd = Etcd::start().await;
    etcd.put("/flags/keep", "1").await;
    etcd.put("/flags/gone", "1").await;
    let larder = start_larder(&mirror_config(&etcd, "/flags/", "")).await;
    serves(&larder, serde_json::json!({ "keep": "1", "gone": "1" })).await;

    // While Larder cannot reach it (the member serves on another port),
    // keys change and the history Larder would resume from is compacted.
    etcd.kill();
    let elsewhere = free_port();
    etcd.run_on(elsewhere).await;
    let mut client = Etcd::client_on(elsewhere).await;
    client.put("/flags/keep", "2", None).await.expect("put");
    client.delete("/flags/gone", None).await.expect("delete");
    let last = client
        .put("/flags/new", "3", None)
        .await
        .expect("put")
        .header()
        .expect("header")
        .revision();
    client.compact(last, None).await.expect("compact");
    etcd.kill();
    let port = etcd.client_port;
    etcd.run_on(port).await;

    serves(&larder, serde_json::json!({ "keep": "2", "new": "3" })).await;
    let status = mirror_status(&larder).await;
    assert_eq!(status["mirror"]["resyncs"]["compaction"], 1, "{status}");
    assert_eq!(status["mirror"]["revision"], last);
    larder.stop().await;
}

#[tokio::test]
async fn a_long_poll_gets_304_when_its_wait_runs_out_and_cron_sources_can_be_waited_on() {
    // An origin whose answer changes on every fetch; the source fetches it every second.
    let fetches = Arc::new(AtomicUsize::new(0));
    let origin = start_origin({
        let fetches = fetches.clone();
        move |_request| {
            let n = fetches.fetch_add(1, Ordering::SeqCst);
            async move { respond(200, &[], format!("value {n}")) }
        }
    })
    .await;
    let yaml = format!(
        "routes:\n  - match: {{ path_prefix: /ticker }}\n    source: ticker\n  - match: {{ path_prefix: /still }}\n    source: still\nsources:\n  ticker:\n    rule: '* * * * * *'\n    http: {{ endpoint: '{}/' }}\n  still:\n    rule: '@every 1h'\n    static: {{ value: same }}\n",
        origin.url()
    );
    let larder = start_larder(&yaml).await;
    let still = served(&larder.url("/still")).await;
    let etag = still.header("etag").expect("etag").to_string();
    // RFC 7240's form: If-None-Match and Prefer: wait.
    let timed_out = get_with(
        &larder.url("/still"),
        &[("if-none-match", &etag), ("prefer", "wait=1")],
    )
    .await;
    assert_eq!(timed_out.status, StatusCode::NOT_MODIFIED);
    assert_eq!(timed_out.header("etag"), Some(etag.as_str()));

    let first = served(&larder.url("/ticker")).await;
    let first_etag = first.header("etag").expect("etag").to_string();
    let next = get_with(
        &larder.url("/ticker"),
        &[("if-none-match", &first_etag), ("prefer", "wait=30")],
    )
    .await;
    assert_eq!(next.status, StatusCode::OK, "answered by the next run");
    assert_ne!(next.header("etag"), Some(first_etag.as_str()));
    assert_ne!(next.text(), first.text());
    // A version the client does not have is answered at once.
    let at_once = get(&larder.url("/ticker?version=stale&wait=30s")).await;
    assert_eq!(at_once.status, StatusCode::OK);
    assert_eq!(
        get(&larder.url("/ticker?version=1&wait=soon")).await.status,
        StatusCode::BAD_REQUEST
    );
    larder.stop().await;
}

#[tokio::test]
async fn a_watched_file_swapped_by_rename_is_reloaded_once() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("flags.json");
    std::fs::write(&path, "{\"v\": 1}").expect("write");
    let yaml = format!(
        "{ADMIN_BLOCK}routes:\n  - match: {{ path_prefix: /flags }}\n    source: flags\nsources:\n  flags:\n    rule: '@every 1h'\n    file: {{ path: '{}', watch: true }}\n",
        path.display()
    );
    let larder = start_larder(&yaml).await;
    let first = served(&larder.url("/flags")).await;
    assert_eq!(first.text(), "{\"v\": 1}");
    assert_eq!(first.header("cache-control"), Some("no-cache"));
    let etag = first.header("etag").expect("etag").to_string();

    let waiting = tokio::spawn({
        let url = larder.url("/flags");
        async move { wait_for_change(&url, &etag, "60s").await }
    });
    eventually("the client to be waiting", async || {
        mirror_waiters(&larder).await == 1.0
    })
    .await;
    // As editors and Kubernetes do: a new file beside it, renamed over it.
    let staged = dir.path().join(".flags.json.tmp");
    std::fs::write(&staged, "{\"v\": 2}").expect("write the new file");
    std::fs::rename(&staged, &path).expect("rename over the old file");
    let reply = waiting.await.expect("the waiting client");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "{\"v\": 2}");
    let status = mirror_status(&larder).await;
    assert_eq!(status["file_changes"], 1, "{status}");
    assert_eq!(status["runs"], 2, "one run at start, one for the change");
    larder.stop().await;
}

/// `name` from `/proc/<pid>/status` (kB for memory, a count for threads).
fn proc_status(pid: u32, name: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name}:")))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
}

/// Raises this process's open-file limit (to 65536 where allowed, as for
/// root, else to the hard limit): a thousand client sockets need more than
/// a default soft limit of 1024. Larder, started after, inherits it.
fn raise_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct they get.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        let wanted = libc::rlimit {
            rlim_cur: 65_536,
            rlim_max: limit.rlim_max.max(65_536),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_waiting_clients_cost_no_thread_each_and_little_memory() {
    const WAITERS: usize = 1000;
    assert!(
        raise_file_limit() > 2 * WAITERS as u64,
        "the test needs more open files"
    );
    let etcd = Etcd::start().await;
    etcd.put("/flags/a", "1").await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = dir.path().join("larder.yml");
    let (port, admin_port) = (free_port(), free_port());
    let yaml = format!(
        "listen: 127.0.0.1:{port}\nadmin: {{ listen: '127.0.0.1:{admin_port}', token: {ADMIN_TOKEN} }}\nroutes:\n  - match: {{ path_prefix: /flags }}\n    source: flags\nsources:\n  flags:\n    etcd:\n      endpoints: ['{}']\n      prefix: /flags/\n",
        etcd.endpoint()
    );
    std::fs::write(&config, yaml).expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_larder"))
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the larder binary");
    let pid = child.id();
    let url = format!("http://127.0.0.1:{port}/flags");
    let etag = eventually("the mirror to load", async || {
        let Ok(stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
            return None;
        };
        drop(stream);
        let reply = get(&url).await;
        (reply.status == StatusCode::OK)
            .then(|| reply.header("etag").unwrap_or_default().to_string())
    })
    .await;

    // Warm up the paths a waiter takes, then measure with all of them parked.
    let warm = tokio::spawn({
        let (url, etag) = (url.clone(), etag.clone());
        async move { wait_for_change(&url, &etag, "1s").await }
    });
    assert_eq!(
        warm.await.expect("warm-up").status,
        StatusCode::NOT_MODIFIED
    );
    let threads_before = proc_status(pid, "Threads");
    let memory_before = proc_status(pid, "VmRSS");
    let metrics = format!("http://127.0.0.1:{admin_port}/metrics");
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let mut etag = etag;
    let mut peaks = Vec::new();
    // Five rounds: none may add a thread per waiter, and the rounds after
    // the first must not keep what their waiters used (measured here: +26 MB
    // for the first thousand, connections included, then +8, +3, +2,
    // +0.5 MB as the allocator settles); a leak of a waiter's connection or
    // future would add tens of MB every round.
    for round in ["a", "b", "c", "d", "e"] {
        let answered = Arc::new(AtomicUsize::new(0));
        let mut waiters = Vec::with_capacity(WAITERS);
        for _ in 0..WAITERS {
            let (url, etag, answered) = (url.clone(), etag.clone(), answered.clone());
            waiters.push(tokio::spawn(async move {
                let reply = wait_for_change(&url, &etag, "120s").await;
                answered.fetch_add(1, Ordering::SeqCst);
                reply
            }));
        }
        eventually("every waiter to be parked", async || {
            let text = get_with(&metrics, &[("authorization", &bearer)])
                .await
                .text();
            waiting_clients(&text, "flags") == WAITERS as f64
        })
        .await;
        assert_eq!(
            answered.load(Ordering::SeqCst),
            0,
            "nobody answered before the change"
        );
        let threads = proc_status(pid, "Threads");
        let memory = proc_status(pid, "VmRSS");
        eprintln!(
            "round {round}: {WAITERS} waiters: threads {threads_before} -> {threads}, resident memory {memory_before} -> {memory} kB"
        );
        assert!(
            threads <= threads_before + 2,
            "threads grew from {threads_before} to {threads} for {WAITERS} waiters"
        );
        peaks.push(memory);

        let changed = etcd.put("/flags/a", round).await;
        etag = format!("\"{changed}\"");
        for waiter in waiters {
            let reply = waiter.await.expect("a waiter");
            assert_eq!(reply.status, StatusCode::OK);
            assert_eq!(reply.header("etag"), Some(etag.as_str()));
        }
    }
    let per_waiter_kb = peaks[0].saturating_sub(memory_before) / WAITERS as u64;
    assert!(
        per_waiter_kb < 64,
        "a waiting client (its connection included) costs {per_waiter_kb} kB"
    );
    // A leak grows every round by about what a round costs; the allocator
    // settling grows some rounds a little. At least one of the last three
    // rounds must have grown by less than 8 kB a waiter.
    let smallest_growth_kb = peaks
        .windows(2)
        .skip(1)
        .map(|pair| pair[1].saturating_sub(pair[0]))
        .min()
        .unwrap_or(0);
    assert!(
        smallest_growth_kb < 8 * 1024,
        "every round grew the resident memory (peaks {peaks:?} kB)"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// A Larder with the source `flags` mirroring the Redis key `flags`, served
/// at `/flags`; `extra` adds lines under `redis:`.
fn redis_mirror_config(redis: &Redis, extra: &str) -> String {
    format!(
        "{ADMIN_BLOCK}routes:\n  - match: {{ path_prefix: /flags }}\n    source: flags\nsources:\n  flags:\n    redis:\n      url: '{}'\n      key: flags\n{extra}",
        redis.url()
    )
}

async fn redis(redis: &Redis, args: &[&str]) {
    redis.try_command(args).await.expect("a redis command");
}

#[tokio::test]
async fn a_redis_hash_is_mirrored_and_a_published_change_reaches_a_waiting_client() {
    let server = Redis::start().await;
    redis(&server, &["HSET", "flags", "a", "1", "b", "{\"x\":2}"]).await;
    let yaml = redis_mirror_config(
        &server,
        "      channel: flags-changed\n      reread: 1h\n      decode: json\n",
    );
    let larder = start_larder(&yaml).await;
    let etag = serves(&larder, serde_json::json!({ "a": 1, "b": { "x": 2 } })).await;
    let b = get(&larder.url("/flags/b")).await;
    assert_eq!(b.text(), "{\"x\":2}");
    assert_eq!(
        get(&larder.url("/flags/c")).await.status,
        StatusCode::NOT_FOUND
    );

    let waiting = tokio::spawn({
        let url = larder.url("/flags");
        async move { wait_for_change(&url, &etag, "60s").await }
    });
    eventually("the client to be waiting", async || {
        mirror_waiters(&larder).await == 1.0
    })
    .await;
    // The writer's protocol: change the key, then publish on the channel.
    redis(&server, &["HSET", "flags", "a", "7"]).await;
    redis(&server, &["PUBLISH", "flags-changed", "a"]).await;
    let reply = waiting.await.expect("the waiting client");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json(), serde_json::json!({ "a": 7, "b": { "x": 2 } }));
    let status = mirror_status(&larder).await;
    assert_eq!(status["kind"], "redis");
    assert_eq!(status["mirror"]["state"], "connected");
    assert_eq!(status["mirror"]["keys"], 2);
    assert_eq!(status["mirror"]["events_applied"], 1);
    larder.stop().await;
}

#[tokio::test]
async fn a_change_without_a_message_is_caught_by_the_reread_and_keyspace_events_work_too() {
    let server = Redis::start().await;
    redis(&server, &["SET", "flags", "one"]).await;
    let larder = start_larder(&redis_mirror_config(&server, "      reread: 1s\n")).await;
    let url = larder.url("/flags");
    eventually("the first value", async || get(&url).await.text() == "one").await;
    // Nobody publishes: the re-read finds it.
    redis(&server, &["SET", "flags", "two"]).await;
    eventually("the re-read value", async || {
        get(&url).await.text() == "two"
    })
    .await;
    let status = mirror_status(&larder).await;
    assert_eq!(status["mirror"]["resyncs"]["reread"], 1, "{status}");
    larder.stop().await;

    // With keyspace notifications on, a plain SET is announced by the server.
    redis(&server, &["CONFIG", "SET", "notify-keyspace-events", "K$"]).await;
    let yaml = redis_mirror_config(&server, "      keyspace_events: true\n      reread: 1h\n");
    let larder = start_larder(&yaml).await;
    let url = larder.url("/flags");
    let current = eventually("the value", async || {
        let reply = get(&url).await;
        (reply.text() == "two").then(|| reply.header("etag").unwrap_or_default().to_string())
    })
    .await;
    let waiting = tokio::spawn({
        let url = url.clone();
        async move { wait_for_change(&url, &current, "60s").await }
    });
    eventually("the client to be waiting", async || {
        mirror_waiters(&larder).await == 1.0
    })
    .await;
    redis(&server, &["SET", "flags", "three"]).await;
    let reply = waiting.await.expect("the waiting client");
    assert_eq!(reply.text(), "three");
    larder.stop().await;
}

#[tokio::test]
async fn redis_down_keeps_the_copy_served_and_the_mirror_catches_up_after_restart() {
    let mut server = Redis::start().await;
    redis(&server, &["SET", "flags", "kept"]).await;
    let yaml = redis_mirror_config(&server, "      channel: flags-changed\n      reread: 1h\n");
    let larder = start_larder(&yaml).await;
    let url = larder.url("/flags");
    eventually("the value", async || get(&url).await.text() == "kept").await;

    server.kill();
    serves_its_copy_while_down(&larder, "kept").await;
    // Back empty: the writer sets the key again; the reconnect reads it.
    server.restart().await;
    redis(&server, &["SET", "flags", "after"]).await;
    eventually("the new value", async || get(&url).await.text() == "after").await;
    assert_reconnected(&larder).await;
    larder.stop().await;
}

#[tokio::test]
async fn a_waiting_client_is_answered_when_its_source_is_removed() {
    let sources = "sources:\n  other:\n    static: { value: x }\n";
    let with = format!(
        "{ADMIN_BLOCK}routes:\n  - match: {{ path_prefix: /still }}\n    source: still\n{sources}  still:\n    rule: '@every 1h'\n    static: {{ value: same }}\n"
    );
    let larder = start_larder(&with).await;
    let etag = served(&larder.url("/still"))
        .await
        .header("etag")
        .expect("etag")
        .to_string();
    let waiting = tokio::spawn({
        let url = larder.url("/still");
        async move { wait_for_change(&url, &etag, "600s").await }
    });
    eventually("the client to be waiting", async || {
        waiting_clients(&larder.admin("GET", "/metrics", "").await.text(), "still") == 1.0
    })
    .await;
    let without = format!(
        "{ADMIN_BLOCK}routes:\n  - match: {{ path_prefix: /other }}\n    source: other\n{sources}"
    );
    larder.reload(&without).await.expect("reload");
    let reply = tokio::time::timeout(common::DEADLINE, waiting)
        .await
        .expect("the waiter was answered when its source went away")
        .expect("the waiting client");
    assert_eq!(reply.status, StatusCode::NOT_MODIFIED);
    assert_eq!(
        get(&larder.url("/still")).await.status,
        StatusCode::NOT_FOUND
    );
    larder.stop().await;
}
