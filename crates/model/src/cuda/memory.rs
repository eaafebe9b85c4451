//! The CUDA memory plan, in the order memory is taken: the weights (already loaded), one
//! workspace for the largest step the engine will run, the decode graphs' batch range,
//! then the KV pool from what a fraction of the GPU's memory leaves. One call,
//! `CudaBackend::plan_memory`, makes every decision and reports it.

use radix_kv::KvGeometry;

use radix_kernels::attention::{default_target_blocks, step_work_bound};

use super::graphs::all_buckets;
use super::workspace::{ActShape, Caps, Workspace};
use super::{CudaBackend, Memory, act_shape, sparse_entries};
use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// Headroom left for CUDA graphs, module images and the driver's own allocations.
const RESERVE_BYTES: usize = 512 << 20;

/// What the engine will ask of the GPU.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryLimits {
    /// Tokens computed per step at most.
    pub max_batched_tokens: usize,
    /// Requests running at once at most.
    pub max_running: usize,
    pub page_size: usize,
    /// Sparse paging: a key-bounds record beside every page, selection tables in the
    /// workspace.
    pub sparse: bool,
    /// Decode steps replayed from CUDA graphs (else every step runs eagerly).
    pub cuda_graphs: bool,
    /// Fraction of the GPU's memory for weights, workspace and KV pool together.
    pub mem_fraction: f64,
    /// KV pages asked for explicitly (else what `mem_fraction` leaves).
    pub kv_pages: Option<usize>,
}

/// Where the GPU's memory goes.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    pub total_bytes: usize,
    pub weight_bytes: usize,
    pub workspace_bytes: usize,
    /// Largest decode batch replayed from a graph (0: none) and the graphs that covers.
    pub graph_max_batch: usize,
    pub graph_buckets: usize,
    /// One page of the pool and the pages planned.
    pub geometry: KvGeometry,
    pub kv_pages: usize,
}

impl MemoryPlan {
    pub fn kv_bytes(&self) -> usize {
        self.kv_pages * self.geometry.bytes_per_page()
    }

    pub fn kv_tokens(&self) -> usize {
        self.kv_pages * self.geometry.page_size()
    }

    /// Logs the plan (one line).
    pub fn log(&self) {
        self.log_for(None);
    }

    /// Logs the plan of one GPU of a tensor-parallel group (`rank`), or of the only one.
    pub fn log_for(&self, rank: Option<usize>) {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        tracing::info!(
            gpu_gib = gib(self.total_bytes),
            weights_gib = gib(self.weight_bytes),
            workspace_mib = self.workspace_bytes >> 20,
            kv_gib = gib(self.kv_bytes()),
            kv_pages = self.kv_pages,
            kv_tokens = self.kv_tokens(),
            page_kib = self.geometry.bytes_per_page() >> 10,
            kv_dtype = ?self.geometry.dtype(),
            key_bounds = self.geometry.key_bounds(),
            cuda_graph_max_batch = self.graph_max_batch,
            cuda_graphs = self.graph_buckets,
            tp_rank = rank,
            "GPU memory plan"
        );
    }
}

/// KV pages that `mem_fraction` of a GPU of `total` bytes holds once `used` bytes are
/// taken (weights, workspace, other processes) and the headroom is kept aside.
pub fn kv_pages_left(
    geometry: &KvGeometry,
    total: usize,
    used: usize,
    mem_fraction: f64,
) -> Result<usize> {
    let budget = (total as f64 * mem_fraction) as usize;
    let kv = budget.checked_sub(used + RESERVE_BYTES).ok_or_else(|| {
        ModelError::Invalid(format!(
            "no GPU memory left for the KV cache: {:.1} GiB of {:.1} used after loading the \
             weights and the step workspace (memory fraction {mem_fraction})",
            used as f64 / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64,
        ))
    })?;
    Ok(geometry.pages_fitting(kv))
}

/// The pages of a tensor-parallel group's pool: every rank holds the same pages (the
/// scheduler's ids), each with its own kv heads, so the group gets what its fullest GPU
/// (rank 0, with the LM head) leaves. `None` for no plans.
pub fn group_kv_pages(plans: &[MemoryPlan]) -> Option<usize> {
    plans.iter().map(|p| p.kv_pages).min()
}

impl CudaBackend {
    /// Plans the GPU's memory for an engine under `limits`: reserves the step workspace
    /// for the largest step, sets the decode graphs' batch range, and sizes the KV pool
    /// (`limits.kv_pages`, or what `mem_fraction` of the GPU leaves after the weights,
    /// the workspace and a fixed headroom). `init_kv` then allocates the pool.
    pub fn plan_memory(&mut self, cfg: &ModelConfig, limits: &MemoryLimits) -> Result<MemoryPlan> {
        if limits.kv_pages.is_none() && !(limits.mem_fraction > 0.0 && limits.mem_fraction < 1.0) {
            return Err(ModelError::Invalid(format!(
                "the GPU memory fraction must be in (0, 1), got {}",
                limits.mem_fraction
            )));
        }
        // At the pool's own element size: an FP8 cache fits twice the pages of bf16.
        let geometry = cfg.kv_geometry(limits.page_size, self.kv_dtype(), limits.sparse)?;
        // Every running request decodes a token per step: no step has more sequences
        // than tokens.
        let max_seqs = limits.max_running.min(limits.max_batched_tokens);
        let workspace_bytes =
            self.reserve_workspace(cfg, limits.max_batched_tokens, max_seqs, limits.sparse)?;
        let graph_max_batch = if limits.cuda_graphs { max_seqs } else { 0 };
        self.set_graph_max_batch(graph_max_batch);
        let (free, total) = self.device().mem_info()?;
        let kv_pages = match limits.kv_pages {
            Some(p) => p,
            None => kv_pages_left(&geometry, total, total - free, limits.mem_fraction)?,
        };
        if kv_pages == 0 {
            return Err(ModelError::Invalid(
                "the KV cache gets no page: raise the memory fraction or lower the step limits"
                    .into(),
            ));
        }
        Ok(MemoryPlan {
            total_bytes: total,
            weight_bytes: self.weight_bytes(),
            workspace_bytes,
            graph_max_batch,
            graph_buckets: all_buckets(graph_max_batch).len(),
            geometry,
            kv_pages,
        })
    }

