//! Checks that need the whole deserialized config: cross-references, values
//! serde cannot judge alone, files that must exist. Every check runs and every
//! problem is collected (like Vector's `validate`), each placed at its key
//! path's line and column.
//!
//! Must not start anything or touch the network; reads the filesystem only to
//! see that named files exist.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use super::ConfigError;
use super::model::{Config, PluginConfig, Route, SourceConfig, Upstream};
use super::positions::PositionIndex;

/// Runs every check; returns the problems in file order.
pub fn validate(config: &Config, index: &PositionIndex, file: &str) -> Vec<ConfigError> {
    let mut checker = Checker {
        index,
        file,
        errors: Vec::new(),
    };
    checker.check_document(config);
    for (name, upstream) in &config.upstreams {
        checker.check_upstream(&format!("upstreams.{name}"), upstream);
    }
    for (i, route) in config.routes.iter().flatten().enumerate() {
        checker.check_route(&format!("routes[{i}]"), route, config);
    }
    for (name, plugin) in &config.plugins {
        checker.check_plugin(&format!("plugins.{name}"), plugin);
    }
    for (name, source) in &config.sources {
        checker.check_source(&format!("sources.{name}"), source, &config.plugins);
    }
    let mut errors = checker.errors;
    errors.sort_by_key(|e| (e.line.unwrap_or(usize::MAX), e.column.unwrap_or(0)));
    errors
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

    fn check_document(&mut self, config: &Config) {
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
        let cache = &config.cache;
        if cache.max_object_size > cache.max_size {
            self.fail(
                "cache.max_object_size",
                format!(
                    "max_object_size ({}) is larger than cache.max_size ({})",
                    cache.max_object_size, cache.max_size
                ),
            );
        }
        for (i, name) in cache.tag_headers.iter().enumerate() {
            self.check_header_name(&format!("cache.tag_headers[{i}]"), name);
        }
    }

    fn check_upstream(&mut self, path: &str, upstream: &Upstream) {
        if upstream.servers.is_empty() {
            self.fail(
                &format!("{path}.servers"),
                "an upstream needs at least one server, e.g. [\"http://127.0.0.1:9000\"]",
            );
        }
        for (i, server) in upstream.servers.iter().enumerate() {
            if let Err(why) = check_server_url(server) {
                self.fail(&format!("{path}.servers[{i}]"), why);
            }
        }
        if upstream.connect_timeout.get().is_zero() {
            self.fail(&format!("{path}.connect_timeout"), "must be more than 0");
        }
        if upstream.timeout.get().is_zero() {
            self.fail(&format!("{path}.timeout"), "must be more than 0");
        }
        if let Some(host) = &upstream.host
            && (host.is_empty() || http::HeaderValue::from_str(host).is_err())
        {
            self.fail(
                &format!("{path}.host"),
                format!("{host:?} is not a valid Host header value"),
            );
        }
        if let Some(ca_file) = &upstream.ca_file
            && let Err(why) = check_ca_file(ca_file)
        {
            self.fail(&format!("{path}.ca_file"), why);
        }
    }

    fn check_route(&mut self, path: &str, route: &Route, config: &Config) {
        match (&route.upstream, &route.source) {
            (Some(_), Some(_)) => self.fail(
                path,
                "a route has either `upstream` or `source`, not both",
            ),
            (None, None) => self.fail(
                path,
                "a route needs `upstream: NAME` (proxy to an upstream) or `source: NAME` (serve a source)",
            ),
            _ => {}
        }
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
        for (j, name) in route.cache.key.headers.iter().enumerate() {
            self.check_header_name(&format!("{path}.cache.key.headers[{j}]"), name);
        }
        if let Some(purge) = &route.cache.purge {
            for (j, entry) in purge.allow.iter().enumerate() {
                if let Err(why) = parse_cidr(entry) {
                    self.fail(&format!("{path}.cache.purge.allow[{j}]"), why);
                }
            }
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
        for (i, origin) in plugin.allow_hosts.iter().enumerate() {
            if !(origin.starts_with("http://") || origin.starts_with("https://")) {
                self.fail(
                    &format!("{path}.allow_hosts[{i}]"),
                    format!("{origin:?} must be an origin with its scheme, e.g. \"https://api.example.com\""),
                );
            }
        }
    }

    fn check_source(
        &mut self,
        path: &str,
        source: &SourceConfig,
        plugins: &BTreeMap<String, PluginConfig>,
    ) {
        if !source.rule.trim().is_empty()
            && let Err(why) = crate::schedule::Rule::parse_firing(&source.rule, chrono::Utc::now())
        {
            self.fail(&format!("{path}.rule"), why);
        }
        if let Some(http) = &source.http {
            if !http.endpoint.is_empty()
                && let Err(why) = check_endpoint_url(&http.endpoint)
            {
                self.fail(&format!("{path}.http.endpoint"), why);
            }
            if !http.method.is_empty() && http::Method::from_bytes(http.method.as_bytes()).is_err()
            {
                self.fail(
                    &format!("{path}.http.method"),
                    format!("{:?} is not an HTTP method", http.method),
                );
            }
            for name in http.header.keys() {
                self.check_header_name(&format!("{path}.http.header.{name}"), name);
            }
        }
        if let Some(plugin) = &source.plugin {
            self.check_reference(
                &format!("{path}.plugin.name"),
                "plugin",
                &plugin.name,
                plugins.keys(),
            );
        }
        if let Some(content_type) = &source.content_type
            && http::HeaderValue::from_str(content_type).is_err()
        {
            self.fail(
                &format!("{path}.content_type"),
                format!("{content_type:?} is not a valid header value"),
            );
        }
        for (i, status) in source.accept_status.iter().flatten().enumerate() {
            if !(100..=599).contains(status) {
                self.fail(
                    &format!("{path}.accept_status[{i}]"),
                    format!("{status} is not an HTTP status (100-599)"),
                );
            }
        }
        if source.timeout.get().is_zero() {
            self.fail(&format!("{path}.timeout"), "must be more than 0");
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

    fn check_header_name(&mut self, path: &str, name: &str) {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            self.fail(path, format!("{name:?} is not a valid header name"));
        }
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
fn check_server_url(server: &str) -> Result<(), String> {
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
    Ok(())
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
fn check_endpoint_url(endpoint: &str) -> Result<(), String> {
    let url = url::Url::parse(endpoint).map_err(|e| format!("{endpoint:?} is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{endpoint:?}: the scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{endpoint:?} has no host"));
    }
    Ok(())
}

/// `10.0.0.1`, `10.0.0.0/8`, `::1`, `fd00::/8`: an address and a prefix length.
pub fn parse_cidr(text: &str) -> Result<(IpAddr, u8), String> {
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
    Ok((address, prefix))
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
        assert!(check_server_url("http://127.0.0.1:9000").is_ok());
        assert!(check_server_url("https://api.example.com/").is_ok());
        assert!(check_server_url("127.0.0.1:9000").is_err());
        assert!(check_server_url("ftp://x").is_err());
        assert!(check_server_url("http://x/v1").is_err());
    }

    #[test]
    fn cidr_blocks_parse() {
        assert!(parse_cidr("127.0.0.1").is_ok());
        assert!(parse_cidr("10.0.0.0/8").is_ok());
        assert!(parse_cidr("fd00::/8").is_ok());
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("localhost").is_err());
    }
}
