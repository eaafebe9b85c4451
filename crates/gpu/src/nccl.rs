//! NCCL for tensor parallelism: one communicator per GPU, all in this process (one
//! thread drives each GPU), and a bf16 sum all-reduce on a device's stream.
//!
//! # Loading
//! libnccl is opened only when a group is made (`NcclGroup::new`), so a machine without
//! it runs everything else; a missing library is `GpuError::LibraryMissing` naming the
//! `nvidia-nccl-cu13` wheel. The types and constants are cudarc's (`cudarc::nccl::sys`),
//! but the functions are resolved from our own handle: cudarc's loader never tries
//! `libnccl.so.2` (see `libs`) and panics when it finds nothing. Results come back as
//! plain ints, so a code newer than cudarc's enum is an error, not undefined behaviour.
//!
//! # Environment
//! NCCL reads its settings from the environment when a communicator is made.
//! `set_default_env` fills in, unless the user set them:
//! - `NCCL_NVLS_ENABLE=0`: NVLink multicast (NVLS) off. On shared multi-GPU hosts a
//!   program using it can take the host's GPUs out of service; an all-reduce of decode
//!   activations gains nothing measurable from it.
//! - `NCCL_RUNTIME_CONNECT=0`: every connection is made in `ncclCommInitAll` instead of
//!   in the first collective that needs it. A lazy connection is made inside the
//!   `ncclAllReduce` call and waits on the host for every peer, so a rank whose peer
//!   failed would block there; connected up front, an all-reduce call only queues work
//!   and `abort` can always proceed (it waits for calls in progress to return).
//!
//! `NCCL_GRAPH_MIXING_SUPPORT` is left at NCCL's default (on): prefill steps run their
//! collectives eagerly and decode steps from CUDA graphs on the same communicators,
//! which is the mix that setting supports. NCCL's caveat about it (deadlocks when one
//! thread launches the graphs of several communicators) does not apply: each thread
//! launches its own GPU's graphs only.
//!
//! # Abort and reset
//! A rank that fails between collectives leaves the others' NCCL kernels waiting for it
//! on the GPU. `abort` calls `ncclCommAbort` on every communicator, which makes those
//! kernels return (their results are garbage, and the step is an error anyway), and
//! frees the communicators; `reset`, once every rank is idle, makes new ones and bumps
//! `generation`, which tells each rank to drop the CUDA graphs that captured the old
//! ones.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclResult_t};
use half::bf16;

use crate::buffer::DeviceBuffer;
use crate::error::{GpuError, Result};
use crate::graph::outside_captures;
use crate::libs::{self, CudaLibrary};

/// The oldest NCCL taken: bf16 reductions (2.10) and collectives captured in CUDA
/// graphs mixed with eager ones (2.12).
const MIN_VERSION: (u32, u32) = (2, 12);

/// Variables `set_default_env` sets when the user has not (see the module doc).
pub const DEFAULT_ENV: [(&str, &str); 2] =
    [("NCCL_NVLS_ENABLE", "0"), ("NCCL_RUNTIME_CONNECT", "0")];

type Status = c_int;

/// The NCCL functions we call, resolved from libnccl.
struct Api {
    version: (u32, u32, u32),
    get_error_string: unsafe extern "C" fn(Status) -> *const c_char,
    /// Since NCCL 2.13.
    get_last_error: Option<unsafe extern "C" fn(ncclComm_t) -> *const c_char>,
    comm_init_all: unsafe extern "C" fn(*mut ncclComm_t, c_int, *const c_int) -> Status,
    comm_destroy: unsafe extern "C" fn(ncclComm_t) -> Status,
    comm_abort: unsafe extern "C" fn(ncclComm_t) -> Status,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        ncclComm_t,
        *mut c_void,
    ) -> Status,
    /// Keeps the function pointers above valid.
    _lib: libloading::Library,
}

