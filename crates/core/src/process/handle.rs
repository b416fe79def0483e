//! `Process`: one task in one child, started by any start method, with its return value and
//! every way it can fail reported on the call that waited for it.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{ChildFailure, Error, ErrorKind, RemotePanic, Result};
use crate::process::active::Active;
use crate::process::launch::{Launched, Work, check_hello, fail_kind, launch, start_message};
use crate::process::method::{ChildHandle, StartMethod};
use crate::process::setup::{ParentEnds, SetupBuilder, setup_methods};
use crate::process::status::ExitStatus;
use crate::runtime::child;
use crate::runtime::registry;
use crate::runtime::task::{Portable, Task};
use crate::sys::{self, POLLIN, PollFd};
use crate::transport::channel::{Channel, Frame, FrameError};
use crate::transport::codec;
use crate::transport::wire::{self, FailReason, ToParent};

/// Configures a child process before it starts: `ctx.process(task, args).name("x").start()`.
#[must_use = "a process does not start until `start()` is called"]
#[derive(Debug)]
pub struct ProcessBuilder<A, R> {
    method: Arc<dyn StartMethod>,
    task: Task<A, R>,
    args: A,
    name: Option<String>,
    daemon: bool,
    setup: SetupBuilder,
}

impl<A: Portable, R: Portable> ProcessBuilder<A, R> {
    /// A builder that will run `task(args)` in a child started by `method`.
    pub fn new(method: Arc<dyn StartMethod>, task: Task<A, R>, args: A) -> Self {
        ProcessBuilder { method, task, args, name: None, daemon: false, setup: Default::default() }
    }

    setup_methods!("the child");

    /// Names the process (Python's `name=`); the default is `Process-N`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Makes the process a daemon: it is killed when its handle is dropped while it runs, and
    /// it exits by itself within a second of its parent process dying.
    pub fn daemon(mut self, daemon: bool) -> Self {
        self.daemon = daemon;
        self
    }

    /// Starts the child.
    ///
    /// Fails here when the task's name is not uniquely registered, the arguments cannot be
    /// encoded, or the start method cannot create a process (fork refused in a multi-threaded
    /// program, exec failed). A child that dies before it runs the task is reported by `join`.
    pub fn start(self) -> Result<Process<R>> {
        reap_detached();
        registry::lookup(self.task.name())?;
        let name = self.name.unwrap_or_else(next_default_name);
        let mut resolved = self.setup.resolve()?;
        let start = start_message(
            self.task.name(),
            &name,
            self.method.name(),
            self.daemon,
            None,
            resolved.setup.clone(),
        );
        let work = if self.method.moves_arguments() {
            let func = self.task.func();
            let close = crate::process::tracked::to_close_in_child(&self.args);
            let args = self.args;
            let settings = start.clone();
            let setup_fds = std::mem::take(&mut resolved.fds);
            Work::Moved(Box::new(move |channel: Channel| -> Infallible {
                sys::close_in_forked_child(&close);
                child::run_moved(channel, settings, setup_fds, move || {
                    registry::encode_result(&func(&(), args))
                })
            }))
        } else {
            let (bytes, attachments) = codec::collecting(|| codec::encode(&self.args));
            let bytes = bytes.and_then(|bytes| {
                attachments.check_fits_one_message()?;
                Ok(bytes)
            });
            let bytes = bytes.map_err(|e| {
                Error::new(ErrorKind::Encode, format!("arguments of task `{}`: {e}", start.task))
            })?;
            let what = format!("arguments of task `{}`", start.task);
            crate::process::method::refuse_descriptors(&*self.method, &what, &attachments)?;
            Work::Sent(Arc::new(bytes), attachments)
        };
        let Launched { child, channel, active } =
            launch(&*self.method, &start, work, &resolved.borrowed_fds())?;
        // The child's ends of its pipes are closed here, so that the parent's read to the end.
        drop(resolved.fds);
        Ok(Process {
            pipes: resolved.pipes,
            active: Some(active),
            child: Some(child),
            channel,
            name,
            method: self.method.name(),
            daemon: self.daemon,
            hello: false,
            reading: true,
            reply: None,
            broken: None,
            cut_short: None,
            status: None,
            gone: false,
            result_taken: false,
            signalled: Arc::new(AtomicBool::new(false)),
            _result: PhantomData,
        })
    }
}

