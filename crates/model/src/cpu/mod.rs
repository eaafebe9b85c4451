//! The CPU backend: f32 compute over f32/bf16/f16 weights, several threads (rayon), an f32
//! KV pool in the shared HND layout. It is the reference the CUDA backend is tested
//! against, so every op is written the plain way.
//!
//! With a sparse policy in its `KvPoolSpec`, decode queries of the sparse layers attend to the pages Quest picks
//! (`attention::sparse_heads`). With `set_probe`, the backend keeps each layer's rotated
//! queries of the last step for quality studies (`probe_queries`, `page_kv`).

mod attention;
mod linear;

pub use attention::select_pages;

use radix_kv::{KvDtype, KvGeometry, SparsePolicy};

use crate::backend::{Activation, Backend, KvPoolSpec, Step, StepRun};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::fp8::{KvScales, round_e4m3};
use crate::sampling::{self, SampleRequest, Sampled};
use crate::tensor::{HostData, HostTensor};
use crate::tp::{CpuComm, TpShard};

/// An f32 activation matrix.
#[derive(Clone, Debug)]
pub struct CpuAct {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl Activation for CpuAct {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
}

impl CpuAct {
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// A weight in its checkpoint dtype, converted to f32 block by block as it is used.
pub struct CpuWeight {
    pub data: HostData,
    pub rows: usize,
    pub cols: usize,
}

/// One layer's KV pages, `[num_pages, num_kv_heads, page_size, head_dim]` each.
struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The KV pool and what `init_kv` fixed with it.
struct CpuPool {
    geometry: KvGeometry,
    num_pages: usize,
    num_heads: usize,
    layers: Vec<LayerKv>,
    inv_freq: Vec<f32>,
    /// Sparse paging, when on (`KvPoolSpec::sparse`).
    sparse: Option<SparsePolicy>,
}

impl CpuPool {
    fn attention_geometry(&self) -> attention::Geometry {
        let g = &self.geometry;
        attention::Geometry {
            num_heads: self.num_heads,
            num_kv_heads: g.num_kv_heads(),
            head_dim: g.head_dim(),
            page_size: g.page_size(),
        }
    }
}

pub struct CpuBackend {
    pool: Option<CpuPool>,
    /// The step metadata, copied in `begin_step`.
    step: Step,
    /// The last logits, `[logit_rows, vocab]`.
    logits: Vec<f32>,
    vocab: usize,
    /// With `set_probe(true)`: per layer, the rotated queries of the last token of each
    /// sequence of the last step, `[batch, num_heads × head_dim]` (empty: not recorded).
    probe: Option<Vec<Vec<f32>>>,
    /// Tensor parallelism: this rank's handle on the group's in-process all-reduce.
    comm: Option<CpuComm>,
    /// `--kv-cache-dtype fp8_e4m3`: keys and values are rounded to e4m3 with these
    /// per-layer scales as they are appended (the pool stays f32: the numbers of an FP8
    /// cache, the reference for the GPU's).
    kv_fp8: Option<KvScales>,
}

impl CpuBackend {
    pub fn new() -> Self {
        Self {
            pool: None,
            step: Step::default(),
            logits: Vec::new(),
            vocab: 0,
            probe: None,
            comm: None,
            kv_fp8: None,
        }
    }

    /// One rank of a tensor-parallel group (`CpuComm::group`): the model loads this
    /// rank's slices and the all-reduce runs over threads.
    pub fn with_comm(comm: CpuComm) -> Self {
        Self { comm: Some(comm), ..Self::new() }
    }

    /// Records (or stops recording) each layer's rotated queries of every step's last
    /// tokens, read back with `probe_queries`.
    pub fn set_probe(&mut self, on: bool) {
        self.probe = on.then(Vec::new);
    }

    /// Layer `layer`'s rotated queries (RoPE applied, as attention saw them) of the last
    /// token of each sequence of the last step, `[batch, num_heads × head_dim]`; `None`
    /// unless the probe is on and that layer ran.
    pub fn probe_queries(&self, layer: usize) -> Option<&[f32]> {
        let rows = self.probe.as_ref()?.get(layer)?;
        (!rows.is_empty()).then_some(rows.as_slice())
    }

