//! The transport layer: bytes and descriptors between two processes.
//!
//! Frames over a Unix socket with descriptors beside them ([`channel`]), the value codec
//! ([`codec`]), the protocol messages ([`wire`]), descriptors and byte blocks as values ([`fd`],
//! [`bytes`]), the buffers large frames are read into ([`buffer`]), and a byte ring in shared
//! memory (`ring`, which pool workers hold results back in), the spin a wait tries before it
//! sleeps (`spin`); with the `tokio` feature, waiting
//! for descriptors through the runtime's reactor (`reactor`).
//!
//! Architecture invariant: the transport knows nothing of processes. It imports only `sys` and
//! the error types, so that any two processes—a parent and its child, a forkserver and its
//! client, two strangers joined by a `Listener`—can use it.

pub mod buffer;
pub mod bytes;
pub mod channel;
pub mod codec;
pub mod fd;
#[cfg(feature = "tokio")]
pub mod reactor;
pub(crate) mod ring;
pub(crate) mod spin;
pub mod wire;
