//! The backend contract: the ops a Llama forward needs, over the paged KV pool.
//!
//! A backend owns its memory (weights, activations, the KV pool). The model calls
//! `begin_step` once per engine step with the step's host metadata, then the ops layer by
//! layer. The CPU backend (`cpu`) is the reference the CUDA backend is tested against;
//! both implement every op with the same semantics.

use radix_kv::SparsePolicy;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::sampling::{SampleRequest, Sampled};
use crate::tensor::HostTensor;

/// One step's batch, as the scheduler planned it: the tokens to compute and where their
/// KV goes and comes from. Sequence b's queries are the last `q_len(b)` tokens of its KV
/// (which already includes this step's tokens): the causal mask is bottom-right aligned.
#[derive(Clone, Copy, Debug)]
pub struct StepInput<'a> {
    pub tokens: &'a [u32],
    /// Absolute position of each token (RoPE).
    pub positions: &'a [i32],
    /// KV slot of each token: `page * page_size + offset`.
    pub slots: &'a [i32],
    pub qo_indptr: &'a [i32],
    pub kv_indptr: &'a [i32],
    pub kv_indices: &'a [i32],
    pub kv_last_page_len: &'a [i32],
    /// Token rows whose logits are needed (the last token of each sequence that samples).
    pub logit_rows: &'a [u32],
    /// Sparse paging (`Backend::set_sparse`): pages each sequence attends to in the
    /// sparse layers (`SparsePolicy::pages_to_keep`; 0, or all of its pages: dense).
    /// Empty: the whole step is dense.
    pub kv_keep: &'a [i32],
}

impl StepInput<'_> {
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    pub fn batch_size(&self) -> usize {
        self.qo_indptr.len().saturating_sub(1)
    }

    /// Checks `kv_keep` against the step and the backend's sparse `policy`, and says
    /// whether any sequence attends sparsely (`0 < keep < its pages`). Both backends
    /// call it, so they refuse the same steps:
    /// - `kv_keep` is empty or one count per sequence, none negative;
    /// - a sparse row is a decode row (one query) keeping at least the sink and window
    ///   pages;
    /// - sparse rows need sparse paging on (`Backend::set_sparse`); other counts (0, or
    ///   all pages) are dense and allowed either way.
    pub fn sparse_rows(&self, policy: Option<&SparsePolicy>) -> Result<bool> {
        if self.kv_keep.is_empty() {
            return Ok(false);
        }
        let bad = |m: String| Err(ModelError::Invalid(m));
        let batch = self.batch_size();
        if self.kv_keep.len() != batch {
            return bad(format!(
                "kv_keep has {} entries for a batch of {batch} sequences",
                self.kv_keep.len()
            ));
        }
        let mut any = false;
        for (b, &keep) in self.kv_keep.iter().enumerate() {
            if keep < 0 {
                return bad(format!("kv_keep has a negative count ({keep}) for sequence {b}"));
            }
            let span = |v: &[i32]| match (v.get(b), v.get(b + 1)) {
                (Some(&a), Some(&z)) => (z - a).max(0),
                _ => 0,
            };
            let (queries, pages) = (span(self.qo_indptr), span(self.kv_indptr));
            if keep == 0 || keep >= pages {
                continue;
            }
            let Some(policy) = policy else {
                return bad(format!(
                    "sequence {b} keeps {keep} of its {pages} pages but sparse paging is off \
                     (set_sparse before init_kv)"
                ));
            };
            if queries != 1 {
                return bad(format!(
                    "sequence {b} has {queries} queries: only decode rows attend sparsely"
                ));
            }
            let forced = (policy.sink_pages + policy.window_pages) as i32;
            if keep < forced {
                return bad(format!(
                    "sequence {b} keeps {keep} of its {pages} pages, fewer than the {forced} \
                     sink and window pages"
                ));
            }
            any = true;
        }
        Ok(any)
    }
}

/// A step that owns its arrays (warm-up steps a backend asks the model to run).
#[derive(Clone, Debug, Default)]
pub struct OwnedStep {
    pub tokens: Vec<u32>,
    pub positions: Vec<i32>,
    pub slots: Vec<i32>,
    pub qo_indptr: Vec<i32>,
    pub kv_indptr: Vec<i32>,
    pub kv_indices: Vec<i32>,
    pub kv_last_page_len: Vec<i32>,
    pub logit_rows: Vec<u32>,
    pub kv_keep: Vec<i32>,
}

impl OwnedStep {
    pub fn as_input(&self) -> StepInput<'_> {
        StepInput {
            tokens: &self.tokens,
            positions: &self.positions,
            slots: &self.slots,
            qo_indptr: &self.qo_indptr,
            kv_indptr: &self.kv_indptr,
            kv_indices: &self.kv_indices,
            kv_last_page_len: &self.kv_last_page_len,
            logit_rows: &self.logit_rows,
            kv_keep: &self.kv_keep,
        }
    }
}

