//! `TpModel`: a tensor-parallel group that the engine drives as one model.
//!
//! One process, one thread per rank: rank 0 runs on the caller's thread (the engine's),
//! ranks 1.. on threads of their own, each owning its `LlamaModel` (its backend, its
//! share of the weights, its KV pool). The scheduler runs once; `forward` copies the
//! step into a buffer the ranks share and tells every rank to run it; the ranks meet in
//! the backend's all-reduce twice per layer. Rank 0 alone has logits, so sampling is a
//! plain call on rank 0 with nothing sent anywhere.
//!
//! Threads rather than processes: the step is shared memory (no serialisation, no IPC),
//! a rank's error comes back as a value, and the CPU backend's all-reduce is a barrier
//! over shared buffers. With NCCL the same shape holds (one communicator per thread's
//! GPU, as NCCL's single-process multi-GPU mode allows, and one thread launching each
//! GPU's CUDA graphs, which NCCL recommends over one thread launching them all).

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, PoisonError, RwLock};
use std::thread::JoinHandle;

use radix_kv::KvGeometry;

use super::{GroupControl, TpShard};
use crate::backend::{Backend, KvPoolSpec, Step};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::model::LlamaModel;
use crate::sampling::{SampleRequest, Sampled};

/// Loads every rank of a group of `size` at once, one thread each (`make` builds rank
/// `shard.rank`'s model; it slices the weights by its backend's shard).
pub fn load_ranks<B, F>(size: usize, make: F) -> Result<Vec<LlamaModel<B>>>
where
    B: Backend + Send,
    B::Weight: Send,
    F: Fn(TpShard) -> Result<LlamaModel<B>> + Sync,
{
    let shards = TpShard::group(size)?;
    let make = &make;
    std::thread::scope(|s| {
        let handles: Vec<_> =
            shards.into_iter().map(|shard| s.spawn(move || make(shard))).collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join().unwrap_or_else(|p| {
                    Err(ModelError::TensorParallel(format!(
                        "loading rank {rank} panicked: {}",
                        panic_message(&*p)
                    )))
                })
            })
            .collect()
    })
}

/// What a rank thread is asked to do.
#[derive(Clone, Copy, Debug)]
enum Command {
    InitKv(KvPoolSpec),
    WarmUp,
    /// Run the step in the shared buffer.
    Forward,
}

struct Worker {
    rank: usize,
    commands: Sender<Command>,
    replies: Receiver<Result<()>>,
    thread: Option<JoinHandle<()>>,
}

/// A tensor-parallel group of `LlamaModel`s driven as one model.
pub struct TpModel<B: Backend> {
    rank0: LlamaModel<B>,
    workers: Vec<Worker>,
    /// The step the ranks run, written before each `Forward` while they are idle.
    step: Arc<RwLock<Step>>,
    control: Arc<dyn GroupControl>,
}

