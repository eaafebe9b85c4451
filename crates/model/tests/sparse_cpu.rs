//! Sparse paging on the CPU backend (synthetic:tiny, pages of 16): keeping every page is
//! dense to the bit, a smaller budget stays close to dense, a tiny one moves the logits,
//! and malformed `kv_keep` is refused with a clear message.

mod numerics;

use numerics::rel_err;
use radix_kv::SparsePolicy;
use radix_model::{Backend, CpuBackend, KvPoolSpec, LlamaModel, ModelError, ModelSource, Step};

const PAGE_SIZE: usize = 16;
const POOL_PAGES: usize = 64;

fn model(sparse: Option<SparsePolicy>) -> LlamaModel<CpuBackend> {
    let source = ModelSource::open("synthetic:tiny").unwrap();
    let cfg = source.config.clone();
    let mut model = source.load(CpuBackend::new()).unwrap();
    let spec = KvPoolSpec { num_pages: POOL_PAGES, page_size: PAGE_SIZE, sparse };
    model.backend.init_kv(&cfg, &spec).unwrap();
    model
}

fn policy(dense_layers: usize) -> SparsePolicy {
    SparsePolicy { sink_pages: 1, window_pages: 2, min_context_tokens: 64, dense_layers }
}

/// One sequence on pages 0, 1, 2, ...: computes the tokens not yet cached, returns the
/// last token's logits.
struct Sequence {
    tokens: Vec<u32>,
    computed: usize,
}

impl Sequence {
    fn new(len: usize) -> Self {
        let text = "Sparse paging keeps the pages whose keys can score highest. ".repeat(20);
        Self { tokens: text.bytes().take(len).map(u32::from).collect(), computed: 0 }
    }

    fn pages(&self) -> usize {
        self.tokens.len().div_ceil(PAGE_SIZE)
    }

    fn try_step(
        &mut self,
        model: &mut LlamaModel<CpuBackend>,
        kv_keep: &[i32],
    ) -> Result<Vec<f32>, ModelError> {
        let total = self.tokens.len();
        let positions: Vec<i32> = (self.computed..total).map(|p| p as i32).collect();
        let pages = self.pages();
        let kv_indices: Vec<i32> = (0..pages as i32).collect();
        let last = (total - (pages - 1) * PAGE_SIZE) as i32;
        let n = positions.len();
        let step = Step {
            tokens: self.tokens[self.computed..].to_vec(),
            positions: positions.clone(),
            slots: positions, // page p holds positions p*16.., contiguously
            qo_indptr: vec![0, n as i32],
            kv_indptr: vec![0, pages as i32],
            kv_indices,
            kv_last_page_len: vec![last],
            logit_rows: vec![n as u32 - 1],
            kv_keep: kv_keep.to_vec(),
        };
        let logits = model.forward_logits(&step)?;
        self.computed = total;
        Ok(logits)
    }

    fn step(&mut self, model: &mut LlamaModel<CpuBackend>, kv_keep: &[i32]) -> Vec<f32> {
        self.try_step(model, kv_keep).unwrap()
    }
}

/// Prefills `prompt` tokens on a dense model and on `sparse`, then decodes `steps`
/// tokens on both, the sparse one with `keep(pages)`; the logits rel errors per step.
fn decode_errors(
    sparse: &mut LlamaModel<CpuBackend>,
    prompt: usize,
    steps: usize,
    keep: impl Fn(usize) -> Vec<i32>,
) -> Vec<f64> {
    let mut dense = model(None);
    let (mut a, mut b) = (Sequence::new(prompt), Sequence::new(prompt));
    // Prefill attends densely (a sparse keep on a prefill row is refused:
    // `malformed_kv_keep_is_refused_clearly`).
    assert_eq!(a.step(&mut dense, &[]), b.step(sparse, &[]));
    let mut errors = Vec::new();
    for s in 0..steps {
        let token = 40 + s as u32 * 7;
        a.tokens.push(token);
        b.tokens.push(token);
        let want = a.step(&mut dense, &[]);
        let got = b.step(sparse, &keep(b.pages()));
        assert!(got.iter().all(|x| x.is_finite()));
        errors.push(rel_err(&got, &want));
    }
    errors
}

#[test]
fn keeping_every_page_is_dense_to_the_bit() {
    // 600 tokens = 38 pages; decode steps with keep 0, all pages, more, and no kv_keep.
    for keep in [
        Box::new(|_| vec![0]) as Box<dyn Fn(usize) -> Vec<i32>>,
        Box::new(|pages| vec![pages as i32]),
        Box::new(|pages| vec![pages as i32 + 5]),
        Box::new(|_| Vec::new()),
    ] {
        let errors = decode_errors(&mut model(Some(policy(0))), 600, 3, keep);
        assert!(errors.iter().all(|&e| e == 0.0), "{errors:?}");
    }
    // Every layer dense (tiny has 2): any keep is dense.
    let errors = decode_errors(&mut model(Some(policy(2))), 600, 3, |_| vec![3]);
    assert!(errors.iter().all(|&e| e == 0.0), "{errors:?}");
}

