//! The schema of single values: durations, sizes and listen addresses as
//! the loader parses them, and the attributes the config types name in their
//! `#[schemars(...)]` lines.
//!
//! Owns the patterns an editor checks a value against. Must not read the
//! config types: they refer here, and the whole file's schema (`schema.rs`)
//! is assembled from them, so this stays a leaf.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

use super::units::{ByteSize, HumanDuration, MAX_SIZE};

/// A duration as `parse_duration` takes it: numbers, each with a unit of
/// humantime's, optionally separated by spaces (`1m30s`, `1h 15m`).
/// Units are case-sensitive (`M` is months, `m` minutes).
const DURATION_PATTERN: &str = concat!(
    r"^\s*(\d+(\.\d+)?\s*(nanos|nsec|ns|usec|us|µs|millis|msec|ms|seconds|second|secs|sec|s|",
    r"minutes|minute|mins|min|m|hours|hour|hrs|hr|h|days|day|d|weeks|week|wks|wk|w|",
    r"months|month|M|years|year|yrs|yr|y)\s*)+$"
);

/// A size as `parse_size` (the bytesize crate) takes it: bytes as digits, or
/// a number with a unit, any case (`KiB`, `kib`, `Ki`, `KB`, `k`, `B`).
const SIZE_PATTERN: &str =
    r"^\s*(\+?\d+|(\d+(\.\d*)?|\.\d+)\s*([KkMmGgTtPpEe][Ii]?[Bb]?|[Bb]))\s*$";

/// A listen address as `parse_listen` takes it: `:PORT`, `IPv4:PORT` or
/// `[IPv6]:PORT`. Ranges (octets, the port) are left to the loader.
const LISTEN_PATTERN: &str =
    r"^\s*(:\d{1,5}|\d{1,3}(\.\d{1,3}){3}:\d{1,5}|\[[0-9A-Fa-f:.]+(%\d+)?\]:\d{1,5})\s*$";

impl JsonSchema for HumanDuration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "patternErrorMessage": "a duration with its unit, such as 250ms, 10s, 5m or 1h",
            "description": "A duration with its unit: 250ms, 10s, 5m, 1h, 1m30s. \
                A bare number is refused (10 what?), and so is anything \
                longer than 100 years.",
            "examples": ["250ms", "10s", "5m", "1h", "1m30s"]
        })
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> Cow<'static, str> {
        "Size".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A size: 512KiB, 256MiB, 1GiB (binary), 10MB \
                (decimal), or a bare number of bytes; at most 1PiB.",
            "anyOf": [
                { "type": "integer", "minimum": 0, "maximum": MAX_SIZE },
                {
                    "type": "string",
                    "pattern": SIZE_PATTERN,
                    "patternErrorMessage": "a size such as 512KiB, 256MiB or 1GiB (a bare number is bytes)"
                }
            ],
            "examples": ["512KiB", "256MiB", "1GiB", 1_048_576]
        })
    }
}

/// `schema_with` for fields read by `deserialize_listen`.
pub(crate) fn listen_address(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "pattern": LISTEN_PATTERN,
        "patternErrorMessage": "an address such as 0.0.0.0:8080, 127.0.0.1:9901, [::]:8080 or :8080 (hosts are IP addresses)",
        "examples": ["0.0.0.0:8080", "127.0.0.1:9901", "[::]:8080", ":8080"]
    })
}

/// `transform` for a field whose default is computed where it runs, so
/// printing this machine's value would mislead.
pub(crate) fn without_default(schema: &mut Schema) {
    schema.remove("default");
}
