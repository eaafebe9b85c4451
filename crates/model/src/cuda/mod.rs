//! The CUDA backend: bf16 weights and activations, f32 logits; cuBLASLt GEMMs, our
//! attention (prefill and paged decode in one launch per layer), KV append with RoPE, and
//! the small ops and the sampler from radix-kernels. Mirrors the CPU backend op by op.
//!
//! Memory is planned once: weights, one workspace for the largest step (`workspace`),
//! then the KV pool. Decode steps run as CUDA graphs, one per batch-size bucket
//! (`graphs`): the host uploads the step's metadata in one copy and launches the graph.

mod graphs;
mod sparse;
mod workspace;

use half::bf16;
use radix_gpu::{BLayout, Device, DeviceBuffer, Gemm, Jit, graph};
use radix_kernels::attention::{
    AttentionBatch, AttentionBuffers, AttentionShape, BatchMeta, KvSource, decode_work_bound,
    default_target_blocks, plan_batch,
};
use radix_kernels::kv_append::{self, AppendBatch, AppendInputs, PoolShape, bounds};
use radix_kernels::ops::{self, SampleRow};
use radix_kernels::sparse as sparse_select;
use radix_kv::SparsePolicy;

use self::graphs::{
    BucketGraph, Graphs, all_buckets, bucket_for, is_decode_step, pad_step, scratch_prefill,
    scratch_step,
};
use self::sparse::{SparsePlan, SparseStep};
use self::workspace::{ActShape, Caps, Workspace, put};
use crate::backend::{Activation, Backend, OwnedStep, StepInput, StepMode, StepPlan};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::sampling::{self, SampleRequest, Sampled};
use crate::tensor::{HostData, HostTensor};

/// A bf16 activation `[rows, cols]` on the GPU.
pub struct GpuAct {
    pub buf: DeviceBuffer<bf16>,
    pub rows: usize,
    pub cols: usize,
}

impl Activation for GpuAct {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
}

/// A bf16 weight `[rows, cols]` (a vector is one row).
pub struct GpuWeight {
    pub buf: DeviceBuffer<bf16>,
    pub rows: usize,
    pub cols: usize,
}

/// The ops' view of one step's metadata (views of the workspace).
struct StepState {
    tokens: DeviceBuffer<i32>,
    logit_rows: DeviceBuffer<i32>,
    /// Logit rows computed (padding included) and those the caller asked for.
    num_logit_rows: usize,
    real_logit_rows: usize,
    append: AppendInputs,
    attention: AttentionBatch,
    /// The sparse layers' selection and attention, when a sequence of the step is sparse.
    sparse: Option<SparseStep>,
}

/// GPU time per op category, from events around every op (when profiling is on).
#[derive(Clone, Debug, Default)]
pub struct OpTimes {
    pub gemm_ms: f64,
    pub attention_ms: f64,
    pub kv_append_ms: f64,
    pub norm_ms: f64,
    pub other_ms: f64,
    pub sample_ms: f64,
}

impl OpTimes {
    pub fn total_ms(&self) -> f64 {
        self.gemm_ms
            + self.attention_ms
            + self.kv_append_ms
            + self.norm_ms
            + self.other_ms
            + self.sample_ms
    }
}

#[derive(Clone, Copy)]
enum Op {
    Gemm,
    Attention,
    KvAppend,
    Norm,
    Other,
    Sample,
}

/// Events recorded around ops of the current step; resolved after the step syncs.
struct Profiler {
    pending: Vec<(Op, radix_gpu::GpuTimer)>,
    spare: Vec<radix_gpu::GpuTimer>,
    times: OpTimes,
}

pub struct CudaBackend {
    profiler: Option<Profiler>,
    device: Device,
    jit: Jit,
    gemm: Gemm,
    /// The KV pool's shape (and the heads appended to it), once `init_kv` ran.
    pool: Option<PoolShape>,
    kv: Vec<(DeviceBuffer<bf16>, DeviceBuffer<bf16>)>,
    inv_freq_dev: Option<DeviceBuffer<f32>>,
    act_shape: Option<ActShape>,
    workspace: Option<Workspace>,
    step: Option<StepState>,
    /// Vocab of the logits in the workspace (their rows are the step's logit rows);
    /// `None` until this step's logits exist.
    logit_vocab: Option<usize>,
    graphs: Graphs,
    /// Largest decode batch replayed from a graph; 0 turns graphs off.
    graph_max_batch: usize,
    /// The graph (bucket, sparse) being captured between `begin_step` and `end_step`.
    capturing: Option<(usize, bool)>,
    padded: OwnedStep,
    /// Sparse paging, when on (`Backend::set_sparse`): key bounds per layer beside the pool.
    sparse: Option<SparsePolicy>,
    bounds: Vec<DeviceBuffer<u8>>,
}

