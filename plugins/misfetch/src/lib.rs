//! `misfetch` (test fixture): a fetcher that misbehaves on purpose, in the
//! way its config asks, to test how the host copes.
//!
//! Config (all optional, unknown keys, values and bad numbers are refused):
//! - `do`: what `run` does (default `ok`):
//!   - `ok`: returns updated with body `ok` and `content-type: text/plain`;
//!   - `http-loop`: calls `http-client.send` (GET `url`) in an endless loop,
//!     ignoring every result and error. The host caps the calls per run, so
//!     after a few each fails with `too-many-requests` at once: a guest
//!     burning CPU through host calls. Never returns;
//!   - `http-n`: calls `http-client.send` (GET `url`) `count` times; the
//!     first error fails the run with `upstream` naming the call and the
//!     error (`too-many-requests`, `too-large`, ...), else the value is
//!     `<count> calls, last body <n> bytes`;
//!   - `spin`: loops forever on pure computation (a `black_box` counter);
//!   - `sleep`: sleeps `ms` milliseconds (`std::thread::sleep`: wall time
//!     rather than CPU), then returns like `ok`.
//! - `url` (default `http://127.0.0.1:9/`): the URL `http-loop` sends to.
//! - `ms` (default 5000): how long `sleep` sleeps.
//! - `count` (default 1): how many calls `http-n` makes.

use std::cell::RefCell;
use std::hint::black_box;
use std::time::Duration;

wit_bindgen::generate!({ world: "fetcher", path: "../../wit/0.1.0" });

use exports::larder::plugin::fetch::{FetchContext, FetchResult, Guest};
use larder::plugin::http_client::{HttpError, OutgoingRequest, send};
use larder::plugin::types::{Config, PluginError};

#[derive(Clone, Copy, PartialEq)]
enum Do {
    Ok,
    HttpLoop,
    HttpN,
    Spin,
    Sleep,
}

struct Settings {
    action: Do,
    url: String,
    ms: u64,
    count: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            action: Do::Ok,
            url: "http://127.0.0.1:9/".to_string(),
            ms: 5000,
            count: 1,
        }
    }
}

thread_local! {
    static SETTINGS: RefCell<Settings> = RefCell::new(Settings::default());
}

fn invalid(message: String) -> PluginError {
    PluginError::InvalidConfig(message)
}

fn ok() -> Result<FetchResult, PluginError> {
    Ok(FetchResult::Updated((
        vec![("content-type".to_string(), b"text/plain".to_vec())],
        b"ok".to_vec(),
    )))
}

fn describe(error: &HttpError) -> String {
    match error {
        HttpError::Denied(why) => format!("denied: {why}"),
        HttpError::Timeout => "timeout".to_string(),
        HttpError::TooLarge => "too-large".to_string(),
        HttpError::Connection(why) => format!("connection: {why}"),
        HttpError::InvalidRequest(why) => format!("invalid-request: {why}"),
        HttpError::TooManyRequests => "too-many-requests".to_string(),
    }
}

struct Misfetch;

impl Guest for Misfetch {
    fn init(cfg: Config) -> Result<(), PluginError> {
        let mut s = Settings::default();
        for (key, value) in cfg {
            match key.as_str() {
                "do" => {
                    s.action = match value.trim() {
                        "ok" => Do::Ok,
                        "http-loop" => Do::HttpLoop,
                        "http-n" => Do::HttpN,
                        "spin" => Do::Spin,
                        "sleep" => Do::Sleep,
                        other => {
                            return Err(invalid(format!(
                                "do: `{other}` (expected ok, http-loop, http-n, spin, sleep)"
                            )));
                        }
                    }
                }
                "url" => s.url = value,
                "ms" => {
                    s.ms = value
                        .trim()
                        .parse()
                        .map_err(|_| invalid(format!("ms: `{value}` is not a valid number")))?
                }
                "count" => {
                    s.count = value
                        .trim()
                        .parse()
                        .map_err(|_| invalid(format!("count: `{value}` is not a valid number")))?
                }
                other => {
                    return Err(invalid(format!(
                        "unknown key `{other}` (expected do, url, ms, count)"
                    )));
                }
            }
        }
        SETTINGS.with(|cell| *cell.borrow_mut() = s);
        Ok(())
    }

    fn run(_ctx: FetchContext) -> Result<FetchResult, PluginError> {
        let (action, url, ms, count) = SETTINGS.with(|cell| {
            let s = cell.borrow();
            (s.action, s.url.clone(), s.ms, s.count)
        });
        let request = OutgoingRequest {
            method: "GET".to_string(),
            url,
            headers: Vec::new(),
            body: None,
            timeout_ms: None,
        };
        match action {
            Do::Ok => ok(),
            Do::HttpN => {
                let mut last_body = 0;
                for call in 1..=count {
                    let response = send(&request).map_err(|error| {
                        PluginError::Upstream(format!("call {call}: {}", describe(&error)))
                    })?;
                    last_body = response.body.len();
                }
                Ok(FetchResult::Updated((
                    vec![("content-type".to_string(), b"text/plain".to_vec())],
                    format!("{count} calls, last body {last_body} bytes").into_bytes(),
                )))
            }
            Do::HttpLoop => loop {
                let _ = black_box(send(&request));
            },
            Do::Spin => {
                let mut counter: u64 = 0;
                loop {
                    counter = black_box(counter.wrapping_add(1));
                }
            }
            Do::Sleep => {
                std::thread::sleep(Duration::from_millis(ms));
                ok()
            }
        }
    }
}

export!(Misfetch);
