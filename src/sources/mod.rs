//! Scheduled sources (cachepump's idea): named datasets fetched on cron
//! schedules from static values, HTTP endpoints, files or fetcher plugins,
//! or mirrored from etcd by watching; kept in memory as their last good
//! value and served by key, whole or (for mirrors) one key at a time, to
//! clients that may wait for the next change (see `wait`).
//!
//! `Sources` owns the set of running schedules (one tokio task per source,
//! see `runner`, all on the sources' own thread, see `background`) and a
//! lock-free snapshot of their slots for readers. The slots are the only
//! copy of source values: a fetcher plugin reads its own through a view
//! lent to each run.
//! Must never block the request path: serving is a snapshot read, a clone of
//! pre-built headers and of the value's `Bytes`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use ::http::{Method, Request, Response, StatusCode};
use arc_swap::ArcSwap;
use chrono::{DateTime, SecondsFormat, Utc};
use parking_lot::{Mutex, MutexGuard};
use tokio::task::JoinHandle;

use crate::config::SourceConfig;
use crate::http::body::Body;
use crate::http::error::{ErrorKind, RequestError};
use crate::plugins::{self, PluginHost};

mod background;
mod etcd;
mod file;
mod http;
mod members;
mod mirror;
mod plugin;
mod provider;
mod redis_key;
mod run;
mod runner;
mod shared;
mod r#static;
mod value;
mod wait;

pub use run::SourceError;
pub use shared::{SharedFuture, SharedSources, SharedUnavailable};
pub use value::sniff;

use self::http::{HttpClient, build_client};
use arc_swap::ArcSwapOption;
use provider::Provider;
use runner::{Runner, Settings, Slot};
use shared::SharedHandle;
use value::{Freshness, StoredValue, seconds_until};

/// Every source's slot by name; replaced whole on reload, never locked.
type Slots = ArcSwap<HashMap<String, Arc<Slot>>>;

/// cachepump's answers, kept byte for byte because its clients may match them.
const MISSING_KEY: &str = "Parametor 'key' is not found";
const UNKNOWN_KEY: &str = "key is not found";
const BAD_METHOD: &str = "Method is not supported";

/// The running sources: their schedules and their last good values.
pub struct Sources {
    /// Where the schedules run: their own thread, off the proxy's runtime.
    background: background::Background,
    plugins: Arc<PluginHost>,
    client: HttpClient,
    /// What readers see (shared with the runs, for fetchers' views).
    slots: Arc<Slots>,
    /// The schedules, by source; only `apply` and `shutdown` touch it.
    running: Mutex<HashMap<String, Running>>,
    /// The store shared with other instances (`shared:`), if any.
    shared: ArcSwapOption<SharedHandle>,
}

struct Running {
    config: SourceConfig,
    task: Option<JoinHandle<()>>,
}

