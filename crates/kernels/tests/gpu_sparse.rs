//! GPU tests of sparse page selection (`--features cuda`): the page scores against the
//! f64 reference, the chosen pages against the CPU selection run on the GPU's own scores
//! (exactly the same pages, ties to the earlier page), dense rows copied whole, attention
//! over the device-chosen per-head tables against the f64 reference, and needles planted
//! in a 32K-token context always found.
#![cfg(feature = "cuda")]

use half::{bf16, f16};
use radix_gpu::{Device, DeviceBuffer, Element, HalfFloat, Jit, require_gpu};
use radix_kernels::attention::{
    AttentionBatch, AttentionShape, BatchMeta, KvSource, attention_reference,
};
use radix_kernels::kv_append::bounds::encode;
use radix_kernels::kv_append::key_bounds_record;
use radix_kernels::relative_error;
use radix_kernels::sparse::{
    SelectBuffers, SelectPath, SelectSizes, SparseShape, auto_cluster, scores_reference,
    select_reference, select_with, sparse_indptr,
};
use radix_kv::bounds_record_bytes as record_bytes;
use radix_kv::{SparseBudget, SparsePolicy};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng, rngs::SmallRng};

const PS: usize = 16;

/// A batch of decode sequences over a shuffled pool, with its key bounds.
struct Setup<T> {
    shape: SparseShape,
    num_pages: usize,
    kv_indptr: Vec<i32>,
    kv_indices: Vec<i32>,
    last: Vec<i32>,
    keep: Vec<i32>,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    /// A `kv_append::bounds` record per (page, kv head).
    bounds: Vec<u8>,
}

fn bounds_of<T: Element>(
    shape: &SparseShape,
    k: &[T],
    num_pages: usize,
    filled: &[usize],
) -> Vec<u8> {
    let (hkv, d) = (shape.num_kv_heads, shape.head_dim);
    let mut out = Vec::with_capacity(num_pages * hkv * record_bytes(d));
    for (p, &fill) in filled.iter().enumerate().take(num_pages) {
        for h in 0..hkv {
            let base = (p * hkv + h) * PS * d;
            out.extend(key_bounds_record(&k[base..base + fill * d], d));
        }
    }
    out
}

fn setup<T: Element>(
    rng: &mut SmallRng,
    shape: SparseShape,
    lens: &[usize],
    keep: &[i32],
) -> Setup<T> {
    let (hq, hkv, d) = (shape.num_qo_heads, shape.num_kv_heads, shape.head_dim);
    let pages: Vec<usize> = lens.iter().map(|l| l.div_ceil(PS)).collect();
    let num_pages = pages.iter().sum::<usize>() + 5;
    let mut ids: Vec<i32> = (0..num_pages as i32).collect();
    ids.shuffle(rng);
    let (mut kv_indptr, mut kv_indices, mut last) = (vec![0i32], Vec::new(), Vec::new());
    let mut filled = vec![PS; num_pages];
    for (b, &l) in lens.iter().enumerate() {
        let start = kv_indices.len();
        kv_indices.extend_from_slice(&ids[start..start + pages[b]]);
        kv_indptr.push(kv_indices.len() as i32);
        let lp = l - (pages[b] - 1) * PS;
        last.push(lp as i32);
        filled[*kv_indices.last().unwrap() as usize] = lp;
    }
    let random = |rng: &mut SmallRng, n: usize| -> Vec<T> {
        (0..n).map(|_| T::from_f64(rng.random_range(-1.0..1.0))).collect()
    };
    let k = random(rng, num_pages * hkv * PS * d);
    let v = random(rng, num_pages * hkv * PS * d);
    let q = random(rng, lens.len() * hq * d);
    let bounds = bounds_of(&shape, &k, num_pages, &filled);
    Setup { shape, num_pages, kv_indptr, kv_indices, last, keep: keep.to_vec(), q, k, v, bounds }
}

