//! Request bodies to engine requests: a pure function of the bytes and the model (no
//! engine, no I/O), so it can be fuzzed. Every wrong input is an `ApiError` (400) naming
//! the field; nothing here panics. The rules a request must follow are the engine's
//! (`RequestRules`): this module runs them field by field and names the field at fault.
//!
//! Accepted (OpenAI, plus vLLM's extras): `model`, `prompt` (string, list of strings,
//! token ids, list of token-id lists) or `messages`, `max_tokens` (chat also
//! `max_completion_tokens`), `n`, `stop`, `temperature`, `top_p`, `seed`,
//! `presence_penalty`, `frequency_penalty`, `stream`, `stream_options.include_usage`,
//! `logprobs` (completions: 0..=20 alternatives; chat: a boolean with `top_logprobs`
//! 0..=20), `logit_bias`, `top_k`, `min_p`, `repetition_penalty`,
//! `ignore_eos`, `stop_token_ids`, `priority` (lower runs first), chat's
//! `add_generation_prompt`, structured output (`response_format`, vLLM's
//! `structured_outputs` and `guided_*`: see `structured`), chat's `tools`, `tool_choice`
//! and `parallel_tool_calls` (see `tools`), and radix-sparse's
//! `sparse_budget` (sparse paging: a fraction of pages in (0, 1] or a token count; the
//! engine refuses it when sparse paging is off). Unknown fields are
//! ignored (clients send extras); things asked for that we cannot honour (`suffix`,
//! `best_of` > n, non-text content) are refused with 400. Completions' `echo` answers
//! with the prompt first (and, with `logprobs`, its tokens' log-probabilities, which the
//! engine then computes).

use radix_engine::{
    Constraint, Grammars, Request, RequestRules, RuleError, SparseBudget, StopConfig,
};
use radix_model::{ChatMessage, ChatTemplate, MAX_TOP_LOGPROBS, SamplingParams, Tokenizer};
use serde_json::{Map, Value};

use self::fields::{Fields, type_name};
use crate::error::ApiError;
use crate::structured;
use crate::tools::{self, ToolParser};

pub(crate) mod fields;

/// Choices per prompt at most.
pub const MAX_N: usize = 128;
/// Prompts in one request at most (whatever the fan-out limit).
pub const MAX_PROMPTS: usize = 1024;
/// Engine sequences one request may start by default (prompts × n). Fair shares keep a
/// large request from holding every running slot; this bounds what it takes of the
/// queue (8 prompts × n=128 once filled 960 of its places).
pub const DEFAULT_MAX_SEQUENCES_PER_REQUEST: usize = 256;
/// Stop strings at most.
pub const MAX_STOP: usize = 16;
/// `logit_bias` entries at most (OpenAI documents no bound; this one keeps the work of
/// a request's bias small beside its logits row).
pub const MAX_LOGIT_BIAS: usize = 1024;
/// Completions' default `max_tokens` (OpenAI's).
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

/// What the parser needs to know about the served model.
pub struct ModelContext<'a> {
    /// The name responses carry; requests may also name one of `model_aliases`.
    pub model_name: &'a str,
    pub model_aliases: &'a [String],
    pub tokenizer: &'a Tokenizer,
    pub chat_template: &'a ChatTemplate,
    /// The engine's rules: vocabulary, context length, sparse paging.
    pub rules: RequestRules,
    /// Engine sequences (prompts × n) one request may start.
    pub max_sequences: usize,
    /// Compiles structured-output grammars (a bad one is a 400 here).
    pub grammars: &'a Grammars,
    /// The format tool calls are written and parsed in.
    pub tool_parser: ToolParser,
}

