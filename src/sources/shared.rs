//! Sources shared by several instances: each tick of a source is fetched by
//! one instance and installed by the others.
//!
//! The tick (the firing time every instance computes from the same rule) is
//! the fencing token: an instance claims `(source, tick)`, and only the one
//! that wins fetches; it publishes the value under that tick, and the store
//! refuses a tick that is not newer than the one it holds, so a slow
//! instance can never replace a newer value with an older one. The others
//! wait for the published value and install it as their last good value.
//!
//! Owns the seam ([`SharedSources`], implemented on Redis by
//! `crate::shared`) and the record a published value travels in. Must not
//! know Redis, and never lets the shared store's failure stop a source:
//! without it every instance fetches for itself, as a single instance does.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use chrono::{DateTime, Utc};

pub type SharedFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The shared store did not answer (down, timed out, circuit open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the shared store is unavailable")]
pub struct SharedUnavailable;

/// Where the sources of every instance of a namespace meet.
pub trait SharedSources: Send + Sync + 'static {
    /// This instance's name, as `/sources` shows it.
    fn instance(&self) -> &str;
    /// Claims `tick` (Unix milliseconds) of `source` for this instance,
    /// for `hold`; true when this instance won it.
    fn claim(
        &self,
        source: &str,
        tick: i64,
        hold: std::time::Duration,
    ) -> SharedFuture<'_, Result<bool, SharedUnavailable>>;
    /// Stores `record` as `source`'s value for `tick` and tells every
    /// instance, unless a value for the same or a later tick is stored
    /// (then false).
    fn publish(
        &self,
        source: &str,
        tick: i64,
        record: Bytes,
    ) -> SharedFuture<'_, Result<bool, SharedUnavailable>>;
    /// The stored value of `source` and its tick.
    fn read(
        &self,
        source: &str,
    ) -> SharedFuture<'_, Result<Option<(i64, Bytes)>, SharedUnavailable>>;
    /// Notified when a value of `source` may have been published (the
    /// fast path; waiters also look now and then, as messages can be lost).
    fn published(&self, source: &str) -> Arc<tokio::sync::Notify>;
}

/// The shared store as the sources hold it.
pub struct SharedHandle {
    pub store: Arc<dyn SharedSources>,
}

/// A value as it travels between instances.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedValue {
    /// The instance that fetched it.
    pub fetched_by: String,
    /// When its bytes last changed: every instance serves the same
    /// Last-Modified.
    pub changed_at: DateTime<Utc>,
    pub content_type: Option<String>,
    /// What a fetcher plugin returned with it (its view next time).
    pub fetcher_headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
}

/// The first bytes of every record: a format change is a new version,
/// and a record of an unknown one is ignored.
const RECORD_VERSION: &[u8; 4] = b"LDS1";

impl SharedValue {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.body.len() + 64);
        out.put_slice(RECORD_VERSION);
        put_field(&mut out, self.fetched_by.as_bytes());
        out.put_i64(self.changed_at.timestamp_millis());
        put_field(
            &mut out,
            self.content_type.as_deref().unwrap_or("").as_bytes(),
        );
        out.put_u32(self.fetcher_headers.len() as u32);
        for (name, value) in &self.fetcher_headers {
            put_field(&mut out, name.as_bytes());
            put_field(&mut out, value);
        }
        out.put_slice(&self.body);
        out.freeze()
    }

    /// `None` for anything that is not a whole record of this version.
    pub fn decode(mut record: Bytes) -> Option<Self> {
        if record.len() < RECORD_VERSION.len() || &record[..4] != RECORD_VERSION {
            return None;
        }
        record.advance(RECORD_VERSION.len());
        let fetched_by = String::from_utf8(take_field(&mut record)?.to_vec()).ok()?;
        let changed_at = DateTime::from_timestamp_millis(take_i64(&mut record)?)?;
        let content_type = String::from_utf8(take_field(&mut record)?.to_vec()).ok()?;
        let count = take_u32(&mut record)?;
        let mut fetcher_headers = Vec::new();
        for _ in 0..count {
            let name = String::from_utf8(take_field(&mut record)?.to_vec()).ok()?;
            let value = take_field(&mut record)?.to_vec();
            fetcher_headers.push((name, value));
        }
        Some(Self {
            fetched_by,
            changed_at,
            content_type: (!content_type.is_empty()).then_some(content_type),
            fetcher_headers,
            body: record,
        })
    }
}

fn put_field(out: &mut BytesMut, field: &[u8]) {
    out.put_u32(field.len() as u32);
    out.put_slice(field);
}

fn take_u32(record: &mut Bytes) -> Option<u32> {
    (record.remaining() >= 4).then(|| record.get_u32())
}

fn take_i64(record: &mut Bytes) -> Option<i64> {
    (record.remaining() >= 8).then(|| record.get_i64())
}

fn take_field(record: &mut Bytes) -> Option<Bytes> {
    let length = take_u32(record)? as usize;
    (record.remaining() >= length).then(|| record.split_to(length))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_decodes_to_what_was_encoded_and_anything_else_is_none() {
        let value = SharedValue {
            fetched_by: "host-1-ab12".to_string(),
            changed_at: DateTime::from_timestamp_millis(1_796_000_000_000).unwrap(),
            content_type: Some("application/json".to_string()),
            fetcher_headers: vec![("etag".to_string(), b"\"v1\"".to_vec())],
            body: Bytes::from_static(b"{\"a\":1}"),
        };
        let record = value.encode();
        assert_eq!(SharedValue::decode(record.clone()), Some(value.clone()));
        for cut in 0..record.len() - value.body.len() {
            assert_eq!(
                SharedValue::decode(record.slice(..cut)),
                None,
                "cut at {cut}"
            );
        }
        assert_eq!(SharedValue::decode(Bytes::from_static(b"LDR1xxxx")), None);
        let untyped = SharedValue {
            content_type: None,
            ..value
        };
        assert_eq!(SharedValue::decode(untyped.encode()), Some(untyped));
    }
}
