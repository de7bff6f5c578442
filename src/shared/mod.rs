//! The shared tier on Redis: the second cache tier several instances of one
//! `shared.namespace` use ([`crate::cache::SecondTier`]).
//!
//! Owns the Redis connection (connected lazily and reconnected by redis-rs's
//! `ConnectionManager`, so Larder starts and serves without Redis), a
//! timeout on every call, a circuit breaker that stops calling a Redis that
//! keeps failing, and a bounded write-behind queue drained by one task.
//! It is also where sources meet (`sources`): claims, values, messages.
//! Every name is prefixed `larder:<namespace>:`. Must not decide what is
//! cached or for how long (the cache does), and never turns a Redis failure
//! into a request error: a failed call is a miss, a full queue a dropped
//! write, each counted.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::cache::{PurgeLog, SecondTier, TierError, TierFuture};
use crate::config::SharedConfig;

mod sources;

/// Consecutive failed calls that open the circuit.
const FAILURES_TO_OPEN: u32 = 3;
/// How long an open circuit skips Redis before one call tries again.
const OPEN_FOR: Duration = Duration::from_secs(1);

enum Write {
    Put {
        name: String,
        value: Bytes,
        ttl: Duration,
    },
    Delete {
        name: String,
    },
}

/// The Redis side of the shared tier.
pub struct RedisTier {
    /// This instance's name in claims and in `/sources`.
    instance: String,
    connection: ConnectionManager,
    /// The sources' own connection, so their traffic (on their own
    /// thread) never queues ahead of a request's lookup.
    source_connection: ConnectionManager,
    prefix: String,
    read_timeout: Duration,
    write_timeout: Duration,
    writes: mpsc::Sender<Write>,
    breaker: Breaker,
    purge_signal: Arc<Notify>,
    /// Who waits for which source's value.
    source_signals: Mutex<HashMap<String, Arc<Notify>>>,
}

impl RedisTier {
    /// Sets up the tier; connects on first use. Fails only on a URL redis-rs
    /// cannot use (config checked its form already).
    pub fn start(config: &SharedConfig) -> Result<Arc<Self>, redis::RedisError> {
        let client = redis::Client::open(config.url.as_str())?;
        let listener = client.clone();
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.write_timeout.max(config.read_timeout)))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let connection =
            ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())?;
        let source_connection = ConnectionManager::new_lazy_with_config(client, manager_config)?;
        let (writes, queue) = mpsc::channel(config.write_queue.max(1));
        let tier = Arc::new(Self {
            instance: instance_name(),
            connection,
            source_connection,
            prefix: format!("larder:{}:", config.namespace),
            read_timeout: config.read_timeout,
            write_timeout: config.write_timeout,
            writes,
            breaker: Breaker::default(),
            purge_signal: Arc::new(Notify::new()),
            source_signals: Mutex::default(),
        });
        tokio::spawn(drain_writes(Arc::downgrade(&tier), queue));
        tokio::spawn(listen(Arc::downgrade(&tier), listener));
        metrics::gauge!("larder_shared_circuit_open").set(0.0);
        Ok(tier)
    }

    fn name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Runs one command of the cache under the breaker and `limit`.
    async fn call<T: redis::FromRedisValue>(
        &self,
        command: redis::Cmd,
        limit: Duration,
        what: &'static str,
    ) -> Result<T, TierError> {
        self.call_on(&self.connection, command, limit, what).await
    }

    /// Runs one command on `connection` under the breaker and `limit`.
    async fn call_on<T: redis::FromRedisValue>(
        &self,
        connection: &ConnectionManager,
        command: redis::Cmd,
        limit: Duration,
        what: &'static str,
    ) -> Result<T, TierError> {
        if !self.breaker.admit() {
            count(what, "skipped");
            return Err(TierError::Unavailable);
        }
        let mut connection = connection.clone();
        let outcome = tokio::time::timeout(limit, command.query_async::<T>(&mut connection)).await;
        let result = match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                tracing::debug!(%error, what, "shared tier call failed");
                Err(TierError::Failed)
            }
            Err(_) => Err(TierError::Timeout),
        };
        match &result {
            Ok(_) => {
                count(what, "ok");
                self.breaker.succeeded();
            }
            Err(error) => {
                count(
                    what,
                    if *error == TierError::Timeout {
                        "timeout"
                    } else {
                        "error"
                    },
                );
                if self.breaker.failed() {
                    tracing::warn!(what, error = %error, "shared tier failing; circuit open, requests go on without it");
                }
            }
        }
        result
    }
}

