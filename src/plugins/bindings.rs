//! The only `bindgen!` of the host: Rust types and traits generated from
//! `wit/plugin.wit` for the two worlds. Both worlds share the `types` and
//! `log` interfaces, so the fetcher world reuses the transformer's.
//!
//! The transformer world is generated twice: async, for guests that import
//! WASI (their WASI calls may wait), and sync (`transformer_sync`), for
//! guests that import nothing but Larder's own interfaces: those run
//! without fibers. The sync world shares the `types` records.
//!
//! Must not hold logic: host behaviour lives in `host_imports.rs`.

pub mod transformer {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "transformer",
        imports: { default: async },
        exports: { default: async },
    });
}

pub mod transformer_sync {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "transformer",
        with: {
            "larder:plugin/types": super::transformer::larder::plugin::types,
        },
    });
}

pub mod fetcher {
    wasmtime::component::bindgen!({
        path: "wit",
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
