//! Attention over the paged KV pool on the CPU: one task per (sequence, kv head, block of
//! query tokens), two GEMMs each, causal mask aligned bottom-right (queries are the last
//! tokens of their sequence).
//!
//! Sparse paging (Quest): a decode query may attend to a subset of its sequence's pages,
//! chosen per kv head by `sparse_heads` from the key bounds of each page as the GPU stores
//! them (element-wise min/max rounded outward to int8, `key_bounds_reference`), the
//! kernels' f64 score reference and their selection order.

use radix_kernels::kv_append::key_bounds_reference;
use radix_kernels::sparse::{page_score_reference, select_reference};
use radix_kv::SparsePolicy;
use rayon::prelude::*;

use crate::error::{ModelError, Result};

pub struct Geometry {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub page_size: usize,
}

pub struct Table<'a> {
    pub qo_indptr: &'a [i32],
    pub kv_indptr: &'a [i32],
    pub kv_indices: &'a [i32],
    pub kv_last_page_len: &'a [i32],
}

/// The pages each (sequence, kv head) attends to, `[batch × num_kv_heads]`: positions
/// in the sequence's page list, ascending; `None` is all of them (dense).
pub type HeadPages = Vec<Option<Vec<usize>>>;

/// Quest's choice for one (sequence, kv head): each page's bound of q·k summed over the
/// group's queries `q_group` (`[group, head_dim]`, RoPE applied), computed in f64 and
/// rounded to f32 as the kernel stores it, then the kernel's selection of `keep` pages.
/// Returns positions in the page list, ascending.
pub fn select_pages(
    q_group: &[f32],
    bounds: &[(Vec<f64>, Vec<f64>)],
    keep: usize,
    policy: &SparsePolicy,
) -> Vec<usize> {
    let q: Vec<f64> = q_group.iter().map(|&x| x as f64).collect();
    let scores: Vec<f32> =
        bounds.iter().map(|(lo, hi)| page_score_reference(&q, lo, hi) as f32).collect();
    select_reference(&scores, keep, policy.sink_pages, policy.window_pages)
}

/// The sparse choice of one layer: for each sequence with one query and
/// `0 < keep[b] < pages`, per kv head, the pages `select_pages` keeps; `None` elsewhere.
/// `q` is `[tokens, num_heads, head_dim]`, `k` the layer's key pool.
pub fn sparse_heads(
    g: &Geometry,
    t: &Table,
    keep: &[i32],
    policy: &SparsePolicy,
    q: &[f32],
    k: &[f32],
) -> Result<HeadPages> {
    let batch = keep.len();
    if t.qo_indptr.len() != batch + 1
        || t.kv_indptr.len() != batch + 1
        || t.kv_last_page_len.len() != batch
    {
        return Err(ModelError::Invalid("attention: page table does not match the batch".into()));
    }
    let (hq, hkv, d, ps) = (g.num_heads, g.num_kv_heads, g.head_dim, g.page_size);
    let group = hq / hkv;
    Ok((0..batch * hkv)
        .into_par_iter()
        .map(|job| {
            let (b, kvh) = (job / hkv, job % hkv);
            let q_len = t.qo_indptr[b + 1] - t.qo_indptr[b];
            let pages = &t.kv_indices[t.kv_indptr[b] as usize..t.kv_indptr[b + 1] as usize];
            let n = pages.len();
            let k_b = keep[b].max(0) as usize;
            if q_len != 1 || k_b == 0 || k_b >= n {
                return None;
            }
            let bounds: Vec<(Vec<f64>, Vec<f64>)> = pages
                .iter()
                .enumerate()
                .map(|(p, &page)| {
                    let filled = if p + 1 == n { t.kv_last_page_len[b] as usize } else { ps };
                    let at = (page as usize * hkv + kvh) * ps * d;
                    key_bounds_reference(&k[at..at + filled * d], d)
                })
                .collect();
            let row = t.qo_indptr[b] as usize;
            let q_group = &q[(row * hq + kvh * group) * d..][..group * d];
            Some(select_pages(q_group, &bounds, k_b, policy))
        })
        .collect())
}

/// Scores held at once per task (`[query rows, keys]` f32): bounds the query block.
const MAX_SCORES: usize = 1 << 22;
/// Query tokens per task at most.
const MAX_QUERY_BLOCK: usize = 64;

