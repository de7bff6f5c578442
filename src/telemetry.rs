//! Logging (tracing, text or JSON) and the Prometheus metrics recorder.
