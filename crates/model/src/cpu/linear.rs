//! `out[m, n] = x[m, k] · w[n, k]ᵀ (+ bias)` on the CPU with the `gemm` crate (runtime
//! SIMD dispatch). Threads (rayon) take panels of output features; each panel is one
//! single-threaded GEMM. Weights stay in their checkpoint dtype in memory: a bf16 or f16
//! panel is widened to f32 in the thread's scratch just before its GEMM, so a decode step
//! streams half the bytes of an f32 copy and prefill amortises the widening over its rows.

use std::cell::RefCell;

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use crate::tensor::HostData;

/// Output features per panel: enough work per task, and a widened panel (at most
/// 256 × k f32) that stays in cache while the GEMM reads it.
fn panel_width(n: usize) -> usize {
    let tasks = 4 * rayon::current_num_threads();
    (n / tasks).clamp(16, 256).next_multiple_of(16)
}

thread_local! {
    /// The f32 copy of a 16-bit weight panel.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The output matrix's base pointer, shared by the panel tasks.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks write disjoint column ranges of `out` (their panels); nothing reads
// `out` until every task has finished.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

pub fn matmul_nt(
    x: &[f32],
    m: usize,
    k: usize,
    w: &HostData,
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert!(x.len() == m * k && out.len() == m * n && w.len() == n * k, "matmul_nt shapes");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
    } else {
        let p = panel_width(n);
        let dst = OutPtr(out.as_mut_ptr());
        (0..n.div_ceil(p)).into_par_iter().for_each(|panel| {
            let n0 = panel * p;
            let nb = p.min(n - n0);
            let run = |wp: &[f32]| {
                // SAFETY: `x` is m × k (row stride k), `wp` is nb × k (its transpose is
                // read with row stride 1, column stride k), and the destination is
                // columns n0..n0 + nb of the m × n row-major `out` (row stride n),
                // which no other task writes (see OutPtr). alpha = 0 with
                // read_dst = false overwrites the destination.
                unsafe {
                    let d = dst;
                    gemm(
                        m,
                        nb,
                        k,
                        d.0.add(n0),
                        1,
                        n as isize,
                        false,
                        x.as_ptr(),
                        1,
                        k as isize,
                        wp.as_ptr(),
                        k as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            };
            match w {
                HostData::F32(v) => run(&v[n0 * k..(n0 + nb) * k]),
                _ => SCRATCH.with_borrow_mut(|scratch| {
                    scratch.resize(nb * k, 0.0);
                    w.read_f32(n0 * k, scratch);
                    run(scratch);
                }),
            }
        });
    }
    if let Some(b) = bias {
        for row in out.chunks_exact_mut(n) {
            row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
        }
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;

    #[test]
    fn matches_naive_product_with_bias_in_every_dtype() {
        for (m, k, n) in [(3, 19, 37), (1, 64, 300), (70, 33, 1000), (2, 1, 5)] {
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let wv: Vec<f32> =
                (0..n * k).map(|i| bf16::from_f32((i as f32 * 0.11).cos()).to_f32()).collect();
            let bias: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let bf: Vec<bf16> = wv.iter().map(|&v| bf16::from_f32(v)).collect();
            for w in [HostData::F32(wv.clone()), HostData::BF16(bf)] {
                let mut out = vec![f32::NAN; m * n];
                matmul_nt(&x, m, k, &w, n, Some(&bias), &mut out);
                for i in 0..m {
                    for j in 0..n {
                        let want: f32 =
                            (0..k).map(|t| x[i * k + t] * wv[j * k + t]).sum::<f32>() + bias[j];
                        let got = out[i * n + j];
                        assert!((got - want).abs() < 1e-4 * (1.0 + want.abs()), "{m}x{k}x{n}");
                    }
                }
            }
        }
    }
}
