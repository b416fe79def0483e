//! Length-prefixed frames over a Unix stream socket, with file descriptors riding beside the
//! bytes (SCM_RIGHTS).
//!
//! A frame is a 12-byte header—body length (`u64`, little-endian) and descriptor count (`u32`)—
//! followed by the body. The descriptors are attached to the first byte of the header, so by the
//! time a receiver has read a header, every descriptor of that frame has arrived.
//!
//! The reader never trusts a length: it checks it against [`MAX_FRAME_LEN`], grows the body
//! buffer only as bytes actually arrive, and turns an end-of-stream inside a frame into
//! [`FrameError::Truncated`]. Reads use `MSG_DONTWAIT`, and blocking is done by `poll` with a
//! deadline and an optional "abort" descriptor (a child's pidfd), so no receive outlives the
//! process it waits for.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use crate::sys::{self, POLLIN, POLLOUT, PollFd};

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 12;

/// The largest frame body accepted: 1 TiB. Anything claiming more is a protocol error.
pub const MAX_FRAME_LEN: u64 = 1 << 40;

/// How much a small read asks for at once.
const READ_CHUNK: usize = 64 * 1024;

/// How much the body buffer of a large frame grows by at least, before doubling takes over.
const BODY_GROWTH: usize = 1 << 20;

