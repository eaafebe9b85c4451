//! The CUDA backend's KV pool: per layer K and V in bf16 (the shared HND layout), or as
//! e4m3 bytes with the layer's scales (`--kv-cache-dtype fp8_e4m3`), and, with sparse
//! paging, the key-bounds records beside them; plus what the appends read
//! with it (the RoPE frequencies). Everything is allocated once, from the pool's
//! geometry, by `init_kv`.

use half::bf16;
use radix_gpu::{Device, DeviceBuffer};
use radix_kernels::attention::KvFp8Scales;
use radix_kernels::kv_append::PoolShape;
use radix_kv::{KvDtype, SparsePolicy};

use super::CudaBackend;
use crate::backend::KvPoolSpec;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::fp8::KvScales;

/// The dtype of the CUDA backend's 16-bit pool.
pub(super) const KV_DTYPE: KvDtype = KvDtype::BF16;

/// One layer's pages.
pub(super) struct LayerKv {
    pub kv: LayerData,
    /// A record per (page, kv head) when sparse paging is on.
    pub bounds: Option<DeviceBuffer<u8>>,
}

/// One layer's keys and values.
pub(super) enum LayerData {
    Bf16 {
        k: DeviceBuffer<bf16>,
        v: DeviceBuffer<bf16>,
    },
    /// e4m3 bytes; a key is its byte times `scales.k`, a value times `scales.v`.
    Fp8 {
        k: DeviceBuffer<u8>,
        v: DeviceBuffer<u8>,
        scales: KvFp8Scales,
    },
}

pub(super) struct KvPool {
    /// The engine's pages plus one scratch page (`scratch_page`).
    pub shape: PoolShape,
    pub layers: Vec<LayerKv>,
    pub inv_freq: DeviceBuffer<f32>,
    pub sparse: Option<SparsePolicy>,
}

impl KvPool {
    /// Allocates the pool `spec` asks for, zeroed: `spec.num_pages` pages for the engine
    /// and one scratch page past them, which padding rows of a CUDA graph write to. With
    /// `fp8` scales (one per layer) the pool holds e4m3 bytes.
    pub fn new(
        device: &Device,
        cfg: &ModelConfig,
        spec: &KvPoolSpec,
        fp8: Option<&KvScales>,
    ) -> Result<Self> {
        if let Some(s) = fp8
            && (s.k.len() != cfg.num_layers || s.v.len() != cfg.num_layers)
        {
            return Err(ModelError::Invalid(format!(
                "FP8 KV cache: {} scales for {} layers",
                s.k.len(),
                cfg.num_layers
            )));
        }
        let dtype = if fp8.is_some() { KvDtype::F8E4M3 } else { KV_DTYPE };
        let geometry = spec.geometry(cfg, dtype)?;
        if !matches!(cfg.head_dim, 64 | 128) {
            return Err(ModelError::Invalid(format!(
                "the CUDA attention kernels take head_dim 64 or 128, this model has {}",
                cfg.head_dim
            )));
        }
        let shape = PoolShape::new(geometry, spec.num_pages + 1, cfg.num_heads)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for layer in 0..cfg.num_layers {
            let bounds = match geometry.key_bounds() {
                true => Some(device.alloc_zeros(shape.bounds_bytes())?),
                false => None,
            };
            let n = shape.pool_elems();
            let kv = match fp8 {
                None => LayerData::Bf16 { k: device.alloc_zeros(n)?, v: device.alloc_zeros(n)? },
                Some(s) => LayerData::Fp8 {
                    k: device.alloc_zeros(n)?,
                    v: device.alloc_zeros(n)?,
                    scales: KvFp8Scales { k: s.k[layer], v: s.v[layer] },
                },
            };
            layers.push(LayerKv { kv, bounds });
        }
        let inv_freq = device.upload(&cfg.rope.inv_freq())?;
        Ok(Self { shape, layers, inv_freq, sparse: spec.sparse })
    }

    /// The page past the engine's: padding rows and warm-up steps write only there.
    pub fn scratch_page(&self) -> i32 {
        (self.shape.num_pages() - 1) as i32
    }

    pub fn layer(&self, layer: usize) -> Result<&LayerKv> {
        self.layers
            .get(layer)
            .ok_or_else(|| ModelError::Invalid(format!("layer {layer} has no KV pool")))
    }

    pub fn layer_mut(&mut self, layer: usize) -> Result<&mut LayerKv> {
        self.layers
            .get_mut(layer)
            .ok_or_else(|| ModelError::Invalid(format!("layer {layer} has no KV pool")))
    }
}

impl CudaBackend {
    /// Layer `layer`'s keys, `[pages, num_kv_heads, page_size, head_dim]` (tests; a 16-bit
    /// pool).
    pub fn read_keys(&self, layer: usize) -> Result<Vec<bf16>> {
        match &self.kv()?.layer(layer)?.kv {
            LayerData::Bf16 { k, .. } => Ok(k.to_vec()?),
            LayerData::Fp8 { .. } => {
                Err(ModelError::Invalid("the KV pool is FP8: read_keys reads bf16 pools".into()))
            }
        }
    }

    /// Layer `layer`'s key bounds, a `kv_append::bounds` record per (page, kv head)
    /// (tests; sparse paging on).
    pub fn read_key_bounds(&self, layer: usize) -> Result<Vec<u8>> {
        let bounds = self.kv()?.layer(layer)?.bounds.as_ref().ok_or_else(|| {
            ModelError::Invalid(format!("layer {layer} keeps no key bounds (sparse paging off)"))
        })?;
        Ok(bounds.to_vec()?)
    }
}
