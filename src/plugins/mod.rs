//! Wasm plugins: one wasmtime engine, components compiled (and cached on
//! disk) at load, sandboxed instances per call, the WIT host imports, and the
//! failure policy (on_error, circuit breaker).
//!
//! Must not hand a plugin anything its config did not grant.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http::Response;

use crate::body::Body;
use crate::config::{PluginConfig, PluginPhase};
use crate::error::ProxyError;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin {plugin}: {reason}")]
    Load { plugin: String, reason: String },
    #[error("plugin {plugin} failed: {reason}")]
    Call { plugin: String, reason: String },
}

/// What a fetcher plugin's run produced.
#[derive(Debug, Clone)]
pub enum FetchOutcome {
    Updated {
        content_type: Option<String>,
        body: Bytes,
    },
    NotModified,
}

/// What a fetcher is told about the run it is asked to make.
#[derive(Debug, Clone)]
pub struct FetchContext {
    pub source: String,
    /// Unix seconds of the tick that started this run.
    pub scheduled_at: u64,
    pub previous_etag: Option<String>,
    /// The source's `plugin.config`, merged over the plugin's own config.
    pub config: BTreeMap<String, String>,
}

/// Every loaded plugin; lives across reloads and swaps plugins in place.
pub struct PluginHost {}

impl PluginHost {
    /// Compiles every plugin and probes its `init` with its config.
    pub async fn load(_config: &BTreeMap<String, PluginConfig>) -> Result<Arc<Self>, PluginError> {
        Ok(Arc::new(Self {}))
    }

    /// Applies a reloaded `plugins:` map; a plugin that fails to load keeps its old build.
    pub async fn apply(&self, _config: &BTreeMap<String, PluginConfig>) -> Result<(), PluginError> {
        Ok(())
    }

    /// Runs `on-request` of each plugin in `chain`, in order. `Some(response)`
    /// means a plugin answered directly and the request goes no further.
    pub async fn on_request(
        &self,
        _chain: &[String],
        _request: &mut http::request::Parts,
    ) -> Result<Option<Response<Body>>, ProxyError> {
        Ok(None)
    }

    /// Runs `on-response` of the plugins in `chain` configured for `phase`.
    pub async fn on_response(
        &self,
        _chain: &[String],
        _phase: PluginPhase,
        _request: &http::request::Parts,
        response: Response<Body>,
    ) -> Result<Response<Body>, ProxyError> {
        Ok(response)
    }

    /// One run of a fetcher plugin for a source.
    pub async fn fetch(
        &self,
        plugin: &str,
        _context: FetchContext,
    ) -> Result<FetchOutcome, PluginError> {
        Err(PluginError::Call {
            plugin: plugin.to_string(),
            reason: "fetcher plugins are not implemented yet".to_string(),
        })
    }
}
