//! Kernel JIT: embedded `.cu` sources compiled by NVRTC for the device's architecture at
//! first use, cached on disk and in memory, loaded once per device.
//!
//! The cache key is a SHA-256 of the preprocessed source, the compile options (defines
//! included), the NVRTC version and the target architecture; any change to any of
//! them compiles anew.

mod cache;
mod nvrtc;
mod pdl;
mod source;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, CudaModule, DeviceRepr, LaunchConfig, PushKernelArg};
use sha2::{Digest, Sha256};

pub use cache::{CACHE_DIR_ENV, default_cache_dir};
pub use pdl::PDL_ENV;
pub use source::{SourceFile, preprocess};

use crate::arch::Arch;
use crate::device::Device;
use crate::error::{DriverCall, GpuError, Result};
use crate::libs;

/// One compilable specialisation: a kernel family's source, its headers, and the
/// compile-time knobs (dtype, head_dim, flags) as `-D` defines.
#[derive(Clone, Debug)]
pub struct KernelSpec {
    pub source: SourceFile,
    pub headers: &'static [SourceFile],
    pub defines: Vec<(String, String)>,
    /// Oldest architecture the source supports (Hopper-only sources say sm_90a).
    pub min_arch: Arch,
}

impl KernelSpec {
    pub fn new(source: SourceFile, headers: &'static [SourceFile]) -> Self {
        Self { source, headers, defines: Vec::new(), min_arch: Arch::SM80 }
    }

    pub fn define(mut self, name: &str, value: impl ToString) -> Self {
        self.defines.push((name.to_string(), value.to_string()));
        self
    }

    pub fn min_arch(mut self, arch: Arch) -> Self {
        self.min_arch = arch;
        self
    }

    /// Readable name built from the knobs, e.g. `prefill.cu[DTYPE=bf16,HEAD_DIM=128]`.
    pub fn label(&self) -> String {
        let knobs: Vec<String> = self.defines.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{}[{}]", self.source.path, knobs.join(","))
    }

    pub fn supports(&self, arch: Arch) -> bool {
        if self.min_arch.specific { arch == self.min_arch } else { arch.sm() >= self.min_arch.sm() }
    }

    fn options(&self, arch: Arch) -> Vec<String> {
        let mut opts = vec![
            format!("--gpu-architecture={arch}"),
            "-std=c++17".to_string(),
            "-lineinfo".to_string(),
            // Register and spill counts land in the log, which `kernels compile -v` shows.
            "--ptxas-options=--verbose".to_string(),
        ];
        opts.extend(self.defines.iter().map(|(k, v)| format!("-D{k}={v}")));
        opts
    }
}

/// A compiled image and what produced it.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub key: String,
    pub cubin: Arc<Vec<u8>>,
    pub log: Arc<String>,
    pub from_disk: bool,
}

/// The compiler front: NVRTC plus the disk and memory caches.
pub struct Jit {
    cache_dir: Option<PathBuf>,
    memory: Mutex<HashMap<String, Compiled>>,
    /// Loaded kernels by (device, spec label, arch, function): the per-launch fast path,
    /// which neither preprocesses nor hashes the source.
    kernels: Mutex<HashMap<(usize, String, Arch, String), Kernel>>,
}

impl Drop for Jit {
    fn drop(&mut self) {
        // The kernels may hold the last references to their modules: unloading one
        // synchronises the context, so not while a capture is in flight.
        let kernels = self.kernels.get_mut().unwrap_or_else(|e| e.into_inner());
        crate::graph::outside_captures(|| kernels.clear());
    }
}

impl Jit {
    /// `cache_dir: None` disables the disk cache (the memory cache always works).
    pub fn new(cache_dir: Option<PathBuf>) -> Self {
        Self { cache_dir, memory: Mutex::new(HashMap::new()), kernels: Mutex::new(HashMap::new()) }
    }

    /// A JIT with the default cache folder (see `default_cache_dir`).
    pub fn with_default_cache() -> Self {
        Self::new(default_cache_dir())
    }

    pub fn cache_dir(&self) -> Option<&PathBuf> {
        self.cache_dir.as_ref()
    }

