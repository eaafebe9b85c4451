//! Per-step costs of the KV cache core, at the sizes the issue sets:
//! `match_prefix` and `insert` of 32K-token sequences with ~1M tokens cached, and
//! the CSR build for 256 requests of 4K tokens. Page size 16 throughout.
//!
//! Run: `cargo bench -p radix-kv --bench kv`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use radix_kv::{PageId, PagePool, PageTableBuilder, RadixCache};

const PAGE_SIZE: usize = 16;
const SEQ_TOKENS: usize = 32 * 1024;
const CACHED_TOKENS: usize = 1 << 20;

/// Deterministic token ids over a 128K vocabulary.
struct Tokens(u64);

impl Tokens {
    fn take(&mut self, n: usize) -> Vec<u32> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (self.0 >> 40) as u32 % 128_000
            })
            .collect()
    }
}

/// A cache holding >= 1M tokens: 32K-token sequences that all share a 1K-token
/// system prompt, pairs of which share a further 3K tokens, the rest unique.
struct Fixture {
    pool: PagePool,
    cache: RadixCache,
    cached_seqs: Vec<Vec<u32>>,
    tokens: Tokens,
}

fn fixture() -> Fixture {
    let mut pool = PagePool::new(2 * CACHED_TOKENS / PAGE_SIZE, PAGE_SIZE).unwrap();
    let mut cache = RadixCache::new(&pool);
    let mut tokens = Tokens(7);
    let system = tokens.take(1024);
    let mut cached_seqs = Vec::new();
    let mut pair_prefix = Vec::new();
    while cache.cached_pages() * PAGE_SIZE < CACHED_TOKENS {
        if cached_seqs.len() % 2 == 0 {
            pair_prefix = tokens.take(3 * 1024);
        }
        let mut seq = system.clone();
        seq.extend_from_slice(&pair_prefix);
        seq.extend(tokens.take(SEQ_TOKENS - seq.len()));
        let mut pages = pool.alloc(SEQ_TOKENS / PAGE_SIZE).unwrap();
        cache.insert(&seq, &mut pages, &mut pool).unwrap();
        cached_seqs.push(seq);
    }
    cache.check_invariants(&pool).unwrap();
    Fixture { pool, cache, cached_seqs, tokens }
}

fn bench_match(c: &mut Criterion, f: &mut Fixture) {
    let mut group = c.benchmark_group("match_prefix");
    let cached = f.cache.cached_pages() * PAGE_SIZE;
    let full_hit = f.cached_seqs[5].clone();
    let mut half_hit = full_hit[..SEQ_TOKENS / 2].to_vec();
    half_hit.extend(f.tokens.take(SEQ_TOKENS / 2));
    let miss = f.tokens.take(SEQ_TOKENS);
    assert_eq!(f.cache.match_prefix(&full_hit).matched_tokens, SEQ_TOKENS);
    assert_eq!(f.cache.match_prefix(&half_hit).matched_tokens, SEQ_TOKENS / 2);
    assert_eq!(f.cache.match_prefix(&miss).matched_tokens, 0);
    for (name, prompt) in [("full_hit", &full_hit), ("half_hit", &half_hit), ("miss", &miss)] {
        let id = BenchmarkId::new(format!("32K_{name}"), format!("{cached}_cached"));
        group.bench_function(id, |b| b.iter(|| black_box(f.cache.match_prefix(black_box(prompt)))));
    }
    let mut pages = Vec::with_capacity(SEQ_TOKENS / PAGE_SIZE);
    group.bench_function(BenchmarkId::new("into_32K_full_hit", format!("{cached}_cached")), |b| {
        b.iter(|| {
            pages.clear();
            black_box(f.cache.match_prefix_into(black_box(&full_hit), &mut pages))
        })
    });
    group.finish();
}