impl Api {
    fn open(path: &std::path::Path) -> std::result::Result<Api, String> {
        // SAFETY: libnccl is already loaded (`libs::ensure_loaded`); opening it again
        // takes another reference to the same mapping.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        // SAFETY (every `sym` below): each name is resolved to the signature nccl.h
        // declares for it, with enums passed as C ints.
        unsafe fn sym<T: Copy>(
            lib: &libloading::Library,
            name: &str,
        ) -> std::result::Result<T, String> {
            // SAFETY: the caller names the symbol's true type.
            unsafe { lib.get::<T>(name.as_bytes()) }
                .map(|s| *s)
                .map_err(|e| format!("libnccl has no {name} ({e}): NCCL 2.12 or newer is needed"))
        }
        // SAFETY: see `sym`.
        unsafe {
            let get_version: unsafe extern "C" fn(*mut c_int) -> Status =
                sym(&lib, "ncclGetVersion")?;
            let mut code = 0;
            if get_version(&mut code) != ncclResult_t::ncclSuccess as Status {
                return Err("ncclGetVersion failed".into());
            }
            let version = decode_version(code);
            if (version.0, version.1) < MIN_VERSION {
                return Err(format!(
                    "NCCL {}.{}.{} is too old: {}.{} or newer is needed",
                    version.0, version.1, version.2, MIN_VERSION.0, MIN_VERSION.1
                ));
            }
            Ok(Api {
                version,
                get_error_string: sym(&lib, "ncclGetErrorString")?,
                get_last_error: sym(&lib, "ncclGetLastError").ok(),
                comm_init_all: sym(&lib, "ncclCommInitAll")?,
                comm_destroy: sym(&lib, "ncclCommDestroy")?,
                comm_abort: sym(&lib, "ncclCommAbort")?,
                all_reduce: sym(&lib, "ncclAllReduce")?,
                _lib: lib,
            })
        }
    }

    /// `status` as a result; the error carries NCCL's own words for it.
    fn check(&self, call: &'static str, status: Status, comm: ncclComm_t) -> Result<()> {
        if status == ncclResult_t::ncclSuccess as Status {
            return Ok(());
        }
        let text = |p: *const c_char| {
            // SAFETY: NCCL returns a NUL-terminated static string (or null).
            (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        };
        // SAFETY: both take any code / communicator (ncclGetLastError ignores it).
        let what = text(unsafe { (self.get_error_string)(status) });
        let last = self.get_last_error.and_then(|f| text(unsafe { f(comm) }));
        let mut message = format!("error {status}");
        for part in [what, last].into_iter().flatten().filter(|s| !s.is_empty()) {
            message.push_str(": ");
            message.push_str(&part);
        }
        Err(GpuError::Nccl { call, message })
    }
}

/// NCCL encodes 2.x.y as `x * 100 + y + 20000` (2.9 and later); older as `x * 100 + y`
/// past 1000.
fn decode_version(code: c_int) -> (u32, u32, u32) {
    let code = code.max(0) as u32;
    if code >= 10000 {
        (code / 10000, (code % 10000) / 100, code % 100)
    } else {
        (code / 1000, (code % 1000) / 100, code % 100)
    }
}

/// Loads libnccl and its functions once; the error says what to install.
fn api() -> Result<&'static Api> {
    let path = libs::ensure_loaded(CudaLibrary::Nccl)?;
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| Api::open(&path))
        .as_ref()
        .map_err(|message| GpuError::Nccl { call: "loading libnccl", message: message.clone() })
}

/// The NCCL version (major, minor, patch), loading it if needed.
pub fn version() -> Result<(u32, u32, u32)> {
    Ok(api()?.version)
}

