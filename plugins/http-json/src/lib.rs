//! `http-json`: a fetcher that GETs config `url` through the host's
//! http-client and keeps the part of the JSON named by `pointer` (an RFC 6901
//! JSON pointer, e.g. `/data/items`; default: the whole document). Sends
//! If-None-Match with the previous ETag, and answers not-modified when the
//! origin says 304 or the value is the same as the one already served.
//! `url` may be set on the plugin or on each source (`plugin.config`).

use std::cell::RefCell;

use serde_json::Value;

wit_bindgen::generate!({ world: "fetcher", path: "../../wit/0.1.0" });

use exports::larder::plugin::fetch::{FetchContext, FetchResult, Guest};
use larder::plugin::http_client::{HttpError, OutgoingRequest, send};
use larder::plugin::log::log;
use larder::plugin::types::{Config, LogLevel, PluginError};

#[derive(Default)]
struct Settings {
    url: String,
    pointer: String,
}

thread_local! {
    static SETTINGS: RefCell<Settings> = RefCell::new(Settings::default());
}

fn describe(error: HttpError) -> String {
    match error {
        HttpError::Denied(why) => format!("denied: {why}"),
        HttpError::Timeout => "timed out".to_string(),
        HttpError::TooLarge => "response too large".to_string(),
        HttpError::Connection(why) => format!("connection: {why}"),
        HttpError::InvalidRequest(why) => format!("invalid request: {why}"),
        HttpError::TooManyRequests => "too many requests in one run".to_string(),
    }
}

struct HttpJson;

impl Guest for HttpJson {
    fn init(cfg: Config) -> Result<(), PluginError> {
        let mut settings = Settings::default();
        for (key, value) in cfg {
            match key.as_str() {
                "url" => settings.url = value,
                "pointer" => settings.pointer = value,
                other => {
                    return Err(PluginError::InvalidConfig(format!(
                        "unknown key `{other}` (expected url, pointer)"
                    )));
                }
            }
        }
        if !settings.pointer.is_empty() && !settings.pointer.starts_with('/') {
            return Err(PluginError::InvalidConfig(format!(
                "pointer `{}` must start with /",
                settings.pointer
            )));
        }
        SETTINGS.with(|s| *s.borrow_mut() = settings);
        Ok(())
    }

    fn run(ctx: FetchContext) -> Result<FetchResult, PluginError> {
        let (url, pointer) = SETTINGS.with(|s| {
            let s = s.borrow();
            (s.url.clone(), s.pointer.clone())
        });
        // `url` may come from the source's `plugin.config`, so the load-time
        // probe (plugin config only) cannot insist on it; a run can.
        if url.is_empty() {
            return Err(PluginError::InvalidConfig("url is required".to_string()));
        }
        let mut headers = vec![("accept".to_string(), b"application/json".to_vec())];
        if let Some(etag) = &ctx.previous_etag {
            headers.push(("if-none-match".to_string(), etag.clone().into_bytes()));
        }
        let response = send(&OutgoingRequest {
            method: "GET".to_string(),
            url: url.clone(),
            headers,
            body: None,
            timeout_ms: None,
        })
        .map_err(|e| PluginError::Upstream(format!("GET {url}: {}", describe(e))))?;
        if response.status == 304 {
            return Ok(FetchResult::NotModified);
        }
        if response.status != 200 {
            return Err(PluginError::Upstream(format!(
                "GET {url}: status {}",
                response.status
            )));
        }
        let document: Value = serde_json::from_slice(&response.body)
            .map_err(|e| PluginError::Upstream(format!("GET {url}: not JSON: {e}")))?;
        let picked = document
            .pointer(&pointer)
            .ok_or_else(|| PluginError::Upstream(format!("GET {url}: no value at {pointer}")))?;
        let body = serde_json::to_vec(picked).map_err(|e| PluginError::Internal(e.to_string()))?;
        if larder::plugin::cache::get(&ctx.source_id).is_some_and(|previous| previous.body == body)
        {
            log(
                LogLevel::Debug,
                &format!("{}: value unchanged", ctx.source_id),
            );
            return Ok(FetchResult::NotModified);
        }
        Ok(FetchResult::Updated((
            vec![("content-type".to_string(), b"application/json".to_vec())],
            body,
        )))
    }
}

export!(HttpJson);
