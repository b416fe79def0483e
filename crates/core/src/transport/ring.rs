//! A pool worker's results held back in shared memory, so that quick batches cost the worker
//! one `sendmsg` per several results instead of one each.
//!
//! A worker that has just run a quick batch while its next batch is already in its buffer
//! puts the result here instead of writing it to its socket; the result of the last batch it
//! has at hand goes to the socket as usual, and wakes the parent. Results never wait here for
//! long: only while the worker runs batches it already holds, each of which took under
//! [`HOLD_BELOW`] the last time, and at most [`MAX_HELD`] in a row.
//!
//! The parent reads the ring whenever it serves the worker, and takes an entry only when it is
//! due: when its batch is the first the worker still owes, so results are taken in batch order
//! wherever they travelled. Because the ring is shared memory, it outlives the worker: a
//! worker that dies loses nothing it had finished, and the batch it was running is the one
//! that fails.
//!
//! Layout: a 64-byte header—the write position (word 0, stored by the worker) and the read
//! position (word 1, stored by the parent), both counting bytes and wrapping at 2^32—then
//! [`CAPACITY`] bytes of entries, each a little-endian `u32` length and that many bytes (a frame
//! body: a message head and its payload), wrapping around the end. Each side keeps its own
//! position privately and only stores it for the other, so neither trusts what the other
//! wrote beyond checking it: a parent that reads nonsense stops the worker.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::sys::{self, Mapping};

/// Bytes of entries the ring holds (a power of two, so positions wrap consistently).
pub(crate) const CAPACITY: usize = 64 * 1024;

/// Bytes before the entries: the two positions, in a cache line of their own.
const HEADER: usize = 64;

/// A result is held only if its batch ran faster than this: slower batches gain nothing
/// measurable from sharing a `sendmsg`, and the next one would delay the held result as long.
pub(crate) const HOLD_BELOW: Duration = Duration::from_micros(100);

/// Results held in a row at most, before one goes to the socket and wakes the parent.
pub(crate) const MAX_HELD: usize = 16;

/// One side of a result ring.
pub(crate) struct Ring {
    fd: OwnedFd,
    map: Mapping,
    /// This side's position: the worker's write position, or the parent's read position.
    mine: u32,
}

impl Ring {
    /// A new, empty ring (the worker's side), sealed so that its size never changes: the
    /// parent that maps it can never fault past its end.
    pub(crate) fn create() -> io::Result<Ring> {
        let fd = sys::memfd("multiproc-results", HEADER + CAPACITY)?;
        sys::seal_size(fd.as_fd())?;
        let map = Mapping::writable(fd.as_fd(), HEADER + CAPACITY)?;
        Ok(Ring { fd, map, mine: 0 })
    }

    /// The ring a worker made (the parent's side); refused unless its size is sealed and
    /// right.
    pub(crate) fn adopt(fd: OwnedFd) -> io::Result<Ring> {
        let size = sys::file_size(fd.as_fd())?;
        if !sys::is_size_sealed(fd.as_fd())? || size != (HEADER + CAPACITY) as u64 {
            return Err(io::Error::other(format!(
                "a result ring must be {} bytes, sealed against resizing",
                HEADER + CAPACITY
            )));
        }
        let map = Mapping::writable(fd.as_fd(), HEADER + CAPACITY)?;
        Ok(Ring { fd, map, mine: 0 })
    }

    /// The memory's descriptor, to send to the parent.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The write position (word 0) and the read position (word 1).
    fn positions(&self) -> (&AtomicU32, &AtomicU32) {
        let words = self.map.atomic_words();
        (&words[0], &words[1])
    }

    /// Appends an entry made of `parts` (worker); false, and nothing written, when it does
    /// not fit in the room the parent has left.
    pub(crate) fn push(&mut self, parts: &[&[u8]]) -> bool {
        let len: usize = parts.iter().map(|part| part.len()).sum();
        let used = self.mine.wrapping_sub(self.positions().1.load(Ordering::Acquire)) as usize;
        // More than the capacity in use: the parent stored nonsense; hold nothing more.
        if used > CAPACITY || CAPACITY - used < 4 + len {
            return false;
        }
        let prefix = (len as u32).to_le_bytes();
        let mut at = self.mine;
        for bytes in std::iter::once(&prefix[..]).chain(parts.iter().copied()) {
            self.copy_in(at, bytes);
            at = at.wrapping_add(bytes.len() as u32);
        }
        self.mine = at;
        self.positions().0.store(at, Ordering::Release);
        true
    }

