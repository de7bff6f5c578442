//! Scheduled sources (cachepump's idea): named datasets fetched on cron
//! schedules from static values, HTTP endpoints, files or fetcher plugins,
//! kept in memory as their last good value and served by key.
//!
//! Must never block the request path: serving reads an in-memory snapshot.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{Request, Response};

use crate::body::Body;
use crate::config::SourceConfig;
use crate::error::ProxyError;
use crate::plugins::PluginHost;

mod rule;

pub use rule::Rule;

/// The running sources: their schedules and their last good values.
pub struct Sources {
    _plugins: Arc<PluginHost>,
}

impl Sources {
    /// Starts the scheduler for `config` (fetching at start where configured).
    pub fn start(_config: &BTreeMap<String, SourceConfig>, plugins: Arc<PluginHost>) -> Arc<Self> {
        Arc::new(Self { _plugins: plugins })
    }

    /// Applies a reloaded `sources:` map: adds, removes and edits sources.
    pub fn apply(&self, _config: &BTreeMap<String, SourceConfig>) {}

    /// cachepump's API: `GET /?key=NAME`.
    pub fn serve_by_key<B>(&self, _request: &Request<B>) -> Response<Body> {
        ProxyError::NotFound("key is not found".into()).into_response()
    }

    /// A route with `source: NAME`.
    pub fn serve_source<B>(&self, name: &str, _request: &Request<B>) -> Response<Body> {
        ProxyError::NotFound(format!("source {name} has no value yet")).into_response()
    }

    /// `GET /sources` on the admin listener.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({})
    }

    /// Stops every schedule; in-flight runs are abandoned.
    pub async fn shutdown(&self) {}
}

/// Checks a schedule rule as `config` validation needs it (no scheduling).
pub fn validate_rule(rule: &str) -> Result<(), String> {
    Rule::parse(rule).map(|_| ())
}
