//! Tensor parallelism on the CPU backend: the logits of TP = 2 and 4 equal TP = 1's
//! within f32 rounding (only the order of the partial sums of O and down changes), over
//! prefill chunks of odd lengths and mixed prefill + decode batches through the paged KV
//! cache; for head counts that split, that need kv heads replicated, with q|k|v biases
//! and with a tied embedding. Bad sizes are errors that name the numbers.

mod tp_batch;

use radix_kernels::rope::RopeConfig;
use radix_model::synthetic::SyntheticWeights;
use radix_model::tp::{self, TpModel};
use radix_model::{Architecture, CpuBackend, KvPoolSpec, LlamaModel, ModelConfig, Step};

use tp_batch::Batch;

const PAGE: usize = 4;
const PAGES_PER_SEQ: usize = 16;

fn config(heads: usize, kv_heads: usize) -> ModelConfig {
    let head_dim = 16;
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 300,
        hidden_size: 96,
        intermediate_size: 160,
        num_layers: 2,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rms_norm_eps: 1e-5,
        rope: RopeConfig { head_dim, theta: 10000.0, llama3: None },
        max_position_embeddings: 4096,
        tie_word_embeddings: false,
        qkv_bias: false,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

/// A model run step by step: plain (no TP) or a group.
enum Runner {
    Plain(Box<LlamaModel<CpuBackend>>),
    Group(Box<TpModel<CpuBackend>>),
}

impl Runner {
    fn new(cfg: &ModelConfig, tp: Option<usize>) -> Self {
        let spec = KvPoolSpec { num_pages: 4 * PAGES_PER_SEQ, page_size: PAGE, sparse: None };
        match tp {
            None => {
                let mut m =
                    LlamaModel::load(cfg.clone(), CpuBackend::new(), &SyntheticWeights, |_, _| {})
                        .unwrap();
                m.init_kv(&spec).unwrap();
                Runner::Plain(Box::new(m))
            }
            Some(n) => {
                let mut m = tp::cpu_model(cfg, &SyntheticWeights, n).unwrap();
                m.init_kv(&spec).unwrap();
                Runner::Group(Box::new(m))
            }
        }
    }

    fn logits(&mut self, step: &Step) -> Vec<f32> {
        match self {
            Runner::Plain(m) => m.forward_logits(step).unwrap(),
            Runner::Group(m) => m.forward_logits(step).unwrap(),
        }
    }
}

/// Relative error of `got` against `want` (largest difference over largest value);
/// a NaN anywhere is infinite.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, &w| m.max(f64::from(w).abs()));
    let worst = got.iter().zip(want).fold(0f64, |m, (&g, &w)| {
        let d = f64::from(g) - f64::from(w);
        if d.is_nan() { f64::INFINITY } else { m.max(d.abs()) }
    });
    worst / scale
}

/// Prefill chunks of odd lengths, then a mixed batch (decodes beside a prefill chunk),
/// then decodes; every step's logits at each TP size against no TP.
fn check(name: &str, cfg: &ModelConfig, sizes: &[usize]) {
    let schedule: [&[usize]; 6] =
        [&[13, 0, 0], &[1, 7, 0], &[1, 1, 5], &[1, 1, 9], &[1, 1, 1], &[1, 1, 1]];
    let mut reference = Runner::new(cfg, None);
    let mut groups: Vec<(usize, Runner)> =
        sizes.iter().map(|&n| (n, Runner::new(cfg, Some(n)))).collect();
    let (mut a, mut b) = (Batch::new(3, PAGE, PAGES_PER_SEQ), Batch::new(3, PAGE, PAGES_PER_SEQ));
    for (i, new) in schedule.iter().enumerate() {
        let step = a.step(new);
        assert_eq!(step, b.step(new));
        let want = reference.logits(&step);
        assert_eq!(want.len(), step.logit_rows.len() * cfg.vocab_size);
        for (n, g) in &mut groups {
            let err = rel_err(&g.logits(&step), &want);
            assert!(err < 1e-5, "{name}, TP {n}, step {i}: logits relative error {err:.2e}");
        }
    }
}

#[test]
fn heads_that_split() {
    check("8 q / 4 kv heads", &config(8, 4), &[1, 2, 4]);
}

#[test]
fn kv_heads_replicated() {
    check("8 q / 2 kv heads", &config(8, 2), &[2, 4]);
    check("8 q / 1 kv head", &config(8, 1), &[2, 4]);
}

#[test]
fn biases_and_tied_embeddings() {
    let cfg = ModelConfig { qkv_bias: true, tie_word_embeddings: true, ..config(8, 4) };
    check("q|k|v biases, tied embedding", &cfg, &[2]);
}

#[test]
fn a_bad_step_fails_on_every_rank_and_the_group_recovers() {
    let cfg = config(8, 2);
    let mut g = tp::cpu_model(&cfg, &SyntheticWeights, 2).unwrap();
    g.init_kv(&KvPoolSpec { num_pages: 8, page_size: PAGE, sparse: None }).unwrap();
    let mut bad = Batch::new(1, PAGE, PAGES_PER_SEQ).step(&[3]);
    bad.tokens[1] = 1_000; // outside the vocabulary
    let e = g.forward(&bad).unwrap_err().to_string();
    assert!(e.contains("token id 1000"), "{e}");
    let good = Batch::new(1, PAGE, PAGES_PER_SEQ).step(&[3]);
    let mut reference = Runner::new(&cfg, None);
    let err = rel_err(&g.forward_logits(&good).unwrap(), &reference.logits(&good));
    assert!(err < 1e-5, "after an error: {err:.2e}");
}

#[test]
fn sizes_that_do_not_divide_are_errors_naming_the_numbers() {
    let e = tp::cpu_model(&config(8, 2), &SyntheticWeights, 3).err().unwrap().to_string();
    assert!(e.contains("8 attention heads") && e.contains("3 ranks"), "{e}");
    let e = tp::cpu_model(&config(12, 6), &SyntheticWeights, 4).err().unwrap().to_string();
    assert!(e.contains("6 kv heads") && e.contains("4 ranks"), "{e}");
    let e = tp::cpu_model(&config(8, 8), &SyntheticWeights, 0).err().unwrap().to_string();
    assert!(e.contains("at least 1"), "{e}");
}
