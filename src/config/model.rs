//! The configuration as plain data: one type per thing an operator can name.
//!
//! These types are the user-facing contract of `../shared/notes/config.md`.
//! They are deserialized with `deny_unknown_fields` (so typos are errors) and
//! carry no behaviour beyond defaults; the runtime builds its state from them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::units::{ByteSize, HumanDuration, deserialize_listen};

/// The whole file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// cachepump files carry `version: '1.0'`; anything else is rejected.
    #[serde(default)]
    pub version: Option<String>,
    /// The proxy listener (`-e` overrides). cachepump's default is `:8080`.
    #[serde(default = "default_listen", deserialize_with = "deserialize_listen")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub log: LogConfig,
    /// Listener-wide limits and timeouts.
    #[serde(default)]
    pub server: ServerConfig,
    /// The operator API. Absent means not started.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub upstreams: BTreeMap<String, Upstream>,
    /// First match wins. Absent (not merely empty) means cachepump mode.
    #[serde(default)]
    pub routes: Option<Vec<Route>>,
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginConfig>,
    #[serde(default)]
    pub sources: BTreeMap<String, SourceConfig>,
}

pub fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
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
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_log_level(),
            format: LogFormat::Text,
            access_log: true,
        }
    }
}

fn default_log_level() -> String {
    "info".to_string()
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Request bodies larger than this get 413. Absent means no limit (bodies stream).
    #[serde(default)]
    pub max_request_body: Option<ByteSize>,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: HumanDuration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_request_body: None,
            drain_timeout: default_drain_timeout(),
        }
    }
}

fn default_drain_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(
        default = "default_admin_listen",
        deserialize_with = "deserialize_listen"
    )]
    pub listen: SocketAddr,
    /// Bearer token required for anything that changes state (and for reads
    /// other than /health and /ready). Without one, only /health and /ready answer.
    #[serde(default)]
    pub token: Option<String>,
}

pub fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Bytes of cached bodies + headers held in memory.
    #[serde(default = "default_cache_max_size")]
    pub max_size: ByteSize,
    /// Larger responses stream through uncached.
    #[serde(default = "default_max_object_size")]
    pub max_object_size: ByteSize,
    /// Response headers whose space-separated values tag an entry for purge.
    #[serde(default = "default_tag_headers")]
    pub tag_headers: Vec<String>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_size: default_cache_max_size(),
            max_object_size: default_max_object_size(),
            tag_headers: default_tag_headers(),
        }
    }
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

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// `http://host:port` or `https://host:port`; several are used in round robin.
    pub servers: Vec<String>,
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
}

fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}
fn default_upstream_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(default, rename = "match")]
    pub matcher: RouteMatch,
    /// Exactly one of `upstream` and `source`.
    #[serde(default)]
    pub upstream: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub cache: RouteCache,
    /// Transformer plugins, run in order.
    #[serde(default)]
    pub plugins: Vec<String>,
    /// Overrides `server.max_request_body` for this route.
    #[serde(default)]
    pub max_request_body: Option<ByteSize>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Exact host (port ignored, case-insensitive); `*.example.com` matches subdomains.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteCache {
    #[serde(default)]
    pub enabled: bool,
    /// Used when the origin's Cache-Control says nothing about it.
    #[serde(default)]
    pub stale_while_revalidate: Option<HumanDuration>,
    #[serde(default)]
    pub stale_if_error: Option<HumanDuration>,
    #[serde(default)]
    pub key: CacheKeyConfig,
    /// PURGE on the proxy listener, from these client addresses only.
    #[serde(default)]
    pub purge: Option<PurgeConfig>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheKeyConfig {
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

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PurgeConfig {
    /// Client addresses or CIDR blocks allowed to send PURGE, e.g. `127.0.0.1/32`.
    pub allow: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
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

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginLimits {
    #[serde(default = "default_plugin_memory")]
    pub memory: ByteSize,
    /// Wall-clock CPU budget per call, enforced by epoch deadline.
    #[serde(default = "default_plugin_timeout")]
    pub timeout: HumanDuration,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            memory: default_plugin_memory(),
            timeout: default_plugin_timeout(),
        }
    }
}

fn default_plugin_memory() -> ByteSize {
    ByteSize(32 * 1024 * 1024)
}
fn default_plugin_timeout() -> HumanDuration {
    HumanDuration(Duration::from_millis(50))
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Skip the plugin and log.
    #[default]
    Open,
    /// Fail the request with 502.
    Closed,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PluginPhase {
    #[default]
    Downstream,
    CacheStore,
}

/// A scheduled source, cachepump-compatible. The first provider set wins, in
/// the order static, http, file, plugin (cachepump's order).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Cron with seconds, `@every 30s`, `@hourly`, ... Empty means `0 0 * * * *` (cachepump).
    #[serde(default)]
    pub rule: String,
    #[serde(default, rename = "static")]
    pub static_: Option<StaticSource>,
    #[serde(default)]
    pub http: Option<HttpSource>,
    #[serde(default)]
    pub file: Option<FileSource>,
    #[serde(default)]
    pub plugin: Option<PluginSource>,
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
}

fn default_source_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticSource {
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpSource {
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
}

#[derive(Clone, Default, Deserialize, PartialEq)]
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

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileSource {
    #[serde(default)]
    pub path: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginSource {
    /// A fetcher plugin from `plugins:`.
    pub name: String,
    /// Extra entries merged over the plugin's own `config` for this source.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
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
