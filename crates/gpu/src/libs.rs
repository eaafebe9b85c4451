//! Finding the CUDA shared libraries at run time.
//!
//! cudarc opens libcuda, libnvrtc and libcublasLt by their sonames through the dynamic
//! loader, and panics when it cannot. We open them first, by soname and then in a few
//! well-known folders, so that a missing library is an error rather than a panic, and
//! so that libraries installed outside the loader's path (a CUDA toolkit folder, or
//! the `nvidia-cuda-nvrtc` Python wheel) are found too: once a library is loaded by
//! full path, the loader matches later opens of its soname to it.
//!
//! NCCL is loaded only when a tensor-parallel group asks for it (`crate::nccl`), so a
//! machine without it runs everything else. Its functions are resolved from our own
//! handle, not through cudarc's loader: cudarc 0.19 tries `libnccl.so`, `libnccl.so.13`,
//! `.12`, .. but never `libnccl.so.2`, the only name the `nvidia-nccl-cu13` wheel and the
//! distributions' runtime packages ship, and panics when none opens.

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
    /// Only for tensor parallelism on several GPUs: not in `ALL`.
    Nccl,
}

impl CudaLibrary {
    /// The libraries every CUDA run needs (`doctor` checks these).
    pub const ALL: [CudaLibrary; 3] = [Self::Driver, Self::Nvrtc, Self::CublasLt];

    pub fn name(self) -> &'static str {
        match self {
            Self::Driver => "libcuda (CUDA driver)",
            Self::Nvrtc => "libnvrtc (NVRTC)",
            Self::CublasLt => "libcublasLt (cuBLASLt)",
            Self::Nccl => "libnccl (NCCL)",
        }
    }

    /// Sonames in the order tried; the first is the one for CUDA 13.
    fn sonames(self) -> &'static [&'static str] {
        match self {
            Self::Driver => &["libcuda.so.1", "libcuda.so"],
            Self::Nvrtc => &["libnvrtc.so.13", "libnvrtc.so"],
            Self::CublasLt => &["libcublasLt.so.13", "libcublasLt.so"],
            // NCCL 2's soname; `libnccl.so` is the development symlink.
            Self::Nccl => &["libnccl.so.2", "libnccl.so"],
        }
    }

    /// Where the library's Python wheel puts it, under a `site-packages` folder.
    fn wheel_dir(self) -> Option<&'static str> {
        match self {
            Self::Nccl => Some("nvidia/nccl/lib"),
            _ => None,
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
            Self::Nccl => {
                "tensor parallelism on CUDA needs NCCL 2 for CUDA 13: `pip install \
                 nvidia-nccl-cu13` (it puts libnccl.so.2 in site-packages/nvidia/nccl/lib) or \
                 the distribution's libnccl2, and add its lib folder to LD_LIBRARY_PATH or \
                 RADIX_SPARSE_CUDA_LIB_DIRS"
            }
        }
    }

    fn slot(self) -> &'static OnceLock<std::result::Result<PathBuf, String>> {
        static DRIVER: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
        static NVRTC: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
        static CUBLASLT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
        static NCCL: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
        match self {
            Self::Driver => &DRIVER,
            Self::Nvrtc => &NVRTC,
            Self::CublasLt => &CUBLASLT,
            Self::Nccl => &NCCL,
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
    // Folders the user named come first (an explicit choice beats the loader's path),
    // then the loader's own search by soname, then the usual toolkit folders, then the
    // Python wheels' folders.
    let explicit = explicit_dirs();
    let defaults: Vec<PathBuf> =
        search_dirs().into_iter().filter(|d| !explicit.contains(d)).collect();
    let wheels = wheel_dirs(lib, &explicit);
    load_from(lib, &explicit, true, &defaults, &wheels)
}

