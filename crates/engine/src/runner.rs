//! What the engine needs from a model: run a step, know its shape. Object-safe, so the
//! engine is not generic over the backend.

use radix_kv::SparsePolicy;
use radix_model::{Backend, LlamaModel, ModelConfig, SampleRequest, Sampled, StepInput};

pub trait Runner: Send {
    fn config(&self) -> &ModelConfig;
    fn backend_name(&self) -> String;
    /// Turns sparse paging on (before `init_kv`, which then keeps key bounds).
    fn set_sparse(&mut self, policy: Option<SparsePolicy>) -> radix_model::Result<()>;
    /// Allocates the KV pool once, before the first step.
    fn init_kv(&mut self, num_pages: usize, page_size: usize) -> radix_model::Result<()>;
    /// Warm-up after `init_kv` (CUDA graphs are captured here); returns steps run.
    fn warm_up(&mut self) -> radix_model::Result<usize>;
    /// Runs the step up to the logits of `step.logit_rows` (kept on the backend).
    fn forward(&mut self, step: &StepInput) -> radix_model::Result<()>;
    /// One token per logits row of the last `forward`.
    fn sample(&mut self, requests: &[SampleRequest]) -> radix_model::Result<Vec<Sampled>>;
}

impl<B: Backend + Send> Runner for LlamaModel<B>
where
    B::Weight: Send,
{
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn backend_name(&self) -> String {
        self.backend.name()
    }

    fn set_sparse(&mut self, policy: Option<SparsePolicy>) -> radix_model::Result<()> {
        self.backend.set_sparse(policy)
    }

    fn init_kv(&mut self, num_pages: usize, page_size: usize) -> radix_model::Result<()> {
        let cfg = self.config.clone();
        self.backend.init_kv(&cfg, num_pages, page_size)
    }

    fn warm_up(&mut self) -> radix_model::Result<usize> {
        LlamaModel::warm_up(self)
    }

    fn forward(&mut self, step: &StepInput) -> radix_model::Result<()> {
        LlamaModel::forward(self, step)
    }

    fn sample(&mut self, requests: &[SampleRequest]) -> radix_model::Result<Vec<Sampled>> {
        LlamaModel::sample(self, requests)
    }
}
