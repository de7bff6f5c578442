//! The fill: one upstream fetch for a flight, run in its own task so a
//! leader's disconnect does not stop it. It decides whether the response can
//! be shared, tees the body into the flight and commits the copy on a clean end.
//!
//! Policy when every client has gone: a storable response is read to the end
//! (bounded by an idle timeout) so the next client gets a hit; anything that
//! is not being stored is abandoned at once.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::oneshot;

use super::directives::{RequestDirectives, ResponseDirectives};
use super::flight::{FailedFetch, Flight, Head, clone_error};
use super::policy::{self, NotStorable, Timing};
use super::store::{Entry, Meta};
use super::{Inner, Origin, counters, is_error_status, key, update_gauges};
use crate::body::{self, Body};
use crate::error::ProxyError;

/// A storing fill gives up when the upstream sends nothing for this long.
const FILL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A response that is not being stored runs at most this far ahead of its
/// slowest reader.
const STREAM_WINDOW: usize = 1024 * 1024;
/// Stale entries with a validator are kept this long for revalidation.
const VALIDATOR_RETENTION: Duration = Duration::from_secs(60 * 60);
/// No entry is kept longer than this, whatever its freshness (an Expires in
/// the year 9999 must not become an overflowing timer).
const MAX_RETENTION: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Every entry outlives its freshness by at least this (for max-stale).
const MIN_STALE_RETENTION: Duration = Duration::from_secs(60);

pub struct FillJob {
    pub inner: Arc<Inner>,
    pub flight: Arc<Flight>,
    pub key: String,
    pub registered: bool,
    /// The leading request's headers: storability and Vary are judged on them.
    pub request_headers: HeaderMap,
    pub request_directives: RequestDirectives,
    pub fetch: Request<Body>,
    /// The same request without validators, for a 304 that matches nothing.
    pub refetch: Option<Request<Body>>,
    pub origin: Arc<dyn Origin>,
    /// The stored response being revalidated, if any.
    pub stale: Option<Arc<Entry>>,
    pub route_stale_while_revalidate: Option<Duration>,
    pub route_stale_if_error: Option<Duration>,
    /// Gets the response when it is not shared through the flight.
    pub leader: oneshot::Sender<Result<Response<Body>, ProxyError>>,
}

struct Fill {
    inner: Arc<Inner>,
    flight: Arc<Flight>,
    key: String,
    registered: bool,
    request_headers: HeaderMap,
    request_directives: RequestDirectives,
    stale: Option<Arc<Entry>>,
    route_stale_while_revalidate: Option<Duration>,
    route_stale_if_error: Option<Duration>,
}

impl Drop for Fill {
    /// Whatever ends the fill (even a panic), the key becomes free again.
    fn drop(&mut self) {
        self.unregister();
        // Normally a no-op; after a panic it releases waiters instead of
        // leaving them on a head that never comes.
        self.flight.abandon();
    }
}

type Leader = oneshot::Sender<Result<Response<Body>, ProxyError>>;

enum Step {
    Data(Bytes),
    Skip,
    End,
    Failed(String),
    Abandoned,
}

pub async fn run(job: FillJob) {
    let FillJob {
        inner,
        flight,
        key,
        registered,
        request_headers,
        request_directives,
        fetch,
        refetch,
        origin,
        stale,
        route_stale_while_revalidate,
        route_stale_if_error,
        leader,
    } = job;
    let fill = Fill {
        inner,
        flight,
        key,
        registered,
        request_headers,
        request_directives,
        stale,
        route_stale_while_revalidate,
        route_stale_if_error,
    };
    let (response, request_time, response_time) = match fetch_timed(&*origin, fetch).await {
        Ok(fetched) => fetched,
        Err(error) => return fill.fail(error, leader),
    };
    if let Some(stale) = fill.stale.clone() {
        if response.status() == StatusCode::NOT_MODIFIED {
            if policy::validators_match(&stale.meta.headers, response.headers()) {
                fill.refresh(&stale, response, request_time, response_time, leader);
                return;
            }
            // RFC 9111 section 4.3.4: a 304 naming another representation
            // updates nothing; ask again for the full response.
            tracing::debug!(key = %fill.key, "304 validators do not match the stored response; fetching in full");
            let Some(refetch) = refetch else {
                return fill.solo(response, leader);
            };
            let (response, request_time, response_time) = match fetch_timed(&*origin, refetch).await
            {
                Ok(fetched) => fetched,
                Err(error) => return fill.fail(error, leader),
            };
            fill.stream(response, request_time, response_time, leader)
                .await;
            return;
        }
        if is_error_status(response.status()) {
            // The leader decides between this error and stale-if-error.
            fill.solo(response, leader);
            return;
        }
    }
    fill.stream(response, request_time, response_time, leader)
        .await;
}