impl CudaBackend {
    /// Opens GPU `ordinal`; kernels compile (or come from the cache) on first use.
    pub fn new(ordinal: usize) -> Result<Self> {
        let device = Device::open(ordinal)?;
        let gemm = Gemm::new(&device)?;
        Ok(Self {
            profiler: None,
            device,
            jit: Jit::with_default_cache(),
            gemm,
            pool: None,
            kv: Vec::new(),
            inv_freq_dev: None,
            act_shape: None,
            workspace: None,
            step: None,
            logit_vocab: None,
            graphs: Graphs::default(),
            graph_max_batch: 256,
            capturing: None,
            padded: OwnedStep::default(),
            sparse: None,
            bounds: Vec::new(),
        })
    }

    /// Decode batches up to `max_batch` sequences run as CUDA graphs; 0 turns them off.
    pub fn set_graph_max_batch(&mut self, max_batch: usize) {
        if max_batch != self.graph_max_batch {
            self.graphs = Graphs::default();
        }
        self.graph_max_batch = max_batch;
    }

    /// (graphs captured, graph replays) so far.
    pub fn graph_stats(&self) -> (usize, u64) {
        (self.graphs.captured, self.graphs.replayed)
    }

    /// Allocates the workspace for steps of up to `max_tokens` tokens and `max_seqs`
    /// sequences, so that the memory left for the KV pool is known. Returns its bytes.
    pub fn reserve_workspace(
        &mut self,
        cfg: &ModelConfig,
        max_tokens: usize,
        max_seqs: usize,
    ) -> Result<usize> {
        let shape = act_shape(cfg);
        self.act_shape = Some(shape);
        let target = default_target_blocks(&self.device);
        let kv_indices = max_tokens.max(max_seqs) * 4;
        let decode_work = decode_work_bound(
            max_seqs,
            cfg.num_heads / cfg.num_kv_heads.max(1),
            cfg.num_kv_heads,
            radix_kernels::attention::TileConfig::DECODE,
            target,
        );
        let caps = Caps {
            tokens: max_tokens.max(max_seqs),
            seqs: max_seqs,
            logit_rows: max_seqs,
            work_items: decode_work.max(max_tokens),
            merge_items: max_seqs,
            partial_rows: decode_work,
            kv_indices,
            sparse_entries: self.sparse_entries(kv_indices, cfg.num_kv_heads),
        };
        self.ensure_workspace(&caps)?;
        Ok(self.workspace.as_ref().map_or(0, |w| w.device_bytes()))
    }

    /// Grows the workspace to cover `need`; growing drops the captured graphs, which
    /// point into the old one.
    fn ensure_workspace(&mut self, need: &Caps) -> Result<()> {
        if self.workspace.as_ref().is_some_and(|w| w.caps.covers(need)) {
            return Ok(());
        }
        let shape = self.act_shape.ok_or_else(|| {
            ModelError::Invalid("the workspace needs the model shape: call init_kv first".into())
        })?;
        self.step = None; // its views point into the workspace as it is
        self.graphs = Graphs::default();
        let ws = match self.workspace.take() {
            Some(mut ws) => {
                let caps = ws.caps.grown_to(need);
                ws.grow(&self.device, &shape, caps)?;
                ws
            }
            None => Workspace::new(&self.device, &shape, *need)?,
        };
        tracing::debug!(caps = ?ws.caps, mib = ws.device_bytes() >> 20, "CUDA step workspace");
        self.workspace = Some(ws);
        Ok(())
    }

    /// Sparse table and score entries for a page table of `kv_indices` entries.
    fn sparse_entries(&self, kv_indices: usize, num_kv_heads: usize) -> usize {
        if self.sparse.is_some() { kv_indices * num_kv_heads } else { 0 }
    }

