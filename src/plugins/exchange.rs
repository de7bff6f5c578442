//! The message a `larder:plugin@0.2.0` guest reads and edits through host
//! calls during one hook: the request (editable in `on-request`, readable in
//! `on-response` when declared) and the response. The host moves its own
//! `http` parts in before the call and takes them back after, so a guest
//! that reads one header copies one value, and nothing is rebuilt.
//!
//! Owns the edit rules (valid names and values, no framing or connection
//! fields, final statuses, the size caps) and an undo journal: a call that
//! fails leaves the message as it was. Must not call into the guest.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

use crate::http::cache_control;

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
pub const OTHER_CONNECTION_FIELDS: [&str; 2] = ["keep-alive", "proxy-connection"];

/// Why an edit was refused (the WIT's `edit-error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditError {
    InvalidName,
    InvalidValue,
    Forbidden,
    NotAllowed,
    TooLarge,
}

/// The request as a hook sees it.
// The parts are moved in rather than boxed: one view per call, kept in the
// store, where a box would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum RequestView {
    /// `on-request`: the host's parts, moved in for the call.
    Editable(http::request::Parts),
    /// `on-response` of a plugin that declared `request-in-response`.
    ReadOnly(Arc<http::request::Parts>),
}

impl RequestView {
    fn parts(&self) -> &http::request::Parts {
        match self {
            Self::Editable(parts) => parts,
            Self::ReadOnly(parts) => parts,
        }
    }
}

/// The response as `on-response` sees it.
pub struct ResponseView {
    pub parts: http::response::Parts,
    /// The collected body, for a plugin that declared `response-body`.
    pub body: Option<Bytes>,
    /// A body the guest set.
    pub new_body: Option<Bytes>,
    /// TTL the guest set, applied to Cache-Control after the call.
    pub ttl: Option<u32>,
    /// Tags the guest added, applied to Surrogate-Key after the call.
    pub tags: Vec<String>,
}

impl ResponseView {
    pub fn new(parts: http::response::Parts, body: Option<Bytes>) -> Self {
        Self {
            parts,
            body,
            new_body: None,
            ttl: None,
            tags: Vec::new(),
        }
    }

    /// Puts what the guest set through `set-ttl` and `add-tags` into the
    /// headers the cache reads.
    pub fn apply_cache_settings(&mut self) {
        if let Some(ttl) = self.ttl.take() {
            let value = cache_control::with_s_maxage(&self.parts.headers, ttl);
            self.parts.headers.insert(CACHE_CONTROL, value);
        }
        if !self.tags.is_empty() {
            let name = HeaderName::from_static("surrogate-key");
            let mut tags: Vec<String> = self
                .parts
                .headers
                .get(&name)
                .and_then(|value| value.to_str().ok())
                .map(|value| value.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default();
            for tag in self.tags.drain(..) {
                if !tags.contains(&tag) {
                    tags.push(tag);
                }
            }
            if let Ok(value) = HeaderValue::from_str(&tags.join(" ")) {
                self.parts.headers.insert(name, value);
            }
        }
    }
}

/// What was there before a field was first touched in this call.
struct Undo {
    name: HeaderName,
    values: Vec<HeaderValue>,
}

/// The message of one hook call, and what to undo if it fails.
#[derive(Default)]
pub struct Exchange {
    pub request: Option<RequestView>,
    pub response: Option<ResponseView>,
    request_undo: Vec<Undo>,
    response_undo: Vec<Undo>,
    original_method: Option<Method>,
    original_uri: Option<http::Uri>,
    original_status: Option<StatusCode>,
    /// Fields the guest added (count and bytes) in this call, against the caps.
    added_fields: usize,
    added_bytes: usize,
}

/// Which message a header call is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Request,
    Response,
}

fn header_name(name: &str) -> Result<HeaderName, EditError> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| EditError::InvalidName)
}

/// A name that may be edited: valid, and not the connection's or framing's.
fn editable_name(name: &str) -> Result<HeaderName, EditError> {
    let name = header_name(name)?;
    let framing =
        CONNECTION_FIELDS.contains(&name) || OTHER_CONNECTION_FIELDS.contains(&name.as_str());
    if framing {
        return Err(EditError::Forbidden);
    }
    Ok(name)
}

