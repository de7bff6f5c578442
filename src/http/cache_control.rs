//! Cache-Control parsing (RFC 9111 section 5.2) into plain structs, one for
//! requests and one for responses; targeted fields such as
//! `CDN-Cache-Control` (RFC 9213: structured-field dictionaries) into the
//! same response struct.
//!
//! Pure and allocation-light: no I/O, no clocks. Must not decide policy; the
//! rules that combine directives live in `cache::policy`. Here rather than in
//! the cache because plugins read `no-transform` too.

use http::header::{CACHE_CONTROL, PRAGMA};
use http::{HeaderMap, HeaderName};

/// The largest delta-seconds a cache must handle; bigger values saturate to it
/// (RFC 9111 section 1.2.2).
pub const DELTA_SECONDS_MAX: u64 = 2_147_483_648;

/// Whether a response's `Cache-Control` says `no-transform`: a proxy must
/// then not change its content (RFC 9110 section 7.7), plugins included.
pub fn forbids_transform(headers: &HeaderMap) -> bool {
    ResponseDirectives::parse(headers).no_transform
}

/// The `Cache-Control` of `headers` with its `s-maxage` set to `seconds`
/// (any earlier one dropped, every other directive kept): how a plugin
/// gives a stored entry its freshness lifetime.
pub fn with_s_maxage(headers: &HeaderMap, seconds: u32) -> http::HeaderValue {
    let mut directives: Vec<String> = headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(split_list)
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .filter(|item| {
            let name = item.split_once('=').map_or(*item, |(name, _)| name);
            !name.trim().eq_ignore_ascii_case("s-maxage")
        })
        .map(str::to_string)
        .collect();
    directives.push(format!("s-maxage={seconds}"));
    // Joined from values that were visible ASCII already: always valid.
    // Were it not, `no-store` is the safe reading of a field we cannot write.
    http::HeaderValue::from_str(&directives.join(", "))
        .unwrap_or_else(|_| http::HeaderValue::from_static("no-store"))
}

/// Whether every `Cache-Control` line can be read: visible ASCII, each
/// directive a token with an optional token or quoted-string argument
/// (RFC 9111 section 5.2). One that cannot might have said `no-store`.
pub fn is_well_formed(headers: &HeaderMap) -> bool {
    headers.get_all(CACHE_CONTROL).iter().all(|value| {
        let Ok(text) = value.to_str() else {
            return false;
        };
        let mut in_quotes = false;
        let mut escaped = false;
        for byte in text.bytes() {
            if escaped {
                escaped = false;
                continue;
            }
            match byte {
                b'\\' if in_quotes => escaped = true,
                b'"' => in_quotes = !in_quotes,
                _ => {}
            }
        }
        !in_quotes
            && split_list(text).all(|item| {
                let name = item.split_once('=').map_or(item, |(name, _)| name);
                !name.is_empty() && name.bytes().all(is_token_byte)
            })
    })
}

/// RFC 9110 section 5.6.2 `tchar`.
fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// A directive's numeric argument as written: missing, a valid delta-seconds,
/// or something else (which the freshness rules treat as "already stale").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seconds {
    Valid(u64),
    Invalid,
}

impl Seconds {
    pub fn valid(self) -> Option<u64> {
        match self {
            Self::Valid(s) => Some(s),
            Self::Invalid => None,
        }
    }
}

/// Response directives a shared cache acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseDirectives {
    pub no_store: bool,
    /// Unqualified `no-cache` only; the qualified form names `withheld` fields.
    pub no_cache: bool,
    /// Unqualified `private` only; the qualified form names `withheld` fields.
    pub private: bool,
    /// Fields named by qualified `no-cache="..."` or `private="..."`: a shared
    /// cache stores the response without them (RFC 9111 sections 5.2.2.4 and
    /// 5.2.2.7). Empty (no allocation) for nearly every response.
    pub withheld: Vec<HeaderName>,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub must_understand: bool,
    pub immutable: bool,
    /// Intermediaries must not change the content (RFC 9110 section 7.7).
    pub no_transform: bool,
    pub max_age: Option<Seconds>,
    pub s_maxage: Option<Seconds>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
    /// Read from a targeted field (RFC 9213): `Cache-Control` and `Expires`
    /// then do not count for this cache.
    pub targeted: bool,
}

