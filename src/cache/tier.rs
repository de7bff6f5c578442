//! The seam for a second cache tier behind the in-memory store (the shared
//! tier on Redis, `crate::shared`), and the records it keeps.
//!
//! The cache decides what goes there and what a record is worth; the tier
//! only moves bytes under names, with its own timeouts, breaker and write
//! queue. A record carries a format version, the full primary key (checked
//! on read, so a hash collision or a foreign writer is a miss) and the purge
//! generation its fill knew when it began: a purge anywhere raises the
//! namespace's generation, and a record older than it is never used.
//! Must not know Redis, and never lets a tier failure become a request
//! error: anything but a good record is a miss.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use super::key;
use crate::http::body::Body;

pub type TierFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a tier call gave nothing: the request goes on as a plain miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TierError {
    #[error("the shared tier did not answer in time")]
    Timeout,
    #[error("the shared tier is unavailable (not connected or its circuit is open)")]
    Unavailable,
    #[error("the shared tier answered with an error")]
    Failed,
}

/// A second cache tier: names to bytes, shared by every instance of a
/// namespace (the namespace is the tier's business).
pub trait SecondTier: Send + Sync + 'static {
    /// The values of `names`, in order (`None`: absent); one round trip.
    fn get_many(&self, names: Vec<String>)
    -> TierFuture<'_, Result<Vec<Option<Bytes>>, TierError>>;
    /// Queues a write of `value` under `name` for `ttl`; never waits (a
    /// full queue drops it, counted by the tier).
    fn put(&self, name: String, value: Bytes, ttl: Duration);
    /// Queues the removal of `name` (a record that failed to decode).
    fn delete(&self, name: String);
    /// Records a purge (`payload`, opaque to the tier) under the next purge
    /// generation and tells every instance; the new generation.
    fn publish_purge(&self, payload: Bytes) -> TierFuture<'_, Result<u64, TierError>>;
    /// The current purge generation, the purges recorded after generation
    /// `after`, and the tier's epoch (set to `fresh_epoch` if it has none).
    fn purges_since(
        &self,
        after: u64,
        fresh_epoch: String,
    ) -> TierFuture<'_, Result<PurgeLog, TierError>>;
    /// Notified whenever another instance may have published a purge (the
    /// fast path; the caller also looks now and then, as messages can be lost).
    fn purge_signal(&self) -> Arc<tokio::sync::Notify>;
    /// Whether the tier is failing (its calls are being skipped).
    fn degraded(&self) -> bool;
    /// Takes `name` for `hold` unless another instance holds it; true when
    /// this instance got it (one instance revalidates a shared entry).
    fn try_claim(&self, name: String, hold: Duration) -> TierFuture<'_, Result<bool, TierError>>;
}

/// The tier as a fill uses it.
pub struct TierFill {
    pub tier: Arc<dyn SecondTier>,
    pub max_object_size: u64,
    /// The namespace's purge generation when the lookup ran; `None` when
    /// the lookup did not answer (then nothing is written behind).
    pub generation: Option<u64>,
    /// The fill's response came from the tier (nothing to write back).
    pub hit: bool,
    /// A background revalidation: only one instance of the namespace goes
    /// to the origin for the key; the others take its result from the tier.
    pub revalidation: bool,
}

/// What the tier had for a fill.
pub enum Lookup {
    /// A usable record, as a response the fill stores and serves.
    Hit(Response<Body>),
    Miss,
}

/// The generation's name in the tier.
pub const GENERATION: &str = "gen";

/// The name an instance claims to revalidate a primary key.
pub fn revalidation_name(primary: &str) -> String {
    format!("reval:{primary}")
}

/// The name of the Vary field names stored for a primary key.
pub fn vary_name(primary: &str) -> String {
    format!("vary:{primary}")
}

/// The name of the record for one variant of a primary key.
pub fn record_name(primary: &str, variant: &str) -> String {
    format!("obj:{primary}\u{1}{variant}")
}