    fn workspace(&mut self) -> Result<&mut Workspace> {
        self.workspace.as_mut().ok_or_else(|| ModelError::Invalid("no step has begun".into()))
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Turns per-op GPU timing on (events around every op; adds a little overhead).
    pub fn set_profiling(&mut self, on: bool) {
        self.profiler = on.then(|| Profiler {
            pending: Vec::new(),
            spare: Vec::new(),
            times: OpTimes::default(),
        });
    }

    /// GPU time per op category since profiling was turned on.
    pub fn op_times(&self) -> Option<OpTimes> {
        self.profiler.as_ref().map(|p| p.times.clone())
    }

    /// Runs `f` between two timing events when profiling (the caller's op is `op`).
    fn timed<T>(&mut self, op: Op, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let Some(mut prof) = self.profiler.take() else { return f(self) };
        let timer = match prof.spare.pop() {
            Some(t) => t,
            None => radix_gpu::GpuTimer::new(&self.device)?,
        };
        timer.start()?;
        let out = f(self);
        timer.record_stop()?;
        prof.pending.push((op, timer));
        self.profiler = Some(prof);
        out
    }

    /// Adds up the events of the ops since the last call (after the stream synced).
    fn collect_times(&mut self) -> Result<()> {
        if let Some(prof) = &mut self.profiler {
            for (op, timer) in prof.pending.drain(..) {
                let ms = timer.elapsed_ms()? as f64;
                let t = &mut prof.times;
                *match op {
                    Op::Gemm => &mut t.gemm_ms,
                    Op::Attention => &mut t.attention_ms,
                    Op::KvAppend => &mut t.kv_append_ms,
                    Op::Norm => &mut t.norm_ms,
                    Op::Other => &mut t.other_ms,
                    Op::Sample => &mut t.sample_ms,
                } += ms;
                prof.spare.push(timer);
            }
        }
        Ok(())
    }

    /// Plans the step, writes its metadata into the workspace (one pinned upload) and
    /// sets up the ops' views of it. `bucket`: pad the attention work to that graph's;
    /// `sparse`: the policy when the step has sparse rows (`StepInput::sparse_rows`).
    fn stage_step(
        &mut self,
        s: &StepInput,
        real_rows: usize,
        bucket: Option<usize>,
        sparse: Option<SparsePolicy>,
    ) -> Result<()> {
        let pool = self.pool()?;
        let (n, batch, rows) = (s.tokens.len(), s.batch_size(), s.logit_rows.len());
        let append_batch = AppendBatch { positions: s.positions, slots: s.slots };
        append_batch.validate(&pool)?;
        let (mut pages, mut filled) = append_batch.touched_pages(pool.page_size);
        if let Some(b) = bucket {
            // The key-bounds launch of a graph is sized at capture: give it the bucket's
            // count always, padding with the scratch page (identical, harmless rewrites),
            // so no replay reruns stale entries or skips real ones.
            let scratch = (pool.num_pages - 1) as i32;
            pages.resize(b.max(pages.len()), scratch);
            filled.resize(b.max(filled.len()), 1);
        }
        let meta = BatchMeta::new(
            s.qo_indptr.to_vec(),
            KvSource::Paged {
                page_size: pool.page_size,
                num_pages: pool.num_pages,
                kv_indptr: s.kv_indptr.to_vec(),
                kv_indices: s.kv_indices.to_vec(),
                kv_last_page_len: s.kv_last_page_len.to_vec(),
                head_tables: false,
            },
            true,
        )?;
        let shape = AttentionShape::new(pool.num_qo_heads, pool.num_kv_heads, pool.head_dim, true);
        let (tiles, mut plan) = plan_batch(&self.device, &shape, &meta, None, None)?;
        let pad = |tiles, plan: &mut radix_kernels::attention::Plan| -> Result<()> {
            if let Some(b) = bucket {
                let bound = decode_work_bound(
                    b,
                    shape.group(),
                    shape.num_kv_heads,
                    tiles,
                    default_target_blocks(&self.device),
                );
                plan.pad_to(bound, b).map_err(ModelError::Invalid)?;
            }
            Ok(())
        };
        pad(tiles, &mut plan)?;
        // Sparse paging: the per-head tables' sizes and their attention plan.
        let sparse_plan = match sparse {
            None => None,
            Some(policy) => Some(SparsePlan::new(&self.device, &pool, &shape, s, policy, pad)?),
        };
        let splan_len = |f: fn(&radix_kernels::attention::Plan) -> usize| {
            sparse_plan.as_ref().map_or(0, |p| f(&p.plan))
        };
        let need = Caps {
            tokens: n,
            seqs: batch,
            logit_rows: rows,
            work_items: plan.work.len().max(splan_len(|p| p.work.len())),
            merge_items: plan.merge.len().max(splan_len(|p| p.merge.len())),
            partial_rows: plan.partial_rows.max(splan_len(|p| p.partial_rows)),
            kv_indices: s.kv_indices.len(),
            sparse_entries: self.sparse_entries(s.kv_indices.len(), pool.num_kv_heads),
        };
        self.ensure_workspace(&need)?;
        let inv_freq = self
            .inv_freq_dev
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("the KV pool is not initialised".into()))?;
        // SAFETY: the step state holding this view is dropped before `init_kv` replaces it.
        let inv_freq = unsafe { inv_freq.view(0, inv_freq.len()) }?;
        let ws = self.workspace.as_mut().expect("ensured above");
        ws.reset_acts();
        let l = ws.layout;
        {
            let h = ws.staging.write()?;
            put(h, l.tokens, &mut s.tokens.iter().map(|&t| t as i32));
            put(h, l.positions, &mut s.positions.iter().copied());
            put(h, l.slots, &mut s.slots.iter().copied());
            put(h, l.logit_rows, &mut s.logit_rows.iter().map(|&r| r as i32));
            put(h, l.qo_indptr, &mut s.qo_indptr.iter().copied());
            put(h, l.kv_indptr, &mut s.kv_indptr.iter().copied());
            put(h, l.kv_last_page_len, &mut s.kv_last_page_len.iter().copied());
            put(h, l.touched_pages, &mut pages.iter().copied());
            put(h, l.touched_filled, &mut filled.iter().copied());
            put(h, l.work, &mut plan.work_words());
            put(h, l.merge, &mut plan.merge_words());
            if let Some(sp) = &sparse_plan {
                sp.stage(h, &l, s);
            }
            put(h, l.kv_indices, &mut s.kv_indices.iter().copied());
        }
        ws.staging.upload_prefix(l.kv_indices + s.kv_indices.len(), &mut ws.meta)?;
        // Dense and sparse layers run one after the other: they share the partials, sized
        // for the larger plan.
        let partial =
            plan.partial_rows.max(splan_len(|p| p.partial_rows)).max(1) * shape.num_qo_heads;
        let v = |off: usize, len: usize| ws.meta_view(off, len);
        let append = AppendInputs {
            positions: v(l.positions, n)?,
            slots: v(l.slots, n)?,
            inv_freq,
            touched_pages: v(l.touched_pages, pages.len())?,
            touched_filled: v(l.touched_filled, pages.len())?,
            num_tokens: n,
            num_touched: pages.len(),
        };
        // SAFETY: as for the metadata views (see `Workspace::meta_view`).
        let (partial_o, partial_lse) = unsafe {
            (ws.partial_o.view(0, partial * shape.head_dim)?, ws.partial_lse.view(0, partial)?)
        };
        let buffers = AttentionBuffers {
            qo_indptr: v(l.qo_indptr, batch + 1)?,
            kv_indptr: v(l.kv_indptr, batch + 1)?,
            kv_indices: v(l.kv_indices, s.kv_indices.len())?,
            kv_last_page_len: v(l.kv_last_page_len, batch)?,
            work: v(l.work, 6 * plan.work.len())?,
            merge: v(l.merge, 4 * plan.merge.len())?,
            partial_o,
            partial_lse,
        };
        let attention =
            AttentionBatch::from_parts(&self.device, shape, meta, tiles, plan, buffers)?;
        let sparse = match sparse_plan {
            None => None,
            Some(sp) => Some(sp.into_step(&self.device, ws, s, partial)?),
        };
        self.step = Some(StepState {
            tokens: v(l.tokens, n)?,
            logit_rows: v(l.logit_rows, rows)?,
            num_logit_rows: rows,
            real_logit_rows: real_rows,
            append,
            attention,
            sparse,
        });
        Ok(())
    }

