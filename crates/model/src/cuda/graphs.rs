//! Which decode steps replay a CUDA graph, how a step is padded to its bucket, and the
//! graphs' life cycle (`DecodeGraphs`).
//!
//! A decode step (one query token per sequence, every sequence sampling) of `n`
//! sequences runs as the graph of the smallest bucket `B >= n`. The `B - n` padding
//! sequences are one token each at position 0 over a scratch page of the pool (one page
//! past those the engine hands out): they write their K/V there and attend to it, and
//! their logits are never sampled. Every kernel's grid is then fixed by `B` alone; the
//! attention work list is padded to its bound with items the kernel skips.

use std::collections::HashMap;

use radix_gpu::{Device, Graph, graph};

use crate::backend::{Step, StepMode};
use crate::error::Result;

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
pub fn is_decode_step(s: &Step) -> bool {
    let n = s.tokens.len();
    n > 0
        && s.batch_size() == n
        && s.qo_indptr.iter().enumerate().all(|(i, &q)| q as usize == i)
        && s.logit_rows.len() == n
        && s.logit_rows.iter().enumerate().all(|(i, &r)| r as usize == i)
}

/// Copies the decode step `s` into `out` and appends the padding sequences over
/// `scratch_page` up to `bucket`.
pub fn pad_step(out: &mut Step, s: &Step, bucket: usize, scratch_page: i32, page_size: usize) {
    pad_arrays(out, s, bucket, scratch_page, page_size);
}

fn pad_arrays(out: &mut Step, s: &Step, bucket: usize, scratch_page: i32, page_size: usize) {
    let n = s.tokens.len();
    let pad = bucket - n;
    let copy = |dst: &mut Vec<i32>, src: &[i32]| {
        dst.clear();
        dst.extend_from_slice(src);
    };
    out.tokens.clear();
    out.tokens.extend_from_slice(&s.tokens);
    out.tokens.resize(bucket, 0);
    copy(&mut out.positions, &s.positions);
    out.positions.resize(bucket, 0);
    copy(&mut out.slots, &s.slots);
    out.slots.resize(bucket, scratch_page * page_size as i32);
    out.qo_indptr.clear();
    out.qo_indptr.extend(0..=bucket as i32);
    copy(&mut out.kv_indptr, &s.kv_indptr);
    let end = *s.kv_indptr.last().unwrap_or(&0);
    out.kv_indptr.extend((1..=pad as i32).map(|i| end + i));
    copy(&mut out.kv_indices, &s.kv_indices);
    out.kv_indices.resize(s.kv_indices.len() + pad, scratch_page);
    copy(&mut out.kv_last_page_len, &s.kv_last_page_len);
    out.kv_last_page_len.resize(bucket, 1);
    out.logit_rows.clear();
    out.logit_rows.extend(0..bucket as u32);
    // Padding rows attend densely (to their one scratch page).
    copy(&mut out.kv_keep, &s.kv_keep);
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
pub fn scratch_step(bucket: usize, scratch_page: i32, page_size: usize) -> Step {
    let mut out = Step::default();
    let empty = Step { qo_indptr: vec![0], kv_indptr: vec![0], ..Step::default() };
    pad_step(&mut out, &empty, bucket, scratch_page, page_size);
    out
}

/// One sequence of `len` tokens after `prefix` earlier ones, all written to the scratch
/// page (slots wrap around it) and read back through it listed once per page of
/// `prefix + len`: a prefill (or, with a prefix, a prompt chunk) that touches no page of
/// the engine's, for warm-up.
pub fn scratch_prefill(len: usize, prefix: usize, scratch_page: i32, page_size: usize) -> Step {
    let kv_len = prefix + len;
    let pages = kv_len.div_ceil(page_size);
    Step {
        tokens: vec![0; len],
        positions: (prefix as i32..kv_len as i32).collect(),
        slots: (prefix..kv_len)
            .map(|i| scratch_page * page_size as i32 + (i % page_size) as i32)
            .collect(),
        qo_indptr: vec![0, len as i32],
        kv_indptr: vec![0, pages as i32],
        kv_indices: vec![scratch_page; pages],
        kv_last_page_len: vec![(kv_len - (pages - 1) * page_size) as i32],
        logit_rows: vec![len as u32 - 1],
        kv_keep: Vec::new(),
    }
}

/// A bucket's graph: seen once (its eager run compiled the kernels and chose the GEMM
/// algorithms), then captured on the next step of that size.
enum BucketGraph {
    Warm,
    Ready(Graph),
    /// Its capture failed: the bucket runs eagerly.
    Failed,
}

/// A graph's key: its bucket, whether the step has sparse layers (they launch more
/// kernels, so they have graphs of their own), and what its attention plans chose of the
/// launch beyond the tiles, which a replay cannot change (`AttentionBatch::launch_variant`
/// of the dense layers, and of the sparse ones shifted by 2: clusters for short contexts
/// of small batches, the wide merge for long ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GraphKey {
    pub bucket: usize,
    pub sparse: bool,
    pub variant: u8,
}

/// The decode graphs of a backend and where each one is in its life: unseen, warm
/// (ran eagerly once), being recorded, ready to replay, or failed (eager from then on).
pub struct DecodeGraphs {
    buckets: HashMap<GraphKey, BucketGraph>,
    /// Largest decode batch replayed from a graph; 0 turns graphs off.
    max_batch: usize,
    /// The graph being recorded between `enter` (`StepMode::Record`) and `end_capture`.
    capturing: Option<GraphKey>,
    /// The last padded step (its arrays are reused).
    padded: Step,
    pub captured: usize,
    pub replayed: u64,
}

