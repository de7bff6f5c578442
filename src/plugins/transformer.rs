//! Transformer calls: converting between `http` types and the WIT records,
//! running `on-request` / `on-response` in an instance (fresh per call, or
//! pooled with `reuse: true`), and checking what the guest handed back.
//!
//! Must not let a guest's malformed or oversized answer through: invalid
//! methods, paths, header names, statuses that are not final, more than
//! [`MAX_HEADERS`] headers or [`MAX_HEADER_BYTES`] of them, a body over
//! [`super::MAX_BODY_BYTES`] are a plugin failure. Framing and
//! connection-level fields a guest sets are not its to set: the host
//! restores them (see `keep_connection_fields`).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};

use super::bindings::transformer::exports::larder::plugin::transform::{
    DirectResponse, Phase, RequestAction, RequestOut, ResponseOut,
};
use super::bindings::transformer::larder::plugin::types::{RequestHead, ResponseHead};
use super::bindings::transformer_sync::exports::larder::plugin::transform as sync;
use super::call::{Failure, FailureKind, Turn, settle};
use super::engine::PluginEngine;
use super::instances::ParkedInstances;
use super::loader::{
    Kind, LoadedPlugin, TransformerBindings, TransformerInstance, instantiate_transformer,
};
use super::store::{CallStyle, CpuMeter, start_call};
use crate::config::PluginPhase;
use crate::http::body::{self, Body};

type WitHeaders = Vec<(String, Vec<u8>)>;

/// Most header fields a plugin may hand back (hyper accepts 100 from a
/// client; responses often carry more).
pub const MAX_HEADERS: usize = 500;
/// Most bytes of header names and values a plugin may hand back.
pub const MAX_HEADER_BYTES: usize = 256 * 1024;

/// Fields that describe the connection or the message's framing rather
/// than the content: a guest's edits to them are undone (requests) or
/// dropped (responses), and the host frames the message itself.
pub const CONNECTION_FIELDS: [http::header::HeaderName; 9] = [
    http::header::CONNECTION,
    http::header::CONTENT_LENGTH,
    http::header::HOST,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
];
/// Hop-by-hop fields with no constant in `http`.
const OTHER_CONNECTION_FIELDS: [&str; 2] = ["keep-alive", "proxy-connection"];

/// Puts back `before`'s values of the connection and framing fields into
/// `after` (a guest's headers), removing any the guest added.
pub fn keep_connection_fields(before: &HeaderMap, after: &mut HeaderMap) {
    let names = CONNECTION_FIELDS.iter().cloned().chain(
        OTHER_CONNECTION_FIELDS
            .iter()
            .map(|name| http::header::HeaderName::from_static(name)),
    );
    for name in names {
        after.remove(&name);
        for value in before.get_all(&name) {
            after.append(name.clone(), value.clone());
        }
    }
}

/// What `on-request` decided, checked and converted. `None` fields are
/// unchanged: most plugins hand most of the request back as they got it,
/// and re-parsing it would cost more than the comparison.
pub enum RequestEdit {
    Continue {
        method: Option<Method>,
        path_and_query: Option<http::uri::PathAndQuery>,
        headers: Option<HeaderMap>,
        cache_key_extra: Vec<String>,
    },
    Respond(Response<Body>),
}

/// What `on-response` returned, checked and converted.
pub struct ResponseEdit {
    pub status: StatusCode,
    /// `None`: the headers came back unchanged.
    pub headers: Option<HeaderMap>,
    /// `None`: the body is unchanged.
    pub body: Option<Bytes>,
}

pub fn wit_phase(phase: PluginPhase) -> Phase {
    match phase {
        PluginPhase::Downstream => Phase::DownstreamResponse,
        PluginPhase::CacheStore => Phase::CacheStore,
    }
}

fn sync_phase(phase: Phase) -> sync::Phase {
    match phase {
        Phase::DownstreamResponse => sync::Phase::DownstreamResponse,
        Phase::CacheStore => sync::Phase::CacheStore,
    }
}

/// The sync bindings' answer as the async bindings' type (the records are
/// the same WIT; only the generated Rust types differ). Moves, no copies.
fn from_sync_action(action: sync::RequestAction) -> RequestAction {
    match action {
        sync::RequestAction::Continue(out) => RequestAction::Continue(RequestOut {
            head: out.head,
            cache_key_extra: out.cache_key_extra,
        }),
        sync::RequestAction::Respond(direct) => RequestAction::Respond(DirectResponse {
            head: direct.head,
            body: direct.body,
        }),
    }
}