/// Runs the selection on the GPU along `path`: (scores, per-head tables, their indptr).
fn run_select<T: HalfFloat>(
    dev: &Device,
    jit: &Jit,
    s: &Setup<T>,
    path: SelectPath,
) -> (Vec<f32>, Vec<i32>, Vec<i32>) {
    let batch = s.last.len();
    let indptr = sparse_indptr(&s.kv_indptr, &s.keep, &s.shape).unwrap();
    let entries = *indptr.last().unwrap() as usize;
    let dense = s.kv_indices.len();
    let mut tables = dev.alloc::<i32>(entries).unwrap();
    tables.fill_bytes(0xFF).unwrap(); // poison: every entry must be written
    let mut scores = dev.alloc::<f32>(dense * s.shape.num_kv_heads).unwrap();
    scores.fill_bytes(0xFF).unwrap();
    let mut bufs = SelectBuffers {
        qo_indptr: dev.upload(&(0..=batch as i32).collect::<Vec<_>>()).unwrap(),
        kv_indptr: dev.upload(&s.kv_indptr).unwrap(),
        kv_indices: dev.upload(&s.kv_indices).unwrap(),
        keep: dev.upload(&s.keep).unwrap(),
        out_indptr: dev.upload(&indptr).unwrap(),
        out_indices: tables,
        scores,
    };
    let q: DeviceBuffer<T> = dev.upload(&s.q).unwrap();
    let bounds: DeviceBuffer<u8> = dev.upload(&s.bounds).unwrap();
    let sizes = SelectSizes { batch, dense_pages: dense, sparse_entries: entries };
    select_with(jit, &s.shape, &sizes, &q, &bounds, &mut bufs, path).unwrap();
    (bufs.scores.to_vec().unwrap(), bufs.out_indices.to_vec().unwrap(), indptr)
}

/// Checks scores and tables of `s` against the references (the engine's path); returns
/// the tables.
fn check_selection<T: HalfFloat>(dev: &Device, jit: &Jit, s: &Setup<T>) -> (Vec<i32>, Vec<i32>) {
    check_selection_on(dev, jit, s, SelectPath::Auto)
}

/// Both selections: the two kernels, and on Hopper the one-launch kernel at every
/// cluster size (it needs thread-block clusters, sm_90a).
fn paths(dev: &Device) -> Vec<SelectPath> {
    let mut v = vec![SelectPath::Split];
    if dev.arch() == radix_gpu::Arch::SM90A {
        v.extend([1, 2, 4, 8, 16].map(SelectPath::Fused));
    }
    v
}

fn check_selection_on<T: HalfFloat>(
    dev: &Device,
    jit: &Jit,
    s: &Setup<T>,
    path: SelectPath,
) -> (Vec<i32>, Vec<i32>) {
    let hkv = s.shape.num_kv_heads;
    let (scores, tables, indptr) = run_select(dev, jit, s, path);
    let batch = s.last.len();
    let qo: Vec<i32> = (0..=batch as i32).collect();
    let want =
        scores_reference(&s.shape, &s.q, &s.bounds, &qo, &s.kv_indptr, &s.kv_indices, &s.keep);
    for b in 0..batch {
        let (lo, hi) = (s.kv_indptr[b] as usize, s.kv_indptr[b + 1] as usize);
        let n = hi - lo;
        let sparse = s.keep[b] > 0 && (s.keep[b] as usize) < n;
        for h in 0..hkv {
            let row = &tables[indptr[b * hkv + h] as usize..indptr[b * hkv + h + 1] as usize];
            if !sparse {
                assert_eq!(
                    row,
                    &s.kv_indices[lo..hi],
                    "{path:?} dense sequence {b} head {h}: whole table"
                );
                continue;
            }
            let dense = s.kv_indices.len(); // scores are head-major
            let got: Vec<f32> = (lo..hi).map(|f| scores[h * dense + f]).collect();
            for (i, (&g, f)) in got.iter().zip(lo..hi).enumerate() {
                let w = want[f * hkv + h];
                let close = if w.is_nan() {
                    g.is_nan()
                } else {
                    (g as f64 - w).abs() <= 1e-3 * (1.0 + w.abs())
                };
                assert!(close, "{path:?} seq {b} head {h} page {i}: score {g}, reference {w}");
            }
            let chosen = select_reference(
                &got,
                s.keep[b] as usize,
                s.shape.sink_pages,
                s.shape.window_pages,
            );
            let ids: Vec<i32> = chosen.iter().map(|&i| s.kv_indices[lo + i]).collect();
            assert_eq!(row, &ids[..], "{path:?} seq {b} head {h}: pages chosen");
        }
    }
    (tables, indptr)
}

fn shape(hq: usize, hkv: usize, d: usize) -> SparseShape {
    SparseShape { num_qo_heads: hq, num_kv_heads: hkv, head_dim: d, sink_pages: 1, window_pages: 2 }
}

