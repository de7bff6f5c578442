//! Where a source's bytes come from: the four kinds behind one enum, chosen
//! from a `SourceConfig` the way cachepump chose (first set wins, in the
//! order static, http, file, plugin), and the errors a fetch can end in.
//!
//! Must not touch the stored value: a fetch only returns bytes or an error,
//! the runner decides what to keep.

use std::time::Duration;

use super::file::FileProvider;
use super::http::{HttpClient, HttpProvider};
use super::plugin::PluginProvider;
use super::run::{Fetched, RunInput, SourceError};
use super::r#static::StaticProvider;
use crate::config::SourceConfig;

/// The provider a source uses.
#[derive(Debug)]
pub enum Provider {
    Static(StaticProvider),
    Http(Box<HttpProvider>),
    File(FileProvider),
    Plugin(PluginProvider),
    Unsupported,
}

impl Provider {
    /// cachepump's order: the first provider that is set wins. An empty
    /// `static.value`, `http.endpoint`, `file.path` or `plugin.name` is unset.
    pub fn from_config(config: &SourceConfig, client: &HttpClient) -> Self {
        if let Some(source) = config.static_.as_ref().filter(|s| !s.value.is_empty()) {
            return Self::Static(StaticProvider::new(source));
        }
        if let Some((source, endpoint)) = config
            .http
            .as_ref()
            .and_then(|s| s.endpoint.as_ref().map(|endpoint| (s, endpoint)))
        {
            let accept = config.accept_status.clone();
            return Self::Http(Box::new(HttpProvider::new(
                source,
                endpoint,
                accept,
                client.clone(),
            )));
        }
        if let Some(source) = config
            .file
            .as_ref()
            .filter(|s| !s.path.as_os_str().is_empty())
        {
            return Self::File(FileProvider::new(source));
        }
        if let Some(source) = config.plugin.as_ref().filter(|s| !s.name.is_empty()) {
            return Self::Plugin(PluginProvider::new(source));
        }
        Self::Unsupported
    }

    /// The kind's name as config and status spell it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Static(_) => "static",
            Self::Http(_) => "http",
            Self::File(_) => "file",
            Self::Plugin(_) => "plugin",
            Self::Unsupported => "none",
        }
    }

    /// One fetch, bounded by `timeout`.
    pub async fn fetch(
        &self,
        input: RunInput<'_>,
        timeout: Duration,
    ) -> Result<Fetched, SourceError> {
        let fetch = async {
            match self {
                Self::Static(provider) => Ok(provider.fetch()),
                Self::Http(provider) => provider.fetch().await,
                Self::File(provider) => provider.fetch().await,
                Self::Plugin(provider) => provider.fetch(input).await,
                Self::Unsupported => Err(SourceError::NoProvider),
            }
        };
        tokio::time::timeout(timeout, fetch)
            .await
            .unwrap_or(Err(SourceError::Timeout(timeout)))
    }
}
