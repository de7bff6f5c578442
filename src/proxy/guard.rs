//! Guards on a streaming request body, applied while it streams upstream:
//! the size limit (a chunked upload that goes over is cut off at the limit,
//! never buffered to be measured) and the idle timeout (a client that stops
//! sending mid-body does not hold an upstream connection forever).

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::http::body::BoxError;

/// How long a client may pause between parts of a request body (nginx's
/// `client_body_timeout` default). Time spent waiting on the upstream to
/// accept data does not count.
pub const CLIENT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a request body was cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    TooLarge { limit: u64 },
    Idle { timeout: Duration },
}

/// Records the first fault of a request body; the body keeps one copy and
/// the request's context the other, so `respond` can answer 413 (or 400)
/// instead of 502 when the upstream call failed because of it.
#[derive(Debug, Clone, Default)]
pub struct BodyGuard(Arc<OnceLock<BodyFault>>);

impl BodyGuard {
    pub fn fault(&self) -> Option<BodyFault> {
        self.0.get().copied()
    }

    fn record(&self, fault: BodyFault) {
        let _ = self.0.set(fault);
    }
}

#[derive(Debug, thiserror::Error)]
enum GuardError {
    #[error("request body larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the client sent no request body data for {timeout:?}")]
    Idle { timeout: Duration },
}

pin_project_lite::pin_project! {
    /// A request body that fails once more than `limit` bytes have passed or
    /// the client has been silent for `idle_timeout`.
    pub struct GuardedBody<B> {
        #[pin]
        inner: B,
        #[pin]
        idle: Sleep,
        idle_timeout: Duration,
        // Whether `idle` is armed: set on the first `Pending` after data.
        waiting: bool,
        remaining: Option<u64>,
        limit: Option<u64>,
        guard: BodyGuard,
    }
}

impl<B> GuardedBody<B> {
    /// Must be called inside the runtime (it creates a timer).
    pub fn new(inner: B, limit: Option<u64>, idle_timeout: Duration, guard: BodyGuard) -> Self {
        Self {
            inner,
            idle: tokio::time::sleep(idle_timeout),
            idle_timeout,
            waiting: false,
            remaining: limit,
            limit,
            guard,
        }
    }
}

impl<B> HttpBody for GuardedBody<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *this.waiting = false;
                if let (Some(data), Some(remaining), Some(limit)) =
                    (frame.data_ref(), this.remaining.as_mut(), *this.limit)
                {
                    let len = data.len() as u64;
                    if len > *remaining {
                        this.guard.record(BodyFault::TooLarge { limit });
                        return Poll::Ready(Some(Err(Box::new(GuardError::TooLarge { limit }))));
                    }
                    *remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if !*this.waiting {
                    *this.waiting = true;
                    let deadline = Instant::now() + *this.idle_timeout;
                    this.idle.as_mut().reset(deadline);
                }
                if this.idle.poll(cx).is_ready() {
                    let timeout = *this.idle_timeout;
                    this.guard.record(BodyFault::Idle { timeout });
                    return Poll::Ready(Some(Err(Box::new(GuardError::Idle { timeout }))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn chunks(
        parts: &'static [&'static str],
    ) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, std::convert::Infallible>>>
    {
        StreamBody::new(futures_util::stream::iter(
            parts
                .iter()
                .map(|s| Ok(Frame::data(Bytes::from_static(s.as_bytes())))),
        ))
    }

    #[tokio::test]
    async fn cuts_off_a_streamed_body_over_the_limit() {
        let guard = BodyGuard::default();
        let body = GuardedBody::new(
            chunks(&["abcd", "efgh", "ijkl"]),
            Some(10),
            CLIENT_BODY_IDLE_TIMEOUT,
            guard.clone(),
        );
        assert!(body.collect().await.is_err());
        assert_eq!(guard.fault(), Some(BodyFault::TooLarge { limit: 10 }));
    }

    #[tokio::test]
    async fn passes_a_body_at_the_limit() {
        let guard = BodyGuard::default();
        let body = GuardedBody::new(
            chunks(&["01234", "56789"]),
            Some(10),
            CLIENT_BODY_IDLE_TIMEOUT,
            guard.clone(),
        );
        let collected = body.collect().await.map(|c| c.to_bytes());
        assert_eq!(collected.ok(), Some(Bytes::from_static(b"0123456789")));
        assert_eq!(guard.fault(), None);
    }

    #[tokio::test]
    async fn a_client_silent_past_the_idle_timeout_is_cut_off() {
        let guard = BodyGuard::default();
        let silent = StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, std::convert::Infallible>,
        >());
        let timeout = Duration::from_millis(50);
        let body = GuardedBody::new(silent, None, timeout, guard.clone());
        let collected = tokio::time::timeout(Duration::from_secs(10), body.collect())
            .await
            .expect("the guard ends a silent body");
        assert!(collected.is_err());
        assert_eq!(guard.fault(), Some(BodyFault::Idle { timeout }));
    }

    #[tokio::test]
    async fn pauses_shorter_than_the_idle_timeout_are_fine() {
        let guard = BodyGuard::default();
        let slow = futures_util::stream::unfold(0, |sent| async move {
            if sent == 3 {
                return None;
            }
            // A slow client: 20 ms between parts, far under the 2 s timeout.
            tokio::time::sleep(Duration::from_millis(20)).await;
            Some((
                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"x"))),
                sent + 1,
            ))
        });
        let body = GuardedBody::new(
            StreamBody::new(Box::pin(slow)),
            None,
            Duration::from_secs(2),
            guard.clone(),
        );
        let collected = body.collect().await.map(|c| c.to_bytes());
        assert_eq!(collected.ok(), Some(Bytes::from_static(b"xxx")));
        assert_eq!(guard.fault(), None);
    }
}
