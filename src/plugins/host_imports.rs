//! The host side of the WIT imports: `log`, `http-client` and `cache`,
//! implemented on a store's [`StoreState`].
//!
//! Must not let a guest reach beyond its grants: no grant, no call.

use std::time::Duration;

use super::bindings::LogLevel;
use super::bindings::fetcher::larder::plugin::{cache, http_client};
use super::bindings::transformer::larder::plugin::{log, types};
use super::bindings::transformer_v2::larder::plugin::{
    log as log_v2, request as request_v2, response as response_v2, types as types_v2,
};
use super::exchange::{EditError, Side};
use super::http_client::{self as client, OutboundRequest, SendError};
use super::store::StoreState;

/// Longest log message kept from a guest.
const MAX_MESSAGE_BYTES: usize = 4096;
/// Log calls per call of the guest; the rest is dropped.
const MAX_LOG_CALLS: u32 = 200;

impl types::Host for StoreState {}

fn tracing_level(level: LogLevel) -> tracing::Level {
    match level {
        LogLevel::Trace => tracing::Level::TRACE,
        LogLevel::Debug => tracing::Level::DEBUG,
        LogLevel::Info => tracing::Level::INFO,
        LogLevel::Warn => tracing::Level::WARN,
        LogLevel::Error => tracing::Level::ERROR,
    }
}

/// Shortened to [`MAX_MESSAGE_BYTES`], control characters escaped so a guest
/// cannot forge log lines.
fn sanitize(message: String) -> String {
    let message = truncate(message);
    if message.chars().any(char::is_control) {
        super::output::escape_controls(&message)
    } else {
        message
    }
}

