//! GPU tests of the FP8 path (`--features cuda`): the per-token quantizer equals its CPU
//! reference byte for byte (zero rows, NaN, odd row counts, both input dtypes), and the
//! FP8 GEMM (cuBLASLt, per-token × per-channel scales) matches the f64 product of the
//! dequantized operands on odd and Llama-sized shapes, with and without bias. RMSNorm and
//! SiLU·mul with the quantization fused give the bytes the quantizer gives for their
//! output.
#![cfg(feature = "cuda")]

use half::{bf16, f16};
use radix_gpu::{Device, DeviceBuffer, Element, Gemm, HalfFloat, Jit, require_gpu};
use radix_kernels::fp8::{E4M3_MAX, e4m3_to_f32, quantize_rows, quantize_rows_reference};
use radix_kernels::ops::{self, Fp8Out};
use radix_kernels::relative_error;
use rand::{Rng, SeedableRng, rngs::SmallRng};

/// Rows of random values whose magnitudes differ from row to row (as activations do).
fn activations<T: Element>(rng: &mut SmallRng, rows: usize, cols: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let scale = 10f64.powf(rng.random_range(-2.0..2.0)) * (1 + r % 3) as f64;
        out.extend((0..cols).map(|_| T::from_f64(rng.random_range(-1.0..1.0) * scale)));
    }
    out
}

/// The f64 values of e4m3 rows of `cols` bytes, each row times its scale.
fn dequantize(bits: &[u8], scales: &[f32], cols: usize) -> Vec<f64> {
    bits.iter().enumerate().map(|(i, &v)| e4m3_to_f32(v) as f64 * scales[i / cols] as f64).collect()
}

/// Every buffer of a check on one `Device`: each `Device` has its own stream, and work on
/// two streams is not ordered (an upload on one can land after a kernel on the other).
fn quantize_on_gpu<T: HalfFloat>(
    dev: &Device,
    jit: &Jit,
    x: &[T],
    rows: usize,
    cols: usize,
) -> (Vec<u8>, Vec<f32>) {
    let dx = dev.upload(x).unwrap();
    let mut q: DeviceBuffer<u8> = dev.alloc(rows * cols).unwrap();
    let mut s: DeviceBuffer<f32> = dev.alloc(rows.max(1)).unwrap();
    q.fill_bytes(0x7f).unwrap(); // e4m3 NaN: a byte not written stays visible
    s.fill_bytes(0xff).unwrap();
    quantize_rows(jit, &dx, rows, cols, &mut q, &mut s).unwrap();
    (q.to_vec().unwrap(), s.to_vec().unwrap()[..rows].to_vec())
}

fn check_quantizer<T: HalfFloat>(dev: &Device, jit: &Jit, rng: &mut SmallRng) {
    for (rows, cols) in [(1, 8), (3, 576), (7, 4096), (33, 14336), (2, 4104)] {
        let mut x: Vec<T> = activations(rng, rows, cols);
        if rows > 2 {
            // A row of zeros keeps scale 1; a NaN stays NaN without spoiling its row.
            x[cols..2 * cols].iter_mut().for_each(|v| *v = T::from_f64(0.0));
            x[2 * cols + 5] = T::from_f64(f64::NAN);
        }
        let (q, s) = quantize_on_gpu(dev, jit, &x, rows, cols);
        let (want_q, want_s) = quantize_rows_reference(&x, rows, cols);
        assert_eq!(s, want_s, "{} [{rows}, {cols}]: scales", T::DTYPE);
        // Any NaN encoding (0x7f or 0xff) is NaN.
        let same = |a: u8, b: u8| a == b || (a & 0x7f == 0x7f && b & 0x7f == 0x7f);
        let diff = q.iter().zip(&want_q).position(|(&a, &b)| !same(a, b));
        assert!(diff.is_none(), "{} [{rows}, {cols}]: byte {diff:?} differs", T::DTYPE);
        // Each row's largest magnitude lands on ±448.
        let top = q[..cols].iter().map(|&b| e4m3_to_f32(b).abs()).fold(0.0, f32::max);
        assert_eq!(top, E4M3_MAX);
    }
}

