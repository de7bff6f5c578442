//! `panic` (test fixture): panics, to prove a trap is contained and its message logged.
//!
//! Everything but the fault itself is shared: see `plugins/shared/fault_fixture.rs`.
#![no_std]

extern crate alloc;

fn fault() {
    panic!("boom: deliberate panic from the panic test plugin");
}

include!("../../shared/fault_fixture.rs");
