//! multiproc: run Rust work in child processes, with Python's three start methods—`fork`,
//! `spawn` and `forkserver`—chosen at run time.
//!
//! ```
//! use multiproc::{task, Context};
//!
//! #[task]
//! fn add(a: u64, b: u64) -> u64 { a + b }
//!
//! fn main() -> Result<(), multiproc::Error> {
//!     let ctx = Context::new("forkserver")?;
//!     let p = ctx.process(add, (2, 3)).name("adder").start()?;
//!     assert_eq!(p.join()?, 5);
//!     Ok(())
//! }
//! ```
//!
//! A child is the same executable: spawned children re-execute it and take their role before
//! `main` runs (an `.init_array` constructor, the default `ctor` feature), so binaries,
//! examples and `#[test]` functions need no setup. Builds that turn the feature off call
//! [`init`] first thing in `main`.
//!
//! Every way a child can fail—panic, exit code, signal, death before the handshake, bytes that
//! do not decode—comes back as an [`Error`] on the call that waited for it; see
//! [`Error::kind`] and [`Error::child_failure`].
//!
//! Processes coordinate with Python's primitives, each a futex in shared memory that travels as
//! a descriptor: [`Lock`], [`RLock`] and [`Condition`] (which survive the death of their
//! holder: [`LockError::OwnerDied`]), [`Barrier`] (broken when a party dies waiting),
//! [`Event`], [`Semaphore`], [`BoundedSemaphore`], and [`Value`] / [`Array`] behind their lock.
//!
//! With the `tokio` feature, every handle can be awaited without a blocked thread:
//! `Process::join_async`, an [`AsyncResult`] is a `Future`, `imap` a `Stream`,
//! `Connection::{send_async, recv_async}`, `Queue::{put_async, get_async}`,
//! `JoinableQueue::join_async`, `wait_async`, and the primitives' `lock_async`,
//! `acquire_async` and `wait_async`. The library never starts a runtime.

use std::fmt;
use std::sync::Arc;

pub use bytemuck::{self, Pod, Zeroable};
pub use multiproc_core::ipc::pipe::{RecvError, RecvTimeoutError, SendError, TryRecvError};
pub use multiproc_core::ipc::queue::{GetTimeoutError, PutTimeoutError, TryGetError, TryPutError};
pub use multiproc_core::preloaded;
pub use multiproc_core::runtime::log::log_to_stderr;
pub use multiproc_core::{
    Array, ArrayGuard, AsyncResult, Barrier, BarrierWaitResult, BoundedSemaphore, Bytes,
    ChildFailure, ChildInput, ChildOutput, Client, Condition, Connection, Error, ErrorKind, Event,
    ExitStatus, Fd, IMap, JoinableQueue, Listener, Lock, LockError, LockGuard, LockResult,
    MultithreadedForkPermit, Pool, PoolBuilder, Portable, Process, ProcessBuilder, Queue, RLock,
    RemotePanic, Result, SealedMemory, SealedSlice, Semaphore, SharedAtomicU64, SharedMemory,
    SharedSlice, Signaller, StartMethod, Stdio, Task, TryLockResult, Value, ValueGuard, Waitable,
    Watch, init, wait,
};
#[cfg(feature = "tokio")]
pub use multiproc_core::{IMapStream, wait_async};
pub use multiproc_core::{
    ParentProcess, ProcessInfo, active_children, cpu_count, current_process, parent_process,
};
/// The `mpi` context's view of the job (the `mpi` feature): where this process stands in it,
/// and the start method itself.
#[cfg(feature = "mpi")]
pub mod mpi {
    pub use multiproc_mpi::{AGENT_TIMEOUT, AgentInfo, EXIT_AGENT_FAILED, Launch, Mpi, launched};
}
pub use multiproc_forkserver::DEFAULT_SPARES as DEFAULT_FORKSERVER_SPARES;
pub use multiproc_forkserver::DEFAULT_START_TIMEOUT as DEFAULT_FORKSERVER_START_TIMEOUT;
pub use multiproc_forkserver::server_pid as forkserver_pid;
pub use multiproc_forkserver::set_preload as set_forkserver_preload;
pub use multiproc_forkserver::set_spares as set_forkserver_spares;
pub use multiproc_forkserver::set_start_timeout as set_forkserver_start_timeout;
/// Declares a function that can run in another process (see the macro crate's docs for the
/// shape of the `Task` it becomes).
///
/// ```
/// use multiproc::task;
///
/// #[task]
/// fn add(a: u64, b: u64) -> u64 {
///     a + b
/// }
///
/// # fn main() -> multiproc::Result<()> {
/// assert_eq!(add.call((2, 3)), 5); // here, or in a child: ctx.process(add, (2, 3))
/// # Ok(()) }
/// ```
///
/// What it refuses, and says why:
///
/// A method: a task runs in another process, which has no `self`. The object becomes the
/// workers' state instead (`fn pow(big: &BigPow, x: u64)`, with a pool whose initializer
/// returns the `BigPow`):
///
/// ```compile_fail
/// struct BigPow(u32);
/// impl BigPow {
///     #[multiproc::task]
///     fn pow(&self, x: u64) -> u64 { x.pow(self.0) }
/// }
/// ```
///
/// A borrowed argument: arguments travel between processes, so they are owned (`String`,
/// `Vec<T>`); only a first `&S` is allowed, and it is the worker's state:
///
/// ```compile_fail
/// #[multiproc::task]
/// fn greet(name: &str) -> String { format!("hello {name}") }
/// ```
///
/// A local of the enclosing function: the task runs elsewhere, where the local does not
/// exist; pass it as an argument (the compiler says "can't capture dynamic environment in a
/// fn item"):
///
/// ```compile_fail,E0434
/// fn main() {
///     let base = 5u64;
///     #[multiproc::task]
///     fn add(x: u64) -> u64 { x + base }
/// }
/// ```
pub use multiproc_macros::task;

