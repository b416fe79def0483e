//! The pool's engine: its workers, the queue of batches, and the driving of both.
//!
//! One thread at a time holds the driver's turn: a caller that waits on the pool (`get`,
//! `map`, an `imap` iterator, `join`), or the pool's progress thread, which takes the turn
//! when nobody else has held it for [`GRACE`] or when futures await results, and gives it back
//! when a caller asks. The driver polls every worker's channel and pidfd with the engine
//! unlocked, then locks it to read results, replace dead workers and send queued batches, and
//! wakes the other waiters (threads on the condition, tasks through their wakers), who check
//! whether what they wait for has arrived. Under the fork start method, replacements come
//! from the pool's template (`process::template`), never from a fork of the program.
//!
//! A worker holds several batches: the one it runs and, while they are small, some queued
//! behind it, so that it never waits for a round trip between batches. How many depends on
//! how long its batches take (measured): as many as make about a millisecond of work, between
//! 2 and 128, so that quick tasks travel in bulk and slow ones do not pile up behind each
//! other. A worker that holds work gets more only once it is down to half of that, and then
//! all it can take in one write: one syscall per several batches, not one per batch. Queued
//! batches always fit in the socket buffer, so a send never blocks on a worker that is busy;
//! a large batch is sent only to an idle worker, which is reading.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use crate::error::{ChildFailure, Error, ErrorKind, Result};
use crate::process::launch::{Launched, Work, check_hello, fail_kind, launch, start_message};
use crate::process::method::{ChildHandle, StartMethod};
use crate::process::status::ExitStatus;
use crate::process::template::Template;
use crate::runtime::child;
use crate::runtime::registry::{CallError, State};
pub(crate) use crate::runtime::threads::LibraryThread;
use crate::sys::{self, POLLIN, PollFd};
use crate::transport::channel::{Channel, Frame, FrameError, OutFrame};
use crate::transport::codec::Attachments;
use crate::transport::ring::Ring;
use crate::transport::spin::{self, Spin};
use crate::transport::wire::{self, ToParent, ToWorker, WorkerSetup};

use super::slot::Slot;

/// A batch's number, unique within its pool.
pub(crate) type BatchId = u64;

/// What came back for a batch: the frame body, the offset of the encoded
/// `Vec<ItemResult<R>>` in it and the descriptors the results hold, or the error that every
/// item of the batch failed with.
pub(crate) type BatchOutcome = Result<(Frame, usize)>;

/// Builds a forked worker's state from the initializer arguments moved into it.
pub(crate) type MoveInit = Arc<dyn Fn() -> std::result::Result<State, CallError> + Send + Sync>;

/// A batch ready to queue: item count, encoded `Vec` of arguments, what travels beside them.
pub(crate) type Encoded = (usize, Vec<u8>, Attachments);

/// Batches may queue behind a running one while all a worker holds stays within this many
/// bytes (they fit in a socket buffer, so a send never blocks on a busy worker).
const PIPELINE_BYTES: usize = 64 * 1024;

/// Batches a worker holds at most, when they are quick: enough that one running trivial
/// batches is still busy when its refill arrives (it gets more at half of this, and the refill
/// waits for the parent to wake and read). 32 was too few: `imap` of a trivial task ran at
/// half the rate it does with 128.
pub(crate) const MAX_DEPTH: usize = 128;

/// Batches a worker holds at least (when it has work): the one it runs and the next, so that
/// it never waits for the parent between two.
const MIN_DEPTH: usize = 2;

/// About how much work a worker holds, in time: its depth is this over how long its batches
/// take, within `MIN_DEPTH..=MAX_DEPTH`.
const QUEUED_WORK: Duration = Duration::from_millis(1);

/// How long the driver sleeps at most while a worker may be holding results back in its
/// ring: as long as the worker's batches take on average, within these bounds (so that
/// quick results are late by at most about a batch, and a pool of slow tasks wakes the driver
/// only ten times a second).
const RING_CHECK: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_millis(100);

/// How long the driver's turn stays free before the progress thread takes it: a caller that
/// waits on the pool again within this (one calling `apply` in a loop) drives it itself, and
/// an idle pool's ended workers are reaped and replaced within about this.
const GRACE: Duration = Duration::from_millis(2);

/// A pool's initializer: its name, and its arguments encoded (spawn, forkserver) or moved
/// (fork).
pub(crate) struct Initializer {
    pub(crate) task: &'static str,
    pub(crate) args: InitArgs,
}

/// Writes a pool's large initializer arguments into the memory its workers read them from
/// (see `shared::arriving`), once they have started; the error says why it could not.
pub(crate) type Fill = Box<dyn FnOnce() -> Result<()> + Send>;

impl Initializer {
    /// What still has to write the arguments, if anything: taken once, before the pool starts.
    pub(crate) fn take_fill(&mut self) -> Option<Fill> {
        match &mut self.args {
            InitArgs::Encoded { fill, .. } => {
                fill.get_mut().unwrap_or_else(|p| p.into_inner()).take()
            }
            _ => None,
        }
    }
}

/// The initializer's arguments, as the start method wants them.
pub(crate) enum InitArgs {
    /// Sent in each worker's `Start` frame, with the descriptors and blocks the arguments hold;
    /// `in_memory`: `bytes` encode an `ArrivingMemory` that holds the encoded arguments, which
    /// `fill` writes (until the pool's start has taken it).
    Encoded {
        bytes: Arc<Vec<u8>>,
        attachments: Attachments,
        in_memory: bool,
        fill: Mutex<Option<Fill>>,
    },
    /// Taken out of the forked worker's own copy of memory; with the pipe ends the arguments
    /// hold, which the worker keeps open. Turned into [`InitArgs::InTemplate`] at start.
    Moved(MoveInit, Vec<std::os::fd::RawFd>),
    /// Held by the pool's template, which forks every worker with them in memory (fork).
    InTemplate,
}

/// For a start method that moves arguments (fork): forks the pool's template, which holds the
/// initializer and its arguments and forks every worker (see `process::template`), and
/// returns it as the workers' start method. Other methods are returned as they are.
pub(crate) fn with_template(
    method: Arc<dyn StartMethod>,
    initializer: Option<Initializer>,
) -> Result<(Arc<dyn StartMethod>, Option<Initializer>)> {
    if !method.moves_arguments() {
        return Ok((method, initializer));
    }
    let (make, kept, task): (MoveInit, Vec<std::os::fd::RawFd>, _) = match initializer {
        Some(Initializer { task, args: InitArgs::Moved(make, kept) }) => (make, kept, Some(task)),
        Some(Initializer { args: InitArgs::Encoded { .. } | InitArgs::InTemplate, .. }) => {
            return Err(Error::new(
                ErrorKind::InvalidState,
                "a fork pool's initializer arguments must be moved, not encoded",
            ));
        }
        None => (Arc::new(|| Ok(Box::new(()) as State)), Vec::new(), None),
    };
    // Pipe and queue ends alive now that the initializer's arguments do not hold: a worker
    // must not keep them open.
    let close = crate::process::tracked::other_than(&kept);
    let template = Template::fork(move |channel: Channel| -> Infallible {
        sys::close_in_forked_child(&close);
        child::serve_template_worker(channel, || make())
    })?;
    let initializer = task.map(|task| Initializer { task, args: InitArgs::InTemplate });
    Ok((Arc::new(template), initializer))
}

