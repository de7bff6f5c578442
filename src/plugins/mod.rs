//! Wasm plugins: one wasmtime engine, components compiled (and cached on
//! disk) at load, sandboxed instances per call, the WIT host imports, and the
//! failure policy (on_error, circuit breaker). The main type is
//! [`PluginHost`]; the proxy calls its transformer hooks with the request's
//! [`RequestState`], the sources call [`PluginHost::fetch`] with a view of
//! the fetcher's own values. Failures come back as [`PluginError`] values;
//! what a client is told is the proxy's business.
//!
//! Must not hand a plugin anything its config did not grant, or import the
//! cache or the proxy.

mod bindings;
mod breaker;
mod call;
mod engine;
mod exchange;
mod fetcher;
mod host_imports;
mod http_client;
mod instances;
mod loader;
mod output;
mod slot;
mod snapshot;
mod store;
mod transformer;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderValue, Response};
use http_body_util::{BodyExt, BodyStream, StreamBody};
use parking_lot::RwLock;

use crate::config::{OnError, PluginConfig, PluginPhase, PluginTotals};
use crate::http::body::{self, Body, BoxError};

use breaker::{Admission, Breaker};
pub use call::FailureKind;
use call::{Failure, Hook, Turn};
use engine::PluginEngine;
use instances::ParkedInstances;
pub use loader::LoadError;
use loader::{Kind, LoadedPlugin};
use slot::PluginSlot;
pub use slot::PluginStats;
use transformer::{RequestEdit, keep_connection_fields};

/// The largest response body handed to a transformer's `on-response`.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// A plugin that could not be loaded (read, compiled, linked, or its `init`).
#[derive(Debug, thiserror::Error)]
#[error("plugin {plugin}: {reason}")]
pub struct PluginLoadError {
    pub plugin: String,
    pub reason: LoadError,
}

/// A plugin call that failed in a way its caller must act on: for a
/// transformer, one whose `on_error` says `closed`; for a fetcher, any.
#[derive(Debug, Clone, thiserror::Error)]
#[error("plugin {plugin} failed ({}): {detail}", .kind.as_str())]
pub struct PluginError {
    pub plugin: Arc<str>,
    pub kind: FailureKind,
    pub on_error: OnError,
    /// What happened, with the guest's stderr; for logs, not for clients.
    pub detail: String,
    /// For a plugin that could not run: when a client may try again.
    pub retry_after: Option<std::time::Duration>,
}

/// What one request's plugins leave for its later phases: instances made
/// in `on-request` and kept for the same request's `on-response` (one
/// instantiation per plugin per request, not two), and extra cache-key
/// parts. Owned by the request; dropping it frees the parked instances.
#[derive(Default)]
pub struct RequestState {
    parked: ParkedInstances,
    /// Parts the transformers' `on-request` asked to add to the cache key.
    pub cache_key_extra: Vec<String>,
    /// The route's chain, resolved by the first hook that ran: the
    /// request's later hooks run the same builds (a reload in between
    /// changes the next request, not this one) and skip the lookups.
    chain: Option<Resolved>,
}

/// A chain's transformers (every phase), in chain order, with the build of
/// each that a request runs.
type Resolved = Vec<(Arc<PluginSlot>, Arc<LoadedPlugin>)>;

/// What a route's downstream-phase plugins will ask of a request, known
/// before any runs: the proxy skips the `on-request` phase when none has
/// the hook, and keeps a copy of the request for `on-response` only when
/// one reads it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChainNeeds {
    pub on_request: bool,
    /// A plugin reads the request in `on-response` (a 0.1.0 plugin always does).
    pub request_in_response: bool,
}

/// A fetcher's read-only view of the values it produced for its sources
/// (the WIT `cache` import). The sources own the values; they lend each
/// run a view limited to the sources that plugin feeds.
pub trait SourceValues: Send + Sync {
    fn get(&self, source: &str) -> Option<SourceValue>;
}

/// What a fetcher plugin's run produced.
#[derive(Debug, Clone)]
pub enum FetchOutcome {
    Updated {
        content_type: Option<String>,
        body: Bytes,
        /// The headers the fetcher returned with the value, as it gave them.
        headers: Vec<(String, Vec<u8>)>,
    },
    NotModified,
}