/// Sets `DEFAULT_ENV`'s variables that are not set; returns those it set. Call it before
/// the process has other threads (the binary does, first thing), or at least before any
/// of them reads the environment: setting a variable races with C code reading it.
/// `NcclGroup::new` calls it too, for library users.
pub fn set_default_env() -> Vec<&'static str> {
    let mut set = Vec::new();
    for (name, value) in DEFAULT_ENV {
        match std::env::var_os(name) {
            Some(v) => {
                if name == "NCCL_NVLS_ENABLE" && v != "0" {
                    tracing::warn!(
                        "NCCL_NVLS_ENABLE={} is kept as set: NVLink multicast is on, which on \
                         shared hosts can take every GPU of the host out of service",
                        v.to_string_lossy()
                    );
                }
            }
            None => {
                // SAFETY: see the doc: called before other threads read the environment
                // (the binary: at start-up, single-threaded); NCCL reads it later, in
                // `ncclCommInitAll`.
                unsafe { std::env::set_var(name, value) };
                set.push(name);
            }
        }
    }
    set
}

/// The communicators of one tensor-parallel group of GPUs in this process, rank r on
/// `ordinals[r]`. Shared by the ranks (`NcclRank`) and whoever aborts and resets them.
pub struct NcclGroup {
    api: &'static Api,
    ordinals: Vec<c_int>,
    state: RwLock<State>,
    /// Bumped by every `reset` that made new communicators.
    generation: AtomicU64,
    /// Set when a rank's CUDA graph capture failed: the ranks must all capture or all
    /// not (NCCL requires it of every collective), so graphs go off for the group.
    graphs_off: AtomicBool,
}

struct State {
    /// Empty once aborted (the communicators are freed).
    comms: Vec<ncclComm_t>,
    aborted: Option<String>,
    /// A `reset` could not make new communicators: the group is unusable.
    broken: Option<String>,
}

// SAFETY: the communicators are used by one rank each (`all_reduce` with its rank), and
// freed only under the state's write lock, which no all-reduce call holds at the time.
// NCCL allows a communicator to be used from any thread, one call at a time.
unsafe impl Send for NcclGroup {}
unsafe impl Sync for NcclGroup {}

impl NcclGroup {
    /// One communicator per GPU in `ordinals` (rank r on `ordinals[r]`), made with
    /// `ncclCommInitAll`. Fails with `LibraryMissing` when NCCL is not installed.
    pub fn new(ordinals: &[usize]) -> Result<Arc<NcclGroup>> {
        if ordinals.is_empty() {
            return Err(GpuError::Invalid("an NCCL group needs at least one GPU".into()));
        }
        let mut seen = ordinals.to_vec();
        seen.sort_unstable();
        if seen.windows(2).any(|w| w[0] == w[1]) {
            // NCCL does not support two ranks on one GPU (it may hang).
            return Err(GpuError::Invalid(format!(
                "GPUs {ordinals:?}: each rank of an NCCL group needs a GPU of its own"
            )));
        }
        let api = api()?;
        for name in set_default_env() {
            tracing::debug!("{name} set for NCCL");
        }
        let ordinals: Vec<c_int> = ordinals.iter().map(|&o| o as c_int).collect();
        let comms = init_all(api, &ordinals)?;
        let (major, minor, patch) = api.version;
        tracing::info!(gpus = ?ordinals, "NCCL {major}.{minor}.{patch}: communicators ready");
        Ok(Arc::new(NcclGroup {
            api,
            ordinals,
            state: RwLock::new(State { comms, aborted: None, broken: None }),
            generation: AtomicU64::new(0),
            graphs_off: AtomicBool::new(false),
        }))
    }

    pub fn size(&self) -> usize {
        self.ordinals.len()
    }

    /// The GPU of rank `rank`.
    pub fn ordinal(&self, rank: usize) -> Option<usize> {
        self.ordinals.get(rank).map(|&o| o as usize)
    }

    /// Changes whenever the communicators are remade: CUDA graphs captured before hold
    /// the old ones and must be dropped.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Whether CUDA graphs are off for every rank (a capture failed on one).
    pub fn graphs_off(&self) -> bool {
        self.graphs_off.load(Ordering::SeqCst)
    }

