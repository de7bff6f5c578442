//! The `file` kind: the whole file, read on every firing. A read error keeps
//! the old value (the runner's job); this only reports it.

use std::path::PathBuf;

use bytes::Bytes;

use super::run::{Fetched, SourceError};
use crate::config::FileSource;

#[derive(Debug)]
pub struct FileProvider {
    path: PathBuf,
}

impl FileProvider {
    pub fn new(config: &FileSource) -> Self {
        Self {
            path: config.path.clone(),
        }
    }

    pub async fn fetch(&self) -> Result<Fetched, SourceError> {
        tokio::fs::read(&self.path)
            .await
            .map(|bytes| Fetched::bytes(Bytes::from(bytes)))
            .map_err(|e| SourceError::File {
                path: self.path.display().to_string(),
                reason: e.to_string(),
            })
    }
}
