//! The CUDA backend's step workspace: memory allocated once and reused by every step.
//!
//! - Activations are carved out of one arena by a bump pointer that `begin_step` resets,
//!   so a step of the same shape gets the same addresses every time: what lets a CUDA
//!   graph captured once replay over them.
//! - Step metadata (token ids, positions, slots, the CSR page table, the attention work
//!   list, ...) goes into a pinned host buffer in a fixed layout and reaches the device
//!   in one asynchronous copy.
//! - Logits, the split-KV partials and the sampler's outputs have fixed buffers too.
//!
//! Capacities grow when a step needs more (which invalidates captured graphs); the
//! memory plan reserves the largest step up front (`CudaBackend::plan_memory`).

use half::bf16;
use radix_gpu::{Device, DeviceBuffer, PinnedStaging};
use radix_kernels::attention::{AttentionBuffers, WorkList};

use crate::error::{ModelError, Result};

/// Elements the arena aligns every activation to (512 bytes of bf16): vector loads and
/// cuBLASLt's preferred alignment.
const ACT_ALIGN: usize = 256;
/// Activations the forward takes per step besides the per-token ones (the gathered
/// logit rows), for the alignment slack.
const ACTS_PER_STEP: usize = 9;

/// How much one step may hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caps {
    pub tokens: usize,
    pub seqs: usize,
    pub logit_rows: usize,
    pub work_items: usize,
    pub merge_items: usize,
    pub partial_rows: usize,
    pub kv_indices: usize,
    /// Sparse paging: entries of the per-(sequence, kv head) page tables and of the page
    /// scores (`kv_indices × num_kv_heads`); 0 when sparse paging is off.
    pub sparse_entries: usize,
}

impl Caps {
    /// True when every capacity of `self` covers `need`.
    pub fn covers(&self, need: &Caps) -> bool {
        self.tokens >= need.tokens
            && self.seqs >= need.seqs
            && self.logit_rows >= need.logit_rows
            && self.work_items >= need.work_items
            && self.merge_items >= need.merge_items
            && self.partial_rows >= need.partial_rows
            && self.kv_indices >= need.kv_indices
            && self.sparse_entries >= need.sparse_entries
    }

    /// The larger of each; the page table and the work list get headroom, since they
    /// grow step by step as contexts lengthen.
    pub fn grown_to(&self, need: &Caps) -> Caps {
        let grow = |have: usize, want: usize| if want > have { want + want / 2 } else { have };
        Caps {
            tokens: self.tokens.max(need.tokens),
            seqs: self.seqs.max(need.seqs),
            logit_rows: self.logit_rows.max(need.logit_rows),
            work_items: grow(self.work_items, need.work_items),
            merge_items: self.merge_items.max(need.merge_items),
            partial_rows: grow(self.partial_rows, need.partial_rows),
            kv_indices: grow(self.kv_indices, need.kv_indices),
            sparse_entries: grow(self.sparse_entries, need.sparse_entries),
        }
    }
}

/// Offsets (in i32 words) of each metadata array; each starts on a 16-byte boundary.
/// The page table comes last so that one copy of a prefix uploads all that is used.
#[derive(Clone, Copy, Debug, Default)]
pub struct MetaLayout {
    pub tokens: usize,
    pub positions: usize,
    pub slots: usize,
    pub logit_rows: usize,
    pub qo_indptr: usize,
    pub kv_indptr: usize,
    pub kv_last_page_len: usize,
    pub touched_pages: usize,
    pub touched_filled: usize,
    pub work: usize,
    pub merge: usize,
    /// Sparse paging: pages kept per sequence, the per-head tables' offsets and the
    /// sparse attention plan (the tables themselves are chosen on the device).
    pub keep: usize,
    pub sparse_indptr: usize,
    pub sparse_work: usize,
    pub sparse_merge: usize,
    pub kv_indices: usize,
    pub total: usize,
}