    /// Layer `layer`'s keys, `[pages, num_kv_heads, page_size, head_dim]` (tests).
    pub fn read_keys(&self, layer: usize) -> Result<Vec<bf16>> {
        let (k, _) = self
            .kv
            .get(layer)
            .ok_or_else(|| ModelError::Invalid(format!("layer {layer} has no KV pool")))?;
        Ok(k.to_vec()?)
    }

    /// Layer `layer`'s key bounds, a `kv_append::bounds` record per (page, kv head)
    /// (tests; sparse paging on).
    pub fn read_key_bounds(&self, layer: usize) -> Result<Vec<u8>> {
        let b = self.bounds.get(layer).ok_or_else(|| {
            ModelError::Invalid(format!("layer {layer} keeps no key bounds (sparse paging off)"))
        })?;
        Ok(b.to_vec()?)
    }

    /// Bytes of KV one page takes over all layers (K and V, bf16).
    pub fn kv_bytes_per_page(cfg: &ModelConfig, page_size: usize) -> usize {
        2 * cfg.num_layers * cfg.num_kv_heads * page_size * cfg.head_dim * 2
    }

    /// As `kv_bytes_per_page`, plus the page's key bounds when sparse paging is on.
    pub fn page_bytes(&self, cfg: &ModelConfig, page_size: usize) -> usize {
        let bounds = cfg.num_layers * cfg.num_kv_heads * bounds::record_bytes(cfg.head_dim);
        Self::kv_bytes_per_page(cfg, page_size) + if self.sparse.is_some() { bounds } else { 0 }
    }

