//! GPU tests of the kernels (`--features cuda`): each against its f64 CPU reference on
//! fresh random inputs, outputs poisoned before every run.
#![cfg(feature = "cuda")]

use half::{bf16, f16};
use radix_gpu::{Element, HalfFloat, Jit, require_gpu};
use radix_kernels::{relative_error, smoke};
use rand::{Rng, SeedableRng, rngs::SmallRng};

fn smoke_case<T: HalfFloat>(jit: &Jit, n: usize, tol: f64) {
    let dev = require_gpu();
    let mut rng = SmallRng::seed_from_u64(n as u64);
    let x: Vec<T> = (0..n).map(|_| T::from_f64(rng.random_range(-4.0..4.0))).collect();
    let dx = dev.upload(&x).unwrap();
    let mut out = dev.alloc::<T>(n).unwrap();
    out.fill_bytes(0xFF).unwrap();
    smoke::affine(jit, &dx, 1.5, -0.25, &mut out).unwrap();
    let got = out.to_vec().unwrap();
    let err = relative_error(&got, &smoke::affine_reference(&x, 1.5, -0.25));
    assert!(err <= tol, "smoke {} n={n}: rel err {err:.3e}", T::DTYPE);
}

#[test]
fn smoke_kernel_compiles_loads_and_matches_reference() {
    let jit = Jit::new(None);
    for n in [1, 255, 1 << 20, 1_000_003] {
        smoke_case::<f16>(&jit, n, 2e-3);
        smoke_case::<bf16>(&jit, n, 1e-2);
    }
}

#[test]
fn smoke_kernel_rejects_mismatched_lengths() {
    let dev = require_gpu();
    let jit = Jit::new(None);
    let x = dev.alloc_zeros::<bf16>(10).unwrap();
    let mut out = dev.alloc_zeros::<bf16>(9).unwrap();
    assert!(smoke::affine(&jit, &x, 1.0, 0.0, &mut out).is_err());
    let _ = <bf16 as Element>::DTYPE;
}