/// A broken engine rule as a 400 naming `param`.
fn rule(param: &'static str) -> impl Fn(RuleError) -> ApiError {
    move |e| ApiError::invalid(e.to_string(), param)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// What a validated request says about its response; the response writers keep it (in
/// `generation::Meta`) once the engine requests are submitted.
#[derive(Clone, Debug)]
pub struct ResponseShape {
    pub endpoint: Endpoint,
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    /// Report the sampled tokens' log-probabilities.
    pub logprobs: bool,
    /// Alternatives per token in them.
    pub top_logprobs: usize,
    /// Completions' `echo`: each prompt, to answer with first (with its tokens'
    /// log-probabilities when asked); empty without echo.
    pub echo_prompts: Vec<EchoPrompt>,
    /// Choices per prompt.
    pub n: usize,
    /// Tokens of each prompt.
    pub prompt_lens: Vec<usize>,
    /// Chat with tools (choice not `none`): the output is parsed for calls.
    pub tools: Option<ToolShape>,
}

/// A prompt as `echo` answers with it.
#[derive(Clone, Debug)]
pub struct EchoPrompt {
    /// The client's text (a token-id prompt's decoded, special tokens kept).
    pub text: String,
    /// Its first token, which has no log-probability (nothing comes before it).
    pub first_token: u32,
}

/// How a response's text is read for tool calls.
#[derive(Clone, Debug)]
pub struct ToolShape {
    pub parser: ToolParser,
    /// The declared functions (calls to others stay text).
    pub names: Vec<String>,
}

/// What a request adds to each of its engine requests besides sampling and stops.
#[derive(Default)]
struct Extras {
    constraint: Option<Constraint>,
    tools: Option<ToolShape>,
}

/// A validated request: one engine request per choice.
#[derive(Clone, Debug)]
pub struct ParsedRequest {
    pub shape: ResponseShape,
    /// One per choice, in choice order: choice `i` answers prompt `i / n`.
    pub requests: Vec<Request>,
}

type Result<T> = std::result::Result<T, ApiError>;

/// Parses a `/v1/completions` body.
pub fn parse_completion(body: &[u8], ctx: &ModelContext) -> Result<ParsedRequest> {
    let obj = parse_object(body)?;
    let f = Fields(&obj);
    let model = parse_model(&f, ctx)?;
    let prompts = parse_prompt(&f, ctx)?;
    refuse_unsupported_completion(&f)?;
    // `logprobs: N`: the sampled token's and the N most likely ones' (vLLM's limit).
    let logprobs = match f.int("logprobs")? {
        None => None,
        Some(n) if (0..=MAX_TOP_LOGPROBS as i64).contains(&n) => Some(n as usize),
        Some(n) => {
            return Err(ApiError::invalid(
                format!("logprobs must be in 0..={MAX_TOP_LOGPROBS}, got {n}"),
                "logprobs",
            ));
        }
    };
    let echo = f.bool("echo")?.unwrap_or(false);
    let max_tokens = f.max_tokens("max_tokens")?.map(|m| (m, "max_tokens"));
    let constraint = match structured::parse(&f)? {
        Some((spec, param)) => Some(structured::compile(ctx.grammars, &spec, param)?),
        None => None,
    };
    let extras = Extras { constraint, tools: None };
    let mut parsed =
        build(Endpoint::Completions, &f, ctx, model, prompts, max_tokens, logprobs, extras)?;
    if echo {
        // The prompt's tokens are scored when log-probabilities are asked for.
        for r in &mut parsed.requests {
            r.prompt_logprobs = logprobs;
        }
        let n = parsed.shape.n;
        let texts: Vec<Option<String>> = match f.get("prompt") {
            Some(Value::String(s)) => vec![Some(s.clone())],
            Some(Value::Array(list)) => list.iter().map(|v| v.as_str().map(String::from)).collect(),
            _ => Vec::new(),
        };
        parsed.shape.echo_prompts =
            parsed
                .requests
                .iter()
                .step_by(n)
                .enumerate()
                .map(|(i, r)| EchoPrompt {
                    text: texts.get(i).cloned().flatten().unwrap_or_else(|| {
                        ctx.tokenizer.decode(&r.prompt, false).unwrap_or_default()
                    }),
                    first_token: r.prompt.first().copied().unwrap_or(0),
                })
                .collect();
    }
    Ok(parsed)
}

/// Parses a `/v1/chat/completions` body (renders the chat template).
pub fn parse_chat(body: &[u8], ctx: &ModelContext) -> Result<ParsedRequest> {
    let obj = parse_object(body)?;
    let f = Fields(&obj);
    let model = parse_model(&f, ctx)?;
    let mut messages = parse_messages(&f)?;
    let add_generation_prompt = f.bool("add_generation_prompt")?.unwrap_or(true);
    let tools = tools::parse(&f)?;
    let structured = structured::parse(&f)?;
    // A forced call has a grammar of its own.
    let tool_grammar = tools.as_ref().and_then(|t| t.grammar(ctx.tool_parser));
    let constraint = match (structured, tool_grammar) {
        (Some((_, param)), Some(_)) => {
            return Err(ApiError::invalid(
                format!("{param} cannot be combined with a required or named tool_choice"),
                param,
            ));
        }
        (Some((spec, param)), None) => Some(structured::compile(ctx.grammars, &spec, param)?),
        (None, Some(spec)) => Some(structured::compile(ctx.grammars, &spec, "tools")?),
        (None, None) => None,
    };
    let template = ctx.chat_template;
    if let Some(t) = &tools {
        t.prepare_messages(template.source(), ctx.tool_parser, &mut messages);
    }
    let text = template
        .render_with_tools(&messages, add_generation_prompt, tools.as_ref().map(|t| &t.raw))
        .map_err(|e| ApiError::invalid(e.to_string(), "messages"))?;
    // Templates write BOS themselves where the model wants it.
    let prompt = ctx
        .tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::invalid(format!("tokenizing the messages: {e}"), "messages"))?;
    let logprobs = f.bool("logprobs")?.unwrap_or(false);
    let top = match f.int("top_logprobs")? {
        None => 0,
        Some(n) if (0..=MAX_TOP_LOGPROBS as i64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(
                format!("top_logprobs must be in 0..={MAX_TOP_LOGPROBS}, got {n}"),
                "top_logprobs",
            ));
        }
    };
    if top > 0 && !logprobs {
        return Err(ApiError::invalid("top_logprobs needs logprobs: true", "top_logprobs"));
    }
    let logprobs = logprobs.then_some(top);
    let max_tokens = match f.max_tokens("max_completion_tokens")? {
        Some(m) => Some((m, "max_completion_tokens")),
        None => f.max_tokens("max_tokens")?.map(|m| (m, "max_tokens")),
    };
    let tools = tools.map(|t| ToolShape { parser: ctx.tool_parser, names: t.names() });
    let extras = Extras { constraint, tools };
    build(Endpoint::Chat, &f, ctx, model, vec![prompt], max_tokens, logprobs, extras)
}

