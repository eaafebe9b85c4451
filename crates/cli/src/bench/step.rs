//! `bench step`: the time of one decode step of a full batch, split into GEMMs,
//! attention, KV append, norms, sampling, the other small ops and host gaps, beside the
//! step's floor: (weight bytes + KV bytes read) / the device-copy bandwidth of this run.
//! The split comes from eager steps with events around every op; the same steps are then
//! timed replayed from a CUDA graph, as the engine runs them.

use clap::Args;
use radix_model::cuda::OpTimes;
use radix_model::{
    Backend, CudaBackend, KvPoolSpec, LlamaModel, ModelConfig, SampleRequest, SamplingParams, Step,
    TokenCounts,
};

use super::decode::copy_bandwidth;
use super::{Measurement, write_json};

#[derive(Args)]
pub struct StepArgs {
    #[arg(long, default_value = "synthetic:llama3-8b")]
    model: String,
    /// Requests decoding together; several (`1,16,64`) are timed one after another on one
    /// loaded model (each at every --context).
    #[arg(long, value_delimiter = ',', default_value = "256")]
    batch: Vec<usize>,
    /// Tokens already in each request's KV cache; several (`1024,8192,32768`) are timed
    /// one after another on one loaded model.
    #[arg(long, value_delimiter = ',', default_value = "512")]
    context: Vec<usize>,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 16)]
    page_size: usize,
    /// `fp8`: the linear layers quantized to FP8 at load (as `serve --quantization fp8`).
    #[arg(long, value_enum)]
    quantization: Option<crate::engine_args::Quantization>,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Replays one more graph step of each shape, untimed, between cuProfilerStart/Stop,
    /// for a profiler started with `--profile-from-start off` (`ncu` times each kernel).
    #[arg(long)]
    profile_step: bool,
}

pub fn run(a: StepArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !a.batch.is_empty()
            && a.batch.iter().all(|&b| b > 0)
            && !a.context.is_empty()
            && a.context.iter().all(|&c| c > 0),
        "bench step needs --batch and every --context above 0"
    );
    let mut source = crate::engine_args::open_model(&a.model)?;
    if a.quantization.is_some() {
        source = source.quantize_fp8()?;
    }
    let cfg = source.config.clone();
    let mut model: LlamaModel<CudaBackend> = source.load(CudaBackend::new(0)?)?;
    let mut rows = Vec::new();
    for &batch in &a.batch {
        for &context in &a.context {
            rows.push(step_at(&mut model, &cfg, &a, batch, context)?);
        }
    }
    write_json(a.json.as_ref(), &rows)
}

