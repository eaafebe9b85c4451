//! Pinned host staging for asynchronous uploads.
//!
//! Step metadata is written into page-locked host memory and copied with one async
//! copy; an event recorded after the copy tells when the host may write again, so the
//! host never waits on a copy it does not need to.

use cudarc::driver::{CudaEvent, PinnedHostSlice};

use crate::buffer::DeviceBuffer;
use crate::device::Device;
use crate::dtype::Element;
use crate::ensure;
use crate::error::{DriverCall, Result};
use crate::graph::{DropOutsideCaptures, outside_captures};

/// `len` elements of page-locked host memory, uploaded by `upload_prefix`. Allocating
/// and freeing pinned memory synchronise the context, so both wait for captures in
/// flight (`graph::outside_captures`).
pub struct PinnedStaging<T: Element> {
    host: DropOutsideCaptures<PinnedHostSlice<T>>,
    device: Device,
    /// Recorded after the last copy out of `host`.
    copied: Option<CudaEvent>,
}

impl<T: Element> Drop for PinnedStaging<T> {
    fn drop(&mut self) {
        // The host memory is freed after this: an upload still reading it must finish.
        if let Some(e) = self.copied.take() {
            let _ = e.synchronize();
        }
    }
}

impl<T: Element + cudarc::driver::ValidAsZeroBits> PinnedStaging<T> {
    pub fn new(device: &Device, len: usize) -> Result<Self> {
        // SAFETY: the memory is written through `write` before any copy reads it.
        let host = outside_captures(|| unsafe {
            device.context().alloc_pinned_with_flags::<T>(len.max(1), 0)
        })
        .call("cuMemHostAlloc")?;
        Ok(Self { host: DropOutsideCaptures::new(host), device: device.clone(), copied: None })
    }

    pub fn len(&self) -> usize {
        self.host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.host.len() == 0
    }

    /// The host memory to fill, once the previous upload out of it has completed.
    pub fn write(&mut self) -> Result<&mut [T]> {
        if let Some(e) = self.copied.take() {
            e.synchronize().call("cuEventSynchronize")?;
        }
        self.host.as_mut_slice().call("cuEventSynchronize")
    }

    /// Queues a copy of the first `len` elements into the start of `dst`.
    pub fn upload_prefix(&mut self, len: usize, dst: &mut DeviceBuffer<T>) -> Result<()> {
        self.upload_at(len, dst, 0)
    }

    /// Queues a copy of the first `len` elements into `dst` from element `offset` on.
    pub fn upload_at(
        &mut self,
        len: usize,
        dst: &mut DeviceBuffer<T>,
        offset: usize,
    ) -> Result<()> {
        ensure!(
            len <= self.len() && offset.checked_add(len).is_some_and(|end| end <= dst.len()),
            "staged upload of {len} elements at {offset}: staging holds {}, destination {}",
            self.len(),
            dst.len()
        );
        if len == 0 {
            return Ok(());
        }
        let stream = self.device.stream();
        let src = self.host.as_slice().call("cuEventSynchronize")?;
        let dst_ptr = dst.ptr_mut() + (offset * std::mem::size_of::<T>()) as u64;
        // SAFETY: `src` is pinned host memory of at least `len` elements that is not
        // written again before `copied` completes (`write` waits for it); `dst` holds at
        // least `offset + len` elements (checked above).
        unsafe {
            cudarc::driver::result::memcpy_htod_async(dst_ptr, &src[..len], stream.cu_stream())
        }
        .call("cuMemcpyHtoDAsync")?;
        self.copied = Some(stream.record_event(None).call("cuEventRecord")?);
        Ok(())
    }
}

/// Uploads large host arrays (model weights) through two pinned buffers of `chunk`
/// elements: the host fills one while the other is copied. Copies from pageable memory
/// go through the driver's own bounce buffer (7.7 GB/s on the H200 host, pinned 55 GB/s);
/// loading Llama-3-8B with them, and a clone of each tensor, spent 45 s outside generating
/// the weights, through these buffers 25.5 s.
pub struct StagedUploader<T: Element> {
    stages: [PinnedStaging<T>; 2],
    next: usize,
}

impl<T: Element + cudarc::driver::ValidAsZeroBits> StagedUploader<T> {
    pub fn new(device: &Device, chunk: usize) -> Result<Self> {
        Ok(Self {
            stages: [PinnedStaging::new(device, chunk)?, PinnedStaging::new(device, chunk)?],
            next: 0,
        })
    }

    /// A new device buffer holding `data`; the copies are queued on the device's stream
    /// (work queued after them sees the data).
    pub fn upload(&mut self, device: &Device, data: &[T]) -> Result<DeviceBuffer<T>> {
        let mut dst = device.alloc::<T>(data.len())?;
        let chunk = self.stages[0].len();
        for (i, piece) in data.chunks(chunk).enumerate() {
            let stage = &mut self.stages[self.next];
            self.next ^= 1;
            stage.write()?[..piece.len()].copy_from_slice(piece);
            stage.upload_at(piece.len(), &mut dst, i * chunk)?;
        }
        Ok(dst)
    }
}
