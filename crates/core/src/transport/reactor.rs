//! Waiting for descriptors through the tokio runtime's reactor (the `tokio` feature).
//!
//! Every async handle of the library waits here: for a socket to become readable or
//! writable, for a pidfd to say its process ended. Each wait registers duplicates of the
//! descriptors with the reactor of the runtime it runs in, and deregisters them when it
//! returns or is dropped, so a handle is not tied to one runtime and holds nothing between
//! waits. No thread waits: the runtime's own poll of its reactor does.

use std::future::Future;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Waits until one of `fds` is readable (or at end-of-file, or in error).
pub async fn readable(fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    ready(fds, Interest::READABLE).await
}

/// Waits until `fd` is writable (or its peer is gone).
pub async fn writable(fd: BorrowedFd<'_>) -> io::Result<()> {
    ready(&[fd], Interest::WRITABLE).await
}

/// Waits until `condition` holds, looking again each time `bell` is written to: an eventfd
/// that is never read, so that every write is an edge for every waiter, in every process,
/// and none can take another's wake-up. The bell is registered before the first look, so a
/// write after it is never missed.
pub async fn until(
    bell: BorrowedFd<'_>,
    mut condition: impl FnMut() -> io::Result<bool>,
) -> io::Result<()> {
    let registered = register(&[bell])?;
    let bell = &registered[0];
    loop {
        if condition()? {
            return Ok(());
        }
        bell.readable().await?.clear_ready();
    }
}

/// Waits until `attempt` gives a value: it is tried at once, and again each time `bell` (an
/// eventfd that is never read, as in [`until`]) is written to, and every `every` if given (for
/// changes no one rings the bell for). Unlike [`until`], what `attempt` gives is returned from
/// the poll that made it, never kept across a wait, so it may be a value that must stay on
/// one thread (a lock guard).
pub fn retry<'a, T: 'a, E>(
    bell: BorrowedFd<'a>,
    every: Option<std::time::Duration>,
    attempt: impl FnMut() -> Result<Option<T>, E> + Unpin + 'a,
    io_error: impl Fn(io::Error) -> E + Unpin + 'a,
) -> impl Future<Output = Result<T, E>> + 'a {
    Retry { bell, every, attempt, io_error, registered: None, _gives: std::marker::PhantomData }
}

/// The future of [`retry`]: registers the bell (and its timer) at the first poll.
struct Retry<'a, A, F, T> {
    bell: BorrowedFd<'a>,
    every: Option<std::time::Duration>,
    attempt: A,
    io_error: F,
    registered: Option<Vec<AsyncFd<OwnedFd>>>,
    _gives: std::marker::PhantomData<fn() -> T>,
}

impl<A, F, T, E> Future for Retry<'_, A, F, T>
where
    A: FnMut() -> Result<Option<T>, E> + Unpin,
    F: Fn(io::Error) -> E + Unpin,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T, E>> {
        let this = Pin::into_inner(self);
        if this.registered.is_none() {
            if tokio::runtime::Handle::try_current().is_err() {
                return Poll::Ready(Err((this.io_error)(outside_a_runtime())));
            }
            let mut fds = vec![this.bell.try_clone_to_owned()];
            if let Some(every) = this.every {
                fds.push(crate::sys::timerfd_every(every));
            }
            let registered = fds
                .into_iter()
                .map(|fd| crate::sys::register_with_reactor(fd?, Interest::READABLE))
                .collect::<io::Result<Vec<_>>>();
            this.registered = Some(registered.map_err(&this.io_error)?);
        }
        loop {
            if let Some(value) = (this.attempt)()? {
                return Poll::Ready(Ok(value));
            }
            let mut rang = false;
            for fd in this.registered.as_ref().expect("registered") {
                if let Poll::Ready(ready) = fd.poll_read_ready(cx) {
                    ready.map_err(&this.io_error)?.clear_ready();
                    rang = true;
                }
            }
            if !rang {
                return Poll::Pending;
            }
        }
    }
}

fn outside_a_runtime() -> io::Error {
    io::Error::other("multiproc's async handles must be awaited inside a tokio runtime")
}

/// Registers duplicates of `fds` with the current runtime's reactor, for readability; an error
/// outside a runtime.
pub fn register(fds: &[BorrowedFd<'_>]) -> io::Result<Vec<AsyncFd<OwnedFd>>> {
    register_for(fds, Interest::READABLE)
}

fn register_for(fds: &[BorrowedFd<'_>], interest: Interest) -> io::Result<Vec<AsyncFd<OwnedFd>>> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(outside_a_runtime());
    }
    fds.iter()
        .map(|fd| crate::sys::register_with_reactor(fd.try_clone_to_owned()?, interest))
        .collect()
}

async fn ready(fds: &[BorrowedFd<'_>], interest: Interest) -> io::Result<()> {
    let registered = register_for(fds, interest)?;
    AnyReady { fds: &registered, interest }.await
}

/// Ready once any of `fds` is.
struct AnyReady<'a> {
    fds: &'a [AsyncFd<OwnedFd>],
    interest: Interest,
}

impl Future for AnyReady<'_> {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        for fd in self.fds {
            let polled = if self.interest.is_writable() {
                fd.poll_write_ready(cx).map(|ready| ready.map(drop))
            } else {
                fd.poll_read_ready(cx).map(|ready| ready.map(drop))
            };
            if let Poll::Ready(outcome) = polled {
                return Poll::Ready(outcome);
            }
        }
        Poll::Pending
    }
}
