//! The OpenAI API over a loopback port with synthetic:tiny on the CPU backend:
//! completions, chat, streaming chunk format, usage, every error case, API keys, metrics,
//! disconnects and graceful shutdown.

mod common;

use std::time::Duration;

use common::{MODEL, TestServer, engine_config, metrics, post, sse_chunks, sse_data, start};
use futures::StreamExt;
use radix_engine::EngineConfig;
use radix_server::ServerConfig;
use serde_json::{Value, json};

async fn server() -> TestServer {
    start(engine_config(), ServerConfig::default()).await
}

async fn post_stream(c: &reqwest::Client, s: &TestServer, path: &str, body: &Value) -> String {
    let resp = c.post(s.url(path)).json(body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    resp.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_usage_and_determinism() {
    let s = server().await;
    let c = reqwest::Client::new();
    let body = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 5, "temperature": 0,
                      "ignore_eos": true});
    let (status, r) = post(&c, &s, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    assert!(r["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(r["model"], MODEL);
    assert!(r["created"].as_u64().unwrap() > 1_600_000_000);
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[0]["finish_reason"], "length");
    assert!(choices[0]["logprobs"].is_null());
    // The byte tokenizer: BOS + 5 bytes.
    assert_eq!(r["usage"]["prompt_tokens"], 6);
    assert_eq!(r["usage"]["completion_tokens"], 5);
    assert_eq!(r["usage"]["total_tokens"], 11);
    // Greedy is deterministic; so is a seed.
    let (_, r2) = post(&c, &s, "/v1/completions", &body).await;
    assert_eq!(r["choices"][0]["text"], r2["choices"][0]["text"]);
    let seeded = json!({"prompt": "Hello", "max_tokens": 8, "temperature": 1.0, "seed": 7,
                        "ignore_eos": true});
    let (_, a) = post(&c, &s, "/v1/completions", &seeded).await;
    let (_, b) = post(&c, &s, "/v1/completions", &seeded).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    // The default max_tokens is 16 (when EOS does not come first).
    let (_, d) = post(&c, &s, "/v1/completions", &json!({"prompt": "x", "ignore_eos": true})).await;
    assert_eq!(d["usage"]["completion_tokens"], 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_n_and_token_prompts() {
    let s = server().await;
    let c = reqwest::Client::new();
    let (status, r) = post(
        &c,
        &s,
        "/v1/completions",
        &json!({"prompt": ["a", "bb"], "n": 2, "max_tokens": 3, "ignore_eos": true, "seed": 1}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, ch) in choices.iter().enumerate() {
        assert_eq!(ch["index"], i);
        assert_eq!(ch["finish_reason"], "length");
    }
    // Each prompt counted once (BOS + bytes), every choice's output.
    assert_eq!(r["usage"]["prompt_tokens"], 2 + 3);
    assert_eq!(r["usage"]["completion_tokens"], 12);

    let greedy = |prompt: Value| json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": true});
    let (status, r) = post(&c, &s, "/v1/completions", &greedy(json!([256, 72, 105]))).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["usage"]["prompt_tokens"], 3);
    // The same tokens as the text "Hi" with BOS.
    let (_, t) = post(&c, &s, "/v1/completions", &greedy(json!("Hi"))).await;
    assert_eq!(r["choices"][0]["text"], t["choices"][0]["text"]);
    let (status, r) = post(&c, &s, "/v1/completions", &greedy(json!([[1, 2], [3, 4, 5]]))).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"].as_array().unwrap().len(), 2);
    assert_eq!(r["usage"]["prompt_tokens"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_stop_strings_and_logprobs() {
    let s = server().await;
    let c = reqwest::Client::new();
    let body = json!({"model": MODEL, "max_tokens": 12, "temperature": 0, "ignore_eos": true,
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "hi"}]}]});
    let (status, r) = post(&c, &s, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert!(r["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let ch = &r["choices"][0];
    assert_eq!(ch["message"]["role"], "assistant");
    assert!(ch["message"]["content"].is_string());
    assert_eq!(ch["finish_reason"], "length");
    // The plain template, no BOS: "system: be brief\nuser: hi\nassistant: ".
    assert_eq!(r["usage"]["prompt_tokens"], "system: be brief\nuser: hi\nassistant: ".len());
    assert_eq!(r["usage"]["completion_tokens"], 12);

    // A stop string taken from the greedy output cuts it there.
    let (_, full) = post(
        &c,
        &s,
        "/v1/completions",
        &json!({"prompt": "The", "max_tokens": 24, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    let (cut, stop) = text
        .char_indices()
        .skip(3)
        .map(|(i, _)| (i, &text[i..]))
        .find_map(|(i, rest)| {
            let ch = rest.chars().next()?;
            (!ch.is_control() && ch != '\u{FFFD}' && !text[..i].contains(ch))
                .then(|| (i, ch.to_string()))
        })
        .expect("a character that appears first after index 3");
    let (_, r) = post(
        &c,
        &s,
        "/v1/completions",
        &json!({"prompt": "The", "max_tokens": 24, "temperature": 0, "ignore_eos": true,
                "stop": [stop]}),
    )
    .await;
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
    assert_eq!(r["choices"][0]["text"].as_str().unwrap(), &text[..cut]);

    // Log-probabilities of the sampled tokens.
    let (status, r) = post(
        &c,
        &s,
        "/v1/completions",
        &json!({"prompt": "a", "max_tokens": 5, "logprobs": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let lp = &r["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 5);
    assert_eq!(lp["text_offset"].as_array().unwrap().len(), 5);
    for x in lp["token_logprobs"].as_array().unwrap() {
        assert!(x.as_f64().unwrap() <= 0.0, "{lp}");
    }
    let (status, r) = post(
        &c,
        &s,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                "logprobs": true, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 3);
    assert!(content.iter().all(|t| t["logprob"].as_f64().unwrap() <= 0.0 && t["bytes"].is_array()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_chunks_match_the_full_response() {
    let s = server().await;
    let c = reqwest::Client::new();
    // Completions.
    let body = json!({"prompt": "Stream me", "max_tokens": 10, "temperature": 0,
                      "ignore_eos": true});
    let (_, full) = post(&c, &s, "/v1/completions", &body).await;
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let chunks = sse_chunks(&post_stream(&c, &s, "/v1/completions", &sbody).await);
    let (last, content) = chunks.split_last().unwrap();
    let id = content[0]["id"].as_str().unwrap();
    assert!(id.starts_with("cmpl-"));
    let mut text = String::new();
    for (i, ch) in content.iter().enumerate() {
        assert_eq!(ch["id"], id);
        assert_eq!(ch["object"], "text_completion");
        assert_eq!(ch["model"], MODEL);
        assert!(ch["usage"].is_null() && ch.get("usage").is_some(), "usage: null before the end");
        let choice = &ch["choices"][0];
        assert_eq!(choice["index"], 0);
        text.push_str(choice["text"].as_str().unwrap());
        let finish = &choice["finish_reason"];
        if i + 1 == content.len() {
            assert_eq!(finish, "length");
        } else {
            assert!(finish.is_null());
        }
    }
    assert_eq!(text, full["choices"][0]["text"].as_str().unwrap());
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], full["usage"]);

    // Without include_usage there is no usage field at all.
    sbody.as_object_mut().unwrap().remove("stream_options");
    let chunks = sse_chunks(&post_stream(&c, &s, "/v1/completions", &sbody).await);
    assert!(chunks.iter().all(|ch| ch.get("usage").is_none()));

    // Chat, n = 2: a role chunk first per choice, then content, then the finish.
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
        "temperature": 0, "ignore_eos": true, "n": 2, "stream": true,
        "stream_options": {"include_usage": true}});
    let chunks = sse_chunks(&post_stream(&c, &s, "/v1/chat/completions", &body).await);
    let mut texts = [String::new(), String::new()];
    let mut finished = [false, false];
    let mut saw_role = [false, false];
    for ch in &chunks[..chunks.len() - 1] {
        assert_eq!(ch["object"], "chat.completion.chunk");
        let choice = &ch["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        assert!(!finished[i], "a chunk after the finish of choice {i}");
        if !saw_role[i] {
            assert_eq!(choice["delta"]["role"], "assistant", "{ch}");
            saw_role[i] = true;
        }
        if let Some(t) = choice["delta"]["content"].as_str() {
            texts[i].push_str(t);
        }
        if !choice["finish_reason"].is_null() {
            assert_eq!(choice["finish_reason"], "length");
            finished[i] = true;
        }
    }
    assert_eq!(finished, [true, true]);
    assert_eq!(texts[0], texts[1], "greedy choices agree");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 12);
    assert_eq!(usage["prompt_tokens"], "user: hi\nassistant: ".len());
    let (_, full) = post(
        &c,
        &s,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(texts[0], full["choices"][0]["message"]["content"].as_str().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_openai_json_with_the_right_status() {
    let s = start(
        EngineConfig { max_model_len: Some(256), ..engine_config() },
        ServerConfig { max_body_bytes: 1 << 20, ..Default::default() },
    )
    .await;
    let c = reqwest::Client::new();
    let chat = "/v1/chat/completions";
    let cmpl = "/v1/completions";
    let msgs = json!([{"role": "user", "content": "hi"}]);
    // (route, body, status, param)
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        (cmpl, "{\"prompt\": \"a\",".into(), 400, None),
        (cmpl, "not json".into(), 400, None),
        (cmpl, "".into(), 400, None),
        (cmpl, "[1, 2]".into(), 400, None),
        (cmpl, json!({"model": "gpt-4", "prompt": "a"}).to_string(), 404, Some("model")),
        (chat, json!({"model": "nope", "messages": msgs}).to_string(), 404, Some("model")),
        (cmpl, json!({"model": 5, "prompt": "a"}).to_string(), 400, Some("model")),
        (cmpl, json!({}).to_string(), 400, Some("prompt")),
        (cmpl, json!({"prompt": 5}).to_string(), 400, Some("prompt")),
        (cmpl, json!({"prompt": []}).to_string(), 400, Some("prompt")),
        (cmpl, json!({"prompt": [[]]}).to_string(), 400, Some("prompt")),
        (cmpl, json!({"prompt": ["a", 1]}).to_string(), 400, Some("prompt")),
        (cmpl, json!({"prompt": [1, 100000]}).to_string(), 400, Some("prompt")),
        (cmpl, json!({"prompt": [1, -1]}).to_string(), 400, Some("prompt")),
        (cmpl, json!({"prompt": "a", "temperature": "hot"}).to_string(), 400, Some("temperature")),
        (cmpl, json!({"prompt": "a", "temperature": -1}).to_string(), 400, Some("temperature")),
        (cmpl, json!({"prompt": "a", "top_p": 0}).to_string(), 400, Some("top_p")),
        (cmpl, json!({"prompt": "a", "max_tokens": "5"}).to_string(), 400, Some("max_tokens")),
        (cmpl, json!({"prompt": "a", "max_tokens": 1.5}).to_string(), 400, Some("max_tokens")),
        (cmpl, json!({"prompt": "a", "max_tokens": 0}).to_string(), 400, Some("max_tokens")),
        (cmpl, json!({"prompt": "a", "max_tokens": -3}).to_string(), 400, Some("max_tokens")),
        (cmpl, json!({"prompt": "a", "max_tokens": 256}).to_string(), 400, Some("max_tokens")),
        (cmpl, json!({"prompt": "a", "max_tokens": u64::MAX}).to_string(), 400, Some("max_tokens")),
        (cmpl, json!({"prompt": "a".repeat(300)}).to_string(), 400, Some("prompt")),
        (chat, json!({"messages": msgs, "max_tokens": 0}).to_string(), 400, Some("max_tokens")),
        (
            chat,
            json!({"messages": msgs, "max_completion_tokens": 1000}).to_string(),
            400,
            Some("max_completion_tokens"),
        ),
        (cmpl, json!({"prompt": "a", "n": 0}).to_string(), 400, Some("n")),
        (cmpl, json!({"prompt": "a", "n": "2"}).to_string(), 400, Some("n")),
        (cmpl, json!({"prompt": "a", "stream": "yes"}).to_string(), 400, Some("stream")),
        (
            cmpl,
            json!({"prompt": "a", "stream_options": {"include_usage": true}}).to_string(),
            400,
            Some("stream_options"),
        ),
        (cmpl, json!({"prompt": "a", "stop": 3}).to_string(), 400, Some("stop")),
        (cmpl, json!({"prompt": "a", "stop": [""]}).to_string(), 400, Some("stop")),
        (cmpl, json!({"prompt": "a", "seed": "x"}).to_string(), 400, Some("seed")),
        (cmpl, json!({"prompt": "a", "echo": "yes"}).to_string(), 400, Some("echo")),
        (cmpl, json!({"prompt": "a", "logprobs": 21}).to_string(), 400, Some("logprobs")),
        (cmpl, json!({"prompt": "a", "logprobs": -1}).to_string(), 400, Some("logprobs")),
        (cmpl, json!({"prompt": "a", "logit_bias": {"x": 5}}).to_string(), 400, Some("logit_bias")),
        (
            cmpl,
            json!({"prompt": "a", "logit_bias": {"1": 101}}).to_string(),
            400,
            Some("logit_bias"),
        ),
        (
            cmpl,
            json!({"prompt": "a", "logit_bias": {"1": "5"}}).to_string(),
            400,
            Some("logit_bias"),
        ),
        (
            cmpl,
            json!({"prompt": "a", "logit_bias": {"320": 1}}).to_string(),
            400,
            Some("logit_bias"),
        ),
        (
            cmpl,
            json!({"prompt": "a", "logit_bias": {"1": 1, "01": 2}}).to_string(),
            400,
            Some("logit_bias"),
        ),
        (cmpl, json!({"prompt": "a", "logit_bias": [1]}).to_string(), 400, Some("logit_bias")),
        (chat, json!({}).to_string(), 400, Some("messages")),
        (chat, json!({"messages": []}).to_string(), 400, Some("messages")),
        (chat, json!({"messages": "hi"}).to_string(), 400, Some("messages")),
        (chat, json!({"messages": [{"content": "hi"}]}).to_string(), 400, Some("messages")),
        (
            chat,
            json!({"messages": [{"role": "user", "content": 5}]}).to_string(),
            400,
            Some("messages"),
        ),
        (
            chat,
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).to_string(),
            400,
            Some("messages"),
        ),
        (
            chat,
            json!({"messages": msgs, "tools": [{"type": "function"}]}).to_string(),
            400,
            Some("tools"),
        ),
        (chat, json!({"messages": msgs, "top_logprobs": 2}).to_string(), 400, Some("top_logprobs")),
        (
            chat,
            json!({"messages": msgs, "logprobs": true, "top_logprobs": 21}).to_string(),
            400,
            Some("top_logprobs"),
        ),
        (cmpl, format!("{{\"prompt\": \"{}\"}}", "a".repeat(2 << 20)), 413, None),
    ];
    for (route, body, status, param) in cases {
        let resp = c
            .post(s.url(route))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let got = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let short = &body[..body.len().min(80)];
        assert_eq!(got, status, "{route} {short}: {text}");
        let err: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let e = &err["error"];
        assert!(!e["message"].as_str().unwrap().is_empty(), "{text}");
        assert_eq!(e["type"], "invalid_request_error", "{text}");
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{route} {short}: {text}");
        }
    }
    // A fresh client: the server closes the connection it refused a 413 body on (unread),
    // and a pooled client may try to reuse it (seen once as a flaky send error).
    let c = reqwest::Client::new();
    // Unknown routes and methods.
    let resp = c.get(s.url("/v1/nothing")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.json::<Value>().await.unwrap()["error"]["message"].is_string());
    let resp = c.get(s.url("/v1/completions")).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    // A body without a content type is not read (415), nor is curl -d's form type.
    for content_type in [None, Some("application/x-www-form-urlencoded"), Some("text/plain")] {
        let mut req = c.post(s.url(cmpl)).body(json!({"prompt": "a", "max_tokens": 1}).to_string());
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 415, "{content_type:?}");
        let e: Value = resp.json().await.unwrap();
        assert_eq!(e["error"]["code"], "unsupported_media_type", "{e}");
    }
    // Unknown fields are ignored; null means absent.
    let (status, r) = post(
        &c,
        &s,
        cmpl,
        &json!({"prompt": "a", "max_tokens": null, "user": "me", "whatever": [1]}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_budget_needs_sparse_paging() {
    // The test engine runs without sparse paging: the engine refuses the field.
    let s = server().await;
    let c = reqwest::Client::new();
    let msgs = json!([{"role": "user", "content": "hi"}]);
    for (route, body) in [
        ("/v1/completions", json!({"prompt": "a", "max_tokens": 2, "sparse_budget": 0.25})),
        ("/v1/chat/completions", json!({"messages": msgs, "max_tokens": 2, "sparse_budget": 64})),
    ] {
        let (status, r) = post(&c, &s, route, &body).await;
        assert_eq!(status, 400, "{route}: {r}");
        assert_eq!(r["error"]["type"], "invalid_request_error", "{r}");
        assert!(r["error"]["message"].as_str().unwrap().contains("sparse"), "{r}");
    }
    // A budget out of range is the parser's 400, naming the field.
    let (status, r) =
        post(&c, &s, "/v1/completions", &json!({"prompt": "a", "sparse_budget": 0})).await;
    assert_eq!(status, 400, "{r}");
    assert_eq!(r["error"]["param"], "sparse_budget", "{r}");
    // Without the field the same request runs.
    let (status, r) =
        post(&c, &s, "/v1/completions", &json!({"prompt": "a", "max_tokens": 2})).await;
    assert_eq!(status, 200, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_models_health() {
    let s = start(
        engine_config(),
        ServerConfig { api_key: Some("sekrit".into()), ..Default::default() },
    )
    .await;
    let c = reqwest::Client::new();
    let body = json!({"prompt": "a", "max_tokens": 2});
    for (auth, status) in [
        (None, 401),
        (Some("Bearer wrong"), 401),
        (Some("sekrit"), 401),
        (Some("Basic sekrit"), 401),
        (Some("Bearer sekrit"), 200),
        (Some("BEARER sekrit"), 200),
    ] {
        for path in ["/v1/completions", "/v1/chat/completions"] {
            let body = if path.contains("chat") {
                json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": 2})
            } else {
                body.clone()
            };
            let mut req = c.post(s.url(path)).json(&body);
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status().as_u16(), status, "{path} {auth:?}");
            let v: Value = resp.json().await.unwrap();
            if status == 401 {
                assert_eq!(v["error"]["code"], "invalid_api_key");
            }
        }
    }
    let resp = c.get(s.url("/v1/models")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let models: Value = c
        .get(s.url("/v1/models"))
        .bearer_auth("sekrit")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(models["data"][0]["max_model_len"], 4096);
    // Health and metrics need no key.
    assert_eq!(c.get(s.url("/health")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(s.url("/metrics")).send().await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_kv_pool_lowers_the_context_length_its_errors_name() {
    // 8 pages of 16 tokens: the engine runs 128-token sequences, not the model's 4096.
    let s = start(EngineConfig { num_pages: 8, ..engine_config() }, ServerConfig::default()).await;
    let c = reqwest::Client::new();
    let models: Value = c.get(s.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["max_model_len"], 128);
    let (status, r) =
        post(&c, &s, "/v1/completions", &json!({"prompt": "a".repeat(100), "max_tokens": 100}))
            .await;
    assert_eq!(status, 400, "{r}");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(message.contains("context length is 128 tokens"), "{message}");
    let (status, r) =
        post(&c, &s, "/v1/completions", &json!({"prompt": "a".repeat(200), "max_tokens": 1})).await;
    assert_eq!(status, 400, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("128"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_scrape() {
    let s = server().await;
    let c = reqwest::Client::new();
    for stream in [false, true] {
        let resp = c
            .post(s.url("/v1/completions"))
            .json(&json!({"prompt": "abc", "max_tokens": 4, "ignore_eos": true, "stream": stream}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap();
    }
    // The engine publishes its counters after the step that sent the last token: wait
    // for that snapshot (generation_tokens_total came up short once under load).
    common::wait_pages_back(&c, &s, Duration::from_secs(10)).await;
    let resp = c.get(s.url("/metrics")).send().await.unwrap();
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = resp.text().await.unwrap();
    for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
        let kind = line.rsplit(' ').next().unwrap();
        assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
    }
    let m = common::parse_metrics(&text);
    assert_eq!(m["radix_http_requests_total{route=\"/v1/completions\",status=\"200\"}"], 2.0);
    assert_eq!(m["radix_usage_completion_tokens_total"], 8.0);
    assert_eq!(m["radix_usage_prompt_tokens_total"], 8.0);
    assert_eq!(m["radix_generation_tokens_total"], 8.0);
    assert_eq!(m["radix_time_to_first_token_seconds_count"], 2.0);
    assert_eq!(m["radix_inter_token_latency_seconds_count"], 6.0);
    assert_eq!(m["radix_e2e_request_latency_seconds_count"], 2.0);
    assert_eq!(m["radix_time_to_first_token_seconds_bucket{le=\"+Inf\"}"], 2.0);
    assert_eq!(m["radix_kv_pages_total"], 1024.0);
    for name in [
        "radix_requests_waiting",
        "radix_requests_running",
        "radix_kv_pages_free",
        "radix_kv_pages_cached",
        "radix_kv_pages_in_use",
        "radix_prefix_cache_hit_rate",
        "radix_prompt_tokens_total",
    ] {
        assert!(m.contains_key(name), "{name} missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnects_abort_and_free_pages() {
    let s = server().await;
    let c = reqwest::Client::new();
    // A stream dropped after a few chunks.
    let resp = c
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "long", "max_tokens": 3000, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    for _ in 0..3 {
        body.next().await.unwrap().unwrap();
    }
    let m = metrics(&c, &s).await;
    assert_eq!(m["radix_requests_running"], 1.0);
    assert!(m["radix_kv_pages_in_use"] >= 1.0);
    drop(body);
    common::wait_pages_back(&c, &s, Duration::from_secs(10)).await;
    // A non-streaming request whose client gives up.
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let r = impatient
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3000,
                      "ignore_eos": true}))
        .send()
        .await;
    assert!(r.is_err(), "the request should time out");
    common::wait_pages_back(&c, &s, Duration::from_secs(10)).await;
    let m = metrics(&c, &s).await;
    assert_eq!(m["radix_client_aborts_total"], 2.0);
    assert_eq!(m["radix_requests_in_flight"], 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let s = start(
        EngineConfig { max_running: 1, max_waiting: 1, ..engine_config() },
        ServerConfig::default(),
    )
    .await;
    let c = reqwest::Client::new();
    let long = json!({"prompt": "q", "max_tokens": 3000, "ignore_eos": true, "stream": true});
    let first = c.post(s.url("/v1/completions")).json(&long).send().await.unwrap();
    assert_eq!(first.status(), 200);
    // Once it runs, one more fits in the queue and the next is refused.
    let t = std::time::Instant::now();
    while metrics(&c, &s).await["radix_requests_running"] != 1.0 {
        assert!(t.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = c.post(s.url("/v1/completions")).json(&long).send().await.unwrap();
    assert_eq!(second.status(), 200);
    let third = c.post(s.url("/v1/completions")).json(&long).send().await.unwrap();
    assert_eq!(third.status(), 429);
    assert_eq!(third.headers()["retry-after"], "1");
    let e: Value = third.json().await.unwrap();
    assert_eq!(e["error"]["code"], "queue_full");
    drop((first, second));
    common::wait_pages_back(&c, &s, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_streams_within_the_grace_period() {
    let mut s = server().await;
    let c = reqwest::Client::new();
    let body = json!({"prompt": "bye", "max_tokens": 40, "ignore_eos": true, "stream": true});
    let resp = c.post(s.url("/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let reader = tokio::spawn(async move { resp.text().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.stop(Duration::from_secs(30)).await.unwrap();
    let chunks = sse_chunks(&reader.await.unwrap());
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
    // No longer accepting.
    assert!(c.get(s.url("/health")).send().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_aborts_what_outlives_the_grace_period() {
    let mut s = start(
        engine_config(),
        ServerConfig { grace_period: Duration::from_millis(300), ..Default::default() },
    )
    .await;
    let c = reqwest::Client::new();
    let body = json!({"prompt": "forever", "max_tokens": 4000, "ignore_eos": true, "stream": true});
    let resp = c.post(s.url("/v1/completions")).json(&body).send().await.unwrap();
    let reader = tokio::spawn(async move { resp.text().await.unwrap() });
    let plain = c
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "forever", "max_tokens": 4000, "ignore_eos": true}))
        .send();
    let plain = tokio::spawn(plain);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = std::time::Instant::now();
    s.stop(Duration::from_secs(30)).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let data = sse_data(&reader.await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let err: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(err["error"]["type"], "server_error", "{err}");
    let plain = plain.await.unwrap().unwrap();
    assert_eq!(plain.status(), 503);
    while s.handle.stats().running != 0 {
        assert!(t.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_logprobs_and_logit_bias() {
    let s = server().await;
    let c = reqwest::Client::new();
    // Chat: five alternatives per token, most likely first; greedy samples the first.
    let body = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
        "temperature": 0, "logprobs": true, "top_logprobs": 5, "ignore_eos": true});
    let (status, r) = post(&c, &s, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{r}");
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    assert_eq!(content.len(), 4);
    for t in &content {
        let alts = t["top_logprobs"].as_array().unwrap();
        assert_eq!(alts.len(), 5, "{t}");
        let lps: Vec<f64> = alts.iter().map(|a| a["logprob"].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0, "{lps:?}");
        assert!(lps.iter().map(|l| l.exp()).sum::<f64>() <= 1.0 + 1e-5);
        assert_eq!(alts[0]["token"], t["token"], "greedy takes the most likely");
        assert_eq!(alts[0]["logprob"], t["logprob"]);
        assert!(alts.iter().all(|a| a["bytes"].is_array()));
    }
    // Streaming carries the same alternatives.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let chunks = sse_chunks(&post_stream(&c, &s, "/v1/chat/completions", &sbody).await);
    let streamed: Vec<Value> = chunks
        .iter()
        .filter_map(|ch| ch["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    // (Same tokens; the logprobs may differ in the last bits: the prompt comes from the
    // prefix cache the second time.)
    assert_eq!(streamed.len(), content.len());
    let close = |a: &Value, b: &Value| {
        (a["logprob"].as_f64().unwrap() - b["logprob"].as_f64().unwrap()).abs() < 1e-4
            && a["token"] == b["token"]
    };
    for (a, b) in streamed.iter().zip(&content) {
        assert!(close(a, b), "{a} vs {b}");
        let (sa, sb) =
            (a["top_logprobs"].as_array().unwrap(), b["top_logprobs"].as_array().unwrap());
        assert!(sa.len() == sb.len() && sa.iter().zip(sb).all(|(x, y)| close(x, y)), "{a} vs {b}");
    }
    // Completions: `logprobs: 3` gives a dict per token holding the sampled token.
    let (status, r) = post(
        &c,
        &s,
        "/v1/completions",
        &json!({"prompt": "ab", "max_tokens": 5, "logprobs": 3, "temperature": 1.0,
                "seed": 7, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let lp = &r["choices"][0]["logprobs"];
    let tops = lp["top_logprobs"].as_array().unwrap();
    assert_eq!(tops.len(), 5);
    for (i, top) in tops.iter().enumerate() {
        let top = top.as_object().unwrap();
        assert!((1..=4).contains(&top.len()), "{top:?}");
        let token = lp["tokens"][i].as_str().unwrap();
        assert!(top.contains_key(token), "{token:?} not in {top:?}");
    }
    // logit_bias: +100 on one token makes every sampled token that one.
    let tokenizer = radix_model::ModelSource::open(MODEL).unwrap().tokenizer;
    let z = tokenizer.encode("Z", false).unwrap();
    assert_eq!(z.len(), 1);
    let (status, r) = post(
        &c,
        &s,
        "/v1/completions",
        &json!({"prompt": "ab", "max_tokens": 6, "temperature": 1.0, "ignore_eos": true,
                "logit_bias": {z[0].to_string(): 100}}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["text"], "ZZZZZZ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_aliases_and_request_ids() {
    let cfg = ServerConfig { model_aliases: vec!["tiny-b".into()], ..Default::default() };
    let s = start(engine_config(), cfg).await;
    let c = reqwest::Client::new();
    // Either name is served; responses carry the first.
    for name in [MODEL, "tiny-b"] {
        let (status, r) = post(
            &c,
            &s,
            "/v1/completions",
            &json!({"model": name, "prompt": "a", "max_tokens": 2, "ignore_eos": true}),
        )
        .await;
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["model"], MODEL);
        let card = c.get(s.url(&format!("/v1/models/{name}"))).send().await.unwrap();
        assert_eq!(card.status(), 200);
    }
    let list: Value = c.get(s.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    let ids: Vec<&str> =
        list["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![MODEL, "tiny-b"]);
    let (status, r) =
        post(&c, &s, "/v1/completions", &json!({"model": "tiny-c", "prompt": "a"})).await;
    assert_eq!(status, 404, "{r}");
    assert_eq!(r["error"]["code"], "model_not_found");
    // X-Request-Id: the client's is echoed, on errors too; without one, one is made.
    let resp = c
        .post(s.url("/v1/completions"))
        .header("x-request-id", "client-id-42")
        .json(&json!({"prompt": "a", "max_tokens": 1, "ignore_eos": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "client-id-42");
    let resp = c.get(s.url("/v1/nothing")).header("x-request-id", "e-1").send().await.unwrap();
    assert_eq!(
        (resp.status().as_u16(), resp.headers()["x-request-id"].to_str().unwrap()),
        (404, "e-1")
    );
    let resp = c.get(s.url("/health")).send().await.unwrap();
    let made = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(made.len(), 32, "{made}");
    let bad = c.get(s.url("/health")).header("x-request-id", "x".repeat(300)).send().await.unwrap();
    assert_ne!(bad.headers()["x-request-id"].to_str().unwrap(), "x".repeat(300));
    // Every metric carries the model's name (`metrics` checks it on each line). The
    // engine publishes its counters after the step that sent the last token, so the
    // scrape may trail the responses for a moment: poll (CI once saw it short).
    let t = std::time::Instant::now();
    loop {
        let m = metrics(&c, &s).await;
        if m["radix_generation_tokens_total"] >= 5.0 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "generated tokens never counted: {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_answers_with_the_prompt_and_its_logprobs() {
    let s = server().await;
    let c = reqwest::Client::new();
    let base = json!({"prompt": "Hello", "max_tokens": 3, "temperature": 0, "ignore_eos": true});
    let (_, plain) = post(&c, &s, "/v1/completions", &base).await;
    let generated = plain["choices"][0]["text"].as_str().unwrap().to_string();
    // Echo alone: the prompt's text, then the completion.
    let mut body = base.clone();
    body["echo"] = json!(true);
    let (status, r) = post(&c, &s, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["text"], format!("Hello{generated}"));
    assert!(r["choices"][0]["logprobs"].is_null());
    // With logprobs (lm-eval's loglikelihood request): every prompt token has one but
    // the first (BOS here), then the sampled tokens.
    body["logprobs"] = json!(2);
    let (status, r) = post(&c, &s, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{r}");
    let lp = &r["choices"][0]["logprobs"];
    let n = 1 + 5 + 3;
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n, "{lp}");
    let token_lps = lp["token_logprobs"].as_array().unwrap();
    assert!(token_lps[0].is_null());
    assert!(token_lps[1..].iter().all(|l| l.as_f64().unwrap() <= 0.0), "{lp}");
    let tops = lp["top_logprobs"].as_array().unwrap();
    assert!(tops[0].is_null());
    for (i, t) in tops.iter().enumerate().skip(1) {
        let t = t.as_object().unwrap();
        assert!((1..=3).contains(&t.len()) && t.contains_key(lp["tokens"][i].as_str().unwrap()));
    }
    let offsets: Vec<u64> =
        lp["text_offset"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()).collect();
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
    // The same prompt scored twice (the second is cached, and must be computed again).
    let (_, again) = post(&c, &s, "/v1/completions", &body).await;
    let again_lps = again["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap().clone();
    for (a, b) in again_lps.iter().zip(token_lps).skip(1) {
        assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-4);
    }
    // Streamed: the same text and tokens.
    body["stream"] = json!(true);
    let chunks = sse_chunks(&post_stream(&c, &s, "/v1/completions", &body).await);
    let text: String = chunks.iter().filter_map(|ch| ch["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, format!("Hello{generated}"));
    let tokens: Vec<Value> = chunks
        .iter()
        .filter_map(|ch| ch["choices"][0]["logprobs"]["tokens"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(&tokens, lp["tokens"].as_array().unwrap());
    // Several prompts echo their own text; token ids echo their decoded text.
    let (status, r) = post(
        &c,
        &s,
        "/v1/completions",
        &json!({"prompt": ["Hello", "Bye now"], "echo": true, "max_tokens": 1, "n": 2}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let texts: Vec<&str> =
        r["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap()).collect();
    assert_eq!(texts.len(), 4);
    assert!(texts[..2].iter().all(|t| t.starts_with("Hello")), "{texts:?}");
    assert!(texts[2..].iter().all(|t| t.starts_with("Bye now")), "{texts:?}");
    let (_, r) = post(
        &c,
        &s,
        "/v1/completions",
        &json!({"prompt": [72, 105], "echo": true, "max_tokens": 1}),
    )
    .await;
    assert!(r["choices"][0]["text"].as_str().unwrap().starts_with("Hi"), "{r}");
}