impl SecondTier for RedisTier {
    fn get_many(
        &self,
        names: Vec<String>,
    ) -> TierFuture<'_, Result<Vec<Option<Bytes>>, TierError>> {
        Box::pin(async move {
            let mut command = redis::cmd("MGET");
            for name in &names {
                command.arg(self.name(name));
            }
            let values: Vec<Option<Vec<u8>>> = self.call(command, self.read_timeout, "get").await?;
            if values.len() != names.len() {
                return Err(TierError::Failed);
            }
            Ok(values
                .into_iter()
                .map(|value| value.map(Bytes::from))
                .collect())
        })
    }

    fn put(&self, name: String, value: Bytes, ttl: Duration) {
        self.enqueue(Write::Put { name, value, ttl });
    }

    fn delete(&self, name: String) {
        self.enqueue(Write::Delete { name });
    }

    fn degraded(&self) -> bool {
        self.breaker.is_open()
    }

    fn publish_purge(&self, payload: Bytes) -> TierFuture<'_, Result<u64, TierError>> {
        Box::pin(async move {
            let mut command = redis::cmd("EVAL");
            command
                .arg(PUBLISH_PURGE)
                .arg(3)
                .arg(self.name(crate::cache::GENERATION))
                .arg(self.name(PURGE_LOG))
                .arg(self.name(PURGE_CHANNEL))
                .arg(payload.as_ref())
                .arg(PURGE_LOG_LENGTH);
            self.call(command, self.write_timeout, "purge").await
        })
    }

    fn purges_since(
        &self,
        after: u64,
        fresh_epoch: String,
    ) -> TierFuture<'_, Result<PurgeLog, TierError>> {
        Box::pin(async move {
            let mut command = redis::cmd("EVAL");
            command
                .arg(PURGES_SINCE)
                .arg(3)
                .arg(self.name(crate::cache::GENERATION))
                .arg(self.name(PURGE_LOG))
                .arg(self.name(EPOCH))
                .arg(after)
                .arg(fresh_epoch);
            let (generation, entries, epoch): (u64, Vec<Vec<u8>>, Vec<u8>) = self
                .call(
                    command,
                    self.read_timeout.max(Duration::from_millis(250)),
                    "purges",
                )
                .await?;
            let purges = entries
                .into_iter()
                .filter_map(|entry| {
                    let split = entry.iter().position(|b| *b == b'|')?;
                    let generation = std::str::from_utf8(&entry[..split]).ok()?.parse().ok()?;
                    Some((generation, Bytes::copy_from_slice(&entry[split + 1..])))
                })
                .collect();
            Ok(PurgeLog {
                generation,
                purges,
                epoch: Bytes::from(epoch),
            })
        })
    }

    fn purge_signal(&self) -> Arc<Notify> {
        Arc::clone(&self.purge_signal)
    }

    fn try_claim(&self, name: String, hold: Duration) -> TierFuture<'_, Result<bool, TierError>> {
        Box::pin(async move {
            let mut command = redis::cmd("SET");
            let millis = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX).max(1);
            command
                .arg(self.name(&name))
                .arg(&self.instance)
                .arg("NX")
                .arg("PX")
                .arg(millis);
            let answer: Option<String> = self.call(command, self.write_timeout, "claim").await?;
            Ok(answer.is_some())
        })
    }
}

/// The sorted set of recent purges (score: generation) and the channel that
/// announces each.
const PURGE_LOG: &str = "purges";
const EPOCH: &str = "epoch";
const PURGE_CHANNEL: &str = "purge-events";
/// Purges kept for instances that missed a message; one further behind
/// than this resyncs by flushing its memory.
const PURGE_LOG_LENGTH: u64 = 10_000;

/// Raises the generation, logs the purge under it, trims the log and
/// announces it: one round trip, atomic.
const PUBLISH_PURGE: &str = r"
local g = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], g, g .. '|' .. ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[2]) + 1))
redis.call('PUBLISH', KEYS[3], g)
return g
";

/// The generation, the purges logged after ARGV[1], and the epoch (set to
/// ARGV[2] when there is none: a Redis that lost its data gets a new one).
const PURGES_SINCE: &str = r"
local e = redis.call('GET', KEYS[3])
if not e then
  redis.call('SET', KEYS[3], ARGV[2])
  e = ARGV[2]
end
local g = tonumber(redis.call('GET', KEYS[1]) or '0')
local entries = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf')
return {g, entries, e}
";