/// What a pool was built with.
pub(crate) struct Config {
    pub(crate) method: Arc<dyn StartMethod>,
    pub(crate) processes: usize,
    pub(crate) initializer: Option<Initializer>,
    pub(crate) max_tasks_per_child: Option<u64>,
    pub(crate) task_timeout: Option<Duration>,
    /// What every worker sets up in itself, and the descriptors its streams take.
    pub(crate) setup: Option<wire::Setup>,
    /// Tracked: children forked for other purposes close them (a pipe's writer must not
    /// outlive the pool in one).
    pub(crate) setup_fds: Vec<crate::process::tracked::Tracked<std::os::fd::OwnedFd>>,
}

/// What the driver's poll saw.
#[derive(Debug, Default)]
struct Ready {
    /// Workers whose channel has something to read (or was closed).
    readable: Vec<u64>,
    /// Workers whose process has ended.
    exited: Vec<u64>,
}

/// A unit of work sent to one worker.
pub(crate) struct Batch {
    pub(crate) id: BatchId,
    pub(crate) task: &'static str,
    pub(crate) count: usize,
    pub(crate) args: Vec<u8>,
    /// Descriptors and blocks the arguments hold.
    pub(crate) attachments: Attachments,
    /// Where its outcome goes.
    slot: Arc<Slot>,
}

impl Batch {
    /// Bytes the batch puts into a worker's socket.
    fn size(&self) -> usize {
        self.args.len() + self.attachments.block_bytes()
    }
}

/// One worker process, as the parent sees it.
struct Worker {
    /// Its entry among the active children, while the pool holds it.
    _active: crate::process::active::Active,
    id: u64,
    label: String,
    child: Box<dyn ChildHandle>,
    channel: Channel,
    /// Duplicates of the channel and the pidfd, which the driver polls with the engine
    /// unlocked (a worker may be removed meanwhile; these stay open until the poll is done).
    watch: [Arc<OwnedFd>; 2],
    hello: bool,
    ready: bool,
    in_flight: VecDeque<Batch>,
    /// When the first batch in flight started running.
    head_started: Option<Instant>,
    /// How long its batches take, on average (recent ones weigh most); `None` before the
    /// first has finished.
    batch_time: Option<Duration>,
    items_sent: u64,
    /// Our sending side is shut: the worker exits once it has answered what it holds.
    retiring: bool,
    /// A send failed: the worker is gone or going; it gets nothing more.
    unusable: bool,
    eof: bool,
    timed_out: bool,
    /// Why the worker is being stopped, when it misbehaved or failed to initialize.
    failure: Option<Error>,
    status: Option<ExitStatus>,
    /// Where the worker holds back results (see `ring`), once it said `Ready`.
    ring: Option<Ring>,
    /// A result taken from the ring before it was due (a result before it, sent to the
    /// socket, has not been read yet), with the batch it answers (`None`: not an answer to a
    /// batch, handled at once).
    ring_next: Option<(Frame, Option<BatchId>)>,
    /// During a dispatch: how many batches it held before (those after are sent at its end),
    /// and whether it may get any.
    unsent: usize,
    open: bool,
}