fn header_value(value: Vec<u8>) -> Result<HeaderValue, EditError> {
    HeaderValue::from_maybe_shared(Bytes::from(value)).map_err(|_| EditError::InvalidValue)
}

impl Exchange {
    /// An exchange for `on-request`, on the host's request parts.
    pub fn for_request(parts: http::request::Parts) -> Self {
        Self {
            request: Some(RequestView::Editable(parts)),
            ..Self::default()
        }
    }

    /// An exchange for `on-response`.
    pub fn for_response(
        response: ResponseView,
        request: Option<Arc<http::request::Parts>>,
    ) -> Self {
        Self {
            request: request.map(RequestView::ReadOnly),
            response: Some(response),
            ..Self::default()
        }
    }

    fn headers(&self, side: Side) -> Option<&HeaderMap> {
        match side {
            Side::Request => self.request.as_ref().map(|view| &view.parts().headers),
            Side::Response => self.response.as_ref().map(|view| &view.parts.headers),
        }
    }

    /// The map a change goes to, after recording what `name` held.
    fn headers_for_edit(
        &mut self,
        side: Side,
        name: &HeaderName,
    ) -> Result<&mut HeaderMap, EditError> {
        let (headers, undo) = match side {
            Side::Request => match self.request.as_mut() {
                Some(RequestView::Editable(parts)) => (&mut parts.headers, &mut self.request_undo),
                _ => return Err(EditError::NotAllowed),
            },
            Side::Response => match self.response.as_mut() {
                Some(view) => (&mut view.parts.headers, &mut self.response_undo),
                None => return Err(EditError::NotAllowed),
            },
        };
        if !undo.iter().any(|entry| entry.name == *name) {
            undo.push(Undo {
                name: name.clone(),
                values: headers.get_all(name).iter().cloned().collect(),
            });
        }
        Ok(headers)
    }

