//! Per-child setup: the environment, working directory and standard streams a builder asks
//! for (`ProcessBuilder`, `PoolBuilder`),
//! resolved at start into what the child applies to itself (a [`wire::Setup`] and the
//! descriptors its streams take) and what the parent keeps (its ends of pipes).
//!
//! The child applies it first thing, whichever start method made it (after the fork for fork
//! and forkserver, after the exec for spawn), so that all three behave the same; the dynamic
//! loader of a spawned child has seen the parent's environment, not this one.

use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::process::tracked::Tracked;
use crate::transport::wire::{self, StdStream};

/// Where a child's standard stream goes (std's `Stdio`, for a child process): set with
/// [`ProcessBuilder::stdout`](crate::ProcessBuilder::stdout) and friends.
///
/// By default a child's stdin is `/dev/null` (as in Python) and its stdout and stderr are its
/// parent's.
pub struct Stdio(Target);

enum Target {
    /// The parent's own stream, as it is at the start.
    Inherit,
    /// `/dev/null`.
    Null,
    /// This descriptor (a file, a socket, a pipe's end).
    Fd(OwnedFd),
    /// A new pipe whose other end the parent keeps.
    Piped,
}

impl Stdio {
    /// The parent's stream, as it is when the child starts (for stdin, the parent's stdin
    /// instead of `/dev/null`).
    pub fn inherit() -> Stdio {
        Stdio(Target::Inherit)
    }

    /// `/dev/null`: nothing comes in, what goes out is dropped.
    pub fn null() -> Stdio {
        Stdio(Target::Null)
    }

    /// A pipe to the parent: [`Process::stdout`](crate::Process::stdout) (or `stderr`, or
    /// `stdin` to write to the child) gives the parent's end; for a pool, `Pool::stdout` and
    /// friends, one pipe shared by every worker.
    pub fn piped() -> Stdio {
        Stdio(Target::Piped)
    }
}

impl From<OwnedFd> for Stdio {
    /// The stream goes to (or comes from) this descriptor.
    fn from(fd: OwnedFd) -> Stdio {
        Stdio(Target::Fd(fd))
    }
}

impl From<std::fs::File> for Stdio {
    /// The stream goes to (or comes from) this file.
    fn from(file: std::fs::File) -> Stdio {
        Stdio(Target::Fd(file.into()))
    }
}

impl<F: Into<OwnedFd>> From<crate::Fd<F>> for Stdio {
    fn from(fd: crate::Fd<F>) -> Stdio {
        Stdio(Target::Fd(fd.into_inner().into()))
    }
}

impl fmt::Debug for Stdio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Target::Inherit => "Stdio::inherit()",
            Target::Null => "Stdio::null()",
            Target::Fd(_) => "Stdio::from(fd)",
            Target::Piped => "Stdio::piped()",
        })
    }
}

/// What a builder was asked to set up in its children.
#[derive(Debug, Default)]
pub(crate) struct SetupBuilder {
    env_clear: bool,
    env: Vec<(OsString, Option<OsString>)>,
    current_dir: Option<PathBuf>,
    streams: [Option<Stdio>; 3],
}

impl SetupBuilder {
    pub(crate) fn env(&mut self, key: OsString, value: Option<OsString>) {
        self.env.push((key, value));
    }

    pub(crate) fn env_clear(&mut self) {
        self.env_clear = true;
        self.env.clear();
    }

    pub(crate) fn current_dir(&mut self, dir: PathBuf) {
        self.current_dir = Some(dir);
    }

    pub(crate) fn stream(&mut self, index: usize, stdio: Stdio) {
        self.streams[index] = Some(stdio);
    }

    /// What the children get and the parent keeps: pipes are made, inherited streams
    /// duplicated, now.
    pub(crate) fn resolve(self) -> Result<Resolved> {
        let untouched = !self.env_clear
            && self.env.is_empty()
            && self.current_dir.is_none()
            && self.streams.iter().all(Option::is_none);
        if untouched {
            return Ok(Resolved::default());
        }
        let mut resolved = Resolved::default();
        let mut setup = wire::Setup {
            env_clear: self.env_clear,
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_ref().map(|v| v.as_bytes().to_vec())))
                .collect(),
            current_dir: self.current_dir.map(|d| d.as_os_str().as_bytes().to_vec()),
            streams: Default::default(),
        };
        for (index, stdio) in self.streams.into_iter().enumerate() {
            let Some(Stdio(target)) = stdio else { continue };
            let fd = match target {
                Target::Null => {
                    setup.streams[index] = StdStream::Null;
                    continue;
                }
                Target::Fd(fd) => fd,
                Target::Inherit => {
                    let own = match index {
                        0 => std::io::stdin().as_fd().try_clone_to_owned(),
                        1 => std::io::stdout().as_fd().try_clone_to_owned(),
                        _ => std::io::stderr().as_fd().try_clone_to_owned(),
                    };
                    own.map_err(|e| Error::io("dup of a standard stream", e))?
                }
                Target::Piped => {
                    let (reader, writer) = crate::sys::pipe()
                        .map_err(|e| Error::io("a pipe for a child's stream", e))?;
                    if index == 0 {
                        resolved.pipes.stdin = Some(ChildInput(Tracked::new(File::from(writer))));
                        reader
                    } else {
                        let end = writer;
                        *resolved.pipes.reader(index) =
                            Some(ChildOutput(Tracked::new(File::from(reader))));
                        end
                    }
                }
            };
            setup.streams[index] = StdStream::Fd;
            resolved.fds.push(fd);
        }
        resolved.setup = Some(setup);
        Ok(resolved)
    }
}

