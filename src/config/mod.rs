//! The YAML configuration: schema, defaults, `${ENV}` interpolation, and
//! parsing into typed settings with file, line, column and key path in every
//! error.
//!
//! Owns turning text into a [`Config`] of typed values (`raw` is the file as
//! written, `model` what the runtime reads, `validate` the one step between);
//! must not start anything, and imports no runtime module.

mod env;
mod lint;
pub mod model;
mod partial;
mod positions;
pub mod raw;
pub mod schema;
pub mod units;
mod validate;
mod value_schema;

use std::fmt;
use std::path::Path;

pub use model::*;
pub use schema::json_schema;
pub use units::parse_listen;
pub use validate::{did_you_mean, log_directive, parse_cidr};

/// One problem in a config file, located as precisely as the parser allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Key path such as `routes[1].upstream`; empty for the document itself.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in one file (validation does not stop at the first).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// Reads and checks a config file.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: name.clone(),
            line: None,
            column: None,
            path: String::new(),
            message: format!("cannot read the file: {e}"),
        }])
    })?;
    load_str(&text, &name)
}

/// Parses and checks config text; `file` names it in errors. `${NAME}` is
/// read from the process environment.
pub fn load_str(text: &str, file: &str) -> Result<Config, ConfigErrors> {
    load_str_with(text, file, &|name| std::env::var(name).ok())
}

/// [`load_str`] with `${NAME}` looked up in `env` instead of the process
/// environment (tests, and callers that hold their own variables).
pub fn load_str_with(
    text: &str,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let expanded = env::interpolate(text, env).map_err(|errors| env_errors(text, file, errors))?;
    if let Err(e) = serde_yaml::from_str::<serde::de::IgnoredAny>(&expanded) {
        return Err(ConfigErrors(vec![serde_error(file, String::new(), &e)]));
    }
    let index = positions::PositionIndex::build(&expanded);
    let mut raw = match deserialize(&expanded, file, &index) {
        Ok(raw) => raw,
        Err(first) => return Err(every_serde_error(first, &expanded, file, &index)),
    };
    present_but_empty_sections(&mut raw, &index);
    // `INFO` and `warning` are fine to write; what runs is the directive.
    if let Ok(directive) = log_directive(&raw.log.level) {
        raw.log.level = directive;
    }
    let mut errors: Vec<ConfigError> = index
        .duplicates
        .iter()
        .map(|dup| ConfigError {
            file: file.to_string(),
            line: Some(dup.at.line),
            column: Some(dup.at.column),
            path: dup.path.clone(),
            message: format!(
                "duplicate key (first set on line {}); only one may be given",
                dup.first.line
            ),
        })
        .collect();
    match validate::validate(raw, &index, file) {
        Ok(config) if errors.is_empty() => Ok(config),
        Ok(_) => Err(ConfigErrors(errors)),
        Err(invalid) => {
            errors.extend(invalid);
            errors.sort_by_key(|e| (e.line.unwrap_or(usize::MAX), e.column.unwrap_or(0)));
            Err(ConfigErrors(errors))
        }
    }
}

/// One typed read of `text`; its error placed as precisely as possible.
fn deserialize(
    text: &str,
    file: &str,
    index: &positions::PositionIndex,
) -> Result<raw::RawConfig, ConfigError> {
    let deserializer = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let mut error = serde_error(file, path, e.inner());
        // serde_yaml places errors raised by a value's own parser (a bad
        // duration, size or address) at the enclosing mapping; the index
        // knows where the value itself is. Unknown keys stay where serde_yaml
        // put them: on the key.
        if !error.message.starts_with("unknown key")
            && let Some(at) = index.locate_exact(&error.path)
        {
            error.line = Some(at.line);
            error.column = Some(at.column);
        }
        error
    })
}

/// serde stops at `first`; reading each part of the file alone finds the
/// errors in the other parts too.
fn every_serde_error(
    first: ConfigError,
    text: &str,
    file: &str,
    index: &positions::PositionIndex,
) -> ConfigErrors {
    let mut errors = vec![first];
    for variant in partial::variants(text, index) {
        // Blanking never breaks valid YAML, but stay safe if it ever does.
        if serde_yaml::from_str::<serde::de::IgnoredAny>(&variant).is_err() {
            continue;
        }
        if let Err(error) = deserialize(&variant, file, index)
            && !errors.contains(&error)
        {
            errors.push(error);
        }
    }
    errors.sort_by_key(|e| (e.line.unwrap_or(usize::MAX), e.column.unwrap_or(0)));
    ConfigErrors(errors)
}

/// `routes:` or `admin:` written without a value reads as null, which serde
/// turns into "absent"; but the operator wrote the key, and absent `routes`
/// means cachepump mode. A written key means the section is on, with defaults.
fn present_but_empty_sections(config: &mut raw::RawConfig, index: &positions::PositionIndex) {
    if config.routes.is_none() && index.contains("routes") {
        config.routes = Some(Vec::new());
    }
    if config.admin.is_none() && index.contains("admin") {
        config.admin = Some(AdminConfig {
            listen: default_admin_listen(),
            token: None,
            public_key_api: true,
            hosts: Vec::new(),
        });
    }
}

