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

use crate::http::body::{Body, BoxError};

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
                duration_ms = entry.started.elapsed().as_micros() as f64 / 1000.0,
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use http_body_util::BodyExt;

    use super::*;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut buffer) = self.0.lock() {
                buffer.extend_from_slice(bytes);
            }
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn logs_one_line_with_the_bytes_sent_when_the_body_ends() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let entry = AccessEntry {
            method: Method::POST,
            path: "/orders".to_string(),
            status: StatusCode::CREATED,
            upstream: Some(Arc::from("shop")),
            cache_status: Some("larder; fwd=uri-miss".to_string()),
            started: Instant::now(),
        };
        let body = LoggedBody::new(crate::http::body::full("twelve bytes"), entry);
        let collected = body.collect().await.map(|c| c.to_bytes());
        assert_eq!(collected.ok(), Some(Bytes::from_static(b"twelve bytes")));
        let text = captured
            .0
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        assert_eq!(text.lines().count(), 1, "{text}");
        for expected in [
            "larder::access",
            "method=POST",
            "path=/orders",
            "status=201",
            "bytes=12",
            "upstream=\"shop\"",
            "cache=\"larder; fwd=uri-miss\"",
            "complete=true",
        ] {
            assert!(text.contains(expected), "missing {expected}: {text}");
        }
    }
}
