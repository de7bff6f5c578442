//! The configuration as the runtime reads it: typed values, parsed once at
//! load (header names, CIDR blocks, server addresses, URLs, cron rules,
//! header values), so no module parses config text again or holds a
//! "misconfigured" state. Built by `validate` from the raw model; sections
//! with nothing to parse are shared with it.
//!
//! Must not start anything or read files.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Method, StatusCode, Uri};
use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::units::{ByteSize, HumanDuration, deserialize_listen};
use crate::schedule::Rule;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The proxy listener (`-e` overrides).
    pub listen: SocketAddr,
    /// The HTTPS listener; `None`: plain HTTP only.
    pub tls: Option<TlsConfig>,
    pub log: LogConfig,
    pub server: ServerConfig,
    /// The operator API. Absent means not started.
    pub admin: Option<AdminConfig>,
    pub cache: CacheConfig,
    pub upstreams: BTreeMap<String, Upstream>,
    /// First match wins. `None` (no `routes:` key) means cachepump mode.
    pub routes: Option<Vec<Route>>,
    pub plugins: BTreeMap<String, PluginConfig>,
    pub plugin_limits: PluginTotals,
    pub sources: BTreeMap<String, SourceConfig>,
    /// The shared tier on Redis; `None`: this instance keeps to itself.
    pub shared: Option<SharedConfig>,
}

/// `tls:`, checked: every pair loaded once and matched.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    /// At least one; the first is the default.
    pub certificates: Vec<CertificateFiles>,
    pub redirect_http: bool,
}

/// Where one certificate chain and its key are read from (and read again
/// when they change).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `shared:`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedConfig {
    /// As redis-rs takes it: `redis://…` or `redis+unix://…`.
    pub url: String,
    pub namespace: String,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_object_size: u64,
    pub write_queue: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    pub max_size: ByteSize,
    pub max_object_size: ByteSize,
    /// Response headers whose values tag an entry for purge.
    pub tag_headers: Vec<HeaderName>,
    /// Longest a fill may take (head and body), and a coalesced request's
    /// wait for its head.
    pub fill_timeout: Duration,
    /// Longest an upstream body being filled may send nothing.
    pub fill_idle_timeout: Duration,
    /// Bytes all fills in progress may buffer together.
    pub fill_memory: u64,
    /// Targeted cache-control fields (RFC 9213), in precedence order: the
    /// first present and valid one replaces Cache-Control and Expires for
    /// Larder's own caching decisions.
    pub targeted_fields: Vec<HeaderName>,
    /// Whether responses leave without the targeted fields.
    pub remove_targeted_fields: bool,
}

/// How an upstream spreads requests over its servers.
#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// In turn, each server as often as its weight (smooth weighted round
    /// robin, as nginx's).
    #[default]
    RoundRobin,
    /// The fewer requests in flight per weight of two servers drawn at
    /// random (power of two choices).
    LeastRequests,
    /// By a hash of the request's host, path and query (the cache key's
    /// primary part), weighted rendezvous hashing: a key stays on its server
    /// when others are added or removed.
    ConsistentHash,
}

/// What an upstream's servers speak.
#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 on pooled keep-alive connections (http:// or https://).
    #[default]
    Http1,
    /// HTTP/2 over TLS, negotiated with ALPN (https:// servers only).
    H2,
    /// HTTP/2 over cleartext TCP with prior knowledge (http:// servers only).
    H2c,
}

impl UpstreamProtocol {
    /// The config spelling, also shown by the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::H2 => "h2",
            Self::H2c => "h2c",
        }
    }

    /// Whether requests go out as HTTP/2 streams.
    pub fn is_http2(self) -> bool {
        matches!(self, Self::H2 | Self::H2c)
    }
}

