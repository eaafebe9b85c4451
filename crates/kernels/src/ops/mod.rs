//! Launchers of the small ops (ops.cu) and of the GPU sampler (sampling.cu), with their
//! CPU references.

mod reference;

use radix_gpu::cudarc::driver::{DeviceRepr, LaunchConfig};
use radix_gpu::{DeviceBuffer, HalfFloat, Jit, KernelSpec, Result, SourceFile, ensure};

pub use reference::{rms_norm_reference, silu_mul_reference};

use crate::{HEADERS, dtype_define};

pub const OPS: SourceFile = SourceFile { path: "ops/ops.cu", code: include_str!("ops.cu") };
pub const SAMPLING: SourceFile =
    SourceFile { path: "ops/sampling.cu", code: include_str!("sampling.cu") };

pub fn ops_spec<T: HalfFloat>() -> KernelSpec {
    KernelSpec::new(OPS, HEADERS).define("DTYPE", dtype_define::<T>())
}

pub fn sampling_spec() -> KernelSpec {
    KernelSpec::new(SAMPLING, HEADERS)
}

fn rows_cfg(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

macro_rules! params {
    ($name:ident { $($field:ident: $ty:ty),* $(,)? }) => {
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct $name { $($field: $ty),* }
        // SAFETY: plain data mirroring the struct of the same name in the .cu source.
        unsafe impl DeviceRepr for $name {}
    };
}

params!(EmbedParams {
    table: u64,
    ids: u64,
    out: u64,
    rows: i32,
    hidden: i32,
    vocab: i32,
    reserved: i32
});
params!(NormParams {
    residual: u64,
    delta: u64,
    weight: u64,
    out: u64,
    q: u64,
    q_scales: u64,
    rows: i32,
    hidden: i32,
    eps: f32,
    reserved: i32
});
params!(SiluParams { gate_up: u64, out: u64, q: u64, q_scales: u64, rows: i32, inter: i32 });

/// Where an op that fuses FP8 quantization into its output writes it: `[rows, cols]` e4m3
/// bytes and a scale per row, as `fp8::quantize_rows` would give them for that output.
pub struct Fp8Out<'a> {
    pub q: &'a mut DeviceBuffer<u8>,
    pub scales: &'a mut DeviceBuffer<f32>,
}

impl Fp8Out<'_> {
    fn ptrs(&mut self, rows: usize, cols: usize) -> Result<(u64, u64)> {
        let arch = self.q.device().arch();
        ensure!(
            arch.sm() >= radix_gpu::Arch::SM89.sm(),
            "FP8 quantization needs sm_89 or later; this GPU is {arch}"
        );
        ensure!(
            self.q.len() >= rows * cols && self.scales.len() >= rows,
            "FP8 output too small for [{rows}, {cols}] (q {}, scales {})",
            self.q.len(),
            self.scales.len()
        );
        Ok((self.q.ptr_mut(), self.scales.ptr_mut()))
    }
}

/// Rows RMSNorm keeps in registers (`NORM_VECS` 16-byte vectors of 256 threads), the only
/// ones it quantizes itself.
pub const NORM_FP8_MAX: usize = 8192;
/// The longest row `silu_mul_fp8` takes (`SILU_FP8_VECS` 16-byte vectors of its 512 threads
/// in ops.cu).
pub const SILU_FP8_MAX: usize = 16384;
params!(GatherParams { x: u64, rows: u64, out: u64, count: i32, cols: i32 });
params!(SampleParams {
    logits: u64,
    params: u64,
    tokens: u64,
    logprobs: u64,
    bias_tokens: u64,
    bias_values: u64,
    masks: u64,
    mask_words: i32,
    top_tokens: u64,
    top_logprobs: u64,
    top_stride: i32,
    rows: i32,
    vocab: i32
});

