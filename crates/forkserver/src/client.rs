//! The client side: the `Forkserver` start method, the one server per process that every
//! context shares, and the handle of a child the server forked.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use multiproc_core::process::method::ChildHandle;
use multiproc_core::runtime::role::role_env_value;
use multiproc_core::runtime::{child, registry};
use multiproc_core::sys::{self, POLLIN, PollFd, SPAWN_CHANNEL_FD};
use multiproc_core::transport::channel::{self, Channel, FrameError};
use multiproc_core::transport::{codec, wire};
use multiproc_core::{
    ChildFailure, DirectChild, Error, ErrorKind, ExitStatus, Portable, RemotePanic, Result,
    StartMethod, StartRequest, Task,
};

use crate::protocol::{Reply, Request, VERSION, WireStatus};

/// The forkserver start method: children are forked by a single-threaded server process.
///
/// The server is started lazily, by exec of the current binary, on the first `start`; every
/// `Forkserver` in the process shares it, and a dead server is replaced on the next `start`.
/// It is reached only through an anonymous socketpair: there is no path or abstract name that
/// another process could connect to.
#[derive(Debug, Default, Clone, Copy)]
pub struct Forkserver;

/// The running server, owned by the process that launched it.
#[derive(Debug)]
struct Server {
    control: Channel,
    process: DirectChild,
    /// The pid that launched it: a forked copy of this process must not share the socket.
    owner: u32,
    /// The environment the last `Fork` request carried, which the server now has; `None`
    /// before the first.
    env_sent: Option<Vec<(OsString, OsString)>>,
}

static SERVER: Mutex<Option<Server>> = Mutex::new(None);

/// The preload every new server runs, and how it failed, if it did.
#[derive(Debug)]
struct Preload {
    task: &'static str,
    args: Vec<u8>,
    failure: Option<PreloadFailure>,
}

/// A failed preload, remembered so that every later start reports it instead of launching
/// server after server.
#[derive(Debug, Clone)]
struct PreloadFailure {
    panic: Option<RemotePanic>,
    message: String,
    status: Option<ExitStatus>,
}

impl PreloadFailure {
    fn error(&self, task: &str) -> Error {
        let label = format!("forkserver preload `{task}`");
        match &self.panic {
            Some(panic) => Error::child(label, ChildFailure::Panicked(panic.clone()), self.status),
            None => Error::new(ErrorKind::StartFailed, format!("{label} failed: {}", self.message))
                .with_exit_status(self.status),
        }
    }
}

/// Locked after [`SERVER`] where both are held.
static PRELOAD: Mutex<Option<Preload>> = Mutex::new(None);

/// Sets the task every forkserver of this process runs once, before its first fork (Python's
/// `set_forkserver_preload`): build a large index or load a model there, and every child the
/// server forks shares it copy-on-write; a child reads it with `multiproc::preloaded::<S>()`.
///
/// The arguments are encoded here. Must be called before this process's first forkserver
/// start: a running server cannot be given new state, so then this fails with
/// [`ErrorKind::InvalidState`]. If the task panics (or the server dies running it), the next
/// forkserver start fails with that panic, and so does every later one until a new preload is
/// set: the server is not relaunched in a loop.
pub fn set_preload<A: Portable, S: Send + Sync + 'static>(task: Task<A, S>, args: A) -> Result<()> {
    registry::lookup(task.name())?;
    let args = codec::encode(&args).map_err(|e| {
        Error::new(ErrorKind::Encode, format!("arguments of preload `{}`: {e}", task.name()))
    })?;
    let server = SERVER.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(running) = server.as_ref().filter(|s| s.owner == std::process::id()) {
        return Err(Error::new(
            ErrorKind::InvalidState,
            format!(
                "the forkserver is already running (pid {}); set its preload before the first \
                 forkserver start",
                running.process.pid()
            ),
        ));
    }
    let mut preload = PRELOAD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    *preload = Some(Preload { task: task.name(), args, failure: None });
    Ok(())
}

/// How long `start()` waits, by default, for the forkserver to answer a request.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(10);

/// The current wait, in milliseconds (see [`set_start_timeout`]).
static START_TIMEOUT_MS: AtomicU64 = AtomicU64::new(DEFAULT_START_TIMEOUT.as_millis() as u64);

