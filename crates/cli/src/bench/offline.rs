//! `bench offline`: every prompt of a dataset through the engine at once (ignore_eos,
//! each prompt's own output length), as vLLM's and SGLang's offline throughput
//! benchmarks do; reports throughput, peak KV pages and where the time went.

use clap::Args;
use radix_engine::{Request, RequestId, StopConfig};
use radix_model::SamplingParams;

use super::dataset;
use super::roofline::roofline;
use super::{Measurement, progress, write_json};
use crate::engine_args::ModelArgs;

#[derive(Args)]
pub struct OfflineArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// synthetic-sharegpt, random:IN:OUT, shared-prefix:GROUPS:PREFIX:QUESTION:OUT,
    /// lengths:FILE, or a ShareGPT JSON file.
    #[arg(long, default_value = "synthetic-sharegpt")]
    dataset: String,
    #[arg(long, default_value_t = 1000)]
    num_prompts: usize,
    /// Sampling temperature (vLLM's benchmark samples at 1.0).
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run the dataset once per value of --max-running listed here (comma-separated),
    /// loading the model once.
    #[arg(long, value_delimiter = ',')]
    sweep_max_running: Vec<usize>,
    /// Roofline: device-copy bandwidth in GB/s (an H100 SXM measures about 2990).
    #[arg(long, default_value_t = 2990.0)]
    roofline_copy_gbps: f64,
    /// Roofline: dense bf16 GEMM rate in TFLOP/s (cuBLASLt reaches 740-790 on the
    /// H100 at Llama-3-8B shapes, bench gemm).
    #[arg(long, default_value_t = 750.0)]
    roofline_tflops: f64,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Every request asks for a JSON object (`response_format: json_object`): the cost
    /// of structured output, beside the same run without. Requests then end where the
    /// grammar does (at most their output length); rates count the tokens generated.
    #[arg(long)]
    json_object: bool,
    /// Writes each request's (prompt, generated) token counts as a `lengths:` dataset:
    /// the unconstrained run over it does the same work as a --json-object run, which
    /// makes the two comparable (a grammar ends requests early).
    #[arg(long)]
    lengths_out: Option<std::path::PathBuf>,
}

pub fn run(mut args: OfflineArgs) -> anyhow::Result<()> {
    args.model.max_waiting = args.model.max_waiting.max(args.num_prompts);
    let loaded = args.model.load_runner()?;
    let tokenizer = std::sync::Arc::new(loaded.tokenizer);
    let name = loaded.name;
    let mut runner = Some(loaded.runner);
    let sweep: Vec<Option<usize>> = if args.sweep_max_running.is_empty() {
        vec![args.model.max_running]
    } else {
        args.sweep_max_running.iter().map(|&m| Some(m)).collect()
    };
    for max_running in sweep {
        let mut cfg = args.model.engine_config(loaded.device, loaded.num_pages);
        if let Some(m) = max_running {
            cfg.max_running = m;
            cfg.max_batched_tokens = cfg.max_batched_tokens.max(m);
        }
        let engine = radix_engine::Engine::new(
            runner.take().expect("runner is back"),
            tokenizer.clone(),
            cfg,
        )?;
        runner = Some(run_once(&args, engine, &name, loaded.fp8_weights)?.into_runner());
    }
    Ok(())
}

