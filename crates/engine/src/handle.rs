//! The engine on its own thread, driven through channels: what the server and the CLI use.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use radix_model::{ModelConfig, Tokenizer};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

use crate::constraint::Grammars;
use crate::engine::{Engine, EngineError};
use crate::metrics::EngineStats;
use crate::output::{OutputProcessor, OutputStream};
use crate::request::{Output, Request, RequestId};
use crate::rules::RequestRules;

enum Command {
    Add(
        RequestId,
        // Boxed: a request with a grammar is large, the other commands are small.
        Box<Request>,
        UnboundedSender<Output>,
        std::sync::mpsc::SyncSender<Result<(), EngineError>>,
    ),
    Abort(RequestId),
    AbortAll,
    Shutdown,
}

/// What clients may read about the engine without a round trip to its thread.
#[derive(Clone)]
pub struct EngineInfo {
    pub model_name: String,
    pub model: ModelConfig,
    pub backend: String,
    pub tokenizer: Arc<Tokenizer>,
    /// What requests are checked against (`rules.max_model_len`: the context length).
    pub rules: RequestRules,
    pub page_size: usize,
    /// Structured-output grammars over the model's vocabulary.
    pub grammars: Arc<Grammars>,
}

/// A cheap-to-clone handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<Command>,
    stats: Arc<Mutex<EngineStats>>,
    next_id: Arc<AtomicU64>,
    info: Arc<EngineInfo>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl EngineHandle {
    /// Starts the engine loop on a new thread.
    pub fn spawn(engine: Engine, model_name: String) -> Self {
        let (tx, rx) = channel();
        let stats = Arc::new(Mutex::new(engine.stats().clone()));
        let info = Arc::new(EngineInfo {
            model_name,
            model: engine.runner().config().clone(),
            backend: engine.runner().backend_name(),
            tokenizer: engine.tokenizer().clone(),
            rules: engine.rules(),
            page_size: engine.config().page_size,
            grammars: engine.grammars().clone(),
        });
        let shared = stats.clone();
        let thread = std::thread::Builder::new()
            .name("radix-engine".into())
            .spawn(move || run(engine, rx, shared))
            .expect("spawning the engine thread");
        Self {
            tx,
            stats,
            next_id: Arc::new(AtomicU64::new(1)),
            info,
            thread: Arc::new(Mutex::new(Some(thread))),
        }
    }

    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// Submits a request; its outputs, as text, come from the returned stream. Dropping
    /// the stream aborts the request at the next step. Blocks until the engine has
    /// queued it (or refused it): call it off async workers.
    pub fn submit(&self, mut req: Request) -> Result<OutputStream, EngineError> {
        self.info.rules.check(&req)?;
        // The stop strings stay on this side: the stream matches them, not the engine.
        let processor = OutputProcessor::new(&req);
        req.stop.stop_strings = Vec::new();
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let (out_tx, out_rx) = unbounded_channel();
        let (ack_tx, ack_rx) = std::sync::mpsc::sync_channel(1);
        self.tx
            .send(Command::Add(id, Box::new(req), out_tx, ack_tx))
            .map_err(|_| EngineError::Config("the engine has stopped".into()))?;
        ack_rx.recv().map_err(|_| EngineError::Config("the engine has stopped".into()))??;
        Ok(OutputStream::new(id, out_rx, processor, self.clone()))
    }

    pub fn abort(&self, id: RequestId) {
        let _ = self.tx.send(Command::Abort(id));
    }

    pub fn abort_all(&self) {
        let _ = self.tx.send(Command::AbortAll);
    }

    pub fn stats(&self) -> EngineStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Aborts what is left and waits for the engine thread to end.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

fn run(mut engine: Engine, rx: Receiver<Command>, stats: Arc<Mutex<EngineStats>>) {
    loop {
        // Idle: block for the next command. Busy: take what has arrived and step.
        let first = if engine.has_work() {
            match rx.try_recv() {
                Ok(c) => Some(c),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => Some(Command::Shutdown),
            }
        } else {
            Some(rx.recv().unwrap_or(Command::Shutdown))
        };
        let mut next = first;
        while let Some(cmd) = next.take() {
            match cmd {
                Command::Add(id, req, sink, ack) => {
                    let _ = ack.send(engine.add(id, *req, sink));
                }
                Command::Abort(id) => {
                    engine.abort(id);
                }
                Command::AbortAll => engine.abort_all(),
                Command::Shutdown => {
                    engine.abort_all();
                    *stats.lock().unwrap_or_else(|e| e.into_inner()) = engine.stats().clone();
                    return;
                }
            }
            next = rx.try_recv().ok();
        }
        if engine.has_work() {
            engine.step();
        }
        *stats.lock().unwrap_or_else(|e| e.into_inner()) = engine.stats().clone();
    }
}
