//! Warnings: things in a valid config that are probably not what the
//! operator meant, but that Larder runs anyway (some for cachepump
//! compatibility). `larder check` prints them; `larder` logs them at start.
//!
//! Must never reject a config: anything that must stop a start is an error in
//! `validate`.

use super::ConfigError;
use super::model::{Config, OnError, PluginPhase, Route, RouteTarget};
use super::positions::PositionIndex;

/// Every warning for `config`, placed by `index`, in file order.
pub fn lint(config: &Config, index: &PositionIndex, file: &str) -> Vec<ConfigError> {
    let mut warnings = Vec::new();
    let mut warn = |path: String, message: String| {
        let at = index.locate(&path);
        warnings.push(ConfigError {
            file: file.to_string(),
            line: at.map(|p| p.line),
            column: at.map(|p| p.column),
            path,
            message,
        });
    };
    for (name, source) in &config.sources {
        let providers: Vec<&str> = [
            ("static", source.static_.is_some()),
            ("http", source.http.is_some()),
            ("file", source.file.is_some()),
            ("plugin", source.plugin.is_some()),
        ]
        .into_iter()
        .filter_map(|(kind, set)| set.then_some(kind))
        .collect();
        match providers.as_slice() {
            [] => warn(
                format!("sources.{name}"),
                "no static, http, file or plugin is set: this source will never have a value"
                    .to_string(),
            ),
            [_] => {}
            [first, rest @ ..] => warn(
                format!("sources.{name}"),
                format!(
                    "only `{first}` is used; `{}` is ignored (the first set wins)",
                    rest.join("`, `")
                ),
            ),
        }
    }
    for (name, source) in &config.sources {
        // Only the provider that runs matters: the first set wins.
        if let Some(file) = &source.file
            && source.static_.is_none()
            && source.http.is_none()
            && !file.path.as_os_str().is_empty()
            && !file.path.exists()
        {
            warn(
                format!("sources.{name}.file.path"),
                format!(
                    "{} does not exist (yet): the source has no value until it does",
                    file.path.display()
                ),
            );
        }
        if let Some(http) = &source.http
            && source.static_.is_none()
            && http.endpoint.is_none()
        {
            warn(
                format!("sources.{name}.http"),
                "no endpoint is set: every fetch of this source will fail".to_string(),
            );
        }
    }
    if let Some(admin) = &config.admin
        && admin.token.is_none()
        && !admin.listen.ip().is_loopback()
    {
        warn(
            "admin.listen".to_string(),
            format!(
                "the admin API listens on {} without a token; only /health and /ready will answer",
                admin.listen
            ),
        );
    }
    let routes = config.routes.as_deref().unwrap_or_default();
    for (i, route) in routes.iter().enumerate() {
        if let Some(j) = routes[..i]
            .iter()
            .position(|earlier| shadows(earlier, route))
        {
            warn(
                format!("routes[{i}]"),
                format!(
                    "never matches: routes[{j}] comes first and matches every request this one would"
                ),
            );
        }
        for (j, name) in route.plugins.iter().enumerate() {
            let Some(plugin) = config.plugins.get(name) else {
                continue;
            };
            if plugin.phase == PluginPhase::Downstream && plugin.on_error == OnError::Open {
                warn(
                    format!("routes[{i}].plugins[{j}]"),
                    format!(
                        "plugin {name:?} has on_error: open: if it guards this route (answers requests itself), its failure or an open circuit lets requests through; set on_error: closed"
                    ),
                );
            }
        }
        if matches!(route.target, RouteTarget::Source(_)) && route.cache.enabled {
            warn(
                format!("routes[{i}].cache"),
                "caching applies to upstream routes; a source route serves its value directly"
                    .to_string(),
            );
        }
    }
    if config.routes.is_some() {
        for name in config.upstreams.keys() {
            if !routes
                .iter()
                .any(|r| r.target == RouteTarget::Upstream(name.clone()))
            {
                warn(
                    format!("upstreams.{name}"),
                    "no route uses this upstream".to_string(),
                );
            }
        }
    }
    warnings.sort_by_key(|e| (e.line.unwrap_or(usize::MAX), e.column.unwrap_or(0)));
    warnings
}

/// Whether every request `later` matches is matched by `earlier` first.
fn shadows(earlier: &Route, later: &Route) -> bool {
    let host_covers = match (&earlier.matcher.host, &later.matcher.host) {
        (None, _) => true,
        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
        (Some(_), None) => false,
    };
    let path_covers = match (&earlier.matcher.path_prefix, &later.matcher.path_prefix) {
        (None, _) => true,
        (Some(a), Some(b)) => b.starts_with(a.as_str()),
        (Some(a), None) => a == "/",
    };
    host_covers && path_covers
}
