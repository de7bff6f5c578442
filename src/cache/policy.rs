//! The RFC 9111 rules as pure functions over headers and times: what may be
//! stored, how long it stays fresh, how old it is, how a 304 updates it, and
//! how a client's conditional request is answered.
//!
//! Every function that needs the clock takes `now`; nothing here does I/O or
//! touches the store.

use std::ops::RangeInclusive;
use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

use crate::http::cache_control::{
    self, DELTA_SECONDS_MAX, RequestDirectives, ResponseDirectives, Seconds, split_list,
};
use crate::http::hop_by_hop;

/// Statuses a cache may give heuristic freshness (RFC 9110 section 15.1),
/// minus 206 which Larder does not store.
const HEURISTICALLY_CACHEABLE: &[u16] = &[200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];

/// Heuristic freshness is this fraction of (Date - Last-Modified) ...
const HEURISTIC_FRACTION_PERCENT: u64 = 10;
/// ... capped at one day, as common caches do.
const HEURISTIC_CAP: Duration = Duration::from_secs(24 * 60 * 60);

/// The one field a 304 must not overwrite (RFC 9111 section 3.2); hop-by-hop
/// fields never get this far.
const KEPT_ON_UPDATE: &[HeaderName] = &[header::CONTENT_LENGTH];

/// Fields a 304 to a client carries from the stored 200 (RFC 9110 section 15.4.5).
const NOT_MODIFIED_FIELDS: &[HeaderName] = &[
    header::CACHE_CONTROL,
    header::CONTENT_LOCATION,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::LAST_MODIFIED,
    header::VARY,
];

/// Why a response is not stored; also the words used in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStorable {
    Method,
    RequestNoStore,
    Status,
    NoStore,
    Private,
    Authorization,
    SetCookie,
    VaryStar,
    /// A `Cache-Control` or `Vary` field that cannot be read.
    Malformed,
    NothingToReuse,
}

impl NotStorable {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Method => "method",
            Self::RequestNoStore => "request-no-store",
            Self::Status => "status",
            Self::NoStore => "no-store",
            Self::Private => "private",
            Self::Authorization => "authorization",
            Self::SetCookie => "set-cookie",
            Self::VaryStar => "vary-star",
            Self::Malformed => "unreadable-cache-control-or-vary",
            Self::NothingToReuse => "no-freshness-or-validator",
        }
    }
}

/// Decides whether a shared cache may store this response (RFC 9111 section 3,
/// plus Larder's Set-Cookie habit). `sets_cookie`: the response carried a
/// `Set-Cookie` that no qualified `private`/`no-cache` kept from sharing
/// (the stored copy never has it; the question is whether to store at all).
pub fn check_storable(
    method: &Method,
    request_headers: &HeaderMap,
    request: &RequestDirectives,
    status: StatusCode,
    headers: &HeaderMap,
    response: &ResponseDirectives,
    sets_cookie: bool,
) -> Result<(), NotStorable> {
    if method != Method::GET {
        return Err(NotStorable::Method);
    }
    if request.no_store {
        return Err(NotStorable::RequestNoStore);
    }
    if !is_storable_status(status) {
        return Err(NotStorable::Status);
    }
    // must-understand overrides no-store for statuses the cache understands.
    let understood = response.must_understand && HEURISTICALLY_CACHEABLE.contains(&status.as_u16());
    if response.no_store && !understood {
        return Err(NotStorable::NoStore);
    }
    if response.private {
        return Err(NotStorable::Private);
    }
    if request_headers.contains_key(header::AUTHORIZATION) && !response.allows_authorized() {
        return Err(NotStorable::Authorization);
    }
    if sets_cookie && !(response.public || response.s_maxage.is_some()) {
        return Err(NotStorable::SetCookie);
    }
    if has_vary_star(headers) {
        return Err(NotStorable::VaryStar);
    }
    // A field that cannot be read might have said private or no-store, or
    // named the request fields that select a variant.
    // (A targeted field that applies makes Cache-Control irrelevant here.)
    let cache_control_read = response.targeted || cache_control::is_well_formed(headers);
    if !cache_control_read || !super::key::vary_is_well_formed(headers) {
        return Err(NotStorable::Malformed);
    }
    let explicit = response.s_maxage.is_some()
        || response.max_age.is_some()
        || (!response.targeted && headers.contains_key(header::EXPIRES));
    let heuristic =
        allows_heuristic(status, response) && headers.contains_key(header::LAST_MODIFIED);
    if !explicit && !heuristic && !has_validator(headers) {
        return Err(NotStorable::NothingToReuse);
    }
    Ok(())
}