    /// Turns CUDA graphs off for every rank, from their next step on.
    pub fn turn_graphs_off(&self, why: &str) {
        if !self.graphs_off.swap(true, Ordering::SeqCst) {
            tracing::warn!("CUDA graphs off for the tensor-parallel group: {why}");
        }
    }

    /// Keeps the communicators alive while work that uses them is queued: an all-reduce
    /// call, or the launch of a CUDA graph that recorded some. Fails (at once, never
    /// waiting) once the group is aborted or while an abort is under way.
    ///
    /// Why it never waits: `abort` takes the write lock and then waits for the stream
    /// captures in flight to end; a capturing rank that waited here for the lock would
    /// never end its capture. Failing instead ends that rank's step with
    /// `CollectiveAborted`, which is what an abort is for. And no holder waits for
    /// `abort`: it holds nothing while it waits for the write lock.
    pub fn live(&self) -> Result<LiveGroup<'_>> {
        let state = match self.state.try_read() {
            Ok(state) => state,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(GpuError::CollectiveAborted("the group is being aborted".into()));
            }
        };
        if let Some(why) = state.broken.as_ref().or(state.aborted.as_ref()) {
            return Err(GpuError::CollectiveAborted(why.clone()));
        }
        Ok(LiveGroup(state))
    }

    /// In-place sum over the ranks of `buf[..len]` (bf16), queued on `buf`'s device's
    /// stream (and recorded into a CUDA graph when that stream is capturing). Every rank
    /// must make the same calls, with the same `len`, in the same order.
    pub fn all_reduce_sum_bf16(
        &self,
        rank: usize,
        buf: &mut DeviceBuffer<bf16>,
        len: usize,
    ) -> Result<()> {
        crate::ensure!(
            len <= buf.len(),
            "all-reduce of {len} values over a buffer of {}",
            buf.len()
        );
        let ordinal = self.ordinal(rank).ok_or_else(|| {
            GpuError::Invalid(format!("rank {rank} is outside an NCCL group of {}", self.size()))
        })?;
        crate::ensure!(
            buf.device().info().ordinal == ordinal,
            "rank {rank}'s all-reduce got a buffer on GPU {} instead of GPU {ordinal}",
            buf.device().info().ordinal
        );
        if len == 0 || self.size() == 1 {
            return Ok(());
        }
        // Held across the call: `abort` frees the communicators only once no call is in
        // progress. The call only queues kernels (connections are made up front), so it
        // is held briefly.
        let live = self.live()?;
        let comm = live.0.comms[rank];
        let stream = buf.device().stream().cu_stream() as *mut c_void;
        let ptr = buf.ptr_mut() as *mut c_void;
        // SAFETY: `ptr` holds at least `len` bf16 values on this rank's GPU (checked
        // above), in place; `comm` is this rank's live communicator (not freed while we
        // hold the read lock); `stream` is the device's stream, which orders the
        // reduction after the kernels that wrote `buf` and before those that read it.
        let status = unsafe {
            (self.api.all_reduce)(
                ptr,
                ptr,
                len,
                ncclDataType_t::ncclBfloat16 as c_int,
                ncclRedOp_t::ncclSum as c_int,
                comm,
                stream,
            )
        };
        self.api.check("ncclAllReduce", status, comm)
    }

    /// Stops the group's collectives: kernels waiting for a rank that will not come
    /// return, and later all-reduce calls fail with `CollectiveAborted(why)` until
    /// `reset`. Safe from any thread, also while ranks are queueing collectives.
    pub fn abort(&self, why: &str) {
        // The write lock first: from then on every `live` fails, so ranks stop queueing
        // collectives and graph launches, and a rank capturing a step ends its capture
        // (its next all-reduce fails).
        let mut st = self.state.write().unwrap_or_else(PoisonError::into_inner);
        if st.aborted.is_some() {
            return;
        }
        st.aborted = Some(why.to_string());
        let comms = std::mem::take(&mut st.comms);
        // Freeing the communicators' memory synchronises each GPU's context, which would
        // invalidate a capture in flight on another thread: wait for captures to end.
        outside_captures(|| {
            for comm in comms {
                // SAFETY: a live communicator; no call uses it (we hold the write lock)
                // and it is forgotten here.
                let status = unsafe { (self.api.comm_abort)(comm) };
                if let Err(e) = self.api.check("ncclCommAbort", status, std::ptr::null_mut()) {
                    tracing::warn!("{e}");
                }
            }
        });
    }

    /// After an `abort`, once no rank is using the group: makes new communicators. If
    /// that fails the group stays unusable and every all-reduce says why.
    pub fn reset(&self) {
        let mut st = self.state.write().unwrap_or_else(PoisonError::into_inner);
        if st.aborted.is_none() || st.broken.is_some() {
            return;
        }
        // Allocates on every GPU: not while another thread captures (none should: every
        // rank is idle).
        match outside_captures(|| init_all(self.api, &self.ordinals)) {
            Ok(comms) => {
                st.comms = comms;
                st.aborted = None;
                self.generation.fetch_add(1, Ordering::SeqCst);
                tracing::info!("NCCL communicators remade after an aborted step");
            }
            Err(e) => {
                tracing::error!("NCCL communicators could not be remade: {e}");
                st.broken = Some(format!("the NCCL communicators could not be remade: {e}"));
            }
        }
    }
}

