//! The CUDA backend: bf16 weights and activations, f32 logits; cuBLASLt GEMMs, our
//! attention (prefill and paged decode in one launch per layer), KV append with RoPE, and
//! the small ops and the sampler from radix-kernels. Mirrors the CPU backend op by op.

use half::bf16;
use radix_gpu::{BLayout, Device, DeviceBuffer, Gemm, Jit};
use radix_kernels::attention::{AttentionBatch, AttentionShape, BatchMeta, KvSource};
use radix_kernels::kv_append::{self, AppendBatch, AppendInputs, PoolShape};
use radix_kernels::ops::{self, SampleRow};

use crate::backend::{Activation, Backend, StepInput};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::sampling::{self, SampleRequest, Sampled};
use crate::tensor::{HostData, HostTensor};

/// A bf16 activation `[rows, cols]` on the GPU.
pub struct GpuAct {
    pub buf: DeviceBuffer<bf16>,
    pub rows: usize,
    pub cols: usize,
}

impl Activation for GpuAct {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
}

/// A bf16 weight `[rows, cols]` (a vector is one row).
pub struct GpuWeight {
    pub buf: DeviceBuffer<bf16>,
    pub rows: usize,
    pub cols: usize,
}

/// What `begin_step` uploads for the ops of one step.
struct StepState {
    tokens: DeviceBuffer<i32>,
    logit_rows: DeviceBuffer<i32>,
    num_logit_rows: usize,
    append: AppendInputs,
    attention: AttentionBatch,
}

/// GPU time per op category, from events around every op (when profiling is on).
#[derive(Clone, Debug, Default)]
pub struct OpTimes {
    pub gemm_ms: f64,
    pub attention_ms: f64,
    pub kv_append_ms: f64,
    pub norm_ms: f64,
    pub other_ms: f64,
    pub sample_ms: f64,
}

impl OpTimes {
    pub fn total_ms(&self) -> f64 {
        self.gemm_ms
            + self.attention_ms
            + self.kv_append_ms
            + self.norm_ms
            + self.other_ms
            + self.sample_ms
    }
}

#[derive(Clone, Copy)]
enum Op {
    Gemm,
    Attention,
    KvAppend,
    Norm,
    Other,
    Sample,
}

/// Events recorded around ops of the current step; resolved after the step syncs.
struct Profiler {
    pending: Vec<(Op, radix_gpu::GpuTimer)>,
    spare: Vec<radix_gpu::GpuTimer>,
    times: OpTimes,
}

pub struct CudaBackend {
    profiler: Option<Profiler>,
    device: Device,
    jit: Jit,
    gemm: Gemm,
    /// The KV pool's shape (and the heads appended to it), once `init_kv` ran.
    pool: Option<PoolShape>,
    inv_freq: Vec<f32>,
    kv: Vec<(DeviceBuffer<bf16>, DeviceBuffer<bf16>)>,
    step: Option<StepState>,
    logits: Option<DeviceBuffer<f32>>,
    logit_shape: (usize, usize),
}