fn from_sync_response(out: sync::ResponseOut) -> ResponseOut {
    ResponseOut {
        head: out.head,
        body: out.body,
    }
}

fn to_wit_headers(headers: &HeaderMap) -> WitHeaders {
    headers
        .iter()
        .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec()))
        .collect()
}

fn from_wit_headers(headers: WitHeaders) -> Result<HeaderMap, Failure> {
    if headers.len() > MAX_HEADERS {
        return Err(bad_output(format!(
            "{} headers (at most {MAX_HEADERS})",
            headers.len()
        )));
    }
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    if bytes > MAX_HEADER_BYTES {
        return Err(bad_output(format!(
            "{bytes} bytes of headers (at most {MAX_HEADER_BYTES})"
        )));
    }
    let mut map = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| bad_output(format!("invalid header name `{name}`")))?;
        let value = HeaderValue::from_bytes(&value)
            .map_err(|_| bad_output(format!("invalid value for header `{name}`")))?;
        map.append(header, value);
    }
    Ok(map)
}

/// A guest's answer that is not a valid request or response.
fn bad_output(why: String) -> Failure {
    Failure::new(FailureKind::BadOutput, why)
}

/// A final status (200-599): an informational one (101 above all) would
/// make the client expect another message or a protocol switch.
fn final_status(code: u16) -> Result<StatusCode, Failure> {
    match StatusCode::from_u16(code) {
        Ok(status) if (200..=599).contains(&code) => Ok(status),
        _ => Err(bad_output(format!(
            "status {code} is not a final status (200-599)"
        ))),
    }
}

fn check_body_size(length: usize) -> Result<(), Failure> {
    if length > super::MAX_BODY_BYTES {
        return Err(bad_output(format!(
            "a body of {length} bytes (at most {})",
            super::MAX_BODY_BYTES
        )));
    }
    Ok(())
}

pub fn request_head(request: &http::request::Parts) -> RequestHead {
    let authority = request
        .uri
        .authority()
        .map(|authority| authority.as_str().to_string())
        .or_else(|| {
            request
                .headers
                .get(http::header::HOST)
                .and_then(|host| host.to_str().ok())
                .map(str::to_string)
        });
    RequestHead {
        method: request.method.as_str().to_string(),
        path_with_query: request
            .uri
            .path_and_query()
            .map_or("/", |path| path.as_str())
            .to_string(),
        authority,
        headers: to_wit_headers(&request.headers),
    }
}

pub fn response_head(response: &http::response::Parts) -> ResponseHead {
    ResponseHead {
        status: response.status.as_u16(),
        headers: to_wit_headers(&response.headers),
    }
}

fn check_request_action(
    action: RequestAction,
    given: &RequestHead,
) -> Result<RequestEdit, Failure> {
    match action {
        RequestAction::Continue(out) => {
            let method = if out.head.method == given.method {
                None
            } else {
                Some(
                    Method::from_bytes(out.head.method.as_bytes())
                        .map_err(|_| bad_output(format!("invalid method `{}`", out.head.method)))?,
                )
            };
            let path_and_query = if out.head.path_with_query == given.path_with_query {
                None
            } else if !out.head.path_with_query.starts_with('/') {
                return Err(bad_output(format!(
                    "path `{}` does not start with /",
                    out.head.path_with_query
                )));
            } else {
                Some(out.head.path_with_query.parse().map_err(|_| {
                    bad_output(format!("invalid path `{}`", out.head.path_with_query))
                })?)
            };
            let headers = if out.head.headers == given.headers {
                None
            } else {
                Some(from_wit_headers(out.head.headers)?)
            };
            Ok(RequestEdit::Continue {
                method,
                path_and_query,
                headers,
                cache_key_extra: out.cache_key_extra,
            })
        }
        RequestAction::Respond(direct) => {
            let status = final_status(direct.head.status)?;
            check_body_size(direct.body.len())?;
            let mut headers = from_wit_headers(direct.head.headers)?;
            keep_connection_fields(&HeaderMap::new(), &mut headers);
            headers.insert(
                http::header::CONTENT_LENGTH,
                HeaderValue::from(direct.body.len()),
            );
            let mut response = Response::new(body::full(direct.body));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            Ok(RequestEdit::Respond(response))
        }
    }
}

