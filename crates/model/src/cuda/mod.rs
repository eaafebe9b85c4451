//! The CUDA backend: bf16 weights and activations (FP8 linear weights where the model has
//! them: see `linear`), f32 logits; cuBLASLt GEMMs, our
//! attention (prefill and paged decode in one launch per layer), KV append with RoPE, and
//! the small ops and the sampler from radix-kernels. Mirrors the CPU backend op by op.
//!
//! Its memory comes in stages (`Memory`): the weights, then the step workspace
//! (`plan_memory`, `memory`), then the KV pool (`init_kv`, `kv_pool`). A step is staged
//! into the workspace in one upload (`staging`); decode steps run as CUDA graphs, one per
//! batch-size bucket (`graphs`). Per-op timing is in `profiler`.
//!
//! Under tensor parallelism (`with_group`) the backend is one rank: GPU `ordinal` of an
//! NCCL group, its slices of the weights, its kv heads in its own pool, its own memory
//! plan and its own graphs; `all_reduce` is NCCL's sum on the backend's stream, so a
//! decode graph captures the collectives with the rest of the step.

mod graphs;
mod kv_pool;
mod memory;
mod profiler;
mod sampler;
mod sparse;
mod staging;
mod workspace;

use std::sync::Arc;

use half::bf16;
use radix_gpu::{BLayout, Device, DeviceBuffer, Gemm, GpuError, Jit, NcclGroup, StagedUploader};
use radix_kernels::fp8 as fp8_acts;
use radix_kernels::fp8::skinny;
use radix_kernels::gemv::{self, StreamWeight, StreamX};
use radix_kernels::kv_append;
use radix_kernels::ops::{self, Fp8Out, SampleRow};
use radix_kernels::sparse as sparse_select;
use radix_kv::{KvDtype, KvGeometry};

pub use self::memory::{MemoryLimits, MemoryPlan, group_kv_pages, kv_pages_left};
pub use self::profiler::OpTimes;

use self::graphs::{DecodeGraphs, GraphKey, scratch_prefill, scratch_step};
use self::kv_pool::{KV_DTYPE, KvPool, LayerData};
use self::profiler::{Op, Profiler};
use self::sampler::{ExtrasBuffers, SamplerPlan};
use self::staging::{StepMeta, StepViews};
use self::workspace::{ActShape, Caps, Workspace};
use crate::backend::{Activation, Backend, KvPoolSpec, LinearInput, Step, StepMode, StepRun};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::sampling::{self, SampleRequest, Sampled};
use crate::tensor::{Fp8Rows, HostData, HostTensor};
use crate::tp::TpShard;

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

/// A weight `[rows, cols]` (a vector is one row).
pub struct GpuWeight {
    pub data: WeightData,
    pub rows: usize,
    pub cols: usize,
}

/// A weight's elements on the device.
pub enum WeightData {
    Bf16(DeviceBuffer<bf16>),
    /// A linear layer's FP8 weight: e4m3 bytes `[rows, cols]` and a scale per row (per
    /// output channel), read by cuBLASLt's FP8 GEMM.
    Fp8 {
        bits: DeviceBuffer<u8>,
        scales: DeviceBuffer<f32>,
    },
}

impl GpuWeight {
    /// The bf16 elements every op but the FP8 GEMM reads; FP8 stays in linear layers.
    fn bf16(&self) -> Result<&DeviceBuffer<bf16>> {
        match &self.data {
            WeightData::Bf16(b) => Ok(b),
            WeightData::Fp8 { .. } => Err(ModelError::Invalid(format!(
                "an FP8 weight [{}, {}] reached an op that takes bf16 (only linear layers \
                 run FP8)",
                self.rows, self.cols
            ))),
        }
    }
}

/// The backend's memory besides the weights, in the order it is taken.
// One per backend, changed twice in its life: the size of the empty variant is no cost.
#[allow(clippy::large_enum_variant)]
enum Memory {
    /// Only the weights.
    Weights,
    /// The step workspace is reserved (`plan_memory`); no KV pool yet.
    Planned(Workspace),
    /// Workspace and KV pool: steps can run.
    Ready { workspace: Workspace, kv: KvPool },
}

pub struct CudaBackend {
    device: Device,
    jit: Jit,
    gemm: Gemm,
    profiler: Option<Profiler>,
    weight_bytes: usize,
    /// Pinned buffers the weights are uploaded through while loading; freed by `init_kv`.
    uploader: Option<StagedUploader<bf16>>,
    uploader_fp8: Option<StagedUploader<u8>>,
    /// FP8 weights stay FP8 and run FP8 GEMMs (sm_89 and later); otherwise (older GPUs,
    /// or `RADIX_SPARSE_FP8_GEMM=0`) they are dequantized to bf16 at upload.
    fp8_gemms: bool,
    /// The widest input (K) of the FP8 weights uploaded: the step workspace keeps that
    /// many e4m3 bytes per token for the quantized activations.
    fp8_cols: usize,
    /// RMSNorm and SiLU·mul write their output's FP8 form too (one pass instead of a
    /// separate quantizer before each FP8 GEMM); `RADIX_SPARSE_FP8_FUSED=0` turns it off.
    fp8_fused: bool,
    /// The activation whose FP8 form the workspace holds now, (address, rows, cols): an
    /// FP8 linear layer on it skips quantizing. Any op that may write that activation, or
    /// the workspace's FP8 rows, clears it.
    fp8_holds: Option<(u64, usize, usize)>,
    /// FP8 layers on at most this many rows run our FP8-weight GEMV on the 16-bit
    /// activations (no quantization); `RADIX_SPARSE_FP8_GEMV_ROWS` sets it (default 0:
    /// never, the skinny FP8 GEMM reads the weights faster).
    fp8_gemv_rows: usize,
    /// FP8 layers on at most this many rows (beyond `fp8_gemv_rows`) may run our skinny
    /// FP8 GEMM instead of cuBLASLt's, which reads the weights of a few rows at 26-65% of
    /// the copy bandwidth; `skinny::engine_variant` picks the variant or cuBLASLt per shape
    /// (on Hopper wgmma up to 32 rows and at 33-64 on all but q|k|v, elsewhere mma.sync up
    /// to 8: where each won on the H200; bench/NOTES.md).
    /// `RADIX_SPARSE_FP8_SKINNY_ROWS` sets it (0: never, at most and by default 64).
    fp8_skinny_rows: usize,
    /// The log has said how FP8 weights run.
    fp8_said: bool,
    /// `--kv-cache-dtype fp8_e4m3`: the per-layer scales of the FP8 KV pool `init_kv`
    /// makes (none: bf16).
    kv_fp8: Option<crate::fp8::KvScales>,
    memory: Memory,
    /// The step begun by `begin_step`: views of the workspace, dropped before the
    /// workspace or the pool can change.
    step: Option<StepViews>,
    graphs: DecodeGraphs,
    /// The sampler's rows and extras on the host, refilled every step.
    sampler_plan: SamplerPlan,
    /// Bias, masks and alternatives of the rows that ask for them, on the device.
    sampler_extras: ExtrasBuffers,
    /// The tensor-parallel group this backend is a rank of (`None`: the whole model).
    group: Option<RankGroup>,
    /// Which GEMV kernel, if any, takes the products of a few rows instead of cuBLASLt.
    gemv_mode: GemvMode,
    /// Whether steps of one row take the norms, SiLU·mul and residual adds into the
    /// streaming GEMV (`Backend::fuses_linear`; `RADIX_SPARSE_FUSE_LINEAR=0` turns it off).
    fuse_linear: bool,
}

