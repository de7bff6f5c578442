//! The `plugin` kind: one call of a fetcher plugin per run. The plugin host
//! owns the sandbox, its limits and merging the plugin's own config under
//! the source's `plugin.config`.

use std::collections::BTreeMap;

use super::run::{Fetched, RunInput, SourceError};
use crate::config::PluginSource;
use crate::plugins::{FetchContext, FetchOutcome};

#[derive(Debug)]
pub struct PluginProvider {
    plugin: String,
    config: BTreeMap<String, String>,
}

impl PluginProvider {
    pub fn new(config: &PluginSource) -> Self {
        Self {
            plugin: config.name.clone(),
            config: config.config.clone(),
        }
    }

    pub async fn fetch(&self, input: RunInput<'_>) -> Result<Fetched, SourceError> {
        let context = FetchContext {
            source: input.source.to_string(),
            scheduled_at: input.scheduled_at,
            previous_etag: input.previous_etag,
            config: self.config.clone(),
        };
        match input
            .plugins
            .fetch(&self.plugin, context, input.values)
            .await
        {
            Ok(FetchOutcome::Updated {
                content_type,
                body,
                headers,
            }) => Ok(Fetched::Updated {
                body,
                content_type,
                headers,
            }),
            Ok(FetchOutcome::NotModified) => Ok(Fetched::NotModified),
            Err(e) => Err(SourceError::Plugin(e.to_string())),
        }
    }
}
