//! The start-method seam: the one trait every way of starting a child implements, and the
//! handle every started child is controlled through.
//!
//! `Process` (and everything built on it) is written once against `dyn StartMethod`. A start
//! method only has to do two things: create a process whose child runtime talks over the
//! channel it is given, and hand back a [`ChildHandle`] that can wait for and signal it.

use std::convert::Infallible;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use crate::error::Result;
use crate::process::status::ExitStatus;
use crate::sys::{self, POLLIN, PollFd};
use crate::transport::channel::Channel;

/// How the child gets its task.
pub enum Payload {
    /// The child reads a `Start` frame, with the encoded arguments, from its channel and looks
    /// the task up by name (spawn, forkserver).
    Sent,
    /// The child runs this closure in a forked copy of the caller, arguments moved in, never
    /// serialized (fork). The closure never returns: it ends the process.
    Moved(ChildMain),
}

/// The body of a forked child: takes the child's end of the channel and ends the process (its
/// return type has no values, as `!` is not yet stable in closure types).
pub type ChildMain = Box<dyn FnOnce(Channel) -> Infallible + Send>;

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Payload::Sent => f.write_str("Sent"),
            Payload::Moved(_) => f.write_str("Moved(..)"),
        }
    }
}

/// Everything a start method needs to start one child.
#[derive(Debug)]
pub struct StartRequest<'a> {
    /// The child's end of the bootstrap channel; the start method must close its copy.
    pub channel: OwnedFd,
    /// The parent's end, which a forked child must close in itself so that it cannot keep its
    /// own channel open.
    pub parent_end: BorrowedFd<'a>,
    /// How the child gets its task.
    pub payload: Payload,
}

/// Refuses `attachments` that hold descriptors when `method`'s channels cannot carry them
/// (`mpi`), before anything is sent.
pub(crate) fn refuse_descriptors(
    method: &dyn StartMethod,
    what: &str,
    attachments: &crate::transport::codec::Attachments,
) -> Result<()> {
    if method.carries_descriptors() || attachments.fds.is_empty() {
        return Ok(());
    }
    Err(crate::error::Error::new(
        crate::error::ErrorKind::Encode,
        format!(
            "{what} hold {} file descriptor(s) (an Fd, shared memory, a pipe, a lock), which \
             cannot cross to the machines of the `{}` context",
            attachments.fds.len(),
            method.name()
        ),
    ))
}

/// A way of starting child processes: fork, spawn, forkserver.
pub trait StartMethod: Send + Sync + fmt::Debug {
    /// The name `Context::new` maps to this method (`"fork"`, `"spawn"`, `"forkserver"`).
    fn name(&self) -> &'static str;

    /// Whether children get their arguments moved in memory ([`Payload::Moved`]) rather than
    /// sent over the channel ([`Payload::Sent`]).
    fn moves_arguments(&self) -> bool {
        false
    }

    /// Whether a child's channel carries file descriptors (and so shared memory, pipes and
    /// `Fd`s). A method whose children run on other machines (`mpi`) says no: a value holding
    /// one is refused when it is submitted, with an error naming the method.
    fn carries_descriptors(&self) -> bool {
        true
    }

    /// How many workers a pool of this method has when the caller does not say: `None` for
    /// [`cpu_count`](crate::cpu_count) of this machine (a method that starts its children on
    /// other machines counts theirs).
    fn default_processes(&self) -> Option<usize> {
        None
    }

    /// Starts one child whose runtime talks over `request.channel`.
    fn start(&self, request: StartRequest<'_>) -> Result<Box<dyn ChildHandle>>;
}

/// Control over one started child: wait for it, poll it, signal it.
pub trait ChildHandle: Send + fmt::Debug {
    /// The child's pid.
    fn pid(&self) -> u32;

    /// A descriptor that becomes readable when the child has ended.
    fn sentinel(&self) -> BorrowedFd<'_>;

