//! GPU tests of KV append with RoPE and of the per-page key bounds (`--features cuda`),
//! element by element against the f64 reference.
#![cfg(feature = "cuda")]

use half::{bf16, f16};
use radix_gpu::{DType, Element, HalfFloat, Jit, require_gpu};
use radix_kernels::kv_append::bounds::decode;
use radix_kernels::kv_append::{
    AppendBatch, AppendInputs, PoolShape, append, append_reference, key_bounds_record,
};
use radix_kernels::rope::{Llama3Scaling, RopeConfig};
use radix_kv::{KvDtype, KvGeometry, bounds_record_bytes as record_bytes};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng, rngs::SmallRng};

fn random<T: Element>(rng: &mut SmallRng, len: usize) -> Vec<T> {
    (0..len).map(|_| T::from_f64(rng.random_range(-2.0..2.0))).collect()
}

/// |got - want| within one rounding of the dtype at |want| plus a small absolute slack.
fn assert_close<T: HalfFloat>(what: &str, got: &[T], want: &[f64]) {
    let eps = if T::DTYPE == DType::BF16 { 1.0 / 128.0 } else { 1.0 / 1024.0 };
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let g = g.to_f64();
        assert!(g.is_finite(), "{what}[{i}] = {g}");
        assert!((g - w).abs() <= eps * w.abs() + 1e-3, "{what}[{i}]: got {g}, want {w}");
    }
}

/// One layer of `num_pages` pages of `T`, keeping key bounds.
fn pool<T: HalfFloat>(
    num_pages: usize,
    page_size: usize,
    hq: usize,
    hkv: usize,
    d: usize,
) -> PoolShape {
    let dtype = if T::DTYPE == DType::BF16 { KvDtype::BF16 } else { KvDtype::F16 };
    let kv = KvGeometry::new(1, hkv, page_size, d, dtype, true).unwrap();
    PoolShape::new(kv, num_pages, hq).unwrap()
}

/// `heads`: (query heads, kv heads).
fn case<T: HalfFloat>(
    head_dim: usize,
    page_size: usize,
    heads: (usize, usize),
    rope: RopeConfig,
    seed: u64,
) {
    let dev = require_gpu();
    let jit = Jit::new(None);
    let mut rng = SmallRng::seed_from_u64(seed);
    let shape = pool::<T>(40, page_size, heads.0, heads.1, head_dim);
    let inv_freq = rope.inv_freq();
    let mut k_pool: Vec<T> = random(&mut rng, shape.pool_elems());
    let mut v_pool: Vec<T> = random(&mut rng, shape.pool_elems());
    let (dk_init, dv_init) = (k_pool.clone(), v_pool.clone());
    let mut dk = dev.upload(&k_pool).unwrap();
    let mut dv = dev.upload(&v_pool).unwrap();
    let mut bounds = dev.alloc::<u8>(shape.bounds_bytes()).unwrap();
    bounds.fill_bytes(0xFF).unwrap();

    // Two sequences on shuffled pages, filled over three steps (prefill chunk, then two
    // decode-like steps), so pages fill across launches.
    let mut pages: Vec<usize> = (0..shape.num_pages()).collect();
    pages.shuffle(&mut rng);
    let seq_pages = [&pages[..10], &pages[10..20]];
    let start_pos = [0usize, 100_000]; // a long position too: RoPE angles far from zero
    let mut filled = [0usize; 2];
    let mut all_touched = std::collections::BTreeMap::new();
    for step_len in [page_size + 3, 1, 2] {
        let (mut positions, mut slots) = (Vec::new(), Vec::new());
        for s in 0..2 {
            for _ in 0..step_len {
                let tok = filled[s];
                let page = seq_pages[s][tok / page_size];
                positions.push((start_pos[s] + tok) as i32);
                slots.push((page * page_size + tok % page_size) as i32);
                all_touched.insert(page, tok % page_size + 1);
                filled[s] += 1;
            }
        }
        let n = positions.len();
        let qkv: Vec<T> = random(&mut rng, n * shape.qkv_row());
        let batch = AppendBatch { positions: &positions, slots: &slots };
        let inputs = AppendInputs::upload(&dev, &shape, &batch, &inv_freq).unwrap();
        let dqkv = dev.upload(&qkv).unwrap();
        let mut q_out = dev.alloc::<T>(n * shape.num_qo_heads() * head_dim).unwrap();
        q_out.fill_bytes(0xFF).unwrap();
        append(&jit, &shape, &inputs, &dqkv, &mut q_out, &mut dk, &mut dv, Some(&mut bounds))
            .unwrap();

        let (want_q, want_k, want_v) =
            append_reference(&shape, &qkv, &positions, &slots, &inv_freq, &k_pool, &v_pool);
        let got_k = dk.to_vec().unwrap();
        let got_v = dv.to_vec().unwrap();
        assert_close(&format!("q_out {}", T::DTYPE), &q_out.to_vec().unwrap(), &want_q);
        assert_close("k_pool", &got_k, &want_k);
        assert_close("v_pool", &got_v, &want_v);
        k_pool = got_k;
        v_pool = got_v;
    }
    // Slots never written are untouched.
    let written: std::collections::HashSet<usize> = (0..2)
        .flat_map(|s| {
            (0..filled[s]).map(move |t| seq_pages[s][t / page_size] * page_size + t % page_size)
        })
        .collect();
    let d = head_dim;
    for slot in (0..shape.num_pages() * page_size).filter(|s| !written.contains(s)) {
        let (page, off) = (slot / page_size, slot % page_size);
        for kh in 0..shape.num_kv_heads() {
            let at = ((page * shape.num_kv_heads() + kh) * page_size + off) * d;
            assert!(
                k_pool[at..at + d]
                    .iter()
                    .zip(&dk_init[at..at + d])
                    .all(|(a, b)| a.to_f64() == b.to_f64())
            );
            assert!(
                v_pool[at..at + d]
                    .iter()
                    .zip(&dv_init[at..at + d])
                    .all(|(a, b)| a.to_f64() == b.to_f64())
            );
        }
    }
    // The bounds record of every touched page is, to the bit, the reference's for its
    // filled keys (from the stored values), and contains each of those keys.
    let got = bounds.to_vec().unwrap();
    let rb = record_bytes(d);
    for (&page, &fill) in &all_touched {
        for kh in 0..shape.num_kv_heads() {
            let base = (page * shape.num_kv_heads() + kh) * shape.page_size() * d;
            let keys = &k_pool[base..base + fill * d];
            let at = (page * shape.num_kv_heads() + kh) * rb;
            let record = &got[at..at + rb];
            assert_eq!(record, &key_bounds_record(keys, d)[..], "page {page} head {kh}");
            let (lo, hi) = decode(record, d);
            for key in keys.chunks(d) {
                for (j, x) in key.iter().enumerate() {
                    let x = x.to_f64();
                    assert!(lo[j] <= x && x <= hi[j], "page {page} head {kh} dim {j}: {x}");
                }
            }
        }
    }
}

