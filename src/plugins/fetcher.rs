//! Fetcher calls: one fresh instance per run, `init` with the plugin's
//! config merged under the source's, then `run`, with the read-only view of
//! the plugin's own source values the sources lend it (the `cache` import).
//!
//! Must not decide what a failed run means for the source: the sources
//! module applies its stale-on-error rules.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use super::bindings::fetcher::exports::larder::plugin::fetch::{
    FetchContext as WitContext, FetchResult,
};
use super::call::{Failure, FailureKind, Turn, settle};
use super::engine::PluginEngine;
use super::loader::{Kind, LoadedPlugin};
use super::store::{CallStyle, new_store};
use super::{FetchContext, FetchOutcome, SourceValues};

/// One run of a fetcher for one source.
pub async fn run(
    engine: &PluginEngine,
    plugin: &LoadedPlugin,
    values: Arc<dyn SourceValues>,
    context: FetchContext,
    turn: Turn,
) -> Result<FetchOutcome, Failure> {
    let Kind::Fetcher(pre) = &plugin.kind else {
        return Err(Failure::new(
            FailureKind::Error,
            "is a transformer; a source needs a fetcher plugin",
        ));
    };
    let mut config: BTreeMap<String, String> = plugin.config.config.clone();
    config.extend(context.config);
    let config: Vec<(String, String)> = config.into_iter().collect();
    let wit_context = WitContext {
        source_id: context.source.clone(),
        scheduled_at: context.scheduled_at,
        previous_etag: context.previous_etag,
    };
    let limit = plugin.backstop();
    let cpu = plugin.cpu_meter();
    let call = async {
        let _slots = turn.instance_slots(engine, plugin.weight).await?;
        let grants = plugin.grants(engine, Some(values));
        let mut store = new_store(&engine.engine, grants, cpu.clone(), CallStyle::Async);
        let bindings = pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| Failure::from_wasmtime(e, &store))?;
        let guest = bindings.larder_plugin_fetch();
        let init = guest.call_init(&mut store, &config).await;
        settle(init, &store, "init")?;
        let result = guest.call_run(&mut store, &wit_context).await;
        settle(result, &store, "run")
    };
    let result = tokio::time::timeout(limit, cpu.run(call))
        .await
        .unwrap_or_else(|_| Err(Failure::timed_out(limit)))?;
    Ok(match result {
        FetchResult::NotModified => FetchOutcome::NotModified,
        FetchResult::Updated((headers, body)) => {
            let content_type = headers
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
                .and_then(|(_, value)| String::from_utf8(value.clone()).ok());
            FetchOutcome::Updated {
                content_type,
                body: Bytes::from(body),
                headers,
            }
        }
    })
}
