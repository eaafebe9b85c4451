//! Model and engine options shared by `generate`, `serve` and `bench offline`.

use std::sync::Arc;

use clap::{Args, ValueEnum};
use radix_engine::{Engine, EngineConfig};
use radix_model::{CpuBackend, ModelSource};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// The CPU backend (runs anywhere).
    Cpu,
    /// An NVIDIA GPU.
    Cuda,
}

#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// A Hugging Face model folder, or synthetic:tiny / synthetic:llama3-8b.
    #[arg(long, default_value = "synthetic:tiny")]
    pub model: String,
    /// Where the model runs.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Device,
    /// Tokens per KV page.
    #[arg(long, default_value_t = 16)]
    pub page_size: usize,
    /// KV pages in the pool.
    #[arg(long, default_value_t = 4096)]
    pub kv_pages: usize,
    /// Tokens computed per step at most.
    #[arg(long, default_value_t = 2048)]
    pub max_batched_tokens: usize,
    /// Requests running at once at most.
    #[arg(long, default_value_t = 64)]
    pub max_running: usize,
    /// Requests waiting at most (more get 429).
    #[arg(long, default_value_t = 1024)]
    pub max_waiting: usize,
    /// Longest prompt + output (default: the model's).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Turn off prefix reuse through the radix cache.
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Compute each prompt in one step instead of chunks.
    #[arg(long)]
    pub no_chunked_prefill: bool,
}

impl ModelArgs {
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            page_size: self.page_size,
            num_pages: self.kv_pages,
            max_batched_tokens: self.max_batched_tokens,
            max_running: self.max_running,
            max_waiting: self.max_waiting,
            prefix_cache: !self.no_prefix_cache,
            chunked_prefill: !self.no_chunked_prefill,
            max_model_len: self.max_model_len,
        }
    }

    /// Loads the model onto the chosen device and builds the engine.
    pub fn build_engine(&self) -> anyhow::Result<BuiltEngine> {
        let source = ModelSource::open(&self.model)?;
        let runner: Box<dyn radix_engine::Runner> = match self.device {
            Device::Cpu => Box::new(source.load(CpuBackend::new())?),
            Device::Cuda => anyhow::bail!(
                "--device cuda: the CUDA backend is not part of this build yet; use --device cpu"
            ),
        };
        let ModelSource { name, tokenizer, chat_template, .. } = source;
        let engine = Engine::new(runner, Arc::new(tokenizer), self.engine_config())?;
        tracing::info!(
            model = %name,
            backend = %engine.runner().backend_name(),
            kv_pages = self.kv_pages,
            kv_tokens = self.kv_pages * self.page_size,
            max_model_len = engine.max_model_len(),
            "engine ready"
        );
        Ok(BuiltEngine { engine, name, chat_template })
    }
}

/// An engine with what clients need besides it.
pub struct BuiltEngine {
    pub engine: Engine,
    /// The model name clients use.
    pub name: String,
    pub chat_template: radix_model::ChatTemplate,
}

/// Sampling and stop options shared by `generate` and `bench`.
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop strings (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Stop token ids (repeatable).
    #[arg(long)]
    pub stop_token_id: Vec<u32>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
}

impl SamplingArgs {
    pub fn params(&self) -> radix_model::SamplingParams {
        radix_model::SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            seed: self.seed,
        }
    }

    pub fn stop(&self) -> radix_engine::StopConfig {
        radix_engine::StopConfig {
            max_tokens: self.max_tokens,
            stop_strings: self.stop.clone(),
            stop_token_ids: self.stop_token_id.clone(),
            ignore_eos: self.ignore_eos,
        }
    }
}
