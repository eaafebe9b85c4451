//! State-machine property tests: random sequences of admit / generate / insert /
//! finish / abort / match / lock / unlock / evict / invalid calls against a naive
//! reference model, with every invariant checked after every step (see
//! `support/sim.rs`), and a final drain that must return every page to the pool.

mod support {
    pub mod sim;
}

use proptest::prelude::*;
use support::sim::{BadCall, Op, Prompt, Sim};

fn prompt() -> impl Strategy<Value = Prompt> {
    (any::<u8>(), 0u8..80, 0u8..40, any::<u32>()).prop_map(|(base, shared, tail_len, tail_seed)| {
        Prompt { base, shared, tail_len, tail_seed }
    })
}

fn bad_call() -> impl Strategy<Value = BadCall> {
    prop_oneof![
        Just(BadCall::ReleaseFree),
        Just(BadCall::ReleaseCached),
        Just(BadCall::ReleaseTwice),
        Just(BadCall::ReleaseOutOfRange),
        any::<u8>().prop_map(BadCall::Unlock),
        Just(BadCall::InsertWrongCount),
        Just(BadCall::InsertFreePage),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prompt().prop_map(Op::Admit),
        3 => (any::<u8>(), any::<u8>(), any::<u32>())
            .prop_map(|(req, n, seed)| Op::Generate { req, n, seed }),
        2 => any::<u8>().prop_map(|req| Op::CacheUnfinished { req }),
        3 => any::<u8>().prop_map(|req| Op::Finish { req }),
        1 => any::<u8>().prop_map(|req| Op::Abort { req }),
        2 => prompt().prop_map(Op::Match),
        1 => any::<u8>().prop_map(|req| Op::ExtraLock { req }),
        1 => any::<u8>().prop_map(|req| Op::ExtraUnlock { req }),
        2 => (0u8..24).prop_map(|n| Op::Evict { n }),
        2 => bad_call().prop_map(Op::Bad),
    ]
}

fn run(num_pages: usize, page_size: usize, ops: &[Op]) {
    let mut sim = Sim::new(num_pages, page_size);
    for &op in ops {
        sim.run(op);
    }
    sim.drain();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn page_size_1(num_pages in 8usize..96, ops in prop::collection::vec(op(), 1..80)) {
        run(num_pages, 1, &ops);
    }

    #[test]
    fn page_size_4(num_pages in 4usize..48, ops in prop::collection::vec(op(), 1..80)) {
        run(num_pages, 4, &ops);
    }

    #[test]
    fn page_size_16(num_pages in 2usize..24, ops in prop::collection::vec(op(), 1..80)) {
        run(num_pages, 16, &ops);
    }

    /// The fuzz target's decoder over random bytes, so the two stay in step.
    #[test]
    fn fuzz_decoder(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let (num_pages, page_size, ops) = support::sim::decode(&bytes);
        run(num_pages, page_size, &ops);
    }
}

/// A long deterministic run with heavy sharing and memory pressure.
#[test]
fn long_mixed_run() {
    let mut sim = Sim::new(40, 2);
    let mut s = 12345u32;
    let mut next = || {
        s = s.wrapping_mul(1_103_515_245).wrapping_add(12345);
        (s >> 8) as u8
    };
    for _ in 0..3000 {
        let code = next() % 10;
        let (a, b, c, d) = (next(), next(), next(), next());
        let op = match code {
            0..=2 => Op::Admit(Prompt {
                base: a % 2,
                shared: b % 60,
                tail_len: c % 12,
                tail_seed: d as u32,
            }),
            3 => Op::Generate { req: a, n: b, seed: c as u32 },
            4 => Op::CacheUnfinished { req: a },
            5 | 6 => Op::Finish { req: a },
            7 => Op::Match(Prompt {
                base: a % 2,
                shared: b % 60,
                tail_len: c % 12,
                tail_seed: d as u32,
            }),
            8 => Op::Evict { n: a % 8 },
            _ => Op::Bad(BadCall::Unlock(a)),
        };
        sim.run(op);
    }
    assert!(sim.cache.metrics().hit_tokens > 0);
    assert!(sim.cache.metrics().evicted_pages > 0);
    sim.drain();
}
