//! Prometheus metrics, in the text exposition format (version 0.0.4), written by hand:
//! the server's own counters and latency histograms beside the engine's gauges.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use radix_engine::EngineStats;

/// vLLM's buckets for time to first token.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];
/// vLLM's buckets for the time between output tokens (finer at the low end).
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
    7.5, 10.0, 20.0, 40.0, 80.0,
];
const E2E_BUCKETS: &[f64] = &[
    0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0,
];

/// A cumulative histogram with fixed upper bounds.
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<HistogramData>,
}

#[derive(Clone, Default)]
struct HistogramData {
    /// Per bucket (not cumulative), plus +Inf last.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        let data = HistogramData { counts: vec![0; bounds.len() + 1], ..Default::default() };
        Self { bounds, inner: Mutex::new(data) }
    }

    pub fn observe(&self, d: Duration) {
        let x = d.as_secs_f64();
        let i = self.bounds.iter().position(|&b| x <= b).unwrap_or(self.bounds.len());
        let mut h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        h.counts[i] += 1;
        h.sum += x;
        h.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).count
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let h = self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&h.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", h.sum, h.count);
    }
}

/// The server's own counters (the engine's come from `EngineStats` at scrape time).
pub struct Metrics {
    /// HTTP responses by (route, status).
    responses: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    /// Usage reported to clients.
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Generation requests being served (submitted and not yet answered or dropped).
    pub in_flight: AtomicI64,
    /// Requests whose client went away before the end.
    pub client_aborts: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            responses: Mutex::default(),
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            client_aborts: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub fn count_response(&self, route: &'static str, status: u16) {
        *self
            .responses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((route, status))
            .or_default() += 1;
    }

