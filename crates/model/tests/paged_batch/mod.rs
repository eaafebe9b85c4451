//! A batch of sequences at fixed page ranges (sequence b owns pages b * 64 ..), for the
//! GPU tests that compare backends step by step.

use radix_kv::{SparseBudget, SparsePolicy};
use radix_model::{Backend, LlamaModel, Step};

pub const PS: usize = 16;

pub struct Batch {
    pub seqs: Vec<Vec<u32>>,
    pub computed: Vec<usize>,
    /// Sparse paging: decode rows keep the pages this policy and budget allow.
    pub sparse: Option<(SparsePolicy, SparseBudget)>,
}

impl Batch {
    /// Three dense sequences of 5, 37 and `long` tokens, nothing computed yet: the mixed
    /// batch (a short prompt, one off the page size, a long one) the backend tests share.
    #[allow(dead_code)] // not every test target that includes this module uses it
    pub fn mixed(long: usize) -> Batch {
        Batch {
            seqs: vec![
                (0..5).collect(),
                (0..37).map(|i| (i * 7) % 256).collect(),
                (0..long as u32).map(|i| (i * 13 + 1) % 256).collect(),
            ],
            computed: vec![0; 3],
            sparse: None,
        }
    }

    /// Runs the tokens not yet computed of every sequence; logits of each sequence's last.
    pub fn step<B: Backend>(&self, model: &mut LlamaModel<B>) -> Vec<f32> {
        let (mut tokens, mut positions, mut slots) = (vec![], vec![], vec![]);
        let (mut qo, mut kv_indptr, mut indices, mut last, mut rows) =
            (vec![0i32], vec![0i32], vec![], vec![], vec![]);
        let mut keep = Vec::new();
        for (b, seq) in self.seqs.iter().enumerate() {
            let base = b * 64; // sequence b owns pages base..base+64
            for (p, &token) in seq.iter().enumerate().skip(self.computed[b]) {
                tokens.push(token);
                positions.push(p as i32);
                slots.push(((base + p / PS) * PS + p % PS) as i32);
            }
            qo.push(tokens.len() as i32);
            let pages = seq.len().div_ceil(PS);
            indices.extend((0..pages).map(|i| (base + i) as i32));
            kv_indptr.push(indices.len() as i32);
            last.push((seq.len() - (pages - 1) * PS) as i32);
            rows.push(tokens.len() as u32 - 1);
            if let Some((policy, budget)) = self.sparse {
                let decode = seq.len() - self.computed[b] == 1;
                let k = if decode { policy.pages_to_keep(budget, seq.len(), PS) } else { None };
                keep.push(k.unwrap_or(0) as i32);
            }
        }
        let step = Step {
            tokens,
            positions,
            slots,
            qo_indptr: qo,
            kv_indptr,
            kv_indices: indices,
            kv_last_page_len: last,
            logit_rows: rows,
            kv_keep: keep,
        };
        model.forward_logits(&step).unwrap()
    }
}
