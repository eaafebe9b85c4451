//! CPU reference of the page scores (f64) and of the selection (the kernel's exact
//! order: score descending, earlier page first on ties).

use radix_gpu::Element;

use super::SparseShape;
use radix_kv::bounds_record_bytes as record_bytes;

use crate::kv_append::bounds::decode;

/// Quest's upper bound of q·k over a page, summed over a GQA group's query heads:
/// `Σ_g Σ_d max(q_gd · lo_d, q_gd · hi_d)`. `q_group` is `[group, head_dim]`.
pub fn page_score_reference(q_group: &[f64], lo: &[f64], hi: &[f64]) -> f64 {
    let d = lo.len();
    q_group
        .chunks(d)
        .map(|q| q.iter().zip(lo.iter().zip(hi)).map(|(q, (l, h))| (q * l).max(q * h)).sum::<f64>())
        .sum()
}

/// Scores `[dense pages, num_kv_heads]` of every page of the sequences with
/// `0 < keep[b]`, from queries `[tokens, num_qo_heads, head_dim]` (each sequence's last
/// token) and bounds (a `kv_append::bounds` record per (page, kv head)); other entries
/// are 0.
pub fn scores_reference<T: Element>(
    shape: &SparseShape,
    q: &[T],
    bounds: &[u8],
    qo_indptr: &[i32],
    kv_indptr: &[i32],
    kv_indices: &[i32],
    keep: &[i32],
) -> Vec<f64> {
    let (hkv, d, g) = (shape.num_kv_heads, shape.head_dim, shape.group());
    let mut out = vec![0.0; *kv_indptr.last().unwrap_or(&0) as usize * hkv];
    for b in 0..keep.len() {
        if keep[b] <= 0 {
            continue;
        }
        let t = qo_indptr[b + 1] as usize - 1;
        for f in kv_indptr[b] as usize..kv_indptr[b + 1] as usize {
            let page = kv_indices[f] as usize;
            for h in 0..hkv {
                let qs = (t * shape.num_qo_heads + h * g) * d;
                let qg: Vec<f64> = q[qs..qs + g * d].iter().map(|x| x.to_f64()).collect();
                let rec = (page * hkv + h) * record_bytes(d);
                let (lo, hi) = decode(&bounds[rec..rec + record_bytes(d)], d);
                out[f * hkv + h] = page_score_reference(&qg, &lo, &hi);
            }
        }
    }
    out
}

/// The kernel's order key of a score (as f32): larger keys rank first; NaN lowest.
fn score_key(s: f32) -> u32 {
    if s.is_nan() {
        return 0;
    }
    let u = s.to_bits();
    if u & 0x8000_0000 != 0 { !u } else { u | 0x8000_0000 }
}

/// Positions (ascending) of the `keep` pages kept out of `scores.len()`: the first
/// `sink`, the last `window` and the best-scoring ones between (earlier first on ties).
/// All of them when `keep` is 0 or covers every page.
pub fn select_reference(scores: &[f32], keep: usize, sink: usize, window: usize) -> Vec<usize> {
    let n = scores.len();
    if keep == 0 || keep >= n || keep < sink + window {
        return (0..n).collect();
    }
    let mut middle: Vec<usize> = (sink..n - window).collect();
    middle.sort_by_key(|&i| (std::cmp::Reverse(score_key(scores[i])), i));
    let mut chosen: Vec<usize> = (0..sink).chain((n - window)..n).collect();
    chosen.extend_from_slice(&middle[..keep - sink - window]);
    chosen.sort_unstable();
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_at_least_every_dot_product_in_the_page() {
        // Keys of a page, their bounds, a random query: the bound covers each q·k.
        let keys = [[0.5, -1.0, 2.0], [1.5, 0.25, -0.5], [-0.75, 0.0, 1.0]];
        let lo: Vec<f64> =
            (0..3).map(|j| keys.iter().map(|k| k[j]).fold(f64::MAX, f64::min)).collect();
        let hi: Vec<f64> =
            (0..3).map(|j| keys.iter().map(|k| k[j]).fold(f64::MIN, f64::max)).collect();
        let q = [0.3, -2.0, 0.7];
        let bound = page_score_reference(&q, &lo, &hi);
        for k in keys {
            let dot: f64 = q.iter().zip(k).map(|(a, b)| a * b).sum();
            assert!(dot <= bound + 1e-12);
        }
    }

    #[test]
    fn keeps_sink_window_and_the_best_with_ties_to_the_earlier_page() {
        let s = [0.0, 5.0, 1.0, 5.0, 9.0, f32::NAN, 5.0, -1.0, 0.0];
        // sink 1, window 2: middle is positions 1..7; keep 1 + 2 + 3.
        assert_eq!(select_reference(&s, 6, 1, 2), vec![0, 1, 3, 4, 7, 8]);
        assert_eq!(select_reference(&s, 4, 1, 2), vec![0, 4, 7, 8]);
        assert_eq!(select_reference(&s, 0, 1, 2), (0..9).collect::<Vec<_>>());
        assert_eq!(select_reference(&s, 9, 1, 2), (0..9).collect::<Vec<_>>());
        // NaN ranks below everything, -inf included.
        let t = [0.0, f32::NAN, f32::NEG_INFINITY, 0.0];
        assert_eq!(select_reference(&t, 3, 1, 1), vec![0, 2, 3]);
    }
}
