//! `/v1/chat/completions` responses: the full response and stream chunks.

use radix_engine::Output;
use radix_model::Tokenizer;

use crate::api::{
    ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta, ChatLogprobs,
    ChatMessageOut, ChatTokenLogprob, ChatTopLogprob, Usage, UsageField,
};
use crate::completions::token_texts;
use crate::generation::{Collected, Meta};

/// `bytes` are the token's own, not those of its text (U+FFFD for part of a character).
/// `tops` holds each token's alternatives (empty when none were asked for).
fn logprobs(
    tokenizer: &Tokenizer,
    ids: &[u32],
    lps: &[f32],
    tops: &[Vec<(u32, f32)>],
) -> ChatLogprobs {
    let content = token_texts(tokenizer, ids)
        .into_iter()
        .zip(ids.iter().zip(lps))
        .enumerate()
        .map(|(i, (token, (&id, &logprob)))| ChatTokenLogprob {
            bytes: tokenizer.token_bytes(id),
            token,
            logprob,
            top_logprobs: tops
                .get(i)
                .map(|alts| {
                    alts.iter()
                        .map(|&(t, logprob)| ChatTopLogprob {
                            token: tokenizer.decode(&[t], false).unwrap_or_default(),
                            logprob,
                            bytes: tokenizer.token_bytes(t),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    ChatLogprobs { content }
}

pub fn response(c: Collected, tokenizer: &Tokenizer) -> ChatCompletion {
    let logprobs_on = c.meta.shape.logprobs;
    let choices = c
        .choices
        .into_iter()
        .enumerate()
        .map(|(index, ch)| ChatChoice {
            index,
            logprobs: logprobs_on
                .then(|| logprobs(tokenizer, &ch.token_ids, &ch.logprobs, &ch.top_logprobs)),
            message: ChatMessageOut { role: "assistant", content: ch.text },
            finish_reason: ch.finish,
        })
        .collect();
    ChatCompletion {
        id: c.meta.id,
        object: "chat.completion",
        created: c.meta.created,
        model: c.meta.shape.model,
        choices,
        usage: c.usage,
    }
}

/// Per-choice state of a chat stream.
#[derive(Default, Clone)]
pub struct ChunkState {
    sent_role: bool,
}

fn chunk_of(meta: &Meta, choice: ChatChunkChoice) -> ChatCompletionChunk {
    ChatCompletionChunk {
        id: meta.id.clone(),
        object: "chat.completion.chunk",
        created: meta.created,
        model: meta.shape.model.clone(),
        choices: vec![choice],
        usage: if meta.shape.include_usage { UsageField::Null } else { UsageField::Absent },
    }
}

/// The stream chunks for one output: the first output of a choice is preceded by one
/// carrying the role, as OpenAI does.
pub fn chunks(
    meta: &Meta,
    index: usize,
    o: &Output,
    state: &mut ChunkState,
    tokenizer: &Tokenizer,
) -> Vec<ChatCompletionChunk> {
    let mut out = Vec::with_capacity(2);
    if !state.sent_role {
        state.sent_role = true;
        out.push(chunk_of(
            meta,
            ChatChunkChoice {
                index,
                delta: ChatDelta { role: Some("assistant"), content: Some(String::new()) },
                logprobs: None,
                finish_reason: None,
            },
        ));
    }
    let reports_logprobs = meta.shape.logprobs && !o.token_ids.is_empty();
    if o.text.is_empty() && o.finish.is_none() && !reports_logprobs {
        return out;
    }
    let delta = if o.text.is_empty() && o.finish.is_some() {
        ChatDelta::default()
    } else {
        ChatDelta { role: None, content: Some(o.text.clone()) }
    };
    out.push(chunk_of(
        meta,
        ChatChunkChoice {
            index,
            delta,
            logprobs: meta
                .shape
                .logprobs
                .then(|| logprobs(tokenizer, &o.token_ids, &o.logprobs, &o.top_logprobs)),
            finish_reason: o.finish.as_ref().map(|f| f.as_openai()),
        },
    ));
    out
}

pub fn usage_chunk(meta: &Meta, usage: Usage) -> ChatCompletionChunk {
    ChatCompletionChunk {
        id: meta.id.clone(),
        object: "chat.completion.chunk",
        created: meta.created,
        model: meta.shape.model.clone(),
        choices: Vec::new(),
        usage: UsageField::Some(usage),
    }
}
