//! The engine: continuous batching with chunked prefill, prefix reuse through the radix
//! cache, page allocation with eviction and preemption, sampling, stop rules, streaming.
//!
//! One `step()`:
//! 1. schedule: when every running slot is taken and a request waits below its fair
//!    share (or outranks running ones by priority), running sequences give way
//!    (`fairness`); then running sequences first, oldest first (a decode needs one
//!    token, a prefill the rest of its prompt, in chunks under the token budget); then
//!    waiting sequences while budget and pages last, of the request with the fewest
//!    running first (`wait_queue`). A sequence first matches its prompt against the
//!    prefix cache and computes only what is not cached.
//! 2. pages: each scheduled sequence gets pages for its new tokens; when the pool is
//!    dry, unlocked cached pages are evicted; when that is not enough, the newest running
//!    request is preempted (its pages go back, it returns to the front of the queue and
//!    later recomputes, mostly from the cache).
//! 3. run the model on the batch, sample where a sequence reached its last token, apply
//!    stop tokens and lengths, and stream the token ids (text and stop strings are the
//!    receiver's: `OutputStream`, off this thread).
//! 4. finished requests put their full pages into the prefix cache and release the rest.
//!
//! The schedule (steps 1 and 2) is in `scheduler`; every page and cache operation goes
//! through the `KvManager`.

mod fairness;
mod scheduler;
mod wait_queue;

use std::sync::Arc;

use radix_kv::{PageTableBuilder, SparseBudget, SparsePolicy};
use radix_model::{KvPoolSpec, SampleRequest, Sampled, Step, Tokenizer};

use crate::request::PromptLogprob;
use tokio::sync::mpsc::UnboundedSender;

use self::scheduler::Scheduled;
use self::wait_queue::WaitQueue;
use crate::constraint::{Advance, Grammars};
use crate::kv_manager::KvManager;
use crate::metrics::EngineStats;
use crate::request::{FinishReason, Output, Request, RequestId};
use crate::rules::{RequestRules, RuleError};
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
    Invalid(#[from] RuleError),
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("engine configuration: {0}")]
    Config(String),
}

pub struct Engine {
    runner: Box<dyn Runner>,
    tokenizer: Arc<Tokenizer>,
    cfg: EngineConfig,
    rules: RequestRules,
    eos: Vec<u32>,
    kv: KvManager,
    waiting: WaitQueue,
    running: Vec<Sequence>,
    next_arrival: u64,
    stats: EngineStats,
    /// Compiles structured-output grammars over this model's vocabulary (shared with the
    /// server, which compiles while validating).
    grammars: Arc<Grammars>,
    // Per-step buffers, reused.
    table: PageTableBuilder,
    step: Step,
    /// What each logit row of the step is for, in row order (reused every step).
    rows: Vec<LogitRow>,
}

/// Threads that compute a step's grammar masks: the cores the forward's launching thread
/// leaves, at most 8.
fn mask_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.saturating_sub(1).clamp(1, 8)
    })
}

