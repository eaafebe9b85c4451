//! `out[m, n] = x[m, k] · w[n, k]ᵀ (+ bias)` on the CPU, threads over blocks of output
//! features; weight rows are converted to f32 once per block.

use rayon::prelude::*;

use crate::tensor::HostData;

/// Output features per parallel block: enough work per task, small f32 scratch.
const N_BLOCK: usize = 16;

pub fn matmul_nt(
    x: &[f32],
    m: usize,
    k: usize,
    w: &HostData,
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(out.len(), m * n);
    let blocks: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(N_BLOCK))
        .into_par_iter()
        .map(|b| {
            let n0 = b * N_BLOCK;
            let nb = N_BLOCK.min(n - n0);
            let mut wf = vec![0.0f32; nb * k];
            w.read_f32(n0 * k, &mut wf);
            let mut acc = vec![0.0f32; m * nb];
            for i in 0..m {
                let xr = &x[i * k..(i + 1) * k];
                for j in 0..nb {
                    acc[i * nb + j] =
                        dot(xr, &wf[j * k..(j + 1) * k]) + bias.map_or(0.0, |b| b[n0 + j]);
                }
            }
            (n0, acc)
        })
        .collect();
    for (n0, acc) in blocks {
        let nb = acc.len() / m.max(1);
        for i in 0..m {
            out[i * n + n0..i * n + n0 + nb].copy_from_slice(&acc[i * nb..(i + 1) * nb]);
        }
    }
}

/// Dot product with 8 independent partial sums (vectorises; a fixed summation order).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_product_with_bias() {
        let (m, k, n) = (3, 19, 37);
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let wv: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let bias: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut out = vec![0.0; m * n];
        matmul_nt(&x, m, k, &HostData::F32(wv.clone()), n, Some(&bias), &mut out);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|t| x[i * k + t] * wv[j * k + t]).sum::<f32>() + bias[j];
                assert!((out[i * n + j] - want).abs() < 1e-4);
            }
        }
    }
}
