//! `json-filter`: keeps or drops top-level fields of JSON responses (of each
//! object when the body is an array). Meant for the cache-store phase, so the
//! filtering runs once per fill. Config: `keep: "a,b"` or `drop: "c,d"`.
//! Bodies that are not JSON objects or arrays pass through unchanged.

use std::cell::RefCell;

use serde_json::Value;

wit_bindgen::generate!({ world: "transformer", path: "../../wit" });

use exports::larder::plugin::transform::{Guest, Phase, RequestAction, RequestOut, ResponseOut};
use larder::plugin::log::log;
use larder::plugin::types::{Config, LogLevel, PluginError, RequestHead, ResponseHead};

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

fn is_json(resp: &ResponseHead) -> bool {
    resp.headers.iter().any(|(name, value)| {
        name == "content-type"
            && String::from_utf8_lossy(value)
                .to_ascii_lowercase()
                .contains("json")
    })
}

struct JsonFilter;

impl Guest for JsonFilter {
    fn init(cfg: Config) -> Result<(), PluginError> {
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
        Ok(())
    }

    fn on_request(req: RequestHead) -> Result<RequestAction, PluginError> {
        Ok(RequestAction::Continue(RequestOut {
            head: req,
            cache_key_extra: Vec::new(),
        }))
    }

    fn on_response(
        _phase: Phase,
        _req: RequestHead,
        resp: ResponseHead,
        body: Option<Vec<u8>>,
    ) -> Result<ResponseOut, PluginError> {
        let Some(body) = body.filter(|_| is_json(&resp)) else {
            return Ok(ResponseOut {
                head: resp,
                body: None,
            });
        };
        let mut value: Value = match serde_json::from_slice(&body) {
            Ok(value) => value,
            Err(e) => {
                log(
                    LogLevel::Warn,
                    &format!("body is not valid JSON, left unchanged: {e}"),
                );
                return Ok(ResponseOut {
                    head: resp,
                    body: None,
                });
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
        Ok(ResponseOut {
            head: resp,
            body: Some(body),
        })
    }
}

export!(JsonFilter);
