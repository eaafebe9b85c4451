//! Model and engine options shared by `generate`, `serve` and `bench offline`.

use std::sync::Arc;

use clap::{Args, ValueEnum};
use radix_engine::{Engine, EngineConfig, SparseConfig};
use radix_model::cuda::MemoryLimits;
use radix_model::{Backend, CpuBackend, CudaBackend, ModelSource, TpShard};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// CUDA when a GPU is found, else the CPU.
    Auto,
    /// The CPU backend (runs anywhere).
    Cpu,
    /// An NVIDIA GPU (GPU 0).
    Cuda,
}

impl Device {
    /// `Auto` made concrete.
    pub fn resolve(self) -> Device {
        match self {
            Device::Auto if radix_gpu::Device::count().unwrap_or(0) > 0 => Device::Cuda,
            Device::Auto => Device::Cpu,
            d => d,
        }
    }
}

/// Where tools/fetch_smollm2.sh puts SmolLM2-135M-Instruct (from the repository root).
pub const FETCHED_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The model when `--model` is not given: SmolLM2 once tools/fetch_smollm2.sh has
/// fetched it, else synthetic:tiny.
pub fn default_model() -> String {
    if std::path::Path::new(FETCHED_MODEL).is_file() {
        FETCHED_MODEL.into()
    } else {
        "synthetic:tiny".into()
    }
}

/// A `--model` argument made loadable: a Hub model (`ORG/NAME...`, see `hub`) is fetched
/// into the Hugging Face cache and its local path returned, with the name clients should
/// see; paths and synthetic:NAME pass through (`ModelSource::open` names any problem).
pub fn resolve_model(spec: &str) -> anyhow::Result<(String, Option<String>)> {
    if spec.starts_with("synthetic:") || std::path::Path::new(spec).exists() {
        return Ok((spec.to_string(), None));
    }
    match crate::hub::HubModel::parse(spec) {
        Some(model) => {
            let path = crate::hub::fetch(&model, &crate::hub::HubConfig::from_env())?;
            Ok((path.to_string_lossy().into_owned(), Some(spec.to_string())))
        }
        None => Ok((spec.to_string(), None)),
    }
}

/// Opens a `--model` argument (fetching it from the Hub if it names a Hub model).
pub fn open_model(spec: &str) -> anyhow::Result<ModelSource> {
    let (path, hub_name) = resolve_model(spec)?;
    let mut source = ModelSource::open(&path)?;
    if let Some(name) = hub_name {
        source.name = name;
    }
    Ok(source)
}

