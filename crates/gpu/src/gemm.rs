//! cuBLASLt GEMM, row-major as the rest of the code sees it.
//!
//! `out[M,N] = a[M,K] · op(b) (+ bias[N]) (+ beta · out)` with f16/bf16 inputs, f32
//! accumulation and f16/bf16/f32 output. `b` is either a Linear layer's weight stored
//! `[N, K]` (`op(b) = bᵀ`, the common case) or a plain `[K, N]` matrix.
//!
//! cuBLASLt is column-major, and a row-major `[R, C]` matrix is a column-major `[C, R]`
//! one, so we compute `outᵀ = op(b)ᵀ · aᵀ`: cuBLASLt's A is our `b`, its B is our `a`.
//! FP8 (`matmul_fp8_raw`): e4m3 × e4m3 → bf16 with one f32 scale per row of `a` (per
//! token) and per row of `b` (per output channel), cuBLASLt's outer-vector scaling
//! (`OUTER_VEC_32F`, cuBLASLt 12.9+, Hopper and later); `b` must be `[N, K]`, the only
//! layout FP8 takes ("TN").
//!
//! The handle and one workspace are created once; descriptors, layouts and the
//! heuristic's chosen algorithm are cached per shape, so a steady-state call does no
//! allocation and no heuristic query.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use half::{bf16, f16};

use crate::buffer::DeviceBuffer;
use crate::device::Device;
use crate::dtype::{DType, Element, HalfFloat};
use crate::ensure;
use crate::error::{DriverCall, GpuError, Result};
use crate::graph;
use crate::libs::{self, CudaLibrary};

/// How the second operand is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BLayout {
    /// `[N, K]` row-major (a Linear weight): `out = a · bᵀ`.
    NK,
    /// `[K, N]` row-major: `out = a · b`.
    KN,
}

/// The shape and types of one GEMM; the cache key for its cuBLASLt plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub input: DType,
    pub output: DType,
    pub b_layout: BLayout,
    pub bias: bool,
}

impl GemmShape {
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// A cuBLASLt handle and workspace for one device.
pub struct Gemm {
    device: Device,
    handle: Handle,
    workspace: DeviceBuffer<u8>,
    plans: Mutex<HashMap<GemmShape, Arc<CachedMatmul>>>,
    /// 16-bit plans keep all of the heuristic's candidates, not only its first
    /// (`keep_all_candidates`; FP8 plans always do).
    all_candidates: bool,
}

impl Gemm {
    pub fn new(device: &Device) -> Result<Self> {
        libs::ensure_loaded(CudaLibrary::CublasLt)?;
        device.context().bind_to_thread().call("cuCtxSetCurrent")?;
        tracing::trace!("cuBLASLt: create handle");
        let handle = Handle(graph::outside_captures(lt::create_handle).call("cublasLtCreate")?);
        tracing::trace!("cuBLASLt: handle created");
        // NVIDIA's guidance: 32 MiB of workspace on Hopper, 4 MiB before it.
        let ws_bytes = if device.arch().is_hopper() { 32 << 20 } else { 4 << 20 };
        let workspace = device.alloc_zeros::<u8>(ws_bytes)?;
        Ok(Self {
            device: device.clone(),
            handle,
            workspace,
            plans: Mutex::new(HashMap::new()),
            all_candidates: false,
        })
    }