impl Worker {
    fn start(config: &Config, id: u64) -> Result<Worker> {
        let name = format!("PoolWorker-{id}");
        let args_in_memory = matches!(
            config.initializer,
            Some(Initializer { args: InitArgs::Encoded { in_memory: true, .. }, .. })
        );
        let initializer = config.initializer.as_ref().map(|i| i.task.into());
        let ring = config.method.carries_descriptors();
        let setup = WorkerSetup { initializer, args_in_memory, ring };
        let start = start_message(
            "multiproc::pool::worker",
            &name,
            config.method.name(),
            true,
            Some(setup),
            config.setup.clone(),
        );
        let work = match config.initializer.as_ref().map(|i| &i.args) {
            Some(InitArgs::Encoded { bytes, attachments, .. }) => {
                let attachments = attachments
                    .try_clone()
                    .map_err(|e| Error::io("dup of an initializer argument's fd", e))?;
                Work::Sent(Arc::clone(bytes), attachments)
            }
            // No initializer, or one whose arguments the template holds.
            _ => Work::Sent(Arc::default(), Attachments::default()),
        };
        let setup_fds: Vec<_> = config.setup_fds.iter().map(|fd| fd.as_fd()).collect();
        let Launched { child, channel, active } =
            launch(&*config.method, &start, work, &setup_fds)?;
        let label = format!("pool worker {} ({})", child.pid(), config.method.name());
        let dup = |fd: std::os::fd::BorrowedFd<'_>| {
            fd.try_clone_to_owned()
                .map(Arc::new)
                .map_err(|e| Error::io(format!("dup for {label}"), e))
        };
        let watch = [dup(channel.as_fd())?, dup(child.pidfd())?];
        Ok(Worker {
            _active: active,
            id,
            label,
            child,
            channel,
            watch,
            hello: false,
            ready: false,
            in_flight: VecDeque::new(),
            head_started: None,
            batch_time: None,
            items_sent: 0,
            retiring: false,
            unusable: false,
            eof: false,
            timed_out: false,
            failure: None,
            status: None,
            ring: None,
            ring_next: None,
            unsent: 0,
            open: false,
        })
    }

    fn kill(&mut self, why: Error) {
        self.failure.get_or_insert(why);
        self.unusable = true;
        let _ = self.child.signal(libc::SIGKILL);
    }

    /// How many batches the worker may hold.
    fn depth(&self) -> usize {
        depth_for(self.batch_time)
    }

    /// Whether the worker is low enough on work to be given more (up to its depth): idle, or
    /// down to half its depth.
    fn wants_more(&self) -> bool {
        self.ready && !self.retiring && !self.unusable && self.in_flight.len() <= self.depth() / 2
    }

    /// Whether `batch` may be sent now, given `max_tasks` per worker.
    fn accepts(&self, batch: &Batch, max_tasks: Option<u64>) -> bool {
        if !self.ready || self.retiring || self.unusable {
            return false;
        }
        if max_tasks.is_some_and(|max| self.items_sent + batch.count as u64 > max) {
            return false;
        }
        match self.in_flight.len() {
            0 => true,
            n if n < self.depth() => {
                let held: usize = self.in_flight.iter().map(Batch::size).sum();
                held + batch.size() <= PIPELINE_BYTES
            }
            _ => false,
        }
    }

    /// Sends the batches in flight from the `first` on, in one write. If that fails, the
    /// worker is gone or going and gets nothing more; the batches it did not get whole are
    /// taken back and returned.
    fn send_from(&mut self, first: usize) -> Vec<Batch> {
        if first >= self.in_flight.len() {
            return Vec::new();
        }
        let sent = {
            let batches: Vec<&Batch> = self.in_flight.range(first..).collect();
            let heads = batches
                .iter()
                .map(|b| wire::head(&ToWorker::Batch { id: b.id, task: b.task.to_owned() }))
                .collect::<std::result::Result<Vec<_>, _>>();
            match heads {
                Ok(heads) => {
                    let fds: Vec<_> =
                        batches.iter().map(|b| b.attachments.borrowed_fds()).collect();
                    let bodies: Vec<[&[u8]; 2]> =
                        batches.iter().zip(&heads).map(|(b, head)| [&head[..], &b.args]).collect();
                    let frames: Vec<OutFrame<'_>> = batches
                        .iter()
                        .zip(&bodies)
                        .zip(&fds)
                        .map(|((b, body), fds)| OutFrame {
                            body,
                            fds,
                            blocks: &b.attachments.blocks,
                        })
                        .collect();
                    self.channel
                        .send_frames(&frames, None, Some(self.child.pidfd()))
                        .map_err(|(whole, e)| (whole, e.to_string()))
                }
                Err(e) => Err((0, e.to_string())),
            }
        };
        let Err((whole, error)) = sent else { return Vec::new() };
        tracing::debug!(worker = %self.label, %error, "pool send failed");
        self.unusable = true;
        let back: Vec<Batch> = self.in_flight.drain(first + whole..).collect();
        self.items_sent -= back.iter().map(|b| b.count as u64).sum::<u64>();
        if self.in_flight.is_empty() {
            self.head_started = None;
        }
        back
    }

    /// Reads the frames that have arrived, without blocking. With `drain`, reads until the
    /// socket has nothing more; without, stops once nothing is left buffered: the socket may
    /// hold more, but the driver's next poll (level-triggered) says so, and a receive that
    /// finds nothing is a syscall per worker per wake-up saved.
    fn pump(&mut self, results: &mut Results, drain: bool) {
        while !self.eof {
            match self.channel.try_recv() {
                Ok(Some(frame)) => {
                    // Results held in the ring before this one come first.
                    self.take_ring(results);
                    self.on_frame(frame, results);
                    if !drain && !self.channel.has_buffered_frame() {
                        break;
                    }
                }
                Ok(None) => break,
                // Cut short: the worker died while sending (its exit status tells how), which
                // is reported like any other death with a batch in flight.
                Err(FrameError::Disconnected | FrameError::Truncated { .. }) => self.eof = true,
                Err(e) => {
                    let why = format!("{} sent a bad frame: {e}", self.label);
                    self.eof = true;
                    self.kill(Error::new(ErrorKind::Protocol, why));
                }
            }
        }
        self.take_ring(results);
    }

    /// Takes the results the worker holds in its ring that are due: each once every result
    /// before it has been taken, wherever that one travelled (the socket or the ring), so that
    /// results are taken in the order of the batches.
    fn take_ring(&mut self, results: &mut Results) {
        loop {
            let Some(ring) = self.ring.as_mut() else { return };
            if self.ring_next.is_none() {
                match ring.pop() {
                    Ok(Some(body)) => {
                        // Decoded once here for its batch, not on every look while it waits.
                        let frame = Frame { body, ..Frame::default() };
                        let answers = match wire::decode::<ToParent>(&frame) {
                            Ok((
                                ToParent::BatchDone { id } | ToParent::BatchFailed { id, .. },
                                _,
                            )) => Some(id),
                            // Anything else is handled (as out of order, or undecodable) at once.
                            _ => None,
                        };
                        self.ring_next = Some((frame, answers));
                    }
                    Ok(None) => return,
                    Err(e) => {
                        self.ring = None;
                        let why = format!("{} left nonsense in its result ring: {e}", self.label);
                        return self.kill(Error::new(ErrorKind::Protocol, why));
                    }
                }
            }
            let front = self.in_flight.front().map(|batch| batch.id);
            if let Some((_, Some(id))) = &self.ring_next {
                if front != Some(*id) {
                    return;
                }
            }
            let (frame, _) = self.ring_next.take().expect("checked above");
            self.on_frame(frame, results);
        }
    }

    fn on_frame(&mut self, frame: Frame, results: &mut Results) {
        let (message, offset) = match wire::decode::<ToParent>(&frame) {
            Ok((message, payload)) => (message, frame.body.len() - payload.len()),
            Err(e) => {
                let why = format!("{} sent a message that did not decode: {e}", self.label);
                return self.kill(Error::new(ErrorKind::Protocol, why));
            }
        };
        match message {
            ToParent::Hello { version, fingerprint, .. } if !self.hello => {
                self.hello = true;
                if let Some(error) = check_hello(|| self.label.clone(), version, fingerprint) {
                    self.kill(error);
                }
            }
            ToParent::Ready if self.hello && !self.ready => {
                self.ready = true;
                if let Some(fd) = frame.fds.into_iter().next() {
                    match Ring::adopt(fd) {
                        Ok(ring) => self.ring = Some(ring),
                        Err(e) => {
                            let why =
                                format!("{} sent a result ring it cannot use: {e}", self.label);
                            self.kill(Error::new(ErrorKind::Protocol, why));
                        }
                    }
                }
            }
            ToParent::BatchDone { id } if self.in_flight.front().is_some_and(|b| b.id == id) => {
                self.finish_head(results, Ok((frame, offset)));
            }
            ToParent::BatchFailed { id, reason, message }
                if self.in_flight.front().is_some_and(|b| b.id == id) =>
            {
                let task = self.in_flight.front().map_or("", |b| b.task);
                let error = Error::new(
                    fail_kind(reason),
                    format!("pool task `{task}` could not run in {}: {message}", self.label),
                );
                self.finish_head(results, Err(error));
            }
            ToParent::Panicked(panic) if !self.ready => {
                let label = format!("pool initializer in {}", self.label);
                self.failure = Some(Error::child(label, ChildFailure::Panicked(panic), None));
            }
            ToParent::Failed { reason, message } if !self.ready => {
                self.failure = Some(Error::new(
                    fail_kind(reason),
                    format!("{} could not initialize: {message}", self.label),
                ));
            }
            other => {
                let why = format!("{} sent {other:?} out of order", self.label);
                self.kill(Error::new(ErrorKind::Protocol, why));
            }
        }
    }

    fn finish_head(&mut self, results: &mut Results, outcome: BatchOutcome) {
        if let Some(batch) = self.in_flight.pop_front() {
            results.finish(batch, outcome);
        }
        let now = Instant::now();
        if let Some(started) = self.head_started {
            // Results read in a burst make one long time and several short ones; the average
            // over them is what counts.
            let took = now - started;
            self.batch_time =
                Some(self.batch_time.map_or(took, |average| (average * 7 + took) / 8));
        }
        self.head_started = (!self.in_flight.is_empty()).then_some(now);
    }

    /// When the batch this worker runs must be done by, under `timeout` per item.
    fn deadline(&self, timeout: Option<Duration>) -> Option<Instant> {
        let (timeout, started, head) = (timeout?, self.head_started?, self.in_flight.front()?);
        (!self.timed_out).then(|| started + timeout * head.count.max(1) as u32)
    }
}

