//! A request inside the engine: its tokens, the pages holding their KV, and its output
//! state.

use radix_model::{SamplingParams, TokenCounts};
use tokio::sync::mpsc::UnboundedSender;

use crate::constraint::Constraint;
use crate::kv_manager::SeqPages;
use crate::request::{Output, Request, RequestId, StopConfig};

pub(crate) struct Sequence {
    pub id: RequestId,
    /// Prompt, then the sampled tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub sampling: SamplingParams,
    /// Its stop rules, stop token ids sorted (looked up per token) and stop strings
    /// dropped (they are matched outside the engine).
    pub stop: StopConfig,
    pub logprobs: bool,
    pub top_logprobs: usize,
    /// Alternatives per scored prompt token, when prompt log-probabilities are asked for.
    pub prompt_logprobs: Option<usize>,
    /// Prompt positions below this have had their log-probability sent (from 1).
    pub prompt_scored: usize,
    /// Tokens whose KV is in its pages (the rest still has to be computed).
    pub computed: usize,
    /// Its KV pages (may run ahead of `computed`), changed only by the `KvManager`.
    pub kv: SeqPages,
    /// Prompt tokens the prefix cache served at first admission.
    pub cached_tokens: usize,
    /// Admission order; preemption takes the newest first.
    pub arrival: u64,
    /// Lower is admitted first (and kept longer).
    pub priority: i32,
    /// The request whose fair share it shares (its own id when alone).
    pub group: RequestId,
    pub counts: TokenCounts,
    /// Fixes the sampler's random numbers (the request's seed, or one drawn at arrival).
    pub seed: u64,
    pub sink: UnboundedSender<Output>,
    pub preempted: u32,
    /// Tokens scheduled in the current step (0: not scheduled).
    pub step_len: usize,
    /// The request's own sparse budget (else the engine's).
    pub sparse_budget: Option<radix_kv::SparseBudget>,
    /// Structured output: the grammar, advanced with each sampled token.
    pub constraint: Option<Constraint>,
    /// Why the grammar failed in this step's mask (the sequence then ends with an error).
    pub constraint_error: Option<String>,
}

impl Sequence {
    pub fn new(id: RequestId, req: Request, arrival: u64, sink: UnboundedSender<Output>) -> Self {
        let seed = req.sampling.seed.unwrap_or_else(rand::random);
        let mut stop = req.stop;
        stop.stop_strings = Vec::new();
        // However long the list, a lookup per sampled token costs log(vocabulary).
        stop.stop_token_ids.sort_unstable();
        stop.stop_token_ids.dedup();
        Self {
            id,
            counts: TokenCounts::new(&req.prompt),
            prompt_len: req.prompt.len(),
            tokens: req.prompt,
            sampling: req.sampling,
            stop,
            logprobs: req.logprobs,
            top_logprobs: req.top_logprobs,
            prompt_logprobs: req.prompt_logprobs,
            prompt_scored: 1,
            computed: 0,
            kv: SeqPages::default(),
            cached_tokens: 0,
            arrival,
            priority: req.priority,
            group: req.group.unwrap_or(id),
            seed,
            sink,
            preempted: 0,
            step_len: 0,
            sparse_budget: req.sparse_budget,
            constraint: req.constraint,
            constraint_error: None,
        }
    }

    /// Whether it samples at the end of the current step (its last token is scheduled).
    pub fn samples_this_step(&self) -> bool {
        self.step_len > 0 && self.computed + self.step_len == self.tokens.len()
    }

    /// Computes the grammar's mask for this step's sample (no-op when unconstrained).
    pub fn compute_mask(&mut self) {
        if let Some(c) = &mut self.constraint
            && let Err(e) = c.compute_mask()
        {
            self.constraint_error = Some(e);
        }
    }

    /// A stop token id of this request (not EOS).
    pub fn is_stop_token(&self, token: u32) -> bool {
        self.stop.stop_token_ids.binary_search(&token).is_ok()
    }

    pub fn num_output(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Whether prompt positions are still to be scored (its prompt must be computed, so
    /// the prefix cache is not used, and its chunks make logit rows).
    pub fn scores_prompt(&self) -> bool {
        self.prompt_logprobs.is_some() && self.prompt_scored < self.prompt_len
    }

    /// Prompt positions `p` a chunk computing `computed..upto` scores: the logits after
    /// token `p - 1` give token p's log-probability.
    pub fn scored_positions(&self, upto: usize) -> std::ops::Range<usize> {
        if self.prompt_logprobs.is_none() {
            return 0..0;
        }
        let from = self.prompt_scored.max(self.computed + 1);
        let to = (upto + 1).min(self.prompt_len);
        from..to.max(from)
    }

    /// Tokens still to compute before the next sample (1 when decoding).
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// An output message with usage numbers filled in.
    pub fn output(&self, text: String, token_ids: Vec<u32>, logprobs: Vec<f32>) -> Output {
        Output {
            id: self.id,
            text,
            token_ids,
            logprobs,
            top_logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
            finish: None,
            last_token_is_text: false,
            prompt_tokens: self.prompt_len,
            completion_tokens: self.num_output(),
            cached_tokens: self.cached_tokens,
        }
    }
}