/// `out[r] = table[ids[r]]`; ids must lie in `0..vocab` (checked by the caller's tokenizer
/// and the engine; the kernel clamps so it never reads out of bounds).
pub fn embed<T: HalfFloat>(
    jit: &Jit,
    table: &DeviceBuffer<T>,
    ids: &DeviceBuffer<i32>,
    rows: usize,
    hidden: usize,
    out: &mut DeviceBuffer<T>,
) -> Result<()> {
    ensure!(
        hidden.is_multiple_of(8) && hidden > 0,
        "hidden size {hidden} must be a positive multiple of 8"
    );
    ensure!(table.len().is_multiple_of(hidden), "embedding table is not [vocab, {hidden}]");
    ensure!(
        ids.len() >= rows && out.len() >= rows * hidden,
        "embed: buffers too small for {rows} rows"
    );
    if rows == 0 {
        return Ok(());
    }
    let k = jit.kernel(table.device(), &ops_spec::<T>(), "embed")?;
    let p = EmbedParams {
        table: table.ptr(),
        ids: ids.ptr(),
        out: out.ptr_mut(),
        rows: rows as i32,
        hidden: hidden as i32,
        vocab: (table.len() / hidden) as i32,
        reserved: 0,
    };
    // SAFETY: sizes checked above; ids are clamped to the table in the kernel.
    unsafe { k.launch(table.device(), rows_cfg(rows, 256), &p) }
}

/// `out = x / rms(x) * weight`, row by row.
pub fn rms_norm<T: HalfFloat>(
    jit: &Jit,
    x: &DeviceBuffer<T>,
    weight: &DeviceBuffer<T>,
    rows: usize,
    hidden: usize,
    eps: f32,
    out: &mut DeviceBuffer<T>,
) -> Result<()> {
    rms_norm_fp8(jit, x, weight, rows, hidden, eps, out, None)
}

/// `rms_norm`, and its output quantized to `fp8` (rows of at most `NORM_FP8_MAX`, a
/// multiple of 8, on sm_89 or later).
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_fp8<T: HalfFloat>(
    jit: &Jit,
    x: &DeviceBuffer<T>,
    weight: &DeviceBuffer<T>,
    rows: usize,
    hidden: usize,
    eps: f32,
    out: &mut DeviceBuffer<T>,
    fp8: Option<Fp8Out<'_>>,
) -> Result<()> {
    ensure!(x.len() >= rows * hidden, "rms_norm: input too small for {rows} x {hidden}");
    // SAFETY: without a delta the kernel only reads `x` through its residual pointer.
    unsafe { launch_norm(jit, x.ptr(), None, weight, rows, hidden, eps, out, fp8) }
}

/// `residual += delta` (stored rounded), then `out = residual / rms(residual) * weight`.
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm<T: HalfFloat>(
    jit: &Jit,
    residual: &mut DeviceBuffer<T>,
    delta: &DeviceBuffer<T>,
    weight: &DeviceBuffer<T>,
    rows: usize,
    hidden: usize,
    eps: f32,
    out: &mut DeviceBuffer<T>,
) -> Result<()> {
    add_rms_norm_fp8(jit, residual, delta, weight, rows, hidden, eps, out, None)
}

/// `add_rms_norm`, and its output quantized to `fp8` (as `rms_norm_fp8`).
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm_fp8<T: HalfFloat>(
    jit: &Jit,
    residual: &mut DeviceBuffer<T>,
    delta: &DeviceBuffer<T>,
    weight: &DeviceBuffer<T>,
    rows: usize,
    hidden: usize,
    eps: f32,
    out: &mut DeviceBuffer<T>,
    fp8: Option<Fp8Out<'_>>,
) -> Result<()> {
    let n = rows * hidden;
    ensure!(
        residual.len() >= n && delta.len() >= n,
        "add_rms_norm: inputs too small for {rows} x {hidden}"
    );
    // SAFETY: `residual` is borrowed mutably for the launch.
    unsafe {
        launch_norm(jit, residual.ptr_mut(), Some(delta), weight, rows, hidden, eps, out, fp8)
    }
}

