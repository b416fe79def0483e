//! The one error type of multiproc: an opaque value with a `kind()`, where a child's failure is
//! data (its exit status, its panic) and our own machinery failing is a different kind.

use std::error::Error as StdError;
use std::fmt;
use std::io;

use serde::{Deserialize, Serialize};

use crate::process::status::ExitStatus;

/// A convenient alias for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, coarsely: match on this, read the rest from the [`Error`]'s accessors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// `Context::new` was given a name that is not a start method.
    UnknownStartMethod,
    /// No task is registered under the name (in this process or in the child).
    UnknownTask,
    /// Two tasks are registered under the same name, so the name does not say which to run.
    DuplicateTask,
    /// The fork start method refused to fork a multi-threaded process.
    ForkRefused,
    /// The child could not be started: exec failed, it died before the handshake, or it turned
    /// out to be a different build or protocol version.
    StartFailed,
    /// The child's task panicked; see [`Error::panic`].
    Panicked,
    /// `start()` could not learn whether the child was started: the forkserver stopped
    /// answering or died while the child may already have been forked, and the child did not
    /// say so in time. The task may be running: retrying may run it twice.
    OutcomeUnknown,
    /// The child ended without returning a value: it exited with a code or was killed by a
    /// signal; see [`Error::exit_status`].
    ChildExited,
    /// Bytes from the other process did not decode as the expected type.
    Decode,
    /// A value could not be encoded for the other process.
    Encode,
    /// The other process broke the wire protocol (a malformed or truncated frame).
    Protocol,
    /// The result of this process was already taken by an earlier `join_timeout`.
    ResultTaken,
    /// A pool task ran past its time limit (its worker was killed and replaced), or a
    /// listener's accept or handshake did not complete in time.
    Timeout,
    /// The other end of a `Listener` connection did not prove that it holds
    /// the key (or the listener refused ours).
    AuthenticationFailed,
    /// The work was cancelled before it ran: its pool was terminated or dropped.
    Cancelled,
    /// The call does not fit the object's state: a closed pool given work, a forkserver preload
    /// set after the server started.
    InvalidState,
    /// A lock's previous holder died holding it: a `LockError::OwnerDied`
    /// turned into an `Error` (by `?`), which dropped its guard. To repair what the lock
    /// protects, match the `LockError` instead.
    OwnerDied,
    /// A `Barrier` is broken: a party died or timed out waiting, or it was
    /// aborted. It stays broken.
    BrokenBarrier,
    /// An operating-system call of our own machinery failed.
    Io,
}

/// A panic that happened in a child process, carried back to the parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemotePanic {
    /// The panic payload, when it was a string (as `panic!("...")` makes it).
    pub message: String,
    /// `file:line:column` of the panic, when known.
    pub location: Option<String>,
    /// The child's backtrace at the panic, rendered as text.
    pub backtrace: String,
}

impl fmt::Display for RemotePanic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(location) => write!(f, "panicked at {location}: {}", self.message),
            None => write!(f, "panicked: {}", self.message),
        }
    }
}

/// What a child did instead of returning a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildFailure {
    /// The task panicked; the process then exited with code 1.
    Panicked(RemotePanic),
    /// The process exited with a code, or was killed by a signal, before returning a value.
    Exited(ExitStatus),
}

/// The error type of multiproc.
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    message: String,
    failure: Option<ChildFailure>,
    exit_status: Option<ExitStatus>,
    source: Option<Box<dyn StdError + Send + Sync>>,
}

