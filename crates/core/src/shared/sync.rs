//! Synchronization between processes: [`Lock`] and [`RLock`], which survive the death of their
//! holder, and [`Event`], [`Semaphore`] and [`BoundedSemaphore`], which have no owner
//! (Python's nouns); futexes in a page of shared memory. [`SharedAtomicU64`] is a counter that
//! needs no lock.
//!
//! Each primitive is one small memfd, sealed against resizing, whose words are the state and
//! its waiter count; waiting is `FUTEX_WAIT` on the state word (not private: every process that
//! maps the page waits on the same futex). It travels as its descriptor, the way
//! [`SharedMemory`](crate::SharedMemory) does, as a task argument, inside a message or a queue
//! item, and is freed when the last process holding it drops it or exits: no name in
//! `/dev/shm`, no tracker process. A received handle is checked (size sealed, a page of this
//! layout and of the expected kind) before it is used.
//!
//! These have no owner, so the death of a process changes nothing in them: a semaphore
//! acquired by a process that is killed before it releases stays acquired (as with Python's
//! and POSIX semaphores), and an event keeps its state.

use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::{Duration, Instant};

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, ErrorKind, Result};
use crate::sys::{self, Mapping};
use crate::transport::fd::Fd;

/// Bytes of a primitive's page (its memfd).
const PAGE: usize = 64;

/// Marks a page of this layout ("MPS1").
const MAGIC: u32 = 0x4d50_5331;

/// Words of the page.
const W_MAGIC: usize = 0;
const W_KIND: usize = 1;
/// The state: an event's flag, a semaphore's count.
const W_STATE: usize = 2;
/// Processes and threads asleep (or about to sleep) on the state word.
const W_WAITERS: usize = 3;
/// A bounded semaphore's bound; 0 for none.
const W_BOUND: usize = 4;

/// Where a lock's mutex lies in its page.
const MUTEX_AT: usize = 16;

/// What a page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum Kind {
    Event = 1,
    Semaphore = 2,
    Lock = 3,
    RLock = 4,
    AtomicU64 = 5,
}

/// A primitive's page: the memfd and this process's mapping of it.
struct Page {
    fd: OwnedFd,
    map: Mapping,
}

impl Page {
    fn new(kind: Kind) -> Result<Page> {
        let io = |what: &str, e| Error::io(format!("synchronization page: {what}"), e);
        let fd = sys::memfd("multiproc-sync", PAGE).map_err(|e| io("memfd_create", e))?;
        sys::seal_size(fd.as_fd()).map_err(|e| io("seal", e))?;
        let map = Mapping::writable(fd.as_fd(), PAGE).map_err(|e| io("mmap", e))?;
        let page = Page { fd, map };
        page.word(W_KIND).store(kind as u32, SeqCst);
        page.word(W_MAGIC).store(MAGIC, SeqCst);
        Ok(page)
    }

    fn word(&self, index: usize) -> &AtomicU32 {
        &self.map.atomic_words()[index]
    }

    /// Waits until `ready` holds of the state word, or `deadline` passes (false). Counts
    /// itself a waiter first, so that whoever changes the state sees it and wakes it.
    fn wait_until(&self, deadline: Option<Instant>, ready: impl Fn(u32) -> bool) -> Result<bool> {
        let (state, waiters) = (self.word(W_STATE), self.word(W_WAITERS));
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

    /// Wakes up to `count` waiters of the state word, if there are any.
    fn wake(&self, count: u32) {
        if self.word(W_WAITERS).load(SeqCst) > 0 {
            sys::futex_wake(self.word(W_STATE), count);
        }
    }

    fn try_clone(&self) -> Result<Page> {
        let fd = self.fd.try_clone().map_err(|e| Error::io("dup of a synchronization page", e))?;
        let map = Mapping::writable(fd.as_fd(), PAGE)
            .map_err(|e| Error::io("mmap of a synchronization page", e))?;
        Ok(Page { fd, map })
    }

    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        Fd::new(self.fd.as_fd()).serialize(serializer)
    }

