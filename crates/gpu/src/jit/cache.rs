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
    let tmp = dir.join(format!(".{stem}-{key}.{}.tmp", std::process::id()));
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
}