/// One upstream: where its servers are and how long to wait for them.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub servers: Vec<ServerAddr>,
    /// Each server's weight, in the order of `servers` (1 unless given).
    pub weights: Vec<u32>,
    pub balance: Balance,
    pub protocol: UpstreamProtocol,
    pub connect_timeout: HumanDuration,
    pub timeout: HumanDuration,
    /// Replaces the client's Host header when set.
    pub host: Option<HeaderValue>,
    pub ca_file: Option<PathBuf>,
    pub health_check: Option<HealthCheck>,
    pub ejection: Ejection,
}

/// Passive health: a server whose requests keep failing is taken out of
/// the rotation for a while (Envoy's outlier detection on consecutive
/// gateway failures; nginx's `max_fails`/`fail_timeout`).
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Ejection {
    /// Gateway failures in a row (no connection, a reset, no response head
    /// in time, or a 502, 503 or 504 from the server) that eject it.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// How long an ejected server gets no requests (unless every server is out).
    #[serde(default = "default_ejection_duration")]
    pub duration: HumanDuration,
}

impl Default for Ejection {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            duration: default_ejection_duration(),
        }
    }
}

fn default_consecutive_failures() -> u32 {
    5
}

fn default_ejection_duration() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

/// An active health check: each server probed every `interval`.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub path: http::uri::PathAndQuery,
    pub interval: Duration,
    pub timeout: Duration,
    /// Statuses that pass; empty: any 2xx or 3xx.
    pub expected_statuses: Vec<http::StatusCode>,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

impl HealthCheck {
    pub fn passes(&self, status: http::StatusCode) -> bool {
        if self.expected_statuses.is_empty() {
            status.is_success() || status.is_redirection()
        } else {
            self.expected_statuses.contains(&status)
        }
    }
}

/// An upstream server: `http` or `https`, and host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddr {
    pub scheme: Scheme,
    pub authority: Authority,
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub matcher: RouteMatch,
    pub target: RouteTarget,
    pub cache: RouteCache,
    /// Transformer plugins, run in order.
    pub plugins: Vec<String>,
    pub max_request_body: Option<ByteSize>,
    /// `Upgrade` protocols tunnelled on this route, lowercase (`websocket`).
    pub upgrades: Vec<String>,
    /// Request headers removed before anything else sees the request.
    pub strip_request_headers: Vec<HeaderName>,
    /// A plugin that cannot run (open circuit, no capacity) is skipped
    /// rather than the request refused.
    pub skip_unavailable_plugins: bool,
    /// Response headers changed on the way out, after the plugins.
    pub headers: RouteHeaders,
}

/// A route's static response header rules (`headers:`): what an operator
/// would otherwise need a plugin for, at the cost of a map edit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteHeaders {
    /// Removed first, then `set` applied.
    pub remove: Vec<HeaderName>,
    /// Each replaces every field of its name.
    pub set: Vec<(HeaderName, http::HeaderValue)>,
}

