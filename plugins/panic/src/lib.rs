//! `panic` (test fixture): panics, to prove a trap is contained and its message logged.
//!
//! Config `when`: `request` (default) fails in on-request, `response` in
//! on-response, `init` in init (the probe at load fails), `never` passes through.

use std::cell::Cell;

wit_bindgen::generate!({ world: "transformer", path: "../../wit" });

use exports::larder::plugin::transform::{Guest, Phase, RequestAction, RequestOut, ResponseOut};
use larder::plugin::types::{Config, PluginError, RequestHead, ResponseHead};

#[derive(Clone, Copy, PartialEq)]
enum When {
    Request,
    Response,
    Never,
}

thread_local! {
    static WHEN: Cell<When> = const { Cell::new(When::Request) };
    static MIB: Cell<usize> = const { Cell::new(1024) };
}

#[allow(dead_code)]
fn fault_spin() {
    let mut counter: u64 = 0;
    loop {
        counter = std::hint::black_box(counter.wrapping_add(1));
    }
}

#[allow(dead_code)]
fn fault_eat() {
    let mut kept: Vec<Vec<u8>> = Vec::new();
    for _ in 0..MIB.get() {
        kept.push(vec![1u8; 1 << 20]);
    }
    std::hint::black_box(&kept);
}

#[allow(dead_code)]
fn fault_panic() {
    panic!("boom: deliberate panic from the panic test plugin");
}

fn fault() {
    fault_panic()
}

struct Fault;

impl Guest for Fault {
    fn init(cfg: Config) -> Result<(), PluginError> {
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
        Ok(())
    }

    fn on_request(req: RequestHead) -> Result<RequestAction, PluginError> {
        if WHEN.get() == When::Request {
            fault();
        }
        Ok(RequestAction::Continue(RequestOut {
            head: req,
            cache_key_extra: Vec::new(),
        }))
    }

    fn on_response(
        _phase: Phase,
        _req: RequestHead,
        resp: ResponseHead,
        _body: Option<Vec<u8>>,
    ) -> Result<ResponseOut, PluginError> {
        if WHEN.get() == When::Response {
            fault();
        }
        Ok(ResponseOut {
            head: resp,
            body: None,
        })
    }
}

export!(Fault);
