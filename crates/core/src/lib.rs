//! multiproc-core: the engine behind the `multiproc` facade.
//!
//! It holds the start-method seam ([`StartMethod`], [`ChildHandle`]), the task registry, the
//! wire protocol and its framing with fd passing, the child runtime, and [`Process`], written
//! once against `dyn StartMethod`. Users depend on `multiproc`, not on this crate; start-method
//! crates depend on it. The only `unsafe` of the workspace lives in [`sys`].

pub mod buffer;
pub mod bytes;
pub mod channel;
pub mod child;
pub mod codec;
pub mod error;
pub mod fd;
pub mod listener;
pub mod log;
pub mod method;
pub mod pipe;
pub mod pool;
pub mod preload;
pub mod process;
pub mod queue;
pub mod registry;
pub mod role;
pub mod shm;
pub mod status;
pub mod sys;
pub mod task;
pub mod tracked;
pub mod wait;
pub mod wire;

pub use bytes::Bytes;
pub use error::{ChildFailure, Error, ErrorKind, RemotePanic, Result};
pub use fd::Fd;
pub use listener::{Client, Listener};
pub use method::{ChildHandle, ChildMain, DirectChild, Payload, StartMethod, StartRequest};
pub use pipe::{Connection, pipe};
pub use pool::{AsyncResult, IMap, Pool, PoolBuilder};
pub use preload::preloaded;
pub use process::{Process, ProcessBuilder};
pub use queue::{JoinableQueue, Queue};
pub use shm::{SealedMemory, SealedSlice, SharedMemory, SharedSlice};
pub use status::ExitStatus;
pub use sys::MultithreadedForkPermit;
pub use task::{Portable, Task};
pub use wait::{Waitable, wait};

/// Takes the child or forkserver role if this process was started as one; returns at once in
/// the user's program.
///
/// With the default `ctor` feature this already happened before `main`, and calling it again
/// is harmless. Builds that turn the feature off must call it first thing in `main`, before
/// starting any thread.
pub fn init() {
    role::take_role();
}

/// Re-exported for `#[multiproc::task]`; not a stable API.
#[doc(hidden)]
pub use linkme;
