//! Parity with Hugging Face transformers: tiny random Llama (GQA, llama3 RoPE scaling) and
//! Qwen2 (QKV bias, tied embeddings) models saved by tools/make_fixtures.py with their
//! logits and greedy continuations. Our CPU forward must match the logits (relative error
//! <= 1e-4, f32) and the greedy tokens exactly, through the KV cache (prefill, then one
//! decode step per token).

use std::path::PathBuf;

use radix_model::{ChatMessage, CpuBackend, LlamaModel, ModelSource, StepInput};
use serde_json::Value;

const PAGE_SIZE: usize = 4;

fn fixture(name: &str) -> (PathBuf, Value) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let expected = std::fs::read_to_string(dir.join("expected.json")).unwrap();
    (dir, serde_json::from_str(&expected).unwrap())
}

/// One sequence on pages 0, 1, 2, ... of the pool.
struct Sequence {
    tokens: Vec<u32>,
    computed: usize,
}

impl Sequence {
    /// Computes the tokens not yet in the KV cache; returns the logits of `rows` (indices
    /// into this step's tokens).
    fn step(&mut self, model: &mut LlamaModel<CpuBackend>, rows: &[u32]) -> Vec<f32> {
        let new = &self.tokens[self.computed..];
        let total = self.tokens.len();
        let positions: Vec<i32> = (self.computed..total).map(|p| p as i32).collect();
        let slots = positions.clone(); // page p holds positions p*PS.., contiguously
        let pages = total.div_ceil(PAGE_SIZE);
        let kv_indices: Vec<i32> = (0..pages as i32).collect();
        let last = (total - (pages - 1) * PAGE_SIZE) as i32;
        let step = StepInput {
            tokens: new,
            positions: &positions,
            slots: &slots,
            qo_indptr: &[0, new.len() as i32],
            kv_indptr: &[0, pages as i32],
            kv_indices: &kv_indices,
            kv_last_page_len: &[last],
            logit_rows: rows,
        };
        let logits = model.forward_logits(&step).unwrap();
        self.computed = total;
        logits
    }
}

fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(g, w)| (*g as f64 - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den).sqrt()
}

fn check(name: &str) {
    let (dir, expected) = fixture(name);
    let source = ModelSource::open(dir.to_str().unwrap()).unwrap();
    let vocab = source.config.vocab_size;
    for case in expected["cases"].as_array().unwrap() {
        let ids: Vec<u32> =
            case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(
            source.tokenizer.encode(prompt, true).unwrap(),
            ids,
            "{name}: tokenizer ids for {prompt:?}"
        );

        let mut model = source.load(CpuBackend::new()).unwrap();
        model.backend_init(64, PAGE_SIZE);
        let first = case["logits_first_position"].as_u64().unwrap() as usize;
        let want_rows: Vec<Vec<f64>> = case["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect())
            .collect();
        let rows: Vec<u32> = (first..first + want_rows.len()).map(|r| r as u32).collect();
        let mut seq = Sequence { tokens: ids.clone(), computed: 0 };
        let got = seq.step(&mut model, &rows);
        for (i, want) in want_rows.iter().enumerate() {
            let err = rel_err(&got[i * vocab..(i + 1) * vocab], want);
            assert!(
                err <= 1e-4,
                "{name} {prompt:?} position {}: logits rel err {err:.2e}",
                first + i
            );
        }

        // Greedy through the KV cache: the last prefill logits, then one token per step.
        let greedy: Vec<u32> =
            case["greedy"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let mut next = radix_model::sampling::argmax(&got[(want_rows.len() - 1) * vocab..]);
        let mut out = Vec::new();
        for _ in 0..greedy.len() {
            out.push(next);
            seq.tokens.push(next);
            let logits = seq.step(&mut model, &[0]);
            next = radix_model::sampling::argmax(&logits);
        }
        assert_eq!(out, greedy, "{name} {prompt:?}: greedy continuation");
    }

    // The chat template renders as transformers renders it.
    let chat = &expected["chat"];
    let messages: Vec<ChatMessage> = serde_json::from_value(chat["messages"].clone()).unwrap();
    assert_eq!(
        source.chat_template.render(&messages, true).unwrap(),
        chat["rendered"].as_str().unwrap()
    );
}

trait InitKv {
    fn backend_init(&mut self, pages: usize, page_size: usize);
}

impl InitKv for LlamaModel<CpuBackend> {
    fn backend_init(&mut self, pages: usize, page_size: usize) {
        use radix_model::Backend;
        let cfg = self.config.clone();
        self.backend.init_kv(&cfg, pages, page_size).unwrap();
    }
}

#[test]
fn tiny_llama_matches_transformers() {
    check("tiny-llama");
}

#[test]
fn tiny_qwen2_matches_transformers() {
    check("tiny-qwen2");
}