impl ResponseDirectives {
    /// The directives of the first field of `targets` that is present,
    /// non-empty and a valid dictionary (RFC 9213 section 2.1); otherwise
    /// those of `Cache-Control`.
    pub fn parse_targeted(headers: &HeaderMap, targets: &[HeaderName]) -> Self {
        targets
            .iter()
            .find_map(|name| Self::parse_targeted_field(headers, name))
            .unwrap_or_else(|| Self::parse(headers))
    }

    /// One targeted field as directives; `None` when it is absent, empty or
    /// not a structured-field dictionary (then ignored as a whole, RFC 9213
    /// section 2.2). Members' parameters and inner lists are ignored;
    /// `?0` turns a directive off; arguments are integers (seconds) or a
    /// string or token of field names.
    fn parse_targeted_field(headers: &HeaderMap, name: &HeaderName) -> Option<Self> {
        let mut joined = Vec::new();
        for line in headers.get_all(name) {
            if !joined.is_empty() {
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(line.as_bytes());
        }
        let dictionary: sfv::Dictionary = sfv::Parser::new(&joined).parse_dictionary().ok()?;
        if dictionary.is_empty() {
            return None;
        }
        let mut parsed = Self {
            targeted: true,
            ..Self::default()
        };
        for (key, member) in &dictionary {
            let sfv::ListEntry::Item(item) = member else {
                continue;
            };
            let value = &item.bare_item;
            let on = !matches!(value, sfv::BareItem::Boolean(false));
            match key.as_str() {
                "no-store" => parsed.no_store = on,
                "no-cache" => match sf_field_names(value) {
                    Some(names) => parsed.withheld.extend(names),
                    None => parsed.no_cache = on,
                },
                "private" => match sf_field_names(value) {
                    Some(names) => parsed.withheld.extend(names),
                    None => parsed.private = on,
                },
                "public" => parsed.public = on,
                "must-revalidate" => parsed.must_revalidate = on,
                "proxy-revalidate" => parsed.proxy_revalidate = on,
                "must-understand" => parsed.must_understand = on,
                "immutable" => parsed.immutable = on,
                "no-transform" => parsed.no_transform = on,
                "max-age" => parsed.max_age = Some(sf_seconds(value)),
                "s-maxage" => parsed.s_maxage = Some(sf_seconds(value)),
                "stale-while-revalidate" => {
                    parsed.stale_while_revalidate = sf_seconds(value).valid();
                }
                "stale-if-error" => parsed.stale_if_error = sf_seconds(value).valid(),
                _ => {}
            }
        }
        Some(parsed)
    }

    pub fn parse(headers: &HeaderMap) -> Self {
        let mut parsed = Self::default();
        for (name, value) in directives(headers) {
            match lowercase(name).as_ref() {
                "no-store" => parsed.no_store = true,
                "no-cache" => match field_names(value) {
                    Some(names) => parsed.withheld.extend(names),
                    None => parsed.no_cache = true,
                },
                "private" => match field_names(value) {
                    Some(names) => parsed.withheld.extend(names),
                    None => parsed.private = true,
                },
                "public" => parsed.public = true,
                "must-revalidate" => parsed.must_revalidate = true,
                "proxy-revalidate" => parsed.proxy_revalidate = true,
                "must-understand" => parsed.must_understand = true,
                "immutable" => parsed.immutable = true,
                "no-transform" => parsed.no_transform = true,
                "max-age" => parsed.max_age = Some(merge(parsed.max_age, value)),
                "s-maxage" => parsed.s_maxage = Some(merge(parsed.s_maxage, value)),
                "stale-while-revalidate" => {
                    parsed.stale_while_revalidate = delta_seconds(value).valid()
                }
                "stale-if-error" => parsed.stale_if_error = delta_seconds(value).valid(),
                _ => {}
            }
        }
        parsed
    }

    /// `must-revalidate` or, for a shared cache, `proxy-revalidate`: once
    /// stale, never served without a successful validation.
    pub fn forbids_stale(&self) -> bool {
        self.must_revalidate || self.proxy_revalidate || self.no_cache
    }

    /// The directives that let a shared cache reuse a response to a request
    /// carrying `Authorization` (RFC 9111 section 3.5).
    pub fn allows_authorized(&self) -> bool {
        self.public || self.s_maxage.is_some() || self.must_revalidate
    }
}

/// A targeted directive's delta-seconds: a non-negative integer (larger
/// ones saturate), anything else invalid.
fn sf_seconds(value: &sfv::BareItem) -> Seconds {
    match value {
        sfv::BareItem::Integer(n) => u64::try_from(i64::from(*n)).map_or(Seconds::Invalid, |s| {
            Seconds::Valid(s.min(DELTA_SECONDS_MAX))
        }),
        _ => Seconds::Invalid,
    }
}

/// The field names of a targeted `private="..."` or `no-cache="..."`.
fn sf_field_names(value: &sfv::BareItem) -> Option<Vec<HeaderName>> {
    let text = match value {
        sfv::BareItem::String(text) => text.as_str(),
        sfv::BareItem::Token(token) => token.as_str(),
        _ => return None,
    };
    Some(
        text.split(',')
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect(),
    )
}

/// Request directives (RFC 9111 section 5.2.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestDirectives {
    /// Also set by `Pragma: no-cache` when the request has no Cache-Control.
    pub no_cache: bool,
    pub no_store: bool,
    pub only_if_cached: bool,
    pub max_age: Option<u64>,
    pub min_fresh: Option<u64>,
    /// `Some(None)`: any staleness is acceptable; `Some(Some(n))`: up to n seconds.
    pub max_stale: Option<Option<u64>>,
    pub stale_if_error: Option<u64>,
}

