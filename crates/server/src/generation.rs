//! One HTTP request's engine requests (one per choice): submitting them, merging their
//! output streams by choice index, timing tokens for the metrics, and aborting whatever
//! is unfinished when the HTTP side lets go (a client that disconnects drops the response
//! future or the SSE stream, which drops this).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures::stream::{self, SelectAll, Stream, StreamExt};
use radix_engine::{EngineHandle, FinishReason, Output, RequestId};

use crate::api::Usage;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::validate::{Endpoint, ParsedRequest, ResponseShape};

type Tagged = Pin<Box<dyn Stream<Item = (usize, Option<Output>)> + Send>>;

/// What the response writers need to know about the request.
#[derive(Clone, Debug)]
pub struct Meta {
    /// `cmpl-...` or `chatcmpl-...`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    pub shape: ResponseShape,
}

/// The submitted requests of one HTTP request.
pub struct Generation {
    pub meta: Meta,
    handle: EngineHandle,
    metrics: Arc<Metrics>,
    ids: Vec<RequestId>,
    finished: Vec<bool>,
    outputs: SelectAll<Tagged>,
    started: Instant,
    last_token: Vec<Option<Instant>>,
    completion_tokens: Vec<usize>,
    cached_tokens: Vec<usize>,
    /// Ended by an error of ours, not by the client.
    failed: bool,
}

impl Generation {
    /// Submits every choice's request (blocking: call it off the async workers). If one is
    /// refused, those already submitted are aborted. The choices form one group, so they
    /// share the running slots with other requests as one client.
    pub fn submit(
        handle: &EngineHandle,
        metrics: &Arc<Metrics>,
        parsed: ParsedRequest,
        started: Instant,
    ) -> Result<Self, ApiError> {
        let prefix = match parsed.shape.endpoint {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        };
        let choices = parsed.requests.len();
        let meta = Meta {
            id: format!("{prefix}-{:032x}", rand::random::<u128>()),
            created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            shape: parsed.shape,
        };
        metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut generation = Self {
            meta,
            handle: handle.clone(),
            metrics: metrics.clone(),
            ids: Vec::with_capacity(choices),
            finished: Vec::with_capacity(choices),
            outputs: SelectAll::new(),
            started,
            last_token: vec![None; choices],
            completion_tokens: vec![0; choices],
            cached_tokens: vec![0; choices],
            failed: false,
        };
        for (index, mut req) in parsed.requests.into_iter().enumerate() {
            req.group = generation.ids.first().copied();
            match handle.submit(req) {
                Ok(mut outputs) => {
                    generation.ids.push(outputs.id());
                    generation.finished.push(false);
                    // A sentinel after the last output tells a receiver that closed
                    // without a final output (the engine stopped) from a finished one.
                    let tagged = stream::poll_fn(move |cx| outputs.poll_recv(cx))
                        .map(move |o| (index, Some(o)))
                        .chain(stream::once(async move { (index, None) }));
                    generation.outputs.push(Box::pin(tagged));
                }
                Err(e) => {
                    generation.failed = true;
                    return Err(e.into()); // dropping `generation` aborts the others
                }
            }
        }
        Ok(generation)
    }

    pub fn choices(&self) -> usize {
        self.ids.len()
    }

    pub fn all_finished(&self) -> bool {
        self.finished.iter().all(|&f| f)
    }

    /// The next output of any choice, with its choice index; None once every choice has
    /// finished. A choice whose engine stream closed early gets a final error output.
    pub async fn next(&mut self) -> Option<(usize, Output)> {
        loop {
            let (index, out) = self.outputs.next().await?;
            let out = match out {
                Some(o) => o,
                None if self.finished[index] => continue,
                None => Output {
                    id: self.ids[index],
                    text: String::new(),
                    token_ids: Vec::new(),
                    logprobs: Vec::new(),
                    top_logprobs: Vec::new(),
                    prompt_logprobs: Vec::new(),
                    finish: Some(FinishReason::Error("the engine stopped".into())),
                    last_token_is_text: false,
                    prompt_tokens: 0,
                    completion_tokens: self.completion_tokens[index],
                    cached_tokens: self.cached_tokens[index],
                },
            };
            if !out.token_ids.is_empty() {
                let now = Instant::now();
                match self.last_token[index] {
                    None => self.metrics.ttft.observe(now - self.started),
                    Some(t) => self.metrics.itl.observe((now - t) / out.token_ids.len() as u32),
                }
                self.last_token[index] = Some(now);
            }
            self.completion_tokens[index] = out.completion_tokens;
            self.cached_tokens[index] = out.cached_tokens;
            if let Some(reason) = &out.finish {
                self.finished[index] = true;
                if matches!(reason, FinishReason::Error(_) | FinishReason::Abort) {
                    self.failed = true;
                } else {
                    self.metrics.e2e.observe(self.started.elapsed());
                }
            }
            return Some((index, out));
        }
    }

    /// Usage of the whole request: each prompt counted once, every choice's output.
    pub fn usage(&self) -> Usage {
        let prompt = self.meta.shape.prompt_lens.iter().sum();
        let completion = self.completion_tokens.iter().sum();
        // Cached tokens of each prompt's first choice.
        let cached = self.cached_tokens.iter().step_by(self.meta.shape.n.max(1)).sum();
        Usage::new(prompt, completion, cached)
    }

    /// Adds this request's usage to the metrics (once, when it completed).
    pub fn record_usage(&self) {
        let u = self.usage();
        self.metrics.prompt_tokens.fetch_add(u.prompt_tokens as u64, Ordering::Relaxed);
        self.metrics.completion_tokens.fetch_add(u.completion_tokens as u64, Ordering::Relaxed);
    }

    /// Collects every output (non-streaming).
    pub async fn collect(mut self) -> Result<Collected, ApiError> {
        let mut choices = vec![ChoiceOutput::default(); self.choices()];
        while let Some((i, o)) = self.next().await {
            let c = &mut choices[i];
            c.text.push_str(&o.text);
            c.token_ids.extend_from_slice(&o.token_ids);
            c.logprobs.extend_from_slice(&o.logprobs);
            c.top_logprobs.extend(o.top_logprobs);
            c.prompt_logprobs.extend(o.prompt_logprobs);
            match o.finish {
                Some(FinishReason::Error(e)) => {
                    return Err(ApiError::Internal(format!("generation failed: {e}")));
                }
                Some(FinishReason::Abort) => {
                    return Err(ApiError::Unavailable(
                        "the request was aborted (the server is shutting down)".into(),
                    ));
                }
                Some(reason) => c.finish = Some(reason.as_openai()),
                None => {}
            }
            if self.all_finished() {
                break;
            }
        }
        self.record_usage();
        Ok(Collected { usage: self.usage(), meta: self.meta.clone(), choices })
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        let mut aborted = false;
        for (id, done) in self.ids.iter().zip(&self.finished) {
            if !done {
                self.handle.abort(*id);
                aborted = true;
            }
        }
        if aborted && !self.failed {
            self.metrics.client_aborts.fetch_add(1, Ordering::Relaxed);
        }
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A finished choice (non-streaming).
#[derive(Clone, Debug, Default)]
pub struct ChoiceOutput {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    /// Each token's alternatives, when `top_logprobs` was asked for.
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// The prompt's scored tokens (`echo` with `logprobs`).
    pub prompt_logprobs: Vec<radix_engine::PromptLogprob>,
    pub finish: Option<&'static str>,
}

pub struct Collected {
    pub meta: Meta,
    pub usage: Usage,
    pub choices: Vec<ChoiceOutput>,
}
