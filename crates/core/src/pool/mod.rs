//! `Pool`: a set of worker processes that run tasks over many items—`map`, `imap`,
//! `apply_async`—with per-worker state built once by an initializer, and every failure
//! reported on the item it belongs to.
//!
//! ```ignore
//! #[task] fn load_cache(n: u32) -> Vec<String> { (0..n).map(|i| format!("{i:b}")).collect() }
//! #[task] fn ones(cache: &Vec<String>, i: u32) -> usize { cache[i as usize].matches('1').count() }
//!
//! let pool = ctx.pool().processes(4).initializer(load_cache, 65_535).build()?;
//! let counts: Vec<usize> = pool.map(ones, 0..65_535)?;        // cache built once per worker
//! ```
//!
//! Items travel to workers in batches of `chunksize`; each batch is one frame each way. A panic
//! fails only its item, and the worker keeps serving. A worker that dies (killed, out of
//! memory, a crash in C code) fails the batch it was running, with its exit status; the batch
//! queued behind it runs elsewhere, and a new worker takes its place. The engine behind this is
//! in `pool/engine.rs`, with the progress thread that drives a pool nobody waits on
//! (ARCHITECTURE.md says why it is safe under fork).

mod engine;
#[cfg(feature = "progress")]
mod progress;
mod slot;

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::{Duration, Instant};

use serde::de::{DeserializeSeed, Deserializer, SeqAccess, Visitor};

use engine::{BatchOutcome, Config, Encoded, Fill, InitArgs, Initializer, MoveInit, Shared};
use slot::Slot;

use crate::error::{ChildFailure, Error, ErrorKind, Result};
use crate::ipc::wait::{Notify, Waitable, Watch};
use crate::process::method::StartMethod;
use crate::process::setup::{ParentEnds, SetupBuilder, setup_methods};
use crate::runtime::registry::{self, State};
use crate::runtime::task::{Portable, Task};
use crate::shared::arriving::ArrivingWriter;
use crate::transport::channel::Frame;
use crate::transport::codec;
use crate::transport::wire::{BATCH_ITEMS, BATCH_PLAIN, ItemResult};

/// Encoded initializer arguments of at least this many bytes reach the workers through one
/// memory file that each maps and decodes behind its writer, instead of a copy through every
/// worker's socket (which the parent writes worker by worker, each receiving into fresh
/// memory).
const SHARED_ARGS_MIN: usize = 1 << 20;

/// Configures a pool before its workers start: `ctx.pool().processes(4).build()`.
///
/// `S` is the state each worker builds with its initializer and hands to every task by
/// reference; `()` without an initializer.
#[must_use = "a pool does not start until `build()` is called"]
pub struct PoolBuilder<S = ()> {
    method: Arc<dyn StartMethod>,
    processes: Option<usize>,
    initializer: Option<Initializer>,
    max_tasks_per_child: Option<u64>,
    chunksize: Option<usize>,
    task_timeout: Option<Duration>,
    setup: SetupBuilder,
    /// Progress bars for `map` and `imap`.
    #[cfg(feature = "progress")]
    bars: bool,
    /// An error found while configuring, reported by `build()`.
    error: Option<Error>,
    _state: PhantomData<fn() -> S>,
}

impl PoolBuilder<()> {
    /// A builder for a pool whose workers are started by `method`.
    pub fn new(method: Arc<dyn StartMethod>) -> Self {
        PoolBuilder {
            method,
            processes: None,
            initializer: None,
            max_tasks_per_child: None,
            chunksize: None,
            task_timeout: None,
            setup: SetupBuilder::default(),
            #[cfg(feature = "progress")]
            bars: false,
            error: None,
            _state: PhantomData,
        }
    }

    /// Runs `task(args)` once in every worker (and every replacement) before its first task;
    /// what it returns is the worker's state, handed by reference to every task the pool
    /// runs (`fn t(state: &S, item: A)`), never sent again.
    ///
    /// The arguments are encoded once and sent to each worker (spawn, forkserver), or moved
    /// into each forked worker without being serialized (fork). Encoded arguments of a
    /// megabyte or more are written once into shared memory, which every worker maps and
    /// decodes from, instead of being sent through each worker's socket: they are measured
    /// here and written by `build()` once the workers have started, each decoding behind the
    /// writing (so a large vector costs about one copy, not a copy and then a decode). If
    /// their `Serialize` impl fails, panics or encodes to another length in that writing,
    /// `build()` fails (or panics) after stopping the workers. If the initializer panics,
    /// `build()` fails with that panic; if it panics in a replacement worker, the pool stops
    /// replacing workers (no endless respawn loop) and finishes with those it has.
    pub fn initializer<A: Portable, S: Send + 'static>(
        self,
        task: Task<A, S>,
        args: A,
    ) -> PoolBuilder<S> {
        let args = if self.method.moves_arguments() {
            // Each forked worker takes the arguments out of its own copy of this slot; the
            // parent's copy is never touched.
            let kept = codec::fds_in(&args);
            let slot = Arc::new(Mutex::new(Some(args)));
            let func = task.func();
            let make: MoveInit = Arc::new(move || {
                let args = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                let args = args.ok_or_else(|| {
                    registry::CallError::State("initializer arguments already used".into())
                })?;
                Ok(Box::new(func(&(), args)) as State)
            });
            Ok(InitArgs::Moved(make, kept))
        } else {
            encoded_init_args(&*self.method, task.name(), args)
        };
        let (initializer, error) = match args {
            Ok(args) => (Some(Initializer { task: task.name(), args }), self.error),
            Err(error) => (None, Some(error)),
        };
        PoolBuilder {
            method: self.method,
            processes: self.processes,
            initializer,
            max_tasks_per_child: self.max_tasks_per_child,
            chunksize: self.chunksize,
            task_timeout: self.task_timeout,
            setup: self.setup,
            #[cfg(feature = "progress")]
            bars: self.bars,
            error,
            _state: PhantomData,
        }
    }
}

