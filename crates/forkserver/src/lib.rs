//! multiproc-forkserver: the `forkserver` start method.
//!
//! A single-threaded server, started by exec of the current binary (never by forking the
//! caller), forks every child. A program with a tokio runtime, a rayon pool and a logging
//! thread can therefore start children without ever forking itself: the fork happens in a
//! process that has no other thread to hold a lock.
//!
//! The caller and the server talk over an anonymous socketpair created before the exec, so
//! there is no filesystem path and no abstract name to connect to. Each request carries the new
//! child's channel over SCM_RIGHTS, so the child talks to its parent directly and the server
//! carries no user data.

mod client;
mod server;

/// The server's wire protocol, which lives with the fork server loop in the core.
pub use multiproc_core::process::server::protocol;

pub use client::{
    DEFAULT_SPARES, DEFAULT_START_TIMEOUT, Forkserver, server_pid, set_preload, set_spares,
    set_start_timeout,
};