fn next_default_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    format!("Process-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// What a wait must establish before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// How the child ended: `join_timeout`, and everything that reports a status later.
    Status,
    /// Only that it ended and what it sent: `join`, which consumes the handle.
    End,
}

/// Sends signals to one child from anywhere ([`Process::signaller`]); the child's pidfd makes
/// it safe against pid reuse, and a child that has ended is not an error.
pub struct Signaller {
    pid: u32,
    send: crate::process::method::SignalSender,
    signalled: Arc<AtomicBool>,
}

impl std::fmt::Debug for Signaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signaller").field("pid", &self.pid).finish_non_exhaustive()
    }
}

impl Signaller {
    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends SIGKILL.
    pub fn kill(&self) -> Result<()> {
        self.signal(libc::SIGKILL)
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) -> Result<()> {
        self.signal(libc::SIGTERM)
    }

    /// Sends `signal`; its `Process` then reports an end by it as asked for, like one by
    /// [`Process::signal`].
    pub fn signal(&self, signal: i32) -> Result<()> {
        self.signalled.store(true, Ordering::Relaxed);
        (self.send)(signal)
            .map_err(|e| Error::io(format!("signal {signal} to process {}", self.pid), e))
    }
}

/// What the child sent after its hello.
#[derive(Debug)]
enum Reply {
    /// The encoded return value is `frame.body[offset..]`; the descriptors and blocks it
    /// holds came with it.
    Returned(Frame, usize),
    Panicked(RemotePanic),
    Failed(FailReason, String),
}

/// A running (or finished) child process that will return an `R`.
///
/// Dropping the handle of a child that still runs kills it if it is a daemon; otherwise the
/// child runs on, and is reaped by a later `start()` once it ends (as Python does).
#[derive(Debug)]
pub struct Process<R> {
    child: Option<Box<dyn ChildHandle>>,
    channel: Channel,
    name: String,
    method: &'static str,
    daemon: bool,
    hello: bool,
    reading: bool,
    reply: Option<Reply>,
    broken: Option<Error>,
    /// The channel ended inside a frame: the child died while sending (its status says how),
    /// or, if it exited cleanly, it wrote a frame it did not finish.
    cut_short: Option<FrameError>,
    status: Option<ExitStatus>,
    /// The process is known to have ended, its status not yet reported (see [`Need::End`]).
    gone: bool,
    result_taken: bool,
    /// We (or a [`Signaller`] of ours) sent the child a signal.
    signalled: Arc<AtomicBool>,
    /// The parent's ends of the child's piped streams, until taken.
    pipes: ParentEnds,
    /// Its entry among the active children (moved with the handle when it is detached).
    active: Option<Active>,
    _result: PhantomData<fn() -> R>,
}

impl<R: Portable> Process<R> {
    /// The writing end of the child's stdin, when it was made
    /// [`Stdio::piped`](crate::Stdio::piped) (taken: `None` the second time). Dropping it
    /// closes the child's stdin.
    pub fn stdin(&mut self) -> Option<crate::process::setup::ChildInput> {
        self.pipes.stdin.take()
    }

    /// The reading end of the child's stdout, when it was made
    /// [`Stdio::piped`](crate::Stdio::piped) (taken: `None` the second time). It reads to its
    /// end once the child has exited.
    pub fn stdout(&mut self) -> Option<crate::process::setup::ChildOutput> {
        self.pipes.stdout.take()
    }

    /// The reading end of the child's stderr, when it was made
    /// [`Stdio::piped`](crate::Stdio::piped) (taken).
    pub fn stderr(&mut self) -> Option<crate::process::setup::ChildOutput> {
        self.pipes.stderr.take()
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.handle().pid()
    }