/// A logit row of a step: a sequence's next token to sample, or a prompt token to score.
#[derive(Clone, Copy, Debug)]
enum LogitRow {
    /// Sample the next token of plan entry `plan`.
    Sample { plan: usize },
    /// Score prompt position `position` of plan entry `plan` (prompt log-probabilities).
    Score { plan: usize, position: usize },
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
        let config = |e: &dyn std::fmt::Display| EngineError::Config(e.to_string());
        // The backend validates the policy (a window of at least one page) and says what a
        // page of its pool is.
        let spec = KvPoolSpec {
            num_pages: cfg.num_pages,
            page_size: cfg.page_size,
            sparse: cfg.sparse.map(|s| s.policy),
        };
        let geometry = runner.init_kv(&spec).map_err(|e| config(&e))?;
        let kv =
            KvManager::new(cfg.num_pages, geometry, cfg.prefix_cache).map_err(|e| config(&e))?;
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
        let asked = cfg.max_model_len.unwrap_or(model_len).min(model_len);
        let max_model_len = asked.min(kv.capacity_tokens());
        if max_model_len < asked {
            // Requests are checked against this (RequestRules), so errors name it.
            tracing::warn!(
                kv_tokens = kv.capacity_tokens(),
                max_model_len,
                "the KV pool holds fewer tokens than the context length: max_model_len lowered"
            );
        }
        let rules = RequestRules {
            vocab_size: runner.config().vocab_size,
            max_model_len,
            sparse: cfg.sparse.is_some(),
        };
        let eos = runner.config().eos_token_ids.clone();
        let grammars =
            Arc::new(Grammars::new(tokenizer.clone(), runner.config().vocab_size, eos.clone()));
        let table = PageTableBuilder::new(cfg.page_size).map_err(|e| config(&e))?;
        let stats = EngineStats {
            pages_total: cfg.num_pages,
            pages_free: cfg.num_pages,
            ..Default::default()
        };
        Ok(Self {
            runner,
            tokenizer,
            cfg,
            rules,
            eos,
            kv,
            waiting: WaitQueue::default(),
            running: Vec::new(),
            next_arrival: 0,
            stats,
            grammars,
            table,
            step: Step::default(),
            rows: Vec::new(),
        })
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn grammars(&self) -> &Arc<Grammars> {
        &self.grammars
    }

    pub fn max_model_len(&self) -> usize {
        self.rules.max_model_len
    }