/// What a fetcher is told about the run it is asked to make.
#[derive(Debug, Clone)]
pub struct FetchContext {
    pub source: String,
    /// Unix seconds of the tick that started this run.
    pub scheduled_at: u64,
    pub previous_etag: Option<String>,
    /// The source's `plugin.config`, merged over the plugin's own config.
    pub config: BTreeMap<String, String>,
}

/// A value a fetcher produced for a source, as its `cache` view shows it.
#[derive(Debug, Clone)]
pub struct SourceValue {
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
    pub produced_at: Instant,
}

/// Every loaded plugin; lives across reloads and swaps plugins in place.
pub struct PluginHost {
    /// Set once the first plugin is configured (at load or a later reload).
    engine: OnceLock<Arc<PluginEngine>>,
    slots: RwLock<BTreeMap<String, Arc<PluginSlot>>>,
}

impl PluginHost {
    /// Compiles every plugin and probes its `init` with its config.
    pub async fn load(
        config: &BTreeMap<String, PluginConfig>,
        totals: &PluginTotals,
    ) -> Result<Arc<Self>, PluginLoadError> {
        if config.is_empty() {
            // No plugins: do not build the engine (or its address space).
            return Ok(Arc::new(Self {
                engine: OnceLock::new(),
                slots: RwLock::default(),
            }));
        }
        let engine = shared_engine(config.keys().next().map_or("", String::as_str))?;
        engine.memory.set_limit(memory_limit(totals));
        let mut slots = BTreeMap::new();
        for (name, plugin_config) in config {
            let plugin = loader::load_plugin(&engine, name, plugin_config)
                .await
                .map_err(|reason| PluginLoadError {
                    plugin: name.clone(),
                    reason,
                })?;
            let slot = PluginSlot::new(plugin);
            slot::watch(engine.clone(), &slot);
            slots.insert(name.clone(), slot);
        }
        Ok(Arc::new(Self {
            engine: OnceLock::from(engine),
            slots: RwLock::new(slots),
        }))
    }

    /// Applies a reloaded `plugins:` map, all or nothing: every changed or
    /// new plugin is built and probed first; if one fails, nothing changes
    /// (every plugin keeps its running build) and the error names it.
    pub async fn apply(
        &self,
        config: &BTreeMap<String, PluginConfig>,
        totals: &PluginTotals,
    ) -> Result<(), PluginLoadError> {
        if config.is_empty() {
            self.replace_slots(BTreeMap::new());
            return Ok(());
        }
        let engine = match self.engine.get() {
            Some(engine) => engine.clone(),
            None => {
                let engine = shared_engine(config.keys().next().map_or("", String::as_str))?;
                self.engine.get_or_init(|| engine).clone()
            }
        };
        engine.memory.set_limit(memory_limit(totals));
        let existing = self.slots.read().clone();
        let mut built = Vec::new();
        for (name, plugin_config) in config {
            if let Some(slot) = existing.get(name)
                && is_unchanged(slot, plugin_config).await
            {
                continue;
            }
            match loader::load_plugin(&engine, name, plugin_config).await {
                Ok(plugin) => built.push((name.clone(), plugin)),
                Err(reason) => {
                    tracing::error!(plugin = %name, %reason, "plugin failed to load; the reload changes no plugin");
                    return Err(PluginLoadError {
                        plugin: name.clone(),
                        reason,
                    });
                }
            }
        }
        let mut next: BTreeMap<String, Arc<PluginSlot>> = existing
            .iter()
            .filter(|(name, _)| config.contains_key(*name))
            .map(|(name, slot)| (name.clone(), slot.clone()))
            .collect();
        for (name, plugin) in built {
            let slot = match existing.get(&name) {
                Some(slot) => {
                    let path_changed = slot.current.load().config.path != plugin.config.path;
                    slot.swap(plugin);
                    if path_changed {
                        slot::watch(engine.clone(), slot);
                    }
                    slot.clone()
                }
                None => {
                    let slot = PluginSlot::new(plugin);
                    slot::watch(engine.clone(), &slot);
                    slot
                }
            };
            tracing::info!(plugin = %name, "plugin loaded from the new configuration");
            next.insert(name, slot);
        }
        self.replace_slots(next);
        Ok(())
    }

