//! The engine: continuous batching with chunked prefill, prefix reuse through the radix
//! cache, page allocation with eviction and preemption, sampling, stop rules, streaming.
//!
//! One `step()`:
//! 1. schedule: running sequences first, oldest first (a decode needs one token, a
//!    prefill the rest of its prompt, in chunks under the token budget); then new
//!    requests from the queue while budget and pages last. A request first matches its
//!    prompt against the prefix cache and computes only what is not cached.
//! 2. pages: each scheduled sequence gets pages for its new tokens; when the pool is
//!    dry, unlocked cached pages are evicted; when that is not enough, the newest running
//!    request is preempted (its pages go back, it returns to the front of the queue and
//!    later recomputes, mostly from the cache).
//! 3. run the model on the batch, sample where a sequence reached its last token, apply
//!    stop rules, detokenize and stream.
//! 4. finished requests put their full pages into the prefix cache and release the rest.

use std::collections::VecDeque;
use std::sync::Arc;

use radix_kv::{PagePool, PageTableBuilder, RadixCache, SparseBudget, SparsePolicy};
use radix_model::{SampleRequest, Sampled, StepInput, Tokenizer};
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::EngineStats;
use crate::request::{FinishReason, Output, Request, RequestId};
use crate::runner::Runner;
use crate::sequence::Sequence;

/// Limits and switches of the engine.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    /// Tokens per KV page.
    pub page_size: usize,
    /// Pages in the KV pool.
    pub num_pages: usize,
    /// Tokens computed per step at most (decodes count one each).
    pub max_batched_tokens: usize,
    /// Requests running at once at most.
    pub max_running: usize,
    /// Requests waiting at most; more are refused (the server answers 429).
    pub max_waiting: usize,
    /// Reuse cached prompt prefixes (radix cache).
    pub prefix_cache: bool,
    /// Split long prompts over several steps; off, a prompt is computed in one step.
    pub chunked_prefill: bool,
    /// Longest sequence (prompt + output); `None` takes the model's.
    pub max_model_len: Option<usize>,
    /// Query-aware sparse paging for long-context decode; `None`: off (dense always,
    /// and requests may not ask for it).
    pub sparse: Option<SparseConfig>,
}

/// Sparse paging, engine-wide: the default budget of requests that name none, and what
/// stays dense.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseConfig {
    pub budget: SparseBudget,
    pub policy: SparsePolicy,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            page_size: 16,
            num_pages: 4096,
            max_batched_tokens: 2048,
            max_running: 256,
            max_waiting: 4096,
            prefix_cache: true,
            chunked_prefill: true,
            max_model_len: None,
            sparse: None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("engine configuration: {0}")]
    Config(String),
}

pub struct Engine {
    runner: Box<dyn Runner>,
    tokenizer: Arc<Tokenizer>,
    cfg: EngineConfig,
    max_model_len: usize,
    eos: Vec<u32>,
    pool: PagePool,
    cache: RadixCache,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    next_arrival: u64,
    table: PageTableBuilder,
    stats: EngineStats,
    // Per-step buffers, reused.
    tokens: Vec<u32>,
    positions: Vec<i32>,
    logit_rows: Vec<u32>,
    kv_keep: Vec<i32>,
}

/// One sequence's share of a step.
struct Scheduled {
    /// Index into `running`.
    index: usize,
    /// Tokens computed this step.
    len: usize,
}