impl MetaLayout {
    fn new(c: &Caps, num_kv_heads: usize) -> Self {
        let sparse = c.sparse_entries > 0;
        let mut at = 0usize;
        let mut take = |len: usize| {
            let off = at;
            at += len.max(1).next_multiple_of(4);
            off
        };
        let mut l = MetaLayout {
            tokens: take(c.tokens),
            positions: take(c.tokens),
            slots: take(c.tokens),
            logit_rows: take(c.logit_rows),
            qo_indptr: take(c.seqs + 1),
            kv_indptr: take(c.seqs + 1),
            kv_last_page_len: take(c.seqs),
            touched_pages: take(c.tokens),
            touched_filled: take(c.tokens),
            work: take(6 * c.work_items),
            merge: take(4 * c.merge_items),
            keep: take(if sparse { c.seqs } else { 0 }),
            sparse_indptr: take(if sparse { c.seqs * num_kv_heads + 1 } else { 0 }),
            sparse_work: take(if sparse { 6 * c.work_items } else { 0 }),
            sparse_merge: take(if sparse { 4 * c.merge_items } else { 0 }),
            kv_indices: take(c.kv_indices),
            total: 0,
        };
        l.total = at;
        l
    }
}

/// Writes `src` into the staging words from `off` on (the layout sized the region).
pub fn put(h: &mut [i32], off: usize, src: &mut dyn Iterator<Item = i32>) {
    for (d, v) in h[off..].iter_mut().zip(src) {
        *d = v;
    }
}

/// The model sizes the workspace depends on.
#[derive(Clone, Copy, Debug)]
pub struct ActShape {
    /// Elements of the activations one token needs in one forward.
    pub per_token: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub num_qo_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// e4m3 bytes per token of the FP8 GEMMs' quantized activations (the widest FP8
    /// weight's K); 0 without FP8 weights.
    pub fp8_cols: usize,
}

pub struct Workspace {
    pub shape: ActShape,
    pub caps: Caps,
    pub layout: MetaLayout,
    acts: DeviceBuffer<bf16>,
    act_used: usize,
    pub meta: DeviceBuffer<i32>,
    pub staging: PinnedStaging<i32>,
    pub partial_o: DeviceBuffer<f32>,
    pub partial_lse: DeviceBuffer<f32>,
    pub logits: DeviceBuffer<f32>,
    pub sample_params: DeviceBuffer<u32>,
    pub sample_staging: PinnedStaging<u32>,
    pub sampled_tokens: DeviceBuffer<i32>,
    pub sampled_logprobs: DeviceBuffer<f32>,
    /// Sparse paging: the per-head page tables the selection writes, and page scores.
    pub sparse_indices: DeviceBuffer<i32>,
    pub page_scores: DeviceBuffer<f32>,
    /// FP8 linear layers: one layer's activations quantized per token, and their scales
    /// (reused by every FP8 GEMM of the step, one after another on the stream).
    fp8_q: DeviceBuffer<u8>,
    fp8_scales: DeviceBuffer<f32>,
    /// The skinny FP8 GEMM's split-K partial sums and counters (zero between launches).
    fp8_partial: DeviceBuffer<f32>,
    fp8_counters: DeviceBuffer<i32>,
}

/// Elements of each workspace buffer for some capacities.
struct Sizes {
    acts: usize,
    meta: usize,
    partial_o: usize,
    partial_lse: usize,
    logits: usize,
    /// Sampler parameter words (`SampleRow::WORDS` per row).
    sample_words: usize,
    rows: usize,
    sparse: usize,
    fp8_q: usize,
    fp8_scales: usize,
    fp8_partial: usize,
    fp8_counters: usize,
}

/// Split-K partial sums of the skinny FP8 GEMM: 8 MiB, enough for Llama-3-8B's and 70B's
/// layers at 64 rows and the splits that fill an H200 (the launcher splits less when a
/// product's partial sums would not fit).
const FP8_PARTIAL_FLOATS: usize = 1 << 21;
/// Its counters: one per 64 weight rows, up to 262,144 rows.
const FP8_COUNTERS: usize = 4096;

impl Sizes {
    fn of(shape: &ActShape, caps: &Caps, layout: &MetaLayout) -> Self {
        let partial = caps.partial_rows.max(1) * shape.num_qo_heads;
        let rows = caps.logit_rows.max(1);
        Sizes {
            acts: caps.tokens * shape.per_token
                + caps.logit_rows * shape.hidden
                + ACTS_PER_STEP * ACT_ALIGN,
            meta: layout.total,
            partial_o: partial * shape.head_dim,
            partial_lse: partial,
            logits: rows * shape.vocab,
            sample_words: rows * radix_kernels::ops::SampleRow::WORDS,
            rows,
            sparse: caps.sparse_entries.max(1),
            fp8_q: (caps.tokens * shape.fp8_cols).max(1),
            fp8_scales: caps.tokens.max(1),
            fp8_partial: if shape.fp8_cols > 0 { FP8_PARTIAL_FLOATS } else { 1 },
            fp8_counters: if shape.fp8_cols > 0 { FP8_COUNTERS } else { 1 },
        }
    }
}