/// A variant's id from its Vary field names and the request's values for
/// them: empty without Vary.
pub fn variant_id(vary_names: &[HeaderName], request: &HeaderMap) -> String {
    let mut id = String::new();
    for (name, value) in vary_names.iter().zip(key::vary_values(vary_names, request)) {
        id.push_str(name.as_str());
        id.push('=');
        match value {
            Some(bytes) => {
                for byte in bytes {
                    id.push_str(&format!("{byte:02x}"));
                }
            }
            None => id.push('-'),
        }
        id.push(';');
    }
    id
}

/// The Vary field names as stored under [`vary_name`].
pub fn encode_vary(names: &[HeaderName]) -> Bytes {
    Bytes::from(
        names
            .iter()
            .map(HeaderName::as_str)
            .collect::<Vec<_>>()
            .join(","),
    )
}

pub fn decode_vary(bytes: &[u8]) -> Option<Vec<HeaderName>> {
    let text = std::str::from_utf8(bytes).ok()?;
    text.split(',')
        .filter(|name| !name.is_empty())
        .map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect()
}

/// The generation as the tier stores it (a decimal integer, as INCR keeps it).
pub fn decode_generation(bytes: Option<&Bytes>) -> Option<u64> {
    match bytes {
        None => Some(0),
        Some(bytes) => std::str::from_utf8(bytes).ok()?.trim().parse().ok(),
    }
}

/// What [`SecondTier::purges_since`] found.
pub struct PurgeLog {
    pub generation: u64,
    /// Oldest first, each with its generation.
    pub purges: Vec<(u64, Bytes)>,
    /// A random value the tier keeps while it keeps its data: a new one
    /// means it lost everything (a restart without persistence, FLUSHALL).
    pub epoch: Bytes,
}

/// A purge as instances tell each other: who purged, and what.
pub fn encode_purge(instance: u64, purge: &super::Purge) -> Bytes {
    let (kind, value) = match purge {
        super::Purge::Url(url) => ("url", url.as_str()),
        super::Purge::Prefix(prefix) => ("prefix", prefix.as_str()),
        super::Purge::Tag(tag) => ("tag", tag.as_str()),
        super::Purge::All => ("all", ""),
    };
    Bytes::from(format!("{instance:x}|{kind}|{value}"))
}

/// The instance and the purge, or `None` for a payload of another shape.
pub fn decode_purge(bytes: &[u8]) -> Option<(u64, super::Purge)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut parts = text.splitn(3, '|');
    let instance = u64::from_str_radix(parts.next()?, 16).ok()?;
    let kind = parts.next()?;
    let value = parts.next()?.to_string();
    let purge = match kind {
        "url" => super::Purge::Url(value),
        "prefix" => super::Purge::Prefix(value),
        "tag" => super::Purge::Tag(value),
        "all" => super::Purge::All,
        _ => return None,
    };
    Some((instance, purge))
}

const MAGIC: &[u8; 4] = b"LDR1";
/// Records larger than this are refused on decode, whatever they claim.
const MAX_FIELD: usize = 64 << 20;

/// One stored response as the tier keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub generation: u64,
    pub status: StatusCode,
    /// As the store replays them: `Date` present, no `Age`.
    pub headers: HeaderMap,
    /// The response's age when written, and when that was.
    pub age: Duration,
    pub written: SystemTime,
    pub body: Bytes,
}