/// # Safety
/// `residual` must point at `rows * hidden` elements, writable when `delta` is given.
#[allow(clippy::too_many_arguments)]
unsafe fn launch_norm<T: HalfFloat>(
    jit: &Jit,
    residual: u64,
    delta: Option<&DeviceBuffer<T>>,
    weight: &DeviceBuffer<T>,
    rows: usize,
    hidden: usize,
    eps: f32,
    out: &mut DeviceBuffer<T>,
    fp8: Option<Fp8Out<'_>>,
) -> Result<()> {
    ensure!(
        weight.len() == hidden,
        "norm weight holds {} elements, hidden is {hidden}",
        weight.len()
    );
    ensure!(out.len() >= rows * hidden, "rms_norm: output too small for {rows} x {hidden}");
    let (q, q_scales) = match fp8 {
        None => (0, 0),
        Some(mut f) => {
            ensure!(
                hidden.is_multiple_of(8) && hidden <= NORM_FP8_MAX,
                "RMSNorm quantizes rows of a multiple of 8 up to {NORM_FP8_MAX}, not {hidden}"
            );
            f.ptrs(rows, hidden)?
        }
    };
    if rows == 0 {
        return Ok(());
    }
    let k = jit.kernel(weight.device(), &ops_spec::<T>(), "rms_norm")?;
    let p = NormParams {
        residual,
        delta: delta.map_or(0, |d| d.ptr()),
        weight: weight.ptr(),
        out: out.ptr_mut(),
        q,
        q_scales,
        rows: rows as i32,
        hidden: hidden as i32,
        eps,
        reserved: 0,
    };
    // SAFETY: sizes checked here and by the callers.
    unsafe { k.launch(weight.device(), rows_cfg(rows, NORM_THREADS), &p) }
}

/// `out = silu(gate) * up` from `[rows, gate | up]`.
pub fn silu_mul<T: HalfFloat>(
    jit: &Jit,
    gate_up: &DeviceBuffer<T>,
    rows: usize,
    inter: usize,
    out: &mut DeviceBuffer<T>,
) -> Result<()> {
    ensure!(
        gate_up.len() >= rows * 2 * inter && out.len() >= rows * inter,
        "silu_mul: buffers too small"
    );
    if rows * inter == 0 {
        return Ok(());
    }
    let k = jit.kernel(gate_up.device(), &ops_spec::<T>(), "silu_mul")?;
    let p = SiluParams {
        gate_up: gate_up.ptr(),
        out: out.ptr_mut(),
        q: 0,
        q_scales: 0,
        rows: rows as i32,
        inter: inter as i32,
    };
    // A thread a 16-byte vector of 8 outputs where `inter` allows (else an element): sized by
    // elements, 7 in 8 blocks had nothing to do, and at 256 rows the launch took 22 us on
    // the H200 where its bytes take 5 (bench/NOTES.md).
    let items = if inter.is_multiple_of(8) { rows * inter / 8 } else { rows * inter };
    let blocks = items.div_ceil(256).min(65535) as u32;
    let cfg =
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: sizes checked above.
    unsafe { k.launch(gate_up.device(), cfg, &p) }
}

/// `silu_mul`, and its output quantized to `fp8` (`inter` a multiple of 8 up to
/// `SILU_FP8_MAX`; sm_89 or later).
pub fn silu_mul_fp8<T: HalfFloat>(
    jit: &Jit,
    gate_up: &DeviceBuffer<T>,
    rows: usize,
    inter: usize,
    out: &mut DeviceBuffer<T>,
    mut fp8: Fp8Out<'_>,
) -> Result<()> {
    ensure!(
        gate_up.len() >= rows * 2 * inter && out.len() >= rows * inter,
        "silu_mul: buffers too small"
    );
    ensure!(
        inter > 0 && inter.is_multiple_of(8) && inter <= SILU_FP8_MAX,
        "silu_mul_fp8 takes rows of a multiple of 8 up to {SILU_FP8_MAX}, not {inter}"
    );
    let (q, q_scales) = fp8.ptrs(rows, inter)?;
    if rows == 0 {
        return Ok(());
    }
    let k = jit.kernel(gate_up.device(), &ops_spec::<T>(), "silu_mul_fp8")?;
    let p = SiluParams {
        gate_up: gate_up.ptr(),
        out: out.ptr_mut(),
        q,
        q_scales,
        rows: rows as i32,
        inter: inter as i32,
    };
    // SAFETY: sizes checked above; one block per row.
    unsafe { k.launch(gate_up.device(), rows_cfg(rows, SILU_FP8_THREADS), &p) }
}