/// Listens on the purge and source channels and signals each message;
/// reconnects (and signals everyone, so a resync follows) after losing the
/// connection. Ends when the tier goes.
async fn listen(tier: std::sync::Weak<RedisTier>, client: redis::Client) {
    use futures_util::StreamExt as _;
    loop {
        let Some((purges, sources)) = tier
            .upgrade()
            .map(|tier| (tier.name(PURGE_CHANNEL), tier.name(sources::SOURCE_CHANNEL)))
        else {
            return;
        };
        let connected = tokio::time::timeout(Duration::from_secs(2), async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&[&purges, &sources]).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        if let Ok(Ok(pubsub)) = connected {
            let Some(live) = tier.upgrade() else { return };
            // Whatever was published while not subscribed is in the log
            // and in the stored values.
            live.purge_signal.notify_one();
            live.every_source_may_be_published();
            drop(live);
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                let Some(live) = tier.upgrade() else { return };
                if message.get_channel_name() == sources {
                    live.source_published(message.get_payload_bytes());
                } else {
                    live.purge_signal.notify_one();
                }
            }
            tracing::debug!("shared tier subscription lost; reconnecting");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `<host>-<pid>-<random>`: readable in `/sources`, unique per start.
fn instance_name() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "larder".to_string());
    // RandomState is seeded randomly per process and per call.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("{host}-{}-{:04x}", std::process::id(), random & 0xffff)
}

impl RedisTier {
    fn enqueue(&self, write: Write) {
        match self.writes.try_send(write) {
            Ok(()) => metrics::gauge!("larder_shared_write_queue").increment(1.0),
            Err(_) => {
                metrics::counter!("larder_shared_writes_total", "result" => "dropped").increment(1)
            }
        }
    }
}

/// The write-behind task: one write at a time, each under the write timeout;
/// ends when the tier goes.
async fn drain_writes(tier: std::sync::Weak<RedisTier>, mut queue: mpsc::Receiver<Write>) {
    while let Some(write) = queue.recv().await {
        metrics::gauge!("larder_shared_write_queue").decrement(1.0);
        let Some(tier) = tier.upgrade() else { return };
        let result: Result<(), TierError> = match write {
            Write::Put { name, value, ttl } => {
                let mut command = redis::cmd("SET");
                let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
                command
                    .arg(tier.name(&name))
                    .arg(value.as_ref())
                    .arg("PX")
                    .arg(millis);
                tier.call(command, tier.write_timeout, "put").await
            }
            Write::Delete { name } => {
                let mut command = redis::cmd("DEL");
                command.arg(tier.name(&name));
                tier.call::<()>(command, tier.write_timeout, "delete").await
            }
        };
        let label = if result.is_ok() { "ok" } else { "failed" };
        metrics::counter!("larder_shared_writes_total", "result" => label).increment(1);
    }
}

fn count(what: &'static str, result: &'static str) {
    metrics::counter!("larder_shared_calls_total", "call" => what, "result" => result).increment(1);
}

/// Stops calling a Redis that keeps failing: after [`FAILURES_TO_OPEN`]
/// failures in a row, calls are skipped for [`OPEN_FOR`]; then one call at
/// a time tries, and a success closes it.
#[derive(Default)]
struct Breaker {
    failures: AtomicU32,
    open_until: Mutex<Option<Instant>>,
    trying: AtomicBool,
}

impl Breaker {
    fn admit(&self) -> bool {
        let open_until = *self.open_until.lock();
        match open_until {
            None => true,
            Some(until) if Instant::now() < until => false,
            // Past the pause: one call tries.
            Some(_) => !self.trying.swap(true, Ordering::AcqRel),
        }
    }

    fn succeeded(&self) {
        self.failures.store(0, Ordering::Release);
        self.trying.store(false, Ordering::Release);
        if self.open_until.lock().take().is_some() {
            metrics::gauge!("larder_shared_circuit_open").set(0.0);
            tracing::info!("shared tier answering again; circuit closed");
        }
    }

    /// Counts a failure; true when it opened the circuit.
    fn failed(&self) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        self.trying.store(false, Ordering::Release);
        let mut open_until = self.open_until.lock();
        if failures >= FAILURES_TO_OPEN {
            let opened = open_until.is_none();
            *open_until = Some(Instant::now() + OPEN_FOR);
            if opened {
                metrics::gauge!("larder_shared_circuit_open").set(1.0);
            }
            return opened;
        }
        false
    }

    fn is_open(&self) -> bool {
        self.open_until.lock().is_some()
    }
}
