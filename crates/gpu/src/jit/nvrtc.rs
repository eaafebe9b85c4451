//! One NVRTC compilation: source in, cubin (plus NVRTC's log) out. Needs libnvrtc, no GPU.

use std::ffi::{CStr, CString, c_char};

use cudarc::nvrtc::sys;

use crate::error::{GpuError, Result};
use crate::libs::{self, CudaLibrary};

pub struct NvrtcOutput {
    pub cubin: Vec<u8>,
    /// NVRTC's log: warnings and, with `--ptxas-options=-v`, register and spill counts.
    pub log: String,
}

/// Compiles `source` (already preprocessed) named `file` with `options` to a cubin.
pub fn compile_to_cubin(
    kernel: &str,
    file: &str,
    source: &str,
    arch: &str,
    options: &[String],
) -> Result<NvrtcOutput> {
    libs::ensure_loaded(CudaLibrary::Nvrtc)?;
    let invalid =
        |what: &str| GpuError::Invalid(format!("{what} of kernel {kernel} holds a NUL byte"));
    let c_src = CString::new(source).map_err(|_| invalid("source"))?;
    let c_name = CString::new(file).map_err(|_| invalid("file name"))?;
    let c_opts = options
        .iter()
        .map(|o| CString::new(o.as_str()).map_err(|_| invalid("an option")))
        .collect::<Result<Vec<_>>>()?;
    let opt_ptrs: Vec<*const c_char> = c_opts.iter().map(|o| o.as_ptr()).collect();

    let nvrtc_err = |call: &'static str, r: sys::nvrtcResult| GpuError::Nvrtc {
        call,
        message: error_string(r),
    };

    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: the strings outlive the program; no headers are passed (we resolve them).
    let r = unsafe {
        sys::nvrtcCreateProgram(
            &mut prog,
            c_src.as_ptr(),
            c_name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err("nvrtcCreateProgram", r));
    }
    let program = Program(prog);

    // SAFETY: opt_ptrs points at NUL-terminated strings alive for the call.
    let compiled =
        unsafe { sys::nvrtcCompileProgram(program.0, opt_ptrs.len() as i32, opt_ptrs.as_ptr()) };
    let log = program.log()?;
    if compiled != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(GpuError::Compile {
            kernel: kernel.to_string(),
            arch: arch.to_string(),
            options: options.join(" "),
            log: if log.trim().is_empty() { error_string(compiled) } else { log },
        });
    }
    let mut size = 0usize;
    // SAFETY: program compiled successfully; size is written by the call.
    let r = unsafe { sys::nvrtcGetCUBINSize(program.0, &mut size) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err("nvrtcGetCUBINSize", r));
    }
    let mut cubin = vec![0u8; size];
    // SAFETY: cubin has exactly the size NVRTC reported.
    let r = unsafe { sys::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr() as *mut c_char) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err("nvrtcGetCUBIN", r));
    }
    Ok(NvrtcOutput { cubin, log })
}

/// Destroys the NVRTC program on every path out.
struct Program(sys::nvrtcProgram);

impl Program {
    fn log(&self) -> Result<String> {
        let mut size = 0usize;
        // SAFETY: valid program handle; size is written by the call.
        let r = unsafe { sys::nvrtcGetProgramLogSize(self.0, &mut size) };
        if r != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
            return Ok(String::new());
        }
        let mut buf = vec![0u8; size];
        // SAFETY: buf has the size NVRTC reported, including the NUL.
        let r = unsafe { sys::nvrtcGetProgramLog(self.0, buf.as_mut_ptr() as *mut c_char) };
        if r != sys::nvrtcResult::NVRTC_SUCCESS {
            return Ok(String::new());
        }
        let log = CStr::from_bytes_until_nul(&buf).map(|s| s.to_string_lossy().into_owned());
        Ok(log.unwrap_or_default())
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the handle came from nvrtcCreateProgram and is destroyed once.
        unsafe {
            let _ = sys::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

fn error_string(r: sys::nvrtcResult) -> String {
    // SAFETY: nvrtcGetErrorString returns a static NUL-terminated string.
    unsafe {
        let p = sys::nvrtcGetErrorString(r);
        if p.is_null() {
            format!("{r:?}")
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}
