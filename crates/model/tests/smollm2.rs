//! SmolLM2-135M-Instruct (Q4_1 GGUF), a real trained model, on the CPU backend:
//! what transformers computes on the same file (tools/make_smollm2_fixture.py: logits,
//! greedy continuations, perplexity) and a passkey found in 6K tokens, densely and with
//! sparse paging. The model comes from tools/fetch_smollm2.sh (CI runs it); without it
//! these tests fail, saying so.

mod paged_batch;
mod smollm2_model;

use std::path::PathBuf;
use std::sync::OnceLock;

use radix_kv::{SparseBudget, SparsePolicy};
use radix_model::{Backend, CpuBackend, KvPoolSpec, LlamaModel, ModelSource, Step};
use serde_json::Value;
use smollm2_model::{chat_prompts, smollm2_path};

const PAGE_SIZE: usize = 16;
/// Prefill chunk: bounds the activations (and the logits of perplexity rows).
const CHUNK: usize = 512;

fn source() -> ModelSource {
    ModelSource::open(&smollm2_path()).unwrap()
}

fn expected() -> &'static Value {
    static EXPECTED: OnceLock<Value> = OnceLock::new();
    EXPECTED.get_or_init(|| {
        let path =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2/expected.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    })
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The model on the CPU with a pool for `tokens` tokens.
fn load(
    source: &ModelSource,
    tokens: usize,
    sparse: Option<SparsePolicy>,
) -> LlamaModel<CpuBackend> {
    let mut model = source.load(CpuBackend::new()).unwrap();
    let cfg = model.config.clone();
    let spec =
        KvPoolSpec { num_pages: tokens.div_ceil(PAGE_SIZE) + 1, page_size: PAGE_SIZE, sparse };
    model.backend.init_kv(&cfg, &spec).unwrap();
    model
}

/// One sequence on pages 0, 1, 2, ... of the pool.
struct Sequence {
    tokens: Vec<u32>,
    computed: usize,
}

impl Sequence {
    /// Computes tokens `computed..upto`; returns the logits of those whose positions
    /// `want_row` accepts, `[rows, vocab]`.
    fn run(
        &mut self,
        model: &mut LlamaModel<CpuBackend>,
        upto: usize,
        kv_keep: &[i32],
        want_row: impl Fn(usize) -> bool,
    ) -> Vec<f32> {
        let (from, to) = (self.computed, upto);
        let positions: Vec<i32> = (from as i32..to as i32).collect();
        let pages = to.div_ceil(PAGE_SIZE);
        let step = Step {
            tokens: self.tokens[from..to].to_vec(),
            slots: positions.clone(), // page p holds positions p*16.., contiguously
            positions,
            qo_indptr: vec![0, (to - from) as i32],
            kv_indptr: vec![0, pages as i32],
            kv_indices: (0..pages as i32).collect(),
            kv_last_page_len: vec![(to - (pages - 1) * PAGE_SIZE) as i32],
            logit_rows: (from..to).filter(|&p| want_row(p)).map(|p| (p - from) as u32).collect(),
            kv_keep: kv_keep.to_vec(),
        };
        self.computed = to;
        if step.logit_rows.is_empty() {
            model.forward(&step).unwrap();
            return Vec::new();
        }
        model.forward_logits(&step).unwrap()
    }

    /// Prefills in chunks; returns the logits of the positions `want_row` accepts.
    fn prefill(
        &mut self,
        model: &mut LlamaModel<CpuBackend>,
        want_row: impl Fn(usize) -> bool,
    ) -> Vec<f32> {
        let mut out = Vec::new();
        while self.computed < self.tokens.len() {
            let upto = (self.computed + CHUNK).min(self.tokens.len());
            out.extend(self.run(model, upto, &[], &want_row));
        }
        out
    }