impl Running {
    fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Sources {
    /// Starts the scheduler for `config` (fetching at start where configured).
    /// With `shared`, each tick of a source is fetched by one instance of
    /// the namespace and installed by the others.
    /// Must be called inside a tokio runtime.
    pub fn start(
        config: &BTreeMap<String, SourceConfig>,
        plugins: Arc<PluginHost>,
        shared: Option<Arc<dyn SharedSources>>,
    ) -> Arc<Self> {
        let sources = Arc::new(Self {
            background: background::Background::start(),
            plugins,
            client: build_client(),
            slots: Arc::new(ArcSwap::from_pointee(HashMap::new())),
            running: Mutex::new(HashMap::new()),
            shared: ArcSwapOption::new(shared.map(|store| Arc::new(SharedHandle { store }))),
        });
        sources.apply(config);
        sources
    }

    /// Replaces the shared store (a reload that changed `shared:`) and
    /// restarts every schedule with it; values are kept.
    pub fn set_shared(&self, shared: Option<Arc<dyn SharedSources>>) {
        self.shared
            .store(shared.map(|store| Arc::new(SharedHandle { store })));
        let slots = self.slots.load();
        let mut running = self.lock_running();
        for (name, schedule) in running.iter_mut() {
            let Some(slot) = slots.get(name) else {
                continue;
            };
            schedule.stop();
            schedule.task = Some(self.spawn_runner(slot, &schedule.config));
        }
    }

    /// Applies a reloaded `sources:` map: adds new sources, removes gone ones
    /// (their values are deleted, as cachepump does) and restarts edited ones
    /// with the new settings (their value is kept until a new run replaces it).
    /// Unchanged sources keep running undisturbed.
    pub fn apply(&self, config: &BTreeMap<String, SourceConfig>) {
        let mut running = self.lock_running();
        let mut slots: HashMap<String, Arc<Slot>> = (**self.slots.load()).clone();

        running.retain(|name, schedule| {
            let keep = config.contains_key(name);
            if !keep {
                schedule.stop();
                if let Some(slot) = slots.remove(name) {
                    slot.end_waits();
                }
                tracing::info!(source = %name, "source removed");
            }
            keep
        });

        for (name, source) in config {
            if let Some(existing) = running.get_mut(name) {
                if existing.config == *source {
                    continue;
                }
                existing.stop();
            }
            let slot = match slots.get(name) {
                Some(slot) => {
                    tracing::info!(source = %name, "source changed; restarting its schedule");
                    slot.clone()
                }
                None => {
                    tracing::info!(source = %name, "source added");
                    let slot = Slot::new(name, settings_of(source, "none"));
                    slots.insert(name.clone(), slot.clone());
                    slot
                }
            };
            let task = Some(self.spawn_runner(&slot, source));
            running.insert(
                name.clone(),
                Running {
                    config: source.clone(),
                    task,
                },
            );
        }
        self.slots.store(Arc::new(slots));
    }

    fn spawn_runner(&self, slot: &Arc<Slot>, source: &SourceConfig) -> JoinHandle<()> {
        if let Some(etcd) = &source.etcd {
            let generation = slot.begin_generation(settings_of(source, "etcd"));
            let content_type = slot.settings.load().content_type.clone();
            return etcd::Mirror::new(etcd.clone(), slot.clone(), generation, content_type)
                .spawn(self.background.handle());
        }
        if let Some(redis) = &source.redis {
            let generation = slot.begin_generation(settings_of(source, "redis"));
            let content_type = slot.settings.load().content_type.clone();
            return redis_key::RedisMirror::new(
                redis.clone(),
                slot.clone(),
                generation,
                content_type,
            )
            .spawn(self.background.handle());
        }
        let provider = Provider::from_config(source, &self.client);
        let generation = slot.begin_generation(settings_of(source, provider.kind()));
        // A watched file is this instance's own: each instance reads it.
        let watch = match &provider {
            Provider::File(_) => source
                .file
                .as_ref()
                .filter(|file| file.watch)
                .map(|file| file.path.clone()),
            _ => None,
        };
        let shared = self
            .shared
            .load_full()
            .filter(|_| source.shared && watch.is_none());
        let rule = match shared {
            Some(_) => source.rule.aligned(),
            None => source.rule.clone(),
        };
        let runner = Runner {
            slot: slot.clone(),
            rule,
            provider: Arc::new(provider),
            plugins: self.plugins.clone(),
            slots: self.slots.clone(),
            timeout: source.timeout.get(),
            run_on_start: source.run_on_start,
            generation,
            shared,
            watch,
        };
        runner.spawn(self.background.handle())
    }

    /// cachepump's API: `GET /?key=NAME` (HEAD too, without the body);
    /// its refusals are cachepump's plain-text answers. A read may wait
    /// for the next change (see `wait`).
    pub fn serve_by_key<B>(&self, request: &Request<B>) -> Result<SourceRead, RequestError> {
        if !is_read(request.method()) {
            return Err(plain(StatusCode::BAD_REQUEST, BAD_METHOD));
        }
        let Some(key) = key_of(request) else {
            return Err(plain(StatusCode::BAD_REQUEST, MISSING_KEY));
        };
        let wait = wait::requested(request.uri(), request.headers())?;
        let slot = self
            .slots
            .load()
            .get(&key)
            .filter(|slot| slot.value.load().is_some())
            .cloned()
            .ok_or_else(|| plain(StatusCode::NOT_FOUND, UNKNOWN_KEY))?;
        read(slot, None, request, wait)
    }

    /// A route with `source: NAME`: the value, whatever the query says; for
    /// a mirror, `<route prefix>/<key>` is that key's value alone. A read
    /// may wait for the next change (see `wait`).
    pub fn serve_source<B>(
        &self,
        name: &str,
        route_prefix: &str,
        request: &Request<B>,
    ) -> Result<SourceRead, RequestError> {
        if !is_read(request.method()) {
            return Err(ErrorKind::MethodNotAllowed {
                allow: "GET, HEAD",
                reason: "a source answers GET and HEAD only",
            }
            .into());
        }
        let wait = wait::requested(request.uri(), request.headers())?;
        let slot = self
            .slots
            .load()
            .get(name)
            .filter(|slot| slot.value.load().is_some())
            .cloned()
            .ok_or_else(|| ErrorKind::NotFound(format!("source {name} has no value yet")))?;
        let member = member_of(request.uri().path(), route_prefix);
        read(slot, member, request, wait)
    }

    /// `GET /sources` on the admin listener: every source, sorted by name.
    pub fn status(&self) -> serde_json::Value {
        let slots = self.slots.load();
        let mut names: Vec<&String> = slots.keys().collect();
        names.sort();
        let sources: Vec<serde_json::Value> = names
            .into_iter()
            .filter_map(|name| slots.get(name))
            .map(|slot| status_of(slot))
            .collect();
        match self.shared.load().as_ref() {
            Some(shared) => serde_json::json!({
                "instance": shared.store.instance(),
                "sources": sources,
            }),
            None => serde_json::json!({ "sources": sources }),
        }
    }

    /// Stops every schedule; in-flight runs are abandoned. Values stay
    /// readable; readers waiting for a change are answered now, so they do
    /// not hold the drain.
    pub async fn shutdown(&self) {
        for schedule in self.lock_running().values_mut() {
            schedule.stop();
        }
        for slot in self.slots.load().values() {
            slot.end_waits();
        }
    }

    fn lock_running(&self) -> MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock()
    }
}

