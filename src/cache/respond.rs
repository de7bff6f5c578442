//! Responses built from what the cache holds: a stored entry (with `Age`
//! computed now, 304 for a matching conditional, no body for HEAD), one byte
//! range of it, a flight's shared body, or an unshared upstream response;
//! and the `Cache-Status` field they carry.
//!
//! Must not decide freshness or storability; callers have.

use std::ops::RangeInclusive;
use std::time::SystemTime;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};

use super::flight::FlightBody;
use super::policy;
use super::store::{Entry, Meta};
use crate::http::body::{self, Body};

/// A response from a stored entry.
pub fn stored(entry: &Entry, request: &Parts, now: SystemTime) -> Response<Body> {
    let age = entry.meta.timing.current_age(now).as_secs();
    let meta = &entry.meta;
    with_body(meta, &meta.headers, request, age, || {
        body::full(entry.body.clone())
    })
}

/// `206` with one byte range of a stored 200 (the body is shared, not copied).
pub fn partial(entry: &Entry, range: RangeInclusive<usize>, now: SystemTime) -> Response<Body> {
    let (first, last) = (*range.start(), *range.end());
    let total = entry.body.len();
    let mut response = Response::new(body::full(entry.body.slice(first..=last)));
    *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    let headers = response.headers_mut();
    *headers = entry.meta.headers.clone();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(last - first + 1));
    if let Ok(value) = HeaderValue::try_from(format!("bytes {first}-{last}/{total}")) {
        headers.insert(header::CONTENT_RANGE, value);
    }
    let age = entry.meta.timing.current_age(now).as_secs();
    headers.insert(header::AGE, HeaderValue::from(age));
    response
}

/// A response streamed from a flight; `headers` are the fields to answer
/// with (the stored ones, or for the request that brought the response, its
/// complete set).
pub fn from_flight(
    reader: Option<FlightBody>,
    meta: &Meta,
    headers: &HeaderMap,
    request: &Parts,
    now: SystemTime,
) -> Response<Body> {
    let age = meta.timing.current_age(now).as_secs();
    with_body(meta, headers, request, age, move || match reader {
        Some(reader) => body::boxed(reader),
        None => body::empty(),
    })
}

fn with_body(
    meta: &Meta,
    headers: &HeaderMap,
    request: &Parts,
    age: u64,
    body: impl FnOnce() -> Body,
) -> Response<Body> {
    let mut response = if policy::is_not_modified(&request.headers, meta.status, headers) {
        let mut response = Response::new(body::empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        *response.headers_mut() = policy::not_modified_headers(headers);
        response
    } else {
        let body = if request.method == Method::HEAD {
            body::empty()
        } else {
            body()
        };
        let mut response = Response::new(body);
        *response.status_mut() = meta.status;
        *response.headers_mut() = headers.clone();
        response
    };
    response
        .headers_mut()
        .insert(header::AGE, HeaderValue::from(age));
    response
}

/// An unshared upstream response, answered as is (304 if the client's
/// conditional matches it, no body for HEAD).
pub fn pass_through(response: Response<Body>, request: &Parts) -> Response<Body> {
    let (mut head, body) = response.into_parts();
    let not_modified = head.status.is_success()
        && (request.method == Method::GET || request.method == Method::HEAD)
        && policy::is_not_modified(&request.headers, head.status, &head.headers);
    let body = if not_modified {
        head.headers = policy::not_modified_headers(&head.headers);
        head.status = StatusCode::NOT_MODIFIED;
        body::empty()
    } else if request.method == Method::HEAD {
        body::empty()
    } else {
        body
    };
    Response::from_parts(head, body)
}

/// Appends this cache's member to `Cache-Status`, keeping upstream caches' ones
/// first (RFC 9211 section 2: ordered from the origin towards the client).
pub fn append_cache_status(headers: &mut HeaderMap, member: &str) {
    let name = HeaderName::from_static("cache-status");
    let combined = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.trim().is_empty() => format!("{existing}, {member}"),
        _ => member.to_string(),
    };
    // From a String: the bytes move into the header value without a copy.
    if let Ok(value) = HeaderValue::try_from(combined) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_status_appends_after_upstream_members() {
        let mut headers = HeaderMap::new();
        append_cache_status(&mut headers, "larder; hit");
        assert_eq!(headers.get("cache-status").unwrap(), "larder; hit");
        let mut upstream = HeaderMap::new();
        upstream.insert(
            "cache-status",
            HeaderValue::from_static("origin-cache; hit"),
        );
        append_cache_status(&mut upstream, "larder; fwd=uri-miss");
        assert_eq!(
            upstream.get("cache-status").unwrap(),
            "origin-cache; hit, larder; fwd=uri-miss"
        );
    }
}
