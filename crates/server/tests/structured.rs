//! Structured output and tool calling over the in-process server with synthetic:tiny (a
//! random model: whatever it samples at temperature 1, the grammar must hold it to the
//! format). Every response of every seed must parse and match, streaming or not.

mod common;

use common::{TestServer, engine_config, post, sse_chunks, start};
use radix_server::ServerConfig;
use serde_json::{Value, json};

const SEEDS: [u64; 4] = [0, 1, 2, 3];

async fn server() -> TestServer {
    start(engine_config(), ServerConfig::default()).await
}

async fn stream(c: &reqwest::Client, s: &TestServer, path: &str, body: &Value) -> Vec<Value> {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let resp = c.post(s.url(path)).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    sse_chunks(&resp.text().await.unwrap())
}

/// The text and finish reason of a completion or chat answer, streamed or not.
async fn generate(
    c: &reqwest::Client,
    s: &TestServer,
    chat: bool,
    streamed: bool,
    body: &Value,
) -> (String, String) {
    let path = if chat { "/v1/chat/completions" } else { "/v1/completions" };
    if streamed {
        let chunks = stream(c, s, path, body).await;
        let mut text = String::new();
        let mut finish = String::new();
        for ch in &chunks {
            let choice = &ch["choices"][0];
            let piece = if chat { &choice["delta"]["content"] } else { &choice["text"] };
            text.push_str(piece.as_str().unwrap_or(""));
            if let Some(f) = choice["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
        (text, finish)
    } else {
        let (status, v) = post(c, s, path, body).await;
        assert_eq!(status, 200, "{v}");
        let choice = &v["choices"][0];
        let text = if chat { &choice["message"]["content"] } else { &choice["text"] };
        (text.as_str().unwrap().to_string(), choice["finish_reason"].as_str().unwrap().into())
    }
}

/// Runs `extra` (the structured-output fields) on both endpoints, streamed and not, for
/// every seed, and checks each output with `ok`.
async fn check_all(c: &reqwest::Client, s: &TestServer, extra: Value, ok: impl Fn(&str) -> bool) {
    for chat in [false, true] {
        for streamed in [false, true] {
            for seed in SEEDS {
                let mut body = json!({"temperature": 1.0, "seed": seed, "max_tokens": 256});
                if chat {
                    body["messages"] = json!([{"role": "user", "content": "answer"}]);
                } else {
                    body["prompt"] = json!("answer: ");
                }
                for (k, v) in extra.as_object().unwrap() {
                    body[k] = v.clone();
                }
                let (text, finish) = generate(c, s, chat, streamed, &body).await;
                let case = format!("{extra} chat={chat} stream={streamed} seed={seed}: {text:?}");
                assert_eq!(finish, "stop", "{case}");
                assert!(ok(&text), "{case}");
            }
        }
    }
}

fn person_schema() -> Value {
    json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "ok": {"type": "boolean"},
        "tag": {"enum": ["a", "b", "c"]}},
        "required": ["name", "age", "ok", "tag"], "additionalProperties": false})
}