/// How many batches a worker whose batches take `batch_time` may hold: about
/// [`QUEUED_WORK`] of them, within `MIN_DEPTH..=MAX_DEPTH`; the least before any has finished.
fn depth_for(batch_time: Option<Duration>) -> usize {
    batch_time.map_or(MIN_DEPTH, |time| {
        let fits = QUEUED_WORK.as_nanos() / time.as_nanos().max(1);
        usize::try_from(fits).unwrap_or(MAX_DEPTH).clamp(MIN_DEPTH, MAX_DEPTH)
    })
}

/// How finished batches reach those who await them.
struct Results {
    /// How many slots someone awaits (shared with the handles, which count themselves in).
    awaiting: Arc<AtomicUsize>,
    /// With `Some`, wakers are collected here instead of woken at once: the progress thread
    /// wakes them once it has let go of the engine's lock, so that a woken task (or the
    /// futex syscall that wakes its runtime's thread) does not wait for or hold up the lock.
    deferred: Option<Vec<Waker>>,
}

impl Results {
    /// Fills `batch`'s slot. Its arguments go into the slot too, to be freed by the handle:
    /// freed here, memory the submitting thread allocated would go back across threads (a
    /// slow path of the allocator, measured: a tenth of the progress thread's time).
    fn finish(&mut self, batch: Batch, outcome: BatchOutcome) {
        let deferred = &mut self.deferred;
        batch.slot.fill(outcome, batch.args, &self.awaiting, |waker| match deferred {
            Some(deferred) => deferred.push(waker),
            None => waker.wake(),
        });
    }
}

/// The mutable state of a pool, behind one lock.
pub(crate) struct Engine {
    workers: Vec<Worker>,
    pending: VecDeque<Batch>,
    results: Results,
    next_worker: u64,
    closed: bool,
    terminated: bool,
    /// Why no worker can be started any more (an initializer failed, a start was refused):
    /// set once, so that a failing worker is never restarted in a loop.
    broken: Option<Error>,
    /// Someone holds the driver's turn: a waiting caller, or the progress thread.
    driving: bool,
    /// The progress thread holds the turn.
    thread_drives: bool,
    /// A caller wants the turn the progress thread holds: it gives it back at its next wake.
    handoff: bool,
    /// When the turn was last given back (the progress thread takes it after [`GRACE`]).
    turn_free_since: Instant,
    /// The progress thread sleeps until the turn is free: giving it back rings the bell.
    thread_waits: bool,
    /// The pool is being dropped: the progress thread ends.
    stopping: bool,
    /// Callers asleep on the condition while another drives: without any, waking them is
    /// skipped (a futex syscall on every turn of the driver, measured, for nobody).
    sleepers: usize,
    /// Whether whoever drives the pool (a caller or the progress thread) polls its workers a
    /// moment before it sleeps in poll (see `transport::spin`): a worker that answers within
    /// microseconds is then heard without a wake-up. Taken out while the driver polls.
    spin: Spin,
}

impl Engine {
    /// Each worker's id with the duplicates of its channel and pidfd that a poll watches.
    fn watched(&self) -> Vec<(u64, [Arc<OwnedFd>; 2])> {
        self.workers.iter().map(|w| (w.id, w.watch.clone())).collect()
    }

    fn start_worker(&mut self, config: &Config) -> Result<()> {
        self.next_worker += 1;
        let worker = Worker::start(config, self.next_worker)?;
        tracing::debug!(worker = %worker.label, "pool worker started");
        self.workers.push(worker);
        Ok(())
    }

    /// Everything that can be done without blocking: read results, notice ended and
    /// overdue workers, replace them, send queued batches, let idle workers go.
    fn service(&mut self, config: &Config, ready: &Ready) {
        // The clock is read only for a per-item timeout (a clock read is measurable per turn).
        let now = config.task_timeout.map(|_| Instant::now());
        for worker in &mut self.workers {
            let exited = ready.exited.contains(&worker.id);
            if exited || ready.readable.contains(&worker.id) {
                worker.pump(&mut self.results, exited);
            } else {
                // Held results may be due without the worker having written to its socket.
                worker.take_ring(&mut self.results);
            }
            if worker.deadline(config.task_timeout).zip(now).is_some_and(|(due, now)| now >= due) {
                worker.timed_out = true;
                let _ = worker.child.signal(libc::SIGKILL);
            }
            if worker.status.is_none() && (worker.eof || exited) {
                // The process has ended or is ending (its channel is closed): its status
                // follows at once (or from the forkserver, which is reaping it).
                worker.status = worker.child.wait_deadline(None).ok().flatten();
                worker.pump(&mut self.results, true);
                if worker.status.is_none() {
                    worker.status = Some(ExitStatus::Unknown);
                }
            }
        }
        if self.workers.iter().any(|w| w.status.is_some()) {
            let (ended, alive): (Vec<Worker>, Vec<Worker>) =
                std::mem::take(&mut self.workers).into_iter().partition(|w| w.status.is_some());
            self.workers = alive;
            for worker in ended {
                self.bury(worker, config);
            }
        }
        self.replenish(config);
        self.dispatch(config);
        self.retire_idle(config);
        if self.workers.is_empty() {
            self.fail_pending(|| None);
        }
    }