/// How the ops of a step run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepMode {
    /// Each op runs as it is called.
    Eager,
    /// The ops are recorded (a CUDA graph) and run at `end_step`.
    Record,
    /// The backend already ran the whole forward up to the logits (a graph replay):
    /// skip the ops.
    Replayed,
}

/// How `begin_step` will run a step: its mode and the rows of its activations, which
/// may exceed the step's own when the backend pads it (to replay a CUDA graph of a
/// larger batch); the extra rows are computed and ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepPlan {
    pub mode: StepMode,
    pub tokens: usize,
    pub logit_rows: usize,
}

impl StepPlan {
    /// A step run eagerly as it is.
    pub fn eager(step: &StepInput) -> Self {
        Self { mode: StepMode::Eager, tokens: step.num_tokens(), logit_rows: step.logit_rows.len() }
    }
}

/// An activation matrix `[rows, cols]` in backend memory.
pub trait Activation {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
}

pub trait Backend {
    type Act: Activation;
    type Weight;

    fn name(&self) -> String;

    /// Moves a weight to the backend (in the backend's chosen dtype).
    fn upload(&mut self, tensor: &HostTensor) -> Result<Self::Weight>;

    /// Turns query-aware sparse paging on with `policy` (or off with `None`). Call it
    /// before `init_kv`: the per-page key bounds are allocated with the pool and kept
    /// by every append. Steps then pass `StepInput::kv_keep`.
    fn set_sparse(&mut self, policy: Option<SparsePolicy>) -> Result<()>;

    /// Allocates the KV pool: `num_pages` pages of `page_size` tokens for every layer.
    fn init_kv(&mut self, cfg: &ModelConfig, num_pages: usize, page_size: usize) -> Result<()>;

    /// Makes the step's metadata available to the ops that follow, and says how the
    /// step runs and how many rows its activations have (a backend may pad a step).
    fn begin_step(&mut self, step: &StepInput) -> Result<StepPlan>;

    /// Steps to run (twice each) before serving, after `init_kv`: a CUDA backend warms up
    /// and captures its decode graphs with them. They touch no page the engine owns.
    fn warm_up_steps(&self) -> Vec<OwnedStep> {
        Vec::new()
    }

    /// Called after the ops of a step that began in `StepMode::Record`, also when one of
    /// them failed: ends the recording and runs what was recorded.
    fn end_step(&mut self) -> Result<()> {
        Ok(())
    }

    /// An activation of `rows x cols` (contents unspecified).
    fn act(&mut self, rows: usize, cols: usize) -> Result<Self::Act>;

    /// `out[t] = table[tokens[t]]`.
    fn embed(&mut self, table: &Self::Weight, out: &mut Self::Act) -> Result<()>;

    /// `out = x / rms(x) * w`, row by row.
    fn rms_norm(
        &mut self,
        x: &Self::Act,
        w: &Self::Weight,
        eps: f32,
        out: &mut Self::Act,
    ) -> Result<()>;

    /// `residual += delta; out = rms_norm(residual)` (the residual stream update fused
    /// with the next norm).
    fn add_rms_norm(
        &mut self,
        residual: &mut Self::Act,
        delta: &Self::Act,
        w: &Self::Weight,
        eps: f32,
        out: &mut Self::Act,
    ) -> Result<()>;

    /// `out = x · wᵀ (+ bias)` with `w` stored `[out_features, in_features]`.
    fn linear(
        &mut self,
        x: &Self::Act,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
        out: &mut Self::Act,
    ) -> Result<()>;

    /// From the fused `[tokens, q|k|v]` projection: rotates q and k by their positions,
    /// writes k and v into layer `layer`'s pages at the step's slots, returns q in `q`.
    fn rope_append(&mut self, layer: usize, qkv: &Self::Act, q: &mut Self::Act) -> Result<()>;

    /// Attention of the step's queries over layer `layer`'s KV through the page table.
    fn attention(&mut self, layer: usize, q: &Self::Act, out: &mut Self::Act) -> Result<()>;

    /// `out = silu(gate) * up` from the fused `[tokens, gate|up]` projection.
    fn silu_mul(&mut self, gate_up: &Self::Act, out: &mut Self::Act) -> Result<()>;

    /// `out[i] = x[logit_rows[i]]`.
    fn gather_logit_rows(&mut self, x: &Self::Act, out: &mut Self::Act) -> Result<()>;

    /// `logits = x · headᵀ` in f32, kept by the backend for `sample` / `read_logits`.
    fn logits(&mut self, x: &Self::Act, head: &Self::Weight) -> Result<()>;

    /// Samples one token per logits row (`requests[i]` for row i). Only the tokens (and
    /// their log-probabilities) come back to the host.
    fn sample(&mut self, requests: &[SampleRequest]) -> Result<Vec<Sampled>>;

    /// The last logits, `[rows, vocab]` row-major (tests and debugging).
    fn read_logits(&mut self) -> Result<Vec<f32>>;
}
