//! Synchronization between processes, with Python's nouns: [`Lock`], [`RLock`] and
//! [`Condition`], which survive the death of their holder; [`Barrier`], which breaks when a
//! party dies waiting; [`Event`], [`Semaphore`] and [`BoundedSemaphore`], which have no owner;
//! [`Value`] and [`Array`] with their lock, and [`SharedAtomicU64`], a counter that needs none.
//!
//! Each primitive is one small memfd, sealed against resizing, whose first 64 bytes (the
//! header) hold its state and waiter counts, and, for the lock kinds, a process-shared robust
//! pthread mutex; a value's data and a barrier's party slots follow. Waiting is `FUTEX_WAIT` on
//! the state word (not private: every process that maps the page waits on the same futex).
//! Beside the memfd travels a *bell*, an eventfd that is never read: whoever changes the state
//! while async waiters are counted writes it, and each async waiter's reactor sees the edge.
//!
//! A primitive travels as its descriptors, the way [`SharedMemory`](crate::SharedMemory) does,
//! as a task argument, inside a message or a queue item, and is freed when the last process
//! holding it drops it or exits: no name in `/dev/shm`, no tracker process. A received handle
//! is checked (size sealed, a page of this layout, of the expected kind and size) before use.

mod barrier;
mod event;
mod lock;
mod semaphore;
mod value;

pub use barrier::{Barrier, BarrierWaitResult};
pub use event::Event;
pub use lock::{Condition, Lock, LockError, LockGuard, LockResult, RLock, TryLockResult};
pub use semaphore::{BoundedSemaphore, Semaphore};
pub use value::{Array, ArrayGuard, SharedAtomicU64, Value, ValueGuard};

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::{Duration, Instant};

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};
use crate::sys::{self, Mapping};
use crate::transport::fd::Fd;

/// Bytes of a page's header; a value's data and a barrier's slots start here.
const HEADER: usize = 64;

/// Marks a page of this layout ("MPS2").
const MAGIC: u32 = 0x4d50_5332;

/// Byte offsets of the header's words.
const W_MAGIC: usize = 0;
const W_KIND: usize = 4;
/// The futex word: an event's flag, a semaphore's count, a condition's or barrier's
/// generation.
const W_STATE: usize = 8;
/// Processes and threads asleep (or about to sleep) on the state word.
const W_WAITERS: usize = 12;
/// A bounded semaphore's bound (0 for none); lock pages have their mutex here instead.
const W_BOUND: usize = 16;
/// Where a lock's mutex lies (bytes 16..56 on glibc).
const MUTEX_AT: usize = 16;
/// Async waiters (futures) now waiting: while it is not zero, a change rings the bell.
const W_ASYNC: usize = 56;
/// A word each kind may use for itself: a value's element size, a barrier's parties.
const W_EXTRA: usize = 60;

const _: () = assert!(MUTEX_AT + sys::ROBUST_MUTEX_BYTES <= W_ASYNC);

/// How long a waiter spins before it sleeps (see [`Page::spin`]).
const SPIN: Duration = Duration::from_micros(5);

/// What a page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum Kind {
    Event = 1,
    Semaphore = 2,
    Lock = 3,
    RLock = 4,
    AtomicU64 = 5,
    Condition = 6,
    Barrier = 7,
    Value = 8,
}

/// A primitive's page: the memfd, this process's mapping of it, and the bell.
struct Page {
    fd: OwnedFd,
    map: Mapping,
    bell: OwnedFd,
}

impl Page {
    /// A page of `len` bytes (at least the header), all zero but its magic and kind.
    fn new(kind: Kind, len: usize) -> Result<Page> {
        let io = |what: &str, e| Error::io(format!("synchronization page: {what}"), e);
        let len = len.max(HEADER);
        let fd = sys::memfd("multiproc-sync", len).map_err(|e| io("memfd_create", e))?;
        sys::seal_size(fd.as_fd()).map_err(|e| io("seal", e))?;
        let map = Mapping::writable(fd.as_fd(), len).map_err(|e| io("mmap", e))?;
        let bell = sys::eventfd().map_err(|e| io("eventfd", e))?;
        let page = Page { fd, map, bell };
        page.word(W_KIND).store(kind as u32, SeqCst);
        page.word(W_MAGIC).store(MAGIC, SeqCst);
        Ok(page)
    }

