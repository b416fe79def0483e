//! Shared memory: [`SharedMemory`] (bytes), [`SharedSlice<T>`] (plain-old-data elements), and
//! their sealed, read-only forms [`SealedMemory`] and [`SealedSlice<T>`].
//!
//! Each is a memfd mapped `MAP_SHARED`. Passed as a task argument (or in a message), it travels
//! as its descriptor: the other process maps the same pages, and nothing is copied. The memory
//! is freed when the last process drops its handle or exits—there is no tracker process and no
//! name in `/dev/shm` to leave behind after a crash.
//!
//! Writable memory may be changed by another process at any moment, so it never lends a
//! reference: values are copied in and out (`get`, `set`, `read`, `write`). Sealing
//! (`F_SEAL_WRITE`, enforced by the kernel for every process) makes it immutable forever; sealed
//! memory lends `&[u8]` / `&[T]` directly, the zero-copy way to share a large read-only dataset.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::os::fd::{AsFd, OwnedFd};

use bytemuck::Pod;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};
use crate::sys::{self, Mapping};
use crate::transport::fd::Fd;

fn io_error(what: &str, e: std::io::Error) -> Error {
    Error::io(format!("shared memory: {what}"), e)
}

/// Writable shared bytes.
pub struct SharedMemory {
    fd: OwnedFd,
    map: Mapping,
}

impl SharedMemory {
    /// `len` zeroed bytes.
    pub fn new(len: usize) -> Result<SharedMemory> {
        let fd = sys::memfd("multiproc-shm", len).map_err(|e| io_error("memfd_create", e))?;
        let map = Mapping::writable(fd.as_fd(), len).map_err(|e| io_error("mmap", e))?;
        Ok(SharedMemory { fd, map })
    }

    /// Shared memory holding a copy of `data`, written into the memory file (`pwrite`)
    /// before it is mapped: the kernel allocates the pages as it copies, instead of taking a
    /// page fault for each one, as writing through the fresh mapping would.
    fn with_contents(data: &[u8]) -> Result<SharedMemory> {
        let fd =
            sys::memfd("multiproc-shm", data.len()).map_err(|e| io_error("memfd_create", e))?;
        sys::write_all_at(fd.as_fd(), data, 0).map_err(|e| io_error("write", e))?;
        let map = Mapping::writable(fd.as_fd(), data.len()).map_err(|e| io_error("mmap", e))?;
        Ok(SharedMemory { fd, map })
    }

    /// Its size in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Copies bytes from `offset` into `out`.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        self.map.read_at(offset, out).map_err(|e| io_error("read", e))
    }

    /// Copies `data` in at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.map.write_at(offset, data).map_err(|e| io_error("write", e))
    }

    /// A copy of every byte.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0; self.len()];
        self.map.read_at(0, &mut out).expect("the whole mapping is in range");
        out
    }

    /// The memory as 32-bit atomic words, for counters shared between processes.
    pub(crate) fn atomic_words(&self) -> &[std::sync::atomic::AtomicU32] {
        self.map.atomic_words()
    }

    /// A second handle to the same memory (a new descriptor and mapping).
    pub fn try_clone(&self) -> Result<SharedMemory> {
        let fd = self.fd.try_clone().map_err(|e| io_error("dup", e))?;
        let map = Mapping::writable(fd.as_fd(), self.len()).map_err(|e| io_error("mmap", e))?;
        Ok(SharedMemory { fd, map })
    }

    /// Makes the memory read-only forever, for every process that holds it.
    ///
    /// Fails while another process holds a writable mapping of it (`EBUSY`).
    pub fn seal(self) -> Result<SealedMemory> {
        let SharedMemory { fd, map } = self;
        let len = map.len();
        drop(map);
        sys::seal_read_only(fd.as_fd()).map_err(|e| io_error("seal", e))?;
        let map = Mapping::sealed(fd.as_fd(), len).map_err(|e| io_error("mmap", e))?;
        Ok(SealedMemory { fd, map })
    }
}

/// Read-only shared bytes, lent directly (`&[u8]`).
pub struct SealedMemory {
    fd: OwnedFd,
    map: Mapping,
}

impl SealedMemory {
    /// Sealed memory holding a copy of `data`.
    pub fn from_bytes(data: &[u8]) -> Result<SealedMemory> {
        SharedMemory::with_contents(data)?.seal()
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.map.as_slice().expect("a sealed mapping lends its bytes")
    }

    /// Maps the whole of a memory file that must be sealed read-only (checked).
    pub(crate) fn from_fd(fd: OwnedFd) -> Result<SealedMemory> {
        let len = sys::file_size(fd.as_fd()).map_err(|e| io_error("fstat", e))?;
        let len = usize::try_from(len)
            .map_err(|_| io_error("size", std::io::ErrorKind::FileTooLarge.into()))?;
        let map = Mapping::sealed(fd.as_fd(), len).map_err(|e| io_error("mmap", e))?;
        Ok(SealedMemory { fd, map })
    }

