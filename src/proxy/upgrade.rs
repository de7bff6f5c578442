//! HTTP/1.1 Upgrade (WebSocket) tunnelling: the handshake goes upstream like
//! any request; on `101 Switching Protocols` both connections are taken over
//! and bytes are copied both ways until either side closes.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::http::body::{self, Body};
use crate::http::hop_by_hop;
use crate::upstream::{UpstreamClient, UpstreamError};

/// Forwards an upgrade request; the tunnel runs in its own task once both
/// sides have switched protocols.
pub async fn tunnel(
    upstream: &UpstreamClient,
    mut request: Request<Incoming>,
) -> Result<Response<Body>, UpstreamError> {
    let client_side = hyper::upgrade::on(&mut request);
    let request = request.map(body::boxed);
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
        let (client, origin) = match tokio::try_join!(client_side, upstream_side) {
            Ok(both) => both,
            Err(error) => {
                tracing::debug!(upstream = %name, %error, "upgrade did not complete");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut origin = TokioIo::new(origin);
        match tokio::io::copy_bidirectional(&mut client, &mut origin).await {
            Ok((up, down)) => {
                tracing::debug!(upstream = %name, bytes_up = up, bytes_down = down, "tunnel closed");
            }
            Err(error) => tracing::debug!(upstream = %name, %error, "tunnel ended with an error"),
        }
    });
    Ok(Response::from_parts(parts, body::empty()))
}
