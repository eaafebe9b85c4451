//! One step's metadata, from the host to the ops.
//!
//! `StepMeta::new` plans the step on the host alone: the pages whose key bounds the
//! appends refresh, the attention work list (split-KV), and with sparse rows the per-head
//! tables' sizes and their work list. Its `caps` tell the backend how large the workspace
//! must be; `stage` then writes everything into the pinned staging buffer in the
//! workspace's layout, uploads it in one copy, and returns the ops' views of it
//! (`StepViews`). A step padded to a CUDA-graph bucket pads its work lists to the
//! bucket's bound, so every replay launches the same grids.

use radix_gpu::{Device, DeviceBuffer};
use radix_kernels::attention::{
    AttentionBatch, AttentionShape, BatchMeta, KvSource, TileConfig, WorkList, decode_work_bound,
    default_target_blocks, plan_batch,
};
use radix_kernels::kv_append::{AppendBatch, AppendInputs, PoolShape};
use radix_kv::SparsePolicy;

use super::kv_pool::KvPool;
use super::sparse::{SparseStep, SparseTables};
use super::workspace::{Caps, PageTableView, WorkListAt, Workspace, put};
use crate::backend::Step;
use crate::error::{ModelError, Result};

/// The ops' view of one staged step (views of the workspace, valid until the next
/// `begin_step`, which drops them before the workspace can change).
pub(super) struct StepViews {
    pub tokens: DeviceBuffer<i32>,
    pub logit_rows: DeviceBuffer<i32>,
    /// Logit rows computed (padding included) and those the caller asked for.
    pub num_logit_rows: usize,
    pub real_logit_rows: usize,
    pub append: AppendInputs,
    pub attention: AttentionBatch,
    /// The sparse layers' selection and attention, when a sequence of the step is sparse.
    pub sparse: Option<SparseStep>,
    /// Vocab of this step's logits in the workspace, once they exist (`logits`, or the
    /// replayed graph that made them).
    pub logit_vocab: Option<usize>,
}

/// One step's metadata as the host plans it, before upload.
pub(super) struct StepMeta {
    /// Pages the appends touch and how far each is filled afterwards (key bounds).
    touched: Vec<i32>,
    filled: Vec<i32>,
    shape: AttentionShape,
    meta: BatchMeta,
    tiles: TileConfig,
    work: WorkList,
    sparse: Option<SparseTables>,
}

impl StepMeta {
    /// Plans step `s` over `pool`. `bucket`: the step is padded to that CUDA graph's batch
    /// (pad the work lists to its bound); `sparse`: the policy when the step has sparse
    /// rows (`Step::sparse_rows`); `kv_fp8`: the pool holds e4m3 bytes.
    pub fn new(
        device: &Device,
        pool: &PoolShape,
        kv_fp8: bool,
        s: &Step,
        bucket: Option<usize>,
        sparse: Option<SparsePolicy>,
    ) -> Result<Self> {
        let append = AppendBatch { positions: &s.positions, slots: &s.slots };
        append.validate(pool)?;
        let (mut touched, mut filled) = append.touched_pages(pool.page_size());
        if let Some(b) = bucket {
            // The key-bounds launch of a graph is sized at capture: give it the bucket's
            // count always, padding with the scratch page (identical, harmless rewrites),
            // so no replay reruns stale entries or skips real ones.
            let scratch = (pool.num_pages() - 1) as i32;
            touched.resize(b.max(touched.len()), scratch);
            filled.resize(b.max(filled.len()), 1);
        }
        let meta = BatchMeta::new(
            s.qo_indptr.clone(),
            KvSource::Paged {
                page_size: pool.page_size(),
                num_pages: pool.num_pages(),
                kv_indptr: s.kv_indptr.clone(),
                kv_indices: s.kv_indices.clone(),
                kv_last_page_len: s.kv_last_page_len.clone(),
                head_tables: false,
            },
            true,
        )?;
        let shape =
            AttentionShape::new(pool.num_qo_heads(), pool.num_kv_heads(), pool.head_dim(), true)
                .with_fp8_kv(kv_fp8);
        let (tiles, mut work) = plan_batch(device, &shape, &meta, None, None)?;
        let pad = |tiles, list: &mut WorkList| pad_to_bucket(device, &shape, tiles, list, bucket);
        pad(tiles, &mut work)?;
        let sparse = match sparse {
            None => None,
            Some(policy) => Some(SparseTables::new(device, pool, &shape, s, policy, pad)?),
        };
        Ok(Self { touched, filled, shape, meta, tiles, work, sparse })
    }

