//! A queue's overflow log: where records go once its socket is full, so that an unbounded
//! queue's `put` never waits for a consumer.
//!
//! The log is a memory file shared by every holder of the queue, mapped once per process over
//! a large reserved range ([`RESERVED`]) and grown with `ftruncate` as records arrive, so no
//! process ever remaps it. Records are appended at the tail and taken from the head; when the
//! head meets the tail, both go back to zero and the file is shrunk to nothing, which frees its
//! memory. The positions and the file's size live in words of the queue's shared page.
//!
//! Every access holds the log's lock: a futex word holding the pid of its holder. A waiter
//! that finds the holder dead (SIGKILL between lock and unlock) takes the lock over. That is
//! safe because a holder changes the shared positions only after the bytes they cover are in
//! place: one that dies mid-append leaves bytes past the tail, which the next append
//! overwrites, and one that dies mid-take leaves the record at the head for the next consumer.
//!
//! Only records without descriptors go here (a descriptor cannot live in memory); a queue
//! whose socket is full still waits for room to send a message that holds some.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::{Duration, Instant};

use crate::sys::{self, Mapping};

/// Address space each process reserves for the log: the most it can hold at once. Only the
/// pages in use are memory.
pub(super) const RESERVED: usize = 1 << 36;

/// The file grows by at least this much at a time, so that a run of small appends costs one
/// `ftruncate` per megabyte, not one each.
const GROWTH: u64 = 1 << 20;

/// How long a waiter sleeps on the lock before it checks that its holder still lives.
const HOLDER_CHECK: Duration = Duration::from_millis(10);

/// Words of the log's state, from the first one given to [`Overflow::new`].
const LOCK: usize = 0;
const LOCK_WAITERS: usize = 1;
const COUNT: usize = 2;
const HEAD: usize = 3; // and 4: a u64, low word first
const TAIL: usize = 5; // and 6
const SIZE: usize = 7; // and 8
/// How many words the log uses.
pub(super) const WORDS: usize = 9;

/// One process's view of a queue's overflow log.
pub(super) struct Overflow<'a> {
    words: &'a [AtomicU32],
    file: BorrowedFd<'a>,
    map: &'a Mapping,
}

impl<'a> Overflow<'a> {
    /// The log whose state is `words[..WORDS]`, stored in `file`, mapped at `map` (made with
    /// [`Mapping::reserved`] over [`RESERVED`] bytes).
    pub(super) fn new(words: &'a [AtomicU32], file: BorrowedFd<'a>, map: &'a Mapping) -> Self {
        Overflow { words: &words[..WORDS], file, map }
    }

    /// Records in the log: exact under the lock, a hint without it.
    pub(super) fn count(&self) -> u32 {
        self.words[COUNT].load(SeqCst)
    }

    /// Appends `record`; `Ok(None)` if it does not fit the reserved range. On success, says
    /// whether the log was empty before (the caller then wakes a consumer that may be waiting
    /// on the socket alone).
    pub(super) fn push(&self, record: &[u8]) -> io::Result<Option<bool>> {
        let _lock = self.lock();
        let (tail, size) = (self.get64(TAIL), self.get64(SIZE));
        let len = u32::try_from(record.len()).map_err(|_| io::Error::other("record too long"))?;
        let end = tail + 4 + u64::from(len);
        if end > RESERVED as u64 {
            return Ok(None);
        }
        if end > size {
            // Grow first, publish after: the size in the page is never more than the file's.
            let grown = end.max(size * 2).max(GROWTH).min(RESERVED as u64);
            sys::set_file_size(self.file, grown)?;
            self.set64(SIZE, grown);
        }
        self.map.write_at(tail as usize, &len.to_le_bytes())?;
        self.map.write_at(tail as usize + 4, record)?;
        // The record is whole: only now does the tail cover it.
        self.set64(TAIL, end);
        Ok(Some(self.words[COUNT].fetch_add(1, SeqCst) == 0))
    }

    /// Takes the record at the head into `out`; `false` if the log is empty. On success, also
    /// says whether records are left.
    pub(super) fn pop(&self, out: &mut Vec<u8>) -> io::Result<Option<bool>> {
        let _lock = self.lock();
        let (head, tail, size) = (self.get64(HEAD), self.get64(TAIL), self.get64(SIZE));
        if head >= tail {
            return Ok(None);
        }
        let bad = || io::Error::other(format!("corrupt queue overflow log at {head} of {tail}"));
        if tail > size {
            return Err(bad());
        }
        let mut len = [0u8; 4];
        self.map.read_at(head as usize, &mut len)?;
        let len = u64::from(u32::from_le_bytes(len));
        let end = head + 4 + len;
        if end > tail {
            return Err(bad());
        }
        out.clear();
        out.resize(len as usize, 0);
        self.map.read_at(head as usize + 4, out)?;
        let left = self.words[COUNT].fetch_sub(1, SeqCst).saturating_sub(1);
        if end == tail {
            // Empty: start again from zero, and give the memory back. The smaller size is
            // published before the file shrinks.
            self.set64(HEAD, 0);
            self.set64(TAIL, 0);
            self.set64(SIZE, 0);
            sys::set_file_size(self.file, 0)?;
        } else {
            self.set64(HEAD, end);
        }
        Ok(Some(left > 0))
    }

