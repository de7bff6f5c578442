//! Larder's own HTTP helpers, below every other module: the body type, the
//! client-facing error and its one mapping to problem+json, hop-by-hop
//! rules, `Cache-Control` parsing, the request-head copy and the one TLS
//! trust policy for outbound connections.
//!
//! Must not depend on any other module of Larder. (Inside the crate,
//! `crate::http` is this module; a bare `http::` path is the `http` crate.)

pub mod body;
pub mod cache_control;
pub mod error;
pub mod hop_by_hop;
pub mod tls;

use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode};

use body::Body;

/// A copy of a request head without its extensions: for plugins that read
/// the head after the request went upstream, for a fill's request, and for
/// a request sent a second time.
pub fn copy_head(head: &Parts) -> Parts {
    let (mut copy, ()) = Request::new(()).into_parts();
    copy.method = head.method.clone();
    copy.uri = head.uri.clone();
    copy.version = head.version;
    copy.headers = head.headers.clone();
    copy
}

/// A head with `head`'s method and nothing else (an empty URI, no fields):
/// for a later phase that needs only the method, without copying the rest.
pub fn method_only(head: &Parts) -> Parts {
    let (mut copy, ()) = Request::new(()).into_parts();
    copy.method = head.method.clone();
    copy.version = head.version;
    copy
}

/// The declared `Content-Length`, if it is one valid number.
/// Removes every field named in `names` from `headers`. Walks the fields
/// the message has (a handful) and compares names, rather than hashing
/// every name of the list: most requests carry none of them, and then
/// nothing is hashed at all.
pub fn remove_all_named(headers: &mut HeaderMap, names: &[http::HeaderName]) {
    let mut found: smallvec::SmallVec<[http::HeaderName; 4]> = smallvec::SmallVec::new();
    for name in headers.keys() {
        if names.iter().any(|listed| listed == name) {
            found.push(name.clone());
        }
    }
    for name in found {
        headers.remove(name);
    }
}

pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.trim().parse().ok())
}

/// A JSON answer that no cache keeps.
pub fn json(status: StatusCode, text: impl Into<bytes::Bytes>) -> Response<Body> {
    let mut response = Response::new(body::full(text.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `{"status":"ok"}`: the process is up and serving.
pub fn health() -> Response<Body> {
    json(StatusCode::OK, r#"{"status":"ok"}"#)
}

/// An error and its causes, `a: b: c`, each cause once (hyper's "client
/// error (Connect)" says why only through its sources).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The kind of the first I/O error in `error`'s chain of sources.
pub fn io_error_kind(error: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut source = Some(error);
    while let Some(current) = source {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        source = current.source();
    }
    None
}