impl<B> TpModel<B>
where
    B: Backend + Send + 'static,
    B::Weight: Send,
{
    /// Takes the ranks' models (rank order: `models[r].shard.rank == r`) and the
    /// control of the collectives their backends share.
    pub fn new(models: Vec<LlamaModel<B>>, control: Arc<dyn GroupControl>) -> Result<Self> {
        let size = models.len();
        for (r, m) in models.iter().enumerate() {
            if m.shard != (TpShard { rank: r, size }) {
                return Err(ModelError::TensorParallel(format!(
                    "model {r} of {size} is rank {} of {}",
                    m.shard.rank, m.shard.size
                )));
            }
        }
        let step = Arc::new(RwLock::new(Step::default()));
        let mut models = models.into_iter();
        let rank0 = models.next().ok_or_else(|| {
            ModelError::TensorParallel("a tensor-parallel group needs at least one rank".into())
        })?;
        let workers = models
            .enumerate()
            .map(|(i, model)| spawn(i + 1, model, step.clone(), control.clone()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { rank0, workers, step, control })
    }

    pub fn size(&self) -> usize {
        self.workers.len() + 1
    }

    /// The model's config (the whole model's shapes, not a rank's).
    pub fn config(&self) -> &ModelConfig {
        &self.rank0.config
    }

    pub fn backend_name(&self) -> String {
        format!("{}, tensor-parallel × {}", self.rank0.backend.name(), self.size())
    }

    /// Rank 0, which holds the logits (tests and debugging).
    pub fn rank0(&mut self) -> &mut LlamaModel<B> {
        &mut self.rank0
    }

    /// Allocates every rank's KV pool (same pages, each rank's kv heads); returns rank
    /// 0's geometry, which is every rank's.
    pub fn init_kv(&mut self, spec: &KvPoolSpec) -> Result<KvGeometry> {
        self.on_all(Command::InitKv(*spec), |m| m.init_kv(spec))
    }

    pub fn warm_up(&mut self) -> Result<usize> {
        self.on_all(Command::WarmUp, LlamaModel::warm_up)
    }

    /// Runs `step` on every rank; rank 0 keeps the logits.
    pub fn forward(&mut self, step: &Step) -> Result<()> {
        if step.num_tokens() == 0 {
            return Ok(());
        }
        self.step.write().unwrap_or_else(PoisonError::into_inner).clone_from(step);
        self.on_all(Command::Forward, |m| m.forward(step))
    }

    /// Samples rank 0's logits of the last `forward`.
    pub fn sample(&mut self, requests: &[SampleRequest]) -> Result<Vec<Sampled>> {
        self.rank0.sample(requests)
    }

    /// `forward`, then rank 0's logits on the host.
    pub fn forward_logits(&mut self, step: &Step) -> Result<Vec<f32>> {
        if step.logit_rows.is_empty() || step.tokens.is_empty() {
            return Ok(Vec::new());
        }
        self.forward(step)?;
        self.rank0.backend.read_logits()
    }

    /// Sends `cmd` to ranks 1.., runs `local` on rank 0 meanwhile, and waits for all.
    /// The first error that is a cause (not another rank's abort) is returned, after
    /// every rank has stopped and the group is re-armed.
    fn on_all<T>(
        &mut self,
        cmd: Command,
        local: impl FnOnce(&mut LlamaModel<B>) -> Result<T>,
    ) -> Result<T> {
        let gone =
            |rank: usize| ModelError::TensorParallel(format!("rank {rank}'s thread is gone"));
        let mut errors: Vec<(usize, ModelError)> = Vec::new();
        let mut sent = Vec::with_capacity(self.workers.len());
        for w in &self.workers {
            if w.commands.send(cmd).is_ok() {
                sent.push(w);
            } else {
                self.control.abort(&format!("rank {}'s thread is gone", w.rank));
                errors.push((w.rank, gone(w.rank)));
            }
        }
        let mine = guarded(0, &*self.control, || local(&mut self.rank0));
        for w in sent {
            match w.replies.recv() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => errors.push((w.rank, e)),
                Err(_) => errors.push((w.rank, gone(w.rank))),
            }
        }
        if mine.is_ok() && errors.is_empty() {
            return mine;
        }
        // Every rank is idle now: none waits in a collective.
        self.control.reset();
        if self.workers.is_empty() {
            return mine; // alone, rank 0's error comes back as it is
        }
        let aborted = |e: &ModelError| matches!(e, ModelError::GroupAborted(_));
        if let Err(e) = mine {
            errors.insert(0, (0, e));
        }
        let cause = errors.iter().position(|(_, e)| !aborted(e)).unwrap_or(0);
        let (rank, e) = errors.swap_remove(cause);
        Err(match e {
            ModelError::TensorParallel(m) => ModelError::TensorParallel(m),
            e => ModelError::TensorParallel(format!("rank {rank}: {e}")),
        })
    }
}

impl<B: Backend> Drop for TpModel<B> {
    fn drop(&mut self) {
        for w in &mut self.workers {
            // Closing the channel ends the rank's loop; it is idle (every command was
            // answered before `on_all` returned).
            let (dead, _) = channel();
            w.commands = dead;
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

fn spawn<B>(
    rank: usize,
    mut model: LlamaModel<B>,
    step: Arc<RwLock<Step>>,
    control: Arc<dyn GroupControl>,
) -> Result<Worker>
where
    B: Backend + Send + 'static,
    B::Weight: Send,
{
    let (commands, inbox) = channel::<Command>();
    let (outbox, replies) = channel::<Result<()>>();
    let thread = std::thread::Builder::new()
        .name(format!("tp-rank-{rank}"))
        .spawn(move || {
            while let Ok(cmd) = inbox.recv() {
                let reply = guarded(rank, &*control, || match cmd {
                    // Every rank's pool has rank 0's geometry (same pages, as many kv
                    // heads) and runs the same warm-up steps: rank 0 reports them.
                    Command::InitKv(spec) => model.init_kv(&spec).map(drop),
                    Command::WarmUp => model.warm_up().map(drop),
                    Command::Forward => {
                        let step = step.read().unwrap_or_else(PoisonError::into_inner);
                        model.forward(&step)
                    }
                });
                if outbox.send(reply).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| ModelError::TensorParallel(format!("starting rank {rank}'s thread: {e}")))?;
    Ok(Worker { rank, commands, replies, thread: Some(thread) })
}

/// Runs one rank's part of a command; an error or a panic aborts the group's
/// collectives so that the other ranks do not wait for this one forever.
fn guarded<T>(rank: usize, control: &dyn GroupControl, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(ModelError::TensorParallel(format!("rank {rank} panicked: {}", panic_message(&*p))))
    });
    if let Err(e) = &result
        && !matches!(e, ModelError::GroupAborted(_))
    {
        control.abort(&format!("rank {rank} failed: {e}"));
    }
    result
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}