    /// From now on 16-bit plans ask the heuristic for up to 8 candidates, for
    /// `choose_candidate` (benchmarks that time each). The engine leaves it off: its mixed
    /// steps plan a new shape for every token count, and one candidate is all they run.
    pub fn keep_all_candidates(&mut self) {
        self.all_candidates = true;
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The GEMM of `shape` runs the heuristic's candidate `index` from now on (0: its first
    /// choice; past the last: the last); returns how many there are and the chosen one's
    /// split-K factor, or None when the shape has not run yet. For benchmarks that time
    /// every candidate (`bench gemm --candidates`).
    pub fn choose_candidate(&self, shape: &GemmShape, index: usize) -> Option<(usize, u32)> {
        let plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        let plan = plans.get(shape)?;
        let count = plan.candidates.len();
        let index = index.min(count - 1);
        plan.chosen.store(index, std::sync::atomic::Ordering::Relaxed);
        Some((count, split_k(&plan.candidates[index])))
    }

    /// Checked GEMM on whole buffers: `out[M,N] = a[M,K]·op(b) (+bias) (+beta·out)`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul<T: HalfFloat, O: Element>(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &DeviceBuffer<T>,
        b: &DeviceBuffer<T>,
        b_layout: BLayout,
        bias: Option<&DeviceBuffer<O>>,
        beta: f32,
        out: &mut DeviceBuffer<O>,
    ) -> Result<()> {
        ensure!(m > 0 && n > 0 && k > 0, "GEMM dimensions must be positive, got M={m} N={n} K={k}");
        ensure!(a.len() == m * k, "GEMM a holds {} elements, expected M*K = {m}*{k}", a.len());
        ensure!(b.len() == n * k, "GEMM b holds {} elements, expected N*K = {n}*{k}", b.len());
        ensure!(
            out.len() == m * n,
            "GEMM out holds {} elements, expected M*N = {m}*{n}",
            out.len()
        );
        if let Some(bias) = bias {
            ensure!(bias.len() == n, "GEMM bias holds {} elements, expected N = {n}", bias.len());
        }
        let shape = GemmShape {
            m,
            n,
            k,
            input: T::DTYPE,
            output: O::DTYPE,
            b_layout,
            bias: bias.is_some(),
        };
        let bias_ptr = bias.map(|b| b.ptr()).unwrap_or(0);
        let out_ptr = out.ptr_mut();
        // SAFETY: every pointer is a live buffer whose size was checked against the shape.
        unsafe { self.matmul_raw(&shape, a.ptr(), b.ptr(), bias_ptr, beta, out_ptr) }
    }

    /// GEMM on raw device addresses (views into larger buffers).
    ///
    /// # Safety
    /// `a` must point at `m*k` elements, `b` at `n*k`, `out` at `m*n` (all of the shape's
    /// dtypes), `bias` at `n` output-dtype elements when `shape.bias`; all on this device.
    pub unsafe fn matmul_raw(
        &self,
        shape: &GemmShape,
        a: u64,
        b: u64,
        bias: u64,
        beta: f32,
        out: u64,
    ) -> Result<()> {
        ensure!(shape.input != DType::F8E4M3, "FP8 GEMMs take their scales: matmul_fp8_raw");
        // SAFETY: the caller's promise, passed on.
        unsafe { self.launch(shape, a, b, bias, None, beta, out) }
    }

    /// FP8 GEMM on raw device addresses: `out[M,N] = (a ⊙ a_scales) · (b ⊙ b_scales)ᵀ
    /// (+ bias)`, `a` `[M,K]` and `b` `[N,K]` e4m3 bytes, `a_scales` `M` f32 (one per row of
    /// `a`), `b_scales` `N` f32, `out` (and `bias`) bf16.
    ///
    /// # Safety
    /// Every pointer must point at that many elements on this device; `bias` (when
    /// `bias` is not 0) at `n` bf16.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul_fp8_raw(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        a_scales: u64,
        b: u64,
        b_scales: u64,
        bias: u64,
        out: u64,
    ) -> Result<()> {
        ensure!(m > 0 && n > 0 && k > 0, "GEMM dimensions must be positive, got M={m} N={n} K={k}");
        // cuBLASLt's FP8 kernels need 16-byte aligned rows of every operand.
        ensure!(
            k.is_multiple_of(16) && n.is_multiple_of(8),
            "FP8 GEMM needs K a multiple of 16 and N of 8, got N={n} K={k}"
        );
        let shape = GemmShape {
            m,
            n,
            k,
            input: DType::F8E4M3,
            output: DType::BF16,
            b_layout: BLayout::NK,
            bias: bias != 0,
        };
        // SAFETY: the caller's promise, passed on.
        unsafe { self.launch(&shape, a, b, bias, Some((a_scales, b_scales)), 0.0, out) }
    }