/// `model`: optional (the served model), and if given, one of the served model's names;
/// responses carry its first name, as vLLM's do.
fn parse_model(f: &Fields, ctx: &ModelContext) -> Result<String> {
    match f.string("model")? {
        Some(m) if m != ctx.model_name && !ctx.model_aliases.iter().any(|a| a == m) => {
            Err(ApiError::UnknownModel(m.to_string()))
        }
        _ => Ok(ctx.model_name.to_string()),
    }
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid_no_param(format!("malformed JSON in the request body: {e}"))
    })?;
    match value {
        Value::Object(obj) => Ok(obj),
        other => Err(ApiError::invalid_no_param(format!(
            "the request body must be a JSON object, got {}",
            type_name(&other)
        ))),
    }
}

/// Sampling, stop rules, n, streaming; then one engine request per choice.
#[allow(clippy::too_many_arguments)]
fn build(
    endpoint: Endpoint,
    f: &Fields,
    ctx: &ModelContext,
    model: String,
    prompts: Vec<Vec<u32>>,
    max_tokens: Option<(u64, &'static str)>,
    logprobs: Option<usize>,
    extras: Extras,
) -> Result<ParsedRequest> {
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => {
            if !stream {
                return Err(ApiError::invalid(
                    "stream_options is only allowed with stream: true",
                    "stream_options",
                ));
            }
            Fields(o)
                .bool("include_usage")
                .map_err(|_| {
                    ApiError::invalid(
                        "stream_options.include_usage must be a boolean",
                        "stream_options",
                    )
                })?
                .unwrap_or(false)
        }
        Some(other) => {
            return Err(ApiError::invalid(
                format!("stream_options must be an object, got {}", type_name(other)),
                "stream_options",
            ));
        }
    };
    let n = match f.uint("n")? {
        None => 1,
        Some(n) if (1..=MAX_N as u64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(format!("n must be in 1..={MAX_N}, got {n}"), "n"));
        }
    };
    if let Some(best_of) = f.uint("best_of")?
        && best_of != n as u64
        && best_of != 1
    {
        return Err(ApiError::invalid("best_of other than n is not supported", "best_of"));
    }
    if prompts.len() * n > ctx.max_sequences {
        return Err(ApiError::invalid(
            format!(
                "{} prompts × n={n} is more than the {} sequences one request may start \
                 (--max-sequences-per-request)",
                prompts.len(),
                ctx.max_sequences
            ),
            "n",
        ));
    }
    let priority = match f.int("priority")? {
        None => 0,
        Some(p) => i32::try_from(p).map_err(|_| {
            ApiError::invalid(
                format!("priority must be within a 32-bit integer, got {p}"),
                "priority",
            )
        })?,
    };
    let mut sampling = parse_sampling(f)?;
    sampling.logit_bias = parse_logit_bias(f, &ctx.rules)?;
    let stop = parse_stop(f, ctx)?;
    let ignore_eos = f.bool("ignore_eos")?.unwrap_or(false);
    let sparse_budget = f
        .number("sparse_budget")?
        .map(SparseBudget::from_number)
        .transpose()
        .map_err(|e| ApiError::invalid(e, "sparse_budget"))?;
    if sparse_budget.is_some() && !ctx.rules.sparse {
        return Err(rule("sparse_budget")(RuleError::SparseOff));
    }
    let prompt_param = match endpoint {
        Endpoint::Completions => "prompt",
        Endpoint::Chat => "messages",
    };
    let mut requests = Vec::with_capacity(prompts.len() * n);
    let mut prompt_lens = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let len = prompt.len();
        ctx.rules.check_prompt(&prompt).map_err(rule(prompt_param))?;
        let room = ctx.rules.room(len);
        let max_tokens = match max_tokens {
            Some((m, param)) => {
                ctx.rules.check_max_tokens(len, m).map_err(rule(param))?;
                m as usize
            }
            None => match endpoint {
                Endpoint::Completions => DEFAULT_COMPLETION_MAX_TOKENS.min(room),
                Endpoint::Chat => room,
            },
        };
        prompt_lens.push(len);
        for i in 0..n {
            let mut sampling = sampling.clone();
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
            let stop = StopConfig {
                max_tokens,
                stop_strings: stop.0.clone(),
                stop_token_ids: stop.1.clone(),
                ignore_eos,
            };
            let mut req = Request::new(prompt.clone(), sampling, stop);
            req.logprobs = logprobs.is_some();
            req.top_logprobs = logprobs.unwrap_or(0);
            req.sparse_budget = sparse_budget;
            req.priority = priority;
            // Each choice advances a grammar of its own.
            req.constraint = extras.constraint.clone();
            requests.push(req);
        }
    }
    Ok(ParsedRequest {
        shape: ResponseShape {
            endpoint,
            model,
            stream,
            include_usage,
            logprobs: logprobs.is_some(),
            top_logprobs: logprobs.unwrap_or(0),
            echo_prompts: Vec::new(),
            n,
            prompt_lens,
            tools: extras.tools,
        },
        requests,
    })
}