#[cfg(feature = "test-main")]
pub mod harness;

/// The environment variable that overrides the default start method (`fork`, `spawn` or
/// `forkserver`), so that one test suite can run under each.
pub const START_METHOD_ENV: &str = "MULTIPROC_START_METHOD";

/// The start method [`Context::default`] uses when [`START_METHOD_ENV`] is not set.
pub const DEFAULT_START_METHOD: &str = "forkserver";

/// The names of every start method available on this platform, the default first.
pub fn all_start_methods() -> &'static [&'static str] {
    &["forkserver", "spawn", "fork"]
}

/// A start method, chosen by name, that processes (and later pools and queues) are made from.
///
/// Cheap to clone and shareable between threads.
#[derive(Clone)]
pub struct Context {
    method: Arc<dyn StartMethod>,
}

impl Context {
    /// The context for the start method `name`: `"fork"`, `"spawn"` or `"forkserver"`.
    ///
    /// An unknown name gives an [`ErrorKind::UnknownStartMethod`] error that lists the valid
    /// ones. This is the only place in multiproc that maps a name to a start method.
    ///
    /// ```
    /// use multiproc::{Context, ErrorKind};
    /// for name in multiproc::all_start_methods() {
    ///     assert_eq!(Context::new(name)?.start_method(), *name);
    /// }
    /// let error = Context::new("threads").expect_err("not a start method");
    /// assert_eq!(error.kind(), ErrorKind::UnknownStartMethod);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn new(name: &str) -> Result<Context> {
        let method: Arc<dyn StartMethod> = match name {
            "fork" => Arc::new(multiproc_fork::Fork::new()),
            "spawn" => Arc::new(multiproc_spawn::Spawn),
            "forkserver" => Arc::new(multiproc_forkserver::Forkserver),
            #[cfg(feature = "mpi")]
            "mpi" => Arc::new(multiproc_mpi::Mpi::new()?),
            #[cfg(not(feature = "mpi"))]
            "mpi" => {
                return Err(Error::new(
                    ErrorKind::UnknownStartMethod,
                    "the mpi context is not built in: enable multiproc's `mpi` feature (it needs \
                     an MPI library, such as Debian's libopenmpi-dev, and libclang)",
                ));
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::UnknownStartMethod,
                    format!(
                        "unknown start method `{name}`; expected one of: {}",
                        all_start_methods().join(", ")
                    ),
                ));
            }
        };
        Ok(Context { method })
    }

    /// The context named by [`START_METHOD_ENV`], or the platform default when it is unset.
    pub fn from_env() -> Result<Context> {
        match std::env::var(START_METHOD_ENV) {
            Ok(name) => Context::new(name.trim()),
            Err(_) => Context::new(DEFAULT_START_METHOD),
        }
    }

    /// A fork context that forks even while other threads run.
    ///
    /// The permit is made with `unsafe`; read [`MultithreadedForkPermit::new`] for the promise
    /// that it stands for. Prefer `Context::new("forkserver")`.
    pub fn fork_with_permit(permit: MultithreadedForkPermit) -> Context {
        Context { method: Arc::new(multiproc_fork::Fork::with_permit(permit)) }
    }

    /// A context around any implementation of the start-method seam.
    pub fn with_method(method: Arc<dyn StartMethod>) -> Context {
        Context { method }
    }

    /// The name of this context's start method.
    pub fn start_method(&self) -> &'static str {
        self.method.name()
    }

    /// The start method itself, for code written against the seam.
    pub fn method(&self) -> &Arc<dyn StartMethod> {
        &self.method
    }

    /// A builder for a child process that runs `task(args)`: name it, make it a daemon, set
    /// its environment, directory and streams, then `start()`.
    ///
    /// ```
    /// use multiproc::{Context, task};
    ///
    /// #[task]
    /// fn greet(name: String) -> String {
    ///     format!("{} from {}", std::env::var("GREETING").unwrap_or_default(), name)
    /// }
    ///
    /// let ctx = Context::new("spawn")?;
    /// let child = ctx.process(greet, "a child".to_owned()).name("greeter").env("GREETING", "hello");
    /// assert_eq!(child.start()?.join()?, "hello from a child");
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn process<A: Portable, R: Portable>(
        &self,
        task: Task<A, R>,
        args: A,
    ) -> ProcessBuilder<A, R> {
        ProcessBuilder::new(Arc::clone(&self.method), task, args)
    }

    /// A connected pair of duplex [`Connection`]s carrying `T` values (Python's `Pipe()`); either
    /// end can be passed to a child as a task argument.
    ///
    /// ```
    /// use multiproc::{Connection, Context, task};
    ///
    /// #[task]
    /// fn double(mut conn: Connection<u64>) {
    ///     while let Ok(x) = conn.recv() {
    ///         conn.send(&(2 * x)).expect("send");
    ///     }
    /// }
    ///
    /// let ctx = Context::new("forkserver")?;
    /// let (mut ours, theirs) = ctx.pipe::<u64>()?;
    /// let child = ctx.process(double, theirs).start()?;
    /// ours.send(&21)?;
    /// assert_eq!(ours.recv()?, 42);
    /// drop(ours); // the child's recv() ends, and so does the child
    /// child.join()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn pipe<T>(&self) -> Result<(Connection<T>, Connection<T>)> {
        multiproc_core::pipe()
    }

    /// An unbounded [`Queue`] of `T` values (Python's `Queue()`); see [`Queue::bounded`] for
    /// one with a capacity. Any number of processes may hold it, put and get.
    ///
    /// ```
    /// use multiproc::{Context, Queue, task};
    ///
    /// #[task]
    /// fn produce(queue: Queue<u32>) {
    ///     for i in 0..3 {
    ///         queue.put(&i).expect("put");
    ///     }
    /// }
    ///
    /// let ctx = Context::new("spawn")?;
    /// let queue = ctx.queue::<u32>()?;
    /// ctx.process(produce, queue.clone()).start()?.join()?;
    /// let got: Vec<u32> = (0..3).map(|_| queue.get()).collect::<Result<_, _>>()?;
    /// assert_eq!(got, [0, 1, 2]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn queue<T>(&self) -> Result<Queue<T>> {
        Queue::new()
    }

    /// An unbounded [`JoinableQueue`] (Python's `JoinableQueue()`); see
    /// [`JoinableQueue::bounded`].
    pub fn joinable_queue<T>(&self) -> Result<JoinableQueue<T>> {
        JoinableQueue::new()
    }

    /// A [`Lock`] (Python's `Lock()`) that survives the death of its holder.
    pub fn lock(&self) -> Result<Lock> {
        Lock::new()
    }

    /// An [`RLock`] (Python's `RLock()`): a lock its holder may take again.
    pub fn rlock(&self) -> Result<RLock> {
        RLock::new()
    }

    /// An [`Event`] (Python's `Event()`), not set; any number of processes may hold it.
    pub fn event(&self) -> Result<Event> {
        Event::new()
    }

    /// A [`Semaphore`] whose count starts at `value` (Python's `Semaphore(value)`).
    pub fn semaphore(&self, value: u32) -> Result<Semaphore> {
        Semaphore::new(value)
    }

    /// A [`BoundedSemaphore`] whose count starts at, and never exceeds, `value`.
    pub fn bounded_semaphore(&self, value: u32) -> Result<BoundedSemaphore> {
        BoundedSemaphore::new(value)
    }

    /// A [`Condition`] (Python's `Condition()`) over a lock of its own.
    pub fn condition(&self) -> Result<Condition> {
        Condition::new()
    }

    /// A [`Barrier`] for `parties` parties (Python's `Barrier(parties)`), which breaks when a
    /// party dies waiting.
    pub fn barrier(&self, parties: u32) -> Result<Barrier> {
        Barrier::new(parties)
    }

    /// A [`Value`] holding `value` behind its own lock (Python's `Value(typecode, value)`).
    ///
    /// ```
    /// use multiproc::{Context, Value, task};
    ///
    /// #[task]
    /// fn add_ten(total: Value<u64>) {
    ///     for _ in 0..10 {
    ///         *total.get_lock().expect("the lock") += 1;
    ///     }
    /// }
    ///
    /// let ctx = Context::new("forkserver")?;
    /// let total = ctx.value(0u64)?;
    /// let children = (0..4)
    ///     .map(|_| ctx.process(add_ten, total.try_clone()?).start())
    ///     .collect::<multiproc::Result<Vec<_>>>()?;
    /// for child in children {
    ///     child.join()?;
    /// }
    /// assert_eq!(total.get()?, 40);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn value<T: Pod>(&self, value: T) -> Result<Value<T>> {
        Value::new(value)
    }

    /// An [`Array`] of `len` zeroed values behind its own lock (Python's
    /// `Array(typecode, len)`).
    pub fn array<T: Pod>(&self, len: usize) -> Result<Array<T>> {
        Array::new(len)
    }

    /// A builder for a pool of worker processes started by this context's method
    /// (`ctx.pool().processes(4).initializer(load, args).build()?`):
    ///
    /// ```
    /// use multiproc::{Context, task};
    ///
    /// #[task]
    /// fn square(x: u64) -> u64 { x * x }
    ///
    /// let pool = Context::new("forkserver")?.pool().processes(2).build()?;
    /// assert_eq!(pool.map(square, 1..=4)?, [1, 4, 9, 16]);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn pool(&self) -> PoolBuilder {
        PoolBuilder::new(Arc::clone(&self.method))
    }
}

impl Default for Context {
    /// [`Context::from_env`].
    ///
    /// # Panics
    ///
    /// If [`START_METHOD_ENV`] names no start method; use [`Context::from_env`] to get that as
    /// an error instead.
    fn default() -> Self {
        Context::from_env().unwrap_or_else(|e| panic!("{START_METHOD_ENV}: {e}"))
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context").field("start_method", &self.start_method()).finish()
    }
}

/// Used by `#[multiproc::task]`; not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use multiproc_core::linkme;
    pub use multiproc_core::runtime::registry::{
        TASKS, TaskEntry, make_state, run_batch, run_encoded,
    };
}
