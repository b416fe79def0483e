//! multiproc-core: the engine behind the `multiproc` facade.
//!
//! It holds the start-method seam ([`StartMethod`], [`ChildHandle`]), the task registry, the
//! wire protocol and its framing with fd passing, the child runtime, and [`Process`], written
//! once against `dyn StartMethod`. Users depend on `multiproc`, not on this crate; start-method
//! crates depend on it. The only `unsafe` of the workspace lives in [`sys`].

pub mod error;
pub mod ipc;
pub mod pool;
pub mod process;
pub mod runtime;
pub mod shared;
pub mod sys;
pub mod transport;

pub use error::{ChildFailure, Error, ErrorKind, RemotePanic, Result};
pub use ipc::listener::{Client, Listener};
pub use ipc::pipe::{Connection, pipe};
pub use ipc::queue::{JoinableQueue, Queue};
#[cfg(feature = "tokio")]
pub use ipc::wait::wait_async;
pub use ipc::wait::{Waitable, Watch, wait};
#[cfg(feature = "tokio")]
pub use pool::IMapStream;
pub use pool::{AsyncResult, IMap, Pool, PoolBuilder};
pub use process::active::{active_children, cpu_count};
pub use process::method::{
    ChildHandle, ChildMain, DirectChild, Payload, StartMethod, StartRequest,
};
pub use process::setup::{ChildInput, ChildOutput, Stdio};
pub use process::status::ExitStatus;
pub use process::{Process, ProcessBuilder, Signaller};
pub use runtime::identity::{ParentProcess, ProcessInfo, current_process, parent_process};
pub use runtime::preload::preloaded;
pub use runtime::task::{Portable, Task};
pub use shared::shm::{SealedMemory, SealedSlice, SharedMemory, SharedSlice};
pub use shared::sync::{
    Array, ArrayGuard, Barrier, BarrierWaitResult, BoundedSemaphore, Condition, Event, Lock,
    LockError, LockGuard, LockResult, RLock, Semaphore, SharedAtomicU64, TryLockResult, Value,
    ValueGuard,
};
pub use sys::MultithreadedForkPermit;
pub use transport::bytes::Bytes;
pub use transport::fd::Fd;

/// Takes the child or forkserver role if this process was started as one; returns at once in
/// the user's program.
///
/// With the default `ctor` feature this already happened before `main`, and calling it again
/// is harmless. Builds that turn the feature off must call it first thing in `main`, before
/// starting any thread.
pub fn init() {
    // What the `.init_array` constructor runs: the role of a re-executed child, and any other
    // crate's before-`main` step (an MPI job's agents).
    for before_main in sys::BEFORE_MAIN {
        before_main();
    }
}

/// Re-exported for `#[multiproc::task]`; not a stable API.
#[doc(hidden)]
pub use linkme;