/// Replaces `buf` by a buffer of `len` elements if it holds fewer.
fn fit<T: radix_gpu::Element>(
    device: &Device,
    buf: &mut DeviceBuffer<T>,
    len: usize,
) -> Result<()> {
    if buf.len() < len {
        *buf = device.alloc(len)?;
    }
    Ok(())
}

impl Workspace {
    pub fn new(device: &Device, shape: &ActShape, caps: Caps) -> Result<Self> {
        let layout = MetaLayout::new(&caps, shape.num_kv_heads);
        let n = Sizes::of(shape, &caps, &layout);
        Ok(Self {
            shape: *shape,
            caps,
            layout,
            acts: device.alloc(n.acts)?,
            act_used: 0,
            meta: device.alloc(n.meta)?,
            staging: PinnedStaging::new(device, n.meta)?,
            partial_o: device.alloc(n.partial_o)?,
            partial_lse: device.alloc(n.partial_lse)?,
            logits: device.alloc(n.logits)?,
            sample_params: device.alloc(n.sample_words)?,
            sample_staging: PinnedStaging::new(device, n.sample_words)?,
            sampled_tokens: device.alloc(n.rows)?,
            sampled_logprobs: device.alloc(n.rows)?,
            sparse_indices: device.alloc(n.sparse)?,
            page_scores: device.alloc(n.sparse)?,
            fp8_q: device.alloc(n.fp8_q)?,
            fp8_scales: device.alloc(n.fp8_scales)?,
            fp8_partial: device.alloc(n.fp8_partial)?,
            fp8_counters: device.alloc_zeros(n.fp8_counters)?,
        })
    }

    /// Raises the capacities to `caps`, reallocating only the buffers that must grow (a
    /// longer page table does not move the activation arena). The metadata layout
    /// changes, so views and graphs made before are stale.
    pub fn grow(&mut self, device: &Device, caps: Caps) -> Result<()> {
        let layout = MetaLayout::new(&caps, self.shape.num_kv_heads);
        let n = Sizes::of(&self.shape, &caps, &layout);
        fit(device, &mut self.acts, n.acts)?;
        fit(device, &mut self.meta, n.meta)?;
        if self.staging.len() < n.meta {
            self.staging = PinnedStaging::new(device, n.meta)?;
        }
        fit(device, &mut self.partial_o, n.partial_o)?;
        fit(device, &mut self.partial_lse, n.partial_lse)?;
        fit(device, &mut self.logits, n.logits)?;
        fit(device, &mut self.sample_params, n.sample_words)?;
        if self.sample_staging.len() < n.sample_words {
            self.sample_staging = PinnedStaging::new(device, n.sample_words)?;
        }
        fit(device, &mut self.sampled_tokens, n.rows)?;
        fit(device, &mut self.sampled_logprobs, n.rows)?;
        fit(device, &mut self.sparse_indices, n.sparse)?;
        fit(device, &mut self.page_scores, n.sparse)?;
        fit(device, &mut self.fp8_q, n.fp8_q)?;
        fit(device, &mut self.fp8_scales, n.fp8_scales)?;
        fit(device, &mut self.fp8_partial, n.fp8_partial)?;
        if self.fp8_counters.len() < n.fp8_counters {
            self.fp8_counters = device.alloc_zeros(n.fp8_counters)?;
        }
        self.caps = caps;
        self.layout = layout;
        self.act_used = 0;
        Ok(())
    }

    /// Bytes of device memory the workspace holds.
    pub fn device_bytes(&self) -> usize {
        self.acts.num_bytes()
            + self.meta.num_bytes()
            + self.partial_o.num_bytes()
            + self.partial_lse.num_bytes()
            + self.logits.num_bytes()
            + self.sample_params.num_bytes()
            + self.sampled_tokens.num_bytes()
            + self.sampled_logprobs.num_bytes()
            + self.sparse_indices.num_bytes()
            + self.page_scores.num_bytes()
            + self.fp8_q.num_bytes()
            + self.fp8_scales.num_bytes()
            + self.fp8_partial.num_bytes()
            + self.fp8_counters.num_bytes()
    }