/// Opens the first of `lib`'s sonames found in `explicit`, then (`loader`) through the
/// dynamic loader's own search, then in `defaults` and `wheels`; the error lists every
/// path tried.
fn load_from(
    lib: CudaLibrary,
    explicit: &[PathBuf],
    loader: bool,
    defaults: &[PathBuf],
    wheels: &[PathBuf],
) -> std::result::Result<PathBuf, String> {
    let in_dirs = |dirs: &[PathBuf]| {
        dirs.iter().flat_map(|d| lib.sonames().iter().map(move |s| d.join(s))).collect::<Vec<_>>()
    };
    let by_soname = lib.sonames().iter().map(PathBuf::from).filter(|_| loader);
    let candidates = in_dirs(explicit)
        .into_iter()
        .chain(by_soname)
        .chain(in_dirs(defaults))
        .chain(in_dirs(wheels));
    let mut tried = Vec::new();
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

/// The folders a library's Python wheel may be in: under each folder the user named
/// (which may be a `site-packages`), and under the `site-packages` / `dist-packages` of
/// the active virtual environment, the user's and the system's Python 3.
fn wheel_dirs(lib: CudaLibrary, explicit: &[PathBuf]) -> Vec<PathBuf> {
    let Some(sub) = lib.wheel_dir() else { return Vec::new() };
    let mut prefixes: Vec<PathBuf> = Vec::new();
    if let Ok(venv) = std::env::var("VIRTUAL_ENV") {
        prefixes.push(PathBuf::from(venv));
    }
    if let Ok(home) = std::env::var("HOME") {
        prefixes.push(Path::new(&home).join(".local"));
    }
    prefixes.extend(["/usr/local", "/usr"].map(PathBuf::from));
    let mut sites: Vec<PathBuf> = explicit.to_vec();
    for prefix in &prefixes {
        sites.extend(python_site_dirs(prefix));
    }
    sites.into_iter().map(|s| s.join(sub)).filter(|d| d.is_dir()).collect()
}

/// `PREFIX/lib/python3*/{site,dist}-packages` that exist, and Debian's
/// `PREFIX/lib/python3/dist-packages`.
fn python_site_dirs(prefix: &Path) -> Vec<PathBuf> {
    let lib = prefix.join("lib");
    let Ok(entries) = std::fs::read_dir(&lib) else { return Vec::new() };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .flat_map(|e| ["site-packages", "dist-packages"].map(|s| e.path().join(s)))
        .filter(|d| d.is_dir())
        .collect();
    out.sort();
    out
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

    /// With NCCL nowhere to be found, the error names the library, every path tried and
    /// the package to install; nothing panics.
    #[test]
    fn a_missing_nccl_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("radix-nccl-missing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Not a shared library: the loader refuses it, as it would a broken install.
        std::fs::write(dir.join("libnccl.so.2"), b"not an ELF file").unwrap();
        let searched =
            load_from(CudaLibrary::Nccl, std::slice::from_ref(&dir), false, &[], &[]).unwrap_err();
        assert!(searched.contains(&dir.join("libnccl.so.2").display().to_string()), "{searched}");
        let e = GpuError::LibraryMissing {
            library: CudaLibrary::Nccl.name(),
            searched,
            hint: CudaLibrary::Nccl.hint(),
        }
        .to_string();
        assert!(e.starts_with("libnccl (NCCL) not found"), "{e}");
        assert!(e.contains("pip install nvidia-nccl-cu13") && e.contains("libnccl.so.2"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The wheel's folder is found under a site-packages folder named in
    /// RADIX_SPARSE_CUDA_LIB_DIRS and under a Python prefix.
    #[test]
    fn nccl_is_looked_for_in_the_wheel_folder() {
        let root = std::env::temp_dir().join(format!("radix-nccl-wheel-{}", std::process::id()));
        let site = root.join("lib/python3.12/site-packages");
        std::fs::create_dir_all(site.join("nvidia/nccl/lib")).unwrap();
        assert_eq!(python_site_dirs(&root), vec![site.clone()]);
        let dirs = wheel_dirs(CudaLibrary::Nccl, std::slice::from_ref(&site));
        assert_eq!(dirs.first(), Some(&site.join("nvidia/nccl/lib")));
        assert!(wheel_dirs(CudaLibrary::Nvrtc, std::slice::from_ref(&site)).is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn search_dirs_always_include_the_default_toolkit() {
        assert!(search_dirs().iter().any(|d| d == Path::new("/usr/local/cuda/lib64")));
    }
}