    /// Maps a received page, checking that it is one of ours, of `kind`, that no process can
    /// resize (a shrunk page would fault), before any word is used.
    fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
        kind: Kind,
    ) -> std::result::Result<Page, D::Error> {
        let fd = Fd::<OwnedFd>::deserialize(deserializer)?.into_inner();
        let sealed = sys::is_size_sealed(fd.as_fd()).map_err(D::Error::custom)?;
        if !sealed {
            return Err(D::Error::custom("a synchronization page whose size is not sealed"));
        }
        let map = Mapping::writable(fd.as_fd(), PAGE).map_err(D::Error::custom)?;
        let page = Page { fd, map };
        if page.word(W_MAGIC).load(SeqCst) != MAGIC || page.word(W_KIND).load(SeqCst) != kind as u32
        {
            return Err(D::Error::custom(format!("not a multiproc {kind:?}")));
        }
        Ok(page)
    }
}

/// The wire form of a primitive that is its page: the page's descriptor, checked for `kind`
/// when received.
macro_rules! page_wire {
    ($name:ident, $kind:expr) => {
        impl Serialize for $name {
            fn serialize<S: Serializer>(
                &self,
                serializer: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                self.page.serialize(serializer)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(
                deserializer: D,
            ) -> std::result::Result<Self, D::Error> {
                Ok($name { page: Page::deserialize(deserializer, $kind)? })
            }
        }
    };
}

/// The mutex of a lock's page.
fn mutex_of(page: &Page) -> sys::RobustMutex<'_> {
    sys::RobustMutex::at(&page.map, MUTEX_AT).expect("a lock page holds its mutex")
}

/// A lock shared between processes that survives the death of its holder (Python's `Lock`,
/// with `std::sync::Mutex`'s poisoning): when the process (or thread) holding it dies, even
/// by SIGKILL, the next [`lock`](Self::lock) takes it and returns [`LockError::OwnerDied`]
/// with the guard, so that the caller can repair what the lock protects.
///
/// A guard is released by the thread that took it (it is not `Send`), so a lock can never be
/// released by a thread that does not hold it; locking it again from the thread that holds it
/// is an error, not a deadlock (see [`RLock`] for a lock that may be re-entered).
pub struct Lock {
    page: Page,
}

/// The held state of a [`Lock`] or [`RLock`]; dropping it releases the lock.
#[must_use = "the lock is released when the guard is dropped"]
pub struct LockGuard<'a> {
    mutex: sys::RobustMutex<'a>,
    /// Released by the thread that took it.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        let _ = self.mutex.unlock();
    }
}

impl fmt::Debug for LockGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LockGuard")
    }
}

/// Why a lock was not simply taken.
#[derive(Debug)]
pub enum LockError<'a> {
    /// The lock is held now, but its previous holder died holding it: what it protects may be
    /// half-changed. The guard is inside.
    OwnerDied(LockGuard<'a>),
    /// The lock could not be taken (this thread holds it already, or the memory is broken).
    Failed(Error),
}

impl<'a> LockError<'a> {
    /// The guard, if the lock was taken (from an owner that died).
    pub fn into_guard(self) -> Option<LockGuard<'a>> {
        match self {
            LockError::OwnerDied(guard) => Some(guard),
            LockError::Failed(_) => None,
        }
    }
}

impl fmt::Display for LockError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::OwnerDied(_) => {
                f.write_str("the previous holder of the lock died holding it")
            }
            LockError::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// Takes `page`'s mutex until `deadline`: `Ok(None)` if it passed first.
fn lock_page(
    page: &Page,
    deadline: Option<Instant>,
) -> std::result::Result<Option<LockGuard<'_>>, LockError<'_>> {
    let mutex = mutex_of(page);
    let guard = |mutex| LockGuard { mutex, _not_send: std::marker::PhantomData };
    match mutex.lock(deadline) {
        Ok(None) => Ok(None),
        Ok(Some(sys::Acquired::Released)) => Ok(Some(guard(mutex))),
        Ok(Some(sys::Acquired::OwnerDied)) => Err(LockError::OwnerDied(guard(mutex))),
        Err(e) if e.raw_os_error() == Some(libc::EDEADLK) => Err(LockError::Failed(Error::new(
            ErrorKind::InvalidState,
            "this thread holds the lock already (use an RLock to re-enter it)",
        ))),
        Err(e) => Err(LockError::Failed(Error::io("locking", e))),
    }
}

