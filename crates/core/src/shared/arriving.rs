//! Memory that one process fills while others read behind it: how a pool's large initializer
//! arguments reach its workers, who decode them as they are written instead of after.
//!
//! A memory file holds a header page, then the bytes. The writer knows how many bytes there
//! will be before it writes the first (the file has its final size from the start); it writes
//! them in order (`pwrite`, which allocates the pages as it copies), and after each piece
//! publishes how many are in place (`FILLED`), then moves a futex word (`TURN`) and wakes the
//! readers that sleep on it. A published byte is never written again, which is what lets a
//! reader lend slices of the published ones. The writer ends by setting `STATE` to done; one
//! dropped before that (its encoding failed, or panicked) sets it to failed, so no reader waits
//! for bytes that will not come. A reader whose writer's process dies instead finds out
//! from a descriptor it watches (its channel to that process), within [`WRITER_CHECK`].
//!
//! The file is not sealed: only the writer's own children ever hold it, and they map the
//! bytes read-only.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sys::{self, Mapping, POLLRDHUP, PollFd};
use crate::transport::codec::{Arrival, Input};
use crate::transport::fd::Fd;

/// The header's size: the bytes start on the next page, so a packed slice in them keeps the
/// alignment it had.
const HEADER: usize = 4096;

/// Byte offsets of the header's words.
const TURN: usize = 0;
const STATE: usize = 4;
const WAITERS: usize = 8;
const FILLED: usize = 16;

/// Values of `STATE`.
const WRITING: u32 = 0;
const DONE: u32 = 1;
const FAILED: u32 = 2;

/// The writer publishes at least this often (in bytes), so readers copy behind it.
const PIECE: usize = 1 << 20;

/// How long a reader sleeps before it checks that its writer's process still lives.
const WRITER_CHECK: Duration = Duration::from_millis(20);

fn io_error(what: &str, e: std::io::Error) -> Error {
    Error::io(format!("arriving memory: {what}"), e)
}

/// The header's words in `map` (a writable mapping of the header page).
struct Header<'a> {
    turn: &'a AtomicU32,
    state: &'a AtomicU32,
    waiters: &'a AtomicU32,
    filled: &'a AtomicU64,
}

impl<'a> Header<'a> {
    fn of(map: &'a Mapping) -> Header<'a> {
        let word = |offset| map.atomic_u32(offset).expect("the header page is mapped writable");
        let filled = map.atomic_u64(FILLED).expect("the header page is mapped writable");
        Header { turn: word(TURN), state: word(STATE), waiters: word(WAITERS), filled }
    }

    /// Moves the turn and wakes whoever sleeps on it.
    fn wake(&self) {
        self.turn.fetch_add(1, SeqCst);
        if self.waiters.load(SeqCst) > 0 {
            sys::futex_wake(self.turn, u32::MAX);
        }
    }
}

/// The writing end: bytes appended in order, published piece by piece.
pub(crate) struct ArrivingWriter {
    fd: OwnedFd,
    header: Mapping,
    len: u64,
    written: u64,
    done: bool,
}

impl ArrivingWriter {
    /// Memory for exactly `len` bytes, none of them in place yet.
    pub(crate) fn new(len: usize) -> Result<ArrivingWriter> {
        let size = len
            .checked_add(HEADER)
            .ok_or_else(|| io_error("size", std::io::ErrorKind::FileTooLarge.into()))?;
        let fd = sys::memfd("multiproc-arriving", size).map_err(|e| io_error("memfd", e))?;
        let header = Mapping::writable(fd.as_fd(), HEADER).map_err(|e| io_error("mmap", e))?;
        Ok(ArrivingWriter { fd, header, len: len as u64, written: 0, done: false })
    }

    /// What a reader needs, to be sent to it: a duplicate of the descriptor, and the length.
    pub(crate) fn handle(&self) -> Result<ArrivingMemory> {
        let fd = self.fd.try_clone().map_err(|e| io_error("dup", e))?;
        Ok(ArrivingMemory { fd: Fd::new(fd), len: self.len })
    }

