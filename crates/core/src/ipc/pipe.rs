//! [`Connection`]: one end of a duplex, message-oriented pipe between processes (Python's
//! `multiprocessing.Pipe()`), carrying serde values—and the descriptors inside them—both ways.
//!
//! A connection is a Unix stream socket with the same framing as every other channel of
//! multiproc, so a 64 MiB message arrives whole and a lying length is an error, not an
//! allocation. It can itself be a task argument: it travels as a descriptor. When the process
//! at the other end exits, or drops its end, receiving gives `Disconnected` after every message
//! it sent before—never a hang.

use std::fmt;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, ErrorKind};
use crate::process::tracked;
use crate::transport::channel::{Channel, Frame, FrameError};
use crate::transport::codec;
use crate::transport::fd::Fd;

/// A connected pair of [`Connection`]s.
pub fn pipe<T>() -> Result<(Connection<T>, Connection<T>), Error> {
    let (a, b) = Channel::pair().map_err(|e| Error::io("socketpair for a pipe", e))?;
    Ok((Connection::new(a), Connection::new(b)))
}

/// One end of a pipe that carries values of type `T` both ways.
pub struct Connection<T> {
    channel: Channel,
    /// A `send_async` was dropped after writing part of a message: the stream is broken.
    torn: AtomicBool,
    _messages: PhantomData<fn(T) -> T>,
}

/// Why [`Connection::send`] failed.
#[derive(Debug)]
pub enum SendError {
    /// The other end is closed: its process exited or dropped it.
    Disconnected,
    /// The value could not be encoded, or the socket failed.
    Failed(Error),
}

/// Why [`Connection::recv`] failed.
#[derive(Debug)]
pub enum RecvError {
    /// The other end is closed, and every message it sent has been received.
    Disconnected,
    /// A message did not decode, or the socket or framing failed.
    Failed(Error),
}

/// Why [`Connection::try_recv`] failed.
#[derive(Debug)]
pub enum TryRecvError {
    /// No whole message has arrived yet.
    Empty,
    /// The other end is closed, and every message it sent has been received.
    Disconnected,
    /// A message did not decode, or the socket or framing failed.
    Failed(Error),
}

/// Why [`Connection::recv_timeout`] failed.
#[derive(Debug)]
pub enum RecvTimeoutError {
    /// No message arrived in time.
    Timeout,
    /// The other end is closed, and every message it sent has been received.
    Disconnected,
    /// A message did not decode, or the socket or framing failed.
    Failed(Error),
}

impl<T> Connection<T> {
    pub(crate) fn new(channel: Channel) -> Self {
        tracked::track(channel.as_fd().as_raw_fd());
        Connection { channel, torn: AtomicBool::new(false), _messages: PhantomData }
    }
}

impl<T> Drop for Connection<T> {
    fn drop(&mut self) {
        tracked::untrack(self.channel.as_fd().as_raw_fd());
    }
}

impl<T: Serialize + DeserializeOwned> Connection<T> {
    /// Sends `value` (and the descriptors it holds); blocks while the other end's buffer is
    /// full.
    pub fn send(&self, value: &T) -> Result<(), SendError> {
        let (bytes, attachments) = self.encode(value)?;
        let fds = attachments.borrowed_fds();
        self.channel.send(&[&bytes], &fds, &attachments.blocks, None, None).map_err(send_error)
    }

    /// Encodes a message to send, if this end can still send.
    fn encode(&self, value: &T) -> Result<(Vec<u8>, codec::Attachments), SendError> {
        self.check_whole()?;
        let (bytes, attachments) = codec::collecting(|| codec::encode(value));
        let bytes = bytes.map_err(|e| {
            SendError::Failed(Error::new(ErrorKind::Encode, format!("pipe message: {e}")))
        })?;
        Ok((bytes, attachments))
    }

    /// Waits for the next message.
    pub fn recv(&mut self) -> Result<T, RecvError> {
        match self.receive(None) {
            Ok(value) => Ok(value),
            Err(Received::Disconnected) => Err(RecvError::Disconnected),
            Err(Received::Failed(e)) => Err(RecvError::Failed(e)),
            Err(Received::Timeout) => unreachable!("no deadline"),
        }
    }