fn parse_sampling(f: &Fields) -> Result<SamplingParams> {
    let d = SamplingParams::default();
    let temperature = f.number("temperature")?.unwrap_or(d.temperature as f64);
    if temperature < 0.0 {
        return Err(ApiError::invalid("temperature must be >= 0", "temperature"));
    }
    let top_p = f.number("top_p")?.unwrap_or(d.top_p as f64);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p must be in (0, 1]", "top_p"));
    }
    let top_k = match f.int("top_k")? {
        None => 0,
        Some(k) if (-1..=0).contains(&k) => 0,
        Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
        Some(_) => return Err(ApiError::invalid("top_k must be -1, 0 (off) or positive", "top_k")),
    };
    let min_p = f.number("min_p")?.unwrap_or(d.min_p as f64);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::invalid("min_p must be in [0, 1]", "min_p"));
    }
    let repetition_penalty = f.number("repetition_penalty")?.unwrap_or(d.repetition_penalty as f64);
    if repetition_penalty <= 0.0 {
        return Err(ApiError::invalid("repetition_penalty must be > 0", "repetition_penalty"));
    }
    let penalty = |name: &'static str| -> Result<f64> {
        let v = f.number(name)?.unwrap_or(0.0);
        if !(-2.0..=2.0).contains(&v) {
            return Err(ApiError::invalid(format!("{name} must be in [-2, 2]"), name));
        }
        Ok(v)
    };
    let frequency_penalty = penalty("frequency_penalty")?;
    let presence_penalty = penalty("presence_penalty")?;
    let seed = match f.get("seed") {
        None => None,
        Some(v) => Some(match (v.as_u64(), v.as_i64()) {
            (Some(s), _) => s,
            (None, Some(s)) => s as u64,
            _ => return Err(ApiError::invalid("seed must be an integer", "seed")),
        }),
    };
    let p = SamplingParams {
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k,
        min_p: min_p as f32,
        repetition_penalty: repetition_penalty as f32,
        frequency_penalty: frequency_penalty as f32,
        presence_penalty: presence_penalty as f32,
        seed,
        logit_bias: Vec::new(),
    };
    // Ranges in f64 can still overflow f32 (temperature 1e300).
    p.validate().map_err(ApiError::invalid_no_param)?;
    Ok(p)
}

