//! Structured output and tool calling with a real model, SmolLM2-135M-Instruct (Q4_1
//! GGUF from tools/fetch_smollm2.sh) on the CPU backend: 100 JSON-schema completions at
//! temperature 1 all parse and match their schema, `tool_choice: "required"` always
//! yields a call to a declared function, and the grammar's mask over the 49K vocabulary
//! is timed. Without the model file these tests fail, saying so.

mod common;
// The SmolLM2 model-path helper shared with the model crate's real-model tests.
#[path = "../../model/tests/smollm2_model/mod.rs"]
mod smollm2_model;

use std::sync::Arc;
use std::time::Instant;

use common::start_model;
use radix_engine::{ConstraintSpec, Grammars};
use radix_model::ModelSource;
use radix_server::ServerConfig;
use serde_json::{Value, json};
use smollm2_model::smollm2_path;

fn schema() -> Value {
    json!({"type": "object", "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "London", "Tokyo"]},
        "member": {"type": "boolean"}},
        "required": ["name", "age", "city", "member"], "additionalProperties": false})
}

/// `schema()` checked by hand (the schema is fixed, so this is the whole of it).
fn matches_schema(v: &Value) -> bool {
    let Value::Object(o) = v else { return false };
    o.len() == 4
        && o["name"].as_str().is_some_and(|n| (1..=12).contains(&n.chars().count()))
        && o["age"].as_u64().is_some_and(|a| a <= 120)
        && ["Paris", "London", "Tokyo"].contains(&o["city"].as_str().unwrap_or("?"))
        && o["member"].is_boolean()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_json_schema_completions_and_required_tool_calls() {
    let cfg = radix_engine::EngineConfig {
        num_pages: 1024,
        max_running: 128,
        max_batched_tokens: 4096,
        ..Default::default()
    };
    let s = start_model(&smollm2_path(), cfg, ServerConfig::default()).await;
    let c = reqwest::Client::new();
    let started = Instant::now();
    // 100 choices of one request (one batch), temperature 1.
    let body = json!({"messages": [{"role": "user", "content": "Describe a person as JSON."}],
        "n": 100, "temperature": 1.0, "seed": 7, "max_tokens": 48,
        "response_format": {"type": "json_schema",
            "json_schema": {"name": "person", "schema": schema(), "strict": true}}});
    let resp = c.post(s.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 100);
    for ch in choices {
        let text = ch["message"]["content"].as_str().unwrap();
        assert_eq!(ch["finish_reason"], "stop", "{text}");
        let parsed: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(matches_schema(&parsed), "{text}");
    }
    eprintln!(
        "100 json_schema choices in {:.1} s, {} completion tokens",
        started.elapsed().as_secs_f64(),
        v["usage"]["completion_tokens"]
    );

    let tools = json!([
        {"type": "function", "function": {"name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_time",
            "description": "Current time in a time zone",
            "parameters": {"type": "object", "properties": {
                "zone": {"enum": ["UTC", "CET", "JST"]}}, "required": ["zone"]}}}
    ]);
    let body = json!({"messages": [{"role": "user", "content": "What's the weather in Paris?"}],
        "tools": tools, "tool_choice": "required", "parallel_tool_calls": false,
        "n": 10, "temperature": 1.0, "seed": 3, "max_tokens": 64});
    let resp = c.post(s.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    for ch in v["choices"].as_array().unwrap() {
        assert_eq!(ch["finish_reason"], "tool_calls", "{ch}");
        let call = &ch["message"]["tool_calls"][0]["function"];
        let name = call["name"].as_str().unwrap();
        assert!(["get_weather", "get_time"].contains(&name), "{ch}");
        let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
        assert!(args.is_object(), "{ch}");
    }
}

/// Mask time per token on the 49K vocabulary: a JSON answer walked token by token.
#[test]
fn mask_time_per_token_on_the_real_vocabulary() {
    let source = ModelSource::open(&smollm2_path()).unwrap();
    let vocab = source.config.vocab_size;
    let eos = source.config.eos_token_ids.clone();
    let tokenizer = Arc::new(source.tokenizer);
    let t0 = Instant::now();
    let grammars = Grammars::new(tokenizer.clone(), vocab, eos);
    let mut c = grammars.compile(&ConstraintSpec::Json(schema())).unwrap();
    let first = t0.elapsed();
    let answer = r#"{"name": "Ada Lovelace", "age": 36, "city": "London", "member": true}"#;
    let ids = tokenizer.encode(answer, false).unwrap();
    let mut total = std::time::Duration::ZERO;
    for &t in &ids {
        let t1 = Instant::now();
        c.compute_mask().unwrap();
        total += t1.elapsed();
        let allowed = c.allowed();
        assert!(allowed[t as usize / 32] >> (t % 32) & 1 == 1, "token {t} not allowed");
        c.advance(t).unwrap();
    }
    let per_token = total / ids.len() as u32;
    eprintln!(
        "vocab {vocab}: token trie + first grammar {:.1} ms; mask {:.0} µs per token over {} tokens",
        first.as_secs_f64() * 1e3,
        per_token.as_secs_f64() * 1e6,
        ids.len()
    );
    // Generous: a debug-profile build on a shared 2-core machine.
    assert!(per_token.as_millis() < 50, "{per_token:?} per token");
}
