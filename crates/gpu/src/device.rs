//! Device selection, the one stream every operation is ordered on, and allocation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUdevice_attribute as Attr;
use cudarc::driver::{CudaContext, CudaModule, CudaStream};

use crate::arch::Arch;
use crate::buffer::DeviceBuffer;
use crate::dtype::Element;
use crate::error::{DriverCall, GpuError, Result};
use crate::libs::{self, CudaLibrary};

/// What `doctor` and the kernel heuristics need to know about a GPU.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (u32, u32),
    pub sm_count: u32,
    pub total_memory: usize,
    pub l2_bytes: usize,
    /// Largest dynamic shared memory a block may opt into.
    pub max_shared_per_block: usize,
    pub clock_mhz: u32,
    pub memory_clock_mhz: u32,
    pub memory_bus_bits: u32,
}

impl DeviceInfo {
    pub fn arch(&self) -> Arch {
        Arch::for_compute_capability(self.compute_capability.0, self.compute_capability.1)
    }
}

/// One GPU and the stream our work is ordered on. Cheap to clone.
///
/// All work goes through one stream, so stream order is the only synchronisation the
/// crate relies on; cudarc's per-buffer event tracking is switched off (it would add
/// events to every launch and break CUDA graph capture).
#[derive(Clone)]
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: Arc<DeviceInfo>,
    modules: Arc<Modules>,
}

/// The modules loaded on a device, by image. Loading and unloading a module are
/// context-wide calls: both wait for captures in flight (`graph::outside_captures`).
#[derive(Default)]
struct Modules(Mutex<HashMap<String, Arc<CudaModule>>>);

impl Drop for Modules {
    fn drop(&mut self) {
        let map = self.0.get_mut().unwrap_or_else(|e| e.into_inner());
        crate::graph::outside_captures(|| map.clear());
    }
}

impl Device {
    /// Number of CUDA devices; `Ok(0)` when the driver is there but sees no GPU.
    pub fn count() -> Result<usize> {
        libs::ensure_loaded(CudaLibrary::Driver)?;
        match cudarc::driver::result::init() {
            Ok(()) => {}
            Err(e) if is_no_device(&e) => return Ok(0),
            Err(source) => return Err(GpuError::Driver { call: "cuInit", source }),
        }
        let n = CudaContext::device_count().call("cuDeviceGetCount")?;
        Ok(n.max(0) as usize)
    }

    /// Opens GPU `ordinal`. Fails with `GpuError::NoDevice` or `LibraryMissing` on a
    /// machine without one, never panics.
    pub fn open(ordinal: usize) -> Result<Device> {
        let count = Self::count()?;
        if count == 0 {
            return Err(GpuError::NoDevice("the CUDA driver reports no device".into()));
        }
        if ordinal >= count {
            return Err(GpuError::NoDevice(format!(
                "asked for GPU {ordinal} but the driver reports {count}"
            )));
        }
        let (ctx, stream) = crate::graph::outside_captures(|| -> Result<_> {
            let ctx = CudaContext::new(ordinal).call("cuDevicePrimaryCtxRetain")?;
            // SAFETY: every buffer and launch of this crate goes through `stream`, one
            // stream per device, so stream order already serialises all accesses.
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx.new_stream().call("cuStreamCreate")?;
            Ok((ctx, stream))
        })?;
        let info = Arc::new(query_info(&ctx, ordinal)?);
        Ok(Device { ctx, stream, info, modules: Default::default() })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn arch(&self) -> Arch {
        self.info.arch()
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().call("cuMemGetInfo")
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().call("cuStreamSynchronize")
    }

    /// Allocates `len` elements. The contents are undefined: poison or fill before use.
    pub fn alloc<T: Element>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        // SAFETY: the memory is uninitialised device memory; DeviceBuffer never reads it
        // on the host before something writes it (callers fill or copy into it).
        let slice = unsafe { self.stream.alloc::<T>(len) }.call("cuMemAllocAsync")?;
        Ok(DeviceBuffer::new(slice, self.clone()))
    }

    pub fn alloc_zeros<T: Element>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        let slice = self.stream.alloc_zeros::<T>(len).call("cuMemAllocAsync")?;
        Ok(DeviceBuffer::new(slice, self.clone()))
    }

    /// Allocates a buffer holding a copy of `data`.
    pub fn upload<T: Element>(&self, data: &[T]) -> Result<DeviceBuffer<T>> {
        let mut buf = self.alloc(data.len())?;
        buf.copy_from_host(data)?;
        Ok(buf)
    }

    /// Loads a compiled module (cubin) once per device; `key` identifies the image.
    pub(crate) fn load_module(&self, key: &str, image: &[u8]) -> Result<Arc<CudaModule>> {
        let lock = || self.modules.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = lock().get(key) {
            return Ok(m.clone());
        }
        // Loaded without holding the map's lock, which may wait for captures; a thread
        // that loaded the same image meanwhile wins (ours unloads when dropped).
        let module = crate::graph::outside_captures(|| {
            self.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))
        })
        .call("cuModuleLoadData")?;
        Ok(lock().entry(key.to_string()).or_insert(module).clone())
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Device({}: {})", self.info.ordinal, self.info.name)
    }
}

fn is_no_device(e: &cudarc::driver::DriverError) -> bool {
    use cudarc::driver::sys::CUresult;
    matches!(e.0, CUresult::CUDA_ERROR_NO_DEVICE | CUresult::CUDA_ERROR_NOT_INITIALIZED)
}

fn query_info(ctx: &Arc<CudaContext>, ordinal: usize) -> Result<DeviceInfo> {
    let attr = |a: Attr| -> Result<u32> {
        ctx.attribute(a).call("cuDeviceGetAttribute").map(|v| v.max(0) as u32)
    };
    let (major, minor) = ctx.compute_capability().call("cuDeviceGetAttribute")?;
    Ok(DeviceInfo {
        ordinal,
        name: ctx.name().call("cuDeviceGetName")?,
        compute_capability: (major as u32, minor as u32),
        sm_count: attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        total_memory: ctx.total_mem().call("cuDeviceTotalMem")?,
        l2_bytes: attr(Attr::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as usize,
        max_shared_per_block: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
            as usize,
        clock_mhz: attr(Attr::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)? / 1000,
        memory_clock_mhz: attr(Attr::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)? / 1000,
        memory_bus_bits: attr(Attr::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)?,
    })
}

/// Opens GPU 0 for a GPU test, or fails the test with the reason there is none.
/// GPU tests must fail, not skip, on a machine without a GPU.
pub fn require_gpu() -> Device {
    match Device::open(0) {
        Ok(d) => d,
        Err(e) => panic!(
            "this test needs a CUDA GPU (it runs with the `cuda` feature) but none is usable: {e}"
        ),
    }
}