    /// Rows of split-KV partials the step needs: dense and sparse layers run one after
    /// the other and share them.
    fn partial_rows(&self) -> usize {
        let sparse = self.sparse.as_ref().map_or(0, |t| t.work.partial_rows);
        self.work.partial_rows.max(sparse)
    }

    /// What the workspace must hold for this step; `sparse_entries`: the per-head tables
    /// the pool's sparse paging needs for the step's page table (0 when it is off).
    pub fn caps(&self, s: &Step, sparse_entries: usize) -> Caps {
        let sparse = |f: fn(&WorkList) -> usize| self.sparse.as_ref().map_or(0, |t| f(&t.work));
        Caps {
            tokens: s.num_tokens(),
            seqs: s.batch_size(),
            logit_rows: s.logit_rows.len(),
            work_items: self.work.work.len().max(sparse(|w| w.work.len())),
            merge_items: self.work.merge.len().max(sparse(|w| w.merge.len())),
            partial_rows: self.partial_rows(),
            kv_indices: s.kv_indices.len(),
            sparse_entries,
        }
    }

    /// Writes the step's metadata into the workspace (one pinned upload) and returns the
    /// ops' views of it. `real_rows`: the logit rows the caller asked for (a padded step
    /// computes more). The workspace must cover `caps`.
    pub fn stage(
        self,
        device: &Device,
        ws: &mut Workspace,
        kv: &KvPool,
        s: &Step,
        real_rows: usize,
    ) -> Result<StepViews> {
        let (n, batch, rows) = (s.num_tokens(), s.batch_size(), s.logit_rows.len());
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
            put(h, l.touched_pages, &mut self.touched.iter().copied());
            put(h, l.touched_filled, &mut self.filled.iter().copied());
            put(h, l.work, &mut self.work.work_words());
            put(h, l.merge, &mut self.work.merge_words());
            if let Some(t) = &self.sparse {
                t.stage(h, &l, s);
            }
            put(h, l.kv_indices, &mut s.kv_indices.iter().copied());
        }
        ws.staging.upload_prefix(l.kv_indices + s.kv_indices.len(), &mut ws.meta)?;
        let v = |off: usize, len: usize| ws.meta_view(off, len);
        // SAFETY: the views live in the `StepViews` returned, which the backend drops before
        // `init_kv` replaces the pool.
        let inv_freq = unsafe { kv.inv_freq.view(0, kv.inv_freq.len()) }?;
        let append = AppendInputs {
            positions: v(l.positions, n)?,
            slots: v(l.slots, n)?,
            inv_freq,
            touched_pages: v(l.touched_pages, self.touched.len())?,
            touched_filled: v(l.touched_filled, self.touched.len())?,
            num_tokens: n,
            num_touched: self.touched.len(),
        };
        let partial_rows = self.partial_rows();
        let table = PageTableView {
            indptr: l.kv_indptr,
            rows: batch,
            indices: v(l.kv_indices, s.kv_indices.len())?,
        };
        let at = WorkListAt { work: l.work, merge: l.merge };
        let buffers = ws.attention_buffers(batch, table, &self.work, at, partial_rows)?;
        let attention = AttentionBatch::from_parts(
            device, self.shape, self.meta, self.tiles, self.work, buffers,
        )?;
        let sparse = match self.sparse {
            None => None,
            Some(t) => Some(t.into_step(device, ws, s, partial_rows)?),
        };
        Ok(StepViews {
            tokens: v(l.tokens, n)?,
            logit_rows: v(l.logit_rows, rows)?,
            num_logit_rows: rows,
            real_logit_rows: real_rows,
            append,
            attention,
            sparse,
            logit_vocab: None,
        })
    }
}

/// Pads `list` to the work bound of a graph `bucket` (a no-op without one), so that the
/// graph's launch covers any step it replays.
fn pad_to_bucket(
    device: &Device,
    shape: &AttentionShape,
    tiles: TileConfig,
    list: &mut WorkList,
    bucket: Option<usize>,
) -> Result<()> {
    let Some(b) = bucket else { return Ok(()) };
    let bound = decode_work_bound(
        b,
        shape.group(),
        shape.num_kv_heads,
        tiles,
        default_target_blocks(device),
    );
    list.pad_to(bound).map_err(ModelError::Invalid)
}