#[test]
fn quantizer_matches_its_reference_bit_for_bit() {
    let jit = Jit::new(None);
    let mut rng = SmallRng::seed_from_u64(8);
    let dev = require_gpu();
    check_quantizer::<bf16>(&dev, &jit, &mut rng);
    check_quantizer::<f16>(&dev, &jit, &mut rng);
}

/// FP8 GEMM of quantized activations (per token) and a weight quantized per channel,
/// against the f64 product of what both dequantize to.
fn gemm_error(
    jit: &Jit,
    gemm: &Gemm,
    rng: &mut SmallRng,
    (m, n, k): (usize, usize, usize),
    bias: bool,
) -> f64 {
    let dev = gemm.device().clone();
    let x: Vec<bf16> = activations(rng, m, k);
    let w: Vec<bf16> = activations(rng, n, k);
    let (wq, ws) = quantize_rows_reference(&w, n, k);
    let b: Vec<bf16> = (0..n).map(|_| bf16::from_f64(rng.random_range(-1.0..1.0))).collect();
    let (q, qs) = quantize_on_gpu(&dev, jit, &x, m, k);
    let (dq, dqs) = (dev.upload(&q).unwrap(), dev.upload(&qs).unwrap());
    let (dwq, dws, db) =
        (dev.upload(&wq).unwrap(), dev.upload(&ws).unwrap(), dev.upload(&b).unwrap());
    let mut out: DeviceBuffer<bf16> = dev.alloc(m * n).unwrap();
    out.fill_bytes(0xff).unwrap();
    let bias_ptr = if bias { db.ptr() } else { 0 };
    // SAFETY: every buffer was allocated at the size the shape names.
    unsafe {
        gemm.matmul_fp8_raw(
            m,
            n,
            k,
            dq.ptr(),
            dqs.ptr(),
            dwq.ptr(),
            dws.ptr(),
            bias_ptr,
            out.ptr_mut(),
        )
    }
    .unwrap();
    let got = out.to_vec().unwrap();
    let (xd, wd) = (dequantize(&q, &qs, k), dequantize(&wq, &ws, k));
    let mut want = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k).map(|t| xd[i * k + t] * wd[j * k + t]).sum();
            want[i * n + j] = dot + if bias { b[j].to_f64() } else { 0.0 };
        }
    }
    relative_error(&got, &want)
}

#[test]
fn fp8_gemm_matches_the_dequantized_product() {
    let dev = require_gpu();
    let jit = Jit::new(None);
    let gemm = Gemm::new(&dev).unwrap();
    let mut rng = SmallRng::seed_from_u64(9);
    let shapes = [
        (1, 8, 16),
        (5, 264, 128),
        (3, 40, 48),
        (1, 1536, 576),
        (1, 4096, 4096),
        (7, 4096, 4096),
        (16, 4096, 4096),
        (1, 28672, 4096),
        (1, 4096, 14336),
        (64, 6144, 4096),
        (257, 1024, 14336),
        (1000, 4096, 4096),
    ];
    // Every shape's error first, so that one run shows the whole pattern.
    let mut bad = Vec::new();
    for (i, shape) in shapes.into_iter().enumerate() {
        let bias = i == 1;
        let err = gemm_error(&jit, &gemm, &mut rng, shape, bias);
        eprintln!("FP8 GEMM {shape:?} bias={bias}: rel err {err:.3e}");
        // bf16 output: 2^-9 per value; f32 accumulation adds little.
        if err.is_nan() || err > 8e-3 {
            bad.push((shape, err));
        }
    }
    assert!(bad.is_empty(), "FP8 GEMM errors above 8e-3: {bad:?}");
}

