//! The wire protocol between a parent and its child: message types, version, and the frame
//! layout that carries a message beside a raw payload.
//!
//! These types are an IPC boundary, separate from the domain types, and versioned by
//! [`PROTOCOL_VERSION`]. A frame body is `[u32 message length][message (codec)][payload]`: the
//! payload (task arguments, a return value) is already-encoded bytes, written with its own iovec
//! so that a 100 MB argument is never copied into the message or walked by serde again.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::os::fd::BorrowedFd;
use std::time::Instant;

use crate::error::RemotePanic;
use crate::transport::channel::{Channel, Frame, FrameError};
use crate::transport::codec::{self, Block, CodecError};

/// The protocol version both sides announce; a mismatch fails the handshake.
pub const PROTOCOL_VERSION: u32 = 7;

/// Parent to child: what to run. The task's encoded arguments follow as the frame's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Start {
    /// The parent's [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The parent's executable fingerprint.
    pub fingerprint: u64,
    /// The registered name of the task.
    pub task: String,
    /// The process name (`Process.name` in Python).
    pub name: String,
    /// The name of the start method that made the child.
    pub method: String,
    /// The pid of the process that asked for the child (under forkserver, not the server).
    pub parent_pid: u32,
    /// Whether the child must exit when its parent goes away.
    pub daemon: bool,
    /// The parent's log level, which the child adopts (`None`: no logging).
    pub log: Option<String>,
    /// Set for a pool worker: instead of one task, it builds its state and then serves
    /// [`ToWorker`] batches until its channel closes.
    pub worker: Option<WorkerSetup>,
    /// What the child changes in itself before anything else (`None`: nothing).
    pub setup: Option<Setup>,
}

/// Environment, working directory and standard streams a child sets in itself before its task
/// runs. The descriptors its streams take are the first of the `Start` frame's (or, after a
/// fork, handed over in memory), one per [`StdStream::Fd`], in stream order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setup {
    /// Remove every variable first.
    pub env_clear: bool,
    /// Then set (`Some`) or remove (`None`) these, in order (names and values as bytes).
    pub env: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Then enter this directory.
    pub current_dir: Option<Vec<u8>>,
    /// Stdin, stdout, stderr.
    pub streams: [StdStream; 3],
}

impl Setup {
    /// How many descriptors the streams take.
    pub fn fd_count(&self) -> usize {
        self.streams.iter().filter(|s| **s == StdStream::Fd).count()
    }
}

/// What a child does with one of its standard streams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum StdStream {
    /// Keeps the one it has.
    #[default]
    Keep,
    /// Opens `/dev/null` on it.
    Null,
    /// Puts the next of the descriptors sent with the setup on it.
    Fd,
}

/// How a pool worker starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSetup {
    /// The registered name of the initializer whose return value is the worker's state; its
    /// encoded arguments are the `Start` frame's payload. `None`: the state is `()`.
    pub initializer: Option<String>,
    /// The payload is a `SealedMemory` that holds the encoded arguments
    /// (large ones: every worker maps one copy instead of being sent its own).
    pub args_in_memory: bool,
    /// The worker may hold results back in a shared ring (whose descriptor travels with
    /// `Ready`): not where the channel carries no descriptors (`mpi`).
    pub ring: bool,
}

/// Parent to pool worker, after the worker said [`ToParent::Ready`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// Run `task` on each item; the payload is the encoded `Vec` of arguments.
    Batch {
        /// The parent's number for this batch, echoed in the answer.
        id: u64,
        /// The registered name of the task.
        task: String,
    },
}

/// Child to parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToParent {
    /// The first frame of every child, sent before it reads anything.
    Hello {
        /// The child's [`PROTOCOL_VERSION`].
        version: u32,
        /// The child's executable fingerprint.
        fingerprint: u64,
        /// The child's pid as it sees it.
        pid: u32,
    },
    /// The task returned; the encoded value is the payload.
    Returned,
    /// A pool worker built its state and takes batches.
    Ready,
    /// A pool worker ran a batch; the payload is its results (see [`BATCH_PLAIN`]).
    BatchDone {
        /// The batch's number.
        id: u64,
    },
    /// A pool worker could not run a batch at all (unknown task, arguments that did not
    /// decode); every item of it fails.
    BatchFailed {
        /// The batch's number.
        id: u64,
        /// What went wrong.
        reason: FailReason,
        /// A lowercase message for the parent's error.
        message: String,
    },
    /// The task panicked.
    Panicked(RemotePanic),
    /// The child refused or failed to run the task.
    Failed {
        /// What went wrong.
        reason: FailReason,
        /// A lowercase message for the parent's error.
        message: String,
    },
}