    /// The process name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The start method that started it.
    pub fn start_method(&self) -> &'static str {
        self.method
    }

    /// Whether it is a daemon.
    pub fn is_daemon(&self) -> bool {
        self.daemon
    }

    /// Whether the child is still running (reaps it if it has ended).
    pub fn is_alive(&mut self) -> bool {
        self.poll_status().is_none()
    }

    /// How the child ended, or `None` while it runs.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.poll_status()
    }

    /// Python's `exitcode`: `None` while running, then the exit code, or `-N` for signal `N`.
    pub fn exitcode(&mut self) -> Option<i32> {
        self.poll_status().map(ExitStatus::exitcode)
    }

    /// A descriptor that becomes readable when the child ends (Python's `sentinel`); a pidfd
    /// where the start method has one.
    pub fn sentinel(&self) -> BorrowedFd<'_> {
        self.handle().sentinel()
    }

    /// Sends SIGTERM (Python's `terminate`).
    pub fn terminate(&mut self) -> Result<()> {
        self.signal(libc::SIGTERM)
    }

    /// Sends SIGKILL (Python's `kill`).
    pub fn kill(&mut self) -> Result<()> {
        self.signal(libc::SIGKILL)
    }

    /// Sends `signal` to the child; a child that already ended is not an error.
    pub fn signal(&mut self, signal: i32) -> Result<()> {
        self.signalled.store(true, Ordering::Relaxed);
        self.handle()
            .signal(signal)
            .map_err(|e| Error::io(format!("signal {signal} to {}", self.label()), e))
    }

    /// Waits for the child to end and returns what its task returned.
    ///
    /// A panic, an exit without a value, a kill by a signal, a failed handshake, and bytes that
    /// do not decode are all errors; [`Error::kind`] tells them apart and
    /// [`Error::exit_status`] says how the child ended.
    pub fn join(mut self) -> Result<R> {
        self.wait_until(None, Need::End)?;
        self.take_result()
    }

    /// Waits at most `timeout`; `Ok(None)` if the child is still running then.
    ///
    /// Once it has returned `Ok(Some(_))` or an error, the result is gone: a later `join` gives
    /// an [`ErrorKind::ResultTaken`] error.
    pub fn join_timeout(&mut self, timeout: Duration) -> Result<Option<R>> {
        if self.wait_until(Some(Instant::now() + timeout), Need::Status)? {
            self.take_result().map(Some)
        } else {
            Ok(None)
        }
    }

    /// A handle that can signal the child from elsewhere (another thread, or another task while
    /// this one awaits `join_async`, with the `tokio` feature), through a duplicate of its pidfd: it
    /// can never signal another process that reused the pid.
    pub fn signaller(&self) -> Result<Signaller> {
        let send = self
            .handle()
            .signal_sender()
            .map_err(|e| Error::io(format!("a signaller for {}", self.label()), e))?;
        Ok(Signaller { pid: self.pid(), send, signalled: Arc::clone(&self.signalled) })
    }

    /// [`join`](Self::join) as a future: waits for the child's result and its end through the
    /// tokio runtime's reactor (its pidfd and channel), with no thread blocked. Dropping the
    /// future drops the `Process`, as dropping it unjoined would.
    #[cfg(feature = "tokio")]
    pub async fn join_async(mut self) -> Result<R> {
        loop {
            if self.wait_until(Some(Instant::now()), Need::End)? {
                return self.take_result();
            }
            let mut fds = vec![self.handle().sentinel(), self.handle().pidfd()];
            if self.reading {
                fds.push(self.channel.as_fd());
            }
            let waited = crate::transport::reactor::readable(&fds).await;
            waited.map_err(|e| Error::io(format!("waiting for {}", self.label()), e))?;
        }
    }

    /// Whether we signalled the child and a signal is what ended it.
    fn ended_by_our_signal(&self) -> bool {
        self.signalled.load(Ordering::Relaxed) && self.status.is_some_and(|s| s.signal().is_some())
    }

    fn handle(&self) -> &dyn ChildHandle {
        self.child.as_deref().expect("the child handle lives until drop")
    }

    fn label(&self) -> String {
        format!("process {} ({}, {})", self.handle().pid(), self.name, self.method)
    }

    /// Non-blocking: reads what the child sent so far and reaps it if it ended.
    fn poll_status(&mut self) -> Option<ExitStatus> {
        let _ = self.wait_until(Some(Instant::now()), Need::Status);
        self.status
    }

    /// Reads replies and waits for the exit status until `deadline`; true once the child has
    /// ended and everything it sent has been read.
    ///
    /// With [`Need::End`], a child that returned a value and is reaped by another process (the
    /// forkserver's) counts as ended once it is gone: its status, which the value does not
    /// depend on, would take one more hop through that process.
    fn wait_until(&mut self, deadline: Option<Instant>, need: Need) -> Result<bool> {
        loop {
            self.pump();
            let returned = matches!(self.reply, Some(Reply::Returned(..)));
            if self.status.is_none()
                && need == Need::End
                && returned
                && !self.reading
                && self.handle().reaped_elsewhere()
            {
                let mut set = [PollFd::new(self.handle().pidfd(), POLLIN)];
                let gone = sys::poll(&mut set, deadline)
                    .map_err(|e| Error::io(format!("poll on {}", self.label()), e))?;
                self.gone = gone > 0;
                return Ok(self.gone);
            }
            if self.status.is_none() {
                // Everything read and no deadline: all that is left is the exit, and waiting
                // for it in waitid itself saves a poll and a second waitid.
                let block = !self.reading && deadline.is_none();
                let child = self.child.as_mut().expect("the child handle lives until drop");
                let waited = if block { child.wait_deadline(None) } else { child.try_wait() };
                self.status = match waited {
                    Ok(status) => status,
                    Err(e) => return Err(Error::io(format!("waitid on {}", self.label()), e)),
                };
                if let Some(status) = self.status {
                    let child = self.child.as_ref().expect("the child handle lives until drop");
                    tracing::debug!(pid = child.pid(), name = %self.name, %status, "process exited");
                    // Whatever the child wrote before it ended is in the socket now.
                    self.pump();
                }
            }
            if self.status.is_some() {
                return Ok(true);
            }
            let mut set = [
                PollFd::new(self.handle().sentinel(), POLLIN),
                PollFd::new(self.channel.as_fd(), POLLIN),
            ];
            let watched = if self.reading { 2 } else { 1 };
            let ready = sys::poll(&mut set[..watched], deadline)
                .map_err(|e| Error::io(format!("poll on {}", self.label()), e))?;
            if ready == 0 {
                return Ok(false);
            }
        }
    }

    /// Takes every complete frame the child has sent, without blocking.
    fn pump(&mut self) {
        while self.reading {
            match self.channel.try_recv() {
                Ok(Some(frame)) => self.on_frame(frame),
                Ok(None) => return,
                Err(FrameError::Disconnected) => self.reading = false,
                Err(e @ FrameError::Truncated { .. }) => {
                    self.cut_short = Some(e);
                    self.reading = false;
                }
                Err(e) => {
                    let label = self.label();
                    self.broken = Some(Error::new(
                        ErrorKind::Protocol,
                        format!("{label} sent a bad frame: {e}"),
                    ));
                    self.reading = false;
                }
            }
        }
    }

    fn on_frame(&mut self, frame: Frame) {
        // The label is made only for an error: a well-behaved child's frames cost no
        // formatting.
        let message = match wire::decode::<ToParent>(&frame) {
            Ok((message, payload)) => (message, frame.body.len() - payload.len()),
            Err(e) => {
                self.broken = Some(Error::new(
                    ErrorKind::Protocol,
                    format!("{} sent a message that did not decode: {e}", self.label()),
                ));
                self.reading = false;
                return;
            }
        };
        match message {
            (ToParent::Hello { version, fingerprint: theirs, .. }, _) if !self.hello => {
                self.hello = true;
                if let Some(error) = check_hello(|| self.label(), version, theirs) {
                    self.broken = Some(error);
                    self.reading = false;
                }
            }
            (ToParent::Returned, offset) if self.hello => {
                self.reply = Some(Reply::Returned(frame, offset));
                self.reading = false;
            }
            (ToParent::Panicked(panic), _) if self.hello => {
                self.reply = Some(Reply::Panicked(panic));
                self.reading = false;
            }
            (ToParent::Failed { reason, message }, _) if self.hello => {
                self.reply = Some(Reply::Failed(reason, message));
                self.reading = false;
            }
            (other, _) => {
                self.broken = Some(Error::new(
                    ErrorKind::Protocol,
                    format!("{} sent {other:?} out of order", self.label()),
                ));
                self.reading = false;
            }
        }
    }

    fn take_result(&mut self) -> Result<R> {
        // The label and the status's text are made only for an error: a result that decodes
        // costs no formatting.
        let status = self.status;
        if self.result_taken {
            return Err(Error::new(
                ErrorKind::ResultTaken,
                format!("the result of {} was already taken", self.label()),
            ));
        }
        self.result_taken = true;
        if let Some(error) = self.broken.take() {
            return Err(error.with_exit_status(status));
        }
        if let Some(cut) = self.cut_short.take() {
            let label = self.label();
            return Err(match status {
                // Killed, or crashed, in the middle of sending its result.
                Some(status) if !status.success() => {
                    Error::child(label, ChildFailure::Exited(status), Some(status))
                }
                _ => Error::new(ErrorKind::Protocol, format!("{label} sent a bad frame: {cut}"))
                    .with_exit_status(status),
            });
        }
        match self.reply.take() {
            Some(Reply::Returned(frame, offset)) => {
                let Frame { body, fds, blocks } = frame;
                let decode = || codec::decode::<R>(&body[offset..]);
                codec::with_attachments(fds, blocks, decode).map_err(|e| {
                    Error::new(
                        ErrorKind::Decode,
                        format!("{} returned bytes that did not decode: {e}", self.label()),
                    )
                    .with_exit_status(status)
                })
            }
            Some(Reply::Panicked(panic)) => {
                Err(Error::child(self.label(), ChildFailure::Panicked(panic), status))
            }
            Some(Reply::Failed(reason, message)) => Err(Error::new(
                fail_kind(reason),
                format!("{} could not run its task: {message}", self.label()),
            )
            .with_exit_status(status)),
            // A child we signalled ourselves ended as asked, even if it had not said hello yet.
            None if !self.hello && !self.ended_by_our_signal() => {
                let status_text =
                    status.map_or_else(|| "still running".to_owned(), |s| s.to_string());
                Err(Error::new(
                    ErrorKind::StartFailed,
                    format!("{} ended before the handshake: {status_text}", self.label()),
                )
                .with_exit_status(status))
            }
            None => match status {
                Some(status) => {
                    Err(Error::child(self.label(), ChildFailure::Exited(status), Some(status)))
                }
                None => Err(Error::new(
                    ErrorKind::Protocol,
                    format!("{} closed its channel without a result", self.label()),
                )),
            },
        }
    }
}

