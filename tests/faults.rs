//! Faults under load, end to end: Larder started from YAML on 127.0.0.1,
//! real hyper origins in the test, the real fault fixtures from `plugins/`
//! (build them first: `cd plugins && cargo build --release`). Each test
//! shows one way things go wrong (an origin that dies, a plugin that
//! spins, allocates, panics, sleeps or answers garbage, an upstream body
//! that stalls, a client that stops reading, a plugin out of turns) and
//! what a client and an operator see of it.
//!
//! Waits poll with a deadline; the only fixed waits are where time passing
//! is the behaviour under test, each with a comment saying so. Time bounds
//! are generous upper bounds.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{
    ADMIN_BLOCK, BodySender, Larder, Reply, assert_problem, eventually, get, get_with, respond,
    start_larder, start_origin, start_origin_at, streamed, wait_until, wasm,
};
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{RwLock, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

// ---------------------------------------------------------------- harness

/// The load tests take this exclusively: they count the process's file
/// descriptors and time a plugin-free route, and other tests' sockets and
/// CPU would blur both. Tests with a time bound of their own take it
/// shared, so a load test's busy cores cannot stretch their clocks.
static HEAVY: RwLock<()> = RwLock::const_new(());

/// Every config here names the same process-wide plugin memory budget: the
/// plugin engine, and so its budget, is shared by every Larder of the
/// process, and the last config loaded sets it.
const TOTAL_PLUGIN_MEMORY: u64 = 1 << 30;
const PLUGIN_LIMITS: &str = "plugin_limits: { total_memory: 1GiB }\n";

/// A `plugins:` block: (name, fixture file, more lines under the plugin).
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

/// A route for paths under `/{prefix}` to the upstream `app`; `extra` adds
/// lines under it (`cache: ...`, `plugins: [...]`).
fn route(prefix: &str, extra: &str) -> String {
    let mut yaml = format!("  - match: {{ path_prefix: /{prefix} }}\n    upstream: app\n");
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        yaml.push_str(&format!("    {line}\n"));
    }
    yaml
}

/// A whole config: the admin block, `global` top-level lines, the upstream
/// `app` at `origin`, `routes` and `plugins` (a [`plugins_yaml`] block or "").
/// The connect timeout outlasts one lost SYN (retransmitted after 1 s): a
/// burst of connects to a test origin whose accept loop shares the test's
/// busy runtime can overflow a small listen backlog, and the tests judge
/// Larder, not the kernel's backlog (a stopped origin refuses at once).
fn config(origin: &str, global: &str, routes: &[String], plugins: &str) -> String {
    format!(
        "{ADMIN_BLOCK}{PLUGIN_LIMITS}{global}upstreams:\n  app:\n    servers: [\"{origin}\"]\n    connect_timeout: 3s\n    timeout: 5s\nroutes:\n{}{plugins}",
        routes.concat()
    )
}