impl<S: 'static> PoolBuilder<S> {
    setup_methods!("every worker");

    /// Shows a progress bar on stderr (items done, rate, time left) for this pool's `map`,
    /// `imap` and `imap_unordered`, when stderr is a terminal (the `progress` feature). A map
    /// with a bar runs as an `imap` with `map`'s chunk size, so that the bar moves with each
    /// batch's results; it returns what `map` does.
    #[cfg(feature = "progress")]
    pub fn progress(mut self, show: bool) -> Self {
        self.bars = show;
        self
    }

    /// The number of worker processes; the default is [`cpu_count`](crate::cpu_count) (the
    /// CPUs this process may use, within its cgroup's quota).
    pub fn processes(mut self, processes: usize) -> Self {
        self.processes = Some(processes);
        self
    }

    /// Replaces a worker after it has run this many items (Python's `maxtasksperchild`); by
    /// default workers live as long as the pool.
    pub fn max_tasks_per_child(mut self, max: u64) -> Self {
        self.max_tasks_per_child = Some(max);
        self
    }

    /// Items per batch. When unset, `map` picks about four batches per worker (as Python
    /// does) and `imap` sends items one at a time.
    pub fn chunksize(mut self, chunksize: usize) -> Self {
        self.chunksize = Some(chunksize);
        self
    }

    /// Kills a worker whose task runs longer than `timeout` per item, fails those items with
    /// [`ErrorKind::Timeout`], and replaces the worker. The automatic chunk size becomes 1, so
    /// that the limit applies to single items.
    pub fn task_timeout(mut self, timeout: Duration) -> Self {
        self.task_timeout = Some(timeout);
        self
    }

    /// Starts the workers and waits until each has run its initializer.
    ///
    /// Fails with the initializer's panic ([`ErrorKind::Panicked`]), or when a worker cannot
    /// be started (for the fork start method, when the calling process has other threads).
    pub fn build(self) -> Result<Pool<S>> {
        let processes = self.processes.unwrap_or_else(|| {
            self.method.default_processes().unwrap_or_else(crate::process::active::cpu_count)
        });
        if processes == 0 {
            return Err(Error::new(ErrorKind::InvalidState, "a pool needs at least one process"));
        }
        if self.chunksize == Some(0) || self.max_tasks_per_child == Some(0) {
            return Err(Error::new(
                ErrorKind::InvalidState,
                "chunksize and max_tasks_per_child must be at least 1",
            ));
        }
        if let Some(error) = self.error {
            return Err(error);
        }
        let resolved = self.setup.resolve()?;
        let (method, mut initializer) = engine::with_template(self.method, self.initializer)?;
        let fill = initializer.as_mut().and_then(Initializer::take_fill);
        let shared = Shared::start(
            Config {
                method,
                processes,
                initializer,
                max_tasks_per_child: self.max_tasks_per_child,
                task_timeout: self.task_timeout,
                setup: resolved.setup,
                setup_fds: resolved
                    .fds
                    .into_iter()
                    .map(crate::process::tracked::Tracked::new)
                    .collect(),
            },
            fill,
        )?;
        let progress = {
            let shared = Arc::clone(&shared);
            let registration = engine::LibraryThread::register();
            std::thread::Builder::new()
                .name("multiproc-pool".into())
                .spawn(move || shared.progress(registration))
                .map_err(|e| Error::io("starting the pool's progress thread", e))
        };
        let progress = match progress {
            Ok(handle) => handle,
            Err(error) => {
                shared.terminate();
                return Err(error);
            }
        };
        Ok(Pool {
            shared,
            progress: Some(progress),
            chunksize: self.chunksize,
            #[cfg(feature = "progress")]
            bars: self.bars,
            pipes: Mutex::new(resolved.pipes),
            _state: PhantomData,
        })
    }
}

/// Encodes initializer arguments for a start method that sends them (spawn, forkserver, mpi).
///
/// Arguments shorter than [`SHARED_ARGS_MIN`] go whole in each worker's `Start` frame, as do
/// any where descriptors cannot travel (`mpi`: once to each node's agent). Longer ones are
/// measured here and written into arriving memory (`shared::arriving`) once the workers have
/// been started: each decodes them behind the writing instead of after it, and the encoding is
/// never held whole in this process (one copy of a large vector, not two).
fn encoded_init_args<A: Portable>(
    method: &dyn StartMethod,
    task: &'static str,
    args: A,
) -> Result<InitArgs> {
    let encode_error = move |e: &dyn fmt::Display| {
        Error::new(ErrorKind::Encode, format!("arguments of initializer `{task}`: {e}"))
    };
    let limit = if method.carries_descriptors() { SHARED_ARGS_MIN } else { usize::MAX };
    let (small, attachments) = codec::collecting(|| codec::encode_below(&args, limit));
    let (bytes, attachments, fill) = match small.map_err(|e| encode_error(&e))? {
        Some(bytes) => (bytes, attachments, None),
        None => {
            drop(attachments);
            // Measured inside a collection, which finds the descriptors and blocks the
            // arguments hold as the encoding will; the memory's descriptor comes after them.
            let (measured, attachments) = codec::collecting(|| {
                let writer =
                    ArrivingWriter::new(codec::encoded_len(&args).map_err(|e| encode_error(&e))?)?;
                let handle = codec::encode(&writer.handle()?).map_err(|e| encode_error(&e))?;
                Ok::<_, Error>((writer, handle))
            });
            let (writer, handle) = measured?;
            let fill: Fill = Box::new(move || {
                let mut writer = writer;
                let mut append = |piece: &[u8]| writer.append(piece).map_err(|e| e.to_string());
                // The descriptors and blocks collected again are those measured above.
                let (encoded, _again) =
                    codec::collecting(|| codec::encode_in_pieces(&args, &mut append));
                encoded.map_err(|e| encode_error(&e))?;
                writer.finish().map_err(|e| encode_error(&e))
            });
            (handle, attachments, Some(fill))
        }
    };
    attachments.check_fits_one_message().map_err(|e| encode_error(&e))?;
    let what = format!("arguments of initializer `{task}`");
    crate::process::method::refuse_descriptors(method, &what, &attachments)?;
    Ok(InitArgs::Encoded {
        bytes: Arc::new(bytes),
        attachments,
        in_memory: fill.is_some(),
        fill: Mutex::new(fill),
    })
}