    /// Greedy decoding of `steps` tokens from the last prefill logits `last`.
    fn greedy(
        &mut self,
        model: &mut LlamaModel<CpuBackend>,
        last: &[f32],
        steps: usize,
        kv_keep: &[i32],
    ) -> Vec<u32> {
        let mut next = radix_model::sampling::argmax(last);
        let mut out = Vec::new();
        for _ in 0..steps {
            out.push(next);
            self.tokens.push(next);
            let logits = self.run(model, self.tokens.len(), kv_keep, |_| true);
            next = radix_model::sampling::argmax(&logits);
        }
        out
    }
}

#[test]
fn gguf_metadata_becomes_config_tokenizer_and_template() {
    let source = source();
    let c = &source.config;
    assert_eq!(
        (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim),
        (30, 576, 1536, 9, 3, 64)
    );
    assert_eq!((c.vocab_size, c.max_position_embeddings, c.rope.theta), (49152, 8192, 100000.0));
    assert!(c.tie_word_embeddings);
    assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(1), vec![2]));
    assert_eq!(source.tokenizer.vocab_size(), 49152);
    let described = source.weights.describe();
    assert!(
        described.contains("210 Q4_1")
            && described.contains("1 Q8_0")
            && described.contains("61 F32"),
        "{described}"
    );

    // Every prompt's ids and the whole perplexity text tokenize as SmolLM2's tokenizer
    // does (digits one by one), and the chat template renders as transformers renders it.
    for case in expected()["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(
            source.tokenizer.encode(prompt, true).unwrap(),
            u32s(&case["ids"]),
            "{prompt:?}"
        );
        if let Some(chat) = case.get("chat") {
            let messages: Vec<radix_model::ChatMessage> =
                serde_json::from_value(chat.clone()).unwrap();
            assert_eq!(source.chat_template.render(&messages, true).unwrap(), prompt);
        }
    }
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2/perplexity.txt"),
    )
    .unwrap();
    let ids = source.tokenizer.encode(&text, true).unwrap();
    assert_eq!(ids, u32s(&expected()["perplexity"]["ids"]));
    assert_eq!(source.tokenizer.decode(&ids, false).unwrap(), text);
}

/// Relative L2 error over the ids the fixture kept (every `stride`th and the top 16),
/// and of the row's norm.
fn row_errors(got: &[f32], row: &Value, stride: usize) -> (f64, f64) {
    let mut pairs: Vec<(f64, f64)> = row["strided"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(k, v)| (got[k * stride] as f64, v.as_f64().unwrap()))
        .collect();
    for t in row["top"].as_array().unwrap() {
        pairs.push((got[t[0].as_u64().unwrap() as usize] as f64, t[1].as_f64().unwrap()));
    }
    let num: f64 = pairs.iter().map(|(g, w)| (g - w).powi(2)).sum();
    let den: f64 = pairs.iter().map(|(_, w)| w * w).sum();
    let norm: f64 = got.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let want_norm = row["norm"].as_f64().unwrap();
    ((num / den).sqrt(), (norm - want_norm).abs() / want_norm)
}

#[test]
fn logits_and_greedy_tokens_match_transformers() {
    let source = source();
    let vocab = source.config.vocab_size;
    let stride = expected()["stride"].as_u64().unwrap() as usize;
    let mut worst = 0.0f64;
    for case in expected()["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let ids = u32s(&case["ids"]);
        let rows = case["rows"].as_array().unwrap();
        let first = rows[0]["position"].as_u64().unwrap() as usize;
        let mut model = load(&source, ids.len() + 64, None);
        let mut seq = Sequence { tokens: ids.clone(), computed: 0 };
        let logits = seq.prefill(&mut model, |p| p >= first);
        for (i, row) in rows.iter().enumerate() {
            let (err, norm_err) = row_errors(&logits[i * vocab..(i + 1) * vocab], row, stride);
            worst = worst.max(err);
            assert!(
                err <= 1e-3 && norm_err <= 1e-3,
                "{prompt:?} position {}: logits rel err {err:.2e}, norm {norm_err:.2e}",
                first + i
            );
        }
        let last = &logits[(rows.len() - 1) * vocab..];
        let want = u32s(&case["greedy"]);
        let got = seq.greedy(&mut model, last, want.len(), &[]);
        assert_eq!(
            got,
            want,
            "{prompt:?}: greedy tokens ({:?} vs {:?})",
            source.tokenizer.decode(&got, false),
            source.tokenizer.decode(&want, false)
        );
    }
    eprintln!("largest logits relative error against transformers: {worst:.2e}");
}

