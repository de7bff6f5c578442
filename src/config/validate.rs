//! Turns the raw model into the typed [`Config`]: every value serde cannot
//! judge alone is checked and parsed here, once (header names, CIDR blocks,
//! server addresses, URLs, methods, cron rules), with the cross-references
//! and the files that must exist. Every check runs and every problem is
//! collected (like Vector's `validate`), each placed at its key path's line
//! and column; the typed config exists only when there is none.
//!
//! Must not start anything or touch the network; reads the filesystem only to
//! see that named files exist.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Method, StatusCode};
use ipnet::IpNet;

use super::ConfigError;
use super::model::{
    CacheConfig, CacheKeyConfig, Config, Endpoint, EtcdSource, HealthCheck, HttpSource,
    PluginConfig, PurgeConfig, RedisSource, Route, RouteCache, RouteHeaders, RouteTarget,
    ServerAddr, ServerConfig, SharedConfig, SourceConfig, Upstream, UpstreamProtocol,
};
use super::model::{CertificateFiles, TlsConfig};
use super::positions::PositionIndex;
use super::raw::{
    RawCacheConfig, RawConfig, RawHealthCheck, RawHttpSource, RawRoute, RawRouteCache,
    RawRouteHeaders, RawServer, RawShared, RawSource, RawTls, RawUpstream,
};
use crate::schedule::Rule;

/// The most `server.threads` may ask for.
const MAX_THREADS: usize = 1024;

/// The largest weight a server may have (a round of smooth weighted round
/// robin is as long as the weights' sum).
const MAX_WEIGHT: u32 = 100;

/// Checks `raw` and builds the typed config; or every problem, in file order.
pub fn validate(
    raw: RawConfig,
    index: &PositionIndex,
    file: &str,
) -> Result<Config, Vec<ConfigError>> {
    let mut checker = Checker {
        index,
        file,
        errors: Vec::new(),
    };
    checker.check_document(&raw);
    let server = checker.server(&raw.server);
    let cache = checker.cache(&raw.cache);
    let upstreams: BTreeMap<String, Upstream> = raw
        .upstreams
        .iter()
        .map(|(name, upstream)| {
            let typed = checker.upstream(&format!("upstreams.{name}"), upstream);
            (name.clone(), typed)
        })
        .collect();
    let routes: Option<Vec<Route>> = raw.routes.as_ref().map(|routes| {
        routes
            .iter()
            .enumerate()
            .filter_map(|(i, route)| checker.route(&format!("routes[{i}]"), route, &raw))
            .collect()
    });
    for (name, plugin) in &raw.plugins {
        checker.check_plugin(&format!("plugins.{name}"), plugin);
    }
    let sources: BTreeMap<String, SourceConfig> = raw
        .sources
        .iter()
        .filter_map(|(name, source)| {
            let typed = checker.source(
                &format!("sources.{name}"),
                source,
                &raw.plugins,
                raw.cache.max_object_size.0,
                raw.shared.as_ref().map(|shared| shared.url.as_str()),
            )?;
            Some((name.clone(), typed))
        })
        .collect();
    let shared = raw
        .shared
        .as_ref()
        .and_then(|shared| checker.shared(shared));
    let tls = raw.tls.as_ref().and_then(|tls| checker.tls(tls, &raw));
    let mut errors = checker.errors;
    if !errors.is_empty() {
        errors.sort_by_key(|e| (e.line.unwrap_or(usize::MAX), e.column.unwrap_or(0)));
        return Err(errors);
    }
    Ok(Config {
        listen: raw.listen,
        tls,
        log: raw.log,
        server,
        admin: raw.admin,
        cache,
        upstreams,
        routes,
        plugins: raw.plugins,
        plugin_limits: raw.plugin_limits,
        sources,
        shared,
    })
}

