//! Sparse paging on the CUDA backend: the host plan of a sparse step's per-(sequence, kv head)
//! page tables, and the device views the sparse layers run over.
//!
//! The host fixes every table's length (`SparsePolicy::pages_to_keep`, through the
//! step's `kv_keep`) and plans the attention over them; per sparse layer the device
//! scores the pages and writes the page ids (`radix_kernels::sparse`).

use radix_gpu::Device;
use radix_kernels::attention::{
    AttentionBatch, AttentionBuffers, AttentionShape, BatchMeta, KvSource, Plan, TileConfig,
    plan_batch,
};
use radix_kernels::kv_append::PoolShape;
use radix_kernels::sparse::{SelectBuffers, SelectSizes, SparseShape, sparse_meta};
use radix_kv::SparsePolicy;

use super::workspace::{MetaLayout, Workspace, put};
use crate::backend::StepInput;
use crate::error::Result;

/// A step's sparse layers: scores and selection write per-head tables that `attention`
/// (with `head_tables`) then reads.
pub(super) struct SparseStep {
    pub policy: SparsePolicy,
    pub shape: SparseShape,
    pub sizes: SelectSizes,
    pub select: SelectBuffers,
    pub attention: AttentionBatch,
}

/// The host side of a sparse step: its tables' offsets and the attention plan over them.
pub(super) struct SparsePlan {
    policy: SparsePolicy,
    shape: SparseShape,
    meta: BatchMeta,
    tiles: TileConfig,
    pub plan: Plan,
}

impl SparsePlan {
    /// Plans step `s` (already validated) under `policy`; `pad` pads a plan to the
    /// step's CUDA graph bucket.
    pub fn new(
        device: &Device,
        pool: &PoolShape,
        attention: &AttentionShape,
        s: &StepInput,
        policy: SparsePolicy,
        pad: impl Fn(TileConfig, &mut Plan) -> Result<()>,
    ) -> Result<Self> {
        let shape = SparseShape {
            num_qo_heads: pool.num_qo_heads,
            num_kv_heads: pool.num_kv_heads,
            head_dim: pool.head_dim,
            sink_pages: policy.sink_pages,
            window_pages: policy.window_pages,
        };
        // Page ids are chosen on the device; the host plans from lengths only.
        let meta = sparse_meta(
            &shape,
            s.qo_indptr,
            s.kv_indptr,
            s.kv_last_page_len,
            s.kv_keep,
            pool.page_size,
            pool.num_pages,
        )?;
        let (tiles, mut plan) = plan_batch(device, attention, &meta, None, None)?;
        pad(tiles, &mut plan)?;
        Ok(Self { policy, shape, meta, tiles, plan })
    }

    /// The per-head tables' offsets, `[batch × num_kv_heads + 1]`.
    fn offsets(&self) -> &[i32] {
        match &self.meta.kv {
            KvSource::Paged { kv_indptr, .. } => kv_indptr,
            KvSource::Contiguous { .. } => unreachable!("sparse_meta builds a paged batch"),
        }
    }

    /// Writes the sparse metadata (pages kept, table offsets, the plan) into the step's
    /// pinned staging `h` at layout `l`.
    pub fn stage(&self, h: &mut [i32], l: &MetaLayout, s: &StepInput) {
        put(h, l.keep, &mut s.kv_keep.iter().copied());
        put(h, l.sparse_indptr, &mut self.offsets().iter().copied());
        put(h, l.sparse_work, &mut self.plan.work_words());
        put(h, l.sparse_merge, &mut self.plan.merge_words());
    }

    /// The step's sparse layers over the workspace, once its metadata is uploaded.
    /// `partial` rows × heads of split-KV partials are shared with the dense layers.
    pub fn into_step(
        self,
        device: &Device,
        ws: &Workspace,
        s: &StepInput,
        partial: usize,
    ) -> Result<SparseStep> {
        let (batch, hkv, d) = (s.batch_size(), self.shape.num_kv_heads, self.shape.head_dim);
        let l = ws.layout;
        let v = |off: usize, len: usize| ws.meta_view(off, len);
        let rows_h = batch * hkv + 1;
        let (dense, entries) = (s.kv_indices.len(), *self.offsets().last().unwrap_or(&0) as usize);
        // SAFETY: views of the workspace, which `begin_step` drops (with the step state
        // holding them) before replacing it.
        let (partial_o, partial_lse, tables, tables_w, scores) = unsafe {
            (
                ws.partial_o.view(0, partial * d)?,
                ws.partial_lse.view(0, partial)?,
                ws.sparse_indices.view(0, entries.max(1))?,
                ws.sparse_indices.view(0, entries.max(1))?,
                ws.page_scores.view(0, (dense * hkv).max(1))?,
            )
        };
        let buffers = AttentionBuffers {
            qo_indptr: v(l.qo_indptr, batch + 1)?,
            kv_indptr: v(l.sparse_indptr, rows_h)?,
            kv_indices: tables,
            kv_last_page_len: v(l.kv_last_page_len, batch)?,
            work: v(l.sparse_work, 6 * self.plan.work.len())?,
            merge: v(l.sparse_merge, 4 * self.plan.merge.len())?,
            partial_o,
            partial_lse,
        };
        let select = SelectBuffers {
            qo_indptr: v(l.qo_indptr, batch + 1)?,
            kv_indptr: v(l.kv_indptr, batch + 1)?,
            kv_indices: v(l.kv_indices, dense.max(1))?,
            keep: v(l.keep, batch)?,
            out_indptr: v(l.sparse_indptr, rows_h)?,
            out_indices: tables_w,
            scores,
        };
        let sizes = SelectSizes { batch, dense_pages: dense, sparse_entries: entries };
        let attention_shape = AttentionShape::new(self.shape.num_qo_heads, hkv, d, true);
        let attention = AttentionBatch::from_parts(
            device,
            attention_shape,
            self.meta,
            self.tiles,
            self.plan,
            buffers,
        )?;
        Ok(SparseStep { policy: self.policy, shape: self.shape, sizes, select, attention })
    }
}