/// Final statuses other than 206 (no range support) and 304 (not a full response).
fn is_storable_status(status: StatusCode) -> bool {
    let code = status.as_u16();
    (200..600).contains(&code) && code != 206 && code != 304
}

pub fn has_vary_star(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(split_list)
        .any(|name| name == "*")
}

pub fn has_validator(headers: &HeaderMap) -> bool {
    headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED)
}

/// How long a response stays fresh for a shared cache (RFC 9111 section 4.2.1):
/// `s-maxage`, then `max-age`, then `Expires - Date` (unless the directives
/// came from a targeted field, RFC 9213), then the heuristic. An invalid
/// value of the directive that applies means "already stale".
pub fn freshness_lifetime(
    status: StatusCode,
    headers: &HeaderMap,
    directives: &ResponseDirectives,
    date: SystemTime,
) -> Duration {
    if let Some(value) = directives.s_maxage.or(directives.max_age) {
        return match value {
            Seconds::Valid(s) => Duration::from_secs(s),
            Seconds::Invalid => Duration::ZERO,
        };
    }
    if !directives.targeted && headers.contains_key(header::EXPIRES) {
        return match single_date(headers, &header::EXPIRES) {
            Some(expires) => expires.duration_since(date).unwrap_or(Duration::ZERO),
            None => Duration::ZERO,
        };
    }
    if !allows_heuristic(status, directives) {
        return Duration::ZERO;
    }
    match single_date(headers, &header::LAST_MODIFIED) {
        Some(modified) => heuristic_lifetime(date, modified),
        None => Duration::ZERO,
    }
}

/// Heuristically cacheable statuses, and any response marked `public`
/// (RFC 9111 section 5.2.2.9).
fn allows_heuristic(status: StatusCode, directives: &ResponseDirectives) -> bool {
    directives.public || HEURISTICALLY_CACHEABLE.contains(&status.as_u16())
}

fn heuristic_lifetime(date: SystemTime, last_modified: SystemTime) -> Duration {
    let since_change = date.duration_since(last_modified).unwrap_or(Duration::ZERO);
    let lifetime = Duration::from_secs(since_change.as_secs() * HEURISTIC_FRACTION_PERCENT / 100);
    lifetime.min(HEURISTIC_CAP)
}

/// The clock readings a stored response keeps to compute its age later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub response_time: SystemTime,
    /// Date's value, or the response time when Date is missing or invalid.
    pub date: SystemTime,
    pub corrected_initial_age: Duration,
}

impl Timing {
    /// RFC 9111 section 4.2.3, from the moment the request went out and the
    /// moment the response head arrived.
    pub fn new(request_time: SystemTime, response_time: SystemTime, headers: &HeaderMap) -> Self {
        let date = single_date(headers, &header::DATE).unwrap_or(response_time);
        // Date has one-second resolution: compare it with the response time
        // truncated likewise, or a response would arrive up to a second old.
        let apparent_age = whole_seconds(response_time)
            .duration_since(date)
            .unwrap_or(Duration::ZERO);
        let response_delay = response_time
            .duration_since(request_time)
            .unwrap_or(Duration::ZERO);
        let corrected_age_value = age_value(headers) + response_delay;
        Self {
            response_time,
            date,
            corrected_initial_age: apparent_age.max(corrected_age_value),
        }
    }

