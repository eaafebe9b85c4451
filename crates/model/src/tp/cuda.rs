//! CUDA ranks: one GPU each (rank r on GPU r), one thread each (`TpModel`), NCCL
//! between them (`radix_gpu::NcclGroup`). Each rank has its slices of the weights, its
//! own memory plan over its own shapes (`LlamaModel::local`), its share of the KV pool
//! and its own CUDA graphs, which capture its collectives.

use std::sync::Arc;

use radix_gpu::NcclGroup;

use super::{GroupControl, TpModel, TpShard, load_ranks};
use crate::config::ModelConfig;
use crate::cuda::{CudaBackend, MemoryLimits, MemoryPlan, group_kv_pages};
use crate::error::{ModelError, Result};
use crate::model::LlamaModel;
use crate::weights::WeightSource;

impl GroupControl for NcclGroup {
    fn abort(&self, why: &str) {
        NcclGroup::abort(self, why);
    }

    fn reset(&self) {
        NcclGroup::reset(self);
    }
}

/// A CUDA tensor-parallel group, loaded and planned.
pub struct CudaGroup {
    pub model: TpModel<CudaBackend>,
    /// Each rank's memory plan (rank order).
    pub plans: Vec<MemoryPlan>,
    /// KV pages of every rank's pool: what the fullest GPU leaves.
    pub kv_pages: usize,
}

/// Whether `size` GPUs are there for a group of `size` ranks; the error names both
/// numbers.
pub fn check_gpus(size: usize, visible: usize) -> Result<()> {
    if visible >= size {
        return Ok(());
    }
    Err(ModelError::TensorParallel(format!(
        "a tensor-parallel size of {size} needs {size} GPUs but {visible} {} visible \
         (check CUDA_VISIBLE_DEVICES, or ask for a smaller size)",
        if visible == 1 { "is" } else { "are" }
    )))
}

/// `size` CUDA ranks on GPUs 0..size, each with its slices of `config`'s weights from
/// `source` (loaded in parallel) and its memory planned under `limits`. Refused, before
/// any weight is read, when the model cannot be split `size` ways, when fewer GPUs are
/// visible, or when NCCL is missing (the error says what to install).
pub fn cuda_model(
    config: &ModelConfig,
    source: &dyn WeightSource,
    size: usize,
    limits: &MemoryLimits,
) -> Result<CudaGroup> {
    TpShard::check(size, config)?;
    check_gpus(size, radix_gpu::Device::count()?)?;
    let gpus: Vec<usize> = (0..size).collect();
    let nccl = NcclGroup::new(&gpus)?;
    for shard in TpShard::group(size)? {
        let params = shard.rank_params(config)?;
        tracing::info!(
            rank = shard.rank,
            gpu = shard.rank,
            size,
            params,
            "tensor-parallel rank's weights"
        );
    }
    let mut models: Vec<LlamaModel<CudaBackend>> = load_ranks(size, |shard| {
        let backend = CudaBackend::with_group(nccl.clone(), shard.rank)?;
        LlamaModel::load(config.clone(), backend, source, |_, _| {})
    })?;
    // Each GPU's plan from its own weights and shapes: rank 0 also holds the LM head.
    let plans = models
        .iter_mut()
        .map(|m| {
            let plan = m.backend.plan_memory(&m.local, limits)?;
            plan.log_for(Some(m.shard.rank));
            Ok(plan)
        })
        .collect::<Result<Vec<_>>>()?;
    let kv_pages = group_kv_pages(&plans).ok_or_else(|| {
        ModelError::TensorParallel("a tensor-parallel group needs at least one rank".into())
    })?;
    tracing::info!(size, kv_pages, "tensor-parallel KV pool: the same pages on every GPU");
    let control: Arc<dyn GroupControl> = nccl;
    Ok(CudaGroup { model: TpModel::new(models, control)?, plans, kv_pages })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_few_gpus_names_both_numbers() {
        let e = check_gpus(4, 1).unwrap_err().to_string();
        assert!(e.contains("size of 4 needs 4 GPUs but 1 is visible"), "{e}");
        let e = check_gpus(8, 0).unwrap_err().to_string();
        assert!(e.contains("needs 8 GPUs but 0 are visible"), "{e}");
        assert!(check_gpus(2, 2).is_ok() && check_gpus(2, 8).is_ok());
    }
}