impl RouteHeaders {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty()
    }

    /// Applies the rules to a response's headers.
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// Where a route sends its requests: exactly one of the two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteTarget {
    Upstream(String),
    Source(String),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteCache {
    pub enabled: bool,
    /// Used when the origin's Cache-Control says nothing about it.
    pub stale_while_revalidate: Option<HumanDuration>,
    pub stale_if_error: Option<HumanDuration>,
    pub key: CacheKeyConfig,
    /// PURGE on the proxy listener, from these client addresses only.
    pub purge: Option<PurgeConfig>,
    /// Requests with `Cookie` or `Authorization` go to the origin and are
    /// neither answered from nor stored in the cache.
    pub bypass_with_credentials: bool,
    /// Uses the shared tier (when one is configured).
    pub shared: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CacheKeyConfig {
    /// Query parameters left out of the key.
    pub ignore_query: Vec<String>,
    pub sort_query: bool,
    /// Request headers added to the key.
    pub headers: Vec<HeaderName>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PurgeConfig {
    pub allow: Vec<IpNet>,
}

/// A scheduled source; the first provider set wins, in the order static,
/// http, file, plugin (cachepump's order).
#[derive(Debug, Clone, PartialEq)]
pub struct SourceConfig {
    /// An empty rule in the file is cachepump's hourly default.
    pub rule: Rule,
    pub static_: Option<StaticSource>,
    pub http: Option<HttpSource>,
    pub file: Option<FileSource>,
    pub plugin: Option<PluginSource>,
    /// A mirror of an etcd prefix, kept current by watching (no schedule).
    pub etcd: Option<EtcdSource>,
    /// A mirror of a Redis string or hash, kept current by pub/sub and
    /// periodic re-reads; its `url` is resolved (from `shared.url` when unset).
    pub redis: Option<RedisSource>,
    /// Served as Content-Type; sniffed when absent.
    pub content_type: Option<HeaderValue>,
    pub timeout: HumanDuration,
    /// Statuses that replace the value; `None` means 2xx.
    pub accept_status: Option<Vec<StatusCode>>,
    pub run_on_start: bool,
    /// Fetched once per tick across the instances of `shared.namespace`
    /// (when `shared:` is set); false: every instance fetches it.
    pub shared: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpSource {
    /// `None`: the file left it empty (cachepump: the provider is unset).
    pub endpoint: Option<Endpoint>,
    pub method: Method,
    /// Sent as they are (cachepump: they replace the default headers).
    pub header: HeaderMap,
    pub auth: Option<BasicAuth>,
    pub body: String,
    /// Largest response body accepted.
    pub max_body: u64,
    /// Dropped (with Authorization, Cookie and Proxy-Authorization) when a
    /// redirect leaves the endpoint's origin.
    pub secret_headers: Vec<HeaderName>,
}

/// An absolute http(s) URL, with the text it was written as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub uri: Uri,
    text: String,
}

impl Endpoint {
    pub fn new(uri: Uri, text: &str) -> Self {
        Self {
            uri,
            text: text.to_string(),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `trace`, `debug`, `info`, `warn`, `error`, any case; or an EnvFilter
    /// directive. Loading turns it into the directive (`INFO` -> `info`).
    #[serde(default = "default_log_level")]
    pub level: String,
    #[serde(default)]
    pub format: LogFormat,
    /// One line per request at INFO on target `larder::access`.
    #[serde(default = "default_true")]
    pub access_log: bool,
    /// How each request's line is written: as a log event (`log`), or on
    /// standard output in the Common or Combined Log Format or as JSON.
    #[serde(default)]
    pub access_log_format: AccessLogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_log_level(),
            format: LogFormat::Text,
            access_log: true,
            access_log_format: AccessLogFormat::default(),
        }
    }
}

fn default_log_level() -> String {
    "info".to_string()
}

/// The access log's line format.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    /// An INFO event on target `larder::access` in the process log (text
    /// or JSON as `log.format` says), on standard error with the rest.
    #[default]
    Log,
    /// NCSA Common Log Format on standard output, as nginx's and Apache's.
    Common,
    /// Common plus the referer and the user agent (nginx's `combined`).
    Combined,
    /// One JSON object per request on standard output.
    Json,
}

#[derive(Debug, Clone, Copy, Deserialize, JsonSchema, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Listener-wide limits and timeouts.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Request bodies larger than this get 413. `None`: no limit (bodies stream).
    pub max_request_body: Option<ByteSize>,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    pub drain_timeout: HumanDuration,
    /// A connection must send a complete request head within this, from its
    /// first byte (and, for HTTP/1.1, from the end of the previous response).
    pub header_timeout: HumanDuration,
    /// An HTTP/2 connection with no request in progress for this long is closed.
    pub idle_timeout: HumanDuration,
    /// A client that takes no response bytes for this long is cut off.
    pub send_timeout: HumanDuration,
    /// Open client connections on the proxy listener; `None`: sized from the
    /// process's file-descriptor limit at start.
    pub max_connections: Option<usize>,
    /// Threads serving the proxy listener's connections, each connection on
    /// one of them; `None`: one per CPU the process may use.
    pub threads: Option<usize>,
    /// Clients whose `Forwarded` and `X-Forwarded-*` headers are kept and
    /// appended to; from anyone else they are replaced.
    pub trusted_proxies: Vec<IpNet>,
    /// Upgraded (WebSocket) tunnels open at once; more get 503.
    pub max_tunnels: usize,
    /// A tunnel with no byte in either direction for this long is closed.
    pub tunnel_idle_timeout: HumanDuration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_request_body: None,
            drain_timeout: HumanDuration(Duration::from_secs(30)),
            header_timeout: HumanDuration(Duration::from_secs(10)),
            idle_timeout: HumanDuration(Duration::from_secs(60)),
            send_timeout: HumanDuration(Duration::from_secs(60)),
            max_connections: None,
            threads: None,
            trusted_proxies: Vec::new(),
            max_tunnels: 1024,
            tunnel_idle_timeout: HumanDuration(Duration::from_secs(300)),
        }
    }
}

