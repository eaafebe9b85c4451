//! The backend contract: the ops a Llama forward needs, over the paged KV pool.
//!
//! A backend owns its memory (weights, activations, the KV pool). The model calls
//! `begin_step` once per engine step with the step's host metadata, then the ops layer by
//! layer. The CPU backend (`cpu`) is the reference the CUDA backend is tested against;
//! both implement every op with the same semantics.

use radix_kv::{KvDtype, KvGeometry, SparsePolicy};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::sampling::{SampleRequest, Sampled};
use crate::tensor::HostTensor;
use crate::tp::TpShard;

/// Logit rows a step may carry beyond one per sequence: prompt tokens scored for prompt
/// log-probabilities (`echo`). The scheduler keeps to it; memory plans reserve it (128
/// rows of a 128K vocabulary: 64 MB of f32 logits). It bounds how fast a scored prompt
/// goes: 128 tokens a step.
pub const MAX_SCORED_ROWS_PER_STEP: usize = 128;

/// One step's batch, as the scheduler planned it: the tokens to compute and where their
/// KV goes and comes from. Sequence b's queries are the last `q_len(b)` tokens of its KV
/// (which already includes this step's tokens): the causal mask is bottom-right aligned.
/// The one step type: the engine fills one in place every step (no allocation in steady
/// state), a backend copies or pads it, warm-up builds its own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    pub tokens: Vec<u32>,
    /// Absolute position of each token (RoPE).
    pub positions: Vec<i32>,
    /// KV slot of each token: `page * page_size + offset`.
    pub slots: Vec<i32>,
    pub qo_indptr: Vec<i32>,
    pub kv_indptr: Vec<i32>,
    pub kv_indices: Vec<i32>,
    pub kv_last_page_len: Vec<i32>,
    /// Token rows whose logits are needed: the last token of each sequence that samples,
    /// and prompt tokens scored for prompt log-probabilities (at most
    /// `MAX_SCORED_ROWS_PER_STEP` of those per step).
    pub logit_rows: Vec<u32>,
    /// Sparse paging (`KvPoolSpec::sparse`): pages each sequence attends to in the
    /// sparse layers (`SparsePolicy::pages_to_keep`; 0, or all of its pages: dense).
    /// Empty: the whole step is dense.
    pub kv_keep: Vec<i32>,
}

