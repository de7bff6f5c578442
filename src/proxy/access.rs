//! The access log: one line per request, written when the response body
//! ends (or the client goes away), so `bytes` and `duration_ms` are what
//! was really sent. By default an INFO event on target `larder::access`;
//! `log.access_log_format` may ask for the Common or Combined Log Format or
//! JSON instead, one line on standard output each (where nginx and Apache
//! users' tools expect an access log, apart from the process log on
//! standard error).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::config::AccessLogFormat;
use crate::http::body::{Body, BoxError};

/// What a request line says, kept at the start of a request only when an
/// access log will write it.
pub struct RequestLine {
    /// The path, and the query for the formats that show it.
    pub target: String,
    pub version: http::Version,
    pub host: Option<String>,
    pub referer: Option<String>,
    pub user_agent: Option<String>,
    /// When the request came, by the wall clock.
    pub at: std::time::SystemTime,
}

impl RequestLine {
    pub fn of<B>(request: &http::Request<B>, format: AccessLogFormat) -> Self {
        let header = |name: http::header::HeaderName| {
            request
                .headers()
                .get(name)
                .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
        };
        let detailed = format != AccessLogFormat::Log;
        let uri = request.uri();
        Self {
            target: match (detailed, uri.path_and_query()) {
                (true, Some(target)) => target.as_str().to_string(),
                _ => uri.path().to_string(),
            },
            version: request.version(),
            host: detailed
                .then(|| {
                    uri.authority()
                        .map(|authority| authority.as_str().to_string())
                        .or_else(|| header(http::header::HOST))
                })
                .flatten(),
            referer: (format == AccessLogFormat::Combined || format == AccessLogFormat::Json)
                .then(|| header(http::header::REFERER))
                .flatten(),
            user_agent: (format == AccessLogFormat::Combined || format == AccessLogFormat::Json)
                .then(|| header(http::header::USER_AGENT))
                .flatten(),
            at: std::time::SystemTime::now(),
        }
    }
}

/// What the line says about one request, gathered along the request path.
pub struct AccessEntry {
    pub format: AccessLogFormat,
    pub client: std::net::IpAddr,
    pub method: Method,
    pub line: RequestLine,
    pub status: StatusCode,
    pub upstream: Option<Arc<str>>,
    pub cache_status: Option<String>,
    pub started: Instant,
}

impl AccessEntry {
    fn write(&self, bytes: u64, complete: bool) {
        let duration_ms = self.started.elapsed().as_micros() as f64 / 1000.0;
        let line = match self.format {
            AccessLogFormat::Log => {
                tracing::info!(
                    target: "larder::access",
                    method = %self.method,
                    path = %self.line.target,
                    status = self.status.as_u16(),
                    bytes,
                    duration_ms,
                    upstream = self.upstream.as_deref().unwrap_or("-"),
                    cache = self.cache_status.as_deref().unwrap_or("-"),
                    complete,
                    "request served"
                );
                return;
            }
            AccessLogFormat::Common => self.ncsa(bytes, false),
            AccessLogFormat::Combined => self.ncsa(bytes, true),
            AccessLogFormat::Json => self.json(bytes, duration_ms, complete),
        };
        use std::io::Write as _;
        // One write per line, so lines from several threads never interleave.
        let _ = std::io::stdout().lock().write_all(line.as_bytes());
    }

    /// `client - - [time] "METHOD target PROTO" status bytes` and, for
    /// combined, `"referer" "user-agent"`.
    fn ncsa(&self, bytes: u64, combined: bool) -> String {
        let time =
            chrono::DateTime::<chrono::Utc>::from(self.line.at).format("%d/%b/%Y:%H:%M:%S %z");
        let mut line = format!(
            "{} - - [{time}] \"{} {} {}\" {} {bytes}",
            self.client,
            self.method,
            escape(&self.line.target),
            version_name(self.line.version),
            self.status.as_u16(),
        );
        if combined {
            let quoted = |value: &Option<String>| match value {
                Some(value) => escape(value),
                None => "-".to_string(),
            };
            line.push_str(&format!(
                " \"{}\" \"{}\"",
                quoted(&self.line.referer),
                quoted(&self.line.user_agent)
            ));
        }
        line.push('\n');
        line
    }

