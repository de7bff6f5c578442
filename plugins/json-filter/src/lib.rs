//! `json-filter`: keeps or drops top-level fields of JSON responses (of each
//! object when the body is an array). Meant for the cache-store phase, so the
//! filtering runs once per fill. Config: `keep: "a,b"` or `drop: "c,d"`.
//! Bodies that are not JSON objects or arrays pass through unchanged.
//!
//! `larder:plugin@0.2.0` with std (so WASI): the example of a plugin that
//! keeps std, called on Larder's async path. It declares `response-body`.

use std::cell::RefCell;

use serde_json::Value;

wit_bindgen::generate!({ world: "transformer", path: "../../wit" });

use exports::larder::plugin::transform::{ContinueWith, Guest, Phase, RequestAction};
use larder::plugin::log::log;
use larder::plugin::response;
use larder::plugin::types::{Config, Hooks, LogLevel, PluginError};

enum Filter {
    Keep(Vec<String>),
    Drop(Vec<String>),
}

thread_local! {
    static FILTER: RefCell<Filter> = const { RefCell::new(Filter::Drop(Vec::new())) };
}

fn fields(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(String::from)
        .collect()
}

fn filter_object(value: &mut Value, filter: &Filter) {
    if let Value::Object(map) = value {
        match filter {
            Filter::Keep(keep) => map.retain(|key, _| keep.iter().any(|k| k == key)),
            Filter::Drop(drop) => map.retain(|key, _| !drop.iter().any(|d| d == key)),
        }
    }
}

fn is_json() -> bool {
    response::header("content-type").is_some_and(|value| {
        String::from_utf8_lossy(&value)
            .to_ascii_lowercase()
            .contains("json")
    })
}

struct JsonFilter;

impl Guest for JsonFilter {
    fn init(cfg: Config) -> Result<Hooks, PluginError> {
        let mut filter = None;
        for (key, value) in cfg {
            let next = match key.as_str() {
                "keep" => Filter::Keep(fields(&value)),
                "drop" => Filter::Drop(fields(&value)),
                other => {
                    return Err(PluginError::InvalidConfig(format!(
                        "unknown key `{other}` (expected keep or drop)"
                    )));
                }
            };
            if filter.replace(next).is_some() {
                return Err(PluginError::InvalidConfig(
                    "set either keep or drop, not both".to_string(),
                ));
            }
        }
        let filter =
            filter.ok_or_else(|| PluginError::InvalidConfig("set keep or drop".to_string()))?;
        FILTER.with(|f| *f.borrow_mut() = filter);
        Ok(Hooks::ON_RESPONSE | Hooks::RESPONSE_BODY)
    }

    fn on_request() -> Result<RequestAction, PluginError> {
        Ok(RequestAction::Continue(ContinueWith {
            cache_key_extra: Vec::new(),
        }))
    }

    fn on_response(_phase: Phase) -> Result<(), PluginError> {
        if !is_json() {
            return Ok(());
        }
        let Some(body) = response::body() else {
            return Ok(());
        };
        let mut value: Value = match serde_json::from_slice(&body) {
            Ok(value) => value,
            Err(e) => {
                log(
                    LogLevel::Warn,
                    &format!("body is not valid JSON, left unchanged: {e}"),
                );
                return Ok(());
            }
        };
        FILTER.with(|f| {
            let filter = f.borrow();
            match &mut value {
                Value::Array(items) => items
                    .iter_mut()
                    .for_each(|item| filter_object(item, &filter)),
                object => filter_object(object, &filter),
            }
        });
        let body = serde_json::to_vec(&value).map_err(|e| PluginError::Internal(e.to_string()))?;
        response::set_body(&body)
            .map_err(|e| PluginError::Internal(format!("the new body was refused: {e:?}")))
    }
}

export!(JsonFilter);