impl Step {
    /// One sequence computed whole from position 0 in pages 0, 1, ... of `page_size`
    /// tokens, with the logits of its last token (tests and tools: a fresh forward of
    /// `tokens` on a pool of at least `tokens.len().div_ceil(page_size)` pages).
    pub fn whole_sequence(tokens: &[u32], page_size: usize) -> Self {
        let pages = tokens.len().div_ceil(page_size.max(1));
        let positions: Vec<i32> = (0..tokens.len() as i32).collect();
        Self {
            tokens: tokens.to_vec(),
            slots: positions.clone(),
            positions,
            qo_indptr: vec![0, tokens.len() as i32],
            kv_indptr: vec![0, pages as i32],
            kv_indices: (0..pages as i32).collect(),
            kv_last_page_len: vec![(tokens.len() + page_size - pages * page_size) as i32],
            logit_rows: vec![tokens.len().saturating_sub(1) as u32],
            kv_keep: Vec::new(),
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    pub fn batch_size(&self) -> usize {
        self.qo_indptr.len().saturating_sub(1)
    }

    /// Empties every array, keeping their allocations.
    pub fn clear(&mut self) {
        for v in [
            &mut self.positions,
            &mut self.slots,
            &mut self.qo_indptr,
            &mut self.kv_indptr,
            &mut self.kv_indices,
            &mut self.kv_last_page_len,
            &mut self.kv_keep,
        ] {
            v.clear();
        }
        self.tokens.clear();
        self.logit_rows.clear();
    }

    /// Copies a CSR page table's arrays (`qo_indptr`, `kv_*` and the slot mapping) in.
    pub fn set_table(&mut self, t: &radix_kv::PageTable) {
        for (dst, src) in [
            (&mut self.slots, t.slot_mapping()),
            (&mut self.qo_indptr, t.qo_indptr()),
            (&mut self.kv_indptr, t.kv_indptr()),
            (&mut self.kv_indices, t.kv_indices()),
            (&mut self.kv_last_page_len, t.kv_last_page_len()),
        ] {
            dst.clear();
            dst.extend_from_slice(src);
        }
    }

    /// Checks `kv_keep` against the step and the backend's sparse `policy`, and says
    /// whether any sequence attends sparsely (`0 < keep < its pages`). Both backends
    /// call it, so they refuse the same steps:
    /// - `kv_keep` is empty or one count per sequence, none negative;
    /// - a sparse row is a decode row (one query) keeping at least the sink and window
    ///   pages;
    /// - sparse rows need sparse paging on (`KvPoolSpec::sparse`); other counts (0, or
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
            let (queries, pages) = (span(&self.qo_indptr), span(&self.kv_indptr));
            if keep == 0 || keep >= pages {
                continue;
            }
            let Some(policy) = policy else {
                return bad(format!(
                    "sequence {b} keeps {keep} of its {pages} pages but sparse paging is off \
                     (the KV pool was made without a sparse policy)"
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

/// The KV pool a backend allocates (`Backend::init_kv`): its pages and, when sparse
/// paging is on, the policy (the pool then keeps a key-bounds record per page and kv
/// head, and steps may carry `Step::kv_keep`). Given once, with the pool.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvPoolSpec {
    pub num_pages: usize,
    pub page_size: usize,
    pub sparse: Option<SparsePolicy>,
}

impl KvPoolSpec {
    /// The pool's geometry for `cfg` in `dtype` (the sparse policy checked too).
    pub fn geometry(&self, cfg: &ModelConfig, dtype: KvDtype) -> Result<KvGeometry> {
        if let Some(p) = &self.sparse {
            p.validate().map_err(ModelError::Invalid)?;
        }
        if self.num_pages == 0 {
            return Err(ModelError::Invalid("the KV pool needs at least one page".into()));
        }
        cfg.kv_geometry(self.page_size, dtype, self.sparse.is_some())
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
pub struct StepRun {
    pub mode: StepMode,
    pub tokens: usize,
    pub logit_rows: usize,
}

impl StepRun {
    /// A step run eagerly as it is.
    pub fn eager(step: &Step) -> Self {
        Self { mode: StepMode::Eager, tokens: step.num_tokens(), logit_rows: step.logit_rows.len() }
    }
}

/// An activation matrix `[rows, cols]` in backend memory.
pub trait Activation {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
}

/// What a fused linear layer (`Backend::fused_linear`) multiplies: an activation as it is,
/// or one built inside the product from what the op before it would have read.
pub enum LinearInput<'a, B: Backend + ?Sized> {
    Plain(&'a B::Act),
    /// `rms_norm(x) · weight`, as `rms_norm` stores it.
    RmsNorm {
        x: &'a B::Act,
        weight: &'a B::Weight,
        eps: f32,
    },
    /// `silu(gate) · up` of a `[rows, gate|up]` activation, as `silu_mul` stores it.
    SiluMul(&'a B::Act),
}

impl<B: Backend + ?Sized> LinearInput<'_, B> {
    /// Whether the backend builds the input inside the product.
    pub fn is_built(&self) -> bool {
        !matches!(self, LinearInput::Plain(_))
    }
}

pub trait Backend {
    type Act: Activation;
    type Weight;

    fn name(&self) -> String;

    /// This backend's rank in a tensor-parallel group: the model loads this rank's
    /// slices of the weights and calls `all_reduce` after the row-parallel GEMMs.
    fn shard(&self) -> TpShard {
        TpShard::SINGLE
    }

    /// Replaces `x` with its sum over the ranks of the group (the same sum on every
    /// rank), after the O and down projections. Alone it does nothing, which is all the
    /// cost tensor parallelism adds at size 1.
    fn all_reduce(&mut self, x: &mut Self::Act) -> Result<()> {
        let _ = x;
        match self.shard() {
            TpShard { size: 1, .. } => Ok(()),
            TpShard { rank, size } => Err(ModelError::TensorParallel(format!(
                "{} is rank {rank} of a group of {size} but has no all-reduce",
                self.name()
            ))),
        }
    }

    /// Moves a weight to the backend (in the backend's chosen dtype).
    fn upload(&mut self, tensor: &HostTensor) -> Result<Self::Weight>;

    /// Element type of the KV pool this backend allocates.
    fn kv_dtype(&self) -> KvDtype;

    /// Keeps the KV cache in FP8 e4m3 with these per-layer scales (`--kv-cache-dtype
    /// fp8_e4m3`), from the next `init_kv` on. Backends without an FP8 cache refuse.
    fn set_kv_cache_fp8(&mut self, scales: crate::fp8::KvScales) -> Result<()> {
        let _ = scales;
        Err(ModelError::Invalid(format!(
            "{} has no FP8 KV cache yet (--kv-cache-dtype auto keeps it 16-bit)",
            self.name()
        )))
    }

    /// Allocates the KV pool (once; a second call replaces it): `spec.num_pages` pages of
    /// `spec.page_size` tokens for every layer, with key bounds when `spec.sparse` turns
    /// query-aware sparse paging on. Returns the pool's geometry.
    fn init_kv(&mut self, cfg: &ModelConfig, spec: &KvPoolSpec) -> Result<KvGeometry>;

    /// Makes the step's metadata available to the ops that follow, and says how the
    /// step runs and how many rows its activations have (a backend may pad a step).
    fn begin_step(&mut self, step: &Step) -> Result<StepRun>;

    /// Steps to run (twice each) before serving, after `init_kv`: a CUDA backend warms up
    /// and captures its decode graphs with them. They touch no page the engine owns.
    fn warm_up_steps(&self) -> Vec<Step> {
        Vec::new()
    }

    /// Called after the ops of a step that began in `StepMode::Record`, also when one of
    /// them failed (`recorded` false): ends the recording and, if every op was recorded,
    /// runs what was. After an error, or with `recorded` false, nothing of the step ran.
    fn end_step(&mut self, recorded: bool) -> Result<()> {
        let _ = recorded;
        Ok(())
    }

    /// Stops recording steps (a capture failed on this rank of a tensor-parallel group,
    /// for a reason of its own): from the next step on every rank of the group runs
    /// eagerly, since a collective must be recorded on all ranks or on none.
    fn disable_graphs(&mut self, why: &str) {
        let _ = why;
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

    /// Whether a step of `rows` tokens may run the product with `w` as `fused_linear`, with
    /// its input built in the product (`built`: `LinearInput::RmsNorm` or `SiluMul`) or
    /// not, and with or without the residual add after it. Where every product of a layer
    /// may, the model runs the layer with no norm, SiLU·mul or residual-add ops between
    /// them (one fewer launch each: at batch 1 each costs more than its bytes).
    fn fuses_linear(&self, rows: usize, w: &Self::Weight, built: bool) -> bool {
        let _ = (rows, w, built);
        false
    }

    /// `out = input · wᵀ`, or with `add` `out += input · wᵀ` (the product rounded to the
    /// activation type first, as `add_rms_norm` adds a stored product). Called only where
    /// `fuses_linear` said so; `out` never overlaps what the input is built from.
    fn fused_linear(
        &mut self,
        input: LinearInput<'_, Self>,
        w: &Self::Weight,
        out: &mut Self::Act,
        add: bool,
    ) -> Result<()> {
        let _ = (input, w, out, add);
        Err(ModelError::Invalid(format!("{} runs no fused linear layers", self.name())))
    }

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
