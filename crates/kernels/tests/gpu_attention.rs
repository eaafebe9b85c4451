//! GPU tests of the attention kernel (`--features cuda`) against the f64 CPU reference:
//! every dtype / head_dim / causal / GQA combination, contiguous and paged K/V (page sizes
//! 1, 16 and 64, pages shuffled, subsets of pages), ragged batches with lengths off the
//! tile sizes, q_len = 1, kv_len = 1, q shorter than kv, and split-KV decode.
#![cfg(feature = "cuda")]

use half::{bf16, f16};
use radix_gpu::{Device, Element, HalfFloat, Jit, require_gpu};
use radix_kernels::attention::{
    AttentionBatch, AttentionShape, BatchMeta, DECODE_CLUSTER, KvSource, TileConfig,
    attention_reference, default_target_blocks, plan_batch,
};
use radix_kernels::relative_error;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng, rngs::SmallRng};

fn random<T: Element>(rng: &mut SmallRng, len: usize) -> Vec<T> {
    (0..len).map(|_| T::from_f64(rng.random_range(-1.0..1.0))).collect()
}

fn tol<T: HalfFloat>() -> f64 {
    if T::DTYPE == radix_gpu::DType::BF16 { 1e-2 } else { 2e-3 }
}

/// How K/V are stored for a case.
#[derive(Clone, Copy, Debug)]
enum Kv {
    Contiguous,
    /// page size; pages shuffled in a pool with spare pages.
    Paged(usize),
    /// page size; the table lists every other page of each sequence (a sparse subset).
    Subset(usize),
}

struct Case {
    q_lens: Vec<usize>,
    kv_lens: Vec<usize>,
    hq: usize,
    hkv: usize,
    d: usize,
    causal: bool,
    kv: Kv,
}

/// Builds the metadata and a K/V store for a case. For `Subset`, `kv_lens` are the
/// lengths the kernel sees (the listed pages), which the table defines.
fn build_kv<T: Element>(rng: &mut SmallRng, c: &Case) -> (KvSource, Vec<T>, Vec<T>) {
    let row = c.hkv * c.d;
    match c.kv {
        Kv::Contiguous => {
            let mut indptr = vec![0i32];
            for &l in &c.kv_lens {
                indptr.push(indptr.last().unwrap() + l as i32);
            }
            let total = *indptr.last().unwrap() as usize;
            (
                KvSource::Contiguous { kv_indptr: indptr },
                random(rng, total * row),
                random(rng, total * row),
            )
        }
        Kv::Paged(ps) | Kv::Subset(ps) => {
            let subset = matches!(c.kv, Kv::Subset(_));
            // Pages each sequence owns (a subset table lists every other one of twice as many).
            let owned: Vec<usize> =
                c.kv_lens.iter().map(|&l| l.div_ceil(ps) * if subset { 2 } else { 1 }).collect();
            let num_pages = owned.iter().sum::<usize>() + 7;
            let mut ids: Vec<i32> = (0..num_pages as i32).collect();
            ids.shuffle(rng);
            let mut indptr = vec![0i32];
            let mut indices = Vec::new();
            let mut last = Vec::new();
            let mut next = 0;
            for (b, &l) in c.kv_lens.iter().enumerate() {
                let seq_pages = &ids[next..next + owned[b]];
                next += owned[b];
                let listed: Vec<i32> = if subset {
                    seq_pages.iter().step_by(2).copied().collect()
                } else {
                    seq_pages.to_vec()
                };
                indices.extend_from_slice(&listed);
                indptr.push(indices.len() as i32);
                last.push((l - (listed.len() - 1) * ps) as i32);
            }
            let pool = num_pages * c.hkv * ps * c.d;
            // Every slot the table does not cover holds NaN (unlisted and spare pages, the
            // last page's unused slots): a kernel that let one into P V would output NaN.
            let mut covered = vec![0usize; num_pages]; // slots in use per page id
            for b in 0..c.kv_lens.len() {
                let listed = &indices[indptr[b] as usize..indptr[b + 1] as usize];
                for (i, &id) in listed.iter().enumerate() {
                    covered[id as usize] =
                        if i + 1 == listed.len() { last[b] as usize } else { ps };
                }
            }
            let poison = |mut x: Vec<T>| {
                let slot = ps * c.d; // one kv head's page is hkv slots of ps rows
                for (id, &used) in covered.iter().enumerate() {
                    for h in 0..c.hkv {
                        let page = (id * c.hkv + h) * slot;
                        x[page + used * c.d..page + slot].fill(T::from_f64(f64::NAN));
                    }
                }
                x
            };
            let kv = KvSource::Paged {
                page_size: ps,
                num_pages,
                kv_indptr: indptr,
                kv_indices: indices,
                kv_last_page_len: last,
                head_tables: false,
            };
            (kv, poison(random(rng, pool)), poison(random(rng, pool)))
        }
    }
}