impl<S> fmt::Debug for PoolBuilder<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("start_method", &self.method.name())
            .field("processes", &self.processes)
            .field("initializer", &self.initializer.as_ref().map(|i| i.task))
            .field("max_tasks_per_child", &self.max_tasks_per_child)
            .field("chunksize", &self.chunksize)
            .field("task_timeout", &self.task_timeout)
            .finish()
    }
}

/// A pool of worker processes whose state is an `S` (see [`PoolBuilder::initializer`]).
///
/// Usable from several threads at once (`&Pool` is enough). A caller that waits on the pool
/// drives it; when nobody does, its progress thread does, so results arrive, ended workers are
/// reaped and replaced, and queued work moves with nobody waiting. Dropping the pool
/// terminates it, as leaving Python's `with Pool() as pool:` block does.
///
/// With the `tokio` feature, results can be awaited (an [`AsyncResult`] is a `Future`, and
/// `IMap::into_stream` a `Stream`), with no thread blocked:
///
/// ```ignore
/// let pending = pool.apply_async(square, 12)?;
/// assert_eq!(pending.await?, 144);
/// let mut squares = pool.imap(square, 0..100).into_stream();
/// while let Some(square) = squares.next().await { println!("{}", square?); }
/// ```
pub struct Pool<S = ()> {
    shared: Arc<Shared>,
    /// The thread that drives the pool while no caller does (see `engine`).
    progress: Option<std::thread::JoinHandle<()>>,
    chunksize: Option<usize>,
    /// The parent's ends of the workers' piped streams, until taken.
    pipes: Mutex<ParentEnds>,
    /// Whether `map` and `imap` show a progress bar.
    #[cfg(feature = "progress")]
    bars: bool,
    _state: PhantomData<fn() -> S>,
}

