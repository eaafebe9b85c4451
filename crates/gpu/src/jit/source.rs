//! Kernel sources: `.cu` files embedded in the binary, and their `#include "..."` headers
//! resolved here (not by NVRTC) so that the cache key covers every byte compiled and
//! NVRTC's messages still name the right file and line (through `#line`).

use std::collections::HashSet;
use std::fmt::Write as _;

use crate::error::{GpuError, Result};

/// One embedded source file: a `.cu` kernel family or a `.cuh` header.
#[derive(Clone, Copy, Debug)]
pub struct SourceFile {
    /// Path as written in `#include` and shown in compiler messages, e.g. "common/mma.cuh".
    pub path: &'static str,
    pub code: &'static str,
}

/// Expands `#include "..."` directives of `root` from `headers`, each header once.
pub fn preprocess(root: &SourceFile, headers: &[SourceFile]) -> Result<String> {
    let mut out = String::with_capacity(root.code.len() * 2);
    let mut seen = HashSet::new();
    expand(root, headers, &mut seen, &mut out, 0)?;
    Ok(out)
}

fn expand(
    file: &SourceFile,
    headers: &[SourceFile],
    seen: &mut HashSet<&'static str>,
    out: &mut String,
    depth: usize,
) -> Result<()> {
    if depth > 16 {
        return Err(GpuError::Invalid(format!("include depth past 16 at {}", file.path)));
    }
    let _ = writeln!(out, "#line 1 \"{}\"", file.path);
    for (i, line) in file.code.lines().enumerate() {
        let Some(name) = quoted_include(line) else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        let header = headers.iter().find(|h| h.path == name).ok_or_else(|| {
            GpuError::Invalid(format!(
                "{}:{}: #include \"{name}\" names no embedded header (known: {})",
                file.path,
                i + 1,
                headers.iter().map(|h| h.path).collect::<Vec<_>>().join(", ")
            ))
        })?;
        if seen.insert(header.path) {
            expand(header, headers, seen, out, depth + 1)?;
        }
        let _ = writeln!(out, "#line {} \"{}\"", i + 2, file.path);
    }
    Ok(())
}

fn quoted_include(line: &str) -> Option<&str> {
    let rest = line.trim_start().strip_prefix('#')?.trim_start();
    let rest = rest.strip_prefix("include")?.trim();
    rest.strip_prefix('"')?.split('"').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: SourceFile = SourceFile { path: "common/a.cuh", code: "#pragma once\nint a;\n" };
    const B: SourceFile =
        SourceFile { path: "common/b.cuh", code: "#include \"common/a.cuh\"\nint b;\n" };

    #[test]
    fn expands_each_header_once_with_line_markers() {
        let root = SourceFile {
            path: "k.cu",
            code: "#include \"common/a.cuh\"\n#include \"common/b.cuh\"\nint k;\n",
        };
        let out = preprocess(&root, &[A, B]).unwrap();
        assert_eq!(out.matches("int a;").count(), 1);
        assert!(out.contains("int b;"));
        assert!(out.contains("#line 3 \"k.cu\"\nint k;"), "{out}");
        assert!(out.starts_with("#line 1 \"k.cu\""));
    }

    #[test]
    fn unknown_include_names_file_and_line() {
        let root = SourceFile { path: "k.cu", code: "\n#include \"nope.cuh\"\n" };
        let err = preprocess(&root, &[A]).unwrap_err().to_string();
        assert!(err.contains("k.cu:2") && err.contains("nope.cuh"), "{err}");
    }

    #[test]
    fn angle_includes_pass_through() {
        let root = SourceFile { path: "k.cu", code: "#include <cuda/std/cstdint>\n" };
        assert!(preprocess(&root, &[]).unwrap().contains("<cuda/std/cstdint>"));
    }
}