    /// Sets the per-call pointers (bias, FP8 scales) of the plan's descriptor and runs it.
    ///
    /// # Safety
    /// As for `matmul_raw` and `matmul_fp8_raw`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch(
        &self,
        shape: &GemmShape,
        a: u64,
        b: u64,
        bias: u64,
        scales: Option<(u64, u64)>,
        beta: f32,
        out: u64,
    ) -> Result<()> {
        let plan = self.plan(shape, scales)?;
        let _bias = plan.bias.lock().unwrap_or_else(|e| e.into_inner());
        let set_ptr = |attr, ptr: u64, what: &'static str| -> Result<()> {
            // SAFETY: desc is ours and alive; the attribute is a device pointer.
            unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    attr,
                    &ptr as *const u64 as *const c_void,
                    std::mem::size_of::<u64>(),
                )
            }
            .call(what)
        };
        use sys::cublasLtMatmulDescAttributes_t as A;
        if shape.bias {
            ensure!(bias != 0, "GEMM shape asks for a bias but none was given");
            set_ptr(A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias, "SetAttribute(BIAS_POINTER)")?;
        }
        if let Some((a_scales, b_scales)) = scales {
            ensure!(a_scales != 0 && b_scales != 0, "an FP8 GEMM needs both scale vectors");
            // cuBLASLt's A is our `b` (the weight), its B our `a` (the activations).
            set_ptr(A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, b_scales, "SetAttribute(A_SCALE)")?;
            set_ptr(A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, a_scales, "SetAttribute(B_SCALE)")?;
        }
        tracing::trace!(a, b, bias, out, beta, "cuBLASLt: matmul");
        let alpha = 1.0f32;
        let stream = self.device.stream().cu_stream() as sys::cudaStream_t;
        // SAFETY: descriptors and algo come from the cached plan for this exact shape;
        // pointers are the caller's promise; the workspace is ours.
        unsafe {
            lt::matmul(
                self.handle.0,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                b as *const c_void,
                plan.layout_b,
                a as *const c_void,
                plan.layout_a,
                out as *const c_void,
                plan.layout_out,
                out as *mut c_void,
                plan.layout_out,
                plan.algo(),
                self.workspace.ptr() as *mut c_void,
                self.workspace.num_bytes(),
                stream,
            )
        }
        .call("cublasLtMatmul")
    }

    /// The cached plan of `shape`; `scales`: an FP8 call's scale vectors, set on a new
    /// plan's descriptor before its heuristic query (cuBLASLt checks them there).
    fn plan(&self, shape: &GemmShape, scales: Option<(u64, u64)>) -> Result<Arc<CachedMatmul>> {
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = plans.get(shape) {
            return Ok(p.clone());
        }
        tracing::trace!(?shape, "cuBLASLt: new plan");
        let ws = self.workspace.num_bytes();
        let plan = if shape.input == DType::F8E4M3 {
            // Exact accumulation first (torch._scaled_mm's default); cuBLASLt builds that
            // refuse it for outer-vector scales take fast accumulation.
            let exact = CachedMatmul::new(self.handle.0, shape, ws, scales, false, 8);
            match exact {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(?shape, error = %e, "cuBLASLt FP8: trying fast accumulation");
                    CachedMatmul::new(self.handle.0, shape, ws, scales, true, 8).map_err(
                        |fast| {
                            GpuError::Invalid(format!(
                                "cuBLASLt has no FP8 GEMM with per-row scales for {shape:?}: {e}; \
                             with fast accumulation: {fast}"
                            ))
                        },
                    )?
                }
            }
        } else {
            let want = if self.all_candidates { 8 } else { 1 };
            CachedMatmul::new(self.handle.0, shape, ws, None, false, want)?
        };
        let plan = Arc::new(plan);
        tracing::trace!(?shape, "cuBLASLt: plan ready");
        plans.insert(*shape, plan.clone());
        Ok(plan)
    }
}

fn cuda_type(d: DType) -> Result<sys::cudaDataType> {
    Ok(match d {
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::F8E4M3 => sys::cudaDataType::CUDA_R_8F_E4M3,
        other => return Err(GpuError::Invalid(format!("GEMM does not take {other}"))),
    })
}

struct Handle(sys::cublasLtHandle_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtCreate, destroyed once; errors on teardown are ignored.
        // Destroying a handle synchronises the context: not while a capture is in flight.
        let _ = graph::outside_captures(|| unsafe { lt::destroy_handle(self.0) });
    }
}

// SAFETY: cuBLASLt handles may be used from any thread; our calls are serialised by the
// plan mutex and the single stream.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