#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// A Hugging Face model folder, a .gguf file, a Hugging Face Hub model
    /// (ORG/NAME[@REVISION], or ORG/NAME/FILE.gguf[@REVISION] for one GGUF file), or
    /// synthetic:tiny / synthetic:llama3-8b. Default: models/SmolLM2-135M-Instruct.Q4_1.gguf
    /// when tools/fetch_smollm2.sh has fetched it, else synthetic:tiny.
    #[arg(long)]
    pub model: Option<String>,
    /// Where the model runs.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: Device,
    /// Tokens per KV page.
    #[arg(long, default_value_t = 16)]
    pub page_size: usize,
    /// KV pages in the pool (default: CPU 4096; CUDA what --mem-fraction leaves).
    #[arg(long)]
    pub kv_pages: Option<usize>,
    /// CUDA: fraction of GPU memory for weights, activations and the KV pool together.
    #[arg(long, default_value_t = 0.85, visible_aliases = ["gpu-memory-utilization", "mem-fraction-static"])]
    pub mem_fraction: f64,
    /// Tokens computed per step at most (default: CPU 2048, CUDA 8192).
    #[arg(long, visible_alias = "max-num-batched-tokens")]
    pub max_batched_tokens: Option<usize>,
    /// Requests running at once at most (default: CPU 64, CUDA 1024).
    #[arg(long, visible_alias = "max-num-seqs")]
    pub max_running: Option<usize>,
    /// Requests waiting at most (more get 429).
    #[arg(long, default_value_t = 1024)]
    pub max_waiting: usize,
    /// Longest prompt + output (default: the model's).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Turn off prefix reuse through the radix cache.
    #[arg(long, visible_aliases = ["no-enable-prefix-caching", "disable-radix-cache"])]
    pub no_prefix_cache: bool,
    /// Compute each prompt in one step instead of chunks.
    #[arg(long)]
    pub no_chunked_prefill: bool,
    /// Splits the model over this many ranks (tensor parallelism; vLLM's flag, `-tp` too):
    /// on the CPU, threads of this process; on CUDA, one GPU each. The attention head
    /// count must be a multiple of it.
    #[arg(long, visible_alias = "tp", default_value_t = 1)]
    pub tensor_parallel_size: usize,
    /// CUDA: run every step eagerly, without CUDA graphs for decode.
    #[arg(long, visible_alias = "enforce-eager")]
    pub disable_cuda_graphs: bool,
    /// Weight quantization (vLLM's flag): `fp8` quantizes the linear layers' weights to FP8
    /// e4m3 per output channel at load. FP8 checkpoints (`quantization_config` of
    /// `fp8` or FP8 `compressed-tensors`) are recognised without it. On GPUs with FP8
    /// tensor cores (sm_89 and later) the layers run as FP8 GEMMs; elsewhere (or with
    /// `RADIX_SPARSE_FP8_GEMM=0`) dequantized to bf16.
    #[arg(long, value_enum)]
    pub quantization: Option<Quantization>,
    /// KV cache element type (vLLM's flag): `auto` and `bf16` are the 16-bit cache (f32 on
    /// the CPU); `fp8` / `fp8_e4m3` keep keys and values as e4m3 with the checkpoint's
    /// per-layer `k_scale`/`v_scale` (else 1.0): on the CPU, and on one GPU (sm_89 and
    /// later).
    #[arg(long, value_enum, default_value = "auto")]
    pub kv_cache_dtype: KvCacheDtype,
    #[command(flatten)]
    pub sparse: SparseArgs,
}

/// `--quantization` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantization {
    Fp8,
}

/// `--kv-cache-dtype` values, with vLLM's names.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvCacheDtype {
    Auto,
    #[value(alias = "bfloat16")]
    Bf16,
    Fp8,
    #[value(name = "fp8_e4m3")]
    Fp8E4m3,
}

/// Query-aware sparse paging (Quest) for long-context decode.
#[derive(Args, Clone, Debug)]
pub struct SparseArgs {
    /// Turns sparse paging on with this default budget: a fraction of each sequence's
    /// pages in (0, 1] (1 = dense) or a token count above 1. Requests may set their own
    /// (`sparse_budget`). Off by default: no key bounds are kept.
    #[arg(long)]
    pub sparse_budget: Option<radix_kv::SparseBudget>,
    /// Sparse paging: the first layers attend densely.
    #[arg(long, default_value_t = radix_kv::SparsePolicy::default().dense_layers)]
    pub sparse_dense_layers: usize,
    /// Sparse paging: contexts shorter than this attend densely.
    #[arg(long, default_value_t = radix_kv::SparsePolicy::default().min_context_tokens)]
    pub sparse_min_context: usize,
    /// Sparse paging: leading pages always kept (attention sinks).
    #[arg(long, default_value_t = radix_kv::SparsePolicy::default().sink_pages)]
    pub sparse_sink_pages: usize,
    /// Sparse paging: trailing pages always kept (recent tokens).
    #[arg(long, default_value_t = radix_kv::SparsePolicy::default().window_pages)]
    pub sparse_window_pages: usize,
}

impl SparseArgs {
    pub fn config(&self) -> Option<SparseConfig> {
        self.sparse_budget.map(|budget| SparseConfig { budget, policy: self.policy() })
    }

    pub fn policy(&self) -> radix_kv::SparsePolicy {
        radix_kv::SparsePolicy {
            sink_pages: self.sparse_sink_pages,
            window_pages: self.sparse_window_pages,
            min_context_tokens: self.sparse_min_context,
            dense_layers: self.sparse_dense_layers,
        }
    }
}

