//! The only `bindgen!` of the host: Rust types and traits generated from
//! `wit/plugin.wit` for the two worlds. Both worlds share the `types` and
//! `log` interfaces, so the fetcher world reuses the transformer's.
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
