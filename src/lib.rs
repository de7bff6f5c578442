//! Larder: a caching reverse proxy with scheduled sources and sandboxed
//! WebAssembly plugins.
//!
//! The request path reads as one straight line through the modules:
//! `server` accepts, `proxy` routes and forwards, `plugins` transform,
//! `cache` looks up, coalesces and tees, `sources` answers scheduled datasets,
//! `admin` is the operator's side door. `config` turns the YAML file into the
//! plain data all of them are built from.

pub mod admin;
pub mod body;
pub mod cache;
pub mod config;
pub mod error;
pub mod plugins;
pub mod proxy;
pub mod server;
pub mod sources;
pub mod telemetry;
