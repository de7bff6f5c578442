//! Wasm plugins: one wasmtime engine, components compiled (and cached on
//! disk) at load, sandboxed instances per call, the WIT host imports, and the
//! failure policy (on_error, circuit breaker). The main type is
//! [`PluginHost`]; the proxy calls its transformer hooks, the sources call
//! [`PluginHost::fetch`].
//!
//! Must not hand a plugin anything its config did not grant.

mod bindings;
mod breaker;
mod call;
mod engine;
mod fetcher;
mod host_imports;
mod http_client;
mod loader;
mod transformer;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderValue, Response};
use http_body_util::{BodyExt, BodyStream, StreamBody};

use crate::body::{self, Body};
use crate::config::{OnError, PluginConfig, PluginPhase};
use crate::error::ProxyError;

use breaker::Admission;
use call::{Failure, FailureKind, Hook};
use engine::PluginEngine;
pub use loader::ParkedInstances;
pub use loader::PluginStats;
use loader::{Kind, LoadedPlugin, PluginSlot};
use transformer::RequestEdit;

/// The largest response body handed to a transformer's `on-response`.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin {plugin}: {reason}")]
    Load { plugin: String, reason: String },
    #[error("plugin {plugin} failed: {reason}")]
    Call { plugin: String, reason: String },
}

