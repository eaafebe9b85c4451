//! `/v1/completions` responses: the full response and stream chunks.

use radix_engine::Output;
use radix_model::Tokenizer;

use crate::api::{Completion, CompletionChoice, CompletionLogprobs, UsageField};
use crate::generation::{Collected, Meta};

/// The text of each token (for log-probabilities).
pub fn token_texts(tokenizer: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter().map(|&id| tokenizer.decode(&[id], false).unwrap_or_default()).collect()
}

/// Sampled-token log-probabilities, with each token's alternatives when `tops` has them;
/// `offset` is the text offset of the first token and advances past these.
fn logprobs(
    tokenizer: &Tokenizer,
    ids: &[u32],
    lps: &[f32],
    tops: &[Vec<(u32, f32)>],
    offset: &mut usize,
) -> CompletionLogprobs {
    let tokens = token_texts(tokenizer, ids);
    let text_offset = tokens
        .iter()
        .map(|t| {
            let at = *offset;
            *offset += t.len();
            at
        })
        .collect();
    let top_logprobs = (!tops.is_empty()).then(|| {
        tops.iter()
            .zip(ids.iter().zip(lps))
            .map(|(alts, (&id, &lp))| {
                // The sampled token is always there, as OpenAI answers (N + 1 at most).
                let sampled = (!alts.iter().any(|a| a.0 == id)).then_some((id, lp));
                let mut m = serde_json::Map::new();
                for (t, lp) in alts.iter().copied().chain(sampled) {
                    let text = tokenizer.decode(&[t], false).unwrap_or_default();
                    m.entry(text).or_insert(serde_json::Value::from(lp));
                }
                m
            })
            .collect()
    });
    CompletionLogprobs { tokens, token_logprobs: lps.to_vec(), top_logprobs, text_offset }
}

pub fn response(c: Collected, tokenizer: &Tokenizer) -> Completion {
    let logprobs_on = c.meta.shape.logprobs;
    let choices = c
        .choices
        .into_iter()
        .enumerate()
        .map(|(index, ch)| CompletionChoice {
            index,
            logprobs: logprobs_on.then(|| {
                logprobs(tokenizer, &ch.token_ids, &ch.logprobs, &ch.top_logprobs, &mut 0)
            }),
            text: ch.text,
            finish_reason: ch.finish,
        })
        .collect();
    Completion {
        id: c.meta.id,
        object: "text_completion",
        created: c.meta.created,
        model: c.meta.shape.model,
        choices,
        usage: UsageField::Some(c.usage),
    }
}

/// Per-choice state of a completions stream.
#[derive(Default, Clone)]
pub struct ChunkState {
    text_offset: usize,
}

/// The stream chunk for one output, if it carries anything.
pub fn chunk(
    meta: &Meta,
    index: usize,
    o: &Output,
    state: &mut ChunkState,
    tokenizer: &Tokenizer,
) -> Option<Completion> {
    let reports_logprobs = meta.shape.logprobs && !o.token_ids.is_empty();
    if o.text.is_empty() && o.finish.is_none() && !reports_logprobs {
        return None;
    }
    let logprobs = meta.shape.logprobs.then(|| {
        logprobs(tokenizer, &o.token_ids, &o.logprobs, &o.top_logprobs, &mut state.text_offset)
    });
    Some(Completion {
        id: meta.id.clone(),
        object: "text_completion",
        created: meta.created,
        model: meta.shape.model.clone(),
        choices: vec![CompletionChoice {
            index,
            text: o.text.clone(),
            logprobs,
            finish_reason: o.finish.as_ref().map(|f| f.as_openai()),
        }],
        usage: if meta.shape.include_usage { UsageField::Null } else { UsageField::Absent },
    })
}

/// The last chunk of a stream with include_usage: no choices, the totals.
pub fn usage_chunk(meta: &Meta, usage: crate::api::Usage) -> Completion {
    Completion {
        id: meta.id.clone(),
        object: "text_completion",
        created: meta.created,
        model: meta.shape.model.clone(),
        choices: Vec::new(),
        usage: UsageField::Some(usage),
    }
}