/// The response and the times the request left and its head arrived.
async fn fetch_timed(
    origin: &dyn Origin,
    request: Request<Body>,
) -> Result<(Response<Body>, SystemTime, SystemTime), ProxyError> {
    let request_time = SystemTime::now();
    let response = origin.fetch(request).await?;
    Ok((response, request_time, SystemTime::now()))
}

impl Fill {
    fn unregister(&self) {
        if !self.registered {
            return;
        }
        let mut flights = self.inner.flights.lock().unwrap_or_else(|p| p.into_inner());
        if flights
            .get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
        {
            flights.remove(&self.key);
        }
    }

    /// The upstream failed without a response: waiters get a copy of the error.
    fn fail(&self, error: ProxyError, leader: Leader) {
        tracing::debug!(key = %self.key, %error, "cache fill failed");
        let failed = FailedFetch {
            error: clone_error(&error),
        };
        self.unregister();
        self.flight.set_head(Head::Failed(Arc::new(failed)));
        let _ = leader.send(Err(error));
    }

    /// Hands the response to the leader alone; waiters fetch on their own.
    fn solo(&self, response: Response<Body>, leader: Leader) {
        self.unregister();
        self.flight.set_head(Head::Solo);
        let _ = leader.send(Ok(response));
    }

    fn check(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        directives: &ResponseDirectives,
    ) -> Result<(), NotStorable> {
        policy::check_storable(
            &Method::GET,
            &self.request_headers,
            &self.request_directives,
            status,
            headers,
            directives,
        )
    }

    fn meta(&self, status: StatusCode, headers: HeaderMap, timing: Timing) -> Meta {
        let directives = ResponseDirectives::parse(&headers);
        let lifetime = policy::freshness_lifetime(status, &headers, &directives, timing.date);
        let vary_names = key::vary_names(&headers);
        let vary_values = key::vary_values(&vary_names, &self.request_headers);
        // Route defaults grant stale serving only where the origin did not
        // forbid it: s-maxage implies proxy-revalidate for a shared cache.
        let route_may_extend = directives.s_maxage.is_none();
        let stale_while_revalidate = directives
            .stale_while_revalidate
            .map(Duration::from_secs)
            .or(self
                .route_stale_while_revalidate
                .filter(|_| route_may_extend))
            .unwrap_or(Duration::ZERO);
        let stale_if_error = directives
            .stale_if_error
            .map(Duration::from_secs)
            .or(self.route_stale_if_error.filter(|_| route_may_extend))
            .unwrap_or(Duration::ZERO);
        let tags = self.tags(&headers);
        Meta {
            status,
            headers,
            directives,
            timing,
            lifetime,
            vary_names,
            vary_values,
            stale_while_revalidate,
            stale_if_error,
            tags,
        }
    }

    /// Removes the fields a qualified `no-cache` / `private` keeps from other
    /// clients; returns the complete set for the request that brought them,
    /// when anything was removed (no copy otherwise).
    fn withhold(&self, headers: &mut HeaderMap) -> Option<Arc<HeaderMap>> {
        let directives = ResponseDirectives::parse(headers);
        if directives.withheld.is_empty() {
            return None;
        }
        let full = headers.clone();
        policy::withhold(headers, &directives).then(|| Arc::new(full))
    }

