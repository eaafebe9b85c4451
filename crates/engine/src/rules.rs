//! The rules a request must follow to run on this engine: a non-empty prompt of tokens
//! in the vocabulary, room in the context for what it asks to generate, stop strings
//! of bounded total size, sparse budgets only where sparse paging is on, valid sampling. The one source of them: the engine
//! checks every request it is given (`check`), and the server runs the same checks
//! field by field to answer with the parameter at fault.

use crate::request::Request;
use radix_model::MAX_TOP_LOGPROBS;

/// Total bytes of one request's stop strings at most. They are matched by an automaton
/// built per request (its size grows with theirs); a few KiB is far more than any real
/// stop list (OpenAI allows 4 strings), and 15 strings of 1 MB once took 16 s.
pub const MAX_STOP_STRING_BYTES: usize = 4096;

/// What a request is checked against (the model's vocabulary, the engine's context
/// length and switches).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestRules {
    pub vocab_size: usize,
    /// Longest sequence (prompt + output) the engine runs.
    pub max_model_len: usize,
    /// Sparse paging is on, so requests may set `sparse_budget`.
    pub sparse: bool,
}

/// A broken rule; the message is what a client is told.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("the prompt is empty (no tokens)")]
    EmptyPrompt,
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    OutsideVocabulary { id: u64, vocab: usize },
    #[error(
        "the prompt has {len} tokens; this model's context length is {max} tokens, which \
         leaves no room to generate"
    )]
    NoRoom { len: usize, max: usize },
    #[error("max_tokens must be at least 1")]
    NoTokensAsked,
    #[error(
        "this model's context length is {max} tokens, but {total} were asked for ({prompt} in \
         the prompt, {max_tokens} to generate); reduce max_tokens or the prompt",
        total = *prompt as u128 + *max_tokens as u128
    )]
    TooLong { prompt: usize, max_tokens: u64, max: usize },
    #[error(
        "sparse_budget needs sparse paging: start the engine with a sparse budget \
         (--sparse-budget)"
    )]
    SparseOff,
    #[error(
        "the stop strings add up to {bytes} bytes; at most {MAX_STOP_STRING_BYTES} are accepted"
    )]
    StopTooLong { bytes: usize },
    #[error("{0}")]
    Sampling(String),
    #[error("at most {MAX_TOP_LOGPROBS} alternatives per token, {0} asked for")]
    TooManyAlternatives(usize),
}

impl RequestRules {
    /// Token ids within the vocabulary.
    pub fn check_tokens(&self, ids: impl IntoIterator<Item = u64>) -> Result<(), RuleError> {
        let vocab = self.vocab_size;
        match ids.into_iter().find(|&id| id >= vocab as u64) {
            Some(id) => Err(RuleError::OutsideVocabulary { id, vocab }),
            None => Ok(()),
        }
    }

    /// A prompt: not empty, in the vocabulary, leaving room for at least one token.
    pub fn check_prompt(&self, prompt: &[u32]) -> Result<(), RuleError> {
        if prompt.is_empty() {
            return Err(RuleError::EmptyPrompt);
        }
        self.check_tokens(prompt.iter().map(|&t| t as u64))?;
        if prompt.len() >= self.max_model_len {
            return Err(RuleError::NoRoom { len: prompt.len(), max: self.max_model_len });
        }
        Ok(())
    }

    /// Tokens a prompt of `prompt_len` leaves to generate.
    pub fn room(&self, prompt_len: usize) -> usize {
        self.max_model_len.saturating_sub(prompt_len)
    }

    /// `max_tokens` for a prompt of `prompt_len`: at least 1, within the context.
    pub fn check_max_tokens(&self, prompt_len: usize, max_tokens: u64) -> Result<(), RuleError> {
        if max_tokens == 0 {
            return Err(RuleError::NoTokensAsked);
        }
        if max_tokens > self.room(prompt_len) as u64 {
            return Err(RuleError::TooLong {
                prompt: prompt_len,
                max_tokens,
                max: self.max_model_len,
            });
        }
        Ok(())
    }

