//! Log-probabilities on a real trained model (SmolLM2-135M-Instruct, Q4_1 GGUF, CPU):
//! the engine's alternatives and prompt log-probabilities agree with an f64 softmax of
//! logits computed here by a separate forward pass.

// The SmolLM2 model-path helper shared with the model crate's real-model tests.
#[path = "../../model/tests/smollm2_model/mod.rs"]
mod smollm2_model;

use std::sync::Arc;

use radix_engine::{Engine, EngineConfig, Output, OutputProcessor, Request, RequestId, StopConfig};
use radix_model::{Backend, CpuBackend, KvPoolSpec, LlamaModel, ModelSource, SamplingParams, Step};
use smollm2_model::smollm2_path;
use tokio::sync::mpsc::unbounded_channel;

/// f64 log-softmax of the logits after `tokens` (one prefill on `model`).
fn log_softmax_after(model: &mut LlamaModel<CpuBackend>, tokens: &[u32]) -> Vec<f64> {
    let page = 16;
    let pages = tokens.len().div_ceil(page);
    let cfg = model.config.clone();
    let spec = KvPoolSpec { num_pages: pages, page_size: page, sparse: None };
    model.backend.init_kv(&cfg, &spec).unwrap();
    let step = Step::whole_sequence(tokens, page);
    let logits = model.forward_logits(&step).unwrap();
    assert!(logits.iter().all(|l| l.is_finite()));
    let m = logits.iter().map(|&x| x as f64).fold(f64::MIN, f64::max);
    let lz = m + logits.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    logits.iter().map(|&x| x as f64 - lz).collect()
}

/// Log-probabilities agree to this: the engine decodes token by token where the reference
/// recomputes the whole sequence, and f32 sums in another order through 30 layers move
/// them by up to ~2e-4 (seen).
const TOL: f64 = 1e-3;

/// Alternatives agree with the reference: each reported token's log-probability is the
/// reference's, and rank k holds the reference's k-th largest (near-ties may swap).
fn check_alternatives(what: &str, got: &[(u32, f32)], want: &[f64], n: usize) {
    assert_eq!(got.len(), n, "{what}");
    let mut sorted = want.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    for (k, &(t, lp)) in got.iter().enumerate() {
        let d = (lp as f64 - want[t as usize]).abs();
        assert!(d < TOL, "{what} rank {k}: token {t} off by {d:e}");
        assert!((lp as f64 - sorted[k]).abs() < TOL, "{what} rank {k}: {lp} vs {}", sorted[k]);
    }
}

#[test]
fn smollm2_alternatives_and_prompt_logprobs_are_the_softmax_of_its_logits() {
    let mut reference =
        ModelSource::open(&smollm2_path()).unwrap().load(CpuBackend::new()).unwrap();
    let source = ModelSource::open(&smollm2_path()).unwrap();
    let model = source.load(CpuBackend::new()).unwrap();
    let tokenizer = Arc::new(source.tokenizer);
    let mut engine =
        Engine::new(Box::new(model), tokenizer.clone(), EngineConfig::default()).unwrap();
    let prompt = tokenizer.encode("The capital of France is", true).unwrap();
    let mut req = Request::new(
        prompt.clone(),
        SamplingParams { temperature: 0.8, seed: Some(3), ..Default::default() },
        StopConfig { max_tokens: 4, ignore_eos: true, ..Default::default() },
    );
    req.logprobs = true;
    req.top_logprobs = 20;
    req.prompt_logprobs = Some(5);
    let (tx, mut rx) = unbounded_channel();
    let mut processor = OutputProcessor::new(&req);
    engine.add(RequestId(0), req, tx).unwrap();
    while engine.has_work() {
        engine.step();
    }
    let mut outs: Vec<Output> = Vec::new();
    while let Ok(o) = rx.try_recv() {
        outs.extend(processor.process(&tokenizer, o).map(|p| p.output));
    }
    let scored: Vec<_> = outs.iter().flat_map(|o| o.prompt_logprobs.clone()).collect();
    assert_eq!(scored.len(), prompt.len() - 1);
    for s in &scored {
        let want = log_softmax_after(&mut reference, &prompt[..s.position]);
        let what = format!("prompt position {}", s.position);
        assert!((s.logprob as f64 - want[prompt[s.position] as usize]).abs() < TOL, "{what}");
        check_alternatives(&what, &s.top, &want, 5);
    }
    let sampled: Vec<u32> = outs.iter().flat_map(|o| o.token_ids.clone()).collect();
    let tops: Vec<Vec<(u32, f32)>> = outs.iter().flat_map(|o| o.top_logprobs.clone()).collect();
    let lps: Vec<f32> = outs.iter().flat_map(|o| o.logprobs.clone()).collect();
    assert_eq!((sampled.len(), tops.len()), (4, 4));
    let mut seq = prompt.clone();
    for (j, top) in tops.iter().enumerate() {
        let want = log_softmax_after(&mut reference, &seq);
        check_alternatives(&format!("output {j}"), top, &want, 20);
        assert!((lps[j] as f64 - want[sampled[j] as usize]).abs() < TOL, "output {j}");
        seq.push(sampled[j]);
    }
}