impl<S: 'static> Pool<S> {
    /// The writing end of the workers' shared stdin, when it was made
    /// [`Stdio::piped`](crate::Stdio::piped) (taken: `None` the second time).
    pub fn stdin(&self) -> Option<crate::process::setup::ChildInput> {
        self.pipes.lock().unwrap_or_else(|p| p.into_inner()).stdin.take()
    }

    /// The reading end of the pipe every worker's stdout writes to, when it was made
    /// [`Stdio::piped`](crate::Stdio::piped) (taken). The pool keeps a writing end for the
    /// workers it starts later, so the reader reaches its end once the pool is dropped.
    pub fn stdout(&self) -> Option<crate::process::setup::ChildOutput> {
        self.pipes.lock().unwrap_or_else(|p| p.into_inner()).stdout.take()
    }

    /// The reading end of the workers' shared stderr pipe, as [`stdout`](Self::stdout).
    pub fn stderr(&self) -> Option<crate::process::setup::ChildOutput> {
        self.pipes.lock().unwrap_or_else(|p| p.into_inner()).stderr.take()
    }

    /// Runs `task` on every item and returns the results in order.
    ///
    /// Every item runs, even after one has failed; then the error of the first failed item
    /// (in item order) is returned. Use [`imap`](Self::imap) to see every item's own result.
    pub fn map<A: Portable, R: Portable>(
        &self,
        task: Task<A, R, S>,
        items: impl IntoIterator<Item = A>,
    ) -> Result<Vec<R>> {
        #[cfg(feature = "progress")]
        if self.bars {
            // Through `imap`, whose results come one by one, so that the bar moves with them.
            let items: Vec<A> = items.into_iter().collect();
            let chunksize = self.chunksize.unwrap_or_else(|| self.auto_chunksize(items.len()));
            let mut values = Vec::with_capacity(items.len());
            let mut first_error = None;
            for result in IMap::new(self, task, items.into_iter(), true, chunksize) {
                match result {
                    Ok(value) => values.push(value),
                    Err(error) => first_error = first_error.or(Some(error)),
                }
            }
            return first_error.map_or(Ok(values), Err);
        }
        self.map_async(task, items)?.get()
    }

    /// Queues `task` on every item and returns at once; [`AsyncResult::get`] gives what
    /// [`map`](Self::map) would have.
    pub fn map_async<A: Portable, R: Portable>(
        &self,
        task: Task<A, R, S>,
        items: impl IntoIterator<Item = A>,
    ) -> Result<AsyncResult<Vec<R>>> {
        let items: Vec<A> = items.into_iter().collect();
        let chunksize = self.chunksize.unwrap_or_else(|| self.auto_chunksize(items.len()));
        let chunksize = self.limit_chunk(chunksize).max(1);
        let values = Values { values: Vec::with_capacity(items.len()), len: 0, first_error: None };
        let mut result = AsyncResult::new(
            &self.shared,
            Items::new(task.name(), values, |values: Values<R>| match values.first_error {
                Some(error) => Err(error),
                None => Ok(values.values),
            }),
        );
        // Submitted as they are encoded, in up to 64 groups, so that the workers start on the
        // first batches while the rest are being encoded. If one fails, dropping `result`
        // cancels those already queued.
        let batches = items.len().div_ceil(chunksize);
        let group = batches.div_ceil(64).max(1) * chunksize;
        for items in items.chunks(group) {
            let chunks = encode_chunks(task.name(), items, chunksize)?;
            let counts: Vec<usize> = chunks.iter().map(|(count, _, _)| *count).collect();
            let slots = self.shared.submit(task.name(), chunks)?;
            result.batches.extend(slots.into_iter().zip(counts));
        }
        Ok(result)
    }

    /// Runs `task(args)` in a worker and waits for its result.
    pub fn apply<A: Portable, R: Portable>(&self, task: Task<A, R, S>, args: A) -> Result<R> {
        self.apply_async(task, args)?.get()
    }

    /// Queues `task(args)` and returns at once.
    pub fn apply_async<A: Portable, R: Portable>(
        &self,
        task: Task<A, R, S>,
        args: A,
    ) -> Result<AsyncResult<R>> {
        let batch = encode_batch(task.name(), std::slice::from_ref(&args))?;
        let name = task.name();
        let mut result = AsyncResult::new(
            &self.shared,
            Items::new(name, One::default(), move |one: One<R>| {
                one.value.unwrap_or_else(|| {
                    Err(Error::new(
                        ErrorKind::Protocol,
                        format!("no result for pool task `{name}`"),
                    ))
                })
            }),
        );
        let slot = self.shared.submit_one(name, batch)?;
        result.batches.push_back((slot, 1));
        Ok(result)
    }

    /// Runs `task` on the items lazily, yielding each item's own result in order.
    ///
    /// The input is consumed as results are taken, so an endless iterator works: at most 128
    /// batches per worker and one more are read ahead of the results taken, fewer once they
    /// hold a megabyte of encoded arguments. Batches are `chunksize` items (default 1).
    pub fn imap<A: Portable, R: Portable, I: IntoIterator<Item = A>>(
        &self,
        task: Task<A, R, S>,
        items: I,
    ) -> IMap<A, R, I::IntoIter> {
        IMap::new(self, task, items.into_iter(), true, self.chunksize.unwrap_or(1))
    }

    /// Like [`imap`](Self::imap), but yields results as they finish, in any order.
    pub fn imap_unordered<A: Portable, R: Portable, I: IntoIterator<Item = A>>(
        &self,
        task: Task<A, R, S>,
        items: I,
    ) -> IMap<A, R, I::IntoIter> {
        IMap::new(self, task, items.into_iter(), false, self.chunksize.unwrap_or(1))
    }

    /// Accepts no more work; what is queued still runs, then the workers exit.
    pub fn close(&self) {
        self.shared.close();
    }

    /// Waits until every worker has exited; call [`close`](Self::close) (or
    /// [`terminate`](Self::terminate)) first, or this fails with [`ErrorKind::InvalidState`].
    pub fn join(&self) -> Result<()> {
        self.shared.join()
    }

    /// Kills every worker at once: work that was queued or running fails with
    /// [`ErrorKind::Cancelled`], and no process is left behind when this returns.
    pub fn terminate(&self) {
        self.shared.terminate();
    }

    /// The pids of the workers that serve the pool now: ended workers are reaped and replaced
    /// first, and those leaving (retired under `max_tasks_per_child`, or after `close`) are
    /// not listed.
    pub fn pids(&self) -> Vec<u32> {
        self.shared.pids()
    }

    /// The number of worker processes the pool keeps.
    pub fn processes(&self) -> usize {
        self.shared.config.processes
    }

    /// The start method of the workers.
    pub fn start_method(&self) -> &'static str {
        self.shared.config.method.name()
    }

    /// Python's rule: about four batches per worker.
    fn auto_chunksize(&self, items: usize) -> usize {
        if self.shared.config.task_timeout.is_some() {
            return 1;
        }
        items.div_ceil(self.processes() * 4).max(1)
    }

    /// No batch may be larger than what a worker is allowed to run.
    fn limit_chunk(&self, chunksize: usize) -> usize {
        match self.shared.config.max_tasks_per_child {
            Some(max) => chunksize.min(usize::try_from(max).unwrap_or(usize::MAX)),
            None => chunksize,
        }
    }
}

impl<S> Drop for Pool<S> {
    fn drop(&mut self) {
        self.shared.terminate();
        self.shared.stop_progress();
        if let Some(progress) = self.progress.take() {
            let _ = progress.join();
        }
    }
}

impl<S> fmt::Debug for Pool<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("start_method", &self.shared.config.method.name())
            .field("processes", &self.shared.config.processes)
            .finish()
    }
}

/// Encodes `items` in batches of `chunksize`: `(count, encoded Vec, attachments)`.
fn encode_chunks<A: Portable>(task: &str, items: &[A], chunksize: usize) -> Result<Vec<Encoded>> {
    items.chunks(chunksize.max(1)).map(|chunk| encode_batch(task, chunk)).collect()
}

/// Encodes one batch of `items`: `(count, encoded Vec, attachments)`.
fn encode_batch<A: Portable>(task: &str, items: &[A]) -> Result<Encoded> {
    let (bytes, attachments) = codec::collecting(|| codec::encode(items));
    let bytes = bytes.and_then(|bytes| {
        attachments.check_fits_one_message()?;
        Ok(bytes)
    });
    bytes
        .map(|bytes| (items.len(), bytes, attachments))
        .map_err(|e| Error::new(ErrorKind::Encode, format!("arguments of pool task `{task}`: {e}")))
}