/// Runs a case with the tiles the launcher picks and, where that is the Hopper (wgmma)
/// prefill kernel, again with the mma.sync prefill tiles it replaces there and with the
/// wgmma kernel's other variants: three stages (the overlapped loop), one or four producer
/// warps, the TMA producer, one-item or persistent (pages of 8 tokens or more), and at
/// head_dim 64 with three compute warpgroups.
fn run_case<T: HalfFloat>(dev: &Device, jit: &Jit, c: &Case, seed: u64) {
    let chosen = run_case_with::<T>(dev, jit, c, seed, None);
    if chosen.wgmma {
        let sm90 = TileConfig::PREFILL_SM90;
        let small_pages = matches!(c.kv, Kv::Paged(ps) | Kv::Subset(ps) if ps < 8);
        let others = [
            TileConfig::PREFILL,
            sm90,
            TileConfig { stages: 3, ..sm90 },
            TileConfig { num_warps: 9, ..sm90 },
            TileConfig { num_warps: 9, stages: 3, ..sm90 },
            TileConfig { num_warps: 12, ..sm90 },
            TileConfig::PREFILL_SM90_TMA,
            TileConfig::PREFILL_SM90_TMA_PERSISTENT,
            TileConfig::PREFILL_SM90_TMA_D64,
        ];
        for tiles in others {
            let head_dim_64_only = tiles == TileConfig::PREFILL_SM90_TMA_D64 && c.d != 64;
            if tiles == chosen || (tiles.tma && small_pages) || head_dim_64_only {
                continue;
            }
            run_case_with::<T>(dev, jit, c, seed, Some(tiles));
        }
    }
}

