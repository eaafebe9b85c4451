//! `radix-sparse doctor`: what this machine offers radix-sparse. Exits 0 without a GPU.

use radix_gpu::libs::{self, CudaLibrary};
use radix_gpu::{Device, GpuError, Jit};

/// A missing library's line says what was searched once; its name is the line's label.
fn not_found(e: &GpuError) -> String {
    match e {
        GpuError::LibraryMissing { searched, hint, .. } => {
            format!("not found (looked for {searched}); {hint}")
        }
        other => format!("not loaded: {other}"),
    }
}

pub fn run() -> anyhow::Result<()> {
    println!("radix-sparse {}", env!("CARGO_PKG_VERSION"));
    for lib in CudaLibrary::ALL {
        match libs::ensure_loaded(lib) {
            Ok(path) => println!("{:<24} {}", lib.name(), path.display()),
            Err(e) => println!("{:<24} {}", lib.name(), not_found(&e)),
        }
    }
    // Optional: only tensor parallelism on CUDA needs it.
    let nccl = CudaLibrary::Nccl;
    match libs::ensure_loaded(nccl).and_then(|path| Ok((path, radix_gpu::nccl::version()?))) {
        Ok((path, (major, minor, patch))) => {
            println!("{:<24} {} ({major}.{minor}.{patch})", nccl.name(), path.display())
        }
        Err(e) => println!("{:<24} only for -tp N on CUDA: {}", nccl.name(), not_found(&e)),
    }
    if let Ok(v) = libs::driver_version() {
        println!("{:<24} {}", "CUDA driver API", libs::format_cuda_version(v));
    }
    if let Ok((major, minor)) = libs::nvrtc_version() {
        println!("{:<24} {major}.{minor}", "NVRTC version");
    }
    if let Ok(v) = libs::cublaslt_version() {
        println!("{:<24} {v}", "cuBLASLt version");
    }
    let jit = Jit::with_default_cache();
    match jit.cache_dir() {
        Some(dir) => {
            let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
            println!("{:<24} {} ({n} cached kernels)", "kernel cache", dir.display());
        }
        None => println!("{:<24} disabled (no HOME or cache dir)", "kernel cache"),
    }

    match Device::count() {
        Ok(0) => println!("\nNo GPU: the CUDA driver reports no device. CPU backend only."),
        // The driver's own line above already says where it was looked for.
        Err(GpuError::LibraryMissing { library, .. }) => {
            println!("\nNo GPU: {library} is not installed. CPU backend only.")
        }
        Err(e) => println!("\nNo GPU: {e}. CPU backend only."),
        Ok(n) => {
            println!();
            for ordinal in 0..n {
                match Device::open(ordinal) {
                    Ok(dev) => print_device(&dev),
                    Err(e) => println!("GPU {ordinal}: cannot open: {e}"),
                }
            }
        }
    }
    Ok(())
}

fn print_device(dev: &Device) {
    let i = dev.info();
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    let free = dev.mem_info().map(|(f, _)| format!(", {:.1} GiB free", gib(f))).unwrap_or_default();
    println!("GPU {}: {}", i.ordinal, i.name);
    println!(
        "  compute capability {}.{} (kernels built for {}), {} SMs at {} MHz",
        i.compute_capability.0,
        i.compute_capability.1,
        i.arch(),
        i.sm_count,
        i.clock_mhz
    );
    println!(
        "  memory {:.1} GiB{free}, {}-bit bus at {} MHz, L2 {} MiB, shared memory/block {} KiB",
        gib(i.total_memory),
        i.memory_bus_bits,
        i.memory_clock_mhz,
        i.l2_bytes >> 20,
        i.max_shared_per_block >> 10
    );
}
