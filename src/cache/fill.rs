//! The fill: one origin fetch for a flight, run in its own task so a
//! leader's disconnect does not stop it. It judges whether the response can
//! be shared and stored, tees the body into the flight and commits the copy
//! to the store on a clean end. Its result reaches the leader and the
//! waiters through the flight's head, and nowhere else.
//!
//! Policy when every client has gone: a storable response is read to the end
//! (bounded by an idle timeout) so the next client gets a hit; anything that
//! is not being stored is abandoned at once.
//!
//! Every wait is bounded: the whole fill by `cache.fill_timeout`, each
//! frame of the body by `cache.fill_idle_timeout`, the bytes kept for the
//! store by `cache.fill_memory` (past it the response streams uncached), and
//! a reader of an unstored response that falls a window behind the others
//! is cut off rather than holding them all back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;

use super::flight::{Flight, Head, SoloResponse};
use super::freshness;
use super::origin::{Origin, OriginError, OriginErrorKind};
use super::policy::{self, NotStorable, Timing};
use super::store::{Entry, Meta};
use super::tier::{Lookup, TierFill};
use super::{Cache, key, update_gauges};
use crate::http::body::{self, Body};
use crate::http::cache_control::{RequestDirectives, ResponseDirectives};
use crate::http::error::ErrorKind;

/// A response that is not being stored runs at most this far ahead of its
/// slowest reader.
pub const STREAM_WINDOW: usize = 1024 * 1024;

/// How long a reader that holds the window may go without reading while
/// other readers of the same response read, before it is cut off. Long
/// enough for a reader that is merely slower (a busy client, a congested
/// link) to take its next chunk; short enough that one client that stopped
/// reading holds the others up for no more than this.
pub const STALL_GRACE: Duration = Duration::from_secs(1);

/// One fill's state: the flight it feeds, the key it stores under, and what
/// its storability and stale windows are judged on.
pub struct Fill {
    pub cache: Arc<Cache>,
    pub flight: Arc<Flight>,
    pub key: String,
    /// Whether the flight is in the cache's map (joinable by other requests).
    pub registered: bool,
    /// The leading request's headers: storability and Vary are judged on them.
    pub request_headers: HeaderMap,
    pub request_directives: RequestDirectives,
    /// The stored response being revalidated, if any.
    pub stale: Option<Arc<Entry>>,
    pub route_stale_while_revalidate: Option<Duration>,
    pub route_stale_if_error: Option<Duration>,
    /// When the whole fill must be done (`cache.fill_timeout` from its start).
    pub deadline: tokio::time::Instant,
    /// Longest the upstream body may send nothing (`cache.fill_idle_timeout`).
    pub idle_timeout: Duration,
    /// Bytes taken from the cache's fill memory budget, given back on drop.
    pub reserved: AtomicU64,
    /// The second tier, when this fill may use it.
    pub tier: Option<TierFill>,
}

/// The error for a fill (or a wait for one) past `cache.fill_timeout`.
pub fn timed_out(limit: Duration) -> OriginError {
    OriginError {
        kind: OriginErrorKind::TimedOut,
        error: ErrorKind::OriginTimeout {
            timeout_ms: u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
        }
        .into(),
    }
}

impl Drop for Fill {
    /// Whatever ends the fill (even a panic), the key becomes free again.
    fn drop(&mut self) {
        self.cache
            .release_fill_bytes(self.reserved.load(Ordering::Relaxed));
        self.unregister();
        // Normally a no-op; after a panic it releases waiters instead of
        // leaving them on a head that never comes.
        self.flight.abandon();
    }
}

/// Where a shared body stands while it streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Teeing {
    /// Every chunk is kept for the store.
    Storing,
    /// Too large (or unstorable after all): streamed to readers only.
    Streaming,
    /// The whole body is in the store already (its declared length arrived).
    Committed,
}

enum Step {
    Data(Bytes),
    Skip,
    End,
    Failed(String),
    Abandoned,
}