    pub fn current_age(&self, now: SystemTime) -> Duration {
        let resident_time = now
            .duration_since(self.response_time)
            .unwrap_or(Duration::ZERO);
        self.corrected_initial_age + resident_time
    }
}

fn whole_seconds(time: SystemTime) -> SystemTime {
    let since_epoch = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    SystemTime::UNIX_EPOCH + Duration::from_secs(since_epoch.as_secs())
}

/// The Age field: the first member of a list, ignored when invalid (RFC 9111 section 5.1).
pub fn age_value(headers: &HeaderMap) -> Duration {
    headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        // Saturates like any delta-seconds (RFC 9111 section 1.2.2), which
        // also keeps the age arithmetic far from overflowing.
        .map(|v| Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX).min(DELTA_SECONDS_MAX)))
        .unwrap_or(Duration::ZERO)
}

/// An HTTP-date field (all three formats of RFC 9110 section 5.6.7); of a
/// repeated field, the first line counts (RFC 9111 section 4.2.1).
pub fn single_date(headers: &HeaderMap, name: &HeaderName) -> Option<SystemTime> {
    let value = headers.get(name)?.to_str().ok()?.trim();
    httpdate::parse_http_date(value)
        .ok()
        .or_else(|| httpdate::parse_http_date(&recase_date(value)?).ok())
}

const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const MONTH_NAMES: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// An IMF-fixdate or asctime date whose day, month or `GMT` is in the wrong
/// case, rewritten in the right one; `None` when nothing changes. Browsers
/// and common caches read `THU, 18 AUG 2050 02:01:18 gmt` as a date; any
/// other defect still makes it invalid.
fn recase_date(value: &str) -> Option<String> {
    let mut changed = false;
    let words: Vec<String> = value
        .split(' ')
        .map(|word| {
            let (bare, comma) = word
                .strip_suffix(',')
                .map_or((word, ""), |bare| (bare, ","));
            let canonical = DAY_NAMES
                .iter()
                .chain(MONTH_NAMES.iter())
                .chain(["GMT"].iter())
                .find(|name| name.eq_ignore_ascii_case(bare));
            match canonical {
                Some(name) if *name != bare => {
                    changed = true;
                    format!("{name}{comma}")
                }
                _ => word.to_string(),
            }
        })
        .collect();
    changed.then(|| words.join(" "))
}

/// Copies the fields worth storing: not hop-by-hop ones (RFC 9110 section
/// 7.6.1), and not `Age`, which is recomputed on every use.
///
/// Values are copied: a parsed header value shares the connection's read
/// buffer, which a stored entry would otherwise keep alive (and misweigh).
pub fn storable_headers(headers: &HeaderMap) -> HeaderMap {
    let mut stored = HeaderMap::with_capacity(headers.len());
    // Hop-by-hop fields, including those `Connection` lists: the proxy
    // removes them already, but the store must not depend on that.
    let hop_by_hop = hop_by_hop::hop_by_hop_names(headers, false);
    for (name, value) in headers {
        if *name == header::AGE || hop_by_hop.contains(name) {
            continue;
        }
        let mut copy = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        copy.set_sensitive(value.is_sensitive());
        stored.append(name.clone(), copy);
    }
    stored
}

/// Whether a response sets a cookie that no qualified `private` or
/// `no-cache` keeps from shared caches.
pub fn sets_shared_cookie(headers: &HeaderMap, directives: &ResponseDirectives) -> bool {
    headers.contains_key(header::SET_COOKIE) && !directives.withheld.contains(&header::SET_COOKIE)
}

/// Removes the fields a qualified `no-cache` / `private` keeps out of a
/// shared cache, and `Set-Cookie`, which only the client whose request
/// brought the response may get; returns whether any was present.
pub fn withhold(headers: &mut HeaderMap, directives: &ResponseDirectives) -> bool {
    let mut removed = headers.remove(header::SET_COOKIE).is_some();
    for name in &directives.withheld {
        removed |= headers.remove(name).is_some();
    }
    removed
}

