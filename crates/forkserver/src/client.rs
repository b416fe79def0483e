//! The client side: the `Forkserver` start method, the one server per process that every
//! context shares, and the handle of a child the server forked.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

use multiproc_core::channel::{Channel, FrameError};
use multiproc_core::method::ChildHandle;
use multiproc_core::role::role_env_value;
use multiproc_core::sys::{self, POLLIN, PollFd, SPAWN_CHANNEL_FD};
use multiproc_core::{
    DirectChild, Error, ErrorKind, ExitStatus, Result, StartMethod, StartRequest, child, wire,
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
}

static SERVER: Mutex<Option<Server>> = Mutex::new(None);

/// The pid of this process's forkserver, if one is running.
pub fn server_pid() -> Option<u32> {
    let guard = SERVER.lock().ok()?;
    guard.as_ref().filter(|s| s.owner == std::process::id()).map(|s| s.process.pid())
}

impl Server {
    fn launch() -> Result<Server> {
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
        tracing::debug!(pid, "forkserver started");
        Ok(Server { control, process, owner: std::process::id() })
    }

    /// Whether the server can take requests: ours (not a forked parent's) and still running.
    fn usable(&mut self) -> bool {
        self.owner == std::process::id() && matches!(self.process.try_wait(), Ok(None))
    }
}

/// Sends a `Fork` request to the server, launching or replacing it as needed.
fn request_fork(channel: BorrowedFd<'_>, status: BorrowedFd<'_>) -> Result<()> {
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
        let sent = wire::send(
            &server.control,
            &Request::Fork,
            &[],
            &[channel, status],
            None,
            Some(server.process.sentinel()),
        );
        match sent {
            Ok(()) => return Ok(()),
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
        request_fork(request.channel.as_fd(), theirs.as_fd())?;
        // Only the server holds the status socket's other end now: if it dies, we see EOF.
        drop(theirs);
        drop(request.channel);
        let frame = ours.recv(None, None).map_err(|e| {
            Error::new(ErrorKind::StartFailed, format!("forkserver did not start the child: {e}"))
        })?;
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
        multiproc_core::method::signal_unless_ended(self.pidfd.as_fd(), self.status, signal)
    }
}
