//! Sparse paging on the CUDA backend: the host side of a sparse step's per-(sequence,
//! kv head) page tables, and the device views the sparse layers run over.
//!
//! The host fixes every table's length (`SparsePolicy::pages_to_keep`, through the
//! step's `kv_keep`) and the attention work over them; per sparse layer the device
//! scores the pages and writes the page ids (`radix_kernels::sparse`).

use radix_gpu::Device;
use radix_kernels::attention::{
    AttentionBatch, AttentionShape, BatchMeta, KvSource, TileConfig, WorkList, plan_batch,
};
use radix_kernels::kv_append::PoolShape;
use radix_kernels::sparse::{SelectBuffers, SelectSizes, SparseShape, sparse_meta};
use radix_kv::SparsePolicy;

use super::workspace::{MetaLayout, PageTableView, WorkListAt, Workspace, put};
use crate::backend::Step;
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

/// The host side of a sparse step: its tables' offsets and the attention work over them.
pub(super) struct SparseTables {
    policy: SparsePolicy,
    shape: SparseShape,
    meta: BatchMeta,
    tiles: TileConfig,
    pub work: WorkList,
}

impl SparseTables {
    /// Sizes the tables of step `s` (already validated) under `policy` and lists the
    /// attention work over them; `pad` pads a work list to the step's CUDA graph bucket.
    pub fn new(
        device: &Device,
        pool: &PoolShape,
        attention: &AttentionShape,
        s: &Step,
        policy: SparsePolicy,
        pad: impl Fn(TileConfig, &mut WorkList) -> Result<()>,
    ) -> Result<Self> {
        let shape = SparseShape {
            num_qo_heads: pool.num_qo_heads(),
            num_kv_heads: pool.num_kv_heads(),
            head_dim: pool.head_dim(),
            sink_pages: policy.sink_pages,
            window_pages: policy.window_pages,
        };
        // Page ids are chosen on the device; the host plans from lengths only.
        let meta = sparse_meta(
            &shape,
            &s.qo_indptr,
            &s.kv_indptr,
            &s.kv_last_page_len,
            &s.kv_keep,
            pool.page_size(),
            pool.num_pages(),
        )?;
        let (tiles, mut work) = plan_batch(device, attention, &meta, None, None)?;
        pad(tiles, &mut work)?;
        Ok(Self { policy, shape, meta, tiles, work })
    }

    /// The per-head tables' offsets, `[batch × num_kv_heads + 1]`.
    fn offsets(&self) -> &[i32] {
        match &self.meta.kv {
            KvSource::Paged { kv_indptr, .. } => kv_indptr,
            KvSource::Contiguous { .. } => unreachable!("sparse_meta builds a paged batch"),
        }
    }

    /// Writes the sparse metadata (pages kept, table offsets, the work list) into the
    /// step's pinned staging `h` at layout `l`.
    pub fn stage(&self, h: &mut [i32], l: &MetaLayout, s: &Step) {
        put(h, l.keep, &mut s.kv_keep.iter().copied());
        put(h, l.sparse_indptr, &mut self.offsets().iter().copied());
        put(h, l.sparse_work, &mut self.work.work_words());
        put(h, l.sparse_merge, &mut self.work.merge_words());
    }

    /// The step's sparse layers over the workspace, once its metadata is uploaded.
    /// `partial_rows` rows of split-KV partials are shared with the dense layers.
    pub fn into_step(
        self,
        device: &Device,
        ws: &Workspace,
        s: &Step,
        partial_rows: usize,
    ) -> Result<SparseStep> {
        let (batch, hkv, d) = (s.batch_size(), self.shape.num_kv_heads, self.shape.head_dim);
        let l = ws.layout;
        let v = |off: usize, len: usize| ws.meta_view(off, len);
        let rows_h = batch * hkv;
        let (dense, entries) = (s.kv_indices.len(), *self.offsets().last().unwrap_or(&0) as usize);
        // SAFETY: views of the workspace, which `begin_step` drops (with the step views
        // holding them) before replacing it.
        let (tables, tables_w, scores) = unsafe {
            (
                ws.sparse_indices.view(0, entries.max(1))?,
                ws.sparse_indices.view(0, entries.max(1))?,
                ws.page_scores.view(0, (dense * hkv).max(1))?,
            )
        };
        let table = PageTableView { indptr: l.sparse_indptr, rows: rows_h, indices: tables };
        let at = WorkListAt { work: l.sparse_work, merge: l.sparse_merge };
        let buffers = ws.attention_buffers(batch, table, &self.work, at, partial_rows)?;
        let select = SelectBuffers {
            qo_indptr: v(l.qo_indptr, batch + 1)?,
            kv_indptr: v(l.kv_indptr, batch + 1)?,
            kv_indices: v(l.kv_indices, dense.max(1))?,
            keep: v(l.keep, batch)?,
            out_indptr: v(l.sparse_indptr, rows_h + 1)?,
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
            self.work,
            buffers,
        )?;
        Ok(SparseStep { policy: self.policy, shape: self.shape, sizes, select, attention })
    }
}