/// Times `insert` alone: each iteration works on a fresh copy of the fixture.
///
/// Dropping the previous copy hands its memory back to the OS, so without `warm`
/// the insert's token copy lands on freshly mapped memory and pays a page fault per
/// 4 KiB. A running server reuses the memory of evicted nodes instead, so the main
/// numbers first allocate and free a buffer of the size the insert will copy.
fn time_insert(f: &Fixture, tokens: &[u32], warm: bool, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let (mut cache, mut pool) = f.cache.snapshot(&f.pool).unwrap();
        let mut pages = pool.alloc(tokens.len() / PAGE_SIZE).unwrap();
        if warm {
            // Non-zero, so the pages are really touched (calloc may skip fresh zero pages).
            drop(black_box(vec![1u32; tokens.len() + tokens.len() / PAGE_SIZE]));
        }
        let start = Instant::now();
        let result = cache.insert(black_box(tokens), &mut pages, &mut pool).unwrap();
        total += start.elapsed();
        black_box(result);
        drop((cache, pool));
    }
    total
}

fn bench_insert(c: &mut Criterion, f: &mut Fixture) {
    let mut group = c.benchmark_group("insert");
    group.sample_size(30).measurement_time(Duration::from_secs(4));
    let cached = f.cache.cached_pages() * PAGE_SIZE;
    // A finished request whose prompt shared the 4K prefix of a pair: 28K new tokens.
    let mut mostly_new = f.cached_seqs[0][..4096].to_vec();
    mostly_new.extend(f.tokens.take(SEQ_TOKENS - 4096));
    // A request that recomputed a whole cached sequence: 2048 duplicates to free.
    let duplicate = f.cached_seqs[7].clone();
    let cases = [
        ("28K_new", &mostly_new, true),
        ("all_duplicate", &duplicate, true),
        ("28K_new_cold_heap", &mostly_new, false),
    ];
    for (name, tokens, warm) in cases {
        let id = BenchmarkId::new(format!("32K_{name}"), format!("{cached}_cached"));
        group.bench_function(id, |b| b.iter_custom(|iters| time_insert(f, tokens, warm, iters)));
    }
    group.finish();
}

fn bench_page_table(c: &mut Criterion) {
    const BATCH: usize = 256;
    const SEQ: usize = 4096;
    let pages_per_seq = SEQ / PAGE_SIZE;
    // Each sequence's pages scattered over the pool, as after some churn.
    let seqs: Vec<Vec<PageId>> = (0..BATCH)
        .map(|b| {
            (0..pages_per_seq)
                .map(|i| PageId(((i * BATCH + b) * 7919 % (BATCH * pages_per_seq)) as u32))
                .collect()
        })
        .collect();
    let mut group = c.benchmark_group("page_table");
    let mut dense = PageTableBuilder::new(PAGE_SIZE).unwrap();
    group.bench_function("decode_256x4K_ps16", |b| {
        b.iter(|| {
            dense.clear();
            for pages in &seqs {
                dense.push_seq(black_box(pages), SEQ, 1).unwrap();
            }
            black_box(dense.table().kv_indices().len())
        })
    });
    let mut with_pos = PageTableBuilder::with_page_pos(PAGE_SIZE).unwrap();
    group.bench_function("decode_256x4K_ps16_page_pos", |b| {
        b.iter(|| {
            with_pos.clear();
            for pages in &seqs {
                with_pos.push_seq(black_box(pages), SEQ, 1).unwrap();
            }
            black_box(with_pos.table().kv_indices().len())
        })
    });
    // Sparse decode: every 4th page plus the last one.
    let selected: Vec<u32> = (0..pages_per_seq as u32)
        .filter(|i| i % 4 == 0 || *i as usize == pages_per_seq - 1)
        .collect();
    group.bench_function("sparse_256x4K_ps16_quarter", |b| {
        b.iter(|| {
            with_pos.clear();
            for pages in &seqs {
                with_pos.push_subset(black_box(pages), &selected, SEQ, 1).unwrap();
            }
            black_box(with_pos.table().kv_indices().len())
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let mut f = fixture();
    bench_match(c, &mut f);
    bench_insert(c, &mut f);
    bench_page_table(c);
}

criterion_group!(kv, benches);
criterion_main!(kv);
