//! A bare hyper pass-through proxy: one thread, one upstream connection per
//! client connection, both driven by the same task; no routing, no header
//! rules, no timeouts, no logging, no metrics. It is the floor for any
//! hyper-based proxy on a machine, so `larder / bare-proxy` says how much of
//! the gap to nginx `proxy_pass` is Larder's own and how much is hyper's.
//!
//!     bare-proxy LISTEN_ADDR UPSTREAM_ADDR
//!
//! Benchmark-only code: it panics on anything unexpected.

use std::cell::RefCell;
use std::rc::Rc;

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: bare-proxy LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let listener = TcpListener::bind(&listen).await.expect("bind");
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async move {
            loop {
                let (client, _) = listener.accept().await.expect("accept");
                tokio::task::spawn_local(serve(client, upstream.clone()));
            }
        })
        .await;
}

async fn serve(client: TcpStream, upstream: String) {
    client.set_nodelay(true).expect("nodelay");
    let origin = TcpStream::connect(&upstream)
        .await
        .expect("connect upstream");
    origin.set_nodelay(true).expect("nodelay");
    let (sender, origin_connection) =
        hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(origin))
            .await
            .expect("handshake");
    let sender = Rc::new(RefCell::new(sender));
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        forward(sender.clone(), request)
    });
    let client_connection =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(client), service);
    // Both connections in this one task: whichever ends first ends the pair.
    tokio::select! {
        _ = client_connection => {}
        _ = origin_connection => {}
    }
}

async fn forward(
    sender: Rc<RefCell<SendRequest<Incoming>>>,
    request: Request<Incoming>,
) -> Result<Response<Incoming>, hyper::Error> {
    let (mut parts, body) = request.into_parts();
    if let Some(path) = parts.uri.path_and_query() {
        parts.uri = path.as_str().parse().expect("origin-form target");
    }
    // HTTP/1.1 clients wait for each response, so the sender is idle here.
    let response = sender
        .borrow_mut()
        .send_request(Request::from_parts(parts, body));
    response.await
}
