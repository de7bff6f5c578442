//! `larder top`: the console's live view in a terminal (as varnishstat or
//! htop), for hosts without a browser. It reads the admin API's
//! `/console/data` with the token every two seconds and draws one screen;
//! `--once` prints a single plain frame (for scripts and logs).
//!
//! Must not hold anything of the proxy: it is a client of the admin API
//! like any other, and works against a Larder on another host.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// How often the screen is drawn again.
const REFRESH: Duration = Duration::from_secs(2);

/// Where the admin API is and how to sign in.
pub struct Target {
    pub admin: SocketAddr,
    pub token: Option<String>,
}

/// One GET of `/console/data`.
pub async fn fetch(target: &Target) -> Result<Value, String> {
    let addr = target.admin;
    let request = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to the admin API at {addr}: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        tokio::spawn(connection);
        let mut request =
            http::Request::get("/console/data").header(http::header::HOST, addr.to_string());
        if let Some(token) = &target.token {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{addr}: {e}"))?
            .to_bytes();
        match status.as_u16() {
            200 => serde_json::from_slice(&body).map_err(|e| format!("{addr}: not JSON: {e}")),
            401 => Err("the admin API refused the token (give --token or LARDER_ADMIN_TOKEN, or -c with admin.token)".to_string()),
            403 => Err("the admin API has no admin.token configured; the console and top need one".to_string()),
            other => Err(format!("{addr}/console/data answered {other}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(5), request)
        .await
        .map_err(|_| format!("no answer from {addr} within 5 s"))?
}

/// Draws until Ctrl-C (or SIGTERM), on the alternate screen like htop.
pub async fn run(target: Target, once: bool) -> Result<(), String> {
    if once {
        let data = fetch(&target).await?;
        print!("{}", frame(&data, &target, terminal_width()));
        return Ok(());
    }
    let mut stdout = std::io::stdout();
    // Alternate screen, cursor hidden; put back on the way out.
    let _ = write!(stdout, "\x1b[?1049h\x1b[?25l");
    let _ = stdout.flush();
    let outcome = draw_until_stopped(&target).await;
    let _ = write!(stdout, "\x1b[?25h\x1b[?1049l");
    let _ = stdout.flush();
    outcome
}

async fn draw_until_stopped(target: &Target) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut every = tokio::time::interval(REFRESH);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
        }
        let screen = match fetch(target).await {
            Ok(data) => frame(&data, target, terminal_width()),
            Err(why) => format!("larder top: {why}\n(retrying every {REFRESH:?}; Ctrl-C quits)\n"),
        };
        let mut stdout = std::io::stdout().lock();
        // Home, each line cleared to its end, the rest of the screen cleared.
        let mut out = String::from("\x1b[H");
        for line in screen.lines() {
            out.push_str(line);
            out.push_str("\x1b[K\r\n");
        }
        out.push_str("\x1b[J");
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
    }
}

/// The terminal's width in columns (80 when it cannot be told).
fn terminal_width() -> usize {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into the struct it is given.
    let known = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    if known && size.ws_col >= 40 {
        usize::from(size.ws_col)
    } else {
        80
    }
}

fn number(value: &Value) -> String {
    match value {
        Value::Number(n) => n
            .as_f64()
            .map(|n| {
                if n.fract() == 0.0 {
                    format!("{n:.0}")
                } else {
                    format!("{n:.1}")
                }
            })
            .unwrap_or_else(|| n.to_string()),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

fn bytes(n: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut n, mut unit) = (n, 0);
    while n >= 1024.0 && unit < units.len() - 1 {
        n /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n:.0} B")
    } else {
        format!("{n:.1} {}", units[unit])
    }
}

/// Requests per second over the last minutes as one line of block glyphs.
fn sparkline(series: &[Value], width: usize) -> String {
    const GLYPHS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let rates: Vec<f64> = series
        .iter()
        .map(|point| point["rps"].as_f64().unwrap_or(0.0))
        .collect();
    let shown = &rates[rates.len().saturating_sub(width)..];
    let peak = shown.iter().copied().fold(0.0_f64, f64::max);
    shown
        .iter()
        .map(|rate| {
            if peak <= 0.0 {
                GLYPHS[0]
            } else {
                let level = (rate / peak * 7.0).round().clamp(0.0, 7.0) as usize;
                GLYPHS[level]
            }
        })
        .collect()
}

/// Cuts `text` to `width` characters.
fn fit(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

/// One screen of `data`.
pub fn frame(data: &Value, target: &Target, width: usize) -> String {
    let mut out = String::new();
    let series = data["series"].as_array().cloned().unwrap_or_default();
    let last = series.last().cloned().unwrap_or(Value::Null);
    let hit_ratio = series
        .iter()
        .rev()
        .find_map(|point| point["hit_ratio"].as_f64())
        .map_or("-".to_string(), |ratio| format!("{:.1}%", ratio * 100.0));
    let cache = &data["cache"];
    let _ = writeln!(
        out,
        "Larder at {} · {} · Ctrl-C quits",
        target.admin,
        chrono::Local::now().format("%H:%M:%S")
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "requests/s {:>9}   from cache {:>7}   requests since start {}",
        number(&last["rps"]),
        hit_ratio,
        number(&data["requests_total"])
    );
    let _ = writeln!(
        out,
        "cache      {:>9}   entries {:>10}   waiting on a fill {}",
        bytes(cache["bytes"].as_f64().unwrap_or(0.0)),
        number(&cache["entries"]),
        number(&cache["waiting"])
    );
    let spark_width = width.saturating_sub(16).max(10);
    let _ = writeln!(out, "last 5 min {}", sparkline(&series, spark_width));
    let stats = &cache["stats"];
    let requests = &stats["requests"];
    let stale = &stats["stale_served"];
    let _ = writeln!(
        out,
        "hits {}  misses {}  revalidated {}  bypass {}  coalesced {}  stale: swr {} error {} max-stale {} unreachable {}",
        number(&requests["hit"]),
        number(&requests["miss"]),
        number(&requests["revalidate"]),
        number(&requests["bypass"]),
        number(&stats["coalesced"]),
        number(&stale["swr"]),
        number(&stale["error"]),
        number(&stale["max-stale"]),
        number(&stale["disconnected"])
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "TOP ROUTES (last minute)           req/s      total");
    for route in data["routes"].as_array().into_iter().flatten().take(5) {
        let _ = writeln!(
            out,
            "  {:<32} {:>6} {:>10}",
            fit(route["route"].as_str().unwrap_or("-"), 32),
            number(&route["rps"]),
            number(&route["total"])
        );
    }
    let url_width = width.saturating_sub(14).max(20);
    let _ = writeln!(out, "TOP URLS (since start, sampled)");
    for url in data["urls"].as_array().into_iter().flatten().take(5) {
        let _ = writeln!(
            out,
            "  {:<url_width$} ≈{}",
            fit(url["url"].as_str().unwrap_or("-"), url_width),
            number(&url["requests"])
        );
    }
    let _ = writeln!(out, "UPSTREAM SERVERS");
    for (name, upstream) in data["upstreams"].as_object().into_iter().flatten() {
        for server in upstream["servers"].as_array().into_iter().flatten() {
            let state = if server["skipped"].as_bool() == Some(true) {
                "EJECTED"
            } else if server["healthy"].as_bool() == Some(false) {
                "UNHEALTHY"
            } else {
                "healthy"
            };
            let _ = writeln!(
                out,
                "  {:<12} {:<28} {:<10} in flight {}",
                fit(name, 12),
                fit(server["server"].as_str().unwrap_or("-"), 28),
                state,
                number(&server["in_flight"])
            );
        }
    }
    let _ = writeln!(out, "SOURCES");
    for source in data["sources"]["sources"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<16} last success {:<26} runs {:>6}  errors {}",
            fit(source["name"].as_str().unwrap_or("-"), 16),
            source["last_success"].as_str().unwrap_or("never"),
            number(&source["runs"]),
            number(&source["failures"])
        );
    }
    let _ = writeln!(out, "PLUGINS");
    for (name, plugin) in data["plugins"]["plugins"].as_object().into_iter().flatten() {
        let p99 = data["plugin_p99_ms"][name]
            .as_f64()
            .map_or("-".to_string(), |ms| format!("{ms} ms"));
        let breaker = if plugin["circuit_open"].as_bool() == Some(true) {
            "OPEN"
        } else {
            "closed"
        };
        let _ = writeln!(
            out,
            "  {:<16} calls {:>8}  failures {:>5}  p99 {:>9}  breaker {}",
            fit(name, 16),
            number(&plugin["invocations"]),
            number(&plugin["failures"]),
            p99,
            breaker
        );
    }
    if let Some(shared) = data["shared"].as_object() {
        let _ = writeln!(
            out,
            "SHARED TIER  Redis {}  purges waiting {}",
            shared.get("state").and_then(Value::as_str).unwrap_or("-"),
            shared.get("purge_pending").map_or("-".to_string(), number)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_shows_the_numbers_and_fits_long_urls() {
        let data = serde_json::json!({
            "series": [{"t": 1.0, "rps": 10.0, "hit_ratio": 0.5}, {"t": 3.0, "rps": 40.0, "hit_ratio": 0.75}],
            "requests_total": 1234,
            "cache": {"bytes": 2048, "entries": 3, "waiting": 0, "stats": {"requests": {"hit": 9}, "stale_served": {}}},
            "routes": [{"route": "/", "rps": 40.0, "total": 1234}],
            "urls": [{"url": format!("h/{}", "x".repeat(300)), "requests": 800}],
            "upstreams": {"app": {"servers": [{"server": "10.0.0.1:80", "healthy": false, "skipped": false, "in_flight": 2}]}},
            "sources": {"sources": []},
            "plugins": {"plugins": {}},
            "shared": null,
        });
        let target = Target {
            admin: SocketAddr::from(([127, 0, 0, 1], 9901)),
            token: None,
        };
        let frame = frame(&data, &target, 80);
        assert!(frame.contains("requests/s        40"), "{frame}");
        assert!(frame.contains("75.0%"), "{frame}");
        assert!(frame.contains("2.0 KiB"), "{frame}");
        assert!(frame.contains("UNHEALTHY"), "{frame}");
        assert!(frame.contains("▃█"), "{frame}");
        assert!(
            frame.lines().all(|line| line.chars().count() <= 120),
            "{frame}"
        );
    }
}