/// Runs the fetch (`refetch`, without validators, follows a 304 that names
/// another representation) and hands its result to the flight.
pub async fn run(
    mut fill: Fill,
    fetch: Request<Body>,
    refetch: Option<Request<Body>>,
    origin: Arc<dyn Origin>,
) {
    // The second tier first: a usable record answers as the origin would.
    if let Lookup::Hit(response) = fill.look_up_tier().await {
        let now = fill.cache.clock.now();
        return fill.stream(response, now, now).await;
    }
    // One instance of the namespace revalidates; the others take its result.
    if let Some(response) = fill.revalidated_elsewhere().await {
        let now = fill.cache.clock.now();
        return fill.stream(response, now, now).await;
    }
    let (response, request_time, response_time) = match fill.fetch_timed(&*origin, fetch).await {
        Ok(fetched) => fetched,
        Err(error) => return fill.fail(error),
    };
    let Some(stale) = fill.stale.clone() else {
        return fill.stream(response, request_time, response_time).await;
    };
    if response.status() == StatusCode::NOT_MODIFIED {
        if policy::validators_match(&stale.meta.headers, response.headers()) {
            return fill.refresh(&stale, response, request_time, response_time);
        }
        // RFC 9111 section 4.3.4: a 304 naming another representation
        // updates nothing; ask again for the full response.
        tracing::debug!(key = %fill.key, "304 validators do not match the stored response; fetching in full");
        let Some(refetch) = refetch else {
            return fill.solo(response);
        };
        return match fill.fetch_timed(&*origin, refetch).await {
            Ok((response, request_time, response_time)) => {
                fill.stream(response, request_time, response_time).await
            }
            Err(error) => fill.fail(error),
        };
    }
    if freshness::is_error_status(response.status()) {
        // The leader decides between this error and stale-if-error.
        return fill.solo(response);
    }
    fill.stream(response, request_time, response_time).await;
}

impl Fill {
    /// The response and the times the request left and its head arrived.
    async fn fetch_timed(
        &self,
        origin: &dyn Origin,
        request: Request<Body>,
    ) -> Result<(Response<Body>, SystemTime, SystemTime), OriginError> {
        let request_time = self.cache.clock.now();
        let response = tokio::time::timeout_at(self.deadline, origin.fetch(request))
            .await
            .map_err(|_| timed_out(self.cache.head_wait()))??;
        Ok((response, request_time, self.cache.clock.now()))
    }

    fn unregister(&self) {
        if !self.registered {
            return;
        }
        let mut flights = self.cache.flights();
        if flights
            .get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
        {
            flights.remove(&self.key);
        }
    }

    /// The upstream failed without a response: every reader gets a copy.
    fn fail(&self, error: OriginError) {
        tracing::debug!(key = %self.key, error = %error.error, "cache fill failed");
        self.unregister();
        self.flight.set_head(Head::Failed(error));
    }

    /// Hands the response to the leader alone; waiters fetch on their own.
    fn solo(&self, response: Response<Body>) {
        self.unregister();
        self.flight
            .set_head(Head::Solo(SoloResponse::new(response)));
    }

    fn check(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        directives: &ResponseDirectives,
        sets_cookie: bool,
    ) -> Result<(), NotStorable> {
        policy::check_storable(
            &Method::GET,
            &self.request_headers,
            &self.request_directives,
            status,
            headers,
            directives,
            sets_cookie,
        )
    }

    pub(super) fn meta(&self, status: StatusCode, headers: HeaderMap, timing: Timing) -> Meta {
        let directives = self.response_directives(&headers);
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
        let directives = self.response_directives(headers);
        if directives.withheld.is_empty() && !headers.contains_key(header::SET_COOKIE) {
            return None;
        }
        let full = headers.clone();
        policy::withhold(headers, &directives).then(|| Arc::new(full))
    }

    /// The response's directives for this cache: from the first targeted
    /// field configured (RFC 9213), else from Cache-Control.
    fn response_directives(&self, headers: &HeaderMap) -> ResponseDirectives {
        let settings = self.cache.settings.load();
        ResponseDirectives::parse_targeted(headers, &settings.targeted_fields)
    }

    fn tags(&self, headers: &HeaderMap) -> Vec<String> {
        let settings = self.cache.settings.load();
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
        let store = self.cache.store.load();
        let retain = freshness::retention(&meta, self.cache.clock.now());
        let entry = Arc::new(Entry { meta, body });
        store.put(&self.key, Arc::clone(&entry), retain);
        // Checked after the put: a purge that doomed this flight either runs
        // its removal after the put, or is seen here.
        if self.flight.is_doomed() {
            tracing::debug!(key = %self.key, "a purge ran during the fill; response not kept");
            store.remove_entry(&self.key, &entry);
            return;
        }
        self.write_behind(&entry.meta, &entry.body);
        self.cache.stats.stored();
        update_gauges(&store);
    }