    fn count_added(&mut self, name: &HeaderName, value: &HeaderValue) -> Result<(), EditError> {
        let fields = self.added_fields + 1;
        let bytes = self.added_bytes + name.as_str().len() + value.len();
        if fields > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
            return Err(EditError::TooLarge);
        }
        self.added_fields = fields;
        self.added_bytes = bytes;
        Ok(())
    }

    pub fn header(&self, side: Side, name: &str) -> Option<Vec<u8>> {
        let headers = self.headers(side)?;
        headers.get(name).map(|value| value.as_bytes().to_vec())
    }

    pub fn header_all(&self, side: Side, name: &str) -> Vec<Vec<u8>> {
        self.headers(side).map_or_else(Vec::new, |headers| {
            headers
                .get_all(name)
                .iter()
                .map(|value| value.as_bytes().to_vec())
                .collect()
        })
    }

    pub fn all_headers(&self, side: Side) -> Vec<(String, Vec<u8>)> {
        self.headers(side).map_or_else(Vec::new, |headers| {
            headers
                .iter()
                .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec()))
                .collect()
        })
    }

    pub fn set_header(&mut self, side: Side, name: &str, value: Vec<u8>) -> Result<(), EditError> {
        let name = editable_name(name)?;
        let value = header_value(value)?;
        self.count_added(&name, &value)?;
        self.headers_for_edit(side, &name)?.insert(name, value);
        Ok(())
    }

    pub fn append_header(
        &mut self,
        side: Side,
        name: &str,
        value: Vec<u8>,
    ) -> Result<(), EditError> {
        let name = editable_name(name)?;
        let value = header_value(value)?;
        self.count_added(&name, &value)?;
        self.headers_for_edit(side, &name)?.append(name, value);
        Ok(())
    }

    pub fn remove_header(&mut self, side: Side, name: &str) -> Result<(), EditError> {
        let name = editable_name(name)?;
        self.headers_for_edit(side, &name)?.remove(&name);
        Ok(())
    }

    pub fn method(&self) -> String {
        self.request
            .as_ref()
            .map_or_else(String::new, |view| view.parts().method.to_string())
    }

    pub fn path_with_query(&self) -> String {
        self.request.as_ref().map_or_else(String::new, |view| {
            path_with_query(view.parts()).to_string()
        })
    }

    pub fn authority(&self) -> Option<String> {
        authority(self.request.as_ref()?.parts())
    }

    fn editable_request(&mut self) -> Result<&mut http::request::Parts, EditError> {
        match self.request.as_mut() {
            Some(RequestView::Editable(parts)) => Ok(parts),
            _ => Err(EditError::NotAllowed),
        }
    }

    pub fn set_method(&mut self, method: &str) -> Result<(), EditError> {
        let method = Method::from_bytes(method.as_bytes()).map_err(|_| EditError::InvalidValue)?;
        let parts = self.editable_request()?;
        let old = std::mem::replace(&mut parts.method, method);
        self.original_method.get_or_insert(old);
        Ok(())
    }

    pub fn set_path_with_query(&mut self, path: &str) -> Result<(), EditError> {
        if !path.starts_with('/') {
            return Err(EditError::InvalidValue);
        }
        let path: http::uri::PathAndQuery = path.parse().map_err(|_| EditError::InvalidValue)?;
        let parts = self.editable_request()?;
        let mut uri = parts.uri.clone().into_parts();
        uri.path_and_query = Some(path);
        let uri = http::Uri::from_parts(uri).map_err(|_| EditError::InvalidValue)?;
        let old = std::mem::replace(&mut parts.uri, uri);
        self.original_uri.get_or_insert(old);
        Ok(())
    }

    pub fn status(&self) -> u16 {
        self.response
            .as_ref()
            .map_or(0, |view| view.parts.status.as_u16())
    }

    pub fn set_status(&mut self, status: u16) -> Result<(), EditError> {
        let view = self.response.as_mut().ok_or(EditError::NotAllowed)?;
        let status = match StatusCode::from_u16(status) {
            Ok(status) if (200..=599).contains(&status.as_u16()) => status,
            _ => return Err(EditError::NotAllowed),
        };
        let old = std::mem::replace(&mut view.parts.status, status);
        self.original_status.get_or_insert(old);
        Ok(())
    }

    pub fn body(&self) -> Option<Vec<u8>> {
        let view = self.response.as_ref()?;
        view.new_body
            .as_ref()
            .or(view.body.as_ref())
            .map(|body| body.to_vec())
    }

    pub fn set_body(&mut self, body: Vec<u8>) -> Result<(), EditError> {
        if body.len() > super::MAX_BODY_BYTES {
            return Err(EditError::TooLarge);
        }
        let view = self.response.as_mut().ok_or(EditError::NotAllowed)?;
        view.new_body = Some(Bytes::from(body));
        Ok(())
    }

    pub fn set_ttl(&mut self, seconds: u32) -> Result<(), EditError> {
        let view = self.response.as_mut().ok_or(EditError::NotAllowed)?;
        view.ttl = Some(seconds);
        Ok(())
    }

    pub fn add_tags(&mut self, tags: Vec<String>) -> Result<(), EditError> {
        let view = self.response.as_mut().ok_or(EditError::NotAllowed)?;
        for tag in tags {
            let valid =
                !tag.is_empty() && tag.len() <= 256 && tag.bytes().all(|b| b.is_ascii_graphic());
            if !valid {
                return Err(EditError::InvalidValue);
            }
            view.tags.push(tag);
        }
        Ok(())
    }

    /// The response's Cache-Control as it was before this call (a plugin
    /// cannot lift `no-transform` for itself).
    pub fn forbids_transform(&self) -> bool {
        let Some(view) = self.response.as_ref() else {
            return false;
        };
        match self
            .response_undo
            .iter()
            .find(|entry| entry.name == CACHE_CONTROL)
        {
            Some(entry) => {
                let mut before = HeaderMap::new();
                for value in &entry.values {
                    before.append(CACHE_CONTROL, value.clone());
                }
                cache_control::forbids_transform(&before)
            }
            None => cache_control::forbids_transform(&view.parts.headers),
        }
    }

    /// Puts the message back as it was before the call (the call failed).
    pub fn undo(&mut self) {
        if let Some(RequestView::Editable(parts)) = self.request.as_mut() {
            restore(&mut parts.headers, &mut self.request_undo);
            if let Some(method) = self.original_method.take() {
                parts.method = method;
            }
            if let Some(uri) = self.original_uri.take() {
                parts.uri = uri;
            }
        }
        if let Some(view) = self.response.as_mut() {
            restore(&mut view.parts.headers, &mut self.response_undo);
            if let Some(status) = self.original_status.take() {
                view.parts.status = status;
            }
            view.new_body = None;
            view.ttl = None;
            view.tags.clear();
        }
    }
}

