//! [`Lock`], [`RLock`] and [`Condition`]: process-shared robust mutexes, which the kernel hands
//! on when their holder dies, and a condition variable over one.

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use super::{Kind, Page, W_STATE, deadline_in, page_wire};
use crate::error::{Error, ErrorKind, Result};
use crate::sys;

/// How often an async locker looks again at a lock no one has rung the bell for: a holder that
/// died does not unlock, and only a locker's attempt learns it (sync lockers are woken by the
/// kernel).
#[cfg(feature = "tokio")]
const RECHECK: Duration = Duration::from_millis(10);

/// A lock shared between processes that survives the death of its holder (Python's `Lock`,
/// with `std::sync::Mutex`'s poisoning): when the process (or thread) holding it dies, even
/// by SIGKILL, the next [`lock`](Self::lock) takes it and returns [`LockError::OwnerDied`]
/// with the guard, so that the caller can repair what the lock protects.
///
/// A guard is released by the thread that took it (it is not `Send`), so a lock can never be
/// released by a thread that does not hold it; locking it again from the thread that holds it
/// is an error, not a deadlock (see [`RLock`] for a lock that may be re-entered).
///
/// ```no_run
/// # fn main() -> multiproc_core::Result<()> {
/// use multiproc_core::{Lock, LockError};
/// let lock = Lock::new()?;
/// // pass `lock.try_clone()?` to children, which take it the same way...
/// let guard = match lock.lock() {
///     Ok(guard) => guard,
///     // A holder died mid-change: repair what the lock protects, then carry on.
///     Err(LockError::OwnerDied(guard)) => guard,
///     Err(LockError::Failed(e)) => return Err(e),
/// };
/// drop(guard);
/// # Ok(()) }
/// ```
pub struct Lock {
    page: Page,
}

/// The held state of a [`Lock`], [`RLock`] or [`Condition`]; dropping it releases the lock.
#[must_use = "the lock is released when the guard is dropped"]
pub struct LockGuard<'a> {
    /// `None` once released, in `drop`.
    held: Option<sys::RobustGuard<'a>>,
    page: &'a Page,
    /// Released by the thread that took it.
    _not_send: PhantomData<*const ()>,
}

impl LockGuard<'_> {
    /// The `len` bytes at `offset` of the page, which the lock guards.
    pub(super) fn bytes_mut(&mut self, offset: usize, len: usize) -> &mut [u8] {
        let held = self.held.as_mut().expect("held until dropped");
        held.bytes_mut(&self.page.map, offset, len).expect("guarded bytes of the page")
    }

    /// As [`bytes_mut`](Self::bytes_mut), to read.
    pub(super) fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        let held = self.held.as_ref().expect("held until dropped");
        held.bytes(&self.page.map, offset, len).expect("guarded bytes of the page")
    }

    /// Whether this guard holds `page`'s lock.
    fn holds(&self, page: &Page) -> bool {
        std::ptr::eq(self.page, page)
    }
}

impl Drop for LockGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        drop(self.held.take());
        // Without the fence of `ring`: an async locker that counted itself just as the lock
        // was released, and is not seen here, takes it at its next look, `RECHECK` later. The
        // fence would cost every unlock more than the rest of it.
        self.page.ring_unfenced();
    }
}

impl fmt::Debug for LockGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LockGuard")
    }
}

/// Why a lock was not simply taken; `G` is what the call would have returned.
#[derive(Debug)]
pub enum LockError<G> {
    /// The lock is held now, but its previous holder died holding it: what it protects may be
    /// half-changed. What the call returns (its guard) is inside.
    OwnerDied(G),
    /// The lock could not be taken (this thread holds it already, a guard of another lock was
    /// given, or the memory is broken).
    Failed(Error),
}

/// What taking a lock gives: the guard, or why not (with the guard, if its owner died).
pub type LockResult<G> = std::result::Result<G, LockError<G>>;

/// What trying to take a lock gives: `Ok(None)` if it was held until the call gave up.
pub type TryLockResult<G> = std::result::Result<Option<G>, LockError<G>>;

impl<G> LockError<G> {
    /// The guard, if the lock was taken (from an owner that died).
    pub fn into_guard(self) -> Option<G> {
        match self {
            LockError::OwnerDied(guard) => Some(guard),
            LockError::Failed(_) => None,
        }
    }

