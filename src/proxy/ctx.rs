//! The per-request state of the pipeline: owned by `Proxy::handle`, lent to
//! each phase, dropped when the response head is ready. Everything a later
//! phase needs from an earlier one travels here, typed, and nowhere else
//! (not in `http::Extensions`, not in headers to be parsed again).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::request::Parts;
use http::{Method, Request};

use super::RouteEntry;
use super::guard::{BodyFault, BodyGuard};
use crate::cache::CacheOutcome;
use crate::http::error::{Blame, ErrorKind, RequestError};
use crate::plugins::RequestState;

pub struct RequestCtx<'p> {
    /// The TCP peer (what PURGE's allow-list and X-Forwarded-For use).
    pub client: SocketAddr,
    /// The request came over TLS.
    pub tls: bool,
    pub started: Instant,
    pub method: Method,
    /// The request line's parts, kept only when the access log will write it.
    pub log_line: Option<super::access::RequestLine>,
    /// The route that matched, once routing is done.
    pub route: Option<&'p RouteEntry>,
    /// The upstream the route forwards to, for the access log.
    pub upstream: Option<Arc<str>>,
    /// Set when the request has a body: records why it was cut off, if it was.
    pub body_guard: Option<BodyGuard>,
    /// Instances parked by `on-request` plugins and their cache-key parts.
    pub plugins: RequestState,
    /// The request head as the `on-request` plugins left it, for the
    /// `on-response` plugins (only on routes with plugins; only its method
    /// when none of them reads the request).
    pub request_head: Option<Parts>,
    /// What the cache did, on cache-enabled routes.
    pub cache_outcome: Option<CacheOutcome>,
}

impl<'p> RequestCtx<'p> {
    pub fn new<B>(
        client: SocketAddr,
        tls: bool,
        request: &Request<B>,
        access_log: Option<crate::config::AccessLogFormat>,
    ) -> Self {
        Self {
            client,
            tls,
            started: Instant::now(),
            method: request.method().clone(),
            log_line: access_log.map(|format| super::access::RequestLine::of(request, format)),
            route: None,
            upstream: None,
            body_guard: None,
            plugins: RequestState::default(),
            request_head: None,
            cache_outcome: None,
        }
    }

    /// An upstream failure caused by the client's body being cut off is the
    /// client's fault: 413 or 400, not 502 (and the guard knows which).
    pub fn blame_body_faults(&self, error: RequestError) -> RequestError {
        if !matches!(error.blame, Blame::Upstream | Blame::Client) {
            return error;
        }
        match self.body_guard.as_ref().and_then(BodyGuard::fault) {
            Some(BodyFault::TooLarge { limit }) => ErrorKind::BodyTooLarge { limit }.into(),
            Some(BodyFault::Idle { timeout }) => RequestError::bad_request(format!(
                "the client sent no request body data for {} s",
                timeout.as_secs()
            )),
            None => error,
        }
    }
}