/// Descriptors, layouts and the chosen algorithm for one `GemmShape`.
struct CachedMatmul {
    /// Held from setting the bias pointer in `desc` to the matmul that reads it, so two
    /// threads sharing a `Gemm` cannot swap each other's bias.
    bias: Mutex<()>,
    desc: sys::cublasLtMatmulDesc_t,
    /// Our `a` ([M,K] row-major) as cuBLASLt's B: column-major K x M.
    layout_a: sys::cublasLtMatrixLayout_t,
    /// Our `b` as cuBLASLt's A.
    layout_b: sys::cublasLtMatrixLayout_t,
    /// Our out ([M,N] row-major): column-major N x M.
    layout_out: sys::cublasLtMatrixLayout_t,
    /// The heuristic's algorithms that fit (up to the `want` asked for, best first) and
    /// which of them runs (`Gemm::choose_candidate`).
    candidates: Vec<sys::cublasLtMatmulAlgo_t>,
    chosen: std::sync::atomic::AtomicUsize,
}

// SAFETY: the descriptors are immutable after creation except the bias pointer, which is
// set and read under the plan's `bias` lock.
unsafe impl Send for CachedMatmul {}
unsafe impl Sync for CachedMatmul {}

impl CachedMatmul {
    fn new(
        handle: sys::cublasLtHandle_t,
        s: &GemmShape,
        workspace: usize,
        scales: Option<(u64, u64)>,
        fast_accum: bool,
        want: usize,
    ) -> Result<CachedMatmul> {
        let (m, n, k) = (s.m as u64, s.n as u64, s.k as u64);
        let in_t = cuda_type(s.input)?;
        ensure!(
            matches!(s.input, DType::F16 | DType::BF16 | DType::F8E4M3),
            "GEMM inputs must be f16, bf16 or fp8_e4m3, got {}",
            s.input
        );
        let fp8 = s.input == DType::F8E4M3;
        ensure!(
            !fp8 || (s.output == DType::BF16 && s.b_layout == BLayout::NK),
            "FP8 GEMMs write bf16 and take b as [N, K], got {:?}",
            s
        );
        let out_t = cuda_type(s.output)?;
        let mut plan = CachedMatmul {
            bias: Mutex::new(()),
            desc: std::ptr::null_mut(),
            layout_a: std::ptr::null_mut(),
            layout_b: std::ptr::null_mut(),
            layout_out: std::ptr::null_mut(),
            // SAFETY: a plain C struct of integers; zero is a valid "unset" value.
            candidates: Vec::new(),
            chosen: std::sync::atomic::AtomicUsize::new(0),
        };
        plan.desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .call("cublasLtMatmulDescCreate")?;
        let set = |attr, value: &dyn AsBytes| -> Result<()> {
            // SAFETY: desc is alive; value points at a plain value of the attribute's type.
            unsafe { lt::set_matmul_desc_attribute(plan.desc, attr, value.ptr(), value.len()) }
                .call("cublasLtMatmulDescSetAttribute")
        };
        use sys::cublasLtMatmulDescAttributes_t as A;
        // cublasOperation_t (not in cudarc's cuBLASLt bindings): 0 = N, 1 = T.
        const OP_N: i32 = 0;
        const OP_T: i32 = 1;
        let trans_b = match s.b_layout {
            BLayout::NK => OP_T,
            BLayout::KN => OP_N,
        };
        set(A::CUBLASLT_MATMUL_DESC_TRANSA, &trans_b)?;
        set(A::CUBLASLT_MATMUL_DESC_TRANSB, &OP_N)?;
        if fp8 {
            // One f32 per row of each operand (per output channel of the weight, per
            // token of the activations): exact for the weights' per-channel scales and
            // for activations quantized per token.
            let outer =
                sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
            set(A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &outer)?;
            set(A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &outer)?;
            if let Some((a_scales, b_scales)) = scales {
                set(A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &b_scales)?;
                set(A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &a_scales)?;
            }
            set(A::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &(fast_accum as i8))?;
        }
        if s.bias {
            set(
                A::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            )?;
            set(A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &out_t)?;
        }
        let layout = |t, rows: u64, cols: u64, ld: u64| {
            lt::create_matrix_layout(t, rows, cols, ld as i64).call("cublasLtMatrixLayoutCreate")
        };
        plan.layout_b = match s.b_layout {
            BLayout::NK => layout(in_t, k, n, k)?,
            BLayout::KN => layout(in_t, n, k, n)?,
        };
        plan.layout_a = layout(in_t, k, m, k)?;
        plan.layout_out = layout(out_t, n, m, n)?;

        let pref = Pref(lt::create_matmul_pref().call("cublasLtMatmulPreferenceCreate")?);
        let ws = workspace as u64;
        // SAFETY: pref is alive; the attribute is a u64.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            )
        }
        .call("cublasLtMatmulPreferenceSetAttribute")?;
        tracing::trace!("cuBLASLt: heuristic query");
        // `want` candidates (FP8: 8, so that `RADIX_SPARSE_FP8_NO_SPLITK=1` can prefer one
        // without split-K, see `split_k`), for `choose_candidate` to pick among.
        // SAFETY: plain C structs; cuBLASLt fills the first `found`.
        let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> =
            (0..want).map(|_| unsafe { std::mem::zeroed() }).collect();
        let mut found = 0i32;
        // SAFETY: every descriptor is alive; `results` has room for the `want` asked for.
        unsafe {
            heuristic_fn()?(
                handle,
                plan.desc,
                plan.layout_b,
                plan.layout_a,
                plan.layout_out,
                plan.layout_out,
                pref.0,
                want as i64,
                results.as_mut_ptr(),
                &mut found,
            )
        }
        .result()
        .call("cublasLtMatmulAlgoGetHeuristic")?;
        let ok = |r: &&sys::cublasLtMatmulHeuristicResult_t| {
            r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
        };
        let candidates = &results[..(found.max(0) as usize).min(want)];
        let no_split_k = std::env::var("RADIX_SPARSE_FP8_NO_SPLITK").is_ok_and(|v| v == "1");
        let unsplit = || candidates.iter().filter(ok).find(|r| split_k(&r.algo) <= 1);
        let best = match fp8 && no_split_k {
            true => unsplit().or_else(|| candidates.iter().find(ok)),
            false => candidates.iter().find(ok),
        };
        let Some(best) = best else {
            return Err(GpuError::Invalid(format!("cuBLASLt has no algorithm for GEMM {s:?}")));
        };
        tracing::trace!(found, workspace = best.workspaceSize, "cuBLASLt: heuristic chose");
        // The chosen one first, then the other usable candidates in the heuristic's order.
        plan.candidates = std::iter::once(best.algo)
            .chain(candidates.iter().filter(ok).filter(|r| !std::ptr::eq(*r, best)).map(|r| r.algo))
            .collect();
        Ok(plan)
    }

    fn algo(&self) -> &sys::cublasLtMatmulAlgo_t {
        &self.candidates[self.chosen.load(std::sync::atomic::Ordering::Relaxed)]
    }
}