    /// Takes the next entry (parent), or `None` when the worker has written nothing more. An
    /// error means the positions or lengths make no sense: the worker is broken.
    pub(crate) fn pop(&mut self) -> Result<Option<Vec<u8>>, String> {
        let available = self.positions().0.load(Ordering::Acquire).wrapping_sub(self.mine) as usize;
        if available == 0 {
            return Ok(None);
        }
        if !(4..=CAPACITY).contains(&available) {
            return Err(format!("{available} bytes claimed in a ring of {CAPACITY}"));
        }
        let mut prefix = [0u8; 4];
        self.copy_out(self.mine, &mut prefix);
        let len = u32::from_le_bytes(prefix) as usize;
        if len > available - 4 {
            return Err(format!("an entry of {len} bytes, but {} were written", available - 4));
        }
        let mut body = vec![0u8; len];
        self.copy_out(self.mine.wrapping_add(4), &mut body);
        self.mine = self.mine.wrapping_add(4 + len as u32);
        self.positions().1.store(self.mine, Ordering::Release);
        Ok(Some(body))
    }

    /// Copies `bytes` into the entries at position `at`, wrapping around the end.
    fn copy_in(&self, at: u32, bytes: &[u8]) {
        let start = at as usize % CAPACITY;
        let first = bytes.len().min(CAPACITY - start);
        let (head, tail) = bytes.split_at(first);
        self.map.write_at(HEADER + start, head).expect("inside the ring");
        self.map.write_at(HEADER, tail).expect("inside the ring");
    }

    /// Copies the entries at position `at` into `out`, wrapping around the end.
    fn copy_out(&self, at: u32, out: &mut [u8]) {
        let start = at as usize % CAPACITY;
        let first = out.len().min(CAPACITY - start);
        let (head, tail) = out.split_at_mut(first);
        self.map.read_at(HEADER + start, head).expect("inside the ring");
        self.map.read_at(HEADER, tail).expect("inside the ring");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker's ring and the parent's view of the same memory.
    fn pair() -> (Ring, Ring) {
        let worker = Ring::create().unwrap();
        let parent = Ring::adopt(worker.fd().try_clone_to_owned().unwrap()).unwrap();
        (worker, parent)
    }

    #[test]
    fn entries_come_out_in_order_across_the_end_of_the_ring() {
        let (mut worker, mut parent) = pair();
        assert_eq!(parent.pop(), Ok(None));
        // 7,000-byte entries do not divide the capacity: they wrap at every offset.
        for round in 0..40u8 {
            let body = vec![round; 7_000];
            assert!(worker.push(&[b"head:", &body]));
            let got = parent.pop().unwrap().unwrap();
            assert!(got.starts_with(b"head:") && got[5..] == body[..], "round {round}");
            assert_eq!(parent.pop(), Ok(None));
        }
    }

    #[test]
    fn a_full_ring_refuses_until_the_parent_reads() {
        let (mut worker, mut parent) = pair();
        let body = vec![1u8; 1000];
        let mut pushed = 0;
        while worker.push(&[&body]) {
            pushed += 1;
        }
        assert_eq!(pushed, CAPACITY / 1004);
        assert!(parent.pop().unwrap().is_some());
        assert!(worker.push(&[&body]), "room again once one was read");
        assert!(!worker.push(&[&vec![0u8; CAPACITY]]), "larger than the whole ring");
        let mut read = 0;
        while parent.pop().unwrap().is_some() {
            read += 1;
        }
        assert_eq!(read, pushed);
    }

    #[test]
    fn nonsense_written_by_a_worker_is_an_error() {
        let (worker, mut parent) = pair();
        // A write position far beyond anything written.
        worker.positions().0.store(CAPACITY as u32 + 8, Ordering::Release);
        assert!(parent.pop().is_err());
        // An entry that claims more bytes than were written.
        let (worker, mut parent) = pair();
        worker.map.write_at(HEADER, &100u32.to_le_bytes()).unwrap();
        worker.positions().0.store(10, Ordering::Release);
        assert!(parent.pop().is_err());
    }

    #[test]
    fn memory_whose_size_can_change_is_refused() {
        let fd = sys::memfd("not-a-ring", HEADER + CAPACITY).unwrap();
        assert!(Ring::adopt(fd).is_err());
        let fd = sys::memfd("wrong-size", 4096).unwrap();
        sys::seal_size(fd.as_fd()).unwrap();
        assert!(Ring::adopt(fd).is_err());
    }
}