    fn replace_slots(&self, next: BTreeMap<String, Arc<PluginSlot>>) {
        *self.slots.write() = next;
    }

    fn slot(&self, name: &str) -> Option<Arc<PluginSlot>> {
        self.slots.read().get(name).cloned()
    }

    /// Counters of one plugin.
    pub fn stats(&self, plugin: &str) -> Option<PluginStats> {
        self.slot(plugin).map(|slot| slot.stats())
    }

    /// Bytes of linear memory all live plugin instances hold.
    pub fn memory_in_use(&self) -> usize {
        self.engine.get().map_or(0, |engine| engine.memory.used())
    }

    /// Every plugin's counters and the memory all instances hold, as the
    /// admin API's `GET /plugins` shows them.
    pub fn status(&self) -> serde_json::Value {
        let plugins: serde_json::Map<String, serde_json::Value> = self
            .slots
            .read()
            .iter()
            .map(|(name, slot)| (name.clone(), slot.stats().to_json()))
            .collect();
        serde_json::json!({
            "memory_in_use": self.memory_in_use(),
            "plugins": plugins,
        })
    }

    /// Resolves `chain` for the request `state` belongs to and says what its
    /// downstream-phase plugins need.
    pub fn prepare(&self, chain: &[String], state: &mut RequestState) -> ChainNeeds {
        if self.engine.get().is_none() {
            return ChainNeeds::default();
        }
        let resolved = state.chain.get_or_insert_with(|| self.resolve(chain));
        let mut needs = ChainNeeds::default();
        for (_, plugin) in resolved.iter() {
            if plugin.config.phase != PluginPhase::Downstream {
                continue;
            }
            needs.on_request |= plugin.hooks.on_request;
            needs.request_in_response |=
                plugin.hooks.on_response && (plugin.is_v1() || plugin.hooks.request_in_response);
        }
        needs
    }

    /// Runs `on-request` of each plugin in `chain`, in order. `Some(response)`
    /// means a plugin answered directly and the request goes no further.
    /// Extra cache-key parts and parked instances land in `state`. A plugin
    /// that cannot run (open circuit, no capacity) refuses the request
    /// unless `skip_unavailable` (the route's `skip_unavailable_plugins`):
    /// it may be the one that guards the route.
    pub async fn on_request(
        &self,
        chain: &[String],
        request: &mut http::request::Parts,
        state: &mut RequestState,
        skip_unavailable: bool,
    ) -> Result<Option<Response<Body>>, PluginError> {
        let Some(engine) = self.engine.get() else {
            return Ok(None);
        };
        let RequestState {
            parked,
            cache_key_extra: key_extra,
            chain: resolved,
        } = state;
        let resolved = resolved.get_or_insert_with(|| self.resolve(chain));
        // A cache-store transformer is paid once per fill: calling its
        // on-request too would cost a fresh instance on every hit.
        let callees = resolved.iter().filter(|(_, plugin)| {
            plugin.config.phase == PluginPhase::Downstream && plugin.hooks.on_request
        });
        for (slot, plugin) in callees {
            let (engine, parked, called, edited): (&PluginEngine, _, _, _) =
                (engine, &mut *parked, plugin, &mut *request);
            // `identity` moves the borrows in: a reborrow could not outlive the closure.
            let call = move |turn| {
                let parked = std::convert::identity(parked);
                let edited = std::convert::identity(edited);
                transformer::on_request(engine, called, edited, parked, turn)
            };
            let skip = Skip {
                failed: plugin.config.on_error == OnError::Open,
                unavailable: skip_unavailable,
            };
            let Some(edit) = guarded(slot, plugin, Hook::OnRequest, skip, call).await? else {
                continue;
            };
            match edit {
                RequestEdit::Respond(response) => return Ok(Some(response)),
                RequestEdit::Continue {
                    method,
                    path_and_query,
                    headers,
                    cache_key_extra,
                } => {
                    if let Some(method) = method {
                        request.method = method;
                    }
                    if let Some(path_and_query) = path_and_query {
                        request.uri =
                            with_path_and_query(&request.uri, path_and_query).map_err(|e| {
                                let why = format!("the path it returned makes no URI: {e}");
                                call_error(plugin, FailureKind::Error, why)
                            })?;
                    }
                    if let Some(mut headers) = headers {
                        // The body and the connection are the client's:
                        // their fields stay as the client sent them.
                        keep_connection_fields(&request.headers, &mut headers);
                        request.headers = headers;
                    }
                    key_extra.extend(cache_key_extra);
                }
            }
        }
        Ok(None)
    }