impl DecodeGraphs {
    pub fn new(max_batch: usize) -> Self {
        Self {
            buckets: HashMap::new(),
            max_batch,
            capturing: None,
            padded: Step::default(),
            captured: 0,
            replayed: 0,
        }
    }

    /// Sets the largest batch replayed from a graph (0: none); a change drops the graphs.
    pub fn set_max_batch(&mut self, max_batch: usize) {
        if max_batch != self.max_batch {
            self.clear();
        }
        self.max_batch = max_batch;
    }

    /// Drops every graph: the buffers they were recorded over moved.
    pub fn clear(&mut self) {
        self.buckets.clear();
        self.capturing = None;
    }

    /// The graph a step runs as, if any: a decode step of at most `max_batch` sequences
    /// whose bucket has not failed.
    pub fn key_for(&self, s: &Step, sparse: bool) -> Option<GraphKey> {
        if !is_decode_step(s) {
            return None;
        }
        let bucket = bucket_for(s.num_tokens(), self.max_batch)?;
        let key = GraphKey { bucket, sparse, variant: 0 };
        match self.buckets.get(&key) {
            Some(BucketGraph::Failed) => None,
            _ => Some(key),
        }
    }

    /// `s` padded to `bucket` over `scratch_page`, in the reused padded step (handed
    /// back with `return_padded`).
    pub fn take_padded(
        &mut self,
        s: &Step,
        bucket: usize,
        scratch_page: i32,
        page_size: usize,
    ) -> Step {
        let mut out = std::mem::take(&mut self.padded);
        pad_step(&mut out, s, bucket, scratch_page, page_size);
        out
    }

    pub fn return_padded(&mut self, step: Step) {
        self.padded = step;
    }

    /// Once the step of `key` is staged: the first step of a bucket runs eagerly (its
    /// kernels compile, its GEMM algorithms are chosen), the second is recorded, later
    /// ones replay the graph (launched here: the caller skips the ops).
    pub fn enter(&mut self, device: &Device, key: GraphKey) -> Result<StepMode> {
        match self.buckets.get(&key) {
            None => {
                self.buckets.insert(key, BucketGraph::Warm);
                Ok(StepMode::Eager)
            }
            Some(BucketGraph::Warm) => {
                graph::begin_capture(device)?;
                self.capturing = Some(key);
                Ok(StepMode::Record)
            }
            Some(BucketGraph::Ready(g)) => {
                g.launch()?;
                self.replayed += 1;
                Ok(StepMode::Replayed)
            }
            Some(BucketGraph::Failed) => Ok(StepMode::Eager),
        }
    }

    /// Ends a recording begun by `enter` and, when every op was `recorded`, runs it. A
    /// capture that failed (or whose ops did) leaves its bucket eager from then on; what
    /// was recorded never ran. Nothing to do outside a recording.
    pub fn end_capture(&mut self, device: &Device, recorded: bool) -> Result<()> {
        let Some(key) = self.capturing.take() else { return Ok(()) };
        let ended = graph::end_capture(device);
        if !recorded {
            self.buckets.insert(key, BucketGraph::Failed);
            return Ok(ended.map(drop)?);
        }
        match ended.and_then(|g| g.launch().map(|()| g)) {
            Ok(g) => {
                self.buckets.insert(key, BucketGraph::Ready(g));
                self.captured += 1;
                tracing::debug!(
                    bucket = key.bucket,
                    sparse = key.sparse,
                    "captured a decode CUDA graph"
                );
                Ok(())
            }
            Err(e) => {
                self.buckets.insert(key, BucketGraph::Failed);
                Err(e.into())
            }
        }
    }

    /// The dense buckets that have no graph yet, of any launch shape (what warm-up
    /// captures).
    pub fn missing_dense_buckets(&self) -> Vec<usize> {
        all_buckets(self.max_batch)
            .into_iter()
            .filter(|&b| !self.buckets.keys().any(|k| k.bucket == b && !k.sparse))
            .collect()
    }
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
        let s = Step {
            tokens: vec![5, 6],
            positions: vec![17, 3],
            slots: vec![33, 64 + 3],
            qo_indptr: vec![0, 1, 2],
            kv_indptr: vec![0, 2, 3],
            kv_indices: vec![1, 2, 4],
            kv_last_page_len: vec![2, 4],
            logit_rows: vec![0, 1],
            kv_keep: vec![],
        };
        assert!(is_decode_step(&s));
        let mut p = Step::default();
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
        assert!(is_decode_step(&w));
        assert_eq!(all_buckets(20), vec![1, 2, 4, 8, 16, 20]);
        let p = scratch_prefill(40, 0, 9, 16);
        assert_eq!((p.kv_indices.len(), p.kv_last_page_len[0]), (3, 8));
        assert!(p.slots.iter().all(|&s| (144..160).contains(&s)));
        assert!(!is_decode_step(&p));
        let c = scratch_prefill(8, 30, 9, 16);
        assert_eq!((c.kv_indices.len(), c.kv_last_page_len[0], c.positions[0]), (3, 6, 30));
        assert_eq!((c.slots[0], c.slots[7]), (144 + 14, 144 + 5));
        let prefill = Step { qo_indptr: vec![0, 2], logit_rows: vec![1], ..s };
        assert!(!is_decode_step(&prefill));
    }
}