struct Checker<'a> {
    index: &'a PositionIndex,
    file: &'a str,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    fn fail(&mut self, path: &str, message: impl Into<String>) {
        let at = self.index.locate(path);
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line: at.map(|p| p.line),
            column: at.map(|p| p.column),
            path: path.to_string(),
            message: message.into(),
        });
    }

    fn check_document(&mut self, config: &RawConfig) {
        if let Some(version) = &config.version
            && version.trim() != "1.0"
        {
            self.fail(
                "version",
                format!("unsupported version {version:?}: Larder reads version \"1.0\" (or leave the key out)"),
            );
        }
        if let Err(why) = log_directive(&config.log.level) {
            self.fail("log.level", why);
        }
        if let Some(admin) = &config.admin {
            let is_empty = match &admin.token {
                Some(token) => token.trim().is_empty(),
                None => self.index.contains("admin.token"),
            };
            if is_empty {
                self.fail(
                    "admin.token",
                    "the token is empty (if it comes from ${VAR}, the variable is set but empty); set one or remove the key",
                );
            }
            for (i, host) in admin.hosts.iter().enumerate() {
                let name = host.trim();
                let is_name = !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
                if !is_name {
                    self.fail(
                        &format!("admin.hosts[{i}]"),
                        format!("{host:?} is not a host name: give the name alone, without a port or scheme (e.g. admin.internal)"),
                    );
                }
            }
            if admin.listen == config.listen && admin.listen.port() != 0 {
                self.fail(
                    "admin.listen",
                    format!(
                        "{} is also the proxy's `listen` address; the admin API needs its own",
                        admin.listen
                    ),
                );
            }
        }
    }

    fn server(&mut self, server: &RawServer) -> ServerConfig {
        for (key, duration) in [
            ("header_timeout", server.header_timeout),
            ("idle_timeout", server.idle_timeout),
            ("send_timeout", server.send_timeout),
            ("tunnel_idle_timeout", server.tunnel_idle_timeout),
        ] {
            if duration.get().is_zero() {
                self.fail(&format!("server.{key}"), "must be more than 0");
            }
        }
        if server.max_connections == Some(0) {
            self.fail("server.max_connections", "must be more than 0");
        }
        if let Some(threads) = server.threads.filter(|n| !(1..=MAX_THREADS).contains(n)) {
            self.fail(
                "server.threads",
                format!("must be between 1 and {MAX_THREADS}, not {threads}"),
            );
        }
        let trusted_proxies = server
            .trusted_proxies
            .iter()
            .enumerate()
            .filter_map(|(i, entry)| {
                parse_cidr(entry)
                    .map_err(|why| self.fail(&format!("server.trusted_proxies[{i}]"), why))
                    .ok()
            })
            .collect();
        ServerConfig {
            max_request_body: server.max_request_body,
            drain_timeout: server.drain_timeout,
            header_timeout: server.header_timeout,
            idle_timeout: server.idle_timeout,
            send_timeout: server.send_timeout,
            max_connections: server.max_connections,
            threads: server.threads,
            trusted_proxies,
            max_tunnels: server.max_tunnels,
            tunnel_idle_timeout: server.tunnel_idle_timeout,
        }
    }

    fn cache(&mut self, cache: &RawCacheConfig) -> CacheConfig {
        if cache.max_object_size > cache.max_size {
            self.fail(
                "cache.max_object_size",
                format!(
                    "max_object_size ({}) is larger than cache.max_size ({})",
                    cache.max_object_size, cache.max_size
                ),
            );
        }
        if cache.fill_memory < cache.max_object_size {
            self.fail(
                "cache.fill_memory",
                format!(
                    "fill_memory ({}) is smaller than cache.max_object_size ({}): no response that large could ever be stored",
                    cache.fill_memory, cache.max_object_size
                ),
            );
        }
        for (key, value) in [
            ("cache.fill_timeout", cache.fill_timeout),
            ("cache.fill_idle_timeout", cache.fill_idle_timeout),
        ] {
            if value.0.is_zero() {
                self.fail(key, "must be above zero");
            }
        }
        CacheConfig {
            max_size: cache.max_size,
            max_object_size: cache.max_object_size,
            tag_headers: self.header_names("cache.tag_headers", &cache.tag_headers),
            fill_timeout: cache.fill_timeout.0,
            fill_idle_timeout: cache.fill_idle_timeout.0,
            fill_memory: cache.fill_memory.0,
            targeted_fields: self.header_names("cache.targeted_fields", &cache.targeted_fields),
            remove_targeted_fields: cache.remove_targeted_fields,
        }
    }

    /// Every certificate loads and matches its key now, so the listener
    /// starts with what `larder check` passed.
    fn tls(&mut self, tls: &RawTls, config: &RawConfig) -> Option<TlsConfig> {
        let before = self.errors.len();
        let admin_listen = config.admin.as_ref().map(|admin| admin.listen);
        if tls.listen.port() != 0
            && (tls.listen == config.listen || Some(tls.listen) == admin_listen)
        {
            self.fail(
                "tls.listen",
                format!(
                    "{} is also the proxy's `listen` or the admin's address; HTTPS needs its own",
                    tls.listen
                ),
            );
        }
        if tls.certificates.is_empty() {
            self.fail(
                "tls.certificates",
                "give at least one certificate (cert and key)",
            );
        }
        for (i, pair) in tls.certificates.iter().enumerate() {
            if let Err(error) = crate::http::tls::load_certified_key(&pair.cert, &pair.key) {
                let key = if error.is_key() { "key" } else { "cert" };
                self.fail(
                    &format!("tls.certificates[{i}].{key}"),
                    format!("{error} (paths are relative to the working directory)"),
                );
            }
        }
        if self.errors.len() > before {
            return None;
        }
        Some(TlsConfig {
            listen: tls.listen,
            certificates: tls
                .certificates
                .iter()
                .map(|pair| CertificateFiles {
                    cert: pair.cert.clone(),
                    key: pair.key.clone(),
                })
                .collect(),
            redirect_http: tls.redirect_http,
        })
    }

    fn shared(&mut self, shared: &RawShared) -> Option<SharedConfig> {
        let before = self.errors.len();
        let known_scheme = ["redis://", "redis+unix://", "unix://"]
            .iter()
            .any(|scheme| shared.url.starts_with(scheme));
        if !known_scheme {
            self.fail(
                "shared.url",
                format!(
                    "{:?} is not a Redis URL (use redis://host:port/db or redis+unix:///path/to/redis.sock)",
                    shared.url
                ),
            );
        }
        let namespace_ok = !shared.namespace.is_empty()
            && shared.namespace.len() <= 64
            && shared
                .namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !namespace_ok {
            self.fail(
                "shared.namespace",
                format!(
                    "{:?}: use 1 to 64 letters, digits, '-', '_' or '.'",
                    shared.namespace
                ),
            );
        }
        for (key, value) in [
            ("shared.read_timeout", shared.read_timeout),
            ("shared.write_timeout", shared.write_timeout),
            ("shared.connect_timeout", shared.connect_timeout),
        ] {
            if value.0.is_zero() {
                self.fail(key, "must be above zero");
            }
        }
        if shared.write_queue == 0 {
            self.fail("shared.write_queue", "must be at least 1");
        }
        (self.errors.len() == before).then(|| SharedConfig {
            url: shared.url.clone(),
            namespace: shared.namespace.clone(),
            read_timeout: shared.read_timeout.0,
            write_timeout: shared.write_timeout.0,
            connect_timeout: shared.connect_timeout.0,
            max_object_size: shared.max_object_size.0,
            write_queue: shared.write_queue,
        })
    }

    fn upstream(&mut self, path: &str, upstream: &RawUpstream) -> Upstream {
        if upstream.servers.is_empty() {
            self.fail(
                &format!("{path}.servers"),
                "an upstream needs at least one server, e.g. [\"http://127.0.0.1:9000\"]",
            );
        }
        let servers = upstream
            .servers
            .iter()
            .enumerate()
            .filter_map(|(i, server)| {
                parse_server_url(server.url())
                    .map_err(|why| self.fail(&format!("{path}.servers[{i}]"), why))
                    .ok()
            })
            .collect::<Vec<ServerAddr>>();
        self.protocol_fits_servers(path, upstream.protocol, &servers);
        let weights = upstream
            .servers
            .iter()
            .enumerate()
            .map(|(i, server)| {
                let weight = server.weight();
                if !(1..=MAX_WEIGHT).contains(&weight) {
                    self.fail(
                        &format!("{path}.servers[{i}].weight"),
                        format!("must be between 1 and {MAX_WEIGHT}, not {weight}"),
                    );
                }
                weight.clamp(1, MAX_WEIGHT)
            })
            .collect();
        if upstream.connect_timeout.get().is_zero() {
            self.fail(&format!("{path}.connect_timeout"), "must be more than 0");
        }
        if upstream.timeout.get().is_zero() {
            self.fail(&format!("{path}.timeout"), "must be more than 0");
        }
        let host = upstream.host.as_ref().and_then(|host| {
            let value = HeaderValue::from_str(host)
                .ok()
                .filter(|_| !host.is_empty());
            if value.is_none() {
                self.fail(
                    &format!("{path}.host"),
                    format!("{host:?} is not a valid Host header value"),
                );
            }
            value
        });
        if let Some(ca_file) = &upstream.ca_file
            && let Err(why) = check_ca_file(ca_file)
        {
            self.fail(&format!("{path}.ca_file"), why);
        }
        if upstream.ejection.consecutive_failures == 0 {
            self.fail(
                &format!("{path}.ejection.consecutive_failures"),
                "must be at least 1",
            );
        }
        if upstream.ejection.duration.get().is_zero() {
            self.fail(&format!("{path}.ejection.duration"), "must be more than 0");
        }
        let health_check = upstream
            .health_check
            .as_ref()
            .and_then(|check| self.health_check(&format!("{path}.health_check"), check));
        Upstream {
            servers,
            weights,
            balance: upstream.balance,
            protocol: upstream.protocol,
            connect_timeout: upstream.connect_timeout,
            timeout: upstream.timeout,
            host,
            ca_file: upstream.ca_file.clone(),
            health_check,
            ejection: upstream.ejection,
        }
    }

    /// `h2` is negotiated in the TLS handshake, `h2c` has none: each needs
    /// its own scheme on every server.
    fn protocol_fits_servers(
        &mut self,
        path: &str,
        protocol: UpstreamProtocol,
        servers: &[ServerAddr],
    ) {
        let https = |server: &ServerAddr| server.scheme == Scheme::HTTPS;
        let why = match protocol {
            UpstreamProtocol::Http1 => return,
            UpstreamProtocol::H2 => servers.iter().find(|s| !https(s)).map(|server| {
                format!(
                    "protocol h2 is HTTP/2 over TLS; use h2c for cleartext http:// servers ({server} is one)"
                )
            }),
            UpstreamProtocol::H2c => servers.iter().find(|s| https(s)).map(|server| {
                format!(
                    "protocol h2c is HTTP/2 over cleartext TCP; use h2 for https:// servers ({server} is one)"
                )
            }),
        };
        if let Some(why) = why {
            self.fail(&format!("{path}.protocol"), why);
        }
    }

    fn health_check(&mut self, path: &str, check: &RawHealthCheck) -> Option<HealthCheck> {
        let before = self.errors.len();
        let probe_path = check
            .path
            .parse::<http::uri::PathAndQuery>()
            .ok()
            .filter(|_| check.path.starts_with('/'));
        if probe_path.is_none() {
            self.fail(
                &format!("{path}.path"),
                format!("{:?} is not a path starting with /", check.path),
            );
        }
        if check.interval.get().is_zero() {
            self.fail(&format!("{path}.interval"), "must be more than 0");
        }
        if check.timeout.get().is_zero() || check.timeout.get() > check.interval.get() {
            self.fail(
                &format!("{path}.timeout"),
                "must be more than 0 and at most the interval",
            );
        }
        let expected_statuses = check
            .expected_statuses
            .iter()
            .enumerate()
            .filter_map(|(i, code)| {
                let status = StatusCode::from_u16(*code)
                    .ok()
                    .filter(|s| s.as_u16() >= 100);
                if status.is_none() {
                    self.fail(
                        &format!("{path}.expected_statuses[{i}]"),
                        format!("{code} is not an HTTP status"),
                    );
                }
                status
            })
            .collect();
        for (key, value) in [
            ("healthy_threshold", check.healthy_threshold),
            ("unhealthy_threshold", check.unhealthy_threshold),
        ] {
            if value == 0 {
                self.fail(&format!("{path}.{key}"), "must be at least 1");
            }
        }
        if self.errors.len() > before {
            return None;
        }
        Some(HealthCheck {
            path: probe_path?,
            interval: check.interval.get(),
            timeout: check.timeout.get(),
            expected_statuses,
            healthy_threshold: check.healthy_threshold,
            unhealthy_threshold: check.unhealthy_threshold,
        })
    }

    fn route(&mut self, path: &str, route: &RawRoute, config: &RawConfig) -> Option<Route> {
        let target = match (&route.upstream, &route.source) {
            (Some(_), Some(_)) => {
                self.fail(path, "a route has either `upstream` or `source`, not both");
                None
            }
            (None, None) => {
                self.fail(
                    path,
                    "a route needs `upstream: NAME` (proxy to an upstream) or `source: NAME` (serve a source)",
                );
                None
            }
            (Some(upstream), None) => Some(RouteTarget::Upstream(upstream.clone())),
            (None, Some(source)) => Some(RouteTarget::Source(source.clone())),
        };
        if let Some(name) = &route.upstream {
            self.check_reference(
                &format!("{path}.upstream"),
                "upstream",
                name,
                config.upstreams.keys(),
            );
        }
        if let Some(name) = &route.source {
            self.check_reference(
                &format!("{path}.source"),
                "source",
                name,
                config.sources.keys(),
            );
        }
        for (j, name) in route.plugins.iter().enumerate() {
            self.check_reference(
                &format!("{path}.plugins[{j}]"),
                "plugin",
                name,
                config.plugins.keys(),
            );
        }
        if let Some(prefix) = &route.matcher.path_prefix
            && !prefix.starts_with('/')
        {
            self.fail(
                &format!("{path}.match.path_prefix"),
                format!(
                    "{prefix:?} must start with '/' (e.g. \"/{}\")",
                    prefix.trim_start_matches('/')
                ),
            );
        }
        if let Some(host) = &route.matcher.host
            && (host.is_empty() || host.contains(['/', ' ']))
        {
            self.fail(
                &format!("{path}.match.host"),
                format!("{host:?} is not a host name (e.g. api.example.com or *.example.com)"),
            );
        }
        let cache = self.route_cache(&format!("{path}.cache"), &route.cache);
        let upgrades = self.route_upgrades(path, route, config);
        let strip_request_headers = self.header_names(
            &format!("{path}.strip_request_headers"),
            &route.strip_request_headers,
        );
        let headers = self.route_headers(&format!("{path}.headers"), &route.headers);
        Some(Route {
            headers,
            matcher: route.matcher.clone(),
            target: target?,
            cache,
            plugins: route.plugins.clone(),
            max_request_body: route.max_request_body,
            upgrades,
            strip_request_headers,
            skip_unavailable_plugins: route.skip_unavailable_plugins,
        })
    }

    /// The route's tunnelled protocols: as listed, or `[websocket]` when
    /// not. A tunnel is an HTTP/1.1 exchange, so a route whose upstream
    /// speaks HTTP/2 tunnels nothing by default and may not list any.
    fn route_upgrades(&mut self, path: &str, route: &RawRoute, config: &RawConfig) -> Vec<String> {
        let path = format!("{path}.upgrades");
        let http2 = route
            .upstream
            .as_ref()
            .and_then(|name| config.upstreams.get(name))
            .map(|upstream| upstream.protocol)
            .filter(|protocol| protocol.is_http2());
        match (&route.upgrades, http2) {
            (None, None) => super::raw::default_upgrades(),
            (None, Some(_)) => Vec::new(),
            (Some(names), Some(protocol)) if !names.is_empty() => {
                self.fail(
                    &path,
                    format!(
                        "upstream {:?} speaks HTTP/2 (protocol {}) and upgrades need HTTP/1.1; route WebSockets to an upstream with protocol http1, or write upgrades: []",
                        route.upstream.as_deref().unwrap_or_default(),
                        protocol.as_str()
                    ),
                );
                Vec::new()
            }
            (Some(names), _) => self.upgrades(&path, names),
        }
    }

    /// Upgrade protocol names, lowercase; `h2c` is never tunnelled (it would
    /// carry HTTP/2 past routing and plugins).
    fn upgrades(&mut self, path: &str, names: &[String]) -> Vec<String> {
        names
            .iter()
            .enumerate()
            .filter_map(|(i, name)| {
                let lower = name.trim().to_ascii_lowercase();
                let is_token = !lower.is_empty()
                    && lower
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b));
                if lower == "h2c" {
                    self.fail(
                        &format!("{path}[{i}]"),
                        "h2c upgrades are never tunnelled (HTTP/2 would pass routing and plugins)",
                    );
                    None
                } else if !is_token {
                    self.fail(
                        &format!("{path}[{i}]"),
                        format!("{name:?} is not a protocol name"),
                    );
                    None
                } else {
                    Some(lower)
                }
            })
            .collect()
    }

    fn route_cache(&mut self, path: &str, cache: &RawRouteCache) -> RouteCache {
        let headers = self.header_names(&format!("{path}.key.headers"), &cache.key.headers);
        let purge = cache.purge.as_ref().map(|purge| PurgeConfig {
            allow: purge
                .allow
                .iter()
                .enumerate()
                .filter_map(|(j, entry)| {
                    parse_cidr(entry)
                        .map_err(|why| self.fail(&format!("{path}.purge.allow[{j}]"), why))
                        .ok()
                })
                .collect(),
        });
        RouteCache {
            enabled: cache.enabled,
            stale_while_revalidate: cache.stale_while_revalidate,
            stale_if_error: cache.stale_if_error,
            key: CacheKeyConfig {
                ignore_query: cache.key.ignore_query.clone(),
                sort_query: cache.key.sort_query,
                headers,
            },
            purge,
            bypass_with_credentials: cache.bypass_with_credentials,
            shared: cache.shared,
        }
    }

    fn check_plugin(&mut self, path: &str, plugin: &PluginConfig) {
        if !plugin.path.is_file() {
            self.fail(
                &format!("{path}.path"),
                format!(
                    "plugin file {} does not exist (paths are relative to the working directory; docs/plugins.md says how to build plugins)",
                    plugin.path.display()
                ),
            );
        }
        if plugin.limits.memory.bytes() == 0 {
            self.fail(&format!("{path}.limits.memory"), "must be more than 0");
        }
        if plugin.limits.timeout.get().is_zero() {
            self.fail(&format!("{path}.limits.timeout"), "must be more than 0");
        }
        if plugin.limits.concurrency == 0 {
            self.fail(&format!("{path}.limits.concurrency"), "must be more than 0");
        }
        for (i, origin) in plugin.allow_hosts.iter().enumerate() {
            if !(origin.starts_with("http://") || origin.starts_with("https://")) {
                self.fail(
                    &format!("{path}.allow_hosts[{i}]"),
                    format!("{origin:?} must be an origin with its scheme, e.g. \"https://api.example.com\""),
                );
            }
        }
    }

    fn source(
        &mut self,
        path: &str,
        source: &RawSource,
        plugins: &BTreeMap<String, PluginConfig>,
        max_object_size: u64,
        shared_url: Option<&str>,
    ) -> Option<SourceConfig> {
        let rule = Rule::parse_firing(&source.rule, chrono::Utc::now())
            .map_err(|why| self.fail(&format!("{path}.rule"), why))
            .ok();
        let http = source
            .http
            .as_ref()
            .map(|http| self.http_source(&format!("{path}.http"), http, max_object_size));
        if let Some(plugin) = &source.plugin {
            self.check_reference(
                &format!("{path}.plugin.name"),
                "plugin",
                &plugin.name,
                plugins.keys(),
            );
        }
        let content_type = source.content_type.as_ref().and_then(|content_type| {
            HeaderValue::from_str(content_type)
                .map_err(|_| {
                    self.fail(
                        &format!("{path}.content_type"),
                        format!("{content_type:?} is not a valid header value"),
                    )
                })
                .ok()
        });
        let accept_status = source.accept_status.as_ref().map(|statuses| {
            statuses
                .iter()
                .enumerate()
                .filter_map(|(i, status)| {
                    StatusCode::from_u16(*status)
                        .ok()
                        .filter(|_| (100..=599).contains(status))
                        .or_else(|| {
                            self.fail(
                                &format!("{path}.accept_status[{i}]"),
                                format!("{status} is not an HTTP status (100-599)"),
                            );
                            None
                        })
                })
                .collect()
        });
        if source.timeout.get().is_zero() {
            self.fail(&format!("{path}.timeout"), "must be more than 0");
        }
        if let Some(etcd) = &source.etcd {
            self.etcd_source(&format!("{path}.etcd"), etcd);
        }
        let redis = source
            .redis
            .as_ref()
            .map(|redis| self.redis_source(&format!("{path}.redis"), redis, shared_url));
        let set = |kinds: &[(&'static str, bool)]| -> Vec<&'static str> {
            kinds
                .iter()
                .filter(|(_, set)| *set)
                .map(|(kind, _)| *kind)
                .collect()
        };
        let mirrors = set(&[
            ("etcd", source.etcd.is_some()),
            ("redis", source.redis.is_some()),
        ]);
        let scheduled = set(&[
            ("static", source.static_.is_some()),
            ("http", source.http.is_some()),
            ("file", source.file.is_some()),
            ("plugin", source.plugin.is_some()),
        ]);
        if let (Some(mirror), Some(other)) = (mirrors.first(), mirrors.get(1).or(scheduled.first()))
        {
            self.fail(
                &format!("{path}.{mirror}"),
                format!("a source is a {mirror} mirror or a {other} source, not both"),
            );
        }
        Some(SourceConfig {
            rule: rule?,
            static_: source.static_.clone(),
            http,
            file: source.file.clone(),
            plugin: source.plugin.clone(),
            etcd: source.etcd.clone(),
            redis,
            content_type,
            timeout: source.timeout,
            accept_status,
            run_on_start: source.run_on_start,
            shared: source.shared,
        })
    }

    /// Checks a Redis mirror and resolves its URL (its own, else `shared.url`).
    fn redis_source(
        &mut self,
        path: &str,
        redis: &RedisSource,
        shared_url: Option<&str>,
    ) -> RedisSource {
        let mut resolved = redis.clone();
        if redis.key.is_empty() {
            self.fail(&format!("{path}.key"), "must name a Redis key");
        }
        match redis.url.as_deref().or(shared_url) {
            Some(url) => {
                if let Err(error) = redis::Client::open(url) {
                    self.fail(
                        &format!("{path}.url"),
                        format!("{url:?} is not a Redis URL ({error})"),
                    );
                }
                resolved.url = Some(url.to_string());
            }
            None => self.fail(
                &format!("{path}.url"),
                "needs a Redis URL here or in a top-level shared: block",
            ),
        }
        if redis.reread.get().is_zero() {
            self.fail(&format!("{path}.reread"), "must be more than 0");
        }
        if redis.channel.as_deref() == Some("") {
            self.fail(&format!("{path}.channel"), "must not be empty");
        }
        resolved
    }

    fn etcd_source(&mut self, path: &str, etcd: &EtcdSource) {
        if etcd.endpoints.is_empty() {
            self.fail(
                &format!("{path}.endpoints"),
                "needs at least one endpoint, e.g. 127.0.0.1:2379",
            );
        }
        for (i, endpoint) in etcd.endpoints.iter().enumerate() {
            if let Err(why) = check_etcd_endpoint(endpoint) {
                self.fail(&format!("{path}.endpoints[{i}]"), why);
            }
        }
        if etcd.page_size == 0 {
            self.fail(&format!("{path}.page_size"), "must be more than 0");
        }
        if etcd.connect_timeout.get().is_zero() {
            self.fail(&format!("{path}.connect_timeout"), "must be more than 0");
        }
    }

    fn http_source(
        &mut self,
        path: &str,
        http: &RawHttpSource,
        max_object_size: u64,
    ) -> HttpSource {
        let endpoint = if http.endpoint.is_empty() {
            None
        } else {
            parse_endpoint(&http.endpoint)
                .map_err(|why| self.fail(&format!("{path}.endpoint"), why))
                .ok()
        };
        let method = if http.method.is_empty() {
            Method::GET
        } else {
            Method::from_bytes(http.method.as_bytes()).unwrap_or_else(|_| {
                self.fail(
                    &format!("{path}.method"),
                    format!("{:?} is not an HTTP method", http.method),
                );
                Method::GET
            })
        };
        let mut header = HeaderMap::new();
        for (name, values) in &http.header {
            let Some(header_name) = self.header_name(&format!("{path}.header.{name}"), name) else {
                continue;
            };
            for value in values {
                match HeaderValue::from_str(value) {
                    Ok(value) => {
                        header.append(header_name.clone(), value);
                    }
                    Err(_) => self.fail(
                        &format!("{path}.header.{name}"),
                        format!("{value:?} is not a valid header value"),
                    ),
                }
            }
        }
        let secret_headers =
            self.header_names(&format!("{path}.secret_headers"), &http.secret_headers);
        let max_body = http
            .max_body
            .map_or(max_object_size.saturating_add(4 * 1024 * 1024), |size| {
                size.0
            });
        HttpSource {
            endpoint,
            method,
            header,
            auth: http.auth.clone(),
            body: http.body.clone(),
            max_body,
            secret_headers,
        }
    }

    /// `name` must be one of `known`; suggests the closest when it is not.
    fn check_reference<'n>(
        &mut self,
        path: &str,
        kind: &str,
        name: &str,
        known: impl Iterator<Item = &'n String>,
    ) {
        let known: Vec<&str> = known.map(String::as_str).collect();
        if known.contains(&name) {
            return;
        }
        let hint = match did_you_mean(name, known.iter().copied()) {
            Some(close) => format!(" (did you mean {close:?}?)"),
            None if known.is_empty() => format!(" (no {kind}s are defined)"),
            None => format!(" (defined: {})", known.join(", ")),
        };
        self.fail(path, format!("no {kind} named {name:?}{hint}"));
    }

    /// A header name, lowercased as HTTP/2 sends it; `None` (with the
    /// error recorded) when it is not one.
    fn header_name(&mut self, path: &str, name: &str) -> Option<HeaderName> {
        HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| self.fail(path, format!("{name:?} is not a valid header name")))
            .ok()
    }

    /// A route's `headers:` rules. Framing and connection fields are the
    /// proxy's to write, never a rule's.
    fn route_headers(&mut self, path: &str, raw: &RawRouteHeaders) -> RouteHeaders {
        let mut headers = RouteHeaders::default();
        for (i, name) in raw.remove.iter().enumerate() {
            let at = format!("{path}.remove[{i}]");
            if let Some(name) = self.header_name(&at, name)
                && self.not_framing(&at, &name)
            {
                headers.remove.push(name);
            }
        }
        for (name, value) in &raw.set {
            let at = format!("{path}.set.{name}");
            let Some(header) = self.header_name(&at, name) else {
                continue;
            };
            if !self.not_framing(&at, &header) {
                continue;
            }
            match HeaderValue::from_str(value) {
                Ok(value) => headers.set.push((header, value)),
                Err(_) => self.fail(
                    &at,
                    format!("{value:?} is not a valid header value (visible ASCII, spaces, tabs)"),
                ),
            }
        }
        headers
    }

    fn not_framing(&mut self, path: &str, name: &HeaderName) -> bool {
        let framing = crate::http::hop_by_hop::is_hop_by_hop(name)
            || name == http::header::CONTENT_LENGTH
            || name == http::header::HOST;
        if framing {
            self.fail(
                path,
                format!("{name} describes the connection or the framing; Larder sets it itself"),
            );
        }
        !framing
    }

    fn header_names(&mut self, path: &str, names: &[String]) -> Vec<HeaderName> {
        names
            .iter()
            .enumerate()
            .filter_map(|(i, name)| self.header_name(&format!("{path}[{i}]"), name))
            .collect()
    }
}

