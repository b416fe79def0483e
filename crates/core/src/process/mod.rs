//! Processes: the start-method seam and the handle of one task in one child.
//!
//! The trait every start method implements ([`method`]), [`Process`] and its builder
//! ([`handle`]), how a child ended ([`status`]), the pipe and queue descriptors a forked
//! child closes ([`tracked`]), and the fork server that the forkserver start method and fork
//! pools run ([`server`]).
//!
//! Architecture invariant: everything here is written once against `dyn StartMethod`; no
//! start method is named. It imports `runtime`, `transport`, `sys` and the error types.

pub mod active;
pub mod handle;
pub(crate) mod launch;
pub mod method;
pub mod server;
pub mod setup;
pub mod status;
pub(crate) mod template;
pub mod tracked;

pub use handle::{Process, ProcessBuilder, Signaller};