#[test]
fn append_rope_and_bounds_match_reference() {
    let llama3 = Llama3Scaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    let mut seed = 0;
    for head_dim in [64, 128] {
        for page_size in [1, 16, 64] {
            for scaling in [None, Some(llama3)] {
                seed += 1;
                let rope = RopeConfig { head_dim, theta: 500000.0, llama3: scaling };
                case::<bf16>(head_dim, page_size, (8, 2), rope, seed);
                case::<f16>(head_dim, page_size, (8, 2), rope, seed);
            }
        }
    }
}

/// Tokens with more 16-byte items than a block takes in one round (512): Llama-3-70B's 64
/// query and 8 kv heads at head dim 128 (704 items), 128 and 8 at 64 (608).
#[test]
fn append_takes_tokens_over_several_rounds() {
    for (head_dim, heads, seed) in [(128, (64, 8), 101), (64, (128, 8), 102)] {
        let rope = RopeConfig { head_dim, theta: 500000.0, llama3: None };
        case::<bf16>(head_dim, 16, heads, rope, seed);
    }
}

#[test]
fn append_rejects_bad_input() {
    let dev = require_gpu();
    let jit = Jit::new(None);
    let shape = pool::<bf16>(2, 16, 4, 2, 64);
    let inv = RopeConfig { head_dim: 64, theta: 10000.0, llama3: None }.inv_freq();
    let bad = AppendBatch { positions: &[0], slots: &[40] };
    assert!(AppendInputs::upload(&dev, &shape, &bad, &inv).is_err());
    let ok = AppendBatch { positions: &[0], slots: &[3] };
    let inputs = AppendInputs::upload(&dev, &shape, &ok, &inv).unwrap();
    let qkv = dev.alloc_zeros::<bf16>(shape.qkv_row()).unwrap();
    let mut q = dev.alloc_zeros::<bf16>(4 * 64).unwrap();
    let mut k = dev.alloc_zeros::<bf16>(shape.pool_elems()).unwrap();
    let mut v = dev.alloc_zeros::<bf16>(shape.pool_elems() - 1).unwrap();
    let mut bounds = dev.alloc_zeros::<u8>(shape.bounds_bytes()).unwrap();
    assert!(
        append(&jit, &shape, &inputs, &qkv, &mut q, &mut k, &mut v, Some(&mut bounds)).is_err()
    );
    // A pool that keeps key bounds refuses an append without them.
    let mut v = dev.alloc_zeros::<bf16>(shape.pool_elems()).unwrap();
    assert!(append(&jit, &shape, &inputs, &qkv, &mut q, &mut k, &mut v, None).is_err());
    assert!(append(&jit, &shape, &inputs, &qkv, &mut q, &mut k, &mut v, Some(&mut bounds)).is_ok());
}

