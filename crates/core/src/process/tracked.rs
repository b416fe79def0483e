//! The descriptors of pipes and queues alive in this process, which a child forked by the fork
//! start method closes unless it was given them.
//!
//! A spawned child never has them; a forked one would inherit every one. For a pipe that is a
//! real bug, not just a leak: the copy a child inherited of its parent's end would keep the pipe
//! open after the parent dropped it, and the child would wait for end-of-file forever.

use std::collections::BTreeSet;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;

use crate::transport::codec;

static LIVE: Mutex<BTreeSet<RawFd>> = Mutex::new(BTreeSet::new());

/// How many descriptors [`LIVE`] holds, kept beside it so that a program with none can tell
/// without taking the lock: taking it writes to its page, which after every fork is a
/// copy-on-write fault of its own.
static COUNT: AtomicUsize = AtomicUsize::new(0);

fn live() -> MutexGuard<'static, BTreeSet<RawFd>> {
    LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Records `fd` as a pipe or queue descriptor owned by this process.
pub fn track(fd: RawFd) {
    let mut live = live();
    live.insert(fd);
    COUNT.store(live.len(), Ordering::Release);
}

/// Forgets `fd`; called as its owner closes it.
pub fn untrack(fd: RawFd) {
    let mut live = live();
    live.remove(&fd);
    COUNT.store(live.len(), Ordering::Release);
}

/// The tracked descriptors that `keep` does not hold: what a forked child must close. Free when
/// the program has none (`keep` is not walked then).
pub fn to_close_in_child<K: Serialize + ?Sized>(keep: &K) -> Vec<RawFd> {
    if COUNT.load(Ordering::Acquire) == 0 {
        return Vec::new();
    }
    let live: Vec<RawFd> = live().iter().copied().collect();
    if live.is_empty() {
        return live;
    }
    let kept = codec::fds_in(keep);
    live.into_iter().filter(|fd| !kept.contains(fd)).collect()
}

/// The tracked descriptors other than `kept`.
pub fn other_than(kept: &[RawFd]) -> Vec<RawFd> {
    if COUNT.load(Ordering::Acquire) == 0 {
        return Vec::new();
    }
    live().iter().copied().filter(|fd| !kept.contains(fd)).collect()
}

/// A descriptor owner that is tracked while it lives: forked children close its descriptor.
#[derive(Debug)]
pub struct Tracked<T: std::os::fd::AsFd>(T);

impl<T: std::os::fd::AsFd> Tracked<T> {
    /// Tracks `inner`'s descriptor until the returned value is dropped.
    pub fn new(inner: T) -> Tracked<T> {
        use std::os::fd::AsRawFd;
        track(inner.as_fd().as_raw_fd());
        Tracked(inner)
    }
}

impl<T: std::os::fd::AsFd> std::ops::Deref for Tracked<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: std::os::fd::AsFd> std::ops::DerefMut for Tracked<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: std::os::fd::AsFd> Drop for Tracked<T> {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        untrack(self.0.as_fd().as_raw_fd());
    }
}