    /// The exposition text.
    pub fn render(&self, s: &EngineStats, model: &str) -> String {
        let mut out = String::with_capacity(8192);
        let responses = self.responses.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let _ = writeln!(
            out,
            "# HELP radix_http_requests_total HTTP requests answered, by route and status.\n\
             # TYPE radix_http_requests_total counter"
        );
        for ((route, status), n) in &responses {
            let _ = writeln!(
                out,
                "radix_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let model = model.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = writeln!(
            out,
            "# HELP radix_model_info The served model.\n# TYPE radix_model_info gauge\n\
             radix_model_info{{model=\"{model}\"}} 1"
        );
        let counter = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        counter(
            &mut out,
            "radix_prompt_tokens_total",
            "Prompt tokens processed by the engine.",
            s.prompt_tokens_total as f64,
        );
        counter(
            &mut out,
            "radix_generation_tokens_total",
            "Tokens generated by the engine.",
            s.generation_tokens_total as f64,
        );
        counter(
            &mut out,
            "radix_usage_prompt_tokens_total",
            "Prompt tokens reported in responses' usage.",
            load(&self.prompt_tokens),
        );
        counter(
            &mut out,
            "radix_usage_completion_tokens_total",
            "Completion tokens reported in responses' usage.",
            load(&self.completion_tokens),
        );
        counter(
            &mut out,
            "radix_requests_finished_total",
            "Requests the engine finished (any reason).",
            s.requests_finished as f64,
        );
        counter(
            &mut out,
            "radix_client_aborts_total",
            "Requests whose client disconnected before the end.",
            load(&self.client_aborts),
        );
        counter(
            &mut out,
            "radix_preemptions_total",
            "Requests preempted for lack of KV pages.",
            s.preemptions as f64,
        );
        counter(&mut out, "radix_engine_steps_total", "Engine steps run.", s.steps as f64);
        counter(
            &mut out,
            "radix_sparse_kv_read_bytes_total",
            "Bytes of KV attention read with sparse page selection (key bounds included); \
             0 while sparse paging is off.",
            s.kv_read_bytes as f64,
        );
        counter(
            &mut out,
            "radix_sparse_kv_read_dense_bytes_total",
            "Bytes of KV the same steps' attention reads densely (sparse paging on).",
            s.kv_read_dense_bytes as f64,
        );
        counter(
            &mut out,
            "radix_prefix_cache_hit_tokens_total",
            "Prompt tokens served from the prefix cache.",
            s.cache_hit_tokens as f64,
        );
        counter(
            &mut out,
            "radix_prefix_cache_miss_tokens_total",
            "Prompt tokens not found in the prefix cache.",
            s.cache_miss_tokens as f64,
        );
        gauge(
            &mut out,
            "radix_prefix_cache_hit_rate",
            "Fraction of matched prompt tokens served from the prefix cache.",
            s.cache_hit_rate(),
        );
        gauge(
            &mut out,
            "radix_requests_waiting",
            "Requests in the engine's queue.",
            s.waiting as f64,
        );
        gauge(
            &mut out,
            "radix_requests_running",
            "Requests the engine is running.",
            s.running as f64,
        );
        gauge(
            &mut out,
            "radix_requests_in_flight",
            "Generation requests the server is answering.",
            self.in_flight.load(Ordering::Relaxed) as f64,
        );
        gauge(
            &mut out,
            "radix_tokens_in_flight",
            "Tokens (prompt + output) of running requests.",
            s.tokens_in_flight as f64,
        );
        gauge(&mut out, "radix_kv_pages_total", "Pages in the KV pool.", s.pages_total as f64);
        gauge(&mut out, "radix_kv_pages_free", "KV pages in the free list.", s.pages_free as f64);
        gauge(
            &mut out,
            "radix_kv_pages_cached",
            "KV pages held by the prefix cache.",
            s.pages_cached as f64,
        );
        let in_use = s.pages_total.saturating_sub(s.pages_free + s.pages_cached);
        gauge(
            &mut out,
            "radix_kv_pages_in_use",
            "KV pages owned by requests (total - free - cached).",
            in_use as f64,
        );
        let usage = if s.pages_total == 0 { 0.0 } else { in_use as f64 / s.pages_total as f64 };
        gauge(&mut out, "radix_kv_cache_usage", "Fraction of KV pages owned by requests.", usage);
        self.ttft.render(
            &mut out,
            "radix_time_to_first_token_seconds",
            "Time from request arrival to its first output token.",
        );
        self.itl.render(
            &mut out,
            "radix_inter_token_latency_seconds",
            "Time between consecutive output tokens of a request.",
        );
        self.e2e.render(
            &mut out,
            "radix_e2e_request_latency_seconds",
            "Time from request arrival to its last output.",
        );
        with_model_label(&out, &model)
    }
}

/// Every sample line of `text` with a `model_name` label first (vLLM's label, so
/// dashboards built for it select by model the same way); `model` is escaped already.
fn with_model_label(text: &str, model: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.lines().count() * (model.len() + 16));
    for line in text.lines() {
        if line.starts_with('#') {
            out.push_str(line);
        } else if let Some((name, rest)) = line.split_once('{') {
            let _ = write!(out, "{name}{{model_name=\"{model}\",{rest}");
        } else if let Some((name, value)) = line.split_once(' ') {
            let _ = write!(out, "{name}{{model_name=\"{model}\"}} {value}");
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_metrics_parse() {
        let m = Metrics::default();
        m.ttft.observe(Duration::from_millis(3));
        m.ttft.observe(Duration::from_millis(30));
        m.ttft.observe(Duration::from_secs(1000));
        m.count_response("/v1/completions", 200);
        let stats =
            EngineStats { pages_total: 10, pages_free: 7, pages_cached: 2, ..Default::default() };
        let text = m.render(&stats, "a\"b");
        let m = "model_name=\"a\\\"b\"";
        let ttft = "radix_time_to_first_token_seconds";
        assert!(text.contains(&format!("{ttft}_bucket{{{m},le=\"0.005\"}} 1\n")), "{text}");
        assert!(text.contains(&format!("{ttft}_bucket{{{m},le=\"0.04\"}} 2\n")));
        assert!(text.contains(&format!("{ttft}_bucket{{{m},le=\"80\"}} 2\n")));
        assert!(text.contains(&format!("{ttft}_bucket{{{m},le=\"+Inf\"}} 3\n")));
        assert!(text.contains(&format!("{ttft}_count{{{m}}} 3\n")));
        assert!(text.contains(&format!("radix_kv_pages_in_use{{{m}}} 1\n")));
        assert!(text.contains(&format!("radix_model_info{{{m},model=\"a\\\"b\"}} 1\n")));
        assert!(text.contains(&format!(
            "radix_http_requests_total{{{m},route=\"/v1/completions\",status=\"200\"}} 1\n"
        )));
        // Every sample line is `name{labels} value`, the model first, a number last.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(line.contains(&format!("{{{m}")), "{line}");
        }
    }
}