/// Fills `batch` contexts of `context` tokens, then times decode steps over them.
fn step_at(
    model: &mut LlamaModel<CudaBackend>,
    cfg: &ModelConfig,
    a: &StepArgs,
    batch: usize,
    context: usize,
) -> anyhow::Result<Measurement> {
    let ps = a.page_size;
    let per_seq = (context + 2 * a.steps + 4).div_ceil(ps);
    model.backend.set_graph_max_batch(batch);
    let spec = KvPoolSpec { num_pages: batch * per_seq, page_size: ps, sparse: None };
    let kv = model.backend.init_kv(cfg, &spec)?;
    let copy_bw = copy_bandwidth(model.backend.device())?;

    // Sequence b owns pages b*per_seq..; the CSR table of sequences `ids`, `len` tokens each.
    let table = |ids: &[usize], len: usize| -> (Vec<i32>, Vec<i32>, Vec<i32>) {
        let pages = len.div_ceil(ps);
        let indices: Vec<i32> =
            ids.iter().flat_map(|&b| (0..pages).map(move |p| (b * per_seq + p) as i32)).collect();
        let indptr: Vec<i32> = (0..=ids.len()).map(|i| (i * pages) as i32).collect();
        let last = vec![(len - (pages - 1) * ps) as i32; ids.len()];
        (indptr, indices, last)
    };
    let slot = |b: usize, pos: usize| ((b * per_seq + pos / ps) * ps + pos % ps) as i32;
    // Fill every context with prefill chunks of about 8K tokens; every chunk after the first
    // is profiled (where a prompt step's time goes).
    let seqs_per_chunk = (8192 / context.max(1)).max(1);
    let chunks = batch.div_ceil(seqs_per_chunk);
    for first in (0..batch).step_by(seqs_per_chunk) {
        if first == seqs_per_chunk {
            model.backend.set_profiling(true);
        }
        let ids: Vec<usize> = (first..(first + seqs_per_chunk).min(batch)).collect();
        let tokens: Vec<u32> = ids
            .iter()
            .flat_map(|&b| (0..context).map(move |p| ((b * 31 + p * 7) % 1000 + 10) as u32))
            .collect();
        let positions: Vec<i32> = ids.iter().flat_map(|_| 0..context as i32).collect();
        let slots: Vec<i32> =
            ids.iter().flat_map(|&b| (0..context).map(move |p| slot(b, p))).collect();
        let (kv_indptr, kv_indices, kv_last_page_len) = table(&ids, context);
        let step = Step {
            tokens,
            positions,
            slots,
            qo_indptr: (0..=ids.len()).map(|i| (i * context) as i32).collect(),
            kv_indptr,
            kv_indices,
            kv_last_page_len,
            logit_rows: Vec::new(),
            kv_keep: Vec::new(),
        };
        model.forward(&step)?;
    }
    if let Some(times) = model.backend.op_times_now()? {
        model.backend.set_profiling(false);
        let n = (chunks - 1) as f64;
        println!(
            "prefill chunks of {} tokens ({} profiled, eager): {:.3} ms each on the GPU",
            seqs_per_chunk * context,
            chunks - 1,
            times.total_ms() / n
        );
        print_op_split(&times, n, false);
    }

    let params = SamplingParams::greedy();
    let counts = TokenCounts::default();
    let requests: Vec<SampleRequest> =
        (0..batch).map(|b| SampleRequest::new(&params, &counts, b as u64, 0)).collect();
    let mut times = None;
    let mut walls = Vec::new();
    let mut graph_walls = Vec::new();
    // Step 0 warms up; 1..=steps are profiled (eager); two more warm up and capture the
    // graph; the last `steps` replay it.
    let graph_start = a.steps + 3;
    // With --profile-step, one more replay, bracketed for the profiler and not timed.
    let profiled = graph_start + a.steps;
    for s in 0..profiled + usize::from(a.profile_step) {
        if s == 1 {
            model.backend.set_profiling(true);
        }
        if s == a.steps + 1 {
            model.backend.set_profiling(false);
        }
        let ctx = context + s;
        let all: Vec<usize> = (0..batch).collect();
        let (kv_indptr, kv_indices, kv_last_page_len) = table(&all, ctx);
        let step = Step {
            tokens: (0..batch).map(|b| ((b + s) % 1000 + 10) as u32).collect(),
            positions: vec![(ctx - 1) as i32; batch],
            slots: (0..batch).map(|b| slot(b, ctx - 1)).collect(),
            qo_indptr: (0..=batch as i32).collect(),
            kv_indptr,
            kv_indices,
            kv_last_page_len,
            logit_rows: (0..batch as u32).collect(),
            kv_keep: Vec::new(),
        };
        let bracket = s == profiled;
        if bracket {
            radix_gpu::profiler_range(model.backend.device(), true)?;
        }
        let t = std::time::Instant::now();
        model.forward(&step)?;
        model.sample(&requests)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if bracket {
            radix_gpu::profiler_range(model.backend.device(), false)?;
        }
        if (1..=a.steps).contains(&s) {
            walls.push(ms);
        }
        if s >= graph_start && !bracket {
            graph_walls.push(ms);
        }
        if s == a.steps {
            times = model.backend.op_times();
        }
    }
    let times = times.expect("profiling was on");
    anyhow::ensure!(
        model.backend.graph_stats().1 >= a.steps as u64,
        "the decode steps did not replay a CUDA graph"
    );
    graph_walls.sort_by(f64::total_cmp);
    let graph_wall = graph_walls.iter().sum::<f64>() / graph_walls.len() as f64;
    let n = a.steps as f64;
    walls.sort_by(f64::total_cmp);
    let wall = walls.iter().sum::<f64>() / n;
    let gpu = times.total_ms() / n;
    // What the GPU holds (FP8 linear layers read one byte per weight).
    let weight_bytes = model.backend.weight_bytes() as f64;
    let kv_bytes = batch as f64 * (context as f64 + n / 2.0) * (kv.bytes_per_page() / ps) as f64;
    let floor_ms = (weight_bytes + kv_bytes) / copy_bw * 1e3;
    println!(
        "decode step: batch {} at context ~{}, {} on {}",
        batch,
        context,
        a.model,
        model.backend.name()
    );
    println!(
        "  wall, CUDA graph   {graph_wall:8.3} ms   ({:.0} tok/s)",
        batch as f64 / graph_wall * 1e3
    );
    println!("  wall, eager        {wall:8.3} ms   (profiled; split below)");
    print_op_split(&times, n, true);
    println!("  host gaps, eager   {:8.3} ms", wall - gpu);
    println!("  graph vs GPU sum   {:8.3} ms", graph_wall - gpu);
    println!(
        "  floor              {floor_ms:8.3} ms   (weights {:.1} GB + KV {:.1} GB at {:.0} GB/s copy)",
        weight_bytes / 1e9,
        kv_bytes / 1e9,
        copy_bw / 1e9
    );
    Ok(Measurement {
        benchmark: "decode_step_breakdown".into(),
        shape: format!(
            "{}{} batch={} context={}",
            a.model,
            if a.quantization.is_some() { " fp8" } else { "" },
            batch,
            context
        ),
        ours: graph_wall,
        unit: "ms".into(),
        median_ms: graph_walls[graph_walls.len() / 2],
        device: model.backend.name(),
        extra: Some(serde_json::json!({
            "gemm_ms": times.gemm_ms / n,
            "attention_ms": times.attention_ms / n,
            "kv_append_ms": times.kv_append_ms / n,
            "norm_ms": times.norm_ms / n,
            "sample_ms": times.sample_ms / n,
            "other_ms": times.other_ms / n,
            "host_gap_ms": wall - gpu,
            "eager_wall_ms": wall,
            "graph_wall_ms": graph_wall,
            "graph_minus_gpu_ms": graph_wall - gpu,
            "floor_ms": floor_ms,
            "copy_gbps": copy_bw / 1e9,
            "weight_gb": weight_bytes / 1e9,
            "kv_gb": kv_bytes / 1e9,
        })),
    })
}

/// GPU time per op category of `times`, per one of `n` steps (with `sampling`: its line too;
/// prefill chunks sample nothing).
fn print_op_split(times: &OpTimes, n: f64, sampling: bool) {
    for (name, ms) in [
        ("GEMMs", Some(times.gemm_ms)),
        ("attention", Some(times.attention_ms)),
        ("KV append", Some(times.kv_append_ms)),
        ("norms", Some(times.norm_ms)),
        ("sampling", sampling.then_some(times.sample_ms)),
        ("other ops", Some(times.other_ms)),
    ] {
        if let Some(ms) = ms {
            println!("  {name:<18} {:8.3} ms", ms / n);
        }
    }
}