/// Runs a case with `tiles` (None: the launcher's choice) and returns the tiles that ran.
fn run_case_with<T: HalfFloat>(
    dev: &Device,
    jit: &Jit,
    c: &Case,
    seed: u64,
    tiles: Option<TileConfig>,
) -> TileConfig {
    let mut rng = SmallRng::seed_from_u64(seed);
    let shape = AttentionShape::new(c.hq, c.hkv, c.d, c.causal);
    let mut qo = vec![0i32];
    for &l in &c.q_lens {
        qo.push(qo.last().unwrap() + l as i32);
    }
    let total_q = *qo.last().unwrap() as usize;
    let (kv, k, v) = build_kv::<T>(&mut rng, c);
    let meta = BatchMeta::new(qo, kv, c.causal).unwrap();
    let q: Vec<T> = random(&mut rng, total_q * c.hq * c.d);

    let batch = AttentionBatch::new(dev, shape, meta.clone(), tiles).unwrap();
    let (dq, dk, dv) = (dev.upload(&q).unwrap(), dev.upload(&k).unwrap(), dev.upload(&v).unwrap());
    let mut o = dev.alloc::<T>(q.len()).unwrap();
    let mut lse = dev.alloc::<f32>(total_q * c.hq).unwrap();
    o.fill_bytes(0xFF).unwrap();
    lse.fill_bytes(0xFF).unwrap();
    batch.run(jit, &dq, &dk, &dv, &mut o, Some(&mut lse)).unwrap();
    let got = o.to_vec().unwrap();
    let got_lse = lse.to_vec().unwrap();
    // Split keys are merged by the last split to arrive, counted in the merge list, which
    // each launch must leave as it found it: a second run gives the same bits.
    o.fill_bytes(0xFF).unwrap();
    lse.fill_bytes(0xFF).unwrap();
    batch.run(jit, &dq, &dk, &dv, &mut o, Some(&mut lse)).unwrap();
    let again = o.to_vec().unwrap();
    assert!(
        again.iter().zip(&got).all(|(a, b)| a.to_f64() == b.to_f64())
            && lse.to_vec().unwrap().iter().zip(&got_lse).all(|(a, b)| a.to_bits() == b.to_bits()),
        "a second run of the same batch differs"
    );

    let want = attention_reference(&shape, &meta, &q, &k, &v);
    let err = relative_error(&got, &want.o);
    let lse_err = got_lse
        .iter()
        .zip(&want.lse)
        .map(|(g, w)| if g.is_finite() { (*g as f64 - w).abs() } else { f64::INFINITY })
        .fold(0.0, f64::max);
    let what = format!(
        "{} {:?} d={} hq={} hkv={} causal={} kv={:?} q_lens={:?} kv_lens={:?} merge entries={} \
         cluster={}",
        T::DTYPE,
        batch.tiles(),
        c.d,
        c.hq,
        c.hkv,
        c.causal,
        c.kv,
        c.q_lens,
        c.kv_lens,
        batch.work().merge.len(),
        batch.work().cluster
    );
    assert!(err <= tol::<T>(), "{what}: rel err {err:.3e}");
    assert!(lse_err <= 1e-3, "{what}: lse err {lse_err:.3e}");
    batch.tiles()
}

fn both_dtypes(dev: &Device, jit: &Jit, c: &Case, seed: u64) {
    run_case::<f16>(dev, jit, c, seed);
    run_case::<bf16>(dev, jit, c, seed);
}

#[test]
fn prefill_contiguous_every_combination() {
    let dev = require_gpu();
    let jit = Jit::new(None);
    let mut seed = 0;
    for d in [64, 128] {
        // GQA 1:1, 4:1, 8:1 and 5:1 (a group that does not divide the 64-row warpgroups).
        for (hq, hkv) in [(4, 4), (8, 2), (8, 1), (10, 2)] {
            for causal in [false, true] {
                seed += 1;
                // Mixed lengths: 1, off-tile sizes, q shorter than kv (a suffix).
                let c = Case {
                    q_lens: vec![1, 17, 130, 64, 5],
                    kv_lens: vec![1, 17, 200, 333, 70],
                    hq,
                    hkv,
                    d,
                    causal,
                    kv: Kv::Contiguous,
                };
                both_dtypes(&dev, &jit, &c, seed);
            }
        }
    }
}

#[test]
fn prefill_paged_shuffled_pages() {
    let dev = require_gpu();
    let jit = Jit::new(None);
    let mut seed = 100;
    for ps in [1, 16, 64] {
        for d in [64, 128] {
            for causal in [false, true] {
                seed += 1;
                let c = Case {
                    q_lens: vec![3, 100, 1, 257],
                    kv_lens: vec![3, 129, 64, 300],
                    hq: 8,
                    hkv: 2,
                    d,
                    causal,
                    kv: Kv::Paged(ps),
                };
                both_dtypes(&dev, &jit, &c, seed);
            }
        }
    }
}

