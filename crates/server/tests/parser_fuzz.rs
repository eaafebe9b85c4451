//! Property tests of the request parser: random bytes, random JSON, and valid requests
//! with fields replaced by random values never panic; every refusal is a 400 with an
//! OpenAI error body; every accepted request fits the model.

use proptest::prelude::*;
use radix_engine::RequestRules;
use radix_engine::SparseBudget;
use radix_model::{ChatTemplate, Tokenizer};
use radix_server::ApiError;
use radix_server::validate::{self, ModelContext, ParsedRequest};
use serde_json::{Map, Value, json};

const VOCAB: usize = 320;
const MAX_LEN: usize = 512;

fn check(result: Result<ParsedRequest, ApiError>) {
    match result {
        Ok(plan) => {
            assert!(!plan.requests.is_empty());
            assert_eq!(plan.requests.len(), plan.shape.prompt_lens.len() * plan.shape.n);
            for (i, r) in plan.requests.iter().enumerate() {
                assert!(!r.prompt.is_empty());
                assert_eq!(r.prompt.len(), plan.shape.prompt_lens[i / plan.shape.n]);
                assert!(r.stop.max_tokens >= 1);
                assert!(r.prompt.len() + r.stop.max_tokens <= MAX_LEN);
                assert!(r.prompt.iter().all(|&t| (t as usize) < VOCAB));
                assert!(r.sampling.validate().is_ok());
            }
        }
        Err(e) => {
            // 404 only for a model not served.
            let status = e.status().as_u16();
            assert!(
                status == 400 || (status == 404 && matches!(e, ApiError::UnknownModel(_))),
                "{e}"
            );
            let body = serde_json::to_value(e.body()).unwrap();
            assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert_eq!(body["error"]["type"], "invalid_request_error");
        }
    }
}

/// Runs `f` with the context the parsers see: synthetic:tiny's byte tokenizer, on an
/// engine with sparse paging.
fn with_ctx<R>(f: impl FnOnce(&ModelContext) -> R) -> R {
    with_sparse_ctx(true, f)
}

fn with_sparse_ctx<R>(sparse: bool, f: impl FnOnce(&ModelContext) -> R) -> R {
    let tokenizer = Tokenizer::Bytes;
    let template = ChatTemplate::plain();
    let grammars = radix_engine::Grammars::new(
        std::sync::Arc::new(Tokenizer::Bytes),
        VOCAB,
        vec![radix_model::synthetic::EOS],
    );
    let ctx = ModelContext {
        model_name: "synthetic:tiny",
        model_aliases: &[],
        tokenizer: &tokenizer,
        chat_template: &template,
        rules: RequestRules { vocab_size: VOCAB, max_model_len: MAX_LEN, sparse },
        max_sequences: validate::DEFAULT_MAX_SEQUENCES_PER_REQUEST,
        grammars: &grammars,
        tool_parser: radix_server::ToolParser::Hermes,
    };
    f(&ctx)
}

fn parse_both(body: &[u8]) {
    with_ctx(|ctx| {
        check(validate::parse_completion(body, ctx));
        check(validate::parse_chat(body, ctx));
    })
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        any::<u64>().prop_map(|u| json!(u)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        (-3i64..600).prop_map(|i| json!(i)),
        (-1.0f64..3.0).prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
        Just(json!("user")),
        Just(json!("text")),
        Just(json!("synthetic:tiny")),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Field names the parser knows, and some it does not.
fn key() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "model",
        "prompt",
        "messages",
        "role",
        "content",
        "type",
        "text",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "stop",
        "temperature",
        "top_p",
        "seed",
        "stream",
        "stream_options",
        "include_usage",
        "logprobs",
        "top_logprobs",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "ignore_eos",
        "stop_token_ids",
        "echo",
        "suffix",
        "best_of",
        "logit_bias",
        "tools",
        "response_format",
        "add_generation_prompt",
        "sparse_budget",
        "priority",
        "user",
        "other",
    ])
    .prop_map(str::to_string)
}

fn valid_completion() -> Value {
    json!({"model": "synthetic:tiny", "prompt": "hello", "max_tokens": 8, "n": 2,
           "temperature": 0.7, "top_p": 0.9, "seed": 3, "stop": ["x"], "stream": true,
           "stream_options": {"include_usage": true}, "logprobs": 0})
}

