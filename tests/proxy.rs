//! The proxy end to end over real sockets: routing, forwarding, header
//! hygiene, errors, streaming, upgrades, TLS upstreams, h2c and shutdown.

mod common;

use common::{get, get_with, respond, start_larder, start_origin};

fn upstream_config(origin_url: &str) -> String {
    format!("upstreams:\n  app:\n    servers: [\"{origin_url}\"]\nroutes:\n  - upstream: app\n")
}

#[tokio::test]
async fn forwards_a_get_to_the_upstream_and_back() {
    let origin = start_origin(|request| async move {
        let body = format!("{} {}", request.method(), request.uri());
        respond(200, &[("x-origin", "yes")], body)
    })
    .await;
    let larder = start_larder(&upstream_config(&origin.url())).await;
    let reply = get_with(&larder.url("/a/b?c=1"), &[("accept", "text/plain")]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "GET /a/b?c=1");
    assert_eq!(reply.header("x-origin"), Some("yes"));
    assert_eq!(origin.hits(), 1);
    larder.stop().await;
    let _ = get;
}