/// Turns one batch's outcome into `count` item results, appended to `out`.
fn decode_batch<R: Portable, S: ItemSink<R>>(
    outcome: BatchOutcome,
    count: usize,
    task: &str,
    first: usize,
    out: &mut S,
) {
    let failed = |out: &mut S, error: Error| {
        (0..count).for_each(|_| out.push(Err(error.duplicate())));
    };
    let (Frame { body, fds, blocks }, offset) = match outcome {
        Ok(received) => received,
        Err(error) => return failed(out, error),
    };
    let start = out.mark();
    out.reserve(count);
    let decoded = match body[offset..].split_first() {
        // Every item returned: their values whole, handed over as one vector.
        Some((&BATCH_PLAIN, values)) => {
            codec::with_attachments(fds, blocks, || codec::decode::<Vec<R>>(values))
                .map(|values| out.push_all(values))
        }
        // Results go straight into `out`: no intermediate vector of per-item outcomes.
        Some((&BATCH_ITEMS, items)) => {
            let seed = BatchSeed { out: &mut *out, task, first, _results: PhantomData };
            codec::with_attachments(fds, blocks, || codec::decode_seed(seed, items))
        }
        _ => Err(codec::CodecError::new("the batch's results have no known tag")),
    };
    let error = match decoded {
        Ok(()) if out.len() - start.len == count => return,
        Ok(()) => Error::new(
            ErrorKind::Protocol,
            format!("pool task `{task}`: {} results for a batch of {count}", out.len() - start.len),
        ),
        Err(e) => Error::new(
            ErrorKind::Decode,
            format!("pool task `{task}` returned bytes that did not decode: {e}"),
        ),
    };
    out.rollback(start);
    failed(out, error);
}

/// Where decoded item results go, in item order.
trait ItemSink<R> {
    /// Results taken so far.
    fn len(&self) -> usize;
    /// Room for `additional` more.
    fn reserve(&mut self, additional: usize);
    /// The next item's result.
    fn push(&mut self, item: Result<R>);
    /// The values of the next items, which all returned.
    fn push_all(&mut self, values: Vec<R>) {
        values.into_iter().for_each(|value| self.push(Ok(value)));
    }
    /// Where things stand, to go back to.
    fn mark(&self) -> Mark;
    /// Forgets every result taken since `mark`.
    fn rollback(&mut self, mark: Mark);
}

/// A point in an [`ItemSink`] to go back to (a batch that failed part-way through decoding).
#[derive(Clone, Copy)]
struct Mark {
    len: usize,
    values: usize,
    failed: bool,
}

impl<R> ItemSink<R> for VecDeque<Result<R>> {
    fn len(&self) -> usize {
        VecDeque::len(self)
    }

    fn reserve(&mut self, additional: usize) {
        VecDeque::reserve(self, additional);
    }

    fn push(&mut self, item: Result<R>) {
        self.push_back(item);
    }

    fn push_all(&mut self, values: Vec<R>) {
        self.extend(values.into_iter().map(Ok));
    }

    fn mark(&self) -> Mark {
        Mark { len: VecDeque::len(self), values: 0, failed: false }
    }

    fn rollback(&mut self, mark: Mark) {
        self.truncate(mark.len);
    }
}

/// What `apply` keeps: the one result, with nothing allocated for it. A batch that brings
/// more is counted (and fails as malformed), the extra results dropped.
struct One<R> {
    value: Option<Result<R>>,
    pushed: usize,
}

impl<R> Default for One<R> {
    fn default() -> Self {
        One { value: None, pushed: 0 }
    }
}

impl<R> ItemSink<R> for One<R> {
    fn len(&self) -> usize {
        self.pushed
    }

    fn reserve(&mut self, _additional: usize) {}

    fn push(&mut self, item: Result<R>) {
        self.pushed += 1;
        self.value.get_or_insert(item);
    }

    fn mark(&self) -> Mark {
        Mark { len: self.pushed, values: 0, failed: false }
    }

    fn rollback(&mut self, mark: Mark) {
        if mark.len == 0 {
            self.value = None;
        }
        self.pushed = mark.len;
    }
}

/// What `map` keeps: the values, and the error of the first item that failed (in item
/// order). Half the memory of a `Result` per item, and no pass to turn those into a `Vec`.
struct Values<R> {
    values: Vec<R>,
    len: usize,
    first_error: Option<Error>,
}

impl<R> ItemSink<R> for Values<R> {
    fn len(&self) -> usize {
        self.len
    }

    fn reserve(&mut self, additional: usize) {
        self.values.reserve(additional);
    }

    fn push(&mut self, item: Result<R>) {
        self.len += 1;
        match item {
            Ok(value) => self.values.push(value),
            Err(error) => {
                self.first_error.get_or_insert(error);
            }
        }
    }

    fn push_all(&mut self, values: Vec<R>) {
        self.len += values.len();
        self.values.extend(values);
    }

    fn mark(&self) -> Mark {
        Mark { len: self.len, values: self.values.len(), failed: self.first_error.is_some() }
    }

    fn rollback(&mut self, mark: Mark) {
        self.len = mark.len;
        self.values.truncate(mark.values);
        if !mark.failed {
            self.first_error = None;
        }
    }
}

/// Decodes a batch's `Vec<ItemResult<R>>`, pushing each item's result onto `out` as it goes.
struct BatchSeed<'a, R, S> {
    out: &'a mut S,
    task: &'a str,
    first: usize,
    _results: PhantomData<fn() -> R>,
}

impl<'de, R: Portable, S: ItemSink<R>> DeserializeSeed<'de> for BatchSeed<'_, R, S> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> std::result::Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de, R: Portable, S: ItemSink<R>> Visitor<'de> for BatchSeed<'_, R, S> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a sequence of item results")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> std::result::Result<(), A::Error> {
        let mut i = self.first;
        while let Some(item) = items.next_element::<ItemResult<R>>()? {
            self.out.push(item_result(item, self.task, i));
            i += 1;
        }
        Ok(())
    }
}

fn item_result<R>(item: ItemResult<R>, task: &str, index: usize) -> Result<R> {
    match item {
        ItemResult::Returned(value) => Ok(value),
        ItemResult::Panicked(panic) => Err(Error::child(
            format!("pool task `{task}` (item {index})"),
            ChildFailure::Panicked(panic),
            None,
        )),
        ItemResult::Unencodable(message) => Err(Error::new(
            ErrorKind::Encode,
            format!(
                "pool task `{task}` (item {index}) returned a value that could not be encoded: {message}"
            ),
        )),
    }
}