/// Keys the random cases never produce: subnormals, signed zeros, values near the bf16
/// maximum beside tiny ones in one exponent group (quotients that underflow), NaN and
/// infinities. Written at position 0 (RoPE is the identity there), so the stored keys are
/// known; every stored bounds record must be the CPU encoder's, bit for bit, and contain
/// every finite key of the dims that hold no infinity.
#[test]
fn extreme_keys_get_the_cpu_encoders_bounds() {
    let dev = require_gpu();
    let jit = Jit::new(None);
    let mut rng = SmallRng::seed_from_u64(77);
    let groups: [&[f32]; 6] = [
        &[0.0, -0.0, 1.0e-40, -1.0e-40, 9.2e-41, -3.0e-39],
        &[3.0e38, -3.0e38, 1.0e-30, -1.0e-38, 0.0],
        &[f32::NAN, 1.0, -0.5, 0.25],
        &[f32::INFINITY, f32::NEG_INFINITY, 1.5, -2.0],
        &[1.0e10, -1.0e10, 1.0e-38, -1.0e-40],
        &[0.3, -1.7, 1.1, -0.2, 0.9],
    ];
    for head_dim in [64, 128] {
        let shape = pool::<bf16>(3, 16, 2, 2, head_dim);
        let rope = RopeConfig { head_dim, theta: 10000.0, llama3: None };
        let (hq, hkv, d, ps) = (2, 2, head_dim, 16);
        let mut dk = dev.alloc_zeros::<bf16>(shape.pool_elems()).unwrap();
        let mut dv = dev.alloc_zeros::<bf16>(shape.pool_elems()).unwrap();
        let mut bounds = dev.alloc::<u8>(shape.bounds_bytes()).unwrap();
        bounds.fill_bytes(0xA5).unwrap();
        // 16 tokens at position 0 fill page 1.
        let mut qkv = Vec::new();
        for _ in 0..ps {
            qkv.extend((0..hq * d).map(|_| bf16::from_f32(rng.random_range(-1.0..1.0))));
            for _ in 0..hkv {
                qkv.extend((0..d).map(|j| {
                    let values = groups[(j / 8) % groups.len()];
                    bf16::from_f32(values[rng.random_range(0..values.len())])
                }));
            }
            qkv.extend((0..hkv * d).map(|_| bf16::from_f32(rng.random_range(-1.0..1.0))));
        }
        let positions = vec![0i32; ps];
        let slots: Vec<i32> = (0..ps as i32).map(|o| ps as i32 + o).collect();
        let batch = AppendBatch { positions: &positions, slots: &slots };
        let inputs = AppendInputs::upload(&dev, &shape, &batch, &rope.inv_freq()).unwrap();
        let mut q_out = dev.alloc::<bf16>(ps * hq * d).unwrap();
        let dqkv = dev.upload(&qkv).unwrap();
        append(&jit, &shape, &inputs, &dqkv, &mut q_out, &mut dk, &mut dv, Some(&mut bounds))
            .unwrap();
        let keys = dk.to_vec().unwrap();
        let got = bounds.to_vec().unwrap();
        let rb = record_bytes(d);
        for kh in 0..hkv {
            let page_keys = &keys[(hkv + kh) * ps * d..][..ps * d];
            let stored_special = page_keys.iter().filter(|x| {
                let x = x.to_f32();
                !x.is_finite() || (x != 0.0 && x.abs() < 1.0e-37)
            });
            assert!(stored_special.count() > 10, "D {d} head {kh}: the special keys were stored");
            let record = &got[(hkv + kh) * rb..][..rb];
            assert_eq!(record, &key_bounds_record(page_keys, d)[..], "D {d} head {kh}");
            // Dims whose keys reach ±inf are not bounded; every other finite key is.
            let (lo, hi) = decode(record, d);
            let dim = |j: usize| page_keys.iter().skip(j).step_by(d).map(|x| x.to_f64());
            for j in (0..d).filter(|&j| dim(j).all(|x| !x.is_infinite())) {
                for x in dim(j).filter(|x| x.is_finite()) {
                    assert!(lo[j] <= x && x <= hi[j], "D {d} head {kh} dim {j}: {x}");
                }
            }
        }
    }
}

