//! The client's side of a fork server: sending a `Fork` request, waiting for its answer, and
//! the handle of a child the server forked.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};
use crate::process::method::{ChildHandle, DirectChild, signal_unless_ended};
use crate::process::server::protocol::{Reply, Request, WireStatus};
use crate::process::status::ExitStatus;
use crate::sys::{self, POLLIN, PollFd};
use crate::transport::channel::{self, Channel, FrameError};
use crate::transport::wire;

/// A running fork server, as the process that started it sees it.
#[derive(Debug)]
pub struct Link {
    /// The control socket requests go to.
    pub control: Channel,
    /// The server process.
    pub process: DirectChild,
    /// The environment the last `Fork` request carried, which the server now has; `None`
    /// before the first.
    env_sent: Option<Vec<(OsString, OsString)>>,
}

/// Why a `Fork` request was not delivered.
#[derive(Debug)]
pub enum NotSent {
    /// The server is gone (its control socket is closed): nothing was delivered.
    Gone,
    /// Something else failed.
    Failed(Error),
}

impl Link {
    /// A link to the server `process`, which reads requests from `control`.
    pub fn new(control: Channel, process: DirectChild) -> Link {
        Link { control, process, env_sent: None }
    }

    /// Asks the server to fork a child whose channel is `channel`, reporting on `status`.
    ///
    /// The child starts in our working directory and environment as they are now, as a forked
    /// or spawned child would: the request carries the directory, and the environment when it
    /// differs from the one sent last.
    pub fn send_fork(
        &mut self,
        channel: BorrowedFd<'_>,
        status: BorrowedFd<'_>,
    ) -> std::result::Result<(), NotSent> {
        let cwd = sys::open_cwd()
            .map_err(|e| NotSent::Failed(Error::io("opening the working directory", e)))?;
        let env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
        let changed = self.env_sent.as_ref() != Some(&env);
        let request = Request::Fork {
            env: changed.then(|| {
                env.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect()
            }),
        };
        let sent = wire::send(
            &self.control,
            &request,
            &[],
            &[status, channel, cwd.as_fd()],
            &[],
            None,
            Some(self.process.sentinel()),
        );
        match sent {
            Ok(()) => {
                self.env_sent = Some(env);
                Ok(())
            }
            Err(wire::SendError::Frame(FrameError::Disconnected | FrameError::Aborted)) => {
                Err(NotSent::Gone)
            }
            Err(e) => {
                Err(NotSent::Failed(Error::new(ErrorKind::Io, format!("fork server request: {e}"))))
            }
        }
    }
}

/// What came of waiting for the answer to a `Fork` request.
#[derive(Debug)]
pub enum Answer {
    /// The child runs.
    Forked(ServedChild),
    /// The server said it could not fork it (or answered nonsense).
    Refused(Error),
    /// No answer by the deadline; the status socket, to watch on.
    Timeout(Channel),
    /// The server ended without answering; the status socket, and how it ended.
    Ended(Channel, FrameError),
}

/// Waits until `deadline` for the server's answer on `status`, the request's status socket
/// (whose other end only the server holds).
pub fn await_forked(mut status: Channel, deadline: Instant) -> Answer {
    // The answer comes only after the server has forked: wait for it first, rather than try a
    // receive that cannot find it yet (one syscall less on every start).
    let _ = sys::poll(&mut [PollFd::new(status.as_fd(), POLLIN)], Some(deadline));
    let frame = match status.recv(Some(deadline), None) {
        Ok(frame) => frame,
        Err(FrameError::Timeout) => return Answer::Timeout(status),
        Err(e) => return Answer::Ended(status, e),
    };
    match wire::decode::<Reply>(&frame) {
        Ok((Reply::Forked { pid }, _)) => match frame.fds.into_iter().next() {
            Some(pidfd) => Answer::Forked(ServedChild::new(pid, pidfd, status)),
            None => Answer::Refused(Error::new(
                ErrorKind::Protocol,
                "the fork server sent no pidfd with the pid",
            )),
        },
        Ok((Reply::ForkFailed { message }, _)) => {
            Answer::Refused(Error::new(ErrorKind::StartFailed, message))
        }
        other => Answer::Refused(Error::new(
            ErrorKind::Protocol,
            format!("the fork server answered a fork request with {other:?}"),
        )),
    }
}

/// Finds out, once the server that was asked to fork is gone, whether it forked the child: the
/// child's channel is then held by nobody but the child, so its other end (`parent_end`)
/// reads the child's hello if the child exists and end-of-file if it never will. Waits at most
/// `timeout` for either.
pub fn resolve_after_server_died(
    parent_end: BorrowedFd<'_>,
    status: Channel,
    why: String,
    timeout: Duration,
) -> Result<Box<dyn ChildHandle>> {
    let deadline = Instant::now() + timeout;
    loop {
        match channel::peek_frame(parent_end, 4096) {
            Err(FrameError::Disconnected) => {
                return Err(Error::new(
                    ErrorKind::StartFailed,
                    format!("the fork server did not start the child: {why}"),
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
                    tracing::debug!(pid, "the fork server died after forking; the child runs");
                    return Ok(Box::new(ServedChild::new(pid, pidfd, status)));
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
                    "fork server: {why}; whether it forked the child is unknown (no hello and no \
                     end-of-file on the child's channel within {timeout:?}): the task may be \
                     running"
                ),
            ));
        }
    }
}

/// A child forked by a fork server: signalled through its pidfd, reaped by the server, whose
/// report arrives on the child's status socket.
#[derive(Debug)]
pub struct ServedChild {
    pid: u32,
    pidfd: OwnedFd,
    status_channel: Channel,
    status: Option<ExitStatus>,
}

impl ServedChild {
    /// The child `pid`, watched through `pidfd`, whose status the server reports on
    /// `status_channel`.
    pub fn new(pid: u32, pidfd: OwnedFd, status_channel: Channel) -> ServedChild {
        ServedChild { pid, pidfd, status_channel, status: None }
    }
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
        if sys::poll(&mut set, Some(Instant::now()))? > 0 {
            self.status = Some(ExitStatus::Unknown);
        }
        Ok(self.status)
    }

    fn signal(&self, signal: i32) -> io::Result<()> {
        signal_unless_ended(self.pidfd.as_fd(), self.status, signal)
    }
}
