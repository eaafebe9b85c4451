//! What the engine needs from a model: run a step, know its shape. Object-safe, so the
//! engine is not generic over the backend.

use radix_model::{Backend, LlamaModel, ModelConfig, StepInput};

pub trait Runner: Send {
    fn config(&self) -> &ModelConfig;
    fn backend_name(&self) -> String;
    /// Allocates the KV pool once, before the first step.
    fn init_kv(&mut self, num_pages: usize, page_size: usize) -> radix_model::Result<()>;
    /// Logits `[step.logit_rows.len(), vocab]`.
    fn forward(&mut self, step: &StepInput) -> radix_model::Result<Vec<f32>>;
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

    fn init_kv(&mut self, num_pages: usize, page_size: usize) -> radix_model::Result<()> {
        let cfg = self.config.clone();
        self.backend.init_kv(&cfg, num_pages, page_size)
    }

    fn forward(&mut self, step: &StepInput) -> radix_model::Result<Vec<f32>> {
        LlamaModel::forward(self, step)
    }
}
