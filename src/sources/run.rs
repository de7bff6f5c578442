//! What one run of a source's provider takes and gives: its inputs beyond
//! the provider's settings, the bytes it fetched, or why it kept the old
//! value. Shared by the provider kinds; must not fetch anything itself.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::plugins::{PluginHost, SourceValues};

/// What one run produced.
#[derive(Debug)]
pub enum Fetched {
    Updated {
        body: Bytes,
        content_type: Option<String>,
        /// A fetcher plugin's headers, kept for its view of its own values.
        headers: Vec<(String, Vec<u8>)>,
    },
    /// A fetcher plugin said the value it has is still current.
    NotModified,
}

impl Fetched {
    pub fn bytes(body: Bytes) -> Self {
        Self::Updated {
            body,
            content_type: None,
            headers: Vec::new(),
        }
    }
}

/// Why a run kept the old value.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "source has no supported provider (set one of static.value, http.endpoint, file.path, plugin.name)"
    )]
    NoProvider,
    #[error("request to {endpoint} failed: {reason}")]
    Request { endpoint: String, reason: String },
    #[error("{endpoint} answered status {status}, which is not accepted; the old value is kept")]
    Status { endpoint: String, status: u16 },
    #[error("request to {endpoint} stopped after 10 redirects")]
    TooManyRedirects { endpoint: String },
    #[error(
        "{endpoint} answered with a body over the limit of {limit} bytes (http.max_body); the old value is kept"
    )]
    TooLarge { endpoint: String, limit: u64 },
    #[error("{endpoint} redirected from https to http; credentials are not sent in the clear")]
    InsecureRedirect { endpoint: String },
    #[error("cannot read {path}: {reason}")]
    File { path: String, reason: String },
    #[error("{0}")]
    Plugin(String),
    #[error("no result within the source's timeout of {0:?}")]
    Timeout(Duration),
}

impl SourceError {
    /// A source without a provider fails the same way on every retry;
    /// it waits for a reload instead.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::NoProvider)
    }
}

/// The inputs of one run that are not part of the provider's settings.
pub struct RunInput<'a> {
    pub source: &'a str,
    /// Unix seconds of the tick that started the run.
    pub scheduled_at: u64,
    pub previous_etag: Option<String>,
    pub plugins: &'a PluginHost,
    /// What a fetcher plugin may read of its own sources' values.
    pub values: Arc<dyn SourceValues>,
}