impl Record {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(64 + self.key.len() + self.body.len());
        out.put_slice(MAGIC);
        put_bytes(&mut out, self.key.as_bytes());
        out.put_u64(self.generation);
        out.put_u16(self.status.as_u16());
        out.put_u64(self.age.as_secs());
        out.put_u64(unix_seconds(self.written));
        out.put_u32(u32::try_from(self.headers.len()).unwrap_or(u32::MAX));
        for (name, value) in &self.headers {
            put_bytes(&mut out, name.as_str().as_bytes());
            put_bytes(&mut out, value.as_bytes());
        }
        put_bytes(&mut out, &self.body);
        out.freeze()
    }

    /// The record for `key`, or why not: a record of another format or key,
    /// or cut short, is refused whole.
    pub fn decode(key: &str, mut bytes: Bytes) -> Result<Self, &'static str> {
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err("not a Larder record of this version");
        }
        bytes.advance(MAGIC.len());
        let stored_key = take_bytes(&mut bytes)?;
        if stored_key != key.as_bytes() {
            return Err("the record is for another key");
        }
        let generation = take_u64(&mut bytes)?;
        let status = StatusCode::from_u16(take_u16(&mut bytes)?).map_err(|_| "bad status")?;
        let age = Duration::from_secs(take_u64(&mut bytes)?);
        let written = SystemTime::UNIX_EPOCH + Duration::from_secs(take_u64(&mut bytes)?);
        let count = take_u32(&mut bytes)?;
        let mut headers = HeaderMap::new();
        for _ in 0..count {
            let name =
                HeaderName::from_bytes(&take_bytes(&mut bytes)?).map_err(|_| "bad field name")?;
            let value = HeaderValue::from_maybe_shared(take_bytes(&mut bytes)?)
                .map_err(|_| "bad field value")?;
            headers.append(name, value);
        }
        let body = take_bytes(&mut bytes)?;
        if !bytes.is_empty() {
            return Err("trailing bytes");
        }
        Ok(Self {
            key: key.to_string(),
            generation,
            status,
            headers,
            age,
            written,
            body,
        })
    }

    /// The age the response has reached by `now`.
    pub fn age_at(&self, now: SystemTime) -> Duration {
        self.age + now.duration_since(self.written).unwrap_or_default()
    }
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn put_bytes(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u32(u32::try_from(bytes.len()).unwrap_or(u32::MAX));
    out.put_slice(bytes);
}

fn take_u16(bytes: &mut Bytes) -> Result<u16, &'static str> {
    (bytes.remaining() >= 2)
        .then(|| bytes.get_u16())
        .ok_or("cut short")
}

fn take_u32(bytes: &mut Bytes) -> Result<u32, &'static str> {
    (bytes.remaining() >= 4)
        .then(|| bytes.get_u32())
        .ok_or("cut short")
}

fn take_u64(bytes: &mut Bytes) -> Result<u64, &'static str> {
    (bytes.remaining() >= 8)
        .then(|| bytes.get_u64())
        .ok_or("cut short")
}

fn take_bytes(bytes: &mut Bytes) -> Result<Bytes, &'static str> {
    let length = take_u32(bytes)? as usize;
    if length > MAX_FIELD || bytes.remaining() < length {
        return Err("cut short");
    }
    Ok(bytes.split_to(length))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        let mut headers = HeaderMap::new();
        headers.insert("cache-control", HeaderValue::from_static("max-age=60"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_bytes(b"b\xff").unwrap());
        Record {
            key: "GET http://a/b".to_string(),
            generation: 7,
            status: StatusCode::OK,
            headers,
            age: Duration::from_secs(3),
            written: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            body: Bytes::from_static(b"hello"),
        }
    }

    #[test]
    fn records_round_trip() {
        let original = record();
        let decoded = Record::decode(&original.key, original.encode()).unwrap();
        assert_eq!(decoded, original);
    }

    #[test]
    fn another_key_a_cut_record_and_junk_are_refused() {
        let original = record();
        let bytes = original.encode();
        assert!(Record::decode("GET http://a/c", bytes.clone()).is_err());
        for cut in [0, 3, 10, bytes.len() - 1] {
            assert!(
                Record::decode(&original.key, bytes.slice(..cut)).is_err(),
                "{cut}"
            );
        }
        assert!(
            Record::decode(&original.key, Bytes::from_static(b"LDR1\xff\xff\xff\xff")).is_err()
        );
        let mut longer = BytesMut::from(&bytes[..]);
        longer.put_u8(0);
        assert!(Record::decode(&original.key, longer.freeze()).is_err());
    }

    #[test]
    fn variants_differ_by_their_values_bytes() {
        let names = vec![HeaderName::from_static("accept-language")];
        let mut a = HeaderMap::new();
        a.insert("accept-language", HeaderValue::from_static("en"));
        let mut b = HeaderMap::new();
        b.insert("accept-language", HeaderValue::from_static("fr"));
        assert_ne!(variant_id(&names, &a), variant_id(&names, &b));
        assert_ne!(
            variant_id(&names, &a),
            variant_id(&names, &HeaderMap::new())
        );
        assert_eq!(variant_id(&[], &a), "");
        assert_eq!(decode_vary(&encode_vary(&names)), Some(names));
    }
}
