//! [`wait`]: block until any of several processes, connections, queues, listeners or pool
//! results is ready (Python's `multiprocessing.connection.wait`, and `as_completed` for pool
//! results); `wait_async` (the `tokio` feature) is the same as a future.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::task::{Wake, Waker};
use std::time::{Duration, Instant};
#[cfg(feature = "tokio")]
use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use crate::error::{Error, Result};
use crate::ipc::pipe::Connection;
use crate::process::handle::Process;
use crate::sys::{self, POLLIN, PollFd};

/// Something [`wait`] can watch.
pub trait Waitable {
    /// How to tell when the object is ready.
    fn watch(&self) -> Watch<'_>;
}

/// How [`wait`] tells that one object is ready: a descriptor that becomes readable, or (for
/// a pool result, which has none) a notification.
pub struct Watch<'a>(Kind<'a>);

enum Kind<'a> {
    Fd {
        fd: BorrowedFd<'a>,
        /// Ready without the descriptor saying so (a message already read ahead).
        ready_now: bool,
    },
    Notify(Box<dyn Notify + Send + Sync + 'a>),
}

impl<'a> Watch<'a> {
    /// Ready when `fd` is readable (or at end-of-file).
    pub fn fd(fd: BorrowedFd<'a>) -> Self {
        Watch(Kind::Fd { fd, ready_now: false })
    }

    /// Ready when `fd` is readable, or now if `ready_now` (what the object has buffered).
    pub fn fd_or_now(fd: BorrowedFd<'a>, ready_now: bool) -> Self {
        Watch(Kind::Fd { fd, ready_now })
    }

    /// Ready when `notify` says so; it wakes the waker it is given when that changes.
    pub(crate) fn notify(notify: impl Notify + Send + Sync + 'a) -> Self {
        Watch(Kind::Notify(Box::new(notify)))
    }

    /// Whether the object is ready without waiting for its descriptor.
    fn ready_now(&self) -> bool {
        match &self.0 {
            Kind::Fd { ready_now, .. } => *ready_now,
            Kind::Notify(notify) => notify.is_ready(),
        }
    }
}

/// An object that is ready without a descriptor saying so (a pool result).
pub(crate) trait Notify {
    /// Whether it is ready now.
    fn is_ready(&self) -> bool;
    /// Wakes `waker` once it may have become ready.
    fn notify(&self, waker: &Waker);
}

impl<R: crate::runtime::task::Portable> Waitable for Process<R> {
    /// Ready when the child has ended.
    fn watch(&self) -> Watch<'_> {
        Watch::fd(self.sentinel())
    }
}

impl Waitable for crate::runtime::identity::ParentProcess {
    /// Ready when the parent has ended.
    fn watch(&self) -> Watch<'_> {
        match self.sentinel() {
            Some(fd) => Watch::fd(fd),
            // Ended before it was looked up: ready now (on a descriptor that is never
            // readable, so the flag alone decides).
            None => Watch::fd_or_now(sys::dev_null().expect("/dev/null"), true),
        }
    }
}

impl<T> Waitable for Connection<T> {
    /// Ready when a message can be received, or the other end has closed.
    fn watch(&self) -> Watch<'_> {
        Watch::fd_or_now(self.as_fd(), self.has_buffered_message())
    }
}

impl<T> Waitable for crate::ipc::queue::Queue<T> {
    /// Ready when a message is waiting (another consumer may still take it first).
    fn watch(&self) -> Watch<'_> {
        Watch::fd(self.get_fd())
    }
}

/// A waker that writes to an eventfd, which a poll watches beside the other descriptors.
struct Bell(OwnedFd);

impl Wake for Bell {
    fn wake(self: Arc<Self>) {
        sys::eventfd_add_one(self.0.as_fd());
    }
}