/// Why a child did not run its task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailReason {
    /// No task of that name is registered in the child.
    UnknownTask,
    /// The name is registered twice in the child.
    DuplicateTask,
    /// Parent and child speak different protocol versions.
    VersionMismatch,
    /// Parent and child are different executables.
    FingerprintMismatch,
    /// The arguments did not decode as the task's argument type.
    ArgsUndecodable,
    /// The task's return value could not be encoded.
    ResultUnencodable,
    /// The parent's `Start` frame was malformed.
    Protocol,
    /// The child could not set itself up as asked (a working directory it cannot enter).
    Setup,
}

/// How a pool batch's results travel, after `BatchDone`: a tag byte, then, when every item
/// returned, [`BATCH_PLAIN`] and the `Vec<R>` of their values (a vector of numbers is then
/// one packed copy, nothing per item); otherwise [`BATCH_ITEMS`] and a `Vec<ItemResult<R>>`.
pub const BATCH_PLAIN: u8 = 1;

/// See [`BATCH_PLAIN`].
pub const BATCH_ITEMS: u8 = 0;

/// The outcome of one item of a pool batch, in a batch tagged [`BATCH_ITEMS`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ItemResult<T> {
    /// The task returned this value.
    Returned(T),
    /// The task panicked on this item.
    Panicked(RemotePanic),
    /// The task returned a value that could not be encoded.
    Unencodable(String),
}

/// Sends `message` with `payload`, and `fds` and `blocks` beside it, as one frame.
pub fn send<M: Serialize>(
    channel: &Channel,
    message: &M,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
    blocks: &[Block],
    deadline: Option<Instant>,
    abort: Option<BorrowedFd<'_>>,
) -> Result<(), SendError> {
    let head = head(message)?;
    channel.send(&[&head, payload], fds, blocks, deadline, abort).map_err(SendError::Frame)
}

/// A frame's control message, as [`head`] encodes it: on the stack unless it is long (a `Start`
/// with a long name), so that most sends allocate nothing.
pub type Head = smallvec::SmallVec<[u8; 64]>;

/// The start of a frame's body that carries `message`: its length, then its encoding; the
/// payload follows it ([`send`] for one frame, or as one of several
/// [`OutFrame`](crate::transport::channel::OutFrame)s).
pub fn head<M: Serialize>(message: &M) -> Result<Head, SendError> {
    let mut head = Head::from_slice(&[0; 4]);
    codec::encode_into_small(message, &mut head).map_err(SendError::Encode)?;
    let len = u32::try_from(head.len() - 4).expect("a control message is small");
    head[..4].copy_from_slice(&len.to_le_bytes());
    Ok(head)
}

/// Splits a received frame into its message and payload.
pub fn decode<M: DeserializeOwned>(frame: &Frame) -> Result<(M, &[u8]), CodecError> {
    let body = &frame.body;
    let Some(prefix) = body.get(..4) else {
        return Err(CodecError::new(format!(
            "frame of {} bytes has no message header",
            body.len()
        )));
    };
    let len = u32::from_le_bytes(prefix.try_into().expect("4 bytes")) as usize;
    let Some(message) = body.get(4..4 + len) else {
        return Err(CodecError::new(format!(
            "message length {len} exceeds the {}-byte frame",
            body.len()
        )));
    };
    Ok((codec::decode(message)?, &body[4 + len..]))
}

/// Why [`send`] failed.
#[derive(Debug)]
pub enum SendError {
    /// The message could not be encoded.
    Encode(CodecError),
    /// The frame could not be written.
    Frame(FrameError),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Encode(e) => write!(f, "{e}"),
            SendError::Frame(e) => write!(f, "{e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn message_and_payload_travel_together() {
        let (a, mut b) = Channel::pair().unwrap();
        let start = Start {
            version: PROTOCOL_VERSION,
            fingerprint: 42,
            task: "m::add".into(),
            name: "adder".into(),
            method: "spawn".into(),
            parent_pid: 7,
            daemon: true,
            log: Some("debug".into()),
            worker: Some(WorkerSetup {
                initializer: Some("m::init".into()),
                args_in_memory: true,
                ring: true,
            }),
            setup: Some(Setup {
                env_clear: true,
                env: vec![(b"A".to_vec(), Some(b"1".to_vec())), (b"B".to_vec(), None)],
                current_dir: Some(b"/tmp".to_vec()),
                streams: [StdStream::Keep, StdStream::Fd, StdStream::Null],
            }),
        };
        let deadline = Some(Instant::now() + Duration::from_secs(5));
        send(&a, &start, b"ARGS", &[], &[], deadline, None).unwrap();
        let frame = b.recv(deadline, None).unwrap();
        let (got, payload) = decode::<Start>(&frame).unwrap();
        assert_eq!(got, start);
        assert_eq!(payload, b"ARGS");
    }

    #[test]
    fn short_or_lying_message_header_is_an_error() {
        let frame = Frame { body: vec![1, 2], fds: vec![], blocks: vec![] };
        assert!(decode::<ToParent>(&frame).is_err());
        let frame = Frame { body: vec![255, 255, 255, 255, 0], fds: vec![], blocks: vec![] };
        assert!(decode::<ToParent>(&frame).is_err());
    }
}