    fn pool(&self) -> Result<PoolShape> {
        self.pool.ok_or_else(|| ModelError::Invalid("the KV pool is not initialised".into()))
    }

    fn step(&self) -> Result<&StepState> {
        self.step.as_ref().ok_or_else(|| ModelError::Invalid("no step has begun".into()))
    }

    fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
        if cond { Ok(()) } else { Err(ModelError::Invalid(msg())) }
    }
}

/// The model sizes the workspace is planned from.
fn act_shape(cfg: &ModelConfig) -> ActShape {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    ActShape {
        // residual, normed, delta (h each); qkv; q and attn; gate|up and mlp (3i): what
        // `LlamaModel::forward` takes per token.
        per_token: 3 * h + cfg.qkv_size() + 2 * cfg.q_size() + 3 * i,
        hidden: h,
        vocab: cfg.vocab_size,
        num_qo_heads: cfg.num_heads,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
    }
}

fn to_bf16(data: &HostData) -> Vec<bf16> {
    match data {
        HostData::BF16(v) => v.clone(),
        HostData::F16(v) => v.iter().map(|x| bf16::from_f32(x.to_f32())).collect(),
        HostData::F32(v) => v.iter().map(|&x| bf16::from_f32(x)).collect(),
    }
}

impl Backend for CudaBackend {
    type Act = GpuAct;
    type Weight = GpuWeight;

    fn name(&self) -> String {
        format!("cuda ({})", self.device.info().name)
    }

    fn upload(&mut self, t: &HostTensor) -> Result<GpuWeight> {
        let (rows, cols) = t.matrix_dims();
        Ok(GpuWeight { buf: self.device.upload(&to_bf16(&t.data))?, rows, cols })
    }

    fn set_sparse(&mut self, policy: Option<SparsePolicy>) -> Result<()> {
        if let Some(p) = &policy {
            p.validate().map_err(ModelError::Invalid)?;
        }
        Self::check(policy.is_none() || self.pool.is_none() || !self.bounds.is_empty(), || {
            "sparse paging must be turned on before init_kv (the pool keeps no key bounds)".into()
        })?;
        self.sparse = policy;
        Ok(())
    }

    fn init_kv(&mut self, cfg: &ModelConfig, num_pages: usize, page_size: usize) -> Result<()> {
        Self::check(matches!(cfg.head_dim, 64 | 128), || {
            format!(
                "the CUDA attention kernels take head_dim 64 or 128, this model has {}",
                cfg.head_dim
            )
        })?;
        // One page past the engine's: the scratch page padding rows of a graph write to.
        let pages = num_pages + 1;
        let per_layer = pages * cfg.num_kv_heads * page_size * cfg.head_dim;
        self.graphs = Graphs::default(); // they point into the old pool
        self.step = None;
        self.kv.clear();
        self.bounds.clear();
        for _ in 0..cfg.num_layers {
            self.kv
                .push((self.device.alloc_zeros(per_layer)?, self.device.alloc_zeros(per_layer)?));
            if self.sparse.is_some() {
                let bytes = pages * cfg.num_kv_heads * bounds::record_bytes(cfg.head_dim);
                self.bounds.push(self.device.alloc_zeros(bytes)?);
            }
        }
        self.pool = Some(PoolShape {
            num_pages: pages,
            page_size,
            num_qo_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        });
        self.inv_freq_dev = Some(self.device.upload(&cfg.rope.inv_freq())?);
        self.act_shape = Some(act_shape(cfg));
        if let Some(caps) = self.workspace.as_ref().map(|w| w.caps) {
            // A page table as large as the pool, so that decode graphs captured now are
            // not dropped when contexts grow.
            let kv_indices = pages + caps.seqs;
            let sparse_entries = self.sparse_entries(kv_indices, cfg.num_kv_heads);
            self.ensure_workspace(&Caps { kv_indices, sparse_entries, ..caps })?;
        }
        Ok(())
    }

