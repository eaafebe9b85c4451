//! Which decode steps replay a CUDA graph, and how a step is padded to its bucket.
//!
//! A decode step (one query token per sequence, every sequence sampling) of `n`
//! sequences runs as the graph of the smallest bucket `B >= n`. The `B - n` padding
//! sequences are one token each at position 0 over a scratch page of the pool (one page
//! past those the engine hands out): they write their K/V there and attend to it, and
//! their logits are never sampled. Every kernel's grid is then fixed by `B` alone; the
//! attention work list is padded to its bound with items the kernel skips.

use std::collections::HashMap;

use radix_gpu::Graph;

use crate::backend::{OwnedStep, StepInput};

/// Decode batch sizes with a graph of their own: fine steps where batches are small and
/// a padding row costs a larger share, coarser ones above.
pub fn bucket_for(n: usize, max_batch: usize) -> Option<usize> {
    if n == 0 || n > max_batch {
        return None;
    }
    let b = match n {
        1..=4 => n.next_power_of_two(),
        5..=64 => n.next_multiple_of(8),
        65..=256 => n.next_multiple_of(16),
        257..=512 => n.next_multiple_of(32),
        _ => n.next_multiple_of(64),
    };
    // Never pad past the largest batch the engine runs.
    Some(b.min(max_batch))
}

/// True for a step a graph can run: one query token per sequence, each sampled.
pub fn is_decode_step(s: &StepInput) -> bool {
    let n = s.tokens.len();
    n > 0
        && s.batch_size() == n
        && s.qo_indptr.iter().enumerate().all(|(i, &q)| q as usize == i)
        && s.logit_rows.len() == n
        && s.logit_rows.iter().enumerate().all(|(i, &r)| r as usize == i)
}

/// Copies the decode step `s` into `out` and appends the padding sequences over
/// `scratch_page` up to `bucket`.
pub fn pad_step(
    out: &mut OwnedStep,
    s: &StepInput,
    bucket: usize,
    scratch_page: i32,
    page_size: usize,
) {
    let n = s.tokens.len();
    let pad = bucket - n;
    let copy = |dst: &mut Vec<i32>, src: &[i32]| {
        dst.clear();
        dst.extend_from_slice(src);
    };
    out.tokens.clear();
    out.tokens.extend_from_slice(s.tokens);
    out.tokens.resize(bucket, 0);
    copy(&mut out.positions, s.positions);
    out.positions.resize(bucket, 0);
    copy(&mut out.slots, s.slots);
    out.slots.resize(bucket, scratch_page * page_size as i32);
    out.qo_indptr.clear();
    out.qo_indptr.extend(0..=bucket as i32);
    copy(&mut out.kv_indptr, s.kv_indptr);
    let end = *s.kv_indptr.last().unwrap_or(&0);
    out.kv_indptr.extend((1..=pad as i32).map(|i| end + i));
    copy(&mut out.kv_indices, s.kv_indices);
    out.kv_indices.resize(s.kv_indices.len() + pad, scratch_page);
    copy(&mut out.kv_last_page_len, s.kv_last_page_len);
    out.kv_last_page_len.resize(bucket, 1);
    out.logit_rows.clear();
    out.logit_rows.extend(0..bucket as u32);
    // Padding rows attend densely (to their one scratch page).
    copy(&mut out.kv_keep, s.kv_keep);
    if !s.kv_keep.is_empty() {
        out.kv_keep.resize(bucket, 0);
    }
}

/// Every bucket up to `max_batch`, smallest first.
pub fn all_buckets(max_batch: usize) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    let mut n = 1;
    while let Some(b) = bucket_for(n, max_batch) {
        out.push(b);
        n = b + 1;
    }
    out
}

/// A step of `bucket` padding sequences only: what warm-up captures each graph with.
pub fn scratch_step(bucket: usize, scratch_page: i32, page_size: usize) -> OwnedStep {
    let mut out = OwnedStep::default();
    let empty = StepInput {
        tokens: &[],
        positions: &[],
        slots: &[],
        qo_indptr: &[0],
        kv_indptr: &[0],
        kv_indices: &[],
        kv_last_page_len: &[],
        logit_rows: &[],
        kv_keep: &[],
    };
    pad_step(&mut out, &empty, bucket, scratch_page, page_size);
    out
}