    fn forget_stale(&self) {
        if let Some(stale) = &self.stale {
            self.cache.store.load().remove_entry(&self.key, stale);
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
    ) {
        let (head, _) = response.into_parts();
        let mut merged = policy::merge_not_modified(&stale.meta.headers, &head.headers);
        if !head.headers.contains_key(header::DATE) {
            merged.insert(header::DATE, policy::date_value(response_time));
        }
        let sets_cookie = policy::sets_shared_cookie(&merged, &self.response_directives(&merged));
        let leader_headers = self.withhold(&mut merged);
        let timing = Timing::new(request_time, response_time, &head.headers);
        let meta = Arc::new(self.meta(stale.meta.status, merged, timing));
        if let Err(reason) = self.check(meta.status, &meta.headers, &meta.directives, sets_cookie) {
            tracing::debug!(key = %self.key, reason = reason.as_str(), "revalidated response no longer storable");
            self.forget_stale();
            let mut response = Response::new(body::full(stale.body.clone()));
            *response.status_mut() = meta.status;
            *response.headers_mut() = match leader_headers {
                Some(full) => Arc::unwrap_or_clone(full),
                None => meta.headers.clone(),
            };
            return self.solo(response);
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
            tier_hit: false,
        });
    }

    /// A full response: shared and teed into the store when storable,
    /// otherwise handed to the leader alone.
    async fn stream(
        &self,
        response: Response<Body>,
        request_time: SystemTime,
        response_time: SystemTime,
    ) {
        let (head, mut body) = response.into_parts();
        let declared_length = crate::http::content_length(&head.headers);
        let Some((meta, teeing)) = self.admit(&head, declared_length, request_time, response_time)
        else {
            return self.solo(Response::from_parts(head, body));
        };
        let Some(teeing) = self.pump(&mut body, &meta, teeing, declared_length).await else {
            return;
        };
        self.finish(meta, teeing, declared_length);
    }

    /// Judges a response head: `None` when it may not be shared (the leader
    /// gets it alone); otherwise the head is published to the flight's
    /// readers, storing unless the declared length is over the limit.
    fn admit(
        &self,
        head: &http::response::Parts,
        declared_length: Option<u64>,
        request_time: SystemTime,
        response_time: SystemTime,
    ) -> Option<(Arc<Meta>, Teeing)> {
        let timing = Timing::new(request_time, response_time, &head.headers);
        let mut stored_headers = policy::storable_headers(&head.headers);
        if !stored_headers.contains_key(header::DATE) {
            stored_headers.insert(header::DATE, policy::date_value(response_time));
        }
        let sets_cookie =
            policy::sets_shared_cookie(&stored_headers, &self.response_directives(&stored_headers));
        let leader_headers = self.withhold(&mut stored_headers);
        let meta = Arc::new(self.meta(head.status, stored_headers, timing));
        // Judged without the withheld fields: `private="set-cookie"` lets the
        // rest of the response be shared.
        let verdict = self.check(head.status, &meta.headers, &meta.directives, sets_cookie);
        if let Err(reason) = verdict {
            tracing::debug!(key = %self.key, reason = reason.as_str(), "response not stored");
            self.forget_stale();
            return None;
        }
        // Too big to keep, but still shareable: the readers already attached
        // stream it together; later requests start their own fetch.
        let max_object = self.cache.settings.load().max_object_size;
        let teeing = if declared_length.is_none_or(|length| length <= max_object) {
            Teeing::Storing
        } else {
            tracing::debug!(key = %self.key, max_object, "response over max_object_size; streaming it uncached");
            self.forget_stale();
            self.stop_storing();
            Teeing::Streaming
        };
        self.flight.set_head(Head::Shared {
            meta: Arc::clone(&meta),
            stored: teeing == Teeing::Storing,
            upstream_status: head.status,
            leader_headers,
            tier_hit: self.tier.as_ref().is_some_and(|tier| tier.hit),
        });
        Some((meta, teeing))
    }

