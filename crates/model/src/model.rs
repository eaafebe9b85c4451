//! The Llama forward pass, written once over `Backend` ops.

use crate::backend::{Backend, LinearInput, Step, StepMode, StepRun};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::sampling::{SampleRequest, Sampled};
use crate::tensor::HostTensor;
use crate::tp::TpShard;
use crate::weights::WeightSource;

/// One decoder layer's weights, projections fused: q|k|v and gate|up.
pub struct LayerWeights<W> {
    pub input_norm: W,
    pub qkv: W,
    pub qkv_bias: Option<W>,
    pub o_proj: W,
    pub post_norm: W,
    pub gate_up: W,
    pub down: W,
}

pub struct ModelWeights<W> {
    pub embed: W,
    pub layers: Vec<LayerWeights<W>>,
    pub final_norm: W,
    /// `None` when tied to the embedding, and on a tensor-parallel rank that computes no
    /// logits (`TpShard::computes_logits`).
    pub lm_head: Option<W>,
}

/// A model on a backend: config, weights and the backend that runs it. Under tensor
/// parallelism (`Backend::shard`), one rank of it: its slices of the weights, and
/// `local` the shapes they have.
pub struct LlamaModel<B: Backend> {
    /// The whole model's config (vocabulary, context, stop tokens, shapes).
    pub config: ModelConfig,
    /// The shapes this rank computes (`TpShard::local_config`; `config` at size 1).
    pub local: ModelConfig,
    pub shard: TpShard,
    pub backend: B,
    pub weights: ModelWeights<B::Weight>,
}