fn check_response_out(out: ResponseOut, given: &ResponseHead) -> Result<ResponseEdit, Failure> {
    let status = final_status(out.head.status)?;
    if let Some(body) = &out.body {
        check_body_size(body.len())?;
    }
    let headers = if out.head.headers == given.headers {
        None
    } else {
        Some(from_wit_headers(out.head.headers)?)
    };
    Ok(ResponseEdit {
        status,
        headers,
        body: out.body.map(Bytes::from),
    })
}

async fn checkout(
    engine: &PluginEngine,
    plugin: &LoadedPlugin,
    parked: Option<&mut ParkedInstances>,
    turn: &Turn,
    cpu: Arc<CpuMeter>,
) -> Result<TransformerInstance, Failure> {
    let Kind::Transformer(link) = &plugin.kind else {
        return Err(Failure::new(FailureKind::Error, "not a transformer"));
    };
    let kept = parked
        .and_then(|parked| parked.take(plugin))
        .or_else(|| plugin.take_idle());
    if let Some(mut instance) = kept {
        start_call(&mut instance.store, cpu);
        return Ok(instance);
    }
    plugin.count_instance();
    instantiate_transformer(engine, plugin, link, turn, cpu).await
}

/// Runs `call` metered by `cpu`. An async guest also gets the outer
/// deadline (its host calls may wait); a sync one returns within its CPU
/// budget by construction, so it is spared the timer.
async fn metered<T>(
    plugin: &LoadedPlugin,
    cpu: &CpuMeter,
    call: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    if plugin.kind.call_style() == CallStyle::Sync {
        return cpu.run(call).await;
    }
    let limit = plugin.backstop();
    tokio::time::timeout(limit, cpu.run(call))
        .await
        .unwrap_or_else(|_| Err(Failure::timed_out(limit)))
}

/// One `on-request` call in `turn`, for a downstream-phase plugin (the only
/// kind that has one). A fresh instance is parked afterwards for the same
/// request's `on-response`.
pub async fn on_request(
    engine: &PluginEngine,
    plugin: &Arc<LoadedPlugin>,
    head: &RequestHead,
    parked: &mut ParkedInstances,
    turn: Turn,
) -> Result<RequestEdit, Failure> {
    let cpu = plugin.cpu_meter();
    let call = async {
        let mut instance = checkout(engine, plugin, None, &turn, cpu.clone()).await?;
        let store = &mut instance.store;
        let result = match &instance.bindings {
            TransformerBindings::Async(guest) => {
                guest
                    .larder_plugin_transform()
                    .call_on_request(&mut *store, head)
                    .await
            }
            TransformerBindings::Sync(guest) => guest
                .larder_plugin_transform()
                .call_on_request(&mut *store, head)
                .map(|answer| answer.map(from_sync_action)),
        };
        let action = settle(result, &instance.store, "on-request")?;
        if plugin.config.reuse {
            plugin.put_idle(instance);
        } else {
            parked.park(engine, plugin, instance);
        }
        check_request_action(action, head)
    };
    metered(plugin, &cpu, call).await
}

/// One `on-response` call in `turn` with the whole body, on the instance
/// the request's `on-request` parked if there is one.
#[allow(clippy::too_many_arguments)]
pub async fn on_response(
    engine: &PluginEngine,
    plugin: &LoadedPlugin,
    phase: Phase,
    request: &RequestHead,
    response: &ResponseHead,
    body: &[u8],
    parked: Option<&mut ParkedInstances>,
    turn: Turn,
) -> Result<ResponseEdit, Failure> {
    let cpu = plugin.cpu_meter();
    let call = async {
        let mut instance = checkout(engine, plugin, parked, &turn, cpu.clone()).await?;
        let store = &mut instance.store;
        let result = match &instance.bindings {
            TransformerBindings::Async(guest) => {
                guest
                    .larder_plugin_transform()
                    .call_on_response(&mut *store, phase, request, response, Some(body))
                    .await
            }
            TransformerBindings::Sync(guest) => guest
                .larder_plugin_transform()
                .call_on_response(
                    &mut *store,
                    sync_phase(phase),
                    request,
                    response,
                    Some(body),
                )
                .map(|answer| answer.map(from_sync_response)),
        };
        let out = settle(result, &instance.store, "on-response")?;
        plugin.put_idle(instance);
        check_response_out(out, response)
    };
    metered(plugin, &cpu, call).await
}
