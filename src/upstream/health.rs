//! Active health checks: each server of an upstream probed with a GET of
//! the configured path every interval, off the request path; a server that
//! fails `unhealthy_threshold` probes in a row gets no traffic until it
//! passes `healthy_threshold` in a row.
//!
//! Owns: the probe loop, the consecutive-result counts, the health flag and
//! its gauge (`larder_upstream_healthy{upstream,server}`). Must not pick
//! servers: `UpstreamClient::pick` reads the flag (and fails open when every
//! server is unhealthy).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::header::{self, HeaderValue};
use http::{Request, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

use super::{h2, pool};
use crate::config::HealthCheck;
use crate::http::body;

/// A server's health as the checks last judged it (healthy at start, so a
/// new upstream takes traffic at once, as Envoy's does without a first
/// check).
#[derive(Debug)]
pub struct Health {
    healthy: AtomicBool,
}

impl Health {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            healthy: AtomicBool::new(true),
        })
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

/// One server as the checker sees it.
pub struct Probed {
    pub authority: http::uri::Authority,
    pub base: Uri,
    pub health: Arc<Health>,
}

/// What a probe result does to a server's counts: the new state when it
/// crosses a threshold. Pure, so the rule is testable without a network.
fn judge(
    check: &HealthCheck,
    healthy: bool,
    streak: &mut (bool, u32),
    passed: bool,
) -> Option<bool> {
    if streak.0 == passed {
        streak.1 = streak.1.saturating_add(1);
    } else {
        *streak = (passed, 1);
    }
    match (healthy, passed) {
        (true, false) if streak.1 >= check.unhealthy_threshold => Some(false),
        (false, true) if streak.1 >= check.healthy_threshold => Some(true),
        _ => None,
    }
}

/// Probes `servers` every `check.interval` until the task is aborted (its
/// upstream client was dropped on a reload or at shutdown).
pub async fn run(
    upstream: Arc<str>,
    check: HealthCheck,
    host: Option<HeaderValue>,
    connector: HttpsConnector<HttpConnector>,
    http2: bool,
    servers: Vec<Probed>,
) {
    let mut streaks = vec![(true, 0u32); servers.len()];
    for server in &servers {
        gauge(&upstream, server).set(1.0);
    }
    let mut ticks = tokio::time::interval(check.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let probes = servers
            .iter()
            .map(|server| probe(&check, host.as_ref(), &connector, http2, server));
        let results = futures_util::future::join_all(probes).await;
        for ((server, streak), result) in servers.iter().zip(&mut streaks).zip(results) {
            let healthy = server.health.is_healthy();
            let passed = result.is_ok();
            let Some(now_healthy) = judge(&check, healthy, streak, passed) else {
                continue;
            };
            server.health.healthy.store(now_healthy, Ordering::Relaxed);
            gauge(&upstream, server).set(if now_healthy { 1.0 } else { 0.0 });
            match result {
                Ok(()) => {
                    tracing::info!(upstream = %upstream, server = %server.authority, passes = streak.1, "server passed its health checks; back in rotation");
                }
                Err(why) => {
                    tracing::warn!(upstream = %upstream, server = %server.authority, failures = streak.1, %why, "server failed its health checks; no traffic until it passes");
                }
            }
        }
    }
}

fn gauge(upstream: &Arc<str>, server: &Probed) -> metrics::Gauge {
    metrics::gauge!(
        "larder_upstream_healthy",
        "upstream" => upstream.clone(),
        "server" => server.authority.to_string()
    )
}

/// One probe: a GET of the path on a new connection, within the timeout,
/// answered with an expected status. For an HTTP/2 upstream too the probe
/// opens a connection of its own: it tells whether the server can be
/// reached now, which the shared connection (open for a while, or closed
/// and not yet replaced) does not.
async fn probe(
    check: &HealthCheck,
    host: Option<&HeaderValue>,
    connector: &HttpsConnector<HttpConnector>,
    http2: bool,
    server: &Probed,
) -> Result<(), String> {
    let host = match host {
        Some(host) => host.clone(),
        None => HeaderValue::from_str(server.authority.as_str()).map_err(|e| e.to_string())?,
    };
    let request = if http2 {
        // `:authority` carries the host (RFC 9113 section 8.3.1).
        let authority = http::uri::Authority::try_from(host.as_bytes())
            .unwrap_or_else(|_| server.authority.clone());
        let scheme = server
            .base
            .scheme()
            .cloned()
            .unwrap_or(http::uri::Scheme::HTTP);
        let uri = Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query(check.path.clone())
            .build()
            .map_err(|e| e.to_string())?;
        Request::get(uri)
            .version(http::Version::HTTP_2)
            .header(header::USER_AGENT, "larder-health-check")
            .body(body::empty())
    } else {
        Request::get(Uri::from(check.path.clone()))
            .header(header::HOST, host)
            .header(header::USER_AGENT, "larder-health-check")
            .body(body::empty())
    }
    .map_err(|e| e.to_string())?;
    let exchange = async {
        if http2 {
            return h2::send_once(connector, &server.base, request)
                .await
                .map_err(|e| format!("HTTP/2 request: {e}"));
        }
        let conn = pool::connect(connector, &server.base, check.timeout)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let response = pool::send_once(conn, request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        Ok::<_, String>(response)
    };
    let status = tokio::time::timeout(check.timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {:?}", check.timeout))??;
    if check.passes(status) {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(healthy_threshold: u32, unhealthy_threshold: u32) -> HealthCheck {
        HealthCheck {
            path: http::uri::PathAndQuery::from_static("/healthz"),
            interval: std::time::Duration::from_secs(1),
            timeout: std::time::Duration::from_secs(1),
            expected_statuses: Vec::new(),
            healthy_threshold,
            unhealthy_threshold,
        }
    }

    #[test]
    fn a_server_changes_state_only_after_its_threshold_in_a_row() {
        let check = check(2, 3);
        let mut streak = (true, 0);
        let mut healthy = true;
        let mut states = Vec::new();
        for passed in [false, false, true, false, false, false, true, true] {
            if let Some(now) = judge(&check, healthy, &mut streak, passed) {
                healthy = now;
            }
            states.push(healthy);
        }
        assert_eq!(
            states,
            [true, true, true, true, true, false, false, true],
            "three failures in a row to go down, two passes to come back"
        );
    }
}
