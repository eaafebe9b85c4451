//! `bench serve`: an online benchmark of a running server, as vLLM's and SGLang's serving
//! benchmarks measure one. Requests (token-id prompts, `max_tokens` = the sample's output
//! length, `ignore_eos`, streamed) arrive as a Poisson process at `--request-rate` (`inf`:
//! all at once), at most `--max-concurrency` in flight. Reported: duration, request and
//! token throughput, time to first token (TTFT), time per output token after the first
//! (TPOT), inter-token latency (ITL, between streamed chunks) and end-to-end latency,
//! each as mean, median and p99.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use rand::SeedableRng;
use rand_distr::{Distribution, Exp};
use serde_json::{Value, json};

use super::dataset::{self, Sample};
use super::{Measurement, progress, write_json};

#[derive(Args)]
pub struct ServeBenchArgs {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// synthetic-sharegpt, random:IN:OUT, or a ShareGPT JSON file.
    #[arg(long, default_value = "synthetic-sharegpt")]
    dataset: String,
    /// Requests per second (Poisson arrivals), or `inf` to send them all at once.
    #[arg(long, default_value = "inf", value_parser = parse_rate)]
    request_rate: f64,
    /// Requests in flight at most (default: no limit).
    #[arg(long)]
    max_concurrency: Option<usize>,
    #[arg(long, default_value_t = 200)]
    num_prompts: usize,
    /// The model name to send (default: the first of the server's /v1/models).
    #[arg(long)]
    model: Option<String>,
    /// Tokenizes ShareGPT files: a model folder, or synthetic:NAME (the byte tokenizer).
    #[arg(long, default_value = "synthetic:tiny")]
    tokenizer: String,
    /// Seeds the dataset and the arrival times.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, env = "RADIX_SPARSE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Append one JSON line with the results here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    if s.eq_ignore_ascii_case("inf") {
        return Ok(f64::INFINITY);
    }
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 => Ok(r),
        _ => Err(format!("{s:?}: expected a positive number of requests per second or `inf`")),
    }
}

/// What one request measured.
#[derive(Clone, Debug, Default)]
struct RequestResult {
    ok: bool,
    error: String,
    prompt_len: usize,
    output_len: usize,
    ttft: f64,
    /// Gaps between streamed chunks after the first (seconds).
    itl: Vec<f64>,
    latency: f64,
}

/// Mean, median and p99 of a list (milliseconds).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    pub mean_ms: f64,
    pub median_ms: f64,
    pub p99_ms: f64,
}

fn summarize(secs: &[f64]) -> Summary {
    if secs.is_empty() {
        return Summary::default();
    }
    let mut v: Vec<f64> = secs.iter().map(|s| s * 1e3).collect();
    v.sort_by(f64::total_cmp);
    // Linear interpolation between closest ranks (numpy's default).
    let pct = |p: f64| {
        let x = p / 100.0 * (v.len() - 1) as f64;
        let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
        v[lo] + (v[hi] - v[lo]) * (x - lo as f64)
    };
    Summary {
        mean_ms: v.iter().sum::<f64>() / v.len() as f64,
        median_ms: pct(50.0),
        p99_ms: pct(99.0),
    }
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    pub completed: usize,
    pub failed: usize,
    pub duration_s: f64,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub ttft: Summary,
    pub tpot: Summary,
    pub itl: Summary,
    pub e2e: Summary,
    #[serde(skip)]
    pub first_error: Option<String>,
}

/// How the benchmark sends.
struct Target {
    url: String,
    model: String,
    api_key: Option<String>,
    client: reqwest::Client,
}

/// Sends one streamed completion and times its chunks.
async fn send(target: &Target, sample: &Sample) -> RequestResult {
    let mut r = RequestResult { prompt_len: sample.prompt.len(), ..Default::default() };
    let body = json!({
        "model": target.model, "prompt": sample.prompt, "max_tokens": sample.output_len,
        "ignore_eos": true, "temperature": 0.0, "stream": true,
        "stream_options": {"include_usage": true},
    });
    let started = Instant::now();
    let mut req = target.client.post(format!("{}/v1/completions", target.url)).json(&body);
    if let Some(key) = &target.api_key {
        req = req.bearer_auth(key);
    }
    let resp = match req.send().await {
        Ok(resp) => resp,
        Err(e) => {
            r.error = format!("sending: {e}");
            return r;
        }
    };
    if !resp.status().is_success() {
        let status = resp.status();
        r.error = format!("HTTP {status}: {}", resp.text().await.unwrap_or_default());
        return r;
    }
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut last: Option<Instant> = None;
    let mut chunks = 0;
    let mut done = false;
    while let Some(piece) = stream.next().await {
        let piece = match piece {
            Ok(p) => p,
            Err(e) => {
                r.error = format!("reading the stream: {e}");
                return r;
            }
        };
        let now = Instant::now();
        buf.extend_from_slice(&piece);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            for data in text.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim) {
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else {
                    r.error = format!("a chunk is not JSON: {data}");
                    return r;
                };
                if !v["error"].is_null() {
                    r.error = format!("the server reported: {}", v["error"]);
                    return r;
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    r.output_len = n as usize;
                }
                if v["choices"].as_array().is_some_and(|c| !c.is_empty()) {
                    match last {
                        None => r.ttft = (now - started).as_secs_f64(),
                        Some(t) => r.itl.push((now - t).as_secs_f64()),
                    }
                    last = Some(now);
                    chunks += 1;
                }
            }
        }
    }
    r.latency = started.elapsed().as_secs_f64();
    if !done {
        r.error = "the stream ended without [DONE]".into();
        return r;
    }
    if r.output_len == 0 {
        r.output_len = chunks;
    }
    r.ok = true;
    r
}

