//! The listeners' accept loop: each connection in its own task
//! (HTTP/1.1 and h2c on the same port), accept errors that never end the
//! loop, and the graceful drain on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::http::body::Body;

/// Accepts until told to stop, then drains the open connections for up to
/// the drain timeout it was told. Accept errors never end the loop.
pub async fn accept_loop<H, F>(
    name: &'static str,
    listener: TcpListener,
    mut stopped: watch::Receiver<Option<Duration>>,
    handler: H,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    builder.http2().timer(TokioTimer::new());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(listener = name, %error, "accept failed");
                    // Out of file descriptors and the like: give the process a moment.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => break,
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%peer, %error, "could not set TCP_NODELAY");
        }
        let handler = handler.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            // Boxed: hyper moves the service future into its connection
            // state, and the unboxed one is a few KiB copied per request.
            let response = Box::pin(handler(request, peer));
            async move { Ok::<_, Infallible>(response.await) }
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
        // Reap finished connection tasks so the set holds only live ones.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let drain_timeout = stopped
        .borrow()
        .unwrap_or(crate::config::ServerConfig::default().drain_timeout.0);
    tracing::info!(listener = name, connections = graceful.count(), "draining");
    if tokio::time::timeout(drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(listener = name, timeout = ?drain_timeout, remaining = connections.len(), "drain timeout passed; closing the remaining connections");
        connections.shutdown().await;
    }
}