impl Engine {
    pub fn new(
        mut runner: Box<dyn Runner>,
        tokenizer: Arc<Tokenizer>,
        cfg: EngineConfig,
    ) -> Result<Self, EngineError> {
        let bad = |m: String| Err(EngineError::Config(m));
        if cfg.max_running == 0 || cfg.max_batched_tokens == 0 || cfg.num_pages == 0 {
            return bad("max_running, max_batched_tokens and num_pages must be positive".into());
        }
        if cfg.max_batched_tokens < cfg.max_running {
            return bad(format!(
                "max_batched_tokens ({}) must be at least max_running ({}): every running request decodes a token per step",
                cfg.max_batched_tokens, cfg.max_running
            ));
        }
        let pool = PagePool::new(cfg.num_pages, cfg.page_size)
            .map_err(|e| EngineError::Config(e.to_string()))?;
        // The backend validates the policy (a window of at least one page).
        runner
            .set_sparse(cfg.sparse.map(|s| s.policy))
            .map_err(|e| EngineError::Config(e.to_string()))?;
        runner
            .init_kv(cfg.num_pages, cfg.page_size)
            .map_err(|e| EngineError::Config(e.to_string()))?;
        let started = std::time::Instant::now();
        let warm = runner.warm_up().map_err(|e| EngineError::Config(format!("warm-up: {e}")))?;
        if warm > 0 {
            tracing::info!(
                steps = warm,
                secs = started.elapsed().as_secs_f64(),
                "warm-up done (kernels compiled; decode CUDA graphs captured unless disabled)"
            );
        }
        let model_len = runner.config().max_position_embeddings;
        let max_model_len = cfg
            .max_model_len
            .unwrap_or(model_len)
            .min(model_len)
            .min(cfg.num_pages * cfg.page_size);
        let eos = runner.config().eos_token_ids.clone();
        let cache = RadixCache::new(&pool);
        let table =
            PageTableBuilder::new(cfg.page_size).map_err(|e| EngineError::Config(e.to_string()))?;
        let stats = EngineStats {
            pages_total: cfg.num_pages,
            pages_free: cfg.num_pages,
            ..Default::default()
        };
        Ok(Self {
            runner,
            tokenizer,
            cfg,
            max_model_len,
            eos,
            pool,
            cache,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_arrival: 0,
            table,
            stats,
            tokens: Vec::new(),
            positions: Vec::new(),
            logit_rows: Vec::new(),
            kv_keep: Vec::new(),
        })
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn runner(&self) -> &dyn Runner {
        self.runner.as_ref()
    }

    /// Ends the engine and hands the model back (to run it under another configuration).
    /// Requests still queued or running are dropped with it.
    pub fn into_runner(self) -> Box<dyn Runner> {
        self.runner
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Checks a request against the model and limits (the server turns this into 400).
    pub fn validate(&self, req: &Request) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::Invalid(m));
        if req.prompt.is_empty() {
            return bad("the prompt is empty".into());
        }
        if req.stop.max_tokens == 0 {
            return bad("max_tokens must be at least 1".into());
        }
        let vocab = self.runner.config().vocab_size as u32;
        if let Some(t) = req.prompt.iter().find(|&&t| t >= vocab) {
            return bad(format!("token id {t} is outside the vocabulary of {vocab}"));
        }
        if req.prompt.len() + req.stop.max_tokens > self.max_model_len {
            return bad(format!(
                "the prompt ({} tokens) plus max_tokens ({}) exceeds the context length of {} tokens",
                req.prompt.len(),
                req.stop.max_tokens,
                self.max_model_len
            ));
        }
        if req.sparse_budget.is_some() && self.cfg.sparse.is_none() {
            return bad("sparse_budget needs sparse paging: start the engine with a sparse \
                        budget (--sparse-budget)"
                .into());
        }
        req.sampling.validate().map_err(EngineError::Invalid)
    }

    /// Queues a request; its outputs go to `sink`.
    pub fn add(
        &mut self,
        id: RequestId,
        req: Request,
        sink: UnboundedSender<Output>,
    ) -> Result<(), EngineError> {
        self.validate(&req)?;
        if self.waiting.len() >= self.cfg.max_waiting {
            return Err(EngineError::QueueFull(self.waiting.len()));
        }
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.waiting.push_back(Sequence::new(id, req, arrival, sink));
        self.refresh_stats();
        Ok(())
    }