/// Threads of an `rms_norm` block (`NORM_THREADS` in ops.cu).
const NORM_THREADS: u32 = 256;
/// Threads of a `silu_mul_fp8` block (`SILU_FP8_THREADS` in ops.cu).
const SILU_FP8_THREADS: u32 = 512;

/// `out[i] = x[rows[i]]` for `count` rows of `cols`; `rows[i] < x.len() / cols` is the
/// caller's promise (checked on the host when the row list was made).
pub fn gather_rows<T: HalfFloat>(
    jit: &Jit,
    x: &DeviceBuffer<T>,
    rows: &DeviceBuffer<i32>,
    count: usize,
    cols: usize,
    out: &mut DeviceBuffer<T>,
) -> Result<()> {
    ensure!(cols.is_multiple_of(8), "gather_rows: {cols} columns is not a multiple of 8");
    ensure!(rows.len() >= count && out.len() >= count * cols, "gather_rows: buffers too small");
    if count == 0 {
        return Ok(());
    }
    let k = jit.kernel(x.device(), &ops_spec::<T>(), "gather_rows")?;
    let p = GatherParams {
        x: x.ptr(),
        rows: rows.ptr(),
        out: out.ptr_mut(),
        count: count as i32,
        cols: cols as i32,
    };
    // SAFETY: sizes checked above; row indices are the caller's checked promise.
    unsafe { k.launch(x.device(), rows_cfg(count, 128), &p) }
}

/// One row's sampling parameters, as sampling.cu reads them (56 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleRow {
    /// <= 0: greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub min_p: f32,
    pub top_k: i32,
    pub seed: u64,
    pub index: u64,
    /// The row's `logit_bias`: entries `bias_start..bias_start + bias_count` of the
    /// extras' bias lists (count 0: none).
    pub bias_start: i32,
    pub bias_count: i32,
    /// Alternatives to report (at most `SamplerExtras::top_stride`).
    pub top_n: i32,
    /// The row's allowed-token bitmask in the extras, -1: every token allowed.
    pub mask_row: i32,
    /// >= 0: score this token (its raw log-probability and the alternatives), no draw.
    pub target: i32,
    pub reserved: i32,
}

impl Default for SampleRow {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            min_p: 0.0,
            top_k: 0,
            seed: 0,
            index: 0,
            bias_start: 0,
            bias_count: 0,
            top_n: 0,
            mask_row: -1,
            target: -1,
            reserved: 0,
        }
    }
}

impl SampleRow {
    /// u32 words per row.
    pub const WORDS: usize = 14;

    /// The row as `WORDS` u32 words, for upload.
    pub fn words(&self) -> [u32; Self::WORDS] {
        [
            self.temperature.to_bits(),
            self.top_p.to_bits(),
            self.min_p.to_bits(),
            self.top_k as u32,
            self.seed as u32,
            (self.seed >> 32) as u32,
            self.index as u32,
            (self.index >> 32) as u32,
            self.bias_start as u32,
            self.bias_count as u32,
            self.top_n as u32,
            self.mask_row as u32,
            self.target as u32,
            self.reserved as u32,
        ]
    }
}

const _: () = assert!(std::mem::size_of::<SampleRow>() == SampleRow::WORDS * 4);

/// What the rows' bias, masks and alternatives live in (all optional).
#[derive(Default)]
pub struct SamplerExtras<'a> {
    /// `[bias tokens (bias_len), bias values as f32 bits (bias_len), masks
    /// (mask_rows × mask_words)]`.
    pub inputs: Option<&'a DeviceBuffer<u32>>,
    pub bias_len: usize,
    pub mask_rows: usize,
    /// u32 words of one allowed-token bitmask (bit t of word t / 32: token t allowed).
    pub mask_words: usize,
    /// Alternatives out: `[rows, top_stride]` tokens and log-probabilities.
    pub top: Option<(&'a mut DeviceBuffer<i32>, &'a mut DeviceBuffer<f32>)>,
    pub top_stride: usize,
}

