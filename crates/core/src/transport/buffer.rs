//! Large byte buffers that are reused instead of faulted in afresh.
//!
//! A received block needs an allocation of its own, and a fresh allocation of 100 MB is paid
//! for page by page: on the benchmark machine faulting it in cost more than the transfer itself
//! (about 50 ms for 100 MB against 17 ms on the socket). A [`Buffer`] that is dropped (the last
//! `Bytes` sharing it went away, or a sent block was written) is kept here instead of being
//! unmapped, and the next block of a similar size is received into it. At most
//! [`KEPT_BUFFERS`] buffers and [`KEPT_BYTES`] bytes are kept, and only buffers of at least
//! [`RECYCLE_MIN`] bytes: below that the allocator keeps memory on its own.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// The smallest buffer worth keeping.
pub const RECYCLE_MIN: usize = 1 << 20;

/// How many dropped buffers are kept at most.
pub const KEPT_BUFFERS: usize = 2;

/// How many bytes (of capacity) the kept buffers may hold together.
pub const KEPT_BYTES: usize = 256 << 20;

/// Dropped buffers waiting for reuse, newest last.
static KEPT: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty buffer for `len` bytes: a kept one whose capacity is at least `len` and at most
/// twice that, or a new one with room for `len` but at most `fresh_max` bytes (so that a length
/// nobody has proved yet is not allocated in full).
pub fn with_capacity(len: usize, fresh_max: usize) -> Vec<u8> {
    if len >= RECYCLE_MIN {
        let mut kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
        let fits = |buf: &Vec<u8>| buf.capacity() >= len && buf.capacity() / 2 <= len;
        if let Some(at) = kept.iter().rposition(fits) {
            let mut buf = kept.swap_remove(at);
            buf.clear();
            return buf;
        }
    }
    crate::sys::large_buffer(len.min(fresh_max))
}

/// Keeps `buf` for reuse if it is large and there is room; frees it otherwise.
fn keep(buf: Vec<u8>) {
    if buf.capacity() < RECYCLE_MIN || buf.capacity() > KEPT_BYTES {
        return;
    }
    let mut kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
    kept.push(buf);
    // Oldest first out, until both limits hold.
    while kept.len() > KEPT_BUFFERS || kept.iter().map(Vec::capacity).sum::<usize>() > KEPT_BYTES {
        kept.remove(0);
    }
}

/// A `Vec<u8>` that goes back to the kept buffers when dropped.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Buffer(Vec<u8>);

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buffer({} bytes)", self.0.len())
    }
}

impl Buffer {
    /// The vector itself, which then is the caller's to free.
    pub fn into_vec(mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

impl From<Vec<u8>> for Buffer {
    fn from(bytes: Vec<u8>) -> Self {
        Buffer(bytes)
    }
}

impl Deref for Buffer {
    type Target = Vec<u8>;

    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        keep(std::mem::take(&mut self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_large_buffer_is_reused_for_a_similar_size() {
        let buffer = Buffer::from(vec![7u8; RECYCLE_MIN * 3]);
        let address = buffer.as_ptr();
        drop(buffer);
        // Other tests may take it first; it is reused at most by one of them.
        let reused = with_capacity(RECYCLE_MIN * 2, usize::MAX);
        let far_smaller = with_capacity(RECYCLE_MIN, usize::MAX);
        assert_eq!(with_capacity(RECYCLE_MIN * 100, RECYCLE_MIN).capacity(), RECYCLE_MIN);
        assert!(reused.is_empty() && reused.capacity() >= RECYCLE_MIN * 2);
        assert_ne!(far_smaller.as_ptr(), address, "a buffer over twice the size is not reused");
        let small = Buffer::from(vec![1u8; 100]);
        drop(small);
        assert!(KEPT.lock().unwrap().iter().all(|buf| buf.capacity() >= RECYCLE_MIN));
        assert!(KEPT.lock().unwrap().len() <= KEPT_BUFFERS);
    }

    #[test]
    fn into_vec_takes_the_buffer_out_of_reuse() {
        let vec = Buffer::from(vec![1u8; RECYCLE_MIN]).into_vec();
        assert_eq!(vec.len(), RECYCLE_MIN);
    }
}