impl ModelArgs {
    /// The engine limits for `device` (already resolved) and a KV pool of `num_pages`.
    pub fn engine_config(&self, device: Device, num_pages: usize) -> EngineConfig {
        let gpu = device == Device::Cuda;
        EngineConfig {
            page_size: self.page_size,
            num_pages,
            max_batched_tokens: self.max_batched_tokens.unwrap_or(if gpu { 8192 } else { 2048 }),
            max_running: self.max_running.unwrap_or(if gpu { 1024 } else { 64 }),
            max_waiting: self.max_waiting,
            prefix_cache: !self.no_prefix_cache,
            chunked_prefill: !self.no_chunked_prefill,
            max_model_len: self.max_model_len,
            sparse: self.sparse.config(),
        }
    }

    /// What the engine will ask of each GPU (its memory plan's input).
    pub fn memory_limits(&self) -> MemoryLimits {
        let limits = self.engine_config(Device::Cuda, 0);
        MemoryLimits {
            max_batched_tokens: limits.max_batched_tokens,
            max_running: limits.max_running,
            page_size: self.page_size,
            sparse: limits.sparse.is_some(),
            cuda_graphs: !self.disable_cuda_graphs,
            mem_fraction: self.mem_fraction,
            kv_pages: self.kv_pages,
        }
    }

    /// Loads the model onto the chosen device and builds the engine.
    pub fn build_engine(&self) -> anyhow::Result<BuiltEngine> {
        let loaded = self.load_runner()?;
        let engine = Engine::new(
            loaded.runner,
            Arc::new(loaded.tokenizer),
            self.engine_config(loaded.device, loaded.num_pages),
        )?;
        tracing::info!(
            model = %loaded.name,
            backend = %engine.runner().backend_name(),
            kv_pages = loaded.num_pages,
            kv_tokens = loaded.num_pages * self.page_size,
            max_model_len = engine.max_model_len(),
            "engine ready"
        );
        Ok(BuiltEngine { engine, name: loaded.name, chat_template: loaded.chat_template })
    }

    /// Whether the KV cache is FP8 (`--kv-cache-dtype fp8` / `fp8_e4m3`).
    pub fn fp8_kv_cache(&self) -> bool {
        matches!(self.kv_cache_dtype, KvCacheDtype::Fp8 | KvCacheDtype::Fp8E4m3)
    }

    /// Loads the model onto the chosen device and sizes its KV pool.
    pub fn load_runner(&self) -> anyhow::Result<LoadedRunner> {
        let spec = self.model.clone().unwrap_or_else(default_model);
        let fp8_kv = self.fp8_kv_cache();
        let device = self.device.resolve();
        let tp = self.tensor_parallel_size;
        if fp8_kv && tp > 1 {
            anyhow::bail!(
                "--kv-cache-dtype {}: the FP8 KV cache runs on one rank (one GPU, or the CPU \
                 backend); --kv-cache-dtype auto keeps it 16-bit",
                clap::ValueEnum::to_possible_value(&self.kv_cache_dtype)
                    .map_or_else(String::new, |v| v.get_name().to_string())
            );
        }
        let mut source = open_model(&spec)?;
        if self.quantization == Some(Quantization::Fp8) {
            source = source.quantize_fp8()?;
            tracing::info!(model = %source.name, "--quantization fp8: linear weights quantized to FP8 per channel at load");
        }
        // Before any weight is read: a size the model cannot take is named at once.
        TpShard::check(tp, &source.config)
            .map_err(|e| anyhow::anyhow!("--tensor-parallel-size {tp}: {e}"))?;
        let (runner, num_pages): (Box<dyn radix_engine::Runner>, usize) = match device {
            Device::Cuda if tp > 1 => {
                tracing::info!(model = %source.name, ranks = tp, "loading, tensor-parallel on {tp} GPUs");
                let group = radix_model::tp::cuda_model(
                    &source.config,
                    source.weights.as_ref(),
                    tp,
                    &self.memory_limits(),
                )
                .map_err(|e| anyhow::anyhow!("--tensor-parallel-size {tp} on CUDA: {e}"))?;
                (Box::new(group.model), group.kv_pages)
            }
            Device::Cuda => {
                let mut backend = CudaBackend::new(0)?;
                if fp8_kv {
                    backend.set_kv_cache_fp8(fp8_kv_scales(&source)?)?;
                }
                let mut model = source.load(backend)?;
                let plan = model.backend.plan_memory(&model.local, &self.memory_limits())?;
                plan.log();
                (Box::new(model), plan.kv_pages)
            }
            _ if tp > 1 => {
                tracing::info!(model = %source.name, ranks = tp, "loading, tensor-parallel on CPU threads");
                let group =
                    radix_model::tp::cpu_model(&source.config, source.weights.as_ref(), tp)?;
                (Box::new(group), self.kv_pages.unwrap_or(4096))
            }
            _ => {
                let mut backend = CpuBackend::new();
                if fp8_kv {
                    backend.set_kv_cache_fp8(fp8_kv_scales(&source)?)?;
                }
                (Box::new(source.load(backend)?), self.kv_pages.unwrap_or(4096))
            }
        };
        let fp8_weights = source.quantization.is_some();
        let ModelSource { name, tokenizer, chat_template, .. } = source;
        Ok(LoadedRunner { runner, num_pages, device, name, tokenizer, chat_template, fp8_weights })
    }
}