/// The candidate closest to `name`, if it is close enough to be a typo.
pub fn did_you_mean<'c>(name: &str, candidates: impl Iterator<Item = &'c str>) -> Option<&'c str> {
    let limit = (name.chars().count() / 3).max(1);
    candidates
        .map(|candidate| (strsim::damerau_levenshtein(name, candidate), candidate))
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Turns `-l`/`log.level` into an `EnvFilter` directive: a level name in any
/// case (`INFO`, `Debug`, logrus's `warning`), or a directive such as
/// `larder=debug,hyper=info`.
pub fn log_directive(level: &str) -> Result<String, String> {
    let trimmed = level.trim();
    let simple = match trimmed.to_ascii_lowercase().as_str() {
        "trace" => Some("trace"),
        "debug" => Some("debug"),
        "info" => Some("info"),
        "warn" | "warning" => Some("warn"),
        "error" | "fatal" | "panic" => Some("error"),
        "off" => Some("off"),
        _ => None,
    };
    if let Some(simple) = simple {
        return Ok(simple.to_string());
    }
    // A bare word would parse as a target name and silently mean "everything
    // from that target"; only accept directives that say `target=level`.
    if !trimmed.contains('=') {
        return Err(format!(
            "unknown log level {level:?} (use trace, debug, info, warn, error, or a directive like larder=debug)"
        ));
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(trimmed)
        .map(|_| trimmed.to_string())
        .map_err(|e| {
            format!("invalid log level {level:?}: {e} (use trace, debug, info, warn, error, or a directive like larder=debug)")
        })
}

/// An upstream server: `http(s)://host[:port]`, nothing after it but `/`.
fn parse_server_url(server: &str) -> Result<ServerAddr, String> {
    let url = url::Url::parse(server).map_err(|e| {
        format!("{server:?} is not a URL ({e}); write e.g. \"http://127.0.0.1:9000\"")
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{server:?}: the scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{server:?} has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{server:?}: credentials in server URLs are not supported"
        ));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{server:?}: a server is scheme, host and port only (no path or query); routes choose paths"
        ));
    }
    let scheme = if url.scheme() == "https" {
        Scheme::HTTPS
    } else {
        Scheme::HTTP
    };
    let host_and_port = match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_string(),
        (None, _) => String::new(),
    };
    let authority: Authority = host_and_port
        .parse()
        .map_err(|e| format!("{server:?}: {e}"))?;
    Ok(ServerAddr { scheme, authority })
}

