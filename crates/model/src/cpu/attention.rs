//! Attention over the paged KV pool on the CPU: one task per (sequence, query head),
//! causal mask aligned bottom-right (queries are the last tokens of their sequence).

use rayon::prelude::*;

use super::linear::dot;
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

pub fn paged_attention(
    g: &Geometry,
    t: Table,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let batch = t.qo_indptr.len().saturating_sub(1);
    if t.kv_indptr.len() != batch + 1 || t.kv_last_page_len.len() != batch {
        return Err(ModelError::Invalid("attention: page table does not match the batch".into()));
    }
    let (hq, d, ps) = (g.num_heads, g.head_dim, g.page_size);
    let group = hq / g.num_kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let results: Vec<(usize, usize, Vec<f32>)> = (0..batch * hq)
        .into_par_iter()
        .map(|job| {
            let (b, h) = (job / hq, job % hq);
            let kvh = h / group;
            let q0 = t.qo_indptr[b] as usize;
            let q_len = t.qo_indptr[b + 1] as usize - q0;
            let pages = &t.kv_indices[t.kv_indptr[b] as usize..t.kv_indptr[b + 1] as usize];
            let kv_len = match pages.len() {
                0 => 0,
                n => (n - 1) * ps + t.kv_last_page_len[b] as usize,
            };
            let key_at =
                |j: usize| ((pages[j / ps] as usize * g.num_kv_heads + kvh) * ps + j % ps) * d;
            let mut rows = vec![0.0f32; q_len * d];
            let mut scores = vec![0.0f32; kv_len];
            for i in 0..q_len {
                let qrow = &q[((q0 + i) * hq + h) * d..][..d];
                let visible = (kv_len + i + 1).saturating_sub(q_len).min(kv_len);
                let mut max = f32::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate().take(visible) {
                    *s = dot(qrow, &k[key_at(j)..key_at(j) + d]) * scale;
                    max = max.max(*s);
                }
                let mut sum = 0.0f32;
                let orow = &mut rows[i * d..(i + 1) * d];
                for (j, s) in scores.iter().enumerate().take(visible) {
                    let p = (s - max).exp();
                    sum += p;
                    for (o, x) in orow.iter_mut().zip(&v[key_at(j)..key_at(j) + d]) {
                        *o += p * x;
                    }
                }
                if sum > 0.0 {
                    orow.iter_mut().for_each(|o| *o /= sum);
                }
            }
            (b, h, rows)
        })
        .collect();
    for (b, h, rows) in results {
        let q0 = t.qo_indptr[b] as usize;
        for (i, row) in rows.chunks(d).enumerate() {
            out[((q0 + i) * hq + h) * d..][..d].copy_from_slice(row);
        }
    }
    Ok(())
}