/// A page with a fresh robust mutex in it.
fn lock_page_new(kind: Kind) -> Result<Page> {
    let page = Page::new(kind)?;
    mutex_of(&page).init(kind == Kind::RLock).map_err(|e| Error::io("initialising a lock", e))?;
    Ok(page)
}

macro_rules! lock_api {
    ($name:ident, $kind:expr) => {
        impl $name {
            /// A new lock, not held.
            pub fn new() -> Result<$name> {
                Ok($name { page: lock_page_new($kind)? })
            }

            /// Takes the lock, waiting as long as it takes.
            pub fn lock(&self) -> std::result::Result<LockGuard<'_>, LockError<'_>> {
                lock_page(&self.page, None).map(|guard| guard.expect("no deadline"))
            }

            /// Takes the lock if it is free now; `Ok(None)` if it is held.
            pub fn try_lock(&self) -> std::result::Result<Option<LockGuard<'_>>, LockError<'_>> {
                lock_page(&self.page, Some(Instant::now()))
            }

            /// Takes the lock, waiting at most `timeout`; `Ok(None)` if it is still held then.
            pub fn lock_timeout(
                &self,
                timeout: Duration,
            ) -> std::result::Result<Option<LockGuard<'_>>, LockError<'_>> {
                lock_page(&self.page, deadline_in(timeout))
            }

            /// Another handle to the same lock.
            pub fn try_clone(&self) -> Result<$name> {
                Ok($name { page: self.page.try_clone()? })
            }
        }

        page_wire!($name, $kind);

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(stringify!($name))
            }
        }
    };
}

lock_api!(Lock, Kind::Lock);

/// A [`Lock`] that the thread holding it may take again (Python's `RLock`): it is released
/// when every guard of that thread is dropped. It survives the death of its holder as a
/// `Lock` does.
pub struct RLock {
    page: Page,
}

lock_api!(RLock, Kind::RLock);

/// Where a shared atomic's value lies in its page.
const VALUE_AT: usize = 8;

/// A 64-bit integer in shared memory that processes update atomically, for counters that need
/// no lock: `fetch_add` and friends, with `SeqCst` ordering.
///
/// ```no_run
/// # fn main() -> multiproc_core::Result<()> {
/// let done = multiproc_core::SharedAtomicU64::new(0)?;
/// // pass `done.try_clone()?` to each child, which calls `done.fetch_add(1)`...
/// println!("{} finished", done.load());
/// # Ok(()) }
/// ```
pub struct SharedAtomicU64 {
    page: Page,
}

impl SharedAtomicU64 {
    /// A new integer holding `value`.
    pub fn new(value: u64) -> Result<SharedAtomicU64> {
        let atomic = SharedAtomicU64 { page: Page::new(Kind::AtomicU64)? };
        atomic.value().store(value, SeqCst);
        Ok(atomic)
    }

    fn value(&self) -> &std::sync::atomic::AtomicU64 {
        self.page.map.atomic_u64(VALUE_AT).expect("an atomic's page holds its value")
    }

    /// The value now.
    pub fn load(&self) -> u64 {
        self.value().load(SeqCst)
    }

    /// Sets the value.
    pub fn store(&self, value: u64) {
        self.value().store(value, SeqCst);
    }

    /// Sets the value, returning the one before.
    pub fn swap(&self, value: u64) -> u64 {
        self.value().swap(value, SeqCst)
    }

    /// Adds `n` (wrapping), returning the value before.
    pub fn fetch_add(&self, n: u64) -> u64 {
        self.value().fetch_add(n, SeqCst)
    }

    /// Subtracts `n` (wrapping), returning the value before.
    pub fn fetch_sub(&self, n: u64) -> u64 {
        self.value().fetch_sub(n, SeqCst)
    }

    /// Stores the larger of the value and `n`, returning the value before.
    pub fn fetch_max(&self, n: u64) -> u64 {
        self.value().fetch_max(n, SeqCst)
    }

    /// Stores the smaller of the value and `n`, returning the value before.
    pub fn fetch_min(&self, n: u64) -> u64 {
        self.value().fetch_min(n, SeqCst)
    }

    /// Stores `new` if the value is `current`: `Ok(current)`, or `Err(the value)` if it was not.
    pub fn compare_exchange(&self, current: u64, new: u64) -> std::result::Result<u64, u64> {
        self.value().compare_exchange(current, new, SeqCst, SeqCst)
    }

