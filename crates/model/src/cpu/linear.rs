//! `out[m, n] = x[m, k] · w[n, k]ᵀ (+ bias)` on the CPU with the `gemm` crate (runtime
//! SIMD dispatch). Threads (rayon) take panels of output features; each panel is one
//! single-threaded GEMM. Weights stay in their checkpoint dtype in memory: a bf16 or f16
//! panel is widened to f32 in the thread's scratch just before its GEMM, so a decode step
//! streams half the bytes of an f32 copy and prefill amortises the widening over its rows.

use std::cell::RefCell;

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use crate::gguf::dequant::{self, GgmlType};
use crate::tensor::{HostData, QuantBlocks};

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
                HostData::Blocks(q) if m <= GEMV_MAX_ROWS => {
                    // SAFETY: as for `run`: this task alone writes columns n0..n0 + nb.
                    unsafe { gemv_blocks(x, m, k, q, n0, nb, dst.0.add(n0), n) }
                }
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

/// Rows of `x` up to which a product with block weights is computed as dot products
/// (decode) rather than a GEMM over a dequantized panel.
const GEMV_MAX_ROWS: usize = 4;

/// `out[i, j] = x[i] · w[j]` for the `m <= 4` rows of `x` and weight rows `n0..n0 + nb`
/// of `q`, written at `out + i * n + (j - n0)`. A decode step is bound by the bytes of
/// weights it reads; here they are the blocks (0.56-1.06 bytes a weight), each unpacked in
/// registers to exactly the f32 values the load-time dequantization gives, once for all
/// rows of `x`.
///
/// # Safety
/// `out` must be valid for writes at `i * n + j` for `i < m`, `j < nb`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_blocks(
    x: &[f32],
    m: usize,
    k: usize,
    q: &QuantBlocks,
    n0: usize,
    nb: usize,
    out: *mut f32,
    n: usize,
) {
    let rb = q.row_bytes();
    let rows = &q.bytes[n0 * rb..(n0 + nb) * rb];
    #[cfg(target_arch = "x86_64")]
    let wide = std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    let wide = false;
    for (j, row) in rows.chunks_exact(rb).enumerate() {
        let mut dots = [0f32; GEMV_MAX_ROWS];
        match m {
            1 => dots[..1].copy_from_slice(&row_dots::<1>(q.ty, x, k, row, wide)),
            2 => dots[..2].copy_from_slice(&row_dots::<2>(q.ty, x, k, row, wide)),
            3 => dots[..3].copy_from_slice(&row_dots::<3>(q.ty, x, k, row, wide)),
            _ => dots.copy_from_slice(&row_dots::<4>(q.ty, x, k, row, wide)),
        }
        for (i, d) in dots[..m].iter().enumerate() {
            // SAFETY: the caller's promise.
            unsafe { *out.add(i * n + j) = *d };
        }
    }
}

/// One weight row's dot products with `M` rows of `x`: with AVX2 when `wide` (checked by
/// the caller), portable code otherwise.
fn row_dots<const M: usize>(ty: GgmlType, x: &[f32], k: usize, row: &[u8], wide: bool) -> [f32; M] {
    #[cfg(target_arch = "x86_64")]
    if wide {
        // SAFETY: the caller found AVX2 on this CPU.
        return unsafe { row_dots_avx2::<M>(ty, x, k, row) };
    }
    let _ = wide;
    row_dots_typed::<M>(ty, x, k, row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_dots_avx2<const M: usize>(ty: GgmlType, x: &[f32], k: usize, row: &[u8]) -> [f32; M] {
    row_dots_typed::<M>(ty, x, k, row)
}

#[inline(always)]
fn row_dots_typed<const M: usize>(ty: GgmlType, x: &[f32], k: usize, row: &[u8]) -> [f32; M] {
    match ty {
        GgmlType::Q4_1 => block_dots::<M, 20>(x, k, row, dequant::unpack_q4_1),
        GgmlType::Q4_0 => block_dots::<M, 18>(x, k, row, dequant::unpack_q4_0),
        GgmlType::Q8_0 => block_dots::<M, 34>(x, k, row, dequant::unpack_q8_0),
        other => unreachable!("{other:?} is not kept as blocks"),
    }
}

/// Blocks of 32 weights of `BYTES` bytes each, unpacked by `unpack`, into 32 independent
/// lanes per row of `x`: vector code without reassociating any sum, reduced at the end.
#[inline(always)]
fn block_dots<const M: usize, const BYTES: usize>(
    x: &[f32],
    k: usize,
    row: &[u8],
    unpack: fn(&[u8; BYTES], &mut [f32; 32]),
) -> [f32; M] {
    let mut acc = [[0f32; 32]; M];
    let mut w = [0f32; 32];
    for (b, block) in row.chunks_exact(BYTES).enumerate() {
        unpack(block.try_into().expect("whole blocks"), &mut w);
        for (i, a) in acc.iter_mut().enumerate() {
            let xs: &[f32; 32] =
                x[i * k + b * 32..i * k + b * 32 + 32].try_into().expect("32 lanes");
            for t in 0..32 {
                a[t] += w[t] * xs[t];
            }
        }
    }
    std::array::from_fn(|i| acc[i].iter().sum())
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;

    #[test]
    fn block_weights_match_their_dequantized_values() {
        use crate::gguf::dequant::GgmlType;
        use crate::tensor::QuantBlocks;
        let mut seed = 9u64;
        let mut byte = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 56) as u8
        };
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let (per_block, block_bytes) = ty.block();
            let (n, k) = (37, 3 * per_block);
            let bytes: Vec<u8> = (0..n * k / per_block)
                .flat_map(|_| {
                    // A small positive f16 scale (and min), then random quants.
                    let mut b: Vec<u8> = (0..block_bytes).map(|_| byte()).collect();
                    b[..2].copy_from_slice(
                        &half::f16::from_f32(0.01 + byte() as f32 / 2e4).to_le_bytes(),
                    );
                    if ty == GgmlType::Q4_1 {
                        b[2..4].copy_from_slice(
                            &half::f16::from_f32(byte() as f32 / 1e3 - 0.1).to_le_bytes(),
                        );
                    }
                    b
                })
                .collect();
            let w = HostData::Blocks(QuantBlocks { ty, cols: k, bytes });
            let wf = w.to_f32();
            for m in [1, 2, 3, 4, 6] {
                let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
                let mut out = vec![f32::NAN; m * n];
                matmul_nt(&x, m, k, &w, n, None, &mut out);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 =
                            (0..k).map(|t| x[i * k + t] as f64 * wf[j * k + t] as f64).sum();
                        let got = out[i * n + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                            "{ty:?} m={m}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

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