    /// Changes what an [`OwnerDied`](Self::OwnerDied) error carries.
    pub fn map<H>(self, f: impl FnOnce(G) -> H) -> LockError<H> {
        match self {
            LockError::OwnerDied(guard) => LockError::OwnerDied(f(guard)),
            LockError::Failed(e) => LockError::Failed(e),
        }
    }
}

impl<G> fmt::Display for LockError<G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::OwnerDied(_) => {
                f.write_str("the previous holder of the lock died holding it")
            }
            LockError::Failed(e) => write!(f, "{e}"),
        }
    }
}

impl<G: fmt::Debug> std::error::Error for LockError<G> {}

/// An [`ErrorKind::OwnerDied`] error for a dead owner (its guard is dropped, so the lock is
/// released), the error itself for a failure.
impl<G> From<LockError<G>> for Error {
    fn from(error: LockError<G>) -> Error {
        match error {
            LockError::OwnerDied(_) => Error::new(ErrorKind::OwnerDied, error.to_string()),
            LockError::Failed(e) => e,
        }
    }
}

/// The guard, also from a holder that died: for callers about to overwrite what it guards.
pub(super) fn even_if_owner_died<G>(taken: LockResult<G>) -> Result<G> {
    match taken {
        Ok(guard) | Err(LockError::OwnerDied(guard)) => Ok(guard),
        Err(LockError::Failed(e)) => Err(e),
    }
}

/// Takes `page`'s lock until `deadline`: `Ok(None)` if it passed first.
#[inline]
pub(super) fn lock_page(page: &Page, deadline: Option<Instant>) -> TryLockResult<LockGuard<'_>> {
    let guard = |held| LockGuard { held: Some(held), page, _not_send: PhantomData };
    match page.mutex().lock(deadline) {
        Ok(None) => Ok(None),
        Ok(Some((sys::Acquired::Released, held))) => Ok(Some(guard(held))),
        Ok(Some((sys::Acquired::OwnerDied, held))) => Err(LockError::OwnerDied(guard(held))),
        Err(e) if e.raw_os_error() == Some(libc::EDEADLK) => Err(LockError::Failed(Error::new(
            ErrorKind::InvalidState,
            "this thread holds the lock already (use an RLock to re-enter it)",
        ))),
        Err(e) => Err(LockError::Failed(Error::io("locking", e))),
    }
}

/// Takes `page`'s lock, waiting in the tokio runtime's reactor.
#[cfg(feature = "tokio")]
pub(super) async fn lock_page_async(page: &Page) -> LockResult<LockGuard<'_>> {
    let attempt = || match lock_page(page, Some(Instant::now())) {
        Ok(None) => Ok(None),
        taken => Ok(Some(taken)),
    };
    match page.until_async(Some(RECHECK), attempt).await {
        Ok(Ok(guard)) => Ok(guard.expect("taken")),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(LockError::Failed(e)),
    }
}

/// A page of `kind` with a fresh robust mutex in it.
pub(super) fn lock_page_new(kind: Kind, len: usize) -> Result<Page> {
    let page = Page::new(kind, len)?;
    page.mutex().init(kind == Kind::RLock).map_err(|e| Error::io("initialising a lock", e))?;
    Ok(page)
}

