//! The batches the tensor-parallel tests (CPU and CUDA) run: sequences at fixed page
//! ranges growing by chosen amounts, tokens derived from their positions.

use radix_model::Step;

/// Sequence s owns pages `s * pages_per_seq ..`; `len[s]` tokens are in the cache.
pub struct Batch {
    pub len: Vec<usize>,
    pub page_size: usize,
    pub pages_per_seq: usize,
}

impl Batch {
    pub fn new(seqs: usize, page_size: usize, pages_per_seq: usize) -> Self {
        Self { len: vec![0; seqs], page_size, pages_per_seq }
    }

    /// A step computing `new[s]` more tokens of each sequence (0: not in the step),
    /// logits for the last token of each.
    pub fn step(&mut self, new: &[usize]) -> Step {
        let ps = self.page_size;
        let mut s = Step { qo_indptr: vec![0], kv_indptr: vec![0], ..Default::default() };
        for (seq, &n) in new.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let (start, end) = (self.len[seq], self.len[seq] + n);
            let base = (seq * self.pages_per_seq) as i32;
            for p in start..end {
                s.tokens.push(((p * 31 + seq * 7 + 5) % 300) as u32);
                s.positions.push(p as i32);
                s.slots.push(base * ps as i32 + p as i32);
            }
            let pages = end.div_ceil(ps);
            s.kv_indices.extend((0..pages as i32).map(|i| base + i));
            s.kv_indptr.push(s.kv_indices.len() as i32);
            s.kv_last_page_len.push((end - (pages - 1) * ps) as i32);
            s.qo_indptr.push(s.tokens.len() as i32);
            s.logit_rows.push(s.tokens.len() as u32 - 1);
            self.len[seq] = end;
        }
        s
    }
}