fn run_once(
    args: &OfflineArgs,
    mut engine: radix_engine::Engine,
    name: &str,
    fp8_linear: bool,
) -> anyhow::Result<radix_engine::Engine> {
    let samples = dataset::load(&args.dataset, args.num_prompts, engine.tokenizer(), args.seed)?;
    let n = samples.len();
    let input_tokens: usize = samples.iter().map(|s| s.prompt.len()).sum();
    let output_tokens: usize = samples.iter().map(|s| s.output_len).sum();
    let lens: Vec<(usize, usize)> =
        samples.iter().map(|s| (s.prompt.len(), s.output_len)).collect();
    // Tensor parallelism splits every weight and kv head over the GPUs, which read and
    // multiply at once: the roofline of n GPUs is one GPU's at n times the rates (the
    // all-reduces it leaves out are what stands between).
    let gpus = args.model.tensor_parallel_size.max(1) as f64;
    let fp8_kv = args.model.fp8_kv_cache();
    let roof = roofline(
        engine.runner().config(),
        &lens,
        gpus * args.roofline_copy_gbps * 1e9,
        gpus * args.roofline_tflops * 1e12,
        fp8_linear,
        if fp8_kv { 1 } else { 2 },
    );
    let prompt_lens: Vec<usize> = lens.iter().map(|&(p, _)| p).collect();
    let mut sinks = Vec::with_capacity(n);
    for (i, s) in samples.into_iter().enumerate() {
        let sampling = SamplingParams {
            temperature: args.temperature,
            seed: Some(args.seed + i as u64),
            ..Default::default()
        };
        let stop = StopConfig { max_tokens: s.output_len, ignore_eos: true, ..Default::default() };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut req = Request::new(s.prompt, sampling, stop);
        if args.json_object {
            let spec = radix_engine::ConstraintSpec::JsonObject;
            req.constraint = Some(engine.grammars().compile(&spec).map_err(anyhow::Error::msg)?);
        }
        engine.add(RequestId(i as u64), req, tx)?;
        sinks.push(rx);
    }
    let bar = progress(n, "offline");
    let started = std::time::Instant::now();
    let before = engine.stats().clone();
    while engine.has_work() {
        engine.step();
        bar.set_position(engine.stats().requests_finished - before.requests_finished);
    }
    let secs = started.elapsed().as_secs_f64();
    // The outputs wait in their channels until the run is over: a server's receivers run
    // on other threads, so polling 1,000 of them after every step on the engine's thread
    // (about 0.1 s of a 13 s run) would time the harness, not the engine.
    let generated_by: Vec<usize> = sinks
        .iter_mut()
        .map(|rx| std::iter::from_fn(|| rx.try_recv().ok()).map(|out| out.token_ids.len()).sum())
        .collect();
    bar.finish_and_clear();
    let st = engine.stats();
    let generated = (st.generation_tokens_total - before.generation_tokens_total) as usize;
    anyhow::ensure!(
        generated == output_tokens || (args.json_object && generated <= output_tokens),
        "generated {generated} tokens, expected {output_tokens}"
    );
    if args.json_object {
        println!(
            "json_object       every request constrained; {generated} of {output_tokens} tokens \
             generated before the grammars ended"
        );
    }
    if let Some(path) = &args.lengths_out {
        let pairs: Vec<[usize; 2]> =
            prompt_lens.iter().zip(&generated_by).map(|(&p, &g)| [p, g.max(1)]).collect();
        let json = serde_json::json!({
            "source": format!("bench offline --dataset {} (tokens generated per request)", args.dataset),
            "lengths": pairs,
        });
        std::fs::write(path, serde_json::to_string(&json)?)
            .map_err(|e| anyhow::anyhow!("--lengths-out {}: {e}", path.display()))?;
    }
    let output_tokens = generated;
    let out_tps = output_tokens as f64 / secs;
    let total_tps = (input_tokens + output_tokens) as f64 / secs;
    let busy = st.forward_secs - before.forward_secs;
    let host = (st.schedule_secs - before.schedule_secs) + (st.process_secs - before.process_secs);
    let max_running = engine.config().max_running;
    println!("model {name} on {}, max running {max_running}", engine.runner().backend_name());
    println!(
        "dataset {} ({n} requests, {input_tokens} input and {output_tokens} output tokens)",
        args.dataset
    );
    println!("duration          {secs:.2} s in {} steps", st.steps - before.steps);
    println!("requests/s        {:.2}", n as f64 / secs);
    println!("input tokens/s    {:.0}", input_tokens as f64 / secs);
    println!("output tokens/s   {out_tps:.0}");
    println!("total tokens/s    {total_tps:.0}");
    println!(
        "peak KV pages     {} of {} ({} tokens each)",
        st.peak_pages_used,
        st.pages_total,
        engine.config().page_size
    );
    println!("preemptions       {}", st.preemptions - before.preemptions);
    let hits = st.cache_hit_tokens - before.cache_hit_tokens;
    println!(
        "prefix cache      {hits} of {input_tokens} prompt tokens served from it ({:.0}%)",
        100.0 * hits as f64 / input_tokens.max(1) as f64
    );
    println!(
        "time split        forward+sample {busy:.2} s ({:.0}%), host scheduling and output {host:.2} s ({:.0}%)",
        100.0 * busy / secs,
        100.0 * host / secs
    );
    let prefill_secs = st.prefill_secs - before.prefill_secs;
    let prefill_steps = st.prefill_steps - before.prefill_steps;
    let classes = ["1-64", "65-256", "257+"];
    let decode: Vec<(u64, f64)> = (0..3)
        .map(|c| {
            (st.decode_steps[c] - before.decode_steps[c], st.decode_secs[c] - before.decode_secs[c])
        })
        .collect();
    println!("steps with prompt tokens {prefill_steps:5}  {prefill_secs:7.2} s");
    for (class, (steps, secs)) in classes.iter().zip(&decode) {
        println!(
            "decode steps, batch {class:<6} {steps:5}  {secs:7.2} s  ({:.2} ms each)",
            1e3 * secs / (*steps).max(1) as f64
        );
    }
    let kv_dense = (st.kv_read_dense_bytes - before.kv_read_dense_bytes) as f64;
    let kv_read = (st.kv_read_bytes - before.kv_read_bytes) as f64;
    if kv_dense > 0.0 {
        println!(
            "sparse paging     budget {}: attention read {:.1} GB of KV (with key bounds) where dense reads {:.1} GB ({:.0}% less)",
            engine.config().sparse.map_or("off".into(), |s| s.budget.to_string()),
            kv_read / 1e9,
            kv_dense / 1e9,
            100.0 * (1.0 - kv_read / kv_dense)
        );
    }
    let on_gpu = engine.runner().backend_name().starts_with("cuda");
    if on_gpu {
        println!(
            "roofline          {:.2} s (prefill {:.2}, decode {:.2}) = {:.0} output tok/s at {:.0} GB/s and {:.0} TFLOP/s{}; this run reached {:.0}% of it",
            roof.total_s(),
            roof.prefill_s,
            roof.decode_s,
            output_tokens as f64 / roof.total_s(),
            args.roofline_copy_gbps,
            args.roofline_tflops,
            if gpus > 1.0 { format!(" per GPU x {gpus} GPUs") } else { String::new() },
            100.0 * roof.total_s() / secs
        );
    }
    let weights = if fp8_linear { " fp8" } else { "" };
    let kv = if fp8_kv { " kv=fp8" } else { "" };
    let shape = format!("{} n={n} {name}{weights}{kv} max_running={max_running}", args.dataset);
    write_json(
        args.json.as_ref(),
        &[Measurement {
            benchmark: "offline_throughput".into(),
            shape,
            ours: out_tps,
            unit: "output tok/s".into(),
            median_ms: secs * 1e3,
            device: engine.runner().backend_name(),
            extra: Some(serde_json::json!({
                "requests_per_s": n as f64 / secs,
                "input_tok_s": input_tokens as f64 / secs,
                "total_tok_s": total_tps,
                "duration_s": secs,
                "steps": st.steps - before.steps,
                "peak_kv_pages": st.peak_pages_used,
                "kv_pages": st.pages_total,
                "preemptions": st.preemptions - before.preemptions,
                "forward_sample_s": busy,
                "host_s": host,
                "roofline_s": roof.total_s(),
                "roofline_prefill_s": roof.prefill_s,
                "roofline_decode_s": roof.decode_s,
                "roofline_out_tok_s": output_tokens as f64 / roof.total_s(),
                "roofline_gpus": gpus,
                "fp8_linear": fp8_linear,
                "fp8_kv": fp8_kv,
                "sparse_budget": engine.config().sparse.map(|s| s.budget.to_string()),
                "kv_read_gb": kv_read / 1e9,
                "kv_read_dense_gb": kv_dense / 1e9,
                "prefill_steps": prefill_steps,
                "prefill_s": prefill_secs,
                "decode_steps_by_batch": {
                    "1-64": decode[0].0, "65-256": decode[1].0, "257+": decode[2].0,
                },
                "decode_s_by_batch": {
                    "1-64": decode[0].1, "65-256": decode[1].1, "257+": decode[2].1,
                },
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
            })),
        }],
    )?;
    Ok(engine)
}