    /// Writes `data` after what is in place, and publishes it.
    pub(crate) fn append(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.written + data.len() as u64 > self.len {
            return Err(std::io::Error::other(format!(
                "{} bytes written into arriving memory of {}",
                self.written + data.len() as u64,
                self.len
            )));
        }
        for piece in data.chunks(PIECE) {
            sys::write_all_at(self.fd.as_fd(), piece, HEADER as u64 + self.written)?;
            self.written += piece.len() as u64;
            let header = Header::of(&self.header);
            header.filled.store(self.written, SeqCst);
            header.wake();
        }
        Ok(())
    }

    /// Says that every byte is in place; fails (and tells the readers) if some are missing.
    pub(crate) fn finish(mut self) -> std::result::Result<(), String> {
        if self.written != self.len {
            return Err(format!(
                "the arguments encoded to {} bytes, after {} when measured",
                self.written, self.len
            ));
        }
        self.done = true;
        let header = Header::of(&self.header);
        header.state.store(DONE, SeqCst);
        header.wake();
        Ok(())
    }
}

impl Drop for ArrivingWriter {
    fn drop(&mut self) {
        if !self.done {
            let header = Header::of(&self.header);
            header.state.store(FAILED, SeqCst);
            header.wake();
        }
    }
}

/// Arriving memory as it travels: its descriptor and how many bytes it will hold.
#[derive(Serialize, Deserialize)]
pub(crate) struct ArrivingMemory {
    fd: Fd,
    len: u64,
}

impl ArrivingMemory {
    /// Maps the memory, to read it behind its writer; `writer` is a descriptor that hangs up
    /// (`POLLRDHUP`) when the writer's process is gone.
    pub(crate) fn reader(self, writer: BorrowedFd<'_>) -> Result<ArrivingReader<'_>> {
        let len = usize::try_from(self.len)
            .ok()
            .filter(|len| len.checked_add(HEADER).is_some())
            .ok_or_else(|| io_error("size", std::io::ErrorKind::FileTooLarge.into()))?;
        let fd = self.fd.into_inner();
        let header = Mapping::writable(fd.as_fd(), HEADER).map_err(|e| io_error("mmap", e))?;
        let whole =
            Mapping::read_only(fd.as_fd(), HEADER + len).map_err(|e| io_error("mmap", e))?;
        Ok(ArrivingReader { header, whole, writer })
    }
}

/// The reading end: decodes behind the writer ([`ArrivingReader::input`]).
pub(crate) struct ArrivingReader<'w> {
    header: Mapping,
    whole: Mapping,
    writer: BorrowedFd<'w>,
}

impl ArrivingReader<'_> {
    /// The bytes, for a decoder that reads only what [`Arrival::wait_for`] says is in place.
    #[allow(unsafe_code)] // the one slice of memory still being written; see SAFETY
    pub(crate) fn input(&self) -> Input<'_> {
        // SAFETY: the decoder an `Input::arriving` goes to reads only bytes that `wait_for`
        // (below) said were published, and the writer never changes a published byte.
        let bytes = unsafe { self.whole.bytes_unchecked() };
        Input::arriving(&bytes[HEADER..], self)
    }

    /// Whether the writer's process is gone.
    fn writer_gone(&self) -> bool {
        let mut set = [PollFd::new(self.writer, POLLRDHUP)];
        sys::poll(&mut set, Some(Instant::now())).map_or(true, |_| set[0].ready(POLLRDHUP))
    }
}

