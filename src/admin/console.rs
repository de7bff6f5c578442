//! The console: `/console`, a page for a person (served from here, no
//! external assets), its sign-in form and session cookie, `/console/data`
//! (the JSON the page polls), and the history its chart draws, sampled
//! every two seconds off the request path.
//!
//! The session cookie is `expiry.HMAC-SHA256(token digest, expiry)`: no
//! server state, valid until it expires or the token changes. It is
//! HttpOnly and SameSite=Strict, and a request that changes something with
//! it (a purge) must also carry `X-Larder-Console: 1`, which a form on
//! another site cannot send.
//!
//! Must not count anything itself: it reads the cache's stats, the metrics
//! exposition and the traffic sketch.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use crate::cache::Cache;
use crate::http::body::{self, Body};

/// The session cookie's name.
pub const COOKIE: &str = "larder_console";

/// The header a cookie-authenticated change must carry.
pub const CONSOLE_HEADER: &str = "x-larder-console";

/// How long a sign-in lasts.
const SESSION: Duration = Duration::from_secs(12 * 3600);

/// How often the history takes a point, and how many it keeps (5 minutes).
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
const KEEP: usize = 150;

const PAGE: &str = include_str!("console.html");
const SCRIPT: &str = include_str!("console.js");

/// What the page may load and do: its own script and data, nothing else;
/// never framed (clickjacking on the purge form).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// One point of the history: counters as they stood at `at`.
#[derive(Debug, Clone)]
struct Point {
    at: f64,
    requests: f64,
    from_cache: u64,
    cacheable: u64,
    routes: BTreeMap<String, f64>,
}

/// The last five minutes of request and cache counters.
pub struct History {
    points: Mutex<VecDeque<Point>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl History {
    /// Starts sampling `cache`'s counters and the request counters; stops
    /// when the history is dropped.
    pub fn start(cache: Arc<Cache>) -> Arc<Self> {
        let history = Arc::new(Self {
            points: Mutex::new(VecDeque::with_capacity(KEEP)),
            task: Mutex::new(None),
        });
        let weak = Arc::downgrade(&history);
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(SAMPLE_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(history) = weak.upgrade() else {
                    return;
                };
                history.push(sample(&cache));
            }
        });
        *history.task.lock() = Some(task);
        history
    }

    fn push(&self, point: Point) {
        let mut points = self.points.lock();
        if points.len() == KEEP {
            points.pop_front();
        }
        points.push_back(point);
    }

    /// Requests per second and the share served from the cache, per interval.
    fn series(&self) -> Vec<serde_json::Value> {
        let points = self.points.lock();
        points
            .iter()
            .zip(points.iter().skip(1))
            .map(|(before, after)| {
                let seconds = (after.at - before.at).max(0.001);
                let cacheable = after.cacheable.saturating_sub(before.cacheable);
                let from_cache = after.from_cache.saturating_sub(before.from_cache);
                serde_json::json!({
                    "t": after.at,
                    "rps": ((after.requests - before.requests).max(0.0) / seconds * 10.0).round() / 10.0,
                    "hit_ratio": (cacheable > 0).then(|| from_cache as f64 / cacheable as f64),
                })
            })
            .collect()
    }

    /// Each route's requests per second over the last minute and its total
    /// since start, busiest first.
    fn routes(&self) -> Vec<serde_json::Value> {
        let points = self.points.lock();
        let Some(last) = points.back() else {
            return Vec::new();
        };
        let minute_ago = points
            .iter()
            .find(|point| point.at >= last.at - 60.0)
            .unwrap_or(last);
        let seconds = (last.at - minute_ago.at).max(1.0);
        let mut routes: Vec<(String, f64, f64)> = last
            .routes
            .iter()
            .map(|(route, total)| {
                let before = minute_ago.routes.get(route).copied().unwrap_or(0.0);
                (route.clone(), (total - before).max(0.0) / seconds, *total)
            })
            .collect();
        routes.sort_by(|a, b| b.1.total_cmp(&a.1).then(b.2.total_cmp(&a.2)));
        routes
            .into_iter()
            .take(10)
            .map(|(route, rps, total)| {
                serde_json::json!({ "route": route, "rps": (rps * 10.0).round() / 10.0, "total": total })
            })
            .collect()
    }
}