/// A PEM file holding at least one certificate, as the upstream's TLS setup needs.
fn check_ca_file(path: &Path) -> Result<(), String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    if !path.is_file() {
        return Err(format!(
            "CA file {} does not exist (paths are relative to the working directory)",
            path.display()
        ));
    }
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("CA file {} is not a PEM bundle: {e}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!(
            "CA file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(())
}

/// A source's `http.endpoint`: any http(s) URL with a host.
/// An etcd endpoint as the client takes it: `host:port` or `http://host:port`.
fn check_etcd_endpoint(endpoint: &str) -> Result<(), String> {
    if endpoint.starts_with("https://") {
        return Err(format!(
            "{endpoint:?}: TLS to etcd is not supported yet; use http:// on a trusted network"
        ));
    }
    let rest = endpoint.strip_prefix("http://").unwrap_or(endpoint);
    let authority: Authority = rest
        .trim_end_matches('/')
        .parse()
        .map_err(|_| format!("{endpoint:?} is not host:port or http://host:port"))?;
    if authority.port_u16().is_none() {
        return Err(format!("{endpoint:?} needs a port, e.g. 127.0.0.1:2379"));
    }
    Ok(())
}

fn parse_endpoint(endpoint: &str) -> Result<Endpoint, String> {
    let url = url::Url::parse(endpoint).map_err(|e| format!("{endpoint:?} is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{endpoint:?}: the scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{endpoint:?} has no host"));
    }
    let uri = url
        .as_str()
        .parse()
        .map_err(|e| format!("{endpoint:?} is not a URL ({e})"))?;
    Ok(Endpoint::new(uri, endpoint))
}

