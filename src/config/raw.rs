//! The configuration as it is written: one type per thing an operator can
//! name, read by serde with `deny_unknown_fields` (so typos are errors) and
//! defaults. Text that needs parsing (header names, CIDRs, URLs, rules)
//! stays text here; `validate` checks it and turns the whole into the typed
//! [`super::model::Config`] the runtime reads. Sections with nothing to parse
//! are the typed model's own types, shared.
//!
//! These types are the user-facing contract of `../shared/notes/config.md`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::Deserialize;

use super::model::{
    AdminConfig, Balance, Ejection, LogConfig, PluginConfig, PluginTotals, RouteMatch,
    UpstreamProtocol,
};
use super::model::{
    BasicAuth, EtcdSource, FileSource, PluginSource, RedisSource, StaticSource, default_true,
};
use super::units::{ByteSize, HumanDuration, deserialize_listen};

/// The whole file.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// cachepump files carry `version: '1.0'`; anything else is rejected.
    #[serde(default)]
    pub version: Option<String>,
    /// The proxy listener (`-e` overrides). cachepump's default is `:8080`.
    #[serde(default = "default_listen", deserialize_with = "deserialize_listen")]
    #[schemars(schema_with = "super::value_schema::listen_address")]
    pub listen: SocketAddr,
    /// An HTTPS listener beside `listen`. Absent: plain HTTP only.
    #[serde(default)]
    pub tls: Option<RawTls>,
    /// Log level, format and the access log.
    #[serde(default)]
    pub log: LogConfig,
    /// Listener-wide limits and timeouts.
    #[serde(default)]
    pub server: RawServer,
    /// The operator API. Absent means not started.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// The in-memory cache: its size and what it stores.
    #[serde(default)]
    pub cache: RawCacheConfig,
    /// Origins by name, for routes to send requests to.
    #[serde(default)]
    pub upstreams: BTreeMap<String, RawUpstream>,
    /// First match wins. Absent (not merely empty) means cachepump mode.
    #[serde(default)]
    pub routes: Option<Vec<RawRoute>>,
    /// WebAssembly plugins by name, for routes and sources to use.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginConfig>,
    /// Limits shared by every plugin instance of the process.
    #[serde(default)]
    pub plugin_limits: PluginTotals,
    /// Scheduled sources by name: values fetched on a rule and served by
    /// routes or the admin API.
    #[serde(default)]
    pub sources: BTreeMap<String, RawSource>,
    /// The shared tier on Redis. Absent: this instance keeps its cache to itself.
    #[serde(default)]
    pub shared: Option<RawShared>,
}

/// `tls:`: the HTTPS listener and its certificates.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// The HTTPS listener's address.
    #[serde(deserialize_with = "deserialize_listen")]
    #[schemars(schema_with = "super::value_schema::listen_address")]
    pub listen: SocketAddr,
    /// Chosen by the name the client asks for (SNI); the first is the
    /// default for clients that name none or an unknown one.
    pub certificates: Vec<RawCertificate>,
    /// The plain listener answers every request (but `/health`) with a
    /// redirect to the same URL on the HTTPS listener.
    #[serde(default)]
    pub redirect_http: bool,
}

/// A certificate chain and its private key, both PEM files.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    /// The chain, the server's own certificate first.
    pub cert: PathBuf,
    /// PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key: PathBuf,
}

/// `shared:`: the Redis every instance of a namespace shares.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawShared {
    /// `redis://host:port/db` or `redis+unix:///path/to/redis.sock`.
    pub url: String,
    /// Instances with the same namespace share state; required.
    pub namespace: String,
    /// Longest a lookup waits for Redis before the request goes on without it.
    #[serde(default = "default_shared_read_timeout")]
    pub read_timeout: HumanDuration,
    /// Longest a write or a purge's generation bump waits.
    #[serde(default = "default_shared_write_timeout")]
    pub write_timeout: HumanDuration,
    /// Longest a connection attempt waits.
    #[serde(default = "default_shared_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Larger responses stay in the local cache only.
    #[serde(default = "default_shared_max_object_size")]
    pub max_object_size: ByteSize,
    /// Writes waiting to go to Redis; more are dropped (and counted).
    #[serde(default = "default_shared_write_queue")]
    pub write_queue: usize,
}