/// The stored fields updated by a 304 (or a HEAD) as RFC 9111 section 3.2 says:
/// every field in the new response replaces the stored one, except those
/// describing the stored body.
pub fn merge_not_modified(stored: &HeaderMap, update: &HeaderMap) -> HeaderMap {
    let mut merged = stored.clone();
    let update = storable_headers(update);
    for name in update.keys() {
        if KEPT_ON_UPDATE.contains(name) {
            continue;
        }
        merged.remove(name);
        for value in update.get_all(name) {
            merged.append(name.clone(), value.clone());
        }
    }
    merged
}

/// Whether a client's conditional GET/HEAD is answered 304 by this stored 2xx
/// response (RFC 9110 section 13.2.2: If-None-Match wins over If-Modified-Since).
pub fn is_not_modified(request: &HeaderMap, status: StatusCode, headers: &HeaderMap) -> bool {
    if !status.is_success() {
        return false;
    }
    if request.contains_key(header::IF_NONE_MATCH) {
        let Some(etag) = headers.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            return request
                .get_all(header::IF_NONE_MATCH)
                .iter()
                .any(|v| v.as_bytes().trim_ascii() == b"*");
        };
        return request
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(split_list)
            .any(|candidate| candidate == "*" || weak_eq(candidate, etag));
    }
    let Some(since) = single_date(request, &header::IF_MODIFIED_SINCE) else {
        return false;
    };
    let modified = single_date(headers, &header::LAST_MODIFIED)
        .or_else(|| single_date(headers, &header::DATE));
    modified.is_some_and(|modified| modified <= since)
}

/// Weak comparison of entity tags (RFC 9110 section 8.8.3.2).
pub fn weak_eq(a: &str, b: &str) -> bool {
    let opaque = |t: &str| {
        let t = t.trim();
        t.strip_prefix("W/").unwrap_or(t).to_string()
    };
    opaque(a) == opaque(b)
}

/// The headers of a 304 answered from a stored response.
pub fn not_modified_headers(stored: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(NOT_MODIFIED_FIELDS.len() + 2);
    for name in NOT_MODIFIED_FIELDS {
        for value in stored.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}

/// The one satisfiable byte range a `Range` field asks of a body of `length`
/// bytes (RFC 9110 section 14.1.2); `None` for several ranges, other units,
/// malformed or unsatisfiable ones, which the origin answers instead.
pub fn single_byte_range(request: &HeaderMap, length: usize) -> Option<RangeInclusive<usize>> {
    let mut values = request.get_all(header::RANGE).iter();
    let value = values.next()?.to_str().ok()?;
    if values.next().is_some() || length == 0 {
        return None;
    }
    let (unit, spec) = value.trim().split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return None;
    }
    let (first, last) = spec.trim().split_once('-')?;
    let number = |text: &str| {
        (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
            .then(|| text.parse::<usize>().ok())
            .flatten()
    };
    let end = length - 1;
    match (first.trim(), last.trim()) {
        ("", suffix) => {
            let suffix = number(suffix)?;
            (suffix > 0).then(|| length.saturating_sub(suffix)..=end)
        }
        (first, "") => {
            let first = number(first)?;
            (first <= end).then_some(first..=end)
        }
        (first, last) => {
            let (first, last) = (number(first)?, number(last)?);
            (first <= last && first <= end).then(|| first..=last.min(end))
        }
    }
}

/// Conditional request fields a cache removes before filling, so the origin
/// sends a full response it can store.
pub const CLIENT_CONDITIONALS: &[HeaderName] = &[
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
];

/// Whether a 304 is about this stored response (RFC 9111 section 4.3.4): its
/// entity tag, else its Last-Modified, must be the stored one; a 304 with no
/// validator updates the response that was revalidated.
pub fn validators_match(stored: &HeaderMap, not_modified: &HeaderMap) -> bool {
    let text = |headers: &HeaderMap, name: &HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_string())
    };
    if let Some(etag) = text(not_modified, &header::ETAG) {
        return text(stored, &header::ETAG).is_some_and(|stored| weak_eq(&stored, &etag));
    }
    if let Some(modified) = single_date(not_modified, &header::LAST_MODIFIED) {
        return single_date(stored, &header::LAST_MODIFIED) == Some(modified);
    }
    true
}