    /// Accounts for a worker that ended: the batch it ran fails with how it ended, the batch
    /// queued behind it (never started) goes back to the queue.
    fn bury(&mut self, mut worker: Worker, config: &Config) {
        let status = worker.status.unwrap_or(ExitStatus::Unknown);
        tracing::debug!(worker = %worker.label, %status, "pool worker ended");
        let mut held = std::mem::take(&mut worker.in_flight).into_iter();
        if let Some(head) = held.next() {
            let error = if self.terminated {
                cancelled()
            } else if worker.timed_out {
                let limit = config.task_timeout.unwrap_or_default();
                Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "pool task `{}` ran past its limit of {limit:?} per item in {}; the \
                         worker was killed and replaced",
                        head.task, worker.label
                    ),
                )
                .with_exit_status(Some(status))
            } else if let Some(failure) = worker.failure.take() {
                failure.with_exit_status(Some(status))
            } else {
                Error::child(
                    format!("pool task `{}` in {}", head.task, worker.label),
                    ChildFailure::Exited(status),
                    Some(status),
                )
            };
            self.results.finish(head, Err(error));
        }
        for batch in held.rev() {
            self.pending.push_front(batch);
        }
        if !worker.ready && !self.terminated && self.broken.is_none() {
            let error = worker.failure.take().unwrap_or_else(|| {
                Error::new(
                    ErrorKind::StartFailed,
                    format!("{} ended before it was ready: {status}", worker.label),
                )
            });
            self.broken = Some(error.with_exit_status(Some(status)));
        }
    }

    /// Starts workers until the pool has its size again, unless it is finishing or broken.
    fn replenish(&mut self, config: &Config) {
        if self.terminated || self.broken.is_some() || (self.closed && self.pending.is_empty()) {
            return;
        }
        let serving = self.workers.iter().filter(|w| !w.retiring && !w.unusable).count();
        for _ in serving..config.processes {
            if let Err(error) = self.start_worker(config) {
                self.broken = Some(error);
                return;
            }
        }
    }

    /// Sends queued batches to workers that can take them, the least busy first; what one
    /// worker gets goes in one write.
    fn dispatch(&mut self, config: &Config) {
        self.dispatch_to(config, false);
    }

    /// [`dispatch`](Self::dispatch), to idle workers only with `idle_only`: a submission while
    /// the progress thread drives leaves the busy workers' refills to it, which sends them in
    /// bulk when their results come in (one write for many batches, not one per submission).
    fn dispatch_to(&mut self, config: &Config, idle_only: bool) {
        while !self.pending.is_empty() {
            for worker in &mut self.workers {
                worker.unsent = worker.in_flight.len();
                worker.open = worker.wants_more() && (!idle_only || worker.in_flight.is_empty());
            }
            while let Some(batch) = self.pending.front() {
                let max = config.max_tasks_per_child;
                let Some(worker) = self
                    .workers
                    .iter_mut()
                    .filter(|w| w.open && w.accepts(batch, max))
                    .min_by_key(|w| w.in_flight.len())
                else {
                    break;
                };
                let batch = self.pending.pop_front().expect("front exists");
                worker.items_sent += batch.count as u64;
                worker.head_started.get_or_insert_with(Instant::now);
                worker.in_flight.push_back(batch);
            }
            let mut returned = false;
            for worker in &mut self.workers {
                // A worker that is gone or going gives back what it did not get, for another.
                for batch in worker.send_from(worker.unsent).into_iter().rev() {
                    self.pending.push_front(batch);
                    returned = true;
                }
            }
            if !returned {
                return;
            }
        }
    }

    /// Shuts the sending side of idle workers that have used up `max_tasks_per_child`, or
    /// that a closed pool no longer needs; they exit after answering what they hold.
    fn retire_idle(&mut self, config: &Config) {
        let finished = self.closed && self.pending.is_empty();
        let next = self.pending.front().map_or(0, |b| b.count as u64);
        for worker in &mut self.workers {
            if worker.retiring || !worker.ready || !worker.in_flight.is_empty() {
                continue;
            }
            let spent = config.max_tasks_per_child.is_some_and(|max| {
                worker.items_sent >= max || (next > 0 && worker.items_sent + next > max)
            });
            if spent || finished {
                worker.retiring = true;
                let _ = worker.channel.shutdown_write();
            }
        }
    }

    /// Fails every queued batch: with `error()`, or why the pool cannot run them.
    fn fail_pending(&mut self, error: impl Fn() -> Option<Error>) {
        while let Some(batch) = self.pending.pop_front() {
            let why = error()
                .or_else(|| self.broken.as_ref().map(Error::duplicate))
                .unwrap_or_else(|| {
                    Error::new(ErrorKind::Cancelled, "the pool has no worker left to run this task")
                });
            self.results.finish(batch, Err(why));
        }
    }

    /// When the driver must wake up at the latest: to kill an overdue worker, or to look in
    /// the result ring of a worker that may be holding results back (it holds only while it
    /// has a next batch in hand), so that a held result never waits for a slow batch run
    /// after it much longer than the worker's batches take on average (within [`RING_CHECK`]).
    fn next_deadline(&self, timeout: Option<Duration>) -> Option<Instant> {
        let ring_check = self
            .workers
            .iter()
            .filter(|w| w.ring.is_some() && w.in_flight.len() >= 2)
            .map(|w| w.batch_time.unwrap_or_default().clamp(*RING_CHECK.start(), *RING_CHECK.end()))
            .min()
            .map(|wait| Instant::now() + wait);
        self.workers.iter().filter_map(|w| w.deadline(timeout)).chain(ring_check).min()
    }
}

fn cancelled() -> Error {
    Error::new(ErrorKind::Cancelled, "the pool was terminated before this task finished")
}

/// A pool's engine with its lock, the condition its waiters sleep on, and the socket that
/// wakes its driver.
pub(crate) struct Shared {
    pub(crate) config: Config,
    engine: Mutex<Engine>,
    changed: Condvar,
    wake: [UnixStream; 2],
    /// What the progress thread sleeps on while it does not drive (rung when it may take the
    /// turn).
    bell: AtomicU32,
    /// Batches submitted while the progress thread was busy with the engine: the submitter
    /// does not wait for the engine's lock, the driver moves them to the queue at its next
    /// service.
    inbox: Mutex<Vec<Batch>>,
    /// The inbox may hold batches (set after a push, cleared by whoever empties it).
    inbox_used: AtomicBool,
    /// The last batch number given out.
    next_batch: AtomicU64,
    /// Mirrors of the engine's `thread_drives` and `closed`, read without its lock.
    thread_drives: AtomicBool,
    closed: AtomicBool,
    /// A submission has woken the driver, which has not serviced the pool since.
    wake_pending: AtomicBool,
    /// How many slots someone awaits (the engine's `Results` holds it too).
    awaiting: Arc<AtomicUsize>,
}

