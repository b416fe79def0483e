//! Length-prefixed frames over a Unix stream socket, with file descriptors riding beside the
//! bytes (SCM_RIGHTS).
//!
//! A frame is a 16-byte header—body length (`u64`, little-endian), descriptor count (`u32`) and
//! block count (`u32`)—then the length of each block (`u64` each), the body, and the blocks.
//! Blocks are large byte buffers that travel beside the encoded message instead of inside it
//! (see [`Bytes`](crate::Bytes)): the sender writes each from where it lies, and the receiver
//! reads each into an allocation of its own, which becomes the received value. The descriptors
//! are attached to the first byte of the header, so by the time a receiver has read a header,
//! every descriptor of that frame has arrived.
//!
//! The reader never trusts a length: it checks the total against [`MAX_FRAME_LEN`], reserves at
//! most [`EXACT_MAX`] bytes for a part before its bytes arrive, grows a larger one only as bytes
//! actually arrive, and turns an end-of-stream inside a frame into [`FrameError::Truncated`].
//! Reads use `MSG_DONTWAIT`, and blocking is done by `poll` with a deadline and an optional
//! "abort" descriptor (a child's pidfd), so no receive outlives the process it waits for. A
//! receive with neither (a child waiting for its parent's next message) blocks in `recvmsg`
//! itself, which ends the same way: with a message, or with end-of-stream.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use smallvec::SmallVec;

use crate::sys::{self, POLLIN, POLLOUT, PollFd};
use crate::transport::codec::Block;
use crate::transport::spin::{self, Spin};

/// Bytes in a frame header, before its table of block lengths.
pub const HEADER_LEN: usize = 16;

/// The largest frame accepted, body and blocks together: 1 TiB. Anything claiming more is a
/// protocol error.
pub const MAX_FRAME_LEN: u64 = 1 << 40;

/// The most blocks a frame may claim (the encoder's own limit).
pub const MAX_BLOCKS: usize = crate::transport::codec::MAX_BLOCKS;

/// The most a body or block is given before its bytes arrive: its declared length up to this
/// much. Untouched capacity costs address space only; a larger part grows as it arrives, so a
/// lying header cannot make the receiver allocate what it claims.
pub const EXACT_MAX: usize = 64 << 20;

/// The most iovecs one `sendmsg` takes (Linux's `UIO_MAXIOV`).
const MAX_IOVECS: usize = 1024;

/// How much a small read asks for at once.
const READ_CHUNK: usize = 64 * 1024;

/// How much the body buffer of a large frame grows by at least, before doubling takes over.
const BODY_GROWTH: usize = 1 << 20;

/// One received frame: its body and the descriptors and blocks that came with it.
#[derive(Debug, Default)]
pub struct Frame {
    /// The encoded message.
    pub body: Vec<u8>,
    /// Descriptors sent with the message, in order, already close-on-exec.
    pub fds: Vec<OwnedFd>,
    /// Blocks sent after the message, in order, each in an allocation of its own.
    pub blocks: Vec<Vec<u8>>,
}

/// One frame to send: its body in parts (written one after another), and the descriptors and
/// blocks that travel with it.
#[derive(Debug, Clone, Copy)]
pub struct OutFrame<'a> {
    /// The encoded message, in parts.
    pub body: &'a [&'a [u8]],
    /// Descriptors to pass beside the message.
    pub fds: &'a [BorrowedFd<'a>],
    /// Large buffers written after the message.
    pub blocks: &'a [Block],
}

impl OutFrame<'_> {
    /// Bytes of the body and the blocks.
    fn len(&self) -> usize {
        self.body.iter().map(|part| part.len()).sum::<usize>()
            + self.blocks.iter().map(|block| block.len()).sum::<usize>()
    }

    /// The frame's fixed header, and its table of block lengths (empty without blocks: no
    /// allocation).
    fn head(&self) -> ([u8; HEADER_LEN], Vec<u8>) {
        let len: usize = self.body.iter().map(|part| part.len()).sum();
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(&(len as u64).to_le_bytes());
        header[8..12].copy_from_slice(&(self.fds.len() as u32).to_le_bytes());
        header[12..].copy_from_slice(&(self.blocks.len() as u32).to_le_bytes());
        let table =
            self.blocks.iter().flat_map(|block| (block.len() as u64).to_le_bytes()).collect();
        (header, table)
    }
}

/// Why a frame could not be received or sent.
#[derive(Debug)]
pub enum FrameError {
    /// The peer closed the socket between frames: an orderly end.
    Disconnected,
    /// The peer closed the socket in the middle of a frame.
    Truncated {
        /// Bytes of the frame (header included) that did arrive.
        received: u64,
        /// Bytes the frame should have had, when the header arrived.
        expected: Option<u64>,
    },
    /// A header claimed a frame longer than [`MAX_FRAME_LEN`].
    TooLarge(u64),
    /// A header claimed more than [`MAX_BLOCKS`] blocks.
    TooManyBlocks(u32),
    /// A header claimed more descriptors than arrived with it.
    MissingFds {
        /// Descriptors the header claimed.
        claimed: u32,
        /// Descriptors that arrived.
        arrived: usize,
    },
    /// Descriptors arrived that the frame they came with does not claim (more than its header
    /// says, or some beside a frame that claims none). They were closed: a frame never hands
    /// another frame's descriptors on, and none pile up unclaimed.
    ExtraFds {
        /// Descriptors the header claimed.
        claimed: u32,
        /// Descriptors that arrived with the frame.
        arrived: usize,
    },
    /// Descriptors sent with the frame could not all be received: this process's descriptor
    /// table is full (`RLIMIT_NOFILE`). The frame is here whole, with the descriptors that did
    /// arrive (the first ones, in order), for a receiver that can still answer it; its bytes
    /// were read, so the stream goes on with the next frame.
    FdsTruncated {
        /// Descriptors the header claimed.
        claimed: u32,
        /// The frame, with the descriptors that arrived.
        frame: Frame,
    },
    /// The deadline passed first.
    Timeout,
    /// The abort descriptor became ready (the process at the other end ended).
    Aborted,
    /// The socket itself failed.
    Io(io::Error),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Disconnected => write!(f, "peer closed the channel"),
            FrameError::Truncated { received, expected: Some(expected) } => {
                write!(f, "truncated frame: {received} of {expected} bytes arrived")
            }
            FrameError::Truncated { received, expected: None } => {
                write!(f, "truncated frame: {received} bytes of a {HEADER_LEN}-byte header")
            }
            FrameError::TooLarge(len) => {
                write!(f, "frame length {len} exceeds the limit of {MAX_FRAME_LEN} bytes")
            }
            FrameError::TooManyBlocks(count) => {
                write!(f, "frame claims {count} blocks, more than the limit of {MAX_BLOCKS}")
            }
            FrameError::MissingFds { claimed, arrived } => {
                write!(f, "frame claims {claimed} fds but {arrived} arrived")
            }
            FrameError::ExtraFds { claimed, arrived } => {
                write!(f, "frame claims {claimed} fds but {arrived} arrived (all closed)")
            }
            FrameError::FdsTruncated { claimed, frame } => write!(
                f,
                "frame claims {claimed} fds but only {} could be received: too many open files",
                frame.fds.len()
            ),
            FrameError::Timeout => write!(f, "timed out"),
            FrameError::Aborted => write!(f, "the peer process ended"),
            FrameError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for FrameError {}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        FrameError::Io(e)
    }
}