/// Appending into an FP8 pool: every stored byte times its scale is within e4m3's
/// rounding of the f64 reference's key (after RoPE) or value, slots not written keep
/// their bytes, and every touched page's bounds record is, to the bit, the CPU encoder's
/// for the keys the bytes hold.
#[test]
fn append_into_an_fp8_pool() {
    use radix_kernels::attention::KvFp8Scales;
    use radix_kernels::kv_append::append_fp8;
    let dev = require_gpu();
    let jit = Jit::new(None);
    let mut rng = SmallRng::seed_from_u64(77);
    let (page_size, d, hq, hkv) = (16, 128, 8, 2);
    let kv = KvGeometry::new(1, hkv, page_size, d, KvDtype::F8E4M3, true).unwrap();
    let shape = PoolShape::new(kv, 12, hq).unwrap();
    let scales = KvFp8Scales { k: 0.02, v: 0.0078125 };
    let inv_freq = RopeConfig { head_dim: d, theta: 500000.0, llama3: None }.inv_freq();
    let (mut dk, mut dv) = (
        dev.alloc::<u8>(shape.pool_elems()).unwrap(),
        dev.alloc::<u8>(shape.pool_elems()).unwrap(),
    );
    dk.fill_bytes(0x11).unwrap();
    dv.fill_bytes(0x22).unwrap();
    let mut bounds = dev.alloc::<u8>(shape.bounds_bytes()).unwrap();
    bounds.fill_bytes(0xFF).unwrap();
    // One sequence of 21 tokens on pages 5 and 2, at positions from 1000.
    let slots: Vec<i32> =
        (0..21).map(|t| if t < 16 { 5 * 16 + t } else { 2 * 16 + t - 16 }).collect();
    let positions: Vec<i32> = (0..21).map(|t| 1000 + t).collect();
    let qkv: Vec<bf16> = random(&mut rng, 21 * shape.qkv_row());
    let batch = AppendBatch { positions: &positions, slots: &slots };
    let inputs = AppendInputs::upload(&dev, &shape, &batch, &inv_freq).unwrap();
    let dqkv = dev.upload(&qkv).unwrap();
    let mut q_out = dev.alloc::<bf16>(21 * hq * d).unwrap();
    append_fp8(
        &jit,
        &shape,
        &inputs,
        &dqkv,
        &mut q_out,
        &mut dk,
        &mut dv,
        scales,
        Some(&mut bounds),
    )
    .unwrap();
    let zeros = vec![bf16::ZERO; shape.pool_elems()];
    let (_, want_k, want_v) =
        append_reference(&shape, &qkv, &positions, &slots, &inv_freq, &zeros, &zeros);
    let (kb, vb) = (dk.to_vec().unwrap(), dv.to_vec().unwrap());
    let deq = |b: u8, s: f32| float8::F8E4M3::from_bits(b).to_f32() * s;
    let written: std::collections::HashSet<usize> = slots.iter().map(|&s| s as usize).collect();
    for slot in 0..shape.num_pages() * page_size {
        let (page, off) = (slot / page_size, slot % page_size);
        for kh in 0..hkv {
            let at = ((page * hkv + kh) * page_size + off) * d;
            for i in at..at + d {
                if !written.contains(&slot) {
                    assert_eq!((kb[i], vb[i]), (0x11, 0x22), "slot {slot} was not written");
                    continue;
                }
                // e4m3: 3 mantissa bits, half an ulp 2^-4 relative; below 2^-6 x scale,
                // subnormal steps of 2^-9 x scale.
                for (got, want, s) in [
                    (deq(kb[i], scales.k), want_k[i], scales.k),
                    (deq(vb[i], scales.v), want_v[i], scales.v),
                ] {
                    let bound = want.abs() / 16.0 + s as f64 / 1024.0 + 1e-3 * want.abs();
                    assert!(
                        (got as f64 - want).abs() <= bound,
                        "slot {slot} dim {}: {got} vs {want}",
                        i - at
                    );
                }
            }
        }
    }
    let got = bounds.to_vec().unwrap();
    let rb = record_bytes(d);
    for (page, fill) in [(5usize, 16usize), (2, 5)] {
        for kh in 0..hkv {
            let base = (page * hkv + kh) * page_size * d;
            let keys: Vec<f32> =
                kb[base..base + fill * d].iter().map(|&b| deq(b, scales.k)).collect();
            let at = (page * hkv + kh) * rb;
            assert_eq!(
                &got[at..at + rb],
                &key_bounds_record(&keys, d)[..],
                "page {page} head {kh}"
            );
        }
    }
}