/// The communicators held alive (`NcclGroup::live`).
pub struct LiveGroup<'a>(std::sync::RwLockReadGuard<'a, State>);

fn init_all(api: &Api, ordinals: &[c_int]) -> Result<Vec<ncclComm_t>> {
    let mut comms: Vec<ncclComm_t> = vec![std::ptr::null_mut(); ordinals.len()];
    // SAFETY: `comms` has room for one communicator per listed device.
    let status = unsafe {
        (api.comm_init_all)(comms.as_mut_ptr(), ordinals.len() as c_int, ordinals.as_ptr())
    };
    api.check("ncclCommInitAll", status, std::ptr::null_mut())?;
    Ok(comms)
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        let comms = std::mem::take(&mut st.comms);
        let api = self.api;
        // Destroying frees device memory: not while another thread captures.
        outside_captures(|| {
            for comm in comms {
                // SAFETY: a live communicator no rank uses any more (the ranks hold the
                // group alive while they run).
                let status = unsafe { (api.comm_destroy)(comm) };
                if let Err(e) = api.check("ncclCommDestroy", status, std::ptr::null_mut()) {
                    tracing::warn!("{e}");
                }
            }
        });
    }
}

impl std::fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclGroup(GPUs {:?})", self.ordinals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_decode() {
        assert_eq!(decode_version(23203), (2, 32, 3));
        assert_eq!(decode_version(21903), (2, 19, 3));
        assert_eq!(decode_version(2804), (2, 8, 4));
    }

    /// Bad groups are refused before NCCL is touched; without NCCL (none is on this
    /// machine's loader path, nor in CI's) a group is a clear error naming the package,
    /// never a panic.
    #[test]
    fn a_group_without_nccl_is_an_error() {
        let e = NcclGroup::new(&[0, 0]).unwrap_err().to_string();
        assert!(e.contains("a GPU of its own"), "{e}");
        assert!(NcclGroup::new(&[]).is_err());
        if libs::ensure_loaded(CudaLibrary::Nccl).is_err() {
            let e = NcclGroup::new(&[0, 1]).unwrap_err().to_string();
            assert!(e.contains("libnccl (NCCL) not found"), "{e}");
            assert!(e.contains("nvidia-nccl-cu13"), "{e}");
        }
    }
}