/// Adds the validators of a stored response to a revalidation request.
pub fn add_validators(request: &mut HeaderMap, stored: &HeaderMap) {
    if let Some(etag) = stored.get(header::ETAG) {
        request.insert(header::IF_NONE_MATCH, etag.clone());
    }
    if let Some(modified) = stored.get(header::LAST_MODIFIED) {
        request.insert(header::IF_MODIFIED_SINCE, modified.clone());
    }
}

/// The `Date` field for a response stored without one.
pub fn date_value(time: SystemTime) -> HeaderValue {
    HeaderValue::from_str(&httpdate::fmt_http_date(time))
        .unwrap_or_else(|_| HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn lifetime(status: u16, pairs: &[(&str, &str)], date: SystemTime) -> Duration {
        let h = headers(pairs);
        let d = ResponseDirectives::parse(&h);
        freshness_lifetime(StatusCode::from_u16(status).unwrap(), &h, &d, date)
    }

    fn storable(
        status: u16,
        req: &[(&str, &str)],
        resp: &[(&str, &str)],
    ) -> Result<(), NotStorable> {
        let rq = headers(req);
        let rs = headers(resp);
        check_storable(
            &Method::GET,
            &rq,
            &RequestDirectives::parse(&rq),
            StatusCode::from_u16(status).unwrap(),
            &rs,
            &ResponseDirectives::parse(&rs),
            rs.contains_key(header::SET_COOKIE),
        )
    }

    #[test]
    fn s_maxage_wins_over_max_age_and_expires() {
        let date = at(1_000_000);
        let expires = httpdate::fmt_http_date(at(1_000_500));
        let all = [
            ("cache-control", "max-age=100, s-maxage=20"),
            ("expires", expires.as_str()),
        ];
        assert_eq!(lifetime(200, &all, date), Duration::from_secs(20));
        let no_s = [
            ("cache-control", "max-age=100"),
            ("expires", expires.as_str()),
        ];
        assert_eq!(lifetime(200, &no_s, date), Duration::from_secs(100));
        let only_expires = [("expires", expires.as_str())];
        assert_eq!(lifetime(200, &only_expires, date), Duration::from_secs(500));
    }

    #[test]
    fn invalid_expires_means_already_stale() {
        assert_eq!(lifetime(200, &[("expires", "0")], at(10)), Duration::ZERO);
    }

    #[test]
    fn heuristic_is_a_tenth_of_last_modified_age_capped_at_a_day() {
        let date = at(10_000_000);
        let lm = httpdate::fmt_http_date(at(10_000_000 - 1000));
        assert_eq!(
            lifetime(200, &[("last-modified", lm.as_str())], date),
            Duration::from_secs(100)
        );
        let old = httpdate::fmt_http_date(at(1_000));
        assert_eq!(
            lifetime(200, &[("last-modified", old.as_str())], date),
            HEURISTIC_CAP
        );
        assert_eq!(
            lifetime(302, &[("last-modified", lm.as_str())], date),
            Duration::ZERO
        );
        assert_eq!(
            lifetime(
                302,
                &[("last-modified", lm.as_str()), ("cache-control", "public")],
                date
            ),
            Duration::from_secs(100)
        );
    }

    #[test]
    fn age_follows_rfc9111_section_4_2_3() {
        let h = headers(&[("age", "10"), ("date", &httpdate::fmt_http_date(at(1000)))]);
        let timing = Timing::new(at(1000), at(1002), &h);
        // corrected age value (10 + 2) beats apparent age (2).
        assert_eq!(timing.corrected_initial_age, Duration::from_secs(12));
        assert_eq!(timing.current_age(at(1010)), Duration::from_secs(20));
        let skewed = headers(&[("date", &httpdate::fmt_http_date(at(900)))]);
        let timing = Timing::new(at(1000), at(1000), &skewed);
        assert_eq!(timing.corrected_initial_age, Duration::from_secs(100));
    }

    #[test]
    fn invalid_or_listed_age_values() {
        assert_eq!(age_value(&headers(&[("age", "abc")])), Duration::ZERO);
        assert_eq!(
            age_value(&headers(&[("age", "5, 7")])),
            Duration::from_secs(5)
        );
        assert_eq!(age_value(&headers(&[("age", "-3")])), Duration::ZERO);
        let huge = headers(&[("age", "18446744073709551615")]);
        assert_eq!(age_value(&huge), Duration::from_secs(DELTA_SECONDS_MAX));
        let timing = Timing::new(at(1000), at(1002), &huge);
        assert!(timing.current_age(at(5000)) > Duration::from_secs(DELTA_SECONDS_MAX));
    }

    #[test]
    fn storability_rules_for_a_shared_cache() {
        assert_eq!(
            storable(200, &[], &[("cache-control", "max-age=5")]),
            Ok(())
        );
        assert_eq!(storable(200, &[], &[]), Err(NotStorable::NothingToReuse));
        assert_eq!(
            storable(
                200,
                &[],
                &[("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT")]
            ),
            Ok(())
        );
        assert_eq!(storable(200, &[], &[("etag", "\"a\"")]), Ok(()));
        assert_eq!(
            storable(206, &[], &[("cache-control", "max-age=5")]),
            Err(NotStorable::Status)
        );
        assert_eq!(
            storable(200, &[], &[("cache-control", "private, max-age=5")]),
            Err(NotStorable::Private)
        );
        assert_eq!(
            storable(200, &[], &[("cache-control", "no-store, max-age=5")]),
            Err(NotStorable::NoStore)
        );
        assert_eq!(
            storable(
                200,
                &[("cache-control", "no-store")],
                &[("cache-control", "max-age=5")]
            ),
            Err(NotStorable::RequestNoStore)
        );
        assert_eq!(
            storable(
                200,
                &[("authorization", "x")],
                &[("cache-control", "max-age=5")]
            ),
            Err(NotStorable::Authorization)
        );
        assert_eq!(
            storable(
                200,
                &[("authorization", "x")],
                &[("cache-control", "public, max-age=5")]
            ),
            Ok(())
        );
        assert_eq!(
            storable(
                200,
                &[],
                &[("cache-control", "max-age=5"), ("set-cookie", "a=b")]
            ),
            Err(NotStorable::SetCookie)
        );
        assert_eq!(
            storable(
                200,
                &[],
                &[("cache-control", "max-age=5"), ("vary", "accept, *")]
            ),
            Err(NotStorable::VaryStar)
        );
        assert_eq!(
            storable(500, &[], &[("cache-control", "max-age=5")]),
            Ok(())
        );
        assert_eq!(
            storable(
                302,
                &[],
                &[("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT")]
            ),
            Ok(())
        );
    }

    #[test]
    fn conditionals_use_weak_comparison_and_if_none_match_wins() {
        let stored = headers(&[
            ("etag", "W/\"v1\""),
            ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
        ]);
        let ok = StatusCode::OK;
        assert!(is_not_modified(
            &headers(&[("if-none-match", "\"v1\"")]),
            ok,
            &stored
        ));
        assert!(is_not_modified(
            &headers(&[("if-none-match", "\"x\", W/\"v1\"")]),
            ok,
            &stored
        ));
        assert!(is_not_modified(
            &headers(&[("if-none-match", "*")]),
            ok,
            &stored
        ));
        assert!(!is_not_modified(
            &headers(&[
                ("if-none-match", "\"x\""),
                ("if-modified-since", "Tue, 02 Jan 2024 00:00:00 GMT")
            ]),
            ok,
            &stored
        ));
        assert!(is_not_modified(
            &headers(&[("if-modified-since", "Tue, 02 Jan 2024 00:00:00 GMT")]),
            ok,
            &stored
        ));
        assert!(!is_not_modified(
            &headers(&[("if-modified-since", "Sun, 31 Dec 2023 00:00:00 GMT")]),
            ok,
            &stored
        ));
    }

    #[test]
    fn a_304_must_name_the_stored_representation() {
        let stored = headers(&[
            ("etag", "\"v1\""),
            ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
        ]);
        assert!(validators_match(&stored, &headers(&[("etag", "\"v1\"")])));
        assert!(validators_match(&stored, &headers(&[("etag", "W/\"v1\"")])));
        assert!(!validators_match(&stored, &headers(&[("etag", "\"v2\"")])));
        assert!(validators_match(
            &stored,
            &headers(&[("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT")])
        ));
        assert!(!validators_match(
            &stored,
            &headers(&[("last-modified", "Tue, 02 Jan 2024 00:00:00 GMT")])
        ));
        assert!(validators_match(&stored, &headers(&[])));
    }

    #[test]
    fn one_satisfiable_byte_range_is_read_and_anything_else_is_not() {
        let range =
            |value: &str, length: usize| single_byte_range(&headers(&[("range", value)]), length);
        assert_eq!(range("bytes=0-1", 11), Some(0..=1));
        assert_eq!(range("bytes=1-", 11), Some(1..=10));
        assert_eq!(range("bytes=-1", 11), Some(10..=10));
        assert_eq!(range("bytes=-50", 11), Some(0..=10));
        assert_eq!(range("Bytes=5-100", 11), Some(5..=10));
        assert_eq!(range("bytes=11-", 11), None);
        assert_eq!(range("bytes=-0", 11), None);
        assert_eq!(range("bytes=3-2", 11), None);
        assert_eq!(range("bytes=0-1,3-4", 11), None);
        assert_eq!(range("items=0-1", 11), None);
        assert_eq!(range("bytes=a-1", 11), None);
        assert_eq!(range("bytes=0-1", 0), None);
    }

    #[test]
    fn dates_in_the_wrong_case_are_read_but_other_defects_are_not() {
        let date = |value: &str| single_date(&headers(&[("expires", value)]), &header::EXPIRES);
        let expected = date("Thu, 18 Aug 2050 02:01:18 GMT");
        assert!(expected.is_some());
        assert_eq!(date("THU, 18 AUG 2050 02:01:18 gmt"), expected);
        assert_eq!(date("Thu, 18 Aug 2050 02:01:18 UTC"), None);
        assert_eq!(date("thu, 18 Aug 50 02:01:18 GMT"), None);
        assert_eq!(date("0"), None);
    }

    #[test]
    fn connection_listed_and_withheld_fields_are_not_stored() {
        let mut stored = storable_headers(&headers(&[
            ("connection", "A, b"),
            ("a", "1"),
            ("b", "2"),
            ("c", "3"),
            ("x-user", "alice"),
        ]));
        assert!(stored.get("a").is_none() && stored.get("b").is_none());
        assert!(stored.get("connection").is_none());
        let directives =
            ResponseDirectives::parse(&headers(&[("cache-control", "private=\"x-user\"")]));
        assert!(withhold(&mut stored, &directives));
        assert!(stored.get("x-user").is_none());
        assert_eq!(stored.get("c").unwrap(), "3");
        assert!(!withhold(&mut stored, &directives));
    }

    #[test]
    fn a_304_replaces_fields_but_not_the_body_framing() {
        let stored = headers(&[
            ("content-length", "10"),
            ("x-a", "old"),
            ("x-b", "kept"),
            ("etag", "\"1\""),
        ]);
        let update = headers(&[
            ("content-length", "0"),
            ("x-a", "new"),
            ("connection", "close"),
            ("age", "3"),
        ]);
        let merged = merge_not_modified(&stored, &update);
        assert_eq!(merged.get("content-length").unwrap(), "10");
        assert_eq!(merged.get("x-a").unwrap(), "new");
        assert_eq!(merged.get("x-b").unwrap(), "kept");
        assert!(merged.get("connection").is_none());
        assert!(merged.get("age").is_none());
    }
}