/// What a call makes of its batches' outcomes: it decodes each as it is taken, in item
/// order, then gives the call's result.
trait Collect<T>: Send {
    /// Takes the outcome of the next batch, of `count` items.
    fn batch(&mut self, outcome: BatchOutcome, count: usize);
    /// The call's result, once every batch is in.
    fn finish(self: Box<Self>) -> Result<T>;
}

/// Every item's result, decoded batch by batch into `results`; `finish` makes the call's
/// result of them.
struct Items<R, S, F> {
    task: &'static str,
    results: S,
    finish: F,
    _results: PhantomData<fn() -> R>,
}

impl<R, S, F> Items<R, S, F> {
    fn new(task: &'static str, results: S, finish: F) -> Box<Self> {
        Box::new(Items { task, results, finish, _results: PhantomData })
    }
}

impl<R, S, T, F> Collect<T> for Items<R, S, F>
where
    R: Portable,
    S: ItemSink<R> + Send,
    F: FnOnce(S) -> Result<T> + Send,
{
    fn batch(&mut self, outcome: BatchOutcome, count: usize) {
        let first = self.results.len();
        decode_batch::<R, S>(outcome, count, self.task, first, &mut self.results);
    }

    fn finish(self: Box<Self>) -> Result<T> {
        (self.finish)(self.results)
    }
}

/// The pending result of [`Pool::apply_async`] or [`Pool::map_async`].
///
/// Dropping it before the result arrived cancels what has not started and discards the rest.
pub struct AsyncResult<T> {
    shared: Arc<Shared>,
    /// The batches not yet taken, with their item counts, in item order.
    batches: VecDeque<(Arc<Slot>, usize)>,
    collect: Option<Box<dyn Collect<T>>>,
}

impl<T> AsyncResult<T> {
    fn new(shared: &Arc<Shared>, collect: Box<dyn Collect<T>>) -> Self {
        AsyncResult { shared: Arc::clone(shared), batches: VecDeque::new(), collect: Some(collect) }
    }

    /// Waits for the result.
    pub fn get(mut self) -> Result<T> {
        self.take(true)
    }

    /// Waits at most `timeout`: `Ok(None)` if the result is not there by then.
    ///
    /// Once this has returned the result (or its error), a later call gives an
    /// [`ErrorKind::ResultTaken`] error.
    pub fn get_timeout(&mut self, timeout: Duration) -> Result<Option<T>> {
        if self.collect.is_some() && !self.wait_until(Some(Instant::now() + timeout)) {
            return Ok(None);
        }
        self.take(false).map(Some)
    }

    /// Whether the result has arrived (never blocks): looks at the workers first, so a result
    /// that is there is seen, with no other thread waiting on the pool.
    pub fn ready(&self) -> bool {
        self.wait_until(Some(Instant::now()))
    }

    /// Waits until the result has arrived, without taking it.
    pub fn wait(&self) {
        self.wait_until(None);
    }

    /// Waits at most `timeout` for the result; true if it has arrived.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.wait_until(Some(Instant::now() + timeout))
    }

    fn wait_until(&self, deadline: Option<Instant>) -> bool {
        self.shared.drive_until(deadline, |_| self.batches.iter().all(|(slot, _)| slot.is_done()))
    }

    /// Takes the batches in order and makes the result; with `wait`, waits for each in turn
    /// and decodes it while later ones still run.
    fn take(&mut self, wait: bool) -> Result<T> {
        let Some(mut collect) = self.collect.take() else {
            return Err(Error::new(ErrorKind::ResultTaken, "this pool result was already taken"));
        };
        while let Some((slot, count)) = self.batches.front() {
            if wait {
                self.shared.drive_until(None, |_| slot.is_done());
            }
            let outcome = taken(slot);
            let count = *count;
            self.batches.pop_front();
            collect.batch(outcome, count);
        }
        collect.finish()
    }
}

/// The outcome of a finished batch.
fn taken(slot: &Slot) -> BatchOutcome {
    slot.take()
        .unwrap_or_else(|| Err(Error::new(ErrorKind::Protocol, "a pool batch result went missing")))
}

/// Awaiting an `AsyncResult` gives what [`get`](AsyncResult::get) would, with no thread
/// blocked: the pool's progress thread wakes the task when the result is in. Works under any
/// executor. Dropping the future before it is ready is dropping the `AsyncResult`: what has
/// not started is cancelled, and the rest is discarded when it arrives.
impl<T> Future for AsyncResult<T> {
    type Output = Result<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Result<T>> {
        let this = &mut *self;
        let Some(mut collect) = this.collect.take() else {
            return Poll::Ready(Err(Error::new(
                ErrorKind::ResultTaken,
                "this pool result was already taken",
            )));
        };
        if this.batches.iter().any(|(slot, _)| this.shared.notify(slot, cx.waker())) {
            this.collect = Some(collect);
            return Poll::Pending;
        }
        for (slot, count) in this.batches.drain(..) {
            collect.batch(taken(&slot), count);
        }
        Poll::Ready(collect.finish())
    }
}

impl<T> Waitable for AsyncResult<T> {
    /// Ready when the result has arrived (or it was taken).
    fn watch(&self) -> Watch<'_> {
        let slots = self.batches.iter().map(|(slot, _)| Arc::clone(slot)).collect();
        Watch::notify(Arrival { shared: Arc::clone(&self.shared), slots })
    }
}

/// How [`wait`](crate::wait) watches an `AsyncResult`: its pool and batches.
struct Arrival {
    shared: Arc<Shared>,
    slots: Vec<Arc<Slot>>,
}

impl Notify for Arrival {
    fn is_ready(&self) -> bool {
        drop(self.shared.look());
        self.slots.iter().all(|slot| slot.is_done())
    }

    fn notify(&self, waker: &Waker) {
        if !self.slots.iter().any(|slot| self.shared.notify(slot, waker)) {
            waker.wake_by_ref();
        }
    }
}

impl<T> Drop for AsyncResult<T> {
    fn drop(&mut self) {
        if !self.batches.is_empty() {
            self.shared.abandon(self.batches.iter().map(|(slot, _)| slot));
        }
    }
}