/// Runs the benchmark against `target` with these samples.
async fn benchmark(
    target: Arc<Target>,
    samples: Vec<Sample>,
    rate: f64,
    max_concurrency: Option<usize>,
    seed: u64,
    bar: indicatif::ProgressBar,
) -> Report {
    let limit = max_concurrency.map(|c| Arc::new(tokio::sync::Semaphore::new(c.max(1))));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5EED);
    let gaps = Exp::new(if rate.is_finite() { rate } else { 1.0 }).ok();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(samples.len());
    let mut at = 0.0f64;
    for sample in samples {
        if rate.is_finite() {
            let wait = Duration::from_secs_f64(at).saturating_sub(started.elapsed());
            tokio::time::sleep(wait).await;
            at += gaps.as_ref().map_or(0.0, |g| g.sample(&mut rng));
        }
        let (target, limit, bar) = (target.clone(), limit.clone(), bar.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = match &limit {
                Some(s) => Some(s.clone().acquire_owned().await.expect("never closed")),
                None => None,
            };
            let r = send(&target, &sample).await;
            bar.inc(1);
            r
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(t.await.unwrap_or_else(|e| RequestResult {
            error: format!("the request task failed: {e}"),
            ..Default::default()
        }));
    }
    let duration = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    report(&results, duration)
}

fn report(results: &[RequestResult], duration: f64) -> Report {
    let ok: Vec<&RequestResult> = results.iter().filter(|r| r.ok).collect();
    let input: usize = ok.iter().map(|r| r.prompt_len).sum();
    let output: usize = ok.iter().map(|r| r.output_len).sum();
    let ttft: Vec<f64> = ok.iter().map(|r| r.ttft).collect();
    let tpot: Vec<f64> = ok
        .iter()
        .filter(|r| r.output_len > 1)
        .map(|r| (r.latency - r.ttft) / (r.output_len - 1) as f64)
        .collect();
    let itl: Vec<f64> = ok.iter().flat_map(|r| r.itl.iter().copied()).collect();
    let e2e: Vec<f64> = ok.iter().map(|r| r.latency).collect();
    let per_s = |x: f64| if duration > 0.0 { x / duration } else { 0.0 };
    Report {
        completed: ok.len(),
        failed: results.len() - ok.len(),
        duration_s: duration,
        total_input_tokens: input,
        total_output_tokens: output,
        request_throughput: per_s(ok.len() as f64),
        output_throughput: per_s(output as f64),
        total_token_throughput: per_s((input + output) as f64),
        ttft: summarize(&ttft),
        tpot: summarize(&tpot),
        itl: summarize(&itl),
        e2e: summarize(&e2e),
        first_error: results.iter().find(|r| !r.ok).map(|r| r.error.clone()),
    }
}

fn print(r: &Report, title: &str) {
    let line = |name: &str, v: String| println!("{name:<40}{v:>12}");
    println!("{:=^52}", format!(" {title} "));
    line("Successful requests:", r.completed.to_string());
    line("Failed requests:", r.failed.to_string());
    line("Benchmark duration (s):", format!("{:.2}", r.duration_s));
    line("Total input tokens:", r.total_input_tokens.to_string());
    line("Total generated tokens:", r.total_output_tokens.to_string());
    line("Request throughput (req/s):", format!("{:.2}", r.request_throughput));
    line("Output token throughput (tok/s):", format!("{:.2}", r.output_throughput));
    line("Total token throughput (tok/s):", format!("{:.2}", r.total_token_throughput));
    for (head, short, s) in [
        ("Time to First Token", "TTFT", r.ttft),
        ("Time per Output Token (excl. 1st token)", "TPOT", r.tpot),
        ("Inter-token Latency", "ITL", r.itl),
        ("End-to-end Latency", "E2EL", r.e2e),
    ] {
        println!("{:-^52}", format!(" {head} "));
        line(&format!("Mean {short} (ms):"), format!("{:.2}", s.mean_ms));
        line(&format!("Median {short} (ms):"), format!("{:.2}", s.median_ms));
        line(&format!("P99 {short} (ms):"), format!("{:.2}", s.p99_ms));
    }
    println!("{}", "=".repeat(52));
    if let Some(e) = &r.first_error {
        println!("first failure: {e}");
    }
}