/// Sets how long a forkserver `start()` waits for the server to answer that it forked the
/// child ([`DEFAULT_START_TIMEOUT`] unless set), for every context of this process.
///
/// A server that does not answer in time (stopped with SIGSTOP, or starved) is killed, so that
/// it cannot fork the child later, and the next start launches a new one. `start()` then says
/// whether the child exists: `StartFailed` if it was never forked, a `Process` if it was
/// (it says hello), and `ErrorKind::OutcomeUnknown` if it cannot tell within this same time.
/// The launch of a server and its preload are not part of this wait.
pub fn set_start_timeout(timeout: Duration) {
    let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).max(1);
    START_TIMEOUT_MS.store(ms, Ordering::Relaxed);
}

fn start_timeout() -> Duration {
    Duration::from_millis(START_TIMEOUT_MS.load(Ordering::Relaxed))
}

/// Kills the server with this pid, if it is still the current one, and forgets it: the next
/// start launches another.
fn kill_server(pid: u32) {
    let mut guard = SERVER.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(server) = guard.as_mut().filter(|s| s.owner == std::process::id()) {
        if server.process.pid() == pid {
            tracing::debug!(pid, "forkserver did not answer in time; killing it");
            let _ = server.process.signal(libc::SIGKILL);
            let _ = server.process.wait_deadline(None);
            *guard = None;
        }
    }
}

/// Finds out, once the server that was asked to fork is gone, whether it forked the child: the
/// child's channel is then held by nobody but the child, so its other end reads the child's
/// hello if the child exists and end-of-file if it never will.
fn resolve_after_server_died(
    parent_end: BorrowedFd<'_>,
    status: Channel,
    why: String,
) -> Result<Box<dyn ChildHandle>> {
    let deadline = Instant::now() + start_timeout();
    loop {
        match channel::peek_frame(parent_end, 4096) {
            Err(FrameError::Disconnected) => {
                return Err(Error::new(
                    ErrorKind::StartFailed,
                    format!("forkserver did not start the child: {why}"),
                ));
            }
            Ok(Some(frame)) => {
                if let Ok((wire::ToParent::Hello { pid, .. }, _)) =
                    wire::decode::<wire::ToParent>(&frame)
                {
                    // The child runs; the server that would report its status is gone, so its
                    // status will be `Unknown`, as for any child of a server that died.
                    let pidfd = sys::pidfd_open(pid)
                        .map_err(|e| Error::io(format!("pidfd_open for served child {pid}"), e))?;
                    tracing::debug!(pid, "the forkserver died after forking; the child runs");
                    return Ok(Box::new(ServedChild {
                        pid,
                        pidfd,
                        status_channel: status,
                        status: None,
                    }));
                }
                return Err(Error::new(
                    ErrorKind::Protocol,
                    "a served child's first frame is not its hello",
                ));
            }
            Ok(None) => {}
            Err(e) => {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    format!("a served child's channel after the server died: {e}"),
                ));
            }
        }
        let mut set = [PollFd::new(parent_end, POLLIN)];
        let ready = sys::poll(&mut set, Some(deadline))
            .map_err(|e| Error::io("waiting for a served child's hello", e))?;
        if ready == 0 {
            return Err(Error::new(
                ErrorKind::OutcomeUnknown,
                format!(
                    "forkserver: {why}; whether it forked the child is unknown (no hello and no \
                     end-of-file on the child's channel within {:?}): the task may be running",
                    start_timeout()
                ),
            ));
        }
    }
}

/// The pid of this process's forkserver, if one is running.
pub fn server_pid() -> Option<u32> {
    let guard = SERVER.lock().ok()?;
    guard.as_ref().filter(|s| s.owner == std::process::id()).map(|s| s.process.pid())
}