/// `10.0.0.1`, `10.0.0.0/8`, `::1`, `fd00::/8`: an address and a prefix length.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text, None),
    };
    let address: IpAddr = address.parse().map_err(|_| {
        format!("{text:?} is not an IP address or CIDR block (e.g. 127.0.0.1 or 10.0.0.0/8)")
    })?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(prefix) => prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?,
    };
    IpNet::new(address, prefix).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        let names = ["api", "static-site"];
        assert_eq!(did_you_mean("apii", names.iter().copied()), Some("api"));
        assert_eq!(
            did_you_mean("statc-site", names.iter().copied()),
            Some("static-site")
        );
        assert_eq!(did_you_mean("billing", names.iter().copied()), None);
    }

    #[test]
    fn log_levels_are_case_insensitive() {
        assert_eq!(log_directive("INFO"), Ok("info".into()));
        assert_eq!(log_directive("Warning"), Ok("warn".into()));
        assert_eq!(
            log_directive("larder=debug,hyper=info"),
            Ok("larder=debug,hyper=info".into())
        );
        assert!(log_directive("loud").is_err());
        assert!(log_directive("").is_err());
    }

    #[test]
    fn server_urls_are_origins() {
        let parsed = parse_server_url("http://127.0.0.1:9000").unwrap();
        assert_eq!(parsed.to_string(), "http://127.0.0.1:9000");
        let https = parse_server_url("https://api.example.com/").unwrap();
        assert_eq!(https.to_string(), "https://api.example.com");
        assert!(parse_server_url("127.0.0.1:9000").is_err());
        assert!(parse_server_url("https://example.com").is_ok());
        assert!(parse_server_url("ftp://x").is_err());
        assert!(parse_server_url("ftp://example.com").is_err());
        assert!(parse_server_url("http://x/v1").is_err());
    }

    #[test]
    fn cidr_blocks_parse() {
        assert!(parse_cidr("127.0.0.1").is_ok());
        assert!(parse_cidr("10.0.0.0/8").is_ok());
        assert!(parse_cidr("fd00::/8").is_ok());
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("localhost").is_err());
    }

    #[test]
    fn bad_http_source_settings_are_refused_with_the_setting_named() {
        let text = "sources:\n  s:\n    http:\n      endpoint: 'not a url'\n      method: 'GE T'\n      header:\n        'bad name': [x]\n";
        let errors = crate::config::load_str(text, "config.yml")
            .expect_err("refused")
            .0;
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert!(paths.contains(&"sources.s.http.endpoint"), "{paths:?}");
        assert!(paths.contains(&"sources.s.http.method"), "{paths:?}");
        assert!(
            paths.contains(&"sources.s.http.header.bad name"),
            "{paths:?}"
        );
    }

    #[test]
    fn mirror_sources_are_checked_and_stand_alone() {
        let refused = |text: &str| -> Vec<(String, String)> {
            crate::config::load_str(text, "config.yml")
                .expect_err("refused")
                .0
                .into_iter()
                .map(|e| (e.path, e.message))
                .collect()
        };
        let errors = refused(
            "sources:\n  e:\n    etcd: { endpoints: ['https://127.0.0.1:2379', 'nohost'], page_size: 0 }\n    static: { value: x }\n",
        );
        let paths: Vec<&str> = errors.iter().map(|(path, _)| path.as_str()).collect();
        assert!(paths.contains(&"sources.e.etcd.endpoints[0]"), "{errors:?}");
        assert!(paths.contains(&"sources.e.etcd.endpoints[1]"), "{errors:?}");
        assert!(paths.contains(&"sources.e.etcd.page_size"), "{errors:?}");
        assert!(
            errors
                .iter()
                .any(|(path, why)| path == "sources.e.etcd" && why.contains("not both")),
            "{errors:?}"
        );
        let errors = refused("sources:\n  r:\n    redis: { key: flags }\n");
        assert_eq!(errors[0].0, "sources.r.redis.url", "{errors:?}");

        let text = "shared: { url: 'redis://127.0.0.1:6379/2', namespace: n }\nsources:\n  r:\n    redis: { key: flags }\n  e:\n    etcd: { endpoints: ['127.0.0.1:2379'] }\n";
        let config = crate::config::load_str(text, "config.yml").expect("valid");
        let redis = config.sources["r"].redis.as_ref().expect("a redis mirror");
        assert_eq!(redis.url.as_deref(), Some("redis://127.0.0.1:6379/2"));
        assert_eq!(
            config.sources["e"].etcd.as_ref().map(|e| e.page_size),
            Some(1000)
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any text: no panic; a block parsed from it contains its own
            /// address and agrees with itself on any other address.
            #[test]
            fn cidr_blocks_contain_their_address(text in ".{0,24}", a in any::<[u8; 4]>(), bits in 0u8..=32) {
                let _ = parse_cidr(&text);
                let address = std::net::Ipv4Addr::from(a);
                let block = parse_cidr(&format!("{address}/{bits}")).expect("a valid block");
                prop_assert!(block.contains(&std::net::IpAddr::V4(address)));
                let other = std::net::IpAddr::V4(std::net::Ipv4Addr::from(a.map(|x| x ^ 0x80)));
                let same_net = bits == 0 || (u32::from(address) ^ 0x8080_8080) >> (32 - u32::from(bits)) == u32::from(address) >> (32 - u32::from(bits));
                prop_assert_eq!(block.contains(&other), same_net);
            }
        }
    }
}