    /// The frame loop: each chunk to the flight, kept while storing, the
    /// entry committed as soon as its declared length is complete. `None`
    /// when the body failed or every reader of an unstored response left.
    async fn pump(
        &self,
        body: &mut Body,
        meta: &Arc<Meta>,
        mut teeing: Teeing,
        declared_length: Option<u64>,
    ) -> Option<Teeing> {
        let max_object = self.cache.settings.load().max_object_size;
        let mut total: u64 = 0;
        loop {
            match self.next_frame(body, teeing != Teeing::Streaming).await {
                Step::Data(chunk) => {
                    total += chunk.len() as u64;
                    if teeing == Teeing::Storing && total > max_object {
                        teeing = Teeing::Streaming;
                        self.stop_storing();
                        tracing::debug!(key = %self.key, max_object, "response outgrew max_object_size; streaming it uncached");
                    }
                    if teeing == Teeing::Storing && !self.reserve(chunk.len() as u64) {
                        teeing = Teeing::Streaming;
                        self.stop_storing();
                        tracing::warn!(key = %self.key, "cache.fill_memory is spent by fills in progress; streaming this response uncached");
                    }
                    if teeing == Teeing::Storing && declared_length == Some(total) {
                        // The last byte of a known length: stored before any
                        // reader sees it, so a client holding the whole body
                        // finds the entry on its next request.
                        self.commit(Arc::clone(meta), self.flight.collected_with(&chunk));
                        self.unregister();
                        teeing = Teeing::Committed;
                    }
                    self.flight.push(chunk);
                    if teeing == Teeing::Streaming && !self.pace().await {
                        self.flight.finish(false);
                        return None;
                    }
                }
                Step::Skip => {}
                Step::End => return Some(teeing),
                Step::Failed(reason) => {
                    tracing::warn!(key = %self.key, reason, "upstream body failed; nothing stored");
                    self.unregister();
                    self.flight.finish(false);
                    return None;
                }
                Step::Abandoned => {
                    tracing::debug!(key = %self.key, "every reader left an unstored response; fill abandoned");
                    self.unregister();
                    self.flight.finish(false);
                    return None;
                }
            }
        }
    }

    /// The body ended cleanly: store it if it is whole, release the readers.
    fn finish(&self, meta: Arc<Meta>, teeing: Teeing, declared_length: Option<u64>) {
        if teeing == Teeing::Storing {
            let body = self.flight.collected_with(&[]);
            if declared_length.is_none_or(|length| length == body.len() as u64) {
                self.commit(meta, body);
            }
        }
        self.unregister();
        self.flight.finish(true);
    }

    /// No longer storing: the key is free for new fills and the replay copy goes.
    fn stop_storing(&self) {
        self.unregister();
        self.flight.stop_keeping();
    }

    /// Counts `bytes` kept for the store against `cache.fill_memory`.
    fn reserve(&self, bytes: u64) -> bool {
        let reserved = self.cache.reserve_fill_bytes(bytes);
        if reserved {
            self.reserved.fetch_add(bytes, Ordering::Relaxed);
        }
        reserved
    }

    /// The next frame: within the idle timeout, and while storing within
    /// the fill's deadline; while not storing, only as long as a reader is
    /// left.
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
        let idle_until = tokio::time::Instant::now() + self.idle_timeout;
        if storing {
            let until = idle_until.min(self.deadline);
            return tokio::time::timeout_at(until, frame)
                .await
                .unwrap_or_else(|_| {
                    Step::Failed(if until == self.deadline {
                        "the fill took longer than cache.fill_timeout".to_string()
                    } else {
                        "the upstream body stalled (cache.fill_idle_timeout)".to_string()
                    })
                });
        }
        tokio::select! {
            step = frame => step,
            () = self.all_readers_gone() => Step::Abandoned,
            () = tokio::time::sleep_until(idle_until) => {
                Step::Failed("the upstream body stalled (cache.fill_idle_timeout)".to_string())
            }
        }
    }

    async fn all_readers_gone(&self) {
        while self.flight.reader_count() > 0 {
            self.flight.readers_changed().await;
        }
    }

    /// Backpressure for an unstored response: waits until the slowest reader
    /// is within the window. A reader that holds the window and has read
    /// nothing for [`STALL_GRACE`] while others read is cut off (its client
    /// sees the response abort) instead of holding them back; a reader that
    /// keeps reading is waited for, however slow. When no reader reads for
    /// the idle timeout, all are cut off. False when every reader has gone.
    async fn pace(&self) -> bool {
        let grace = STALL_GRACE.min(self.idle_timeout);
        let mut progress_at = tokio::time::Instant::now();
        loop {
            if self.flight.reader_count() == 0 {
                return false;
            }
            if self.flight.unread_bytes() <= STREAM_WINDOW {
                return true;
            }
            let now = tokio::time::Instant::now();
            let stalled_since = now.checked_sub(grace).unwrap_or(now);
            let detached = self.flight.detach_stalled(STREAM_WINDOW, stalled_since);
            if detached > 0 {
                tracing::debug!(key = %self.key, detached, "readers stopped reading a shared response; cut off");
                continue;
            }
            if now >= progress_at + self.idle_timeout {
                tracing::debug!(key = %self.key, "no reader of a shared response read for cache.fill_idle_timeout; cut off");
                self.flight.detach_all();
                continue;
            }
            let until = (now + grace).min(progress_at + self.idle_timeout);
            if tokio::time::timeout_at(until, self.flight.readers_changed())
                .await
                .is_ok()
            {
                progress_at = tokio::time::Instant::now();
            }
        }
    }
}