impl<R> Drop for Process<R> {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if self.status.is_some() || self.gone || matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        if self.daemon {
            // SIGKILL cannot be caught, so this wait is bounded by the kernel tearing the
            // process down.
            let _ = child.signal(libc::SIGKILL);
            let _ = child.wait_deadline(None);
        } else {
            detach(child, self.active.take());
        }
    }
}

/// Children whose handles were dropped while they ran, reaped by later starts.
static DETACHED: Mutex<Vec<Detached>> = Mutex::new(Vec::new());

/// A dropped child still running, with its entry among the active children.
type Detached = (Box<dyn ChildHandle>, Option<Active>);

/// Whether [`DETACHED`] may hold a child: every start asks, and reading this, unlike taking
/// the lock, writes nothing (a write is a copy-on-write fault after each fork).
static ANY_DETACHED: AtomicBool = AtomicBool::new(false);

fn detach(child: Box<dyn ChildHandle>, active: Option<Active>) {
    if let Ok(mut detached) = DETACHED.lock() {
        detached.push((child, active));
        ANY_DETACHED.store(true, Ordering::Release);
    }
}

/// Reaps detached children that have ended. A handle that cannot be waited on (as in a forked
/// child, where the copied handles name its siblings) is dropped.
fn reap_detached() {
    if !ANY_DETACHED.load(Ordering::Acquire) {
        return;
    }
    if let Ok(mut detached) = DETACHED.lock() {
        detached.retain_mut(|(child, _)| matches!(child.try_wait(), Ok(None)));
        ANY_DETACHED.store(!detached.is_empty(), Ordering::Release);
    }
}