impl Shared {
    /// Starts `config.processes` workers, writes their initializer's arguments (`fill`, which
    /// they read as it goes), and waits until each has run its initializer.
    pub(crate) fn start(config: Config, fill: Option<Fill>) -> Result<Arc<Shared>> {
        let wake = UnixStream::pair().map_err(|e| Error::io("socketpair for the pool", e))?;
        for end in [&wake.0, &wake.1] {
            end.set_nonblocking(true).map_err(|e| Error::io("pool wake socket", e))?;
        }
        let awaiting = Arc::new(AtomicUsize::new(0));
        let engine = Engine {
            workers: Vec::new(),
            pending: VecDeque::new(),
            results: Results { awaiting: Arc::clone(&awaiting), deferred: None },
            next_worker: 0,
            closed: false,
            terminated: false,
            broken: None,
            driving: false,
            thread_drives: false,
            handoff: false,
            turn_free_since: Instant::now(),
            thread_waits: false,
            stopping: false,
            sleepers: 0,
            spin: Spin::default(),
        };
        let shared = Arc::new(Shared {
            config,
            engine: Mutex::new(engine),
            changed: Condvar::new(),
            wake: [wake.0, wake.1],
            bell: AtomicU32::new(0),
            inbox: Mutex::new(Vec::new()),
            inbox_used: AtomicBool::new(false),
            next_batch: AtomicU64::new(0),
            thread_drives: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            wake_pending: AtomicBool::new(false),
            awaiting,
        });
        let started = {
            let mut engine = shared.lock();
            (0..shared.config.processes).try_for_each(|_| engine.start_worker(&shared.config))
        };
        let outcome = started.and_then(|()| {
            if let Some(fill) = fill {
                // A panic (in a `Serialize` impl) must not leave the workers behind; the
                // writer it drops tells them their arguments are not coming.
                let filled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(fill));
                let filled = filled.unwrap_or_else(|panic| {
                    shared.terminate();
                    std::panic::resume_unwind(panic)
                });
                filled?;
            }
            shared.drive_until(None, |e| e.broken.is_some() || e.workers.iter().all(|w| w.ready));
            match shared.lock().broken.as_ref() {
                Some(error) => Err(error.duplicate()),
                None => Ok(()),
            }
        });
        match outcome {
            Ok(()) => Ok(shared),
            Err(error) => {
                shared.terminate();
                Err(error)
            }
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues batches of `task`; each item of `batches` is `(item count, encoded Vec, the
    /// descriptors it holds)`. Returns where each batch's outcome will be.
    pub(crate) fn submit(
        &self,
        task: &'static str,
        batches: Vec<Encoded>,
    ) -> Result<Vec<Arc<Slot>>> {
        self.refuse_descriptors(task, &batches)?;
        let batches: Vec<Batch> = batches.into_iter().map(|e| self.number(task, e)).collect();
        let slots = batches.iter().map(|b| Arc::clone(&b.slot)).collect();
        let count = batches.len();
        self.enqueue(batches, count)?;
        Ok(slots)
    }

    /// [`submit`](Self::submit) of one batch, with nothing to allocate beside it.
    pub(crate) fn submit_one(&self, task: &'static str, batch: Encoded) -> Result<Arc<Slot>> {
        self.refuse_descriptors(task, std::slice::from_ref(&batch))?;
        let batch = self.number(task, batch);
        let slot = Arc::clone(&batch.slot);
        self.enqueue(std::iter::once(batch), 1)?;
        Ok(slot)
    }

    /// Refuses batches whose arguments hold descriptors the pool's workers cannot be sent.
    fn refuse_descriptors(&self, task: &str, batches: &[Encoded]) -> Result<()> {
        let method = &*self.config.method;
        batches.iter().try_for_each(|(_, _, attachments)| {
            let what = format!("arguments of pool task `{task}`");
            crate::process::method::refuse_descriptors(method, &what, attachments)
        })
    }

    /// A batch with the next number and an empty slot.
    fn number(&self, task: &'static str, (count, args, attachments): Encoded) -> Batch {
        let id = self.next_batch.fetch_add(1, SeqCst) + 1;
        Batch { id, task, count, args, attachments, slot: Arc::default() }
    }

    /// Queues `count` batches (or refuses them, once the pool is closed) and sends what can
    /// go at once.
    fn enqueue(&self, batches: impl IntoIterator<Item = Batch>, count: usize) -> Result<()> {
        let closed = |engine: &Engine| {
            Error::new(
                ErrorKind::InvalidState,
                if engine.terminated { "the pool was terminated" } else { "the pool is closed" },
            )
        };
        if self.closed.load(SeqCst) {
            return Err(closed(&self.lock()));
        }
        // While the progress thread drives and holds the engine, a submission does not wait
        // for it: the batches go to the inbox, which the thread empties at its next service.
        let mut engine = match self.engine.try_lock() {
            Ok(engine) => engine,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) if self.thread_drives.load(SeqCst) => {
                let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
                inbox.extend(batches);
                self.inbox_used.store(true, SeqCst);
                drop(inbox);
                self.wake_once();
                return Ok(());
            }
            Err(std::sync::TryLockError::WouldBlock) => self.lock(),
        };
        if engine.closed {
            return Err(closed(&engine));
        }
        self.take_inbox(&mut engine);
        engine.pending.extend(batches);
        // While the progress thread drives, work is sent at once only to a pool with nothing
        // in flight (a lone request: no hop through the thread); in a burst, the thread sends
        // what piles up in bulk, one write per worker for many batches.
        let idle_only = engine.thread_drives;
        let quiet =
            engine.pending.len() == count && engine.workers.iter().all(|w| w.in_flight.is_empty());
        if !idle_only || quiet {
            engine.dispatch_to(&self.config, idle_only);
        }
        if engine.workers.is_empty() {
            engine.fail_pending(|| None);
        }
        if engine.driving {
            self.wake_once();
        }
        Ok(())
    }

    /// Wakes the driver so that it looks again (new deadlines, queued work), once however
    /// many submissions come before it does.
    fn wake_once(&self) {
        if !self.wake_pending.swap(true, SeqCst) {
            self.wake_driver();
        }
    }

    /// Moves what was submitted to the inbox to the queue, behind what was queued before.
    fn take_inbox(&self, engine: &mut Engine) {
        if self.inbox_used.swap(false, SeqCst) {
            let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
            engine.pending.extend(inbox.drain(..));
        }
    }

    /// [`Engine::service`], with the inbox emptied first.
    fn service(&self, engine: &mut Engine, ready: &Ready) {
        self.take_inbox(engine);
        engine.service(&self.config, ready);
    }