#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// The admin API's address; keep it on loopback or a private network.
    #[serde(
        default = "default_admin_listen",
        deserialize_with = "deserialize_listen"
    )]
    #[schemars(schema_with = "super::value_schema::listen_address")]
    pub listen: SocketAddr,
    /// Bearer token required for anything that changes state (and for reads
    /// other than /health and /ready). Without one, only /health and /ready answer.
    #[serde(default)]
    pub token: Option<String>,
    /// Answer cachepump's `GET /?key=NAME` without the token.
    #[serde(default = "default_true")]
    pub public_key_api: bool,
    /// Host names (besides the listen address, `localhost` and the loopback
    /// addresses) that requests to the admin API may name in `Host`.
    #[serde(default)]
    pub hosts: Vec<String>,
}

pub fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Exact host (port ignored, case-insensitive); `*.example.com` matches subdomains.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The component's `.wasm` file, relative to the working directory.
    pub path: PathBuf,
    /// String map handed to the plugin's `init`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: PluginLimits,
    #[serde(default)]
    pub on_error: OnError,
    /// Origins a plugin's `http-client` may reach, e.g. `https://api.example.com`.
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    /// Run a transformer's `on-response` in the downstream phase (every
    /// response, hits too) or in the cache-store phase (once per fill).
    #[serde(default)]
    pub phase: PluginPhase,
    /// Reuse one instance across calls: faster, but state may leak between requests.
    #[serde(default)]
    pub reuse: bool,
}

#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginLimits {
    #[serde(default = "default_plugin_memory")]
    pub memory: ByteSize,
    /// CPU time one call may use (checked every 1 ms tick). A call also
    /// ends at twice this plus one second of wall time, whatever it waits on.
    #[serde(default = "default_plugin_timeout")]
    pub timeout: HumanDuration,
    /// Calls of this plugin running at once; more wait for a turn. Default:
    /// four per CPU core.
    #[serde(default = "default_plugin_concurrency")]
    // The default depends on the machine; a schema printing this machine's
    // number would differ from one machine to the next.
    #[schemars(transform = super::value_schema::without_default)]
    pub concurrency: u32,
    /// Longest a call waits for a turn (or for an instance slot) before it
    /// fails for want of capacity.
    #[serde(default = "default_plugin_queue_timeout")]
    pub queue_timeout: HumanDuration,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            memory: default_plugin_memory(),
            timeout: default_plugin_timeout(),
            concurrency: default_plugin_concurrency(),
            queue_timeout: default_plugin_queue_timeout(),
        }
    }
}

/// Four calls per CPU core: a transformer has no I/O to wait on, so more
/// at once only share the same cores, and a plugin that loops or allocates
/// does so that many times at most before its breaker opens.
fn default_plugin_concurrency() -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    u32::try_from(cores.saturating_mul(4)).unwrap_or(u32::MAX)
}
fn default_plugin_queue_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}

/// Limits every plugin instance of the process shares (`plugin_limits:`).
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginTotals {
    /// Linear memory all instances may hold together; past it, new
    /// instances and growth are refused (a capacity failure, 503).
    #[serde(default = "default_plugin_total_memory")]
    pub total_memory: ByteSize,
}

