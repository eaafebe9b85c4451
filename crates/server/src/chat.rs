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
    // Content and completed calls in the order the model wrote them (adjacent content
    // joined): text after a call in the same output goes out after the call.
    let pieces = match &mut state.tools {
        None => vec![Piece::Content(o.text.clone())],
        Some(ts) => ts.push(&o.text, o.finish.is_some()),
    };
    let mut segments: Vec<Piece> = Vec::with_capacity(pieces.len());
    for piece in pieces {
        match (segments.last_mut(), piece) {
            (Some(Piece::Content(t)), Piece::Content(c)) => t.push_str(&c),
            (_, piece) => segments.push(piece),
        }
    }
    let calls_now = segments.iter().filter(|p| matches!(p, Piece::Call(_))).count();
    let mut call_index = state.tools.as_ref().map_or(0, |t| t.calls_sent) - calls_now;
    let finish = o.finish.as_ref().map(|f| f.as_openai());
    let mut finish =
        finish_with_calls(finish, state.tools.as_ref().is_some_and(|t| t.calls_sent > 0));
    // This output's tokens' log-probabilities ride on its first chunk of content.
    let mut logprobs = (meta.shape.logprobs && !o.token_ids.is_empty())
        .then(|| logprobs(tokenizer, &o.token_ids, &o.logprobs, &o.top_logprobs));
    let last = segments.len().saturating_sub(1);
    for (i, segment) in segments.into_iter().enumerate() {
        match segment {
            Piece::Content(text) => {
                // The finish reason goes on the last chunk.
                let finish_here = if i == last { finish.take() } else { None };
                if text.is_empty() && finish_here.is_none() && logprobs.is_none() {
                    continue;
                }
                out.push(content_chunk(meta, index, text, logprobs.take(), finish_here));
            }
            Piece::Call(call) => {
                if logprobs.is_some() {
                    out.push(content_chunk(meta, index, String::new(), logprobs.take(), None));
                }
                for delta in call_deltas(call, call_index) {
                    out.push(delta_chunk(meta, index, delta));
                }
                call_index += 1;
            }
        }
    }
    if logprobs.is_some() || finish.is_some() {
        out.push(content_chunk(meta, index, String::new(), logprobs.take(), finish.take()));
    }
    out
}

/// A chunk of content (an empty delta when it only carries the finish reason).
fn content_chunk(
    meta: &Meta,
    index: usize,
    text: String,
    logprobs: Option<ChatLogprobs>,
    finish_reason: Option<&'static str>,
) -> ChatCompletionChunk {
    let delta = if text.is_empty() && finish_reason.is_some() {
        ChatDelta::default()
    } else {
        ChatDelta { content: Some(text), ..Default::default() }
    };
    chunk_of(meta, ChatChunkChoice { index, delta, logprobs, finish_reason })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::ToolParser;
    use crate::validate::{Endpoint, ResponseShape, ToolShape};
    use radix_engine::{FinishReason, RequestId};

    fn output(text: &str, finish: Option<FinishReason>) -> Output {
        Output {
            id: RequestId(0),
            text: text.into(),
            token_ids: vec![],
            logprobs: vec![],
            top_logprobs: vec![],
            prompt_logprobs: vec![],
            finish,
            last_token_is_text: false,
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_tokens: 0,
        }
    }

    /// Each chunk's delta (content or call name/arguments) and finish reason, in order.
    fn stream(texts: &[&str]) -> Vec<String> {
        let meta = Meta {
            id: "chatcmpl-1".into(),
            created: 0,
            shape: ResponseShape {
                endpoint: Endpoint::Chat,
                model: "m".into(),
                stream: true,
                include_usage: false,
                logprobs: false,
                top_logprobs: 0,
                echo_prompts: vec![],
                n: 1,
                prompt_lens: vec![1],
                tools: Some(ToolShape { parser: ToolParser::Hermes, names: vec!["add".into()] }),
            },
        };
        let mut state = ChunkState::default();
        let mut seen = Vec::new();
        for (i, t) in texts.iter().enumerate() {
            let finish = (i + 1 == texts.len()).then_some(FinishReason::Stop);
            for c in chunks(&meta, 0, &output(t, finish), &mut state, &Tokenizer::Bytes) {
                let v = serde_json::to_value(&c).unwrap();
                let choice = &v["choices"][0];
                let d = &choice["delta"];
                let mut s = String::new();
                if let Some(text) = d["content"].as_str().filter(|t| !t.is_empty()) {
                    s += &format!("content:{text}");
                }
                if let Some(f) = d["tool_calls"][0]["function"].as_object() {
                    s += &format!(
                        "call{}:{}{}",
                        d["tool_calls"][0]["index"],
                        f.get("name").and_then(|n| n.as_str()).unwrap_or(""),
                        f.get("arguments").and_then(|a| a.as_str()).unwrap_or("")
                    );
                }
                if let Some(f) = choice["finish_reason"].as_str() {
                    s += &format!("finish:{f}");
                }
                if !s.is_empty() {
                    seen.push(s);
                }
            }
        }
        seen
    }

    #[test]
    fn streamed_text_after_a_call_follows_the_call() {
        let call = r#"<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>"#;
        // Text, a call and more text in one output: in that order.
        let one = stream(&[&format!("Before.{call}After.")]);
        assert_eq!(
            one,
            ["content:Before.", "call0:add", "call0:{\"a\":1}", "content:After.finish:tool_calls"]
        );
        // The same over several outputs, and a second call numbered 1.
        let parts = stream(&["Before.<tool", &format!("_call>{}", &call[11..]), "After.", call]);
        assert_eq!(
            parts,
            [
                "content:Before.",
                "call0:add",
                "call0:{\"a\":1}",
                "content:After.",
                "call1:add",
                "call1:{\"a\":1}",
                "finish:tool_calls"
            ]
        );
    }
}
