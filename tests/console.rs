//! The console on the admin listener: refused without the token, signed in
//! through its form with an HttpOnly, SameSite cookie that also lets the
//! page purge (with its header, never from another site's form), and, in a
//! real headless Chromium driven over the DevTools protocol, showing live
//! numbers that move as requests go through the proxy. Screenshots of the
//! page (desktop and phone widths) are written under the test's target
//! directory and their paths printed.
//!
//! Needs `chromium` (Debian's package; .ci/run installs it).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const PAGE_PATH: &str = "/console-test-page";

async fn larder_with_origin() -> (Larder, Origin) {
    let origin = start_origin(|request| async move {
        respond(
            200,
            &[("cache-control", "max-age=300")],
            format!("page {}", request.uri().path()),
        )
    })
    .await;
    let yaml = format!(
        "{ADMIN_BLOCK}upstreams:\n  app:\n    servers: [\"{}\"]\nroutes:\n  - upstream: app\n    cache: {{ enabled: true }}\n",
        origin.url()
    );
    (start_larder(&yaml).await, origin)
}

/// The `name=value` of a `Set-Cookie` header, for a `Cookie` header.
fn cookie_of(reply: &Reply) -> String {
    reply
        .header("set-cookie")
        .and_then(|cookie| cookie.split(';').next())
        .expect("a session cookie")
        .to_string()
}

#[tokio::test]
async fn the_console_and_its_data_need_the_token_or_a_signed_in_session() {
    let (larder, origin) = larder_with_origin().await;
    let console = larder.admin_url("/console");
    let data = larder.admin_url("/console/data");

    let page = get(&console).await;
    assert_eq!(page.status, 401);
    assert!(page.text().contains("name=\"token\""), "a sign-in form");
    assert!(!page.text().contains("console/app.js"), "not the console");
    assert_problem(&get(&data).await, 401);

    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let with_token = get_with(&console, &[("authorization", &bearer)]).await;
    assert_eq!(with_token.status, 200);
    assert!(with_token.text().contains("console/app.js"));
    let csp = with_token.header("content-security-policy").unwrap_or("");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");

    let wrong = send(
        "POST",
        &larder.admin_url("/console/login"),
        &[("content-type", "application/x-www-form-urlencoded")],
        "token=guess",
    )
    .await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.header("set-cookie").is_none());

    let signed_in = send(
        "POST",
        &larder.admin_url("/console/login"),
        &[("content-type", "application/x-www-form-urlencoded")],
        format!("token={ADMIN_TOKEN}"),
    )
    .await;
    assert_eq!(signed_in.status, 303);
    assert_eq!(signed_in.header("location"), Some("/console"));
    let set_cookie = signed_in.header("set-cookie").expect("a cookie");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert!(
        !set_cookie.contains(ADMIN_TOKEN),
        "the token is not the cookie"
    );
    let cookie = cookie_of(&signed_in);

    let reply = get_with(&data, &[("cookie", &cookie)]).await;
    assert_eq!(reply.status, 200);
    assert!(reply.json()["cache"]["entries"].is_u64());

    get(&larder.url("/purge-me")).await;
    assert_eq!(origin.hits(), 1);
    let purge_body = format!(r#"{{"url": "{}"}}"#, larder.url("/purge-me"));
    // The cookie alone does not purge: a form on another site could send it.
    let bare = send(
        "POST",
        &larder.admin_url("/purge"),
        &[("cookie", &cookie), ("content-type", "application/json")],
        purge_body.clone(),
    )
    .await;
    assert_problem(&bare, 401);
    let purged = send(
        "POST",
        &larder.admin_url("/purge"),
        &[
            ("cookie", &cookie),
            ("content-type", "application/json"),
            ("x-larder-console", "1"),
        ],
        purge_body,
    )
    .await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    assert_eq!(purged.json()["purged"], 1);

    // A forged or signed-out cookie is refused.
    let forged = format!("larder_console=99999999999.{}", "ab".repeat(32));
    assert_problem(&get_with(&data, &[("cookie", &forged)]).await, 401);
    let signed_out = send("POST", &larder.admin_url("/console/logout"), &[], "").await;
    assert_eq!(signed_out.status, 303);
    assert!(
        signed_out
            .header("set-cookie")
            .is_some_and(|c| c.contains("Max-Age=0"))
    );
    larder.stop().await;
}