    /// Keys and values of page `page` of layer `layer`'s pool, each
    /// `[num_kv_heads, page_size, head_dim]` (keys rotated); `None` outside the pool.
    pub fn page_kv(&self, layer: usize, page: usize) -> Option<(&[f32], &[f32])> {
        let pool = self.pool.as_ref()?;
        let kv = pool.layers.get(layer)?;
        if page >= pool.num_pages {
            return None;
        }
        let n = pool.geometry.page_elems();
        Some((&kv.k[page * n..(page + 1) * n], &kv.v[page * n..(page + 1) * n]))
    }

    fn pool(&self) -> Result<&CpuPool> {
        self.pool.as_ref().ok_or_else(|| ModelError::Invalid("call init_kv first".into()))
    }

    fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
        if cond { Ok(()) } else { Err(ModelError::Invalid(msg())) }
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl Backend for CpuBackend {
    type Act = CpuAct;
    type Weight = CpuWeight;

    fn name(&self) -> String {
        let threads = rayon::current_num_threads();
        match self.shard() {
            TpShard { size: 1, .. } => format!("cpu ({threads} threads)"),
            TpShard { rank, size } => format!("cpu rank {rank}/{size} ({threads} threads)"),
        }
    }

    fn shard(&self) -> TpShard {
        self.comm.as_ref().map_or(TpShard::SINGLE, CpuComm::shard)
    }

    fn all_reduce(&mut self, x: &mut CpuAct) -> Result<()> {
        match &self.comm {
            Some(comm) => comm.all_reduce(&mut x.data),
            None => Ok(()),
        }
    }

    fn upload(&mut self, t: &HostTensor) -> Result<CpuWeight> {
        let (rows, cols) = t.matrix_dims();
        // FP8 weights dequantize once here (`q * s` in f32): the same numbers, without
        // dequantizing a panel on every product.
        let data = match &t.data {
            HostData::Fp8(_) => HostData::F32(t.data.to_f32()),
            other => other.clone(),
        };
        Ok(CpuWeight { data, rows, cols })
    }

    fn kv_dtype(&self) -> KvDtype {
        KvDtype::F32
    }

    fn set_kv_cache_fp8(&mut self, scales: KvScales) -> Result<()> {
        scales.validate()?;
        Self::check(self.pool.is_none(), || {
            "set the FP8 KV cache before init_kv: the pool exists".into()
        })?;
        self.kv_fp8 = Some(scales);
        Ok(())
    }

    fn init_kv(&mut self, cfg: &ModelConfig, spec: &KvPoolSpec) -> Result<KvGeometry> {
        if let Some(s) = &self.kv_fp8 {
            Self::check(s.k.len() == cfg.num_layers && s.v.len() == cfg.num_layers, || {
                format!("FP8 KV cache: {} scales for {} layers", s.k.len(), cfg.num_layers)
            })?;
        }
        let geometry = spec.geometry(cfg, self.kv_dtype())?;
        let per_layer = geometry.layer_elems(spec.num_pages);
        self.pool = Some(CpuPool {
            geometry,
            num_pages: spec.num_pages,
            num_heads: cfg.num_heads,
            layers: (0..cfg.num_layers)
                .map(|_| LayerKv { k: vec![0.0; per_layer], v: vec![0.0; per_layer] })
                .collect(),
            inv_freq: cfg.rope.inv_freq(),
            sparse: spec.sparse,
        });
        Ok(geometry)
    }

    fn begin_step(&mut self, s: &Step) -> Result<StepRun> {
        let pool = self.pool()?;
        let n = s.tokens.len();
        Self::check(s.positions.len() == n && s.slots.len() == n, || {
            format!(
                "step has {n} tokens but {} positions and {} slots",
                s.positions.len(),
                s.slots.len()
            )
        })?;
        let capacity = (pool.num_pages * pool.geometry.page_size()) as i32;
        Self::check(s.slots.iter().all(|&x| (0..capacity).contains(&x)), || {
            format!("a slot lies outside the KV pool of {capacity} slots")
        })?;
        Self::check(s.kv_indices.iter().all(|&p| (0..pool.num_pages as i32).contains(&p)), || {
            format!("a page id lies outside the pool of {} pages", pool.num_pages)
        })?;
        Self::check(s.logit_rows.iter().all(|&r| (r as usize) < n), || {
            "a logit row is past the step's tokens".into()
        })?;
        s.sparse_rows(pool.sparse.as_ref())?;
        self.step.clone_from(s);
        if let Some(layers) = &mut self.probe {
            layers.iter_mut().for_each(Vec::clear);
        }
        Ok(StepRun::eager(s))
    }

    fn act(&mut self, rows: usize, cols: usize) -> Result<CpuAct> {
        Ok(CpuAct { data: vec![0.0; rows * cols], rows, cols })
    }

    fn embed(&mut self, table: &CpuWeight, out: &mut CpuAct) -> Result<()> {
        Self::check(out.rows == self.step.tokens.len() && out.cols == table.cols, || {
            "embed: shape mismatch".into()
        })?;
        for (t, &id) in self.step.tokens.iter().enumerate() {
            Self::check((id as usize) < table.rows, || {
                format!("token id {id} is outside the vocabulary of {}", table.rows)
            })?;
            table.data.read_f32(
                id as usize * table.cols,
                &mut out.data[t * out.cols..(t + 1) * out.cols],
            );
        }
        Ok(())
    }

    fn rms_norm(&mut self, x: &CpuAct, w: &CpuWeight, eps: f32, out: &mut CpuAct) -> Result<()> {
        Self::check(x.cols == w.rows * w.cols && out.cols == x.cols && out.rows == x.rows, || {
            "rms_norm: shape mismatch".into()
        })?;
        let weight = w.data.to_f32();
        for r in 0..x.rows {
            norm_row(x.row(r), &weight, eps, &mut out.data[r * x.cols..(r + 1) * x.cols]);
        }
        Ok(())
    }

    fn add_rms_norm(
        &mut self,
        residual: &mut CpuAct,
        delta: &CpuAct,
        w: &CpuWeight,
        eps: f32,
        out: &mut CpuAct,
    ) -> Result<()> {
        Self::check(residual.data.len() == delta.data.len(), || {
            "add_rms_norm: shape mismatch".into()
        })?;
        residual.data.iter_mut().zip(&delta.data).for_each(|(r, d)| *r += d);
        self.rms_norm(residual, w, eps, out)
    }

    fn linear(
        &mut self,
        x: &CpuAct,
        w: &CpuWeight,
        bias: Option<&CpuWeight>,
        out: &mut CpuAct,
    ) -> Result<()> {
        Self::check(x.cols == w.cols && out.rows == x.rows && out.cols == w.rows, || {
            format!(
                "linear: x [{}, {}] · w [{}, {}]ᵀ into [{}, {}]",
                x.rows, x.cols, w.rows, w.cols, out.rows, out.cols
            )
        })?;
        let bias = bias.map(|b| b.data.to_f32());
        if let Some(b) = &bias {
            Self::check(b.len() == w.rows, || "linear: bias length".into())?;
        }
        linear::matmul_nt(&x.data, x.rows, x.cols, &w.data, w.rows, bias.as_deref(), &mut out.data);
        Ok(())
    }

    fn rope_append(&mut self, layer: usize, qkv: &CpuAct, q: &mut CpuAct) -> Result<()> {
        let pool =
            self.pool.as_mut().ok_or_else(|| ModelError::Invalid("call init_kv first".into()))?;
        let g = pool.geometry;
        let (hq, hkv, d, ps) = (pool.num_heads, g.num_kv_heads(), g.head_dim(), g.page_size());
        Self::check(
            qkv.cols == (hq + 2 * hkv) * d
                && q.cols == hq * d
                && q.rows == qkv.rows
                && layer < pool.layers.len(),
            || "rope_append: shape mismatch".into(),
        )?;
        let kv = &mut pool.layers[layer];
        let inv_freq = &pool.inv_freq;
        let fp8 = self.kv_fp8.as_ref();
        for t in 0..qkv.rows {
            let row = qkv.row(t);
            let pos = self.step.positions[t] as f32;
            let slot = self.step.slots[t] as usize;
            let (page, off) = (slot / ps, slot % ps);
            for h in 0..hq {
                rotate(
                    &row[h * d..(h + 1) * d],
                    pos,
                    inv_freq,
                    &mut q.data[(t * hq + h) * d..][..d],
                );
            }
            for kh in 0..hkv {
                let at = ((page * hkv + kh) * ps + off) * d;
                rotate(&row[(hq + kh) * d..][..d], pos, inv_freq, &mut kv.k[at..at + d]);
                kv.v[at..at + d].copy_from_slice(&row[(hq + hkv + kh) * d..][..d]);
                if let Some(s) = fp8 {
                    let (ks, vs) = (s.k[layer], s.v[layer]);
                    kv.k[at..at + d].iter_mut().for_each(|x| *x = round_e4m3(*x, ks));
                    kv.v[at..at + d].iter_mut().for_each(|x| *x = round_e4m3(*x, vs));
                }
            }
        }
        Ok(())
    }

    fn attention(&mut self, layer: usize, q: &CpuAct, out: &mut CpuAct) -> Result<()> {
        let pool =
            self.pool.as_ref().ok_or_else(|| ModelError::Invalid("call init_kv first".into()))?;
        Self::check(out.rows == q.rows && out.cols == q.cols && layer < pool.layers.len(), || {
            "attention: shape mismatch".into()
        })?;
        let kv = &pool.layers[layer];
        let s = &self.step;
        let geometry = pool.attention_geometry();
        let table = || attention::Table {
            qo_indptr: &s.qo_indptr,
            kv_indptr: &s.kv_indptr,
            kv_indices: &s.kv_indices,
            kv_last_page_len: &s.kv_last_page_len,
        };
        if let Some(layers) = &mut self.probe {
            // A sequence without queries this step (none in practice) records zeros.
            let row = q.cols;
            let mut last = vec![0.0f32; s.qo_indptr.len().saturating_sub(1) * row];
            for (b, w) in s.qo_indptr.windows(2).enumerate() {
                if w[1] > w[0] {
                    let t = w[1] as usize - 1;
                    last[b * row..(b + 1) * row].copy_from_slice(q.row(t));
                }
            }
            if layers.len() <= layer {
                layers.resize(layer + 1, Vec::new());
            }
            layers[layer] = last;
        }
        let heads = match &pool.sparse {
            Some(policy) if policy.layer_is_sparse(layer) && !s.kv_keep.is_empty() => Some(
                attention::sparse_heads(&geometry, &table(), &s.kv_keep, policy, &q.data, &kv.k)?,
            ),
            _ => None,
        };
        attention::paged_attention(
            &geometry,
            table(),
            heads.as_ref(),
            &q.data,
            &kv.k,
            &kv.v,
            &mut out.data,
        )
    }

    fn silu_mul(&mut self, gate_up: &CpuAct, out: &mut CpuAct) -> Result<()> {
        let inter = out.cols;
        Self::check(gate_up.cols == 2 * inter && gate_up.rows == out.rows, || {
            "silu_mul: shape mismatch".into()
        })?;
        for r in 0..out.rows {
            let (g, u) = gate_up.row(r).split_at(inter);
            for ((o, &g), &u) in out.data[r * inter..(r + 1) * inter].iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        }
        Ok(())
    }

    fn gather_logit_rows(&mut self, x: &CpuAct, out: &mut CpuAct) -> Result<()> {
        Self::check(out.rows == self.step.logit_rows.len() && out.cols == x.cols, || {
            "gather: shape mismatch".into()
        })?;
        for (i, &r) in self.step.logit_rows.iter().enumerate() {
            out.data[i * x.cols..(i + 1) * x.cols].copy_from_slice(x.row(r as usize));
        }
        Ok(())
    }

    fn logits(&mut self, x: &CpuAct, head: &CpuWeight) -> Result<()> {
        Self::check(x.cols == head.cols, || "logits: shape mismatch".into())?;
        self.logits.resize(x.rows * head.rows, 0.0);
        linear::matmul_nt(&x.data, x.rows, x.cols, &head.data, head.rows, None, &mut self.logits);
        self.vocab = head.rows;
        Ok(())
    }

    fn sample(&mut self, requests: &[SampleRequest]) -> Result<Vec<Sampled>> {
        let vocab = self.vocab;
        Self::check(vocab > 0 && requests.len() * vocab == self.logits.len(), || {
            format!(
                "sample: {} requests for {} logits rows",
                requests.len(),
                self.logits.len() / vocab.max(1)
            )
        })?;
        Ok(self
            .logits
            .chunks_mut(vocab)
            .zip(requests)
            .map(|(row, req)| sampling::sample(row, req))
            .collect())
    }

    fn read_logits(&mut self) -> Result<Vec<f32>> {
        Ok(self.logits.clone())
    }
}

/// RMSNorm of one row, in f32 as transformers computes it.
fn norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * inv);
    }
}

/// "rotate_half" RoPE of one head, angles and products in f32 (as transformers does).
fn rotate(x: &[f32], pos: f32, inv_freq: &[f32], out: &mut [f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let angle = pos * inv_freq[i];
        let (s, c) = (angle.sin(), angle.cos());
        out[i] = x[i] * c - x[i + half] * s;
        out[i + half] = x[i + half] * c + x[i] * s;
    }
}
