//! The YAML configuration: schema, defaults, `${ENV}` interpolation and
//! validation with file, line, column and key path in every error.
//!
//! Owns turning text into a checked [`Config`]; must not start anything.

pub mod model;
pub mod units;

use std::fmt;
use std::path::Path;

pub use model::*;

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

/// Parses and checks config text; `file` names it in errors.
pub fn load_str(text: &str, file: &str) -> Result<Config, ConfigErrors> {
    let deserializer = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize::<_, Config>(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let location = inner.location();
        ConfigErrors(vec![ConfigError {
            file: file.to_string(),
            line: location.as_ref().map(|l| l.line()),
            column: location.as_ref().map(|l| l.column()),
            path: if path == "." { String::new() } else { path },
            message: inner.to_string(),
        }])
    })
}