/// Attention of the step's queries; `heads` (from `sparse_heads`) narrows a decode
/// query to the chosen pages of its kv head (the last page keeps `kv_last_page_len`).
///
/// A task is one (sequence, kv head, block of query tokens): it gathers the keys and
/// values it attends to into contiguous matrices, then computes S = Q·Kᵀ and O = P·V
/// with two GEMMs, the query rows being the block's tokens × the kv head's query heads.
pub fn paged_attention(
    g: &Geometry,
    t: Table,
    heads: Option<&HeadPages>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let batch = t.qo_indptr.len().saturating_sub(1);
    if t.kv_indptr.len() != batch + 1 || t.kv_last_page_len.len() != batch {
        return Err(ModelError::Invalid("attention: page table does not match the batch".into()));
    }
    if heads.is_some_and(|h| h.len() != batch * g.num_kv_heads) {
        return Err(ModelError::Invalid("attention: sparse tables do not match the batch".into()));
    }
    let (hq, hkv, d, ps) = (g.num_heads, g.num_kv_heads, g.head_dim, g.page_size);
    let group = hq / hkv;
    let mut tasks = Vec::new();
    for b in 0..batch {
        let q_len = (t.qo_indptr[b + 1] - t.qo_indptr[b]).max(0) as usize;
        let pages = (t.kv_indptr[b + 1] - t.kv_indptr[b]).max(0) as usize;
        let block = (MAX_SCORES / (group * pages * ps).max(1)).clamp(1, MAX_QUERY_BLOCK);
        for kvh in 0..hkv {
            tasks.extend((0..q_len).step_by(block).map(|i0| (b, kvh, i0, (i0 + block).min(q_len))));
        }
    }
    let results: Vec<((usize, usize, usize), Vec<f32>)> = tasks
        .into_par_iter()
        .map(|(b, kvh, i0, i1)| {
            let q0 = t.qo_indptr[b] as usize;
            let q_len = t.qo_indptr[b + 1] as usize - q0;
            let pages = &t.kv_indices[t.kv_indptr[b] as usize..t.kv_indptr[b + 1] as usize];
            let n = pages.len();
            let chosen: Vec<usize> = match heads.and_then(|s| s[b * hkv + kvh].as_ref()) {
                Some(sel) => sel.clone(),
                None => (0..n).collect(),
            };
            // This kv head's keys and values of the chosen pages, in sequence order, into
            // buffers sized once (grown page by page, their reallocations and copies took
            // as long as the gather itself).
            let filled = |p: usize| if p + 1 == n { t.kv_last_page_len[b] as usize } else { ps };
            let total = chosen.iter().map(|&p| filled(p)).sum::<usize>() * d;
            let mut keys = Vec::with_capacity(total);
            let mut values = Vec::with_capacity(total);
            for &p in &chosen {
                let at = (pages[p] as usize * hkv + kvh) * ps * d;
                keys.extend_from_slice(&k[at..at + filled(p) * d]);
                values.extend_from_slice(&v[at..at + filled(p) * d]);
            }
            let kv_len = keys.len() / d;
            // Query row (i, h) is token i0 + i, query head h of this kv head's group.
            let rows = (i1 - i0) * group;
            let mut qb = Vec::with_capacity(rows * d);
            for i in i0..i1 {
                let at = ((q0 + i) * hq + kvh * group) * d;
                qb.extend_from_slice(&q[at..at + group * d]);
            }
            // Keys token i sees (causal, aligned bottom-right): the block's last sees most.
            let visible = |i: usize| (kv_len + i + 1).saturating_sub(q_len).min(kv_len);
            let width = visible(i1 - 1);
            let mut scores = vec![0.0f32; rows * width];
            let scale = 1.0 / (d as f32).sqrt();
            matmul(&qb, rows, d, (&keys, 1, d), width, scale, &mut scores);
            let mut sums = vec![0.0f32; rows];
            for (r, (row, sum)) in scores.chunks_exact_mut(width.max(1)).zip(&mut sums).enumerate()
            {
                let seen = visible(i0 + r / group);
                let max = row[..seen].iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                for s in &mut row[..seen] {
                    *s = (*s - max).exp();
                    *sum += *s;
                }
                row[seen..].fill(0.0);
            }
            let mut o = vec![0.0f32; rows * d];
            matmul(&scores, rows, width, (&values, d, 1), d, 1.0, &mut o);
            for (row, &sum) in o.chunks_exact_mut(d).zip(&sums) {
                if sum > 0.0 {
                    row.iter_mut().for_each(|x| *x /= sum);
                }
            }
            ((b, kvh, i0), o)
        })
        .collect();
    for ((b, kvh, i0), o) in results {
        let q0 = t.qo_indptr[b] as usize;
        for (i, token) in o.chunks_exact(group * d).enumerate() {
            out[((q0 + i0 + i) * hq + kvh * group) * d..][..group * d].copy_from_slice(token);
        }
    }
    Ok(())
}