    fn tags(&self, headers: &HeaderMap) -> Vec<String> {
        let settings = self.inner.settings.load();
        let mut tags: Vec<String> = settings
            .tag_headers
            .iter()
            .flat_map(|name| headers.get_all(name).iter())
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split([' ', ',']))
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect();
        tags.sort_unstable();
        tags.dedup();
        tags
    }

    fn commit(&self, meta: Arc<Meta>, body: Bytes) {
        let store = self.inner.store.load();
        let retain = retention(&meta, SystemTime::now());
        let entry = Arc::new(Entry { meta, body });
        store.put(&self.key, Arc::clone(&entry), retain);
        // Checked after the put: a purge that doomed this flight either runs
        // its removal after the put, or is seen here.
        if self.flight.is_doomed() {
            tracing::debug!(key = %self.key, "a purge ran during the fill; response not kept");
            store.remove_entry(&self.key, &entry);
            return;
        }
        counters::stored();
        update_gauges(&store);
    }

    fn forget_stale(&self) {
        if let Some(stale) = &self.stale {
            self.inner.store.load().remove_entry(&self.key, stale);
        }
    }

    /// A 304 to a revalidation: the stored response gets the new header
    /// fields and timing (RFC 9111 section 4.3.4) and is served as a 200.
    fn refresh(
        &self,
        stale: &Arc<Entry>,
        response: Response<Body>,
        request_time: SystemTime,
        response_time: SystemTime,
        leader: Leader,
    ) {
        let (head, _) = response.into_parts();
        let mut merged = policy::merge_not_modified(&stale.meta.headers, &head.headers);
        if !head.headers.contains_key(header::DATE) {
            merged.insert(header::DATE, policy::date_value(response_time));
        }
        let leader_headers = self.withhold(&mut merged);
        let timing = Timing::new(request_time, response_time, &head.headers);
        let meta = Arc::new(self.meta(stale.meta.status, merged, timing));
        if let Err(reason) = self.check(meta.status, &meta.headers, &meta.directives) {
            tracing::debug!(key = %self.key, reason = reason.as_str(), "revalidated response no longer storable");
            self.forget_stale();
            let mut response = Response::new(body::full(stale.body.clone()));
            *response.status_mut() = meta.status;
            *response.headers_mut() = match leader_headers {
                Some(full) => Arc::unwrap_or_clone(full),
                None => meta.headers.clone(),
            };
            self.solo(response, leader);
            return;
        }
        self.commit(Arc::clone(&meta), stale.body.clone());
        if !stale.body.is_empty() {
            self.flight.push(stale.body.clone());
        }
        self.flight.finish(true);
        self.unregister();
        self.flight.set_head(Head::Shared {
            meta,
            stored: true,
            upstream_status: StatusCode::NOT_MODIFIED,
            leader_headers,
        });
    }

    /// A full response: shared and teed into the store when storable,
    /// otherwise handed to the leader alone.
    async fn stream(
        &self,
        response: Response<Body>,
        request_time: SystemTime,
        response_time: SystemTime,
        leader: Leader,
    ) {
        let (head, mut body) = response.into_parts();
        let timing = Timing::new(request_time, response_time, &head.headers);
        let mut stored_headers = policy::storable_headers(&head.headers);
        if !stored_headers.contains_key(header::DATE) {
            stored_headers.insert(header::DATE, policy::date_value(response_time));
        }
        let leader_headers = self.withhold(&mut stored_headers);
        let meta = Arc::new(self.meta(head.status, stored_headers, timing));
        let max_object = self.inner.settings.load().max_object_size;
        let declared_length = content_length(&head.headers);
        // Judged without the withheld fields: `private="set-cookie"` lets the
        // rest of the response be shared.
        let verdict = self.check(head.status, &meta.headers, &meta.directives);
        if let Err(reason) = verdict {
            tracing::debug!(key = %self.key, reason = reason.as_str(), "response not stored");
            self.forget_stale();
            self.solo(Response::from_parts(head, body), leader);
            return;
        }
        // Too big to keep, but still shareable: the readers already attached
        // stream it together; later requests start their own fetch.
        let mut storing = declared_length.is_none_or(|length| length <= max_object);
        if !storing {
            tracing::debug!(key = %self.key, max_object, "response over max_object_size; streaming it uncached");
            self.forget_stale();
            self.unregister();
            self.flight.stop_keeping();
        }
        drop(leader);
        self.flight.set_head(Head::Shared {
            meta: Arc::clone(&meta),
            stored: storing,
            upstream_status: head.status,
            leader_headers,
        });

        let mut total: u64 = 0;
        let mut committed = false;
        loop {
            match self.next_frame(&mut body, storing).await {
                Step::Data(chunk) => {
                    total += chunk.len() as u64;
                    if storing && total > max_object {
                        storing = false;
                        self.unregister();
                        self.flight.stop_keeping();
                        tracing::debug!(key = %self.key, max_object, "response outgrew max_object_size; streaming it uncached");
                    }
                    if storing && declared_length == Some(total) {
                        // The last byte of a known length: stored before any
                        // reader sees it, so a client holding the whole body
                        // finds the entry on its next request.
                        self.commit(Arc::clone(&meta), self.flight.collected_with(&chunk));
                        self.unregister();
                        committed = true;
                    }
                    self.flight.push(chunk);
                    if !storing && !self.pace().await {
                        self.flight.finish(false);
                        return;
                    }
                }
                Step::Skip => {}
                Step::End => break,
                Step::Failed(reason) => {
                    tracing::warn!(key = %self.key, reason, "upstream body failed; nothing stored");
                    self.unregister();
                    self.flight.finish(false);
                    return;
                }
                Step::Abandoned => {
                    tracing::debug!(key = %self.key, "every reader left an unstored response; fill abandoned");
                    self.unregister();
                    self.flight.finish(false);
                    return;
                }
            }
        }
        if storing && !committed {
            let body = self.flight.collected_with(&[]);
            if declared_length.is_none_or(|length| length == body.len() as u64) {
                self.commit(meta, body);
            }
        }
        self.unregister();
        self.flight.finish(true);
    }

    async fn next_frame(&self, body: &mut Body, storing: bool) -> Step {
        let frame = async {
            match body.frame().await {
                None => Step::End,
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => Step::Data(data),
                    _ => Step::Skip,
                },
                Some(Err(error)) => Step::Failed(error.to_string()),
            }
        };
        if storing {
            return tokio::time::timeout(FILL_IDLE_TIMEOUT, frame)
                .await
                .unwrap_or_else(|_| Step::Failed("the upstream body stalled".to_string()));
        }
        tokio::select! {
            step = frame => step,
            () = self.all_readers_gone() => Step::Abandoned,
        }
    }

    async fn all_readers_gone(&self) {
        while self.flight.reader_count() > 0 {
            self.flight.readers_changed().await;
        }
    }

    /// Backpressure for an unstored response: waits until the slowest reader
    /// is within the window. False when every reader has gone.
    async fn pace(&self) -> bool {
        loop {
            if self.flight.reader_count() == 0 {
                return false;
            }
            if self.flight.unread_bytes() <= STREAM_WINDOW {
                return true;
            }
            self.flight.readers_changed().await;
        }
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// How long moka keeps an entry: its remaining freshness plus the time it
/// can still serve stale or be revalidated.
fn retention(meta: &Meta, now: SystemTime) -> Duration {
    let remaining = meta.lifetime.saturating_sub(meta.timing.current_age(now));
    let validation = if policy::has_validator(&meta.headers) {
        VALIDATOR_RETENTION
    } else {
        Duration::ZERO
    };
    let after_stale = meta
        .stale_while_revalidate
        .max(meta.stale_if_error)
        .max(validation)
        .max(MIN_STALE_RETENTION);
    (remaining + after_stale).min(MAX_RETENTION)
}
