//! One origin fetch per key: the first request for a key leads a fill,
//! concurrent ones join its flight and wait for its head, then read the body
//! it streams. A waiter that may not share the leader's response (another
//! Vary variant, Authorization) or finds the replay gone fetches on its own.
//! Also the background revalidation of stale-while-revalidate.
//!
//! Must not talk to the origin itself: `fill` runs the fetch.

use std::sync::Arc;

use http::header::{self, HeaderMap};
use http::request::Parts;
use http::{Method, Request};

use super::fallback;
use super::fill::{self, Fill};
use super::flight::{Flight, Head};
use super::outcome::{CacheOutcome, Fwd};
use super::serve::Forward;
use super::store::{Entry, Meta};
use super::tier::TierFill;
use super::{Cache, Origin, Served, key, policy, respond};
use crate::config::RouteCache;
use crate::http::body::{self, Body};
use crate::http::cache_control::RequestDirectives;
use crate::http::copy_head;
use crate::http::error::RequestError;

impl Cache {
    /// Joins the fill in flight for this key, or leads a new one.
    pub(super) async fn fetch_via_flight(
        self: &Arc<Self>,
        forward: Forward<'_>,
        origin: &Arc<dyn Origin>,
    ) -> Served {
        let joined = {
            let mut flights = self.flights();
            match flights.get(&forward.key) {
                Some(flight) => Ok(Arc::clone(flight)),
                None => {
                    let flight = Flight::new();
                    flights.insert(forward.key.clone(), Arc::clone(&flight));
                    Err(flight)
                }
            }
        };
        match joined {
            Ok(flight) => self.wait_on(flight, forward, origin).await,
            Err(flight) => self.lead(flight, forward, origin, true).await,
        }
    }

    /// Runs a fill for `flight` and answers from it; `registered` says the
    /// flight is in the map (joinable).
    async fn lead(
        self: &Arc<Self>,
        flight: Arc<Flight>,
        forward: Forward<'_>,
        origin: &Arc<dyn Origin>,
        registered: bool,
    ) -> Served {
        // The leader reads from the first chunk, whatever happens to the replay buffer.
        let reader = flight.reader();
        self.start_fill(&flight, &forward, origin, registered, false);
        match self.wait_head(&flight).await {
            Head::Shared {
                meta,
                stored,
                upstream_status,
                leader_headers,
                tier_hit,
            } => {
                let now = self.clock.now();
                let outcome = if tier_hit {
                    CacheOutcome::TierHit {
                        ttl: super::freshness::ttl_seconds(&meta, now),
                        collapsed: false,
                    }
                } else {
                    CacheOutcome::Forwarded {
                        fwd: forward.fwd,
                        upstream_status,
                        stored,
                        collapsed: false,
                    }
                };
                // The request that brought the response gets all of it,
                // including fields kept from other clients.
                let headers = leader_headers.as_deref().unwrap_or(&meta.headers);
                let response = respond::from_flight(reader, &meta, headers, &forward.parts, now);
                Served::ok(response, outcome)
            }
            Head::Solo(solo) => {
                drop(reader);
                let Some(response) = solo.take() else {
                    return Served::err(
                        RequestError::internal("the cache fill stopped without an answer"),
                        CacheOutcome::Failed {
                            fwd: forward.fwd,
                            collapsed: false,
                        },
                    );
                };
                fallback::finish_unshared(&forward, Ok(response), self.clock.now())
            }
            Head::Failed(error) => {
                fallback::finish_unshared(&forward, Err(error), self.clock.now())
            }
            Head::Pending => Served::err(
                RequestError::internal("a flight's head was read before it was set"),
                CacheOutcome::Failed {
                    fwd: forward.fwd,
                    collapsed: false,
                },
            ),
        }
    }

    async fn wait_on(
        self: &Arc<Self>,
        flight: Arc<Flight>,
        forward: Forward<'_>,
        origin: &Arc<dyn Origin>,
    ) -> Served {
        self.stats.coalesced();
        flight.join();
        // Attached before the head arrives, so a response that is streamed
        // without a replay copy still reaches this waiter from its first byte.
        let reader = flight.reader();
        match self.wait_head(&flight).await {
            Head::Shared {
                meta,
                stored,
                upstream_status,
                tier_hit,
                ..
            } if may_share(&meta, &forward.parts.headers) => match reader {
                Some(reader) => {
                    let now = self.clock.now();
                    let outcome = if tier_hit {
                        CacheOutcome::TierHit {
                            ttl: super::freshness::ttl_seconds(&meta, now),
                            collapsed: true,
                        }
                    } else {
                        CacheOutcome::Forwarded {
                            fwd: forward.fwd,
                            upstream_status,
                            stored,
                            collapsed: true,
                        }
                    };
                    let response = respond::from_flight(
                        Some(reader),
                        &meta,
                        &meta.headers,
                        &forward.parts,
                        now,
                    );
                    Served::ok(response, outcome)
                }
                None => self.lead(Flight::new(), forward, origin, false).await,
            },
            Head::Failed(error) => fallback::after_failed_flight(&forward, error, self.clock.now()),
            _ => self.lead(Flight::new(), forward, origin, false).await,
        }
    }