    /// Gives up the mapping and returns the descriptor.
    pub(crate) fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl Deref for SealedMemory {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

/// The wire form of shared memory: its descriptor and its length.
#[derive(Serialize, Deserialize)]
struct Handle<F> {
    fd: F,
    len: u64,
}

impl Handle<Fd> {
    /// Writes the wire form of memory behind `fd`, `len` bytes long.
    fn write<S: Serializer>(
        fd: &OwnedFd,
        len: usize,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        Handle { fd: Fd::new(fd.as_fd()), len: len as u64 }.serialize(serializer)
    }

    /// Reads the wire form and maps the memory with `map` (writable, or sealed after checking
    /// the seals: a sender cannot pass writable memory off as sealed).
    fn read<'de, D: Deserializer<'de>>(
        deserializer: D,
        map: fn(std::os::fd::BorrowedFd<'_>, usize) -> std::io::Result<Mapping>,
    ) -> std::result::Result<(OwnedFd, Mapping), D::Error> {
        let Handle { fd, len } = Handle::<Fd>::deserialize(deserializer)?;
        let fd = fd.into_inner();
        let len = usize::try_from(len).map_err(D::Error::custom)?;
        let mapping = map(fd.as_fd(), len)
            .map_err(|e| D::Error::custom(format!("mapping shared memory: {e}")))?;
        Ok((fd, mapping))
    }
}

impl Serialize for SharedMemory {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        Handle::write(&self.fd, self.map.len(), serializer)
    }
}

impl<'de> Deserialize<'de> for SharedMemory {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let (fd, map) = Handle::read(deserializer, Mapping::writable)?;
        Ok(SharedMemory { fd, map })
    }
}

impl Serialize for SealedMemory {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        Handle::write(&self.fd, self.map.len(), serializer)
    }
}

impl<'de> Deserialize<'de> for SealedMemory {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let (fd, map) = Handle::read(deserializer, Mapping::sealed)?;
        Ok(SealedMemory { fd, map })
    }
}

/// Writable shared memory holding `len` values of a plain-old-data type `T` (integers,
/// floats, `#[derive(Pod)]` structs: any bit pattern is a valid `T`).
pub struct SharedSlice<T> {
    memory: SharedMemory,
    len: usize,
    _elements: PhantomData<T>,
}

impl<T: Pod> SharedSlice<T> {
    /// `len` zeroed values.
    pub fn new(len: usize) -> Result<Self> {
        let bytes = len.checked_mul(size_of::<T>()).ok_or_else(|| {
            Error::new(crate::ErrorKind::InvalidState, "shared slice size overflows")
        })?;
        Ok(SharedSlice { memory: SharedMemory::new(bytes)?, len, _elements: PhantomData })
    }

    /// A shared copy of `values`.
    pub fn from_slice(values: &[T]) -> Result<Self> {
        let memory = SharedMemory::with_contents(bytemuck::cast_slice(values))?;
        Ok(SharedSlice { memory, len: values.len(), _elements: PhantomData })
    }

    /// The number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A copy of value `index`.
    pub fn get(&self, index: usize) -> Result<T> {
        let mut value = T::zeroed();
        self.memory.read_at(self.offset(index, 1)?, bytemuck::bytes_of_mut(&mut value))?;
        Ok(value)
    }

    /// Stores `value` at `index`.
    pub fn set(&self, index: usize, value: T) -> Result<()> {
        self.memory.write_at(self.offset(index, 1)?, bytemuck::bytes_of(&value))
    }

    /// Copies `values` in, starting at `index`.
    pub fn write(&self, index: usize, values: &[T]) -> Result<()> {
        self.memory.write_at(self.offset(index, values.len())?, bytemuck::cast_slice(values))
    }

    /// A copy of every value.
    pub fn to_vec(&self) -> Vec<T> {
        let mut out = vec![T::zeroed(); self.len];
        self.memory
            .read_at(0, bytemuck::cast_slice_mut(&mut out))
            .expect("the whole slice is in range");
        out
    }

    /// A second handle to the same values.
    pub fn try_clone(&self) -> Result<Self> {
        Ok(SharedSlice { memory: self.memory.try_clone()?, len: self.len, _elements: PhantomData })
    }

    /// Makes the values read-only forever, lent as `&[T]`.
    pub fn seal(self) -> Result<SealedSlice<T>> {
        Ok(SealedSlice { memory: self.memory.seal()?, len: self.len, _elements: PhantomData })
    }

    fn offset(&self, index: usize, count: usize) -> Result<usize> {
        match index.checked_add(count) {
            Some(end) if end <= self.len => Ok(index * size_of::<T>()),
            _ => Err(Error::new(
                crate::ErrorKind::InvalidState,
                format!("index {index}..+{count} outside a shared slice of {}", self.len),
            )),
        }
    }
}