/// `GET /plugins` from the admin API.
async fn plugins_status(larder: &Larder) -> serde_json::Value {
    let reply = larder.admin("GET", "/plugins", "").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

/// One plugin's counters from `GET /plugins`.
async fn plugin_stats(larder: &Larder, name: &str) -> serde_json::Value {
    let status = plugins_status(larder).await;
    let stats = status["plugins"][name].clone();
    assert!(stats.is_object(), "no {name} in {status}");
    stats
}

fn counter(stats: &serde_json::Value, field: &str) -> u64 {
    stats[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {field} in {stats}"))
}

/// `GET /cache` from the admin API.
async fn cache_status(larder: &Larder) -> serde_json::Value {
    let reply = larder.admin("GET", "/cache", "").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

/// The requests waiting on fills in flight, per key.
async fn in_flight(larder: &Larder) -> Vec<(String, u64)> {
    let status = cache_status(larder).await;
    status["in_flight"]
        .as_array()
        .unwrap_or_else(|| panic!("no in_flight list in {status}"))
        .iter()
        .map(|fill| {
            (
                fill["key"].as_str().unwrap_or_default().to_string(),
                fill["waiters"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

/// Asserts `reply` is a problem+json with one of `statuses`.
fn assert_problem_in(reply: &Reply, statuses: &[u16], what: &str) {
    assert!(
        statuses.contains(&reply.status.as_u16()),
        "{what}: expected one of {statuses:?}, got {} {:?}",
        reply.status,
        reply.text()
    );
    assert_problem(reply, reply.status.as_u16());
}

/// A 503 for a plugin that could not run: problem+json naming the plugin
/// and a `Retry-After` in whole seconds.
fn assert_unavailable(reply: &Reply, plugin: &str) -> u64 {
    assert_problem(reply, 503);
    assert!(reply.text().contains(plugin), "{}", reply.text());
    reply
        .header("retry-after")
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After in seconds: {:?}", reply.headers))
}

/// The test process's open file descriptors (Larder runs in it).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// What one request of a load got: a whole reply or why not, and how long
/// it took.
struct Outcome {
    url: String,
    result: Result<Reply, String>,
    elapsed: Duration,
}

/// GETs `url` on a fresh connection and reads the whole reply; unlike
/// [`get`], a failure (refused, reset, a broken body, no answer within
/// `bound`) is an outcome to judge, not a panic.
async fn try_get(url: String, bound: Duration) -> Outcome {
    let started = Instant::now();
    let result = tokio::time::timeout(bound, fetch_once(&url))
        .await
        .unwrap_or_else(|_| Err(format!("no whole answer within {bound:?}")));
    Outcome {
        url,
        result,
        elapsed: started.elapsed(),
    }
}

async fn fetch_once(url: &str) -> Result<Reply, String> {
    let uri: Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
    let stream = TcpStream::connect(&authority)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    let request = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header("host", &authority)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// `count` HTTP/2 connections (prior knowledge, as h2c) to `addr`, each
/// driven in the background; a request on one is a stream of its own, so
/// a few carry a thousand requests at once without a thousand handshakes.
async fn h2_connections(
    addr: SocketAddr,
    count: usize,
) -> Vec<hyper::client::conn::http2::SendRequest<Empty<Bytes>>> {
    let mut senders = Vec::with_capacity(count);
    for _ in 0..count {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(stream),
        )
        .await
        .expect("HTTP/2 handshake");
        tokio::spawn(connection);
        senders.push(sender);
    }
    senders
}

/// GETs `url` as a stream on `sender`; like [`try_get`], a failure (a
/// reset stream, a broken body, no answer within `bound`) is an outcome.
async fn try_get_h2(
    mut sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    url: String,
    bound: Duration,
) -> Outcome {
    let started = Instant::now();
    let exchange = async {
        let request = Request::get(url.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    let result = tokio::time::timeout(bound, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no whole answer within {bound:?}")));
    Outcome {
        url,
        result,
        elapsed: started.elapsed(),
    }
}

/// Starts one GET per URL at once, each on its own connection and task.
fn load(urls: Vec<String>, bound: Duration) -> Vec<JoinHandle<Outcome>> {
    urls.into_iter()
        .map(|url| tokio::spawn(try_get(url, bound)))
        .collect()
}

async fn outcomes(tasks: Vec<JoinHandle<Outcome>>) -> Vec<Outcome> {
    let mut all = Vec::with_capacity(tasks.len());
    for task in tasks {
        all.push(task.await.expect("a load task panicked"));
    }
    all
}

/// The `q` quantile of the elapsed times (0.99: p99).
fn quantile(outcomes: &[&Outcome], q: f64) -> Duration {
    let mut times: Vec<Duration> = outcomes.iter().map(|o| o.elapsed).collect();
    times.sort();
    let rank = ((times.len() as f64) * q).ceil() as usize;
    times
        .get(rank.saturating_sub(1))
        .copied()
        .unwrap_or_default()
}

// ------------------------------------------------- raw HTTP/1.1 on the wire

/// A response read off a raw connection (Content-Length framed).
#[derive(Debug)]
struct RawReply {
    status: u16,
    /// Names lowercased, in the order they came.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawReply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// One response off the front of `bytes` and the bytes it took; `None`
/// while incomplete. Only Content-Length framing is accepted: a response
/// here that is chunked or unframed is a failure of the test's premise.
fn parse_reply(bytes: &[u8]) -> Option<(RawReply, usize)> {
    let end = find(bytes, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not a status line: {head:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    assert!(
        !headers.iter().any(|(n, _)| n == "transfer-encoding"),
        "expected Content-Length framing: {head}"
    );
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse().expect("a numeric Content-Length"))
        .unwrap_or_else(|| panic!("no Content-Length: {head}"));
    let start = end + 4;
    if bytes.len() < start + length {
        return None;
    }
    let body = bytes[start..start + length].to_vec();
    Some((
        RawReply {
            status,
            headers,
            body,
        },
        start + length,
    ))
}

/// Writes `request` on a new connection to `addr` and reads until `count`
/// whole responses have arrived; fails if the connection ends first.
async fn raw_exchange(addr: SocketAddr, request: &[u8], count: usize) -> Vec<RawReply> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write the request");
    read_replies(&mut stream, count).await
}

/// Reads `count` whole responses off `stream` (and nothing more).
async fn read_replies(stream: &mut TcpStream, count: usize) -> Vec<RawReply> {
    let mut received = Vec::new();
    let mut replies = Vec::new();
    let deadline = Instant::now() + common::DEADLINE;
    let mut buffer = vec![0u8; 64 * 1024];
    while replies.len() < count {
        if let Some((reply, used)) = parse_reply(&received) {
            received.drain(..used);
            replies.push(reply);
            continue;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => panic!("{} of {count} responses within the deadline", replies.len()),
            Ok(Ok(0)) => panic!(
                "the connection ended after {} of {count} responses; then: {:?}",
                replies.len(),
                String::from_utf8_lossy(&received)
            ),
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
            Ok(Err(e)) => panic!("reading failed after {} responses: {e}", replies.len()),
        }
    }
    assert!(received.is_empty(), "bytes after the last response");
    replies
}

/// Sends `GET path` on a new connection and waits up to `wait` for the
/// answer: the reply, or the connection with the request still unanswered.
async fn ask(addr: SocketAddr, path: &str, wait: Duration) -> Result<RawReply, TcpStream> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(raw_get(addr, path).as_bytes())
        .await
        .expect("write the request");
    let answered = tokio::time::timeout(wait, async {
        let mut buffer = [0u8; 1];
        stream.peek(&mut buffer).await
    })
    .await;
    match answered {
        Ok(_) => Ok(read_replies(&mut stream, 1).await.remove(0)),
        Err(_) => Err(stream),
    }
}

/// `GET path` as raw bytes for `addr`.
fn raw_get(addr: SocketAddr, path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")
}

// ---------------------------------------------------------------- limits, obeyed and broken

/// An origin that answers every request 200 "from origin".
async fn plain_origin() -> common::Origin {
    start_origin(|_| async { respond(200, &[], "from origin") }).await
}

#[tokio::test]
async fn memory_within_limits_memory_runs_and_past_it_fails_as_oom() {
    let _shared = HEAVY.read().await;
    let origin = plain_origin().await;
    let yaml = config(
        &origin.url(),
        "",
        &[
            route("frugal", "plugins: [mem-frugal]"),
            route("greedy", "plugins: [mem-greedy]"),
        ],
        &plugins_yaml(&[
            (
                "mem-frugal",
                "eat_memory",
                "config: { mib: '8' }\nlimits: { memory: 32MiB }",
            ),
            (
                "mem-greedy",
                "eat_memory",
                "config: { mib: '64' }\nlimits: { memory: 32MiB }",
            ),
        ]),
    );
    let larder = start_larder(&yaml).await;
    let frugal = get(&larder.url("/frugal")).await;
    assert_eq!(
        frugal.status,
        200,
        "8 MiB fits in 32 MiB: {}",
        frugal.text()
    );
    assert_eq!(frugal.text(), "from origin");
    let greedy = get(&larder.url("/greedy")).await;
    assert_problem(&greedy, 502);
    assert!(greedy.text().contains("mem-greedy"), "{}", greedy.text());
    let stats = plugin_stats(&larder, "mem-greedy").await;
    assert_eq!(stats["last_failure_kind"], "oom", "{stats}");
    assert_eq!(
        counter(&plugin_stats(&larder, "mem-frugal").await, "failures"),
        0
    );
    assert_eq!(
        origin.hits(),
        1,
        "the failed request never reached the origin"
    );
    larder.stop().await;
}

#[tokio::test]
async fn cpu_a_plugin_that_finishes_runs_and_loops_are_stopped_at_their_budget() {
    let _shared = HEAVY.read().await;
    let origin = plain_origin().await;
    let yaml = config(
        &origin.url(),
        "",
        &[
            route("finishes", "plugins: [cpu-finishes]"),
            route("spins", "plugins: [cpu-spins]"),
            route("host-calls", "plugins: [cpu-host-calls]"),
        ],
        &plugins_yaml(&[
            (
                "cpu-finishes",
                "add_headers",
                "config: { set: 'x-ran: yes' }\nlimits: { timeout: 100ms }",
            ),
            ("cpu-spins", "spin_forever", "limits: { timeout: 100ms }"),
            (
                "cpu-host-calls",
                "misbehave",
                "config: { do: http-loop }\nlimits: { timeout: 100ms }",
            ),
        ]),
    );
    let larder = start_larder(&yaml).await;
    let finishes = get(&larder.url("/finishes")).await;
    assert_eq!(finishes.status, 200, "{}", finishes.text());
    assert_eq!(finishes.header("x-ran"), Some("yes"));

    for (path, plugin) in [("/spins", "cpu-spins"), ("/host-calls", "cpu-host-calls")] {
        let started = Instant::now();
        let reply = get(&larder.url(path)).await;
        let elapsed = started.elapsed();
        assert_problem(&reply, 502);
        assert!(reply.text().contains(plugin), "{}", reply.text());
        // The backstop (twice the budget plus 1 s) would end it at 1.2 s:
        // well before that, the CPU budget did.
        assert!(
            elapsed < Duration::from_secs(1),
            "{plugin} took {elapsed:?} to be stopped with a 100 ms budget"
        );
        let stats = plugin_stats(&larder, plugin).await;
        assert_eq!(stats["last_failure_kind"], "timeout", "{stats}");
        let detail = stats["last_failure"].as_str().unwrap_or_default();
        assert!(
            !detail.contains("outer limit"),
            "{plugin} was stopped by the wall-clock backstop, not its CPU budget: {detail}"
        );
    }
    assert_eq!(origin.hits(), 1);
    larder.stop().await;
}

#[tokio::test]
async fn capacity_refusals_are_503_within_the_queue_timeout_and_open_no_breaker() {
    let _shared = HEAVY.read().await;
    let origin = plain_origin().await;
    let yaml = config(
        &origin.url(),
        "",
        &[
            route("narrow", "plugins: [cap-narrow]"),
            route("other", "plugins: [cap-other]"),
        ],
        &plugins_yaml(&[
            (
                "cap-narrow",
                "misbehave",
                // Sleeps 300 ms of wall time (no CPU); the backstop is 3 s.
                "config: { do: sleep, ms: '300' }\nlimits: { timeout: 1s, concurrency: 1, queue_timeout: 100ms }",
            ),
            (
                "cap-other",
                "add_headers",
                "config: { set: 'x-other: yes' }",
            ),
        ]),
    );
    let larder = start_larder(&yaml).await;
    const AT_ONCE: usize = 8;
    let bound = Duration::from_secs(10);
    let narrow = load(vec![larder.url("/narrow"); AT_ONCE], bound);
    let other = load(vec![larder.url("/other"); AT_ONCE], bound);
    let narrow = outcomes(narrow).await;
    let other = outcomes(other).await;

    let mut served = 0;
    let mut refused = 0;
    for outcome in &narrow {
        let reply = outcome.result.as_ref().unwrap_or_else(|e| panic!("{e}"));
        match reply.status.as_u16() {
            200 => {
                assert_eq!(reply.text(), "from origin");
                served += 1;
            }
            503 => {
                let retry_after = assert_unavailable(reply, "cap-narrow");
                assert_eq!(retry_after, 1, "capacity: try again in a second");
                // The queue timeout is 100 ms and the call holding the
                // turn takes 300 ms: a refusal did not wait for it.
                assert!(
                    outcome.elapsed < Duration::from_secs(1),
                    "refused only after {:?}",
                    outcome.elapsed
                );
                refused += 1;
            }
            other => panic!("{other}: {}", reply.text()),
        }
    }
    assert!(served >= 1, "the call that had the turn finished");
    assert!(
        refused >= 5,
        "{refused} refused: enough to have opened a breaker had they counted"
    );
    for outcome in &other {
        let reply = outcome.result.as_ref().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reply.status, 200, "another plugin's route is unaffected");
        assert_eq!(reply.header("x-other"), Some("yes"));
    }
    let stats = plugin_stats(&larder, "cap-narrow").await;
    assert_eq!(counter(&stats, "capacity"), refused, "{stats}");
    assert_eq!(counter(&stats, "failures"), 0, "{stats}");
    assert_eq!(stats["circuit_open"], false, "{stats}");
    // And the plugin still runs: one request on its own gets its turn.
    let alone = get(&larder.url("/narrow")).await;
    assert_eq!(alone.status, 200, "{}", alone.text());
    larder.stop().await;
}

#[tokio::test]
async fn output_caps_headers_body_and_status_pass_within_them_and_fail_past_them() {
    let _shared = HEAVY.read().await;
    let origin = plain_origin().await;
    // The CPU budget covers the host's copy of what the guest returns, and
    // in a debug build copying 9 MiB (or 25000 headers) out of the guest
    // alone can take more than the default 50 ms: the budgets here are
    // large enough for the answer to reach the output checks.
    const BIG_BODY_LIMITS: &str = "limits: { memory: 64MiB, timeout: 2s }";
    const BOMB_LIMITS: &str = "limits: { timeout: 2s }";
    let cases: [(&str, &str, &str); 7] = [
        // (route and plugin, misbehave config, limits)
        (
            "out-headers-ok",
            "do: header-bomb, when: response, count: '400'",
            BOMB_LIMITS,
        ),
        (
            "out-headers-bomb",
            "do: header-bomb, when: response, count: '25000'",
            BOMB_LIMITS,
        ),
        (
            "out-body-ok",
            "do: big-body, when: response, mib: '1'",
            BIG_BODY_LIMITS,
        ),
        (
            "out-body-big",
            "do: big-body, when: response, mib: '9'",
            BIG_BODY_LIMITS,
        ),
        (
            "out-status-ok",
            "do: bad-status, when: response, status: '299'",
            "",
        ),
        (
            "out-status-101",
            "do: bad-status, when: response, status: '101'",
            "",
        ),
        (
            "out-status-1000",
            "do: bad-status, when: request, status: '1000'",
            "",
        ),
    ];
    let routes: Vec<String> = cases
        .iter()
        .map(|(name, _, _)| route(name, &format!("plugins: [{name}]")))
        .collect();
    let entries: Vec<(String, String)> = cases
        .iter()
        .map(|(name, settings, limits)| {
            (
                name.to_string(),
                format!("config: {{ {settings} }}\n{limits}"),
            )
        })
        .collect();
    let entries: Vec<(&str, &str, &str)> = entries
        .iter()
        .map(|(name, extra)| (name.as_str(), "misbehave", extra.as_str()))
        .collect();
    let larder = start_larder(&config(&origin.url(), "", &routes, &plugins_yaml(&entries))).await;

    // 400 headers: within the 500 a plugin may return. hyper's client reads
    // at most 100, so the response is read off the wire.
    let headers_ok = raw_exchange(
        larder.addr,
        raw_get(larder.addr, "/out-headers-ok").as_bytes(),
        1,
    )
    .await;
    let bombs = headers_ok[0]
        .headers
        .iter()
        .filter(|(name, _)| name.starts_with("x-bomb-"))
        .count();
    assert_eq!(headers_ok[0].status, 200);
    assert_eq!(bombs, 400);
    assert_eq!(headers_ok[0].body, b"from origin");

    let body_ok = get(&larder.url("/out-body-ok")).await;
    assert_eq!(body_ok.status, 200, "{}", body_ok.text());
    assert_eq!(body_ok.body.len(), 1 << 20);
    assert!(body_ok.body.iter().all(|byte| *byte == b'x'));
    assert_eq!(body_ok.header("content-length"), Some("1048576"));

    let status_ok = get(&larder.url("/out-status-ok")).await;
    assert_eq!(status_ok.status, 299);
    assert_eq!(status_ok.text(), "from origin");

    for name in [
        "out-headers-bomb",
        "out-body-big",
        "out-status-101",
        "out-status-1000",
    ] {
        let reply = get(&larder.url(&format!("/{name}"))).await;
        assert_problem(&reply, 502);
        assert!(reply.text().contains(name), "{}", reply.text());
        let stats = plugin_stats(&larder, name).await;
        assert_eq!(stats["last_failure_kind"], "bad_output", "{name}: {stats}");
    }
    for name in ["out-headers-ok", "out-body-ok", "out-status-ok"] {
        assert_eq!(
            counter(&plugin_stats(&larder, name).await, "failures"),
            0,
            "{name}"
        );
    }
    larder.stop().await;
}

#[tokio::test]
async fn framing_fields_a_plugin_sets_reach_neither_the_origin_nor_the_client() {
    let _shared = HEAVY.read().await;
    let origin = start_origin(|_| async { respond(200, &[], "framed body") }).await;
    let larder = start_larder(&config(
        &origin.url(),
        "",
        &[route("", "plugins: [framer]")],
        &plugins_yaml(&[("framer", "misbehave", "config: { do: framing, when: both }")]),
    ))
    .await;
    // Two requests on one connection: if the plugin's content-length: 5 or
    // transfer-encoding: chunked had reached the wire, the second response
    // would not parse where the first one ends.
    let request = raw_get(larder.addr, "/page").repeat(2);
    let replies = raw_exchange(larder.addr, request.as_bytes(), 2).await;
    for reply in &replies {
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, b"framed body");
        assert_eq!(reply.header("content-length"), Some("11"));
        assert_eq!(reply.header("x-framing"), Some("1"), "the plugin ran");
        assert_ne!(reply.header("connection"), Some("close"));
        assert_eq!(reply.header("host"), None);
    }
    let seen = origin.requests();
    assert_eq!(seen.len(), 2);
    for request in &seen {
        assert_eq!(request.header("x-framing"), Some("1"), "the plugin ran");
        assert_eq!(
            request.header("host"),
            Some(larder.addr.to_string().as_str())
        );
        assert_eq!(
            request.header("content-length"),
            None,
            "{:?}",
            request.headers
        );
        assert_eq!(
            request.header("transfer-encoding"),
            None,
            "{:?}",
            request.headers
        );
        assert_ne!(
            request.header("connection"),
            Some("close"),
            "{:?}",
            request.headers
        );
    }
    assert_eq!(
        origin.connections(),
        1,
        "Larder's upstream connection stayed open"
    );
    larder.stop().await;
}

#[tokio::test]
async fn a_fetcher_looping_on_http_calls_is_stopped_by_its_cpu_budget_and_the_old_value_stays() {
    let _shared = HEAVY.read().await;
    let api = start_origin(|_| async { respond(200, &[], "api") }).await;
    let yaml = |looping: &str| {
        format!(
            "{ADMIN_BLOCK}{PLUGIN_LIMITS}routes:\n  - match: {{ path_prefix: /good }}\n    source: good\n  - match: {{ path_prefix: /flaky }}\n    source: flaky\nsources:\n  good:\n    rule: '0 0 0 1 1 *'\n    plugin: {{ name: fetch-good }}\n  flaky:\n    rule: '0 0 0 1 1 *'\n    plugin: {{ name: fetch-flaky, config: {{ {looping} }} }}\n{}",
            plugins_yaml(&[
                ("fetch-good", "misfetch", "limits: { timeout: 100ms }"),
                (
                    "fetch-flaky",
                    "misfetch",
                    &format!(
                        "limits: {{ timeout: 100ms }}\nallow_hosts: ['{}']",
                        api.url()
                    ),
                ),
            ])
        )
    };
    let larder = start_larder(&yaml("do: ok")).await;
    let served = |path: &'static str| {
        let url = larder.url(path);
        async move {
            eventually(format!("a value at {path}"), async || {
                let reply = get(&url).await;
                (reply.status == 200).then_some(reply)
            })
            .await
        }
    };
    assert_eq!(served("/good").await.text(), "ok");
    assert_eq!(served("/flaky").await.text(), "ok");

    // Only the source's settings change (not the plugin's): its value stays
    // until a run of the new settings delivers, which none will.
    let looping = format!("do: http-loop, url: '{}/poll'", api.url());
    larder.reload(&yaml(&looping)).await.expect("reload");
    let started = Instant::now();
    let failure = eventually("a failed run of the looping fetcher", async || {
        let stats = plugin_stats(&larder, "fetch-flaky").await;
        (counter(&stats, "failures") >= 1).then_some(stats)
    })
    .await;
    assert_eq!(failure["last_failure_kind"], "timeout", "{failure}");
    let detail = failure["last_failure"].as_str().unwrap_or_default();
    assert!(
        !detail.contains("outer limit"),
        "stopped by the backstop (21 s for a fetcher), not by its CPU budget: {detail}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the first failing run took {:?}",
        started.elapsed()
    );
    // The first 16 calls of a run go out; after that the host refuses at
    // once (too many requests) and the loop only burns CPU.
    let failures = counter(&failure, "failures");
    let hits = api.hits();
    assert!(
        (16..=16 * (failures as usize + 1)).contains(&hits),
        "{hits} calls reached the API in {failures} failed run(s)"
    );
    let sources = larder.admin("GET", "/sources", "").await.json();
    let flaky = sources["sources"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == "flaky"))
        .cloned()
        .unwrap_or_else(|| panic!("no flaky in {sources}"));
    assert!(flaky["failures"].as_u64() >= Some(1), "{flaky}");
    assert!(flaky["last_error"].is_string(), "{flaky}");
    let old = get(&larder.url("/flaky")).await;
    assert_eq!(old.status, 200, "{}", old.text());
    assert_eq!(old.text(), "ok", "the last good value is still served");
    assert_eq!(get(&larder.url("/good")).await.text(), "ok");
    assert_eq!(
        counter(&plugin_stats(&larder, "fetch-good").await, "failures"),
        0
    );
    larder.stop().await;
}

/// The host's caps on a fetcher's `http-client` (per run: 16 calls, 8 MiB
/// per response body).
const HTTP_CALLS_PER_RUN: usize = 16;
const HTTP_BODY_CAP: usize = 8 << 20;

#[tokio::test]
async fn http_client_calls_and_response_sizes_within_the_caps_work_and_past_them_fail_the_run() {
    let _shared = HEAVY.read().await;
    let api = start_origin(|request: Request<hyper::body::Incoming>| async move {
        let size = match request.uri().path() {
            "/exact" => HTTP_BODY_CAP,
            "/over" => HTTP_BODY_CAP + 1,
            _ => 3,
        };
        respond(200, &[], vec![b'a'; size])
    })
    .await;
    let source = |name: &str, settings: &str| {
        format!(
            "  {name}:\n    rule: '0 0 0 1 1 *'\n    plugin: {{ name: fetch-http, config: {{ do: http-n, {settings} }} }}\n"
        )
    };
    let url = |path: &str| format!("{}{path}", api.url());
    let sources = [
        (
            "calls-at-cap",
            format!("count: '{HTTP_CALLS_PER_RUN}', url: '{}'", url("/small")),
        ),
        (
            "calls-over-cap",
            format!(
                "count: '{}', url: '{}'",
                HTTP_CALLS_PER_RUN + 1,
                url("/small")
            ),
        ),
        ("body-at-cap", format!("url: '{}'", url("/exact"))),
        ("body-over-cap", format!("url: '{}'", url("/over"))),
    ];
    let mut yaml = format!("{ADMIN_BLOCK}{PLUGIN_LIMITS}routes:\n");
    for (name, _) in &sources {
        yaml.push_str(&format!(
            "  - match: {{ path_prefix: /{name} }}\n    source: {name}\n"
        ));
    }
    yaml.push_str("sources:\n");
    for (name, settings) in &sources {
        yaml.push_str(&source(name, settings));
    }
    yaml.push_str(&plugins_yaml(&[(
        "fetch-http",
        "misfetch",
        &format!(
            "limits: {{ timeout: 2s, memory: 64MiB }}\nallow_hosts: ['{}']",
            api.url()
        ),
    )]));
    let larder = start_larder(&yaml).await;

    // Within the caps: the value is what the calls brought.
    for (name, expected) in [
        (
            "calls-at-cap",
            format!("{HTTP_CALLS_PER_RUN} calls, last body 3 bytes"),
        ),
        (
            "body-at-cap",
            format!("1 calls, last body {HTTP_BODY_CAP} bytes"),
        ),
    ] {
        let url = larder.url(&format!("/{name}"));
        let reply = eventually(format!("a value at /{name}"), async || {
            let reply = get(&url).await;
            (reply.status == 200).then_some(reply)
        })
        .await;
        assert_eq!(reply.text(), expected, "/{name}");
    }
    // Past them: the run fails with the host's error, and no value appears.
    for (name, error) in [
        (
            "calls-over-cap",
            format!("call {}: too-many-requests", HTTP_CALLS_PER_RUN + 1),
        ),
        ("body-over-cap", "call 1: too-large".to_string()),
    ] {
        let failed = eventually(format!("a failed run of {name}"), async || {
            let sources = larder.admin("GET", "/sources", "").await.json();
            sources["sources"]
                .as_array()
                .and_then(|all| all.iter().find(|s| s["name"] == name))
                .filter(|source| source["last_error"].is_string())
                .cloned()
        })
        .await;
        let last_error = failed["last_error"].as_str().unwrap_or_default();
        assert!(last_error.contains(&error), "{name}: {failed}");
        let reply = get(&larder.url(&format!("/{name}"))).await;
        assert_ne!(reply.status, 200, "{name}: {}", reply.text());
    }
    // Over the call cap, the 17th call never went out.
    assert_eq!(api.hits(), 2 * HTTP_CALLS_PER_RUN + 2);
    larder.stop().await;
}

// ---------------------------------------------------------------- stalled and slow bodies

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_body_under_a_cache_store_plugin_fails_every_waiter_and_frees_the_key() {
    let _shared = HEAVY.read().await;
    let stall = Arc::new(AtomicBool::new(true));
    let stalled_bodies: Arc<std::sync::Mutex<Vec<BodySender>>> = Arc::default();
    let (stalling, kept) = (stall.clone(), stalled_bodies.clone());
    let origin = start_origin(move |_| {
        let stalling = stalling.load(Ordering::SeqCst);
        let kept = kept.clone();
        async move {
            const PRODUCT: &str = r#"{"id":1,"secret":"s3cr3t","name":"kettle"}"#;
            let length = PRODUCT.len().to_string();
            let headers = [
                ("content-type", "application/json"),
                ("cache-control", "max-age=60"),
                ("content-length", length.as_str()),
            ];
            if !stalling {
                return respond(200, &headers, PRODUCT);
            }
            // The head and a first part of the body, then nothing: the
            // sender is kept (not dropped, which would end the body).
            let (body, response) = streamed(200, &headers);
            tokio::spawn(async move {
                body.chunk(r#"{"id":1,"#).await;
                kept.lock().unwrap_or_else(|e| e.into_inner()).push(body);
            });
            response
        }
    })
    .await;
    let larder = start_larder(&config(
        &origin.url(),
        "cache:\n  fill_idle_timeout: 1s\n",
        &[route("", "cache: { enabled: true }\nplugins: [stall-slim]")],
        &plugins_yaml(&[(
            "stall-slim",
            "json_filter",
            "config: { drop: secret }\nphase: cache_store",
        )]),
    ))
    .await;
    const WAITERS: usize = 6;
    let bound = Duration::from_secs(5);
    let outcomes = outcomes(load(vec![larder.url("/product/1"); WAITERS], bound)).await;
    for outcome in &outcomes {
        let reply = outcome
            .result
            .as_ref()
            .unwrap_or_else(|e| panic!("{}: {e}", outcome.url));
        assert_problem_in(reply, &[502, 504], "a waiter on a stalled fill");
    }
    assert_eq!(origin.hits(), 1, "the requests shared one fill");
    assert!(
        in_flight(&larder).await.is_empty(),
        "the failed fill left the key"
    );

    stall.store(false, Ordering::SeqCst);
    let filled = get(&larder.url("/product/1")).await;
    assert_eq!(filled.status, 200, "{}", filled.text());
    assert_eq!(filled.text(), r#"{"id":1,"name":"kettle"}"#);
    let hit = get(&larder.url("/product/1")).await;
    assert_eq!(hit.text(), r#"{"id":1,"name":"kettle"}"#);
    assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
    assert_eq!(origin.hits(), 2, "stored once the origin behaved");
    larder.stop().await;
    drop(stalled_bodies);
}

/// Size and chunk of the large response the shared-stream tests share.
const BIG: usize = 8 << 20;
const BIG_CHUNK: usize = 64 << 10;

/// An origin answering every request with `size` bytes of `z` (declared
/// length, storable, streamed in [`BIG_CHUNK`] chunks) once the returned
/// semaphore gives it a permit, and Larder in front of it with a cache
/// that stores nothing over 1 MiB: the response is shared by the requests
/// waiting on its fill and streamed uncached. The fill's idle timeout is 1 s.
/// The flag it returns is set when Larder drops a body before its end
/// (noticed only once the origin has to wait for Larder to take more, so
/// only when `size` is beyond what the sockets between them hold).
async fn big_shared_response(
    size: usize,
) -> (common::Origin, Larder, Arc<Semaphore>, Arc<AtomicBool>) {
    let go = Arc::new(Semaphore::new(0));
    let abandoned = Arc::new(AtomicBool::new(false));
    let (released, dropped) = (go.clone(), abandoned.clone());
    let origin = start_origin(move |_| {
        let released = released.clone();
        let dropped = dropped.clone();
        async move {
            released.acquire().await.expect("not closed").forget();
            let length = size.to_string();
            let (body, response) = streamed(
                200,
                &[("content-length", &length), ("cache-control", "max-age=60")],
            );
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b'z'; BIG_CHUNK]);
                for _ in 0..size / BIG_CHUNK {
                    if !body.chunk(chunk.clone()).await {
                        dropped.store(true, Ordering::SeqCst);
                        break;
                    }
                }
            });
            response
        }
    })
    .await;
    let larder = start_larder(&config(
        &origin.url(),
        "cache:\n  max_object_size: 1MiB\n  fill_idle_timeout: 1s\n",
        &[route("", "cache: { enabled: true }")],
        "",
    ))
    .await;
    (origin, larder, go, abandoned)
}

/// Waits until `joiners` requests wait on a fill in flight, then lets the
/// origin answer.
async fn release_when_joined(larder: &Larder, go: &Semaphore, joiners: usize) {
    eventually("every client to wait on the one fill", async || {
        in_flight(larder)
            .await
            .iter()
            .any(|(_, waiters)| *waiters == joiners as u64)
    })
    .await;
    go.add_permits(1);
}

/// A client that sends `GET path` with a small receive buffer and then
/// reads nothing.
async fn stalled_client(addr: SocketAddr, path: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(16 << 10).expect("SO_RCVBUF");
    let mut stream = socket.connect(addr).await.expect("connect");
    stream
        .write_all(raw_get(addr, path).as_bytes())
        .await
        .expect("write");
    stream
}

/// Reads `stream` to its end and asserts it ended (closed or reset) before
/// the whole body of `size` bytes came.
async fn assert_cut_off(stream: &mut TcpStream, size: usize) {
    let mut received = Vec::new();
    let mut buffer = vec![0u8; 256 << 10];
    let ended = loop {
        match tokio::time::timeout(common::DEADLINE, stream.read(&mut buffer)).await {
            Err(_) => break false,
            Ok(Ok(0) | Err(_)) => break true,
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
        }
    };
    assert!(ended, "the slow client's connection was not closed");
    let head_end = find(&received, b"\r\n\r\n").expect("the slow client got the head") + 4;
    let body = received.len() - head_end;
    assert!(
        body < size,
        "the slow client got the whole body ({body} bytes): it was not cut off"
    );
}

/// Asserts a reading client got the whole [`BIG`] body in reasonable time.
fn assert_whole_big_body(outcome: Outcome) {
    let reply = outcome.result.unwrap_or_else(|e| {
        panic!(
            "a client reading as fast as it can lost the body after {:?}: {e}",
            outcome.elapsed
        )
    });
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), BIG, "the whole body");
    assert!(reply.body.iter().all(|byte| *byte == b'z'));
    assert!(
        outcome.elapsed < Duration::from_secs(10),
        "a reading client took {:?}",
        outcome.elapsed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_a_shared_uncached_response_is_cut_off_and_the_others_finish() {
    let _shared = HEAVY.read().await;
    let (origin, larder, go, _) = big_shared_response(BIG).await;
    // The slow client asks first, and then reads nothing.
    let mut slow = stalled_client(larder.addr, "/big").await;
    const READERS: usize = 4;
    let readers = load(vec![larder.url("/big"); READERS], Duration::from_secs(20));
    release_when_joined(&larder, &go, READERS).await;
    for outcome in outcomes(readers).await {
        assert_whole_big_body(outcome);
    }
    assert_eq!(origin.hits(), 1, "one upstream fetch for all of them");

    // Now the slow client reads what was left for it: the connection ends
    // before the whole body.
    assert_cut_off(&mut slow, BIG).await;
    larder.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reading_a_shared_uncached_response_at_full_speed_all_get_it_whole() {
    let _shared = HEAVY.read().await;
    let (origin, larder, go, _) = big_shared_response(BIG).await;
    const READERS: usize = 4;
    for round in 0..3 {
        let url = larder.url(&format!("/big/{round}"));
        let readers = load(vec![url; READERS], Duration::from_secs(20));
        release_when_joined(&larder, &go, READERS - 1).await;
        for outcome in outcomes(readers).await {
            assert_whole_big_body(outcome);
        }
    }
    assert_eq!(origin.hits(), 3, "one upstream fetch per round");
    larder.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_client_that_stops_reading_a_shared_stream_is_cut_off_after_the_idle_timeout() {
    let _shared = HEAVY.read().await;
    // 64 MiB: more than the sockets between Larder and the origin hold, so
    // the origin notices when Larder lets go of the body.
    const HUGE: usize = 64 << 20;
    let (origin, larder, go, abandoned) = big_shared_response(HUGE).await;
    let mut slow = stalled_client(larder.addr, "/big").await;
    release_when_joined(&larder, &go, 0).await;
    let released = Instant::now();
    // Its socket buffers fill, then nothing moves for the fill's 1 s idle
    // timeout (the 60 s send timeout plays no part): Larder gives up.
    wait_until("Larder to drop the upstream body", || {
        abandoned.load(Ordering::SeqCst)
    })
    .await;
    assert!(
        released.elapsed() < Duration::from_secs(5),
        "given up only after {:?}",
        released.elapsed()
    );
    assert_cut_off(&mut slow, HUGE).await;
    assert_eq!(origin.hits(), 1);
    assert!(in_flight(&larder).await.is_empty());
    larder.stop().await;
}

#[tokio::test]
async fn calls_refused_for_capacity_are_not_counted_as_invocations() {
    let _shared = HEAVY.read().await;
    let origin = plain_origin().await;
    let larder = start_larder(&config(
        &origin.url(),
        "",
        &[route("", "plugins: [cap-counted]")],
        &plugins_yaml(&[(
            "cap-counted",
            "misbehave",
            "config: { do: sleep, ms: '300' }\nlimits: { timeout: 1s, concurrency: 1, queue_timeout: 100ms }",
        )]),
    ))
    .await;
    let all = outcomes(load(vec![larder.url("/page"); 4], Duration::from_secs(10))).await;
    let served = all
        .iter()
        .filter(|o| o.result.as_ref().is_ok_and(|reply| reply.status == 200))
        .count();
    let stats = plugin_stats(&larder, "cap-counted").await;
    let refused = counter(&stats, "capacity");
    assert_eq!(served as u64 + refused, 4, "{stats}");
    // A served request calls on-request and on-response; a refused one
    // never reached the guest.
    assert_eq!(
        counter(&stats, "invocations"),
        2 * served as u64,
        "{refused} refused for capacity: {stats}"
    );
    larder.stop().await;
}

// ---------------------------------------------------------------- the circuit breaker

#[tokio::test]
async fn calls_waiting_for_a_turn_when_the_circuit_opens_do_not_run_the_plugin() {
    let _shared = HEAVY.read().await;
    let origin = plain_origin().await;
    // One turn: the ten requests take it one after another, and each call
    // traps at once. The breaker hears of a failure before the next call
    // in the queue gets the turn and asks it.
    let larder = start_larder(&config(
        &origin.url(),
        "",
        &[route("", "plugins: [queued-panic]")],
        &plugins_yaml(&[(
            "queued-panic",
            "panic",
            "limits: { concurrency: 1, queue_timeout: 5s }",
        )]),
    ))
    .await;
    let all = outcomes(load(vec![larder.url("/page"); 10], Duration::from_secs(10))).await;
    let mut statuses: Vec<u16> = all
        .iter()
        .map(|o| o.result.as_ref().map_or(0, |reply| reply.status.as_u16()))
        .collect();
    statuses.sort();
    let stats = plugin_stats(&larder, "queued-panic").await;
    // The first five failures open the circuit; the calls still waiting
    // then are refused (503) instead of being run into the same failure.
    assert_eq!(
        counter(&stats, "failures"),
        5,
        "statuses {statuses:?}, {stats}"
    );
    assert_eq!(counter(&stats, "invocations"), 5, "{stats}");
    assert_eq!(counter(&stats, "skipped"), 5, "{stats}");
    assert_eq!(statuses, [502, 502, 502, 502, 502, 503, 503, 503, 503, 503]);
    assert_eq!(origin.hits(), 0);
    larder.stop().await;
}

#[tokio::test]
async fn a_breaker_trial_cancelled_by_the_client_leaving_lets_the_next_request_try() {
    let _shared = HEAVY.read().await;
    let origin = plain_origin().await;
    // Every call sleeps 10 s of wall time (no CPU), and the backstop ends
    // it at twice the 200 ms budget plus 1 s: each call is a failure (a
    // timeout) that stays in flight for 1.4 s.
    let larder = start_larder(&config(
        &origin.url(),
        "",
        &[route("", "plugins: [trial-sleeper]")],
        &plugins_yaml(&[(
            "trial-sleeper",
            "misbehave",
            "config: { do: sleep, ms: '10000' }\nlimits: { timeout: 200ms }",
        )]),
    ))
    .await;
    let url = larder.url("/page");
    for outcome in outcomes(load(vec![url.clone(); 5], Duration::from_secs(10))).await {
        let reply = outcome.result.unwrap_or_else(|e| panic!("{e}"));
        assert_problem(&reply, 502);
    }
    let stats = plugin_stats(&larder, "trial-sleeper").await;
    assert_eq!(stats["circuit_open"], true, "{stats}");
    assert_eq!(counter(&stats, "failures"), 5, "{stats}");
    let retry_after = assert_unavailable(&get(&url).await, "trial-sleeper");
    assert!((1..=5).contains(&retry_after), "Retry-After: {retry_after}");

    // Requests get 503 at once while the circuit is open; once the 5 s
    // backoff has passed one is let through as the trial, and hangs in the
    // plugin.
    let unanswered = async || match ask(larder.addr, "/page", Duration::from_millis(300)).await {
        Ok(reply) => {
            assert_eq!(
                reply.status,
                503,
                "{:?}",
                String::from_utf8_lossy(&reply.body)
            );
            None
        }
        Err(stream) => Some(stream),
    };
    let trial = eventually("the trial after the backoff", unanswered).await;
    assert_eq!(
        counter(&plugin_stats(&larder, "trial-sleeper").await, "invocations"),
        6,
        "the unanswered request is the trial, in the plugin"
    );
    // Its client leaves while the trial sleeps.
    drop(trial);

    // The next request is the trial again, not a 503. A trial kept by its
    // cancelled call would make every request 503 from now on; one left to
    // run to its backstop would reopen the circuit for 10 s at 1.4 s.
    let mut next = eventually("the next request to be the trial", unanswered).await;
    let stats = plugin_stats(&larder, "trial-sleeper").await;
    assert_eq!(counter(&stats, "invocations"), 7, "{stats}");
    assert_eq!(
        counter(&stats, "failures"),
        5,
        "the cancelled trial is not a failure: {stats}"
    );
    // This trial's client waits: the plugin fails it at the backstop.
    let reply = read_replies(&mut next, 1).await.remove(0);
    assert_eq!(reply.status, 502);
    assert!(String::from_utf8_lossy(&reply.body).contains("trial-sleeper"));
    let stats = plugin_stats(&larder, "trial-sleeper").await;
    assert_eq!(counter(&stats, "failures"), 6, "{stats}");
    assert_eq!(stats["circuit_open"], true, "a failed trial reopens it");
    assert_eq!(origin.hits(), 0);
    larder.stop().await;
}

// ---------------------------------------------------------------- an origin that dies

/// The origin of the restart test: `/cached/*` is revalidated on every use
/// (`max-age=0` with an ETag, answered 304 when it matches), anything else
/// is `live` and not cached.
async fn revalidated_or_live(
    request: Request<hyper::body::Incoming>,
) -> http::Response<larder::http::body::Body> {
    let path = request.uri().path().to_string();
    if !path.starts_with("/cached/") {
        return respond(200, &[], format!("live {path}"));
    }
    let etag = format!("\"{}\"", path.len());
    let headers = [("cache-control", "max-age=0"), ("etag", etag.as_str())];
    let matches = request
        .headers()
        .get("if-none-match")
        .is_some_and(|value| value.as_bytes() == etag.as_bytes());
    if matches {
        respond(304, &headers, "")
    } else {
        respond(200, &headers, format!("cached {path}"))
    }
}

/// One round of the restart test: `AT_ONCE` requests at once, every other
/// one to a cached URL.
const AT_ONCE: usize = 300;
const CACHED_KEYS: usize = 10;

fn round_urls(larder: &Larder, round: usize) -> Vec<String> {
    (0..AT_ONCE)
        .map(|i| {
            if i % 2 == 0 {
                larder.url(&format!("/cached/{}", (i / 2) % CACHED_KEYS))
            } else {
                larder.url(&format!("/live/{round}-{i}"))
            }
        })
        .collect()
}

/// What a round's replies were allowed to be: every request answered
/// within the bound; cached URLs always 200 with their body; live ones 200
/// only if `live_up` allows, else a 502/504 problem.
fn judge_round(round: &str, outcomes: &[Outcome], live_up: Option<bool>) -> (usize, usize) {
    let (mut live_ok, mut live_failed) = (0, 0);
    for outcome in outcomes {
        let reply = outcome.result.as_ref().unwrap_or_else(|e| {
            panic!(
                "{round}: {} got no whole answer after {:?}: {e}",
                outcome.url, outcome.elapsed
            )
        });
        let path = outcome
            .url
            .splitn(4, '/')
            .nth(3)
            .map(|p| format!("/{p}"))
            .unwrap_or_default();
        if path.starts_with("/cached/") {
            assert_eq!(reply.status, 200, "{round}: {path}: {}", reply.text());
            assert_eq!(reply.text(), format!("cached {path}"), "{round}");
        } else if reply.status == 200 {
            assert_ne!(
                live_up,
                Some(false),
                "{round}: {path} answered with the origin down"
            );
            assert_eq!(reply.text(), format!("live {path}"), "{round}");
            live_ok += 1;
        } else {
            assert_ne!(
                live_up,
                Some(true),
                "{round}: {path}: {} {}",
                reply.status,
                reply.text()
            );
            assert_problem_in(reply, &[502, 504], &format!("{round}: {path}"));
            live_failed += 1;
        }
    }
    (live_ok, live_failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_killed_and_restarted_under_load_costs_no_cached_request_and_leaks_nothing() {
    let _exclusive = HEAVY.write().await;
    let fds_before = open_fds();
    let origin = start_origin(revalidated_or_live).await;
    let addr = origin.addr;
    let larder = start_larder(&config(
        &origin.url(),
        "",
        &[
            route("cached", "cache: { enabled: true, stale_if_error: 30s }"),
            route("live", ""),
        ],
        "",
    ))
    .await;
    for key in 0..CACHED_KEYS {
        let warm = get(&larder.url(&format!("/cached/{key}"))).await;
        assert_eq!(warm.status, 200, "{}", warm.text());
    }
    let bound = Duration::from_secs(10);

    for round in 0..2 {
        let all = outcomes(load(round_urls(&larder, round), bound)).await;
        judge_round(&format!("round {round}, origin up"), &all, Some(true));
    }

    // The origin dies while a round is in flight.
    let hits = origin.hits();
    let tasks = load(round_urls(&larder, 2), bound);
    wait_until("the round to reach the origin", || {
        origin.hits() >= hits + 20
    })
    .await;
    origin.stop().await;
    let all = outcomes(tasks).await;
    judge_round("round 2, origin stopped mid-round", &all, None);

    for round in 3..5 {
        let all = outcomes(load(round_urls(&larder, round), bound)).await;
        let (_, failed) = judge_round(&format!("round {round}, origin down"), &all, Some(false));
        assert_eq!(failed, AT_ONCE / 2);
        for outcome in all.iter().filter(|o| o.url.contains("/cached/")) {
            let reply = outcome.result.as_ref().expect("judged above");
            assert!(
                reply.cache_status().contains("fwd=stale"),
                "{}",
                reply.cache_status()
            );
        }
    }

    // The origin comes back on the same port; Larder uses it at once.
    drop(origin);
    let origin = start_origin_at(addr, revalidated_or_live).await;
    let restarted = Instant::now();
    eventually("a live request to succeed again", async || {
        get(&larder.url("/live/again")).await.status == 200
    })
    .await;
    assert!(
        restarted.elapsed() < Duration::from_secs(5),
        "service came back only after {:?}",
        restarted.elapsed()
    );
    for round in 5..7 {
        let all = outcomes(load(round_urls(&larder, round), bound)).await;
        judge_round(&format!("round {round}, origin back"), &all, Some(true));
    }
    assert!(origin.hits() > 0);
    let revalidated = get_with(&larder.url("/cached/0"), &[]).await;
    assert!(
        revalidated.cache_status().contains("fwd-status=304"),
        "revalidated with the new origin: {}",
        revalidated.cache_status()
    );

    eventually("no fill in flight", async || {
        in_flight(&larder).await.is_empty()
    })
    .await;
    larder.stop().await;
    origin.stop().await;
    // Connections and their file descriptors go with them (slack for the
    // runtime's own and other tests' descriptors).
    let fds = wait_until("the file descriptors to come back down", || {
        let now = open_fds();
        (now <= fds_before + 32).then_some(now)
    })
    .await;
    eprintln!("open file descriptors: {fds_before} before, {fds} after");
}

// ---------------------------------------------------------------- fault plugins under load

/// The faulty plugins of the load test: (name, fixture, settings while
/// faulty, settings once fixed); limits are [`LOAD_LIMITS`] unless the
/// settings give their own.
const LOAD_FAULTS: [(&str, &str, &str, &str); 7] = [
    ("load-spin", "spin_forever", "", "config: { when: never }"),
    (
        "load-host-loop",
        "misbehave",
        "config: { do: http-loop }",
        "config: { do: ok }",
    ),
    (
        "load-hog",
        "eat_memory",
        "config: { mib: '64' }\nlimits: { memory: 16MiB, timeout: 20ms, concurrency: 4, queue_timeout: 100ms }",
        "config: { when: never }\nlimits: { memory: 16MiB, timeout: 20ms, concurrency: 4, queue_timeout: 100ms }",
    ),
    ("load-panic", "panic", "", "config: { when: never }"),
    (
        // Sleeps past its backstop (2 x 20 ms + 1 s): fails as a timeout;
        // enough turns for the 5 failures that open its circuit.
        "load-nap",
        "misbehave",
        "config: { do: sleep, ms: '5000' }\nlimits: { timeout: 20ms, concurrency: 8, queue_timeout: 100ms }",
        "config: { do: ok }\nlimits: { timeout: 20ms, concurrency: 8, queue_timeout: 100ms }",
    ),
    (
        "load-bomb",
        "misbehave",
        "config: { do: header-bomb }",
        "config: { do: ok }",
    ),
    (
        "load-status",
        "misbehave",
        "config: { do: bad-status }",
        "config: { do: ok }",
    ),
];

/// Limits of the load test's plugins unless they say otherwise: small
/// budgets, few turns and short queues, so the plugins that burn CPU can
/// burn little of it.
const LOAD_LIMITS: &str = "limits: { timeout: 20ms, concurrency: 4, queue_timeout: 100ms }";

/// The load test's config: `/plain` without plugins, `/NAME` with the
/// plugin NAME, set up as `fixed` says.
fn load_config(origin: &str, fixed: bool) -> String {
    let mut routes = vec![route("plain", "")];
    let mut entries = Vec::new();
    for (name, file, faulty, healthy) in LOAD_FAULTS {
        routes.push(route(name, &format!("plugins: [{name}]")));
        let settings = if fixed { healthy } else { faulty };
        let settings = if settings.contains("limits:") {
            settings.to_string()
        } else {
            format!("{settings}\n{LOAD_LIMITS}")
        };
        entries.push((name, file, settings));
    }
    let entries: Vec<(&str, &str, &str)> = entries
        .iter()
        .map(|(name, file, settings)| (*name, *file, settings.as_str()))
        .collect();
    config(origin, "", &routes, &plugins_yaml(&entries))
}

/// Samples `memory_in_use` of `GET /plugins` until `stop`; the largest seen.
fn sample_plugin_memory(admin_url: String, stop: Arc<AtomicBool>) -> JoinHandle<(u64, usize)> {
    tokio::spawn(async move {
        let auth = format!("Bearer {}", common::ADMIN_TOKEN);
        let (mut largest, mut samples) = (0, 0);
        while !stop.load(Ordering::SeqCst) {
            let reply = get_with(&admin_url, &[("authorization", &auth)]).await;
            let used = reply.json()["memory_in_use"]
                .as_u64()
                .unwrap_or_else(|| panic!("no memory_in_use: {}", reply.text()));
            largest = largest.max(used);
            samples += 1;
            // A sampling interval, not a wait for anything.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (largest, samples)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_on_faulty_plugins_leave_the_plugin_free_route_serving() {
    let _exclusive = HEAVY.write().await;
    let origin = plain_origin().await;
    let larder = start_larder(&load_config(&origin.url(), false)).await;
    const REQUESTS: usize = 1000;
    let routes = LOAD_FAULTS.len() + 1;
    let urls: Vec<String> = (0..REQUESTS)
        .map(|i| match i % routes {
            0 => larder.url("/plain"),
            n => larder.url(&format!("/{}", LOAD_FAULTS[n - 1].0)),
        })
        .collect();
    // Five HTTP/2 connections carry the thousand requests (200 streams
    // each, under Larder's 256): a thousand new connections at once would
    // measure the listen backlog instead (see the test after this one).
    let connections = h2_connections(larder.addr, 5).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_plugin_memory(larder.admin_url("/plugins"), stop.clone());
    let started = Instant::now();
    let tasks: Vec<JoinHandle<Outcome>> = urls
        .into_iter()
        .enumerate()
        .map(|(i, url)| {
            let sender = connections[i % connections.len()].clone();
            tokio::spawn(try_get_h2(sender, url, Duration::from_secs(15)))
        })
        .collect();
    let all = outcomes(tasks).await;
    let took = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (largest_memory, samples) = sampler.await.expect("the memory sampler");

    let mut plain = Vec::new();
    for outcome in &all {
        let reply = outcome.result.as_ref().unwrap_or_else(|e| {
            panic!(
                "{} got no whole answer after {:?}: {e}",
                outcome.url, outcome.elapsed
            )
        });
        if outcome.url.ends_with("/plain") {
            assert_eq!(reply.status, 200, "the plugin-free route: {}", reply.text());
            assert_eq!(reply.text(), "from origin");
            plain.push(outcome);
            continue;
        }
        let plugin = outcome.url.rsplit('/').next().unwrap_or_default();
        assert_problem_in(reply, &[502, 503], &format!("/{plugin}"));
        assert!(reply.text().contains(plugin), "{}", reply.text());
        if reply.status == 503 {
            assert_unavailable(reply, plugin);
        }
    }
    let p99 = quantile(&plain, 0.99);
    eprintln!(
        "{REQUESTS} requests in {took:?}; plugin-free p99 {p99:?}; largest memory_in_use {largest_memory} bytes in {samples} samples"
    );
    assert!(p99 < Duration::from_secs(3), "plugin-free p99 {p99:?}");
    assert_eq!(
        origin.hits(),
        plain.len(),
        "no faulty request reached the origin"
    );
    assert!(samples > 0);
    assert!(
        largest_memory < TOTAL_PLUGIN_MEMORY,
        "plugin memory {largest_memory} over plugin_limits.total_memory"
    );

    // Larder is still up. Every faulty plugin failed, and one that failed
    // five times (none of its calls succeeded) has an open circuit; how
    // many calls each got to run before the others timed out in its queue
    // depends on how the cores were shared.
    assert_eq!(get(&larder.url("/plain")).await.status, 200);
    let status = plugins_status(&larder).await;
    for (name, ..) in LOAD_FAULTS {
        let stats = &status["plugins"][name];
        let failures = counter(stats, "failures");
        assert!(failures >= 1, "{name}: {stats}");
        assert_eq!(stats["circuit_open"], failures >= 5, "{name}: {stats}");
        assert!(
            !stats["last_failure"]
                .as_str()
                .unwrap_or_default()
                .contains("Stack backtrace"),
            "{name}: the host's stack trace in a plugin failure: {stats}"
        );
    }

    // Fixed plugins (a reload that changes a plugin gives it closed
    // breakers) serve again.
    larder
        .reload(&load_config(&origin.url(), true))
        .await
        .expect("reload with the fixed plugins");
    for (name, ..) in LOAD_FAULTS {
        let reply = get(&larder.url(&format!("/{name}"))).await;
        assert_eq!(reply.status, 200, "{name}: {}", reply.text());
        assert_eq!(reply.text(), "from origin");
    }
    let status = plugins_status(&larder).await;
    for (name, ..) in LOAD_FAULTS {
        assert_eq!(
            status["plugins"][name]["circuit_open"], false,
            "{name}: {status}"
        );
    }
    larder.stop().await;
}

/// `TcpExt: ListenOverflows` of /proc/net/netstat: connections the kernel
/// dropped because a listener's accept queue was full (for the whole
/// network namespace).
fn listen_overflows() -> u64 {
    let netstat = std::fs::read_to_string("/proc/net/netstat").expect("/proc/net/netstat");
    let mut tcp_ext = netstat.lines().filter(|line| line.starts_with("TcpExt:"));
    let (names, values) = (tcp_ext.next(), tcp_ext.next());
    let (Some(names), Some(values)) = (names, values) else {
        panic!("no TcpExt lines in /proc/net/netstat");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "ListenOverflows")
        .and_then(|(_, value)| value.parse().ok())
        .expect("a ListenOverflows counter")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_connecting_at_once_fit_the_listen_backlog() {
    let _exclusive = HEAVY.write().await;
    // Answered from a static source: no origin, whose own listener would
    // overflow too.
    let larder = start_larder(&format!(
        "{ADMIN_BLOCK}routes:\n  - source: s\nsources:\n  s:\n    rule: '0 0 0 1 1 *'\n    static: {{ value: 'plain' }}\n"
    ))
    .await;
    let url = larder.url("/plain");
    eventually("the source's value", async || get(&url).await.status == 200).await;
    let overflows_before = listen_overflows();
    let all = outcomes(load(vec![url; 1000], Duration::from_secs(15))).await;
    let overflows = listen_overflows() - overflows_before;
    let answered: Vec<&Outcome> = all
        .iter()
        .filter(|o| o.result.as_ref().is_ok_and(|reply| reply.status == 200))
        .collect();
    assert_eq!(answered.len(), all.len(), "every request answered 200");
    let p99 = quantile(&answered, 0.99);
    assert_eq!(
        overflows, 0,
        "connections dropped from a full accept queue (plain p99 {p99:?})"
    );
    larder.stop().await;
}