impl Default for PluginTotals {
    fn default() -> Self {
        Self {
            total_memory: default_plugin_total_memory(),
        }
    }
}

fn default_plugin_total_memory() -> ByteSize {
    ByteSize(2 * 1024 * 1024 * 1024)
}

fn default_plugin_memory() -> ByteSize {
    ByteSize(32 * 1024 * 1024)
}
fn default_plugin_timeout() -> HumanDuration {
    HumanDuration(Duration::from_millis(50))
}

#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Skip this plugin when it fails (and log it).
    Open,
    /// Fail the request: 502, or 503 when the plugin could not run at all.
    #[default]
    Closed,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PluginPhase {
    #[default]
    Downstream,
    CacheStore,
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticSource {
    #[serde(default)]
    pub value: String,
}

#[derive(Clone, Default, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub password: String,
}

/// Masks the password as cachepump does, so no `{:?}` of a config leaks it.
impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicAuth")
            .field("user", &self.user)
            .field("password", &"*****")
            .finish()
    }
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileSource {
    #[serde(default)]
    pub path: PathBuf,
    /// Also read the file whenever it changes (inotify, debounced; safe for
    /// editors' and Kubernetes' atomic renames), besides the rule's ticks.
    #[serde(default)]
    pub watch: bool,
}

/// `sources.NAME.etcd`: a full copy of the keys below `prefix`, loaded at
/// one revision and kept current by a watch.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EtcdSource {
    /// `host:port` or `http://host:port`; tried in turn.
    pub endpoints: Vec<String>,
    /// Keys below it become the value's members, with the prefix removed.
    /// Empty: every key.
    #[serde(default)]
    pub prefix: String,
    /// How each stored value appears in the JSON object.
    #[serde(default)]
    pub decode: MemberDecode,
    /// etcd's user and password authentication.
    #[serde(default)]
    pub auth: Option<BasicAuth>,
    /// Keys per request of the initial load (it reads one revision, in pages).
    #[serde(default = "default_etcd_page_size")]
    pub page_size: u32,
    /// How long connecting to an endpoint may take.
    #[serde(default = "default_etcd_connect_timeout")]
    pub connect_timeout: HumanDuration,
}

/// `sources.NAME.redis`: a copy of one Redis key (a string, or a hash whose
/// fields become members), read again when a message says it changed and
/// every `reread` besides (pub/sub loses what is sent while disconnected).
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisSource {
    pub key: String,
    /// `redis://host:port/db` or `redis+unix:///path`; default `shared.url`.
    #[serde(default)]
    pub url: Option<String>,
    /// A channel the writer publishes on after each change.
    #[serde(default)]
    pub channel: Option<String>,
    /// Also listen to the key's keyspace notifications (the server needs
    /// `notify-keyspace-events` with `K` and the matching types).
    #[serde(default)]
    pub keyspace_events: bool,
    /// How often the key is read again whatever the messages say.
    #[serde(default = "default_redis_reread")]
    pub reread: HumanDuration,
    /// How a hash's fields appear in the JSON object.
    #[serde(default)]
    pub decode: MemberDecode,
}

fn default_redis_reread() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

/// How a mirrored value (an etcd key's, a Redis hash field's) appears in
/// the mirror's JSON object.
#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MemberDecode {
    /// As a JSON string (bytes that are not UTF-8 are replaced).
    #[default]
    String,
    /// Parsed as JSON; a value that is not JSON appears as a string.
    Json,
}

fn default_etcd_page_size() -> u32 {
    1000
}

fn default_etcd_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginSource {
    /// A fetcher plugin from `plugins:`.
    pub name: String,
    /// Extra entries merged over the plugin's own `config` for this source.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

pub fn default_true() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::BasicAuth;

    #[test]
    fn debug_output_masks_the_password() {
        let auth = BasicAuth {
            user: "admin".into(),
            password: "s3cret".into(),
        };
        let printed = format!("{auth:?}");
        assert!(printed.contains("admin"));
        assert!(!printed.contains("s3cret"), "{printed}");
    }
}
