//! `/v1/completions` responses: the full response and stream chunks.

use radix_engine::{Output, PromptLogprob};
use radix_model::Tokenizer;

use crate::api::{Completion, CompletionChoice, CompletionLogprobs, UsageField};
use crate::generation::{Collected, Meta};
use crate::validate::EchoPrompt;

/// The text of each token (for log-probabilities).
pub fn token_texts(tokenizer: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter().map(|&id| tokenizer.decode(&[id], false).unwrap_or_default()).collect()
}

/// One token of completions' log-probabilities: an echoed prompt token (the first has
/// no log-probability) or a sampled one.
struct Entry<'a> {
    id: u32,
    logprob: Option<f32>,
    top: Option<&'a [(u32, f32)]>,
}

/// The entries of scored prompt tokens.
fn prompt_entries(scored: &[PromptLogprob]) -> impl Iterator<Item = Entry<'_>> {
    scored.iter().map(|p| Entry { id: p.token, logprob: Some(p.logprob), top: Some(&p.top) })
}

/// The entries of sampled tokens (`tops` empty when no alternatives were asked for).
fn sampled_entries<'a>(
    ids: &'a [u32],
    lps: &'a [f32],
    tops: &'a [Vec<(u32, f32)>],
) -> impl Iterator<Item = Entry<'a>> {
    ids.iter().zip(lps).enumerate().map(|(i, (&id, &lp))| Entry {
        id,
        logprob: Some(lp),
        top: tops.get(i).map(Vec::as_slice),
    })
}

/// Legacy log-probabilities of `entries`; with `alternatives`, each token's are a dict
/// that also holds the token itself (N + 1 at most, as OpenAI answers). `offset` is the
/// text offset of the first token and advances past these.
fn logprobs<'a>(
    tokenizer: &Tokenizer,
    entries: impl Iterator<Item = Entry<'a>>,
    alternatives: bool,
    offset: &mut usize,
) -> CompletionLogprobs {
    let text = |t: u32| tokenizer.decode(&[t], false).unwrap_or_default();
    let mut out =
        CompletionLogprobs { top_logprobs: alternatives.then(Vec::new), ..Default::default() };
    for e in entries {
        let token = text(e.id);
        out.text_offset.push(*offset);
        *offset += token.len();
        out.tokens.push(token);
        out.token_logprobs.push(e.logprob);
        if let Some(tops) = &mut out.top_logprobs {
            let dict = e.logprob.map(|lp| {
                let alts = e.top.unwrap_or_default();
                let own = (!alts.iter().any(|a| a.0 == e.id)).then_some((e.id, lp));
                let mut m = serde_json::Map::new();
                for (t, lp) in alts.iter().copied().chain(own) {
                    m.entry(text(t)).or_insert(serde_json::Value::from(lp));
                }
                m
            });
            tops.push(dict);
        }
    }
    out
}

/// The echoed prompt's text, and its first token (which has no log-probability).
fn echo_of(prompt: &EchoPrompt) -> (String, Entry<'static>) {
    (prompt.text.clone(), Entry { id: prompt.first_token, logprob: None, top: None })
}

pub fn response(c: Collected, tokenizer: &Tokenizer) -> Completion {
    let shape = &c.meta.shape;
    let alternatives = shape.top_logprobs > 0;
    let choices = c
        .choices
        .into_iter()
        .enumerate()
        .map(|(index, ch)| {
            let sampled = sampled_entries(&ch.token_ids, &ch.logprobs, &ch.top_logprobs);
            let (text, logprobs) = match shape.echo_prompts.get(index / shape.n) {
                Some(prompt) => {
                    let (echo, first) = echo_of(prompt);
                    let entries = std::iter::once(first)
                        .chain(prompt_entries(&ch.prompt_logprobs))
                        .chain(sampled);
                    let lp =
                        shape.logprobs.then(|| logprobs(tokenizer, entries, alternatives, &mut 0));
                    (echo + &ch.text, lp)
                }
                None => {
                    let lp =
                        shape.logprobs.then(|| logprobs(tokenizer, sampled, alternatives, &mut 0));
                    (ch.text, lp)
                }
            };
            CompletionChoice { index, logprobs, text, finish_reason: ch.finish }
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
    /// The echoed prompt went out (with the first chunk).
    echoed: bool,
}

/// The stream chunk for one output, if it carries anything. With `echo`, the first chunk
/// starts with the prompt's text (and its first token's entry); the prompt's scored
/// tokens follow in the chunks that bring them.
pub fn chunk(
    meta: &Meta,
    index: usize,
    o: &Output,
    state: &mut ChunkState,
    tokenizer: &Tokenizer,
) -> Option<Completion> {
    let shape = &meta.shape;
    let echo = match shape.echo_prompts.get(index / shape.n) {
        Some(prompt) if !state.echoed => {
            state.echoed = true;
            Some(echo_of(prompt))
        }
        _ => None,
    };
    let has_logprobs = !o.token_ids.is_empty() || !o.prompt_logprobs.is_empty();
    let reports_logprobs = shape.logprobs && (has_logprobs || echo.is_some());
    if o.text.is_empty() && o.finish.is_none() && !reports_logprobs && echo.is_none() {
        return None;
    }
    let (echo_text, first) = match echo {
        Some((text, first)) => (text, Some(first)),
        None => (String::new(), None),
    };
    let logprobs = shape.logprobs.then(|| {
        let entries = first
            .into_iter()
            .chain(prompt_entries(&o.prompt_logprobs))
            .chain(sampled_entries(&o.token_ids, &o.logprobs, &o.top_logprobs));
        logprobs(tokenizer, entries, shape.top_logprobs > 0, &mut state.text_offset)
    });
    Some(Completion {
        id: meta.id.clone(),
        object: "text_completion",
        created: meta.created,
        model: meta.shape.model.clone(),
        choices: vec![CompletionChoice {
            index,
            text: echo_text + &o.text,
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