impl Server {
    fn launch() -> Result<Server> {
        if let Some(Preload { task, failure: Some(failure), .. }) =
            &*PRELOAD.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
        {
            return Err(failure.error(task));
        }
        let (ours, theirs) =
            Channel::pair().map_err(|e| Error::io("socketpair for the forkserver", e))?;
        let argv = multiproc_spawn::own_argv().map_err(|e| Error::io("reading argv", e))?;
        let envp =
            multiproc_spawn::child_environment(&role_env_value("forkserver", SPAWN_CHANNEL_FD))
                .map_err(|e| Error::io("building the forkserver environment", e))?;
        let pid = sys::spawn_self(&argv, &envp, theirs.as_fd()).map_err(|e| {
            Error::new(ErrorKind::StartFailed, format!("forkserver exec failed: {e}"))
        })?;
        drop(theirs);
        let mut process =
            DirectChild::new(pid).map_err(|e| Error::io(format!("pidfd_open({pid})"), e))?;
        let mut control = ours;
        let hello = control.recv(None, Some(process.sentinel())).map_err(|e| {
            let status = process.wait_deadline(None).ok().flatten();
            Error::new(
                ErrorKind::StartFailed,
                format!("forkserver {pid} ended before its handshake: {e}"),
            )
            .with_exit_status(status)
        })?;
        match wire::decode::<Reply>(&hello) {
            Ok((Reply::Hello { version, fingerprint }, _))
                if version == VERSION && fingerprint == child::fingerprint() => {}
            other => {
                let _ = process.signal(libc::SIGKILL);
                let _ = process.wait_deadline(None);
                return Err(Error::new(
                    ErrorKind::StartFailed,
                    format!(
                        "forkserver handshake failed: got {other:?}, expected version {VERSION}"
                    ),
                ));
            }
        }
        let mut server = Server { control, process, owner: std::process::id(), env_sent: None };
        server.preload()?;
        tracing::debug!(pid, "forkserver started");
        Ok(server)
    }

    /// Has the new server run the preload, if one is set; a failure is remembered.
    fn preload(&mut self) -> Result<()> {
        let mut guard = PRELOAD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(preload) = guard.as_mut() else { return Ok(()) };
        let request = Request::Preload { task: preload.task.to_owned() };
        let sentinel = Some(self.process.sentinel());
        let reply = wire::send(&self.control, &request, &preload.args, &[], &[], None, sentinel)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                self.control.recv(None, Some(self.process.sentinel())).map_err(|e| e.to_string())
            });
        let failure = match reply.as_ref().map(wire::decode::<Reply>) {
            Ok(Ok((Reply::Preloaded, _))) => return Ok(()),
            Ok(Ok((Reply::PreloadFailed { panic, message }, _))) => (panic, message),
            Ok(other) => (None, format!("the server answered {other:?}")),
            Err(e) => (None, format!("the server died: {e}")),
        };
        let status = self.stop();
        let failure = PreloadFailure { panic: failure.0, message: failure.1, status };
        let error = failure.error(preload.task);
        preload.failure = Some(failure);
        Err(error)
    }

    /// Ends the server (it exits by itself after a failed preload) and reaps it.
    fn stop(&mut self) -> Option<ExitStatus> {
        if !matches!(self.process.try_wait(), Ok(Some(_))) {
            let _ = self.process.signal(libc::SIGKILL);
        }
        self.process.wait_deadline(None).ok().flatten()
    }

    /// Whether the server can take requests: ours (not a forked parent's) and still running.
    fn usable(&mut self) -> bool {
        self.owner == std::process::id() && matches!(self.process.try_wait(), Ok(None))
    }
}

/// Sends a `Fork` request to the server, launching or replacing it as needed; returns the pid
/// of the server that took it.
fn request_fork(channel: BorrowedFd<'_>, status: BorrowedFd<'_>) -> Result<u32> {
    let mut guard = SERVER.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    // Two tries: a request that could not be delivered to a server that just died is sent
    // again to a new one. A request that was delivered is never repeated.
    for _ in 0..2 {
        if !guard.as_mut().is_some_and(Server::usable) {
            if let Some(old) = guard.take()
                && old.owner != std::process::id()
            {
                // A copy inherited through fork: the server belongs to our parent. Forget it
                // without touching it.
                std::mem::forget(old);
            }
            *guard = Some(Server::launch()?);
        }
        let server = guard.as_mut().expect("set above");
        // The child starts in our working directory and environment as they are now, as a
        // forked or spawned child would.
        let cwd = sys::open_cwd().map_err(|e| Error::io("opening the working directory", e))?;
        let env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
        let changed = server.env_sent.as_ref() != Some(&env);
        let request = Request::Fork {
            env: changed.then(|| {
                env.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect()
            }),
        };
        let sent = wire::send(
            &server.control,
            &request,
            &[],
            &[status, channel, cwd.as_fd()],
            &[],
            None,
            Some(server.process.sentinel()),
        );
        match sent {
            Ok(()) => {
                server.env_sent = Some(env);
                return Ok(server.process.pid());
            }
            Err(wire::SendError::Frame(FrameError::Disconnected | FrameError::Aborted)) => {
                tracing::debug!(pid = server.process.pid(), "forkserver died; replacing it");
                if let Some(mut dead) = guard.take() {
                    let _ = dead.process.wait_deadline(None);
                }
            }
            Err(e) => return Err(Error::new(ErrorKind::Io, format!("forkserver request: {e}"))),
        }
    }
    Err(Error::new(ErrorKind::StartFailed, "forkserver died twice in a row while starting a child"))
}

