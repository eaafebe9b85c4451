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
    let out = sample_with(jit, logits, vocab, rows, &[], &[], 0);
    (out.0, out.1)
}

/// Samples with extras: `bias` (token, value) lists and `masks` (one per masked row, in
/// row order), `top` alternatives per row. Returns tokens, logprobs, the alternatives
/// and the logits as the kernel left them.
#[allow(clippy::type_complexity)]
fn sample_with(
    jit: &Jit,
    logits: &[f32],
    vocab: usize,
    rows: &[SampleRow],
    bias: &[(u32, f32)],
    masks: &[Vec<u32>],
    top: usize,
) -> (Vec<i32>, Vec<f32>, Vec<Vec<(u32, f32)>>, Vec<f32>) {
    let dev = require_gpu();
    let words: Vec<u32> = rows.iter().flat_map(|r| r.words()).collect();
    let mask_words = vocab.div_ceil(32);
    let mut inputs: Vec<u32> = bias.iter().map(|b| b.0).collect();
    inputs.extend(bias.iter().map(|b| b.1.to_bits()));
    for m in masks {
        assert_eq!(m.len(), mask_words);
        inputs.extend_from_slice(m);
    }
    inputs.push(0); // never empty
    let inputs = dev.upload(&inputs).unwrap();
    let mut tokens = dev.alloc::<i32>(rows.len()).unwrap();
    let mut logprobs = dev.alloc::<f32>(rows.len()).unwrap();
    let mut top_t = dev.alloc::<i32>(rows.len() * top.max(1)).unwrap();
    let mut top_l = dev.alloc::<f32>(rows.len() * top.max(1)).unwrap();
    let mut l = dev.upload(logits).unwrap();
    let extras = ops::SamplerExtras {
        inputs: Some(&inputs),
        bias_len: bias.len(),
        mask_rows: masks.len(),
        mask_words,
        top: (top > 0).then_some((&mut top_t, &mut top_l)),
        top_stride: top,
    };
    ops::sample_rows(
        jit,
        &mut l,
        &dev.upload(&words).unwrap(),
        rows,
        vocab,
        extras,
        &mut tokens,
        &mut logprobs,
    )
    .unwrap();
    let (tt, tl) = (top_t.to_vec().unwrap(), top_l.to_vec().unwrap());
    let tops = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            (0..r.top_n as usize).map(|j| (tt[i * top + j] as u32, tl[i * top + j])).collect()
        })
        .collect();
    (tokens.to_vec().unwrap(), logprobs.to_vec().unwrap(), tops, l.to_vec().unwrap())
}

/// f64 log-softmax of one row.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().map(|&x| x as f64).fold(f64::MIN, f64::max);
    let lz = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    row.iter().map(|&x| x as f64 - lz).collect()
}