    fn begin_step(&mut self, s: &StepInput) -> Result<StepPlan> {
        let pool = self.pool()?;
        let n = s.tokens.len();
        Self::check(s.positions.len() == n && s.slots.len() == n, || {
            "step: positions/slots do not match tokens".into()
        })?;
        Self::check(s.logit_rows.iter().all(|&r| (r as usize) < n), || {
            "a logit row is past the step's tokens".into()
        })?;
        self.step = None;
        self.logit_vocab = None;
        let bucket = if self.profiler.is_none() && is_decode_step(s) {
            bucket_for(n, self.graph_max_batch)
        } else {
            None
        };
        // Sparse steps launch more kernels: they have graphs of their own. (Padding rows
        // stay dense, so the padded step has the same answer.)
        let policy = if s.sparse_rows(self.sparse.as_ref())? { self.sparse } else { None };
        let sparse = policy.is_some();
        if let Some(b) = bucket
            && matches!(self.graphs.buckets.get(&(b, sparse)), Some(BucketGraph::Failed))
        {
            return self
                .stage_step(s, s.logit_rows.len(), None, policy)
                .map(|()| StepPlan::eager(s));
        }
        let mut padded = std::mem::take(&mut self.padded);
        let staged = match bucket {
            Some(b) => {
                let scratch = (pool.num_pages - 1) as i32;
                pad_step(&mut padded, s, b, scratch, pool.page_size);
                self.stage_step(&padded.as_input(), s.logit_rows.len(), Some(b), policy)
            }
            None => self.stage_step(s, s.logit_rows.len(), None, policy),
        };
        self.padded = padded;
        staged?;
        let Some(b) = bucket else { return Ok(StepPlan::eager(s)) };
        let plan = |mode| StepPlan { mode, tokens: b, logit_rows: b };
        match self.graphs.buckets.get(&(b, sparse)) {
            None => {
                self.graphs.buckets.insert((b, sparse), BucketGraph::Warm);
                Ok(plan(StepMode::Eager))
            }
            Some(BucketGraph::Warm) => {
                graph::begin_capture(&self.device)?;
                self.capturing = Some((b, sparse));
                Ok(plan(StepMode::Record))
            }
            Some(BucketGraph::Ready(g)) => {
                g.launch()?;
                self.graphs.replayed += 1;
                let vocab = self.act_shape.map_or(0, |a| a.vocab);
                self.logit_vocab = Some(vocab);
                Ok(plan(StepMode::Replayed))
            }
            Some(BucketGraph::Failed) => unreachable!("handled above"),
        }
    }

    fn warm_up_steps(&self) -> Vec<OwnedStep> {
        let Some(pool) = self.pool else { return Vec::new() };
        let scratch = (pool.num_pages - 1) as i32;
        // A prefill first (its attention tiles and the sampler compile here, not in the
        // first request's step), then every decode bucket's graph.
        let prefill = scratch_prefill(256, scratch, pool.page_size);
        std::iter::once(prefill)
            .chain(
                all_buckets(self.graph_max_batch)
                    .into_iter()
                    .filter(|&b| !self.graphs.buckets.contains_key(&(b, false)))
                    .map(|b| scratch_step(b, scratch, pool.page_size)),
            )
            .collect()
    }

    fn end_step(&mut self) -> Result<()> {
        let Some(b) = self.capturing.take() else { return Ok(()) };
        match graph::end_capture(&self.device).and_then(|g| g.launch().map(|()| g)) {
            Ok(g) => {
                self.graphs.buckets.insert(b, BucketGraph::Ready(g));
                self.graphs.captured += 1;
                tracing::debug!(bucket = b.0, sparse = b.1, "captured a decode CUDA graph");
                Ok(())
            }
            Err(e) => {
                // The recorded work never ran; this bucket runs eagerly from now on.
                self.graphs.buckets.insert(b, BucketGraph::Failed);
                Err(e.into())
            }
        }
    }

    fn act(&mut self, rows: usize, cols: usize) -> Result<GpuAct> {
        Ok(GpuAct { buf: self.workspace()?.take_act(rows * cols)?, rows, cols })
    }