#[test]
fn long_prefill_matches() {
    let dev = require_gpu();
    let jit = Jit::new(None);
    let c = Case {
        q_lens: vec![1500],
        kv_lens: vec![2048],
        hq: 4,
        hkv: 4,
        d: 128,
        causal: true,
        kv: Kv::Paged(16),
    };
    both_dtypes(&dev, &jit, &c, 7);
}

#[test]
fn decode_split_kv_and_small_q() {
    let dev = require_gpu();
    let jit = Jit::new(None);
    let mut seed = 200;
    for d in [64, 128] {
        for (hq, hkv) in [(32, 8), (8, 8), (16, 2)] {
            for q_len in [1, 4] {
                seed += 1;
                // One long sequence forces a split; mixed batch splits some sequences only.
                for kv_lens in [vec![20000], vec![5000, 1, 300, 4099]] {
                    let c = Case {
                        q_lens: vec![q_len; kv_lens.len()],
                        kv_lens: kv_lens.iter().map(|&l: &usize| l.max(q_len)).collect(),
                        hq,
                        hkv,
                        d,
                        causal: true,
                        kv: Kv::Paged(16),
                    };
                    both_dtypes(&dev, &jit, &c, seed);
                }
            }
        }
    }
}

#[test]
fn decode_64k_context_and_batch_mixes() {
    let dev = require_gpu();
    let jit = Jit::new(None);
    // Batch 1 at 64K, and a mixed batch from 1 to 64K keys; both split across SMs.
    for (i, kv_lens) in [vec![65536], vec![65536, 1, 4097, 31000]].into_iter().enumerate() {
        let c = Case {
            q_lens: vec![1; kv_lens.len()],
            kv_lens,
            hq: 32,
            hkv: 8,
            d: 128,
            causal: true,
            kv: Kv::Paged(16),
        };
        run_case::<bf16>(&dev, &jit, &c, 500 + i as u64);
    }
}

/// Short decode of up to 2 sequences (8 kv heads) runs each sequence's keys as one
/// thread-block cluster of chunks on Hopper, combined through distributed shared memory;
/// longer or more sequences, and other GPUs, split across SMs and merge in the last split.
/// Both against the reference, and the plan says which ran.
#[test]
fn short_decode_runs_in_clusters_on_hopper() {
    let dev = require_gpu();
    let jit = Jit::new(None);
    let hopper = dev.info().arch() == radix_gpu::Arch::SM90A;
    // (Two sequences take 256 blocks in clusters: on a GPU of fewer than 128 SMs, none.)
    let two = hopper && default_target_blocks(&dev) >= 256;
    let cases = [
        (vec![2048], hopper),
        (vec![1500, 30], two),
        (vec![5], hopper),
        (vec![9000], false),
        (vec![40000, 1, 300, 4099, 17, 9000], false),
    ];
    for (i, (kv_lens, clustered)) in cases.into_iter().enumerate() {
        let mut indptr = vec![0i32];
        for &l in &kv_lens {
            indptr.push(indptr.last().unwrap() + l as i32);
        }
        let qo: Vec<i32> = (0..=kv_lens.len() as i32).collect();
        let meta = BatchMeta::new(qo, KvSource::Contiguous { kv_indptr: indptr }, true).unwrap();
        for d in [64, 128] {
            let shape = AttentionShape::new(32, 8, d, true);
            let (_, work) = plan_batch(&dev, &shape, &meta, None, None).unwrap();
            let want = if clustered { DECODE_CLUSTER } else { 0 };
            assert_eq!(work.cluster, want, "{kv_lens:?}");
            if clustered {
                assert_eq!(work.work.len(), DECODE_CLUSTER * kv_lens.len());
            } else {
                assert!(work.work.iter().any(|w| w.partial_row >= 0), "{kv_lens:?}: keys split");
            }
            let c = Case {
                q_lens: vec![1; kv_lens.len()],
                kv_lens: kv_lens.clone(),
                hq: 32,
                hkv: 8,
                d,
                causal: true,
                kv: Kv::Paged(16),
            };
            both_dtypes(&dev, &jit, &c, 600 + i as u64);
        }
    }
}

