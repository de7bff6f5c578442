//! A source's last good value with its response headers built once, and the
//! answers served from it (200, 304, HEAD).
//!
//! Owns content-type sniffing, the strong ETag and Last-Modified of a value,
//! and a mirror's members (one value per key, for per-key reads).
//! Must stay allocation-light per request: headers are built when a value
//! changes, a request only clones them and the `Bytes`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use sha2::{Digest, Sha256};

use crate::http::body::{self, Body};

/// A mirror's values by key (the key as it reads below the mirrored prefix).
pub type Members = BTreeMap<String, Arc<StoredValue>>;

/// How long a client may reuse an answer without asking again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Until the source's next run, in seconds.
    MaxAge(u64),
    /// A watched or mirrored value changes at any moment: always revalidate.
    Live,
}

/// One value as it is served.
#[derive(Debug)]
pub struct StoredValue {
    pub body: Bytes,
    /// When the bytes last changed (a fetch that returns the same bytes keeps it).
    pub changed_at: DateTime<Utc>,
    /// When the fetch that produced this value ended.
    pub fetched_at: Instant,
    /// The headers a fetcher plugin returned with the value (empty for
    /// other kinds): what its `cache` view shows it next time.
    pub fetcher_headers: Vec<(String, Vec<u8>)>,
    /// The instance that fetched it, when sources are shared.
    pub fetched_by: Option<Arc<str>>,
    /// A mirror's keys, each its own value (with its own ETag), for reads
    /// of one key; `None` for a value that is one document.
    pub members: Option<Arc<Members>>,
    etag: HeaderValue,
    last_modified: HeaderValue,
    content_type: HeaderValue,
    content_length: HeaderValue,
}

impl StoredValue {
    /// Builds the value and its headers. `content_type` is the configured or
    /// fetched type; without one the bytes are sniffed.
    pub fn new(body: Bytes, content_type: Option<&str>, changed_at: DateTime<Utc>) -> Self {
        let mut value = Self::new_unhashed(body, content_type, changed_at);
        value.etag = etag_of(&value.body);
        value
    }

    /// A value whose ETag is a version its source gives (a mirror's
    /// revision) instead of a hash of its bytes.
    pub fn versioned(
        body: Bytes,
        content_type: Option<&str>,
        changed_at: DateTime<Utc>,
        version: i64,
    ) -> Self {
        let mut value = Self::new_unhashed(body, content_type, changed_at);
        // Digits and quotes: always a valid header value.
        value.etag = HeaderValue::from_str(&format!("\"{version}\""))
            .unwrap_or_else(|_| HeaderValue::from_static("\"0\""));
        value
    }

