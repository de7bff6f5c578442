//! Request coalescing: one upstream fetch per key, its body broadcast to every
//! reader as it arrives, with a replay buffer for late joiners.
//!
//! A [`Flight`] is plain shared state (the fetch's result as a [`Head`], body
//! chunks, readers); the fill task in `fill` writes it, the leader and the
//! waiters read the head, [`FlightBody`] reads the body. The head is the one
//! channel a fetch's result travels on. Must not talk to the upstream or the
//! store itself.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::Response;
use http_body::Frame;
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::origin::OriginError;
use super::store::Meta;
use crate::http::body::{Body, BoxError};

/// What the leader's fetch turned out to be, as far as waiters are concerned.
#[derive(Clone)]
pub enum Head {
    Pending,
    /// A shareable response whose body readers stream from the flight;
    /// `stored` says it will be committed to the store on a clean end.
    Shared {
        meta: Arc<Meta>,
        stored: bool,
        /// What the origin answered (304 when a revalidation refreshed the entry).
        upstream_status: http::StatusCode,
        /// The leader's own header fields when they differ from `meta`'s:
        /// fields a qualified `no-cache` / `private` keeps from other clients.
        leader_headers: Option<Arc<http::HeaderMap>>,
        /// The response came from the second tier, not the origin.
        tier_hit: bool,
    },
    /// Not shareable: the leader takes the response from the slot (empty
    /// when the fill ended without one); everyone else fetches on their own.
    Solo(SoloResponse),
    /// The upstream failed without a response; each reader gets a copy.
    Failed(OriginError),
}

/// A response for the leader alone, handed over through the head.
#[derive(Clone, Default)]
pub struct SoloResponse(Arc<Mutex<Option<Response<Body>>>>);

impl SoloResponse {
    pub fn new(response: Response<Body>) -> Self {
        Self(Arc::new(Mutex::new(Some(response))))
    }

    /// The response, for the one reader that takes it.
    pub fn take(&self) -> Option<Response<Body>> {
        self.0.lock().take()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Complete,
    Aborted,
}

/// Where one reader is: the absolute index of the next chunk it reads, and
/// when it last took one (or, if it had read everything, when the next
/// chunk arrived).
#[derive(Clone, Copy)]
struct ReaderAt {
    next: usize,
    last_read: Instant,
}

struct Buffer {
    chunks: VecDeque<Bytes>,
    /// Absolute index of `chunks[0]`; above zero once chunks are trimmed.
    base: usize,
    end: Option<End>,
    /// Reader id to where it is.
    readers: HashMap<u64, ReaderAt>,
    /// While set, every chunk is kept (for the store and late joiners).
    keep_all: bool,
    wakers: Vec<Waker>,
}

pub struct Flight {
    head: watch::Sender<Head>,
    buffer: Mutex<Buffer>,
    /// Signalled when a reader consumes or leaves, for backpressure and abort.
    readers_changed: Notify,
    next_reader: AtomicU64,
    /// Set by a purge that ran while this fill was in progress.
    doomed: AtomicBool,
    /// Requests that joined this flight instead of fetching themselves.
    waiters: AtomicU64,
}

impl Flight {
    pub fn doom(&self) {
        self.doomed.store(true, Ordering::SeqCst);
    }

    pub fn is_doomed(&self) -> bool {
        self.doomed.load(Ordering::SeqCst)
    }

    /// Counts a request that joined this flight to wait for its response.
    pub fn join(&self) {
        self.waiters.fetch_add(1, Ordering::SeqCst);
    }

    /// How many requests joined this flight so far.
    pub fn waiters(&self) -> u64 {
        self.waiters.load(Ordering::SeqCst)
    }

    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            head: watch::Sender::new(Head::Pending),
            buffer: Mutex::new(Buffer {
                chunks: VecDeque::new(),
                base: 0,
                end: None,
                readers: HashMap::new(),
                keep_all: true,
                wakers: Vec::new(),
            }),
            readers_changed: Notify::new(),
            next_reader: AtomicU64::new(0),
            doomed: AtomicBool::new(false),
            waiters: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Buffer> {
        self.buffer.lock()
    }

    pub fn set_head(&self, head: Head) {
        self.head.send_replace(head);
    }

    /// Waits for the head outcome; a vanished fill task counts as an
    /// empty `Solo`.
    pub async fn wait_head(&self) -> Head {
        let mut receiver = self.head.subscribe();
        match receiver.wait_for(|h| !matches!(h, Head::Pending)).await {
            Ok(head) => head.clone(),
            Err(_) => Head::Solo(SoloResponse::default()),
        }
    }

    /// A body reading from the first chunk; `None` once the replay buffer has
    /// been given up (the response grew too large to keep).
    pub fn reader(self: &Arc<Self>) -> Option<FlightBody> {
        let id = self.next_reader.fetch_add(1, Ordering::Relaxed);
        let mut buffer = self.lock();
        if !buffer.keep_all && buffer.base > 0 {
            return None;
        }
        let next = buffer.base;
        buffer.readers.insert(
            id,
            ReaderAt {
                next,
                last_read: Instant::now(),
            },
        );
        Some(FlightBody {
            flight: Arc::clone(self),
            id,
        })
    }