    /// The flight's head, or a timeout (504) once `cache.fill_timeout` has
    /// passed: the fill ends by then too, but a request never waits on
    /// another's fetch longer than that, whatever the fetch is stuck in.
    async fn wait_head(&self, flight: &Flight) -> Head {
        let limit = self.head_wait();
        match tokio::time::timeout(limit, flight.wait_head()).await {
            Ok(head) => head,
            Err(_) => Head::Failed(fill::timed_out(limit)),
        }
    }

    fn start_fill(
        self: &Arc<Self>,
        flight: &Arc<Flight>,
        forward: &Forward<'_>,
        origin: &Arc<dyn Origin>,
        registered: bool,
        background: bool,
    ) {
        let fill = Fill {
            cache: Arc::clone(self),
            flight: Arc::clone(flight),
            key: forward.key.clone(),
            registered,
            request_headers: forward.parts.headers.clone(),
            request_directives: forward.directives.clone(),
            stale: forward.stale.clone(),
            route_stale_while_revalidate: forward.route.stale_while_revalidate.map(|d| d.0),
            route_stale_if_error: forward.route.stale_if_error.map(|d| d.0),
            deadline: tokio::time::Instant::now() + self.head_wait(),
            idle_timeout: self.settings.load().fill_idle_timeout,
            reserved: std::sync::atomic::AtomicU64::new(0),
            tier: self.tier_for(forward, background),
        };
        let fetch = fill_request(&forward.parts, forward.stale.as_deref());
        let refetch = forward
            .stale
            .as_ref()
            .map(|_| fill_request(&forward.parts, None));
        tokio::spawn(fill::run(fill, fetch, refetch, Arc::clone(origin)));
    }

    /// The second tier for a fill, when the route uses it: a request with
    /// `Authorization` is not answered from what other users' requests
    /// left. A `background` revalidation claims the key first, so that one
    /// instance of the namespace revalidates it.
    fn tier_for(&self, forward: &Forward<'_>, background: bool) -> Option<TierFill> {
        if !forward.route.shared || forward.parts.headers.contains_key(header::AUTHORIZATION) {
            return None;
        }
        let handle = self.tier.handle.load_full()?;
        Some(TierFill {
            tier: Arc::clone(&handle.tier),
            max_object_size: handle.max_object_size,
            generation: None,
            hit: false,
            revalidation: background,
        })
    }

    /// Starts one background revalidation for the key unless one is running.
    pub(super) fn refresh_in_background(
        self: &Arc<Self>,
        route: &RouteCache,
        parts: &Parts,
        key: &str,
        entry: &Arc<Entry>,
        origin: &Arc<dyn Origin>,
    ) {
        let flight = {
            let mut flights = self.flights();
            if flights.contains_key(key) {
                return;
            }
            let flight = Flight::new();
            flights.insert(key.to_string(), Arc::clone(&flight));
            flight
        };
        let forward = Forward {
            route,
            parts: copy_head(parts),
            directives: RequestDirectives::default(),
            key: key.to_string(),
            stale: Some(Arc::clone(entry)),
            fwd: Fwd::Stale,
        };
        // Nobody waits for this fill: its head is read by nobody but joiners.
        self.start_fill(&flight, &forward, origin, true, true);
    }
}

/// A waiter may take the leader's response only when it is what the cache
/// would have served it: same Vary selection, Authorization rules met.
fn may_share(meta: &Meta, request: &HeaderMap) -> bool {
    if request.contains_key(header::AUTHORIZATION) && !meta.directives.allows_authorized() {
        return false;
    }
    meta.vary_names.is_empty() || meta.matches(&key::vary_values(&meta.vary_names, request))
}

/// The request the fill sends: always GET, the client's conditionals removed
/// (the cache wants a full response), the stored validators added.
fn fill_request(parts: &Parts, stale: Option<&Entry>) -> Request<Body> {
    let mut head = copy_head(parts);
    head.method = Method::GET;
    for name in policy::CLIENT_CONDITIONALS {
        head.headers.remove(name);
    }
    // The fill sends no body, whatever the client's request framed.
    head.headers.remove(header::CONTENT_LENGTH);
    head.headers.remove(header::TRANSFER_ENCODING);
    if let Some(stale) = stale {
        policy::add_validators(&mut head.headers, &stale.meta.headers);
    }
    Request::from_parts(head, body::empty())
}