    fn new_unhashed(body: Bytes, content_type: Option<&str>, changed_at: DateTime<Utc>) -> Self {
        let content_type = content_type_header(content_type, &body);
        // HTTP dates have whole seconds; keep the value's time the same so
        // If-Modified-Since comparisons agree with what the client was sent.
        let changed_at = DateTime::from_timestamp(changed_at.timestamp(), 0).unwrap_or(changed_at);
        let last_modified = HeaderValue::from_str(&http_date(changed_at))
            .unwrap_or_else(|_| HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"));
        let content_length = HeaderValue::from(body.len());
        Self {
            body,
            changed_at,
            fetched_at: Instant::now(),
            fetcher_headers: Vec::new(),
            fetched_by: None,
            members: None,
            etag: HeaderValue::from_static("\"0\""),
            last_modified,
            content_type,
            content_length,
        }
    }

    /// The same value served with another content type (the source's
    /// settings changed); bytes, ETag, dates and members are kept.
    pub fn with_content_type(&self, content_type: Option<&str>) -> Self {
        Self {
            body: self.body.clone(),
            changed_at: self.changed_at,
            fetched_at: self.fetched_at,
            fetcher_headers: self.fetcher_headers.clone(),
            fetched_by: self.fetched_by.clone(),
            members: self.members.clone(),
            etag: self.etag.clone(),
            last_modified: self.last_modified.clone(),
            content_type: content_type_header(content_type, &self.body),
            content_length: self.content_length.clone(),
        }
    }

    /// The next value after a fetch: same bytes keep their change time.
    pub fn next(
        previous: Option<&StoredValue>,
        body: Bytes,
        content_type: Option<&str>,
        now: DateTime<Utc>,
    ) -> (Self, bool) {
        match previous {
            // Same bytes: keep the ETag and dates instead of hashing again
            // (a thousand unchanged one-second sources hash 16 MB a second).
            Some(old) if old.body == body => {
                let unchanged = Self {
                    content_type: content_type_header(content_type, &body),
                    body,
                    changed_at: old.changed_at,
                    fetched_at: Instant::now(),
                    fetcher_headers: Vec::new(),
                    fetched_by: None,
                    members: None,
                    etag: old.etag.clone(),
                    last_modified: old.last_modified.clone(),
                    content_length: old.content_length.clone(),
                };
                (unchanged, false)
            }
            _ => (Self::new(body, content_type, now), true),
        }
    }

    /// The ETag as sent, quotes included.
    pub fn etag(&self) -> &str {
        self.etag.to_str().unwrap_or_default()
    }

    pub fn content_type(&self) -> &str {
        self.content_type.to_str().unwrap_or_default()
    }

    /// Whether `tag` (an entity tag, quoted or not, `W/` ignored) names this value.
    pub fn has_etag(&self, tag: &str) -> bool {
        let tag = tag.trim();
        let tag = tag.strip_prefix("W/").unwrap_or(tag);
        let ours = self.etag();
        tag == ours || ours.strip_prefix('"').and_then(|t| t.strip_suffix('"')) == Some(tag)
    }

    /// The answer to `request` (GET or HEAD) from this value.
    pub fn respond<B>(&self, request: &Request<B>, freshness: Freshness) -> Response<Body> {
        self.respond_to(request.method(), request.headers(), freshness, false)
    }

    /// The answer to a GET or HEAD with these request headers; a 304 when
    /// they say the client has this value, or when `unchanged` (a wait for
    /// a change that ran out).
    pub fn respond_to(
        &self,
        method: &Method,
        request_headers: &HeaderMap,
        freshness: Freshness,
        unchanged: bool,
    ) -> Response<Body> {
        let mut headers = HeaderMap::with_capacity(6);
        headers.insert(header::ETAG, self.etag.clone());
        headers.insert(header::LAST_MODIFIED, self.last_modified.clone());
        headers.insert(header::CACHE_CONTROL, cache_control(freshness));
        if unchanged || self.is_not_modified_for(request_headers) {
            return with_headers(StatusCode::NOT_MODIFIED, headers, body::empty());
        }
        headers.insert(header::CONTENT_TYPE, self.content_type.clone());
        headers.insert(header::CONTENT_LENGTH, self.content_length.clone());
        let body = if method == Method::HEAD {
            body::empty()
        } else {
            body::full(self.body.clone())
        };
        with_headers(StatusCode::OK, headers, body)
    }

    /// RFC 9110 13.1.2/13.1.3: If-None-Match wins; If-Modified-Since only without it.
    fn is_not_modified_for(&self, request: &HeaderMap) -> bool {
        let mut saw_if_none_match = false;
        for value in request.get_all(header::IF_NONE_MATCH) {
            saw_if_none_match = true;
            let Ok(list) = value.to_str() else { continue };
            if list
                .split(',')
                .map(str::trim)
                .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == self.etag())
            {
                return true;
            }
        }
        if saw_if_none_match {
            return false;
        }
        request
            .get(header::IF_MODIFIED_SINCE)
            .and_then(|value| value.to_str().ok())
            .and_then(parse_http_date)
            .is_some_and(|since| self.changed_at <= since)
    }
}