pub fn run(args: ServeBenchArgs) -> anyhow::Result<()> {
    let tokenizer = if args.tokenizer.starts_with("synthetic:") {
        radix_model::Tokenizer::Bytes
    } else {
        radix_model::Tokenizer::from_dir(std::path::Path::new(&args.tokenizer))?
    };
    let samples = dataset::load(&args.dataset, args.num_prompts, &tokenizer, args.seed)?;
    let url = args.url.trim_end_matches('/').to_string();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = runtime.block_on(async {
        let client = reqwest::Client::builder().build().context("building the HTTP client")?;
        let model = match &args.model {
            Some(m) => m.clone(),
            None => first_model(&client, &url, args.api_key.as_deref()).await?,
        };
        let rate = if args.request_rate.is_finite() {
            format!("{} req/s", args.request_rate)
        } else {
            "inf".into()
        };
        eprintln!(
            "bench serve: {} requests of {} to {url} ({model}), rate {rate}, max concurrency {}",
            samples.len(),
            args.dataset,
            args.max_concurrency.map_or("none".to_string(), |c| c.to_string())
        );
        let target =
            Arc::new(Target { url: url.clone(), model, api_key: args.api_key.clone(), client });
        let bar = progress(samples.len(), "requests");
        Ok::<_, anyhow::Error>(
            benchmark(target, samples, args.request_rate, args.max_concurrency, args.seed, bar)
                .await,
        )
    })?;
    print(&report, "Serving Benchmark Result");
    let shape = format!(
        "dataset={} rate={} concurrency={} prompts={}",
        args.dataset,
        args.request_rate,
        args.max_concurrency.map_or("none".to_string(), |c| c.to_string()),
        args.num_prompts
    );
    write_json(
        args.json.as_ref(),
        &[Measurement {
            benchmark: "serve".into(),
            shape,
            ours: report.output_throughput,
            unit: "output tok/s".into(),
            median_ms: report.e2e.median_ms,
            device: format!("server {url}"),
            extra: Some(serde_json::to_value(&report)?),
        }],
    )?;
    anyhow::ensure!(report.completed > 0, "every request failed");
    Ok(())
}

async fn first_model(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
) -> anyhow::Result<String> {
    let mut req = client.get(format!("{url}/v1/models"));
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let models: Value = req
        .send()
        .await
        .with_context(|| format!("GET {url}/v1/models (is the server running?)"))?
        .error_for_status()?
        .json()
        .await?;
    models["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("{url}/v1/models lists no model: {models}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let s = summarize(&[0.001, 0.002, 0.003, 0.004]);
        assert!((s.mean_ms - 2.5).abs() < 1e-9);
        assert!((s.median_ms - 2.5).abs() < 1e-9);
        assert!((s.p99_ms - 3.97).abs() < 1e-9);
        assert_eq!(summarize(&[]), Summary::default());
        assert_eq!(parse_rate("inf"), Ok(f64::INFINITY));
        assert_eq!(parse_rate("2.5"), Ok(2.5));
        assert!(parse_rate("0").is_err() && parse_rate("x").is_err());
    }

    /// The whole benchmark against an in-process server with synthetic:tiny.
    #[test]
    fn benchmarks_an_in_process_server() {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let source = radix_model::ModelSource::open("synthetic:tiny").unwrap();
            let model = source.load(radix_model::CpuBackend::new()).unwrap();
            let radix_model::ModelSource { name, tokenizer, chat_template, .. } = source;
            let engine = radix_engine::Engine::new(
                Box::new(model),
                Arc::new(tokenizer),
                radix_engine::EngineConfig { num_pages: 512, ..Default::default() },
            )
            .unwrap();
            let handle = radix_engine::EngineHandle::spawn(engine, name);
            let server =
                radix_server::Server::new(handle.clone(), chat_template, Default::default());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let serving = tokio::spawn(server.serve(listener, async move {
                let _ = stopped.await;
            }));
            let client = reqwest::Client::new();
            let model = first_model(&client, &url, None).await.unwrap();
            assert_eq!(model, "synthetic:tiny");
            let samples =
                dataset::load("random:12:5", 16, &radix_model::Tokenizer::Bytes, 0).unwrap();
            let target = Arc::new(Target { url, model, api_key: None, client });
            let hidden = indicatif::ProgressBar::hidden();
            let r =
                benchmark(target.clone(), samples.clone(), f64::INFINITY, Some(4), 0, hidden).await;
            assert_eq!((r.completed, r.failed), (16, 0), "{:?}", r.first_error);
            assert_eq!((r.total_input_tokens, r.total_output_tokens), (16 * 12, 16 * 5));
            assert!(r.ttft.median_ms > 0.0 && r.tpot.mean_ms > 0.0 && r.itl.p99_ms > 0.0);
            assert!(r.ttft.p99_ms >= r.ttft.median_ms);
            // Poisson arrivals at a finite rate.
            let hidden = indicatif::ProgressBar::hidden();
            let r = benchmark(target, samples[..4].to_vec(), 50.0, None, 1, hidden).await;
            assert_eq!(r.completed, 4);
            let _ = stop.send(());
            serving.await.unwrap().unwrap();
            handle.shutdown();
        });
    }
}
