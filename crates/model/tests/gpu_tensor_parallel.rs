//! CUDA tensor parallelism (`--features cuda`; 2 GPUs and NCCL, e.g. `pip install
//! nvidia-nccl-cu13` with its lib folder in RADIX_SPARSE_CUDA_LIB_DIRS): NCCL ranks on
//! GPUs 0 and 1 against one GPU, on synthetic:tiny with its kv heads split (8 q / 2 kv)
//! and replicated (8 q / 1 kv):
//! - eager TP 2 logits equal TP 1's within bf16 tolerance (prefill chunks, a mixed
//!   batch, decodes);
//! - decode steps replayed from CUDA graphs (the all-reduces captured in them) equal
//!   eager TP 2 steps;
//! - a step that fails leaves the group usable (abort, communicators remade);
//! - a size past the visible GPUs is refused naming both numbers.
//!
//! Without 2 GPUs, or without NCCL, these fail with the reason; they do not skip.
#![cfg(feature = "cuda")]

mod numerics;
mod tp_batch;

use radix_model::cuda::MemoryLimits;
use radix_model::synthetic::SyntheticWeights;
use radix_model::tp::{self, TpModel};
use radix_model::{Backend, CudaBackend, KvPoolSpec, LlamaModel, ModelConfig};

use numerics::rel_err;
use tp_batch::Batch;

const PS: usize = 16;
const PAGES_PER_SEQ: usize = 16;
const PAGES: usize = 4 * PAGES_PER_SEQ;

/// One test at a time on the GPUs: two groups' NCCL kernels queued concurrently on the
/// same GPUs can wait on each other (NCCL orders collectives per communicator only), so
/// the tests take this lock, as the engine has one group per process.
static GPUS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn gpus_to_myself() -> std::sync::MutexGuard<'static, ()> {
    GPUS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Fails the test unless `n` GPUs are visible.
fn require_gpus(n: usize) {
    match radix_gpu::Device::count() {
        Ok(c) if c >= n => {}
        Ok(c) => panic!("this test needs {n} CUDA GPUs but {c} are visible"),
        Err(e) => panic!("this test needs {n} CUDA GPUs but none is usable: {e}"),
    }
}

fn tiny(kv_heads: usize) -> ModelConfig {
    ModelConfig { num_kv_heads: kv_heads, ..radix_model::synthetic::config("tiny").unwrap() }
}

fn limits(cuda_graphs: bool) -> MemoryLimits {
    MemoryLimits {
        max_batched_tokens: 1024,
        max_running: 16,
        page_size: PS,
        sparse: false,
        cuda_graphs,
        mem_fraction: 0.5,
        kv_pages: Some(PAGES),
    }
}

fn spec() -> KvPoolSpec {
    KvPoolSpec { num_pages: PAGES, page_size: PS, sparse: None }
}

fn group(cfg: &ModelConfig, cuda_graphs: bool) -> TpModel<CudaBackend> {
    require_gpus(2);
    let g = tp::cuda_model(cfg, &SyntheticWeights, 2, &limits(cuda_graphs))
        .unwrap_or_else(|e| panic!("a CUDA group of 2: {e}"));
    assert_eq!((g.plans.len(), g.kv_pages), (2, PAGES));
    // Each rank planned its own pool: half the kv heads when they split, one when
    // replicated.
    let local_kv = (cfg.num_kv_heads / 2).max(1);
    for plan in &g.plans {
        let whole = cfg.kv_geometry(PS, radix_kv::KvDtype::BF16, false).unwrap();
        assert_eq!(
            plan.geometry.bytes_per_page() * cfg.num_kv_heads,
            whole.bytes_per_page() * local_kv
        );
    }
    let mut m = g.model;
    m.init_kv(&spec()).unwrap();
    m
}

fn single(cfg: &ModelConfig) -> LlamaModel<CudaBackend> {
    let mut m =
        LlamaModel::load(cfg.clone(), CudaBackend::new(0).unwrap(), &SyntheticWeights, |_, _| {})
            .unwrap();
    let local = m.local.clone();
    m.backend.plan_memory(&local, &limits(false)).unwrap();
    m.init_kv(&spec()).unwrap();
    m
}

/// Prefill chunks of odd lengths, a mixed batch, then decodes (3 sequences: bucket 4).
const SCHEDULE: [&[usize]; 9] = [
    &[37, 0, 0],
    &[1, 21, 0],
    &[1, 1, 50],
    &[1, 1, 1],
    &[1, 1, 1],
    &[1, 1, 1],
    &[1, 1, 1],
    &[1, 1, 1],
    &[1, 1, 1],
];

