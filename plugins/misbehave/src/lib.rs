//! `misbehave` (test fixture): a transformer that misbehaves on purpose, in
//! the way its config asks, to test how the host copes.
//!
//! Config (all optional, unknown keys and bad numbers are refused):
//! - `do`: what to do (default `ok`):
//!   - `ok`: pass through unchanged;
//!   - `sleep`: sleep `ms` milliseconds (`std::thread::sleep`: a WASI poll on
//!     a monotonic-clock pollable, wall time rather than CPU), then pass through;
//!   - `http-loop`: call a host import in an endless loop. The `transformer`
//!     world imports only `log` (no `http-client`), so this loops on
//!     `log.enabled(trace)`: a guest burning CPU through host calls;
//!   - `header-bomb`: add `count` headers `x-bomb-<i>: x` to the request
//!     (continue) or the response;
//!   - `bad-status`: answer the request directly, or change the response,
//!     with status `status` (any u16, not checked);
//!   - `big-body`: answer the request directly, or replace the response body,
//!     with `mib` MiB of `x`;
//!   - `panic`: panic with `boom: deliberate panic from misbehave` (std
//!     writes it to stderr through WASI: the async path's panic report);
//!   - `framing`: add `content-length: 5`, `transfer-encoding: chunked`,
//!     `connection: close`, `host: evil.example` and `x-framing: 1` to the
//!     request, or set them (replacing any) on the response, body unchanged.
//! - `when`: `request` (default: misbehave in on-request), `response`
//!   (in on-response) or `both`; the other hook passes through.
//! - `ms` (default 5000), `count` (default 25000), `status` (default 101),
//!   `mib` (default 64): the numbers above.
//! - `url` (default `http://127.0.0.1:9/`): accepted for `http-loop` but
//!   unused, as the world has no `http-client` to send it to.

use std::cell::RefCell;
use std::str::FromStr;

wit_bindgen::generate!({ world: "transformer", path: "../../wit/0.1.0" });

use exports::larder::plugin::transform::{
    DirectResponse, Guest, Phase, RequestAction, RequestOut, ResponseOut,
};
use larder::plugin::log::enabled;
use larder::plugin::types::{Config, Headers, LogLevel, PluginError, RequestHead, ResponseHead};

#[derive(Clone, Copy, PartialEq)]
enum Do {
    Ok,
    Sleep,
    HttpLoop,
    HeaderBomb,
    BadStatus,
    BigBody,
    Framing,
    Panic,
}

struct Settings {
    action: Do,
    on_request: bool,
    on_response: bool,
    ms: u64,
    count: usize,
    status: u16,
    mib: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            action: Do::Ok,
            on_request: true,
            on_response: false,
            ms: 5000,
            count: 25000,
            status: 101,
            mib: 64,
        }
    }
}

thread_local! {
    static SETTINGS: RefCell<Settings> = RefCell::new(Settings::default());
}

fn invalid(message: String) -> PluginError {
    PluginError::InvalidConfig(message)
}

fn number<T: FromStr>(key: &str, value: &str) -> Result<T, PluginError> {
    value
        .trim()
        .parse()
        .map_err(|_| invalid(format!("{key}: `{value}` is not a valid number")))
}

const FRAMING: [(&str, &str); 5] = [
    ("content-length", "5"),
    ("transfer-encoding", "chunked"),
    ("connection", "close"),
    ("host", "evil.example"),
    ("x-framing", "1"),
];

fn framing_headers() -> impl Iterator<Item = (String, Vec<u8>)> {
    FRAMING
        .iter()
        .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
}

fn add_bombs(headers: &mut Headers, count: usize) {
    headers.extend((0..count).map(|i| (format!("x-bomb-{i}"), b"x".to_vec())));
}

fn big_body(mib: usize) -> Vec<u8> {
    vec![b'x'; mib << 20]
}