impl CudaBackend {
    /// Opens GPU `ordinal`; kernels compile (or come from the cache) on first use.
    pub fn new(ordinal: usize) -> Result<Self> {
        let device = Device::open(ordinal)?;
        let gemm = Gemm::new(&device)?;
        Ok(Self {
            profiler: None,
            device,
            jit: Jit::with_default_cache(),
            gemm,
            pool: None,
            inv_freq: Vec::new(),
            kv: Vec::new(),
            step: None,
            logits: None,
            logit_shape: (0, 0),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Turns per-op GPU timing on (events around every op; adds a little overhead).
    pub fn set_profiling(&mut self, on: bool) {
        self.profiler = on.then(|| Profiler {
            pending: Vec::new(),
            spare: Vec::new(),
            times: OpTimes::default(),
        });
    }

    /// GPU time per op category since profiling was turned on.
    pub fn op_times(&self) -> Option<OpTimes> {
        self.profiler.as_ref().map(|p| p.times.clone())
    }

    /// Runs `f` between two timing events when profiling (the caller's op is `op`).
    fn timed<T>(&mut self, op: Op, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let Some(mut prof) = self.profiler.take() else { return f(self) };
        let timer = match prof.spare.pop() {
            Some(t) => t,
            None => radix_gpu::GpuTimer::new(&self.device)?,
        };
        timer.start()?;
        let out = f(self);
        timer.record_stop()?;
        prof.pending.push((op, timer));
        self.profiler = Some(prof);
        out
    }

    /// Adds up the events of the ops since the last call (after the stream synced).
    fn collect_times(&mut self) -> Result<()> {
        if let Some(prof) = &mut self.profiler {
            for (op, timer) in prof.pending.drain(..) {
                let ms = timer.elapsed_ms()? as f64;
                let t = &mut prof.times;
                *match op {
                    Op::Gemm => &mut t.gemm_ms,
                    Op::Attention => &mut t.attention_ms,
                    Op::KvAppend => &mut t.kv_append_ms,
                    Op::Norm => &mut t.norm_ms,
                    Op::Other => &mut t.other_ms,
                    Op::Sample => &mut t.sample_ms,
                } += ms;
                prof.spare.push(timer);
            }
        }
        Ok(())
    }

    /// Bytes of KV one page takes over all layers (K and V, bf16).
    pub fn kv_bytes_per_page(cfg: &ModelConfig, page_size: usize) -> usize {
        2 * cfg.num_layers * cfg.num_kv_heads * page_size * cfg.head_dim * 2
    }

    fn pool(&self) -> Result<PoolShape> {
        self.pool.ok_or_else(|| ModelError::Invalid("the KV pool is not initialised".into()))
    }

    fn step(&self) -> Result<&StepState> {
        self.step.as_ref().ok_or_else(|| ModelError::Invalid("no step has begun".into()))
    }

    fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
        if cond { Ok(()) } else { Err(ModelError::Invalid(msg())) }
    }
}

fn to_bf16(data: &HostData) -> Vec<bf16> {
    match data {
        HostData::BF16(v) => v.clone(),
        HostData::F16(v) => v.iter().map(|x| bf16::from_f32(x.to_f32())).collect(),
        HostData::F32(v) => v.iter().map(|&x| bf16::from_f32(x)).collect(),
    }
}

impl Backend for CudaBackend {
    type Act = GpuAct;
    type Weight = GpuWeight;

    fn name(&self) -> String {
        format!("cuda ({})", self.device.info().name)
    }

    fn upload(&mut self, t: &HostTensor) -> Result<GpuWeight> {
        let (rows, cols) = t.matrix_dims();
        Ok(GpuWeight { buf: self.device.upload(&to_bf16(&t.data))?, rows, cols })
    }

    fn init_kv(&mut self, cfg: &ModelConfig, num_pages: usize, page_size: usize) -> Result<()> {
        Self::check(matches!(cfg.head_dim, 64 | 128), || {
            format!(
                "the CUDA attention kernels take head_dim 64 or 128, this model has {}",
                cfg.head_dim
            )
        })?;
        let per_layer = num_pages * cfg.num_kv_heads * page_size * cfg.head_dim;
        self.kv.clear();
        for _ in 0..cfg.num_layers {
            self.kv
                .push((self.device.alloc_zeros(per_layer)?, self.device.alloc_zeros(per_layer)?));
        }
        self.pool = Some(PoolShape {
            num_pages,
            page_size,
            num_qo_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        });
        self.inv_freq = cfg.rope.inv_freq();
        Ok(())
    }

    fn begin_step(&mut self, s: &StepInput) -> Result<()> {
        let pool = self.pool()?;
        let n = s.tokens.len();
        Self::check(s.positions.len() == n && s.slots.len() == n, || {
            "step: positions/slots do not match tokens".into()
        })?;
        Self::check(s.logit_rows.iter().all(|&r| (r as usize) < n), || {
            "a logit row is past the step's tokens".into()
        })?;
        let append = AppendInputs::upload(
            &self.device,
            &pool,
            &AppendBatch { positions: s.positions, slots: s.slots },
            &self.inv_freq,
        )?;
        let meta = BatchMeta::new(
            s.qo_indptr.to_vec(),
            KvSource::Paged {
                page_size: pool.page_size,
                num_pages: pool.num_pages,
                kv_indptr: s.kv_indptr.to_vec(),
                kv_indices: s.kv_indices.to_vec(),
                kv_last_page_len: s.kv_last_page_len.to_vec(),
            },
            true,
        )?;
        let shape = AttentionShape::new(pool.num_qo_heads, pool.num_kv_heads, pool.head_dim, true);
        let attention = AttentionBatch::new(&self.device, shape, meta, None)?;
        let ids: Vec<i32> = s.tokens.iter().map(|&t| t as i32).collect();
        let rows: Vec<i32> = s.logit_rows.iter().map(|&r| r as i32).collect();
        let up = |v: &[i32]| self.device.upload(if v.is_empty() { &[0] } else { v });
        self.step = Some(StepState {
            tokens: up(&ids)?,
            logit_rows: up(&rows)?,
            num_logit_rows: rows.len(),
            append,
            attention,
        });
        Ok(())
    }

    fn act(&mut self, rows: usize, cols: usize) -> Result<GpuAct> {
        Ok(GpuAct { buf: self.device.alloc((rows * cols).max(1))?, rows, cols })
    }

    fn embed(&mut self, table: &GpuWeight, out: &mut GpuAct) -> Result<()> {
        Self::check(out.cols == table.cols, || "embed: shape mismatch".into())?;
        self.timed(Op::Other, |b| {
            let st = b.step()?;
            Ok(ops::embed(&b.jit, &table.buf, &st.tokens, out.rows, out.cols, &mut out.buf)?)
        })
    }

    fn rms_norm(&mut self, x: &GpuAct, w: &GpuWeight, eps: f32, out: &mut GpuAct) -> Result<()> {
        Self::check(x.rows == out.rows && x.cols == out.cols, || {
            "rms_norm: shape mismatch".into()
        })?;
        self.timed(Op::Norm, |b| {
            Ok(ops::rms_norm(&b.jit, &x.buf, &w.buf, x.rows, x.cols, eps, &mut out.buf)?)
        })
    }

    fn add_rms_norm(
        &mut self,
        residual: &mut GpuAct,
        delta: &GpuAct,
        w: &GpuWeight,
        eps: f32,
        out: &mut GpuAct,
    ) -> Result<()> {
        Self::check(residual.rows == delta.rows && residual.cols == delta.cols, || {
            "add_rms_norm: shape mismatch".into()
        })?;
        let (rows, cols) = (residual.rows, residual.cols);
        self.timed(Op::Norm, |b| {
            Ok(ops::add_rms_norm(
                &b.jit,
                &mut residual.buf,
                &delta.buf,
                &w.buf,
                rows,
                cols,
                eps,
                &mut out.buf,
            )?)
        })
    }

    fn linear(
        &mut self,
        x: &GpuAct,
        w: &GpuWeight,
        bias: Option<&GpuWeight>,
        out: &mut GpuAct,
    ) -> Result<()> {
        Self::check(x.cols == w.cols && out.rows == x.rows && out.cols == w.rows, || {
            format!(
                "linear: x [{}, {}] · w [{}, {}]ᵀ into [{}, {}]",
                x.rows, x.cols, w.rows, w.cols, out.rows, out.cols
            )
        })?;
        if x.rows == 0 {
            return Ok(());
        }
        self.timed(Op::Gemm, |b| {
            let bias = bias.map(|w| &w.buf);
            Ok(b.gemm.matmul::<bf16, bf16>(
                x.rows,
                w.rows,
                w.cols,
                &x.buf,
                &w.buf,
                BLayout::NK,
                bias,
                0.0,
                &mut out.buf,
            )?)
        })
    }

    fn rope_append(&mut self, layer: usize, qkv: &GpuAct, q: &mut GpuAct) -> Result<()> {
        let pool = self.pool()?;
        self.timed(Op::KvAppend, |b| {
            let st =
                b.step.as_ref().ok_or_else(|| ModelError::Invalid("no step has begun".into()))?;
            let (k, v) =
                b.kv.get_mut(layer)
                    .ok_or_else(|| ModelError::Invalid(format!("layer {layer} has no KV pool")))?;
            Ok(kv_append::append(&b.jit, &pool, &st.append, &qkv.buf, &mut q.buf, k, v, None)?)
        })
    }

    fn attention(&mut self, layer: usize, q: &GpuAct, out: &mut GpuAct) -> Result<()> {
        self.timed(Op::Attention, |b| {
            let st = b.step()?;
            let (k, v) =
                b.kv.get(layer)
                    .ok_or_else(|| ModelError::Invalid(format!("layer {layer} has no KV pool")))?;
            Ok(st.attention.run(&b.jit, &q.buf, k, v, &mut out.buf, None)?)
        })
    }

    fn silu_mul(&mut self, gate_up: &GpuAct, out: &mut GpuAct) -> Result<()> {
        Self::check(gate_up.cols == 2 * out.cols && gate_up.rows == out.rows, || {
            "silu_mul: shape mismatch".into()
        })?;
        self.timed(Op::Other, |b| {
            Ok(ops::silu_mul(&b.jit, &gate_up.buf, out.rows, out.cols, &mut out.buf)?)
        })
    }

    fn gather_logit_rows(&mut self, x: &GpuAct, out: &mut GpuAct) -> Result<()> {
        Self::check(out.rows == self.step()?.num_logit_rows && out.cols == x.cols, || {
            "gather: shape mismatch".into()
        })?;
        self.timed(Op::Other, |b| {
            let st = b.step()?;
            Ok(ops::gather_rows(&b.jit, &x.buf, &st.logit_rows, out.rows, x.cols, &mut out.buf)?)
        })
    }

    fn logits(&mut self, x: &GpuAct, head: &GpuWeight) -> Result<()> {
        Self::check(x.cols == head.cols, || "logits: shape mismatch".into())?;
        let mut logits = self.device.alloc::<f32>(x.rows * head.rows)?;
        self.timed(Op::Gemm, |b| {
            Ok(b.gemm.matmul::<bf16, f32>(
                x.rows,
                head.rows,
                head.cols,
                &x.buf,
                &head.buf,
                BLayout::NK,
                None,
                0.0,
                &mut logits,
            )?)
        })?;
        self.logits = Some(logits);
        self.logit_shape = (x.rows, head.rows);
        Ok(())
    }

    fn sample(&mut self, requests: &[SampleRequest]) -> Result<Vec<Sampled>> {
        let (rows, vocab) = self.logit_shape;
        Self::check(self.logits.is_some(), || "sample before logits".into())?;
        Self::check(requests.len() == rows, || {
            format!("sample: {} requests for {rows} logits rows", requests.len())
        })?;
        let words: Vec<u32> = requests
            .iter()
            .flat_map(|r| {
                let p = r.params;
                SampleRow {
                    temperature: if p.is_greedy() { 0.0 } else { p.temperature },
                    top_p: p.top_p,
                    min_p: p.min_p,
                    top_k: p.top_k.min(i32::MAX as usize) as i32,
                    seed: r.seed,
                    index: r.index,
                }
                .words()
            })
            .collect();
        let params = self.device.upload(&words)?;
        let mut tokens = self.device.alloc::<i32>(rows)?;
        let mut logprobs = self.device.alloc::<f32>(rows)?;
        let logits = self.logits.take().expect("checked above");
        let sampled = self.timed(Op::Sample, |b| {
            Ok(ops::sample_rows(&b.jit, &logits, &params, rows, vocab, &mut tokens, &mut logprobs)?)
        });
        self.logits = Some(logits);
        sampled?;
        let tokens = tokens.to_vec()?;
        let logprobs = logprobs.to_vec()?;
        self.collect_times()?;
        let logits = self.logits.as_ref().expect("put back above");
        let mut out: Vec<Sampled> = tokens
            .iter()
            .zip(&logprobs)
            .map(|(&t, &l)| Sampled { token: t as u32, logprob: l })
            .collect();
        // Penalties need the request's token counts: those rows are sampled on the host.
        if requests.iter().any(|r| r.params.has_penalties()) {
            let host = logits.to_vec()?;
            for (i, r) in requests.iter().enumerate().filter(|(_, r)| r.params.has_penalties()) {
                let mut row = host[i * vocab..(i + 1) * vocab].to_vec();
                out[i] = sampling::sample(&mut row, r);
            }
        }
        Ok(out)
    }

    fn read_logits(&mut self) -> Result<Vec<f32>> {
        match &self.logits {
            Some(l) => Ok(l.to_vec()?),
            None => Ok(Vec::new()),
        }
    }
}
