//! `eat-memory` (test fixture): allocates until it is stopped (config `mib`, default 1024), to prove the memory limit.
//!
//! Everything but the fault itself is shared: see `plugins/shared/fault_fixture.rs`.
#![no_std]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;

fn fault() {
    let mut kept: Vec<Vec<u8>> = Vec::new();
    for _ in 0..MIB.with(|mib| *mib) {
        kept.push(vec![1u8; 1 << 20]);
    }
    core::hint::black_box(&kept);
}

include!("../../shared/fault_fixture.rs");