impl Drop for CachedMatmul {
    fn drop(&mut self) {
        // SAFETY: each handle was created once by us (or is null) and is destroyed once.
        unsafe {
            for l in [self.layout_a, self.layout_b, self.layout_out] {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
            if !self.desc.is_null() {
                let _ = lt::destroy_matmul_desc(self.desc);
            }
        }
    }
}

/// The split-K factor of `algo` (1: none). A diagnostic: an H200 test saw non-finite FP8
/// output at M=7 N=4096 K=4096, suspected of split-K at first; that test raced its
/// uploads on a second stream against the GEMM, the likelier cause (bench/NOTES.md).
fn split_k(algo: &sys::cublasLtMatmulAlgo_t) -> u32 {
    let mut v = 1u32;
    let mut written = 0usize;
    // SAFETY: reads one u32 attribute of a live algo struct into `v`.
    let status = unsafe {
        sys::cublasLtMatmulAlgoConfigGetAttribute(
            algo,
            sys::cublasLtMatmulAlgoConfigAttributes_t::CUBLASLT_ALGO_CONFIG_SPLITK_NUM,
            &mut v as *mut u32 as *mut c_void,
            std::mem::size_of::<u32>(),
            &mut written,
        )
    };
    if status == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS { v.max(1) } else { u32::MAX }
}

/// `cublasLtMatmulAlgoGetHeuristic` with its `int requestedAlgoCount` passed as a full
/// 64-bit stack slot. Called through cudarc's binding (a 32-bit store that leaves the slot's
/// upper half as it was), cuBLASLt 13.1 on the H100 host reported 8 results when asked for
/// 1 and, asked for 8, wrote result structs up to the end of the thread's stack: it reads
/// more than the low 32 bits of that slot. A zero-extended 64-bit value reads as the same
/// count either way (the x86-64 and AArch64 ABIs pass it in one 8-byte slot or register).
type HeuristicFn = unsafe extern "C" fn(
    sys::cublasLtHandle_t,
    sys::cublasLtMatmulDesc_t,
    sys::cublasLtMatrixLayout_t,
    sys::cublasLtMatrixLayout_t,
    sys::cublasLtMatrixLayout_t,
    sys::cublasLtMatrixLayout_t,
    sys::cublasLtMatmulPreference_t,
    i64,
    *mut sys::cublasLtMatmulHeuristicResult_t,
    *mut i32,
) -> sys::cublasStatus_t;

fn heuristic_fn() -> Result<HeuristicFn> {
    static FN: std::sync::OnceLock<std::result::Result<HeuristicFn, String>> =
        std::sync::OnceLock::new();
    FN.get_or_init(|| {
        let path = libs::ensure_loaded(CudaLibrary::CublasLt).map_err(|e| e.to_string())?;
        // SAFETY: the library is already loaded (this only raises its reference count);
        // the symbol has the signature above (see its comment for the count's width).
        unsafe {
            let lib = libloading::Library::new(&path).map_err(|e| e.to_string())?;
            let f = *lib
                .get::<HeuristicFn>(b"cublasLtMatmulAlgoGetHeuristic\0")
                .map_err(|e| e.to_string())?;
            std::mem::forget(lib); // keep `f` valid for the life of the process
            Ok(f)
        }
    })
    .clone()
    .map_err(|message| GpuError::Invalid(format!("cublasLtMatmulAlgoGetHeuristic: {message}")))
}

struct Pref(sys::cublasLtMatmulPreference_t);

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created once by us, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

/// A plain value passed to cuBLASLt's attribute setters by address and size.
trait AsBytes {
    fn ptr(&self) -> *const c_void;
    fn len(&self) -> usize;
}

impl<T: Copy> AsBytes for T {
    fn ptr(&self) -> *const c_void {
        self as *const T as *const c_void
    }
    fn len(&self) -> usize {
        std::mem::size_of::<T>()
    }
}

/// f64 reference: `out[M,N] = a[M,K]·op(b) (+bias)`, for tests and checks.
pub fn gemm_reference<T: Element>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    b: &[T],
    b_layout: BLayout,
    bias: Option<&[f64]>,
) -> Vec<f64> {
    let a: Vec<f64> = a.iter().map(|x| x.to_f64()).collect();
    // Bring b to [N, K] so the inner loop runs over contiguous memory for both.
    let b_nk: Vec<f64> = match b_layout {
        BLayout::NK => b.iter().map(|x| x.to_f64()).collect(),
        BLayout::KN => (0..n * k).map(|i| b[(i % k) * n + i / k].to_f64()).collect(),
    };
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        let row = &a[i * k..(i + 1) * k];
        for j in 0..n {
            let col = &b_nk[j * k..(j + 1) * k];
            let dot: f64 = row.iter().zip(col).map(|(x, y)| x * y).sum();
            out[i * n + j] = dot + bias.map_or(0.0, |b| b[j]);
        }
    }
    out
}

// Keep the half types linked to their dtypes here so the wrapper's generic bounds stay
// honest if `HalfFloat` grows.
const _: () = {
    assert!(matches!(<f16 as Element>::DTYPE, DType::F16));
    assert!(matches!(<bf16 as Element>::DTYPE, DType::BF16));
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_handles_both_layouts() {
        // a = [[1,2],[3,4]] (M=2,K=2); b as [N=3,K=2] and as [K=2,N=3].
        let a = [1.0f32, 2.0, 3.0, 4.0];
        let b_nk = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
        let b_kn = [1.0f32, 0.0, 1.0, 0.0, 1.0, 1.0];
        let want = vec![1.0, 2.0, 3.0, 3.0, 4.0, 7.0];
        assert_eq!(gemm_reference(2, 3, 2, &a, &b_nk, BLayout::NK, None), want);
        assert_eq!(gemm_reference(2, 3, 2, &a, &b_kn, BLayout::KN, None), want);
        let biased = gemm_reference(2, 3, 2, &a, &b_nk, BLayout::NK, Some(&[1.0, 1.0, 1.0]));
        assert_eq!(biased[0], 2.0);
    }
}
