//! Transformer calls: converting between `http` types and the WIT records,
//! running `on-request` / `on-response` in an instance (fresh per call, or
//! pooled with `reuse: true`), and checking what the guest handed back.
//!
//! Must not let a guest's malformed answer through: invalid methods,
//! paths, header names or statuses are a plugin failure.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};

use super::bindings::transformer::exports::larder::plugin::transform::{
    Phase, RequestAction, ResponseOut,
};
use super::bindings::transformer::larder::plugin::types::{RequestHead, ResponseHead};
use super::call::{Failure, FailureKind, permit, settle};
use super::engine::PluginEngine;
use super::instances::ParkedInstances;
use super::loader::{Kind, LoadedPlugin, TransformerInstance, instantiate_transformer};
use super::store::start_call;
use crate::config::PluginPhase;
use crate::http::body::{self, Body};

type WitHeaders = Vec<(String, Vec<u8>)>;

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

fn to_wit_headers(headers: &HeaderMap) -> WitHeaders {
    headers
        .iter()
        .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec()))
        .collect()
}

fn from_wit_headers(headers: WitHeaders) -> Result<HeaderMap, Failure> {
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
    Failure::new(FailureKind::Error, why)
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
            let status = StatusCode::from_u16(direct.head.status)
                .map_err(|_| bad_output(format!("invalid status {}", direct.head.status)))?;
            let mut headers = from_wit_headers(direct.head.headers)?;
            headers.remove(http::header::TRANSFER_ENCODING);
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
    let status = StatusCode::from_u16(out.head.status)
        .map_err(|_| bad_output(format!("invalid status {}", out.head.status)))?;
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
) -> Result<TransformerInstance, Failure> {
    let Kind::Transformer(pre) = &plugin.kind else {
        return Err(Failure::new(FailureKind::Error, "not a transformer"));
    };
    let kept = parked
        .and_then(|parked| parked.take(plugin))
        .or_else(|| plugin.take_idle());
    if let Some(mut instance) = kept {
        start_call(&mut instance.store);
        return Ok(instance);
    }
    plugin.count_instance();
    instantiate_transformer(engine, plugin, pre).await
}

/// One `on-request` call, for a downstream-phase plugin (the only kind that
/// has one). A fresh instance is parked afterwards for the
/// same request's `on-response`.
pub async fn on_request(
    engine: &PluginEngine,
    plugin: &Arc<LoadedPlugin>,
    head: &RequestHead,
    parked: &mut ParkedInstances,
) -> Result<RequestEdit, Failure> {
    let _permit = permit(engine).await?;
    let limit = plugin.backstop();
    let call = async {
        let mut instance = checkout(engine, plugin, None).await?;
        let result = instance
            .bindings
            .larder_plugin_transform()
            .call_on_request(&mut instance.store, head)
            .await;
        let action = settle(result, &instance.store, "on-request")?;
        if plugin.config.reuse {
            plugin.put_idle(instance);
        } else {
            parked.park(engine, plugin, instance);
        }
        check_request_action(action, head)
    };
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or_else(|_| Err(Failure::timed_out(limit)))
}

/// One `on-response` call with the whole body, on the instance the
/// request's `on-request` parked if there is one.
pub async fn on_response(
    engine: &PluginEngine,
    plugin: &LoadedPlugin,
    phase: Phase,
    request: &RequestHead,
    response: &ResponseHead,
    body: &[u8],
    parked: Option<&mut ParkedInstances>,
) -> Result<ResponseEdit, Failure> {
    let _permit = permit(engine).await?;
    let limit = plugin.backstop();
    let call = async {
        let mut instance = checkout(engine, plugin, parked).await?;
        let result = instance
            .bindings
            .larder_plugin_transform()
            .call_on_response(&mut instance.store, phase, request, response, Some(body))
            .await;
        let out = settle(result, &instance.store, "on-response")?;
        plugin.put_idle(instance);
        check_response_out(out, response)
    };
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or_else(|_| Err(Failure::timed_out(limit)))
}
