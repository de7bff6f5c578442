//! The operator listener: /health, /ready, /metrics, purge, sources status.
//!
//! Binds to loopback unless configured otherwise; anything beyond /health and
//! /ready needs the bearer token.