/// The faults that behave the same in both hooks: `sleep` and `http-loop`.
fn stall(settings: &Settings) {
    match settings.action {
        Do::Sleep => std::thread::sleep(std::time::Duration::from_millis(settings.ms)),
        Do::HttpLoop => loop {
            std::hint::black_box(enabled(LogLevel::Trace));
        },
        Do::Panic => panic!("boom: deliberate panic from misbehave"),
        _ => {}
    }
}

struct Misbehave;

impl Guest for Misbehave {
    fn init(cfg: Config) -> Result<(), PluginError> {
        let mut s = Settings::default();
        for (key, value) in cfg {
            match key.as_str() {
                "do" => {
                    s.action = match value.trim() {
                        "ok" => Do::Ok,
                        "sleep" => Do::Sleep,
                        "http-loop" => Do::HttpLoop,
                        "header-bomb" => Do::HeaderBomb,
                        "bad-status" => Do::BadStatus,
                        "big-body" => Do::BigBody,
                        "framing" => Do::Framing,
                        "panic" => Do::Panic,
                        other => {
                            return Err(invalid(format!(
                                "do: `{other}` (expected ok, sleep, http-loop, header-bomb, bad-status, big-body, framing)"
                            )));
                        }
                    }
                }
                "when" => {
                    (s.on_request, s.on_response) = match value.trim() {
                        "request" => (true, false),
                        "response" => (false, true),
                        "both" => (true, true),
                        other => {
                            return Err(invalid(format!(
                                "when: `{other}` (expected request, response, both)"
                            )));
                        }
                    }
                }
                "ms" => s.ms = number(&key, &value)?,
                "count" => s.count = number(&key, &value)?,
                "status" => s.status = number(&key, &value)?,
                "mib" => {
                    s.mib = number(&key, &value)?;
                    if s.mib.checked_mul(1 << 20).is_none() {
                        return Err(invalid(format!("mib: `{value}` is too large")));
                    }
                }
                "url" => {}
                other => {
                    return Err(invalid(format!(
                        "unknown key `{other}` (expected do, when, ms, url, count, status, mib)"
                    )));
                }
            }
        }
        SETTINGS.with(|cell| *cell.borrow_mut() = s);
        Ok(())
    }

    fn on_request(mut req: RequestHead) -> Result<RequestAction, PluginError> {
        SETTINGS.with(|cell| {
            let s = cell.borrow();
            let respond = |status, body| {
                Ok(RequestAction::Respond(DirectResponse {
                    head: ResponseHead {
                        status,
                        headers: Vec::new(),
                    },
                    body,
                }))
            };
            if s.on_request {
                stall(&s);
                match s.action {
                    Do::HeaderBomb => add_bombs(&mut req.headers, s.count),
                    Do::BadStatus => return respond(s.status, Vec::new()),
                    Do::BigBody => return respond(200, big_body(s.mib)),
                    Do::Framing => req.headers.extend(framing_headers()),
                    _ => {}
                }
            }
            Ok(RequestAction::Continue(RequestOut {
                head: req,
                cache_key_extra: Vec::new(),
            }))
        })
    }

    fn on_response(
        _phase: Phase,
        _req: RequestHead,
        mut resp: ResponseHead,
        _body: Option<Vec<u8>>,
    ) -> Result<ResponseOut, PluginError> {
        SETTINGS.with(|cell| {
            let s = cell.borrow();
            let mut body = None;
            if s.on_response {
                stall(&s);
                match s.action {
                    Do::HeaderBomb => add_bombs(&mut resp.headers, s.count),
                    Do::BadStatus => resp.status = s.status,
                    Do::BigBody => body = Some(big_body(s.mib)),
                    Do::Framing => {
                        resp.headers
                            .retain(|(name, _)| !FRAMING.iter().any(|(f, _)| f == name));
                        resp.headers.extend(framing_headers());
                    }
                    _ => {}
                }
            }
            Ok(ResponseOut { head: resp, body })
        })
    }
}

export!(Misbehave);