/// Which GEMV takes products of a few rows (`RADIX_SPARSE_GEMV`). By default (`Auto`) the
/// streaming kernel (gemv/stream.cu) takes products of one row on Hopper where it fits
/// (16-bit weights with K a multiple of 1,024, FP8 ones of 2,048): on the H200 it read the
/// weights at 75-107% of copy where cuBLASLt read 54-99% (1.08-1.38x), but only matched
/// cuBLASLt at 2 rows and lost at 4 (bench/NOTES.md). `0`: cuBLASLt (and the FP8 paths)
/// always; `1`: gemv.cu up to `gemv::MAX_ROWS` rows; `stream`: the streaming kernel up to
/// `gemv::STREAM_MAX_ROWS` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GemvMode {
    Auto,
    Off,
    Blocks,
    Stream,
}

impl GemvMode {
    fn from_env() -> Self {
        match std::env::var("RADIX_SPARSE_GEMV").as_deref().map(str::trim) {
            Ok("0") => GemvMode::Off,
            Ok("1") => GemvMode::Blocks,
            Ok("stream") => GemvMode::Stream,
            _ => GemvMode::Auto,
        }
    }

    /// Runs `out = x · wᵀ` on this mode's GEMV (as `CudaBackend::gemv_for` chose it);
    /// false for `Off` and `Auto`, where the caller runs cuBLASLt.
    fn run<O: radix_gpu::Element>(
        self,
        jit: &Jit,
        (m, n, k): (usize, usize, usize),
        x: &DeviceBuffer<bf16>,
        w: &DeviceBuffer<bf16>,
        out: &mut DeviceBuffer<O>,
    ) -> radix_gpu::Result<bool> {
        match self {
            GemvMode::Blocks => gemv::gemv(jit, m, n, k, x, w, out)?,
            GemvMode::Stream => gemv::gemv_stream(jit, m, n, k, x, w, out)?,
            GemvMode::Off | GemvMode::Auto => return Ok(false),
        }
        Ok(true)
    }

    /// Rows up to which the streaming kernel takes the products it fits.
    fn stream_rows(self) -> usize {
        match self {
            GemvMode::Auto => 1,
            GemvMode::Stream => gemv::STREAM_MAX_ROWS,
            GemvMode::Off | GemvMode::Blocks => 0,
        }
    }
}

/// One rank's place in an NCCL group.
struct RankGroup {
    nccl: Arc<NcclGroup>,
    shard: TpShard,
    /// The group's generation the graphs were captured under: a reset remade the
    /// communicators and graphs holding the old ones must go.
    generation: u64,
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Kernels still queued read the buffers and modules about to be freed.
        let _ = self.device.synchronize();
    }
}

impl CudaBackend {
    /// Which GEMV kernel, if any, takes `rows` rows against weight `w` (Off: cuBLASLt).
    fn gemv_for(&self, rows: usize, w: &GpuWeight) -> GemvMode {
        if !matches!(w.data, WeightData::Bf16(_)) {
            return GemvMode::Off;
        }
        if rows <= self.gemv_mode.stream_rows()
            && gemv::fits_stream(self.device.info(), rows, w.rows, w.cols)
        {
            return GemvMode::Stream;
        }
        if self.gemv_mode == GemvMode::Blocks && gemv::fits(rows, w.rows, w.cols) {
            return GemvMode::Blocks;
        }
        GemvMode::Off
    }

    /// Whether an FP8 linear layer of `rows` rows against an `n x k` weight runs the
    /// streaming GEMV on the 16-bit activations (no quantization).
    fn fp8_streams(&self, rows: usize, n: usize, k: usize) -> bool {
        rows <= self.gemv_mode.stream_rows()
            && gemv::fits_stream_fp8(self.device.info(), rows, n, k)
    }

    /// An FP8 weight's bytes and scales onto the device, as they are.
    fn upload_fp8(&mut self, q: &Fp8Rows, rows: usize, cols: usize) -> Result<GpuWeight> {
        Self::check(q.bits.len() == rows * cols && q.scales.len() == rows, || {
            format!(
                "FP8 weight [{rows}, {cols}] holds {} bytes and {} scales",
                q.bits.len(),
                q.scales.len()
            )
        })?;
        let bits = if q.bits.len() < STAGED_UPLOAD_MIN {
            self.device.upload(&q.bits)?
        } else {
            let uploader = match &mut self.uploader_fp8 {
                Some(u) => u,
                None => {
                    self.uploader_fp8.insert(StagedUploader::new(&self.device, 2 * UPLOAD_CHUNK)?)
                }
            };
            uploader.upload(&self.device, &q.bits)?
        };
        let scales = self.device.upload(&q.scales)?;
        self.weight_bytes += bits.num_bytes() + scales.num_bytes();
        self.fp8_cols = self.fp8_cols.max(cols);
        Ok(GpuWeight { data: WeightData::Fp8 { bits, scales }, rows, cols })
    }

