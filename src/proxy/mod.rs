//! Routing, forwarding and header hygiene: the request path from a client's
//! request to the upstream's response.
//!
//! Asks `cache` for cached answers but never decides cacheability itself.

use std::net::SocketAddr;

/// The client's address, put into every request's extensions on accept.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);