/// Stop strings and stop token ids.
fn parse_stop(f: &Fields, ctx: &ModelContext) -> Result<(Vec<String>, Vec<u32>)> {
    let strings = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(ApiError::invalid(
                    format!(
                        "stop must be a string or a list of strings, found {}",
                        type_name(other)
                    ),
                    "stop",
                )),
            })
            .collect::<Result<Vec<_>>>()?,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("stop must be a string or a list of strings, got {}", type_name(other)),
                "stop",
            ));
        }
    };
    if strings.len() > MAX_STOP {
        return Err(ApiError::invalid(format!("at most {MAX_STOP} stop strings"), "stop"));
    }
    if strings.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop strings must not be empty", "stop"));
    }
    ctx.rules.check_stop_strings(&strings).map_err(rule("stop"))?;
    let ids = match f.get("stop_token_ids") {
        None => Vec::new(),
        Some(v) => token_ids(v, &ctx.rules, "stop_token_ids")?,
    };
    Ok((strings, ids))
}

/// `prompt`: a string, a list of strings, a list of token ids or a list of such lists.
fn parse_prompt(f: &Fields, ctx: &ModelContext) -> Result<Vec<Vec<u32>>> {
    let encode = |text: &str| {
        ctx.tokenizer
            .encode(text, true)
            .map_err(|e| ApiError::invalid(format!("tokenizing the prompt: {e}"), "prompt"))
    };
    let wrong = || {
        ApiError::invalid(
            "prompt must be a string, a list of strings, a list of token ids or a list of \
             lists of token ids",
            "prompt",
        )
    };
    match f.get("prompt") {
        None => Err(ApiError::invalid("prompt is required", "prompt")),
        Some(Value::String(s)) => Ok(vec![encode(s)?]),
        Some(all @ Value::Array(list)) => {
            let Some(first) = list.first() else {
                return Err(ApiError::invalid("prompt must not be an empty list", "prompt"));
            };
            if list.len() > MAX_PROMPTS {
                return Err(ApiError::invalid(
                    format!("at most {MAX_PROMPTS} prompts per request"),
                    "prompt",
                ));
            }
            match first {
                Value::String(_) => {
                    list.iter().map(|v| v.as_str().ok_or_else(wrong).and_then(encode)).collect()
                }
                Value::Number(_) => Ok(vec![token_ids(all, &ctx.rules, "prompt")?]),
                Value::Array(_) => list
                    .iter()
                    .map(|v| {
                        let ids = token_ids(v, &ctx.rules, "prompt")?;
                        if ids.is_empty() {
                            return Err(ApiError::invalid(
                                "a token-id prompt must not be empty",
                                "prompt",
                            ));
                        }
                        Ok(ids)
                    })
                    .collect(),
                _ => Err(wrong()),
            }
        }
        Some(_) => Err(wrong()),
    }
}

/// A JSON list of token ids within the vocabulary.
fn token_ids(v: &Value, rules: &RequestRules, param: &'static str) -> Result<Vec<u32>> {
    let Value::Array(list) = v else {
        return Err(ApiError::invalid(format!("{param} must be a list of token ids"), param));
    };
    list.iter()
        .map(|t| match t.as_u64() {
            Some(id) => {
                rules.check_tokens([id]).map_err(rule(param))?;
                Ok(id as u32)
            }
            None => Err(ApiError::invalid(
                format!("{param} must hold non-negative integer token ids, found {t}"),
                param,
            )),
        })
        .collect()
}

