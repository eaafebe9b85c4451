//! GPU tests of the decode GEMV (`--features cuda`): every row count 1..=8 against the
//! f64 reference, both input dtypes, f32 and half outputs, N off the block's 8 rows.
#![cfg(feature = "cuda")]

use half::{bf16, f16};
use radix_gpu::gemm::gemm_reference;
use radix_gpu::{BLayout, DeviceBuffer, Element, HalfFloat, Jit, require_gpu};
use radix_kernels::{gemv, relative_error};
use rand::{Rng, SeedableRng, rngs::SmallRng};

fn random<T: Element>(rng: &mut SmallRng, n: usize) -> Vec<T> {
    (0..n).map(|_| T::from_f64(rng.random_range(-1.0..1.0))).collect()
}

fn check<T: HalfFloat, O: Element>(
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
    gemv::gemv(jit, m, n, k, &dx, &dw, &mut out).unwrap();
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