    fn json(&self, bytes: u64, duration_ms: f64, complete: bool) -> String {
        let time = chrono::DateTime::<chrono::Utc>::from(self.line.at)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut line = serde_json::json!({
            "time": time,
            "client": self.client.to_string(),
            "method": self.method.as_str(),
            "host": self.line.host,
            "target": self.line.target,
            "protocol": version_name(self.line.version),
            "status": self.status.as_u16(),
            "bytes": bytes,
            "duration_ms": duration_ms,
            "upstream": self.upstream.as_deref(),
            "cache": self.cache_status,
            "referer": self.line.referer,
            "user_agent": self.line.user_agent,
            "complete": complete,
        })
        .to_string();
        line.push('\n');
        line
    }
}

fn version_name(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// What a client sent, made safe inside a quoted NCSA field: `"`, `\\` and
/// control or non-ASCII bytes as `\xHH` (nginx's escaping), so a field can
/// neither end the quotes nor forge a line.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte == b'"' || byte == b'\\' || !(0x20..0x7f).contains(&byte) {
            escaped.push_str(&format!("\\x{byte:02X}"));
        } else {
            escaped.push(char::from(byte));
        }
    }
    escaped
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
            let complete = *this.complete || this.inner.is_end_stream();
            this.entry.write(*this.bytes, complete);
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
        let entry = entry(AccessLogFormat::Log, "/orders");
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

    fn entry(format: AccessLogFormat, target: &str) -> AccessEntry {
        AccessEntry {
            format,
            client: std::net::IpAddr::from([192, 0, 2, 7]),
            method: Method::POST,
            line: RequestLine {
                target: target.to_string(),
                version: http::Version::HTTP_11,
                host: Some("shop.example".to_string()),
                referer: Some("https://ref.example/\"quoted\"".to_string()),
                user_agent: Some("curl/8.0".to_string()),
                // 2026-12-05T12:00:00Z
                at: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_472_000),
            },
            status: StatusCode::CREATED,
            upstream: Some(Arc::from("shop")),
            cache_status: Some("larder; fwd=uri-miss".to_string()),
            started: Instant::now(),
        }
    }

    #[test]
    fn common_and_combined_lines_are_ncsa_with_client_fields_escaped() {
        let common = entry(AccessLogFormat::Common, "/orders?id=1").ncsa(12, false);
        assert_eq!(
            common,
            "192.0.2.7 - - [05/Dec/2026:12:00:00 +0000] \"POST /orders?id=1 HTTP/1.1\" 201 12\n"
        );
        let combined = entry(AccessLogFormat::Combined, "/orders").ncsa(12, true);
        assert!(
            combined.ends_with("201 12 \"https://ref.example/\\x22quoted\\x22\" \"curl/8.0\"\n"),
            "{combined}"
        );
        assert_eq!(escape("a\nb\u{e9}"), "a\\x0Ab\\xC3\\xA9");
    }

    #[test]
    fn json_lines_carry_every_field() {
        let line = entry(AccessLogFormat::Json, "/orders?id=1").json(12, 1.5, true);
        assert!(line.ends_with('\n'));
        let value: serde_json::Value = serde_json::from_str(&line).expect("one JSON object");
        assert_eq!(value["time"], "2026-12-05T12:00:00.000Z");
        assert_eq!(value["client"], "192.0.2.7");
        assert_eq!(value["target"], "/orders?id=1");
        assert_eq!(value["host"], "shop.example");
        assert_eq!(value["status"], 201);
        assert_eq!(value["bytes"], 12);
        assert_eq!(value["cache"], "larder; fwd=uri-miss");
        assert_eq!(value["user_agent"], "curl/8.0");
    }
}
