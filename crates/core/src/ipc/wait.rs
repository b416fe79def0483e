//! [`wait`]: block until any of several processes or connections is ready (Python's
//! `multiprocessing.connection.wait`).

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::ipc::pipe::Connection;
use crate::process::handle::Process;
use crate::sys::{self, POLLIN, PollFd};

/// Something [`wait`] can watch.
pub trait Waitable {
    /// The descriptor that becomes readable when the object is ready.
    fn wait_fd(&self) -> BorrowedFd<'_>;

    /// Whether the object is ready without its descriptor saying so (a message already read
    /// ahead into a buffer).
    fn ready_now(&self) -> bool {
        false
    }
}

impl<R: crate::runtime::task::Portable> Waitable for Process<R> {
    /// Ready when the child has ended.
    fn wait_fd(&self) -> BorrowedFd<'_> {
        self.sentinel()
    }
}

impl<T> Waitable for Connection<T> {
    /// Ready when a message can be received, or the other end has closed.
    fn wait_fd(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self)
    }

    fn ready_now(&self) -> bool {
        self.has_buffered_message()
    }
}

/// Waits until at least one of `objects` is ready, or `timeout` passes (`None`: no limit);
/// returns the indexes of the ready ones, empty on timeout.
///
/// A process is ready when it has ended; a connection when a message (or end-of-file) can be
/// received without blocking; a queue when a message is waiting; a
/// [`Listener`](crate::Listener) when a client is waiting to be accepted.
pub fn wait(objects: &[&dyn Waitable], timeout: Option<Duration>) -> Result<Vec<usize>> {
    let buffered: Vec<usize> =
        objects.iter().enumerate().filter(|(_, o)| o.ready_now()).map(|(i, _)| i).collect();
    let deadline = if buffered.is_empty() {
        timeout.map(|t| Instant::now() + t)
    } else {
        Some(Instant::now())
    };
    let mut set: Vec<PollFd<'_>> =
        objects.iter().map(|o| PollFd::new(o.wait_fd(), POLLIN)).collect();
    sys::poll(&mut set, deadline).map_err(|e| Error::io("poll in wait()", e))?;
    Ok(set
        .iter()
        .enumerate()
        .filter(|(i, entry)| entry.revents() != 0 || buffered.contains(i))
        .map(|(i, _)| i)
        .collect())
}

impl<T> Waitable for crate::ipc::queue::Queue<T> {
    /// Ready when a message is waiting (another consumer may still take it first).
    fn wait_fd(&self) -> BorrowedFd<'_> {
        self.get_fd()
    }
}
