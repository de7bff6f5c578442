//! Durations (`250ms`, `10s`, `5m`, `1h`), sizes (`512KiB`, `256MiB`, `1GiB`)
//! and listen addresses (`0.0.0.0:8080`, `:8080`) as they are written in the
//! YAML file and on the command line. Parsing only; no I/O.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// A duration written with its unit, e.g. `10s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn get(self) -> Duration {
        self.0
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl de::Visitor<'_> for DurationVisitor {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration with its unit, such as 250ms, 10s, 5m or 1h")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<HumanDuration, E> {
                parse_duration(text).map(HumanDuration).map_err(E::custom)
            }
            // A bare number (`timeout: 10`) gets the "no unit" message, not a type error.
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<HumanDuration, E> {
                self.visit_str(&n.to_string())
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<HumanDuration, E> {
                self.visit_str(&n.to_string())
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<HumanDuration, E> {
                self.visit_str(&n.to_string())
            }
        }
        d.deserialize_any(DurationVisitor)
    }
}

/// Written as the file would have it (`10s`, `1m 30s`, `250ms`), so the
/// defaults `larder schema` prints read the same way and load back.
impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.0))
    }
}

/// The longest duration a setting may name: anything longer is a typo, and
/// would overflow timers and clock arithmetic (`now + duration`).
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// The largest size a setting may name (1 PiB).
pub const MAX_SIZE: u64 = 1 << 50;

/// Parses `250ms`, `10s`, `1m30s`, `1h`. A bare number is refused: units are
/// required; so is anything longer than 100 years.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "duration {text:?} has no unit (write e.g. \"{text}s\" or \"{text}ms\")"
        ));
    }
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("invalid duration {text:?}: {e} (examples: 250ms, 10s, 5m, 1h)"))?;
    if duration > MAX_DURATION {
        return Err(format!("duration {text:?} is longer than 100 years"));
    }
    Ok(duration)
}

/// A size in bytes written with its unit, e.g. `256MiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", bytesize::ByteSize(self.0).display().iec())
    }
}

/// The largest binary unit that divides the size exactly (`256MiB`), else
/// the bytes as a number: what an operator would write, and exact.
impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        const UNITS: [(u64, &str); 5] = [
            (1 << 50, "PiB"),
            (1 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1 << 10, "KiB"),
        ];
        let n = self.0;
        match UNITS
            .iter()
            .find(|(unit, _)| n != 0 && n.is_multiple_of(*unit))
        {
            Some((unit, name)) => s.collect_str(&format_args!("{}{name}", n / unit)),
            None => s.serialize_u64(n),
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl de::Visitor<'_> for SizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 512KiB, 256MiB or 1GiB (a bare number is bytes)")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<ByteSize, E> {
                check_size(n).map(ByteSize).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<ByteSize, E> {
                let n = u64::try_from(n).map_err(|_| {
                    E::custom(format!("invalid size {n}: a size cannot be negative"))
                })?;
                self.visit_u64(n)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<ByteSize, E> {
                parse_size(text).map(ByteSize).map_err(E::custom)
            }
        }
        d.deserialize_any(SizeVisitor)
    }
}

/// Parses `512KiB`, `256MiB`, `1GiB`, `1000` (bytes), `10MB` (decimal), up
/// to [`MAX_SIZE`].
pub fn parse_size(text: &str) -> Result<u64, String> {
    let size = text
        .trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("invalid size {text:?}: {e} (examples: 512KiB, 256MiB, 1GiB)"))?;
    check_size(size)
}

fn check_size(size: u64) -> Result<u64, String> {
    if size > MAX_SIZE {
        return Err(format!("size {size} is over the 1 PiB limit"));
    }
    Ok(size)
}

/// Parses a listen address: `HOST:PORT` with an IP host (`0.0.0.0:8080`,
/// `[::1]:8080`) or cachepump's `:PORT`, meaning every IPv4 interface.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    if let Some(port) = text.strip_prefix(':') {
        return port
            .parse::<u16>()
            .map(|port| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
            .map_err(|_| {
                format!("invalid listen address {text:?}: {port:?} is not a port number")
            });
    }
    text.parse::<SocketAddr>().map_err(|_| {
        format!("invalid listen address {text:?} (examples: 0.0.0.0:8080, 127.0.0.1:9901, [::]:8080, :8080)")
    })
}

/// `deserialize_with` for listen addresses, so the file accepts what `-e` accepts.
pub fn deserialize_listen<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    parse_listen(&text).map_err(de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_accepts_cachepump_port_only_form() {
        assert_eq!(
            parse_listen(":8080"),
            Ok(SocketAddr::from(([0, 0, 0, 0], 8080)))
        );
        assert_eq!(
            parse_listen("127.0.0.1:9"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 9)))
        );
        assert!(parse_listen("[::1]:80").is_ok());
        assert!(parse_listen(":http").is_err());
        assert!(parse_listen("localhost").is_err());
    }

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("ten seconds").is_err());
    }

    #[test]
    fn durations_and_sizes_out_of_range_are_refused() {
        assert!(parse_duration("100y").is_ok());
        let error = parse_duration("101y").unwrap_err();
        assert!(error.contains("100 years"), "{error}");
        assert!(parse_duration("9999999999999999h").is_err());
        assert!(parse_size("1PiB").is_ok());
        assert!(parse_size("2PiB").is_err());
    }

    #[test]
    fn durations_and_sizes_serialize_as_written_and_load_back() {
        for text in ["250ms", "10s", "5m", "1h", "1m 30s"] {
            let duration = HumanDuration(parse_duration(text).unwrap());
            let written = serde_json::to_value(duration).unwrap();
            assert_eq!(written, text);
        }
        for (bytes, written) in [
            (256 * 1024 * 1024, serde_json::json!("256MiB")),
            (2 << 30, serde_json::json!("2GiB")),
            (1536, serde_json::json!(1536)),
            (1000, serde_json::json!(1000)),
            (0, serde_json::json!(0)),
        ] {
            assert_eq!(serde_json::to_value(ByteSize(bytes)).unwrap(), written);
            if let Some(text) = written.as_str() {
                assert_eq!(parse_size(text), Ok(bytes), "{text} loads back");
            }
        }
    }

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(parse_size("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("1GiB"), Ok(1024 * 1024 * 1024));
        assert!(parse_size("lots").is_err());
    }
}