impl Drop for History {
    fn drop(&mut self) {
        if let Some(task) = self.task.get_mut().take() {
            task.abort();
        }
    }
}

fn sample(cache: &Cache) -> Point {
    let mut requests = 0.0;
    let mut routes = BTreeMap::new();
    for sample in crate::telemetry::samples("larder_requests_total") {
        requests += sample.value;
        let route = sample.label("route").unwrap_or("none").to_string();
        *routes.entry(route).or_insert(0.0) += sample.value;
    }
    let stats = cache.stats();
    let count = |label: &str| stats["requests"][label].as_u64().unwrap_or(0);
    let from_cache = count("hit") + count("stale");
    Point {
        at: unix_now(),
        requests,
        from_cache,
        cacheable: from_cache + count("miss") + count("revalidate") + count("error"),
        routes,
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

/// Each plugin's 99th-percentile call time (ms), from its histogram's
/// buckets: the smallest bucket bound at or above 99% of the calls.
pub fn plugin_p99_ms() -> BTreeMap<String, f64> {
    let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for sample in crate::telemetry::samples("larder_plugin_duration_seconds_bucket") {
        let (Some(plugin), Some(le)) = (sample.label("plugin"), sample.label("le")) else {
            continue;
        };
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::INFINITY)
        };
        buckets
            .entry(plugin.to_string())
            .or_default()
            .push((bound, sample.value));
    }
    buckets
        .into_iter()
        .filter_map(|(plugin, mut bounds)| {
            bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
            let total = bounds.last()?.1;
            if total <= 0.0 {
                return None;
            }
            let p99 = bounds
                .iter()
                .find(|(_, count)| *count >= total * 0.99)
                .map(|(bound, _)| *bound)?;
            p99.is_finite().then_some((plugin, p99 * 1000.0))
        })
        .collect()
}

/// The data the page shows besides what `Admin` adds from its own parts.
pub fn history_json(history: &History) -> serde_json::Value {
    serde_json::json!({
        "series": history.series(),
        "routes": history.routes(),
        "urls": crate::traffic::top(10)
            .into_iter()
            .map(|(url, requests)| serde_json::json!({ "url": url, "requests": requests }))
            .collect::<Vec<_>>(),
        "plugin_p99_ms": plugin_p99_ms(),
    })
}

/// HMAC-SHA256 (RFC 2104) of `message` under `key`.
fn hmac(key: &[u8; 32], message: &[u8]) -> [u8; 32] {
    let mut inner_key = [0x36u8; 64];
    let mut outer_key = [0x5cu8; 64];
    for (i, byte) in key.iter().enumerate() {
        inner_key[i] ^= byte;
        outer_key[i] ^= byte;
    }
    let inner = Sha256::new()
        .chain_update(inner_key)
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(outer_key)
        .chain_update(inner)
        .finalize()
        .into()
}

/// A `Set-Cookie` value for a session that lasts [`SESSION`] from `now`.
pub fn session_cookie(key: &[u8; 32], now: SystemTime) -> String {
    let expiry = now
        .checked_add(SESSION)
        .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |since| since.as_secs());
    let mac = hmac(key, expiry.to_string().as_bytes());
    format!(
        "{COOKIE}={expiry}.{}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        hex::encode(mac),
        SESSION.as_secs()
    )
}

/// A `Set-Cookie` value that ends the session.
pub fn cleared_cookie() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// Whether the request's cookies hold a session signed with `key` that
/// has not expired at `now`.
pub fn has_session(headers: &http::HeaderMap, key: &[u8; 32], now: SystemTime) -> bool {
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(u64::MAX, |since| since.as_secs());
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .any(|session| {
            let Some((expiry, mac)) = session.split_once('.') else {
                return false;
            };
            let (Ok(expiry_secs), Ok(mac)) = (expiry.parse::<u64>(), hex::decode(mac)) else {
                return false;
            };
            let Ok(mac) = <[u8; 32]>::try_from(mac) else {
                return false;
            };
            let expected = hmac(key, expiry.as_bytes());
            let same = expected
                .iter()
                .zip(&mac)
                .fold(0u8, |acc, (x, y)| acc | (x ^ y))
                == 0;
            same && expiry_secs > now
        })
}