/// One sequence of `len` tokens, all written to the scratch page (slots wrap around it)
/// and read back through it listed `len / page_size` times: a prefill that touches no
/// page of the engine's, for warm-up.
pub fn scratch_prefill(len: usize, scratch_page: i32, page_size: usize) -> OwnedStep {
    let pages = len.div_ceil(page_size);
    OwnedStep {
        tokens: vec![0; len],
        positions: (0..len as i32).collect(),
        slots: (0..len).map(|i| scratch_page * page_size as i32 + (i % page_size) as i32).collect(),
        qo_indptr: vec![0, len as i32],
        kv_indptr: vec![0, pages as i32],
        kv_indices: vec![scratch_page; pages],
        kv_last_page_len: vec![(len - (pages - 1) * page_size) as i32],
        logit_rows: vec![len as u32 - 1],
        kv_keep: Vec::new(),
    }
}

/// A bucket's graph: seen once (its eager run compiled the kernels and chose the GEMM
/// algorithms), then captured on the next step of that size.
pub enum BucketGraph {
    Warm,
    Ready(Graph),
    /// Its capture failed: the bucket runs eagerly.
    Failed,
}

#[derive(Default)]
pub struct Graphs {
    /// Keyed by (bucket, sparse): a step with sparse layers launches more kernels.
    pub buckets: HashMap<(usize, bool), BucketGraph>,
    pub captured: usize,
    pub replayed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_and_stay_under_the_max() {
        for max in [1usize, 7, 64, 256, 1000, 1024] {
            for n in 1..=max {
                let b = bucket_for(n, max).unwrap();
                assert!(b >= n && b <= max, "n {n} max {max} -> {b}");
            }
            assert_eq!(bucket_for(max + 1, max), None);
        }
        assert_eq!(bucket_for(0, 8), None);
        assert_eq!(bucket_for(3, 256), Some(4));
        assert_eq!(bucket_for(65, 256), Some(80));
    }

    #[test]
    fn padding_adds_scratch_sequences() {
        let s = StepInput {
            tokens: &[5, 6],
            positions: &[17, 3],
            slots: &[33, 64 + 3],
            qo_indptr: &[0, 1, 2],
            kv_indptr: &[0, 2, 3],
            kv_indices: &[1, 2, 4],
            kv_last_page_len: &[2, 4],
            logit_rows: &[0, 1],
            kv_keep: &[],
        };
        assert!(is_decode_step(&s));
        let mut p = OwnedStep::default();
        pad_step(&mut p, &s, 4, 9, 16);
        assert_eq!(p.tokens, vec![5, 6, 0, 0]);
        assert_eq!(p.slots, vec![33, 67, 144, 144]);
        assert_eq!(p.qo_indptr, vec![0, 1, 2, 3, 4]);
        assert_eq!(p.kv_indptr, vec![0, 2, 3, 4, 5]);
        assert_eq!(p.kv_indices, vec![1, 2, 4, 9, 9]);
        assert_eq!(p.kv_last_page_len, vec![2, 4, 1, 1]);
        assert_eq!(p.logit_rows, vec![0, 1, 2, 3]);
        let w = scratch_step(3, 9, 16);
        assert_eq!(w.kv_indptr, vec![0, 1, 2, 3]);
        assert_eq!(w.slots, vec![144; 3]);
        assert!(is_decode_step(&w.as_input()));
        assert_eq!(all_buckets(20), vec![1, 2, 4, 8, 16, 20]);
        let p = scratch_prefill(40, 9, 16);
        assert_eq!((p.kv_indices.len(), p.kv_last_page_len[0]), (3, 8));
        assert!(p.slots.iter().all(|&s| (144..160).contains(&s)));
        assert!(!is_decode_step(&p.as_input()));
        let prefill = StepInput { qo_indptr: &[0, 2], logit_rows: &[1], ..s };
        assert!(!is_decode_step(&prefill));
    }
}
