//! The on-disk kernel cache: one cubin file per cache key.

use std::path::{Path, PathBuf};

use crate::error::{GpuError, Result};

/// Environment variable that overrides the cache folder.
pub const CACHE_DIR_ENV: &str = "RADIX_SPARSE_KERNEL_CACHE";

/// `$RADIX_SPARSE_KERNEL_CACHE`, else `$XDG_CACHE_HOME/radix-sparse/kernels`, else
/// `~/.cache/radix-sparse/kernels`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(CACHE_DIR_ENV).filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("radix-sparse").join("kernels"))
}

fn path(dir: &Path, stem: &str, key: &str) -> PathBuf {
    dir.join(format!("{stem}-{key}.cubin"))
}

pub fn read(dir: &Path, stem: &str, key: &str) -> Option<Vec<u8>> {
    std::fs::read(path(dir, stem, key)).ok().filter(|b| !b.is_empty())
}

/// Writes through a temporary file and a rename, so a reader never sees half a cubin.
pub fn write(dir: &Path, stem: &str, key: &str, cubin: &[u8]) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| GpuError::Cache { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let target = path(dir, stem, key);
    // Unique per writer, threads included: two threads compiling the same kernel must not
    // share a temporary file (one would rename the other's half-written cubin into place).
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{stem}-{key}.{}.{n}.tmp", std::process::id()));
    std::fs::write(&tmp, cubin).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &target).map_err(io(&target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_then_reads_back() {
        let dir = std::env::temp_dir().join(format!("rs-cache-test-{}", std::process::id()));
        assert!(read(&dir, "k", "abc").is_none());
        write(&dir, "k", "abc", b"cubin").unwrap();
        assert_eq!(read(&dir, "k", "abc").unwrap(), b"cubin");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Threads of one process writing the same entry at once (tests compiling the same
    /// kernel in parallel) never leave, nor let a reader see, a mix of two writes.
    #[test]
    fn concurrent_writers_never_mix_their_bytes() {
        let dir = std::env::temp_dir().join(format!("rs-cache-race-{}", std::process::id()));
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let dir = &dir;
                s.spawn(move || {
                    let body = vec![t; 1 << 18];
                    for _ in 0..10 {
                        write(dir, "k", "same", &body).unwrap();
                        if let Some(got) = read(dir, "k", "same") {
                            assert_eq!(got.len(), 1 << 18);
                            assert!(got.iter().all(|&b| b == got[0]), "mixed cubin read back");
                        }
                    }
                });
            }
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