#[test]
fn perplexity_is_within_one_percent_of_transformers() {
    let source = source();
    let vocab = source.config.vocab_size;
    let ppl = &expected()["perplexity"];
    let ids = u32s(&ppl["ids"]);
    assert!(ids.len() >= 2000, "{} tokens", ids.len());
    let mut model = load(&source, ids.len(), None);
    let mut seq = Sequence { tokens: ids.clone(), computed: 0 };
    // Chunk by chunk: every row predicts the next token.
    let mut nll = 0.0f64;
    let mut done = 0;
    while seq.computed < ids.len() {
        let upto = (seq.computed + CHUNK).min(ids.len());
        let from = seq.computed;
        let logits = seq.run(&mut model, upto, &[], |p| p + 1 < ids.len());
        for (r, row) in logits.chunks(vocab).enumerate() {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
            let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
            nll -= row[ids[from + r + 1] as usize] as f64 - max - sum.ln();
            done += 1;
        }
    }
    let ours = (nll / done as f64).exp();
    let theirs = ppl["perplexity"].as_f64().unwrap();
    eprintln!("perplexity over {} tokens: ours {ours:.4}, transformers {theirs:.4}", ids.len());
    assert!(
        (ours - theirs).abs() / theirs <= 0.01,
        "perplexity {ours:.4} vs transformers' {theirs:.4}"
    );
}

/// About 6K tokens of filler with a 5-digit pass key in the middle, asked for at the end.
fn passkey_prompt(key: &str) -> String {
    let filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
    let mut text = String::from(
        "There is an important piece of information hidden inside a lot of irrelevant text. \
         Find it and memorize it. I will quiz you about it.\n",
    );
    for i in 0..250 {
        if i == 100 {
            text += &format!("The pass key is {key}. Remember it. {key} is the pass key. ");
        }
        text += filler;
    }
    text + "\nWhat is the pass key? The pass key is"
}

#[test]
fn passkey_in_6k_tokens_is_found_dense_and_sparse() {
    let source = source();
    let key = "68143";
    let prompt = passkey_prompt(key);
    let ids = source.tokenizer.encode(&prompt, true).unwrap();
    assert!((5500..7000).contains(&ids.len()), "{} tokens", ids.len());
    let policy = SparsePolicy::default();
    let mut model = load(&source, ids.len() + 16, Some(policy));
    let mut seq = Sequence { tokens: ids.clone(), computed: 0 };
    let started = std::time::Instant::now();
    let last = seq.prefill(&mut model, |p| p + 1 == ids.len());
    eprintln!("prefill of {} tokens: {:.1} s", ids.len(), started.elapsed().as_secs_f64());
    let dense = seq.greedy(&mut model, &last, 8, &[]);
    let dense_text = source.tokenizer.decode(&dense, true).unwrap();
    // Sparse: the same prompt's KV, decoding again from its end with budget 0.3.
    seq.tokens.truncate(ids.len());
    seq.computed = ids.len();
    let keep = policy.pages_to_keep(SparseBudget::Fraction(0.3), ids.len() + 1, PAGE_SIZE).unwrap();
    let sparse = seq.greedy(&mut model, &last, 8, &[keep as i32]);
    let sparse_text = source.tokenizer.decode(&sparse, true).unwrap();
    eprintln!("dense: {dense_text:?}, sparse (0.3, {keep} pages): {sparse_text:?}");
    assert!(dense_text.contains(key), "dense answer {dense_text:?}");
    assert!(sparse_text.contains(key), "sparse answer {sparse_text:?}");
}