    /// Runs `on-response` of the plugins in `chain` configured for `phase`
    /// that have the hook, on the instances `state` parked for them if any.
    /// The body is collected only when one of them reads it (every 0.1.0
    /// plugin does; a 0.2.0 plugin only if it declared so), and the request
    /// is copied for 0.2.0 plugins only when one declared it reads it.
    pub async fn on_response(
        &self,
        chain: &[String],
        phase: PluginPhase,
        request: &http::request::Parts,
        response: Response<Body>,
        state: Option<&mut RequestState>,
    ) -> Result<Response<Body>, PluginError> {
        let Some(engine) = self.engine.get() else {
            return Ok(response);
        };
        let resolved_here;
        let (resolved, mut parked) = match state {
            Some(RequestState {
                parked,
                chain: resolved,
                ..
            }) => (
                &*resolved.get_or_insert_with(|| self.resolve(chain)),
                Some(parked),
            ),
            None => {
                resolved_here = self.resolve(chain);
                (&resolved_here, None)
            }
        };
        let selected = || {
            resolved
                .iter()
                .filter(move |(_, plugin)| plugin.config.phase == phase && plugin.hooks.on_response)
        };
        let Some((first, _)) = selected().next() else {
            return Ok(response);
        };
        let (mut parts, body) = response.into_parts();
        let needs_body = selected().any(|(_, plugin)| plugin.hooks.response_body);
        let mut body = if needs_body {
            let collected = Box::pin(collect_capped(body, MAX_BODY_BYTES))
                .await
                .map_err(|error| {
                    // Nothing to continue with: the body is lost, whatever on_error says.
                    PluginError {
                        plugin: first.name.clone(),
                        kind: FailureKind::BodyUnreadable,
                        on_error: OnError::Closed,
                        detail: format!("the response body broke: {error}"),
                        retry_after: None,
                    }
                })?;
            match collected {
                Collected::Whole(bytes) => ResponseBody::Collected(bytes),
                Collected::TooLarge(body) => ResponseBody::Stream(body),
            }
        } else {
            ResponseBody::Stream(body)
        };
        let original_length = parts.headers.get(CONTENT_LENGTH).cloned();
        let request_v1 = selected()
            .any(|(_, plugin)| plugin.is_v1())
            .then(|| transformer::request_head(request));
        let request_v2 = selected()
            .any(|(_, plugin)| !plugin.is_v1() && plugin.hooks.request_in_response)
            .then(|| Arc::new(crate::http::copy_head(request)));
        let mut body_changed = false;
        for (slot, plugin) in selected() {
            let collected = match &body {
                ResponseBody::Collected(bytes) => Some(bytes),
                ResponseBody::Stream(_) if plugin.hooks.response_body => {
                    let failure = Failure::new(
                        FailureKind::TooLarge,
                        format!("response body over {MAX_BODY_BYTES} bytes"),
                    );
                    if let Some(error) = fail(slot, plugin, &failure) {
                        return Err(error);
                    }
                    continue;
                }
                ResponseBody::Stream(_) => None,
            };
            let given = transformer::ResponseCall {
                phase: transformer::wit_phase(phase),
                request_v1: request_v1.as_ref(),
                request_v2: request_v2.as_ref(),
                body: collected,
            };
            let parked = parked.as_deref_mut();
            let edited = &mut parts;
            let call =
                |turn| transformer::on_response(engine, plugin, &given, edited, parked, turn);
            let open = plugin.config.on_error == OnError::Open;
            let skip = Skip {
                failed: open,
                unavailable: open,
            };
            if let Some(Some(new_body)) =
                guarded(slot, plugin, Hook::OnResponse, skip, call).await?
            {
                body = ResponseBody::Collected(new_body);
                body_changed = true;
            }
        }
        // A HEAD carries no body, so a plugin that reads bodies saw none:
        // what it would make of the GET's body, and so its length, is
        // unknown, and RFC 9110 (8.6) forbids a Content-Length that is not
        // the GET's. Such a HEAD goes without one.
        let length_unknown = needs_body && request.method == http::Method::HEAD;
        Ok(match body {
            ResponseBody::Collected(_) if length_unknown => {
                parts.headers.remove(TRANSFER_ENCODING);
                parts.headers.remove(CONTENT_LENGTH);
                Response::from_parts(parts, body::empty())
            }
            ResponseBody::Collected(bytes) => {
                fix_framing(
                    &mut parts,
                    request,
                    original_length,
                    bytes.len(),
                    body_changed,
                );
                Response::from_parts(parts, body::full(bytes))
            }
            ResponseBody::Stream(stream) => Response::from_parts(parts, stream),
        })
    }

