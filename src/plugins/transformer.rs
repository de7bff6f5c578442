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
    Phase, RequestAction, ResponseOut,
};
use super::bindings::transformer::larder::plugin::types::{RequestHead, ResponseHead};
use super::bindings::transformer_v2::exports::larder::plugin::transform as v2;
use super::bindings::transformer_v2_async::exports::larder::plugin::transform as v2_async;
use super::call::{Failure, FailureKind, Turn, settle};
use super::engine::PluginEngine;
use super::exchange::{
    CONNECTION_FIELDS, Exchange, MAX_HEADER_BYTES, MAX_HEADERS, OTHER_CONNECTION_FIELDS,
    ResponseView,
};
use super::instances::ParkedInstances;
use super::loader::{
    Kind, LoadedPlugin, TransformerBindings, TransformerInstance, guest_error_v2,
    instantiate_transformer,
};
use super::store::{CallStyle, CpuMeter, start_call};
use crate::config::PluginPhase;
use crate::http::body::{self, Body};

type WitHeaders = Vec<(String, Vec<u8>)>;

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

fn phase_v2(phase: Phase) -> v2::Phase {
    match phase {
        Phase::DownstreamResponse => v2::Phase::DownstreamResponse,
        Phase::CacheStore => v2::Phase::CacheStore,
    }
}

fn phase_v2_async(phase: Phase) -> v2_async::Phase {
    match phase {
        Phase::DownstreamResponse => v2_async::Phase::DownstreamResponse,
        Phase::CacheStore => v2_async::Phase::CacheStore,
    }
}

/// A 0.2.0 `request-action`, whichever bindings produced it.
enum ActionV2 {
    Continue(Vec<String>),
    Respond {
        status: u16,
        headers: WitHeaders,
        body: Vec<u8>,
    },
}

impl From<v2::RequestAction> for ActionV2 {
    fn from(action: v2::RequestAction) -> Self {
        match action {
            v2::RequestAction::Continue(with) => Self::Continue(with.cache_key_extra),
            v2::RequestAction::Respond(direct) => Self::Respond {
                status: direct.status,
                headers: direct.headers,
                body: direct.body,
            },
        }
    }
}

impl From<v2_async::RequestAction> for ActionV2 {
    fn from(action: v2_async::RequestAction) -> Self {
        match action {
            v2_async::RequestAction::Continue(with) => Self::Continue(with.cache_key_extra),
            v2_async::RequestAction::Respond(direct) => Self::Respond {
                status: direct.status,
                headers: direct.headers,
                body: direct.body,
            },
        }
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
    RequestHead {
        method: request.method.as_str().to_string(),
        path_with_query: super::exchange::path_with_query(request).to_string(),
        authority: super::exchange::authority(request),
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
            direct_response(direct.head.status, direct.head.headers, direct.body)
        }
    }
}