#[test]
fn a_smaller_budget_stays_close_and_a_tiny_one_moves_the_logits() {
    let mut report = Vec::new();
    for dense_layers in [0, 1] {
        for (name, frac) in [("half", 0.5), ("quarter", 0.25)] {
            let keep = |pages: usize| vec![((pages as f64 * frac).ceil() as i32).max(3)];
            let errors = decode_errors(&mut model(Some(policy(dense_layers))), 600, 4, keep);
            report.push((dense_layers, name, errors));
        }
        let tiny = decode_errors(&mut model(Some(policy(dense_layers))), 600, 4, |_| vec![3]);
        report.push((dense_layers, "3 pages", tiny));
    }
    for (dense_layers, name, errors) in &report {
        let fmt: Vec<String> = errors.iter().map(|e| format!("{e:.2e}")).collect();
        eprintln!("dense_layers {dense_layers}, keep {name:8}: logits rel err {}", fmt.join(" "));
    }
    // Measured on synthetic:tiny (38-39 pages, 4 decode steps), logits rel err:
    //   dense_layers 1: half 2-4e-2, quarter 5-7e-2, 3 pages 2.8-3.2e-1
    //   dense_layers 0: half 1.1-1.4e-1, quarter 1.9-2.1e-1, 3 pages 3.5-4.2e-1
    // Its random weights attend diffusely (mass spreads over all pages), so dropping
    // pages costs more than on a trained model; the bounds leave ~2x margin.
    let mean = |i: usize| report[i].2.iter().sum::<f64>() / report[i].2.len() as f64;
    let max = |i: usize| report[i].2.iter().cloned().fold(0.0, f64::max);
    for (base, half_tol, quarter_tol) in [(0, 0.25, 0.4), (3, 0.07, 0.13)] {
        let dense_layers = report[base].0;
        assert!(max(base) <= half_tol, "dense_layers {dense_layers}: half {:.2e}", max(base));
        assert!(
            max(base + 1) <= quarter_tol,
            "dense_layers {dense_layers}: quarter {:.2e}",
            max(base + 1)
        );
        // Fewer pages, larger error; 3 pages of 39 moves the logits clearly.
        assert!(0.0 < mean(base) && mean(base) < mean(base + 1) && mean(base + 1) < mean(base + 2));
        assert!(
            mean(base + 2) > 0.1,
            "dense_layers {dense_layers}: 3 pages {:.2e}",
            mean(base + 2)
        );
    }
    // A dense first layer brings the logits closer.
    for i in 0..3 {
        assert!(mean(i + 3) < mean(i));
    }
}

#[test]
fn malformed_kv_keep_is_refused_clearly() {
    // The same checks as the CUDA backend (`Step::sparse_rows`).
    let mut m = model(Some(policy(1)));
    let mut seq = Sequence::new(100);
    // A prefill row cannot attend sparsely.
    let err = seq.try_step(&mut m, &[4]).unwrap_err().to_string();
    assert!(err.contains("100 queries: only decode rows attend sparsely"), "{err}");
    seq.step(&mut m, &[]);
    seq.tokens.push(65); // one decode token: 101 tokens, 7 pages
    let err = seq.try_step(&mut m, &[3, 3]).unwrap_err().to_string();
    assert!(err.contains("kv_keep has 2 entries for a batch of 1"), "{err}");
    let err = seq.try_step(&mut m, &[-1]).unwrap_err().to_string();
    assert!(err.contains("negative"), "{err}");
    // Fewer pages than the sink (1) and the window (2) cannot be honoured.
    let err = seq.try_step(&mut m, &[2]).unwrap_err().to_string();
    assert!(err.contains("keeps 2 of its 7 pages, fewer than the 3 sink and window"), "{err}");
    seq.step(&mut m, &[3]);
    // With sparse paging off, sparse rows are refused; dense counts pass.
    let mut dense = model(None);
    let mut seq = Sequence::new(100);
    seq.step(&mut dense, &[]);
    seq.tokens.push(65);
    let err = seq.try_step(&mut dense, &[1, 1]).unwrap_err().to_string();
    assert!(err.contains("kv_keep has 2 entries"), "{err}");
    let err = seq.try_step(&mut dense, &[4]).unwrap_err().to_string();
    assert!(err.contains("keeps 4 of its 7 pages but sparse paging is off"), "{err}");
    seq.step(&mut dense, &[7]);
}

#[test]
fn the_probe_records_each_layers_last_queries() {
    let mut m = model(None);
    let cfg = m.config.clone();
    let mut seq = Sequence::new(40);
    seq.step(&mut m, &[]);
    assert!(m.backend.probe_queries(0).is_none());
    m.backend.set_probe(true);
    seq.tokens.push(65);
    seq.step(&mut m, &[]);
    for layer in 0..cfg.num_layers {
        let q = m.backend.probe_queries(layer).unwrap();
        assert_eq!(q.len(), cfg.num_heads * cfg.head_dim);
        assert!(q.iter().all(|x| x.is_finite()) && q.iter().any(|&x| x != 0.0));
    }
    let (k, v) = m.backend.page_kv(1, 2).unwrap();
    let n = cfg.num_kv_heads * PAGE_SIZE * cfg.head_dim;
    assert_eq!((k.len(), v.len()), (n, n));
    // Page 2 holds tokens 32..41 (the rest of its slots are empty).
    let filled = 41 - 2 * PAGE_SIZE;
    assert!(k[..filled * cfg.head_dim].iter().all(|&x| x != 0.0));
    assert!(k[filled * cfg.head_dim..PAGE_SIZE * cfg.head_dim].iter().all(|&x| x == 0.0));
    assert!(m.backend.page_kv(1, POOL_PAGES).is_none());
    assert!(m.backend.page_kv(cfg.num_layers, 0).is_none());
}