    /// One run of a fetcher plugin for a source; `values` is what its
    /// `cache` import may read.
    pub async fn fetch(
        &self,
        plugin: &str,
        context: FetchContext,
        values: Arc<dyn SourceValues>,
    ) -> Result<FetchOutcome, PluginError> {
        let (Some(engine), Some(slot)) = (self.engine.get(), self.slot(plugin)) else {
            return Err(PluginError {
                plugin: Arc::from(plugin),
                kind: FailureKind::Error,
                on_error: OnError::Closed,
                detail: "no such plugin is loaded".to_string(),
                retry_after: None,
            });
        };
        let loaded = slot.current.load_full();
        let call = |turn| fetcher::run(engine, &loaded, values, context, turn);
        attempt(&slot, &loaded, Hook::Run, call)
            .await
            .map_err(|failure| loaded.error(failure))
    }

    /// The transformers of `chain`, every phase, in chain order.
    fn resolve(&self, chain: &[String]) -> Resolved {
        chain
            .iter()
            .filter_map(|name| {
                let slot = self.slot(name);
                if slot.is_none() {
                    tracing::warn!(plugin = %name, "route names a plugin that is not loaded; skipped");
                }
                slot
            })
            .map(|slot| {
                let plugin = slot.current.load_full();
                (slot, plugin)
            })
            .filter(|(_, plugin)| matches!(plugin.kind, Kind::Transformer(_)))
            .collect()
    }
}

/// The body is now a whole, known-length buffer: `Content-Length` states its
/// length (whatever the plugin wrote), chunked framing goes. Responses
/// without a body (HEAD, 204, 304) keep the length the upstream declared,
/// unless a plugin gave them a body.
fn fix_framing(
    parts: &mut http::response::Parts,
    request: &http::request::Parts,
    original_length: Option<HeaderValue>,
    length: usize,
    body_changed: bool,
) {
    parts.headers.remove(TRANSFER_ENCODING);
    let is_bodiless = request.method == http::Method::HEAD
        || parts.status == http::StatusCode::NO_CONTENT
        || parts.status == http::StatusCode::NOT_MODIFIED
        || parts.status.is_informational();
    if is_bodiless && !body_changed {
        match original_length {
            Some(declared) => parts.headers.insert(CONTENT_LENGTH, declared),
            None => parts.headers.remove(CONTENT_LENGTH),
        };
    } else {
        parts
            .headers
            .insert(CONTENT_LENGTH, HeaderValue::from(length));
    }
}

fn memory_limit(totals: &PluginTotals) -> usize {
    usize::try_from(totals.total_memory.0).unwrap_or(usize::MAX)
}

fn shared_engine(plugin: &str) -> Result<Arc<PluginEngine>, PluginLoadError> {
    engine::shared().map_err(|error| PluginLoadError {
        plugin: plugin.to_string(),
        reason: error.into(),
    })
}

async fn is_unchanged(slot: &PluginSlot, config: &PluginConfig) -> bool {
    use sha2::Digest as _;
    let current = slot.current.load();
    if current.config != *config {
        return false;
    }
    match tokio::fs::read(&config.path).await {
        Ok(wasm) => hex::encode(sha2::Sha256::digest(&wasm)) == current.wasm_sha256,
        Err(_) => false,
    }
}

