//! The CUDA backend's KV pool: per layer K and V in bf16 (the shared HND layout) and,
//! with sparse paging, the key-bounds records beside them; plus what the appends read
//! with it (the RoPE frequencies). Everything is allocated once, from the pool's
//! geometry, by `init_kv`.

use half::bf16;
use radix_gpu::{Device, DeviceBuffer};
use radix_kernels::kv_append::PoolShape;
use radix_kv::{KvDtype, SparsePolicy};

use super::CudaBackend;
use crate::backend::KvPoolSpec;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// The dtype of the CUDA backend's pool.
pub(super) const KV_DTYPE: KvDtype = KvDtype::BF16;

/// One layer's pages.
pub(super) struct LayerKv {
    pub k: DeviceBuffer<bf16>,
    pub v: DeviceBuffer<bf16>,
    /// A record per (page, kv head) when sparse paging is on.
    pub bounds: Option<DeviceBuffer<u8>>,
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
    /// and one scratch page past them, which padding rows of a CUDA graph write to.
    pub fn new(device: &Device, cfg: &ModelConfig, spec: &KvPoolSpec) -> Result<Self> {
        let geometry = spec.geometry(cfg, KV_DTYPE)?;
        if !matches!(cfg.head_dim, 64 | 128) {
            return Err(ModelError::Invalid(format!(
                "the CUDA attention kernels take head_dim 64 or 128, this model has {}",
                cfg.head_dim
            )));
        }
        let shape = PoolShape::new(geometry, spec.num_pages + 1, cfg.num_heads)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            let bounds = match geometry.key_bounds() {
                true => Some(device.alloc_zeros(shape.bounds_bytes())?),
                false => None,
            };
            layers.push(LayerKv {
                k: device.alloc_zeros(shape.pool_elems())?,
                v: device.alloc_zeros(shape.pool_elems())?,
                bounds,
            });
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
    /// Layer `layer`'s keys, `[pages, num_kv_heads, page_size, head_dim]` (tests).
    pub fn read_keys(&self, layer: usize) -> Result<Vec<bf16>> {
        Ok(self.kv()?.layer(layer)?.k.to_vec()?)
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