    fn get64(&self, at: usize) -> u64 {
        u64::from(self.words[at].load(SeqCst)) | u64::from(self.words[at + 1].load(SeqCst)) << 32
    }

    fn set64(&self, at: usize, value: u64) {
        self.words[at].store(value as u32, SeqCst);
        self.words[at + 1].store((value >> 32) as u32, SeqCst);
    }

    /// Takes the log's lock, taking it over from a holder that died.
    fn lock(&self) -> LockGuard<'_> {
        let (word, waiters) = (&self.words[LOCK], &self.words[LOCK_WAITERS]);
        let me = std::process::id();
        loop {
            match word.compare_exchange(0, me, SeqCst, SeqCst) {
                Ok(_) => return LockGuard { word, waiters },
                Err(holder) => {
                    waiters.fetch_add(1, SeqCst);
                    let slept = sys::futex_wait(word, holder, Some(Instant::now() + HOLDER_CHECK));
                    waiters.fetch_sub(1, SeqCst);
                    // Timed out with the same holder: if it is gone, its lock is free.
                    if matches!(slept, Ok(false))
                        && holder != me
                        && !sys::process_alive(holder)
                        && word.compare_exchange(holder, 0, SeqCst, SeqCst).is_ok()
                    {
                        tracing::debug!(holder, "took over a queue log lock from a dead process");
                    }
                }
            }
        }
    }
}

/// Holds the log's lock until dropped.
struct LockGuard<'a> {
    word: &'a AtomicU32,
    waiters: &'a AtomicU32,
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        self.word.store(0, SeqCst);
        if self.waiters.load(SeqCst) > 0 {
            sys::futex_wake(self.word, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, OwnedFd};

    use super::*;

    fn log() -> (Vec<AtomicU32>, OwnedFd, Mapping) {
        let words = (0..WORDS).map(|_| AtomicU32::new(0)).collect();
        let file = sys::memfd("overflow-test", 0).unwrap();
        let map = Mapping::reserved(file.as_fd(), RESERVED).unwrap();
        (words, file, map)
    }

    #[test]
    fn records_come_out_in_order_and_an_empty_log_gives_its_memory_back() {
        let (words, file, map) = log();
        let log = Overflow::new(&words, file.as_fd(), &map);
        assert_eq!(log.push(b"first").unwrap(), Some(true));
        let big = vec![7u8; 3 << 20];
        assert_eq!(log.push(&big).unwrap(), Some(false));
        assert_eq!(log.count(), 2);
        assert!(sys::file_size(file.as_fd()).unwrap() >= (3 << 20));
        let mut out = Vec::new();
        assert_eq!(log.pop(&mut out).unwrap(), Some(true));
        assert_eq!(out, b"first");
        assert_eq!(log.pop(&mut out).unwrap(), Some(false));
        assert_eq!(out, big);
        assert_eq!(log.pop(&mut out).unwrap(), None);
        assert_eq!(sys::file_size(file.as_fd()).unwrap(), 0);
    }

    #[test]
    fn a_lock_whose_holder_died_is_taken_over() {
        let (words, file, map) = log();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let pid = gone.id();
        gone.wait().unwrap();
        // As if that process had been killed while it held the lock.
        words[LOCK].store(pid, SeqCst);
        let log = Overflow::new(&words, file.as_fd(), &map);
        assert_eq!(log.push(b"after").unwrap(), Some(true));
        assert_eq!(words[LOCK].load(SeqCst), 0);
    }

    #[test]
    fn a_corrupt_log_is_an_error_not_a_read_out_of_bounds() {
        let (words, file, map) = log();
        let log = Overflow::new(&words, file.as_fd(), &map);
        log.push(b"record").unwrap();
        // Another process wrote a length past the tail.
        map.write_at(0, &u32::MAX.to_le_bytes()).unwrap();
        assert!(log.pop(&mut Vec::new()).is_err());
        // And a tail past the file's size.
        log.set64(TAIL, RESERVED as u64);
        assert!(log.pop(&mut Vec::new()).is_err());
    }
}