impl Drop for Sources {
    fn drop(&mut self) {
        for schedule in self.lock_running().values_mut() {
            schedule.stop();
        }
    }
}

fn settings_of(source: &SourceConfig, kind: &'static str) -> Settings {
    Settings {
        kind,
        rule: source.rule.text().to_string(),
        content_type: source
            .content_type
            .as_ref()
            .and_then(|value| value.to_str().ok())
            .map(str::to_string),
        fetcher: (kind == "plugin")
            .then(|| source.plugin.as_ref().map(|plugin| plugin.name.clone()))
            .flatten(),
        live: matches!(kind, "etcd" | "redis")
            || (kind == "file" && source.file.as_ref().is_some_and(|file| file.watch)),
    }
}

/// What a fetcher plugin's run may read: the values of the sources that
/// plugin feeds, and nothing else.
struct FetcherView {
    slots: Arc<Slots>,
    plugin: String,
}

impl plugins::SourceValues for FetcherView {
    fn get(&self, source: &str) -> Option<plugins::SourceValue> {
        let slots = self.slots.load();
        let slot = slots.get(source)?;
        if slot.settings.load().fetcher.as_deref() != Some(self.plugin.as_str()) {
            return None;
        }
        let value = slot.value.load_full()?;
        Some(plugins::SourceValue {
            headers: value.fetcher_headers.clone(),
            body: value.body.clone(),
            produced_at: value.fetched_at,
        })
    }
}

fn is_read(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// The first `key` query parameter, decoded; an empty one counts as missing (as in Go).
fn key_of<B>(request: &Request<B>) -> Option<String> {
    let query = request.uri().query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "key")
        .map(|(_, value)| value.into_owned())
        .filter(|key| !key.is_empty())
}

