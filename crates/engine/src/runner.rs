//! What the engine needs from a model: run a step, know its shape. Object-safe, so the
//! engine is not generic over the backend. A tensor-parallel group (`TpModel`) is one
//! runner: the engine schedules once and the group runs each step on every rank.

use radix_kv::KvGeometry;
use radix_model::{
    Backend, KvPoolSpec, LlamaModel, ModelConfig, SampleRequest, Sampled, Step, TpModel,
};

pub trait Runner: Send {
    fn config(&self) -> &ModelConfig;
    fn backend_name(&self) -> String;
    /// Allocates the KV pool once, before the first step (with key bounds when `spec`
    /// turns sparse paging on); returns what one page of it is.
    fn init_kv(&mut self, spec: &KvPoolSpec) -> radix_model::Result<KvGeometry>;
    /// Warm-up after `init_kv` (CUDA graphs are captured here); returns steps run.
    fn warm_up(&mut self) -> radix_model::Result<usize>;
    /// Runs the step up to the logits of `step.logit_rows` (kept on the backend).
    fn forward(&mut self, step: &Step) -> radix_model::Result<()>;
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

    fn init_kv(&mut self, spec: &KvPoolSpec) -> radix_model::Result<KvGeometry> {
        LlamaModel::init_kv(self, spec)
    }

    fn warm_up(&mut self) -> radix_model::Result<usize> {
        LlamaModel::warm_up(self)
    }

    fn forward(&mut self, step: &Step) -> radix_model::Result<()> {
        LlamaModel::forward(self, step)
    }

    fn sample(&mut self, requests: &[SampleRequest]) -> radix_model::Result<Vec<Sampled>> {
        LlamaModel::sample(self, requests)
    }
}

impl<B: Backend + Send + 'static> Runner for TpModel<B>
where
    B::Weight: Send,
{
    fn config(&self) -> &ModelConfig {
        TpModel::config(self)
    }

    fn backend_name(&self) -> String {
        TpModel::backend_name(self)
    }

    fn init_kv(&mut self, spec: &KvPoolSpec) -> radix_model::Result<KvGeometry> {
        TpModel::init_kv(self, spec)
    }

    fn warm_up(&mut self) -> radix_model::Result<usize> {
        TpModel::warm_up(self)
    }

    fn forward(&mut self, step: &Step) -> radix_model::Result<()> {
        TpModel::forward(self, step)
    }

    fn sample(&mut self, requests: &[SampleRequest]) -> radix_model::Result<Vec<Sampled>> {
        TpModel::sample(self, requests)
    }
}
