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
    assert!(text(&output.stdout).contains("(token set)"), "{output:?}");

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
fn version_flag_prints_the_version() {
    let output = larder().arg("--version").output().expect("run");
    assert!(output.status.success());
    assert_eq!(
        text(&output.stdout).trim(),
        format!("larder {}", env!("CARGO_PKG_VERSION"))
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