fn with_path_and_query(
    uri: &http::Uri,
    path_and_query: http::uri::PathAndQuery,
) -> Result<http::Uri, http::uri::InvalidUriParts> {
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query);
    http::Uri::from_parts(parts)
}

fn call_error(plugin: &LoadedPlugin, kind: FailureKind, detail: String) -> PluginError {
    PluginError {
        plugin: plugin.name.clone(),
        kind,
        on_error: plugin.config.on_error,
        detail,
        retry_after: None,
    }
}

/// Gives a half-open breaker's trial back unless an outcome was recorded:
/// dropped with the call's future when a client leaves or a stream is reset.
struct TrialGuard<'a>(Option<&'a Breaker>);

impl TrialGuard<'_> {
    fn settled(&mut self) {
        self.0 = None;
    }
}

impl Drop for TrialGuard<'_> {
    fn drop(&mut self) {
        if let Some(breaker) = self.0 {
            breaker.release_trial();
        }
    }
}

/// Runs one guest call under the breaker, with metrics; the failure (if
/// any) is logged and counted, not yet judged. The call waits for one of
/// the plugin's turns first, and the breaker is asked once it has one: calls
/// queued while the plugin failed do not run it again once the circuit is
/// open. A call that could not run for want of capacity is not held
/// against the plugin's breaker.
async fn attempt<T, F, Fut>(
    slot: &PluginSlot,
    plugin: &LoadedPlugin,
    hook: Hook,
    call: F,
) -> Result<T, Failure>
where
    F: FnOnce(Turn) -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    use std::sync::atomic::Ordering::Relaxed;
    let breaker = slot.breaker(hook);
    let circuit_open = || {
        slot.counters.skipped.fetch_add(1, Relaxed);
        Err(Failure::new(
            FailureKind::CircuitOpen,
            "circuit open after repeated failures; not called",
        ))
    };
    // An open circuit answers at once, without queueing for a turn.
    if breaker.is_skipping_now() {
        return circuit_open();
    }
    let mut trial = TrialGuard(None);
    // Held until the outcome is recorded below, so the next queued call asks
    // a breaker that already knows how this one went.
    let mut permit = None;
    let result = match plugin.take_turn().await {
        Err(failure) => Err(failure),
        Ok(mut turn) => {
            let admission = breaker.admit_now();
            if admission == Admission::Skip {
                return circuit_open();
            }
            trial = TrialGuard((admission == Admission::Trial).then_some(breaker));
            permit = turn.take_permit();
            slot.counters.invocations.fetch_add(1, Relaxed);
            let started = Instant::now();
            let result = call(turn).await;
            // A call refused for capacity (no instance slot, over the memory
            // budget) never reached the guest: not an invocation after all.
            if matches!(&result, Err(failure) if failure.kind == FailureKind::Capacity) {
                slot.counters.invocations.fetch_sub(1, Relaxed);
            } else {
                slot.metrics.invocations(hook).increment(1);
                slot.metrics
                    .duration
                    .record(started.elapsed().as_secs_f64());
            }
            result
        }
    };
    let breaker_changed = match &result {
        Ok(_) => {
            trial.settled();
            breaker.record_success()
        }
        Err(failure) if failure.kind == FailureKind::Capacity => {
            // The trial guard gives the trial back: the plugin was not tried.
            slot.counters.capacity.fetch_add(1, Relaxed);
            metrics::counter!("larder_plugin_failures_total", "plugin" => slot.name.to_string(), "kind" => failure.kind.as_str())
                .increment(1);
            tracing::warn!(
                plugin = &*slot.name,
                hook = hook.as_str(),
                kind = failure.kind.as_str(),
                reason = %failure.describe(),
                "plugin call could not run"
            );
            false
        }
        Err(failure) => {
            slot.counters.failures.fetch_add(1, Relaxed);
            *slot.counters.last_failure.lock() = Some((failure.kind.as_str(), failure.describe()));
            let name = slot.name.to_string();
            metrics::counter!("larder_plugin_failures_total", "plugin" => name.clone(), "kind" => failure.kind.as_str())
                .increment(1);
            tracing::error!(
                plugin = %name,
                hook = hook.as_str(),
                kind = failure.kind.as_str(),
                on_error = ?plugin.config.on_error,
                reason = %failure.describe(),
                "plugin call failed"
            );
            if breaker.record_failure(Instant::now()) {
                tracing::warn!(plugin = %name, "plugin failed repeatedly; circuit open, calls skipped for a while");
            }
            trial.settled();
            true
        }
    };
    if breaker_changed {
        slot.publish_circuit();
    }
    drop(permit);
    result
}

