//! GPU tests of the decode GEMVs (`--features cuda`): every row count against the f64
//! reference, both input dtypes, f32 and half outputs, N off the blocks' row counts; the
//! streaming kernel (Hopper) also in a chain whose second product reads the first's output
//! under programmatic dependent launch.
#![cfg(feature = "cuda")]

use half::{bf16, f16};
use radix_gpu::gemm::gemm_reference;
use radix_gpu::{BLayout, DeviceBuffer, Element, HalfFloat, Jit, require_gpu};
use radix_kernels::{gemv, relative_error};
use rand::{Rng, SeedableRng, rngs::SmallRng};

fn random<T: Element>(rng: &mut SmallRng, n: usize) -> Vec<T> {
    (0..n).map(|_| T::from_f64(rng.random_range(-1.0..1.0))).collect()
}

/// `gemv::gemv` or `gemv::gemv_stream`, as a function value over one dtype pair.
type GemvFn<T, O> = fn(
    &Jit,
    usize,
    usize,
    usize,
    &DeviceBuffer<T>,
    &DeviceBuffer<T>,
    &mut DeviceBuffer<O>,
) -> radix_gpu::Result<()>;

fn check<T: HalfFloat, O: Element>(
    jit: &Jit,
    rng: &mut SmallRng,
    m: usize,
    n: usize,
    k: usize,
    tol: f64,
) {
    check_with::<T, O>(gemv::gemv, jit, rng, m, n, k, tol)
}

fn check_with<T: HalfFloat, O: Element>(
    f: GemvFn<T, O>,
    jit: &Jit,
    rng: &mut SmallRng,
    m: usize,
    n: usize,
    k: usize,
    tol: f64,
) {
    let dev = require_gpu();
    let x: Vec<T> = random(rng, m * k);
    let w: Vec<T> = random(rng, n * k);
    let (dx, dw) = (dev.upload(&x).unwrap(), dev.upload(&w).unwrap());
    let mut out: DeviceBuffer<O> = dev.alloc(m * n).unwrap();
    out.fill_bytes(0xFF).unwrap();
    f(jit, m, n, k, &dx, &dw, &mut out).unwrap();
    let got = out.to_vec().unwrap();
    let want = gemm_reference(m, n, k, &x, &w, BLayout::NK, None);
    let err = relative_error(&got, &want);
    assert!(err <= tol, "{} -> {} M={m} N={n} K={k}: rel err {err:.3e}", T::DTYPE, O::DTYPE);
}

#[test]
fn every_row_count_matches_the_reference() {
    let jit = Jit::new(None);
    let mut rng = SmallRng::seed_from_u64(3);
    for m in 1..=8 {
        for (n, k) in [(1, 8), (13, 4096), (1000, 4104), (4096, 14336)] {
            check::<bf16, bf16>(&jit, &mut rng, m, n, k, 8e-3);
            check::<f16, f16>(&jit, &mut rng, m, n, k, 1e-3);
            check::<bf16, f32>(&jit, &mut rng, m, n, k, 1e-5);
        }
    }
}

#[test]
fn rejects_what_it_does_not_take() {
    let dev = require_gpu();
    let jit = Jit::new(None);
    let x = dev.alloc_zeros::<bf16>(9 * 16).unwrap();
    let w = dev.alloc_zeros::<bf16>(16 * 16).unwrap();
    let mut out = dev.alloc_zeros::<bf16>(9 * 16).unwrap();
    let err = gemv::gemv(&jit, 9, 16, 16, &x, &w, &mut out).unwrap_err().to_string();
    assert!(err.contains("1..=8 rows"), "{err}");
    let err = gemv::gemv(&jit, 1, 16, 12, &x, &w, &mut out).unwrap_err().to_string();
    assert!(err.contains("multiple of 8"), "{err}");
    let mut f16_out = dev.alloc_zeros::<f16>(16).unwrap();
    let err = gemv::gemv(&jit, 1, 16, 16, &x, &w, &mut f16_out).unwrap_err().to_string();
    assert!(err.contains("f32 or the input dtype"), "{err}");
}

/// The streaming kernel is sm_90a code: elsewhere these tests have nothing to run.
fn streams_here() -> bool {
    let hopper = require_gpu().arch() == radix_gpu::Arch::SM90A;
    if !hopper {
        eprintln!("not an sm_90a GPU: the streaming GEMV does not run here");
    }
    hopper
}

#[test]
fn the_streaming_kernel_matches_the_reference() {
    if !streams_here() {
        return;
    }
    let jit = Jit::new(None);
    let mut rng = SmallRng::seed_from_u64(5);
    // One row; rows split unevenly over the SMs; several rows per block and stage; a row
    // longer than a 32 KB stage (K = 20,480); many rows per block (a 50,000-row head).
    for m in 1..=gemv::STREAM_MAX_ROWS {
        for (n, k) in
            [(1, 1024), (13, 4096), (1000, 2048), (4096, 14336), (300, 20480), (50_000, 1024)]
        {
            check_with::<bf16, bf16>(gemv::gemv_stream, &jit, &mut rng, m, n, k, 8e-3);
            check_with::<f16, f16>(gemv::gemv_stream, &jit, &mut rng, m, n, k, 1e-3);
            check_with::<bf16, f32>(gemv::gemv_stream, &jit, &mut rng, m, n, k, 1e-5);
        }
    }
}

