//! Finding the CUDA shared libraries at run time.
//!
//! cudarc opens libcuda, libnvrtc and libcublasLt by their sonames through the dynamic
//! loader, and panics when it cannot. We open them first, by soname and then in a few
//! well-known folders, so that a missing library is an error rather than a panic, and
//! so that libraries installed outside the loader's path (a CUDA toolkit folder, or
//! the `nvidia-cuda-nvrtc` Python wheel) are found too: once a library is loaded by
//! full path, the loader matches later opens of its soname to it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{GpuError, Result};

/// Environment variable with extra folders (':'-separated) to search for CUDA libraries.
pub const LIB_DIRS_ENV: &str = "RADIX_SPARSE_CUDA_LIB_DIRS";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CudaLibrary {
    Driver,
    Nvrtc,
    CublasLt,
}

impl CudaLibrary {
    pub const ALL: [CudaLibrary; 3] = [Self::Driver, Self::Nvrtc, Self::CublasLt];

    pub fn name(self) -> &'static str {
        match self {
            Self::Driver => "libcuda (CUDA driver)",
            Self::Nvrtc => "libnvrtc (NVRTC)",
            Self::CublasLt => "libcublasLt (cuBLASLt)",
        }
    }

    /// Sonames in the order tried; the first is the one for CUDA 13.
    fn sonames(self) -> &'static [&'static str] {
        match self {
            Self::Driver => &["libcuda.so.1", "libcuda.so"],
            Self::Nvrtc => &["libnvrtc.so.13", "libnvrtc.so"],
            Self::CublasLt => &["libcublasLt.so.13", "libcublasLt.so"],
        }
    }

    fn hint(self) -> &'static str {
        match self {
            Self::Driver => "is an NVIDIA driver installed? (this machine may simply have no GPU)",
            Self::Nvrtc => {
                "install a CUDA 13.0 toolkit or `pip install nvidia-cuda-nvrtc==13.0.88`, \
                 and add its lib folder to LD_LIBRARY_PATH or RADIX_SPARSE_CUDA_LIB_DIRS"
            }
            Self::CublasLt => {
                "install a CUDA 13 toolkit or `pip install nvidia-cublas`, and add its lib \
                 folder to LD_LIBRARY_PATH or RADIX_SPARSE_CUDA_LIB_DIRS"
            }
        }
    }

    fn slot(self) -> &'static OnceLock<std::result::Result<PathBuf, String>> {
        static DRIVER: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
        static NVRTC: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
        static CUBLASLT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
        match self {
            Self::Driver => &DRIVER,
            Self::Nvrtc => &NVRTC,
            Self::CublasLt => &CUBLASLT,
        }
    }
}

/// Folders named in `RADIX_SPARSE_CUDA_LIB_DIRS`, searched before anything else.
fn explicit_dirs() -> Vec<PathBuf> {
    std::env::var(LIB_DIRS_ENV)
        .map(|v| v.split(':').filter(|s| !s.is_empty()).map(PathBuf::from).collect())
        .unwrap_or_default()
}