    /// Compiles `spec` for `arch`, or returns the cached image. Needs NVRTC, no GPU.
    pub fn compile(&self, spec: &KernelSpec, arch: Arch) -> Result<Compiled> {
        if !spec.supports(arch) {
            return Err(GpuError::Invalid(format!(
                "{} needs {} and cannot be built for {arch}",
                spec.label(),
                spec.min_arch
            )));
        }
        let source = preprocess(&spec.source, spec.headers)?;
        let options = spec.options(arch);
        let (major, minor) = libs::nvrtc_version()?;
        let key = cache_key(&spec.label(), &source, &options, (major, minor), arch);

        if let Some(hit) = self.memory.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(hit.clone());
        }
        let stem = spec.source.path.trim_end_matches(".cu").replace('/', "_");
        let compiled = match self.cache_dir.as_ref().and_then(|d| cache::read(d, &stem, &key)) {
            Some(cubin) => Compiled {
                key: key.clone(),
                cubin: Arc::new(cubin),
                log: Arc::new(String::new()),
                from_disk: true,
            },
            None => {
                let started = std::time::Instant::now();
                let out = nvrtc::compile_to_cubin(
                    &spec.label(),
                    spec.source.path,
                    &source,
                    &arch.to_string(),
                    &options,
                )?;
                tracing::debug!(
                    kernel = %spec.label(), %arch, ms = started.elapsed().as_millis() as u64,
                    "compiled with NVRTC"
                );
                if let Some(Err(e)) =
                    self.cache_dir.as_ref().map(|dir| cache::write(dir, &stem, &key, &out.cubin))
                {
                    tracing::warn!("kernel cache not written: {e}");
                }
                Compiled {
                    key: key.clone(),
                    cubin: Arc::new(out.cubin),
                    log: Arc::new(out.log),
                    from_disk: false,
                }
            }
        };
        self.memory.lock().unwrap_or_else(|e| e.into_inner()).insert(key, compiled.clone());
        Ok(compiled)
    }

    /// Function `name` of `spec` on `device`, compiled and loaded at the first call and
    /// looked up by the spec's label afterwards (labels name a source and its defines).
    pub fn kernel(&self, device: &Device, spec: &KernelSpec, name: &str) -> Result<Kernel> {
        let key = (device.info().ordinal, spec.label(), device.arch(), name.to_string());
        if let Some(k) = self.kernels.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(k.clone());
        }
        let kernel = self.load(device, spec)?.function(name)?;
        self.kernels.lock().unwrap_or_else(|e| e.into_inner()).insert(key, kernel.clone());
        Ok(kernel)
    }

    /// Compiles (or fetches) `spec` for `device`'s architecture and loads it there.
    pub fn load(&self, device: &Device, spec: &KernelSpec) -> Result<Module> {
        let compiled = self.compile(spec, device.arch())?;
        let module = device.load_module(&compiled.key, &compiled.cubin)?;
        Ok(Module { module, device: device.clone(), label: spec.label() })
    }
}