fn selection_case<T: HalfFloat>(hq: usize, hkv: usize, d: usize, seed: u64) {
    let dev = require_gpu();
    let jit = Jit::new(None);
    let mut rng = SmallRng::seed_from_u64(seed);
    // Sparse, dense (keep 0), keep == all pages, the smallest keep, one page, long (over
    // the selection's 4096-key shared-memory cache).
    let lens = [4800, 590, 1920, 1017, 3, 80000];
    let keep = [90, 0, 120, 3, 0, 1500];
    let s = setup::<T>(&mut rng, shape(hq, hkv, d), &lens, &keep);
    for path in paths(&dev) {
        check_selection_on(&dev, &jit, &s, path);
    }
}

#[test]
fn scores_and_selection_match_the_reference() {
    selection_case::<bf16>(8, 2, 128, 1);
    selection_case::<bf16>(8, 2, 64, 2);
    selection_case::<f16>(8, 2, 128, 3);
    selection_case::<f16>(8, 2, 64, 4);
    // Other GQA groups: 8 (Llama-70B) and 1 (MHA).
    selection_case::<bf16>(16, 2, 128, 5);
    selection_case::<bf16>(4, 4, 128, 6);
}

/// Scores spread over many orders of magnitude and both signs (every bit of the radix
/// keys differs): the selection still matches the reference exactly.
#[test]
fn wide_score_ranges_select_exactly() {
    let dev = require_gpu();
    let jit = Jit::new(None);
    let mut rng = SmallRng::seed_from_u64(31);
    let mut s = setup::<bf16>(&mut rng, shape(8, 2, 128), &[3000 * PS, 700 * PS], &[900, 200]);
    for chunk in s.bounds.chunks_mut(record_bytes(128)) {
        let scale = 10f32.powf(rng.random_range(-6.0..6.0));
        let key: Vec<f32> = (0..128).map(|_| rng.random_range(-1.0..1.0) * scale).collect();
        // One key per page: the score is q·k up to the rounding (either sign).
        encode(&key, &key, chunk);
    }
    for path in paths(&dev) {
        check_selection_on(&dev, &jit, &s, path);
    }
}

/// One sequence, as long-document users run it: the engine's path on Hopper is the
/// one-launch kernel in clusters that fill the GPU (the two kernels elsewhere), and every
/// path matches the reference at lengths around its slices (a page, a few pages per block,
/// uneven slices, 8K pages).
#[test]
fn one_sequence_selects_in_one_launch() {
    let dev = require_gpu();
    let jit = Jit::new(None);
    let sh = shape(32, 8, 128);
    let c = auto_cluster::<bf16>(&jit, &dev, &sh, 1);
    let split_forced = std::env::var("RADIX_SPARSE_SELECT").is_ok_and(|v| v.trim() == "split");
    if dev.arch() != radix_gpu::Arch::SM90A || split_forced {
        assert_eq!(c, None, "the two kernels off Hopper or when asked for");
    } else {
        assert!(
            matches!(c, Some(c) if c >= 8),
            "batch 1 on Hopper: clusters of 8 or 16, got {c:?}"
        );
    }
    let mut rng = SmallRng::seed_from_u64(41);
    for (len, keep) in [(4 * PS, 3), (37 * PS + 5, 9), (1000 * PS + 1, 301), (8192 * PS, 820)] {
        let s = setup::<bf16>(&mut rng, sh, &[len], &[keep]);
        for path in paths(&dev) {
            check_selection_on(&dev, &jit, &s, path);
        }
        check_selection_on(&dev, &jit, &s, SelectPath::Auto);
    }
}

#[test]
fn ties_go_to_the_earlier_page() {
    let dev = require_gpu();
    let jit = Jit::new(None);
    let mut rng = SmallRng::seed_from_u64(9);
    let mut s = setup::<bf16>(&mut rng, shape(4, 1, 64), &[50 * PS], &[10]);
    // Every page the same bounds: all scores tie, so the first middle pages win.
    let first = s.bounds[..record_bytes(64)].to_vec();
    for chunk in s.bounds.chunks_mut(record_bytes(64)) {
        chunk.copy_from_slice(&first);
    }
    let want: Vec<i32> =
        [0, 1, 2, 3, 4, 5, 6, 7, 48, 49].iter().map(|&i| s.kv_indices[i]).collect();
    for path in paths(&dev) {
        let (tables, _) = check_selection_on(&dev, &jit, &s, path);
        assert_eq!(tables, want, "{path:?}");
    }
    // A NaN query makes every score NaN: NaN ties rank like any tie (earliest first),
    // and nothing is lost or written twice.
    s.q[5] = bf16::from_f32(f32::NAN);
    for path in paths(&dev) {
        let (tables, _) = check_selection_on(&dev, &jit, &s, path);
        assert_eq!(tables, want, "{path:?}");
    }
}