    /// Reserves the workspace for steps of up to `max_tokens` tokens and `max_seqs`
    /// sequences (with sparse selection tables when `sparse`), so that the memory left for
    /// the KV pool is known. Returns its bytes.
    fn reserve_workspace(
        &mut self,
        cfg: &ModelConfig,
        max_tokens: usize,
        max_seqs: usize,
        sparse: bool,
    ) -> Result<usize> {
        let target = default_target_blocks(&self.device);
        let kv_indices = max_tokens.max(max_seqs) * 4;
        let group = cfg.num_heads / cfg.num_kv_heads.max(1);
        // Any step's split-KV work, prompt chunks included, so that no step grows the
        // workspace (which would drop the decode graphs).
        let work = step_work_bound(max_tokens, max_seqs, group, cfg.num_kv_heads, target);
        let caps = Caps {
            tokens: max_tokens.max(max_seqs),
            seqs: max_seqs,
            logit_rows: max_seqs + crate::backend::MAX_SCORED_ROWS_PER_STEP,
            work_items: work.work_items,
            merge_items: work.merge_items,
            partial_rows: work.partial_rows,
            kv_indices,
            sparse_entries: sparse_entries(sparse, kv_indices, cfg.num_kv_heads),
        };
        self.ensure_workspace(act_shape(cfg, self.fp8_cols), &caps)?;
        Ok(self.workspace().map_or(0, |w| w.device_bytes()))
    }

    pub(super) fn workspace(&self) -> Option<&Workspace> {
        match &self.memory {
            Memory::Weights => None,
            Memory::Planned(ws) | Memory::Ready { workspace: ws, .. } => Some(ws),
        }
    }

    /// Makes the workspace cover `need` (allocating it for `shape` the first time).
    /// Growing drops the step views and the captured graphs, which point into it.
    pub(super) fn ensure_workspace(&mut self, shape: ActShape, need: &Caps) -> Result<()> {
        let ws = match &mut self.memory {
            Memory::Weights => None,
            Memory::Planned(ws) | Memory::Ready { workspace: ws, .. } => Some(ws),
        };
        if ws.as_ref().is_some_and(|w| w.caps.covers(need)) {
            return Ok(());
        }
        self.step = None;
        self.graphs.clear();
        match ws {
            Some(ws) => {
                let caps = ws.caps.grown_to(need);
                ws.grow(&self.device, caps)?;
                tracing::debug!(caps = ?ws.caps, mib = ws.device_bytes() >> 20, "CUDA step workspace grown");
            }
            None => {
                let ws = Workspace::new(&self.device, &shape, *need)?;
                tracing::debug!(caps = ?ws.caps, mib = ws.device_bytes() >> 20, "CUDA step workspace");
                self.memory = Memory::Planned(ws);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::kv_pool::KV_DTYPE;
    use super::*;
    use crate::tp::TpShard;

    const GIB: usize = 1 << 30;

    /// What one rank of Llama-3-70B at TP 8 on 141 GB GPUs gets: its own kv head, so a
    /// page is 1/8 of the whole model's, and the pages that the fraction leaves.
    #[test]
    fn a_rank_plans_its_pool_from_its_own_kv_heads() {
        let cfg = crate::synthetic::config("llama3-70b").unwrap();
        let whole = cfg.kv_geometry(16, KV_DTYPE, false).unwrap();
        let local = TpShard { rank: 3, size: 8 }.local_config(&cfg).unwrap();
        let rank = local.kv_geometry(16, KV_DTYPE, false).unwrap();
        assert_eq!(rank.bytes_per_page() * 8, whole.bytes_per_page());
        let total = 141 * GIB;
        let used = 20 * GIB;
        let pages = kv_pages_left(&rank, total, used, 0.9).unwrap();
        let budget = (total as f64 * 0.9) as usize - used - RESERVE_BYTES;
        assert_eq!(pages, rank.pages_fitting(budget));
        assert!(pages * rank.bytes_per_page() <= budget);
        assert!((pages + 1) * rank.bytes_per_page() > budget);
    }

    #[test]
    fn no_room_is_an_error_naming_the_numbers() {
        let cfg = crate::synthetic::config("tiny").unwrap();
        let g = cfg.kv_geometry(16, KV_DTYPE, false).unwrap();
        let e = kv_pages_left(&g, 10 * GIB, 9 * GIB, 0.85).unwrap_err().to_string();
        assert!(e.contains("9.0 GiB of 10.0") && e.contains("0.85"), "{e}");
    }

    /// The group's pool is what its fullest GPU leaves (every rank has the same pages).
    #[test]
    fn the_group_takes_the_smallest_pool() {
        let cfg = crate::synthetic::config("tiny").unwrap();
        let geometry = cfg.kv_geometry(16, KV_DTYPE, false).unwrap();
        let plan = |kv_pages| MemoryPlan {
            total_bytes: GIB,
            weight_bytes: 0,
            workspace_bytes: 0,
            graph_max_batch: 0,
            graph_buckets: 0,
            geometry,
            kv_pages,
        };
        assert_eq!(group_kv_pages(&[plan(900), plan(1000), plan(1000)]), Some(900));
        assert_eq!(group_kv_pages(&[]), None);
    }
}
