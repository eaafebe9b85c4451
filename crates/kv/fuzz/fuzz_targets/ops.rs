//! Random sequences of pool and radix-cache operations from the fuzzer's bytes, run
//! by the same simulator and reference model as the proptest suite
//! (`tests/support/sim.rs`): every invariant is checked after every operation, and
//! a final drain must return every page to the pool.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run ops -- -max_total_time=600` from `crates/kv`.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/support/sim.rs"]
mod sim;

/// Bounds one input's run time; longer inputs add nothing the fuzzer can't reach.
const MAX_OPS: usize = 400;

fuzz_target!(|data: &[u8]| {
    let (num_pages, page_size, ops) = sim::decode(data);
    let mut sim = sim::Sim::new(num_pages, page_size);
    for op in ops.into_iter().take(MAX_OPS) {
        sim.run(op);
    }
    sim.drain();
});