    /// The child's pidfd: readable as soon as the process has ended, even before whoever
    /// reaps it has reported its status (the forkserver's children). Stable for the handle's
    /// life, unlike [`sentinel`](Self::sentinel), so it may be duplicated and watched.
    fn pidfd(&self) -> BorrowedFd<'_> {
        self.sentinel()
    }

    /// Whether another process reaps the child (the forkserver does its children), so that
    /// dropping this handle once the child has ended leaves no zombie of ours behind.
    fn reaped_elsewhere(&self) -> bool {
        false
    }

    /// The child's exit status if it has ended, reaping it; never blocks.
    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>>;

    /// Sends `signal` to the child; a child that already ended is not an error.
    fn signal(&self, signal: i32) -> io::Result<()>;

    /// Waits until the child has ended or `deadline` passes.
    fn wait_deadline(&mut self, deadline: Option<Instant>) -> io::Result<Option<ExitStatus>> {
        poll_until_ended(self, deadline)
    }

    /// A way to signal the child from any thread, apart from this handle
    /// ([`Process::signaller`](crate::Process::signaller)). By default a duplicate of its
    /// pidfd; a child on another machine (`mpi`) is signalled through whoever runs it there.
    fn signal_sender(&self) -> io::Result<SignalSender> {
        let pidfd = self.pidfd().try_clone_to_owned()?;
        Ok(Box::new(move |signal| signal_unless_ended(pidfd.as_fd(), None, signal)))
    }
}

/// Sends a signal to one child, from any thread ([`ChildHandle::signal_sender`]); a child that
/// has ended is not an error.
pub type SignalSender = Box<dyn Fn(i32) -> io::Result<()> + Send + Sync>;

/// [`ChildHandle::wait_deadline`] by polling the child's sentinel between tries to reap it.
fn poll_until_ended<C: ChildHandle + ?Sized>(
    child: &mut C,
    deadline: Option<Instant>,
) -> io::Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let mut set = [PollFd::new(child.sentinel(), POLLIN)];
        if sys::poll(&mut set, deadline)? == 0 {
            return Ok(None);
        }
    }
}

/// A child of the calling process itself (fork, spawn), controlled through its pidfd.
#[derive(Debug)]
pub struct DirectChild {
    pid: u32,
    pidfd: OwnedFd,
    status: Option<ExitStatus>,
}

impl DirectChild {
    /// Takes control of our own unreaped child `pid`.
    ///
    /// Opening the pidfd before the child is reaped is race-free: the pid cannot be reused
    /// while the child is a zombie of ours.
    pub fn new(pid: u32) -> io::Result<Self> {
        Ok(DirectChild { pid, pidfd: sys::pidfd_open(pid)?, status: None })
    }
}

impl ChildHandle for DirectChild {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn sentinel(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = sys::pidfd_wait(self.pidfd.as_fd(), false)?.map(ExitStatus::from);
        }
        Ok(self.status)
    }

    fn wait_deadline(&mut self, deadline: Option<Instant>) -> io::Result<Option<ExitStatus>> {
        if deadline.is_none() && self.status.is_none() {
            // Nothing else to watch: wait in waitid itself, not in a poll and a second waitid.
            self.status = sys::pidfd_wait(self.pidfd.as_fd(), true)?.map(ExitStatus::from);
        }
        match self.status {
            Some(status) => Ok(Some(status)),
            None => poll_until_ended(self, deadline),
        }
    }

    fn signal(&self, signal: i32) -> io::Result<()> {
        signal_unless_ended(self.pidfd.as_fd(), self.status, signal)
    }
}

/// Sends `signal` through `pidfd` unless the child is known to have ended (`status`); a child
/// that ended in the meantime (`ESRCH`) is not an error either.
pub fn signal_unless_ended(
    pidfd: BorrowedFd<'_>,
    status: Option<ExitStatus>,
    signal: i32,
) -> io::Result<()> {
    if status.is_some() {
        return Ok(());
    }
    match sys::pidfd_send_signal(pidfd, signal) {
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        other => other,
    }
}
