//! Load: 200 concurrent streaming clients on loopback for 10 s, a third of
//! them disconnecting early (before the response, after the headers, or after a few
//! chunks). Every completed response must be well formed and complete, nothing may fail,
//! the server stays up, and afterwards /metrics shows every KV page back in the pool.
//! Bounded: clients start no request after RADIX_LOAD_TEST_SECS (default 10: every
//! client has started, streamed, disconnected and contended for pages several times by
//! then; 60 s added a minute to every test run and nothing it checks; soak longer by
//! setting it), and the whole test has a hard limit.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{TestServer, metrics, sse_chunks, start};
use futures::StreamExt;
use radix_engine::EngineConfig;
use radix_server::ServerConfig;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const CLIENTS: usize = 200;
/// One in DISCONNECT clients hangs up early.
const DISCONNECT: usize = 3;

#[derive(Default)]
struct Tally {
    completed: AtomicU64,
    disconnected: AtomicU64,
    completion_tokens: AtomicU64,
    failures: std::sync::Mutex<Vec<String>>,
}

/// Checks a complete stream of one request and returns its completion tokens.
fn check_stream(body: &str, prompt_tokens: usize, max_tokens: usize) -> Result<usize, String> {
    let chunks =
        std::panic::catch_unwind(|| sse_chunks(body)).map_err(|_| format!("bad SSE: {body}"))?;
    let (usage_chunk, content) = chunks.split_last().ok_or("no chunks")?;
    let id = content.first().ok_or("no content chunks")?["id"].as_str().ok_or("no id")?;
    if content.len() > max_tokens {
        return Err(format!("{} content chunks for {max_tokens} tokens", content.len()));
    }
    for (i, ch) in content.iter().enumerate() {
        let ok = ch["id"] == id
            && ch["object"] == "text_completion"
            && ch["usage"].is_null()
            && ch["choices"].as_array().is_some_and(|c| c.len() == 1)
            && ch["choices"][0]["index"] == 0
            && ch["choices"][0]["text"].is_string();
        let finish = &ch["choices"][0]["finish_reason"];
        let finish_ok = if i + 1 == content.len() { finish == "length" } else { finish.is_null() };
        if !ok || !finish_ok {
            return Err(format!("malformed chunk {i}: {ch}"));
        }
    }
    let u = &usage_chunk["usage"];
    let want = json!({"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
        "total_tokens": prompt_tokens + max_tokens});
    let usage_ok = usage_chunk["choices"] == json!([])
        && ["prompt_tokens", "completion_tokens", "total_tokens"].iter().all(|k| u[k] == want[k]);
    if !usage_ok {
        return Err(format!("usage {usage_chunk}, want {want}"));
    }
    Ok(max_tokens)
}