/// One received frame: its body and the descriptors that came with it.
#[derive(Debug, Default)]
pub struct Frame {
    /// The encoded message.
    pub body: Vec<u8>,
    /// Descriptors sent with the message, in order, already close-on-exec.
    pub fds: Vec<OwnedFd>,
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
    /// A header claimed a body longer than [`MAX_FRAME_LEN`].
    TooLarge(u64),
    /// A header claimed more descriptors than arrived with it.
    MissingFds {
        /// Descriptors the header claimed.
        claimed: u32,
        /// Descriptors that arrived.
        arrived: usize,
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
            FrameError::MissingFds { claimed, arrived } => {
                write!(f, "frame claims {claimed} fds but {arrived} arrived")
            }
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

/// A body being received: its declared length and descriptor count, and the bytes so far.
#[derive(Debug)]
struct Partial {
    len: usize,
    nfds: u32,
    body: Vec<u8>,
}

/// One end of a framed, fd-carrying Unix stream socket.
#[derive(Debug)]
pub struct Channel {
    sock: UnixStream,
    /// Received bytes that belong to no body yet: a header, or the start of the next frame.
    pending: Pending,
    partial: Option<Partial>,
    fds: VecDeque<OwnedFd>,
    scratch_fds: Vec<OwnedFd>,
    eof: bool,
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
            eof: false,
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

    /// Sends one frame: `body` (the concatenation of its parts) with `fds` beside it.
    ///
    /// Blocks until the whole frame is in the socket, the `deadline` passes, or `abort` (the
    /// peer's pidfd, say) becomes readable. A peer that closed its end gives
    /// `FrameError::Disconnected`.
    pub fn send(
        &self,
        body: &[&[u8]],
        fds: &[BorrowedFd<'_>],
        deadline: Option<Instant>,
        abort: Option<BorrowedFd<'_>>,
    ) -> Result<(), FrameError> {
        let len: usize = body.iter().map(|part| part.len()).sum();
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(&(len as u64).to_le_bytes());
        header[8..].copy_from_slice(&(fds.len() as u32).to_le_bytes());
        let mut parts: Vec<&[u8]> = Vec::with_capacity(body.len() + 1);
        parts.push(&header);
        parts.extend(body.iter().copied().filter(|part| !part.is_empty()));
        let total = HEADER_LEN + len;
        let mut sent = 0usize;
        let mut fds_to_send = fds;
        while sent < total {
            let slices = remaining_slices(&parts, sent);
            match sys::send_with_fds(self.sock.as_fd(), &slices, fds_to_send, true) {
                Ok(n) => {
                    sent += n;
                    fds_to_send = &[];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(POLLOUT, deadline, abort)?;
                }
                Err(e) if is_disconnect(&e) => return Err(FrameError::Disconnected),
                Err(e) => return Err(FrameError::Io(e)),
            }
        }
        Ok(())
    }

    /// Receives one frame if a whole one is available without blocking.
    ///
    /// `Ok(None)` means "not yet". Reading continues from where an earlier call stopped, so a
    /// caller may interleave this with `poll` on other descriptors.
    pub fn try_recv(&mut self) -> Result<Option<Frame>, FrameError> {
        loop {
            if let Some(frame) = self.take_frame()? {
                return Ok(Some(frame));
            }
            if self.eof {
                return Err(self.eof_error());
            }
            match self.fill() {
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
    /// A frame that had fully arrived before `abort` fired is still returned: a child that sends
    /// its result and exits at once loses nothing.
    pub fn recv(
        &mut self,
        deadline: Option<Instant>,
        abort: Option<BorrowedFd<'_>>,
    ) -> Result<Frame, FrameError> {
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

    /// The socket, for `poll` sets built by callers.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Whether a whole frame is already buffered here (read ahead from the socket), so that
    /// `try_recv` returns it without the socket being readable.
    pub fn has_buffered_frame(&self) -> bool {
        match &self.partial {
            Some(partial) => partial.body.len() + self.pending.len() >= partial.len,
            None => {
                let pending = self.pending.bytes();
                pending.len() >= HEADER_LEN && {
                    let len = u64::from_le_bytes(pending[..8].try_into().expect("8 bytes"));
                    (pending.len() - HEADER_LEN) as u64 >= len
                }
            }
        }
    }

    /// Descriptors received for a frame that is not complete yet.
    pub fn queued_fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.fds.iter().map(AsFd::as_fd)
    }

    /// Closes our sending direction (`shutdown(SHUT_WR)`): the peer reads end-of-file after
    /// the frames already sent, while we can still receive.
    pub fn shutdown_write(&self) -> io::Result<()> {
        self.sock.shutdown(std::net::Shutdown::Write)
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

    /// Reads what is available into the pending buffer or straight into a large body.
    fn fill(&mut self) -> io::Result<usize> {
        let fd = self.sock.as_fd();
        let n = match &mut self.partial {
            Some(partial)
                if self.pending.is_empty() && partial.len - partial.body.len() > READ_CHUNK =>
            {
                // A large body: receive into it directly, growing with what arrives rather than
                // with what the header claims.
                let need = partial.len - partial.body.len();
                let grow = need.min(partial.body.len().max(BODY_GROWTH));
                sys::recv_into_vec(fd, &mut partial.body, grow, &mut self.scratch_fds, true)?
            }
            _ => {
                let buf = self.pending.room(READ_CHUNK);
                sys::recv_into_vec(fd, buf, READ_CHUNK, &mut self.scratch_fds, true)?
            }
        };
        self.fds.extend(self.scratch_fds.drain(..));
        Ok(n)
    }

    /// Assembles a frame from buffered bytes, if enough have arrived.
    fn take_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.partial.is_none() {
            let pending = self.pending.bytes();
            if pending.len() < HEADER_LEN {
                return Ok(None);
            }
            let len = u64::from_le_bytes(pending[..8].try_into().expect("8 bytes"));
            let nfds = u32::from_le_bytes(pending[8..12].try_into().expect("4 bytes"));
            if len > MAX_FRAME_LEN {
                return Err(FrameError::TooLarge(len));
            }
            self.pending.consume(HEADER_LEN);
            let len = usize::try_from(len).map_err(|_| FrameError::TooLarge(len))?;
            // A body of up to two read chunks gets exactly its declared length: a 64 KiB
            // message must not grow into a 128 KiB buffer, which the allocator may map and
            // unmap for every message (16 page faults each, measured). A larger body grows with
            // what arrives, not with what the header claims.
            let exact = len <= 2 * READ_CHUNK;
            let body = Vec::with_capacity(if exact { len } else { READ_CHUNK });
            self.partial = Some(Partial { len, nfds, body });
        }
        let partial = self.partial.as_mut().expect("set above");
        let take = (partial.len - partial.body.len()).min(self.pending.len());
        if take > 0 {
            partial.body.extend_from_slice(&self.pending.bytes()[..take]);
            self.pending.consume(take);
        }
        if partial.body.len() < partial.len {
            return Ok(None);
        }
        let partial = self.partial.take().expect("set above");
        let claimed = partial.nfds as usize;
        if self.fds.len() < claimed {
            return Err(FrameError::MissingFds { claimed: partial.nfds, arrived: self.fds.len() });
        }
        let fds = self.fds.drain(..claimed).collect();
        Ok(Some(Frame { body: partial.body, fds }))
    }

    fn eof_error(&self) -> FrameError {
        match &self.partial {
            Some(partial) => FrameError::Truncated {
                received: (HEADER_LEN + partial.body.len() + self.pending.len()) as u64,
                expected: Some((HEADER_LEN + partial.len) as u64),
            },
            None if self.pending.is_empty() => FrameError::Disconnected,
            None => FrameError::Truncated { received: self.pending.len() as u64, expected: None },
        }
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

/// The parts of a frame still to send after the first `skip` bytes.
fn remaining_slices<'a>(parts: &[&'a [u8]], mut skip: usize) -> Vec<IoSlice<'a>> {
    let mut out = Vec::with_capacity(parts.len());
    for part in parts {
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
    use std::time::Duration;

    fn soon() -> Option<Instant> {
        Some(Instant::now() + Duration::from_secs(10))
    }

    #[test]
    fn a_frame_read_ahead_is_reported_as_buffered() {
        let (a, mut b) = Channel::pair().unwrap();
        assert!(!b.has_buffered_frame());
        a.send(&[b"one"], &[], soon(), None).unwrap();
        a.send(&[b"two"], &[], soon(), None).unwrap();
        // Both small frames arrive in one read; the second waits in the buffer.
        assert_eq!(b.recv(soon(), None).unwrap().body, b"one");
        assert!(b.has_buffered_frame());
        assert_eq!(b.try_recv().unwrap().unwrap().body, b"two");
        assert!(!b.has_buffered_frame());
    }

    #[test]
    fn frames_round_trip_in_order() {
        let (a, mut b) = Channel::pair().unwrap();
        a.send(&[b"hello"], &[], soon(), None).unwrap();
        a.send(&[b"", b"wor", b"ld"], &[], soon(), None).unwrap();
        a.send(&[], &[], soon(), None).unwrap();
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
        let sender = std::thread::spawn(move || a.send(&[&data], &[], soon(), None));
        let frame = b.recv(soon(), None).unwrap();
        sender.join().unwrap().unwrap();
        assert!(frame.body == expected);
    }

    #[test]
    fn fds_ride_beside_the_bytes() {
        let (a, mut b) = Channel::pair().unwrap();
        let (x, mut y) = UnixStream::pair().unwrap();
        a.send(&[b"one"], &[x.as_fd()], soon(), None).unwrap();
        a.send(&[b"two"], &[], soon(), None).unwrap();
        drop(x);
        let first = b.recv(soon(), None).unwrap();
        assert_eq!(first.fds.len(), 1);
        let mut passed = UnixStream::from(first.fds.into_iter().next().unwrap());
        passed.write_all(b"via passed fd").unwrap();
        drop(passed);
        let mut got = String::new();
        std::io::Read::read_to_string(&mut y, &mut got).unwrap();
        assert_eq!(got, "via passed fd");
        assert!(b.recv(soon(), None).unwrap().fds.is_empty());
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
        header[8..].copy_from_slice(&3u32.to_le_bytes());
        raw.write_all(&header).unwrap();
        raw.write_all(b"hi").unwrap();
        assert!(matches!(
            chan.recv(soon(), None),
            Err(FrameError::MissingFds { claimed: 3, arrived: 0 })
        ));
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
        assert!(matches!(a.send(&[b"x"], &[], soon(), None), Err(FrameError::Disconnected)));
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