/// When a failed call is skipped rather than failing the request.
#[derive(Debug, Clone, Copy)]
struct Skip {
    /// The plugin ran and failed (`on_error: open`).
    failed: bool,
    /// The plugin could not run: open circuit or no capacity.
    unavailable: bool,
}

/// [`attempt`] plus the skip policy: `Ok(None)` means skip the plugin,
/// `Err` fails the request.
async fn guarded<T, F, Fut>(
    slot: &PluginSlot,
    plugin: &LoadedPlugin,
    hook: Hook,
    skip: Skip,
    call: F,
) -> Result<Option<T>, PluginError>
where
    F: FnOnce(Turn) -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    match attempt(slot, plugin, hook, call).await {
        Ok(value) => Ok(Some(value)),
        Err(failure) => match judge(slot, plugin, hook, skip, &failure) {
            Some(error) => Err(error),
            None => Ok(None),
        },
    }
}

/// A failure that happened without calling the guest (body too large).
fn fail(slot: &PluginSlot, plugin: &LoadedPlugin, failure: &Failure) -> Option<PluginError> {
    metrics::counter!("larder_plugin_failures_total", "plugin" => slot.name.to_string(), "kind" => failure.kind.as_str())
        .increment(1);
    tracing::warn!(plugin = &*slot.name, kind = failure.kind.as_str(), reason = %failure.detail, "plugin skipped");
    let open = plugin.config.on_error == OnError::Open;
    let skip = Skip {
        failed: open,
        unavailable: open,
    };
    judge(slot, plugin, Hook::OnResponse, skip, failure)
}

fn judge(
    slot: &PluginSlot,
    plugin: &LoadedPlugin,
    hook: Hook,
    skip: Skip,
    failure: &Failure,
) -> Option<PluginError> {
    let unavailable = failure.kind.is_unavailable();
    if (unavailable && skip.unavailable) || (!unavailable && skip.failed) {
        return None;
    }
    let mut error = plugin.error(failure.clone());
    error.retry_after = match failure.kind {
        FailureKind::CircuitOpen => Some(std::time::Duration::from_secs(
            slot.breaker(hook).retry_after(Instant::now()),
        )),
        FailureKind::Capacity => Some(std::time::Duration::from_secs(1)),
        _ => None,
    };
    Some(error)
}

/// The response body while a chain runs: streaming on untouched, or
/// whole in memory (collected for a plugin, or replaced by one).
enum ResponseBody {
    Collected(Bytes),
    Stream(Body),
}

enum Collected {
    Whole(Bytes),
    /// Over the cap: the body as it was (bytes read so far, then the rest).
    TooLarge(Body),
}

/// Reads a body up to `cap` bytes; above it, hands back an equivalent body.
async fn collect_capped(body: Body, cap: usize) -> Result<Collected, BoxError> {
    use http_body::Body as _;
    if body.size_hint().lower() > cap as u64 {
        return Ok(Collected::TooLarge(body));
    }
    let mut stream = BodyStream::new(body);
    let mut collected = BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = stream.next().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(data) => {
                collected.extend_from_slice(&data);
                if collected.len() > cap {
                    let read = http_body::Frame::data(collected.freeze());
                    let rest = futures_util::stream::once(async { Ok(read) }).chain(stream);
                    return Ok(Collected::TooLarge(BodyExt::boxed(StreamBody::new(rest))));
                }
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    if trailers.is_some() {
        tracing::debug!("response trailers dropped: a plugin transformed the body");
    }
    Ok(Collected::Whole(collected.freeze()))
}