    /// For an op about to write `rows` of `cols` (`max`: the longest row it quantizes
    /// itself): the workspace's FP8 rows if it should also write their FP8 form (the model
    /// has FP8 layers to read it, on more rows than the FP8 GEMV takes). Either way the
    /// workspace holds no activation's FP8 form from here on, until the op says so.
    fn fused_fp8_rows(
        &mut self,
        rows: usize,
        cols: usize,
        max: usize,
    ) -> Result<Option<(DeviceBuffer<u8>, DeviceBuffer<f32>)>> {
        self.fp8_holds = None;
        // Rows whose FP8 layers read the 16-bit activations need no FP8 copy of them (the
        // layers fed by this op take K = cols; n = 1 stands for any of them).
        let fuses = self.fp8_fused
            && rows > self.fp8_gemv_rows
            && !self.fp8_streams(rows, 1, cols)
            && cols <= self.fp8_cols
            && cols <= max
            && cols.is_multiple_of(8);
        if !fuses {
            return Ok(None);
        }
        Ok(Some(self.ready()?.0.fp8_acts(rows, cols)?))
    }

    /// `out = x · wᵀ (+ bias)` with an FP8 weight. Where the streaming GEMV takes it (one
    /// row on Hopper by default, `GemvMode`) or up to `fp8_gemv_rows` rows: an FP8-weight
    /// GEMV on x as it is. More: x quantized per token into the workspace's e4m3 rows
    /// (unless the op that wrote x already did), then our skinny FP8 GEMM (up to
    /// `fp8_skinny_rows` rows) or cuBLASLt's FP8 GEMM applies both scale vectors.
    fn linear_fp8(
        &mut self,
        x: &GpuAct,
        (bits, scales): (&DeviceBuffer<u8>, &DeviceBuffer<f32>),
        n: usize,
        bias: Option<&DeviceBuffer<bf16>>,
        out: &mut GpuAct,
    ) -> Result<()> {
        let (rows, k) = (x.rows, x.cols);
        if let Some(b) = bias {
            Self::check(b.len() == n, || format!("FP8 linear: {} bias values for {n}", b.len()))?;
        }
        if bias.is_none() && self.fp8_streams(rows, n, k) {
            return self.timed(Op::Gemm, |b| {
                Ok(gemv::gemv_stream_fp8(&b.jit, rows, n, k, &x.buf, bits, scales, &mut out.buf)?)
            });
        }
        if bias.is_none() && rows <= self.fp8_gemv_rows && gemv::fits_fp8(rows, n, k) {
            return self.timed(Op::Gemm, |b| {
                Ok(gemv::gemv_fp8(&b.jit, rows, n, k, &x.buf, bits, scales, &mut out.buf)?)
            });
        }
        let (mut q, mut q_scales) = self.ready()?.0.fp8_acts(rows, k)?;
        let held = (x.buf.ptr(), rows, k);
        if self.fp8_holds != Some(held) {
            self.timed(Op::Other, |b| {
                Ok(fp8_acts::quantize_rows(&b.jit, &x.buf, rows, k, &mut q, &mut q_scales)?)
            })?;
            self.fp8_holds = Some(held);
        }
        let variant = if rows <= self.fp8_skinny_rows {
            skinny::engine_variant(self.device.arch(), rows, n, k)
        } else {
            None
        };
        if let Some(variant) = variant {
            return self.timed(Op::Gemm, |b| {
                let Memory::Ready { workspace, .. } = &mut b.memory else {
                    return Err(ModelError::Invalid("the KV pool is not initialised".into()));
                };
                let scratch = workspace.fp8_skinny_scratch();
                let (x, w) = ((&q, &q_scales), (bits, scales));
                let dims = (rows, n, k);
                Ok(skinny::gemm_with(
                    &b.jit,
                    dims,
                    x,
                    w,
                    bias,
                    &mut out.buf,
                    scratch,
                    Some(variant),
                )?)
            });
        }
        let bias = bias.map_or(0, |b| b.ptr());
        self.timed(Op::Gemm, |b| {
            // SAFETY: q is [rows, k] and q_scales [rows] (workspace views of that size),
            // bits [n, k] and scales [n] (checked at upload), out [rows, n] (checked by
            // `linear`), bias [n] when given (checked by the model's loader).
            Ok(unsafe {
                b.gemm.matmul_fp8_raw(
                    rows,
                    n,
                    k,
                    q.ptr(),
                    q_scales.ptr(),
                    bits.ptr(),
                    scales.ptr(),
                    bias,
                    out.buf.ptr_mut(),
                )
            }?)
        })
    }