    /// The next message if a whole one has arrived; never blocks.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        match self.channel.try_recv() {
            Ok(Some(frame)) => decode(frame).map_err(TryRecvError::Failed),
            Ok(None) => Err(TryRecvError::Empty),
            Err(FrameError::Disconnected) => Err(TryRecvError::Disconnected),
            Err(e) => Err(TryRecvError::Failed(frame_error(e))),
        }
    }

    /// Waits at most `timeout` for the next message.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<T, RecvTimeoutError> {
        match self.receive(Some(Instant::now() + timeout)) {
            Ok(value) => Ok(value),
            Err(Received::Disconnected) => Err(RecvTimeoutError::Disconnected),
            Err(Received::Timeout) => Err(RecvTimeoutError::Timeout),
            Err(Received::Failed(e)) => Err(RecvTimeoutError::Failed(e)),
        }
    }

    fn receive(&mut self, deadline: Option<Instant>) -> Result<T, Received> {
        match self.channel.recv(deadline, None) {
            Ok(frame) => decode(frame).map_err(Received::Failed),
            Err(FrameError::Disconnected) => Err(Received::Disconnected),
            Err(FrameError::Timeout) => Err(Received::Timeout),
            Err(e) => Err(Received::Failed(frame_error(e))),
        }
    }
}

#[cfg(feature = "tokio")]
impl<T: Serialize + DeserializeOwned> Connection<T> {
    /// [`send`](Self::send) as a future: waits for room in the socket through the tokio
    /// runtime's reactor, with no thread blocked.
    ///
    /// Dropped before it has written anything, it sends nothing. Dropped once it has written
    /// part of a message (one larger than the socket's buffer, whose reader is slow), it leaves
    /// that part in the stream: the other end then fails with a protocol error on that message,
    /// and every later `send` on this end fails too.
    pub async fn send_async(&self, value: &T) -> Result<(), SendError> {
        let (bytes, attachments) = self.encode(value)?;
        let fds = attachments.borrowed_fds();
        let blocks = &attachments.blocks;
        let frame = crate::transport::channel::OutFrame { body: &[&bytes], fds: &fds, blocks };
        /// Marks the connection torn if dropped while part of the message is out.
        struct Tear<'a>(&'a AtomicBool, &'a std::sync::atomic::AtomicUsize);
        impl Drop for Tear<'_> {
            fn drop(&mut self) {
                if self.1.load(Ordering::Relaxed) > 0 {
                    self.0.store(true, Ordering::Relaxed);
                }
            }
        }
        let sent = std::sync::atomic::AtomicUsize::new(0);
        let tear = Tear(&self.torn, &sent);
        let outcome = self.channel.send_async(frame, &sent).await;
        if outcome.is_ok() {
            sent.store(0, Ordering::Relaxed);
        }
        drop(tear);
        outcome.map_err(|(_, e)| send_error(e))
    }

    /// [`recv`](Self::recv) as a future: waits for the next message through the tokio
    /// runtime's reactor. Dropping it loses nothing: what was read of a message stays buffered
    /// in this end for the next receive.
    pub async fn recv_async(&mut self) -> Result<T, RecvError> {
        loop {
            match self.try_recv() {
                Ok(value) => return Ok(value),
                Err(TryRecvError::Disconnected) => return Err(RecvError::Disconnected),
                Err(TryRecvError::Failed(e)) => return Err(RecvError::Failed(e)),
                Err(TryRecvError::Empty) => {}
            }
            crate::transport::reactor::readable(&[self.channel.as_fd()])
                .await
                .map_err(|e| RecvError::Failed(Error::io("waiting for a pipe message", e)))?;
        }
    }
}

/// The outcome of a blocking receive, before it is cast into the caller's error type.
enum Received {
    Disconnected,
    Timeout,
    Failed(Error),
}

fn decode<T: DeserializeOwned>(frame: Frame) -> Result<T, Error> {
    codec::with_attachments(frame.fds, frame.blocks, || codec::decode::<T>(&frame.body))
        .map_err(|e| Error::new(ErrorKind::Decode, format!("pipe message did not decode: {e}")))
}