/// What a fetcher plugin's run produced.
#[derive(Debug, Clone)]
pub enum FetchOutcome {
    Updated {
        content_type: Option<String>,
        body: Bytes,
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

/// Extra cache-key parts a transformer's `on-request` asked for; put in the
/// request's extensions for the cache to fold into the key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheKeyExtra(pub Vec<String>);

/// A value a fetcher produced for a source, as its `cache` view shows it.
#[derive(Debug, Clone)]
pub struct SourceValue {
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
    pub produced_at: Instant,
}

/// The values one fetcher plugin produced, by source name. Filled by the
/// host from each successful run, so a plugin sees only its own sources.
#[derive(Debug, Default)]
pub struct SourceValues(Mutex<HashMap<String, SourceValue>>);

impl SourceValues {
    pub fn get(&self, source: &str) -> Option<SourceValue> {
        self.0.lock().ok()?.get(source).cloned()
    }

    fn insert(&self, source: &str, value: SourceValue) {
        if let Ok(mut values) = self.0.lock() {
            values.insert(source.to_string(), value);
        }
    }
}

/// Every loaded plugin; lives across reloads and swaps plugins in place.
pub struct PluginHost {
    /// Set once the first plugin is configured (at load or a later reload).
    engine: OnceLock<Arc<PluginEngine>>,
    slots: RwLock<BTreeMap<String, Arc<PluginSlot>>>,
}

impl PluginHost {
    /// Compiles every plugin and probes its `init` with its config.
    pub async fn load(config: &BTreeMap<String, PluginConfig>) -> Result<Arc<Self>, PluginError> {
        if config.is_empty() {
            // No plugins: do not build the engine (or its address space).
            return Ok(Arc::new(Self {
                engine: OnceLock::new(),
                slots: RwLock::default(),
            }));
        }
        let engine = shared_engine(config.keys().next().map_or("", String::as_str))?;
        let mut slots = BTreeMap::new();
        for (name, plugin_config) in config {
            let plugin = loader::load_plugin(&engine, name, plugin_config)
                .await
                .map_err(|reason| PluginError::Load {
                    plugin: name.clone(),
                    reason,
                })?;
            let slot = PluginSlot::new(plugin);
            loader::watch(engine.clone(), &slot);
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
    pub async fn apply(&self, config: &BTreeMap<String, PluginConfig>) -> Result<(), PluginError> {
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
        let existing = self.slots.read().map(|s| s.clone()).unwrap_or_default();
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
                    return Err(PluginError::Load {
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
                        loader::watch(engine.clone(), slot);
                    }
                    slot.clone()
                }
                None => {
                    let slot = PluginSlot::new(plugin);
                    loader::watch(engine.clone(), &slot);
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
        if let Ok(mut slots) = self.slots.write() {
            *slots = next;
        }
    }

    fn slot(&self, name: &str) -> Option<Arc<PluginSlot>> {
        self.slots.read().ok()?.get(name).cloned()
    }

    /// Counters of one plugin (for tests and the admin side).
    pub fn stats(&self, plugin: &str) -> Option<PluginStats> {
        self.slot(plugin).map(|slot| slot.stats())
    }

    /// Runs `on-request` of each plugin in `chain`, in order. `Some(response)`
    /// means a plugin answered directly and the request goes no further.
    /// Extra cache-key parts land in the request's [`CacheKeyExtra`] extension.
    pub async fn on_request(
        &self,
        chain: &[String],
        request: &mut http::request::Parts,
    ) -> Result<Option<Response<Body>>, ProxyError> {
        let Some(engine) = self.engine.get() else {
            return Ok(None);
        };
        // A cache-store transformer is paid once per fill: calling its
        // on-request too would cost a fresh instance on every hit.
        let parked = ParkedInstances::default();
        for (slot, plugin) in self.transformers(chain, Some(PluginPhase::Downstream)) {
            let head = transformer::request_head(request);
            let call = transformer::on_request(engine, &plugin, &head, &parked);
            let Some(edit) = guarded(&slot, &plugin, Hook::OnRequest, call).await? else {
                continue;
            };
            match edit {
                RequestEdit::Respond(response) => {
                    keep_parked(request, parked);
                    return Ok(Some(response));
                }
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
                        request.uri = with_path_and_query(&request.uri, path_and_query)?;
                    }
                    if let Some(headers) = headers {
                        request.headers = headers;
                    }
                    if !cache_key_extra.is_empty() {
                        let extra = request
                            .extensions
                            .get_or_insert_with(CacheKeyExtra::default);
                        extra.0.extend(cache_key_extra);
                    }
                }
            }
        }
        keep_parked(request, parked);
        Ok(None)
    }

    /// Runs `on-response` of the plugins in `chain` configured for `phase`.
    /// The body is collected only when at least one plugin runs.
    pub async fn on_response(
        &self,
        chain: &[String],
        phase: PluginPhase,
        request: &http::request::Parts,
        response: Response<Body>,
    ) -> Result<Response<Body>, ProxyError> {
        let Some(engine) = self.engine.get() else {
            return Ok(response);
        };
        let selected = self.transformers(chain, Some(phase));
        if selected.is_empty() {
            return Ok(response);
        }
        let (mut parts, body) = response.into_parts();
        let mut bytes = match collect_capped(body, MAX_BODY_BYTES).await? {
            Collected::Whole(bytes) => bytes,
            Collected::TooLarge(body) => {
                for (slot, plugin) in &selected {
                    let failure = Failure::new(
                        FailureKind::TooLarge,
                        format!("response body over {MAX_BODY_BYTES} bytes"),
                    );
                    if let Some(error) = fail(slot, plugin, failure) {
                        return Err(error);
                    }
                }
                return Ok(Response::from_parts(parts, body));
            }
        };
        let original_length = parts.headers.get(CONTENT_LENGTH).cloned();
        let request_head = transformer::request_head(request);
        let parked = request.extensions.get::<ParkedInstances>();
        let mut body_changed = false;
        for (slot, plugin) in &selected {
            let head = transformer::response_head(&parts);
            let call = transformer::on_response(
                engine,
                plugin,
                transformer::wit_phase(phase),
                &request_head,
                &head,
                &bytes,
                parked,
            );
            let Some(edit) = guarded(slot, plugin, Hook::OnResponse, call).await? else {
                continue;
            };
            // Read from the headers the upstream (or an earlier plugin) gave,
            // so a plugin cannot lift it for itself; parsed only when a body
            // came back, which most response hooks never do.
            let no_transform =
                edit.body.is_some() && crate::cache::forbids_transform(&parts.headers);
            parts.status = edit.status;
            if let Some(headers) = edit.headers {
                parts.headers = headers;
            }
            match edit.body {
                Some(_) if no_transform => tracing::debug!(
                    plugin = &*slot.name,
                    "body change ignored: the response says Cache-Control: no-transform"
                ),
                Some(new_body) => {
                    bytes = new_body;
                    body_changed = true;
                }
                None => {}
            }
        }
        fix_framing(
            &mut parts,
            request,
            original_length,
            bytes.len(),
            body_changed,
        );
        Ok(Response::from_parts(parts, body::full(bytes)))
    }

    /// One run of a fetcher plugin for a source.
    pub async fn fetch(
        &self,
        plugin: &str,
        context: FetchContext,
    ) -> Result<FetchOutcome, PluginError> {
        let call_error = |reason: String| PluginError::Call {
            plugin: plugin.to_string(),
            reason,
        };
        let (Some(engine), Some(slot)) = (self.engine.get(), self.slot(plugin)) else {
            return Err(call_error("no such plugin is loaded".to_string()));
        };
        let loaded = slot.current.load_full();
        let call = fetcher::run(engine, &loaded, &slot.source_values, context);
        match attempt(&slot, &loaded, Hook::Run, call).await {
            Ok(outcome) => Ok(outcome),
            Err(failure) => Err(call_error(format!(
                "{}: {}",
                failure.kind.as_str(),
                failure.describe()
            ))),
        }
    }

    /// The transformers of `chain` (for `phase`, if given), in chain order.
    fn transformers(
        &self,
        chain: &[String],
        phase: Option<PluginPhase>,
    ) -> Vec<(Arc<PluginSlot>, Arc<LoadedPlugin>)> {
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
            .filter(|(_, plugin)| phase.is_none_or(|phase| plugin.config.phase == phase))
            .collect()
    }
}

/// Leaves the request's parked instances in its extensions, where the
/// proxy carries them to the response's plugins.
fn keep_parked(request: &mut http::request::Parts, parked: ParkedInstances) {
    if !parked.is_empty() {
        request.extensions.insert(parked);
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

fn shared_engine(plugin: &str) -> Result<Arc<PluginEngine>, PluginError> {
    engine::shared().map_err(|reason| PluginError::Load {
        plugin: plugin.to_string(),
        reason: format!("the wasm engine could not start: {reason}"),
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
) -> Result<http::Uri, ProxyError> {
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query);
    http::Uri::from_parts(parts)
        .map_err(|e| ProxyError::Internal(format!("rebuilding the URI after a plugin: {e}")))
}

/// Runs one guest call under the breaker, with metrics; the failure (if
/// any) is logged and counted, not yet judged.
async fn attempt<T>(
    slot: &PluginSlot,
    plugin: &LoadedPlugin,
    hook: Hook,
    call: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    use std::sync::atomic::Ordering::Relaxed;
    if slot.breaker(hook).admit(Instant::now()) == Admission::Skip {
        slot.counters.skipped.fetch_add(1, Relaxed);
        return Err(Failure::new(
            FailureKind::CircuitOpen,
            "circuit open after repeated failures; not called",
        ));
    }
    slot.counters.invocations.fetch_add(1, Relaxed);
    slot.metrics.invocations(hook).increment(1);
    let started = Instant::now();
    let result = call.await;
    slot.metrics
        .duration
        .record(started.elapsed().as_secs_f64());
    match &result {
        Ok(_) => slot.breaker(hook).record_success(),
        Err(failure) => {
            slot.counters.failures.fetch_add(1, Relaxed);
            if let Ok(mut last) = slot.counters.last_failure.lock() {
                *last = Some((failure.kind.as_str(), failure.describe()));
            }
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
            if slot.breaker(hook).record_failure(Instant::now()) {
                tracing::warn!(plugin = %name, "plugin failed repeatedly; circuit open, calls skipped for a while");
            }
        }
    }
    let open = if slot.is_circuit_open() { 1.0 } else { 0.0 };
    slot.metrics.circuit_open.set(open);
    result
}

/// [`attempt`] plus the plugin's `on_error`: `Ok(None)` means skip the
/// plugin (open), `Err` answers the client 502 (closed).
async fn guarded<T>(
    slot: &PluginSlot,
    plugin: &LoadedPlugin,
    hook: Hook,
    call: impl Future<Output = Result<T, Failure>>,
) -> Result<Option<T>, ProxyError> {
    match attempt(slot, plugin, hook, call).await {
        Ok(value) => Ok(Some(value)),
        Err(failure) => match judge(plugin, &failure) {
            Some(error) => Err(error),
            None => Ok(None),
        },
    }
}

/// A failure that happened without calling the guest (body too large).
fn fail(slot: &PluginSlot, plugin: &LoadedPlugin, failure: Failure) -> Option<ProxyError> {
    metrics::counter!("larder_plugin_failures_total", "plugin" => slot.name.to_string(), "kind" => failure.kind.as_str())
        .increment(1);
    tracing::warn!(plugin = &*slot.name, kind = failure.kind.as_str(), reason = %failure.detail, "plugin skipped");
    judge(plugin, &failure)
}

fn judge(plugin: &LoadedPlugin, failure: &Failure) -> Option<ProxyError> {
    match plugin.config.on_error {
        OnError::Open => None,
        OnError::Closed => Some(ProxyError::PluginFailed {
            plugin: plugin.name.to_string(),
            reason: format!("{}: {}", failure.kind.as_str(), failure.detail),
        }),
    }
}

enum Collected {
    Whole(Bytes),
    /// Over the cap: the body as it was (bytes read so far, then the rest).
    TooLarge(Body),
}

/// Reads a body up to `cap` bytes; above it, hands back an equivalent body.
async fn collect_capped(body: Body, cap: usize) -> Result<Collected, ProxyError> {
    use http_body::Body as _;
    if body.size_hint().lower() > cap as u64 {
        return Ok(Collected::TooLarge(body));
    }
    let mut stream = BodyStream::new(body);
    let mut collected = BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = stream.next().await {
        let frame = frame.map_err(|e| ProxyError::UpstreamUnavailable {
            upstream: "upstream".to_string(),
            reason: format!("response body broke: {e}"),
        })?;
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