    fn embed(&mut self, table: &GpuWeight, out: &mut GpuAct) -> Result<()> {
        Self::check(out.cols == table.cols, || "embed: shape mismatch".into())?;
        self.timed(Op::Other, |b| {
            let st = b.step()?;
            Ok(ops::embed(&b.jit, &table.buf, &st.tokens, out.rows, out.cols, &mut out.buf)?)
        })
    }

    fn rms_norm(&mut self, x: &GpuAct, w: &GpuWeight, eps: f32, out: &mut GpuAct) -> Result<()> {
        Self::check(x.rows == out.rows && x.cols == out.cols, || {
            "rms_norm: shape mismatch".into()
        })?;
        self.timed(Op::Norm, |b| {
            Ok(ops::rms_norm(&b.jit, &x.buf, &w.buf, x.rows, x.cols, eps, &mut out.buf)?)
        })
    }

    fn add_rms_norm(
        &mut self,
        residual: &mut GpuAct,
        delta: &GpuAct,
        w: &GpuWeight,
        eps: f32,
        out: &mut GpuAct,
    ) -> Result<()> {
        Self::check(residual.rows == delta.rows && residual.cols == delta.cols, || {
            "add_rms_norm: shape mismatch".into()
        })?;
        let (rows, cols) = (residual.rows, residual.cols);
        self.timed(Op::Norm, |b| {
            Ok(ops::add_rms_norm(
                &b.jit,
                &mut residual.buf,
                &delta.buf,
                &w.buf,
                rows,
                cols,
                eps,
                &mut out.buf,
            )?)
        })
    }

    fn linear(
        &mut self,
        x: &GpuAct,
        w: &GpuWeight,
        bias: Option<&GpuWeight>,
        out: &mut GpuAct,
    ) -> Result<()> {
        Self::check(x.cols == w.cols && out.rows == x.rows && out.cols == w.rows, || {
            format!(
                "linear: x [{}, {}] · w [{}, {}]ᵀ into [{}, {}]",
                x.rows, x.cols, w.rows, w.cols, out.rows, out.cols
            )
        })?;
        if x.rows == 0 {
            return Ok(());
        }
        self.timed(Op::Gemm, |b| {
            let bias = bias.map(|w| &w.buf);
            Ok(b.gemm.matmul::<bf16, bf16>(
                x.rows,
                w.rows,
                w.cols,
                &x.buf,
                &w.buf,
                BLayout::NK,
                bias,
                0.0,
                &mut out.buf,
            )?)
        })
    }

    fn rope_append(&mut self, layer: usize, qkv: &GpuAct, q: &mut GpuAct) -> Result<()> {
        let pool = self.pool()?;
        self.timed(Op::KvAppend, |b| {
            let st =
                b.step.as_ref().ok_or_else(|| ModelError::Invalid("no step has begun".into()))?;
            let (k, v) =
                b.kv.get_mut(layer)
                    .ok_or_else(|| ModelError::Invalid(format!("layer {layer} has no KV pool")))?;
            let bounds = b.bounds.get_mut(layer);
            Ok(kv_append::append(&b.jit, &pool, &st.append, &qkv.buf, &mut q.buf, k, v, bounds)?)
        })
    }

    fn attention(&mut self, layer: usize, q: &GpuAct, out: &mut GpuAct) -> Result<()> {
        self.timed(Op::Attention, |b| {
            let Self { step, kv, bounds, jit, .. } = b;
            let st =
                step.as_mut().ok_or_else(|| ModelError::Invalid("no step has begun".into()))?;
            let (k, v) = kv
                .get(layer)
                .ok_or_else(|| ModelError::Invalid(format!("layer {layer} has no KV pool")))?;
            match &mut st.sparse {
                Some(sp) if sp.policy.layer_is_sparse(layer) => {
                    let bounds = bounds.get(layer).ok_or_else(|| {
                        ModelError::Invalid(format!("layer {layer} has no key bounds"))
                    })?;
                    sparse_select::select(
                        jit,
                        &sp.shape,
                        &sp.sizes,
                        &q.buf,
                        bounds,
                        &mut sp.select,
                    )?;
                    Ok(sp.attention.run(jit, &q.buf, k, v, &mut out.buf, None)?)
                }
                _ => Ok(st.attention.run(jit, &q.buf, k, v, &mut out.buf, None)?),
            }
        })
    }

