//! The one body type that flows through Larder, and small constructors for it.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};

/// Errors carried by a streaming body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A boxed, streaming HTTP body: upstream bodies, cache copies and generated
/// answers all become this.
pub type Body = BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Boxes any body whose error converts into [`BoxError`] (hyper's `Incoming` among them).
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// The error a body gives when its source sent nothing for too long.
#[derive(Debug, thiserror::Error)]
#[error("the body sent nothing for {} ms", .0.as_millis())]
pub struct BodyIdle(pub std::time::Duration);

/// `body`, failing with [`BodyIdle`] once a poll has waited `idle` for the
/// next frame. Meant for bodies read as fast as they arrive (a cache fill, a
/// body collected for a plugin): the wait is measured from the last frame.
pub fn with_idle_timeout(body: Body, idle: std::time::Duration) -> Body {
    IdleTimeout {
        inner: body,
        idle,
        timer: Box::pin(tokio::time::sleep(idle)),
    }
    .boxed()
}

struct IdleTimeout {
    inner: Body,
    idle: std::time::Duration,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for IdleTimeout {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::future::Future as _;
        use std::task::Poll;
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = tokio::time::Instant::now() + this.idle;
                this.timer.as_mut().reset(next);
                Poll::Ready(frame)
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(BodyIdle(this.idle).into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_fails_after_the_idle_timeout() {
        use futures_util::StreamExt as _;
        let first: Result<http_body::Frame<Bytes>, BoxError> =
            Ok(http_body::Frame::data(Bytes::from_static(b"a")));
        let frames = futures_util::stream::iter([first]).chain(futures_util::stream::pending());
        let idle = std::time::Duration::from_secs(5);
        let mut body = with_idle_timeout(
            BodyExt::boxed(http_body_util::StreamBody::new(frames)),
            idle,
        );
        assert!(matches!(body.frame().await, Some(Ok(_))));
        let started = tokio::time::Instant::now();
        let stalled = body.frame().await;
        assert!(matches!(stalled, Some(Err(error)) if error.is::<BodyIdle>()));
        assert_eq!(started.elapsed(), idle);
    }
}