impl StartMethod for Forkserver {
    fn name(&self) -> &'static str {
        "forkserver"
    }

    fn start(&self, request: StartRequest<'_>) -> Result<Box<dyn ChildHandle>> {
        let (mut ours, theirs) =
            Channel::pair().map_err(|e| Error::io("socketpair for a child's status", e))?;
        let server = request_fork(request.channel.as_fd(), theirs.as_fd())?;
        // Only the server holds the status socket's other end now: if it dies, we see EOF.
        drop(theirs);
        drop(request.channel);
        let deadline = Instant::now() + start_timeout();
        // The answer comes only after the server has forked: wait for it first, rather than
        // try a receive that cannot find it yet (one syscall less on every start).
        let _ = sys::poll(&mut [PollFd::new(ours.as_fd(), POLLIN)], Some(deadline));
        let frame = match ours.recv(Some(deadline), None) {
            Ok(frame) => frame,
            Err(FrameError::Timeout) => {
                // A server that does not answer may still fork later: end it first, so that
                // what we report stays true.
                kill_server(server);
                let why = format!("server {server} did not answer within {:?}", start_timeout());
                return resolve_after_server_died(request.parent_end, ours, why);
            }
            Err(e) => {
                let why = format!("server {server} ended before it answered ({e})");
                return resolve_after_server_died(request.parent_end, ours, why);
            }
        };
        match wire::decode::<Reply>(&frame) {
            Ok((Reply::Forked { pid }, _)) => {
                let pidfd = frame.fds.into_iter().next().ok_or_else(|| {
                    Error::new(ErrorKind::Protocol, "forkserver sent no pidfd with the pid")
                })?;
                Ok(Box::new(ServedChild { pid, pidfd, status_channel: ours, status: None }))
            }
            Ok((Reply::ForkFailed { message }, _)) => {
                Err(Error::new(ErrorKind::StartFailed, message))
            }
            other => Err(Error::new(
                ErrorKind::Protocol,
                format!("forkserver answered a fork request with {other:?}"),
            )),
        }
    }
}

/// A child forked by the server: signalled through its pidfd, reaped by the server, whose
/// report arrives on the child's status socket.
#[derive(Debug)]
struct ServedChild {
    pid: u32,
    pidfd: OwnedFd,
    status_channel: Channel,
    status: Option<ExitStatus>,
}

impl ChildHandle for ServedChild {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn sentinel(&self) -> BorrowedFd<'_> {
        // While the server lives, its report is the sentinel; once it is gone (EOF), the
        // child's own pidfd is.
        if self.status_channel.is_closed() {
            self.pidfd.as_fd()
        } else {
            self.status_channel.as_fd()
        }
    }

    fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    fn reaped_elsewhere(&self) -> bool {
        true
    }

    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_some() {
            return Ok(self.status);
        }
        if !self.status_channel.is_closed() {
            match self.status_channel.try_recv() {
                Ok(Some(frame)) => {
                    if let Ok((Reply::Exited(status), _)) = wire::decode::<Reply>(&frame) {
                        self.status = Some(match status {
                            WireStatus::Exited(code) => ExitStatus::Exited(code),
                            WireStatus::Signaled(signal) => ExitStatus::Signaled(signal),
                        });
                    }
                    return Ok(self.status);
                }
                Ok(None) => return Ok(None),
                // The server died: fall back to the pidfd below.
                Err(_) => {}
            }
        }
        let mut set = [PollFd::new(self.pidfd.as_fd(), POLLIN)];
        if sys::poll(&mut set, Some(std::time::Instant::now()))? > 0 {
            self.status = Some(ExitStatus::Unknown);
        }
        Ok(self.status)
    }

    fn signal(&self, signal: i32) -> io::Result<()> {
        multiproc_core::process::method::signal_unless_ended(
            self.pidfd.as_fd(),
            self.status,
            signal,
        )
    }
}