fn default_shared_read_timeout() -> HumanDuration {
    HumanDuration(Duration::from_millis(50))
}
fn default_shared_write_timeout() -> HumanDuration {
    HumanDuration(Duration::from_millis(500))
}
fn default_shared_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_millis(500))
}
fn default_shared_max_object_size() -> ByteSize {
    ByteSize(1024 * 1024)
}
fn default_shared_write_queue() -> usize {
    1024
}

pub fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}

#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Request bodies larger than this get 413. Absent means no limit (bodies stream).
    #[serde(default)]
    pub max_request_body: Option<ByteSize>,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: HumanDuration,
    /// A complete request head must arrive within this, from the first byte
    /// (HTTP/1.1: also from the end of the previous response).
    #[serde(default = "default_header_timeout")]
    pub header_timeout: HumanDuration,
    /// HTTP/2 connections with no request in progress close after this.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// A client that accepts no response bytes for this long is cut off
    /// (nginx's `send_timeout`).
    #[serde(default = "default_send_timeout")]
    pub send_timeout: HumanDuration,
    /// Open client connections; absent: sized from the file-descriptor limit.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Threads serving the proxy listener's connections; absent: one per CPU.
    #[serde(default)]
    pub threads: Option<usize>,
    /// Addresses or CIDR blocks whose `Forwarded`/`X-Forwarded-*` are trusted.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// WebSocket tunnels open at once.
    #[serde(default = "default_max_tunnels")]
    pub max_tunnels: usize,
    /// A tunnel idle in both directions for this long is closed.
    #[serde(default = "default_tunnel_idle_timeout")]
    pub tunnel_idle_timeout: HumanDuration,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            max_request_body: None,
            drain_timeout: default_drain_timeout(),
            header_timeout: default_header_timeout(),
            idle_timeout: default_idle_timeout(),
            send_timeout: default_send_timeout(),
            max_connections: None,
            threads: None,
            trusted_proxies: Vec::new(),
            max_tunnels: default_max_tunnels(),
            tunnel_idle_timeout: default_tunnel_idle_timeout(),
        }
    }
}

fn default_drain_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

fn default_header_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_send_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_max_tunnels() -> usize {
    1024
}
fn default_tunnel_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}

#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawCacheConfig {
    /// Bytes of cached bodies + headers held in memory.
    #[serde(default = "default_cache_max_size")]
    pub max_size: ByteSize,
    /// Larger responses stream through uncached.
    #[serde(default = "default_max_object_size")]
    pub max_object_size: ByteSize,
    /// Response headers whose space-separated values tag an entry for purge.
    #[serde(default = "default_tag_headers")]
    pub tag_headers: Vec<String>,
    /// Longest a fill may take, head and body; also how long a coalesced
    /// request waits for the fill's head.
    #[serde(default = "default_fill_timeout")]
    pub fill_timeout: HumanDuration,
    /// A fill (or a body collected for a cache-store plugin) gives up when
    /// the upstream sends nothing for this long.
    #[serde(default = "default_fill_idle_timeout")]
    pub fill_idle_timeout: HumanDuration,
    /// Bytes all fills in progress may buffer for the store together.
    #[serde(default = "default_fill_memory")]
    pub fill_memory: ByteSize,
    /// Targeted cache-control fields (RFC 9213) Larder obeys instead of
    /// Cache-Control, first present and valid one wins.
    #[serde(default = "default_targeted_fields")]
    pub targeted_fields: Vec<String>,
    /// Remove the targeted fields from responses Larder sends.
    #[serde(default)]
    pub remove_targeted_fields: bool,
}

impl Default for RawCacheConfig {
    fn default() -> Self {
        Self {
            max_size: default_cache_max_size(),
            max_object_size: default_max_object_size(),
            tag_headers: default_tag_headers(),
            fill_timeout: default_fill_timeout(),
            fill_idle_timeout: default_fill_idle_timeout(),
            fill_memory: default_fill_memory(),
            targeted_fields: default_targeted_fields(),
            remove_targeted_fields: false,
        }
    }
}