impl Arrival for ArrivingReader<'_> {
    fn wait_for(&self, len: usize) -> std::result::Result<usize, String> {
        let header = Header::of(&self.header);
        loop {
            let turn = header.turn.load(SeqCst);
            let filled = usize::try_from(header.filled.load(SeqCst)).unwrap_or(usize::MAX);
            if filled >= len {
                return Ok(filled);
            }
            match header.state.load(SeqCst) {
                WRITING => {}
                DONE => return Err(format!("the bytes ended at {filled}, short of {len}")),
                _ => return Err("the parent failed to write them".into()),
            }
            header.waiters.fetch_add(1, SeqCst);
            let woken = sys::futex_wait(header.turn, turn, Some(Instant::now() + WRITER_CHECK));
            header.waiters.fetch_sub(1, SeqCst);
            // Not woken (the check's time passed, or the wait itself failed, which must not
            // become a loop that never looks at the writer): is it still there?
            if !matches!(woken, Ok(true)) && self.writer_gone() {
                return Err("the parent went away while writing them".into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::codec;

    #[test]
    fn a_value_decodes_behind_its_writer_and_whole() {
        let value = (String::from("head"), (0..3_000_000u64).collect::<Vec<_>>(), 9u8);
        let len = codec::encoded_len(&value).unwrap();
        let mut writer = ArrivingWriter::new(len).unwrap();
        let memory = writer.handle().unwrap();
        let (watch, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let reader = memory.reader(watch.as_fd()).unwrap();
        let decoded = std::thread::scope(|scope| {
            let decoding =
                scope.spawn(|| codec::decode_input::<(String, Vec<u64>, u8)>(reader.input()));
            codec::encode_in_pieces(&value, &mut |piece| {
                writer.append(piece).map_err(|e| e.to_string())
            })
            .unwrap();
            writer.finish().unwrap();
            decoding.join().unwrap()
        });
        assert_eq!(decoded.unwrap(), value);
    }

    #[test]
    fn a_value_that_arrives_a_few_bytes_at_a_time_decodes_whole() {
        // Every varint, string and packed run split across the publishing points.
        let value: (Vec<String>, Vec<u16>, Option<i64>) =
            ((0..300).map(|i| "x".repeat(i % 17)).collect(), (0..5000).collect(), Some(-3));
        let bytes = codec::encode(&value).unwrap();
        let mut writer = ArrivingWriter::new(bytes.len()).unwrap();
        let memory = writer.handle().unwrap();
        let (watch, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let reader = memory.reader(watch.as_fd()).unwrap();
        let decoded = std::thread::scope(|scope| {
            let decoding = scope.spawn(|| {
                codec::decode_input::<(Vec<String>, Vec<u16>, Option<i64>)>(reader.input())
            });
            for piece in bytes.chunks(7) {
                writer.append(piece).unwrap();
            }
            writer.finish().unwrap();
            decoding.join().unwrap()
        });
        assert_eq!(decoded.unwrap(), value);
    }

    #[test]
    fn a_writer_that_stops_early_fails_its_readers() {
        let mut writer = ArrivingWriter::new(1 << 20).unwrap();
        let memory = writer.handle().unwrap();
        let (watch, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let reader = memory.reader(watch.as_fd()).unwrap();
        writer.append(&[1; 100]).unwrap();
        assert_eq!(reader.wait_for(50), Ok(100));
        // Dropped before the rest: the reader hears it is not coming.
        drop(writer);
        let error = reader.wait_for(101).unwrap_err();
        assert!(error.contains("failed"), "{error}");
    }

    #[test]
    fn a_writer_whose_process_is_gone_fails_its_readers() {
        let writer = ArrivingWriter::new(10).unwrap();
        let memory = writer.handle().unwrap();
        let (watch, peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let reader = memory.reader(watch.as_fd()).unwrap();
        drop(peer);
        let error = reader.wait_for(1).unwrap_err();
        assert!(error.contains("went away"), "{error}");
        drop(writer);
    }

    #[test]
    fn a_writer_refuses_more_bytes_than_it_said_and_fewer_fail_finish() {
        let mut writer = ArrivingWriter::new(4).unwrap();
        assert!(writer.append(&[0; 5]).is_err());
        writer.append(&[0; 3]).unwrap();
        assert!(writer.finish().unwrap_err().contains("3 bytes"));
    }
}