    /// Opens GPU `ordinal`; kernels compile (or come from the cache) on first use.
    pub fn new(ordinal: usize) -> Result<Self> {
        let device = Device::open(ordinal)?;
        let gemm = Gemm::new(&device)?;
        let fp8_gemms = device.arch().sm() >= radix_gpu::Arch::SM89.sm()
            && std::env::var("RADIX_SPARSE_FP8_GEMM").map_or(true, |v| v != "0");
        let rows_from_env = |name: &str, default: usize, max: usize| {
            std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default).min(max)
        };
        Ok(Self {
            device,
            jit: Jit::with_default_cache(),
            gemm,
            profiler: None,
            weight_bytes: 0,
            uploader: None,
            uploader_fp8: None,
            fp8_gemms,
            fp8_cols: 0,
            fp8_fused: std::env::var("RADIX_SPARSE_FP8_FUSED").map_or(true, |v| v != "0"),
            fp8_holds: None,
            fp8_gemv_rows: rows_from_env("RADIX_SPARSE_FP8_GEMV_ROWS", 0, gemv::MAX_ROWS),
            fp8_skinny_rows: rows_from_env(
                "RADIX_SPARSE_FP8_SKINNY_ROWS",
                skinny::DEFAULT_ROWS,
                skinny::MAX_ROWS,
            ),
            fp8_said: false,
            kv_fp8: None,
            memory: Memory::Weights,
            step: None,
            graphs: DecodeGraphs::new(256),
            gemv_mode: GemvMode::from_env(),
            fuse_linear: std::env::var("RADIX_SPARSE_FUSE_LINEAR")
                .map_or(true, |v| v.trim() != "0"),
            sampler_plan: SamplerPlan::default(),
            sampler_extras: ExtrasBuffers::default(),
            group: None,
        })
    }

    /// Rank `rank` of the tensor-parallel group `nccl`, on that rank's GPU: the model
    /// loaded onto it keeps that rank's slices (`Backend::shard`).
    pub fn with_group(nccl: Arc<NcclGroup>, rank: usize) -> Result<Self> {
        let shard = TpShard::new(rank, nccl.size())?;
        let ordinal = nccl.ordinal(rank).ok_or_else(|| {
            ModelError::TensorParallel(format!("rank {rank} has no GPU in {nccl:?}"))
        })?;
        let mut backend = Self::new(ordinal)?;
        let generation = nccl.generation();
        backend.group = Some(RankGroup { nccl, shard, generation });
        Ok(backend)
    }

    /// The NCCL group this backend is a rank of.
    pub fn nccl_group(&self) -> Option<&Arc<NcclGroup>> {
        self.group.as_ref().map(|g| &g.nccl)
    }

    /// Before a step of a rank: graphs captured before the group's communicators were
    /// remade hold freed ones, and when a capture failed on any rank every rank runs
    /// eagerly (NCCL requires a collective to be captured on all ranks or on none).
    fn sync_with_group(&mut self) {
        let Some(g) = &mut self.group else { return };
        let generation = g.nccl.generation();
        if generation != g.generation {
            g.generation = generation;
            self.step = None;
            self.graphs.clear();
        }
        if g.nccl.graphs_off() {
            self.graphs.set_max_batch(0);
        }
    }

    /// Decode batches up to `max_batch` sequences run as CUDA graphs; 0 turns them off.
    pub fn set_graph_max_batch(&mut self, max_batch: usize) {
        self.graphs.set_max_batch(max_batch);
    }

    /// (graphs captured, graph replays) so far.
    pub fn graph_stats(&self) -> (usize, u64) {
        (self.graphs.captured, self.graphs.replayed)
    }

    /// Whether FP8 weights uploaded from now on run FP8 GEMMs (`true`: sm_89 and later) or
    /// are dequantized to bf16 (the same weights, 16-bit speed; the default for now).
    pub fn set_fp8_gemms(&mut self, on: bool) -> Result<()> {
        if on && self.device.arch().sm() < radix_gpu::Arch::SM89.sm() {
            return Err(ModelError::Invalid(format!(
                "FP8 GEMMs need sm_89 or later; this GPU is {}",
                self.device.arch()
            )));
        }
        self.fp8_gemms = on;
        Ok(())
    }

    /// Whether RMSNorm and SiLU·mul quantize their output for the FP8 layers themselves
    /// (`true`, the default) or a separate quantizer runs before each FP8 GEMM: the same
    /// bytes either way.
    pub fn set_fp8_fused(&mut self, on: bool) {
        self.fp8_fused = on;
    }

    /// Whether steps of one row run their products with the small ops between them fused
    /// (`Backend::fuses_linear`; on by default where the streaming GEMV runs). Steps
    /// already captured as graphs keep what they recorded: set it before the first step.
    pub fn set_fused_linear(&mut self, on: bool) {
        self.fuse_linear = on;
    }

    /// Bytes of the weights uploaded so far.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Turns per-op GPU timing on (events around every op; adds a little overhead).
    /// Profiled steps run eagerly.
    pub fn set_profiling(&mut self, on: bool) {
        self.profiler = on.then(Profiler::default);
    }

    /// GPU time per op category since profiling was turned on, as of the last sampled step.
    pub fn op_times(&self) -> Option<OpTimes> {
        self.profiler.as_ref().map(|p| p.times().clone())
    }

    /// `op_times` with every op launched so far (waits for the stream): for steps that
    /// sample nothing, such as prefill chunks.
    pub fn op_times_now(&mut self) -> Result<Option<OpTimes>> {
        if let Some(prof) = &mut self.profiler {
            self.device.synchronize()?;
            prof.collect()?;
        }
        Ok(self.op_times())
    }

    /// Runs `f` between two timing events when profiling (the caller's op is `op`).
    fn timed<T>(&mut self, op: Op, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let Some(mut prof) = self.profiler.take() else { return f(self) };
        let timer = prof.start(&self.device);
        let out = timer.and_then(|timer| {
            let out = f(self);
            prof.stop(op, timer)?;
            out
        });
        self.profiler = Some(prof);
        out
    }

    /// The workspace and the KV pool, once `init_kv` made the pool.
    fn ready(&mut self) -> Result<(&mut Workspace, &mut KvPool)> {
        match &mut self.memory {
            Memory::Ready { workspace, kv } => Ok((workspace, kv)),
            _ => Err(ModelError::Invalid(
                "the KV pool is not initialised: call init_kv first".into(),
            )),
        }
    }

    fn kv(&self) -> Result<&KvPool> {
        match &self.memory {
            Memory::Ready { kv, .. } => Ok(kv),
            _ => Err(ModelError::Invalid(
                "the KV pool is not initialised: call init_kv first".into(),
            )),
        }
    }

    /// Plans step `s`, grows the workspace if it must, stages the metadata and keeps the
    /// ops' views. `bucket`: the step is padded to that graph's batch; `sparse`: the step
    /// has sparse rows (`Step::sparse_rows`); `real_rows`: logit rows asked for.
    fn stage(
        &mut self,
        s: &Step,
        real_rows: usize,
        bucket: Option<usize>,
        sparse: bool,
    ) -> Result<()> {
        let (shape, policy, key_bounds) = {
            let (ws, kv) = self.ready()?;
            (ws.shape, kv.sparse.filter(|_| sparse), kv.shape.geometry().key_bounds())
        };
        let kv_fp8 = self.kv_fp8.is_some();
        let meta = StepMeta::new(&self.device, &self.kv()?.shape, kv_fp8, s, bucket, policy)?;
        let entries = sparse_entries(key_bounds, s.kv_indices.len(), shape.num_kv_heads);
        self.ensure_workspace(shape, &meta.caps(s, entries))?;
        let device = self.device.clone();
        let (ws, kv) = self.ready()?;
        self.step = Some(meta.stage(&device, ws, kv, s, real_rows)?);
        Ok(())
    }

    fn step(&self) -> Result<&StepViews> {
        self.step.as_ref().ok_or_else(|| ModelError::Invalid("no step has begun".into()))
    }

    fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
        if cond { Ok(()) } else { Err(ModelError::Invalid(msg())) }
    }
}

/// A collective refused because the group was aborted is `GroupAborted`: another rank
/// failed, and its error is the cause (`TpModel` reports that one).
fn aborted(e: GpuError) -> ModelError {
    match e {
        GpuError::CollectiveAborted(why) => ModelError::GroupAborted(why),
        e => e.into(),
    }
}