fn valid_chat() -> Value {
    json!({"model": "synthetic:tiny", "max_tokens": 8,
           "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
           "temperature": 0.0, "logprobs": true, "stop": "\n"})
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        parse_both(&bytes);
    }

    #[test]
    fn random_json_never_panics(v in any_json()) {
        parse_both(v.to_string().as_bytes());
    }

    #[test]
    fn random_objects_never_panic(fields in prop::collection::vec((key(), any_json()), 0..10)) {
        let obj: Map<String, Value> = fields.into_iter().collect();
        parse_both(Value::Object(obj).to_string().as_bytes());
    }

    /// Valid requests with one to three fields replaced (or removed).
    #[test]
    fn mutated_valid_requests_never_panic(
        chat in any::<bool>(),
        edits in prop::collection::vec((key(), prop::option::of(any_json())), 1..4),
    ) {
        let mut v = if chat { valid_chat() } else { valid_completion() };
        let obj = v.as_object_mut().unwrap();
        for (k, value) in edits {
            match value {
                Some(x) => { obj.insert(k, x); }
                None => { obj.remove(&k); }
            }
        }
        parse_both(v.to_string().as_bytes());
    }

    /// Truncations of valid bodies (malformed JSON).
    #[test]
    fn truncated_bodies_are_400(cut in 0usize..200, chat in any::<bool>()) {
        let body = if chat { valid_chat() } else { valid_completion() }.to_string();
        let cut = cut.min(body.len().saturating_sub(1));
        parse_both(&body.as_bytes()[..cut]);
    }
}

#[test]
fn the_valid_examples_parse() {
    with_ctx(|ctx| {
        let p = validate::parse_completion(valid_completion().to_string().as_bytes(), ctx).unwrap();
        assert_eq!(
            (p.shape.n, p.requests.len(), p.shape.stream, p.shape.include_usage),
            (2, 2, true, true)
        );
        assert_eq!(p.requests[0].prompt.len(), 6);
        assert_eq!(p.requests[1].sampling.seed, Some(4));
        let p = validate::parse_chat(valid_chat().to_string().as_bytes(), ctx).unwrap();
        assert_eq!(p.requests[0].stop.stop_strings, vec!["\n".to_string()]);
        assert!(p.shape.logprobs && !p.shape.stream);
        // Chat without max_tokens: up to the context.
        let mut v = valid_chat();
        v.as_object_mut().unwrap().remove("max_tokens");
        let p = validate::parse_chat(v.to_string().as_bytes(), ctx).unwrap();
        let r = &p.requests[0];
        assert_eq!(r.prompt.len() + r.stop.max_tokens, MAX_LEN);
    })
}

#[test]
fn sparse_budgets_parse_as_fractions_or_tokens() {
    with_ctx(|ctx| {
        let budget = |x: Value, chat: bool| {
            let mut v = if chat { valid_chat() } else { valid_completion() };
            v.as_object_mut().unwrap().insert("sparse_budget".into(), x);
            let body = v.to_string();
            let p = if chat {
                validate::parse_chat(body.as_bytes(), ctx)
            } else {
                validate::parse_completion(body.as_bytes(), ctx)
            };
            p.map(|p| p.requests.iter().map(|r| r.sparse_budget).collect::<Vec<_>>())
        };
        assert_eq!(
            budget(json!(0.25), false).unwrap(),
            vec![Some(SparseBudget::Fraction(0.25)); 2]
        );
        assert_eq!(budget(json!(4096), false).unwrap(), vec![Some(SparseBudget::Tokens(4096)); 2]);
        assert_eq!(budget(json!(1), true).unwrap(), vec![Some(SparseBudget::DENSE)]);
        assert_eq!(budget(json!(0.5), true).unwrap(), vec![Some(SparseBudget::Fraction(0.5))]);
        // Absent or null: the engine's default.
        assert_eq!(budget(Value::Null, false).unwrap(), vec![None; 2]);
        for bad in [json!(0), json!(-1), json!(1.5), json!("x"), json!([0.5]), json!(true)] {
            for chat in [false, true] {
                let e = budget(bad.clone(), chat).unwrap_err();
                assert_eq!(e.status().as_u16(), 400, "{bad}: {e}");
                let body = serde_json::to_value(e.body()).unwrap();
                assert_eq!(body["error"]["param"], "sparse_budget", "{bad}: {body}");
                assert_eq!(body["error"]["type"], "invalid_request_error", "{bad}: {body}");
            }
        }
    });
    // An engine without sparse paging refuses any budget, naming the field.
    let mut v = valid_completion();
    v.as_object_mut().unwrap().insert("sparse_budget".into(), json!(0.5));
    let e = with_sparse_ctx(false, |ctx| validate::parse_completion(v.to_string().as_bytes(), ctx))
        .unwrap_err();
    let body = serde_json::to_value(e.body()).unwrap();
    assert_eq!(body["error"]["param"], "sparse_budget", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("sparse paging"), "{body}");
}
