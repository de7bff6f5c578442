//! `add-headers`: sets and removes headers on responses (and requests).
//!
//! Config (all optional, unknown keys are refused):
//! - `set`: `"name: value; name2: value2"`, response headers to set (replacing)
//! - `remove`: `"server, x-powered-by"`, response headers to remove
//! - `request_set` / `request_remove`: the same for the request, before the upstream
//! - `cache_key_from`: a request header whose value becomes an extra cache-key part
//! - `copy_from_request`: request headers whose values the response gets too
//!   (`"x-request-id, x-trace-id"`; read in on-response, so the plugin
//!   declares `request-in-response`)
//! - `count_in`: a response header that gets how many responses this
//!   instance has handled (`1` on every response from a fresh instance):
//!   shows whether requests share an instance's state
//! - `ttl` (seconds) and `tags` (`"news sport"`): the stored entry's lifetime
//!   and purge tags, through `response.set-ttl` / `response.add-tags`
//!   (meant for `phase: cache_store`)
//!
//! In the cache-store phase, `set: "cache-control: s-maxage=60"` sets the
//! cached entry's TTL and `set: "surrogate-key: news"` tags it.
//!
//! Built on the `larder-plugin` SDK: no std, no WASI, Larder's fast path.
#![no_std]

extern crate alloc;

use alloc::format;
use alloc::string::{String, ToString as _};
use alloc::vec;
use alloc::vec::Vec;

use larder_plugin::Global;
use larder_plugin::transformer::{
    Config, ContinueWith, EditError, Guest, Hooks, Phase, PluginError, RequestAction, request,
    response,
};

#[derive(Default)]
struct Settings {
    set: Vec<(String, String)>,
    remove: Vec<String>,
    request_set: Vec<(String, String)>,
    request_remove: Vec<String>,
    cache_key_from: Option<String>,
    copy_from_request: Vec<String>,
    count_in: Option<String>,
    ttl: Option<u32>,
    tags: Vec<String>,
}

/// Responses this instance has handled (for `count_in`).
static RESPONSES: Global<u32> = Global::new(0);

static SETTINGS: Global<Settings> = Global::new(Settings {
    set: Vec::new(),
    remove: Vec::new(),
    request_set: Vec::new(),
    request_remove: Vec::new(),
    cache_key_from: None,
    copy_from_request: Vec::new(),
    count_in: None,
    ttl: None,
    tags: Vec::new(),
});

fn parse_pairs(key: &str, text: &str) -> Result<Vec<(String, String)>, PluginError> {
    let mut pairs = Vec::new();
    for item in text
        .split(';')
        .map(str::trim)
        .filter(|item| !item.is_empty())
    {
        let Some((name, value)) = item.split_once(':') else {
            return Err(PluginError::InvalidConfig(format!(
                "{key}: `{item}` is not `name: value`"
            )));
        };
        let name = valid_name(key, name)?;
        pairs.push((name, value.trim().to_string()));
    }
    Ok(pairs)
}

fn parse_names(key: &str, text: &str) -> Result<Vec<String>, PluginError> {
    text.split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| valid_name(key, name))
        .collect()
}

fn valid_name(key: &str, name: &str) -> Result<String, PluginError> {
    let name = name.trim().to_ascii_lowercase();
    let is_token = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if is_token {
        Ok(name)
    } else {
        Err(PluginError::InvalidConfig(format!(
            "{key}: `{name}` is not a valid header name"
        )))
    }
}

/// The header calls of one side (request or response).
struct Side {
    set: fn(&str, &[u8]) -> Result<(), EditError>,
    remove: fn(&str) -> Result<(), EditError>,
}

const REQUEST: Side = Side {
    set: request::set_header,
    remove: request::remove_header,
};
const RESPONSE: Side = Side {
    set: response::set_header,
    remove: response::remove_header,
};

