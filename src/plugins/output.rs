//! Guest stdout and stderr: each complete line goes to the host log tagged
//! with the plugin (control characters escaped, a line cap per call), and
//! the tail of stderr is kept for the failure report.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use parking_lot::Mutex;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Guest output kept per call for the failure log (the tail of stderr).
const STDERR_TAIL_BYTES: usize = 2048;
/// Guest output lines written to the host log per call; the rest is dropped.
const MAX_LOG_LINES_PER_CALL: u32 = 200;

#[derive(Clone, Copy)]
pub enum OutputKind {
    Stdout,
    Stderr,
}

/// Guest stdout/stderr: each complete line goes to the host log tagged with
/// the plugin; the tail of stderr is kept for the failure report.
#[derive(Clone)]
pub struct GuestOutput {
    inner: Arc<Mutex<OutputBuffers>>,
}

struct OutputBuffers {
    plugin: Arc<str>,
    partial: [Vec<u8>; 2],
    stderr_tail: Vec<u8>,
    lines: u32,
}

impl GuestOutput {
    pub fn new(plugin: Arc<str>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(OutputBuffers {
                plugin,
                partial: [Vec::new(), Vec::new()],
                stderr_tail: Vec::new(),
                lines: 0,
            })),
        }
    }

    pub fn stream(&self, kind: OutputKind) -> GuestStream {
        GuestStream {
            output: self.clone(),
            kind,
        }
    }

    fn write(&self, kind: OutputKind, bytes: &[u8]) {
        let mut buffers = self.inner.lock();
        if matches!(kind, OutputKind::Stderr) {
            buffers.stderr_tail.extend_from_slice(bytes);
            let excess = buffers.stderr_tail.len().saturating_sub(STDERR_TAIL_BYTES);
            buffers.stderr_tail.drain(..excess);
        }
        let index = kind as usize;
        buffers.partial[index].extend_from_slice(bytes);
        while let Some(end) = buffers.partial[index].iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffers.partial[index].drain(..=end).collect();
            buffers.emit(kind, &line);
        }
        if buffers.partial[index].len() > 4096 {
            let line = std::mem::take(&mut buffers.partial[index]);
            buffers.emit(kind, &line);
        }
    }

    /// Logs what is left of unterminated lines (a call ended or trapped).
    pub fn flush(&self) {
        let mut buffers = self.inner.lock();
        for kind in [OutputKind::Stdout, OutputKind::Stderr] {
            let line = std::mem::take(&mut buffers.partial[kind as usize]);
            if !line.is_empty() {
                buffers.emit(kind, &line);
            }
        }
    }

    /// The last stderr bytes of this call, for the failure log.
    pub fn stderr_tail(&self) -> String {
        let buffers = self.inner.lock();
        String::from_utf8_lossy(&buffers.stderr_tail)
            .trim()
            .to_string()
    }

    /// Keeps a line the guest logged at error level with the stderr tail
    /// (it is logged already): a guest without WASI reports a panic so.
    pub fn note_error(&self, line: &str) {
        let mut buffers = self.inner.lock();
        if !buffers.stderr_tail.is_empty() {
            buffers.stderr_tail.push(b'\n');
        }
        buffers.stderr_tail.extend_from_slice(line.as_bytes());
        let excess = buffers.stderr_tail.len().saturating_sub(STDERR_TAIL_BYTES);
        buffers.stderr_tail.drain(..excess);
    }

    pub fn reset_tail(&self) {
        let mut buffers = self.inner.lock();
        buffers.stderr_tail.clear();
        buffers.lines = 0;
    }
}

impl OutputBuffers {
    fn emit(&mut self, kind: OutputKind, line: &[u8]) {
        let text = escape_controls(String::from_utf8_lossy(line).trim_end());
        if text.is_empty() {
            return;
        }
        self.lines += 1;
        if self.lines > MAX_LOG_LINES_PER_CALL {
            return;
        }
        let plugin = &*self.plugin;
        match kind {
            OutputKind::Stdout => tracing::info!(plugin, stream = "stdout", "{text}"),
            OutputKind::Stderr => tracing::warn!(plugin, stream = "stderr", "{text}"),
        }
    }
}

/// Escapes control characters (`\r`, `\x1b`, ...) in guest text bound for
/// the log, so a guest cannot forge lines or terminal sequences.
pub fn escape_controls(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// One WASI output stream (stdout or stderr) of a guest.
#[derive(Clone)]
pub struct GuestStream {
    output: GuestOutput,
    kind: OutputKind,
}

impl IsTerminal for GuestStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for GuestStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.output.write(self.kind, &bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestStream {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for GuestStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.output.write(self.kind, buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_text_cannot_forge_log_lines() {
        assert_eq!(
            escape_controls("ok\r\nFAKE\x1b[31m"),
            "ok\\r\\nFAKE\\u{1b}[31m"
        );
        assert_eq!(escape_controls("plain text"), "plain text");
    }
}
