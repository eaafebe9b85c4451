//! From the engine's outputs (token ids) to the client's (text, stop strings), on the
//! client's side of the channel: the engine thread samples and checks stop tokens and
//! lengths, and never detokenizes or matches stop strings, so no request's text or stop
//! list slows the batch. When a stop string matches here, the request is aborted in the
//! engine (a token or two may have been sampled meanwhile; they are dropped), as vLLM's
//! output processor does.

use std::sync::Arc;
use std::task::{Context, Poll};

use radix_model::Tokenizer;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::detokenize::Detokenizer;
use crate::handle::EngineHandle;
use crate::request::{FinishReason, Output, Request, RequestId};

/// Turns one request's engine outputs into text, ending it at a stop string.
pub struct OutputProcessor {
    detok: Detokenizer,
    done: bool,
}

/// One processed output.
pub struct Processed {
    pub output: Output,
    /// A stop string ended the output here: the engine should stop the request.
    pub stop_string: bool,
}

impl OutputProcessor {
    /// For `req`'s prompt and stop strings.
    pub fn new(req: &Request) -> Self {
        Self { detok: Detokenizer::new(&req.prompt, &req.stop.stop_strings), done: false }
    }

    /// Fills in an engine output's text and ends it at a stop string; `None` once the
    /// output has finished (what the engine sends after that is dropped).
    pub fn process(&mut self, tok: &Tokenizer, mut out: Output) -> Option<Processed> {
        if self.done {
            return None;
        }
        let ids = &out.token_ids;
        let (text_ids, complete) = match out.finish {
            // A grammar that completed on its last token keeps it.
            Some(FinishReason::Stop) if out.last_token_is_text => (&ids[..], true),
            // Otherwise the engine stopped at a stop token: the output ends without its text.
            Some(FinishReason::Stop) => (&ids[..ids.len().saturating_sub(1)], true),
            Some(FinishReason::Length) => (&ids[..], true),
            // Failures release nothing that was held back.
            Some(FinishReason::Abort | FinishReason::Error(_)) => (&ids[..0], false),
            None => (&ids[..], false),
        };
        let step = self.detok.step(tok, text_ids, complete);
        out.text = step.text;
        if step.stopped {
            out.finish = Some(FinishReason::Stop);
        }
        self.done = out.finish.is_some();
        Some(Processed { output: out, stop_string: step.stopped })
    }
}

/// A submitted request's outputs, processed as they are received (see the module doc).
/// Dropping it aborts the request.
pub struct OutputStream {
    id: RequestId,
    /// None once the output has finished.
    rx: Option<UnboundedReceiver<Output>>,
    processor: OutputProcessor,
    tokenizer: Arc<Tokenizer>,
    handle: EngineHandle,
}

impl OutputStream {
    pub(crate) fn new(
        id: RequestId,
        rx: UnboundedReceiver<Output>,
        processor: OutputProcessor,
        handle: EngineHandle,
    ) -> Self {
        let tokenizer = handle.info().tokenizer.clone();
        Self { id, rx: Some(rx), processor, tokenizer, handle }
    }

    pub fn id(&self) -> RequestId {
        self.id
    }

    /// The next output; `None` after the final one (or if the engine stopped).
    pub async fn recv(&mut self) -> Option<Output> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Output>> {
        loop {
            let Some(rx) = self.rx.as_mut() else { return Poll::Ready(None) };
            match rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.rx = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(raw)) => {
                    if let Some(out) = self.accept(raw) {
                        return Poll::Ready(Some(out));
                    }
                }
            }
        }
    }

    /// `recv` for threads outside an async runtime.
    pub fn blocking_recv(&mut self) -> Option<Output> {
        loop {
            let raw = self.rx.as_mut()?.blocking_recv();
            match raw {
                None => {
                    self.rx = None;
                    return None;
                }
                Some(raw) => {
                    if let Some(out) = self.accept(raw) {
                        return Some(out);
                    }
                }
            }
        }
    }

    fn accept(&mut self, raw: Output) -> Option<Output> {
        let processed = self.processor.process(&self.tokenizer, raw)?;
        if processed.stop_string {
            self.handle.abort(self.id);
        }
        if processed.output.finish.is_some() {
            self.rx = None;
        }
        Some(processed.output)
    }
}
