//! Shared by the parity tests: a fixture saved by tools/make_fixtures.py (weights,
//! tokenizer and what transformers computed) checked against one of our backends.

use std::path::PathBuf;

use radix_model::{Backend, ChatMessage, KvPoolSpec, LlamaModel, ModelSource, Step};
use serde_json::Value;

const PAGE_SIZE: usize = 4;

/// A fixture folder and its expected.json. `RADIX_SPARSE_FIXTURES` points at the
/// fixtures elsewhere (a GPU bundle run away from the source tree).
pub fn fixture(name: &str) -> (PathBuf, Value) {
    let root = std::env::var_os("RADIX_SPARSE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"));
    let dir = root.join(name);
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
    fn step<B: Backend>(&mut self, model: &mut LlamaModel<B>, rows: &[u32]) -> Vec<f32> {
        let new = self.tokens[self.computed..].to_vec();
        let total = self.tokens.len();
        let positions: Vec<i32> = (self.computed..total).map(|p| p as i32).collect();
        let slots = positions.clone(); // page p holds positions p*PS.., contiguously
        let pages = total.div_ceil(PAGE_SIZE);
        let kv_indices: Vec<i32> = (0..pages as i32).collect();
        let last = (total - (pages - 1) * PAGE_SIZE) as i32;
        let step = Step {
            qo_indptr: vec![0, new.len() as i32],
            tokens: new,
            positions,
            slots,
            kv_indptr: vec![0, pages as i32],
            kv_indices,
            kv_last_page_len: vec![last],
            logit_rows: rows.to_vec(),
            kv_keep: vec![],
        };
        let logits = model.forward_logits(&step).unwrap();
        self.computed = total;
        logits
    }
}

/// The logits of prompt positions `rows` from one prefill of `ids` (a fresh KV pool).
#[allow(dead_code)] // the GPU tests' (built with `--features cuda` only)
pub fn prefill_logits<B: Backend>(
    model: &mut LlamaModel<B>,
    ids: &[u32],
    rows: &[u32],
) -> Vec<f32> {
    let cfg = model.config.clone();
    let spec = KvPoolSpec { num_pages: 64, page_size: PAGE_SIZE, sparse: None };
    model.backend.init_kv(&cfg, &spec).unwrap();
    Sequence { tokens: ids.to_vec(), computed: 0 }.step(model, rows)
}

/// A case's prompt ids, the prompt positions of its logits rows, and the rows: the
/// "logits" of `rows_of` (the case itself, or another reference laid out the same way).
pub fn case_rows(case: &Value, rows_of: &Value) -> (Vec<u32>, Vec<u32>, Vec<Vec<f64>>) {
    let ids: Vec<u32> =
        case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let first = case["logits_first_position"].as_u64().unwrap() as usize;
    let want: Vec<Vec<f64>> = rows_of["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect())
        .collect();
    let rows = (first..first + want.len()).map(|r| r as u32).collect();
    (ids, rows, want)
}

/// How closely a backend must reproduce a fixture.
pub struct Tolerance {
    /// Relative error of the logits.
    pub logits: f64,
    /// True: generate greedily and match transformers' continuation exactly (f32).
    /// False: feed transformers' tokens back (teacher forcing) and match its argmax at
    /// every step, which the fixture's margins make stable for bf16 backends.
    pub free_running: bool,
}

/// Checks a backend against a fixture's transformers logits and greedy tokens.
pub fn check<B: Backend>(name: &str, make: impl Fn() -> B, tol: Tolerance) {
    let (dir, expected) = fixture(name);
    let source = ModelSource::open(dir.to_str().unwrap()).unwrap();
    let vocab = source.config.vocab_size;
    for case in expected["cases"].as_array().unwrap() {
        let (ids, rows, want_rows) = case_rows(case, case);
        let first = rows[0] as usize;
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(
            source.tokenizer.encode(prompt, true).unwrap(),
            ids,
            "{name}: tokenizer ids for {prompt:?}"
        );

        let mut model = source.load(make()).unwrap();
        let cfg = model.config.clone();
        let spec = KvPoolSpec { num_pages: 64, page_size: PAGE_SIZE, sparse: None };
        model.backend.init_kv(&cfg, &spec).unwrap();
        let mut seq = Sequence { tokens: ids.clone(), computed: 0 };
        let got = seq.step(&mut model, &rows);
        for (i, want) in want_rows.iter().enumerate() {
            let err = radix_kernels::relative_error(&got[i * vocab..(i + 1) * vocab], want);
            assert!(
                err <= tol.logits,
                "{name} {prompt:?} position {}: logits rel err {err:.2e}",
                first + i
            );
        }

        // Greedy through the KV cache: the last prefill logits, then one token per step.
        let greedy: Vec<u32> =
            case["greedy"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let mut next = radix_model::sampling::argmax(&got[(want_rows.len() - 1) * vocab..]);
        let mut out = Vec::new();
        for &want in &greedy {
            out.push(next);
            seq.tokens.push(if tol.free_running { next } else { want });
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