fn is_person(text: &str) -> bool {
    let Ok(Value::Object(o)) = serde_json::from_str::<Value>(text) else { return false };
    o.len() == 4
        && o["name"].as_str().is_some_and(|n| n.chars().count() <= 6)
        && o["age"].as_u64().is_some_and(|a| a <= 150)
        && o["ok"].is_boolean()
        && ["a", "b", "c"].contains(&o["tag"].as_str().unwrap_or("?"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_and_json_object_outputs_parse_and_match() {
    let s = server().await;
    let c = reqwest::Client::new();
    let rf = json!({"type": "json_schema",
        "json_schema": {"name": "person", "schema": person_schema(), "strict": true}});
    check_all(&c, &s, json!({"response_format": rf}), is_person).await;
    check_all(&c, &s, json!({"structured_outputs": {"json": person_schema()}}), is_person).await;
    check_all(&c, &s, json!({"guided_json": person_schema().to_string()}), is_person).await;
    // Any object: a random model may nest deeply, so only a few seeds, with room.
    let body = json!({"prompt": "x", "max_tokens": 2000, "temperature": 1.0, "seed": 5,
        "response_format": {"type": "json_object"}});
    let (text, finish) = generate(&c, &s, false, false, &body).await;
    if finish == "stop" {
        assert!(serde_json::from_str::<Value>(&text).is_ok_and(|v| v.is_object()), "{text}");
    } else {
        // Cut by max_tokens: still a prefix of an object.
        assert!(text.starts_with('{'), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regex_choice_and_grammar_outputs_match() {
    let s = server().await;
    let c = reqwest::Client::new();
    let rx = regex::Regex::new(r"^[a-z]{3}-[0-9]{2,4}$").unwrap();
    check_all(&c, &s, json!({"guided_regex": "[a-z]{3}-[0-9]{2,4}"}), |t| rx.is_match(t)).await;
    check_all(&c, &s, json!({"structured_outputs": {"regex": "[a-z]{3}-[0-9]{2,4}"}}), |t| {
        rx.is_match(t)
    })
    .await;
    let colors = ["red", "green", "blue"];
    check_all(&c, &s, json!({"guided_choice": colors}), |t| colors.contains(&t)).await;
    let sum = regex::Regex::new(r"^\([0-9]{1,3}(\+[0-9]{1,3}){0,3}\)$").unwrap();
    let lark = "start: \"(\" num (\"+\" num){0,3} \")\"\nnum: /[0-9]{1,3}/\n";
    check_all(&c, &s, json!({"structured_outputs": {"grammar": lark}}), |t| sum.is_match(t)).await;
    check_all(&c, &s, json!({"guided_grammar": lark}), |t| sum.is_match(t)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_grammars_and_tools_are_400s_naming_the_field() {
    let s = server().await;
    let c = reqwest::Client::new();
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let tool = |name: &str| {
        json!({"type": "function", "function": {"name": name,
        "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}})
    };
    let cases = [
        (
            json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}),
            "response_format",
        ),
        (json!({"response_format": {"type": "xml"}}), "response_format"),
        (json!({"response_format": "json"}), "response_format"),
        (json!({"guided_regex": "a(b"}), "guided_regex"),
        (json!({"guided_regex": 5}), "guided_regex"),
        (json!({"guided_choice": []}), "guided_choice"),
        (json!({"guided_json": "{not json"}), "guided_json"),
        (json!({"structured_outputs": {"grammar": "start: (\"a\""}}), "structured_outputs"),
        (json!({"structured_outputs": {"regex": "a", "choice": ["b"]}}), "structured_outputs"),
        (json!({"structured_outputs": {"xml": "a"}}), "structured_outputs"),
        (json!({"guided_regex": "a", "guided_choice": ["b"]}), "guided_choice"),
        (json!({"tools": "f"}), "tools"),
        (json!({"tools": [{"type": "function"}]}), "tools"),
        (json!({"tools": [{"type": "function", "function": {"name": "has space"}}]}), "tools"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}),
            "tools",
        ),
        (json!({"tools": [tool("f"), tool("f")]}), "tools"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f",
            "parameters": {"type": "nonsense"}}}], "tool_choice": "required"}),
            "tools",
        ),
        (json!({"tools": [tool("f")], "tool_choice": "sometimes"}), "tool_choice"),
        (
            json!({"tools": [tool("f")], "tool_choice": {"type": "function",
            "function": {"name": "g"}}}),
            "tool_choice",
        ),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"tools": [tool("f")], "tool_choice": "required", "guided_regex": "a"}),
            "guided_regex",
        ),
        (
            json!({"messages": [{"role": "assistant", "content": null,
            "tool_calls": [{"id": "1", "function": {}}]}]}),
            "messages",
        ),
    ];
    for (extra, param) in cases {
        let mut body = json!({"messages": msgs, "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, v) = post(&c, &s, "/v1/chat/completions", &body).await;
        assert_eq!(status, 400, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(!msg.is_empty(), "{v}");
    }
    // The schema's own problem is named.
    let body = json!({"prompt": "a", "guided_json": {"type": "nonsense"}});
    let (status, v) = post(&c, &s, "/v1/completions", &body).await;
    assert_eq!(status, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("nonsense"), "{v}");
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "weather",
            "parameters": {"type": "object", "properties": {
                "city": {"enum": ["Paris", "Oslo", "Lima"]},
                "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"],
                "additionalProperties": false}}},
        {"type": "function", "function": {"name": "add",
            "parameters": {"type": "object", "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 99},
                "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                "required": ["a", "b"], "additionalProperties": false}}}
    ])
}

/// A call's arguments hold the declared parameters.
fn check_call(name: &str, arguments: &str, allowed: &[&str]) {
    assert!(allowed.contains(&name), "{name}");
    let args: Value =
        serde_json::from_str(arguments).unwrap_or_else(|e| panic!("{e}: {arguments}"));
    match name {
        "get_weather" => {
            assert!(["Paris", "Oslo", "Lima"].contains(&args["city"].as_str().unwrap()));
            assert!(["c", "f"].contains(&args["unit"].as_str().unwrap()));
        }
        "add" => assert!(args["a"].as_u64().unwrap() < 100 && args["b"].as_u64().unwrap() < 100),
        other => panic!("undeclared {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_and_named_tool_choices_make_calls_streamed_or_not() {
    let s = server().await;
    let c = reqwest::Client::new();
    let named = json!({"type": "function", "function": {"name": "add"}});
    for (choice, allowed) in [(json!("required"), vec!["get_weather", "add"]), (named, vec!["add"])]
    {
        for seed in SEEDS {
            let body = json!({"messages": [{"role": "user", "content": "weather in Oslo?"}],
                "tools": tools(), "tool_choice": choice, "parallel_tool_calls": false,
                "temperature": 1.0, "seed": seed, "max_tokens": 200});
            let (status, v) = post(&c, &s, "/v1/chat/completions", &body).await;
            assert_eq!(status, 200, "{v}");
            let choice0 = &v["choices"][0];
            assert_eq!(choice0["finish_reason"], "tool_calls", "{v}");
            let calls = choice0["message"]["tool_calls"].as_array().unwrap();
            assert_eq!(calls.len(), 1, "{v}");
            let call = &calls[0];
            assert!(call["id"].as_str().unwrap().starts_with("call_"));
            assert_eq!(call["type"], "function");
            let f = &call["function"];
            check_call(f["name"].as_str().unwrap(), f["arguments"].as_str().unwrap(), &allowed);

            // The same seed streamed: deltas assemble to the same call.
            let chunks = stream(&c, &s, "/v1/chat/completions", &body).await;
            let (mut name, mut args, mut id, mut finish) =
                (String::new(), String::new(), None, None);
            for ch in &chunks {
                let choice = &ch["choices"][0];
                if let Some(f) = choice["finish_reason"].as_str() {
                    finish = Some(f.to_string());
                }
                for d in choice["delta"]["tool_calls"].as_array().into_iter().flatten() {
                    assert_eq!(d["index"], 0);
                    if let Some(i) = d["id"].as_str() {
                        assert!(id.is_none(), "one id per call");
                        id = Some(i.to_string());
                        assert_eq!(d["type"], "function");
                    }
                    name.push_str(d["function"]["name"].as_str().unwrap_or(""));
                    args.push_str(d["function"]["arguments"].as_str().unwrap_or(""));
                }
            }
            assert_eq!(finish.as_deref(), Some("tool_calls"), "{chunks:?}");
            assert!(id.is_some());
            assert_eq!(name, f["name"].as_str().unwrap());
            let whole: Value = serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
            assert_eq!(serde_json::from_str::<Value>(&args).unwrap(), whole);
        }
    }
    // tool_choice none: plain text, no calls.
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "tools": tools(),
        "tool_choice": "none", "max_tokens": 4, "temperature": 0.0});
    let (status, v) = post(&c, &s, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200);
    assert!(v["choices"][0]["message"].get("tool_calls").is_none(), "{v}");
    // Tool results and earlier calls in the history render.
    let body = json!({"messages": [
            {"role": "user", "content": "add 1 and 2"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
                "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1, \"b\": 2}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "3"}],
        "tools": tools(), "max_tokens": 4, "temperature": 0.0});
    let (status, v) = post(&c, &s, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{v}");
}