/// The FP8 KV cache's per-layer scales: the checkpoint's, else 1.0 with a warning (as
/// vLLM does).
fn fp8_kv_scales(source: &ModelSource) -> anyhow::Result<radix_model::fp8::KvScales> {
    use radix_model::fp8::KvScales;
    let layers = source.config.num_layers;
    Ok(match KvScales::from_checkpoint(source.weights.as_ref(), layers)? {
        Some(s) => {
            tracing::info!(model = %source.name, "FP8 KV cache with the checkpoint's per-layer scales");
            s
        }
        None => {
            tracing::warn!(
                model = %source.name,
                "FP8 KV cache without scales in the checkpoint: using 1.0 for every layer \
                 (keys or values beyond ±448 saturate)"
            );
            KvScales::ones(layers)
        }
    })
}

/// A model loaded on a device, before an engine wraps it.
pub struct LoadedRunner {
    pub runner: Box<dyn radix_engine::Runner>,
    pub num_pages: usize,
    pub device: Device,
    pub name: String,
    pub tokenizer: radix_model::Tokenizer,
    pub chat_template: radix_model::ChatTemplate,
    /// The linear layers hold FP8 weights (an FP8 checkpoint or `--quantization fp8`).
    pub fp8_weights: bool,
}

/// An engine with what clients need besides it.
pub struct BuiltEngine {
    pub engine: Engine,
    /// The model name clients use.
    pub name: String,
    pub chat_template: radix_model::ChatTemplate,
}

/// Sampling and stop options of `generate` (the OpenAI fields of the same names).
/// Negative numbers are values, not flags (`--temperature -1` is refused as a
/// temperature, `--frequency-penalty -0.5` is taken).
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Softmax temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches this, in (0, 1].
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Sample among the k most likely tokens; 0 or -1: all.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub top_k: i64,
    /// Drop tokens less likely than this fraction of the most likely one, in [0, 1].
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub min_p: f32,
    /// Divides the logits of tokens already in the prompt or output (> 0; 1 is off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f32,
    /// Subtracted per earlier occurrence of a token in the output, in [-2, 2].
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// Subtracted once from tokens already in the output, in [-2, 2].
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// Fixes the random numbers: the same seed samples the same tokens.
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
    /// The sampling parameters, checked (the message names the flag's value).
    pub fn params(&self) -> anyhow::Result<radix_model::SamplingParams> {
        anyhow::ensure!(self.top_k >= -1, "--top-k must be -1, 0 (off) or positive");
        let params = radix_model::SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: usize::try_from(self.top_k).unwrap_or(0),
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            seed: self.seed,
            logit_bias: Vec::new(),
        };
        params.validate().map_err(|e| anyhow::anyhow!("sampling flags: {e}"))?;
        Ok(params)
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