/// A frame being received: its descriptor count and its parts (the body, then each block),
/// each with its declared length and the bytes so far.
#[derive(Debug)]
struct Partial {
    nfds: u32,
    /// Where the frame begins in the stream (bytes received before its header).
    start: u64,
    /// Header and block table, for reporting a truncation.
    header_len: usize,
    /// The body, then each block: held inline, without an allocation, for a frame of at most
    /// one block.
    parts: SmallVec<[Part; 2]>,
    /// The first part not yet complete.
    current: usize,
}

/// One body or block being received.
#[derive(Debug)]
struct Part {
    len: usize,
    bytes: Vec<u8>,
}

impl Part {
    fn missing(&self) -> usize {
        self.len - self.bytes.len()
    }
}

impl Partial {
    /// Bytes still to arrive, all parts together.
    fn missing(&self) -> usize {
        self.parts[self.current..].iter().map(Part::missing).sum()
    }

    fn received(&self) -> usize {
        self.header_len + self.parts.iter().map(|part| part.bytes.len()).sum::<usize>()
    }

    fn expected(&self) -> usize {
        self.header_len + self.parts.iter().map(|part| part.len).sum::<usize>()
    }
}

/// Descriptors that arrived with one `recvmsg`, and the stretch of the stream it read.
///
/// The kernel attaches a `sendmsg`'s descriptors to its first byte, and a `recvmsg` that
/// returns descriptors ends with the message they came with; our sender always puts a frame's
/// descriptors on the frame's first byte. So a batch belongs to a frame that starts within
/// `from..to`, and to no other.
#[derive(Debug)]
struct FdBatch {
    from: u64,
    to: u64,
    fds: Vec<OwnedFd>,
    /// The kernel could not hand over all of them (this process is out of descriptors).
    truncated: bool,
}

impl FdBatch {
    fn covers(&self, offset: u64) -> bool {
        self.from <= offset && offset < self.to
    }
}

/// A frame header and block table read from the front of `bytes`: `(body length, descriptor
/// count, block lengths, bytes taken)`, `Ok(None)` while incomplete.
type Header = (usize, u32, Vec<usize>, usize);

fn parse_header(bytes: &[u8]) -> Result<Option<Header>, FrameError> {
    let Some(fixed) = bytes.get(..HEADER_LEN) else { return Ok(None) };
    let word = |at: usize| u64::from_le_bytes(fixed[at..at + 8].try_into().expect("8 bytes"));
    let half = |at: usize| u32::from_le_bytes(fixed[at..at + 4].try_into().expect("4 bytes"));
    let (len, nfds, nblocks) = (word(0), half(8), half(12));
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    if nblocks as usize > MAX_BLOCKS {
        return Err(FrameError::TooManyBlocks(nblocks));
    }
    let taken = HEADER_LEN + 8 * nblocks as usize;
    let Some(table) = bytes.get(HEADER_LEN..taken) else { return Ok(None) };
    let mut total = len;
    let mut blocks = Vec::with_capacity(nblocks as usize);
    for entry in table.chunks_exact(8) {
        let block = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
        total = total.saturating_add(block);
        if total > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge(total));
        }
        blocks.push(block as usize);
    }
    // Both fit in a usize: the total is at most MAX_FRAME_LEN.
    Ok(Some((len as usize, nfds, blocks, taken)))
}

/// The first frame waiting in `sock`, copied without being taken: `Ok(None)` while nothing has
/// arrived, `Err(Disconnected)` if nothing will (the peer is gone), and `Err(Truncated)` for
/// bytes that are not a whole frame of at most `limit` bytes without descriptors or blocks.
///
/// The frames peeked at are small and written in one `sendmsg`, so they arrive whole or not
/// at all; reporting anything else as an error keeps a caller that polls between peeks from
/// spinning on bytes that will not change.
///
/// For a reader that must learn what a frame says before deciding who reads it: the forkserver
/// client peeks at a new child's hello to learn whether the child exists.
pub fn peek_frame(sock: BorrowedFd<'_>, limit: usize) -> Result<Option<Frame>, FrameError> {
    let mut buf = vec![0u8; limit];
    let n = match sys::peek(sock, &mut buf) {
        Ok(0) => return Err(FrameError::Disconnected),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
        // A peer that closed with our bytes unread resets the connection: it is gone as surely.
        Err(e) if is_disconnect(&e) => return Err(FrameError::Disconnected),
        Err(e) => return Err(FrameError::Io(e)),
    };
    let header = parse_header(&buf[..n])?;
    let whole = |&(len, nfds, ref blocks, taken): &Header| {
        nfds == 0 && blocks.is_empty() && n >= taken + len
    };
    let Some((len, _, _, taken)) = header.filter(whole) else {
        return Err(FrameError::Truncated { received: n as u64, expected: None });
    };
    Ok(Some(Frame { body: buf[taken..taken + len].to_vec(), fds: Vec::new(), blocks: Vec::new() }))
}

/// One end of a framed, fd-carrying Unix stream socket.
#[derive(Debug)]
pub struct Channel {
    sock: UnixStream,
    /// Received bytes that belong to no body yet: a header, or the start of the next frame.
    pending: Pending,
    partial: Option<Partial>,
    /// Descriptors received and not yet handed to their frame, oldest first.
    fds: VecDeque<FdBatch>,
    scratch_fds: Vec<OwnedFd>,
    /// Bytes received from the socket so far: the stream offset of the next byte to arrive.
    received: u64,
    eof: bool,
    /// Whether a receive without a deadline spins before it sleeps ([`set_spins`]).
    ///
    /// [`set_spins`]: Channel::set_spins
    spins: bool,
    spin: Spin,
}

