//! The `larder` binary as an operator runs it: `check`, `--version`, `--help`,
//! cachepump's flags, config errors before anything binds, and serving on the
//! address `-e` gives.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(10);

const GOOD: &str = "\
version: '1.0'
log:
  level: info
upstreams:
  api:
    servers: [\"http://127.0.0.1:9\"]
routes:
  - match: { path_prefix: /api/ }
    upstream: api
  - match: { path_prefix: /hello }
    source: hello
sources:
  hello:
    rule: '*/10 * * * * *'
    static: { value: 'hi' }
  report:
    rule: '0 */2 * * * *'
    file: { path: ./report.csv }
";

/// Two mistakes on known lines: a route to a missing upstream, a bad cron rule.
const BAD: &str = "\
upstreams:
  api:
    servers: [\"http://127.0.0.1:9\"]
routes:
  - upstream: apii
sources:
  hello:
    rule: 'every minute'
    static: { value: hi }
";

const CACHEPUMP: &str = r#"version: '1.0'
sources:
  hello:
    rule: '* * * * * *'
    static: 
      value: '{"data":"Hello world!"}'
"#;

fn larder() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_larder"));
    command.env_remove("RUST_LOG");
    command
}

/// A directory holding `name` with `text`; the binary runs inside it.
fn config_dir(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write config");
    (dir, path)
}

fn run(dir: &Path, args: &[&str]) -> Output {
    larder()
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run larder")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A running `larder`, killed when the test ends (passed or not). Its
/// stderr goes to a file: a pipe nobody reads would fill up and stall it.
struct Running {
    child: Child,
    log_path: PathBuf,
}

impl Running {
    fn spawn(mut command: Command, dir: &Path) -> Running {
        let log_path = dir.join("larder.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = command
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn larder");
        Running { child, log_path }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_exit(child: &mut Child) -> Option<ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// One plain HTTP/1.1 GET; `None` while nothing answers.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// Polls until `path` answers `expect_status`; panics with the server's log
/// if it exits or the deadline passes.
fn poll_until(server: &mut Running, addr: SocketAddr, path: &str, expect_status: u16) -> String {
    let log_path = &server.log_path;
    let awaited = Awaited {
        path,
        expect_status,
        log_path,
    };
    let child = &mut server.child;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime to poll on");
    runtime.block_on(common::wait_until(awaited, || {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("larder exited with {status}:\n{}", read_log(log_path));
        }
        http_get(addr, path).and_then(|(status, body)| (status == expect_status).then_some(body))
    }))
}

/// What [`poll_until`] waits for, shown with the server's log as it is
/// when the wait fails.
struct Awaited<'a> {
    path: &'a str,
    expect_status: u16,
    log_path: &'a Path,
}

impl std::fmt::Display for Awaited<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (path, status) = (self.path, self.expect_status);
        write!(f, "{path} to answer {status}:\n{}", read_log(self.log_path))
    }
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn check_accepts_a_good_file_and_prints_what_would_run() {
    let (dir, _) = config_dir("config.yml", GOOD);
    let output = run(dir.path(), &["check", "-c", "config.yml"]);
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout.contains("config.yml: ok"), "{stdout}");
    assert!(stdout.contains("0.0.0.0:8080"), "{stdout}");
    assert!(stdout.contains("upstreams  1 (api)"), "{stdout}");
    assert!(stdout.contains("routes     2"), "{stdout}");
    assert!(stdout.contains("sources    2 (hello, report)"), "{stdout}");
    // A line a person can scan for each upstream, route and source.
    for line in [
        "api: http://127.0.0.1:9 (round_robin, http1)",
        "1. /api/ -> upstream api",
        "2. /hello -> source hello",
        "hello: static, on '*/10 * * * * *'",
        "report: file, on '0 */2 * * * *'",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
}

#[test]
fn check_uses_config_yml_in_the_working_directory_by_default() {
    let (dir, _) = config_dir("config.yml", GOOD);
    let output = run(dir.path(), &["check"]);
    assert!(output.status.success(), "{output:?}");
    let (empty, _) = config_dir("other.yml", GOOD);
    let output = run(empty.path(), &["check"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        text(&output.stderr).contains("cannot read the file"),
        "{output:?}"
    );
}

#[test]
fn check_rejects_a_bad_file_printing_every_error_with_its_line() {
    let (dir, _) = config_dir("bad.yml", BAD);
    let output = run(dir.path(), &["check", "-c", "bad.yml"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        stderr.contains("bad.yml:5:15: routes[0].upstream: no upstream named \"apii\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("bad.yml:8:11: sources.hello.rule: "),
        "{stderr}"
    );
    assert!(stderr.contains("2 errors"), "{stderr}");
    assert!(output.stdout.is_empty(), "nothing on stdout: {output:?}");
}

#[test]
fn check_reads_env_variables_from_the_process_environment() {
    let with_token = "admin:\n  listen: 127.0.0.1:9901\n  token: '${LARDER_CLI_TEST_TOKEN}'\n";
    let (dir, _) = config_dir("config.yml", with_token);
    let output = larder()
        .current_dir(dir.path())
        .args(["check"])
        .env("LARDER_CLI_TEST_TOKEN", "s3cret")
        .output()
        .expect("run");
    assert!(output.status.success(), "{output:?}");
    assert!(
        text(&output.stdout).contains("(token set; console at /console)"),
        "{output:?}"
    );

    let output = larder()
        .current_dir(dir.path())
        .args(["check"])
        .env_remove("LARDER_CLI_TEST_TOKEN")
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        text(&output.stderr).contains(
            "config.yml:3:11: admin.token: environment variable LARDER_CLI_TEST_TOKEN is not set"
        ),
        "{output:?}"
    );
}

#[test]
fn check_reports_a_plugin_that_does_not_compile_at_its_line() {
    let text_config = "plugins:\n  broken:\n    path: not-a-component.wasm\n";
    let (dir, _) = config_dir("config.yml", text_config);
    std::fs::write(dir.path().join("not-a-component.wasm"), b"this is not wasm").unwrap();
    let output = run(dir.path(), &["check"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("config.yml:2:3: plugins.broken"),
        "{stderr}"
    );
    assert_eq!(
        stderr.lines().count(),
        2,
        "one line per error, then the count: {stderr}"
    );
}

#[test]
fn version_flag_prints_the_version_and_the_commit() {
    let output = larder().arg("--version").output().expect("run");
    assert!(output.status.success());
    let shown = text(&output.stdout);
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| text(&output.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    assert_eq!(
        shown.trim(),
        format!("larder {} (commit {commit})", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn help_mentions_check_and_examples() {
    let output = larder().arg("--help").output().expect("run");
    let stdout = text(&output.stdout);
    assert!(output.status.success());
    assert!(stdout.contains("check"), "{stdout}");
    assert!(stdout.contains("larder check -c config.yml"), "{stdout}");
    assert!(stdout.contains("-e"), "{stdout}");
}

#[test]
fn cachepump_command_line_is_accepted() {
    let (dir, _) = config_dir("my_config.yml", CACHEPUMP);
    let output = run(
        dir.path(),
        &[
            "check",
            "-e",
            "0.0.0.0:8080",
            "-l",
            "INFO",
            "-c",
            "./my_config.yml",
        ],
    );
    assert!(output.status.success(), "{output:?}");
    assert!(
        text(&output.stdout).contains("cachepump mode"),
        "{output:?}"
    );
    let output = run(
        dir.path(),
        &["check", "--e", ":9090", "--c", "my_config.yml"],
    );
    assert!(output.status.success(), "{output:?}");
    assert!(text(&output.stdout).contains("0.0.0.0:9090"), "{output:?}");
}

#[test]
fn log_level_flag_takes_any_case_and_refuses_nonsense() {
    let (dir, _) = config_dir("config.yml", GOOD);
    for level in ["DEBUG", "debug", "Warn", "larder=trace"] {
        let output = run(dir.path(), &["check", "-l", level]);
        assert!(output.status.success(), "{level}: {output:?}");
    }
    let output = run(dir.path(), &["check", "-l", "loud"]);
    assert_eq!(output.status.code(), Some(2), "usage error: {output:?}");
    assert!(
        text(&output.stderr).contains("unknown log level"),
        "{output:?}"
    );
}

#[test]
fn a_broken_config_exits_before_binding_the_port() {
    let (dir, _) = config_dir("bad.yml", BAD);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = larder()
        .current_dir(dir.path())
        .args(["-c", "bad.yml", "-e", &listen])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let status = wait_for_exit(&mut child).expect("larder exits on its own");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("bad.yml:5:15: routes[0].upstream"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was started"), "{stderr}");
}

#[test]
fn serves_on_the_address_given_with_e() {
    // The file's own `listen` loses to -e.
    let text = format!("{CACHEPUMP}listen: 127.0.0.1:1\n");
    let (dir, _) = config_dir("config.yml", &text);
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut command = larder();
    command.args(["-e", &addr.to_string(), "-l", "DEBUG", "-c", "config.yml"]);
    let mut server = Running::spawn(command, dir.path());
    let health = poll_until(&mut server, addr, "/health", 200);
    assert!(health.contains(r#"{"status":"ok"}"#), "{health}");
    let hello = poll_until(&mut server, addr, "/?key=hello", 200);
    assert!(hello.contains(r#"{"data":"Hello world!"}"#), "{hello}");
    assert!(
        server.log().contains("DEBUG"),
        "-l DEBUG turns on debug logs:\n{}",
        server.log()
    );
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let (dir, _) = config_dir("config.yml", CACHEPUMP);
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let listen = taken.local_addr().unwrap().to_string();
    let mut child = larder()
        .current_dir(dir.path())
        .args(["-e", &listen])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let status = wait_for_exit(&mut child).expect("larder exits on its own");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&listen), "names the address: {stderr}");
    drop(taken);
}

#[test]
fn check_prints_warnings_but_still_passes() {
    let (dir, _) = config_dir("config.yml", "sources:\n  hello:\n    rule: '@every 5s'\n");
    let output = run(dir.path(), &["check"]);
    assert!(output.status.success(), "{output:?}");
    assert!(
        text(&output.stderr)
            .contains("warning: ./config.yml:2:3: sources.hello: no static, http, file or plugin"),
        "{output:?}"
    );
}

/// `larder plugin new` writes a crate that builds on its own (outside this
/// repository's workspaces) and whose output `larder plugin test` runs.
#[test]
fn a_new_plugin_builds_and_its_hooks_run_under_plugin_test() {
    let dir = tempfile::tempdir().expect("temp dir");
    let made = larder()
        .current_dir(dir.path())
        .args(["plugin", "new", "stamp-kit", "--kind", "transformer"])
        .output()
        .expect("larder runs");
    assert!(made.status.success(), "{}", text(&made.stderr));
    assert!(text(&made.stdout).contains("cargo build --release"));
    let again = larder()
        .current_dir(dir.path())
        .args(["plugin", "new", "stamp-kit"])
        .output()
        .expect("larder runs");
    assert!(!again.status.success(), "an existing directory is kept");
    assert!(text(&again.stderr).contains("exists already"));

    let crate_dir = dir.path().join("stamp-kit");
    // The crate's own target directory, so nothing of this repository's
    // build is reused: what a plugin author gets.
    let built = Command::new(env!("CARGO"))
        .current_dir(&crate_dir)
        .args(["build", "--release", "--quiet"])
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .output()
        .expect("cargo runs");
    assert!(built.status.success(), "{}", text(&built.stderr));
    let wasm = crate_dir.join("target/wasm32-wasip2/release/stamp_kit.wasm");

    let tested = larder()
        .args(["plugin", "test"])
        .arg(&wasm)
        .args([
            "--config",
            "value=hello",
            "--response-header",
            "server: origin",
        ])
        .output()
        .expect("larder runs");
    let report = text(&tested.stdout);
    assert!(tested.status.success(), "{report}{}", text(&tested.stderr));
    assert!(
        report.contains("larder:plugin@0.2.0, sync calls"),
        "{report}"
    );
    assert!(report.contains("+ x-stamp-kit: hello"), "{report}");
    assert!(report.contains("body unchanged"), "{report}");

    let refused = larder()
        .args(["plugin", "test"])
        .arg(&wasm)
        .args(["--header", "x-stamp-kit-refuse: 1"])
        .output()
        .expect("larder runs");
    assert!(text(&refused.stdout).contains("on-request: answered 400"));

    let bad = larder()
        .args(["plugin", "test"])
        .arg(&wasm)
        .args(["--config", "nope=1"])
        .output()
        .expect("larder runs");
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).contains("unknown key `nope`"),
        "{}",
        text(&bad.stderr)
    );
}

#[test]
fn health_exits_0_while_larder_serves_and_1_when_it_does_not() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = format!("{CACHEPUMP}listen: {addr}\n");
    let (dir, _) = config_dir("config.yml", &config);
    let down = run(dir.path(), &["health", "-c", "config.yml"]);
    assert_eq!(down.status.code(), Some(1), "{}", text(&down.stderr));
    assert!(
        text(&down.stderr).contains("unhealthy"),
        "{}",
        text(&down.stderr)
    );
    let mut command = larder();
    command.args(["-c", "config.yml"]);
    let mut server = Running::spawn(command, dir.path());
    poll_until(&mut server, addr, "/health", 200);
    let up = run(dir.path(), &["health", "-c", "config.yml"]);
    assert!(
        up.status.success(),
        "{}{}",
        text(&up.stdout),
        text(&up.stderr)
    );
    assert!(text(&up.stdout).contains("/health"), "{}", text(&up.stdout));
}

/// Datagrams `larder` sends to `$NOTIFY_SOCKET`, as systemd would get them.
fn next_notification(socket: &std::os::unix::net::UnixDatagram) -> String {
    let mut buffer = [0u8; 512];
    let length = socket
        .recv(&mut buffer)
        .expect("a notification within the deadline");
    String::from_utf8_lossy(&buffer[..length]).into_owned()
}

#[test]
fn systemd_hears_ready_once_listening_then_reloading_and_stopping() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = format!("{CACHEPUMP}listen: {addr}\n");
    let (dir, _) = config_dir("config.yml", &config);
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("notify socket");
    socket.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut command = larder();
    command
        .args(["-c", "config.yml"])
        .env("NOTIFY_SOCKET", &socket_path);
    let mut server = Running::spawn(command, dir.path());

    assert_eq!(next_notification(&socket), "READY=1");
    // Ready means listening: the first connection is accepted.
    let (status, _) = http_get(addr, "/health").expect("an answer right after READY=1");
    assert_eq!(status, 200);

    let pid = i32::try_from(server.child.id()).expect("pid");
    // SAFETY: sends a signal to the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let reloading = next_notification(&socket);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(next_notification(&socket), "READY=1");

    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(next_notification(&socket), "STOPPING=1");
    let status = wait_for_exit(&mut server.child).expect("larder exits after SIGTERM");
    assert!(status.success(), "{status}: {}", server.log());
}

fn packaging(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/packaging")
        .join(file)
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(packaging("larder.service")).expect("the unit");
    for directive in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(directive), "the unit lacks {directive}");
    }
    // verify checks that ExecStart's program exists: point it at this build.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("larder.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/larder", env!("CARGO_BIN_EXE_larder")),
    )
    .expect("write unit");
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (apt-get install systemd)");
    // It exits 0 on unknown keys and bad values too: any complaint fails.
    assert!(
        output.status.success() && output.stderr.is_empty(),
        "{}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

#[test]
fn the_dockerfile_runs_larder_unprivileged_with_a_healthcheck_on_what_it_copies() {
    let dockerfile = std::fs::read_to_string(packaging("Dockerfile")).expect("the Dockerfile");
    let instructions: Vec<(String, String)> = dockerfile
        .replace("\\\n", " ")
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| {
            let (word, rest) = line.split_once(' ')?;
            Some((word.to_ascii_uppercase(), rest.trim().to_string()))
        })
        .collect();
    let all = |word: &str| -> Vec<&str> {
        instructions
            .iter()
            .filter(|(w, _)| w == word)
            .map(|(_, rest)| rest.as_str())
            .collect()
    };
    let stages = all("FROM");
    assert_eq!(
        stages.len(),
        2,
        "a build stage and a runtime stage: {stages:?}"
    );
    assert!(stages[1].starts_with("debian:bookworm-slim"), "{stages:?}");
    let user = all("USER");
    assert_eq!(user.len(), 1);
    assert!(user[0] != "root" && user[0] != "0", "runs as {}", user[0]);
    let healthcheck = all("HEALTHCHECK").join(" ");
    assert!(
        healthcheck.contains(r#""/usr/local/bin/larder", "health""#),
        "{healthcheck}"
    );
    // Every file the build copies from the context exists.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for copy in all("COPY") {
        if copy.starts_with("--from") {
            continue;
        }
        let mut sources: Vec<&str> = copy.split_whitespace().collect();
        sources.pop();
        for source in sources {
            assert!(root.join(source).exists(), "COPY {source}: no such file");
        }
    }
    // The config it ships loads.
    let shipped = run(root, &["check", "-c", "examples/packaging/config.yml"]);
    assert!(shipped.status.success(), "{}", text(&shipped.stderr));
}

#[test]
fn the_access_log_can_be_combined_log_format_or_json_on_stdout() {
    for format in ["combined", "json"] {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = format!(
            "listen: {addr}\nlog:\n  level: warn\n  access_log_format: {format}\nsources:\n  hello:\n    rule: '@every 1h'\n    static: {{ value: hi }}\nroutes:\n  - match: {{ path_prefix: /hello }}\n    source: hello\n"
        );
        let (dir, _) = config_dir("config.yml", &config);
        let stdout_path = dir.path().join("stdout.log");
        let mut command = larder();
        command.args(["-c", "config.yml"]).current_dir(dir.path());
        let log = std::fs::File::create(dir.path().join("larder.log")).expect("log");
        let out = std::fs::File::create(&stdout_path).expect("stdout file");
        let child = command
            .stdout(out)
            .stderr(log)
            .spawn()
            .expect("spawn larder");
        let mut server = Running {
            child,
            log_path: dir.path().join("larder.log"),
        };
        poll_until(&mut server, addr, "/hello?x=1", 200);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        // The line is written when the response body has gone out.
        let line = runtime.block_on(common::wait_until("an access log line", || {
            std::fs::read_to_string(&stdout_path)
                .ok()?
                .lines()
                .find(|line| line.contains("/hello?x=1"))
                .map(str::to_string)
        }));
        match format {
            "combined" => {
                // 127.0.0.1 - - [05/Dec/2026:12:00:00 +0000] "GET /hello?x=1 HTTP/1.1" 200 2 "-" "-"
                assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
                assert!(
                    line.contains("] \"GET /hello?x=1 HTTP/1.1\" 200 2 \"-\" \"-\""),
                    "{line}"
                );
            }
            _ => {
                let value: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
                assert_eq!(value["target"], "/hello?x=1", "{line}");
                assert_eq!(value["status"], 200, "{line}");
                assert_eq!(value["client"], "127.0.0.1", "{line}");
            }
        }
        // The process log (stderr) does not get the access lines.
        assert!(!server.log().contains("/hello?x=1"), "{}", server.log());
    }
}

/// The Dockerfile's runtime steps without a container engine: the shipped
/// config, the cache directory from `LARDER_CACHE_DIR`, an unprivileged
/// user (`nobody`, when the tests run as root), and the HEALTHCHECK's
/// command answering 0.
#[test]
fn the_image_steps_serve_the_shipped_config_as_an_unprivileged_user() {
    use std::os::unix::fs::PermissionsExt as _;
    let root = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let etc = root.path().join("etc/larder");
    let cache = root.path().join("var/cache/larder");
    std::fs::create_dir_all(&etc).expect("etc");
    std::fs::create_dir_all(&cache).expect("cache");
    std::fs::copy(packaging("config.yml"), etc.join("config.yml")).expect("copy config");
    // SAFETY: geteuid only reads the process's user id.
    let running_as_root = unsafe { libc::geteuid() } == 0;
    if running_as_root {
        // The image's user owns its cache directory, nothing else.
        let (nobody, nogroup) = (65534, 65534);
        std::os::unix::fs::chown(&cache, Some(nobody), Some(nogroup)).expect("chown");
        for dir in [
            root.path().join("etc"),
            etc.clone(),
            root.path().join("var"),
            root.path().join("var/cache"),
        ] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        std::fs::set_permissions(
            etc.join("config.yml"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
    }
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let binary = env!("CARGO_BIN_EXE_larder");
    let as_image_user = |args: &[&str]| -> Command {
        let mut command = if running_as_root {
            let mut command = Command::new("setpriv");
            command
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", binary])
                .args(args);
            command
        } else {
            let mut command = Command::new(binary);
            command.args(args);
            command
        };
        command
            .current_dir(&etc)
            .env("LARDER_CACHE_DIR", &cache)
            .env_remove("RUST_LOG");
        command
    };
    let addr_text = addr.to_string();
    let command = as_image_user(&["-c", "config.yml", "-e", &addr_text]);
    let mut server = Running::spawn(command, &etc);
    let hello = poll_until(&mut server, addr, "/hello", 200);
    assert!(hello.contains("Hello from Larder"), "{hello}");
    let health = as_image_user(&["health", "-c", "config.yml", "-e", &addr_text])
        .output()
        .expect("larder health");
    assert!(
        health.status.success(),
        "{}{}",
        text(&health.stdout),
        text(&health.stderr)
    );
    if running_as_root {
        let owner = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()?
                .lines()
                .find(|line| line.starts_with("Uid:"))
                .map(str::to_string)
        };
        let uid = owner(server.child.id()).unwrap_or_default();
        assert!(uid.contains("65534"), "runs as nobody: {uid}");
    }
}

#[test]
fn schema_prints_the_committed_schema_without_a_config_file() {
    // An empty directory: `schema` must not look for ./config.yml.
    let dir = tempfile::tempdir().expect("temp dir");
    let output = run(dir.path(), &["schema"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let printed = text(&output.stdout);
    let schema: serde_json::Value = serde_json::from_str(&printed).expect("JSON");
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    let committed_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/config.schema.json");
    let committed = std::fs::read_to_string(&committed_path).expect("docs/config.schema.json");
    assert!(
        printed == committed,
        "docs/config.schema.json is stale: run `cargo run -- schema > docs/config.schema.json`"
    );
    let help = text(&run(dir.path(), &["--help"]).stdout);
    assert!(help.contains("larder schema"), "{help}");
}

#[test]
fn schema_into_a_closed_pipe_exits_quietly() {
    // A pipe whose reader is gone before the first byte: every write fails
    // with EPIPE (Rust ignores SIGPIPE), as under `larder schema | head -0`.
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    // SAFETY: pipe(2) returned these two open descriptors, owned by no one else.
    let (reader, writer) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    drop(reader);
    let output = larder()
        .arg("schema")
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("run larder schema");
    let stderr = text(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
}