/// A headless Chromium with its DevTools endpoint, killed on drop.
struct Chromium {
    child: Child,
    _profile: tempfile::TempDir,
    ws_url: String,
}

impl Chromium {
    fn start() -> Self {
        let binary = ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find(|name| {
                Command::new("sh")
                    .args(["-c", &format!("command -v {name}")])
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|status| status.success())
            })
            .expect("this test needs Chromium: apt-get install chromium");
        let profile = tempfile::tempdir().expect("profile dir");
        let child = Command::new(binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let contents = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file)
                && text.lines().count() >= 2
            {
                break text;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "chromium wrote no DevToolsActivePort within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut lines = contents.lines();
        let port = lines.next().expect("port").trim().to_string();
        let path = lines.next().expect("browser path").trim().to_string();
        Self {
            child,
            _profile: profile,
            ws_url: format!("ws://127.0.0.1:{port}{path}"),
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One page of the browser, driven over the DevTools protocol.
struct Page {
    socket: Socket,
    session: String,
    next_id: u64,
}

impl Page {
    async fn open(browser: &Chromium) -> Self {
        let (socket, _) = tokio_tungstenite::connect_async(browser.ws_url.as_str())
            .await
            .expect("DevTools websocket");
        let mut page = Self {
            socket,
            session: String::new(),
            next_id: 0,
        };
        let target = page
            .call("Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let attached = page
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        page.session = attached["sessionId"]
            .as_str()
            .expect("a session")
            .to_string();
        page.call("Page.enable", json!({})).await;
        page
    }

    /// Sends a command and waits for its answer (events in between are
    /// skipped); panics on a protocol error.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        self.socket
            .send(Message::text(message.to_string()))
            .await
            .expect("send to chromium");
        let answer = tokio::time::timeout(DEADLINE, async {
            loop {
                let frame = self
                    .socket
                    .next()
                    .await
                    .expect("chromium closed the socket")
                    .expect("read from chromium");
                let Message::Text(text) = frame else { continue };
                let value: Value = serde_json::from_str(text.as_str()).expect("JSON from chromium");
                if value["id"] == json!(id) {
                    break value;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no answer to {method}"));
        assert!(answer.get("error").is_none(), "{method}: {answer}");
        answer["result"].clone()
    }

    /// The value of a JavaScript expression in the page.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true }),
            )
            .await;
        result["result"]["value"].clone()
    }

    async fn text_of(&mut self, id: &str) -> String {
        self.eval(&format!(
            "(document.getElementById({id:?}) || {{}}).textContent || ''"
        ))
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    async fn screenshot(&mut self, width: u32, height: u32, mobile: bool, path: &Path) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile }),
        )
        .await;
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("png data"))
            .expect("base64 png");
        std::fs::write(path, png).expect("write screenshot");
        // Straight to the stream, past the test harness's capture: CI's log
        // keeps the path of the artifact.
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "console screenshot: {}", path.display());
    }
}