#[test]
fn decode_over_a_subset_of_pages() {
    let dev = require_gpu();
    let jit = Jit::new(None);
    for (i, ps) in [1usize, 16, 64].into_iter().enumerate() {
        let c = Case {
            q_lens: vec![1, 1, 1],
            kv_lens: vec![ps * 40 + 3, ps * 3, 1],
            hq: 32,
            hkv: 8,
            d: 128,
            causal: false,
            kv: Kv::Subset(ps),
        };
        both_dtypes(&dev, &jit, &c, 300 + i as u64);
    }
}

#[test]
fn decode_large_batch() {
    let dev = require_gpu();
    let jit = Jit::new(None);
    let mut rng = SmallRng::seed_from_u64(9);
    let kv_lens: Vec<usize> = (0..256).map(|_| rng.random_range(1..2000)).collect();
    let c = Case {
        q_lens: vec![1; 256],
        kv_lens,
        hq: 32,
        hkv: 8,
        d: 128,
        causal: true,
        kv: Kv::Paged(16),
    };
    both_dtypes(&dev, &jit, &c, 400);
}

#[test]
fn rejects_wrong_buffer_sizes() {
    let dev = require_gpu();
    let jit = Jit::new(None);
    let shape = AttentionShape::new(4, 2, 64, true);
    let meta =
        BatchMeta::new(vec![0, 3], KvSource::Contiguous { kv_indptr: vec![0, 5] }, true).unwrap();
    let batch = AttentionBatch::new(&dev, shape, meta, None).unwrap();
    let q = dev.alloc_zeros::<bf16>(3 * 4 * 64).unwrap();
    let k = dev.alloc_zeros::<bf16>(5 * 2 * 64).unwrap();
    let short = dev.alloc_zeros::<bf16>(4 * 2 * 64).unwrap();
    let mut o = dev.alloc_zeros::<bf16>(3 * 4 * 64).unwrap();
    assert!(batch.run(&jit, &q, &k, &k, &mut o, None).is_ok());
    assert!(batch.run(&jit, &q, &short, &k, &mut o, None).is_err());
    assert!(batch.run(&jit, &short, &k, &k, &mut o, None).is_err());
    let mut bad_lse = dev.alloc_zeros::<f32>(5).unwrap();
    assert!(batch.run(&jit, &q, &k, &k, &mut o, Some(&mut bad_lse)).is_err());
}

/// An FP8 (e4m3) pool with per-layer scales: K and V quantized from random values, the
/// kernel against the f64 reference over what the bytes dequantize to (exact in the
/// reference: e4m3 × scale). Decode (split-KV; key-split, 3-stage and prefill tiles) and
/// prefill (causal, GQA), page sizes 16 and 64, head dims 64 and 128, a subset table.
#[test]
fn fp8_pool_matches_the_reference_of_its_dequantized_values() {
    use radix_kernels::attention::KvFp8Scales;
    let dev = require_gpu();
    let jit = Jit::new(None);
    let scales = KvFp8Scales { k: 0.0078125, v: 0.006 }; // a power of two and not
    let cases = [
        Case {
            q_lens: vec![1],
            kv_lens: vec![1000],
            hq: 32,
            hkv: 8,
            d: 128,
            causal: true,
            kv: Kv::Paged(16),
        },
        Case {
            q_lens: vec![1; 5],
            kv_lens: vec![3, 70, 513, 2000, 16],
            hq: 8,
            hkv: 2,
            d: 64,
            causal: true,
            kv: Kv::Paged(16),
        },
        Case {
            q_lens: vec![37, 1, 130],
            kv_lens: vec![37, 90, 130],
            hq: 8,
            hkv: 8,
            d: 128,
            causal: true,
            kv: Kv::Paged(64),
        },
        Case {
            q_lens: vec![1; 3],
            kv_lens: vec![40, 200, 33],
            hq: 16,
            hkv: 2,
            d: 128,
            causal: true,
            kv: Kv::Subset(16),
        },
        // 17-64 rows a block: the 3-stage DECODE tiles, split along the keys and merged.
        Case {
            q_lens: vec![4, 1],
            kv_lens: vec![3000, 700],
            hq: 32,
            hkv: 4,
            d: 128,
            causal: true,
            kv: Kv::Paged(16),
        },
        // A long prefill at head_dim 64: over 16-bit K/V Hopper would plan 192-row blocks
        // here (three warpgroups), which the FP8 kernel cannot run; the FP8 shape keeps it
        // on its own tiles.
        Case {
            q_lens: vec![2600],
            kv_lens: vec![2600],
            hq: 8,
            hkv: 2,
            d: 64,
            causal: true,
            kv: Kv::Paged(16),
        },
    ];
    // Every way key-split blocks widen bytes (the one test of this binary reading FP8, so
    // the process-wide choice reaches no other test).
    use radix_kernels::attention::{Fp8Widen, set_fp8_widen};
    for widen in
        [Fp8Widen::BitMoves, Fp8Widen::ConvertKeys, Fp8Widen::ConvertValues, Fp8Widen::Convert]
    {
        set_fp8_widen(Some(widen));
        fp8_cases(&dev, &jit, scales, &cases, widen);
    }
    set_fp8_widen(None);
}