/// Entries of the sparse per-head tables and page scores for a page table of
/// `kv_indices` entries: one per kv head, when the pool keeps key bounds.
fn sparse_entries(key_bounds: bool, kv_indices: usize, num_kv_heads: usize) -> usize {
    if key_bounds { kv_indices * num_kv_heads } else { 0 }
}

/// The model sizes the workspace is planned from; `fp8_cols`: e4m3 bytes per token for
/// the FP8 GEMMs' activations (0 without FP8 weights).
fn act_shape(cfg: &ModelConfig, fp8_cols: usize) -> ActShape {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    ActShape {
        // residual, normed, delta (h each); qkv; q and attn; gate|up and mlp (3i): what
        // `LlamaModel::forward` takes per token.
        per_token: 3 * h + cfg.qkv_size() + 2 * cfg.q_size() + 3 * i,
        hidden: h,
        vocab: cfg.vocab_size,
        num_qo_heads: cfg.num_heads,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        fp8_cols,
    }
}

/// Elements per pinned upload buffer (two of them, 64 MiB each in bf16).
const UPLOAD_CHUNK: usize = 32 << 20;
/// Tensors smaller than this (norms, biases) are copied directly.
const STAGED_UPLOAD_MIN: usize = 1 << 20;

fn to_bf16(data: &HostData) -> Vec<bf16> {
    match data {
        HostData::BF16(v) => v.clone(),
        HostData::F16(v) => v.iter().map(|x| bf16::from_f32(x.to_f32())).collect(),
        HostData::F32(v) => v.iter().map(|&x| bf16::from_f32(x)).collect(),
        HostData::Blocks(_) | HostData::Fp8(_) => {
            data.to_f32().into_iter().map(bf16::from_f32).collect()
        }
    }
}

/// Whether cuBLASLt's FP8 GEMM takes a `[rows, cols]` weight: 16-byte rows of its inputs
/// (`cols`) and of its bf16 output (`rows`).
fn fp8_gemm_fits(rows: usize, cols: usize) -> bool {
    cols.is_multiple_of(16) && rows.is_multiple_of(8)
}

impl Backend for CudaBackend {
    type Act = GpuAct;
    type Weight = GpuWeight;

    fn name(&self) -> String {
        format!("cuda ({})", self.device.info().name)
    }

    fn shard(&self) -> TpShard {
        self.group.as_ref().map_or(TpShard::SINGLE, |g| g.shard)
    }

    fn all_reduce(&mut self, x: &mut GpuAct) -> Result<()> {
        self.fp8_holds = None;
        let Some(g) = &self.group else { return Ok(()) };
        let (nccl, rank) = (g.nccl.clone(), g.shard.rank);
        let len = x.rows * x.cols;
        self.timed(Op::AllReduce, |_| {
            nccl.all_reduce_sum_bf16(rank, &mut x.buf, len).map_err(aborted)
        })
    }

    fn disable_graphs(&mut self, why: &str) {
        self.graphs.set_max_batch(0);
        if let Some(g) = &self.group {
            g.nccl.turn_graphs_off(why);
        }
    }

    fn upload(&mut self, t: &HostTensor) -> Result<GpuWeight> {
        let (rows, cols) = t.matrix_dims();
        if let HostData::Fp8(q) = &t.data {
            if !self.fp8_said {
                self.fp8_said = true;
                if self.fp8_gemms {
                    tracing::info!("FP8 weights kept as e4m3: FP8 GEMMs");
                } else {
                    tracing::info!(
                        "FP8 weights dequantized to bf16 (no FP8 GEMMs on this GPU, or RADIX_SPARSE_FP8_GEMM=0)"
                    );
                }
            }
            if self.fp8_gemms && t.shape.len() == 2 && fp8_gemm_fits(rows, cols) {
                return self.upload_fp8(q, rows, cols);
            }
        }
        let converted;
        let data: &[bf16] = match &t.data {
            HostData::BF16(v) => v,
            other => {
                converted = to_bf16(other);
                &converted
            }
        };
        let buf = if data.len() < STAGED_UPLOAD_MIN {
            self.device.upload(data)?
        } else {
            let uploader = match &mut self.uploader {
                Some(u) => u,
                None => self.uploader.insert(StagedUploader::new(&self.device, UPLOAD_CHUNK)?),
            };
            uploader.upload(&self.device, data)?
        };
        self.weight_bytes += buf.num_bytes();
        Ok(GpuWeight { data: WeightData::Bf16(buf), rows, cols })
    }

    fn kv_dtype(&self) -> KvDtype {
        if self.kv_fp8.is_some() { KvDtype::F8E4M3 } else { KV_DTYPE }
    }

    fn set_kv_cache_fp8(&mut self, scales: crate::fp8::KvScales) -> Result<()> {
        Self::check(self.device.arch().sm() >= radix_gpu::Arch::SM89.sm(), || {
            format!("an FP8 KV cache needs sm_89 or later; this GPU is {}", self.device.arch())
        })?;
        scales.validate()?;
        Self::check(!matches!(self.memory, Memory::Ready { .. }), || {
            "set the FP8 KV cache before init_kv: the pool exists".into()
        })?;
        self.kv_fp8 = Some(scales);
        Ok(())
    }

    fn init_kv(&mut self, cfg: &ModelConfig, spec: &KvPoolSpec) -> Result<KvGeometry> {
        // The weights are in: the upload buffers' pinned memory goes back.
        self.uploader = None;
        self.uploader_fp8 = None;
        // Views and graphs point into the pool being replaced.
        self.step = None;
        self.graphs.clear();
        let workspace = match std::mem::replace(&mut self.memory, Memory::Weights) {
            Memory::Weights => None,
            Memory::Planned(ws) | Memory::Ready { workspace: ws, .. } => Some(ws),
        };
        if let Some(ws) = workspace {
            self.memory = Memory::Planned(ws);
        }
        let kv = KvPool::new(&self.device, cfg, spec, self.kv_fp8.as_ref())?;
        let geometry = *kv.shape.geometry();
        // A page table as large as the pool, so that decode graphs captured now are not
        // dropped when contexts grow; the smallest step's caps when nothing was reserved.
        let reserved = self.workspace().map(|w| w.caps);
        let base =
            reserved.unwrap_or(Caps { tokens: 1, seqs: 1, logit_rows: 1, ..Caps::default() });
        let kv_indices = kv.shape.num_pages() + base.seqs;
        let entries = sparse_entries(geometry.key_bounds(), kv_indices, cfg.num_kv_heads);
        let caps = Caps { kv_indices, sparse_entries: entries, ..base };
        self.ensure_workspace(act_shape(cfg, self.fp8_cols), &caps)?;
        let workspace = match std::mem::replace(&mut self.memory, Memory::Weights) {
            Memory::Planned(ws) | Memory::Ready { workspace: ws, .. } => ws,
            Memory::Weights => {
                return Err(ModelError::Invalid("the step workspace was not allocated".into()));
            }
        };
        self.memory = Memory::Ready { workspace, kv };
        Ok(geometry)
    }

