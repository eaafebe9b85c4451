//! Serving under hostile and unfair load (issue 23), over a loopback port with
//! synthetic:tiny on the CPU backend: idle and half-sent connections are closed, a cap
//! on connections makes room by closing idle ones, hyper's own errors are JSON, only
//! JSON bodies are read, CORS, one request cannot take over the engine, stop strings are
//! bounded, and shutdown drains.

mod common;

use std::time::{Duration, Instant};

use common::{MODEL, TestServer, engine_config, sse_chunks, start};
use radix_server::{ConnectionLimits, ServerConfig};
use serde_json::{Value, json};
use tokio::net::TcpStream;

fn limits(secs: f64) -> ConnectionLimits {
    let d = Duration::from_secs_f64(secs);
    ConnectionLimits {
        header_read_timeout: d,
        body_read_timeout: d,
        keep_alive_timeout: d,
        ..Default::default()
    }
}

async fn connect(s: &TestServer) -> TcpStream {
    TcpStream::connect(s.base.trim_start_matches("http://")).await.unwrap()
}

// Raw socket I/O through readiness (tokio's `io-util` extension traits are not among
// the workspace's features).

async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        stream.writable().await?;
        match stream.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn read_some(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            r => return r,
        }
    }
}

/// Reads until the server closes the connection; panics after `limit`.
async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match read_some(stream, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    if tokio::time::timeout(limit, read).await.is_err() {
        panic!("the connection was still open after {limit:?}");
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The JSON body of a raw HTTP/1.1 answer.
fn json_body(answer: &str) -> Value {
    let (_, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_are_closed() {
    let s = start(engine_config(), ServerConfig { connections: limits(1.0), ..Default::default() })
        .await;
    let limit = Duration::from_secs(5);
    let t = Instant::now();
    // Connects and sends nothing.
    let mut silent = connect(&s).await;
    // Half a request head.
    let mut half_head = connect(&s).await;
    write_all(&half_head, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    // A whole head, then 2 bytes of a 1000-byte body: 408, as JSON.
    let mut half_body = connect(&s).await;
    let head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Content-Length: 1000\r\n\r\n{\"";
    write_all(&half_body, head).await.unwrap();
    assert_eq!(read_to_close(&mut silent, limit).await, "");
    assert_eq!(read_to_close(&mut half_head, limit).await, "");
    let answer = read_to_close(&mut half_body, limit).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(json_body(&answer)["error"]["code"], "request_timeout", "{answer}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    // Kept alive after a response, then closed once idle for the keep-alive timeout.
    let mut kept = connect(&s).await;
    write_all(&kept, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 256];
    let n = read_some(&kept, &mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));
    let t = Instant::now();
    assert_eq!(read_to_close(&mut kept, limit).await, "");
    assert!(t.elapsed() >= Duration::from_millis(800), "closed too soon: {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_idle_connections_make_room() {
    // Timeouts far away: only the cap decides. 40 idle sockets on a cap of 8, then
    // /health and a completion answer at once.
    let connections = ConnectionLimits { max_connections: 8, ..limits(60.0) };
    let s = start(engine_config(), ServerConfig { connections, ..Default::default() }).await;
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(connect(&s).await);
    }
    let c = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let t = Instant::now();
    let health = c.get(s.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let r = c
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "a", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // The oldest idle sockets were the ones closed.
    let mut first = idle.remove(0);
    assert_eq!(read_to_close(&mut first, Duration::from_secs(2)).await, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_and_huge_headers_get_json_errors() {
    let s = start(engine_config(), ServerConfig::default()).await;
    let limit = Duration::from_secs(5);
    let mut garbage = connect(&s).await;
    write_all(&garbage, b"GARBAGE\r\n\r\n").await.unwrap();
    let answer = read_to_close(&mut garbage, limit).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(json_body(&answer)["error"]["type"], "invalid_request_error", "{answer}");

    let mut huge = connect(&s).await;
    let head = format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(100_000));
    let _ = write_all(&huge, head.as_bytes()).await; // the server may close before it all goes
    let answer = read_to_close(&mut huge, limit).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(json_body(&answer)["error"]["message"].as_str().unwrap().contains("headers"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_off_by_default_and_answers_allowed_origins() {
    let preflight = |c: &reqwest::Client, s: &TestServer, origin: &str| {
        c.request(reqwest::Method::OPTIONS, s.url("/v1/chat/completions"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization, content-type")
            .send()
    };
    let c = reqwest::Client::new();
    let off = start(engine_config(), ServerConfig::default()).await;
    let r = preflight(&c, &off, "https://app.example").await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());

    let cfg = ServerConfig {
        allowed_origins: vec!["https://app.example".into()],
        api_key: Some("k".into()),
        ..Default::default()
    };
    let s = start(engine_config(), cfg).await;
    // The preflight needs no API key.
    let r = preflight(&c, &s, "https://app.example").await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    assert!(h["access-control-allow-methods"].to_str().unwrap().contains("POST"));
    let allowed = h["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("content-type"), "{allowed}");
    // Other origins get no CORS headers.
    let r = preflight(&c, &s, "https://evil.example").await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    // The real request carries the header too.
    let r = c
        .get(s.url("/v1/models"))
        .header("origin", "https://app.example")
        .bearer_auth("k")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], "https://app.example");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_retrieve_and_huge_max_tokens() {
    let s = start(engine_config(), ServerConfig::default()).await;
    let c = reqwest::Client::new();
    let r = c.get(s.url(&format!("/v1/models/{MODEL}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let card: Value = r.json().await.unwrap();
    assert_eq!((card["id"].as_str(), card["object"].as_str()), (Some(MODEL), Some("model")));
    for missing in ["/v1/models/nope", "/v1/models/org/some-model"] {
        let r = c.get(s.url(missing)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{missing}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "model_not_found", "{e}");
    }
    // 2^64 is an integer (JSON reads it as a float): too long for the context, not a
    // type error.
    let body = r#"{"prompt": "a", "max_tokens": 18446744073709551616}"#;
    let r = c
        .post(s.url("/v1/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "max_tokens", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("context length"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_logprob_bytes_are_the_tokens_own() {
    let s = start(engine_config(), ServerConfig::default()).await;
    let c = reqwest::Client::new();
    let body = json!({"messages": [{"role": "user", "content": "bytes"}], "max_tokens": 64,
        "temperature": 1.0, "seed": 3, "logprobs": true, "ignore_eos": true});
    let r: Value = c
        .post(s.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 64);
    let mut partial = 0;
    for t in content {
        // synthetic:tiny's tokens are single bytes (or specials, with no bytes).
        let bytes: Vec<u64> =
            t["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap()).collect();
        assert!(bytes.len() <= 1, "{t}");
        if t["token"] == "\u{FFFD}" {
            assert!(bytes[0] >= 0x80, "{t}");
            partial += 1;
        }
    }
    assert!(partial > 0, "no token was part of a character: {r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_cannot_take_over_the_engine() {
    // serve's CPU defaults: 64 running slots.
    let s = start(engine_config(), ServerConfig::default()).await;
    let c = reqwest::Client::new();
    let prompts: Vec<String> = (0..8).map(|i| format!("p{i}")).collect();
    let r = c
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": prompts, "n": 128, "max_tokens": 8}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "n", "{e}");
    // At the limit (256 sequences, four times the slots) the request runs, and a small
    // one sent after it is answered at once.
    let big = json!({"prompt": ["p0", "p1"], "n": 128, "max_tokens": 256, "ignore_eos": true});
    let big = tokio::spawn(c.post(s.url("/v1/completions")).json(&big).send());
    let t = Instant::now();
    while s.handle.stats().running < 64 {
        assert!(t.elapsed() < Duration::from_secs(20), "the large request never filled the slots");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t = Instant::now();
    let small = json!({"prompt": "hi", "max_tokens": 4, "ignore_eos": true});
    let r: Value =
        c.post(s.url("/v1/completions")).json(&small).send().await.unwrap().json().await.unwrap();
    let took = t.elapsed();
    assert_eq!(r["usage"]["completion_tokens"], 4, "{r}");
    assert!(took < Duration::from_secs(2), "the small request took {took:?}");
    eprintln!("small request beside 256 sequences: {took:?}");
    big.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_are_bounded() {
    let s = start(engine_config(), ServerConfig::default()).await;
    let c = reqwest::Client::new();
    let stops: Vec<String> =
        (0..15u8).map(|i| char::from(b'A' + i).to_string().repeat(1 << 20)).collect();
    let r = c
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "x", "max_tokens": 400, "stop": stops}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "stop", "{e}");
    // Just under the bound, a request's stop list costs a concurrent one nothing the
    // engine sees: matching is the stream's, off the engine thread.
    let stops: Vec<String> =
        (0..16u8).map(|i| char::from(b'A' + i).to_string().repeat(256)).collect();
    let heavy = json!({"prompt": "x", "max_tokens": 400, "ignore_eos": true, "stop": stops});
    let r = c.post(s.url("/v1/completions")).json(&heavy).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r: Value = r.json().await.unwrap();
    assert_eq!(r["usage"]["completion_tokens"], 400, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_refuses_new_requests_and_ends_with_the_streams() {
    let mut s = start(
        engine_config(),
        ServerConfig { grace_period: Duration::from_secs(60), ..Default::default() },
    )
    .await;
    let c = reqwest::Client::new();
    // Long enough to outlast the checks below on any machine (synthetic:tiny decodes
    // two streams at thousands of tokens a second here), and each stream has sent its
    // first chunk before the signal, so both are running when draining starts.
    let body = json!({"prompt": "drain", "max_tokens": 1000, "ignore_eos": true, "stream": true});
    let mut readers = Vec::new();
    for _ in 0..2 {
        let mut resp = c.post(s.url("/v1/completions")).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let first = resp.chunk().await.unwrap().expect("a first chunk");
        readers.push(tokio::spawn(async move {
            let mut bytes = first.to_vec();
            while let Some(chunk) = resp.chunk().await.unwrap() {
                bytes.extend_from_slice(&chunk);
            }
            String::from_utf8(bytes).unwrap()
        }));
    }
    // A half-sent head must not hold the exit up.
    let half = connect(&s).await;
    write_all(&half, b"GET /health HTTP/1.1\r\n").await.unwrap();
    s.signal_shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Draining: still listening, but /health says so and new requests get 503.
    let fresh = reqwest::Client::new();
    let health = fresh.get(s.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 503);
    let r = fresh.post(s.url("/v1/completions")).json(&json!({"prompt": "late"})).send().await;
    let r = r.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["connection"], "close");
    let t = Instant::now();
    for reader in readers {
        let chunks = sse_chunks(&reader.await.unwrap());
        assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
    }
    let streams_done = t.elapsed();
    s.wait_stopped(Duration::from_secs(10)).await.unwrap();
    let exited = t.elapsed();
    assert!(
        exited < streams_done + Duration::from_secs(2),
        "exit {exited:?} after the streams ended at {streams_done:?} (grace 60 s)"
    );
    assert!(s.is_stopped());
}