#[test]
fn fp8_gemm_rejects_unaligned_shapes() {
    let dev = require_gpu();
    let gemm = Gemm::new(&dev).unwrap();
    for (m, n, k) in [(1, 16, 24), (1, 12, 32), (0, 16, 16)] {
        // SAFETY: refused before any pointer is read.
        let err =
            unsafe { gemm.matmul_fp8_raw(m, n, k, 1, 1, 1, 1, 0, 1) }.unwrap_err().to_string();
        assert!(err.contains("FP8 GEMM") || err.contains("positive"), "{err}");
    }
}

/// The fused ops' e4m3 output equals the quantizer run on their bf16 output.
#[test]
fn fused_norm_and_silu_quantize_as_the_quantizer_does() {
    let dev = require_gpu();
    let jit = Jit::new(None);
    let mut rng = SmallRng::seed_from_u64(10);
    let fused_vs_apart = |out: &DeviceBuffer<bf16>,
                          q: &DeviceBuffer<u8>,
                          s: &DeviceBuffer<f32>,
                          rows: usize,
                          cols: usize,
                          what: &str| {
        let (want_q, want_s) =
            quantize_on_gpu(&dev, &jit, &out.to_vec().unwrap()[..rows * cols], rows, cols);
        assert_eq!(s.to_vec().unwrap()[..rows], want_s[..], "{what} [{rows}, {cols}]: scales");
        assert!(q.to_vec().unwrap()[..rows * cols] == want_q[..], "{what} [{rows}, {cols}]: bytes");
    };
    for (rows, hidden) in [(1, 576), (5, 4096), (3, 8192)] {
        let x: Vec<bf16> = activations(&mut rng, rows, hidden);
        let d: Vec<bf16> = activations(&mut rng, rows, hidden);
        let w: Vec<bf16> = activations(&mut rng, 1, hidden);
        let (dx, dd, dw) =
            (dev.upload(&x).unwrap(), dev.upload(&d).unwrap(), dev.upload(&w).unwrap());
        let mut out: DeviceBuffer<bf16> = dev.alloc(rows * hidden).unwrap();
        let mut q: DeviceBuffer<u8> = dev.alloc(rows * hidden).unwrap();
        let mut s: DeviceBuffer<f32> = dev.alloc(rows).unwrap();
        q.fill_bytes(0x7f).unwrap();
        let f = Fp8Out { q: &mut q, scales: &mut s };
        ops::rms_norm_fp8(&jit, &dx, &dw, rows, hidden, 1e-5, &mut out, Some(f)).unwrap();
        fused_vs_apart(&out, &q, &s, rows, hidden, "rms_norm");
        let mut residual = dev.upload(&x).unwrap();
        q.fill_bytes(0x7f).unwrap();
        let f = Fp8Out { q: &mut q, scales: &mut s };
        ops::add_rms_norm_fp8(&jit, &mut residual, &dd, &dw, rows, hidden, 1e-5, &mut out, Some(f))
            .unwrap();
        fused_vs_apart(&out, &q, &s, rows, hidden, "add_rms_norm");
    }
    for (rows, inter) in [(1, 1536), (4, 14336), (2, 16384), (3, 8), (5, 4104)] {
        let gu: Vec<bf16> = activations(&mut rng, rows, 2 * inter);
        let dgu = dev.upload(&gu).unwrap();
        let mut out: DeviceBuffer<bf16> = dev.alloc(rows * inter).unwrap();
        let mut q: DeviceBuffer<u8> = dev.alloc(rows * inter).unwrap();
        let mut s: DeviceBuffer<f32> = dev.alloc(rows).unwrap();
        q.fill_bytes(0x7f).unwrap();
        ops::silu_mul_fp8(&jit, &dgu, rows, inter, &mut out, Fp8Out { q: &mut q, scales: &mut s })
            .unwrap();
        fused_vs_apart(&out, &q, &s, rows, inter, "silu_mul");
        // The bf16 output is the plain kernel's.
        let mut plain: DeviceBuffer<bf16> = dev.alloc(rows * inter).unwrap();
        ops::silu_mul(&jit, &dgu, rows, inter, &mut plain).unwrap();
        assert!(
            plain.to_vec().unwrap() == out.to_vec().unwrap(),
            "silu_mul_fp8 [{rows}, {inter}]: bf16 output"
        );
    }
    // Rows the fused kernels do not hold are refused, not quantized wrongly.
    let x = dev.alloc_zeros::<bf16>(16384).unwrap();
    let w = dev.alloc_zeros::<bf16>(16384).unwrap();
    let mut out = dev.alloc_zeros::<bf16>(16384).unwrap();
    let (mut q, mut s) =
        (dev.alloc_zeros::<u8>(16384).unwrap(), dev.alloc_zeros::<f32>(1).unwrap());
    let f = Fp8Out { q: &mut q, scales: &mut s };
    let err = ops::rms_norm_fp8(&jit, &x, &w, 1, 16384, 1e-5, &mut out, Some(f)).unwrap_err();
    assert!(err.to_string().contains("8192"), "{err}");
}

