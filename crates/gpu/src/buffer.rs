//! Device buffers typed by element, with checked host<->device copies.

use std::mem::ManuallyDrop;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use crate::device::Device;
use crate::dtype::Element;
use crate::ensure;
use crate::error::{DriverCall, Result};

/// A device allocation of `len` elements of `T`, owned by one device's stream.
///
/// Every operation is ordered on that stream; reads back to the host synchronise it.
///
/// A buffer either owns its allocation or is a view of part of another's (`view`): a
/// workspace carved into activations whose addresses stay put, which is what lets a CUDA
/// graph captured once replay over them.
pub struct DeviceBuffer<T: Element> {
    slice: ManuallyDrop<CudaSlice<T>>,
    device: Device,
    owned: bool,
}

impl<T: Element> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: the slice is taken once, here, and never used again.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        if self.owned {
            drop(slice); // frees, ordered on the stream
        } else {
            slice.leak(); // a view: the parent owns the memory
        }
    }
}

impl<T: Element> DeviceBuffer<T> {
    pub(crate) fn new(slice: CudaSlice<T>, device: Device) -> Self {
        Self { slice: ManuallyDrop::new(slice), device, owned: true }
    }

    /// A buffer over elements `offset..offset + len` of this one, without a copy.
    ///
    /// # Safety
    /// The view does not keep this buffer alive: the caller must drop every view before
    /// the buffer it came from (or, if work using it is queued, before that memory is
    /// reused: the stream orders a later free after it).
    pub unsafe fn view(&self, offset: usize, len: usize) -> Result<DeviceBuffer<T>> {
        ensure!(
            offset.checked_add(len).is_some_and(|end| end <= self.len()),
            "view of {len} elements at offset {offset} past a buffer of {}",
            self.len()
        );
        let ptr = self.ptr() + (offset * std::mem::size_of::<T>()) as u64;
        // SAFETY: the range lies inside this allocation (checked above); `owned: false`
        // makes the drop leak instead of free.
        let slice = unsafe { self.device.stream().upgrade_device_ptr::<T>(ptr, len) };
        Ok(DeviceBuffer {
            slice: ManuallyDrop::new(slice),
            device: self.device.clone(),
            owned: false,
        })
    }

    pub fn len(&self) -> usize {
        self.slice.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slice.len() == 0
    }

    pub fn num_bytes(&self) -> usize {
        self.slice.len() * std::mem::size_of::<T>()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Raw device address, for kernel parameter structs. The buffer must outlive every
    /// launch that uses it (stream order makes a later drop safe).
    pub fn ptr(&self) -> u64 {
        let (ptr, _sync) = self.slice.device_ptr(self.device.stream());
        ptr
    }

    /// Raw device address for kernels that write the buffer.
    pub fn ptr_mut(&mut self) -> u64 {
        let (ptr, _sync) = self.slice.device_ptr_mut(self.device.stream());
        ptr
    }

    pub fn as_slice(&self) -> &CudaSlice<T> {
        &self.slice
    }

    /// Copies `src` into the buffer; `src` must have exactly `len()` elements.
    pub fn copy_from_host(&mut self, src: &[T]) -> Result<()> {
        ensure!(
            src.len() == self.len(),
            "host->device copy of {} elements into a buffer of {}",
            src.len(),
            self.len()
        );
        self.copy_from_host_at(0, src)
    }

    /// Copies `src` into elements `offset..offset + src.len()`.
    pub fn copy_from_host_at(&mut self, offset: usize, src: &[T]) -> Result<()> {
        ensure!(
            offset.checked_add(src.len()).is_some_and(|end| end <= self.len()),
            "host->device copy of {} elements at offset {offset} past a buffer of {}",
            src.len(),
            self.len()
        );
        if src.is_empty() {
            return Ok(());
        }
        let stream = self.device.stream().clone();
        let mut view = self.slice.slice_mut(offset..offset + src.len());
        stream.memcpy_htod(src, &mut view).call("cuMemcpyHtoDAsync")
    }

    /// Copies the whole buffer into `dst` (same length) and waits for it.
    pub fn copy_to_host(&self, dst: &mut [T]) -> Result<()> {
        ensure!(
            dst.len() == self.len(),
            "device->host copy of a buffer of {} elements into {}",
            self.len(),
            dst.len()
        );
        if dst.is_empty() {
            return Ok(());
        }
        let stream = self.device.stream();
        stream.memcpy_dtoh(&*self.slice, dst).call("cuMemcpyDtoHAsync")?;
        stream.synchronize().call("cuStreamSynchronize")
    }

    pub fn to_vec(&self) -> Result<Vec<T>> {
        let mut out = vec![T::default(); self.len()];
        self.copy_to_host(&mut out)?;
        Ok(out)
    }

    /// Copies `src` (same length) into this buffer on the device.
    pub fn copy_from_device(&mut self, src: &DeviceBuffer<T>) -> Result<()> {
        ensure!(
            src.len() == self.len(),
            "device->device copy of {} elements into a buffer of {}",
            src.len(),
            self.len()
        );
        if src.is_empty() {
            return Ok(());
        }
        let stream = self.device.stream().clone();
        stream.memcpy_dtod(&*src.slice, &mut *self.slice).call("cuMemcpyDtoDAsync")
    }

    /// Sets every byte to `byte`: 0 to clear, 0xFF to poison (0xFFFF is NaN in f16 and bf16).
    pub fn fill_bytes(&mut self, byte: u8) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        let ptr = self.ptr_mut();
        let stream = self.device.stream().cu_stream();
        // SAFETY: ptr..ptr+num_bytes is this buffer's own allocation.
        unsafe { cudarc::driver::result::memset_d8_async(ptr, byte, self.num_bytes(), stream) }
            .call("cuMemsetD8Async")
    }
}

impl<T: Element> std::fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer<{}>[{}]", T::DTYPE, self.len())
    }
}