impl Error {
    /// An error of `kind` with a lowercase message that names the process or fd involved.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            inner: Box::new(Inner {
                kind,
                message: message.into(),
                failure: None,
                exit_status: None,
                source: None,
            }),
        }
    }

    /// An [`ErrorKind::Io`] error: `context` says what we were doing.
    pub fn io(context: impl fmt::Display, err: io::Error) -> Self {
        Self::new(ErrorKind::Io, format!("{context}: {err}")).with_source(err)
    }

    /// A child failure: the kind follows from `failure`.
    pub fn child(
        label: impl fmt::Display,
        failure: ChildFailure,
        status: Option<ExitStatus>,
    ) -> Self {
        let (kind, message) = match &failure {
            ChildFailure::Panicked(panic) => (ErrorKind::Panicked, format!("{label} {panic}")),
            ChildFailure::Exited(status) => {
                (ErrorKind::ChildExited, format!("{label} ended without a result: {status}"))
            }
        };
        let mut error = Self::new(kind, message);
        error.inner.exit_status = status.or(match failure {
            ChildFailure::Exited(status) => Some(status),
            ChildFailure::Panicked(_) => None,
        });
        error.inner.failure = Some(failure);
        error
    }

    /// A copy for each of several items that failed together (the lower-level cause is kept
    /// as text in the message only).
    pub(crate) fn duplicate(&self) -> Self {
        let mut copy = Self::new(self.inner.kind, self.inner.message.clone());
        copy.inner.failure = self.inner.failure.clone();
        copy.inner.exit_status = self.inner.exit_status;
        copy
    }

    /// Attaches the lower-level cause.
    pub fn with_source(mut self, source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    /// Attaches the exit status of the child this error is about.
    pub fn with_exit_status(mut self, status: Option<ExitStatus>) -> Self {
        if status.is_some() {
            self.inner.exit_status = status;
        }
        self
    }

    /// The coarse kind of this error.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// What the child did, when this error is a child's failure rather than ours.
    pub fn child_failure(&self) -> Option<&ChildFailure> {
        self.inner.failure.as_ref()
    }

    /// Whether this error reports what a child did (panicked, exited, was killed), as opposed
    /// to our machinery failing.
    pub fn is_child_failure(&self) -> bool {
        self.inner.failure.is_some()
    }

    /// The child's panic, if it panicked.
    pub fn panic(&self) -> Option<&RemotePanic> {
        match &self.inner.failure {
            Some(ChildFailure::Panicked(panic)) => Some(panic),
            _ => None,
        }
    }

    /// How the child process ended, when known.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.inner.exit_status
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.inner.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Error");
        debug.field("kind", &self.inner.kind).field("message", &self.inner.message);
        if let Some(status) = &self.inner.exit_status {
            debug.field("exit_status", status);
        }
        if let Some(ChildFailure::Panicked(panic)) = &self.inner.failure {
            debug.field("backtrace", &panic.backtrace);
        }
        if let Some(source) = &self.inner.source {
            debug.field("source", source);
        }
        debug.finish()
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.inner.source.as_deref().map(|s| s as &(dyn StdError + 'static))
    }
}

/// An [`ErrorKind::Io`] error with the I/O error as its source, so that `?` works on the
/// file and socket calls around a task in a function that returns `multiproc::Result`.
///
/// ```
/// fn read_config() -> multiproc_core::Result<String> {
///     Ok(std::fs::read_to_string("/nonexistent/multiproc.toml")?)
/// }
/// let error = read_config().expect_err("no such file");
/// assert_eq!(error.kind(), multiproc_core::ErrorKind::Io);
/// ```
impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        Self::new(ErrorKind::Io, err.to_string()).with_source(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_failure_is_data_and_machinery_is_not() {
        let panic = RemotePanic {
            message: "boom".into(),
            location: Some("src/lib.rs:3:5".into()),
            backtrace: String::new(),
        };
        let error = Error::child(
            "process 12 (adder)",
            ChildFailure::Panicked(panic),
            Some(ExitStatus::Exited(1)),
        );
        assert_eq!(error.kind(), ErrorKind::Panicked);
        assert!(error.is_child_failure());
        assert_eq!(error.exit_status(), Some(ExitStatus::Exited(1)));
        assert_eq!(error.to_string(), "process 12 (adder) panicked at src/lib.rs:3:5: boom");

        let killed =
            Error::child("process 13", ChildFailure::Exited(ExitStatus::Signaled(9)), None);
        assert_eq!(killed.kind(), ErrorKind::ChildExited);
        assert_eq!(killed.exit_status().map(ExitStatus::exitcode), Some(-9));

        let io = Error::io("poll on fd 5", io::Error::from_raw_os_error(libc::EBADF));
        assert_eq!(io.kind(), ErrorKind::Io);
        assert!(!io.is_child_failure());
        assert!(io.source().is_some());
    }
}