/// A builder's setup, resolved for its children.
#[derive(Debug, Default)]
pub(crate) struct Resolved {
    /// What each child applies (`None`: nothing asked).
    pub(crate) setup: Option<wire::Setup>,
    /// The descriptors its streams take, in stream order.
    pub(crate) fds: Vec<OwnedFd>,
    /// The parent's ends of the pipes.
    pub(crate) pipes: ParentEnds,
}

impl Resolved {
    pub(crate) fn borrowed_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.fds.iter().map(AsFd::as_fd).collect()
    }
}

/// The parent's ends of a child's (or a pool's) piped streams.
#[derive(Debug, Default)]
pub(crate) struct ParentEnds {
    pub(crate) stdin: Option<ChildInput>,
    pub(crate) stdout: Option<ChildOutput>,
    pub(crate) stderr: Option<ChildOutput>,
}

impl ParentEnds {
    fn reader(&mut self, index: usize) -> &mut Option<ChildOutput> {
        if index == 1 { &mut self.stdout } else { &mut self.stderr }
    }
}

/// The parent's writing end of a child's (or a pool's) stdin pipe, from
/// [`Process::stdin`](crate::Process::stdin). Dropping it closes the child's stdin. While it
/// lives, children forked later close their copy, so that it is the only writer.
#[derive(Debug)]
pub struct ChildInput(Tracked<File>);

/// The parent's reading end of a child's (or a pool's) stdout or stderr pipe, from
/// [`Process::stdout`](crate::Process::stdout) or `stderr`; it reads to its end once every
/// process writing to it has exited. Children forked later close their copy.
#[derive(Debug)]
pub struct ChildOutput(Tracked<File>);

impl std::io::Write for ChildInput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl std::io::Read for ChildOutput {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl AsFd for ChildInput {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsFd for ChildOutput {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// The builder methods of per-child setup, for each builder that holds a `setup:
/// SetupBuilder` (one copy of the methods and their docs for `ProcessBuilder` and
/// `PoolBuilder`).
macro_rules! setup_methods {
    ($what:literal) => {
        #[doc = concat!("Sets an environment variable in ", $what, " (applied by the child before anything runs).")]
        pub fn env(
            mut self,
            key: impl AsRef<std::ffi::OsStr>,
            value: impl AsRef<std::ffi::OsStr>,
        ) -> Self {
            let (key, value) = (key.as_ref().to_owned(), value.as_ref().to_owned());
            self.setup.env(key, Some(value));
            self
        }

        #[doc = concat!("Removes an environment variable in ", $what, ".")]
        pub fn env_remove(mut self, key: impl AsRef<std::ffi::OsStr>) -> Self {
            self.setup.env(key.as_ref().to_owned(), None);
            self
        }

        #[doc = concat!("Starts ", $what, " with an empty environment (but for the variables set after this call).")]
        pub fn env_clear(mut self) -> Self {
            self.setup.env_clear();
            self
        }

        #[doc = concat!("The working directory of ", $what, " (a relative path is taken from the parent's working directory when this is called); one it cannot enter fails it with `ErrorKind::StartFailed`.")]
        pub fn current_dir(mut self, dir: impl AsRef<std::path::Path>) -> Self {
            let dir = dir.as_ref();
            let dir = std::env::current_dir().map(|cwd| cwd.join(dir)).unwrap_or(dir.into());
            self.setup.current_dir(dir);
            self
        }

        #[doc = concat!("The stdin of ", $what, " (by default `/dev/null`).")]
        pub fn stdin(mut self, stdio: impl Into<$crate::Stdio>) -> Self {
            self.setup.stream(0, stdio.into());
            self
        }

        #[doc = concat!("The stdout of ", $what, " (by default the parent's).")]
        pub fn stdout(mut self, stdio: impl Into<$crate::Stdio>) -> Self {
            self.setup.stream(1, stdio.into());
            self
        }

        #[doc = concat!("The stderr of ", $what, " (by default the parent's).")]
        pub fn stderr(mut self, stdio: impl Into<$crate::Stdio>) -> Self {
            self.setup.stream(2, stdio.into());
            self
        }
    };
}
pub(crate) use setup_methods;