    /// Stop strings of bounded total size.
    pub fn check_stop_strings(&self, stops: &[String]) -> Result<(), RuleError> {
        let bytes = stops.iter().map(String::len).sum();
        if bytes > MAX_STOP_STRING_BYTES {
            return Err(RuleError::StopTooLong { bytes });
        }
        Ok(())
    }

    /// Every rule, for a whole request.
    pub fn check(&self, req: &Request) -> Result<(), RuleError> {
        self.check_prompt(&req.prompt)?;
        self.check_max_tokens(req.prompt.len(), req.stop.max_tokens as u64)?;
        self.check_stop_strings(&req.stop.stop_strings)?;
        self.check_tokens(req.stop.stop_token_ids.iter().map(|&t| t as u64))?;
        if req.sparse_budget.is_some() && !self.sparse {
            return Err(RuleError::SparseOff);
        }
        let alternatives = req.top_logprobs.max(req.prompt_logprobs.unwrap_or(0));
        if alternatives > MAX_TOP_LOGPROBS {
            return Err(RuleError::TooManyAlternatives(alternatives));
        }
        self.check_tokens(req.sampling.logit_bias.iter().map(|b| b.0 as u64))?;
        req.sampling.validate().map_err(RuleError::Sampling)
    }
}

#[cfg(test)]
mod tests {
    use radix_model::SamplingParams;

    use super::*;
    use crate::request::StopConfig;

    const RULES: RequestRules = RequestRules { vocab_size: 100, max_model_len: 10, sparse: false };

    fn request(prompt: Vec<u32>, max_tokens: usize) -> Request {
        let stop = StopConfig { max_tokens, ..StopConfig::default() };
        Request::new(prompt, SamplingParams::default(), stop)
    }

    #[test]
    fn prompts_and_lengths() {
        assert_eq!(RULES.check_prompt(&[]), Err(RuleError::EmptyPrompt));
        assert_eq!(
            RULES.check_prompt(&[1, 100]),
            Err(RuleError::OutsideVocabulary { id: 100, vocab: 100 })
        );
        assert_eq!(RULES.check_prompt(&[1; 10]), Err(RuleError::NoRoom { len: 10, max: 10 }));
        assert_eq!(RULES.check_prompt(&[1; 9]), Ok(()));
        assert_eq!(RULES.room(9), 1);
        assert_eq!(RULES.check_max_tokens(9, 1), Ok(()));
        assert_eq!(
            RULES.check_max_tokens(9, 2),
            Err(RuleError::TooLong { prompt: 9, max_tokens: 2, max: 10 })
        );
        assert_eq!(RULES.check_max_tokens(1, 0), Err(RuleError::NoTokensAsked));
        let e = RULES.check_max_tokens(3, u64::MAX).unwrap_err().to_string();
        assert!(e.contains(&format!("{}", 3u128 + u64::MAX as u128)), "{e}");
    }

    #[test]
    fn whole_requests() {
        assert_eq!(RULES.check(&request(vec![1, 2], 8)), Ok(()));
        assert!(matches!(RULES.check(&request(vec![1, 2], 9)), Err(RuleError::TooLong { .. })));
        let mut r = request(vec![1, 2], 4);
        r.stop.stop_token_ids = vec![7, 300];
        assert_eq!(RULES.check(&r), Err(RuleError::OutsideVocabulary { id: 300, vocab: 100 }));
        let mut r = request(vec![1, 2], 4);
        r.stop.stop_strings = vec!["x".repeat(MAX_STOP_STRING_BYTES / 2); 2];
        assert_eq!(RULES.check(&r), Ok(()));
        r.stop.stop_strings.push("y".into());
        let bytes = MAX_STOP_STRING_BYTES + 1;
        assert_eq!(RULES.check(&r), Err(RuleError::StopTooLong { bytes }));
        let mut r = request(vec![1, 2], 4);
        r.sparse_budget = Some(radix_kv::SparseBudget::Fraction(0.5));
        assert_eq!(RULES.check(&r), Err(RuleError::SparseOff));
        assert_eq!(RequestRules { sparse: true, ..RULES }.check(&r), Ok(()));
        let mut r = request(vec![1, 2], 4);
        r.sampling.top_p = 0.0;
        assert!(matches!(RULES.check(&r), Err(RuleError::Sampling(_))));
    }
}