    fn begin_step(&mut self, s: &Step) -> Result<StepRun> {
        let n = s.tokens.len();
        Self::check(s.positions.len() == n && s.slots.len() == n, || {
            "step: positions/slots do not match tokens".into()
        })?;
        Self::check(s.logit_rows.iter().all(|&r| (r as usize) < n), || {
            "a logit row is past the step's tokens".into()
        })?;
        self.step = None;
        self.fp8_holds = None;
        self.sync_with_group();
        let (scratch, page_size, policy) = {
            let kv = self.kv()?;
            (kv.scratch_page(), kv.shape.page_size(), kv.sparse)
        };
        // Sparse steps launch more kernels: they have graphs of their own. (Padding rows
        // stay dense, so the padded step has the same answer.)
        let sparse = s.sparse_rows(policy.as_ref())?;
        let key = match self.profiler {
            None => self.graphs.key_for(s, sparse),
            Some(_) => None, // profiled steps time each op: eager
        };
        let Some(key) = key else {
            self.stage(s, s.logit_rows.len(), None, sparse)?;
            return Ok(StepRun::eager(s));
        };
        let padded = self.graphs.take_padded(s, key.bucket, scratch, page_size);
        let staged = self.stage(&padded, s.logit_rows.len(), Some(key.bucket), sparse);
        self.graphs.return_padded(padded);
        staged?;
        // The staged plans' launch variants (clusters, the wide merge) have graphs of their own.
        let key = {
            let st = self.step()?;
            let sparse = st.sparse.as_ref().map_or(0, |t| t.attention.launch_variant());
            GraphKey { variant: st.attention.launch_variant() | sparse << 2, ..key }
        };
        let mode = match &self.group {
            None => self.graphs.enter(&self.device, key)?,
            // A replay runs the collectives it recorded: only while the communicators
            // are alive (an abort frees them).
            Some(g) => {
                let _live = g.nccl.live().map_err(aborted)?;
                self.graphs.enter(&self.device, key)?
            }
        };
        if mode == StepMode::Replayed {
            let vocab = self.ready()?.0.shape.vocab;
            if let Some(st) = &mut self.step {
                st.logit_vocab = Some(vocab);
            }
        }
        let GraphKey { bucket, .. } = key;
        Ok(StepRun { mode, tokens: bucket, logit_rows: bucket })
    }

    fn warm_up_steps(&self) -> Vec<Step> {
        let Ok(kv) = self.kv() else { return Vec::new() };
        let (scratch, page_size) = (kv.scratch_page(), kv.shape.page_size());
        // Prefills first (their attention tiles and the sampler compile here, not in the
        // first request's step): a short one, and a chunk after a long prefix, whose rows
        // attend more keys than the short prefill kernel takes (on Hopper the two are
        // different kernels; a pool too small to hold it never runs such rows); then every
        // decode bucket's graph.
        use radix_kernels::attention::{PERSISTENT_MAX_MEAN_KEYS, TMA3_MIN_MEAN_KEYS};
        let long_prefix = PERSISTENT_MAX_MEAN_KEYS.max(TMA3_MIN_MEAN_KEYS).ceil() as usize + 256;
        let long_fits = (long_prefix + 256).div_ceil(page_size) < kv.shape.num_pages();
        // One decode step after a long context, whose plan takes other attention launch
        // variants than the warm-up buckets' one-token contexts (no clusters, the wide-merge
        // image): their kernels compile here, not in a request's step.
        const LONG_DECODE: usize = 8192;
        let long_decode = LONG_DECODE.div_ceil(page_size) < kv.shape.num_pages();
        std::iter::once(scratch_prefill(256, 0, scratch, page_size))
            .chain(long_fits.then(|| scratch_prefill(256, long_prefix, scratch, page_size)))
            .chain(long_decode.then(|| scratch_prefill(1, LONG_DECODE - 1, scratch, page_size)))
            .chain(
                self.graphs
                    .missing_dense_buckets()
                    .into_iter()
                    .map(|b| scratch_step(b, scratch, page_size)),
            )
            .collect()
    }

    fn end_step(&mut self, recorded: bool) -> Result<()> {
        let Some(g) = &self.group else {
            return self.graphs.end_capture(&self.device, recorded);
        };
        // The graph is launched once captured: only while the communicators it recorded
        // are alive. Aborted meanwhile, the capture ends with nothing run.
        match g.nccl.live() {
            Ok(_live) => self.graphs.end_capture(&self.device, recorded),
            Err(e) => {
                self.graphs.end_capture(&self.device, false)?;
                Err(aborted(e))
            }
        }
    }

    fn act(&mut self, rows: usize, cols: usize) -> Result<GpuAct> {
        Ok(GpuAct { buf: self.ready()?.0.take_act(rows * cols)?, rows, cols })
    }

    fn embed(&mut self, table: &GpuWeight, out: &mut GpuAct) -> Result<()> {
        self.fp8_holds = None;
        Self::check(out.cols == table.cols, || "embed: shape mismatch".into())?;
        self.timed(Op::Other, |b| {
            let st = b.step()?;
            Ok(ops::embed(&b.jit, table.bf16()?, &st.tokens, out.rows, out.cols, &mut out.buf)?)
        })
    }

