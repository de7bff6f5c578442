//! A mirror's keys as they are served: each key's own value (for per-key
//! reads, with its own ETag) and the whole JSON object built from them.
//!
//! Owns how a stored value appears in the object (`decode`). Must not know
//! where the keys come from (etcd, a Redis hash): the mirrors feed it.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use chrono::Utc;

use super::value::{Members, StoredValue};
use crate::config::MemberDecode;

/// One key of a mirror.
struct Entry {
    /// The key's own value, served by a per-key read.
    member: Arc<StoredValue>,
    /// The value as it appears in the whole object (a JSON text).
    json: Bytes,
}

/// Every key of a mirror, in key order.
pub struct MemberSet {
    decode: MemberDecode,
    entries: BTreeMap<String, Entry>,
}

impl MemberSet {
    pub fn new(decode: MemberDecode) -> Self {
        Self {
            decode,
            entries: BTreeMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Sets `key` to `raw`; its ETag is `version` when the store gives one
    /// (etcd's `mod_revision`), else a hash of the bytes.
    pub fn insert(&mut self, key: String, raw: Bytes, version: Option<i64>) {
        let as_json = self.decode == MemberDecode::Json
            && serde_json::from_slice::<serde::de::IgnoredAny>(&raw).is_ok();
        let (json, content_type) = if as_json {
            (raw.clone(), Some("application/json"))
        } else {
            let text = String::from_utf8_lossy(&raw);
            let quoted = serde_json::to_string(&text).unwrap_or_else(|_| "\"\"".to_string());
            (Bytes::from(quoted), None)
        };
        let member = match version {
            Some(version) => StoredValue::versioned(raw, content_type, Utc::now(), version),
            None => StoredValue::new(raw, content_type, Utc::now()),
        };
        let entry = Entry {
            member: Arc::new(member),
            json,
        };
        self.entries.insert(key, entry);
    }

    pub fn remove(&mut self, key: &str) {
        self.entries.remove(key);
    }

    /// The whole value: `{"key": value, ...}` in key order, with the keys
    /// as members. Versioned by `version` when given, else hashed.
    pub fn value(&self, content_type: Option<&str>, version: Option<i64>) -> StoredValue {
        let body = self.object();
        let content_type = content_type.or(Some("application/json"));
        let mut value = match version {
            Some(version) => StoredValue::versioned(body, content_type, Utc::now(), version),
            None => StoredValue::new(body, content_type, Utc::now()),
        };
        let members: Members = self
            .entries
            .iter()
            .map(|(key, entry)| (key.clone(), entry.member.clone()))
            .collect();
        value.members = Some(Arc::new(members));
        value
    }

    /// The object's bytes alone (to compare with the value served).
    pub fn object(&self) -> Bytes {
        let size: usize = self
            .entries
            .iter()
            .map(|(key, entry)| key.len() + entry.json.len() + 4)
            .sum();
        let mut out = Vec::with_capacity(size + 2);
        out.push(b'{');
        for (i, (key, entry)) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let quoted = serde_json::to_string(key).unwrap_or_else(|_| "\"\"".to_string());
            out.extend_from_slice(quoted.as_bytes());
            out.push(b':');
            out.extend_from_slice(&entry.json);
        }
        out.push(b'}');
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_object_has_every_key_in_order_and_json_values_parsed_when_asked() {
        let mut set = MemberSet::new(MemberDecode::Json);
        set.insert("b".into(), Bytes::from_static(b"{\"x\": 1}"), Some(7));
        set.insert("a".into(), Bytes::from_static(b"not json"), Some(5));
        let value = set.value(None, Some(7));
        let parsed: serde_json::Value = serde_json::from_slice(&value.body).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!({ "a": "not json", "b": { "x": 1 } })
        );
        assert_eq!(value.etag(), "\"7\"");
        let members = value.members.as_ref().unwrap();
        assert_eq!(members["b"].etag(), "\"7\"");
        assert_eq!(members["b"].content_type(), "application/json");
        set.remove("a");
        assert_eq!(set.object(), Bytes::from_static(b"{\"b\":{\"x\": 1}}"));
    }

    #[test]
    fn as_strings_by_default() {
        let mut set = MemberSet::new(MemberDecode::String);
        set.insert("k".into(), Bytes::from_static(b"{\"x\": 1}"), None);
        assert_eq!(
            set.object(),
            Bytes::from_static(b"{\"k\":\"{\\\"x\\\": 1}\"}")
        );
    }
}