/// The FP8-weight GEMVs (16-bit x, e4m3 weight with a scale per row) against the f64
/// product with the dequantized weight, every row count, N off the block's 8 rows; the
/// streaming one (sm_90a) at its 1-4 rows where K is a multiple of 2,048, with rows split
/// unevenly over the SMs and a row longer than a 32 KB stage (K = 36,864).
#[test]
fn fp8_gemv_matches_the_dequantized_product() {
    use radix_kernels::gemv;
    let dev = require_gpu();
    let jit = Jit::new(None);
    let mut rng = SmallRng::seed_from_u64(11);
    let mut streamed = 0;
    for (n, k) in [(1, 16), (13, 4096), (1000, 4112), (2048, 14336), (3000, 2048), (300, 36864)] {
        let w: Vec<bf16> = activations(&mut rng, n, k);
        let (wq, ws) = quantize_rows_reference(&w, n, k);
        let wd: Vec<f64> =
            wq.iter().enumerate().map(|(i, &b)| e4m3_to_f32(b) as f64 * ws[i / k] as f64).collect();
        let (dwq, dws) = (dev.upload(&wq).unwrap(), dev.upload(&ws).unwrap());
        for m in 1..=8 {
            let x: Vec<bf16> = activations(&mut rng, m, k);
            let dx = dev.upload(&x).unwrap();
            let mut want = vec![0.0f64; m * n];
            for i in 0..m {
                let row: Vec<f64> = x[i * k..(i + 1) * k].iter().map(|v| v.to_f64()).collect();
                for j in 0..n {
                    want[i * n + j] =
                        row.iter().zip(&wd[j * k..(j + 1) * k]).map(|(a, b)| a * b).sum();
                }
            }
            let mut out: DeviceBuffer<bf16> = dev.alloc(m * n).unwrap();
            out.fill_bytes(0xff).unwrap();
            gemv::gemv_fp8(&jit, m, n, k, &dx, &dwq, &dws, &mut out).unwrap();
            let err = relative_error(&out.to_vec().unwrap(), &want);
            assert!(err <= 8e-3, "gemv_fp8 bf16 M={m} N={n} K={k}: rel err {err:.3e}");
            let mut out32: DeviceBuffer<f32> = dev.alloc(m * n).unwrap();
            out32.fill_bytes(0xff).unwrap();
            gemv::gemv_fp8(&jit, m, n, k, &dx, &dwq, &dws, &mut out32).unwrap();
            let err = relative_error(&out32.to_vec().unwrap(), &want);
            assert!(err <= 1e-5, "gemv_fp8 f32 M={m} N={n} K={k}: rel err {err:.3e}");
            if !gemv::fits_stream_fp8(dev.info(), m, n, k) {
                continue;
            }
            streamed += 1;
            out.fill_bytes(0xff).unwrap();
            gemv::gemv_stream_fp8(&jit, m, n, k, &dx, &dwq, &dws, &mut out).unwrap();
            let err = relative_error(&out.to_vec().unwrap(), &want);
            assert!(err <= 8e-3, "gemv_stream_fp8 bf16 M={m} N={n} K={k}: rel err {err:.3e}");
            out32.fill_bytes(0xff).unwrap();
            gemv::gemv_stream_fp8(&jit, m, n, k, &dx, &dwq, &dws, &mut out32).unwrap();
            let err = relative_error(&out32.to_vec().unwrap(), &want);
            assert!(err <= 1e-5, "gemv_stream_fp8 f32 M={m} N={n} K={k}: rel err {err:.3e}");
        }
    }
    // The streaming kernel runs on sm_90a only; there it must have run the cases above whose
    // K is a multiple of 2,048 at 1-4 rows (4 shapes x 4 row counts).
    if dev.arch() == radix_gpu::Arch::SM90A {
        assert_eq!(streamed, 16, "streaming FP8 GEMV cases run");
    }
}

