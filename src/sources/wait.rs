//! Clients that wait for a source's next change (a long poll): a read that
//! names the version it has and how long it will wait is answered as soon
//! as the value changes, or with 304 when the wait runs out.
//!
//! Owns the wait's request syntax: Consul's `?wait=30s` with `?version=`
//! (or `?index=`), RFC 7240's `Prefer: wait=30` with `If-None-Match`.
//! Must not hold a thread per waiter: a waiter is a future parked on the
//! slot's `Notify`.

use std::time::Duration;

use http::header::{self, HeaderMap};
use http::uri::Uri;

use crate::http::error::RequestError;

/// The longest wait granted (Consul's limit); longer asks are cut to it.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// A read that waits for a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wait {
    /// The versions (entity tags) the client has; it waits while the value is one of them.
    pub known: Vec<String>,
    /// How long it waits at most.
    pub duration: Duration,
}

impl Wait {
    /// Whether the value with `has_etag` is still one the client has.
    pub fn is_known(&self, has_etag: impl Fn(&str) -> bool) -> bool {
        self.known.iter().any(|tag| tag == "*" || has_etag(tag))
    }
}

/// The wait a read asks for, if any. A wait without a version is no wait
/// (there is nothing to compare with): the read is answered at once.
/// A malformed `?wait=` is refused; a malformed `Prefer` is ignored, as
/// RFC 7240 asks of preferences a server does not understand.
pub fn requested(uri: &Uri, headers: &HeaderMap) -> Result<Option<Wait>, RequestError> {
    let mut duration = None;
    let mut known = Vec::new();
    if let Some(query) = uri.query() {
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*name {
                "wait" => duration = Some(parse_query_wait(&value)?),
                "version" | "index" if !value.is_empty() => known.push(value.into_owned()),
                _ => {}
            }
        }
    }
    if duration.is_none() {
        duration = headers
            .get_all("prefer")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .find_map(prefer_wait);
    }
    if known.is_empty() {
        known = headers
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|list| list.split(','))
            .map(|tag| tag.trim().to_string())
            .filter(|tag| !tag.is_empty())
            .collect();
    }
    Ok(match duration {
        Some(duration) if !known.is_empty() && !duration.is_zero() => Some(Wait {
            known,
            duration: duration.min(MAX_WAIT),
        }),
        _ => None,
    })
}

/// `30s`, `1m30s`, `500ms`, or bare seconds (`30`), as Consul reads it.
fn parse_query_wait(text: &str) -> Result<Duration, RequestError> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(text).map_err(|_| {
        RequestError::bad_request(format!(
            "wait={text:?} is not a duration (e.g. wait=30s, at most {}s)",
            MAX_WAIT.as_secs()
        ))
    })
}

/// The `wait` preference of one `Prefer` field value (RFC 7240 §4.3:
/// `wait=<delta-seconds>`), if it has a valid one.
fn prefer_wait(field: &str) -> Option<Duration> {
    field.split(',').find_map(|preference| {
        let first = preference.split(';').next()?.trim();
        let (name, value) = first.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("wait") {
            return None;
        }
        let seconds = value.trim().trim_matches('"').parse::<u64>().ok()?;
        Some(Duration::from_secs(seconds))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(uri: &str, headers: &[(&str, &str)]) -> Result<Option<Wait>, RequestError> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                http::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        requested(&uri.parse().unwrap(), &map)
    }

    #[test]
    fn consul_style_query_and_rfc_7240_prefer_both_ask_for_a_wait() {
        let wait = ask("/flags?version=42&wait=30s", &[]).unwrap().unwrap();
        assert_eq!(wait.known, vec!["42".to_string()]);
        assert_eq!(wait.duration, Duration::from_secs(30));
        let wait = ask("/flags?index=7&wait=1500ms", &[]).unwrap().unwrap();
        assert_eq!(wait.duration, Duration::from_millis(1500));
        let wait = ask(
            "/flags",
            &[
                ("prefer", "respond-async, wait=10"),
                ("if-none-match", "\"9\""),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(wait.known, vec!["\"9\"".to_string()]);
        assert_eq!(wait.duration, Duration::from_secs(10));
    }

    #[test]
    fn no_version_or_no_wait_means_an_answer_at_once() {
        assert_eq!(ask("/flags?wait=30s", &[]).unwrap(), None);
        assert_eq!(ask("/flags", &[("if-none-match", "\"9\"")]).unwrap(), None);
        assert_eq!(ask("/flags?version=1&wait=0", &[]).unwrap(), None);
    }

    #[test]
    fn long_waits_are_cut_and_bad_ones_refused_or_ignored() {
        let wait = ask("/f?version=1&wait=2h", &[]).unwrap().unwrap();
        assert_eq!(wait.duration, MAX_WAIT);
        assert!(ask("/f?version=1&wait=soon", &[]).is_err());
        let ignored = ask("/f", &[("prefer", "wait=soon"), ("if-none-match", "\"1\"")]);
        assert_eq!(ignored.unwrap(), None);
    }

    #[test]
    fn a_wait_lasts_while_the_value_is_one_the_client_has() {
        let wait = ask("/f?version=3&wait=5", &[]).unwrap().unwrap();
        assert!(wait.is_known(|tag| tag == "3"));
        assert!(!wait.is_known(|tag| tag == "4"));
    }
}
