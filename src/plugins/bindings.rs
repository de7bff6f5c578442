//! The only `bindgen!` of the host: Rust types and traits generated from
//! the WIT. Must not hold logic: host behaviour lives in `host_imports.rs`.
//!
//! - `transformer_v2` (`wit/plugin.wit`, `larder:plugin@0.2.0`), sync: the
//!   host imports of 0.2.0 (all of them sync: none waits), and the exports
//!   as plain calls, for guests that import nothing else (no fibers).
//! - `transformer_v2_async`: the same world with async exports, for 0.2.0
//!   guests that import WASI (whose host side may wait). Its imports are
//!   `transformer_v2`'s, so one implementation serves both.
//! - `transformer` and `fetcher` (`wit/0.1.0/plugin.wit`): 0.1.0, async.
//!   Both 0.1.0 worlds share the `types` and `log` interfaces.

pub mod transformer_v2 {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "transformer",
    });
}

pub mod transformer_v2_async {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "transformer",
        exports: { default: async },
        with: {
            "larder:plugin/types": super::transformer_v2::larder::plugin::types,
            "larder:plugin/log": super::transformer_v2::larder::plugin::log,
            "larder:plugin/request": super::transformer_v2::larder::plugin::request,
            "larder:plugin/response": super::transformer_v2::larder::plugin::response,
        },
    });
}

pub mod transformer {
    wasmtime::component::bindgen!({
        path: "wit/0.1.0",
        world: "transformer",
        imports: { default: async },
        exports: { default: async },
    });
}

pub mod fetcher {
    wasmtime::component::bindgen!({
        path: "wit/0.1.0",
        world: "fetcher",
        imports: { default: async },
        exports: { default: async },
        with: {
            "larder:plugin/types": super::transformer::larder::plugin::types,
            "larder:plugin/log": super::transformer::larder::plugin::log,
        },
    });
}

pub use transformer::larder::plugin::types::{LogLevel, PluginError as GuestError};