/// The key a read below a mirror route names: the path after the route's
/// prefix and a `/`, percent-decoded; `None` for the route's own path (and
/// for `/flagship` under `/flags`, which is not below it).
fn member_of(path: &str, route_prefix: &str) -> Option<String> {
    let rest = path.strip_prefix(route_prefix)?;
    let rest = if route_prefix.ends_with('/') {
        rest
    } else {
        rest.strip_prefix('/')?
    };
    if rest.is_empty() {
        return None;
    }
    Some(
        percent_encoding::percent_decode_str(rest)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

/// What a read is answered from: the whole value, or one of a mirror's keys.
fn target(
    value: &Arc<StoredValue>,
    member: Option<&str>,
) -> Result<Arc<StoredValue>, RequestError> {
    match (member, &value.members) {
        (Some(key), Some(members)) => members
            .get(key)
            .cloned()
            .ok_or_else(|| ErrorKind::NotFound(format!("no key {key:?} in this source")).into()),
        // A source that is one document answers every path under its route with it.
        _ => Ok(value.clone()),
    }
}

/// A read of a source: answered now, or once the value changes or the
/// client's wait runs out.
pub enum SourceRead {
    Ready(Response<Body>),
    Waiting(WaitingRead),
}

impl SourceRead {
    pub async fn response(self) -> Result<Response<Body>, RequestError> {
        match self {
            Self::Ready(response) => Ok(response),
            Self::Waiting(waiting) => waiting.response().await,
        }
    }
}

/// A read that waits while the client has the current version; it holds
/// what it needs of the request, so the request is not kept across the wait.
pub struct WaitingRead {
    slot: Arc<Slot>,
    member: Option<String>,
    method: Method,
    headers: ::http::HeaderMap,
    wait: wait::Wait,
}

impl WaitingRead {
    async fn response(self) -> Result<Response<Body>, RequestError> {
        let Self {
            slot,
            member,
            method,
            headers,
            wait,
        } = self;
        let deadline = tokio::time::Instant::now() + wait.duration;
        let _waiting = Waiting::begin(&slot.name);
        loop {
            let change = slot.next_change();
            tokio::pin!(change);
            change.as_mut().enable();
            let value = current(&slot, member.as_deref())?;
            let unchanged = wait.is_known(|tag| value.has_etag(tag));
            if !unchanged || slot.waits_ended() {
                return Ok(value.respond_to(&method, &headers, freshness(&slot), unchanged));
            }
            tokio::select! {
                () = &mut change => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Ok(value.respond_to(&method, &headers, freshness(&slot), true));
                }
            }
        }
    }
}

/// A read of `slot` (one key of it when `member`): the answer now, or a
/// wait when the client asked for one and has the current version.
fn read<B>(
    slot: Arc<Slot>,
    member: Option<String>,
    request: &Request<B>,
    wait: Option<wait::Wait>,
) -> Result<SourceRead, RequestError> {
    let value = current(&slot, member.as_deref())?;
    match wait {
        Some(wait) if wait.is_known(|tag| value.has_etag(tag)) => {
            Ok(SourceRead::Waiting(WaitingRead {
                slot,
                member,
                method: request.method().clone(),
                headers: request.headers().clone(),
                wait,
            }))
        }
        _ => Ok(SourceRead::Ready(value.respond(request, freshness(&slot)))),
    }
}

fn current(slot: &Slot, member: Option<&str>) -> Result<Arc<StoredValue>, RequestError> {
    let value = slot.value.load_full().ok_or_else(|| {
        RequestError::from(ErrorKind::NotFound("the source has no value yet".into()))
    })?;
    target(&value, member)
}

fn freshness(slot: &Slot) -> Freshness {
    if slot.settings.load().live {
        Freshness::Live
    } else {
        Freshness::MaxAge(seconds_until(slot.next_run(), SystemTime::now()))
    }
}

/// A client waiting for a change, counted in `larder_source_waiting_clients`.
struct Waiting(String);

impl Waiting {
    fn begin(source: &str) -> Self {
        metrics::gauge!("larder_source_waiting_clients", "source" => source.to_string())
            .increment(1.0);
        Self(source.to_string())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        metrics::gauge!("larder_source_waiting_clients", "source" => self.0.clone()).decrement(1.0);
    }
}

/// One of cachepump's plain-text refusals.
fn plain(status: StatusCode, text: &'static str) -> RequestError {
    ErrorKind::PlainText { status, text }.into()
}

fn rfc3339(time: Option<DateTime<Utc>>) -> serde_json::Value {
    time.map_or(serde_json::Value::Null, |t| {
        serde_json::Value::String(t.to_rfc3339_opts(SecondsFormat::Secs, true))
    })
}

fn status_of(slot: &Slot) -> serde_json::Value {
    let settings = slot.settings.load();
    let record = slot.record();
    let value = slot.value.load();
    let value = value.as_ref();
    serde_json::json!({
        "name": slot.name,
        "kind": settings.kind,
        "rule": settings.rule,
        "next_run": rfc3339(slot.next_run()),
        "last_success": rfc3339(record.last_success),
        "last_change": rfc3339(value.map(|v| v.changed_at)),
        "last_error": record.last_error,
        "value_size": value.map(|v| v.body.len()),
        "etag": value.map(|v| v.etag().to_string()),
        "content_type": value.map(|v| v.content_type().to_string()),
        "runs": record.runs,
        "failures": record.failures,
        "skipped": record.skipped,
        "not_modified": record.not_modified,
        "installed": record.installed,
        "fetched_by": value.and_then(|v| v.fetched_by.as_deref()),
        "file_changes": record.file_changes,
        "mirror": matches!(settings.kind, "etcd" | "redis")
            .then(|| record.mirror.clone().unwrap_or_default().status(Utc::now())),
    })
}

#[cfg(test)]
mod tests {
    use super::member_of;

    #[test]
    fn a_member_is_what_follows_the_route_and_a_slash_decoded() {
        assert_eq!(
            member_of("/flags/dark-mode", "/flags").as_deref(),
            Some("dark-mode")
        );
        assert_eq!(
            member_of("/flags/a/b%20c", "/flags/").as_deref(),
            Some("a/b c")
        );
        assert_eq!(member_of("/flags/1+1", "/flags").as_deref(), Some("1+1"));
        assert_eq!(
            member_of("/flags/a&b=c", "/flags").as_deref(),
            Some("a&b=c")
        );
        assert_eq!(member_of("/flags", "/flags"), None);
        assert_eq!(member_of("/flags/", "/flags"), None);
        assert_eq!(member_of("/flagship", "/flags"), None);
    }
}