/// Samples one token per row of `logits` (`[rows, vocab]` f32) with `params` (the device
/// copy of `host_rows`' words, which bound what the kernel reads); writes tokens and
/// their raw log-probabilities, and each row's alternatives into `extras.top`. Rows with
/// a bias or a mask are edited in place in `logits`.
#[allow(clippy::too_many_arguments)]
pub fn sample_rows(
    jit: &Jit,
    logits: &mut DeviceBuffer<f32>,
    params: &DeviceBuffer<u32>,
    host_rows: &[SampleRow],
    vocab: usize,
    extras: SamplerExtras,
    tokens: &mut DeviceBuffer<i32>,
    logprobs: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let rows = host_rows.len();
    ensure!(
        logits.len() >= rows * vocab && params.len() >= rows * SampleRow::WORDS,
        "sample_rows: inputs too small for {rows} rows"
    );
    ensure!(
        tokens.len() >= rows && logprobs.len() >= rows,
        "sample_rows: outputs too small for {rows} rows"
    );
    // One-pass rows read a vocabulary of whole float4s 16 bytes at a time.
    ensure!(
        !vocab.is_multiple_of(4) || logits.ptr().is_multiple_of(16),
        "sample_rows: logits at {:#x} are not 16-byte aligned",
        logits.ptr()
    );
    let input_len = 2 * extras.bias_len + extras.mask_rows * extras.mask_words;
    ensure!(
        extras.inputs.map_or(input_len == 0, |b| b.len() >= input_len),
        "sample_rows: the extras hold fewer than {input_len} words"
    );
    ensure!(
        extras.mask_rows == 0 || extras.mask_words * 32 >= vocab,
        "sample_rows: {} mask words cannot cover {vocab} tokens",
        extras.mask_words
    );
    ensure!(
        extras.top.as_ref().is_none_or(|(t, l)| {
            t.len() >= rows * extras.top_stride && l.len() >= rows * extras.top_stride
        }),
        "sample_rows: alternatives' outputs too small for {rows} x {}",
        extras.top_stride
    );
    for (i, r) in host_rows.iter().enumerate() {
        let bias_end = r.bias_start as i64 + r.bias_count as i64;
        let top_room = if extras.top.is_some() { extras.top_stride } else { 0 };
        ensure!(
            r.bias_start >= 0 && r.bias_count >= 0 && bias_end <= extras.bias_len as i64,
            "sample_rows: row {i}'s bias {}..{bias_end} outside {}",
            r.bias_start,
            extras.bias_len
        );
        ensure!(
            r.mask_row >= -1 && (r.mask_row as i64) < extras.mask_rows as i64,
            "sample_rows: row {i}'s mask {} outside {}",
            r.mask_row,
            extras.mask_rows
        );
        ensure!(r.target < vocab as i32, "sample_rows: row {i}'s target {} >= {vocab}", r.target);
        ensure!(
            r.top_n >= 0 && r.top_n as usize <= top_room,
            "sample_rows: row {i} asks {} alternatives, room for {top_room}",
            r.top_n
        );
    }
    if rows == 0 {
        return Ok(());
    }
    let k = jit.kernel(logits.device(), &sampling_spec(), "sample_rows")?;
    let base = extras.inputs.map_or(0, |b| b.ptr());
    let (top_tokens, top_logprobs) = extras.top.map_or((0, 0), |(t, l)| (t.ptr_mut(), l.ptr_mut()));
    let p = SampleParams {
        logits: logits.ptr_mut(),
        params: params.ptr(),
        tokens: tokens.ptr_mut(),
        logprobs: logprobs.ptr_mut(),
        bias_tokens: base,
        bias_values: base + 4 * extras.bias_len as u64,
        masks: base + 8 * extras.bias_len as u64,
        mask_words: extras.mask_words as i32,
        top_tokens,
        top_logprobs,
        top_stride: extras.top_stride as i32,
        rows: rows as i32,
        vocab: vocab as i32,
    };
    // SAFETY: sizes checked above, and every row's ranges within them.
    unsafe { k.launch(logits.device(), rows_cfg(rows, 1024), &p) }
}