#[test]
fn chained_streaming_products_read_each_others_output() {
    // y = W1 x, then z = W2 y straight after: the second kernel starts before the first
    // ends (programmatic dependent launch) and must still read y as the first wrote it.
    if !streams_here() {
        return;
    }
    let dev = require_gpu();
    let jit = Jit::new(None);
    let mut rng = SmallRng::seed_from_u64(11);
    let (m, n, k) = (1, 2048, 4096);
    let x: Vec<f32> = random(&mut rng, m * k);
    let w1: Vec<f32> = random(&mut rng, n * k);
    let w2: Vec<f32> = random(&mut rng, k * n);
    let to_bf16 = |v: &[f32]| v.iter().map(|&a| bf16::from_f32(a)).collect::<Vec<_>>();
    let (dx, dw1, dw2) = (
        dev.upload(&to_bf16(&x)).unwrap(),
        dev.upload(&to_bf16(&w1)).unwrap(),
        dev.upload(&to_bf16(&w2)).unwrap(),
    );
    for round in 0..20 {
        let mut y: DeviceBuffer<bf16> = dev.alloc(m * n).unwrap();
        let mut z: DeviceBuffer<f32> = dev.alloc(m * k).unwrap();
        y.fill_bytes(0xFF).unwrap();
        z.fill_bytes(0xFF).unwrap();
        gemv::gemv_stream(&jit, m, n, k, &dx, &dw1, &mut y).unwrap();
        gemv::gemv_stream(&jit, m, k, n, &y, &dw2, &mut z).unwrap();
        let y_host = y.to_vec().unwrap();
        let want = gemm_reference(m, k, n, &y_host, &to_bf16(&w2), BLayout::NK, None);
        let err = relative_error(&z.to_vec().unwrap(), &want);
        assert!(err <= 1e-5, "round {round}: z from the first product's y, rel err {err:.3e}");
    }
}

#[test]
fn the_streaming_kernel_rejects_what_it_does_not_take() {
    if !streams_here() {
        return;
    }
    let dev = require_gpu();
    let jit = Jit::new(None);
    let x = dev.alloc_zeros::<bf16>(5 * 2048).unwrap();
    let w = dev.alloc_zeros::<bf16>(16 * 2048).unwrap();
    let mut out = dev.alloc_zeros::<bf16>(5 * 16).unwrap();
    let err = gemv::gemv_stream(&jit, 5, 16, 2048, &x, &w, &mut out).unwrap_err().to_string();
    assert!(err.contains("1..=4 rows"), "{err}");
    let err = gemv::gemv_stream(&jit, 1, 16, 1000, &x, &w, &mut out).unwrap_err().to_string();
    assert!(err.contains("multiple of 1024"), "{err}");
    let err = gemv::gemv_stream(&jit, 1, 16, 4096, &x, &w, &mut out).unwrap_err().to_string();
    assert!(err.contains("w holds"), "{err}");
}

/// x as the fused kernel builds it, each value rounded to bf16 as ops.cu stores it: the
/// RMSNorm of `src` times `norm` (`Some`), or SiLU(gate) · up of `src` = [gate | up].
fn built_x(src: &[bf16], norm: Option<(&[bf16], f32)>, k: usize) -> Vec<bf16> {
    let f = |v: &bf16| v.to_f64();
    match norm {
        Some((w, eps)) => {
            let ms = src.iter().map(|v| f(v) * f(v)).sum::<f64>() / k as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            src.iter().zip(w).map(|(x, w)| bf16::from_f64(f(x) * inv * f(w))).collect()
        }
        None => (0..k)
            .map(|i| {
                let (g, u) = (f(&src[i]), f(&src[k + i]));
                bf16::from_f64(g / (1.0 + (-g).exp()) * u)
            })
            .collect(),
    }
}