    fn rms_norm(&mut self, x: &GpuAct, w: &GpuWeight, eps: f32, out: &mut GpuAct) -> Result<()> {
        Self::check(x.rows == out.rows && x.cols == out.cols, || {
            "rms_norm: shape mismatch".into()
        })?;
        let (rows, cols) = (x.rows, x.cols);
        let mut fp8 = self.fused_fp8_rows(rows, cols, ops::NORM_FP8_MAX)?;
        self.timed(Op::Norm, |b| {
            let f = fp8.as_mut().map(|(q, scales)| Fp8Out { q, scales });
            Ok(ops::rms_norm_fp8(&b.jit, &x.buf, w.bf16()?, rows, cols, eps, &mut out.buf, f)?)
        })?;
        if fp8.is_some() {
            self.fp8_holds = Some((out.buf.ptr(), rows, cols));
        }
        Ok(())
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
        let mut fp8 = self.fused_fp8_rows(rows, cols, ops::NORM_FP8_MAX)?;
        self.timed(Op::Norm, |b| {
            Ok(ops::add_rms_norm_fp8(
                &b.jit,
                &mut residual.buf,
                &delta.buf,
                w.bf16()?,
                rows,
                cols,
                eps,
                &mut out.buf,
                fp8.as_mut().map(|(q, scales)| Fp8Out { q, scales }),
            )?)
        })?;
        if fp8.is_some() {
            self.fp8_holds = Some((out.buf.ptr(), rows, cols));
        }
        Ok(())
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
        let bias = bias.map(GpuWeight::bf16).transpose()?;
        if self.fp8_holds.is_some_and(|(at, ..)| at == out.buf.ptr()) {
            self.fp8_holds = None;
        }
        let w_bf16 = match &w.data {
            WeightData::Bf16(buf) => buf,
            WeightData::Fp8 { bits, scales } => {
                return self.linear_fp8(x, (bits, scales), w.rows, bias, out);
            }
        };
        let gemv_mode = if bias.is_none() { self.gemv_for(x.rows, w) } else { GemvMode::Off };
        self.timed(Op::Gemm, |b| {
            if gemv_mode.run(&b.jit, (x.rows, w.rows, w.cols), &x.buf, w_bf16, &mut out.buf)? {
                return Ok(());
            }
            Ok(b.gemm.matmul::<bf16, bf16>(
                x.rows,
                w.rows,
                w.cols,
                &x.buf,
                w_bf16,
                BLayout::NK,
                bias,
                0.0,
                &mut out.buf,
            )?)
        })
    }

    fn rope_append(&mut self, layer: usize, qkv: &GpuAct, q: &mut GpuAct) -> Result<()> {
        self.fp8_holds = None;
        self.timed(Op::KvAppend, |b| {
            let Self { step, memory, jit, .. } = b;
            let st =
                step.as_ref().ok_or_else(|| ModelError::Invalid("no step has begun".into()))?;
            let Memory::Ready { kv, .. } = memory else {
                return Err(ModelError::Invalid("call init_kv first".into()));
            };
            let shape = kv.shape;
            let l = kv.layer_mut(layer)?;
            let bounds = l.bounds.as_mut();
            let (inputs, qkv, q) = (&st.append, &qkv.buf, &mut q.buf);
            match &mut l.kv {
                LayerData::Bf16 { k, v } => {
                    kv_append::append(jit, &shape, inputs, qkv, q, k, v, bounds)?
                }
                LayerData::Fp8 { k, v, scales } => {
                    kv_append::append_fp8(jit, &shape, inputs, qkv, q, k, v, *scales, bounds)?
                }
            }
            Ok(())
        })
    }

    fn attention(&mut self, layer: usize, q: &GpuAct, out: &mut GpuAct) -> Result<()> {
        self.fp8_holds = None;
        self.timed(Op::Attention, |b| {
            let Self { step, memory, jit, .. } = b;
            let st =
                step.as_mut().ok_or_else(|| ModelError::Invalid("no step has begun".into()))?;
            let Memory::Ready { kv, .. } = memory else {
                return Err(ModelError::Invalid("call init_kv first".into()));
            };
            let l = kv.layer(layer)?;
            let run =
                |batch: &radix_kernels::attention::AttentionBatch, out: &mut GpuAct| match &l.kv {
                    LayerData::Bf16 { k, v } => batch.run(jit, &q.buf, k, v, &mut out.buf, None),
                    LayerData::Fp8 { k, v, scales } => {
                        batch.run_fp8(jit, &q.buf, k, v, *scales, &mut out.buf, None)
                    }
                };
            match &mut st.sparse {
                Some(sp) if sp.policy.layer_is_sparse(layer) => {
                    let bounds = l.bounds.as_ref().ok_or_else(|| {
                        ModelError::Invalid(format!("layer {layer} has no key bounds"))
                    })?;
                    sparse_select::select(
                        jit,
                        &sp.shape,
                        &sp.sizes,
                        &q.buf,
                        bounds,
                        &mut sp.select,
                    )?;
                    Ok(run(&sp.attention, out)?)
                }
                _ => Ok(run(&st.attention, out)?),
            }
        })
    }

    fn fuses_linear(&self, rows: usize, w: &GpuWeight, built: bool) -> bool {
        let info = self.device.info();
        let fp8 = matches!(w.data, WeightData::Fp8 { .. });
        self.fuse_linear
            && rows == 1
            && rows <= self.gemv_mode.stream_rows()
            && match (built, fp8) {
                (true, _) => gemv::fits_stream_built(info, w.rows, w.cols, fp8),
                (false, false) => gemv::fits_stream(info, rows, w.rows, w.cols),
                (false, true) => gemv::fits_stream_fp8(info, rows, w.rows, w.cols),
            }
    }