fn truncate(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

fn log_enabled(level: LogLevel) -> bool {
    match tracing_level(level) {
        tracing::Level::TRACE => tracing::enabled!(tracing::Level::TRACE),
        tracing::Level::DEBUG => tracing::enabled!(tracing::Level::DEBUG),
        tracing::Level::INFO => tracing::enabled!(tracing::Level::INFO),
        tracing::Level::WARN => tracing::enabled!(tracing::Level::WARN),
        _ => tracing::enabled!(tracing::Level::ERROR),
    }
}

impl StoreState {
    fn write_log(&mut self, level: LogLevel, message: String) {
        self.log_lines += 1;
        if self.log_lines > MAX_LOG_CALLS {
            return;
        }
        let message = sanitize(message);
        if level == LogLevel::Error {
            // A guest without WASI has no stderr: its error lines (a panic
            // message among them) go with the failure report instead.
            self.output.note_error(&message);
        }
        let plugin = &*self.plugin;
        match level {
            LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            LogLevel::Info => tracing::info!(plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
    }
}

impl log::Host for StoreState {
    async fn enabled(&mut self, level: LogLevel) -> bool {
        log_enabled(level)
    }

    async fn log(&mut self, level: LogLevel, message: String) {
        self.write_log(level, message);
    }
}

impl types_v2::Host for StoreState {}

fn level_v1(level: types_v2::LogLevel) -> LogLevel {
    match level {
        types_v2::LogLevel::Trace => LogLevel::Trace,
        types_v2::LogLevel::Debug => LogLevel::Debug,
        types_v2::LogLevel::Info => LogLevel::Info,
        types_v2::LogLevel::Warn => LogLevel::Warn,
        types_v2::LogLevel::Error => LogLevel::Error,
    }
}

impl log_v2::Host for StoreState {
    fn enabled(&mut self, level: types_v2::LogLevel) -> bool {
        log_enabled(level_v1(level))
    }

    fn log(&mut self, level: types_v2::LogLevel, message: String) {
        self.write_log(level_v1(level), message);
    }
}

fn edit_error(error: EditError) -> types_v2::EditError {
    match error {
        EditError::InvalidName => types_v2::EditError::InvalidName,
        EditError::InvalidValue => types_v2::EditError::InvalidValue,
        EditError::Forbidden => types_v2::EditError::Forbidden,
        EditError::NotAllowed => types_v2::EditError::NotAllowed,
        EditError::TooLarge => types_v2::EditError::TooLarge,
    }
}

type Edit = Result<(), types_v2::EditError>;

impl request_v2::Host for StoreState {
    fn method(&mut self) -> String {
        self.exchange.method()
    }

    fn set_method(&mut self, method: String) -> Edit {
        self.exchange.set_method(&method).map_err(edit_error)
    }

    fn path_with_query(&mut self) -> String {
        self.exchange.path_with_query()
    }

    fn set_path_with_query(&mut self, path_with_query: String) -> Edit {
        self.exchange
            .set_path_with_query(&path_with_query)
            .map_err(edit_error)
    }

    fn authority(&mut self) -> Option<String> {
        self.exchange.authority()
    }

    fn header(&mut self, name: String) -> Option<Vec<u8>> {
        self.exchange.header(Side::Request, &name)
    }

    fn header_all(&mut self, name: String) -> Vec<Vec<u8>> {
        self.exchange.header_all(Side::Request, &name)
    }

    fn all_headers(&mut self) -> Vec<(String, Vec<u8>)> {
        self.exchange.all_headers(Side::Request)
    }

    fn set_header(&mut self, name: String, value: Vec<u8>) -> Edit {
        self.exchange
            .set_header(Side::Request, &name, value)
            .map_err(edit_error)
    }

    fn append_header(&mut self, name: String, value: Vec<u8>) -> Edit {
        self.exchange
            .append_header(Side::Request, &name, value)
            .map_err(edit_error)
    }

    fn remove_header(&mut self, name: String) -> Edit {
        self.exchange
            .remove_header(Side::Request, &name)
            .map_err(edit_error)
    }
}

impl response_v2::Host for StoreState {
    fn status(&mut self) -> u16 {
        self.exchange.status()
    }

    fn set_status(&mut self, status: u16) -> Edit {
        self.exchange.set_status(status).map_err(edit_error)
    }

    fn header(&mut self, name: String) -> Option<Vec<u8>> {
        self.exchange.header(Side::Response, &name)
    }

    fn header_all(&mut self, name: String) -> Vec<Vec<u8>> {
        self.exchange.header_all(Side::Response, &name)
    }

    fn all_headers(&mut self) -> Vec<(String, Vec<u8>)> {
        self.exchange.all_headers(Side::Response)
    }

    fn set_header(&mut self, name: String, value: Vec<u8>) -> Edit {
        self.exchange
            .set_header(Side::Response, &name, value)
            .map_err(edit_error)
    }

    fn append_header(&mut self, name: String, value: Vec<u8>) -> Edit {
        self.exchange
            .append_header(Side::Response, &name, value)
            .map_err(edit_error)
    }

    fn remove_header(&mut self, name: String) -> Edit {
        self.exchange
            .remove_header(Side::Response, &name)
            .map_err(edit_error)
    }

    fn body(&mut self) -> Option<Vec<u8>> {
        self.exchange.body()
    }

    fn set_body(&mut self, body: Vec<u8>) -> Edit {
        self.exchange.set_body(body).map_err(edit_error)
    }

    fn set_ttl(&mut self, seconds: u32) -> Edit {
        self.exchange.set_ttl(seconds).map_err(edit_error)
    }

    fn add_tags(&mut self, tags: Vec<String>) -> Edit {
        self.exchange.add_tags(tags).map_err(edit_error)
    }
}

impl http_client::Host for StoreState {
    async fn send(
        &mut self,
        request: http_client::OutgoingRequest,
    ) -> Result<http_client::IncomingResponse, http_client::HttpError> {
        let plugin = self.plugin.clone();
        // Waiting on the network is not CPU: the meter charges only the
        // polls, so the host's own work for the call is the guest's.
        let result = self.send_checked(request).await;
        match result {
            Ok(response) => Ok(response),
            Err(error) => {
                tracing::warn!(plugin = &*plugin, %error, "plugin http-client call failed");
                Err(to_wit_error(error))
            }
        }
    }
}

impl StoreState {
    async fn send_checked(
        &mut self,
        request: http_client::OutgoingRequest,
    ) -> Result<http_client::IncomingResponse, SendError> {
        let Some(grant) = self.http.as_mut() else {
            return Err(SendError::Denied(
                "this plugin has no http-client grant".to_string(),
            ));
        };
        if grant.requests_made >= client::MAX_REQUESTS_PER_CALL {
            return Err(SendError::TooManyRequests);
        }
        grant.requests_made += 1;
        let url = grant.allow.check(&request.url)?;
        let timeout = request
            .timeout_ms
            .map(|ms| Duration::from_millis(u64::from(ms)))
            .unwrap_or(client::REQUEST_TIMEOUT)
            .min(client::REQUEST_TIMEOUT);
        tracing::debug!(plugin = &*self.plugin, method = %request.method, %url, "plugin http-client call");
        let response = client::send(OutboundRequest {
            method: request.method,
            url,
            headers: request.headers,
            body: request.body,
            timeout,
        })
        .await?;
        Ok(http_client::IncomingResponse {
            status: response.status,
            headers: response.headers,
            body: response.body.to_vec(),
        })
    }
}

fn to_wit_error(error: SendError) -> http_client::HttpError {
    use http_client::HttpError;
    match error {
        SendError::Denied(why) => HttpError::Denied(why),
        SendError::Timeout => HttpError::Timeout,
        SendError::TooLarge => HttpError::TooLarge,
        SendError::Connection(why) => HttpError::Connection(why),
        SendError::InvalidRequest(why) => HttpError::InvalidRequest(why),
        SendError::TooManyRequests => HttpError::TooManyRequests,
    }
}

impl cache::Host for StoreState {
    async fn get(&mut self, key: String) -> Option<cache::Entry> {
        let value = self.source_values.as_ref()?.get(&key)?;
        Some(cache::Entry {
            headers: value.headers.clone(),
            body: value.body.to_vec(),
            age_seconds: u32::try_from(value.produced_at.elapsed().as_secs()).unwrap_or(u32::MAX),
        })
    }
}