#[test]
fn the_streaming_kernel_builds_x_and_adds_into_out() {
    if !streams_here() {
        return;
    }
    let dev = require_gpu();
    let jit = Jit::new(None);
    let mut rng = SmallRng::seed_from_u64(11);
    // Llama-3-8B's four products at one row (q|k|v and gate|up after a norm, down after
    // SiLU·mul, o added into the residual), rows split unevenly, K one span.
    for (n, k) in [(6144, 4096), (28672, 4096), (4096, 14336), (4096, 4096), (13, 1024)] {
        let w: Vec<bf16> = random(&mut rng, n * k);
        let dw = dev.upload(&w).unwrap();
        // FP8 weights: e4m3 bytes of the same values, a scale per row.
        let (wq, ws) = radix_kernels::fp8::quantize_rows_reference(&w, n, k);
        let wd: Vec<f64> = wq
            .iter()
            .enumerate()
            .map(|(i, b)| radix_kernels::fp8::e4m3_to_f32(*b) as f64 * ws[i / k] as f64)
            .collect();
        let (dwq, dws) = (dev.upload(&wq).unwrap(), dev.upload(&ws).unwrap());
        let norm: Vec<bf16> = (0..k).map(|_| bf16::from_f64(rng.random_range(0.5..1.5))).collect();
        let dnorm = dev.upload(&norm).unwrap();
        let residual: Vec<bf16> = random(&mut rng, k);
        let gate_up: Vec<bf16> =
            (0..2 * k).map(|_| bf16::from_f64(rng.random_range(-3.0..3.0))).collect();
        let (dres, dgu) = (dev.upload(&residual).unwrap(), dev.upload(&gate_up).unwrap());
        let eps = 1e-5f32;
        for (name, x, sx) in [
            ("rms_norm", built_x(&residual, Some((&norm, eps)), k), 1),
            ("silu_mul", built_x(&gate_up, None, k), 2),
            ("plain", residual.clone(), 0),
        ] {
            let input = match sx {
                1 => gemv::StreamX::RmsNorm { x: &dres, weight: &dnorm, eps },
                2 => gemv::StreamX::SiluMul(&dgu),
                _ => gemv::StreamX::Plain(&dres),
            };
            for fp8 in [false, true] {
                let weights: Vec<f64> =
                    if fp8 { wd.clone() } else { w.iter().map(|v| v.to_f64()).collect() };
                let dot: Vec<f64> = (0..n)
                    .map(|j| {
                        x.iter()
                            .zip(&weights[j * k..(j + 1) * k])
                            .map(|(a, b)| a.to_f64() * b)
                            .sum()
                    })
                    .collect();
                let sw = if fp8 {
                    gemv::StreamWeight::Fp8 { bits: &dwq, scales: &dws }
                } else {
                    gemv::StreamWeight::Half(&dw)
                };
                if sx != 0 && !gemv::fits_stream_built(dev.info(), n, k, fp8) {
                    continue;
                }
                if fp8 && !gemv::fits_stream_fp8(dev.info(), 1, n, k) {
                    continue;
                }
                // out = x · wᵀ, out poisoned first.
                let mut out: DeviceBuffer<bf16> = dev.alloc(n).unwrap();
                out.fill_bytes(0xff).unwrap();
                gemv::gemv_stream_fused(&jit, (1, n, k), input, sw, &mut out, false).unwrap();
                let err = relative_error(&out.to_vec().unwrap(), &dot);
                assert!(err <= 8e-3, "{name} fp8={fp8} N={n} K={k}: rel err {err:.3e}");
                // out += x · wᵀ over a random start as large as the product, which is
                // rounded to bf16 before the add and the sum after it.
                let rms = (dot.iter().map(|d| d * d).sum::<f64>() / n as f64).sqrt();
                let start: Vec<bf16> =
                    (0..n).map(|_| bf16::from_f64(rng.random_range(-1.0..1.0) * rms)).collect();
                let mut acc = dev.upload(&start).unwrap();
                gemv::gemv_stream_fused(&jit, (1, n, k), input, sw, &mut acc, true).unwrap();
                let round = |v: f64| bf16::from_f64(v).to_f64();
                let want: Vec<f64> =
                    start.iter().zip(&dot).map(|(s, d)| round(s.to_f64() + round(*d))).collect();
                let got = acc.to_vec().unwrap();
                assert!(got.iter().all(|v| v.is_finite()), "{name} fp8={fp8} N={n}: not finite");
                let err = relative_error(&got, &want);
                assert!(err <= 8e-3, "{name} add fp8={fp8} N={n} K={k}: rel err {err:.3e}");
            }
        }
    }
    // Bad input: two rows of a built x, a norm weight too short.
    let mut out: DeviceBuffer<bf16> = dev.alloc(32).unwrap();
    let x = dev.alloc_zeros::<bf16>(2 * 2048).unwrap();
    let w = dev.alloc_zeros::<bf16>(16 * 1024).unwrap();
    let short = dev.alloc_zeros::<bf16>(512).unwrap();
    let sw = gemv::StreamWeight::Half(&w);
    let err = gemv::gemv_stream_fused(
        &jit,
        (2, 16, 1024),
        gemv::StreamX::SiluMul(&x),
        sw,
        &mut out,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("one row"), "{err}");
    let norm = gemv::StreamX::RmsNorm { x: &x, weight: &short, eps: 1e-5 };
    let err = gemv::gemv_stream_fused(&jit, (1, 16, 1024), norm, sw, &mut out, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("norm weight"), "{err}");
    // out over the activation x is built from: a clear error, not a race.
    let mut gate_up = dev.alloc_zeros::<bf16>(2 * 1024).unwrap();
    // SAFETY: a view of gate_up's own elements, dropped before gate_up.
    let view = unsafe { gate_up.view(0, 2 * 1024) }.unwrap();
    let silu = gemv::StreamX::SiluMul(&view);
    let err = gemv::gemv_stream_fused(&jit, (1, 16, 1024), silu, sw, &mut gate_up, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("overlaps"), "{err}");
}
