//! Listeners, connection tasks, graceful shutdown and the hot swap of the
//! running config. Knows nothing of caching.