    /// Forgets batches whose handle went away: queued ones are dropped, running ones' results
    /// are thrown away when they arrive.
    pub(crate) fn abandon<'a>(&self, slots: impl IntoIterator<Item = &'a Arc<Slot>>) {
        let mut unfinished =
            slots.into_iter().filter(|slot| !slot.abandon(&self.awaiting)).peekable();
        if unfinished.peek().is_none() {
            return;
        }
        let mut engine = self.lock();
        self.take_inbox(&mut engine);
        for slot in unfinished {
            engine.pending.retain(|b| !Arc::ptr_eq(&b.slot, slot));
        }
    }

    /// Drives the pool until `done` holds, or `deadline` passes (then false). A deadline that
    /// has passed still looks at the workers once, without blocking, before it says false.
    pub(crate) fn drive_until(
        &self,
        deadline: Option<Instant>,
        mut done: impl FnMut(&mut Engine) -> bool,
    ) -> bool {
        let mut engine = self.lock();
        let mut looked = false;
        loop {
            if done(&mut engine) {
                return true;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                if looked {
                    return false;
                }
                looked = true;
                self.look_locked(&mut engine);
                continue;
            }
            if engine.driving {
                if engine.thread_drives && !engine.handoff {
                    // The progress thread gives the turn back at its next wake-up: a waiting
                    // caller drives itself, one wake-up less per result.
                    engine.handoff = true;
                    self.wake_driver();
                }
                engine.sleepers += 1;
                engine = match deadline {
                    Some(d) => match self.changed.wait_timeout(engine, d - now) {
                        Ok((guard, _)) => guard,
                        Err(poisoned) => poisoned.into_inner().0,
                    },
                    None => self.changed.wait(engine).unwrap_or_else(|p| p.into_inner()),
                };
                engine.sleepers -= 1;
                if engine.sleepers == 0 && !engine.driving && engine.thread_waits {
                    // The progress thread waits for the turn to be free with nobody waiting
                    // for it: this caller may leave without driving.
                    engine.thread_waits = false;
                    self.ring();
                }
                continue;
            }
            engine.driving = true;
            // Nothing to read before the poll: what has arrived makes the poll return at once.
            self.service(&mut engine, &Ready::default());
            if done(&mut engine) {
                self.give_back_turn(&mut engine);
                return true;
            }
            let watched = engine.watched();
            let wake_at = match (deadline, engine.next_deadline(self.config.task_timeout)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let mut state = std::mem::take(&mut engine.spin);
            drop(engine);
            let mut set = self.poll_set(&watched, true);
            spin_then_poll(&mut state, &mut set, wake_at);
            let ready = self.poll_result(&set, &watched, true);
            drop(set);
            engine = self.lock();
            engine.spin = state;
            self.wake_pending.store(false, SeqCst);
            self.service(&mut engine, &ready);
            self.give_back_turn(&mut engine);
        }
    }

    /// Ends a caller's turn as driver: wakes the callers waiting, and the progress thread if it
    /// waits for the turn.
    fn give_back_turn(&self, engine: &mut Engine) {
        engine.driving = false;
        engine.turn_free_since = Instant::now();
        self.wake_sleepers(engine);
        if engine.thread_waits {
            engine.thread_waits = false;
            self.ring();
        }
    }

    /// Does what can be done without blocking: reads what the workers sent, notices those that
    /// ended, replaces them, sends queued work. Whoever holds the turn meanwhile is not
    /// disturbed (its next poll sees what is left, if anything).
    fn look_locked(&self, engine: &mut Engine) {
        let watched = engine.watched();
        let mut set = self.poll_set(&watched, false);
        let _ = sys::poll(&mut set, Some(Instant::now()));
        let ready = self.poll_result(&set, &watched, false);
        drop(set);
        self.service(engine, &ready);
        self.wake_sleepers(engine);
    }

    /// The engine, after a look at the workers ([`look_locked`](Self::look_locked)).
    pub(crate) fn look(&self) -> MutexGuard<'_, Engine> {
        let mut engine = self.lock();
        self.look_locked(&mut engine);
        engine
    }

    /// The progress thread: drives the pool whenever no caller does, so that results arrive,
    /// ended workers are reaped and replaced, and queued work moves with nobody waiting.
    ///
    /// It takes the turn once it has been free for [`GRACE`] (a caller that waits again soon,
    /// as one calling `apply` in a loop does, keeps driving itself), or at once while futures
    /// await results. It gives the turn back when a caller asks for it. Its blocking calls
    /// run idle (see `runtime::threads`), so that a fork of the program may happen meanwhile.
    ///
    /// `me` is the thread's registration, made by whoever spawned it before it did, so that a
    /// fork from that moment on already waits for the new thread.
    pub(crate) fn progress(&self, me: LibraryThread) {
        let mut engine = self.lock();
        loop {
            if engine.stopping {
                return;
            }
            // Read before the count: a handle that starts awaiting after this rings the bell
            // (see `awaited`), which the wait below then does not sleep through.
            let seen = self.bell.load(SeqCst);
            let urgent = self.awaiting.load(SeqCst) > 0;
            let free_since = engine.turn_free_since;
            if !engine.driving && engine.sleepers == 0 && (urgent || free_since.elapsed() >= GRACE)
            {
                engine = self.drive_as_thread(engine, &me);
                continue;
            }
            let until = if engine.driving || engine.sleepers > 0 {
                engine.thread_waits = true;
                None
            } else {
                Some(free_since + GRACE)
            };
            drop(engine);
            let _ = me.idle(|| sys::futex_wait(&self.bell, seen, until));
            engine = self.lock();
            engine.thread_waits = false;
        }
    }

    /// The progress thread's turn as driver, until a caller asks for it or the pool stops.
    fn drive_as_thread<'a>(
        &'a self,
        mut engine: MutexGuard<'a, Engine>,
        me: &LibraryThread,
    ) -> MutexGuard<'a, Engine> {
        engine.driving = true;
        engine.thread_drives = true;
        self.thread_drives.store(true, SeqCst);
        let mut ready = Ready::default();
        // Kept from round to round, so that its room is allocated once.
        let mut woken = Vec::new();
        loop {
            engine.results.deferred = Some(woken);
            self.service(&mut engine, &ready);
            woken = engine.results.deferred.take().unwrap_or_default();
            self.wake_sleepers(&engine);
            if engine.handoff || engine.stopping {
                drop(engine);
                woken.drain(..).for_each(Waker::wake);
                engine = self.lock();
                break;
            }
            let watched = engine.watched();
            let wake_at = engine.next_deadline(self.config.task_timeout);
            let mut state = std::mem::take(&mut engine.spin);
            drop(engine);
            woken.drain(..).for_each(Waker::wake);
            // Prepared before, read after: nothing between allocates or takes a lock.
            let mut set = self.poll_set(&watched, true);
            me.idle(|| spin_then_poll(&mut state, &mut set, wake_at));
            ready = self.poll_result(&set, &watched, true);
            drop(set);
            engine = self.lock();
            engine.spin = state;
            self.wake_pending.store(false, SeqCst);
        }
        // What came in meanwhile is queued before the turn is given back.
        self.take_inbox(&mut engine);
        engine.driving = false;
        engine.thread_drives = false;
        self.thread_drives.store(false, SeqCst);
        engine.handoff = false;
        engine.turn_free_since = Instant::now();
        // The caller that asked for the turn is among them.
        self.changed.notify_all();
        engine
    }

    /// Has `waker` woken when `slot` is filled, and the progress thread drive meanwhile (it
    /// takes the turn at once if it is free; a waiting caller, if any, drives meanwhile).
    /// False if the slot is filled already.
    pub(crate) fn notify(&self, slot: &Slot, waker: &Waker) -> bool {
        match slot.notify(waker, &self.awaiting) {
            None => false,
            Some(first) => {
                // The thread looks at the count whenever it decides whether to drive: only
                // the first of the awaited needs to tell it.
                if first {
                    self.ring();
                }
                true
            }
        }
    }

    /// Rings the progress thread's bell.
    fn ring(&self) {
        self.bell.fetch_add(1, SeqCst);
        sys::futex_wake(&self.bell, 1);
    }

    /// Ends the progress thread (the pool is being dropped).
    pub(crate) fn stop_progress(&self) {
        let mut engine = self.lock();
        engine.stopping = true;
        self.ring();
        if engine.thread_drives {
            self.wake_driver();
        }
    }

    /// The poll set: the wake socket (with `wake`), then each watched worker's channel and
    /// pidfd.
    fn poll_set<'a>(
        &'a self,
        watched: &'a [(u64, [Arc<OwnedFd>; 2])],
        wake: bool,
    ) -> Vec<PollFd<'a>> {
        let mut set: Vec<PollFd<'_>> = Vec::with_capacity(watched.len() * 2 + 1);
        if wake {
            set.push(PollFd::new(self.wake[1].as_fd(), POLLIN));
        }
        for (_, [channel, pidfd]) in watched {
            set.push(PollFd::new(channel.as_fd(), POLLIN));
            set.push(PollFd::new(pidfd.as_fd(), POLLIN));
        }
        set
    }

    /// What a poll of [`poll_set`](Self::poll_set) saw: the workers with something to read and
    /// those whose process has ended. Empties the wake socket if it was polled and rang.
    fn poll_result(
        &self,
        set: &[PollFd<'_>],
        watched: &[(u64, [Arc<OwnedFd>; 2])],
        wake: bool,
    ) -> Ready {
        let first = usize::from(wake);
        if wake && set[0].revents() != 0 {
            let mut sink = [0u8; 64];
            while matches!((&self.wake[1]).read(&mut sink), Ok(n) if n > 0) {}
        }
        let ids = |offset: usize| {
            watched
                .iter()
                .enumerate()
                .filter(|(i, _)| set[first + offset + 2 * i].revents() != 0)
                .map(|(_, (id, _))| *id)
                .collect()
        };
        Ready { readable: ids(0), exited: ids(1) }
    }

    /// Wakes the callers asleep on the condition, if there are any. Called with the lock held,
    /// so no caller can be between counting itself and falling asleep.
    fn wake_sleepers(&self, engine: &Engine) {
        if engine.sleepers > 0 {
            self.changed.notify_all();
        }
    }

    fn wake_driver(&self) {
        let _ = (&self.wake[0]).write(&[1]);
    }

    /// The pids of the workers that serve the pool now (not those that are leaving), as of a
    /// look at them.
    pub(crate) fn pids(&self) -> Vec<u32> {
        let engine = self.look();
        engine.workers.iter().filter(|w| !w.retiring).map(|w| w.child.pid()).collect()
    }

    /// Accepts no more work; queued work still runs.
    pub(crate) fn close(&self) {
        let mut engine = self.lock();
        engine.closed = true;
        self.closed.store(true, SeqCst);
        self.take_inbox(&mut engine);
        engine.retire_idle(&self.config);
        if engine.driving {
            self.wake_driver();
        }
    }

    /// Waits until every worker has exited; the pool must be closed or terminated.
    pub(crate) fn join(&self) -> Result<()> {
        if !self.lock().closed {
            return Err(Error::new(
                ErrorKind::InvalidState,
                "join() on a running pool: call close() or terminate() first",
            ));
        }
        self.drive_until(None, |e| e.workers.is_empty());
        Ok(())
    }

    /// Fails all queued and running work as cancelled, kills every worker and reaps it.
    pub(crate) fn terminate(&self) {
        let mut engine = self.lock();
        engine.closed = true;
        self.closed.store(true, SeqCst);
        self.take_inbox(&mut engine);
        engine.terminated = true;
        engine.fail_pending(|| Some(cancelled()));
        for worker in &mut engine.workers {
            let _ = worker.child.signal(libc::SIGKILL);
        }
        let workers = std::mem::take(&mut engine.workers);
        for mut worker in workers {
            // Bounded: SIGKILL cannot be caught.
            worker.status = worker.child.wait_deadline(None).ok().flatten();
            engine.bury(worker, &self.config);
        }
        // Batches that were queued behind a killed worker's running one.
        engine.fail_pending(|| Some(cancelled()));
        self.wake_sleepers(&engine);
        if engine.driving {
            self.wake_driver();
        }
    }
}

