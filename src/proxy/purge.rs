//! `PURGE` on the proxy listener (the Varnish habit): the route must enable
//! it and the client's address (the TCP peer, never a forwarded header) must
//! be in its allow-list; then the request's URL is purged from the cache.
//! Authorisation is the proxy's; the cache only applies the [`Purge`].

use std::net::{IpAddr, SocketAddr};

use http::request::Parts;
use http::{Response, StatusCode};
use ipnet::IpNet;

use crate::cache::{Cache, Purge};
use crate::config::RouteCache;
use crate::http::body::Body;
use crate::http::error::{ErrorKind, RequestError};

/// The methods a cached route answers, for the `Allow` of a refused PURGE.
const ALLOW: &str = "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS";

pub async fn answer(
    cache: &Cache,
    route: &RouteCache,
    request: &Parts,
    client: SocketAddr,
) -> Result<Response<Body>, RequestError> {
    let Some(purge) = &route.purge else {
        return Err(ErrorKind::MethodNotAllowed {
            allow: ALLOW,
            reason: "PURGE is not enabled on this route",
        }
        .into());
    };
    if !is_allowed(&purge.allow, client.ip()) {
        tracing::info!(client = %client.ip(), "PURGE refused: client not in purge.allow");
        return Err(ErrorKind::Forbidden("this client may not PURGE").into());
    }
    let purge = Purge::of_request(route, request);
    let purged = cache.purge(&purge);
    let shared = cache.purge_reach(PURGE_REACH_WAIT).await;
    tracing::info!(?purge, purged, shared = shared.as_str(), "PURGE");
    Ok(crate::http::json(
        StatusCode::OK,
        shared.answer(purged).to_string(),
    ))
}

/// How long a PURGE's answer waits for the purge to reach the shared tier
/// before saying it is queued.
const PURGE_REACH_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether `ip` is in one of the blocks; an IPv4-mapped IPv6 address
/// (`::ffff:10.0.0.1`, a dual-stack listener's view of an IPv4 client)
/// counts as the IPv4 address.
fn is_allowed(allow: &[IpNet], ip: IpAddr) -> bool {
    let canonical = ip.to_canonical();
    allow
        .iter()
        .any(|net| net.contains(&ip) || net.contains(&canonical))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(blocks: &[&str]) -> Vec<IpNet> {
        blocks.iter().map(|b| b.parse().unwrap()).collect()
    }

    #[test]
    fn purge_allow_rules_accept_addresses_and_cidrs() {
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(is_allowed(&nets(&["127.0.0.1/32"]), local));
        assert!(is_allowed(&nets(&["127.0.0.0/8"]), local));
        assert!(!is_allowed(&nets(&["10.0.0.0/8"]), local));
        assert!(is_allowed(&nets(&["0.0.0.0/0"]), local));
        assert!(is_allowed(
            &nets(&["127.0.0.1/32"]),
            "::ffff:127.0.0.1".parse().unwrap()
        ));
        assert!(is_allowed(&nets(&["::1/128"]), "::1".parse().unwrap()));
        assert!(!is_allowed(&[], local));
    }
}
