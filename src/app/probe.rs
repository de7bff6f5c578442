//! `larder health`: one GET of `/health` on a running Larder's listener, for
//! a container's HEALTHCHECK or a script, without curl in the image.
//!
//! Must not retry or wait beyond its timeout: the caller's schedule does.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use http_body_util::Empty;
use hyper_util::rt::TokioIo;

/// Where to reach a listener bound to `listen`: the loopback address for
/// a wildcard bind.
pub fn reachable(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), listen.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), listen.port())
        }
        _ => listen,
    }
}

/// `GET /health` on `addr`: Ok when it answers 200 within `timeout`.
pub async fn health(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let check = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        tokio::spawn(connection);
        let request = http::Request::get("/health")
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        if response.status() == http::StatusCode::OK {
            Ok(())
        } else {
            Err(format!("{addr}/health answered {}", response.status()))
        }
    };
    tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| format!("{addr}/health: no answer within {timeout:?}"))?
}