#[test]
fn sampler_alternatives_bias_and_masks_match_the_host() {
    let jit = Jit::new(None);
    let mut rng = SmallRng::seed_from_u64(11);
    // Off the warp and word sizes, with a tie.
    let vocab = 49_157;
    let rows = 5;
    let mut logits: Vec<f32> = (0..rows * vocab).map(|_| rng.random_range(-6.0f32..6.0)).collect();
    logits[3] = logits[40_000]; // a tie in row 0
    logits[vocab + 18] = 30.0; // bias +100 still wins
    let raw = logits.clone();
    // Row 0: greedy, 20 alternatives. Row 1: sampled, 7 alternatives, biased. Row 2:
    // greedy, masked to 3 tokens, biased. Row 3: sampled, masked to 100 tokens. Row 4:
    // plain greedy (nothing extra).
    let bias = vec![(5u32, 100.0f32), (9, -3.0), (700, 50.0), (12, 2.5)];
    let allowed2 = [11usize, 700, 49_156];
    let allowed3: Vec<usize> = (0..100).map(|i| i * 401 + 3).collect();
    let mask_of = |allowed: &[usize]| {
        let mut m = vec![0u32; vocab.div_ceil(32)];
        for &t in allowed {
            m[t / 32] |= 1 << (t % 32);
        }
        m
    };
    let greedy = SampleRow::default();
    let hot = SampleRow { temperature: 1.0, seed: 3, ..Default::default() };
    let spec = [
        SampleRow { top_n: 20, ..greedy },
        SampleRow { top_n: 7, bias_start: 0, bias_count: 2, ..hot },
        SampleRow { bias_start: 2, bias_count: 2, mask_row: 0, ..greedy },
        SampleRow { mask_row: 1, index: 4, ..hot },
        greedy,
    ];
    let (tok, lp, tops, edited) = sample_with(
        &jit,
        &logits,
        vocab,
        &spec,
        &bias,
        &[mask_of(&allowed2), mask_of(&allowed3)],
        20,
    );
    for r in 0..rows {
        let row = &raw[r * vocab..(r + 1) * vocab];
        let ls = log_softmax(row);
        let t = tok[r] as usize;
        // Every log-probability is of the raw row, whatever edits the row had.
        let tol = 1e-4 * ls[t].abs().max(1.0);
        assert!((lp[r] as f64 - ls[t]).abs() < tol, "row {r}: {} vs {}", lp[r], ls[t]);
        // Alternatives: the host's order (logit desc, id asc).
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        assert_eq!(tops[r].len(), spec[r].top_n as usize);
        for (j, &(at, al)) in tops[r].iter().enumerate() {
            assert_eq!(at as usize, order[j], "row {r} alternative {j}");
            assert!((al as f64 - ls[order[j]]).abs() < 1e-4, "row {r} alternative {j}");
        }
    }
    assert_eq!(tok[1], 5, "bias +100 wins");
    assert_eq!(tok[2], 700, "bias +50 among the allowed");
    assert!(allowed3.contains(&(tok[3] as usize)), "row 3 sampled a disallowed {}", tok[3]);
    assert_eq!(tok[4] as usize, radix_kernels_argmax(&raw[4 * vocab..]));
    // Rows without bias or mask are left as they were; masked rows hold -inf outside.
    assert!(edited[..vocab].iter().zip(&raw[..vocab]).all(|(a, b)| a.to_bits() == b.to_bits()));
    assert!(edited[2 * vocab + 12].is_infinite() && edited[2 * vocab + 12] < 0.0);
    assert_eq!(edited[2 * vocab + 700], raw[2 * vocab + 700] + 50.0);
    // Scoring rows (prompt log-probabilities): the target's raw log-probability, no draw,
    // bias and mask ignored.
    let scored = [
        SampleRow { target: 123, top_n: 4, ..hot },
        SampleRow { target: 0, bias_start: 0, bias_count: 2, ..greedy },
    ];
    let (tok, lp, tops, _) = sample_with(&jit, &raw[..2 * vocab], vocab, &scored, &bias, &[], 4);
    assert_eq!(tok, vec![123, 0]);
    for (r, &t) in [123usize, 0].iter().enumerate() {
        let ls = log_softmax(&raw[r * vocab..(r + 1) * vocab]);
        assert!((lp[r] as f64 - ls[t]).abs() < 1e-4, "scored row {r}");
    }
    assert_eq!(tops[0].len(), 4);
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

/// Rows with nothing to filter, edit or report (greedy, plain temperature) take the
/// sampler's one-pass path: the same tokens and log-probabilities as the filtered path
/// (forced here by a filter that removes nothing, or by one alternative), at a vocabulary
/// of whole 16-byte vectors and one off them, with -inf and NaN logits in some rows.
#[test]
fn sampler_one_pass_rows_match_the_filtered_path() {
    let jit = Jit::new(None);
    let mut rng = SmallRng::seed_from_u64(21);
    for vocab in [128_256usize, 32_001] {
        let rows = 6;
        let mut logits: Vec<f32> =
            (0..rows * vocab).map(|_| rng.random_range(-8.0f32..8.0)).collect();
        for i in (0..vocab).step_by(3) {
            logits[vocab + i] = f32::NEG_INFINITY; // row 1: a third of the tokens masked out
        }
        logits[2 * vocab + 77] = f32::NAN; // row 2: a NaN logit
        for x in &mut logits[3 * vocab..4 * vocab] {
            *x = f32::NEG_INFINITY; // row 3: nothing but -inf
        }
        let plain: Vec<SampleRow> = (0..rows)
            .map(|r| SampleRow {
                temperature: if r % 2 == 0 { 0.0 } else { 0.7 },
                seed: 5,
                index: r as u64,
                ..Default::default()
            })
            .collect();
        // min_p 1e-30 keeps every token here; greedy rows ignore filters, so one
        // alternative sends them down the filtered path instead.
        let filtered: Vec<SampleRow> = plain
            .iter()
            .map(|r| {
                if r.temperature > 0.0 {
                    SampleRow { min_p: 1e-30, ..*r }
                } else {
                    SampleRow { top_n: 1, ..*r }
                }
            })
            .collect();
        let (tok, lp) = sample(&jit, &logits, vocab, &plain);
        let (want_tok, want_lp, _, _) = sample_with(&jit, &logits, vocab, &filtered, &[], &[], 1);
        assert_eq!(tok, want_tok, "vocab {vocab}");
        for r in 0..rows {
            let row = &logits[r * vocab..(r + 1) * vocab];
            if r == 2 || r == 3 {
                // NaN in the row, or no finite logit: no log-probability to report.
                assert!(lp[r].is_nan() && want_lp[r].is_nan(), "vocab {vocab} row {r}: {}", lp[r]);
                continue;
            }
            let ls = log_softmax(row);
            let t = tok[r] as usize;
            assert!(row[t].is_finite(), "vocab {vocab} row {r} drew a -inf token {t}");
            assert!(
                (lp[r] as f64 - ls[t]).abs() < 1e-4,
                "vocab {vocab} row {r}: {} vs {}",
                lp[r],
                ls[t]
            );
            assert!((lp[r] - want_lp[r]).abs() < 5e-5, "vocab {vocab} row {r}");
        }
        assert_eq!(tok[0] as usize, radix_kernels_argmax(&logits[..vocab]));
    }
    // A NaN that a thread sees among nothing but -inf (or alone) still poisons the row's
    // log-probability, as in the filtered path; the token is the best finite one.
    let inf = f32::INFINITY;
    for row in
        [vec![f32::NAN, 1.0, 2.0, 3.0, 4.0], vec![f32::NAN, -inf, -inf, -inf, 0.0, 0.5, 0.0, 0.0]]
    {
        let vocab = row.len();
        let greedy = [SampleRow::default()];
        let (tok, lp) = sample(&jit, &row, vocab, &greedy);
        let (want_tok, want_lp, _, _) =
            sample_with(&jit, &row, vocab, &[SampleRow { top_n: 1, ..greedy[0] }], &[], &[], 1);
        assert_eq!(tok, want_tok, "vocab {vocab}");
        assert_eq!(tok[0] as usize, if vocab == 5 { 4 } else { 5 }, "vocab {vocab}");
        assert!(
            lp[0].is_nan() && want_lp[0].is_nan(),
            "vocab {vocab}: {} and {}",
            lp[0],
            want_lp[0]
        );
    }
}