#[test]
fn a_truncated_or_corrupt_file_is_refused_with_the_reason() {
    let bytes = std::fs::read(smollm2_path()).unwrap();
    let dir = std::env::temp_dir().join(format!("rs-smollm2-cut-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cut.gguf");
    let open = |b: &[u8]| {
        std::fs::write(&path, b).unwrap();
        ModelSource::open(path.to_str().unwrap()).err().expect("must fail").to_string()
    };
    // Cut inside the token list, then inside the tensor data.
    let err = open(&bytes[..1 << 20]);
    assert!(err.contains("cut.gguf") && err.contains("truncated"), "{err}");
    let err = open(&bytes[..bytes.len() - 1000]);
    assert!(err.contains("truncated") && err.contains("tensor"), "{err}");
    let mut garbled = bytes[..4 << 20].to_vec();
    garbled[4..8].copy_from_slice(&7u32.to_le_bytes());
    assert!(open(&garbled).contains("version 7"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// FP8 weights (quantized per output channel at load, as `--quantization fp8`), alone and
/// with an FP8 KV cache (scales 1.0, as vLLM without checkpoint scales), against the f32
/// model on the CPU: the greedy token of three chat prompts over 256 steps, each fed the
/// f32 model's choice. The CPU keeps activations in f32, so this is the weights' (and the
/// cache's) share of the FP8 issue's agreement rate; the GPU's FP8 GEMMs also quantize
/// activations per token (`gpu_smollm2`). Asserted at 75%, far over what a wrong scale or
/// layout gives (near 0).
#[test]
fn fp8_weights_and_kv_agree_with_f32_over_256_greedy_steps() {
    use paged_batch::{Batch, PS};
    use radix_model::fp8::KvScales;
    const STEPS: usize = 256;
    let src = source();
    let cfg = src.config.clone();
    let seqs = chat_prompts(
        &src,
        &["What is the capital of France?", "Write a haiku about the sea.", "Tell me a story."],
    );
    let spec = KvPoolSpec { num_pages: 256, page_size: PS, sparse: None };
    let with_pool = |mut m: LlamaModel<CpuBackend>, kv_fp8: bool| {
        if kv_fp8 {
            m.backend.set_kv_cache_fp8(KvScales::ones(cfg.num_layers)).unwrap();
        }
        m.backend.init_kv(&cfg, &spec).unwrap();
        m
    };
    let mut f32_model = with_pool(src.load(CpuBackend::new()).unwrap(), false);
    let fp8_source = || source().quantize_fp8().unwrap();
    let mut weights = with_pool(fp8_source().load(CpuBackend::new()).unwrap(), false);
    let mut both = with_pool(fp8_source().load(CpuBackend::new()).unwrap(), true);
    let vocab = cfg.vocab_size;
    let mut batch = Batch { computed: vec![0; seqs.len()], seqs, sparse: None };
    // (The engine's greedy choice: the first largest logit.)
    use radix_model::sampling::argmax;
    let (mut same_w, mut same_b, mut total) = (0usize, 0usize, 0usize);
    for i in 0..STEPS {
        let want = batch.step(&mut f32_model);
        let (w, b) = (batch.step(&mut weights), batch.step(&mut both));
        assert!(w.iter().chain(&b).all(|x| x.is_finite()), "step {i}: non-finite FP8 logits");
        for s in 0..batch.seqs.len() {
            let row = s * vocab..(s + 1) * vocab;
            let next = argmax(&want[row.clone()]);
            same_w += usize::from(argmax(&w[row.clone()]) == next);
            same_b += usize::from(argmax(&b[row]) == next);
            total += 1;
            batch.computed[s] = batch.seqs[s].len();
            batch.seqs[s].push(next);
        }
    }
    let (rate_w, rate_b) = (same_w as f64 / total as f64, same_b as f64 / total as f64);
    eprintln!(
        "SmolLM2 on the CPU, greedy agreement with f32 over {STEPS} steps: FP8 weights \
         {same_w}/{total} ({:.1}%), FP8 weights and KV {same_b}/{total} ({:.1}%)",
        100.0 * rate_w,
        100.0 * rate_b
    );
    assert!(rate_w >= 0.75 && rate_b >= 0.75, "greedy agreement {rate_w:.3} / {rate_b:.3}");
}