/// `messages`: a non-empty list of `{role, content}`; content is a string, null, or a
/// list of `{"type": "text", "text": ...}` parts (joined with newlines).
fn parse_messages(f: &Fields) -> Result<Vec<ChatMessage>> {
    let list = match f.get("messages") {
        None => return Err(ApiError::invalid("messages is required", "messages")),
        Some(Value::Array(list)) => list,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("messages must be a list, got {}", type_name(other)),
                "messages",
            ));
        }
    };
    if list.is_empty() {
        return Err(ApiError::invalid("messages must not be empty", "messages"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let bad =
                |what: String| ApiError::invalid(format!("messages[{i}]: {what}"), "messages");
            let Value::Object(m) = m else {
                return Err(bad(format!("must be an object, got {}", type_name(m))));
            };
            let role = match m.get("role") {
                Some(Value::String(r)) if !r.is_empty() => r.clone(),
                _ => return Err(bad("role must be a non-empty string".into())),
            };
            let content = match m.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut texts = Vec::with_capacity(parts.len());
                    for part in parts {
                        match (part.get("type").and_then(Value::as_str), part.get("text")) {
                            (Some("text"), Some(Value::String(t))) => texts.push(t.as_str()),
                            (Some("text"), _) => {
                                return Err(bad("a text part needs a string `text`".into()));
                            }
                            (Some(kind), _) => {
                                return Err(bad(format!(
                                    "content parts of type {kind:?} are not supported (text only)"
                                )));
                            }
                            (None, _) => {
                                return Err(bad("content parts need a `type`".into()));
                            }
                        }
                    }
                    texts.join("\n")
                }
                Some(other) => {
                    return Err(bad(format!(
                        "content must be a string, a list of parts or null, got {}",
                        type_name(other)
                    )));
                }
            };
            let tool_calls = match m.get("tool_calls") {
                None | Some(Value::Null) => None,
                Some(Value::Array(calls)) => Some(Value::Array(
                    calls
                        .iter()
                        .map(|c| tool_call_for_template(c).map_err(&bad))
                        .collect::<Result<_>>()?,
                )),
                Some(other) => {
                    return Err(bad(format!(
                        "tool_calls must be a list, got {}",
                        type_name(other)
                    )));
                }
            };
            let text_field = |key: &str| -> Result<Option<String>> {
                match m.get(key) {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    Some(other) => {
                        Err(bad(format!("{key} must be a string, got {}", type_name(other))))
                    }
                }
            };
            Ok(ChatMessage {
                role,
                content,
                tool_calls,
                tool_call_id: text_field("tool_call_id")?,
                name: text_field("name")?,
            })
        })
        .collect()
}

/// An assistant message's earlier call, as templates read it: `function.arguments` as
/// an object (vLLM does the same), not OpenAI's JSON text.
fn tool_call_for_template(c: &Value) -> std::result::Result<Value, String> {
    let name = c.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
    let Some(name) = name else {
        return Err("each tool call needs function.name".into());
    };
    let args = match c.get("function").and_then(|f| f.get("arguments")) {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::String(s)) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
        Some(v) => v.clone(),
    };
    let mut out = c.clone();
    out["type"] = Value::String("function".into());
    out["function"] = serde_json::json!({"name": name, "arguments": args});
    Ok(out)
}

fn refuse_unsupported_completion(f: &Fields) -> Result<()> {
    match f.get("suffix") {
        None => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(_) => return Err(ApiError::invalid("suffix is not supported", "suffix")),
    }
    Ok(())
}

/// `logit_bias`: an object from token ids (as strings, OpenAI's shape) to a bias in
/// [-100, 100]; returned sorted by token.
fn parse_logit_bias(f: &Fields, rules: &RequestRules) -> Result<Vec<(u32, f32)>> {
    let bad = |msg: String| ApiError::invalid(msg, "logit_bias");
    let map = match f.get("logit_bias") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(bad(format!(
                "logit_bias must be an object from token ids to numbers, got {}",
                type_name(other)
            )));
        }
    };
    if map.len() > MAX_LOGIT_BIAS {
        return Err(bad(format!("at most {MAX_LOGIT_BIAS} logit_bias entries, got {}", map.len())));
    }
    let mut bias = map
        .iter()
        .map(|(key, v)| {
            let token: u32 = key
                .trim()
                .parse()
                .map_err(|_| bad(format!("logit_bias keys must be token ids, got {key:?}")))?;
            rules.check_tokens([token as u64]).map_err(rule("logit_bias"))?;
            match v.as_f64() {
                Some(b) if (-100.0..=100.0).contains(&b) => Ok((token, b as f32)),
                _ => Err(bad(format!(
                    "logit_bias values must be numbers in [-100, 100], got {v} for {key}"
                ))),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    bias.sort_unstable_by_key(|b| b.0);
    if let Some(w) = bias.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(bad(format!("logit_bias names token {} twice", w[0].0)));
    }
    Ok(bias)
}
