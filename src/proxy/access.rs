//! The access log: one INFO line per request on target `larder::access`,
//! written when the response body ends (or the client goes away), so `bytes`
//! and `duration_ms` are what was really sent.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::body::{Body, BoxError};

/// What the line says about one request, gathered along the request path.
pub struct AccessEntry {
    pub method: Method,
    pub path: String,
    pub status: StatusCode,
    pub upstream: Option<Arc<str>>,
    pub cache_status: Option<String>,
    pub started: Instant,
}

pin_project_lite::pin_project! {
    /// Wraps a response body, counts its bytes and logs the entry on drop.
    pub struct LoggedBody {
        #[pin]
        inner: Body,
        entry: AccessEntry,
        bytes: u64,
        complete: bool,
    }

    impl PinnedDrop for LoggedBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            let entry = &*this.entry;
            let complete = *this.complete || this.inner.is_end_stream();
            tracing::info!(
                target: "larder::access",
                method = %entry.method,
                path = %entry.path,
                status = entry.status.as_u16(),
                bytes = *this.bytes,
                duration_ms = entry.started.elapsed().as_secs_f64() * 1000.0,
                upstream = entry.upstream.as_deref().unwrap_or("-"),
                cache = entry.cache_status.as_deref().unwrap_or("-"),
                complete,
                "request served"
            );
        }
    }
}

impl LoggedBody {
    pub fn new(inner: Body, entry: AccessEntry) -> Self {
        Self {
            inner,
            entry,
            bytes: 0,
            complete: false,
        }
    }
}

impl HttpBody for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => *this.complete = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