/// The skinny FP8 GEMM against the f64 product of the dequantized operands: every MMA
/// column count (1-8, 9-16, 17-32, 33-64 rows, partly filled), N off the 64-row block
/// and the 16-row warp tile, K split unevenly (6144x4096: 5 splits, the last shorter) and
/// not at all (28672 rows fill the GPU alone), with bias; f16 output too. Each
/// product runs twice: the split-K counters must be back at zero, so the second run
/// equals the first bit for bit. On Hopper the wgmma variant adds up its splits in a
/// cluster from 33 rows; run again with `RADIX_SPARSE_FP8_SKINNY_CLUSTER=1` (always) and
/// `=0` (never).
#[test]
fn skinny_fp8_gemm_matches_the_dequantized_product() {
    use radix_kernels::fp8::skinny::{self, SkinnyScratch};
    let dev = require_gpu();
    let jit = Jit::new(None);
    let mut rng = SmallRng::seed_from_u64(12);
    let mut partial: DeviceBuffer<f32> = dev.alloc(1 << 21).unwrap();
    let mut counters: DeviceBuffer<i32> = dev.alloc_zeros(4096).unwrap();
    let cases: &[(usize, usize, usize)] = &[
        (1, 1, 64),
        (1, 4096, 4096),
        (3, 13, 4096),
        (8, 1000, 4160),
        (8, 1000, 4096),
        (9, 6144, 4096),
        (17, 2048, 14336),
        (33, 200, 192),
        (64, 4096, 4096),
        (3, 28672, 4096),
        (48, 301, 4096),
    ];
    let mut bad = Vec::new();
    for (i, &(m, n, k)) in cases.iter().enumerate() {
        let with_bias = i % 3 == 1;
        let x: Vec<bf16> = activations(&mut rng, m, k);
        let w: Vec<bf16> = activations(&mut rng, n, k);
        let (wq, ws) = quantize_rows_reference(&w, n, k);
        let (xq, xs) = quantize_on_gpu(&dev, &jit, &x, m, k);
        let b: Vec<bf16> = (0..n).map(|_| bf16::from_f64(rng.random_range(-1.0..1.0))).collect();
        let (xd, wd) = (dequantize(&xq, &xs, k), dequantize(&wq, &ws, k));
        let mut want = vec![0.0f64; m * n];
        for r in 0..m {
            for j in 0..n {
                let dot: f64 = xd[r * k..(r + 1) * k]
                    .iter()
                    .zip(&wd[j * k..(j + 1) * k])
                    .map(|(a, b)| a * b)
                    .sum();
                want[r * n + j] = dot + if with_bias { b[j].to_f64() } else { 0.0 };
            }
        }
        let (dxq, dxs) = (dev.upload(&xq).unwrap(), dev.upload(&xs).unwrap());
        let (dwq, dws, db) =
            (dev.upload(&wq).unwrap(), dev.upload(&ws).unwrap(), dev.upload(&b).unwrap());
        let bias = with_bias.then_some(&db);
        // The mma.sync kernel, and on Hopper with K in whole 128-byte stages the wgmma one
        // with one and two warpgroups a block.
        use skinny::Variant;
        for variant in [Variant::Mma, Variant::Wgmma64, Variant::Wgmma128] {
            if variant != Variant::Mma && !skinny::wgmma_runs(dev.info().arch(), k) {
                continue;
            }
            let mut runs = Vec::new();
            for _ in 0..2 {
                let mut out: DeviceBuffer<bf16> = dev.alloc(m * n).unwrap();
                out.fill_bytes(0xff).unwrap();
                let scratch = SkinnyScratch { partial: &mut partial, counters: &mut counters };
                let (x, w) = ((&dxq, &dxs), (&dwq, &dws));
                skinny::gemm_with(&jit, (m, n, k), x, w, bias, &mut out, scratch, Some(variant))
                    .unwrap();
                runs.push(out.to_vec().unwrap());
            }
            let err = relative_error(&runs[0], &want);
            eprintln!(
                "skinny FP8 GEMM {m}x{n}x{k} bias={with_bias} {variant:?}: rel err {err:.3e}"
            );
            if err.is_nan() || err > 8e-3 {
                bad.push(((m, n, k, variant), err));
            }
            let same = runs[0].iter().zip(&runs[1]).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{m}x{n}x{k} {variant:?}: a second run differs (split-K counters?)");
        }
    }
    assert!(bad.is_empty(), "skinny FP8 GEMM errors above 8e-3: {bad:?}");
    // f16 output (values within f16's range), K split.
    let (m, n, k) = (5, 300, 4096);
    let unit = |rng: &mut SmallRng, len: usize| -> Vec<f16> {
        (0..len).map(|_| f16::from_f64(rng.random_range(-1.0..1.0))).collect()
    };
    let (x, w) = (unit(&mut rng, m * k), unit(&mut rng, n * k));
    let (xq, xs) = quantize_on_gpu(&dev, &jit, &x, m, k);
    let (wq, ws) = quantize_rows_reference(&w, n, k);
    let mut want = vec![0.0f64; m * n];
    for r in 0..m {
        for j in 0..n {
            want[r * n + j] = (0..k)
                .map(|t| {
                    e4m3_to_f32(xq[r * k + t]) as f64
                        * xs[r] as f64
                        * e4m3_to_f32(wq[j * k + t]) as f64
                        * ws[j] as f64
                })
                .sum();
        }
    }
    let (dxq, dxs) = (dev.upload(&xq).unwrap(), dev.upload(&xs).unwrap());
    let (dwq, dws) = (dev.upload(&wq).unwrap(), dev.upload(&ws).unwrap());
    let mut out: DeviceBuffer<f16> = dev.alloc(m * n).unwrap();
    // The mma.sync kernel, and on Hopper the wgmma ones (the first thrice elsewhere: fine).
    let hopper = skinny::wgmma_runs(dev.info().arch(), k);
    for variant in [skinny::Variant::Mma, skinny::Variant::Wgmma64, skinny::Variant::Wgmma128] {
        let variant = if hopper { variant } else { skinny::Variant::Mma };
        out.fill_bytes(0xff).unwrap();
        let scratch = SkinnyScratch { partial: &mut partial, counters: &mut counters };
        let (x, w) = ((&dxq, &dxs), (&dwq, &dws));
        skinny::gemm_with::<f16>(&jit, (m, n, k), x, w, None, &mut out, scratch, Some(variant))
            .unwrap();
        let err = relative_error(&out.to_vec().unwrap(), &want);
        assert!(err <= 2e-3, "skinny FP8 GEMM f16 {m}x{n}x{k} {variant:?}: rel err {err:.3e}");
    }
    // Shapes it does not take are refused, not run.
    let mut out: DeviceBuffer<bf16> = dev.alloc(65 * 64).unwrap();
    let (q, s) = (dev.alloc::<u8>(65 * 96).unwrap(), dev.alloc::<f32>(65).unwrap());
    for (m, n, k) in [(65, 1, 64), (1, 1, 96), (0, 1, 64)] {
        let scratch = SkinnyScratch { partial: &mut partial, counters: &mut counters };
        let e = skinny::gemm(&jit, (m, n, k), (&q, &s), (&q, &s), None, &mut out, scratch);
        assert!(e.unwrap_err().to_string().contains("skinny FP8 GEMM"), "{m}x{n}x{k}");
    }
}
