//! What a client asks for and what comes back.

use radix_kv::SparseBudget;

use crate::constraint::Constraint;
use radix_model::SamplingParams;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "req-{}", self.0)
    }
}

/// When generation stops (besides abort).
#[derive(Clone, Debug, PartialEq)]
pub struct StopConfig {
    /// Output tokens at most.
    pub max_tokens: usize,
    /// Text that ends the output (not included in it). Matched on the client's side of
    /// the engine (`OutputStream`, which `EngineHandle::submit` returns), never by the
    /// engine thread: `Engine::add` ignores them.
    pub stop_strings: Vec<String>,
    /// Tokens that end the output (not included in its text).
    pub stop_token_ids: Vec<u32>,
    /// Keep going past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
}

impl Default for StopConfig {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            stop_strings: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// One generation request, already tokenized.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopConfig,
    /// Report the log-probability of each sampled token.
    pub logprobs: bool,
    /// And this many most likely alternatives at each position (0..=20).
    pub top_logprobs: usize,
    /// Report each prompt token's log-probability given the tokens before it, with this
    /// many alternatives (vLLM's `prompt_logprobs`; completions' `echo` with logprobs).
    /// Such a prompt is computed, not served from the prefix cache.
    pub prompt_logprobs: Option<usize>,
    /// Sparse paging budget for this request's decode steps (the engine's default when
    /// `None`); needs an engine started with sparse paging.
    pub sparse_budget: Option<SparseBudget>,
    /// Lower runs first (vLLM's `priority`; default 0). Waiting requests are admitted in
    /// priority order, and a request may preempt running ones of a later priority.
    pub priority: i32,
    /// The request whose fair share this one shares: the choices of one HTTP request
    /// (n, several prompts) name the first's id, so together they count as one client
    /// when running slots are shared out. `None`: a group of its own.
    pub group: Option<RequestId>,
    /// Structured output: the grammar its output follows (compiled by `Grammars`).
    pub constraint: Option<Constraint>,
}

impl Request {
    pub fn new(prompt: Vec<u32>, sampling: SamplingParams, stop: StopConfig) -> Self {
        Self {
            prompt,
            sampling,
            stop,
            logprobs: false,
            top_logprobs: 0,
            prompt_logprobs: None,
            sparse_budget: None,
            priority: 0,
            group: None,
            constraint: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the model's context length.
    Length,
    /// Aborted by the client (or its connection closed).
    Abort,
    /// The engine could not run it (the message says why).
    Error(String),
}

impl FinishReason {
    /// OpenAI's `finish_reason` string.
    pub fn as_openai(&self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
            Self::Error(_) => "error",
        }
    }
}

/// A prompt token's log-probability given the tokens before it.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptLogprob {
    /// Its position in the prompt (from 1: the first token has no context).
    pub position: usize,
    pub token: u32,
    pub logprob: f32,
    /// The most likely tokens at that position, `(token, logprob)`.
    pub top: Vec<(u32, f32)>,
}

/// A streamed piece of a request's output. The last one has `finish` set.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    pub id: RequestId,
    /// New text since the previous output (valid UTF-8; may be empty).
    pub text: String,
    /// Tokens sampled since the previous output.
    pub token_ids: Vec<u32>,
    /// Log-probabilities of `token_ids`, when asked for.
    pub logprobs: Vec<f32>,
    /// For each of `token_ids`, the most likely alternatives `(token, logprob)`, when
    /// `top_logprobs` was asked for (else empty).
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// Prompt tokens scored since the previous output, in order (`prompt_logprobs`).
    pub prompt_logprobs: Vec<PromptLogprob>,
    pub finish: Option<FinishReason>,
    /// With `finish` Stop: the last token is part of the text (a grammar completed on
    /// it) rather than a stop token, whose text is left out.
    pub last_token_is_text: bool,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache (not recomputed).
    pub cached_tokens: usize,
}