fn number(text: &str) -> Option<f64> {
    text.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_browser_shows_live_numbers_after_signing_in() {
    let (larder, _origin) = larder_with_origin().await;
    let browser = Chromium::start();
    let mut page = Page::open(&browser).await;
    page.call(
        "Page.navigate",
        json!({ "url": larder.admin_url("/console") }),
    )
    .await;
    // Without a session the browser gets the sign-in form, not the console.
    let mut attempts = 0;
    while page.eval("document.getElementById('token') !== null").await != json!(true) {
        attempts += 1;
        assert!(attempts < 200, "no sign-in form");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        page.text_of("total").await,
        "",
        "no console before signing in"
    );
    page.eval(&format!(
        "document.getElementById('token').value = {ADMIN_TOKEN:?}; document.querySelector('form').submit(); true"
    ))
    .await;

    let before = eventually("the console to show the request total", async || {
        number(&page.text_of("total").await)
    })
    .await;
    for _ in 0..64 {
        let reply = get(&larder.url(PAGE_PATH)).await;
        assert_eq!(reply.status, 200);
    }
    eventually(
        "the console's numbers to move with the requests",
        async || {
            let total = number(&page.text_of("total").await)?;
            let entries = number(&page.text_of("cache-entries").await)?;
            let rps = number(&page.text_of("rps").await)?;
            let urls = page.text_of("urls").await;
            (total >= before + 64.0 && entries >= 1.0 && rps > 0.0 && urls.contains(PAGE_PATH))
                .then_some(())
        },
    )
    .await;
    let hits = page.text_of("cache-table").await;
    assert!(hits.contains("hits"), "{hits}");
    assert!(
        page.eval("document.querySelectorAll('#chart polyline').length")
            .await
            .as_u64()
            .is_some_and(|lines| lines >= 1),
        "the chart draws"
    );

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    page.screenshot(1280, 900, false, &dir.join("console-desktop.png"))
        .await;
    page.screenshot(390, 844, true, &dir.join("console-phone.png"))
        .await;
    // On a phone the page fits its width (no sideways scrolling).
    let overflow = page
        .eval("document.documentElement.scrollWidth <= window.innerWidth + 1")
        .await;
    assert_eq!(overflow, json!(true), "the page is wider than a phone");
    drop(page);
    drop(browser);
    larder.stop().await;
}

/// `larder top` on a pseudo-terminal of 120 columns: what it writes to the
/// terminal, read from the master side.
struct OnTerminal {
    child: Child,
    screen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl OnTerminal {
    fn spawn(args: &[&str]) -> Self {
        use std::os::fd::{FromRawFd, OwnedFd};
        let (mut master, mut slave) = (0, 0);
        let size = libc::winsize {
            ws_row: 40,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two descriptors it opened into the ints.
        let opened = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        assert_eq!(opened, 0, "openpty");
        // SAFETY: both descriptors were just opened for us and are owned once.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let child = Command::new(env!("CARGO_BIN_EXE_larder"))
            .args(args)
            .stdin(Stdio::from(slave.try_clone().expect("dup")))
            .stdout(Stdio::from(slave.try_clone().expect("dup")))
            .stderr(Stdio::from(slave))
            .spawn()
            .expect("spawn larder top");
        let screen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = screen.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut master = std::fs::File::from(master);
            let mut buffer = [0u8; 8192];
            // Ends with EIO once the child has closed its side.
            while let Ok(read) = master.read(&mut buffer) {
                if read == 0 {
                    break;
                }
                if let Ok(mut screen) = sink.lock() {
                    screen.extend_from_slice(&buffer[..read]);
                }
            }
        });
        Self { child, screen }
    }

    fn text(&self) -> String {
        self.screen
            .lock()
            .map(|screen| String::from_utf8_lossy(&screen).into_owned())
            .unwrap_or_default()
    }

    /// The request total on the last frame drawn.
    fn requests_total(&self) -> Option<u64> {
        let text = self.text();
        let at = text.rfind("requests since start ")?;
        text[at + "requests since start ".len()..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    }
}

impl Drop for OnTerminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn larder_top_on_a_terminal_shows_the_numbers_move_and_restores_the_screen() {
    let (larder, _origin) = larder_with_origin().await;
    let admin = larder.admin_addr.expect("admin").to_string();
    let top = OnTerminal::spawn(&["top", "--admin", &admin, "--token", ADMIN_TOKEN]);
    let before = wait_until("top to draw a frame", || top.requests_total()).await;
    let screen = top.text();
    assert!(screen.contains("\x1b[?1049h"), "the alternate screen");
    for heading in ["requests/s", "TOP ROUTES", "UPSTREAM SERVERS", "SOURCES"] {
        assert!(screen.contains(heading), "{heading} missing: {screen}");
    }
    for _ in 0..20 {
        assert_eq!(get(&larder.url(PAGE_PATH)).await.status, 200);
    }
    wait_until("top to show the 20 new requests", || {
        top.requests_total().filter(|total| *total >= before + 20)
    })
    .await;
    let pid = i32::try_from(top.child.id()).expect("pid");
    // SAFETY: signals the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let mut top = top;
    let status = wait_until("top to exit on Ctrl-C", || {
        top.child.try_wait().ok().flatten()
    })
    .await;
    assert!(status.success(), "{status}");
    wait_until("the screen and cursor to be restored", || {
        top.text().ends_with("\x1b[?25h\x1b[?1049l")
    })
    .await;
    larder.stop().await;
}

#[test]
fn larder_top_once_prints_a_plain_frame_or_a_clear_error() {
    let refused = Command::new(env!("CARGO_BIN_EXE_larder"))
        .args(["top", "--once", "--admin", "127.0.0.1:9", "--token", "x"])
        .output()
        .expect("run");
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("cannot connect to the admin API"),
        "{stderr}"
    );
}