/// Read-only shared memory holding values of a plain-old-data type `T`, lent as `&[T]`: every
/// process reads the same pages.
pub struct SealedSlice<T> {
    memory: SealedMemory,
    len: usize,
    _elements: PhantomData<T>,
}

impl<T: Pod> SealedSlice<T> {
    /// A sealed shared copy of `values`.
    pub fn from_slice(values: &[T]) -> Result<Self> {
        SharedSlice::from_slice(values)?.seal()
    }

    /// The values.
    pub fn as_slice(&self) -> &[T] {
        // The mapping is page-aligned and holds `len` values (checked when it was made).
        bytemuck::cast_slice(&self.memory.as_slice()[..self.len * size_of::<T>()])
    }
}

impl<T: Pod> Deref for SealedSlice<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

/// The wire form of a typed slice: its memory and its element count.
#[derive(Serialize, Deserialize)]
struct SliceHandle<M> {
    memory: M,
    len: u64,
}

impl<T> Serialize for SharedSlice<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        SliceHandle { memory: &self.memory, len: self.len as u64 }.serialize(serializer)
    }
}

impl<'de, T: Pod> Deserialize<'de> for SharedSlice<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let SliceHandle { memory, len } = SliceHandle::<SharedMemory>::deserialize(deserializer)?;
        let len = checked_len::<T, D::Error>(len, memory.len())?;
        Ok(SharedSlice { memory, len, _elements: PhantomData })
    }
}

impl<T> Serialize for SealedSlice<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        SliceHandle { memory: &self.memory, len: self.len as u64 }.serialize(serializer)
    }
}

impl<'de, T: Pod> Deserialize<'de> for SealedSlice<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let SliceHandle { memory, len } = SliceHandle::<SealedMemory>::deserialize(deserializer)?;
        let len = checked_len::<T, D::Error>(len, memory.map.len())?;
        Ok(SealedSlice { memory, len, _elements: PhantomData })
    }
}

/// An element count that fits in `bytes` of memory.
fn checked_len<T, E: serde::de::Error>(len: u64, bytes: usize) -> std::result::Result<usize, E> {
    usize::try_from(len)
        .ok()
        .filter(|len| len.checked_mul(size_of::<T>()).is_some_and(|need| need <= bytes))
        .ok_or_else(|| E::custom(format!("{len} elements do not fit in {bytes} bytes")))
}

macro_rules! debug_as {
    ($($name:ident),*) => {$(
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($name)).field("len", &self.map.len()).finish()
            }
        }
    )*};
}
debug_as!(SharedMemory, SealedMemory);

impl<T> fmt::Debug for SharedSlice<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedSlice").field("len", &self.len).finish()
    }
}

impl<T> fmt::Debug for SealedSlice<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedSlice").field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::codec;

    #[test]
    fn writes_are_seen_through_a_second_mapping() {
        let slice = SharedSlice::<u64>::new(1000).unwrap();
        let (bytes, fds) = codec::collecting_fds(|| codec::encode(&slice));
        let other: SharedSlice<u64> =
            codec::with_fds(fds, || codec::decode(&bytes.unwrap())).unwrap();
        other.set(999, 42).unwrap();
        other.write(0, &[1, 2, 3]).unwrap();
        assert_eq!(slice.get(999).unwrap(), 42);
        assert_eq!(&slice.to_vec()[..4], &[1, 2, 3, 0]);
        assert!(slice.get(1000).is_err());
    }

    #[test]
    fn sealed_memory_is_read_only_everywhere() {
        let values: Vec<u32> = (0..10_000).collect();
        let sealed = SealedSlice::from_slice(&values).unwrap();
        assert_eq!(sealed.as_slice(), &values[..]);
        let (bytes, fds) = codec::collecting_fds(|| codec::encode(&sealed));
        let bytes = bytes.unwrap();
        let fds2: Vec<OwnedFd> = fds.iter().map(|fd| fd.try_clone().unwrap()).collect();
        let other: SealedSlice<u32> = codec::with_fds(fds, || codec::decode(&bytes)).unwrap();
        assert_eq!(other.as_slice(), &values[..]);
        // Nobody can map it writable again.
        let writable: std::result::Result<SharedSlice<u32>, _> =
            codec::with_fds(fds2, || codec::decode(&bytes));
        assert!(writable.is_err());
    }

    #[test]
    fn unsealed_memory_cannot_pass_for_sealed() {
        let memory = SharedMemory::new(64).unwrap();
        let (bytes, fds) = codec::collecting_fds(|| codec::encode(&memory));
        let sealed: std::result::Result<SealedMemory, _> =
            codec::with_fds(fds, || codec::decode(&bytes.unwrap()));
        assert!(sealed.unwrap_err().to_string().contains("not sealed"));
    }
}