/// `out[m, n] = scale · a[m, kk] · B` (row-major `a` and `out`), where `B`'s element
/// (r, c) is `b.0[r · b.1 + c · b.2]` (strides, so Kᵀ is read in place).
fn matmul(
    a: &[f32],
    m: usize,
    kk: usize,
    b: (&[f32], usize, usize),
    n: usize,
    scale: f32,
    out: &mut [f32],
) {
    let (b, b_rs, b_cs) = b;
    debug_assert!(a.len() >= m * kk && out.len() == m * n);
    debug_assert!(m == 0 || n == 0 || kk == 0 || b.len() > (kk - 1) * b_rs + (n - 1) * b_cs);
    if m == 0 || n == 0 {
        return;
    }
    if kk == 0 {
        out.fill(0.0);
        return;
    }
    // SAFETY: `a` holds m × kk (row stride kk), `b` holds kk × n elements at the given
    // strides (checked above in debug builds; the callers size them so), `out` m × n.
    unsafe {
        gemm::gemm(
            m,
            n,
            kk,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            kk as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    #[test]
    fn sparse_attention_is_dense_attention_over_the_chosen_pages() {
        // One decode query of 4 heads (2 kv heads), 10 pages of 4 (the last holds 3),
        // stored out of order in a pool of 12 pages.
        let g = Geometry { num_heads: 4, num_kv_heads: 2, head_dim: 8, page_size: 4 };
        let pool = 12 * g.num_kv_heads * g.page_size * g.head_dim;
        let (k, v) = (values(pool, 1), values(pool, 2));
        let q = values(g.num_heads * g.head_dim, 3);
        let pages: Vec<i32> = vec![7, 2, 9, 0, 11, 4, 1, 8, 3, 6];
        let table = || Table {
            qo_indptr: &[0, 1],
            kv_indptr: &[0, 10],
            kv_indices: &pages,
            kv_last_page_len: &[3],
        };
        let policy = SparsePolicy { sink_pages: 1, window_pages: 2, ..SparsePolicy::default() };
        let heads = sparse_heads(&g, &table(), &[5], &policy, &q, &k).unwrap();
        let mut sparse = vec![0.0; q.len()];
        paged_attention(&g, table(), Some(&heads), &q, &k, &v, &mut sparse).unwrap();
        for (kvh, chosen) in heads.iter().enumerate() {
            let chosen = chosen.as_ref().unwrap();
            assert_eq!(chosen.len(), 5);
            assert!(chosen.starts_with(&[0]) && chosen.ends_with(&[8, 9]), "{chosen:?}");
            // Dense attention over a table of only the chosen pages: the same numbers.
            let sub: Vec<i32> = chosen.iter().map(|&p| pages[p]).collect();
            let t = Table {
                qo_indptr: &[0, 1],
                kv_indptr: &[0, 5],
                kv_indices: &sub,
                kv_last_page_len: &[3],
            };
            let mut dense = vec![0.0; q.len()];
            paged_attention(&g, t, None, &q, &k, &v, &mut dense).unwrap();
            let heads_of = kvh * 2 * g.head_dim..(kvh + 1) * 2 * g.head_dim;
            assert_eq!(sparse[heads_of.clone()], dense[heads_of]);
        }
        // Keeping every page, or a prefill query, is dense.
        assert_eq!(sparse_heads(&g, &table(), &[10], &policy, &q, &k).unwrap(), vec![None, None]);
        assert_eq!(sparse_heads(&g, &table(), &[0], &policy, &q, &k).unwrap(), vec![None, None]);
    }
}