fn default_targeted_fields() -> Vec<String> {
    vec![
        "Larder-Cache-Control".to_string(),
        "CDN-Cache-Control".to_string(),
    ]
}

fn default_fill_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_fill_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_fill_memory() -> ByteSize {
    ByteSize(64 * 1024 * 1024)
}

fn default_cache_max_size() -> ByteSize {
    ByteSize(256 * 1024 * 1024)
}
fn default_max_object_size() -> ByteSize {
    ByteSize(8 * 1024 * 1024)
}
fn default_tag_headers() -> Vec<String> {
    vec!["surrogate-key".to_string(), "cache-tag".to_string()]
}

#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// `http://host:port` or `https://host:port`, or `{ url, weight }`;
    /// several are balanced by `balance`.
    pub servers: Vec<RawUpstreamServer>,
    /// How requests are spread over the servers.
    #[serde(default)]
    pub balance: Balance,
    /// `http1` (default), `h2` (HTTP/2 over TLS with ALPN) or `h2c`.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Until the response head arrives.
    #[serde(default = "default_upstream_timeout")]
    pub timeout: HumanDuration,
    /// Replaces the client's Host header when set; otherwise Host passes through.
    #[serde(default)]
    pub host: Option<String>,
    /// Extra PEM CA bundle trusted for this upstream's https servers.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// An HTTP probe of each server, off the request path.
    #[serde(default)]
    pub health_check: Option<RawHealthCheck>,
    /// Passive health: servers out of rotation after failures in a row.
    #[serde(default)]
    pub ejection: Ejection,
}

/// One `servers:` entry: a URL, or a URL with a weight.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(untagged)]
pub enum RawUpstreamServer {
    Url(String),
    Weighted(RawWeightedUpstreamServer),
}

#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawWeightedUpstreamServer {
    pub url: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

impl RawUpstreamServer {
    pub fn url(&self) -> &str {
        match self {
            Self::Url(url) | Self::Weighted(RawWeightedUpstreamServer { url, .. }) => url,
        }
    }

    pub fn weight(&self) -> u32 {
        match self {
            Self::Url(_) => 1,
            Self::Weighted(server) => server.weight,
        }
    }
}

#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    /// The probe's path (GET), e.g. `/healthz`.
    pub path: String,
    #[serde(default = "default_health_interval")]
    pub interval: HumanDuration,
    #[serde(default = "default_health_timeout")]
    pub timeout: HumanDuration,
    /// Statuses that pass; absent: any 2xx or 3xx.
    #[serde(default)]
    pub expected_statuses: Vec<u16>,
    /// Consecutive passes that make an unhealthy server healthy again.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failures that make a server unhealthy.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
}

fn default_health_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_health_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}
fn default_healthy_threshold() -> u32 {
    2
}
fn default_unhealthy_threshold() -> u32 {
    3
}

fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}
fn default_upstream_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    #[serde(default, rename = "match")]
    pub matcher: RouteMatch,
    /// Exactly one of `upstream` and `source`.
    #[serde(default)]
    pub upstream: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub cache: RawRouteCache,
    /// Transformer plugins, run in order.
    #[serde(default)]
    pub plugins: Vec<String>,
    /// Overrides `server.max_request_body` for this route.
    #[serde(default)]
    pub max_request_body: Option<ByteSize>,
    /// `Upgrade` protocols tunnelled to the upstream; others are refused
    /// (`h2c`) or ignored. Default `[websocket]`, or `[]` when the route's
    /// upstream speaks HTTP/2 (a tunnel needs HTTP/1.1).
    #[serde(default)]
    pub upgrades: Option<Vec<String>>,
    /// Request headers removed on the way in: ones origins may trust that
    /// the cache key does not include.
    #[serde(default = "default_strip_request_headers")]
    pub strip_request_headers: Vec<String>,
    /// When a plugin of this route cannot run (its circuit is open, or no
    /// capacity is left), skip it instead of refusing the request with 503.
    #[serde(default)]
    pub skip_unavailable_plugins: bool,
    /// Response headers set and removed on the way out (hits included).
    #[serde(default)]
    pub headers: RawRouteHeaders,
}

