//! The `redis` kind: a copy of one Redis key, a string (the value is its
//! bytes) or a hash (the value is a JSON object of its fields, each field
//! also readable alone), kept current by pub/sub.
//!
//! The subscription (to the writer's channel, and to the key's keyspace
//! notifications where the server sends them) is made before the first
//! read, so no change falls between the two; each message reads the key
//! again. Pub/sub is at-most-once (a message sent while disconnected is
//! lost), so the key is also read every `reread`, and a re-read that finds
//! a change is counted as a resync. A lost connection keeps the last copy
//! served, marks the mirror degraded, and reconnects with backoff.
//!
//! Owns the mirror's task. Must not block readers: a change swaps a new
//! `StoredValue` into the slot.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use futures_util::{FutureExt as _, StreamExt as _};
use redis::aio::MultiplexedConnection;
use tokio::task::JoinHandle;

use super::members::MemberSet;
use super::mirror::{self, Backoff, Resync};
use super::runner::Slot;
use super::value::StoredValue;
use crate::config::RedisSource;

/// How long connecting, subscribing or one read may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The key's type and content in one step, so a key deleted or retyped
/// between a TYPE and a GET cannot be read as empty.
const READ_SCRIPT: &str = r"
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'string' then return {t, redis.call('GET', KEYS[1])} end
if t == 'hash' then return {t, redis.call('HGETALL', KEYS[1])} end
return {t}
";

/// Why the key is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// The first read of a connection.
    Connected,
    /// A message said it changed.
    Message,
    /// The periodic re-read.
    Reread,
}

pub struct RedisMirror {
    config: RedisSource,
    slot: Arc<Slot>,
    generation: u64,
    content_type: Option<String>,
}

impl RedisMirror {
    pub fn new(
        config: RedisSource,
        slot: Arc<Slot>,
        generation: u64,
        content_type: Option<String>,
    ) -> Self {
        Self {
            config,
            slot,
            generation,
            content_type,
        }
    }

    pub fn spawn(self, runtime: &tokio::runtime::Handle) -> JoinHandle<()> {
        runtime.spawn(self.run())
    }

    async fn run(self) {
        let mut backoff = Backoff::new();
        let mut reconnecting = false;
        while self.slot.is_current(self.generation) {
            let error = self.session(&mut backoff, reconnecting).await;
            mirror::degraded(&self.slot, "redis", &error);
            reconnecting = true;
            backoff.wait().await;
        }
    }

