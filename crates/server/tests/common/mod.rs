//! An in-process server on a loopback port with synthetic:tiny on the CPU backend, and
//! helpers to read its answers.

#![allow(dead_code)] // each test binary uses a different part

use std::sync::Arc;
use std::time::{Duration, Instant};

use radix_engine::{Engine, EngineConfig, EngineHandle};
use radix_model::{CpuBackend, ModelSource};
use radix_server::{Server, ServerConfig};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const MODEL: &str = "synthetic:tiny";

pub struct TestServer {
    pub base: String,
    pub handle: EngineHandle,
    shutdown: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<std::io::Result<()>>>,
}

pub fn engine_config() -> EngineConfig {
    EngineConfig { num_pages: 1024, max_running: 64, max_waiting: 1024, ..Default::default() }
}

/// Whether `serve` has returned.
impl TestServer {
    pub fn is_stopped(&self) -> bool {
        self.join.as_ref().is_none_or(|j| j.is_finished())
    }
}

pub async fn start(engine_cfg: EngineConfig, server_cfg: ServerConfig) -> TestServer {
    start_model(MODEL, engine_cfg, server_cfg).await
}

/// `start` with another model (a path or `synthetic:...`), on the CPU backend.
pub async fn start_model(
    model: &str,
    engine_cfg: EngineConfig,
    server_cfg: ServerConfig,
) -> TestServer {
    let source = ModelSource::open(model).unwrap();
    let model = source.load(CpuBackend::new()).unwrap();
    let ModelSource { name, tokenizer, chat_template, .. } = source;
    let engine = Engine::new(Box::new(model), Arc::new(tokenizer), engine_cfg).unwrap();
    let handle = EngineHandle::spawn(engine, name);
    let server = Server::new(handle.clone(), chat_template, server_cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let join = tokio::spawn(server.serve(listener, async move {
        let _ = rx.await;
    }));
    TestServer { base, handle, shutdown: Some(tx), join: Some(join) }
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Signals shutdown and waits for `serve` to return (bounded by `limit`).
    pub async fn stop(&mut self, limit: Duration) -> std::io::Result<()> {
        self.signal_shutdown();
        self.wait_stopped(limit).await
    }

    /// Signals shutdown (as SIGTERM does); the server drains.
    pub fn signal_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for `serve` to return (bounded by `limit`).
    pub async fn wait_stopped(&mut self, limit: Duration) -> std::io::Result<()> {
        let join = self.join.take().expect("stopped once");
        let r = tokio::time::timeout(limit, join).await.expect("serve did not return in time");
        r.expect("serve task panicked")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.handle.abort_all();
    }
}

/// The gauges and counters of a Prometheus text scrape (labels kept in the name).
/// Samples by `name{labels}`, without the `model_name` label every sample carries first
/// (checked here).
pub fn parse_metrics(text: &str) -> std::collections::HashMap<String, f64> {
    let label = format!("{{model_name=\"{MODEL}\"");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').expect("`name value`");
            let (base, labels) = name.split_once(&label).unwrap_or_else(|| panic!("{l}"));
            let name = match labels.strip_prefix(',') {
                Some(rest) => format!("{base}{{{rest}"),
                None => base.to_string(), // the model was the only label: "}" is left
            };
            (name, value.parse::<f64>().expect("a number"))
        })
        .collect()
}

pub async fn metrics(
    client: &reqwest::Client,
    s: &TestServer,
) -> std::collections::HashMap<String, f64> {
    let resp = client.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    parse_metrics(&resp.text().await.unwrap())
}

/// Waits until the engine is idle with every KV page back (free or cached), or panics.
pub async fn wait_pages_back(client: &reqwest::Client, s: &TestServer, limit: Duration) {
    let t = Instant::now();
    loop {
        let m = metrics(client, s).await;
        let idle = m["radix_requests_running"] == 0.0
            && m["radix_requests_waiting"] == 0.0
            && m["radix_kv_pages_in_use"] == 0.0;
        if idle {
            assert_eq!(
                m["radix_kv_pages_free"] + m["radix_kv_pages_cached"],
                m["radix_kv_pages_total"]
            );
            return;
        }
        assert!(t.elapsed() < limit, "pages not back after {limit:?}: {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// POSTs `body` as JSON; the status and the JSON answer.
pub async fn post(c: &reqwest::Client, s: &TestServer, path: &str, body: &Value) -> (u16, Value) {
    let resp = c.post(s.url(path)).json(body).send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
}

/// The `data:` payloads of an SSE body, in order (the last should be `[DONE]`);
/// keep-alive comments are skipped.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty() && !e.lines().all(|l| l.starts_with(':')))
        .map(|e| {
            let data: Vec<&str> =
                e.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim_start).collect();
            assert!(!data.is_empty(), "an event without data: {e:?}");
            data.join("\n")
        })
        .collect()
}

/// Parses an SSE body: the JSON chunks before `[DONE]`; panics if it does not end so.
pub fn sse_chunks(body: &str) -> Vec<Value> {
    let mut data = sse_data(body);
    assert_eq!(data.pop().as_deref(), Some("[DONE]"), "the stream must end with [DONE]: {body}");
    data.iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("chunk {d:?}: {e}")))
        .collect()
}