    /// Another handle to the same integer.
    pub fn try_clone(&self) -> Result<SharedAtomicU64> {
        Ok(SharedAtomicU64 { page: self.page.try_clone()? })
    }
}

page_wire!(SharedAtomicU64, Kind::AtomicU64);

impl fmt::Debug for SharedAtomicU64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedAtomicU64").field("value", &self.load()).finish()
    }
}

fn deadline_in(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

/// A flag that processes wait on (Python's `multiprocessing.Event`): `set` wakes every waiter,
/// `clear` resets it.
///
/// ```no_run
/// # fn main() -> multiproc_core::Result<()> {
/// let ready = multiproc_core::Event::new()?;
/// // pass `ready` to a child, which calls `ready.set()`...
/// assert!(ready.wait_timeout(std::time::Duration::from_secs(5))?);
/// # Ok(()) }
/// ```
pub struct Event {
    page: Page,
}

impl Event {
    /// A new event, not set.
    pub fn new() -> Result<Event> {
        Ok(Event { page: Page::new(Kind::Event)? })
    }

    /// Sets the flag and wakes every process and thread waiting on it.
    pub fn set(&self) {
        self.page.word(W_STATE).store(1, SeqCst);
        self.page.wake(u32::MAX);
    }

    /// Resets the flag.
    pub fn clear(&self) {
        self.page.word(W_STATE).store(0, SeqCst);
    }

    /// Whether the flag is set.
    pub fn is_set(&self) -> bool {
        self.page.word(W_STATE).load(SeqCst) != 0
    }

    /// Waits until the flag is set.
    pub fn wait(&self) -> Result<()> {
        self.page.wait_until(None, |state| state != 0).map(drop)
    }

    /// Waits at most `timeout` for the flag; whether it was set.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<bool> {
        self.page.wait_until(deadline_in(timeout), |state| state != 0)
    }

    /// Another handle to the same event.
    pub fn try_clone(&self) -> Result<Event> {
        Ok(Event { page: self.page.try_clone()? })
    }
}

page_wire!(Event, Kind::Event);

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event").field("set", &self.is_set()).finish()
    }
}

/// A counter that processes take from and give back to (Python's
/// `multiprocessing.Semaphore`): `acquire` waits while it is zero.
///
/// It has no owner: any process may release what another acquired, and one that is killed
/// between acquire and release leaves the count one lower for good.
pub struct Semaphore {
    page: Page,
}

impl Semaphore {
    /// A semaphore whose count starts at `value`.
    pub fn new(value: u32) -> Result<Semaphore> {
        let page = Page::new(Kind::Semaphore)?;
        page.word(W_STATE).store(value, SeqCst);
        Ok(Semaphore { page })
    }

    /// Takes one from the count, waiting while it is zero.
    pub fn acquire(&self) -> Result<()> {
        self.acquire_until(None).map(drop)
    }

    /// Takes one if the count is above zero now; never waits.
    pub fn try_acquire(&self) -> Result<bool> {
        self.acquire_until(Some(Instant::now()))
    }

    /// Takes one, waiting at most `timeout`; whether it did.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<bool> {
        self.acquire_until(deadline_in(timeout))
    }

    fn acquire_until(&self, deadline: Option<Instant>) -> Result<bool> {
        let count = self.page.word(W_STATE);
        loop {
            if !self.page.wait_until(deadline, |n| n > 0)? {
                return Ok(false);
            }
            let n = count.load(SeqCst);
            if n > 0 && count.compare_exchange(n, n - 1, SeqCst, SeqCst).is_ok() {
                return Ok(true);
            }
        }
    }

    /// Gives one back, waking one waiter.
    pub fn release(&self) -> Result<()> {
        let count = self.page.word(W_STATE);
        let bound = self.page.word(W_BOUND).load(SeqCst);
        let mut n = count.load(SeqCst);
        loop {
            if (bound != 0 && n >= bound) || n == u32::MAX {
                return Err(Error::new(
                    ErrorKind::InvalidState,
                    format!("semaphore released too many times (its count is {n}, bound {bound})"),
                ));
            }
            match count.compare_exchange(n, n + 1, SeqCst, SeqCst) {
                Ok(_) => break,
                Err(now) => n = now,
            }
        }
        self.page.wake(1);
        Ok(())
    }

    /// The count now (others may change it at any moment).
    pub fn value(&self) -> u32 {
        self.page.word(W_STATE).load(SeqCst)
    }

    /// Another handle to the same semaphore.
    pub fn try_clone(&self) -> Result<Semaphore> {
        Ok(Semaphore { page: self.page.try_clone()? })
    }
}

