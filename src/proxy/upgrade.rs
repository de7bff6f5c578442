//! HTTP/1.1 Upgrade: which requests may become tunnels, and the tunnels.
//!
//! Only a protocol the route lists (`upgrades:`, default `websocket`) is
//! tunnelled, and only after the route's on-request plugins let the request
//! through; `h2c` is refused outright (it would carry HTTP/2 past routing and
//! plugins); any other `Upgrade` is dropped and the request is served as an
//! ordinary one. A tunnel's handshake goes upstream like a request; on
//! `101 Switching Protocols` both connections are taken over and bytes are
//! copied both ways until either side closes or nothing moves for the idle
//! timeout. Open tunnels are counted against `server.max_tunnels`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderMap};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::origin::RouteOrigin;
use crate::http::body::{self, Body};
use crate::http::error::RequestError;
use crate::http::hop_by_hop;
use crate::upstream::{UpstreamClient, UpstreamError};

/// The client's side of an accepted upgrade, taken from the request before
/// it goes through the pipeline: `Some` when the request asks for a
/// protocol the route tunnels (on an upstream route); 400 for `h2c`.
pub fn accept(
    allowed: &[String],
    origin: Option<&RouteOrigin>,
    request: &mut Request<Incoming>,
) -> Result<Option<OnUpgrade>, RequestError> {
    if !hop_by_hop::is_upgrade_request(request.headers()) {
        return Ok(None);
    }
    let protocols = protocols(request.headers());
    if protocols.iter().any(|name| name == "h2c") {
        return Err(RequestError::bad_request(
            "h2c upgrades are refused; speak HTTP/2 directly",
        ));
    }
    let tunnelled = origin.is_some()
        && protocols
            .first()
            .is_some_and(|first| allowed.iter().any(|name| name == first));
    if !tunnelled {
        // Served as an ordinary request: `prepare` drops Upgrade and Connection.
        tracing::debug!(
            ?protocols,
            "upgrade not allowed on this route; served as a plain request"
        );
        return Ok(None);
    }
    Ok(Some(hyper::upgrade::on(request)))
}

/// The protocol names an `Upgrade` field asks for, lowercase, versions dropped.
fn protocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|byte| *byte == b','))
        .map(|item| {
            let item = item.trim_ascii();
            let name = item.split(|byte| *byte == b'/').next().unwrap_or(item);
            String::from_utf8_lossy(name).to_ascii_lowercase()
        })
        .filter(|name| !name.is_empty())
        .collect()
}

/// The count of open tunnels, shared across reloads.
#[derive(Debug, Default)]
pub struct Tunnels {
    open: AtomicUsize,
}

impl Tunnels {
    /// A place for one more tunnel, if fewer than `max` are open.
    pub fn open(self: &Arc<Self>, max: usize) -> Option<TunnelPermit> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()?;
        Some(TunnelPermit(Arc::clone(self)))
    }

    pub fn count(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// One open tunnel's place; given back on drop.
pub struct TunnelPermit(Arc<Tunnels>);

impl Drop for TunnelPermit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A tunnel about to be opened.
pub struct Tunnel {
    pub client_side: OnUpgrade,
    pub permit: TunnelPermit,
    pub idle_timeout: Duration,
}

impl Tunnel {
    /// Sends the handshake upstream; on `101`, copies bytes both ways in a
    /// task of its own (holding the permit) and answers the client's side.
    pub async fn open(
        self,
        upstream: &UpstreamClient,
        request: Request<Body>,
    ) -> Result<Response<Body>, UpstreamError> {
        let mut response = upstream.send_upgrade(request).await?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            // The upstream declined the upgrade: its answer is a plain response.
            let (mut parts, incoming) = response.into_parts();
            hop_by_hop::strip(&mut parts.headers, false);
            return Ok(Response::from_parts(parts, body::boxed(incoming)));
        }
        let upstream_side = hyper::upgrade::on(&mut response);
        let (mut parts, _) = response.into_parts();
        hop_by_hop::strip(&mut parts.headers, true);
        let name = upstream.name().clone();
        tokio::spawn(async move {
            let Tunnel {
                client_side,
                permit,
                idle_timeout,
            } = self;
            let (client, origin) = match tokio::try_join!(client_side, upstream_side) {
                Ok(both) => both,
                Err(error) => {
                    tracing::debug!(upstream = %name, %error, "upgrade did not complete");
                    return;
                }
            };
            let outcome =
                copy_until_idle(TokioIo::new(client), TokioIo::new(origin), idle_timeout).await;
            drop(permit);
            match outcome {
                Ok((up, down)) => {
                    tracing::debug!(upstream = %name, bytes_up = up, bytes_down = down, "tunnel closed")
                }
                Err(error) => tracing::debug!(upstream = %name, %error, "tunnel ended"),
            }
        });
        Ok(Response::from_parts(parts, body::empty()))
    }
}

/// Copies both ways until either side closes, or nothing has moved in
/// either direction for `idle_timeout`.
async fn copy_until_idle<A, B>(a: A, b: B, idle_timeout: Duration) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let started = tokio::time::Instant::now();
    let last_active = Arc::new(AtomicU64::new(0));
    let mut a = Active::new(a, started, last_active.clone());
    let mut b = Active::new(b, started, last_active.clone());
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    loop {
        let idle_since = started + Duration::from_millis(last_active.load(Ordering::Relaxed));
        tokio::select! {
            outcome = &mut copy => return outcome,
            () = tokio::time::sleep_until(idle_since + idle_timeout) => {
                let active = started + Duration::from_millis(last_active.load(Ordering::Relaxed));
                if active + idle_timeout <= tokio::time::Instant::now() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no traffic for {} s", idle_timeout.as_secs()),
                    ));
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// An I/O object that records when a read or write last moved bytes.
    struct Active<T> {
        #[pin]
        inner: T,
        started: tokio::time::Instant,
        last_active: Arc<AtomicU64>,
    }
}

impl<T> Active<T> {
    fn new(inner: T, started: tokio::time::Instant, last_active: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            started,
            last_active,
        }
    }
}

fn touch(started: tokio::time::Instant, last_active: &AtomicU64) {
    let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    last_active.store(millis, Ordering::Relaxed);
}

impl<T: AsyncRead> AsyncRead for Active<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            touch(*this.started, this.last_active);
        }
        polled
    }
}

impl<T: AsyncWrite> AsyncWrite for Active<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            touch(*this.started, this.last_active);
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_protocols_are_named_without_versions() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, "WebSocket/13, h2c".parse().unwrap());
        assert_eq!(protocols(&headers), vec!["websocket", "h2c"]);
    }

    #[test]
    fn tunnel_permits_are_capped_and_given_back() {
        let tunnels = Arc::new(Tunnels::default());
        let first = tunnels.open(2).expect("one");
        let second = tunnels.open(2).expect("two");
        assert!(tunnels.open(2).is_none(), "the cap holds");
        drop(first);
        assert!(tunnels.open(2).is_some(), "a closed tunnel frees its place");
        drop(second);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_tunnel_is_closed_after_its_idle_timeout() {
        let (a, _a_peer) = tokio::io::duplex(64);
        let (b, _b_peer) = tokio::io::duplex(64);
        let outcome = copy_until_idle(a, b, Duration::from_secs(30)).await;
        let error = outcome.expect_err("nothing moved");
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
    }
}