impl RequestDirectives {
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut parsed = Self::default();
        if !headers.contains_key(CACHE_CONTROL) {
            parsed.no_cache = pragma_no_cache(headers);
            return parsed;
        }
        for (name, value) in directives(headers) {
            match lowercase(name).as_ref() {
                "no-cache" => parsed.no_cache = true,
                "no-store" => parsed.no_store = true,
                "only-if-cached" => parsed.only_if_cached = true,
                // An invalid max-age asks for nothing older than zero seconds.
                "max-age" => parsed.max_age = Some(delta_seconds(value).valid().unwrap_or(0)),
                "min-fresh" => parsed.min_fresh = delta_seconds(value).valid(),
                "max-stale" => {
                    parsed.max_stale = match value {
                        None => Some(None),
                        Some(_) => delta_seconds(value).valid().map(Some),
                    }
                }
                "stale-if-error" => parsed.stale_if_error = delta_seconds(value).valid(),
                _ => {}
            }
        }
        parsed
    }
}

/// The field names of a qualified `no-cache="a, b"` / `private="a"`; `None`
/// for the unqualified form, and for an argument naming no valid field (then
/// the unqualified, stricter reading applies).
fn field_names(value: Option<&str>) -> Option<Vec<HeaderName>> {
    let raw = value?;
    let list = raw
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(raw);
    let names: Option<Vec<HeaderName>> = list
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    names.filter(|names| !names.is_empty())
}

/// Directive names are case-insensitive; most arrive lowercase, which then
/// costs no allocation.
fn lowercase(name: &str) -> std::borrow::Cow<'_, str> {
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(name.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

fn pragma_no_cache(headers: &HeaderMap) -> bool {
    headers
        .get_all(PRAGMA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-cache"))
}

/// A directive seen twice keeps its first value (RFC 9111 section 4.2.1
/// allows using the first occurrence).
fn merge(previous: Option<Seconds>, value: Option<&str>) -> Seconds {
    previous.unwrap_or_else(|| delta_seconds(value))
}

/// Parses delta-seconds (RFC 9111 section 1.2.2): digits only, quotes
/// tolerated, saturating at 2^31.
pub fn delta_seconds(value: Option<&str>) -> Seconds {
    let Some(raw) = value else {
        return Seconds::Invalid;
    };
    let digits = raw
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(raw);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Seconds::Invalid;
    }
    let seconds = digits.parse::<u64>().unwrap_or(DELTA_SECONDS_MAX);
    Seconds::Valid(seconds.min(DELTA_SECONDS_MAX))
}

/// Every `name[=value]` directive across all Cache-Control field lines;
/// commas inside quoted strings do not split.
fn directives(headers: &HeaderMap) -> impl Iterator<Item = (&str, Option<&str>)> {
    headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(split_list)
        .filter_map(|item| {
            // No whitespace around '=' in the grammar: `max-age = 5` is not max-age.
            let (name, value) = match item.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (item, None),
            };
            (!name.is_empty()).then_some((name, value))
        })
}

