//! SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized) on the CUDA backend (bf16) against the
//! CPU backend (f32): 32 greedy steps of three prompts in one batch, logits within the
//! bf16 bound at every step and the same greedy token wherever the CPU's top two logits
//! are clearly apart (both fed the CPU's token, so a near-tie cannot derail the rest).
//! The model file: `RADIX_SPARSE_SMOLLM2`, else models/ at the workspace root; the GPU
//! run must have it (it fails, not skips, without it).
#![cfg(feature = "cuda")]

use std::path::PathBuf;

mod paged_batch;

use radix_model::{Backend, CpuBackend, CudaBackend, KvPoolSpec, ModelSource};

use paged_batch::{Batch, PS};

const STEPS: usize = 32;

fn model_path() -> String {
    let path = std::env::var_os("RADIX_SPARSE_SMOLLM2").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(path.is_file(), "{} is missing: run tools/fetch_smollm2.sh", path.display());
    path.to_str().unwrap().to_string()
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn smollm2_on_cuda_matches_the_cpu_for_32_greedy_steps() {
    let source = ModelSource::open(&model_path()).unwrap();
    let cfg = source.config.clone();
    let mut cpu = source.load(CpuBackend::new()).unwrap();
    let mut gpu =
        ModelSource::open(&model_path()).unwrap().load(CudaBackend::new(0).unwrap()).unwrap();
    let spec = KvPoolSpec { num_pages: 256, page_size: PS, sparse: None };
    cpu.backend.init_kv(&cfg, &spec).unwrap();
    gpu.backend.init_kv(&cfg, &spec).unwrap();
    let template = source.chat_template;
    let seqs: Vec<Vec<u32>> = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three prime numbers and explain why they are prime.",
    ]
    .iter()
    .map(|q| {
        let msgs = [radix_model::ChatMessage::new("user", *q)];
        let text = template.render(&msgs, true).unwrap();
        source.tokenizer.encode(&text, false).unwrap()
    })
    .collect();
    let vocab = cfg.vocab_size;
    let mut batch = Batch { computed: vec![0; seqs.len()], seqs, sparse: None };
    let (mut confident, mut worst) = (0, 0.0f64);
    for i in 0..STEPS {
        let c = batch.step(&mut cpu);
        let g = batch.step(&mut gpu);
        assert!(g.iter().all(|x| x.is_finite()), "step {i}: non-finite CUDA logits");
        for b in 0..batch.seqs.len() {
            let (cr, gr) = (&c[b * vocab..(b + 1) * vocab], &g[b * vocab..(b + 1) * vocab]);
            let err = rel_err(gr, cr);
            worst = worst.max(err);
            assert!(err <= 2e-2, "step {i} seq {b}: logits rel err {err:.3e}");
            let mut order: Vec<usize> = (0..vocab).collect();
            order.sort_by(|&x, &y| cr[y].total_cmp(&cr[x]));
            let next = order[0] as u32;
            if cr[order[0]] - cr[order[1]] > 0.25 {
                confident += 1;
                let best = (0..vocab).max_by(|&x, &y| gr[x].total_cmp(&gr[y])).unwrap() as u32;
                assert_eq!(best, next, "step {i} seq {b}: greedy token differs at a clear margin");
            }
            batch.computed[b] = batch.seqs[b].len();
            batch.seqs[b].push(next); // teacher-force the CPU's greedy choice into both
        }
    }
    assert!(confident >= STEPS, "too few confident steps to compare ({confident})");
    eprintln!(
        "SmolLM2 CUDA vs CPU: worst logits rel err {worst:.3e}, {confident} clear greedy steps agree"
    );
}
