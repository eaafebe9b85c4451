//! Engine counters and gauges, updated after each step and read by the server.

/// A snapshot of the engine's state and totals.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineStats {
    pub waiting: usize,
    pub running: usize,
    /// Tokens (prompt + output) of running requests.
    pub tokens_in_flight: usize,
    pub pages_total: usize,
    pub pages_free: usize,
    pub pages_cached: usize,
    pub cache_hit_tokens: u64,
    pub cache_miss_tokens: u64,
    pub requests_finished: u64,
    pub prompt_tokens_total: u64,
    pub generation_tokens_total: u64,
    pub preemptions: u64,
    pub steps: u64,
    /// Most pages ever in use (running requests and the cache) after a step.
    pub peak_pages_used: usize,
    /// Seconds spent scheduling and building batches (host).
    pub schedule_secs: f64,
    /// Seconds in the model's forward and sampling (the GPU's share, with launch overhead).
    pub forward_secs: f64,
    /// Seconds applying results: stop rules, detokenizing, streaming (host).
    pub process_secs: f64,
    /// Steps with prompt tokens in them (prefill chunks, with any decodes beside them)
    /// and their forward seconds.
    pub prefill_steps: u64,
    pub prefill_secs: f64,
    /// Decode-only steps by batch size (1-64, 65-256, 257 and more) and their forward
    /// seconds: where a run's time goes.
    pub decode_steps: [u64; 3],
    pub decode_secs: [f64; 3],
    /// Sparse paging: bytes of KV (K and V, all layers) the steps' attention would read
    /// densely, and what it reads with page selection (key bounds for scoring included).
    pub kv_read_dense_bytes: u64,
    pub kv_read_bytes: u64,
}

impl EngineStats {
    /// Class of a decode batch of `n` in `decode_steps` / `decode_secs`.
    pub fn decode_class(n: usize) -> usize {
        match n {
            0..=64 => 0,
            65..=256 => 1,
            _ => 2,
        }
    }

    /// Fraction of matched prompt tokens served by the prefix cache.
    pub fn cache_hit_rate(&self) -> f64 {
        let total = self.cache_hit_tokens + self.cache_miss_tokens;
        if total == 0 { 0.0 } else { self.cache_hit_tokens as f64 / total as f64 }
    }
}