    /// Room for `rows` tokens of `cols` e4m3 activations and their scales.
    pub fn fp8_acts(
        &self,
        rows: usize,
        cols: usize,
    ) -> Result<(DeviceBuffer<u8>, DeviceBuffer<f32>)> {
        if rows * cols > self.fp8_q.len() || rows > self.fp8_scales.len() {
            return Err(ModelError::Invalid(format!(
                "FP8 activations of [{rows}, {cols}] do not fit the workspace ({} bytes for \
                 {} rows)",
                self.fp8_q.len(),
                self.fp8_scales.len()
            )));
        }
        // SAFETY: as for the metadata views (see `meta_view`).
        Ok(unsafe { (self.fp8_q.view(0, rows * cols)?, self.fp8_scales.view(0, rows)?) })
    }

    /// The skinny FP8 GEMM's scratch.
    pub fn fp8_skinny_scratch(&mut self) -> radix_kernels::fp8::skinny::SkinnyScratch<'_> {
        radix_kernels::fp8::skinny::SkinnyScratch {
            partial: &mut self.fp8_partial,
            counters: &mut self.fp8_counters,
        }
    }

    /// Frees the activations of the previous step.
    pub fn reset_acts(&mut self) {
        self.act_used = 0;
    }

    /// The next `len` activation elements.
    pub fn take_act(&mut self, len: usize) -> Result<DeviceBuffer<bf16>> {
        let len = len.max(1);
        if self.act_used + len > self.acts.len() {
            return Err(ModelError::Invalid(format!(
                "activation workspace exhausted: {} + {len} elements of {} (a step larger than \
                 the workspace was sized for)",
                self.act_used,
                self.acts.len()
            )));
        }
        // SAFETY: every activation is dropped before the next `begin_step`, the only place
        // the arena is replaced (and a replaced arena is freed in stream order).
        let view = unsafe { self.acts.view(self.act_used, len) }?;
        self.act_used += len.next_multiple_of(ACT_ALIGN);
        Ok(view)
    }

    /// A view of `len` metadata words at `offset`.
    pub fn meta_view(&self, offset: usize, len: usize) -> Result<DeviceBuffer<i32>> {
        // SAFETY: views of the metadata live in the step state, which `begin_step` drops
        // before it replaces the workspace.
        Ok(unsafe { self.meta.view(offset, len) }?)
    }

    /// The split-KV partials shared by the step's dense and sparse layers: `rows` rows of
    /// every query head.
    pub fn partials(&self, rows: usize) -> Result<(DeviceBuffer<f32>, DeviceBuffer<f32>)> {
        let n = rows.max(1) * self.shape.num_qo_heads;
        // SAFETY: as for the metadata views (see `meta_view`).
        Ok(unsafe {
            (self.partial_o.view(0, n * self.shape.head_dim)?, self.partial_lse.view(0, n)?)
        })
    }

    /// The device arrays of one attention batch of `batch` sequences: the queries' and
    /// the last pages' offsets of the step, the page table `table`, and the work list
    /// `list` staged at `at` (its work and merge words), over the shared partials of
    /// `partial_rows` rows. The dense and the sparse layers differ only in table and list.
    pub fn attention_buffers(
        &self,
        batch: usize,
        table: PageTableView,
        list: &WorkList,
        at: WorkListAt,
        partial_rows: usize,
    ) -> Result<AttentionBuffers> {
        let l = &self.layout;
        let (partial_o, partial_lse) = self.partials(partial_rows)?;
        Ok(AttentionBuffers {
            qo_indptr: self.meta_view(l.qo_indptr, batch + 1)?,
            kv_indptr: self.meta_view(table.indptr, table.rows + 1)?,
            kv_indices: table.indices,
            kv_last_page_len: self.meta_view(l.kv_last_page_len, batch)?,
            work: self.meta_view(at.work, 6 * list.work.len())?,
            merge: self.meta_view(at.merge, 4 * list.merge.len())?,
            partial_o,
            partial_lse,
        })
    }
}

/// A page table an attention batch reads: its offsets (`rows + 1` words of the metadata
/// at `indptr`) and its page ids.
pub struct PageTableView {
    pub indptr: usize,
    pub rows: usize,
    pub indices: DeviceBuffer<i32>,
}

/// Where a work list's words sit in the metadata.
#[derive(Clone, Copy)]
pub struct WorkListAt {
    pub work: usize,
    pub merge: usize,
}