/// The taking of a lock, for each type that is (or has) one.
macro_rules! lock_api {
    ($name:ident, $kind:expr) => {
        impl $name {
            /// Takes the lock, waiting as long as it takes.
            #[inline]
            pub fn lock(&self) -> LockResult<LockGuard<'_>> {
                lock_page(&self.page, None).map(|guard| guard.expect("no deadline"))
            }

            /// Takes the lock if it is free now; `Ok(None)` if it is held.
            pub fn try_lock(&self) -> TryLockResult<LockGuard<'_>> {
                lock_page(&self.page, Some(Instant::now()))
            }

            /// Takes the lock, waiting at most `timeout`; `Ok(None)` if it is still held then.
            pub fn lock_timeout(&self, timeout: Duration) -> TryLockResult<LockGuard<'_>> {
                lock_page(&self.page, deadline_in(timeout))
            }

            /// Takes the lock, waiting in the tokio runtime's reactor (no thread waits); a
            /// holder that died is noticed within about 10 ms. The guard is not `Send`: a
            /// task that holds it across an `.await` must run on one thread (a current-thread
            /// runtime or a `LocalSet`), since only the thread that took the lock may release
            /// it. Dropping the future before it finished took nothing.
            #[cfg(feature = "tokio")]
            pub async fn lock_async(&self) -> LockResult<LockGuard<'_>> {
                lock_page_async(&self.page).await
            }

            /// Another handle to the same lock.
            pub fn try_clone(&self) -> Result<$name> {
                Ok($name { page: self.page.try_clone()? })
            }

            fn from_page(page: Page) -> $name {
                $name { page }
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

impl Lock {
    /// A new lock, not held.
    pub fn new() -> Result<Lock> {
        Ok(Lock { page: lock_page_new(Kind::Lock, 0)? })
    }
}

/// A [`Lock`] that the thread holding it may take again (Python's `RLock`): it is released
/// when every guard of that thread is dropped. It survives the death of its holder as a
/// `Lock` does, and since its guards are not `Send`, no thread can release it that does not
/// hold it.
pub struct RLock {
    page: Page,
}

lock_api!(RLock, Kind::RLock);

impl RLock {
    /// A new lock, not held.
    pub fn new() -> Result<RLock> {
        Ok(RLock { page: lock_page_new(Kind::RLock, 0)? })
    }
}

/// A condition variable between processes over its own [`Lock`] (Python's `Condition`): a
/// process holding the lock waits, releasing it, until another notifies; the waiter holds the
/// lock again when `wait` returns. The lock survives its holder's death as a `Lock` does: a
/// wait that takes it back from a dead holder returns [`LockError::OwnerDied`].
///
/// Waits may return without a notification (a spurious wake-up, and every async waiter wakes
/// on `notify_one`): test the condition in a loop, or use [`wait_while`](Self::wait_while).
///
/// ```no_run
/// # fn main() -> multiproc_core::Result<()> {
/// use multiproc_core::{Condition, SharedAtomicU64};
/// let ready = Condition::new()?;
/// let items = SharedAtomicU64::new(0)?;
/// // A producer, in another process, takes `ready.lock()`, adds to `items`, and calls
/// // `ready.notify_one()`. The consumer:
/// let guard = ready.lock().expect("the lock");
/// let guard = ready.wait_while(guard, || items.load() == 0).expect("the lock again");
/// drop(guard);
/// # Ok(()) }
/// ```
pub struct Condition {
    page: Page,
}

lock_api!(Condition, Kind::Condition);

impl Condition {
    /// A new condition, with its lock not held.
    pub fn new() -> Result<Condition> {
        Ok(Condition { page: lock_page_new(Kind::Condition, 0)? })
    }

    /// Releases `guard` (of this condition's lock), waits to be notified, and takes the lock
    /// again.
    pub fn wait<'a>(&'a self, guard: LockGuard<'a>) -> LockResult<LockGuard<'a>> {
        self.wait_until(guard, None).map(|(guard, _)| guard).map_err(|e| e.map(|(guard, _)| guard))
    }

    /// As [`wait`](Self::wait), for at most `timeout`; with the guard, whether it was notified
    /// (false: the timeout passed).
    pub fn wait_timeout<'a>(
        &'a self,
        guard: LockGuard<'a>,
        timeout: Duration,
    ) -> LockResult<(LockGuard<'a>, bool)> {
        self.wait_until(guard, deadline_in(timeout))
    }

    /// Waits, as [`wait`](Self::wait), for as long as `condition` holds (tested with the lock
    /// held, first before any wait).
    pub fn wait_while<'a>(
        &'a self,
        guard: LockGuard<'a>,
        condition: impl FnMut() -> bool,
    ) -> LockResult<LockGuard<'a>> {
        self.wait_while_until(guard, None, condition)
            .map(|(guard, _)| guard)
            .map_err(|e| e.map(|(guard, _)| guard))
    }

    /// As [`wait_while`](Self::wait_while), for at most `timeout`; with the guard, whether
    /// `condition` stopped holding (false: the timeout passed first).
    pub fn wait_timeout_while<'a>(
        &'a self,
        guard: LockGuard<'a>,
        timeout: Duration,
        condition: impl FnMut() -> bool,
    ) -> LockResult<(LockGuard<'a>, bool)> {
        self.wait_while_until(guard, deadline_in(timeout), condition)
    }

    fn wait_while_until<'a>(
        &'a self,
        mut guard: LockGuard<'a>,
        deadline: Option<Instant>,
        mut condition: impl FnMut() -> bool,
    ) -> LockResult<(LockGuard<'a>, bool)> {
        while condition() {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok((guard, false));
            }
            guard = self.wait_until(guard, deadline)?.0;
        }
        Ok((guard, true))
    }

    fn wait_until<'a>(
        &'a self,
        guard: LockGuard<'a>,
        deadline: Option<Instant>,
    ) -> LockResult<(LockGuard<'a>, bool)> {
        let seen = self.release_for_wait(guard).map_err(LockError::Failed)?;
        let notified = self.page.wait_until(deadline, |generation| generation != seen);
        let relocked = lock_page(&self.page, None).map(|guard| guard.expect("no deadline"));
        match (relocked, notified) {
            (Ok(guard), Ok(notified)) => Ok((guard, notified)),
            (Err(LockError::OwnerDied(guard)), Ok(notified)) => {
                Err(LockError::OwnerDied((guard, notified)))
            }
            (Err(LockError::Failed(e)), _) | (_, Err(e)) => Err(LockError::Failed(e)),
        }
    }

    /// Checks that `guard` holds this condition's lock, notes the generation, and releases it.
    fn release_for_wait(&self, guard: LockGuard<'_>) -> Result<u32> {
        if !guard.holds(&self.page) {
            return Err(Error::new(
                ErrorKind::InvalidState,
                "a condition waits with a guard of its own lock",
            ));
        }
        let seen = self.page.word(W_STATE).load(SeqCst);
        drop(guard);
        Ok(seen)
    }

    /// As [`wait`](Self::wait), in the tokio runtime's reactor (no thread waits). The lock is
    /// released when this is called, not when the future is first polled; a future dropped
    /// before it finished leaves the lock released.
    #[cfg(feature = "tokio")]
    pub fn wait_async<'a>(
        &'a self,
        guard: LockGuard<'a>,
    ) -> impl std::future::Future<Output = LockResult<LockGuard<'a>>> + Send + 'a {
        let seen = self.release_for_wait(guard);
        async move {
            let seen = seen.map_err(LockError::Failed)?;
            let generation = self.page.word(W_STATE);
            self.page
                .until_async(None, || Ok((generation.load(SeqCst) != seen).then_some(())))
                .await
                .map_err(LockError::Failed)?;
            lock_page_async(&self.page).await
        }
    }

    /// Wakes one process or thread waiting on the condition (at least one, if any waits).
    /// Python requires the lock held; here it need not be, but a change made under the lock
    /// and notified after is what waiters can rely on.
    pub fn notify_one(&self) {
        self.page.word(W_STATE).fetch_add(1, SeqCst);
        self.page.wake(1);
    }

    /// Wakes every process and thread waiting on the condition.
    pub fn notify_all(&self) {
        self.page.word(W_STATE).fetch_add(1, SeqCst);
        self.page.wake(u32::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_condition_hands_a_change_to_a_thread_on_another_handle_and_refuses_a_foreign_guard() {
        let condition = Condition::new().unwrap();
        let count = super::super::SharedAtomicU64::new(0).unwrap();
        let (theirs, their_count) = (condition.try_clone().unwrap(), count.try_clone().unwrap());
        let consumer = std::thread::spawn(move || {
            let guard = theirs.lock().unwrap();
            let (guard, done) = theirs
                .wait_timeout_while(guard, Duration::from_secs(30), || their_count.load() < 3)
                .unwrap();
            drop(guard);
            done
        });
        for _ in 0..3 {
            let _guard = condition.lock().unwrap();
            count.fetch_add(1);
            condition.notify_one();
        }
        assert!(consumer.join().unwrap(), "the consumer saw all three");
        let guard = condition.lock().unwrap();
        let (guard, notified) = condition.wait_timeout(guard, Duration::from_millis(5)).unwrap();
        assert!(!notified, "nobody notified");
        drop(guard);
        let lock = Lock::new().unwrap();
        let foreign = lock.lock().unwrap();
        assert!(matches!(condition.wait(foreign), Err(LockError::Failed(_))));
    }
}