fn send_error(e: FrameError) -> SendError {
    match e {
        FrameError::Disconnected => SendError::Disconnected,
        e => SendError::Failed(Error::new(ErrorKind::Io, format!("pipe send: {e}"))),
    }
}

fn frame_error(e: FrameError) -> Error {
    Error::new(ErrorKind::Protocol, format!("pipe: {e}"))
}

impl<T> Connection<T> {
    /// An error if a dropped `send_async` left part of a message in the stream.
    fn check_whole(&self) -> Result<(), SendError> {
        if self.torn.load(Ordering::Relaxed) {
            return Err(SendError::Failed(Error::new(
                ErrorKind::InvalidState,
                "a send_async on this connection was dropped part-way through a message; the \
                 stream is broken",
            )));
        }
        Ok(())
    }

    /// Whether a whole message has already been read ahead into this end's buffer.
    pub(crate) fn has_buffered_message(&self) -> bool {
        self.channel.has_buffered_frame()
    }
}

impl<T> AsFd for Connection<T> {
    /// The socket: readable when bytes of a message (or the other end's close) have arrived.
    /// Messages this end has already read ahead are not signalled again; [`crate::ipc::wait::wait`]
    /// checks for them.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.channel.as_fd()
    }
}

impl<T> fmt::Debug for Connection<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Connection").field(&self.channel.as_fd()).finish()
    }
}

/// A connection travels to another process as its socket. Pass it before using it: bytes
/// this end has already read ahead stay behind.
impl<T> Serialize for Connection<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        Fd::new(self.channel.as_fd()).serialize(serializer)
    }
}

impl<'de, T> Deserialize<'de> for Connection<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let fd = Fd::<OwnedFd>::deserialize(deserializer)?;
        Ok(Connection::new(Channel::from_fd(fd.into_inner())))
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Disconnected => f.write_str("the other end of the pipe is closed"),
            SendError::Failed(e) => write!(f, "{e}"),
        }
    }
}

impl fmt::Display for RecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecvError::Disconnected => f.write_str("the other end of the pipe is closed"),
            RecvError::Failed(e) => write!(f, "{e}"),
        }
    }
}

impl fmt::Display for TryRecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TryRecvError::Empty => f.write_str("no message has arrived"),
            TryRecvError::Disconnected => f.write_str("the other end of the pipe is closed"),
            TryRecvError::Failed(e) => write!(f, "{e}"),
        }
    }
}

impl fmt::Display for RecvTimeoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecvTimeoutError::Timeout => f.write_str("no message arrived in time"),
            RecvTimeoutError::Disconnected => f.write_str("the other end of the pipe is closed"),
            RecvTimeoutError::Failed(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for SendError {}
impl std::error::Error for RecvError {}
impl std::error::Error for TryRecvError {}
impl std::error::Error for RecvTimeoutError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_arrive_in_order_then_disconnected() {
        let (a, mut b) = pipe::<(u32, String)>().unwrap();
        assert!(matches!(b.try_recv(), Err(TryRecvError::Empty)));
        assert!(matches!(b.recv_timeout(Duration::from_millis(1)), Err(RecvTimeoutError::Timeout)));
        for i in 0..100 {
            a.send(&(i, format!("message {i}"))).unwrap();
        }
        drop(a);
        for i in 0..100 {
            assert_eq!(b.recv().unwrap(), (i, format!("message {i}")));
        }
        assert!(matches!(b.recv(), Err(RecvError::Disconnected)));
        assert!(matches!(b.send(&(0, String::new())), Err(SendError::Disconnected)));
    }

    #[test]
    fn a_message_of_the_wrong_type_is_an_error() {
        let (a, b) = Channel::pair().unwrap();
        let a: Connection<String> = Connection::new(a);
        let mut b: Connection<u64> = Connection::new(b);
        a.send(&"not a number at all".to_owned()).unwrap();
        assert!(matches!(b.recv(), Err(RecvError::Failed(e)) if e.kind() == ErrorKind::Decode));
    }
}