/// Names were checked at init; a refusal (a framing field) is the host's
/// rule and leaves that field alone.
fn apply(side: &Side, set: &[(String, String)], remove: &[String]) -> Result<(), PluginError> {
    for name in remove {
        (side.remove)(name).map_err(|error| refused(name, error))?;
    }
    for (name, value) in set {
        (side.set)(name, value.as_bytes()).map_err(|error| refused(name, error))?;
    }
    Ok(())
}

fn refused(name: &str, error: EditError) -> PluginError {
    PluginError::Internal(format!("the host refused to change `{name}`: {error:?}"))
}

struct AddHeaders;

impl Guest for AddHeaders {
    fn init(cfg: Config) -> Result<Hooks, PluginError> {
        let mut settings = Settings::default();
        for (key, value) in cfg {
            match key.as_str() {
                "set" => settings.set = parse_pairs(&key, &value)?,
                "remove" => settings.remove = parse_names(&key, &value)?,
                "request_set" => settings.request_set = parse_pairs(&key, &value)?,
                "request_remove" => settings.request_remove = parse_names(&key, &value)?,
                "cache_key_from" => settings.cache_key_from = Some(valid_name(&key, &value)?),
                "copy_from_request" => settings.copy_from_request = parse_names(&key, &value)?,
                "count_in" => settings.count_in = Some(valid_name(&key, &value)?),
                "ttl" => {
                    settings.ttl = Some(value.trim().parse().map_err(|_| {
                        PluginError::InvalidConfig(format!(
                            "ttl: `{value}` is not a number of seconds"
                        ))
                    })?)
                }
                "tags" => settings.tags = value.split_whitespace().map(String::from).collect(),
                other => {
                    return Err(PluginError::InvalidConfig(format!(
                        "unknown key `{other}` (expected set, remove, request_set, request_remove, cache_key_from, copy_from_request, count_in, ttl, tags)"
                    )));
                }
            }
        }
        // Only the hooks this config needs: a response-only config costs
        // no on-request call (and no instance kept between the two).
        let mut hooks = Hooks::empty();
        if !settings.request_set.is_empty()
            || !settings.request_remove.is_empty()
            || settings.cache_key_from.is_some()
        {
            hooks |= Hooks::ON_REQUEST;
        }
        if !settings.set.is_empty()
            || !settings.remove.is_empty()
            || settings.count_in.is_some()
            || settings.ttl.is_some()
            || !settings.tags.is_empty()
        {
            hooks |= Hooks::ON_RESPONSE;
        }
        if !settings.copy_from_request.is_empty() {
            hooks |= Hooks::ON_RESPONSE | Hooks::REQUEST_IN_RESPONSE;
        }
        SETTINGS.set(settings);
        Ok(hooks)
    }

    fn on_request() -> Result<RequestAction, PluginError> {
        SETTINGS.with(|settings| {
            let cache_key_extra = settings
                .cache_key_from
                .as_ref()
                .and_then(|wanted| request::header(wanted))
                .map(|value| vec![String::from_utf8_lossy(&value).into_owned()])
                .unwrap_or_default();
            apply(&REQUEST, &settings.request_set, &settings.request_remove)?;
            Ok(RequestAction::Continue(ContinueWith { cache_key_extra }))
        })
    }

    fn on_response(_phase: Phase) -> Result<(), PluginError> {
        SETTINGS.with(|settings| {
            apply(&RESPONSE, &settings.set, &settings.remove)?;
            for name in &settings.copy_from_request {
                if let Some(value) = request::header(name) {
                    response::set_header(name, &value).map_err(|error| refused(name, error))?;
                }
            }
            if let Some(name) = &settings.count_in {
                let handled = RESPONSES.with_mut(|count| {
                    *count += 1;
                    *count
                });
                response::set_header(name, format!("{handled}").as_bytes())
                    .map_err(|error| refused(name, error))?;
            }
            if let Some(ttl) = settings.ttl {
                response::set_ttl(ttl).map_err(|error| refused("cache-control", error))?;
            }
            if !settings.tags.is_empty() {
                response::add_tags(&settings.tags)
                    .map_err(|error| refused("surrogate-key", error))?;
            }
            Ok(())
        })
    }
}

larder_plugin::export_transformer!(AddHeaders);