fn with_headers(status: StatusCode, headers: HeaderMap, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

fn cache_control(freshness: Freshness) -> HeaderValue {
    match freshness {
        Freshness::MaxAge(seconds) => HeaderValue::from_str(&format!("max-age={seconds}"))
            .unwrap_or_else(|_| HeaderValue::from_static("no-cache")),
        Freshness::Live => HeaderValue::from_static("no-cache"),
    }
}

fn etag_of(body: &[u8]) -> HeaderValue {
    let digest = Sha256::digest(body);
    let tag = format!("\"{}\"", hex::encode(&digest[..16]));
    HeaderValue::from_str(&tag).unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

fn http_date(time: DateTime<Utc>) -> String {
    time.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

fn parse_http_date(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc2822(text.trim())
        .ok()
        .map(|time| time.with_timezone(&Utc))
}

/// Seconds between `now` and `next` rounded up, never negative.
pub fn seconds_until(next: Option<DateTime<Utc>>, now: SystemTime) -> u64 {
    let Some(next) = next else { return 0 };
    let now: DateTime<Utc> = now.into();
    let millis = (next - now).num_milliseconds().max(0) as u64;
    millis.div_ceil(1000)
}

fn content_type_header(configured: Option<&str>, body: &[u8]) -> HeaderValue {
    configured
        .and_then(|text| HeaderValue::from_str(text).ok())
        .unwrap_or_else(|| HeaderValue::from_static(sniff(body)))
}

/// Larder's guess when no type is configured: JSON, CSV, UTF-8 text, else bytes.
pub fn sniff(body: &[u8]) -> &'static str {
    let Ok(text) = std::str::from_utf8(body) else {
        return "application/octet-stream";
    };
    let trimmed = text.trim_start();
    if (trimmed.starts_with('{') || trimmed.starts_with('['))
        && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
    {
        return "application/json";
    }
    if looks_like_csv(text) {
        return "text/csv; charset=utf-8";
    }
    "text/plain; charset=utf-8"
}

/// Two or more non-empty lines with the same, non-zero number of commas
/// outside double quotes.
fn looks_like_csv(text: &str) -> bool {
    let mut lines = text.lines().filter(|line| !line.trim().is_empty());
    let Some(first) = lines.next() else {
        return false;
    };
    let columns = commas_outside_quotes(first);
    if columns == 0 {
        return false;
    }
    let mut rows = 1;
    for line in lines {
        if commas_outside_quotes(line) != columns {
            return false;
        }
        rows += 1;
    }
    rows >= 2
}

fn commas_outside_quotes(line: &str) -> usize {
    let mut quoted = false;
    let mut commas = 0;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => commas += 1,
            _ => {}
        }
    }
    commas
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn get(headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::get("/?key=k");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    fn value(text: &str) -> StoredValue {
        let at = Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap();
        StoredValue::new(Bytes::from(text.to_string()), None, at)
    }

    #[test]
    fn sniffs_json_csv_text_and_bytes() {
        assert_eq!(sniff(br#"{"data":"Hello world!"}"#), "application/json");
        assert_eq!(sniff(b" [1, 2]\n"), "application/json");
        assert_eq!(
            sniff(b"date,user,count_events\n2022-01-01,user1,10\n2022-01-01,\"a,b\",14\n"),
            "text/csv; charset=utf-8"
        );
        assert_eq!(sniff(b"673936523"), "text/plain; charset=utf-8");
        assert_eq!(sniff(b"a,b\nc\n"), "text/plain; charset=utf-8");
        assert_eq!(sniff(b"{not json"), "text/plain; charset=utf-8");
        assert_eq!(sniff(&[0xff, 0xfe, 0x00]), "application/octet-stream");
    }

    #[test]
    fn a_configured_content_type_wins_over_sniffing() {
        let at = Utc::now();
        let stored = StoredValue::new(Bytes::from_static(b"{}"), Some("text/x-custom"), at);
        assert_eq!(stored.content_type(), "text/x-custom");
    }

    #[test]
    fn etag_matches_give_304_and_others_200() {
        let stored = value("hello");
        let etag = stored.etag().to_string();
        let response = stored.respond(&get(&[("if-none-match", &etag)]), Freshness::MaxAge(5));
        assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(response.headers()["cache-control"], "max-age=5");
        let weak = format!("\"x\", W/{etag}");
        let response = stored.respond(&get(&[("if-none-match", &weak)]), Freshness::MaxAge(5));
        assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
        let response = stored.respond(
            &get(&[("if-none-match", "\"other\"")]),
            Freshness::MaxAge(5),
        );
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-length"], "5");
    }

    #[test]
    fn if_modified_since_is_used_only_without_if_none_match() {
        let stored = value("hello");
        let same = "Sat, 21 Nov 2026 12:00:00 GMT";
        let earlier = "Sat, 21 Nov 2026 11:59:59 GMT";
        let ok =
            |headers: &[(&str, &str)]| stored.respond(&get(headers), Freshness::MaxAge(1)).status();
        assert_eq!(ok(&[("if-modified-since", same)]), StatusCode::NOT_MODIFIED);
        assert_eq!(ok(&[("if-modified-since", earlier)]), StatusCode::OK);
        assert_eq!(
            ok(&[("if-modified-since", same), ("if-none-match", "\"other\"")]),
            StatusCode::OK
        );
        assert_eq!(ok(&[("if-modified-since", "garbage")]), StatusCode::OK);
    }

    #[test]
    fn same_bytes_keep_their_change_time_and_etag() {
        let first = value("hello");
        let later = first.changed_at + chrono::TimeDelta::seconds(30);
        let (same, changed) =
            StoredValue::next(Some(&first), Bytes::from_static(b"hello"), None, later);
        assert!(!changed);
        assert_eq!(same.changed_at, first.changed_at);
        assert_eq!(same.etag(), first.etag());
        let (new, changed) =
            StoredValue::next(Some(&first), Bytes::from_static(b"world"), None, later);
        assert!(changed);
        assert_eq!(new.changed_at, later);
        assert_ne!(new.etag(), first.etag());
    }

    #[test]
    fn seconds_until_rounds_up_and_never_goes_negative() {
        let now = SystemTime::now();
        let at: DateTime<Utc> = now.into();
        assert_eq!(
            seconds_until(Some(at + chrono::TimeDelta::milliseconds(1500)), now),
            2
        );
        assert_eq!(
            seconds_until(Some(at - chrono::TimeDelta::seconds(3)), now),
            0
        );
        assert_eq!(seconds_until(None, now), 0);
    }
}