/// Waits until at least one of `objects` is ready, or `timeout` passes (`None`: no limit);
/// returns the indexes of the ready ones, empty on timeout.
///
/// A process is ready when it has ended; a connection when a message (or end-of-file) can be
/// received without blocking; a queue when a message is waiting; a
/// [`Listener`](crate::Listener) when a client is waiting to be accepted; a pool's
/// [`AsyncResult`](crate::AsyncResult) when its result has arrived, so that a caller can take
/// results as they complete, mixed with processes and connections.
pub fn wait(objects: &[&dyn Waitable], timeout: Option<Duration>) -> Result<Vec<usize>> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let watches: Vec<Watch<'_>> = objects.iter().map(|o| o.watch()).collect();
    let bell = if watches.iter().any(|w| matches!(w.0, Kind::Notify(_))) {
        let fd = sys::eventfd().map_err(|e| Error::io("eventfd for wait()", e))?;
        Some(Arc::new(Bell(fd)))
    } else {
        None
    };
    loop {
        if let Some(bell) = &bell {
            // Each notification is used up by the wake-up it gives: asked again every turn.
            let waker = Waker::from(Arc::clone(bell));
            for watch in &watches {
                if let Kind::Notify(notify) = &watch.0 {
                    notify.notify(&waker);
                }
            }
        }
        let now_ready = watches.iter().any(Watch::ready_now);
        let mut set: Vec<PollFd<'_>> = watches
            .iter()
            .filter_map(|w| match &w.0 {
                Kind::Fd { fd, .. } => Some(PollFd::new(*fd, POLLIN)),
                Kind::Notify(_) => None,
            })
            .collect();
        if let Some(bell) = &bell {
            set.push(PollFd::new(bell.0.as_fd(), POLLIN));
        }
        let until = if now_ready { Some(Instant::now()) } else { deadline };
        sys::poll(&mut set, until).map_err(|e| Error::io("poll in wait()", e))?;
        let mut fds = set.iter();
        let ready: Vec<usize> = watches
            .iter()
            .enumerate()
            .filter(|(_, w)| {
                let by_fd = matches!(w.0, Kind::Fd { .. })
                    && fds.next().is_some_and(|entry| entry.revents() != 0);
                by_fd || w.ready_now()
            })
            .map(|(i, _)| i)
            .collect();
        if !ready.is_empty() || deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(ready);
        }
        // Only the bell rang, for a result not complete yet (one batch of several): empty it
        // and wait again.
        if let Some(bell) = &bell {
            sys::eventfd_take(bell.0.as_fd());
        }
    }
}

/// [`wait`] as a future, with no limit (wrap it in `tokio::time::timeout` for one): waits
/// through the tokio runtime's reactor, with no thread blocked, and gives the indexes of the
/// objects that are ready.
///
/// The objects are looked at when this is called; the future holds only their descriptors,
/// so it is `Send` whatever the objects are.
#[cfg(feature = "tokio")]
pub fn wait_async<'a>(
    objects: &'a [&'a dyn Waitable],
) -> impl Future<Output = Result<Vec<usize>>> + Send + 'a {
    let watches: Vec<Watch<'a>> = objects.iter().map(|o| o.watch()).collect();
    WaitAsync { watches, registered: None }
}

/// The future of [`wait_async`].
#[cfg(feature = "tokio")]
struct WaitAsync<'a> {
    watches: Vec<Watch<'a>>,
    /// The descriptors, registered with the reactor at the first poll.
    registered: Option<Vec<tokio::io::unix::AsyncFd<OwnedFd>>>,
}

#[cfg(feature = "tokio")]
impl Future for WaitAsync<'_> {
    type Output = Result<Vec<usize>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Vec<usize>>> {
        let this = &mut *self;
        if this.registered.is_none() {
            let fds: Vec<BorrowedFd<'_>> = this
                .watches
                .iter()
                .filter_map(|w| match &w.0 {
                    Kind::Fd { fd, .. } => Some(*fd),
                    Kind::Notify(_) => None,
                })
                .collect();
            match crate::transport::reactor::register(&fds) {
                Ok(registered) => this.registered = Some(registered),
                Err(e) => return Poll::Ready(Err(Error::io("wait_async", e))),
            }
        }
        let registered = this.registered.as_ref().expect("registered above");
        let mut fds = registered.iter();
        let mut ready = Vec::new();
        for (i, watch) in this.watches.iter().enumerate() {
            let is_ready = match &watch.0 {
                Kind::Fd { ready_now, .. } => {
                    let fd = fds.next().expect("one registration per descriptor");
                    let readable = matches!(fd.poll_read_ready(cx), Poll::Ready(_));
                    *ready_now || readable
                }
                Kind::Notify(notify) => {
                    notify.notify(cx.waker());
                    notify.is_ready()
                }
            };
            if is_ready {
                ready.push(i);
            }
        }
        if ready.is_empty() { Poll::Pending } else { Poll::Ready(Ok(ready)) }
    }
}
