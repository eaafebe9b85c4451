//! The engine over a tensor-parallel group (CPU ranks on threads): greedy generation at
//! TP = 2 and 4 gives TP = 1's tokens, with chunked prefill, mixed batches and the
//! prefix cache; synthetic:tiny has 8 query heads and 2 kv heads, so TP = 4 replicates
//! its kv heads.

use std::sync::Arc;

use radix_engine::{Engine, EngineConfig, Request, RequestId, Runner, StopConfig};
use radix_model::{ModelSource, SamplingParams, tp};
use tokio::sync::mpsc::unbounded_channel;

fn generate(runner: Box<dyn Runner>, tokenizer: Arc<radix_model::Tokenizer>) -> Vec<Vec<u32>> {
    // Small budgets: prompts are chunked and decodes share steps with prefill chunks.
    let cfg = EngineConfig { max_batched_tokens: 24, max_running: 4, ..Default::default() };
    let mut e = Engine::new(runner, tokenizer, cfg).unwrap();
    let base: Vec<u32> = (0..61u32).map(|i| (i * 7 + 3) % 250).collect();
    let prompts = [base[..37].to_vec(), base.clone(), vec![5], base[..37].to_vec()];
    let mut rxs = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let (tx, rx) = unbounded_channel();
        let stop = StopConfig { max_tokens: 12, ignore_eos: true, ..Default::default() };
        e.add(RequestId(i as u64), Request::new(p.clone(), SamplingParams::greedy(), stop), tx)
            .unwrap();
        rxs.push(rx);
    }
    let mut steps = 0;
    while e.has_work() {
        e.step();
        steps += 1;
        assert!(steps < 1000, "the engine did not finish");
    }
    assert_eq!(e.reclaimable_pages(), e.config().num_pages, "pages leaked");
    rxs.into_iter()
        .map(|mut rx| {
            let mut ids = Vec::new();
            while let Ok(o) = rx.try_recv() {
                ids.extend(o.token_ids);
            }
            ids
        })
        .collect()
}

#[test]
fn greedy_tokens_at_tp_2_and_4_equal_tp_1() {
    let source = ModelSource::open("synthetic:tiny").unwrap();
    let tokenizer = Arc::new(ModelSource::open("synthetic:tiny").unwrap().tokenizer);
    let alone =
        generate(Box::new(source.load(radix_model::CpuBackend::new()).unwrap()), tokenizer.clone());
    assert!(alone.iter().all(|t| t.len() == 12));
    for size in [2, 4] {
        let group = tp::cpu_model(&source.config, source.weights.as_ref(), size).unwrap();
        assert!(group.backend_name().contains(&format!("tensor-parallel × {size}")));
        assert_eq!(generate(Box::new(group), tokenizer.clone()), alone, "TP {size}");
    }
}
