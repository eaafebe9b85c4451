//! Tensor parallelism (Megatron-style): each of `size` ranks holds a slice of every
//! layer and the ranks sum their partial outputs twice per layer.
//!
//! - **Column-parallel** q|k|v and gate|up: rank r keeps its query heads, its kv heads
//!   and its rows of the MLP's intermediate features, so attention and SiLU·mul run on
//!   local data with no communication.
//! - **Row-parallel** O and down: rank r keeps the input columns that match its heads /
//!   intermediate rows; each rank's product is a partial sum of the full output, and
//!   `Backend::all_reduce` adds them up (every rank gets the same sum).
//! - **KV heads**: split when `num_kv_heads >= size` (each rank `num_kv_heads / size`),
//!   replicated when fewer (`size / num_kv_heads` ranks share one kv head, each with its
//!   own copy in its own pool). Either way rank r's query heads `[r·H/size, (r+1)·H/size)`
//!   read exactly the kv heads it holds, so GQA's `h / group` mapping stays local.
//! - **Embedding and LM head replicated**: every rank embeds the tokens (no collective),
//!   and rank 0 alone runs the final norm and the LM head and samples; other ranks do not
//!   load `lm_head` at all. A vocab-parallel head would spread the head's GEMM (~1/size
//!   of it per rank) but needs a gather of the logits before sampling; it is the next
//!   step once a GPU can measure it (docs/ARCHITECTURE.md).
//!
//! Each rank's pool holds the same page ids (the scheduler's, broadcast), with only its
//! kv heads: `local_config` is the shape a rank's backend sees.
//!
//! Ranks: `cpu_model` (threads, the in-process all-reduce of `cpu_comm`) and
//! `cuda_model` (a GPU and a thread each, NCCL; `cuda`).

mod cpu_comm;
mod cuda;
mod group;

use std::ops::Range;

pub use cpu_comm::CpuComm;
pub use cuda::{CudaGroup, check_gpus, cuda_model};
pub use group::{TpModel, load_ranks};

use crate::config::ModelConfig;
use crate::cpu::CpuBackend;
use crate::error::{ModelError, Result};
use crate::model::LlamaModel;
use crate::weights::WeightSource;

/// One rank's place in a tensor-parallel group of `size` ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TpShard {
    pub rank: usize,
    pub size: usize,
}

impl TpShard {
    /// No tensor parallelism: the whole model on one backend.
    pub const SINGLE: TpShard = TpShard { rank: 0, size: 1 };

    pub fn new(rank: usize, size: usize) -> Result<Self> {
        if size == 0 {
            return Err(ModelError::TensorParallel(
                "the tensor-parallel size must be at least 1".into(),
            ));
        }
        if rank >= size {
            return Err(ModelError::TensorParallel(format!(
                "rank {rank} is outside a group of {size}"
            )));
        }
        Ok(Self { rank, size })
    }

    /// Every rank of a group of `size`.
    pub fn group(size: usize) -> Result<Vec<TpShard>> {
        TpShard::new(0, size)?;
        Ok((0..size).map(|rank| TpShard { rank, size }).collect())
    }

    /// Whether `cfg` can be split `size` ways; the error names the numbers.
    pub fn check(size: usize, cfg: &ModelConfig) -> Result<()> {
        let shard = TpShard::new(0, size)?;
        let bad = |m: String| Err(ModelError::TensorParallel(m));
        if !cfg.num_heads.is_multiple_of(size) {
            return bad(format!(
                "{} attention heads do not divide among {size} ranks (the tensor-parallel \
                 size must divide the head count)",
                cfg.num_heads
            ));
        }
        let kv = cfg.num_kv_heads;
        if !(kv.is_multiple_of(size) || size.is_multiple_of(kv)) {
            return bad(format!(
                "{kv} kv heads can be neither split nor replicated among {size} ranks (the \
                 tensor-parallel size must divide the kv head count or be a multiple of it)"
            ));
        }
        if !cfg.intermediate_size.is_multiple_of(size) {
            return bad(format!(
                "the MLP's {} intermediate features do not divide among {size} ranks",
                cfg.intermediate_size
            ));
        }
        // With the checks above, each rank's query heads fall within its kv heads' groups.
        debug_assert!(shard.kv_heads(cfg).len() * (cfg.num_heads / kv) >= cfg.num_heads / size);
        Ok(())
    }

    /// This rank's query heads.
    pub fn q_heads(&self, cfg: &ModelConfig) -> Range<usize> {
        let n = cfg.num_heads / self.size;
        self.rank * n..(self.rank + 1) * n
    }

    /// This rank's kv heads: a split share, or the one head its query heads read when
    /// there are fewer kv heads than ranks (replicated).
    pub fn kv_heads(&self, cfg: &ModelConfig) -> Range<usize> {
        let kv = cfg.num_kv_heads;
        if kv >= self.size {
            let n = kv / self.size;
            self.rank * n..(self.rank + 1) * n
        } else {
            let head = self.rank / (self.size / kv);
            head..head + 1
        }
    }

    /// This rank's rows of gate and up (and columns of down).
    pub fn intermediate(&self, cfg: &ModelConfig) -> Range<usize> {
        let n = cfg.intermediate_size / self.size;
        self.rank * n..(self.rank + 1) * n
    }

