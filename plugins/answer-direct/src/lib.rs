//! `answer-direct`: answers requests that lack a header itself, without the
//! upstream. Config: `require` (header name, default `authorization`),
//! `status` (default `403`).

use std::cell::RefCell;

wit_bindgen::generate!({ world: "transformer", path: "../../wit" });

use exports::larder::plugin::transform::{
    DirectResponse, Guest, Phase, RequestAction, RequestOut, ResponseOut,
};
use larder::plugin::log::log;
use larder::plugin::types::{Config, LogLevel, PluginError, RequestHead, ResponseHead};

struct Settings {
    require: String,
    status: u16,
}

thread_local! {
    static SETTINGS: RefCell<Settings> = RefCell::new(Settings {
        require: "authorization".to_string(),
        status: 403,
    });
}

struct AnswerDirect;

impl Guest for AnswerDirect {
    fn init(cfg: Config) -> Result<(), PluginError> {
        SETTINGS.with(|s| {
            let mut settings = s.borrow_mut();
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
            Ok(())
        })
    }

    fn on_request(req: RequestHead) -> Result<RequestAction, PluginError> {
        SETTINGS.with(|s| {
            let settings = s.borrow();
            if req
                .headers
                .iter()
                .any(|(name, _)| *name == settings.require)
            {
                return Ok(RequestAction::Continue(RequestOut {
                    head: req,
                    cache_key_extra: Vec::new(),
                }));
            }
            log(
                LogLevel::Info,
                &format!(
                    "refusing {} {}: no {} header",
                    req.method, req.path_with_query, settings.require
                ),
            );
            Ok(RequestAction::Respond(DirectResponse {
                head: ResponseHead {
                    status: settings.status,
                    headers: vec![("content-type".to_string(), b"text/plain".to_vec())],
                },
                body: format!("missing {} header\n", settings.require).into_bytes(),
            }))
        })
    }

    fn on_response(
        _phase: Phase,
        _req: RequestHead,
        resp: ResponseHead,
        _body: Option<Vec<u8>>,
    ) -> Result<ResponseOut, PluginError> {
        Ok(ResponseOut {
            head: resp,
            body: None,
        })
    }
}

export!(AnswerDirect);
