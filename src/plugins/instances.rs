//! Transformer instances a request's `on-request` made, parked for the same
//! request's `on-response`.
//!
//! Must not hand an instance to another request than the one that made it
//! (unless its plugin says `reuse: true`).

use std::sync::Arc;

use super::engine::PluginEngine;
use super::loader::{LoadedPlugin, TransformerInstance};

/// The fresh instances a request's plugins made in `on-request`, kept for
/// the same request's `on-response` so that one request pays one
/// instantiation per plugin rather than two. Owned by the request's plugin
/// state; dropping it (request done or abandoned) frees the slots.
#[derive(Default)]
pub struct ParkedInstances(Vec<Parked>);

struct Parked {
    plugin: Arc<LoadedPlugin>,
    instance: TransformerInstance,
    /// One of [`PluginEngine::parking`]'s permits, given back on drop.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl ParkedInstances {
    /// Keeps `instance` of `plugin` for this request if the engine has a
    /// parking permit left; otherwise drops it.
    pub fn park(
        &mut self,
        engine: &PluginEngine,
        plugin: &Arc<LoadedPlugin>,
        instance: TransformerInstance,
    ) {
        let Ok(permit) = engine.parking.clone().try_acquire_owned() else {
            return;
        };
        self.0.push(Parked {
            plugin: plugin.clone(),
            instance,
            _permit: permit,
        });
    }

    /// The instance this request parked for exactly this build of `plugin`
    /// (a reload in between means a new build and a new instance).
    pub fn take(&mut self, plugin: &LoadedPlugin) -> Option<TransformerInstance> {
        let index = self
            .0
            .iter()
            .position(|parked| std::ptr::eq(Arc::as_ptr(&parked.plugin), plugin))?;
        Some(self.0.swap_remove(index).instance)
    }
}