    /// The 32-bit word at byte `offset`.
    #[inline]
    fn word(&self, offset: usize) -> &AtomicU32 {
        self.map.atomic_u32(offset).expect("a word of the page")
    }

    /// The robust mutex of a lock kind's page.
    #[inline]
    fn mutex(&self) -> sys::RobustMutex<'_> {
        sys::RobustMutex::at(&self.map, MUTEX_AT).expect("a lock page holds its mutex")
    }

    /// Waits until `ready` holds of the state word, or `deadline` passes (false). Spins a
    /// moment first (see [`spin`](Self::spin)); then counts itself a waiter, so that whoever
    /// changes the state sees it and wakes it, and sleeps on the futex.
    fn wait_until(&self, deadline: Option<Instant>, ready: impl Fn(u32) -> bool) -> Result<bool> {
        let (state, waiters) = (self.word(W_STATE), self.word(W_WAITERS));
        if self.spin(deadline, &ready) {
            return Ok(true);
        }
        loop {
            let seen = state.load(SeqCst);
            if ready(seen) {
                return Ok(true);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
            waiters.fetch_add(1, SeqCst);
            // Looked at again after counting: a change in between is seen here, or wakes us.
            let slept = if state.load(SeqCst) == seen {
                sys::futex_wait(state, seen, deadline)
            } else {
                Ok(true)
            };
            waiters.fetch_sub(1, SeqCst);
            slept.map_err(|e| Error::io("futex wait", e))?;
        }
    }

    /// Watches the state word for at most [`SPIN`] (and not past `deadline`) before a waiter
    /// sleeps, when this process may run on more than one CPU: a peer on another CPU that
    /// answers within microseconds (a hand-off, a ping-pong) is seen without two futex calls
    /// and a wake-up of a sleeping CPU, which cost more than the wait. Whether `ready` held.
    fn spin(&self, deadline: Option<Instant>, ready: &impl Fn(u32) -> bool) -> bool {
        // On one CPU, spinning only delays the peer it waits for.
        if !sys::several_cpus() {
            return false;
        }
        let state = self.word(W_STATE);
        let started = Instant::now();
        let until = deadline.map_or(started + SPIN, |d| d.min(started + SPIN));
        loop {
            for _ in 0..32 {
                if ready(state.load(SeqCst)) {
                    return true;
                }
                std::hint::spin_loop();
            }
            if Instant::now() >= until {
                return false;
            }
        }
    }

    /// Tells waiters the state changed: wakes up to `count` sleepers of the state word, and
    /// rings the bell for async waiters, if there are any of either.
    fn wake(&self, count: u32) {
        if self.word(W_WAITERS).load(SeqCst) > 0 {
            sys::futex_wake(self.word(W_STATE), count);
        }
        self.ring();
    }

    /// Rings the bell if async waiters are counted.
    fn ring(&self) {
        std::sync::atomic::fence(SeqCst);
        self.ring_unfenced();
    }

    /// As [`ring`](Self::ring), but a waiter counted an instant ago may be missed: for kinds
    /// whose async waiters look again on a timer anyway.
    #[inline]
    fn ring_unfenced(&self) {
        if self.word(W_ASYNC).load(SeqCst) > 0 {
            sys::eventfd_add_one(self.bell.as_fd());
        }
    }

    fn try_clone(&self) -> Result<Page> {
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| Error::io("dup of a sync page", e));
        let fd = dup(&self.fd)?;
        let map = Mapping::writable(fd.as_fd(), self.map.len())
            .map_err(|e| Error::io("mmap of a synchronization page", e))?;
        Ok(Page { fd, map, bell: dup(&self.bell)? })
    }

    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        (Fd::new(self.fd.as_fd()), Fd::new(self.bell.as_fd())).serialize(serializer)
    }

    /// Maps a received page, checking that it is one of ours, of `kind`, that no process can
    /// resize (a shrunk page would fault), before any word is used.
    fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
        kind: Kind,
    ) -> std::result::Result<Page, D::Error> {
        let (fd, bell) = <(Fd<OwnedFd>, Fd<OwnedFd>)>::deserialize(deserializer)?;
        let fd = fd.into_inner();
        let sealed = sys::is_size_sealed(fd.as_fd()).map_err(D::Error::custom)?;
        if !sealed {
            return Err(D::Error::custom("a synchronization page whose size is not sealed"));
        }
        let len = sys::file_size(fd.as_fd()).map_err(D::Error::custom)?;
        let len = usize::try_from(len).map_err(D::Error::custom)?;
        if len < HEADER {
            return Err(D::Error::custom(format!("a synchronization page of {len} bytes")));
        }
        let map = Mapping::writable(fd.as_fd(), len).map_err(D::Error::custom)?;
        let page = Page { fd, map, bell: bell.into_inner() };
        if page.word(W_MAGIC).load(SeqCst) != MAGIC || page.word(W_KIND).load(SeqCst) != kind as u32
        {
            return Err(D::Error::custom(format!("not a multiproc {kind:?}")));
        }
        Ok(page)
    }

    /// Counts an async waiter until the returned value is dropped (the future finished or was
    /// cancelled).
    #[cfg(feature = "tokio")]
    fn async_waiter(&self) -> AsyncWaiter<'_> {
        self.word(W_ASYNC).fetch_add(1, SeqCst);
        AsyncWaiter { page: self }
    }

    /// Waits, in the runtime's reactor, until `attempt` gives a value: it is tried at once and
    /// again each time the bell rings (and every `every`, for what no one rings the bell for:
    /// a holder or party that died).
    #[cfg(feature = "tokio")]
    async fn until_async<T>(
        &self,
        every: Option<Duration>,
        attempt: impl FnMut() -> Result<Option<T>> + Unpin,
    ) -> Result<T> {
        let _counted = self.async_waiter();
        let io_error = |e| Error::io("waiting for a synchronization page", e);
        crate::transport::reactor::retry(self.bell.as_fd(), every, attempt, io_error).await
    }
}