/// A plugin's direct answer, checked like any output of a guest.
fn direct_response(
    status: u16,
    headers: WitHeaders,
    body: Vec<u8>,
) -> Result<RequestEdit, Failure> {
    let status = final_status(status)?;
    check_body_size(body.len())?;
    let mut headers = from_wit_headers(headers)?;
    keep_connection_fields(&HeaderMap::new(), &mut headers);
    headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    let mut response = Response::new(body::full(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(RequestEdit::Respond(response))
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
    // Boxed: instantiation's future is large, and every call's future would
    // carry (and move) it even when the instance is reused or parked.
    let (instance, _declared) =
        Box::pin(instantiate_transformer(engine, plugin, link, turn, cpu)).await?;
    // What this instance's init declared is not used: the load-time
    // declaration decides which hooks run, for every instance alike.
    Ok(instance)
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

/// One `on-request` call in `turn`, for a downstream-phase plugin that has
/// the hook. A 0.1.0 plugin gets the head as a record and hands back edits;
/// a 0.2.0 plugin edits `request` in place through host calls (undone if
/// the call fails). A fresh instance is parked afterwards for the same
/// request's `on-response`, if the plugin has that hook too.
pub async fn on_request(
    engine: &PluginEngine,
    plugin: &Arc<LoadedPlugin>,
    request: &mut http::request::Parts,
    parked: &mut ParkedInstances,
    turn: Turn,
) -> Result<RequestEdit, Failure> {
    let cpu = plugin.cpu_meter();
    let call = async {
        let mut instance = checkout(engine, plugin, None, &turn, cpu.clone()).await?;
        let edit = match &instance.bindings {
            TransformerBindings::V1(guest) => {
                let head = request_head(request);
                // Boxed, like every async guest call here: the sync path's
                // future should not carry (and move) the async one's state.
                let result = Box::pin(
                    guest
                        .larder_plugin_transform()
                        .call_on_request(&mut instance.store, &head),
                )
                .await;
                let action = settle(result, &instance.store, "on-request")?;
                check_request_action(action, &head)?
            }
            TransformerBindings::Async(guest) => {
                let store = &mut instance.store;
                store.data_mut().exchange = Exchange::for_request(take_request(request));
                let result = Box::pin(guest.larder_plugin_transform().call_on_request(&mut *store))
                    .await
                    .map(|r| r.map(ActionV2::from).map_err(guest_error_v2));
                finish_request_v2(result, store, request)?
            }
            TransformerBindings::Sync(guest) => {
                let store = &mut instance.store;
                store.data_mut().exchange = Exchange::for_request(take_request(request));
                let result = guest
                    .larder_plugin_transform()
                    .call_on_request(&mut *store)
                    .map(|r| r.map(ActionV2::from).map_err(guest_error_v2));
                finish_request_v2(result, store, request)?
            }
        };
        if plugin.config.reuse {
            plugin.put_idle(instance);
        } else if plugin.hooks.on_response {
            parked.park(engine, plugin, instance);
        }
        Ok(edit)
    };
    metered(plugin, &cpu, call).await
}

/// Moves the request out for a 0.2.0 call (it goes back after).
fn take_request(request: &mut http::request::Parts) -> http::request::Parts {
    let (empty, ()) = http::Request::new(()).into_parts();
    std::mem::replace(request, empty)
}

fn take_response(response: &mut http::response::Parts) -> http::response::Parts {
    let (empty, ()) = Response::new(()).into_parts();
    std::mem::replace(response, empty)
}

/// Takes the request back from the store (as it was, if the call failed)
/// and turns the guest's answer into an edit.
fn finish_request_v2(
    result: wasmtime::Result<Result<ActionV2, super::bindings::GuestError>>,
    store: &mut wasmtime::Store<super::store::StoreState>,
    request: &mut http::request::Parts,
) -> Result<RequestEdit, Failure> {
    let mut exchange = std::mem::take(&mut store.data_mut().exchange);
    let settled = settle(result, store, "on-request");
    if settled.is_err() {
        exchange.undo();
    }
    if let Some(super::exchange::RequestView::Editable(parts)) = exchange.request.take() {
        *request = parts;
    }
    match settled? {
        ActionV2::Continue(cache_key_extra) => Ok(RequestEdit::Continue {
            method: None,
            path_and_query: None,
            headers: None,
            cache_key_extra,
        }),
        ActionV2::Respond {
            status,
            headers,
            body,
        } => direct_response(status, headers, body),
    }
}

/// What one `on-response` call is given.
pub struct ResponseCall<'a> {
    pub phase: Phase,
    /// The request as a 0.1.0 record (built once per chain, if needed).
    pub request_v1: Option<&'a RequestHead>,
    /// The request for 0.2.0 plugins that declared `request-in-response`.
    pub request_v2: Option<&'a Arc<http::request::Parts>>,
    /// The collected body, when some plugin of the chain needs it.
    pub body: Option<&'a Bytes>,
}

/// One `on-response` call in `turn`, on the instance the request's
/// `on-request` parked if there is one. The status and headers are changed
/// in `response` (left alone if the call fails); a new body comes back.
pub async fn on_response(
    engine: &PluginEngine,
    plugin: &LoadedPlugin,
    given: &ResponseCall<'_>,
    response: &mut http::response::Parts,
    parked: Option<&mut ParkedInstances>,
    turn: Turn,
) -> Result<Option<Bytes>, Failure> {
    let cpu = plugin.cpu_meter();
    let call = async {
        let mut instance = checkout(engine, plugin, parked, &turn, cpu.clone()).await?;
        let new_body = match &instance.bindings {
            TransformerBindings::V1(guest) => {
                let (Some(request), Some(body)) = (given.request_v1, given.body) else {
                    return Err(Failure::new(
                        FailureKind::Error,
                        "a 0.1.0 plugin needs the request and the body",
                    ));
                };
                let head = response_head(response);
                // Boxed, like every async guest call here: the sync path's
                // future should not carry (and move) the async one's state.
                let result = Box::pin(guest.larder_plugin_transform().call_on_response(
                    &mut instance.store,
                    given.phase,
                    request,
                    &head,
                    Some(body),
                ))
                .await;
                let out = settle(result, &instance.store, "on-response")?;
                let edit = check_response_out(out, &head)?;
                apply_v1_edit(&plugin.name, edit, response)
            }
            TransformerBindings::Async(guest) => {
                let store = &mut instance.store;
                store.data_mut().exchange = response_exchange(plugin, given, response);
                let result = Box::pin(
                    guest
                        .larder_plugin_transform()
                        .call_on_response(&mut *store, phase_v2_async(given.phase)),
                )
                .await
                .map(|r| r.map_err(guest_error_v2));
                finish_response_v2(&plugin.name, result, store, response)?
            }
            TransformerBindings::Sync(guest) => {
                let store = &mut instance.store;
                store.data_mut().exchange = response_exchange(plugin, given, response);
                let result = guest
                    .larder_plugin_transform()
                    .call_on_response(&mut *store, phase_v2(given.phase))
                    .map(|r| r.map_err(guest_error_v2));
                finish_response_v2(&plugin.name, result, store, response)?
            }
        };
        plugin.put_idle(instance);
        Ok(new_body)
    };
    metered(plugin, &cpu, call).await
}

fn response_exchange(
    plugin: &LoadedPlugin,
    given: &ResponseCall<'_>,
    response: &mut http::response::Parts,
) -> Exchange {
    let body = given.body.filter(|_| plugin.hooks.response_body).cloned();
    let request = given
        .request_v2
        .filter(|_| plugin.hooks.request_in_response)
        .cloned();
    Exchange::for_response(ResponseView::new(take_response(response), body), request)
}

fn finish_response_v2(
    plugin: &str,
    result: wasmtime::Result<Result<(), super::bindings::GuestError>>,
    store: &mut wasmtime::Store<super::store::StoreState>,
    response: &mut http::response::Parts,
) -> Result<Option<Bytes>, Failure> {
    let mut exchange = std::mem::take(&mut store.data_mut().exchange);
    let settled = settle(result, store, "on-response");
    if settled.is_err() {
        exchange.undo();
    }
    // Cache-Control is parsed only when a body came back, which most
    // response hooks never do.
    let body_set = exchange
        .response
        .as_ref()
        .is_some_and(|view| view.new_body.is_some());
    let no_transform = body_set && exchange.forbids_transform();
    let Some(mut view) = exchange.response.take() else {
        return Err(Failure::new(
            FailureKind::Error,
            "the response went missing",
        ));
    };
    view.apply_cache_settings();
    *response = view.parts;
    settled?;
    Ok(match view.new_body {
        Some(_) if no_transform => {
            ignored_body(plugin);
            None
        }
        new_body => new_body,
    })
}

fn ignored_body(plugin: &str) {
    tracing::debug!(
        plugin,
        "body change ignored: the response says Cache-Control: no-transform"
    );
}

/// Applies a checked 0.1.0 answer to the response; returns the new body.
fn apply_v1_edit(
    plugin: &str,
    edit: ResponseEdit,
    response: &mut http::response::Parts,
) -> Option<Bytes> {
    // Read from the headers the upstream (or an earlier plugin) gave, so a
    // plugin cannot lift it for itself; parsed only when a body came back,
    // which most response hooks never do.
    let no_transform =
        edit.body.is_some() && crate::http::cache_control::forbids_transform(&response.headers);
    response.status = edit.status;
    if let Some(mut headers) = edit.headers {
        // Framing is recomputed by the caller; connection fields are not
        // the plugin's to add.
        keep_connection_fields(&response.headers, &mut headers);
        response.headers = headers;
    }
    if no_transform {
        ignored_body(plugin);
        return None;
    }
    edit.body
}
