//! The client side: the `Forkserver` start method, the one server per process that every
//! context shares, and the handle of a child the server forked.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use multiproc_core::process::method::ChildHandle;
use multiproc_core::process::server::protocol::{Reply, Request, VERSION};
use multiproc_core::process::server::served::{self, Answer, Link, NotSent};
use multiproc_core::runtime::role::role_env_value;
use multiproc_core::runtime::{child, registry};
use multiproc_core::sys::{self, SPAWN_CHANNEL_FD};
use multiproc_core::transport::channel::Channel;
use multiproc_core::transport::{codec, wire};
use multiproc_core::{
    ChildFailure, DirectChild, Error, ErrorKind, ExitStatus, Portable, RemotePanic, Result,
    StartMethod, StartRequest, Task,
};

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
    link: Link,
    /// The pid that launched it: a forked copy of this process must not share the socket.
    owner: u32,
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
                running.link.process.pid()
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

/// How many children the forkserver keeps forked ahead, by default.
pub const DEFAULT_SPARES: u32 = 2;

/// The current count (see [`set_spares`]).
static SPARES: AtomicU32 = AtomicU32::new(DEFAULT_SPARES);

/// Sets how many children the forkserver keeps forked ahead ([`DEFAULT_SPARES`] unless set;
/// 0 turns it off), for this process's server, running or to come.
///
/// A spare is forked from the server (after its preload, if one is set) and waits, using no
/// CPU, until a `start()` hands it a request: it then enters the caller's working directory
/// and environment as of that `start()` and runs the child, so that the start does not wait
/// for a fork; the server forks the replacement once no request is waiting. A spare is
/// indistinguishable from a child forked on request: same state, directory, environment,
/// default signal dispositions, and none of the descriptors of other requests. Each costs
/// what an idle forked copy of the small server costs (BENCHMARKS.md, "Start-up", reports its
/// proportional set size).
///
/// A server that has died meanwhile is not an error: the next start launches another, which
/// is told the new count.
///
/// # Errors
///
/// Only if a running server cannot be told.
pub fn set_spares(count: u32) -> Result<()> {
    SPARES.store(count, Ordering::Relaxed);
    let mut guard = SERVER.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    match guard.as_mut() {
        Some(server) => {
            if server.usable() {
                server.send_spares()
            } else {
                // A dead server (the next start replaces it) or a forked parent's.
                Ok(())
            }
        }
        None => Ok(()),
    }
}

fn start_timeout() -> Duration {
    Duration::from_millis(START_TIMEOUT_MS.load(Ordering::Relaxed))
}

/// Kills the server with this pid, if it is still the current one, and forgets it: the next
/// start launches another.
fn kill_server(pid: u32) {
    let mut guard = SERVER.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(server) = guard.as_mut().filter(|s| s.owner == std::process::id()) {
        if server.link.process.pid() == pid {
            tracing::debug!(pid, "forkserver did not answer in time; killing it");
            let _ = server.link.process.signal(libc::SIGKILL);
            let _ = server.link.process.wait_deadline(None);
            *guard = None;
        }
    }
}

/// The pid of this process's forkserver, if one is running.
pub fn server_pid() -> Option<u32> {
    let guard = SERVER.lock().ok()?;
    guard.as_ref().filter(|s| s.owner == std::process::id()).map(|s| s.link.process.pid())
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
        let mut server = Server { link: Link::new(control, process), owner: std::process::id() };
        server.preload()?;
        server.send_spares()?;
        tracing::debug!(pid, "forkserver started");
        Ok(server)
    }

    /// Has the new server run the preload, if one is set; a failure is remembered.
    fn preload(&mut self) -> Result<()> {
        let mut guard = PRELOAD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(preload) = guard.as_mut() else { return Ok(()) };
        let request = Request::Preload { task: preload.task.to_owned() };
        let sentinel = Some(self.link.process.sentinel());
        let reply =
            wire::send(&self.link.control, &request, &preload.args, &[], &[], None, sentinel)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    self.link
                        .control
                        .recv(None, Some(self.link.process.sentinel()))
                        .map_err(|e| e.to_string())
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

    /// Tells the server how many spares to keep (after its preload: they are forked from it).
    fn send_spares(&mut self) -> Result<()> {
        let request = Request::Spares { count: SPARES.load(Ordering::Relaxed) };
        let sentinel = Some(self.link.process.sentinel());
        wire::send(&self.link.control, &request, &[], &[], &[], None, sentinel).map_err(|e| {
            Error::new(ErrorKind::StartFailed, format!("forkserver spares request: {e}"))
        })
    }

    /// Ends the server (it exits by itself after a failed preload) and reaps it.
    fn stop(&mut self) -> Option<ExitStatus> {
        if !matches!(self.link.process.try_wait(), Ok(Some(_))) {
            let _ = self.link.process.signal(libc::SIGKILL);
        }
        self.link.process.wait_deadline(None).ok().flatten()
    }

    /// Whether the server can take requests: ours (not a forked parent's) and still running.
    fn usable(&mut self) -> bool {
        self.owner == std::process::id() && matches!(self.link.process.try_wait(), Ok(None))
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
        match server.link.send_fork(channel, status) {
            Ok(()) => return Ok(server.link.process.pid()),
            Err(NotSent::Gone) => {
                tracing::debug!(pid = server.link.process.pid(), "forkserver died; replacing it");
                if let Some(mut dead) = guard.take() {
                    let _ = dead.link.process.wait_deadline(None);
                }
            }
            Err(NotSent::Failed(error)) => return Err(error),
        }
    }
    Err(Error::new(ErrorKind::StartFailed, "forkserver died twice in a row while starting a child"))
}

impl StartMethod for Forkserver {
    fn name(&self) -> &'static str {
        "forkserver"
    }

    fn start(&self, request: StartRequest<'_>) -> Result<Box<dyn ChildHandle>> {
        let (ours, theirs) =
            Channel::pair().map_err(|e| Error::io("socketpair for a child's status", e))?;
        let server = request_fork(request.channel.as_fd(), theirs.as_fd())?;
        // Only the server holds the status socket's other end now: if it dies, we see EOF.
        drop(theirs);
        drop(request.channel);
        let resolve = |ours, why| {
            served::resolve_after_server_died(request.parent_end, ours, why, start_timeout())
        };
        match served::await_forked(ours, Instant::now() + start_timeout()) {
            Answer::Forked(child) => Ok(Box::new(child)),
            Answer::Refused(error) => Err(error),
            Answer::Timeout(ours) => {
                // A server that does not answer may still fork later: end it first, so that
                // what we report stays true.
                kill_server(server);
                resolve(
                    ours,
                    format!("server {server} did not answer within {:?}", start_timeout()),
                )
            }
            Answer::Ended(ours, e) => {
                resolve(ours, format!("server {server} ended before it answered ({e})"))
            }
        }
    }
}