/// An error about `path` found after loading (a plugin that fails to compile,
/// say), placed at that path's line and column in `file` when it can be found.
/// The message is folded onto one line, so every error stays one line.
pub fn error_at(file: &Path, path: &str, message: impl Into<String>) -> ConfigError {
    let message: String = message.into();
    let at = std::fs::read_to_string(file)
        .ok()
        .and_then(|text| positions::PositionIndex::build(&text).locate(path));
    ConfigError {
        file: file.display().to_string(),
        line: at.map(|p| p.line),
        column: at.map(|p| p.column),
        path: path.to_string(),
        message: message.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

/// Warnings for a loaded `config` read from `file`: valid, but probably not
/// meant (a source with no provider, a route that can never match, ...).
pub fn warnings(file: &Path, config: &Config) -> Vec<ConfigError> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let index = positions::PositionIndex::build(&text);
    lint::lint(config, &index, &file.display().to_string())
}

/// [`warnings`] for config text (`file` names it).
pub fn warnings_str(text: &str, file: &str, config: &Config) -> Vec<ConfigError> {
    lint::lint(config, &positions::PositionIndex::build(text), file)
}

fn env_errors(text: &str, file: &str, errors: Vec<env::EnvError>) -> ConfigErrors {
    // The raw text usually still parses (`${X}` is a plain scalar), which
    // tells which key each reference belongs to.
    let index = positions::PositionIndex::build(text);
    ConfigErrors(
        errors
            .into_iter()
            .map(|e| ConfigError {
                file: file.to_string(),
                line: Some(e.line),
                column: Some(e.column),
                path: index
                    .path_at(e.line, e.column)
                    .unwrap_or_default()
                    .to_string(),
                message: e.message,
            })
            .collect(),
    )
}

fn serde_error(file: &str, path: String, error: &serde_yaml::Error) -> ConfigError {
    let location = error.location();
    let mut message = error.to_string();
    if let Some(at) = &location {
        let suffix = format!(" at line {} column {}", at.line(), at.column());
        if let Some(found) = message.find(&suffix) {
            message.replace_range(found..found + suffix.len(), "");
        }
    }
    ConfigError {
        file: file.to_string(),
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        message: explain(strip_path_prefix(&message, &path)),
        path,
    }
}

/// serde_yaml starts messages with its own idea of the path; ours is shown already.
fn strip_path_prefix<'m>(message: &'m str, path: &str) -> &'m str {
    if let Some((head, rest)) = message.split_once(": ")
        && !head.is_empty()
        && path.starts_with(head)
        && matches!(path[head.len()..].chars().next(), None | Some('.' | '['))
    {
        return rest;
    }
    message
}

/// Rewrites serde's "unknown field `x`, expected one of `a`, `b`" into an
/// operator's sentence with a did-you-mean hint.
fn explain(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("missing field `")
        && let Some(name) = rest.strip_suffix('`')
    {
        return format!("missing required key {name:?}");
    }
    let (what, rest) = if let Some(rest) = message.strip_prefix("unknown field ") {
        ("key", rest)
    } else if let Some(rest) = message.strip_prefix("unknown variant ") {
        ("value", rest)
    } else {
        return message.to_string();
    };
    let mut quoted = rest.split('`').skip(1).step_by(2);
    let Some(given) = quoted.next() else {
        return message.to_string();
    };
    let expected: Vec<&str> = quoted.collect();
    let mut out = format!("unknown {what} {given:?}");
    if let Some(close) = did_you_mean(given, expected.iter().copied()) {
        out.push_str(&format!(", did you mean {close:?}?"));
    }
    if expected.is_empty() {
        out.push_str(" (nothing is expected here)");
    } else {
        let label = if what == "key" {
            "valid keys"
        } else {
            "expected"
        };
        out.push_str(&format!(" ({label}: {})", expected.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_get_a_suggestion() {
        assert_eq!(
            explain("unknown field `upstreem`, expected one of `match`, `upstream`, `source`"),
            "unknown key \"upstreem\", did you mean \"upstream\"? (valid keys: match, upstream, source)"
        );
        assert_eq!(
            explain("unknown variant `jsn`, expected `text` or `json`"),
            "unknown value \"jsn\", did you mean \"json\"? (expected: text, json)"
        );
        assert_eq!(
            explain("invalid type: integer `3`"),
            "invalid type: integer `3`"
        );
    }

    #[test]
    fn serde_yaml_path_prefix_is_dropped_once() {
        assert_eq!(
            strip_path_prefix("routes[1]: unknown field", "routes[1].x"),
            "unknown field"
        );
        assert_eq!(
            strip_path_prefix("upstreams.a: missing field `servers`", "upstreams.a"),
            "missing field `servers`"
        );
        assert_eq!(
            strip_path_prefix("invalid type: map", "listen"),
            "invalid type: map"
        );
    }
}