fn tp2_matches_tp1(cfg: &ModelConfig) {
    let mut one = single(cfg);
    let mut two = group(cfg, false);
    let (mut a, mut b) = (Batch::new(3, PS, PAGES_PER_SEQ), Batch::new(3, PS, PAGES_PER_SEQ));
    for (i, new) in SCHEDULE.iter().enumerate() {
        let step = a.step(new);
        assert_eq!(step, b.step(new));
        let want = one.forward_logits(&step).unwrap();
        let got = two.forward_logits(&step).unwrap();
        assert!(got.iter().all(|x| x.is_finite()), "step {i}: non-finite logits");
        // bf16 partial sums added by NCCL instead of one bf16 GEMM: bf16 rounding.
        let err = rel_err(&got, &want);
        assert!(err <= 2e-2, "step {i}: TP 2 vs TP 1 logits rel err {err:.3e}");
    }
}

#[test]
fn tp2_logits_match_tp1_with_kv_heads_split() {
    let _gpus = gpus_to_myself();
    tp2_matches_tp1(&tiny(2));
}

#[test]
fn tp2_logits_match_tp1_with_kv_heads_replicated() {
    let _gpus = gpus_to_myself();
    tp2_matches_tp1(&tiny(1));
}

/// Decode steps of 3 sequences (bucket 4): the first runs eagerly, the second is
/// captured on both ranks (the all-reduces with it), the rest replay; every step's
/// logits equal an eager group's.
#[test]
fn tp2_graph_replay_matches_eager() {
    let _gpus = gpus_to_myself();
    let cfg = tiny(2);
    let mut eager = group(&cfg, false);
    let mut graphed = group(&cfg, true);
    let (mut a, mut b) = (Batch::new(3, PS, PAGES_PER_SEQ), Batch::new(3, PS, PAGES_PER_SEQ));
    for (i, new) in SCHEDULE.iter().enumerate() {
        let step = a.step(new);
        assert_eq!(step, b.step(new));
        let e = eager.forward_logits(&step).unwrap();
        let g = graphed.forward_logits(&step).unwrap();
        assert!(g.iter().all(|x| x.is_finite()), "step {i}: non-finite logits");
        let err = rel_err(&g, &e);
        assert!(err <= 1e-2, "step {i}: graph vs eager logits rel err {err:.3e}");
    }
    let (captured, replayed) = graphed.rank0().backend.graph_stats();
    assert_eq!(captured, 1, "one graph (bucket 4)");
    assert_eq!(replayed, 4, "the last 4 of the 6 decode steps replay");
    assert_eq!(eager.rank0().backend.graph_stats(), (0, 0));
}

/// A bad step fails on every rank, the group aborts its collectives and remakes its
/// communicators, and the next steps give TP 1's logits again, through graphs too.
#[test]
fn tp2_recovers_from_a_failed_step() {
    let _gpus = gpus_to_myself();
    let cfg = tiny(2);
    let mut one = single(&cfg);
    let mut two = group(&cfg, true);
    let mut bad = Batch::new(1, PS, PAGES_PER_SEQ).step(&[5]);
    bad.logit_rows = vec![9]; // past the step's 5 tokens
    let e = two.forward(&bad).unwrap_err().to_string();
    assert!(e.contains("logit row"), "{e}");
    let (mut a, mut b) = (Batch::new(3, PS, PAGES_PER_SEQ), Batch::new(3, PS, PAGES_PER_SEQ));
    for (i, new) in SCHEDULE.iter().enumerate() {
        let step = a.step(new);
        assert_eq!(step, b.step(new));
        let err = rel_err(&two.forward_logits(&step).unwrap(), &one.forward_logits(&step).unwrap());
        assert!(err <= 2e-2, "after a failed step, step {i}: rel err {err:.3e}");
    }
}

/// One more rank than there are GPUs (a size the model takes: 64 heads, 8 kv heads) is
/// refused before anything loads, naming both numbers.
#[test]
fn a_size_past_the_visible_gpus_is_refused() {
    let gpus = radix_gpu::Device::count().expect("this test needs a CUDA GPU");
    assert!(gpus > 0, "this test needs a CUDA GPU");
    let cfg = radix_model::synthetic::config("llama3-70b").unwrap();
    let size = (gpus + 1).next_power_of_two();
    let e = tp::cuda_model(&cfg, &SyntheticWeights, size, &limits(false)).err().unwrap();
    let e = e.to_string();
    assert!(e.contains(&format!("needs {size} GPUs but {gpus}")), "{e}");
}

/// The backends of a group are ranks of it; alone a backend is the whole model.
#[test]
fn ranks_know_their_shard() {
    require_gpus(1);
    assert_eq!(CudaBackend::new(0).unwrap().shard(), radix_model::TpShard::SINGLE);
}
