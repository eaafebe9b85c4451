//! Attention on tensor cores for prefill and decode: ragged batches, causal (bottom-right
//! aligned) or not, GQA, K/V contiguous or paged through a CSR page table, split-KV with
//! a log-sum-exp merge. See attention.cu for the kernel's design.

mod batch;
pub(crate) mod launch;
mod plan;
mod reference;

pub use batch::{AttentionShape, BatchMeta, KvSource};
pub use launch::{
    AttentionBatch, AttentionBuffers, Fp8Widen, KvFp8Scales, PERSISTENT_MAX_MEAN_KEYS,
    TMA3_MIN_MEAN_KEYS, TRACE_SLOTS, default_target_blocks, fp8_widen, plan_batch, prefill_tiles,
    set_fp8_widen, spec, spec_fp8_kv, spec_fp8_kv_widened, wide_merge,
};
pub use plan::{
    DECODE_CLUSTER, MergeItem, StepWorkBound, TileConfig, WIDE_MERGE_SPLITS, WorkItem, WorkList,
    clusters_apply, decode_work_bound, plan, plan_clustered, step_work_bound,
};
pub use reference::{Reference, attention_reference};

use radix_gpu::SourceFile;

pub const SOURCE: SourceFile =
    SourceFile { path: "attention/attention.cu", code: include_str!("attention.cu") };