    fn silu_mul(&mut self, gate_up: &GpuAct, out: &mut GpuAct) -> Result<()> {
        Self::check(gate_up.cols == 2 * out.cols && gate_up.rows == out.rows, || {
            "silu_mul: shape mismatch".into()
        })?;
        self.timed(Op::Other, |b| {
            Ok(ops::silu_mul(&b.jit, &gate_up.buf, out.rows, out.cols, &mut out.buf)?)
        })
    }

    fn gather_logit_rows(&mut self, x: &GpuAct, out: &mut GpuAct) -> Result<()> {
        Self::check(out.rows == self.step()?.num_logit_rows && out.cols == x.cols, || {
            "gather: shape mismatch".into()
        })?;
        self.timed(Op::Other, |b| {
            let st = b.step()?;
            Ok(ops::gather_rows(&b.jit, &x.buf, &st.logit_rows, out.rows, x.cols, &mut out.buf)?)
        })
    }

    fn logits(&mut self, x: &GpuAct, head: &GpuWeight) -> Result<()> {
        Self::check(x.cols == head.cols, || "logits: shape mismatch".into())?;
        let ws = self.workspace()?;
        let len = x.rows * head.rows;
        Self::check(len <= ws.logits.len(), || {
            format!("logits of {} rows do not fit the workspace", x.rows)
        })?;
        // SAFETY: a view of the workspace used only within this call.
        let mut logits = unsafe { ws.logits.view(0, len) }?;
        self.timed(Op::Gemm, |b| {
            Ok(b.gemm.matmul::<bf16, f32>(
                x.rows,
                head.rows,
                head.cols,
                &x.buf,
                &head.buf,
                BLayout::NK,
                None,
                0.0,
                &mut logits,
            )?)
        })?;
        self.logit_vocab = Some(head.rows);
        Ok(())
    }

    fn sample(&mut self, requests: &[SampleRequest]) -> Result<Vec<Sampled>> {
        let vocab =
            self.logit_vocab.ok_or_else(|| ModelError::Invalid("sample before logits".into()))?;
        let rows = self.step()?.real_logit_rows;
        Self::check(requests.len() == rows, || {
            format!("sample: {} requests for {rows} logits rows", requests.len())
        })?;
        let ws = self.workspace.as_mut().expect("a step has begun");
        {
            let staged = ws.sample_staging.write()?;
            let words = requests.iter().flat_map(|r| {
                let p = r.params;
                SampleRow {
                    temperature: if p.is_greedy() { 0.0 } else { p.temperature },
                    top_p: p.top_p,
                    min_p: p.min_p,
                    top_k: p.top_k.min(i32::MAX as usize) as i32,
                    seed: r.seed,
                    index: r.index,
                }
                .words()
            });
            for (d, w) in staged.iter_mut().zip(words) {
                *d = w;
            }
        }
        ws.sample_staging.upload_prefix(rows * 8, &mut ws.sample_params)?;
        // SAFETY: views of the workspace used only within this call.
        let (logits, params, mut tokens, mut logprobs) = unsafe {
            (
                ws.logits.view(0, rows * vocab)?,
                ws.sample_params.view(0, rows * 8)?,
                ws.sampled_tokens.view(0, rows)?,
                ws.sampled_logprobs.view(0, rows)?,
            )
        };
        self.timed(Op::Sample, |b| {
            Ok(ops::sample_rows(&b.jit, &logits, &params, rows, vocab, &mut tokens, &mut logprobs)?)
        })?;
        let tokens = tokens.to_vec()?;
        let logprobs = logprobs.to_vec()?;
        self.collect_times()?;
        let mut out: Vec<Sampled> = tokens
            .iter()
            .zip(&logprobs)
            .map(|(&t, &l)| Sampled { token: t as u32, logprob: l })
            .collect();
        // Penalties need the request's token counts: those rows are sampled on the host.
        if requests.iter().any(|r| r.params.has_penalties()) {
            let host = logits.to_vec()?;
            for (i, r) in requests.iter().enumerate().filter(|(_, r)| r.params.has_penalties()) {
                let mut row = host[i * vocab..(i + 1) * vocab].to_vec();
                out[i] = sampling::sample(&mut row, r);
            }
        }
        Ok(out)
    }

    fn read_logits(&mut self) -> Result<Vec<f32>> {
        let Some(vocab) = self.logit_vocab else { return Ok(Vec::new()) };
        let rows = self.step()?.real_logit_rows;
        let ws = self.workspace()?;
        // SAFETY: a view of the workspace used only within this call.
        Ok(unsafe { ws.logits.view(0, rows * vocab) }?.to_vec()?)
    }
}