impl<T> fmt::Debug for AsyncResult<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncResult").field("batches", &self.batches.len()).finish()
    }
}

/// How many bytes of encoded arguments an `imap` keeps in flight beyond one batch per worker.
const WINDOW_BYTES: usize = 1 << 20;

/// The iterator of [`Pool::imap`] and [`Pool::imap_unordered`]: one `Result` per item.
pub struct IMap<A, R, I> {
    shared: Arc<Shared>,
    task: &'static str,
    input: Option<I>,
    chunksize: usize,
    /// Batches allowed in flight at once.
    window: usize,
    /// Batches in flight whatever their size: one per worker and one ready to go.
    min_window: usize,
    /// Submitted and not yet taken: `(batch, item count, index of its first item, bytes)`.
    submitted: VecDeque<(Arc<Slot>, usize, usize, usize)>,
    /// Bytes the batches in flight hold, encoded.
    submitted_bytes: usize,
    next_index: usize,
    /// Results handed out so far.
    yielded: usize,
    /// The progress bar, moved by each result handed out.
    #[cfg(feature = "progress")]
    bar: Option<indicatif::ProgressBar>,
    ready: VecDeque<Result<R>>,
    /// Items that could not be encoded or submitted, in order, and why: the input ends with
    /// them.
    failed: Vec<(Error, usize)>,
    ordered: bool,
    _args: PhantomData<fn(A)>,
}

impl<A: Portable, R: Portable, I: Iterator<Item = A>> IMap<A, R, I> {
    fn new<S: 'static>(
        pool: &Pool<S>,
        task: Task<A, R, S>,
        input: I,
        ordered: bool,
        chunksize: usize,
    ) -> Self {
        #[cfg(feature = "progress")]
        let bar = pool.bars.then(|| {
            let (low, high) = input.size_hint();
            progress::bar((Some(low) == high).then_some(low))
        });
        IMap {
            shared: Arc::clone(&pool.shared),
            task: task.name(),
            input: Some(input),
            chunksize: pool.limit_chunk(chunksize),
            #[cfg(feature = "progress")]
            bar,
            // Enough batches to fill every worker's pipeline, plus one ready to go.
            window: engine::MAX_DEPTH * pool.processes() + 1,
            min_window: pool.processes() + 1,
            submitted: VecDeque::new(),
            submitted_bytes: 0,
            next_index: 0,
            yielded: 0,
            ready: VecDeque::new(),
            failed: Vec::new(),
            ordered,
            _args: PhantomData,
        }
    }

    /// Takes items from the input and submits batches: once half the window is free, enough
    /// to fill it, in one submission, so that each worker gets several batches in one write
    /// instead of one write per batch (with chunksize 1, per item). Beyond one batch per
    /// worker, the window also ends at [`WINDOW_BYTES`] of encoded arguments.
    fn fill(&mut self) {
        if self.submitted.len() > self.window / 2 {
            return;
        }
        let mut batches: Vec<engine::Encoded> = Vec::new();
        let mut spans = Vec::new();
        let mut bytes = self.submitted_bytes;
        loop {
            let count = self.submitted.len() + batches.len();
            if count >= self.window || (count >= self.min_window && bytes >= WINDOW_BYTES) {
                break;
            }
            let Some(input) = self.input.as_mut() else { break };
            let chunk: Vec<A> = input.by_ref().take(self.chunksize).collect();
            if chunk.len() < self.chunksize {
                self.input = None;
            }
            if chunk.is_empty() {
                break;
            }
            let first = self.next_index;
            self.next_index += chunk.len();
            match encode_chunks(self.task, &chunk, chunk.len()) {
                Ok(encoded) => {
                    let size: usize =
                        encoded.iter().map(|(_, args, att)| args.len() + att.block_bytes()).sum();
                    bytes += size;
                    batches.extend(encoded);
                    spans.push((chunk.len(), first, size));
                }
                Err(error) => {
                    self.failed.push((error, chunk.len()));
                    self.input = None;
                }
            }
        }
        if batches.is_empty() {
            return;
        }
        match self.shared.submit(self.task, batches) {
            Ok(slots) => {
                self.submitted_bytes = bytes;
                self.submitted.extend(
                    slots
                        .into_iter()
                        .zip(spans)
                        .map(|(slot, (count, first, size))| (slot, count, first, size)),
                )
            }
            Err(error) => {
                // These items come before any that could not be encoded.
                let count = spans.iter().map(|(count, _, _)| count).sum::<usize>();
                self.failed.insert(0, (error, count));
                self.input = None;
            }
        }
    }
}

impl<A: Portable, R: Portable, I: Iterator<Item = A>> IMap<A, R, I> {
    /// The next result: waits for it (driving the pool) without `cx`, or, with one, leaves the
    /// task's waker with the batch it needs and says `Pending`.
    fn step(&mut self, cx: Option<&mut TaskContext<'_>>) -> Poll<Option<Result<R>>> {
        let mut cx = cx;
        loop {
            if let Some(result) = self.ready.pop_front() {
                return Poll::Ready(Some(self.yield_one(result)));
            }
            self.fill();
            if self.submitted.is_empty() {
                // The items that could not be submitted come last, after every earlier result.
                for (error, count) in self.failed.drain(..) {
                    self.ready.extend((0..count).map(|_| Err(error.duplicate())));
                }
                let last = self.ready.pop_front();
                return Poll::Ready(last.map(|result| self.yield_one(result)));
            }
            let submitted = &self.submitted;
            let ordered = self.ordered;
            let find = || {
                if ordered {
                    submitted.front().filter(|(slot, ..)| slot.is_done()).map(|_| 0)
                } else {
                    submitted.iter().position(|(slot, ..)| slot.is_done())
                }
            };
            let position = match cx.as_deref_mut() {
                None => {
                    let mut found = None;
                    self.shared.drive_until(None, |_| {
                        found = find();
                        found.is_some()
                    });
                    found.expect("drive_until returns once found")
                }
                Some(cx) => match find() {
                    Some(position) => position,
                    None => {
                        // In order, the front batch is the one that matters; in any order,
                        // whichever finishes first. One that finished meanwhile is looked at
                        // again at once.
                        let awaited = if ordered { 1 } else { submitted.len() };
                        let waiting =
                            submitted.iter().take(awaited).fold(true, |all, (slot, ..)| {
                                self.shared.notify(slot, cx.waker()) && all
                            });
                        if waiting {
                            return Poll::Pending;
                        }
                        continue;
                    }
                },
            };
            let (slot, count, first, size) =
                self.submitted.remove(position).expect("position exists");
            self.submitted_bytes -= size;
            decode_batch(taken(&slot), count, self.task, first, &mut self.ready);
        }
    }
}