/// Every folder searched besides the loader's own path: `RADIX_SPARSE_CUDA_LIB_DIRS`
/// (searched first), then `$CUDA_HOME`/`$CUDA_PATH`, then `/usr/local/cuda`.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = explicit_dirs();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(root) = std::env::var(var) {
            dirs.push(Path::new(&root).join("lib64"));
            dirs.push(Path::new(&root).join("lib"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    dirs.push(PathBuf::from("/usr/local/cuda/targets/x86_64-linux/lib"));
    dirs
}

/// Loads `lib` once per process and returns the path it was loaded from.
pub fn ensure_loaded(lib: CudaLibrary) -> Result<PathBuf> {
    lib.slot().get_or_init(|| load(lib)).clone().map_err(|searched| GpuError::LibraryMissing {
        library: lib.name(),
        searched,
        hint: lib.hint(),
    })
}

fn load(lib: CudaLibrary) -> std::result::Result<PathBuf, String> {
    let mut tried = Vec::new();
    // Folders the user named come first (an explicit choice beats the loader's path),
    // then the loader's own search by soname, then the usual toolkit folders.
    let explicit = explicit_dirs();
    let defaults: Vec<PathBuf> =
        search_dirs().into_iter().filter(|d| !explicit.contains(d)).collect();
    let in_dirs = |dirs: Vec<PathBuf>| {
        dirs.into_iter()
            .flat_map(|d| lib.sonames().iter().map(move |s| d.join(s)))
            .collect::<Vec<_>>()
    };
    let candidates = in_dirs(explicit)
        .into_iter()
        .chain(lib.sonames().iter().map(PathBuf::from))
        .chain(in_dirs(defaults));
    for candidate in candidates {
        // SAFETY: these are NVIDIA's CUDA libraries; their initialisers have no
        // preconditions on our side.
        match unsafe { libloading::Library::new(&candidate) } {
            Ok(handle) => {
                // Keep the library loaded for the life of the process: cudarc's own
                // handle and every function pointer it resolves point into it.
                std::mem::forget(handle);
                let path = mapped_path(lib.sonames()[0]).unwrap_or(candidate);
                if lib == CudaLibrary::Nvrtc {
                    preload_nvrtc_builtins(&path);
                }
                return Ok(path);
            }
            Err(_) => tried.push(candidate.display().to_string()),
        }
    }
    Err(tried.join(", "))
}

/// NVRTC opens `libnvrtc-builtins.so.<major>.<minor>` by soname at compile time, which
/// fails when libnvrtc itself came from a folder outside the loader's path. Loading the
/// builtins from libnvrtc's own folder first makes that later open find them.
fn preload_nvrtc_builtins(nvrtc: &Path) {
    let Some(dir) = nvrtc.parent() else { return };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("libnvrtc-builtins.so") {
            // SAFETY: NVIDIA's NVRTC builtins library, loaded as NVRTC itself would.
            if let Ok(handle) = unsafe { libloading::Library::new(entry.path()) } {
                std::mem::forget(handle);
                return;
            }
        }
    }
}

/// The file a loaded library was mapped from, read off /proc/self/maps.
fn mapped_path(soname: &str) -> Option<PathBuf> {
    let stem = soname.split(".so").next()?;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            Path::new(path)
                .file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(&format!("{stem}.so")))
        })
        .map(PathBuf::from)
}

/// Versions of the loaded libraries, for `doctor` and the kernel cache key.
pub fn driver_version() -> Result<i32> {
    ensure_loaded(CudaLibrary::Driver)?;
    let mut v = 0;
    // SAFETY: libcuda is loaded; cuDriverGetVersion only writes the int we pass.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(|source| GpuError::Driver { call: "cuDriverGetVersion", source })?;
    Ok(v)
}

pub fn nvrtc_version() -> Result<(i32, i32)> {
    ensure_loaded(CudaLibrary::Nvrtc)?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: libnvrtc is loaded; nvrtcVersion only writes the two ints.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| GpuError::Nvrtc { call: "nvrtcVersion", message: format!("{e:?}") })?;
    Ok((major, minor))
}

pub fn cublaslt_version() -> Result<usize> {
    ensure_loaded(CudaLibrary::CublasLt)?;
    // SAFETY: libcublasLt is loaded; the call has no arguments.
    Ok(unsafe { cudarc::cublaslt::sys::cublasLtGetVersion() })
}

/// Formats a CUDA version integer (13000) as "13.0".
pub fn format_cuda_version(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_versions() {
        assert_eq!(format_cuda_version(13000), "13.0");
        assert_eq!(format_cuda_version(12040), "12.4");
    }

    #[test]
    fn search_dirs_always_include_the_default_toolkit() {
        assert!(search_dirs().iter().any(|d| d == Path::new("/usr/local/cuda/lib64")));
    }
}