impl Channel {
    /// A connected pair, both ends close-on-exec.
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let (a, b) = UnixStream::pair()?;
        Ok((Channel::new(a), Channel::new(b)))
    }

    /// Wraps a connected stream socket.
    pub fn new(sock: UnixStream) -> Self {
        Channel {
            sock,
            pending: Pending::default(),
            partial: None,
            fds: VecDeque::new(),
            scratch_fds: Vec::new(),
            received: 0,
            eof: false,
            spins: true,
            spin: Spin::default(),
        }
    }

    /// Wraps an owned descriptor that must be a connected Unix stream socket.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Channel::new(UnixStream::from(fd))
    }

    /// Gives back the socket.
    pub fn into_fd(self) -> OwnedFd {
        OwnedFd::from(self.sock)
    }

    /// Sends one frame: `body` (the concatenation of its parts) with `fds` beside it and
    /// `blocks` after it.
    ///
    /// Blocks until the whole frame is in the socket, the `deadline` passes, or `abort` (the
    /// peer's pidfd, say) becomes readable. A peer that closed its end gives
    /// `FrameError::Disconnected`.
    pub fn send(
        &self,
        body: &[&[u8]],
        fds: &[BorrowedFd<'_>],
        blocks: &[Block],
        deadline: Option<Instant>,
        abort: Option<BorrowedFd<'_>>,
    ) -> Result<(), FrameError> {
        let frame = OutFrame { body, fds, blocks };
        self.send_frames(&[frame], deadline, abort).map_err(|(_, e)| e)
    }

    /// Sends `frames` one after another, [`send`](Self::send) for each, but in as few
    /// `sendmsg` calls as the descriptors allow: a frame with descriptors starts a call of its
    /// own (they ride on its first byte), the frames without follow it in the same call.
    ///
    /// On failure, also says how many of `frames` were written whole before it: the peer may
    /// have those, and has none of the rest.
    pub fn send_frames(
        &self,
        frames: &[OutFrame<'_>],
        deadline: Option<Instant>,
        abort: Option<BorrowedFd<'_>>,
    ) -> Result<(), (usize, FrameError)> {
        let heads: SmallVec<[([u8; HEADER_LEN], Vec<u8>); 2]> =
            frames.iter().map(OutFrame::head).collect();
        let mut start = 0;
        while start < frames.len() {
            let end =
                start + 1 + frames[start + 1..].iter().take_while(|f| f.fds.is_empty()).count();
            let parts = frame_parts(&frames[start..end], &heads[start..end]);
            self.write_parts(&parts, frames[start].fds, deadline, abort).map_err(|(sent, e)| {
                // The frames of this call whose last byte went out.
                let mut written = 0;
                let whole = frames[start..end]
                    .iter()
                    .zip(&heads[start..end])
                    .take_while(|(frame, (header, table))| {
                        written += header.len() + table.len() + frame.len();
                        written <= sent
                    })
                    .count();
                (start + whole, e)
            })?;
            start = end;
        }
        Ok(())
    }

    /// Sends one frame as [`send`](Self::send) does, waiting for room in the socket through
    /// the tokio runtime's reactor instead of blocking the thread. On failure, also says how
    /// many bytes went out: if any did, the peer has part of a frame, and the stream is
    /// unusable from then on (so it is if this future is dropped after its first write).
    #[cfg(feature = "tokio")]
    /// `progress` counts the bytes out so far, for a caller that must know whether a dropped
    /// send left part of a frame behind.
    pub async fn send_async(
        &self,
        frame: OutFrame<'_>,
        progress: &std::sync::atomic::AtomicUsize,
    ) -> Result<(), (usize, FrameError)> {
        let heads = [frame.head()];
        let parts = frame_parts(std::slice::from_ref(&frame), &heads);
        let total: usize = parts.iter().map(|part| part.len()).sum();
        let (mut sent, mut fds) = (0, frame.fds);
        loop {
            let done = self.write_step(&parts, total, &mut sent, &mut fds);
            progress.store(sent, std::sync::atomic::Ordering::Relaxed);
            if done.map_err(|e| (sent, e))? {
                return Ok(());
            }
            crate::transport::reactor::writable(self.sock.as_fd())
                .await
                .map_err(|e| (sent, FrameError::Io(e)))?;
        }
    }

    /// Writes the concatenation of `parts`, `fds` on its first byte; on failure, also says how
    /// many bytes were written.
    fn write_parts(
        &self,
        parts: &[&[u8]],
        fds: &[BorrowedFd<'_>],
        deadline: Option<Instant>,
        abort: Option<BorrowedFd<'_>>,
    ) -> Result<(), (usize, FrameError)> {
        let total: usize = parts.iter().map(|part| part.len()).sum();
        let (mut sent, mut fds) = (0, fds);
        while !self.write_step(parts, total, &mut sent, &mut fds).map_err(|e| (sent, e))? {
            self.wait(POLLOUT, deadline, abort).map_err(|e| (sent, e))?;
        }
        Ok(())
    }

    /// Writes what it can of `parts` after the first `sent` bytes without blocking, `fds` on
    /// the first byte written: true once all `total` bytes are out, false when the socket is
    /// full.
    fn write_step(
        &self,
        parts: &[&[u8]],
        total: usize,
        sent: &mut usize,
        fds: &mut &[BorrowedFd<'_>],
    ) -> Result<bool, FrameError> {
        while *sent < total {
            let slices = remaining_slices(parts, *sent);
            match sys::send_with_fds(self.sock.as_fd(), &slices, fds, true) {
                Ok(n) => {
                    *sent += n;
                    *fds = &[];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if is_disconnect(&e) => return Err(FrameError::Disconnected),
                Err(e) => return Err(FrameError::Io(e)),
            }
        }
        Ok(true)
    }

    /// Receives one frame if a whole one is available without blocking.
    ///
    /// `Ok(None)` means "not yet". Reading continues from where an earlier call stopped, so a
    /// caller may interleave this with `poll` on other descriptors.
    pub fn try_recv(&mut self) -> Result<Option<Frame>, FrameError> {
        self.receive(false)
    }

    /// Takes a frame from what is buffered, reading more while none is complete: until the
    /// socket has nothing more for now (`Ok(None)`), or, if `blocking`, until a frame is whole.
    fn receive(&mut self, blocking: bool) -> Result<Option<Frame>, FrameError> {
        loop {
            if let Some(frame) = self.take_frame()? {
                return Ok(Some(frame));
            }
            if self.eof {
                return Err(self.eof_error());
            }
            match self.fill(blocking) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if is_disconnect(&e) => self.eof = true,
                Err(e) => return Err(FrameError::Io(e)),
            }
        }
    }

    /// Receives one frame, blocking until it arrives, the `deadline` passes, or `abort` becomes
    /// readable.
    ///
    /// With neither a deadline nor an abort descriptor, a receive that finds nothing first tries
    /// again for a few microseconds, yielding the CPU between tries, before it sleeps: a peer
    /// that answers quickly is then heard without a wake-up. A peer slow to answer turns that
    /// off for a while (see `transport::spin`).
    ///
    /// A frame that had fully arrived before `abort` fired is still returned: a child that sends
    /// its result and exits at once loses nothing.
    pub fn recv(
        &mut self,
        deadline: Option<Instant>,
        abort: Option<BorrowedFd<'_>>,
    ) -> Result<Frame, FrameError> {
        if deadline.is_none() && abort.is_none() {
            // Nothing to watch but the socket: a spin while the peer answers quickly (see
            // `transport::spin`), then a poll, then a receive that blocks only inside a frame,
            // instead of a receive that finds nothing, a poll and a second receive. The
            // wait is in poll, not in recvmsg, because a reader blocked in recvmsg is also woken
            // each time the peer reads what this end sent (the kernel's "room to write"
            // wake-up, which poll filters out by event and a blocked recvmsg does not): two
            // context switches for nothing per round trip. Measured: a pool `apply` round trip
            // 21.8 -> 20.4 us; a pipe ping-pong, 18 us steadily, where a blocking recvmsg gave
            // 14 us or 22 us depending on where the scheduler put the two processes.
            if !self.has_buffered_frame() && !self.eof {
                let mut spun = None;
                if self.spins && self.spin.now() {
                    let started = Instant::now();
                    let mut state = std::mem::take(&mut self.spin);
                    let found = spin::spin_for(&mut state, started, || self.receive(false));
                    self.spin = state;
                    if let Some(frame) = found? {
                        return Ok(frame);
                    }
                    spun = Some(started);
                }
                self.wait(POLLIN, None, None)?;
                if let Some(started) = spun {
                    self.spin.waited(started.elapsed());
                }
            }
            if let Some(frame) = self.receive(true)? {
                return Ok(frame);
            }
        }
        loop {
            if let Some(frame) = self.try_recv()? {
                return Ok(frame);
            }
            match self.wait(POLLIN, deadline, abort) {
                Ok(()) => {}
                Err(FrameError::Aborted) => {
                    // The peer ended: whatever it wrote is already in the socket.
                    return match self.try_recv()? {
                        Some(frame) => Ok(frame),
                        None => Err(FrameError::Aborted),
                    };
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether a [`recv`](Self::recv) without a deadline tries again for a few microseconds
    /// before it sleeps (the default), or sleeps at once.
    ///
    /// A pool worker sleeps at once: with 100,000 tasks awaited at once through tokio handles,
    /// its spins between tasks took the CPU the parent's threads fed it from, and throughput
    /// fell from 700-780 k to 560-580 k items/s on 2 CPUs (a spin capped at 10 µs: 580-630 k).
    /// The caller of `apply` spins instead, which is most of the gain there.
    pub fn set_spins(&mut self, spins: bool) {
        self.spins = spins;
    }

    /// The socket, for `poll` sets built by callers.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Whether a whole frame is already buffered here (read ahead from the socket), so that
    /// `try_recv` returns it without the socket being readable.
    pub fn has_buffered_frame(&self) -> bool {
        match &self.partial {
            Some(partial) => self.pending.len() >= partial.missing(),
            None => match parse_header(self.pending.bytes()) {
                Ok(Some((len, _, blocks, taken))) => {
                    self.pending.len() - taken >= len + blocks.iter().sum::<usize>()
                }
                // An error is for `try_recv` to report; it is ready to be reported.
                Err(_) => true,
                Ok(None) => false,
            },
        }
    }

    /// Descriptors received for a frame that is not complete yet.
    pub fn queued_fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.fds.iter().flat_map(|batch| &batch.fds).map(AsFd::as_fd)
    }

    /// Closes our sending direction (`shutdown(SHUT_WR)`): the peer reads end-of-file after
    /// the frames already sent, while we can still receive.
    pub fn shutdown_write(&self) -> io::Result<()> {
        self.sock.shutdown(std::net::Shutdown::Write)
    }

    /// Shuts both directions of the socket, for every descriptor of it: a read blocked on
    /// another duplicate returns end-of-file.
    pub fn shutdown(&self) -> io::Result<()> {
        self.sock.shutdown(std::net::Shutdown::Both)
    }

    /// Whether the peer has closed its end (as far as reads so far have seen).
    pub fn is_closed(&self) -> bool {
        self.eof
    }

    /// Waits until the socket is ready for `events`, the deadline passes, or `abort` fires.
    fn wait(
        &self,
        events: i16,
        deadline: Option<Instant>,
        abort: Option<BorrowedFd<'_>>,
    ) -> Result<(), FrameError> {
        let mut set = [PollFd::new(self.sock.as_fd(), events), PollFd::new(self.sock.as_fd(), 0)];
        let count = match abort {
            Some(fd) => {
                set[1] = PollFd::new(fd, POLLIN);
                2
            }
            None => 1,
        };
        if sys::poll(&mut set[..count], deadline)? == 0 {
            return Err(FrameError::Timeout);
        }
        if set[0].revents() != 0 {
            return Ok(());
        }
        Err(FrameError::Aborted)
    }

    /// Reads what is available into the pending buffer or straight into a large body; if
    /// `blocking`, waits for at least one byte (or the end of the stream).
    fn fill(&mut self, blocking: bool) -> io::Result<usize> {
        let fd = self.sock.as_fd();
        let large = self.partial.as_mut().and_then(|partial| {
            let part = &mut partial.parts[partial.current];
            (self.pending.is_empty() && part.missing() > READ_CHUNK).then_some(part)
        });
        let received = match large {
            Some(part) => {
                // A large part: receive into it directly, growing with what arrives rather than
                // with what the header claims.
                let grow = part.missing().min(part.bytes.len().max(BODY_GROWTH));
                sys::recv_into_vec(fd, &mut part.bytes, grow, &mut self.scratch_fds, !blocking)?
            }
            _ => {
                let buf = self.pending.room(READ_CHUNK);
                sys::recv_into_vec(fd, buf, READ_CHUNK, &mut self.scratch_fds, !blocking)?
            }
        };
        let from = self.received;
        self.received += received.len as u64;
        if !self.scratch_fds.is_empty() || received.fds_truncated {
            let fds = std::mem::take(&mut self.scratch_fds);
            let truncated = received.fds_truncated;
            self.fds.push_back(FdBatch { from, to: self.received, fds, truncated });
        }
        Ok(received.len)
    }

    /// Assembles a frame from buffered bytes, if enough have arrived.
    fn take_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.partial.is_none() {
            let Some((len, nfds, blocks, taken)) = parse_header(self.pending.bytes())? else {
                return Ok(None);
            };
            // With no frame in progress, the pending bytes begin with this frame.
            let start = self.received - self.pending.len() as u64;
            self.pending.consume(taken);
            let parts = std::iter::once(len)
                .chain(blocks)
                .map(|len| Part { len, bytes: Vec::new() })
                .collect();
            self.partial = Some(Partial { nfds, start, header_len: taken, parts, current: 0 });
        }
        let partial = self.partial.as_mut().expect("set above");
        while let Some(part) = partial.parts.get_mut(partial.current) {
            if part.bytes.capacity() == 0 && part.len > 0 {
                part.bytes = first_buffer(part.len);
            }
            let take = part.missing().min(self.pending.len());
            if take > 0 {
                part.bytes.extend_from_slice(&self.pending.bytes()[..take]);
                self.pending.consume(take);
            }
            if part.missing() > 0 {
                return Ok(None);
            }
            partial.current += 1;
        }
        let partial = self.partial.take().expect("set above");
        let (fds, truncated) = self.claim_fds(&partial)?;
        let claimed = partial.nfds;
        let mut parts = partial.parts.into_iter().map(|part| part.bytes);
        let body = parts.next().expect("a frame has a body");
        let frame = Frame { body, fds, blocks: parts.collect() };
        if truncated {
            return Err(FrameError::FdsTruncated { claimed, frame });
        }
        Ok(Some(frame))
    }

    /// Hands a whole frame the descriptors that came with it: exactly the batch received with
    /// its first byte, and exactly as many as its header claims. Anything else is closed here
    /// and is an error for this frame, so that descriptors never reach a frame they were not
    /// sent with and never pile up.
    fn claim_fds(&mut self, partial: &Partial) -> Result<(Vec<OwnedFd>, bool), FrameError> {
        let (start, claimed) = (partial.start, partial.nfds);
        let end = start + partial.expected() as u64;
        // Nothing received before this frame began is anyone's now (each earlier frame took or
        // refused what came with it); this only guards the accounting.
        let mut stray = self.close_batches_ending_by(start);
        // The batch read with this frame's first byte is its own, unless the frame claims none
        // and another frame starts within the same read (a sender that batched frames without
        // descriptors after one with them): then it is left for that frame.
        let mut own = None;
        let mut truncated = false;
        if self.fds.front().is_some_and(|batch| batch.covers(start)) {
            let batch = self.fds.pop_front().expect("checked above");
            if claimed == 0 && batch.to > end {
                self.fds.push_front(batch);
            } else {
                truncated = batch.truncated;
                own = Some(batch.fds);
            }
        }
        // A batch read after the first byte and ending inside the frame came with no frame's
        // first byte: the sender put descriptors where no frame begins.
        stray += self.close_batches_ending_by(end);
        let arrived = own.as_ref().map_or(0, Vec::len);
        if stray > 0 || arrived > claimed as usize {
            return Err(FrameError::ExtraFds { claimed, arrived: arrived + stray });
        }
        if arrived < claimed as usize && !truncated {
            return Err(FrameError::MissingFds { claimed, arrived });
        }
        Ok((own.unwrap_or_default(), truncated))
    }

    /// Closes the oldest batches while they end at or before `offset`; how many descriptors.
    fn close_batches_ending_by(&mut self, offset: u64) -> usize {
        let mut closed = 0;
        while self.fds.front().is_some_and(|batch| batch.to <= offset) {
            closed += self.fds.pop_front().map_or(0, |batch| batch.fds.len());
        }
        closed
    }

    fn eof_error(&self) -> FrameError {
        match &self.partial {
            Some(partial) => FrameError::Truncated {
                received: (partial.received() + self.pending.len()) as u64,
                expected: Some(partial.expected() as u64),
            },
            None if self.pending.is_empty() => FrameError::Disconnected,
            None => FrameError::Truncated { received: self.pending.len() as u64, expected: None },
        }
    }
}

/// The buffer a part of `len` bytes starts with. A part of up to two read chunks gets exactly
/// its declared length: a 64 KiB message must not grow into a 128 KiB buffer, which the
/// allocator may map and unmap for every message (16 page faults each, measured). A larger one
/// gets a kept buffer of about its size (see [`buffer`](crate::transport::buffer)), or a fresh one of its
/// length up to [`EXACT_MAX`], advised for huge pages, so that it is neither copied by growth
/// nor, when a buffer is reused, faulted in again.
fn first_buffer(len: usize) -> Vec<u8> {
    if len <= 2 * READ_CHUNK {
        Vec::with_capacity(len)
    } else {
        crate::transport::buffer::with_capacity(len, EXACT_MAX)
    }
}

/// Bytes read ahead of the frame being assembled. Consuming them moves a start index instead
/// of shifting the rest to the front, so taking a frame out of a full buffer costs no memmove;
/// the unconsumed tail is moved down only when room is needed for the next read.
#[derive(Debug, Default)]
struct Pending {
    buf: Vec<u8>,
    start: usize,
}

impl Pending {
    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    /// The buffer, with room for `want` more bytes at its end.
    fn room(&mut self, want: usize) -> &mut Vec<u8> {
        if self.buf.capacity() - self.buf.len() < want && self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        &mut self.buf
    }
}

/// The parts of a frame still to send after the first `skip` bytes, as many as one `sendmsg`
/// takes.
/// The bytes of `frames`, in order, each header and table before its body and blocks; `heads`
/// are the frames' own.
fn frame_parts<'a>(
    frames: &[OutFrame<'a>],
    heads: &'a [([u8; HEADER_LEN], Vec<u8>)],
) -> SmallVec<[&'a [u8]; 8]> {
    let count = |f: &OutFrame<'_>| 2 + f.body.len() + f.blocks.len();
    let mut parts: SmallVec<[&[u8]; 8]> = SmallVec::with_capacity(frames.iter().map(count).sum());
    for (frame, (header, table)) in frames.iter().zip(heads) {
        assert!(frame.blocks.len() <= MAX_BLOCKS, "the encoder never collects more blocks");
        parts.push(header);
        parts.push(table);
        parts.extend(frame.body.iter().copied());
        parts.extend(frame.blocks.iter().map(|block| block.as_slice()));
    }
    parts.retain(|part| !part.is_empty());
    parts
}

fn remaining_slices<'a>(parts: &[&'a [u8]], mut skip: usize) -> SmallVec<[IoSlice<'a>; 8]> {
    let mut out = SmallVec::with_capacity(parts.len().min(MAX_IOVECS));
    for part in parts {
        if out.len() == MAX_IOVECS {
            break;
        }
        if skip >= part.len() {
            skip -= part.len();
            continue;
        }
        out.push(IoSlice::new(&part[skip..]));
        skip = 0;
    }
    out
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;
    use std::time::Duration;

    fn soon() -> Option<Instant> {
        Some(Instant::now() + Duration::from_secs(10))
    }

    #[test]
    fn a_frame_read_ahead_is_reported_as_buffered() {
        let (a, mut b) = Channel::pair().unwrap();
        assert!(!b.has_buffered_frame());
        a.send(&[b"one"], &[], &[], soon(), None).unwrap();
        a.send(&[b"two"], &[], &[], soon(), None).unwrap();
        // Both small frames arrive in one read; the second waits in the buffer.
        assert_eq!(b.recv(soon(), None).unwrap().body, b"one");
        assert!(b.has_buffered_frame());
        assert_eq!(b.try_recv().unwrap().unwrap().body, b"two");
        assert!(!b.has_buffered_frame());
    }

    #[test]
    fn frames_round_trip_in_order() {
        let (a, mut b) = Channel::pair().unwrap();
        a.send(&[b"hello"], &[], &[], soon(), None).unwrap();
        a.send(&[b"", b"wor", b"ld"], &[], &[], soon(), None).unwrap();
        a.send(&[], &[], &[], soon(), None).unwrap();
        assert_eq!(b.recv(soon(), None).unwrap().body, b"hello");
        assert_eq!(b.recv(soon(), None).unwrap().body, b"world");
        assert_eq!(b.recv(soon(), None).unwrap().body, b"");
        drop(a);
        assert!(matches!(b.recv(soon(), None), Err(FrameError::Disconnected)));
    }

    #[test]
    fn large_frame_arrives_intact_while_sender_blocks() {
        let (a, mut b) = Channel::pair().unwrap();
        let data: Vec<u8> = (0..(8 << 20)).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let sender = std::thread::spawn(move || a.send(&[&data], &[], &[], soon(), None));
        let frame = b.recv(soon(), None).unwrap();
        sender.join().unwrap().unwrap();
        assert!(frame.body == expected);
    }

    #[test]
    fn a_receive_without_deadline_or_abort_blocks_until_a_frame_or_the_end() {
        let (a, mut b) = Channel::pair().unwrap();
        let data: Vec<u8> = (0..(4 << 20)).map(|i| (i % 249) as u8).collect();
        let expected = data.clone();
        let block: Block = Arc::new(data.clone().into());
        let sender = std::thread::spawn(move || {
            a.send(&[b"small"], &[], &[], soon(), None)?;
            a.send(&[&data], &[], &[block], soon(), None)
        });
        // Blocking receives (no poll) assemble frames over many reads, body and block alike.
        assert_eq!(b.recv(None, None).unwrap().body, b"small");
        let large = b.recv(None, None).unwrap();
        assert!(large.body == expected && large.blocks[0] == expected);
        sender.join().unwrap().unwrap();
        assert!(matches!(b.recv(None, None), Err(FrameError::Disconnected)));
    }

    #[test]
    fn fds_ride_beside_the_bytes() {
        let (a, mut b) = Channel::pair().unwrap();
        let (x, mut y) = UnixStream::pair().unwrap();
        a.send(&[b"one"], &[x.as_fd()], &[], soon(), None).unwrap();
        a.send(&[b"two"], &[], &[], soon(), None).unwrap();
        drop(x);
        let first = b.recv(soon(), None).unwrap();
        assert_eq!(first.fds.len(), 1);
        assert_connects(first.fds.into_iter().next().unwrap(), &mut y);
        assert!(b.recv(soon(), None).unwrap().fds.is_empty());
    }

    /// Checks that `passed` is the other end of `peer`: what is written to it comes out there.
    fn assert_connects(passed: OwnedFd, peer: &mut UnixStream) {
        let mut passed = UnixStream::from(passed);
        passed.write_all(b"via passed fd").unwrap();
        drop(passed);
        let mut got = String::new();
        std::io::Read::read_to_string(peer, &mut got).unwrap();
        assert_eq!(got, "via passed fd");
    }

    #[test]
    fn several_frames_in_one_send_arrive_one_by_one_with_their_own_fds_and_blocks() {
        let (a, mut b) = Channel::pair().unwrap();
        let (x, mut y) = UnixStream::pair().unwrap();
        let block: Block = Arc::new(vec![7u8; 100_000].into());
        let fds = [x.as_fd()];
        let blocks = [Arc::clone(&block)];
        let frames = [
            OutFrame { body: &[b"one"], fds: &[], blocks: &[] },
            OutFrame { body: &[b"tw", b"o"], fds: &[], blocks: &blocks },
            // Descriptors start a sendmsg of their own: they must arrive with this frame.
            OutFrame { body: &[b"three"], fds: &fds, blocks: &[] },
            OutFrame { body: &[], fds: &[], blocks: &[] },
        ];
        a.send_frames(&frames, soon(), None).unwrap();
        drop(x);
        let one = b.recv(soon(), None).unwrap();
        assert!(one.body == b"one" && one.fds.is_empty() && one.blocks.is_empty());
        let two = b.recv(soon(), None).unwrap();
        assert!(two.body == b"two" && two.fds.is_empty() && two.blocks == [vec![7u8; 100_000]]);
        let three = b.recv(soon(), None).unwrap();
        assert!(three.body == b"three" && three.fds.len() == 1);
        assert_connects(three.fds.into_iter().next().unwrap(), &mut y);
        assert!(b.recv(soon(), None).unwrap().body.is_empty());
    }

    #[test]
    fn a_send_of_several_frames_that_fails_part_way_says_how_many_arrived_whole() {
        let (a, mut b) = Channel::pair().unwrap();
        // Far more than the socket buffer holds, and nobody reading: the send times out
        // somewhere in the middle.
        let data = vec![1u8; 256 * 1024];
        let body: [&[u8]; 1] = [&data];
        let frames = vec![OutFrame { body: &body, fds: &[], blocks: &[] }; 64];
        let deadline = Some(Instant::now() + Duration::from_millis(200));
        let (whole, error) = a.send_frames(&frames, deadline, None).unwrap_err();
        assert!(matches!(error, FrameError::Timeout), "{error}");
        assert!(whole < frames.len());
        drop(a);
        // Exactly that many arrive whole; the next one is cut short.
        for _ in 0..whole {
            assert!(b.recv(soon(), None).unwrap().body == data);
        }
        assert!(matches!(b.recv(soon(), None), Err(FrameError::Truncated { .. })));
    }

    fn raw_pair() -> (UnixStream, Channel) {
        let (raw, chan) = UnixStream::pair().unwrap();
        (raw, Channel::new(chan))
    }

    #[test]
    fn absurd_length_prefix_is_an_error_not_an_allocation() {
        let (mut raw, mut chan) = raw_pair();
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(&(1u64 << 63).to_le_bytes());
        raw.write_all(&header).unwrap();
        assert!(matches!(chan.recv(soon(), None), Err(FrameError::TooLarge(n)) if n == 1 << 63));
    }

    #[test]
    fn truncated_frame_is_an_error_not_a_hang() {
        let (mut raw, mut chan) = raw_pair();
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(&(1u64 << 30).to_le_bytes());
        raw.write_all(&header).unwrap();
        raw.write_all(b"only a little").unwrap();
        drop(raw);
        match chan.recv(soon(), None) {
            Err(FrameError::Truncated { received, expected }) => {
                assert_eq!(received, (HEADER_LEN + 13) as u64);
                assert_eq!(expected, Some(HEADER_LEN as u64 + (1 << 30)));
            }
            other => panic!("expected truncation, got {other:?}"),
        }

        let (mut raw, mut chan) = raw_pair();
        raw.write_all(&[1, 2, 3]).unwrap();
        drop(raw);
        assert!(matches!(
            chan.recv(soon(), None),
            Err(FrameError::Truncated { received: 3, expected: None })
        ));
    }

    #[test]
    fn claimed_fds_that_never_arrived_are_an_error() {
        let (mut raw, mut chan) = raw_pair();
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(&2u64.to_le_bytes());
        header[8..12].copy_from_slice(&3u32.to_le_bytes());
        raw.write_all(&header).unwrap();
        raw.write_all(b"hi").unwrap();
        assert!(matches!(
            chan.recv(soon(), None),
            Err(FrameError::MissingFds { claimed: 3, arrived: 0 })
        ));
    }

    /// A frame of a 4-byte body whose header claims `claimed` descriptors, sent in one
    /// `sendmsg` with `fds` beside it.
    fn send_raw_frame(raw: &UnixStream, claimed: u32, fds: &[BorrowedFd<'_>]) {
        let mut frame = vec![0u8; HEADER_LEN];
        frame[..8].copy_from_slice(&4u64.to_le_bytes());
        frame[8..12].copy_from_slice(&claimed.to_le_bytes());
        frame.extend_from_slice(b"body");
        let sent = sys::send_with_fds(raw.as_fd(), &[IoSlice::new(&frame)], fds, true).unwrap();
        assert_eq!(sent, frame.len());
    }

    /// A descriptor to send, and a way to tell that every copy of it was closed (counting the
    /// process's descriptors would count other tests' too, which run on other threads).
    fn probe() -> (UnixStream, UnixStream) {
        let (sent, watch) = UnixStream::pair().unwrap();
        watch.set_nonblocking(true).unwrap();
        (sent, watch)
    }

    /// Whether every copy of the probe's other end is closed: its peer reads end-of-file.
    fn all_closed(watch: &UnixStream) -> bool {
        matches!(std::io::Read::read(&mut &*watch, &mut [0u8; 1]), Ok(0))
    }

    #[test]
    fn descriptors_no_frame_claims_are_closed_at_once_and_never_reach_a_later_frame() {
        let (raw, mut chan) = raw_pair();
        let spare = std::fs::File::open("/dev/null").unwrap();
        let (sent, watch) = probe();
        let many: Vec<_> = std::iter::repeat_n(sent.as_fd(), 200).collect();
        for _ in 0..10 {
            send_raw_frame(&raw, 0, &many);
        }
        drop(many);
        drop(sent);
        for _ in 0..10 {
            assert!(matches!(
                chan.recv(soon(), None),
                Err(FrameError::ExtraFds { claimed: 0, arrived: 200 })
            ));
        }
        // What was received and refused is closed; none waits in the channel for a claimant.
        assert!(all_closed(&watch));
        assert_eq!(chan.queued_fds().count(), 0);
        let many: Vec<_> = std::iter::repeat_n(spare.as_fd(), 200).collect();
        // A frame that claims descriptors gets its own and only its own.
        send_raw_frame(&raw, 0, &many);
        send_raw_frame(&raw, 1, &[spare.as_fd()]);
        assert!(matches!(chan.recv(soon(), None), Err(FrameError::ExtraFds { .. })));
        assert_eq!(chan.recv(soon(), None).unwrap().fds.len(), 1);
        // More than claimed: all closed, and an error.
        let (sent, watch) = probe();
        send_raw_frame(&raw, 2, &[sent.as_fd(), sent.as_fd(), sent.as_fd()]);
        drop(sent);
        assert!(matches!(
            chan.recv(soon(), None),
            Err(FrameError::ExtraFds { claimed: 2, arrived: 3 })
        ));
        assert!(all_closed(&watch));
        // The channel goes on: the next good frame arrives whole.
        send_raw_frame(&raw, 0, &[]);
        assert_eq!(chan.recv(soon(), None).unwrap().body, b"body");
    }

    #[test]
    fn descriptors_sent_in_the_middle_of_a_frame_fail_that_frame_and_only_it() {
        let (raw, mut chan) = raw_pair();
        let spare = std::fs::File::open("/dev/null").unwrap();
        let (sent, watch) = probe();
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(&8u64.to_le_bytes());
        let first = [&header[..], b"half"].concat();
        sys::send_with_fds(raw.as_fd(), &[IoSlice::new(&first)], &[], true).unwrap();
        let fds = [sent.as_fd(), sent.as_fd()];
        sys::send_with_fds(raw.as_fd(), &[IoSlice::new(b"rest")], &fds, true).unwrap();
        drop(sent);
        send_raw_frame(&raw, 1, &[spare.as_fd()]);
        assert!(matches!(
            chan.recv(soon(), None),
            Err(FrameError::ExtraFds { claimed: 0, arrived: 2 })
        ));
        assert!(all_closed(&watch));
        assert_eq!(chan.recv(soon(), None).unwrap().fds.len(), 1);
    }

    #[test]
    fn frames_batched_in_one_send_after_a_frame_with_descriptors_get_none_of_them() {
        // `send_frames` writes a frame with descriptors and the frames without any after it in
        // one sendmsg: the descriptors are the first frame's alone.
        let (a, mut b) = Channel::pair().unwrap();
        let spare = std::fs::File::open("/dev/null").unwrap();
        let fds = [spare.as_fd(), spare.as_fd()];
        let frames = [
            OutFrame { body: &[b"first"], fds: &fds, blocks: &[] },
            OutFrame { body: &[b"second"], fds: &[], blocks: &[] },
            OutFrame { body: &[b"third"], fds: &[], blocks: &[] },
        ];
        a.send_frames(&frames, soon(), None).unwrap();
        let got: Vec<_> = (0..3).map(|_| b.recv(soon(), None).unwrap()).collect();
        assert_eq!(got.iter().map(|f| f.fds.len()).collect::<Vec<_>>(), [2, 0, 0]);
    }

    #[test]
    fn blocks_arrive_after_the_body_each_in_its_own_buffer() {
        let (a, mut b) = Channel::pair().unwrap();
        let block = |bytes: Vec<u8>| -> Block { Arc::new(bytes.into()) };
        let large = block((0..(8 << 20)).map(|i| (i % 251) as u8).collect());
        let small = block(b"small".to_vec());
        let empty = block(Vec::new());
        let blocks = vec![Arc::clone(&large), small, empty];
        let sender = std::thread::spawn(move || {
            a.send(&[b"body"], &[], &blocks, soon(), None)?;
            a.send(&[b"next"], &[], &[], soon(), None)
        });
        let frame = b.recv(soon(), None).unwrap();
        assert_eq!(frame.body, b"body");
        assert_eq!(frame.blocks.len(), 3);
        assert!(frame.blocks[0] == **large);
        assert_eq!(frame.blocks[1], b"small");
        assert!(frame.blocks[2].is_empty());
        assert_eq!(b.recv(soon(), None).unwrap().body, b"next");
        sender.join().unwrap().unwrap();
    }

    #[test]
    fn a_receive_that_spins_still_gets_every_frame_and_the_end() {
        let (a, mut b) = Channel::pair().unwrap();
        // The receives without a deadline (the spinning kind) run on a thread of their own; this
        // one waits for what they got with one.
        let (got, results) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for _ in 0..200 {
                got.send(b.recv(None, None).map(|frame| frame.body)).unwrap();
            }
            got.send(b.recv(None, None).map(|frame| frame.body)).unwrap();
        });
        for i in 0..200u32 {
            if i % 50 == 0 {
                // Now and then slower than a spin lasts: the reader sleeps, and wakes for it.
                std::thread::sleep(Duration::from_millis(2));
            }
            a.send(&[&i.to_le_bytes()], &[], &[], None, None).unwrap();
            let body = results.recv_timeout(Duration::from_secs(10)).expect("a frame").unwrap();
            assert_eq!(body, i.to_le_bytes());
        }
        drop(a);
        let end = results.recv_timeout(Duration::from_secs(10)).expect("the end");
        assert!(matches!(end, Err(FrameError::Disconnected)));
        reader.join().unwrap();
    }

    /// A header claiming `body` bytes and blocks of `blocks` bytes.
    fn header_with_blocks(body: u64, blocks: &[u64]) -> Vec<u8> {
        let mut header = body.to_le_bytes().to_vec();
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
        for block in blocks {
            header.extend_from_slice(&block.to_le_bytes());
        }
        header
    }

    #[test]
    fn lying_block_tables_are_errors_not_allocations() {
        let (mut raw, mut chan) = raw_pair();
        raw.write_all(&header_with_blocks(4, &[MAX_FRAME_LEN / 2, MAX_FRAME_LEN / 2])).unwrap();
        assert!(matches!(chan.recv(soon(), None), Err(FrameError::TooLarge(_))));

        let (mut raw, mut chan) = raw_pair();
        let mut header = header_with_blocks(0, &[]);
        header[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        raw.write_all(&header).unwrap();
        assert!(matches!(chan.recv(soon(), None), Err(FrameError::TooManyBlocks(u32::MAX))));

        // A claimed 512 GiB block that never comes: truncated, and never allocated in full.
        let (mut raw, mut chan) = raw_pair();
        raw.write_all(&header_with_blocks(2, &[3, 1 << 39])).unwrap();
        raw.write_all(b"hiabc").unwrap();
        raw.write_all(&[7; 1000]).unwrap();
        drop(raw);
        match chan.recv(soon(), None) {
            Err(FrameError::Truncated { received, expected }) => {
                let table = (HEADER_LEN + 16) as u64;
                assert_eq!(received, table + 1005);
                assert_eq!(expected, Some(table + 5 + (1 << 39)));
            }
            other => panic!("expected truncation, got {other:?}"),
        }
    }

    #[test]
    fn recv_times_out_and_can_be_aborted() {
        let (_a, mut b) = Channel::pair().unwrap();
        let deadline = Some(Instant::now() + Duration::from_millis(20));
        assert!(matches!(b.recv(deadline, None), Err(FrameError::Timeout)));

        let (abort_tx, abort_rx) = UnixStream::pair().unwrap();
        (&abort_tx).write_all(b"!").unwrap();
        assert!(matches!(b.recv(soon(), Some(abort_rx.as_fd())), Err(FrameError::Aborted)));
        assert!(abort_rx.as_raw_fd() >= 0);
    }

    #[test]
    fn send_to_a_closed_peer_is_disconnected() {
        let (a, b) = Channel::pair().unwrap();
        drop(b);
        assert!(matches!(a.send(&[b"x"], &[], &[], soon(), None), Err(FrameError::Disconnected)));
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic_or_hang(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let (mut raw, mut chan) = raw_pair();
            raw.write_all(&bytes).unwrap();
            drop(raw);
            loop {
                match chan.recv(soon(), None) {
                    Ok(_) => continue,
                    Err(FrameError::Timeout) => panic!("hung on {bytes:?}"),
                    Err(_) => break,
                }
            }
        }
    }
}
