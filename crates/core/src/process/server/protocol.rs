//! The fork server's wire protocol (the forkserver's and a fork pool template's): requests on
//! the control socket, replies on each request's own status socket.
//!
//! Per request, the client sends `Fork` on the shared control socket with three descriptors:
//! the write end of a fresh status socket, the new child's channel, and the client's working
//! directory. Everything about that child
//! then travels on its status socket—`Forked` with the pid and a pidfd, later `Exited`—so the
//! control socket carries no per-child state and many threads can wait on their own children
//! without sharing a reader.
//!
//! A server asked to keep spares (`Spares`) forks that many children ahead, each waiting on
//! its own handoff socket; a `Fork` request is then given to a spare ([`SpareTask`]) instead of
//! a fork, and the server forks the replacement once nothing else is waiting.

use crate::error::RemotePanic;
use serde::{Deserialize, Serialize};

/// The version both sides announce in `Hello`.
pub const VERSION: u32 = 5;

/// Client to server, on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Run this registered task once and keep what it returns for every child: sent at most
    /// once, right after `Hello`, before any `Fork`. The encoded arguments are the payload.
    Preload {
        /// The registered name of the task.
        task: String,
    },
    /// Fork a child. Descriptors: `[status socket, child channel, working directory]`, the
    /// status socket first so that a server out of descriptors still receives it and can say so.
    ///
    /// The child starts in the client's working directory and environment as they were when
    /// the client asked: the server enters the directory (`fchdir`) and takes on the
    /// environment before it forks. The environment travels only when it differs from the one
    /// the client sent last (the server keeps the last one it was given).
    Fork {
        /// The client's whole environment, or `None`: the same as in the last request.
        env: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    },
    /// Keep this many children forked ahead (0: none, every child is forked on request).
    /// Extra spares are let go at once; missing ones are forked when no request waits.
    Spares {
        /// How many.
        count: u32,
    },
}

/// Server to one of its spares, on the spare's handoff socket: become the child of a `Fork`
/// request. Descriptors: `[child channel, working directory]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpareTask {
    /// The environment to take on, when the server's has changed since the spare was forked.
    pub env: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

/// Server to client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// On the control socket, once, when the server is ready.
    Hello {
        /// The server's [`VERSION`].
        version: u32,
        /// The server's executable fingerprint.
        fingerprint: u64,
    },
    /// On the control socket: the preload task returned; the server takes `Fork` requests.
    Preloaded,
    /// On the control socket: the preload task failed; the server exits.
    PreloadFailed {
        /// The task's panic, if it panicked.
        panic: Option<RemotePanic>,
        /// What went wrong otherwise (unknown task, arguments that did not decode).
        message: String,
    },
    /// On the status socket: the child runs. Descriptors: `[pidfd]`.
    Forked {
        /// The child's pid.
        pid: u32,
    },
    /// On the status socket: the fork failed.
    ForkFailed {
        /// The OS error, as text.
        message: String,
    },
    /// On the status socket: the child ended and the server reaped it.
    Exited(WireStatus),
}

/// An exit status on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireStatus {
    /// Exited with this code.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}