fn cache_key(
    label: &str,
    source: &str,
    options: &[String],
    nvrtc: (i32, i32),
    arch: Arch,
) -> String {
    let mut h = Sha256::new();
    for part in [
        label,
        source,
        &options.join("\u{1f}"),
        &format!("nvrtc {}.{}", nvrtc.0, nvrtc.1),
        &arch.to_string(),
    ] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let digest = h.finalize();
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// A module loaded on one device.
pub struct Module {
    module: Arc<CudaModule>,
    device: Device,
    label: String,
}

impl Module {
    pub fn function(&self, name: &str) -> Result<Kernel> {
        let func = self
            .module
            .load_function(name)
            .map_err(|source| GpuError::Driver { call: "cuModuleGetFunction", source });
        let func =
            func.map_err(|e| GpuError::Invalid(format!("{}: kernel {name}: {e}", self.label)))?;
        Ok(Kernel {
            func,
            ordinal: self.device.info().ordinal,
            name: name.to_string(),
            smem_allowed: Default::default(),
            num_regs: Default::default(),
            max_cluster: Default::default(),
            active_clusters: Default::default(),
        })
    }
}

/// One `__global__` function of a loaded module. Launches go to the stream of the device
/// passed in, which must be the one the arguments live on (every `Device` of one GPU
/// shares the context the module was loaded into).
#[derive(Clone)]
pub struct Kernel {
    func: CudaFunction,
    ordinal: usize,
    name: String,
    /// Dynamic shared memory already allowed (shared by the memoised clones), so a launch
    /// per layer does not repeat the driver call.
    smem_allowed: Arc<std::sync::atomic::AtomicUsize>,
    /// Registers a thread starts with, once asked (shared by the memoised clones).
    num_regs: Arc<std::sync::OnceLock<i32>>,
    /// The largest cluster the kernel can run in, once asked (0: no clusters here).
    max_cluster: Arc<std::sync::OnceLock<u32>>,
    /// Clusters of each size asked about that fit on the GPU at once.
    active_clusters: Arc<Mutex<HashMap<u32, u32>>>,
}

impl Kernel {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Registers a thread of the kernel starts with (what ptxas allocated); the driver is
    /// asked once, so a check per launch costs no call.
    pub fn num_regs(&self) -> Result<i32> {
        if let Some(&n) = self.num_regs.get() {
            return Ok(n);
        }
        let n = self.func.num_regs().call("cuFuncGetAttribute")?;
        Ok(*self.num_regs.get_or_init(|| n))
    }

    /// Lets the kernel use `bytes` of dynamic shared memory (needed past 48 KiB).
    pub fn set_max_dynamic_smem(&self, device: &Device, bytes: usize) -> Result<()> {
        use std::sync::atomic::Ordering;
        if bytes <= self.smem_allowed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let max = device.info().max_shared_per_block;
        if bytes > max {
            return Err(GpuError::Invalid(format!(
                "{} wants {bytes} bytes of shared memory; the device allows {max}",
                self.name
            )));
        }
        self.func
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .call("cuFuncSetAttribute")?;
        self.smem_allowed.fetch_max(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Launches on `device`'s stream with one parameter struct passed by value
    /// (`__grid_constant__` on the device side).
    ///
    /// # Safety
    /// `P` must match the kernel's parameter layout exactly, every device pointer in it
    /// must be valid for the accesses the kernel makes with these launch dimensions, and
    /// the buffers must stay alive until the stream has run the kernel.
    pub unsafe fn launch<P: DeviceRepr>(
        &self,
        device: &Device,
        cfg: LaunchConfig,
        params: &P,
    ) -> Result<()> {
        self.check_device(device)?;
        let stream = device.stream();
        if pdl::enabled(device) {
            // SAFETY: forwarded to the caller (see above).
            return unsafe { pdl::launch(stream, &self.func, cfg, params) };
        }
        let mut builder = stream.launch_builder(&self.func);
        builder.arg(params);
        // SAFETY: forwarded to the caller (see above).
        unsafe { builder.launch(cfg) }
            .map(|_| ())
            .map_err(|source| GpuError::Driver { call: "cuLaunchKernel", source })
    }

    fn check_device(&self, device: &Device) -> Result<()> {
        if device.info().ordinal != self.ordinal {
            return Err(GpuError::Invalid(format!(
                "{} was loaded on GPU {} but launched on GPU {}",
                self.name,
                self.ordinal,
                device.info().ordinal
            )));
        }
        Ok(())
    }

    /// The largest thread-block cluster (blocks along x) that this kernel can run in with
    /// `cfg`'s block shape and shared memory on `device`: up to 16 on Hopper, where the
    /// sizes above the portable 8 are allowed here first; 0 before compute capability 9.0.
    /// Asked once (later calls return the first answer).
    pub fn max_cluster_size(&self, device: &Device, cfg: LaunchConfig) -> Result<u32> {
        if let Some(&n) = self.max_cluster.get() {
            return Ok(n);
        }
        if device.info().compute_capability.0 < 9 {
            return Ok(*self.max_cluster.get_or_init(|| 0));
        }
        device.stream().context().bind_to_thread().call("cuCtxSetCurrent")?;
        self.func
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
                1,
            )
            .call("cuFuncSetAttribute")?;
        // The query takes a launch config whose grid is a multiple of the cluster asked
        // about; with no cluster attribute it answers the largest possible one.
        let config = occupancy_config(cfg, 16, std::ptr::null_mut(), 0);
        let mut n: std::ffi::c_int = 0;
        // SAFETY: a valid function and config; the driver writes one int.
        unsafe {
            cudarc::driver::sys::cuOccupancyMaxPotentialClusterSize(
                &mut n,
                self.func.cu_function(),
                &config,
            )
        }
        .result()
        .call("cuOccupancyMaxPotentialClusterSize")?;
        Ok(*self.max_cluster.get_or_init(|| n.max(0) as u32))
    }

    /// How many clusters of `cluster` blocks (along x) with `cfg`'s block shape and shared
    /// memory the GPU runs at once (the driver's occupancy answer; a cluster needs its
    /// blocks on the SMs of one GPC). Asked once per cluster size.
    pub fn max_active_clusters(
        &self,
        device: &Device,
        cfg: LaunchConfig,
        cluster: u32,
    ) -> Result<u32> {
        if cluster == 0 || cluster > self.max_cluster_size(device, cfg)? {
            return Ok(0);
        }
        let mut memo = self.active_clusters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&n) = memo.get(&cluster) {
            return Ok(n);
        }
        use cudarc::driver::sys;
        // SAFETY: an all-zero attribute is a valid value; id and dims are set next.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
        attr.value.clusterDim.x = cluster;
        attr.value.clusterDim.y = 1;
        attr.value.clusterDim.z = 1;
        let config = occupancy_config(cfg, cluster, &mut attr, 1);
        let mut n: std::ffi::c_int = 0;
        // SAFETY: a valid function and config; the driver writes one int.
        unsafe { sys::cuOccupancyMaxActiveClusters(&mut n, self.func.cu_function(), &config) }
            .result()
            .call("cuOccupancyMaxActiveClusters")?;
        let n = n.max(0) as u32;
        memo.insert(cluster, n);
        Ok(n)
    }

    /// Launches `cfg.grid_dim.0 / cluster` clusters of `cluster` blocks along x (Hopper
    /// thread-block clusters: their shared memory is one address space, and they meet at
    /// cluster barriers), with programmatic dependent launch where it is on.
    ///
    /// # Safety
    /// As [`Kernel::launch`]; `cluster` is at most [`Kernel::max_cluster_size`] and divides
    /// the grid's x.
    pub unsafe fn launch_cluster<P: DeviceRepr>(
        &self,
        device: &Device,
        cfg: LaunchConfig,
        cluster: u32,
        params: &P,
    ) -> Result<()> {
        self.check_device(device)?;
        let max = self.max_cluster_size(device, cfg)?;
        if cluster == 0 || cluster > max || !cfg.grid_dim.0.is_multiple_of(cluster) {
            return Err(GpuError::Invalid(format!(
                "{}: a cluster of {cluster} blocks (at most {max} here) over a grid of {} along x",
                self.name, cfg.grid_dim.0
            )));
        }
        let pdl = pdl::enabled(device);
        // SAFETY: forwarded to the caller (see above).
        unsafe {
            pdl::launch_ex(device.stream(), &self.func, cfg, Some((cluster, 1, 1)), pdl, params)
        }
    }
}

/// The launch config the occupancy queries take: `cfg`'s block shape and shared memory over
/// `grid_x` blocks, with `attrs`. No stream: nothing is enqueued, so the answer is the same
/// during a capture.
fn occupancy_config(
    cfg: LaunchConfig,
    grid_x: u32,
    attrs: *mut cudarc::driver::sys::CUlaunchAttribute,
    num_attrs: u32,
) -> cudarc::driver::sys::CUlaunchConfig {
    cudarc::driver::sys::CUlaunchConfig {
        gridDimX: grid_x,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: std::ptr::null_mut(),
        attrs,
        numAttrs: num_attrs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_changes_with_every_input() {
        let base = cache_key("k", "src", &["-a".into()], (13, 0), Arch::SM90A);
        assert_eq!(base.len(), 32);
        assert_eq!(base, cache_key("k", "src", &["-a".into()], (13, 0), Arch::SM90A));
        assert_ne!(base, cache_key("k", "src2", &["-a".into()], (13, 0), Arch::SM90A));
        assert_ne!(base, cache_key("k", "src", &["-b".into()], (13, 0), Arch::SM90A));
        assert_ne!(base, cache_key("k", "src", &["-a".into()], (13, 1), Arch::SM90A));
        assert_ne!(base, cache_key("k", "src", &["-a".into()], (13, 0), Arch::SM80));
    }

    #[test]
    fn labels_and_arch_support() {
        const SRC: SourceFile = SourceFile { path: "x.cu", code: "" };
        let spec = KernelSpec::new(SRC, &[]).define("DTYPE", "bf16").define("HEAD_DIM", 128);
        assert_eq!(spec.label(), "x.cu[DTYPE=bf16,HEAD_DIM=128]");
        assert!(spec.supports(Arch::SM80) && spec.supports(Arch::SM90A));
        let hopper = spec.min_arch(Arch::SM90A);
        assert!(!hopper.supports(Arch::SM80) && hopper.supports(Arch::SM90A));
    }
}