async fn client(i: usize, base: String, deadline: Instant, tally: Arc<Tally>) {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
    let mut rng = StdRng::seed_from_u64(i as u64);
    let disconnector = i.is_multiple_of(DISCONNECT);
    while Instant::now() < deadline {
        let prompt: String =
            (0..rng.random_range(8..96)).map(|_| rng.random_range(b' '..=b'~') as char).collect();
        let max_tokens = rng.random_range(4..=24usize);
        let body = json!({"model": common::MODEL, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.8, "seed": rng.random::<u32>(), "ignore_eos": true,
            "stream": true, "stream_options": {"include_usage": true}});
        let request = http.post(format!("{base}/v1/completions")).json(&body);
        if disconnector {
            match rng.random_range(0..4) {
                // Give up before the response arrives.
                0 => {
                    let _ = tokio::time::timeout(
                        Duration::from_millis(rng.random_range(1..50)),
                        request.send(),
                    )
                    .await;
                }
                // Read the headers, then hang up.
                1 => drop(request.send().await),
                // Read a few chunks, then hang up.
                _ => {
                    if let Ok(resp) = request.send().await {
                        let mut stream = resp.bytes_stream();
                        for _ in 0..rng.random_range(1..4) {
                            if stream.next().await.is_none() {
                                break;
                            }
                        }
                    }
                }
            }
            tally.disconnected.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let result = async {
            let resp = request.send().await.map_err(|e| e.to_string())?;
            if resp.status() != 200 {
                return Err(format!("status {}", resp.status()));
            }
            let text = resp.text().await.map_err(|e| e.to_string())?;
            check_stream(&text, prompt.len() + 1, max_tokens)
        }
        .await;
        match result {
            Ok(tokens) => {
                tally.completed.fetch_add(1, Ordering::Relaxed);
                tally.completion_tokens.fetch_add(tokens as u64, Ordering::Relaxed);
            }
            Err(e) => tally.failures.lock().unwrap().push(e),
        }
    }
}

async fn run(s: &TestServer, secs: u64) {
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(client(i, s.base.clone(), deadline, tally.clone())))
        .collect();
    for c in clients {
        c.await.expect("a client panicked");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let http = reqwest::Client::new();
    common::wait_pages_back(&http, s, Duration::from_secs(30)).await;
    let m = metrics(&http, s).await;
    let completed = tally.completed.load(Ordering::Relaxed);
    let disconnected = tally.disconnected.load(Ordering::Relaxed);
    let tokens = tally.completion_tokens.load(Ordering::Relaxed);
    eprintln!(
        "load: {CLIENTS} clients for {elapsed:.1} s: {completed} complete responses \
         ({tokens} tokens, {:.1} req/s, {:.0} tok/s), {disconnected} early disconnects \
         ({} aborted in the engine); engine: {} requests finished, {} steps, {} preemptions; \
         KV pages: {} total, {} free, {} cached, {} in use",
        completed as f64 / elapsed,
        tokens as f64 / elapsed,
        m["radix_client_aborts_total"],
        m["radix_requests_finished_total"],
        m["radix_engine_steps_total"],
        m["radix_preemptions_total"],
        m["radix_kv_pages_total"],
        m["radix_kv_pages_free"],
        m["radix_kv_pages_cached"],
        m["radix_kv_pages_in_use"],
    );
    let failures = std::mem::take(&mut *tally.failures.lock().unwrap());
    assert!(failures.is_empty(), "{} failures, first: {}", failures.len(), failures[0]);
    assert!(completed >= CLIENTS as u64, "only {completed} complete responses");
    assert!(disconnected > 0);
    assert_eq!(m["radix_requests_running"], 0.0);
    assert_eq!(m["radix_requests_in_flight"], 0.0);
    assert_eq!(m["radix_kv_pages_in_use"], 0.0);
    // Every response was counted, none failed on the server side.
    let ok = m["radix_http_requests_total{route=\"/v1/completions\",status=\"200\"}"];
    assert!(ok >= completed as f64, "{ok} 200s for {completed} complete responses");
    let other: f64 = m
        .iter()
        .filter(|(k, _)| {
            k.starts_with("radix_http_requests_total{route=\"/v1/completions\"")
                && !k.ends_with("status=\"200\"}")
        })
        .map(|(_, v)| v)
        .sum();
    assert_eq!(other, 0.0, "non-200 answers under load");
    // Still up and serving.
    let r: Value = http
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "still there?", "max_tokens": 3, "ignore_eos": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["usage"]["completion_tokens"], 3, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_streaming_clients_a_third_disconnecting() {
    let secs =
        std::env::var("RADIX_LOAD_TEST_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    // A pool small enough that requests contend for pages: the prefix cache evicts and
    // the engine preempts now and then.
    let engine = EngineConfig {
        num_pages: 160,
        max_running: 64,
        max_batched_tokens: 2048,
        max_waiting: 1024,
        ..Default::default()
    };
    let mut s = start(engine, ServerConfig::default()).await;
    let limit = Duration::from_secs(secs + 120);
    tokio::time::timeout(limit, run(&s, secs)).await.expect("the load test ran past its limit");
    s.stop(Duration::from_secs(20)).await.unwrap();
}
