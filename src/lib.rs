//! Larder: a caching reverse proxy with scheduled sources and sandboxed
//! WebAssembly plugins.
//!
//! A request's path: `app` accepts it, `proxy` runs it through named phases
//! (route, prepare, on-request plugins, target, on-response plugins,
//! respond), asking `plugins` to transform it, `cache` to answer it (with an
//! origin the proxy hands over) or `sources` for a dataset, and `upstream`
//! to forward it; `shared` is the Redis behind the cache when several
//! instances share one. `admin` is the operator's side door. Below them all,
//! `config` turns the YAML file into typed settings, `schedule` reads cron
//! rules, `http` holds the body type, the client-facing error and header
//! rules, and `watch` watches files. docs/architecture.md draws the whole.

pub mod admin;
pub mod app;
pub mod cache;
pub mod config;
pub mod http;
pub mod plugin_kit;
pub mod plugins;
pub mod proxy;
pub mod schedule;
pub mod shared;
pub mod sources;
pub mod telemetry;
pub mod top;
pub mod traffic;
pub mod upstream;
pub mod watch;