    /// Aborts a request wherever it is; false if unknown (already finished).
    pub fn abort(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            let seq = self.waiting.remove(i).expect("index found above");
            self.finish(seq, FinishReason::Abort, String::new());
        } else if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let seq = self.running.remove(i);
            self.finish(seq, FinishReason::Abort, String::new());
        } else {
            return false;
        }
        self.refresh_stats();
        true
    }

    /// Aborts everything (shutdown).
    pub fn abort_all(&mut self) {
        let ids: Vec<RequestId> = self.waiting.iter().chain(&self.running).map(|s| s.id).collect();
        for id in ids {
            self.abort(id);
        }
    }

    /// Runs one step. Returns false when there was nothing to do.
    pub fn step(&mut self) -> bool {
        let t0 = std::time::Instant::now();
        let plan = self.schedule();
        if plan.is_empty() {
            self.refresh_stats();
            return false;
        }
        let t1 = std::time::Instant::now();
        let result = self.execute(&plan);
        let t2 = std::time::Instant::now();
        self.stats.schedule_secs += (t1 - t0).as_secs_f64();
        let secs = (t2 - t1).as_secs_f64();
        self.stats.forward_secs += secs;
        if plan.iter().all(|s| s.len == 1) {
            let class = EngineStats::decode_class(plan.len());
            self.stats.decode_steps[class] += 1;
            self.stats.decode_secs[class] += secs;
        } else {
            self.stats.prefill_steps += 1;
            self.stats.prefill_secs += secs;
        }
        match result {
            Ok(sampled) => {
                self.process(&plan, &sampled);
                self.stats.process_secs += t2.elapsed().as_secs_f64();
            }
            Err(e) => {
                // A failed step fails the requests in it; the engine goes on.
                tracing::error!("step failed: {e}");
                let mut indices: Vec<usize> = plan.iter().map(|s| s.index).collect();
                indices.sort_unstable_by_key(|&i| std::cmp::Reverse(i));
                for i in indices {
                    let seq = self.running.remove(i);
                    self.finish(seq, FinishReason::Error(e.clone()), String::new());
                }
            }
        }
        self.stats.steps += 1;
        self.refresh_stats();
        true
    }

    fn schedule(&mut self) -> Vec<Scheduled> {
        let mut budget = self.cfg.max_batched_tokens;
        for seq in &mut self.running {
            seq.step_len = 0;
        }
        // 1. Decodes, oldest first: each needs one token and at most one new page. When
        //    the pool is dry, the newest unscheduled request is preempted.
        let mut i = 0;
        while i < self.running.len() {
            let seq = &self.running[i];
            if seq.pending() != 1 {
                i += 1;
                continue;
            }
            if self.reserve_pages(i, seq.computed + 1) {
                self.running[i].step_len = 1;
                budget -= 1;
                i += 1;
                continue;
            }
            let victim = self
                .running
                .iter()
                .enumerate()
                .filter(|(j, s)| *j != i && s.step_len == 0)
                .max_by_key(|(_, s)| s.arrival)
                .map(|(j, _)| j)
                .filter(|&j| self.running[j].arrival > self.running[i].arrival)
                .unwrap_or(i);
            self.preempt(victim);
            if victim < i {
                i -= 1;
            }
        }
        // 2. Prefill chunks of running requests, oldest first, under the budget.
        let mut any = self.running.iter().any(|s| s.step_len > 0);
        for i in 0..self.running.len() {
            let seq = &self.running[i];
            if seq.pending() <= 1 || budget == 0 {
                continue;
            }
            let len = self.chunk(seq.pending(), budget, !any);
            if len > 0 && self.reserve_pages(i, seq.computed + len) {
                self.running[i].step_len = len;
                budget = budget.saturating_sub(len);
                any = true;
            }
        }
        // 3. New requests in arrival order (preempted ones first).
        while budget > 0 && self.running.len() < self.cfg.max_running && !self.waiting.is_empty() {
            let mut seq = self.waiting.pop_front().expect("checked non-empty");
            self.attach_prefix(&mut seq);
            let len = self.chunk(seq.pending(), budget, !any);
            let upto = seq.computed + len;
            self.running.push(seq);
            let index = self.running.len() - 1;
            if len == 0 || !self.reserve_pages(index, upto) {
                let mut seq = self.running.pop().expect("just pushed");
                self.detach(&mut seq);
                self.waiting.push_front(seq);
                break;
            }
            self.running[index].step_len = len;
            budget = budget.saturating_sub(len);
            any = true;
        }
        self.running
            .iter()
            .enumerate()
            .filter(|(_, s)| s.step_len > 0)
            .map(|(index, s)| Scheduled { index, len: s.step_len })
            .collect()
    }

    /// Tokens to compute for a sequence with `pending` tokens left and `budget` left.
    fn chunk(&self, pending: usize, budget: usize, first: bool) -> usize {
        if pending <= budget {
            pending
        } else if self.cfg.chunked_prefill {
            budget
        } else if first {
            pending // a whole prompt alone may exceed the budget
        } else {
            0
        }
    }

    /// Matches the prompt against the prefix cache and takes the cached pages.
    fn attach_prefix(&mut self, seq: &mut Sequence) {
        if !self.cfg.prefix_cache || seq.computed > 0 {
            return;
        }
        // At least the last token is computed, for its logits.
        let m = self.cache.match_prefix(&seq.tokens[..seq.tokens.len() - 1]);
        if self.cache.lock(m.last_node).is_err() {
            return;
        }
        seq.pages = m.pages;
        seq.shared = seq.pages.len();
        seq.computed = m.matched_tokens;
        seq.node = Some(m.last_node);
        if seq.preempted == 0 {
            seq.cached_tokens = m.matched_tokens;
        }
    }

    /// Undoes `attach_prefix` for a sequence that goes back to the queue.
    fn detach(&mut self, seq: &mut Sequence) {
        let owned: Vec<_> = seq.pages.drain(seq.shared..).collect();
        if let Err(e) = self.pool.release(&owned) {
            tracing::error!("releasing pages of {}: {e}", seq.id);
        }
        if let Some(Err(e)) = seq.node.take().map(|node| self.cache.unlock(node)) {
            tracing::error!("unlocking the prefix of {}: {e}", seq.id);
        }
        seq.pages.clear();
        seq.shared = 0;
        seq.computed = 0;
    }

    /// Gives `running[i]` pages for its first `upto` tokens, evicting cached pages if
    /// needed. False if the pool cannot provide them.
    fn reserve_pages(&mut self, i: usize, upto: usize) -> bool {
        let need = upto.div_ceil(self.cfg.page_size).saturating_sub(self.running[i].pages.len());
        if need == 0 {
            return true;
        }
        let free = self.pool.free_pages();
        if free < need {
            let _ = self.cache.evict(need - free, &mut self.pool);
        }
        self.pool.alloc_into(&mut self.running[i].pages, need).is_ok()
    }

    /// Sends `running[i]` back to the front of the queue, releasing its pages.
    fn preempt(&mut self, i: usize) {
        let mut seq = self.running.remove(i);
        tracing::debug!(id = %seq.id, tokens = seq.tokens.len(), "preempted: out of KV pages");
        self.detach(&mut seq);
        seq.preempted += 1;
        self.stats.preemptions += 1;
        self.waiting.push_front(seq);
    }

    /// Builds the step's batch, runs the model and samples every sequence that reached
    /// its last token (in plan order).
    fn execute(&mut self, plan: &[Scheduled]) -> Result<Vec<Sampled>, String> {
        self.table.clear();
        self.tokens.clear();
        self.positions.clear();
        self.logit_rows.clear();
        self.kv_keep.clear();
        let (mut dense_pages, mut read_pages, mut scored_pages) = (0usize, 0usize, 0usize);
        for s in plan {
            let seq = &self.running[s.index];
            let upto = seq.computed + s.len;
            let pages = &seq.pages[..upto.div_ceil(self.cfg.page_size)];
            self.table.push_seq(pages, upto, s.len).map_err(|e| e.to_string())?;
            if let Some(sp) = &self.cfg.sparse {
                let budget = seq.sparse_budget.unwrap_or(sp.budget);
                // Only decode rows attend sparsely.
                let keep = match s.len {
                    1 => sp.policy.pages_to_keep(budget, upto, self.cfg.page_size),
                    _ => None,
                };
                self.kv_keep.push(keep.unwrap_or(0) as i32);
                dense_pages += pages.len();
                read_pages += keep.unwrap_or(pages.len());
                scored_pages += if keep.is_some() { pages.len() } else { 0 };
            }
            self.tokens.extend_from_slice(&seq.tokens[seq.computed..upto]);
            self.positions.extend(seq.computed as i32..upto as i32);
            if upto == seq.tokens.len() {
                self.logit_rows.push(self.tokens.len() as u32 - 1);
            }
        }
        let t = self.table.table();
        let step = StepInput {
            tokens: &self.tokens,
            positions: &self.positions,
            slots: t.slot_mapping(),
            qo_indptr: t.qo_indptr(),
            kv_indptr: t.kv_indptr(),
            kv_indices: t.kv_indices(),
            kv_last_page_len: t.kv_last_page_len(),
            logit_rows: &self.logit_rows,
            kv_keep: &self.kv_keep,
        };
        self.runner.forward(&step).map_err(|e| e.to_string())?;
        if let Some(sp) = self.cfg.sparse {
            self.count_kv_reads(sp.policy, dense_pages, read_pages, scored_pages);
        }
        let requests: Vec<SampleRequest> = plan
            .iter()
            .map(|s| &self.running[s.index])
            .filter(|seq| seq.computed + seq.step_len == seq.tokens.len())
            .map(|seq| SampleRequest {
                params: &seq.sampling,
                counts: &seq.counts,
                seed: seq.seed,
                index: seq.num_output() as u64,
            })
            .collect();
        self.runner.sample(&requests).map_err(|e| e.to_string())
    }

    /// Adds a step's KV reads (bf16 K/V, int8 key-bounds records), dense and with sparse
    /// selection, to the stats:
    /// `dense` and `kept` pages per layer of the step's sequences, and the `scored` pages
    /// whose key bounds the selection reads; the first layers read all pages.
    fn count_kv_reads(&mut self, policy: SparsePolicy, dense: usize, kept: usize, scored: usize) {
        let c = self.runner.config();
        let page = 2 * c.num_kv_heads * self.cfg.page_size * c.head_dim * 2;
        let bounds = c.num_kv_heads * radix_kv::bounds_record_bytes(c.head_dim);
        let layers = c.num_layers;
        let dense_layers = policy.dense_layers.min(layers);
        let sparse_layers = layers - dense_layers;
        self.stats.kv_read_dense_bytes += (dense * layers * page) as u64;
        self.stats.kv_read_bytes += ((dense * dense_layers + kept * sparse_layers) * page
            + scored * sparse_layers * bounds) as u64;
    }

    /// Advances the scheduled sequences past the step: samples, stops, streams.
    fn process(&mut self, plan: &[Scheduled], sampled: &[Sampled]) {
        let mut row = 0;
        let mut done: Vec<(usize, FinishReason)> = Vec::new();
        for s in plan {
            let seq = &mut self.running[s.index];
            let prefilling = seq.computed < seq.prompt_len;
            seq.computed += s.len;
            if seq.computed < seq.tokens.len() {
                continue; // a prefill chunk: nothing to sample yet
            }
            if prefilling && self.cfg.prefix_cache {
                cache_computed(&mut self.cache, &mut self.pool, seq, self.cfg.page_size);
            }
            let sampled = sampled[row];
            row += 1;
            let token = sampled.token;
            seq.tokens.push(token);
            seq.counts.add_output(token);
            self.stats.generation_tokens_total += 1;

            let stop_token = (!seq.stop.ignore_eos && self.eos.contains(&token))
                || seq.stop.stop_token_ids.contains(&token);
            let length =
                seq.num_output() >= seq.stop.max_tokens || seq.tokens.len() >= self.max_model_len;
            // A stop token ends the output without its text.
            let text_tokens =
                if stop_token { &seq.tokens[..seq.tokens.len() - 1] } else { &seq.tokens[..] };
            let detok = seq.detok.step(&self.tokenizer, text_tokens, stop_token || length);
            let logprobs = if seq.logprobs { vec![sampled.logprob] } else { Vec::new() };
            let finish = if stop_token || detok.stopped {
                Some(FinishReason::Stop)
            } else if length {
                Some(FinishReason::Length)
            } else {
                None
            };
            match finish {
                Some(reason) => {
                    // The final message carries this step's text and token.
                    let mut out = seq.output(detok.text, vec![token], logprobs);
                    out.finish = Some(reason.clone());
                    done.push((s.index, reason));
                    let _ = seq.sink.send(out);
                }
                None => {
                    let out = seq.output(detok.text, vec![token], logprobs);
                    if seq.sink.send(out).is_err() {
                        // The client went away: abort.
                        done.push((s.index, FinishReason::Abort));
                    }
                }
            }
        }
        // Remove from the back so earlier indices stay valid.
        done.sort_unstable_by_key(|d| std::cmp::Reverse(d.0));
        for (index, reason) in done {
            let seq = self.running.remove(index);
            self.release(seq, reason);
        }
    }

    /// Ends a sequence that already sent its last output (or sends an empty final one).
    fn finish(&mut self, seq: Sequence, reason: FinishReason, text: String) {
        let mut out = seq.output(text, Vec::new(), Vec::new());
        out.finish = Some(reason.clone());
        let _ = seq.sink.send(out);
        self.release(seq, reason);
    }

    /// Caches a finished sequence's full pages and releases everything else it holds.
    fn release(&mut self, mut seq: Sequence, reason: FinishReason) {
        if self.cfg.prefix_cache && !matches!(reason, FinishReason::Error(_)) {
            cache_computed(&mut self.cache, &mut self.pool, &mut seq, self.cfg.page_size);
        }
        self.detach(&mut seq);
        self.stats.requests_finished += 1;
        self.stats.prompt_tokens_total += seq.prompt_len as u64;
    }

    fn refresh_stats(&mut self) {
        let m = self.cache.metrics();
        let s = &mut self.stats;
        s.waiting = self.waiting.len();
        s.running = self.running.len();
        s.tokens_in_flight = self.running.iter().map(|q| q.tokens.len()).sum();
        s.pages_free = self.pool.free_pages();
        s.peak_pages_used = s.peak_pages_used.max(s.pages_total - s.pages_free);
        s.pages_cached = m.cached_pages;
        s.cache_hit_tokens = m.hit_tokens;
        s.cache_miss_tokens = m.miss_tokens;
    }

    /// Checks the page bookkeeping (tests): pool, cache and sequences agree.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.pool.check_invariants()?;
        self.cache.check_invariants(&self.pool)?;
        let owned: usize = self.running.iter().map(|s| s.pages.len() - s.shared).sum();
        let c = self.pool.counts();
        if c.owned != owned {
            return Err(format!(
                "pool says {} pages are owned, running sequences own {owned}",
                c.owned
            ));
        }
        if self.waiting.iter().any(|s| !s.pages.is_empty() || s.node.is_some()) {
            return Err("a waiting sequence holds pages".into());
        }
        Ok(())
    }

    /// Pages in the pool's free list plus those only the cache holds unlocked.
    pub fn reclaimable_pages(&self) -> usize {
        self.pool.free_pages() + self.cache.evictable_pages()
    }
}

/// Inserts a sequence's computed full pages into the prefix cache and moves its lock to
/// the new node.
fn cache_computed(
    cache: &mut RadixCache,
    pool: &mut PagePool,
    seq: &mut Sequence,
    page_size: usize,
) {
    let full = seq.computed / page_size;
    if full <= seq.shared {
        return;
    }
    let tokens = &seq.tokens[..full * page_size];
    match cache.insert(tokens, &mut seq.pages[..full], pool) {
        Ok(res) => {
            if cache.lock(res.last_node).is_ok() {
                if let Some(old) = seq.node.replace(res.last_node) {
                    let _ = cache.unlock(old);
                }
                seq.shared = full;
            }
        }
        Err(e) => tracing::error!("caching the prefix of {}: {e}", seq.id),
    }
}