fn fp8_cases(
    dev: &radix_gpu::Device,
    jit: &Jit,
    scales: radix_kernels::attention::KvFp8Scales,
    cases: &[Case],
    widen: radix_kernels::attention::Fp8Widen,
) {
    for (i, c) in cases.iter().enumerate() {
        let mut rng = SmallRng::seed_from_u64(500 + i as u64);
        let shape = AttentionShape::new(c.hq, c.hkv, c.d, c.causal).with_fp8_kv(true);
        let mut qo = vec![0i32];
        for &l in &c.q_lens {
            qo.push(qo.last().unwrap() + l as i32);
        }
        let total_q = *qo.last().unwrap() as usize;
        let (kv, k, v) = build_kv::<f32>(&mut rng, c);
        let meta = BatchMeta::new(qo, kv, c.causal).unwrap();
        let q: Vec<bf16> = random(&mut rng, total_q * c.hq * c.d);
        // Values in -1..1: keys / 2^-7 reach 128, values / 0.006 about 167 (e4m3: 448).
        let quant = |x: &[f32], s: f32| -> (Vec<u8>, Vec<f32>) {
            let bytes: Vec<u8> =
                x.iter().map(|&x| float8::F8E4M3::from_f32(x / s).to_bits()).collect();
            let deq = bytes.iter().map(|&b| float8::F8E4M3::from_bits(b).to_f32() * s).collect();
            (bytes, deq)
        };
        let (kb, kd) = quant(&k, scales.k);
        let (vb, vd) = quant(&v, scales.v);
        let batch = AttentionBatch::new(dev, shape, meta.clone(), None).unwrap();
        let (dq, dk, dv) =
            (dev.upload(&q).unwrap(), dev.upload(&kb).unwrap(), dev.upload(&vb).unwrap());
        let mut o = dev.alloc::<bf16>(q.len()).unwrap();
        o.fill_bytes(0xFF).unwrap();
        batch.run_fp8(jit, &dq, &dk, &dv, scales, &mut o, None).unwrap();
        let got = o.to_vec().unwrap();
        let qf: Vec<f32> = q.iter().map(|x| x.to_f32()).collect(); // exact
        let want = attention_reference(&shape, &meta, &qf, &kd, &vd);
        let err = relative_error(&got, &want.o);
        assert!(
            err <= 1e-2,
            "FP8 pool case {i} (d={} kv={:?}, {widen:?}): rel err {err:.3e}",
            c.d,
            c.kv
        );
    }
}