    /// The shapes this rank's backend runs: its heads and intermediate features; the
    /// rest (vocabulary, hidden size, norms, RoPE) as the model's.
    pub fn local_config(&self, cfg: &ModelConfig) -> Result<ModelConfig> {
        TpShard::check(self.size, cfg)?;
        Ok(ModelConfig {
            num_heads: self.q_heads(cfg).len(),
            num_kv_heads: self.kv_heads(cfg).len(),
            intermediate_size: self.intermediate(cfg).len(),
            ..cfg.clone()
        })
    }

    /// Parameters this rank holds: its slices, the replicated embedding and norms, and
    /// the LM head on rank 0 only. What its memory plan starts from (× bytes per weight).
    pub fn rank_params(&self, cfg: &ModelConfig) -> Result<usize> {
        let local = self.local_config(cfg)?;
        let head = if cfg.tie_word_embeddings || self.computes_logits() {
            0
        } else {
            cfg.vocab_size * cfg.hidden_size
        };
        Ok(local.num_params() - head)
    }

    /// Whether this rank computes logits and samples (rank 0: the LM head is replicated
    /// there and nowhere else).
    pub fn computes_logits(&self) -> bool {
        self.rank == 0
    }
}

/// `size` CPU ranks on threads of this process, each with its slices of `config`'s
/// weights from `source` (loaded in parallel) and the in-process all-reduce.
pub fn cpu_model(
    config: &ModelConfig,
    source: &dyn WeightSource,
    size: usize,
) -> Result<TpModel<CpuBackend>> {
    TpShard::check(size, config)?;
    for shard in TpShard::group(size)? {
        let params = shard.rank_params(config)?;
        tracing::info!(rank = shard.rank, size, params, "tensor-parallel rank's weights");
    }
    let (comms, control) = CpuComm::group(size)?;
    let models = load_ranks(size, |shard| {
        let backend = CpuBackend::with_comm(comms[shard.rank].clone());
        LlamaModel::load(config.clone(), backend, source, |_, _| {})
    })?;
    TpModel::new(models, control)
}

/// Stops and restarts a group's collectives: `abort` wakes every rank waiting in one
/// (they return `ModelError::GroupAborted`) so that one rank's error cannot leave the
/// others blocked; `reset` re-arms the group once every rank is idle again.
pub trait GroupControl: Send + Sync {
    fn abort(&self, why: &str);
    fn reset(&self);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(heads: usize, kv: usize) -> ModelConfig {
        ModelConfig {
            num_heads: heads,
            num_kv_heads: kv,
            ..crate::synthetic::config("tiny").unwrap()
        }
    }

    /// Every query head of every rank reads, through the local GQA mapping, the same kv
    /// head as without tensor parallelism.
    #[test]
    fn query_heads_keep_their_kv_head() {
        for (heads, kv) in [(8, 8), (8, 4), (8, 2), (8, 1), (64, 8), (32, 8), (12, 4)] {
            let c = cfg(heads, kv);
            for size in [1, 2, 4, 8] {
                if TpShard::check(size, &c).is_err() {
                    continue;
                }
                for shard in TpShard::group(size).unwrap() {
                    let local = shard.local_config(&c).unwrap();
                    let (q, k) = (shard.q_heads(&c), shard.kv_heads(&c));
                    let local_group = local.num_heads / local.num_kv_heads;
                    for (i, h) in q.clone().enumerate() {
                        let global = h / (heads / kv);
                        assert_eq!(k.start + i / local_group, global, "{heads}/{kv} tp {size}");
                    }
                }
            }
        }
    }

    #[test]
    fn bad_sizes_name_the_numbers() {
        let e = TpShard::check(3, &cfg(8, 2)).unwrap_err().to_string();
        assert!(e.contains("8 attention heads") && e.contains("3 ranks"), "{e}");
        let e = TpShard::check(4, &cfg(12, 6)).unwrap_err().to_string();
        assert!(e.contains("6 kv heads") && e.contains("4 ranks"), "{e}");
        let e = TpShard::check(0, &cfg(8, 2)).unwrap_err().to_string();
        assert!(e.contains("at least 1"), "{e}");
        assert!(TpShard::new(2, 2).is_err());
        let odd_mlp = ModelConfig { intermediate_size: 100, ..cfg(8, 8) };
        let e = TpShard::check(8, &odd_mlp).unwrap_err().to_string();
        assert!(e.contains("100 intermediate") && e.contains("8 ranks"), "{e}");
    }

    #[test]
    fn llama3_70b_splits_eight_ways() {
        let c = crate::synthetic::config("llama3-70b").unwrap();
        let local = TpShard { rank: 7, size: 8 }.local_config(&c).unwrap();
        assert_eq!((local.num_heads, local.num_kv_heads, local.intermediate_size), (8, 1, 3584));
        assert!(TpShard::check(16, &c).is_ok()); // kv heads replicated twice
        // Per GPU in bf16 at TP 8: 21.3 GB on rank 0 (with the LM head), 19.2 GB on the
        // others, of 141 GB for the whole model.
        let params = |rank| TpShard { rank, size: 8 }.rank_params(&c).unwrap();
        assert_eq!((params(0), params(7)), (10_659_045_376, 9_608_372_224));
        assert_eq!(TpShard::SINGLE.rank_params(&c).unwrap(), c.num_params());
    }
}