fn html(status: StatusCode, text: String) -> Response<Body> {
    let mut response = Response::new(body::full(text));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// The console page (the caller checked the session or token).
pub fn page() -> Response<Body> {
    html(StatusCode::OK, PAGE.to_string())
}

/// The page's script (no secrets in it: served to anyone).
pub fn script() -> Response<Body> {
    let mut response = Response::new(body::full(SCRIPT));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// The sign-in form, with a note when the last try failed or no token is
/// configured.
pub fn sign_in(status: StatusCode, note: &str) -> Response<Body> {
    let note = if note.is_empty() {
        String::new()
    } else {
        format!(r#"<p class="note">{note}</p>"#)
    };
    html(
        status,
        format!(
            r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Larder console: sign in</title>
<style>body{{font:16px system-ui,sans-serif;margin:0;display:grid;place-items:center;min-height:100vh;background:#f4f4f2;color:#222}}
form{{background:#fff;padding:2em;border-radius:8px;box-shadow:0 1px 4px #0002;max-width:22em;width:90%}}
input{{font:inherit;width:100%;box-sizing:border-box;padding:.5em;margin:.5em 0 1em}}button{{font:inherit;padding:.5em 1.2em}}
.note{{color:#a40000}}</style></head>
<body><form method="post" action="/console/login"><h1>Larder console</h1>{note}
<label for="token">Admin token (<code>admin.token</code>)</label>
<input id="token" name="token" type="password" autocomplete="current-password" autofocus required>
<button type="submit">Sign in</button></form></body></html>
"#
        ),
    )
}

/// After a good sign-in: to the console, with the session cookie.
pub fn signed_in(key: &[u8; 32]) -> Response<Body> {
    redirect_with_cookie(session_cookie(key, SystemTime::now()))
}

/// After signing out: back to the form, the cookie cleared.
pub fn signed_out() -> Response<Body> {
    redirect_with_cookie(cleared_cookie())
}

fn redirect_with_cookie(cookie: String) -> Response<Body> {
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::SEE_OTHER;
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, HeaderValue::from_static("/console"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(cookie) = HeaderValue::try_from(cookie) {
        headers.insert(header::SET_COOKIE, cookie);
    }
    response
}

/// The token from a sign-in form body (`token=...`, URL-encoded).
pub fn token_from_form(body: &[u8]) -> Option<String> {
    url::form_urlencoded::parse(body)
        .find(|(name, _)| name == "token")
        .map(|(_, value)| value.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cookie_header(set_cookie: &str) -> http::HeaderMap {
        let pair = set_cookie.split(';').next().unwrap_or_default();
        let mut headers = http::HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("other=1; {pair}")).expect("ascii"),
        );
        headers
    }

    #[test]
    fn a_session_holds_until_it_expires_and_only_under_its_key() {
        let key = [7u8; 32];
        let now = SystemTime::now();
        let headers = cookie_header(&session_cookie(&key, now));
        assert!(has_session(&headers, &key, now));
        assert!(!has_session(&headers, &[8u8; 32], now));
        assert!(!has_session(
            &headers,
            &key,
            now + SESSION + Duration::from_secs(1)
        ));
        let forged = cookie_header(&format!("{COOKIE}=99999999999.{}", "00".repeat(32)));
        assert!(!has_session(&forged, &key, now));
        assert!(!has_session(&http::HeaderMap::new(), &key, now));
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2_shape() {
        // RFC 4231 test case 2 uses a 4-byte key; ours are 32 bytes, so
        // check the construction against a key padded the same way HMAC does.
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        let mac = hmac(&key, b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn the_form_token_is_url_decoded() {
        assert_eq!(
            token_from_form(b"token=a%2Bb+c&x=1").as_deref(),
            Some("a+b c")
        );
        assert_eq!(token_from_form(b"x=1"), None);
    }
}
