//! The guest side of a Larder plugin: the bindings of `wit/plugin.wit`, an
//! allocator, a panic handler that reports through `larder:plugin/log`, and
//! nothing from WASI.
//!
//! A plugin built on this crate is `#![no_std]` (with `alloc`): its
//! component imports only Larder's own interfaces, so Larder instantiates a
//! transformer as one core instance without a WASI context and calls it
//! without fibers, its fastest path. A crate that needs std (and so WASI)
//! still works, on the slower async path, but cannot use this crate, which
//! brings its own `#[panic_handler]`.
//!
//! ```ignore
//! #![no_std]
//! extern crate alloc;
//! use larder_plugin::transformer::{Guest, ...};
//! struct MyPlugin;
//! impl Guest for MyPlugin { ... }
//! larder_plugin::export_transformer!(MyPlugin);
//! ```
#![no_std]

extern crate alloc;
// The generated bindings name the runtime as `::larder_plugin::wit_bindgen`
// so that plugin crates need no `wit-bindgen` dependency of their own.
extern crate self as larder_plugin;

#[doc(hidden)]
pub use wit_bindgen;

/// The `transformer` world of `larder:plugin@0.2.0` (`wit/plugin.wit`):
/// implement [`transformer::Guest`] and export it with
/// [`export_transformer!`]. Read and change the message through
/// [`transformer::request`] and [`transformer::response`].
pub mod transformer {
    wit_bindgen::generate!({
        world: "transformer",
        path: "wit",
        runtime_path: "::larder_plugin::wit_bindgen::rt",
        pub_export_macro: true,
        export_macro_name: "export_transformer",
        default_bindings_module: "::larder_plugin::transformer",
    });

    pub use exports::larder::plugin::transform::{
        ContinueWith, DirectResponse, Guest, Phase, RequestAction,
    };
    pub use larder::plugin::log::{enabled, log};
    pub use larder::plugin::types::{Config, EditError, Headers, Hooks, LogLevel, PluginError};
    pub use larder::plugin::{request, response};

    /// `on-request`'s usual answer: carry on, cache key unchanged.
    pub fn carry_on() -> Result<RequestAction, PluginError> {
        Ok(RequestAction::Continue(ContinueWith {
            cache_key_extra: alloc::vec::Vec::new(),
        }))
    }
}

/// The `fetcher` world, still `larder:plugin@0.1.0` (`wit/0.1.0/plugin.wit`):
/// implement [`fetcher::Guest`] and export it with [`export_fetcher!`].
pub mod fetcher {
    wit_bindgen::generate!({
        world: "fetcher",
        path: "wit/0.1.0",
        runtime_path: "::larder_plugin::wit_bindgen::rt",
        pub_export_macro: true,
        export_macro_name: "export_fetcher",
        default_bindings_module: "::larder_plugin::fetcher",
    });

    pub use exports::larder::plugin::fetch::{FetchContext, FetchResult, Guest};
    pub use larder::plugin::log::{enabled, log};
    pub use larder::plugin::types::{Config, Headers, LogLevel, PluginError};
    pub use larder::plugin::{cache, http_client};
}

mod alloc_support;
mod global;

pub use fetcher::export_fetcher;
pub use global::Global;
pub use transformer::export_transformer;

/// Reports a panic through `larder:plugin/log` at error level (Larder keeps
/// the line with the failure report), then traps: Larder drops the
/// instance, counts a failure and applies the plugin's `on_error`.
#[cfg(target_family = "wasm")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    use alloc::string::ToString as _;
    transformer::log(transformer::LogLevel::Error, &info.to_string());
    core::arch::wasm32::unreachable()
}