/// One async waiter counted in a page's header.
#[cfg(feature = "tokio")]
struct AsyncWaiter<'a> {
    page: &'a Page,
}

#[cfg(feature = "tokio")]
impl Drop for AsyncWaiter<'_> {
    fn drop(&mut self) {
        self.page.word(W_ASYNC).fetch_sub(1, SeqCst);
    }
}

/// The wire form of a primitive that is its page: the page's descriptors, checked for `kind`
/// when received (and by `$check`, for kinds with more to check).
macro_rules! page_wire {
    ($name:ident, $kind:expr) => {
        page_wire!($name, $kind, |_page| Ok(()));
    };
    ($name:ident, $kind:expr, $check:expr) => {
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(
                &self,
                serializer: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                self.page.serialize(serializer)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(
                deserializer: D,
            ) -> std::result::Result<Self, D::Error> {
                use serde::de::Error as _;
                let page = super::Page::deserialize(deserializer, $kind)?;
                let check: fn(&super::Page) -> std::result::Result<(), String> = $check;
                check(&page).map_err(D::Error::custom)?;
                Ok($name::from_page(page))
            }
        }
    };
}
use page_wire;

fn deadline_in(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes `value` and decodes what travels as a `T`.
    pub(super) fn through_the_wire<Q: Serialize, T: serde::de::DeserializeOwned>(
        value: &Q,
    ) -> std::result::Result<T, String> {
        use crate::transport::codec;
        let (bytes, fds) = codec::collecting_fds(|| codec::encode(value));
        let bytes = bytes.map_err(|e| e.to_string())?;
        codec::with_fds(fds, || codec::decode::<T>(&bytes)).map_err(|e| e.to_string())
    }

    #[test]
    fn a_received_page_is_checked_for_its_kind_and_works_across_handles() {
        let event = Event::new().unwrap();
        let received: Event = through_the_wire(&event).unwrap();
        received.set();
        assert!(event.is_set());
        let wrong = through_the_wire::<_, Semaphore>(&event).expect_err("an event");
        assert!(wrong.contains("not a multiproc Semaphore"), "{wrong}");
        let plain = Semaphore::new(1).unwrap();
        assert!(through_the_wire::<_, BoundedSemaphore>(&plain).is_err());
        // Memory that any process could resize is refused before it is mapped.
        let memory = sys::memfd("unsealed", HEADER).unwrap();
        let bell = sys::eventfd().unwrap();
        let unsealed = (Fd::new(memory.as_fd()), Fd::new(bell.as_fd()));
        let refused = through_the_wire::<_, Event>(&unsealed).expect_err("unsealed");
        assert!(refused.contains("not sealed"), "{refused}");
    }
}