    pub fn reader_count(&self) -> usize {
        self.lock().readers.len()
    }

    pub fn push(&self, chunk: Bytes) {
        let wakers = {
            let mut buffer = self.lock();
            // A reader that had read everything was waiting, not stalled:
            // its time to take the new chunk starts now.
            let end = buffer.base + buffer.chunks.len();
            let now = Instant::now();
            for reader in buffer.readers.values_mut() {
                if reader.next >= end {
                    reader.last_read = now;
                }
            }
            buffer.chunks.push_back(chunk);
            std::mem::take(&mut buffer.wakers)
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    pub fn finish(&self, complete: bool) {
        let wakers = {
            let mut buffer = self.lock();
            buffer.end = Some(if complete {
                End::Complete
            } else {
                End::Aborted
            });
            std::mem::take(&mut buffer.wakers)
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Ends a flight its fill left unfinished: waiters still waiting for the
    /// head go on their own, readers see an aborted body.
    pub fn abandon(&self) {
        self.head.send_if_modified(|head| {
            let pending = matches!(head, Head::Pending);
            if pending {
                *head = Head::Solo(SoloResponse::default());
            }
            pending
        });
        let unfinished = self.lock().end.is_none();
        if unfinished {
            self.finish(false);
        }
    }

    /// Stops keeping the replay copy: chunks every reader has read are dropped.
    pub fn stop_keeping(&self) {
        let mut buffer = self.lock();
        buffer.keep_all = false;
        trim(&mut buffer);
    }

    /// Bytes buffered but not yet read by the slowest reader.
    pub fn unread_bytes(&self) -> usize {
        self.lock().chunks.iter().map(Bytes::len).sum()
    }

    /// Cuts off the readers that hold more than `window` bytes in the
    /// buffer and have not read since `stalled_since`, while another reader
    /// has or waits for more: their bodies end with an error, and the chunks only they still
    /// needed go. A reader that keeps reading is never cut off, however far
    /// behind; when no reader has read since then, none is cut here (the
    /// caller's idle timeout decides). Returns how many were cut off.
    pub fn detach_stalled(&self, window: usize, stalled_since: Instant) -> usize {
        let (count, wakers) = {
            let mut buffer = self.lock();
            // unread[i]: bytes from chunk i (relative) to the end.
            let mut unread = vec![0usize; buffer.chunks.len() + 1];
            for (i, chunk) in buffer.chunks.iter().enumerate().rev() {
                unread[i] = unread[i + 1] + chunk.len();
            }
            let base = buffer.base;
            let holds = |next: usize| unread[next.saturating_sub(base).min(unread.len() - 1)];
            // Someone keeps up: it read lately, or has read everything and
            // waits for more.
            let someone_keeps_up = buffer
                .readers
                .values()
                .any(|reader| reader.last_read >= stalled_since || holds(reader.next) == 0);
            if !someone_keeps_up {
                return 0;
            }
            let stalled: Vec<u64> = buffer
                .readers
                .iter()
                .filter(|(_, reader)| {
                    holds(reader.next) > window && reader.last_read < stalled_since
                })
                .map(|(id, _)| *id)
                .collect();
            if stalled.is_empty() {
                return 0;
            }
            for id in &stalled {
                buffer.readers.remove(id);
            }
            trim(&mut buffer);
            (stalled.len(), std::mem::take(&mut buffer.wakers))
        };
        wakers.into_iter().for_each(Waker::wake);
        count
    }

    /// Cuts off every reader (none has read for too long).
    pub fn detach_all(&self) {
        let wakers = {
            let mut buffer = self.lock();
            buffer.readers.clear();
            trim(&mut buffer);
            std::mem::take(&mut buffer.wakers)
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// The whole body so far plus `last`, for the store; only meaningful
    /// while keeping all.
    pub fn collected_with(&self, last: &[u8]) -> Bytes {
        let buffer = self.lock();
        // Always a fresh copy: a chunk may share a larger read buffer, which
        // would then be held (and misweighed) for the entry's whole life.
        let total: usize = buffer.chunks.iter().map(Bytes::len).sum::<usize>() + last.len();
        let mut body = Vec::with_capacity(total);
        for chunk in &buffer.chunks {
            body.extend_from_slice(chunk);
        }
        body.extend_from_slice(last);
        Bytes::from(body)
    }

    /// Waits until a reader reads or leaves.
    pub async fn readers_changed(&self) {
        self.readers_changed.notified().await;
    }
}

fn trim(buffer: &mut Buffer) {
    if buffer.keep_all {
        return;
    }
    let slowest = buffer
        .readers
        .values()
        .map(|reader| reader.next)
        .min()
        .unwrap_or(buffer.base + buffer.chunks.len());
    while buffer.base < slowest && !buffer.chunks.is_empty() {
        buffer.chunks.pop_front();
        buffer.base += 1;
    }
}

/// One reader's view of a flight's body.
pub struct FlightBody {
    flight: Arc<Flight>,
    id: u64,
}

impl http_body::Body for FlightBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut buffer = this.flight.lock();
        let Some(position) = buffer.readers.get(&this.id).map(|reader| reader.next) else {
            return Poll::Ready(Some(Err(
                "cut off: this reader stopped reading a shared response".into(),
            )));
        };
        let offset = position.saturating_sub(buffer.base);
        if let Some(chunk) = buffer.chunks.get(offset).cloned() {
            buffer.readers.insert(
                this.id,
                ReaderAt {
                    next: position + 1,
                    last_read: Instant::now(),
                },
            );
            trim(&mut buffer);
            drop(buffer);
            this.flight.readers_changed.notify_one();
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        match buffer.end {
            Some(End::Complete) => Poll::Ready(None),
            Some(End::Aborted) => {
                Poll::Ready(Some(Err("the upstream response ended early".into())))
            }
            None => {
                buffer.wakers.push(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for FlightBody {
    fn drop(&mut self) {
        {
            let mut buffer = self.flight.lock();
            buffer.readers.remove(&self.id);
            trim(&mut buffer);
        }
        self.flight.readers_changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::time::Duration;

    #[tokio::test]
    async fn late_reader_replays_from_the_start() {
        let flight = Flight::new();
        flight.push(Bytes::from_static(b"ab"));
        let early = flight.reader().unwrap();
        flight.push(Bytes::from_static(b"cd"));
        let late = flight.reader().unwrap();
        flight.finish(true);
        assert_eq!(early.collect().await.unwrap().to_bytes(), "abcd");
        assert_eq!(late.collect().await.unwrap().to_bytes(), "abcd");
        assert_eq!(flight.collected_with(b"e"), "abcde");
    }

    #[tokio::test]
    async fn an_abandoned_flight_releases_waiters_and_readers() {
        let flight = Flight::new();
        let reader = flight.reader().unwrap();
        flight.abandon();
        assert!(matches!(flight.wait_head().await, Head::Solo(solo) if solo.take().is_none()));
        assert!(reader.collect().await.is_err());
    }

    #[tokio::test]
    async fn aborted_flight_ends_readers_with_an_error() {
        let flight = Flight::new();
        let reader = flight.reader().unwrap();
        flight.push(Bytes::from_static(b"ab"));
        flight.finish(false);
        assert!(reader.collect().await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_stopped_reading_while_another_reads_is_cut_off() {
        let flight = Flight::new();
        let mut fast = flight.reader().unwrap();
        let slow = flight.reader().unwrap();
        flight.stop_keeping();
        for _ in 0..4 {
            flight.push(Bytes::from_static(b"0123456789"));
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        let a_second_ago = Instant::now() - Duration::from_secs(1);
        assert_eq!(
            flight.detach_stalled(30, a_second_ago),
            0,
            "neither read for a second: the idle timeout decides"
        );
        for _ in 0..4 {
            fast.frame().await.unwrap().unwrap();
        }
        assert_eq!(
            flight.detach_stalled(40, a_second_ago),
            0,
            "exactly a window behind"
        );
        flight.push(Bytes::from_static(b"x"));
        fast.frame().await.unwrap().unwrap();
        assert_eq!(flight.detach_stalled(40, a_second_ago), 1);
        assert_eq!(flight.unread_bytes(), 0, "its chunks went with it");
        assert!(slow.collect().await.is_err());
        flight.finish(true);
        assert!(fast.frame().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_far_behind_that_keeps_reading_is_not_cut_off() {
        let flight = Flight::new();
        let mut fast = flight.reader().unwrap();
        let mut behind = flight.reader().unwrap();
        flight.stop_keeping();
        for _ in 0..8 {
            flight.push(Bytes::from_static(b"0123456789"));
            fast.frame().await.unwrap().unwrap();
        }
        behind.frame().await.unwrap().unwrap();
        tokio::time::advance(Duration::from_millis(500)).await;
        let a_second_ago = Instant::now() - Duration::from_secs(1);
        assert_eq!(flight.detach_stalled(10, a_second_ago), 0);
        assert_eq!(flight.unread_bytes(), 70);
    }

    #[tokio::test]
    async fn without_replay_chunks_go_once_read_and_joiners_are_refused() {
        let flight = Flight::new();
        let mut reader = flight.reader().unwrap();
        flight.stop_keeping();
        flight.push(Bytes::from_static(b"ab"));
        let frame = reader.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        assert_eq!(flight.unread_bytes(), 0);
        assert!(flight.reader().is_none());
        drop(reader);
        assert_eq!(flight.reader_count(), 0);
    }
}