    fn fused_linear(
        &mut self,
        input: LinearInput<'_, Self>,
        w: &GpuWeight,
        out: &mut GpuAct,
        add: bool,
    ) -> Result<()> {
        let (x, k) = match &input {
            LinearInput::Plain(x) | LinearInput::RmsNorm { x, .. } => (*x, x.cols),
            LinearInput::SiluMul(x) => (*x, x.cols / 2),
        };
        Self::check(
            k > 0 && k == w.cols && out.rows == x.rows && out.cols == w.rows && x.cols % k == 0,
            || {
                format!(
                    "fused linear: x [{}, {}] · w [{}, {}]ᵀ into [{}, {}]",
                    x.rows, x.cols, w.rows, w.cols, out.rows, out.cols
                )
            },
        )?;
        Self::check(self.fuses_linear(x.rows, w, input.is_built()), || {
            format!("fused linear: {} rows against [{}, {}] do not stream", x.rows, w.rows, w.cols)
        })?;
        if self.fp8_holds.is_some_and(|(at, ..)| at == out.buf.ptr()) {
            self.fp8_holds = None;
        }
        let sx = match input {
            LinearInput::Plain(x) => StreamX::Plain(&x.buf),
            LinearInput::RmsNorm { x, weight, eps } => {
                StreamX::RmsNorm { x: &x.buf, weight: weight.bf16()?, eps }
            }
            LinearInput::SiluMul(x) => StreamX::SiluMul(&x.buf),
        };
        let sw = match &w.data {
            WeightData::Bf16(buf) => StreamWeight::Half(buf),
            WeightData::Fp8 { bits, scales } => StreamWeight::Fp8 { bits, scales },
        };
        let dims = (x.rows, w.rows, w.cols);
        self.timed(Op::Gemm, |b| {
            Ok(gemv::gemv_stream_fused(&b.jit, dims, sx, sw, &mut out.buf, add)?)
        })
    }

    fn silu_mul(&mut self, gate_up: &GpuAct, out: &mut GpuAct) -> Result<()> {
        Self::check(gate_up.cols == 2 * out.cols && gate_up.rows == out.rows, || {
            "silu_mul: shape mismatch".into()
        })?;
        let (rows, cols) = (out.rows, out.cols);
        let fp8 = self.fused_fp8_rows(rows, cols, ops::SILU_FP8_MAX)?;
        let fused = fp8.is_some();
        self.timed(Op::Other, |b| match fp8 {
            Some((mut q, mut scales)) => {
                let f = Fp8Out { q: &mut q, scales: &mut scales };
                Ok(ops::silu_mul_fp8(&b.jit, &gate_up.buf, rows, cols, &mut out.buf, f)?)
            }
            None => Ok(ops::silu_mul(&b.jit, &gate_up.buf, rows, cols, &mut out.buf)?),
        })?;
        if fused {
            self.fp8_holds = Some((out.buf.ptr(), rows, cols));
        }
        Ok(())
    }

    fn gather_logit_rows(&mut self, x: &GpuAct, out: &mut GpuAct) -> Result<()> {
        self.fp8_holds = None;
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
        let ws = self.ready()?.0;
        let len = x.rows * head.rows;
        Self::check(len <= ws.logits.len(), || {
            format!("logits of {} rows do not fit the workspace", x.rows)
        })?;
        // SAFETY: a view of the workspace used only within this call.
        let mut logits = unsafe { ws.logits.view(0, len) }?;
        let gemv_mode = self.gemv_for(x.rows, head);
        let head_bf16 = head.bf16()?;
        self.timed(Op::Gemm, |b| {
            let dims = (x.rows, head.rows, head.cols);
            if gemv_mode.run(&b.jit, dims, &x.buf, head_bf16, &mut logits)? {
                return Ok(());
            }
            Ok(b.gemm.matmul::<bf16, f32>(
                x.rows,
                head.rows,
                head.cols,
                &x.buf,
                head_bf16,
                BLayout::NK,
                None,
                0.0,
                &mut logits,
            )?)
        })?;
        if let Some(st) = &mut self.step {
            st.logit_vocab = Some(head.rows);
        }
        Ok(())
    }

    fn sample(&mut self, requests: &[SampleRequest]) -> Result<Vec<Sampled>> {
        let st = self.step()?;
        let vocab =
            st.logit_vocab.ok_or_else(|| ModelError::Invalid("sample before logits".into()))?;
        let rows = st.real_logit_rows;
        Self::check(requests.len() == rows, || {
            format!("sample: {} requests for {rows} logits rows", requests.len())
        })?;
        let mut plan = std::mem::take(&mut self.sampler_plan);
        plan.fill(requests, vocab);
        let device = self.device.clone();
        let mut extras_buffers = std::mem::take(&mut self.sampler_extras);
        let ws = self.ready()?.0;
        {
            let staged = ws.sample_staging.write()?;
            for (d, w) in staged.iter_mut().zip(plan.words()) {
                *d = w;
            }
        }
        let words = rows * SampleRow::WORDS;
        ws.sample_staging.upload_prefix(words, &mut ws.sample_params)?;
        // SAFETY: views of the workspace used only within this call.
        let (mut logits, params, mut tokens, mut logprobs) = unsafe {
            (
                ws.logits.view(0, rows * vocab)?,
                ws.sample_params.view(0, words)?,
                ws.sampled_tokens.view(0, rows)?,
                ws.sampled_logprobs.view(0, rows)?,
            )
        };
        let launched = self.timed(Op::Sample, |b| {
            let extras = extras_buffers.prepare(&device, &plan)?;
            Ok(ops::sample_rows(
                &b.jit,
                &mut logits,
                &params,
                &plan.rows,
                vocab,
                extras,
                &mut tokens,
                &mut logprobs,
            )?)
        });
        let tops = launched.and_then(|()| extras_buffers.read_top(&plan));
        self.sampler_extras = extras_buffers;
        self.sampler_plan = plan;
        let tops = tops?;
        let tokens = tokens.to_vec()?;
        let logprobs = logprobs.to_vec()?;
        if let Some(prof) = &mut self.profiler {
            prof.collect()?;
        }
        let mut out: Vec<Sampled> = tokens
            .iter()
            .zip(&logprobs)
            .zip(tops)
            .map(|((&t, &l), top)| Sampled { token: t as u32, logprob: l, top })
            .collect();
        // Penalties need the request's token counts: those rows are sampled on the host,
        // from their raw logits (the kernel leaves them unedited), one row copied each.
        for (i, r) in requests.iter().enumerate().filter(|(_, r)| r.needs_host()) {
            // SAFETY: a read-only view of row i, within the logits (rows * vocab).
            let mut row = unsafe { logits.view(i * vocab, vocab)?.to_vec()? };
            out[i] = sampling::sample(&mut row, r);
        }
        Ok(out)
    }

    fn read_logits(&mut self) -> Result<Vec<f32>> {
        let st = self.step()?;
        let Some(vocab) = st.logit_vocab else { return Ok(Vec::new()) };
        let rows = st.real_logit_rows;
        let ws = self.ready()?.0;
        // SAFETY: a view of the workspace used only within this call.
        Ok(unsafe { ws.logits.view(0, rows * vocab) }?.to_vec()?)
    }
}
