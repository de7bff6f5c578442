//! The `static` kind: the configured value, written on every firing.

use bytes::Bytes;

use super::run::Fetched;
use crate::config::StaticSource;

#[derive(Debug)]
pub struct StaticProvider {
    value: Bytes,
}

impl StaticProvider {
    pub fn new(config: &StaticSource) -> Self {
        Self {
            value: Bytes::from(config.value.clone()),
        }
    }

    pub fn fetch(&self) -> Fetched {
        Fetched::bytes(self.value.clone())
    }
}