/// Splits a comma-separated field value, honouring double quotes.
pub fn split_list(value: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(value);
    std::iter::from_fn(move || {
        loop {
            let current = rest?;
            let mut in_quotes = false;
            let mut cut = None;
            for (i, b) in current.bytes().enumerate() {
                match b {
                    b'"' => in_quotes = !in_quotes,
                    b',' if !in_quotes => {
                        cut = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let item = match cut {
                Some(i) => {
                    rest = Some(&current[i + 1..]);
                    &current[..i]
                }
                None => {
                    rest = None;
                    current
                }
            };
            let item = item.trim();
            if !item.is_empty() {
                return Some(item);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_targeted_dictionary_reads_as_directives_across_lines() {
        let cdn = HeaderName::from_static("cdn-cache-control");
        let mut headers = HeaderMap::new();
        headers.append(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.append(
            &cdn,
            HeaderValue::from_static("max-age=60;x=1, must-revalidate"),
        );
        headers.append(
            &cdn,
            HeaderValue::from_static("private=\"set-cookie\", no-cache=?0, s-maxage=(1 2)"),
        );
        let parsed = ResponseDirectives::parse_targeted(&headers, std::slice::from_ref(&cdn));
        assert!(parsed.targeted && !parsed.no_store, "{parsed:?}");
        assert_eq!(
            parsed.max_age,
            Some(Seconds::Valid(60)),
            "parameters ignored"
        );
        assert!(parsed.must_revalidate);
        assert_eq!(parsed.withheld, [HeaderName::from_static("set-cookie")]);
        assert!(!parsed.no_cache, "?0 is off");
        assert_eq!(parsed.s_maxage, None, "an inner list is no directive");

        let negative = headers_with(&cdn, "max-age=-1");
        let parsed = ResponseDirectives::parse_targeted(&negative, std::slice::from_ref(&cdn));
        assert_eq!(parsed.max_age, Some(Seconds::Invalid));
        for ignored in ["", "max-age=60,", "Max-Age=60", "a=\"unterminated"] {
            let headers = headers_with(&cdn, ignored);
            let parsed = ResponseDirectives::parse_targeted(&headers, std::slice::from_ref(&cdn));
            assert!(!parsed.targeted, "{ignored:?} is ignored: {parsed:?}");
        }
    }

    fn headers_with(name: &HeaderName, value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(name, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn s_maxage_is_replaced_and_other_directives_kept() {
        let mut headers = HeaderMap::new();
        headers.append(
            CACHE_CONTROL,
            HeaderValue::from_static("public, s-maxage=5"),
        );
        headers.append(CACHE_CONTROL, HeaderValue::from_static("max-age=1"));
        assert_eq!(
            with_s_maxage(&headers, 60),
            "public, max-age=1, s-maxage=60"
        );
        assert_eq!(with_s_maxage(&HeaderMap::new(), 7), "s-maxage=7");
    }
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn response_directives_are_read_across_field_lines_and_cases() {
        let parsed = ResponseDirectives::parse(&headers(&[
            ("cache-control", "Public, MAX-AGE=60"),
            ("cache-control", "s-maxage=\"30\", stale-while-revalidate=5"),
        ]));
        assert!(parsed.public);
        assert_eq!(parsed.max_age, Some(Seconds::Valid(60)));
        assert_eq!(parsed.s_maxage, Some(Seconds::Valid(30)));
        assert_eq!(parsed.stale_while_revalidate, Some(5));
    }

    #[test]
    fn duplicate_max_age_keeps_the_first_and_spaces_around_equals_are_not_syntax() {
        let parsed =
            ResponseDirectives::parse(&headers(&[("cache-control", "max-age=60, max-age=30")]));
        assert_eq!(parsed.max_age, Some(Seconds::Valid(60)));
        let spaced = ResponseDirectives::parse(&headers(&[("cache-control", "max-age =60")]));
        assert_eq!(spaced.max_age, None);
        let after = ResponseDirectives::parse(&headers(&[("cache-control", "max-age= 60")]));
        assert_eq!(after.max_age, Some(Seconds::Invalid));
    }

    #[test]
    fn delta_seconds_rejects_signs_and_fractions_and_saturates() {
        assert_eq!(delta_seconds(Some("10")), Seconds::Valid(10));
        assert_eq!(delta_seconds(Some("-1")), Seconds::Invalid);
        assert_eq!(delta_seconds(Some("+1")), Seconds::Invalid);
        assert_eq!(delta_seconds(Some("1.5")), Seconds::Invalid);
        assert_eq!(delta_seconds(None), Seconds::Invalid);
        assert_eq!(
            delta_seconds(Some("99999999999999999999999")),
            Seconds::Valid(DELTA_SECONDS_MAX)
        );
    }

    #[test]
    fn qualified_private_and_no_cache_name_withheld_fields() {
        let parsed = ResponseDirectives::parse(&headers(&[(
            "cache-control",
            "private=\"Set-Cookie, x-a\", No-Cache=\"x-b\", max-age=10",
        )]));
        assert!(!parsed.private);
        assert!(!parsed.no_cache);
        assert_eq!(parsed.withheld, ["set-cookie", "x-a", "x-b"]);
        assert_eq!(parsed.max_age, Some(Seconds::Valid(10)));
    }

    #[test]
    fn unqualified_or_unusable_arguments_keep_the_strict_reading() {
        for value in ["private, no-cache", "private=\"\", no-cache=\"a b\""] {
            let parsed = ResponseDirectives::parse(&headers(&[("cache-control", value)]));
            assert!(parsed.private && parsed.no_cache, "{value}");
            assert!(parsed.withheld.is_empty(), "{value}");
        }
        let both =
            ResponseDirectives::parse(&headers(&[("cache-control", "no-cache=\"a\", no-cache")]));
        assert!(both.no_cache);
    }

    #[test]
    fn request_pragma_no_cache_applies_only_without_cache_control() {
        let pragma = RequestDirectives::parse(&headers(&[("pragma", "no-cache")]));
        assert!(pragma.no_cache);
        let both = RequestDirectives::parse(&headers(&[
            ("pragma", "no-cache"),
            ("cache-control", "max-age=10"),
        ]));
        assert!(!both.no_cache);
        assert_eq!(both.max_age, Some(10));
    }

    #[test]
    fn request_max_stale_with_and_without_value() {
        let any = RequestDirectives::parse(&headers(&[("cache-control", "max-stale")]));
        assert_eq!(any.max_stale, Some(None));
        let bounded = RequestDirectives::parse(&headers(&[("cache-control", "max-stale=5")]));
        assert_eq!(bounded.max_stale, Some(Some(5)));
        let flags = RequestDirectives::parse(&headers(&[(
            "cache-control",
            "only-if-cached, no-store, min-fresh=3",
        )]));
        assert!(flags.only_if_cached && flags.no_store);
        assert_eq!(flags.min_fresh, Some(3));
    }

    #[test]
    fn list_split_keeps_quoted_commas() {
        let items: Vec<_> = split_list(" a, b=\"x, y\" ,, c ").collect();
        assert_eq!(items, vec!["a", "b=\"x, y\"", "c"]);
    }

    #[test]
    fn unreadable_lines_are_not_well_formed() {
        assert!(is_well_formed(&headers(&[(
            "cache-control",
            "public, max-age=60"
        )])));
        assert!(is_well_formed(&headers(&[(
            "cache-control",
            "private=\"set-cookie, x\""
        )])));
        assert!(!is_well_formed(&headers(&[(
            "cache-control",
            "max-age=60, \"oops"
        )])));
        assert!(!is_well_formed(&headers(&[(
            "cache-control",
            "max age=60"
        )])));
        let mut bytes = HeaderMap::new();
        bytes.insert(
            CACHE_CONTROL,
            http::HeaderValue::from_bytes(b"private, x\xff").unwrap(),
        );
        assert!(!is_well_formed(&bytes));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any bytes in any number of lines: no panic, and a line that
            /// is not visible ASCII never counts as well formed.
            #[test]
            fn any_field_lines_parse_without_panic(
                lines in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..4)
            ) {
                let mut headers = HeaderMap::new();
                for line in &lines {
                    if let Ok(value) = http::HeaderValue::from_bytes(line) {
                        headers.append(CACHE_CONTROL, value);
                    }
                }
                let _ = RequestDirectives::parse(&headers);
                let parsed = ResponseDirectives::parse(&headers);
                let well_formed = is_well_formed(&headers);
                if headers.get_all(CACHE_CONTROL).iter().any(|v| v.to_str().is_err()) {
                    prop_assert!(!well_formed);
                }
                if well_formed {
                    // Parsing is deterministic.
                    prop_assert_eq!(parsed, ResponseDirectives::parse(&headers));
                }
            }
        }
    }
}