/// Polls `set` without blocking for as long as `spin` allows (see `transport::spin`), then, if
/// nothing was ready, blocks until `wake_at`. Allocates nothing and takes no lock: the progress
/// thread runs it as idle.
fn spin_then_poll(spin: &mut Spin, set: &mut [PollFd<'_>], wake_at: Option<Instant>) {
    let spins = spin.now();
    let started = Instant::now();
    let mut look = || {
        Ok::<_, std::convert::Infallible>(
            (sys::poll(set, Some(Instant::now())).unwrap_or(0) > 0).then_some(()),
        )
    };
    if spins && matches!(spin::spin_for(spin, started, &mut look), Ok(Some(()))) {
        return;
    }
    let _ = sys::poll(set, wake_at);
    if spins {
        spin.waited(started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_batches_queue_deep_and_slow_ones_shallow() {
        let depth = |micros| depth_for(Some(Duration::from_micros(micros)));
        assert_eq!(depth_for(None), MIN_DEPTH, "unknown: as few as keep a worker busy");
        assert_eq!(depth(0), MAX_DEPTH);
        assert_eq!(depth(3), MAX_DEPTH);
        assert_eq!(depth(100), 10, "about a millisecond of work");
        assert_eq!(depth(1_000), MIN_DEPTH);
        assert_eq!(depth(10_000_000), MIN_DEPTH);
    }
}