page_wire!(Semaphore, Kind::Semaphore);

impl fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Semaphore").field("value", &self.value()).finish()
    }
}

/// A [`Semaphore`] whose count may never exceed its start value (Python's
/// `BoundedSemaphore`): a release past it is an [`ErrorKind::InvalidState`] error.
///
/// It dereferences to [`Semaphore`] for `acquire` and `release`.
pub struct BoundedSemaphore {
    semaphore: Semaphore,
}

impl BoundedSemaphore {
    /// A semaphore whose count starts at, and never exceeds, `value`.
    pub fn new(value: u32) -> Result<BoundedSemaphore> {
        let semaphore = Semaphore::new(value)?;
        semaphore.page.word(W_BOUND).store(value.max(1), SeqCst);
        Ok(BoundedSemaphore { semaphore })
    }

    /// Another handle to the same semaphore.
    pub fn try_clone(&self) -> Result<BoundedSemaphore> {
        Ok(BoundedSemaphore { semaphore: self.semaphore.try_clone()? })
    }
}

impl std::ops::Deref for BoundedSemaphore {
    type Target = Semaphore;

    fn deref(&self) -> &Semaphore {
        &self.semaphore
    }
}

impl Serialize for BoundedSemaphore {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.semaphore.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for BoundedSemaphore {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let semaphore = Semaphore::deserialize(deserializer)?;
        if semaphore.page.word(W_BOUND).load(SeqCst) == 0 {
            return Err(D::Error::custom("a plain semaphore where a bounded one was expected"));
        }
        Ok(BoundedSemaphore { semaphore })
    }
}

impl fmt::Debug for BoundedSemaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundedSemaphore").field("value", &self.value()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bounded_semaphore_refuses_a_release_past_its_bound() {
        let semaphore = BoundedSemaphore::new(2).unwrap();
        assert!(semaphore.try_acquire().unwrap());
        semaphore.release().unwrap();
        let error = semaphore.release().expect_err("past the bound");
        assert_eq!(error.kind(), ErrorKind::InvalidState);
        assert_eq!(semaphore.value(), 2);
    }

    /// Encodes `value` and decodes what travels as a `T`.
    fn through_the_wire<Q: Serialize, T: serde::de::DeserializeOwned>(
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
        let unsealed = crate::SharedMemory::new(PAGE).unwrap();
        let refused = through_the_wire::<_, Event>(&unsealed).expect_err("unsealed");
        assert!(refused.contains("not sealed"), "{refused}");
    }

    #[test]
    fn a_lock_is_exclusive_an_rlock_reentrant_and_a_relock_an_error() {
        let lock = Lock::new().unwrap();
        let guard = lock.lock().unwrap();
        assert!(matches!(lock.try_lock(), Err(LockError::Failed(_))), "relocked by its holder");
        let other = lock.try_clone().unwrap();
        let waited = std::thread::spawn(move || {
            other.lock_timeout(Duration::from_millis(20)).map(|g| g.is_some()).unwrap_or(true)
        });
        assert!(!waited.join().unwrap(), "taken by another thread while held");
        drop(guard);
        assert!(lock.try_lock().unwrap().is_some());
        let rlock = RLock::new().unwrap();
        let first = rlock.lock().unwrap();
        let second = rlock.lock().unwrap();
        drop((second, first));
        assert!(rlock.try_lock().unwrap().is_some());
    }

    #[test]
    fn an_event_wakes_a_thread_waiting_on_another_handle() {
        let event = Event::new().unwrap();
        let other = event.try_clone().unwrap();
        let waiter = std::thread::spawn(move || other.wait_timeout(Duration::from_secs(30)));
        event.set();
        assert!(waiter.join().unwrap().unwrap());
        event.clear();
        assert!(!event.wait_timeout(Duration::from_millis(1)).unwrap());
    }
}
