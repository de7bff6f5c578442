// The shared body of the fault fixtures (`spin-forever`, `eat-memory`,
// `panic`): each crate defines `fn fault()` and then `include!`s this file, so
// the three differ only in how they fail. They are built on the SDK (no
// std, no WASI), so they fail on Larder's sync path; `misbehave` and
// `misfetch` keep std and exercise the WASI (async) path.
//
// Config `when`: `request` (default) fails in on-request, `response` in
// on-response, `init` in init (the probe at load fails), `never` passes
// through. `mib` sets how much `eat-memory` allocates.

use alloc::format;

use larder_plugin::Global;
use larder_plugin::transformer::{
    Config, Guest, Hooks, Phase, PluginError, RequestAction, carry_on,
};

#[derive(Clone, Copy, PartialEq)]
enum When {
    Request,
    Response,
    Never,
}

static WHEN: Global<When> = Global::new(When::Request);
/// How many MiB `eat-memory` tries to allocate (config `mib`).
static MIB: Global<usize> = Global::new(1024);

struct Fault;

impl Guest for Fault {
    fn init(cfg: Config) -> Result<Hooks, PluginError> {
        for (key, value) in cfg {
            match (key.as_str(), value.as_str()) {
                ("when", "request") => WHEN.set(When::Request),
                ("when", "response") => WHEN.set(When::Response),
                ("when", "never") => WHEN.set(When::Never),
                ("when", "init") => fault(),
                ("mib", mib) => MIB.set(mib.parse().map_err(|_| {
                    PluginError::InvalidConfig(format!("mib: `{mib}` is not a number"))
                })?),
                _ => {
                    return Err(PluginError::InvalidConfig(format!(
                        "unknown setting {key}={value}"
                    )));
                }
            }
        }
        Ok(Hooks::ON_REQUEST | Hooks::ON_RESPONSE)
    }

    fn on_request() -> Result<RequestAction, PluginError> {
        if WHEN.with(|when| *when) == When::Request {
            fault();
        }
        carry_on()
    }

    fn on_response(_phase: Phase) -> Result<(), PluginError> {
        if WHEN.with(|when| *when) == When::Response {
            fault();
        }
        Ok(())
    }
}

larder_plugin::export_transformer!(Fault);