impl<B: Backend> LlamaModel<B> {
    /// Reads every tensor from `source` (HF names), keeps the backend's rank's slices of
    /// them (`Backend::shard`: column-parallel q|k|v and gate|up by rows, row-parallel O
    /// and down by columns), fuses q|k|v and gate|up, uploads them. `progress` is called
    /// with (tensors done, total).
    pub fn load(
        config: ModelConfig,
        mut backend: B,
        source: &dyn WeightSource,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let shard = backend.shard();
        let local = shard.local_config(&config)?;
        let c = &config;
        let (h, q, kv, inter) = (c.hidden_size, c.q_size(), c.kv_size(), c.intermediate_size);
        // This rank's rows of q, k|v and gate|up (and columns of O and down).
        let d = c.head_dim;
        let scale = |r: std::ops::Range<usize>| r.start * d..r.end * d;
        let (q_rows, kv_rows) = (scale(shard.q_heads(c)), scale(shard.kv_heads(c)));
        let mlp_rows = shard.intermediate(c);
        let head = !c.tie_word_embeddings && shard.computes_logits();
        let total = 2 + c.num_layers + usize::from(head);
        let mut done = 0;
        let mut tick = |n: &mut usize| {
            *n += 1;
            progress(*n, total);
        };
        let embed =
            backend.upload(&source.tensor("model.embed_tokens.weight", &[c.vocab_size, h])?)?;
        tick(&mut done);
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let t = |name: &str, shape: &[usize]| source.tensor(&format!("{p}.{name}"), shape);
            let qkv = HostTensor::stack_rows(&[
                &t("self_attn.q_proj.weight", &[q, h])?.slice_rows(q_rows.clone()),
                &t("self_attn.k_proj.weight", &[kv, h])?.slice_rows(kv_rows.clone()),
                &t("self_attn.v_proj.weight", &[kv, h])?.slice_rows(kv_rows.clone()),
            ]);
            let qkv_bias = if c.qkv_bias {
                let b = HostTensor::stack_rows(&[
                    &t("self_attn.q_proj.bias", &[q])?.slice_rows(q_rows.clone()),
                    &t("self_attn.k_proj.bias", &[kv])?.slice_rows(kv_rows.clone()),
                    &t("self_attn.v_proj.bias", &[kv])?.slice_rows(kv_rows.clone()),
                ]);
                Some(backend.upload(&b)?)
            } else {
                None
            };
            let gate_up = HostTensor::stack_rows(&[
                &t("mlp.gate_proj.weight", &[inter, h])?.slice_rows(mlp_rows.clone()),
                &t("mlp.up_proj.weight", &[inter, h])?.slice_rows(mlp_rows.clone()),
            ]);
            let o_proj = t("self_attn.o_proj.weight", &[h, q])?.slice_cols(q_rows.clone());
            let down = t("mlp.down_proj.weight", &[h, inter])?.slice_cols(mlp_rows.clone());
            layers.push(LayerWeights {
                input_norm: backend.upload(&t("input_layernorm.weight", &[h])?)?,
                qkv: backend.upload(&qkv)?,
                qkv_bias,
                o_proj: backend.upload(&o_proj)?,
                post_norm: backend.upload(&t("post_attention_layernorm.weight", &[h])?)?,
                gate_up: backend.upload(&gate_up)?,
                down: backend.upload(&down)?,
            });
            tick(&mut done);
        }
        let final_norm = backend.upload(&source.tensor("model.norm.weight", &[h])?)?;
        tick(&mut done);
        let lm_head = if !head {
            None
        } else {
            if !source.contains("lm_head.weight") {
                return Err(ModelError::Weights(
                    "lm_head.weight is missing and tie_word_embeddings is false".into(),
                ));
            }
            let w = backend.upload(&source.tensor("lm_head.weight", &[c.vocab_size, h])?)?;
            tick(&mut done);
            Some(w)
        };
        let weights = ModelWeights { embed, layers, final_norm, lm_head };
        Ok(Self { config, local, shard, backend, weights })
    }

    /// Allocates the backend's KV pool for this rank's kv heads.
    pub fn init_kv(&mut self, spec: &crate::backend::KvPoolSpec) -> Result<radix_kv::KvGeometry> {
        self.backend.init_kv(&self.local, spec)
    }

    /// Runs one step up to the logits of the step's logit rows (kept by the backend).
    pub fn forward(&mut self, step: &Step) -> Result<()> {
        if step.num_tokens() == 0 {
            return Ok(());
        }
        let run = self.backend.begin_step(step)?;
        match run.mode {
            StepMode::Replayed => Ok(()),
            StepMode::Eager => self.run_ops(&run),
            StepMode::Record => {
                let recorded = self.run_ops(&run);
                let ended = self.backend.end_step(recorded.is_ok());
                let Err(e) = recorded.and(ended) else { return Ok(()) };
                if self.shard.size > 1 {
                    // The other ranks recorded (or replayed) their collectives: running
                    // them eagerly here would pair an eager collective with a recorded
                    // one, which NCCL forbids. The step fails (the group aborts and
                    // resets); a capture failure of this rank's own turns graphs off.
                    if !matches!(e, ModelError::GroupAborted(_)) {
                        self.backend.disable_graphs(&format!("rank {}: {e}", self.shard.rank));
                    }
                    return Err(e);
                }
                // Nothing of the step ran: run it as it comes instead (its bucket is eager
                // from now on). A real fault of the step shows up again here.
                tracing::warn!("CUDA graph capture failed ({e}); running the step eagerly");
                let run = self.backend.begin_step(step)?;
                match run.mode {
                    StepMode::Eager => self.run_ops(&run),
                    mode => Err(ModelError::Invalid(format!(
                        "backend asked for {mode:?} after a failed capture"
                    ))),
                }
            }
        }
    }

    /// Whether every product of the model runs as `Backend::fused_linear` in a step of
    /// `rows` tokens (one GPU, no q|k|v bias: the residual add stays next to its product).
    pub fn fuses_linear(&self, rows: usize) -> bool {
        let b = &self.backend;
        self.shard.size == 1
            && self.weights.layers.iter().all(|l| {
                l.qkv_bias.is_none()
                    && b.fuses_linear(rows, &l.qkv, true)
                    && b.fuses_linear(rows, &l.o_proj, false)
                    && b.fuses_linear(rows, &l.gate_up, true)
                    && b.fuses_linear(rows, &l.down, true)
            })
    }

    /// `run_ops` with the norms, SiLU·mul and residual adds inside the products
    /// (`fuses_linear`): the products update the residual stream themselves.
    fn run_ops_fused(&mut self, run: &StepRun) -> Result<()> {
        let n = run.tokens;
        let c = &self.local;
        let eps = c.rms_norm_eps;
        let (b, w) = (&mut self.backend, &self.weights);
        let mut residual = b.act(n, c.hidden_size)?;
        let mut qkv = b.act(n, c.qkv_size())?;
        let mut q = b.act(n, c.q_size())?;
        let mut attn = b.act(n, c.q_size())?;
        let mut gate_up = b.act(n, 2 * c.intermediate_size)?;

        b.embed(&w.embed, &mut residual)?;
        for (i, layer) in w.layers.iter().enumerate() {
            let input = LinearInput::RmsNorm { x: &residual, weight: &layer.input_norm, eps };
            b.fused_linear(input, &layer.qkv, &mut qkv, false)?;
            b.rope_append(i, &qkv, &mut q)?;
            b.attention(i, &q, &mut attn)?;
            b.fused_linear(LinearInput::Plain(&attn), &layer.o_proj, &mut residual, true)?;
            let input = LinearInput::RmsNorm { x: &residual, weight: &layer.post_norm, eps };
            b.fused_linear(input, &layer.gate_up, &mut gate_up, false)?;
            b.fused_linear(LinearInput::SiluMul(&gate_up), &layer.down, &mut residual, true)?;
        }
        let rows = run.logit_rows;
        if rows == 0 {
            return Ok(());
        }
        let mut normed = b.act(n, c.hidden_size)?;
        b.rms_norm(&residual, &w.final_norm, eps, &mut normed)?;
        let mut last = b.act(rows, c.hidden_size)?;
        b.gather_logit_rows(&normed, &mut last)?;
        b.logits(&last, w.lm_head.as_ref().unwrap_or(&w.embed))
    }

    /// The ops of one step, after `begin_step` said how it runs.
    fn run_ops(&mut self, run: &StepRun) -> Result<()> {
        if self.fuses_linear(run.tokens) {
            return self.run_ops_fused(run);
        }
        let n = run.tokens;
        let c = &self.local;
        let (b, w) = (&mut self.backend, &self.weights);
        let mut residual = b.act(n, c.hidden_size)?;
        let mut normed = b.act(n, c.hidden_size)?;
        let mut qkv = b.act(n, c.qkv_size())?;
        let mut q = b.act(n, c.q_size())?;
        let mut attn = b.act(n, c.q_size())?;
        let mut delta = b.act(n, c.hidden_size)?;
        let mut gate_up = b.act(n, 2 * c.intermediate_size)?;
        let mut mlp = b.act(n, c.intermediate_size)?;

        b.embed(&w.embed, &mut residual)?;
        for (i, layer) in w.layers.iter().enumerate() {
            if i == 0 {
                b.rms_norm(&residual, &layer.input_norm, c.rms_norm_eps, &mut normed)?;
            } else {
                b.add_rms_norm(
                    &mut residual,
                    &delta,
                    &layer.input_norm,
                    c.rms_norm_eps,
                    &mut normed,
                )?;
            }
            b.linear(&normed, &layer.qkv, layer.qkv_bias.as_ref(), &mut qkv)?;
            b.rope_append(i, &qkv, &mut q)?;
            b.attention(i, &q, &mut attn)?;
            b.linear(&attn, &layer.o_proj, None, &mut delta)?;
            b.all_reduce(&mut delta)?;
            b.add_rms_norm(&mut residual, &delta, &layer.post_norm, c.rms_norm_eps, &mut normed)?;
            b.linear(&normed, &layer.gate_up, None, &mut gate_up)?;
            b.silu_mul(&gate_up, &mut mlp)?;
            b.linear(&mlp, &layer.down, None, &mut delta)?;
            b.all_reduce(&mut delta)?;
        }
        let rows = run.logit_rows;
        if rows == 0 || !self.shard.computes_logits() {
            return Ok(());
        }
        b.add_rms_norm(&mut residual, &delta, &w.final_norm, c.rms_norm_eps, &mut normed)?;
        let mut last = b.act(rows, c.hidden_size)?;
        b.gather_logit_rows(&normed, &mut last)?;
        b.logits(&last, w.lm_head.as_ref().unwrap_or(&w.embed))
    }

    /// Runs the backend's warm-up steps (see `Backend::warm_up_steps`) twice each, and
    /// samples their logits once, so that kernels compile and graphs are captured before
    /// serving; returns how many steps.
    pub fn warm_up(&mut self) -> Result<usize> {
        let steps = self.backend.warm_up_steps();
        let params = crate::sampling::SamplingParams::default();
        let counts = crate::sampling::TokenCounts::default();
        for step in &steps {
            for _ in 0..2 {
                self.forward(step)?;
            }
            let requests: Vec<SampleRequest> = (0..step.logit_rows.len())
                .map(|i| SampleRequest::new(&params, &counts, 0, i as u64))
                .collect();
            self.sample(&requests)?;
        }
        Ok(steps.len())
    }

    /// Samples the logit rows of the last `forward`.
    pub fn sample(&mut self, requests: &[SampleRequest]) -> Result<Vec<Sampled>> {
        if requests.is_empty() || !self.shard.computes_logits() {
            // A step of prefill chunks only (no logits were made), or a rank that makes
            // none.
            return Ok(Vec::new());
        }
        self.backend.sample(requests)
    }

    /// `forward`, then the logits on the host, `[logit_rows.len(), vocab_size]`.
    pub fn forward_logits(&mut self, step: &Step) -> Result<Vec<f32>> {
        if step.logit_rows.is_empty() || step.tokens.is_empty() {
            return Ok(Vec::new());
        }
        self.forward(step)?;
        self.backend.read_logits()
    }
}
