//! `spin-forever` (test fixture): loops forever, to prove the time limit.
//!
//! Everything but the fault itself is shared: see `plugins/shared/fault_fixture.rs`.
#![no_std]

extern crate alloc;

fn fault() {
    let mut counter: u64 = 0;
    loop {
        counter = core::hint::black_box(counter.wrapping_add(1));
    }
}

include!("../../shared/fault_fixture.rs");
