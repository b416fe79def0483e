//! The library's own threads (a pool's progress thread), and how a fork parks them.
//!
//! The fork start method forks only a single-threaded process: a thread that holds a lock at
//! the instant of a fork leaves it locked forever in the child. A thread of ours would make
//! every program that has a pool multi-threaded, and refuse its next fork. So each of our
//! threads marks the stretches where it holds no lock and touches no shared state (blocked in
//! `poll` or a futex wait, its arguments prepared beforehand) as *idle*. A fork parks every
//! one of them first: it waits until the thread is idle and flips it to *parked*; a parked
//! thread that comes back from its syscall waits until the fork is done. The fork then
//! counts them as harmless ([`sys::fork_single_threaded`] is told how many), and the child,
//! which has none of them, forgets them.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::error::{Error, ErrorKind};
use crate::sys::{self, Forked};

/// Running: may hold locks; a fork waits for it.
const BUSY: u32 = 0;
/// Blocked (or about to block) in a syscall, holding nothing.
const IDLE: u32 = 1;
/// Idle, and held there by a fork in progress.
const PARKED: u32 = 2;
/// Ending: holds nothing, and will not run our code again.
const GONE: u32 = 3;

/// The state of every library thread alive in this process.
static THREADS: Mutex<Vec<Arc<AtomicU32>>> = Mutex::new(Vec::new());

/// How many [`THREADS`] holds, kept beside it so that a fork in a program without any reads
/// an atomic instead of taking the lock: taking it writes to its page, and a forked child's
/// first write to a page it shares is a copy-on-write fault of its own.
static COUNT: AtomicUsize = AtomicUsize::new(0);

fn threads() -> MutexGuard<'static, Vec<Arc<AtomicU32>>> {
    THREADS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A library thread's registration: made before the thread is spawned (so that no fork can
/// happen between its birth and its registration), moved into it, dropped when it ends. The
/// thread counts as busy until it first goes idle.
#[derive(Debug)]
pub struct LibraryThread {
    state: Arc<AtomicU32>,
}

impl LibraryThread {
    /// Registers a thread about to be spawned, which takes this registration along.
    pub fn register() -> LibraryThread {
        let state = Arc::new(AtomicU32::new(BUSY));
        let mut threads = threads();
        threads.push(Arc::clone(&state));
        COUNT.store(threads.len(), SeqCst);
        LibraryThread { state }
    }

    /// Runs `blocking`, a syscall that holds no lock and allocates nothing, as idle: a fork
    /// may happen meanwhile. Afterwards, waits until any fork in progress is done.
    pub fn idle<T>(&self, blocking: impl FnOnce() -> T) -> T {
        self.state.store(IDLE, SeqCst);
        let value = blocking();
        while self.state.compare_exchange(IDLE, BUSY, SeqCst, SeqCst).is_err() {
            // Parked: the forking thread wakes us once it is done.
            let _ = sys::futex_wait(&self.state, PARKED, None);
        }
        value
    }
}

impl Drop for LibraryThread {
    fn drop(&mut self) {
        // A fork that took its list before this removal must not wait for us to go idle.
        self.state.store(GONE, SeqCst);
        let mut threads = threads();
        threads.retain(|state| !Arc::ptr_eq(state, &self.state));
        COUNT.store(threads.len(), SeqCst);
    }
}

/// The library threads a fork has parked; unparked on drop.
struct Parked(Vec<Arc<AtomicU32>>);

impl Parked {
    /// Parks every library thread, waiting for each busy one to go idle (they are busy for
    /// the microseconds of a pool's bookkeeping, or while a pool starts a worker).
    fn all() -> Parked {
        let states: Vec<Arc<AtomicU32>> = threads().clone();
        let mut parked = Vec::with_capacity(states.len());
        for state in states {
            loop {
                match state.compare_exchange(IDLE, PARKED, SeqCst, SeqCst) {
                    Ok(_) => {
                        parked.push(state);
                        break;
                    }
                    // Ending: nothing of ours left to run (the fork waits for it to vanish).
                    Err(GONE) => break,
                    Err(_) => std::thread::sleep(Duration::from_micros(50)),
                }
            }
        }
        Parked(parked)
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        for state in &self.0 {
            state.store(IDLE, SeqCst);
            sys::futex_wake(state, 1);
        }
    }
}

/// [`sys::fork_single_threaded`] with the library's own threads parked: a program whose only
/// other threads are ours may fork. In the child, which has none of them, they are forgotten.
pub fn fork_parked(close_in_child: &[BorrowedFd<'_>]) -> Result<Forked, (usize, std::io::Error)> {
    if COUNT.load(SeqCst) == 0 {
        return sys::fork_single_threaded(close_in_child, 0);
    }
    let parked = Parked::all();
    let forked = sys::fork_single_threaded(close_in_child, parked.0.len());
    if let Ok(Forked::Child) = forked {
        // Their threads do not exist here: nobody to unpark, nothing to wait for at the next
        // fork.
        std::mem::forget(parked);
        threads().clear();
        COUNT.store(0, SeqCst);
    }
    forked
}

/// The error of a [`fork_parked`] that failed: refused with `count` threads, or the OS error.
pub fn fork_error(count: usize, error: std::io::Error) -> Error {
    if count <= 1 {
        return Error::io("fork", error);
    }
    let ours = self::count();
    let of_which =
        if ours > 0 { format!(" ({ours} of them multiproc's own)") } else { String::new() };
    Error::new(
        ErrorKind::ForkRefused,
        format!(
            "fork refused: the calling process has {count} threads{of_which}, and a forked \
             child could deadlock on a lock one of them holds; use the forkserver start method \
             (Context::new(\"forkserver\")), which forks in a single-threaded server"
        ),
    )
}

/// How many library threads this process has.
pub fn count() -> usize {
    COUNT.load(SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fork_waits_for_a_busy_thread_and_holds_it_while_forking() {
        let (to_thread, from_main) = std::sync::mpsc::channel::<()>();
        let (to_main, from_thread) = std::sync::mpsc::channel::<&'static str>();
        let worker = std::thread::spawn(move || {
            let me = LibraryThread::register();
            to_main.send("registered").unwrap();
            from_main.recv().unwrap();
            // Busy until here; then idle in a "syscall" that outlasts the parking.
            me.idle(|| std::thread::sleep(Duration::from_millis(20)));
            to_main.send("back").unwrap();
        });
        assert_eq!(from_thread.recv().unwrap(), "registered");
        let state = Arc::clone(&threads().last().expect("registered").clone());
        to_thread.send(()).unwrap();
        let parked = Parked::all();
        assert_eq!(state.load(SeqCst), PARKED, "parked once idle");
        // The thread's syscall has ended by now, but it may not go on while parked.
        assert!(from_thread.recv_timeout(Duration::from_millis(100)).is_err(), "ran while parked");
        drop(parked);
        assert_eq!(from_thread.recv_timeout(Duration::from_secs(10)), Ok("back"));
        worker.join().unwrap();
    }
}
