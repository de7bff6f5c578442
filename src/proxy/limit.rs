//! The request-body limit, counted while the body streams: a chunked upload
//! that goes over is cut off at the limit, never buffered to be measured.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::body::BoxError;

/// Set when a request body went over its limit; kept in the request's
/// extensions so whoever sees the upstream fail can answer 413, not 502.
#[derive(Debug, Clone)]
pub struct LimitTripped {
    flag: Arc<AtomicBool>,
    limit: u64,
}

impl LimitTripped {
    pub fn new(limit: u64) -> Self {
        Self {
            flag: Arc::default(),
            limit,
        }
    }

    pub fn is_tripped(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }
}

#[derive(Debug, thiserror::Error)]
#[error("request body larger than the limit of {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

pin_project_lite::pin_project! {
    /// A body that fails once more than `limit` bytes have passed.
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        remaining: u64,
        limit: u64,
        tripped: LimitTripped,
    }
}

impl<B> LimitedBody<B> {
    pub fn new(inner: B, limit: u64, tripped: LimitTripped) -> Self {
        Self {
            inner,
            remaining: limit,
            limit,
            tripped,
        }
    }
}

impl<B> HttpBody for LimitedBody<B>
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
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > *this.remaining {
                        this.tripped.flag.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge {
                            limit: *this.limit,
                        }))));
                    }
                    *this.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
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

    #[tokio::test]
    async fn cuts_off_a_streamed_body_over_the_limit() {
        let chunks = futures_util::stream::iter(
            ["abcd", "efgh", "ijkl"]
                .map(|s| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(s)))),
        );
        let tripped = LimitTripped::new(10);
        let body = LimitedBody::new(StreamBody::new(chunks), 10, tripped.clone());
        assert!(body.collect().await.is_err());
        assert!(tripped.is_tripped());
    }

    #[tokio::test]
    async fn passes_a_body_at_the_limit() {
        let tripped = LimitTripped::new(10);
        let body = LimitedBody::new(
            http_body_util::Full::new(Bytes::from("0123456789")),
            10,
            tripped.clone(),
        );
        let collected = body.collect().await.map(|c| c.to_bytes());
        assert_eq!(collected.ok(), Some(Bytes::from("0123456789")));
        assert!(!tripped.is_tripped());
    }
}
