//! GPU tests of the small ops and of the sampler (`--features cuda`).
#![cfg(feature = "cuda")]

use half::bf16;
use radix_gpu::{Jit, require_gpu};
use radix_kernels::ops::{self, SampleRow, rms_norm_reference, silu_mul_reference};
use radix_kernels::relative_error;
use rand::{Rng, SeedableRng, rngs::SmallRng};

fn random(rng: &mut SmallRng, n: usize) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f64(rng.random_range(-2.0..2.0))).collect()
}

fn f64s(v: &[bf16]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

#[test]
fn norms_silu_embed_and_gather_match_references() {
    let dev = require_gpu();
    let jit = Jit::new(None);
    let mut rng = SmallRng::seed_from_u64(1);
    for (rows, hidden) in [(1, 64), (7, 4096), (33, 4104)] {
        let x = random(&mut rng, rows * hidden);
        let delta = random(&mut rng, rows * hidden);
        let w = random(&mut rng, hidden);
        let dx = dev.upload(&x).unwrap();
        let dw = dev.upload(&w).unwrap();
        let mut out = dev.alloc::<bf16>(rows * hidden).unwrap();
        out.fill_bytes(0xFF).unwrap();
        ops::rms_norm(&jit, &dx, &dw, rows, hidden, 1e-5, &mut out).unwrap();
        let want = rms_norm_reference(&f64s(&x), &f64s(&w), 1e-5);
        let err = relative_error(&out.to_vec().unwrap(), &want);
        assert!(err < 1e-2, "rms_norm {rows}x{hidden}: {err:.2e}");

        let mut residual = dev.upload(&x).unwrap();
        let dd = dev.upload(&delta).unwrap();
        out.fill_bytes(0xFF).unwrap();
        ops::add_rms_norm(&jit, &mut residual, &dd, &dw, rows, hidden, 1e-5, &mut out).unwrap();
        let summed: Vec<f64> = x
            .iter()
            .zip(&delta)
            .map(|(a, b)| bf16::from_f64(a.to_f64() + b.to_f64()).to_f64())
            .collect();
        assert_eq!(f64s(&residual.to_vec().unwrap()), summed, "residual update");
        let err =
            relative_error(&out.to_vec().unwrap(), &rms_norm_reference(&summed, &f64s(&w), 1e-5));
        assert!(err < 1e-2, "add_rms_norm: {err:.2e}");

        let inter = hidden / 2;
        let gate_up = random(&mut rng, rows * 2 * inter);
        let mut out = dev.alloc::<bf16>(rows * inter).unwrap();
        out.fill_bytes(0xFF).unwrap();
        ops::silu_mul(&jit, &dev.upload(&gate_up).unwrap(), rows, inter, &mut out).unwrap();
        let err =
            relative_error(&out.to_vec().unwrap(), &silu_mul_reference(&f64s(&gate_up), inter));
        assert!(err < 1e-2, "silu_mul: {err:.2e}");
    }
    // Embedding rows and gathered rows are exact copies.
    let (vocab, hidden) = (50, 128);
    let table = random(&mut rng, vocab * hidden);
    let ids = vec![3i32, 49, 0, 3];
    let mut out = dev.alloc::<bf16>(ids.len() * hidden).unwrap();
    out.fill_bytes(0xFF).unwrap();
    ops::embed(
        &jit,
        &dev.upload(&table).unwrap(),
        &dev.upload(&ids).unwrap(),
        ids.len(),
        hidden,
        &mut out,
    )
    .unwrap();
    let got = out.to_vec().unwrap();
    for (r, &id) in ids.iter().enumerate() {
        assert_eq!(
            f64s(&got[r * hidden..(r + 1) * hidden]),
            f64s(&table[id as usize * hidden..][..hidden])
        );
    }
    let rows = vec![2i32, 0];
    let mut g = dev.alloc::<bf16>(2 * hidden).unwrap();
    ops::gather_rows(&jit, &out, &dev.upload(&rows).unwrap(), 2, hidden, &mut g).unwrap();
    let g = g.to_vec().unwrap();
    assert_eq!(f64s(&g[..hidden]), f64s(&got[2 * hidden..3 * hidden]));
}

fn sample(jit: &Jit, logits: &[f32], vocab: usize, rows: &[SampleRow]) -> (Vec<i32>, Vec<f32>) {
    let dev = require_gpu();
    let words: Vec<u32> = rows.iter().flat_map(|r| r.words()).collect();
    let mut tokens = dev.alloc::<i32>(rows.len()).unwrap();
    let mut logprobs = dev.alloc::<f32>(rows.len()).unwrap();
    ops::sample_rows(
        jit,
        &dev.upload(logits).unwrap(),
        &dev.upload(&words).unwrap(),
        rows.len(),
        vocab,
        &mut tokens,
        &mut logprobs,
    )
    .unwrap();
    (tokens.to_vec().unwrap(), logprobs.to_vec().unwrap())
}

#[test]
fn sampler_greedy_filters_seeds_and_distribution() {
    let jit = Jit::new(None);
    let mut rng = SmallRng::seed_from_u64(2);
    let vocab = 128_256;
    let rows = 8;
    let logits: Vec<f32> = (0..rows * vocab).map(|_| rng.random_range(-5.0f32..5.0)).collect();
    let greedy = SampleRow { temperature: 0.0, top_p: 1.0, ..Default::default() };
    let (tok, lp) = sample(&jit, &logits, vocab, &vec![greedy; rows]);
    for r in 0..rows {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let want = radix_kernels_argmax(row);
        assert_eq!(tok[r] as usize, want, "greedy row {r}");
        let m = row.iter().cloned().fold(f32::MIN, f32::max);
        let lz = m + row.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
        assert!((lp[r] - (row[want] - lz)).abs() < 1e-3, "logprob row {r}");
    }
    // top_k = 1 is greedy whatever the temperature; seeds reproduce.
    let k1 = SampleRow { temperature: 1.0, top_p: 1.0, top_k: 1, seed: 5, ..Default::default() };
    assert_eq!(sample(&jit, &logits, vocab, &vec![k1; rows]).0, tok);
    let hot: Vec<SampleRow> = (0..rows)
        .map(|i| SampleRow {
            temperature: 1.0,
            top_p: 0.9,
            top_k: 50,
            seed: 9,
            index: i as u64,
            ..Default::default()
        })
        .collect();
    let a = sample(&jit, &logits, vocab, &hot).0;
    assert_eq!(a, sample(&jit, &logits, vocab, &hot).0);
    for (r, &t) in a.iter().enumerate() {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let above = row.iter().filter(|&&x| x > row[t as usize]).count();
        assert!(above < 50, "top_k 50 sampled a token with {above} larger logits");
    }
    // The distribution: 4 tokens with probabilities softmax([2, 1, 0, -1]); 4000 draws.
    let small = [2.0f32, 1.0, 0.0, -1.0];
    let n = 4000;
    let many: Vec<f32> = small.iter().cycle().take(4 * n).cloned().collect();
    let draws: Vec<SampleRow> = (0..n)
        .map(|i| SampleRow {
            temperature: 1.0,
            top_p: 1.0,
            seed: 77,
            index: i as u64,
            ..Default::default()
        })
        .collect();
    let got = sample(&jit, &many, 4, &draws).0;
    let z: f32 = small.iter().map(|x| x.exp()).sum();
    for (t, logit) in small.iter().enumerate() {
        let freq = got.iter().filter(|&&x| x == t as i32).count() as f32 / n as f32;
        let p = logit.exp() / z;
        assert!((freq - p).abs() < 0.03, "token {t}: frequency {freq:.3} vs probability {p:.3}");
    }
    // min_p 0.5 and top_p 0.5 keep only token 0 here (it holds 64% of the mass).
    for row in [
        SampleRow { temperature: 1.0, top_p: 1.0, min_p: 0.5, ..Default::default() },
        SampleRow { temperature: 1.0, top_p: 0.5, ..Default::default() },
    ] {
        let draws: Vec<SampleRow> = (0..200).map(|i| SampleRow { index: i, ..row }).collect();
        let many: Vec<f32> = small.iter().cycle().take(4 * 200).cloned().collect();
        assert!(sample(&jit, &many, 4, &draws).0.iter().all(|&t| t == 0));
    }
}

fn radix_kernels_argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}
