//! Request paths as routes see them and upstreams get them: normalised the
//! way RFC 3986 section 6 and nginx's `merge_slashes` do (unreserved
//! characters percent-decoded, percent-encodings in upper case, repeated
//! slashes merged, dot segments resolved), so `/%61dmin`, `//admin` and
//! `/x/../admin` are all `/admin` before any route matches. A path that
//! cannot be normalised without changing what it names is refused: an
//! encoded slash (`%2F`), a NUL, a bad percent-encoding, or a dot segment
//! that would climb above the root.
//!
//! Pure functions; the query is never touched.

use std::borrow::Cow;

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path contains an encoded slash (%2F)")]
    EncodedSlash,
    #[error("the path contains a NUL byte")]
    Nul,
    #[error("the path has a malformed percent-encoding")]
    BadEncoding,
    #[error("the path climbs above the root (..)")]
    AboveRoot,
    #[error("the path does not start with /")]
    NotAbsolute,
}

/// The normalised form of `path` (borrowed when it is already normal).
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if is_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let decoded = decode_unreserved(path)?;
    let mut segments: Vec<&str> = Vec::new();
    // Empty segments (repeated slashes) go; "." goes; ".." drops one.
    let ends_with_slash =
        decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            other => segments.push(other),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for segment in &segments {
        normal.push('/');
        normal.push_str(segment);
    }
    if ends_with_slash || segments.is_empty() {
        normal.push('/');
    }
    Ok(Cow::Owned(normal))
}

/// The common case, checked in one pass: no `%`, no NUL, no `//`, no dot
/// segment.
fn is_normal(path: &str) -> bool {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return false;
    }
    let mut previous = b'/';
    for (index, &byte) in bytes.iter().enumerate().skip(1) {
        match byte {
            b'%' | 0 => return false,
            b'/' if previous == b'/' => return false,
            b'.' if previous == b'/' => {
                let rest = &bytes[index..];
                let segment_end = rest.iter().position(|b| *b == b'/').unwrap_or(rest.len());
                if matches!(&rest[..segment_end], b"." | b"..") {
                    return false;
                }
            }
            _ => {}
        }
        previous = byte;
    }
    true
}

/// Decodes `%XX` of unreserved characters and upper-cases the others;
/// refuses `%2F`, `%00`, NUL and malformed escapes.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        match byte {
            0 => return Err(PathError::Nul),
            b'%' => {
                let (Some(high), Some(low)) = (
                    bytes.get(index + 1).and_then(|b| hex(*b)),
                    bytes.get(index + 2).and_then(|b| hex(*b)),
                ) else {
                    return Err(PathError::BadEncoding);
                };
                let value = high * 16 + low;
                match value {
                    b'/' => return Err(PathError::EncodedSlash),
                    0 => return Err(PathError::Nul),
                    v if is_unreserved(v) => out.push(char::from(v)),
                    v => {
                        out.push('%');
                        out.push(char::from(HEX_UPPER[usize::from(v >> 4)]));
                        out.push(char::from(HEX_UPPER[usize::from(v & 0xf)]));
                    }
                }
                index += 3;
            }
            _ => {
                // The request target was valid UTF-8 (it is a &str) and
                // `%`-free here, so copying up to the next `%` is safe.
                let run_end = bytes[index..]
                    .iter()
                    .position(|b| *b == b'%' || *b == 0)
                    .map_or(bytes.len(), |offset| index + offset);
                out.push_str(&path[index..run_end]);
                index = run_end;
            }
        }
    }
    Ok(out)
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn hex(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 section 2.3.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(path: &str) -> Result<String, PathError> {
        normalize(path).map(Cow::into_owned)
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for path in ["/", "/a/b", "/a.b/c..d/.e", "/a/b/"] {
            assert!(matches!(normalize(path), Ok(Cow::Borrowed(_))), "{path}");
        }
    }

    #[test]
    fn unreserved_escapes_slashes_and_dots_are_normalised() {
        assert_eq!(normal("/%61dmin").as_deref(), Ok("/admin"));
        assert_eq!(normal("//admin").as_deref(), Ok("/admin"));
        assert_eq!(normal("/a//b///c").as_deref(), Ok("/a/b/c"));
        assert_eq!(normal("/x/../admin").as_deref(), Ok("/admin"));
        assert_eq!(normal("/x/%2e%2E/admin").as_deref(), Ok("/admin"));
        assert_eq!(normal("/a/./b/.").as_deref(), Ok("/a/b/"));
        assert_eq!(normal("/a/b/..").as_deref(), Ok("/a/"));
        assert_eq!(normal("/a%7e%5fb").as_deref(), Ok("/a~_b"));
        assert_eq!(normal("/a%3fb%c3%a9").as_deref(), Ok("/a%3Fb%C3%A9"));
        assert_eq!(normal("/..a/b").as_deref(), Ok("/..a/b"));
    }

    #[test]
    fn paths_that_cannot_be_normalised_safely_are_refused() {
        assert_eq!(normal("/a%2Fb"), Err(PathError::EncodedSlash));
        assert_eq!(normal("/a%2fb"), Err(PathError::EncodedSlash));
        assert_eq!(normal("/a%00b"), Err(PathError::Nul));
        assert_eq!(normal("/a\0b"), Err(PathError::Nul));
        assert_eq!(normal("/../etc"), Err(PathError::AboveRoot));
        assert_eq!(normal("/a/../../etc"), Err(PathError::AboveRoot));
        assert_eq!(normal("/%2e%2e/etc"), Err(PathError::AboveRoot));
        assert_eq!(normal("/a%zz"), Err(PathError::BadEncoding));
        assert_eq!(normal("/a%4"), Err(PathError::BadEncoding));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any bytes: no panic; a result is absolute, has no empty or
            /// dot segment, no encoded slash or NUL, and is its own normal form.
            #[test]
            fn normal_forms_are_normal_and_stable(path in "/[a-zA-Z0-9%./_~\\-]{0,40}") {
                if let Ok(normal) = normalize(&path) {
                    prop_assert!(normal.starts_with('/'));
                    prop_assert!(!normal.contains("//"));
                    prop_assert!(!normal.split('/').any(|s| s == "." || s == ".."));
                    prop_assert!(!normal.to_ascii_uppercase().contains("%2F"));
                    prop_assert!(!normal.contains("%00"));
                    let again = normalize(&normal).map(Cow::into_owned);
                    prop_assert_eq!(again.as_deref(), Ok(normal.as_ref()));
                }
            }

            #[test]
            fn arbitrary_strings_never_panic(path in ".{0,64}") {
                let _ = normalize(&path);
            }
        }
    }
}
