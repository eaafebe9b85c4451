//! Streaming responses as server-sent events: `data: <chunk JSON>` per output, an
//! optional usage chunk, then `data: [DONE]`. An engine failure mid-stream becomes a
//! `data: {"error": ...}` event before `[DONE]`. The stream owns the `Generation`:
//! when the client disconnects, hyper drops the stream and the requests are aborted.
//! While nothing is sent, a comment line (`:`) goes out every 15 s.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, StreamExt};
use radix_engine::{FinishReason, Output};
use radix_model::Tokenizer;
use serde::Serialize;

use crate::error::ApiError;
use crate::generation::Generation;
use crate::validate::Endpoint;
use crate::{chat, completions};

struct Streamer {
    generation: Generation,
    tokenizer: Arc<Tokenizer>,
    completion_state: Vec<completions::ChunkState>,
    chat_state: Vec<chat::ChunkState>,
    done: bool,
}

fn json_event(value: &impl Serialize) -> Event {
    match serde_json::to_string(value) {
        Ok(s) => Event::default().data(s),
        // Our own types always serialize; keep the stream well formed regardless.
        Err(e) => Event::default().data(format!(
            "{{\"error\":{{\"message\":\"serializing a chunk: {}\",\"type\":\"server_error\"}}}}",
            e.to_string().replace('"', "'")
        )),
    }
}

fn done_event() -> Event {
    Event::default().data("[DONE]")
}

impl Streamer {
    async fn next_events(&mut self) -> Option<Vec<Event>> {
        if self.done {
            return None;
        }
        let Some((index, out)) = self.generation.next().await else {
            // Every engine stream ended (cannot happen before all choices finished).
            self.done = true;
            return Some(vec![done_event()]);
        };
        let failure = match &out.finish {
            Some(FinishReason::Error(e)) => {
                Some(ApiError::Internal(format!("generation failed: {e}")))
            }
            Some(FinishReason::Abort) => Some(ApiError::Unavailable(
                "the request was aborted (the server is shutting down)".into(),
            )),
            _ => None,
        };
        if let Some(err) = failure {
            self.done = true;
            return Some(vec![json_event(&err.body()), done_event()]);
        }
        let mut events = self.chunks(index, &out);
        if self.generation.all_finished() {
            self.done = true;
            self.generation.record_usage();
            let meta = &self.generation.meta;
            if meta.shape.include_usage {
                let usage = self.generation.usage();
                events.push(match meta.shape.endpoint {
                    Endpoint::Completions => json_event(&completions::usage_chunk(meta, usage)),
                    Endpoint::Chat => json_event(&chat::usage_chunk(meta, usage)),
                });
            }
            events.push(done_event());
        }
        Some(events)
    }

    fn chunks(&mut self, index: usize, out: &Output) -> Vec<Event> {
        let meta = &self.generation.meta;
        match meta.shape.endpoint {
            Endpoint::Completions => {
                let state = &mut self.completion_state[index];
                completions::chunk(meta, index, out, state, &self.tokenizer)
                    .map(|c| json_event(&c))
                    .into_iter()
                    .collect()
            }
            Endpoint::Chat => {
                let state = &mut self.chat_state[index];
                chat::chunks(meta, index, out, state, &self.tokenizer)
                    .iter()
                    .map(json_event)
                    .collect()
            }
        }
    }
}

/// The SSE response for a submitted streaming request.
pub fn respond(generation: Generation, tokenizer: Arc<Tokenizer>) -> Response {
    let choices = generation.choices();
    let streamer = Streamer {
        generation,
        tokenizer,
        completion_state: vec![Default::default(); choices],
        chat_state: vec![Default::default(); choices],
        done: false,
    };
    let events = stream::unfold(streamer, |mut s| async move {
        let events = s.next_events().await?;
        Some((events, s))
    })
    .flat_map(|events| stream::iter(events.into_iter().map(Ok::<Event, Infallible>)));
    // Comment lines every 15 s while nothing else is sent (a request waiting in the
    // queue): proxies keep the connection, and a vanished client is noticed.
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}
