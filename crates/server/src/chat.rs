//! `/v1/chat/completions` responses: the full response and stream chunks. With tools,
//! the text is read for calls (`tools`): a response's calls become `tool_calls` with
//! `finish_reason: "tool_calls"`; a stream sends each call, once complete, as OpenAI's
//! deltas (id, type and name first, then the arguments in fragments).

use radix_engine::Output;
use radix_model::Tokenizer;

use crate::api::{
    ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta, ChatLogprobs,
    ChatMessageOut, ChatTokenLogprob, ChatTopLogprob, FunctionCall, FunctionDelta, ToolCallDelta,
    ToolCallOut, Usage, UsageField,
};
use crate::completions::token_texts;
use crate::generation::{Collected, Meta};
use crate::tools::{self, ParsedCall, Piece, ToolStream};

/// Arguments go out in fragments of about this many bytes (as a model's tokens would).
const ARGUMENT_FRAGMENT: usize = 16;

fn call_id() -> String {
    format!("call_{:024x}", rand::random::<u128>() >> 32)
}

/// A finished choice whose calls were read keeps "length" (the calls may be cut), and
/// says "tool_calls" instead of "stop".
fn finish_with_calls(finish: Option<&'static str>, calls: bool) -> Option<&'static str> {
    match finish {
        Some("stop") if calls => Some("tool_calls"),
        f => f,
    }
}

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

/// The assistant message of a whole output: its calls read out when tools are on.
fn message(meta: &Meta, text: String) -> ChatMessageOut {
    let Some(t) = &meta.shape.tools else {
        return ChatMessageOut { role: "assistant", content: Some(text), tool_calls: Vec::new() };
    };
    let (content, calls) = tools::parse_output(t.parser, &text, &t.names);
    if calls.is_empty() {
        return ChatMessageOut { role: "assistant", content: Some(text), tool_calls: Vec::new() };
    }
    let tool_calls = calls
        .into_iter()
        .map(|ParsedCall { name, arguments }| ToolCallOut {
            id: call_id(),
            kind: "function",
            function: FunctionCall { name, arguments },
        })
        .collect();
    ChatMessageOut { role: "assistant", content, tool_calls }
}

pub fn response(c: Collected, tokenizer: &Tokenizer) -> ChatCompletion {
    let logprobs_on = c.meta.shape.logprobs;
    let choices = c
        .choices
        .into_iter()
        .enumerate()
        .map(|(index, ch)| {
            let message = message(&c.meta, ch.text);
            ChatChoice {
                index,
                logprobs: logprobs_on
                    .then(|| logprobs(tokenizer, &ch.token_ids, &ch.logprobs, &ch.top_logprobs)),
                finish_reason: finish_with_calls(ch.finish, !message.tool_calls.is_empty()),
                message,
            }
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
    /// With tools: what holds calls back until they are complete.
    tools: Option<ToolStream>,
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

fn delta_chunk(meta: &Meta, index: usize, delta: ChatDelta) -> ChatCompletionChunk {
    chunk_of(meta, ChatChunkChoice { index, delta, logprobs: None, finish_reason: None })
}

/// One call as deltas: id, type and name (arguments empty), then argument fragments.
fn call_deltas(call: ParsedCall, index: usize) -> Vec<ChatDelta> {
    let first = ToolCallDelta {
        index,
        id: Some(call_id()),
        kind: Some("function"),
        function: FunctionDelta { name: Some(call.name), arguments: Some(String::new()) },
    };
    let mut deltas = vec![first];
    let args = call.arguments;
    let mut start = 0;
    while start < args.len() {
        let mut end = (start + ARGUMENT_FRAGMENT).min(args.len());
        while !args.is_char_boundary(end) {
            end += 1;
        }
        deltas.push(ToolCallDelta {
            index,
            id: None,
            kind: None,
            function: FunctionDelta { name: None, arguments: Some(args[start..end].to_string()) },
        });
        start = end;
    }
    deltas
        .into_iter()
        .map(|d| ChatDelta { tool_calls: Some(vec![d]), ..ChatDelta::default() })
        .collect()
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
        state.tools = meta.shape.tools.as_ref().map(|t| ToolStream::new(t.parser, t.names.clone()));
        out.push(delta_chunk(
            meta,
            index,
            ChatDelta {
                role: Some("assistant"),
                content: Some(String::new()),
                ..Default::default()
            },
        ));
    }
    // With tools, the text that is content now, and the calls completed by this output.
    let (text, calls) = match &mut state.tools {
        None => (o.text.clone(), Vec::new()),
        Some(ts) => {
            let mut text = String::new();
            let mut calls = Vec::new();
            for piece in ts.push(&o.text, o.finish.is_some()) {
                match piece {
                    Piece::Content(c) => text.push_str(&c),
                    Piece::Call(c) => calls.push(c),
                }
            }
            (text, calls)
        }
    };
    let calls_before = state.tools.as_ref().map_or(0, |t| t.calls_sent) - calls.len();
    let finish = o.finish.as_ref().map(|f| f.as_openai());
    let finish = finish_with_calls(finish, state.tools.as_ref().is_some_and(|t| t.calls_sent > 0));
    let reports_logprobs = meta.shape.logprobs && !o.token_ids.is_empty();
    // The finish reason goes on the last chunk: after the calls when there are some.
    let finish_here = if calls.is_empty() { finish } else { None };
    if !text.is_empty() || finish_here.is_some() || reports_logprobs {
        let delta = if text.is_empty() && finish_here.is_some() {
            ChatDelta::default()
        } else {
            ChatDelta { content: Some(text), ..Default::default() }
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
                finish_reason: finish_here,
            },
        ));
    }
    if calls.is_empty() {
        return out;
    }
    for (k, call) in calls.into_iter().enumerate() {
        for delta in call_deltas(call, calls_before + k) {
            out.push(delta_chunk(meta, index, delta));
        }
    }
    if finish.is_some() {
        out.push(chunk_of(
            meta,
            ChatChunkChoice {
                index,
                delta: ChatDelta::default(),
                logprobs: None,
                finish_reason: finish,
            },
        ));
    }
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