    /// What requests are checked against (the server checks them field by field).
    pub fn rules(&self) -> RequestRules {
        self.rules
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
        Ok(self.rules.check(req)?)
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
        if let Some(seq) = self.waiting.remove(id) {
            self.finish(seq, FinishReason::Abort);
        } else if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let seq = self.running.remove(i);
            self.finish(seq, FinishReason::Abort);
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
                    self.finish(seq, FinishReason::Error(e.clone()));
                }
            }
        }
        self.stats.steps += 1;
        self.refresh_stats();
        true
    }

    /// Builds the step's batch, runs the model and samples every sequence that reached
    /// its last token (in plan order).
    fn execute(&mut self, plan: &[Scheduled]) -> Result<Vec<Sampled>, String> {
        self.table.clear();
        let step = &mut self.step;
        step.clear();
        let page_size = self.kv.page_size();
        let (mut dense_pages, mut read_pages, mut scored_pages) = (0usize, 0usize, 0usize);
        self.rows.clear();
        for (k, s) in plan.iter().enumerate() {
            let seq = &self.running[s.index];
            let upto = seq.computed + s.len;
            let pages = &seq.kv.pages()[..upto.div_ceil(page_size)];
            self.table.push_seq(pages, upto, s.len).map_err(|e| e.to_string())?;
            if let Some(sp) = &self.cfg.sparse {
                let budget = seq.sparse_budget.unwrap_or(sp.budget);
                // Only decode rows attend sparsely.
                let keep = match s.len {
                    1 => sp.policy.pages_to_keep(budget, upto, page_size),
                    _ => None,
                };
                step.kv_keep.push(keep.unwrap_or(0) as i32);
                dense_pages += pages.len();
                read_pages += keep.unwrap_or(pages.len());
                scored_pages += if keep.is_some() { pages.len() } else { 0 };
            }
            let first_row = step.tokens.len() as u32;
            step.tokens.extend_from_slice(&seq.tokens[seq.computed..upto]);
            step.positions.extend(seq.computed as i32..upto as i32);
            // Token q's logits score prompt position q + 1.
            for position in seq.scored_positions(upto) {
                step.logit_rows.push(first_row + (position - 1 - seq.computed) as u32);
                self.rows.push(LogitRow::Score { plan: k, position });
            }
            if upto == seq.tokens.len() {
                step.logit_rows.push(step.tokens.len() as u32 - 1);
                self.rows.push(LogitRow::Sample { plan: k });
            }
        }
        step.set_table(self.table.table());
        let step = &self.step;
        let constrained = plan.iter().any(|s| {
            let seq = &self.running[s.index];
            seq.constraint.is_some() && seq.samples_this_step()
        });
        let forward = if constrained {
            // Grammar masks on other threads while the forward runs (on CUDA it only
            // launches, on the CPU it computes): constrained rows cost the batch
            // max(masks, forward), not their sum. A mask takes tens of µs, so a batch of
            // hundreds of constrained rows is spread over several threads.
            let (running, runner) = (&mut self.running, &mut self.runner);
            let mut rows: Vec<&mut Sequence> = running
                .iter_mut()
                .filter(|s| s.constraint.is_some() && s.samples_this_step())
                .collect();
            let per_thread = rows.len().div_ceil(mask_threads());
            std::thread::scope(|scope| {
                let workers: Vec<_> = rows
                    .chunks_mut(per_thread)
                    .map(|chunk| {
                        scope.spawn(move || {
                            for seq in chunk {
                                seq.compute_mask();
                            }
                        })
                    })
                    .collect();
                let forward = runner.forward(step);
                // A panic in the grammar engine is a bug of its; the rows it left without
                // a mask fail below rather than the whole engine here.
                for w in workers {
                    if w.join().is_err() {
                        tracing::error!("computing grammar masks panicked");
                    }
                }
                forward
            })
        } else {
            self.runner.forward(step)
        };
        forward.map_err(|e| e.to_string())?;
        if let Some(sp) = &self.cfg.sparse {
            let reads = self.kv.kv_read_bytes(&sp.policy, dense_pages, read_pages, scored_pages);
            self.stats.kv_read_dense_bytes += reads.dense_bytes;
            self.stats.kv_read_bytes += reads.bytes;
        }
        let requests: Vec<SampleRequest> = self
            .rows
            .iter()
            .map(|row| match *row {
                LogitRow::Sample { plan: k } => {
                    let seq = &self.running[plan[k].index];
                    SampleRequest {
                        top_logprobs: if seq.logprobs { seq.top_logprobs } else { 0 },
                        allowed: seq.constraint.as_ref().map(|c| c.allowed()),
                        ..SampleRequest::new(
                            &seq.sampling,
                            &seq.counts,
                            seq.seed,
                            seq.num_output() as u64,
                        )
                    }
                }
                LogitRow::Score { plan: k, position } => {
                    let seq = &self.running[plan[k].index];
                    SampleRequest {
                        top_logprobs: seq.prompt_logprobs.unwrap_or(0),
                        target: Some(seq.tokens[position]),
                        ..SampleRequest::new(&seq.sampling, &seq.counts, seq.seed, 0)
                    }
                }
            })
            .collect();
        self.runner.sample(&requests).map_err(|e| e.to_string())
    }

    /// Advances the scheduled sequences past the step: samples, stops, streams.
    fn process(&mut self, plan: &[Scheduled], sampled: &[Sampled]) {
        let rows = std::mem::take(&mut self.rows);
        let mut row = 0;
        let mut done: Vec<(usize, FinishReason)> = Vec::new();
        for (k, s) in plan.iter().enumerate() {
            let seq = &mut self.running[s.index];
            // The chunk's scored prompt tokens come first among its rows.
            let mut scored = Vec::new();
            while let Some(&LogitRow::Score { plan, position }) = rows.get(row) {
                if plan != k {
                    break;
                }
                let x = &sampled[row];
                scored.push(PromptLogprob {
                    position,
                    token: x.token,
                    logprob: x.logprob,
                    top: x.top.clone(),
                });
                seq.prompt_scored = position + 1;
                row += 1;
            }
            let prefilling = seq.computed < seq.prompt_len;
            seq.computed += s.len;
            if seq.computed < seq.tokens.len() {
                // A prefill chunk: nothing to sample yet; scored tokens go out now.
                if !scored.is_empty() {
                    let mut out = seq.output(String::new(), Vec::new(), Vec::new());
                    out.prompt_logprobs = scored;
                    if seq.sink.send(out).is_err() {
                        done.push((s.index, FinishReason::Abort));
                    }
                }
                continue;
            }
            if prefilling {
                self.kv.cache_computed(&mut seq.kv, &seq.tokens, seq.computed);
            }
            let sampled = &sampled[row];
            row += 1;
            let token = sampled.token;
            seq.tokens.push(token);
            seq.counts.add_output(token);
            self.stats.generation_tokens_total += 1;

            // The grammar ends the output when EOS is sampled where it may end (its mask
            // allows EOS only there) or when nothing more may follow.
            let mut grammar_done = false;
            if let Some(c) = &mut seq.constraint {
                match c.advance(token) {
                    Ok(Advance::Done) => grammar_done = true,
                    Ok(Advance::Continue) => {}
                    // Keep the first error (computing the mask may have stored one).
                    Err(e) => {
                        seq.constraint_error.get_or_insert(e);
                    }
                }
            }
            let eos = self.eos.contains(&token);
            let stop_token = (!seq.stop.ignore_eos && eos) || seq.is_stop_token(token);
            let length = seq.num_output() >= seq.stop.max_tokens
                || seq.tokens.len() >= self.rules.max_model_len;
            let logprobs = if seq.logprobs { vec![sampled.logprob] } else { Vec::new() };
            // Text and stop strings are the receiver's (`OutputStream`): only ids go out.
            let mut out = seq.output(String::new(), vec![token], logprobs);
            if seq.logprobs && seq.top_logprobs > 0 {
                out.top_logprobs.push(sampled.top.clone());
            }
            out.prompt_logprobs = scored;
            if let Some(e) = seq.constraint_error.take() {
                out.finish = Some(FinishReason::Error(format!("structured output: {e}")));
            } else if grammar_done && !eos {
                // The grammar's last token is text even when it is also a stop token.
                out.finish = Some(FinishReason::Stop);
                out.last_token_is_text = true;
            } else if stop_token || grammar_done {
                out.finish = Some(FinishReason::Stop);
            } else if length {
                out.finish = Some(FinishReason::Length);
            }
            match out.finish.clone() {
                Some(reason) => {
                    done.push((s.index, reason));
                    let _ = seq.sink.send(out);
                }
                None => {
                    if seq.sink.send(out).is_err() {
                        // The client went away: abort.
                        done.push((s.index, FinishReason::Abort));
                    }
                }
            }
        }
        self.rows = rows;
        // Remove from the back so earlier indices stay valid.
        done.sort_unstable_by_key(|d| std::cmp::Reverse(d.0));
        for (index, reason) in done {
            let seq = self.running.remove(index);
            self.release(seq, reason);
        }
    }

    /// Ends a sequence that already sent its last output (or sends an empty final one).
    fn finish(&mut self, seq: Sequence, reason: FinishReason) {
        let mut out = seq.output(String::new(), Vec::new(), Vec::new());
        out.finish = Some(reason.clone());
        let _ = seq.sink.send(out);
        self.release(seq, reason);
    }

    /// Caches a finished sequence's full pages and releases everything else it holds.
    fn release(&mut self, mut seq: Sequence, reason: FinishReason) {
        if !matches!(reason, FinishReason::Error(_)) {
            self.kv.cache_computed(&mut seq.kv, &seq.tokens, seq.computed);
        }
        self.kv.free(&mut seq.kv);
        self.stats.requests_finished += 1;
        self.stats.prompt_tokens_total += seq.prompt_len as u64;
    }

    fn refresh_stats(&mut self) {
        let m = self.kv.cache_metrics();
        let s = &mut self.stats;
        s.waiting = self.waiting.len();
        s.running = self.running.len();
        s.tokens_in_flight = self.running.iter().map(|q| q.tokens.len()).sum();
        s.pages_free = self.kv.free_pages();
        s.peak_pages_used = s.peak_pages_used.max(s.pages_total - s.pages_free);
        s.pages_cached = m.cached_pages;
        s.cache_hit_tokens = m.hit_tokens;
        s.cache_miss_tokens = m.miss_tokens;
    }

    /// Checks the page bookkeeping (tests): pool, cache and sequences agree, and waiting
    /// sequences hold nothing.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.kv.check_invariants(self.running.iter().map(|s| &s.kv))?;
        if self.waiting.iter().any(|s| !s.kv.is_empty()) {
            return Err("a waiting sequence holds pages".into());
        }
        Ok(())
    }

    /// Pages in the pool's free list plus those only the cache holds unlocked.
    pub fn reclaimable_pages(&self) -> usize {
        self.kv.reclaimable_pages()
    }
}