/// `headers: { set: { name: value }, remove: [name] }` of a route.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawRouteHeaders {
    /// Each replaces every field of its name.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

pub fn default_upgrades() -> Vec<String> {
    vec!["websocket".to_string()]
}

fn default_strip_request_headers() -> Vec<String> {
    [
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-host",
        "x-original-host",
    ]
    .map(str::to_string)
    .to_vec()
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawRouteCache {
    #[serde(default)]
    pub enabled: bool,
    /// Used when the origin's Cache-Control says nothing about it.
    #[serde(default)]
    pub stale_while_revalidate: Option<HumanDuration>,
    #[serde(default)]
    pub stale_if_error: Option<HumanDuration>,
    #[serde(default)]
    pub key: RawCacheKey,
    /// PURGE on the proxy listener, from these client addresses only.
    #[serde(default)]
    pub purge: Option<RawPurge>,
    /// Requests with `Cookie` or `Authorization` skip the cache (Varnish's habit).
    #[serde(default)]
    pub bypass_with_credentials: bool,
    /// Whether this route uses the shared tier when `shared:` is set.
    #[serde(default = "default_true")]
    pub shared: bool,
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawCacheKey {
    /// Query parameters left out of the key (utm_source, ...).
    #[serde(default)]
    pub ignore_query: Vec<String>,
    /// Sort query parameters so `?a=1&b=2` and `?b=2&a=1` share an entry.
    #[serde(default)]
    pub sort_query: bool,
    /// Request headers added to the key.
    #[serde(default)]
    pub headers: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawPurge {
    /// Client addresses or CIDR blocks allowed to send PURGE, e.g. `127.0.0.1/32`.
    pub allow: Vec<String>,
}

/// A scheduled source, cachepump-compatible. The first provider set wins, in
/// the order static, http, file, plugin (cachepump's order).
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    /// Cron with seconds, `@every 30s`, `@hourly`, ... Empty means `0 0 * * * *` (cachepump).
    #[serde(default)]
    pub rule: String,
    #[serde(default, rename = "static")]
    pub static_: Option<StaticSource>,
    #[serde(default)]
    pub http: Option<RawHttpSource>,
    #[serde(default)]
    pub file: Option<FileSource>,
    #[serde(default)]
    pub plugin: Option<PluginSource>,
    /// A mirror of an etcd prefix (Larder's own kind, not cachepump's).
    #[serde(default)]
    pub etcd: Option<EtcdSource>,
    /// A mirror of a Redis string or hash (Larder's own kind).
    #[serde(default)]
    pub redis: Option<RedisSource>,
    /// Served as Content-Type; sniffed when absent.
    #[serde(default)]
    pub content_type: Option<String>,
    #[serde(default = "default_source_timeout")]
    pub timeout: HumanDuration,
    /// Statuses that replace the value; others keep the old one. Default 2xx.
    #[serde(default)]
    pub accept_status: Option<Vec<u16>>,
    #[serde(default = "default_true")]
    pub run_on_start: bool,
    /// With `shared:` set: one instance of the namespace fetches each tick
    /// and the others install its value. False: every instance fetches.
    #[serde(default = "default_true")]
    pub shared: bool,
}

fn default_source_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawHttpSource {
    #[serde(default)]
    pub endpoint: String,
    /// Empty means GET.
    #[serde(default)]
    pub method: String,
    #[serde(default)]
    pub header: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub auth: Option<BasicAuth>,
    #[serde(default)]
    pub body: String,
    /// Largest response body accepted; default `cache.max_object_size` + 4MiB.
    #[serde(default)]
    pub max_body: Option<ByteSize>,
    /// Headers (besides Authorization, Cookie and Proxy-Authorization) that
    /// carry secrets: dropped when a redirect leaves the endpoint's origin.
    #[serde(default)]
    pub secret_headers: Vec<String>,
}