/// Attention through the device-chosen per-head tables equals the f64 reference over
/// the same tables, in eager launches of the same kernels the engine uses.
#[test]
fn attention_over_selected_pages_matches_the_reference() {
    let dev = require_gpu();
    let jit = Jit::new(None);
    let mut rng = SmallRng::seed_from_u64(21);
    let lens = [3000, 700, 5000, 33];
    let keep = [60, 0, 100, 0];
    let s = setup::<bf16>(&mut rng, shape(32, 8, 128), &lens, &keep);
    let (tables, indptr) = check_selection(&dev, &jit, &s);
    let batch = lens.len();
    let meta = BatchMeta::new(
        (0..=batch as i32).collect(),
        KvSource::Paged {
            page_size: PS,
            num_pages: s.num_pages,
            kv_indptr: indptr,
            kv_indices: tables,
            kv_last_page_len: s.last.clone(),
            head_tables: true,
        },
        true,
    )
    .unwrap();
    let ashape = AttentionShape::new(32, 8, 128, true);
    let want = attention_reference(&ashape, &meta, &s.q, &s.k, &s.v);
    let q = dev.upload(&s.q).unwrap();
    let k = dev.upload(&s.k).unwrap();
    let v = dev.upload(&s.v).unwrap();
    let mut o = dev.alloc::<bf16>(s.q.len()).unwrap();
    o.fill_bytes(0xFF).unwrap();
    let batch_gpu = AttentionBatch::new(&dev, ashape, meta, None).unwrap();
    assert!(!batch_gpu.work().merge.is_empty(), "long sequences should split");
    batch_gpu.run(&jit, &q, &k, &v, &mut o, None).unwrap();
    let err = relative_error(&o.to_vec().unwrap(), &want.o);
    assert!(err <= 1e-2, "sparse attention rel err {err:.3e}");
}

/// Needles: in a 32K-token context (2048 pages), one key per needle page points along
/// its kv group's queries; selection at budgets 0.1..0.5 keeps every needle page of every
/// head, whatever the seed.
#[test]
fn needles_in_a_32k_context_are_always_selected() {
    let dev = require_gpu();
    let jit = Jit::new(None);
    let (hq, hkv, d) = (32, 8, 128);
    let group = hq / hkv;
    for seed in 0..3u64 {
        let mut rng = SmallRng::seed_from_u64(100 + seed);
        let mut s = setup::<bf16>(&mut rng, shape(hq, hkv, d), &[32768], &[0]);
        // Queries of a group: a shared direction plus noise (as real GQA groups are).
        for h in 0..hkv {
            let base: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
            for g in 0..group {
                for (j, &b) in base.iter().enumerate() {
                    let x = b + 0.3 * rng.random_range(-1.0..1.0);
                    s.q[(h * group + g) * d + j] = bf16::from_f64(x);
                }
            }
        }
        // Plant 8 needles per head in random middle pages (slot chosen at random).
        let mut needles = vec![Vec::new(); hkv];
        for (h, list) in needles.iter_mut().enumerate() {
            while list.len() < 8 {
                let pos = rng.random_range(1..2046usize);
                if list.contains(&pos) {
                    continue;
                }
                list.push(pos);
                let page = s.kv_indices[pos] as usize;
                let slot = rng.random_range(0..PS);
                let at = ((page * hkv + h) * PS + slot) * d;
                for j in 0..d {
                    let dir: f64 = (0..group).map(|g| s.q[(h * group + g) * d + j].to_f64()).sum();
                    s.k[at + j] = bf16::from_f64(if dir >= 0.0 { 3.0 } else { -3.0 });
                }
            }
        }
        let filled = vec![PS; s.num_pages];
        s.bounds = bounds_of(&s.shape, &s.k, s.num_pages, &filled);
        let policy = SparsePolicy::default();
        for budget in [0.1, 0.2, 0.3, 0.5] {
            let keep = policy.pages_to_keep(SparseBudget::Fraction(budget), 32768, PS).unwrap();
            s.keep = vec![keep as i32];
            let (tables, indptr) = check_selection(&dev, &jit, &s);
            for (h, list) in needles.iter().enumerate() {
                let row = &tables[indptr[h] as usize..indptr[h + 1] as usize];
                for &pos in list {
                    assert!(
                        row.contains(&s.kv_indices[pos]),
                        "seed {seed} budget {budget}: head {h} missed the needle at page {pos}"
                    );
                }
            }
        }
    }
}
