//! The sources' side of the shared tier: claims of a source's ticks, the
//! stored value of each source (refusing an older tick than it holds) and
//! the channel that announces a new value.
//!
//! Names: `sources:claim:<source>:<tick>` (a string holding the winner's
//! name, expiring), `sources:value:<source>` (a hash: `tick`, `record`),
//! channel `source-events` (payload: the source's name).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use super::RedisTier;
use crate::sources::{SharedFuture, SharedSources, SharedUnavailable};

pub(super) const SOURCE_CHANNEL: &str = "source-events";

/// Stores the value unless the stored tick is the same or later, and
/// announces it: one round trip, atomic.
const PUBLISH_VALUE: &str = r"
local stored = redis.call('HGET', KEYS[1], 'tick')
if stored and tonumber(stored) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'tick', ARGV[1], 'record', ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[3])
return 1
";

impl SharedSources for RedisTier {
    fn instance(&self) -> &str {
        &self.instance
    }

    fn claim(
        &self,
        source: &str,
        tick: i64,
        hold: Duration,
    ) -> SharedFuture<'_, Result<bool, SharedUnavailable>> {
        let name = self.name(&format!("sources:claim:{source}:{tick}"));
        Box::pin(async move {
            let mut command = redis::cmd("SET");
            let millis = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX).max(1);
            command
                .arg(name)
                .arg(&self.instance)
                .arg("NX")
                .arg("PX")
                .arg(millis);
            let answer: Option<String> = self
                .call_on(
                    &self.source_connection,
                    command,
                    self.write_timeout,
                    "source_claim",
                )
                .await
                .map_err(|_| SharedUnavailable)?;
            Ok(answer.is_some())
        })
    }

    fn publish(
        &self,
        source: &str,
        tick: i64,
        record: Bytes,
    ) -> SharedFuture<'_, Result<bool, SharedUnavailable>> {
        let value = self.name(&format!("sources:value:{source}"));
        let channel = self.name(SOURCE_CHANNEL);
        let source = source.to_string();
        Box::pin(async move {
            let mut command = redis::cmd("EVAL");
            command
                .arg(PUBLISH_VALUE)
                .arg(2)
                .arg(value)
                .arg(channel)
                .arg(tick)
                .arg(record.as_ref())
                .arg(source);
            let stored: i64 = self
                .call_on(
                    &self.source_connection,
                    command,
                    self.write_timeout,
                    "source_publish",
                )
                .await
                .map_err(|_| SharedUnavailable)?;
            Ok(stored == 1)
        })
    }

    fn read(
        &self,
        source: &str,
    ) -> SharedFuture<'_, Result<Option<(i64, Bytes)>, SharedUnavailable>> {
        let value = self.name(&format!("sources:value:{source}"));
        Box::pin(async move {
            let mut command = redis::cmd("HMGET");
            command.arg(value).arg("tick").arg("record");
            let (tick, record): (Option<i64>, Option<Vec<u8>>) = self
                .call_on(
                    &self.source_connection,
                    command,
                    self.write_timeout,
                    "source_read",
                )
                .await
                .map_err(|_| SharedUnavailable)?;
            Ok(tick
                .zip(record)
                .map(|(tick, record)| (tick, Bytes::from(record))))
        })
    }

    fn published(&self, source: &str) -> Arc<Notify> {
        Arc::clone(
            self.source_signals
                .lock()
                .entry(source.to_string())
                .or_default(),
        )
    }
}

impl RedisTier {
    /// Wakes whoever waits for `source`'s value (a message named it).
    pub(super) fn source_published(&self, source: &[u8]) {
        let Ok(source) = std::str::from_utf8(source) else {
            return;
        };
        if let Some(signal) = self.source_signals.lock().get(source) {
            signal.notify_waiters();
        }
    }

    /// Wakes every waiter (the subscription was lost: messages may be too).
    pub(super) fn every_source_may_be_published(&self) {
        for signal in self.source_signals.lock().values() {
            signal.notify_waiters();
        }
    }
}