    /// Subscribes, reads, then reads again on each message and every
    /// `reread`, until the connection fails; returns why.
    async fn session(&self, backoff: &mut Backoff, reconnecting: bool) -> String {
        let url = self.config.url.as_deref().unwrap_or_default();
        let client = match redis::Client::open(url) {
            Ok(client) => client,
            Err(error) => return format!("the Redis URL: {error}"),
        };
        let channels = self.channels(&client);
        let mut messages = if channels.is_empty() {
            None
        } else {
            let subscribed = timed("subscribing", async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channels).await?;
                Ok(pubsub.into_on_message())
            });
            match subscribed.await {
                Ok(stream) => Some(stream),
                Err(error) => return error,
            }
        };
        let connecting = timed("connecting", client.get_multiplexed_async_connection());
        let mut connection = match connecting.await {
            Ok(connection) => connection,
            Err(error) => return error,
        };
        if let Err(error) = self.read(&mut connection, Cause::Connected).await {
            return error;
        }
        backoff.reset();
        if reconnecting {
            mirror::count_resync(&self.slot, Resync::Reconnect);
        }
        let mut reread = tokio::time::interval(self.config.reread.get());
        reread.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        reread.tick().await; // the first tick is now: the key was just read
        loop {
            if !self.slot.is_current(self.generation) {
                return "the source was changed or removed".to_string();
            }
            let cause = match messages.as_mut() {
                Some(stream) => tokio::select! {
                    message = stream.next() => match message {
                        Some(_) => {
                            // A burst of messages (a busy keyspace) makes one read.
                            while let Some(Some(_)) = stream.next().now_or_never() {}
                            Cause::Message
                        }
                        None => return "the subscription was lost".to_string(),
                    },
                    _ = reread.tick() => Cause::Reread,
                },
                None => {
                    reread.tick().await;
                    Cause::Reread
                }
            };
            if let Err(error) = self.read(&mut connection, cause).await {
                return error;
            }
        }
    }

    /// The writer's channel, and the key's keyspace channel when asked.
    fn channels(&self, client: &redis::Client) -> Vec<String> {
        let mut channels: Vec<String> = self.config.channel.iter().cloned().collect();
        if self.config.keyspace_events {
            let db = client.get_connection_info().redis_settings().db();
            channels.push(format!("__keyspace@{db}__:{}", self.config.key));
        }
        channels
    }

    /// Reads the key and swaps a changed value in.
    async fn read(
        &self,
        connection: &mut MultiplexedConnection,
        cause: Cause,
    ) -> Result<(), String> {
        let key = &self.config.key;
        let mut script = redis::cmd("EVAL");
        script.arg(READ_SCRIPT).arg(1).arg(key);
        let reply: Vec<redis::Value> =
            timed("reading", script.query_async(&mut *connection)).await?;
        let mut reply = reply.into_iter();
        let kind: String = reply
            .next()
            .map(redis::from_redis_value)
            .transpose()
            .map_err(|error| format!("reading: {error}"))?
            .unwrap_or_default();
        let content = reply.next();
        let value = match (kind.as_str(), content) {
            ("string", Some(content)) => {
                let bytes: Vec<u8> = redis::from_redis_value(content)
                    .map_err(|error| format!("reading: {error}"))?;
                let previous = self.slot.value.load_full();
                let content_type = self.content_type.as_deref();
                StoredValue::next(
                    previous.as_deref(),
                    Bytes::from(bytes),
                    content_type,
                    Utc::now(),
                )
                .0
            }
            ("hash", Some(content)) => {
                let fields: Vec<(String, Vec<u8>)> = redis::from_redis_value(content)
                    .map_err(|error| format!("reading: {error}"))?;
                let mut keys = MemberSet::new(self.config.decode);
                for (field, bytes) in fields {
                    keys.insert(field, Bytes::from(bytes), None);
                }
                keys.value(self.content_type.as_deref(), None)
            }
            ("none", _) => {
                self.after_read(cause, false, 0);
                self.slot.lock_record().last_error = Some(format!(
                    "the key {key:?} does not exist; the last value is kept"
                ));
                return Ok(());
            }
            (other, _) => {
                self.after_read(cause, false, 0);
                self.slot.lock_record().last_error = Some(format!(
                    "the key {key:?} is a {other}, not a string or a hash; the last value is kept"
                ));
                return Ok(());
            }
        };
        let keys = value.members.as_ref().map_or(0, |members| members.len());
        let changed = self
            .slot
            .value
            .load()
            .as_ref()
            .is_none_or(|old| old.body != value.body);
        // Recorded before the value shows, so a reader woken by it sees it counted.
        self.after_read(cause, changed, keys);
        if changed && self.slot.is_current(self.generation) {
            self.slot.set_value(value, true);
            self.slot.update_age_gauge();
        }
        Ok(())
    }

    fn after_read(&self, cause: Cause, changed: bool, keys: usize) {
        match cause {
            Cause::Connected => {
                mirror::loaded(&self.slot, keys, None);
                mirror::connected(&self.slot, "redis", keys);
            }
            Cause::Message => mirror::applied(&self.slot, u64::from(changed), keys, None),
            Cause::Reread if changed => {
                tracing::info!(source = %self.slot.name, "a re-read found a change no message announced");
                mirror::count_resync(&self.slot, Resync::Reread);
                mirror::applied(&self.slot, 1, keys, None);
            }
            Cause::Reread => {}
        }
    }
}

/// `call` bounded by [`CALL_TIMEOUT`]; its error as text naming `what`.
async fn timed<T>(
    what: &str,
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(format!("{what}: {error}")),
        Err(_) => Err(format!("{what}: timed out")),
    }
}
