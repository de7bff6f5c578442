//! `answer-direct`: answers requests that lack a header itself, without the
//! upstream. Config: `require` (header name, default `authorization`),
//! `status` (default `403`).
//!
//! Built on the `larder-plugin` SDK: it reads one request header through a
//! host call and declares only `on-request`.
#![no_std]

extern crate alloc;

use alloc::format;
use alloc::string::{String, ToString as _};
use alloc::vec;

use larder_plugin::Global;
use larder_plugin::transformer::{
    Config, DirectResponse, Guest, Hooks, LogLevel, Phase, PluginError, RequestAction, carry_on,
    log, request,
};

struct Settings {
    require: String,
    status: u16,
}

static SETTINGS: Global<Option<Settings>> = Global::new(None);

struct AnswerDirect;

impl Guest for AnswerDirect {
    fn init(cfg: Config) -> Result<Hooks, PluginError> {
        let mut settings = Settings {
            require: "authorization".to_string(),
            status: 403,
        };
        for (key, value) in cfg {
            match key.as_str() {
                "require" => settings.require = value.trim().to_ascii_lowercase(),
                "status" => {
                    settings.status = value
                        .trim()
                        .parse()
                        .ok()
                        .filter(|status| (100..600).contains(status))
                        .ok_or_else(|| {
                            PluginError::InvalidConfig(format!(
                                "status: `{value}` is not an HTTP status"
                            ))
                        })?
                }
                other => {
                    return Err(PluginError::InvalidConfig(format!("unknown key `{other}`")));
                }
            }
        }
        SETTINGS.set(Some(settings));
        Ok(Hooks::ON_REQUEST)
    }

    fn on_request() -> Result<RequestAction, PluginError> {
        SETTINGS.with(|settings| {
            let Some(settings) = settings else {
                return carry_on();
            };
            if request::header(&settings.require).is_some() {
                return carry_on();
            }
            log(
                LogLevel::Info,
                &format!(
                    "refusing {} {}: no {} header",
                    request::method(),
                    request::path_with_query(),
                    settings.require
                ),
            );
            Ok(RequestAction::Respond(DirectResponse {
                status: settings.status,
                headers: vec![("content-type".to_string(), b"text/plain".to_vec())],
                body: format!("missing {} header\n", settings.require).into_bytes(),
            }))
        })
    }

    fn on_response(_phase: Phase) -> Result<(), PluginError> {
        Ok(())
    }
}

larder_plugin::export_transformer!(AnswerDirect);