/// The request's path and query as a plugin sees it (both versions).
pub fn path_with_query(parts: &http::request::Parts) -> &str {
    parts.uri.path_and_query().map_or("/", |path| path.as_str())
}

/// The request's authority as a plugin sees it: the target's, else Host.
pub fn authority(parts: &http::request::Parts) -> Option<String> {
    parts
        .uri
        .authority()
        .map(|authority| authority.as_str().to_string())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|host| host.to_str().ok())
                .map(str::to_string)
        })
}

fn restore(headers: &mut HeaderMap, undo: &mut Vec<Undo>) {
    for entry in undo.drain(..) {
        headers.remove(&entry.name);
        for value in entry.values {
            headers.append(entry.name.clone(), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> http::request::Parts {
        let (parts, ()) = http::Request::builder()
            .uri("/a?b=1")
            .header("x-keep", "1")
            .header("x-twice", "a")
            .header("x-twice", "b")
            .body(())
            .unwrap_or_default()
            .into_parts();
        parts
    }

    #[test]
    fn edits_follow_the_rules() {
        let mut exchange = Exchange::for_request(request());
        let side = Side::Request;
        assert_eq!(exchange.header(side, "X-Keep"), Some(b"1".to_vec()));
        assert_eq!(exchange.header_all(side, "x-twice").len(), 2);
        assert_eq!(
            exchange.set_header(side, "content-length", b"1".to_vec()),
            Err(EditError::Forbidden)
        );
        assert_eq!(
            exchange.set_header(side, "bad name", b"1".to_vec()),
            Err(EditError::InvalidName)
        );
        assert_eq!(
            exchange.set_header(side, "x-a", b"a\nb".to_vec()),
            Err(EditError::InvalidValue)
        );
        assert_eq!(
            exchange.set_path_with_query("no-slash"),
            Err(EditError::InvalidValue)
        );
        assert_eq!(exchange.set_status(200), Err(EditError::NotAllowed));
    }

    #[test]
    fn a_failed_call_leaves_the_request_as_it_was() {
        let mut exchange = Exchange::for_request(request());
        let side = Side::Request;
        exchange.set_header(side, "x-keep", b"2".to_vec()).ok();
        exchange.append_header(side, "x-new", b"n".to_vec()).ok();
        exchange.remove_header(side, "x-twice").ok();
        exchange.set_method("POST").ok();
        exchange.set_path_with_query("/other").ok();
        assert_eq!(exchange.method(), "POST");
        exchange.undo();
        let Some(RequestView::Editable(parts)) = exchange.request else {
            panic!("the request is still there");
        };
        assert_eq!(parts.headers["x-keep"], "1");
        assert!(parts.headers.get("x-new").is_none());
        let twice: Vec<_> = parts.headers.get_all("x-twice").iter().collect();
        assert_eq!(twice, ["a", "b"]);
        assert_eq!(parts.method, Method::GET);
        assert_eq!(parts.uri, "/a?b=1");
    }

    #[test]
    fn the_guest_cannot_add_past_the_caps() {
        let mut exchange = Exchange::for_request(request());
        let mut refused = None;
        for i in 0..=MAX_HEADERS {
            if let Err(error) =
                exchange.append_header(Side::Request, &format!("x-{i}"), b"v".to_vec())
            {
                refused = Some((i, error));
                break;
            }
        }
        assert_eq!(refused, Some((MAX_HEADERS, EditError::TooLarge)));
    }

    #[test]
    fn no_transform_is_read_from_before_the_call() {
        let (mut parts, ()) = http::Response::builder()
            .header("cache-control", "max-age=60, no-transform")
            .body(())
            .unwrap_or_default()
            .into_parts();
        parts.status = StatusCode::OK;
        let mut exchange = Exchange::for_response(ResponseView::new(parts, None), None);
        exchange
            .set_header(Side::Response, "cache-control", b"max-age=60".to_vec())
            .ok();
        assert!(exchange.forbids_transform());
    }
}