impl<A: Portable, R: Portable, I: Iterator<Item = A>> Iterator for IMap<A, R, I> {
    type Item = Result<R>;

    fn next(&mut self) -> Option<Result<R>> {
        match self.step(None) {
            Poll::Ready(next) => next,
            Poll::Pending => unreachable!("a blocking step waits until it is ready"),
        }
    }

    /// Exact when the input's is: one result per item, those read and not yet handed out
    /// plus what the input still holds (an item that cannot be encoded ends the input early,
    /// and the map with it).
    fn size_hint(&self) -> (usize, Option<usize>) {
        let pending = self.next_index - self.yielded;
        match &self.input {
            None => (pending, Some(pending)),
            Some(input) => {
                let (low, high) = input.size_hint();
                (pending.saturating_add(low), high.and_then(|high| high.checked_add(pending)))
            }
        }
    }
}

/// `len()` when the input is an `ExactSizeIterator` (a `Vec`, a range): the results still to
/// come.
impl<A: Portable, R: Portable, I: ExactSizeIterator<Item = A>> ExactSizeIterator for IMap<A, R, I> {}

impl<A, R, I> IMap<A, R, I> {
    /// Counts a result handed out.
    fn yield_one(&mut self, result: Result<R>) -> Result<R> {
        self.yielded += 1;
        #[cfg(feature = "progress")]
        if let Some(bar) = &self.bar {
            bar.inc(1);
            if self.input.is_none() && self.yielded == self.next_index {
                bar.finish();
            }
        }
        result
    }
}

impl<A, R, I> IMap<A, R, I> {
    /// The same results as a [`futures_core::Stream`] (the `tokio` feature):
    /// `pool.imap(task, items).into_stream()`.
    #[cfg(feature = "tokio")]
    pub fn into_stream(self) -> IMapStream<A, R, I> {
        IMapStream(self)
    }
}

/// `imap` and `imap_unordered` as a [`futures_core::Stream`] ([`IMap::into_stream`]): each
/// result as it is ready, with no thread blocked (the pool's progress thread wakes the task;
/// any executor will do). The input is read inside `poll_next`, as the iterator reads it inside
/// `next`. Dropping the stream cancels what has not started, as dropping the iterator does.
#[cfg(feature = "tokio")]
#[derive(Debug)]
pub struct IMapStream<A, R, I>(IMap<A, R, I>);

#[cfg(feature = "tokio")]
impl<A: Portable, R: Portable, I: Iterator<Item = A>> futures_core::Stream for IMapStream<A, R, I> {
    type Item = Result<R>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Result<R>>> {
        self.get_mut().0.step(Some(cx))
    }
}

/// Nothing of an `IMap` is pinned: its input and results are only ever used through `&mut`.
impl<A, R, I> Unpin for IMap<A, R, I> {}

impl<A, R, I> Drop for IMap<A, R, I> {
    fn drop(&mut self) {
        #[cfg(feature = "progress")]
        if let Some(bar) = self.bar.take()
            && !bar.is_finished()
        {
            bar.abandon();
        }
        if !self.submitted.is_empty() {
            self.shared.abandon(self.submitted.iter().map(|(slot, ..)| slot));
        }
    }
}

impl<A, R, I> fmt::Debug for IMap<A, R, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IMap")
            .field("task", &self.task)
            .field("in_flight", &self.submitted.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(message: &str) -> Error {
        Error::new(ErrorKind::Decode, message)
    }

    #[test]
    fn map_keeps_values_and_the_first_error_and_forgets_a_failed_batch() {
        let mut values = Values { values: Vec::new(), len: 0, first_error: None };
        values.push(Ok(1));
        // A batch that failed part-way through decoding leaves nothing behind.
        let mark = ItemSink::<u32>::mark(&values);
        values.push(Ok(2));
        values.push(Err(error("in the failed batch")));
        values.rollback(mark);
        assert_eq!((values.len, &values.values[..]), (1, &[1][..]));
        assert!(values.first_error.is_none());
        values.push(Err(error("first")));
        values.push(Err(error("second")));
        let mark = ItemSink::<u32>::mark(&values);
        values.push(Err(error("rolled back")));
        values.rollback(mark);
        values.push(Ok(5));
        assert_eq!((values.len, &values.values[..]), (4, &[1, 5][..]));
        assert!(values.first_error.is_some_and(|e| e.to_string().contains("first")));
    }

    #[test]
    fn apply_keeps_its_one_result_counts_extra_ones_and_forgets_a_failed_batch() {
        let mut one = One::default();
        let mark = ItemSink::<u32>::mark(&one);
        one.push(Ok(1));
        one.push(Ok(2));
        assert_eq!((one.len(), one.value.as_ref().map(|r| *r.as_ref().unwrap())), (2, Some(1)));
        one.rollback(mark);
        assert!(one.value.is_none() && one.len() == 0);
        one.push(Err(error("the batch failed")));
        assert!(one.value.is_some_and(|r| r.is_err()));
    }
}
