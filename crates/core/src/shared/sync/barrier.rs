//! [`Barrier`]: parties that wait for each other, and that learn when one of them died waiting.
//!
//! Past the header (generation as the futex word, the parties, and a robust mutex over the
//! arrival count) the page holds the arrival count, the broken flag, and a slot per waiting
//! party: its pid while it waits, zero when free. Waiters look at the pids of the others every
//! [`RECHECK`]; a pid whose process ended (its pidfd is readable, or it is gone) breaks the
//! barrier for all. Twice as many slots as parties leave room for the parties of a generation
//! that has not yet cleared theirs beside the next generation's.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::{Duration, Instant};

use super::lock::{LockGuard, lock_page, lock_page_new};
use super::{HEADER, Kind, LockError, Page, W_EXTRA, W_STATE, deadline_in, page_wire};
use crate::error::{Error, ErrorKind, Result};
use crate::sys;

/// Parties that arrived in this generation.
const COUNT_AT: usize = HEADER;
/// Not zero once the barrier is broken.
const BROKEN_AT: usize = HEADER + 4;
/// One more than the last generation a [`Barrier::reset`] ended with parties waiting: they
/// are told the barrier broke, not that their round completed.
const RESET_AT: usize = HEADER + 8;
/// The first party slot.
const SLOTS_AT: usize = HEADER + 64;
/// The most parties a barrier may have.
const MAX_PARTIES: u32 = 1 << 16;

/// How often a waiting party looks at whether the others still live.
const RECHECK: Duration = Duration::from_millis(10);

/// Parties (processes or threads) that wait for each other (Python's `Barrier`): each
/// [`wait`](Self::wait) returns when the last of them arrives, then the barrier is ready for the
/// next round. One waiter of each round is told it is the leader.
///
/// A barrier breaks, for every party waiting on it and every later one, when a party waiting on
/// it dies (SIGKILL included: the others notice within about 10 ms), when one's
/// [`wait_timeout`](Self::wait_timeout) passes or its [`wait_async`](Self::wait_async) future
/// is dropped unfinished, and on [`abort`](Self::abort). Waits then fail with
/// [`ErrorKind::BrokenBarrier`] until [`reset`](Self::reset). A party that dies before it
/// arrives cannot be told from a slow one: give waits a timeout where that matters.
///
/// ```no_run
/// # fn main() -> multiproc_core::Result<()> {
/// let start = multiproc_core::Barrier::new(4)?;
/// // pass `start.try_clone()?` to three children, which call `start.wait()?` too...
/// if start.wait()?.is_leader() {
///     println!("all four are here");
/// }
/// # Ok(()) }
/// ```
pub struct Barrier {
    page: Page,
}

/// What a [`Barrier`] wait tells its party.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarrierWaitResult {
    index: u32,
    parties: u32,
}

impl BarrierWaitResult {
    /// Whether this party was the round's leader (the last to arrive; one per round).
    pub fn is_leader(&self) -> bool {
        self.index + 1 == self.parties
    }

    /// The order in which this party arrived, from 0 to `parties - 1` (Python's return value).
    pub fn index(&self) -> u32 {
        self.index
    }
}

/// A party that arrived and waits: its slot, and the generation it waits to end.
struct Arrival {
    generation: u32,
    index: u32,
    slot: usize,
}

impl Barrier {
    /// A barrier for `parties` parties (1 to 65,536).
    pub fn new(parties: u32) -> Result<Barrier> {
        if !(1..=MAX_PARTIES).contains(&parties) {
            return Err(Error::new(
                ErrorKind::InvalidState,
                format!("a barrier has 1 to {MAX_PARTIES} parties, not {parties}"),
            ));
        }
        let page = lock_page_new(Kind::Barrier, Self::bytes(parties))?;
        page.word(W_EXTRA).store(parties, SeqCst);
        Ok(Barrier { page })
    }

    fn from_page(page: Page) -> Barrier {
        Barrier { page }
    }

    /// The bytes of a page for `parties`.
    fn bytes(parties: u32) -> usize {
        SLOTS_AT + 8 * parties as usize
    }

    /// The parties it waits for.
    pub fn parties(&self) -> u32 {
        self.page.word(W_EXTRA).load(SeqCst)
    }

    /// How many parties are waiting now.
    pub fn n_waiting(&self) -> u32 {
        self.page.word(COUNT_AT).load(SeqCst)
    }

    /// Whether it is broken.
    pub fn is_broken(&self) -> bool {
        self.page.word(BROKEN_AT).load(SeqCst) != 0
    }

    /// Breaks the barrier: every party waiting, and every later one, gets
    /// [`ErrorKind::BrokenBarrier`].
    pub fn abort(&self) {
        self.page.word(BROKEN_AT).store(1, SeqCst);
        self.page.wake(u32::MAX);
    }

    /// Returns the barrier to its empty, unbroken state (Python's `reset()`): the parties
    /// waiting now get [`ErrorKind::BrokenBarrier`], and later ones start a new round.
    pub fn reset(&self) {
        // A state lock whose holder died is taken back here: the reset rewrites the state.
        let _state = lock_page(&self.page, None);
        let generation = self.page.word(W_STATE).load(SeqCst);
        if self.page.word(COUNT_AT).load(SeqCst) > 0 {
            self.page.word(RESET_AT).store(generation.wrapping_add(1), SeqCst);
        }
        self.page.word(COUNT_AT).store(0, SeqCst);
        self.page.word(BROKEN_AT).store(0, SeqCst);
        self.page.word(W_STATE).store(generation.wrapping_add(1), SeqCst);
        self.page.wake(u32::MAX);
    }

    /// Waits until every party has arrived.
    pub fn wait(&self) -> Result<BarrierWaitResult> {
        self.wait_until(None).map(|result| result.expect("no deadline"))
    }

    /// Waits at most `timeout`; `Ok(None)` if it passed first, which breaks the barrier for
    /// the others (as in Python).
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<BarrierWaitResult>> {
        self.wait_until(deadline_in(timeout))
    }

    /// Waits in the tokio runtime's reactor (no thread waits). Dropping the future after it
    /// was first polled and before it finished breaks the barrier, as a timeout does.
    #[cfg(feature = "tokio")]
    pub async fn wait_async(&self) -> Result<BarrierWaitResult> {
        let arrival = match self.arrive()? {
            Ok(leader) => return Ok(leader),
            Err(arrival) => arrival,
        };
        let mut waiting = Waiting { barrier: self, arrival: Some(arrival) };
        let attempt = || waiting.look();
        let outcome = self.page.until_async(Some(RECHECK), attempt).await;
        outcome.and_then(|outcome| outcome)
    }

    fn wait_until(&self, deadline: Option<Instant>) -> Result<Option<BarrierWaitResult>> {
        let arrival = match self.arrive()? {
            Ok(leader) => return Ok(Some(leader)),
            Err(arrival) => arrival,
        };
        let mut waiting = Waiting { barrier: self, arrival: Some(arrival) };
        let generation = waiting.arrival.as_ref().expect("arrived").generation;
        loop {
            if let Some(outcome) = waiting.look()? {
                return outcome.map(Some);
            }
            let slice = Instant::now() + RECHECK;
            if deadline.is_some_and(|d| d <= Instant::now()) {
                return Ok(None);
            }
            let until = deadline.map_or(slice, |d| d.min(slice));
            self.page.wait_until(Some(until), |now| now != generation)?;
        }
    }

    /// Arrives: `Ok(result)` for the party that completes the round, else the arrival that
    /// must wait.
    fn arrive(&self) -> Result<std::result::Result<BarrierWaitResult, Arrival>> {
        let state = self.lock_state()?;
        if self.is_broken() {
            return Err(broken());
        }
        let parties = self.parties();
        let count = self.page.word(COUNT_AT);
        let index = count.load(SeqCst);
        let generation = self.page.word(W_STATE).load(SeqCst);
        if index + 1 >= parties {
            count.store(0, SeqCst);
            self.page.word(W_STATE).store(generation.wrapping_add(1), SeqCst);
            drop(state);
            self.page.wake(u32::MAX);
            return Ok(Ok(BarrierWaitResult { index, parties }));
        }
        let slot = self.take_slot()?;
        count.store(index + 1, SeqCst);
        Ok(Err(Arrival { generation, index, slot }))
    }

    /// The state lock; a party that died holding it breaks the barrier.
    fn lock_state(&self) -> Result<LockGuard<'_>> {
        match lock_page(&self.page, None) {
            Ok(guard) => Ok(guard.expect("no deadline")),
            Err(LockError::OwnerDied(_)) => {
                self.abort();
                Err(broken())
            }
            Err(LockError::Failed(e)) => Err(e),
        }
    }

    fn slots(&self) -> impl Iterator<Item = (usize, &AtomicU32)> {
        (0..2 * self.parties() as usize).map(|i| (i, self.page.word(SLOTS_AT + 4 * i)))
    }

    /// Writes this process's pid into a free slot (one frees up soon if none is free: the
    /// parties of the last round clearing theirs).
    fn take_slot(&self) -> Result<usize> {
        let pid = std::process::id();
        loop {
            for (i, slot) in self.slots() {
                if slot.compare_exchange(0, pid, SeqCst, SeqCst).is_ok() {
                    return Ok(i);
                }
            }
            if self.someone_died(usize::MAX) {
                return Err(broken());
            }
            std::thread::yield_now();
        }
    }

    /// Whether a party in a slot other than `mine` has ended; if so the barrier is broken. A
    /// party clears its slot before it returns, so one that ended with its pid still in the
    /// slot (looked at again after it ended: it may have cleared it and exited meanwhile)
    /// died waiting.
    fn someone_died(&self, mine: usize) -> bool {
        let dead = self.slots().any(|(i, slot)| {
            let pid = slot.load(SeqCst);
            i != mine && pid != 0 && sys::process_ended(pid) && slot.load(SeqCst) == pid
        });
        if dead {
            self.abort();
        }
        dead
    }
}

/// A party waiting for its round; dropped unfinished (a timeout, a dropped future), it breaks
/// the barrier, since the round counted it.
struct Waiting<'a> {
    barrier: &'a Barrier,
    arrival: Option<Arrival>,
}

impl Waiting<'_> {
    /// Whether the round ended (`Some(Ok)`), or the barrier broke (`Some(Err)`); `None` while
    /// it still waits.
    fn look(&mut self) -> Result<Option<Result<BarrierWaitResult>>> {
        let barrier = self.barrier;
        let arrival = self.arrival.as_ref().expect("waiting");
        let ended = barrier.page.word(W_STATE).load(SeqCst) != arrival.generation;
        let reset = barrier.page.word(RESET_AT).load(SeqCst) == arrival.generation.wrapping_add(1);
        let outcome = if ended && reset {
            Err(broken())
        } else if ended {
            Ok(BarrierWaitResult { index: arrival.index, parties: barrier.parties() })
        } else if barrier.is_broken() || barrier.someone_died(arrival.slot) {
            Err(broken())
        } else {
            return Ok(None);
        };
        let arrival = self.arrival.take().expect("waiting");
        barrier.page.word(SLOTS_AT + 4 * arrival.slot).store(0, SeqCst);
        Ok(Some(outcome))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(arrival) = self.arrival.take() {
            let barrier = self.barrier;
            // The slot first: an arrival may be holding the state lock until one is free.
            barrier.page.word(SLOTS_AT + 4 * arrival.slot).store(0, SeqCst);
            // Under the state lock, whether the round ended meanwhile (the barrier stays whole).
            let _state = lock_page(&barrier.page, None);
            if barrier.page.word(W_STATE).load(SeqCst) == arrival.generation {
                barrier.abort();
            }
        }
    }
}

fn broken() -> Error {
    Error::new(ErrorKind::BrokenBarrier, "the barrier is broken")
}

page_wire!(Barrier, Kind::Barrier, |page| {
    let parties = page.word(W_EXTRA).load(SeqCst);
    let whole = (1..=MAX_PARTIES).contains(&parties) && page.map.len() >= Barrier::bytes(parties);
    if whole { Ok(()) } else { Err(format!("a barrier page of {} bytes", page.map.len())) }
});

impl Barrier {
    /// Another handle to the same barrier.
    pub fn try_clone(&self) -> Result<Barrier> {
        Ok(Barrier { page: self.page.try_clone()? })
    }
}

impl fmt::Debug for Barrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Barrier")
            .field("parties", &self.parties())
            .field("n_waiting", &self.n_waiting())
            .field("broken", &self.is_broken())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_barrier_releases_its_parties_together_with_one_leader_and_breaks_on_a_timeout() {
        let barrier = Barrier::new(3).unwrap();
        let others = (0..2)
            .map(|_| {
                let theirs = barrier.try_clone().unwrap();
                std::thread::spawn(move || theirs.wait_timeout(Duration::from_secs(30)))
            })
            .collect::<Vec<_>>();
        let mine = barrier.wait_timeout(Duration::from_secs(30)).unwrap().expect("a round");
        let mut results = vec![mine];
        for other in others {
            results.push(other.join().unwrap().unwrap().expect("a round"));
        }
        assert_eq!(results.iter().filter(|r| r.is_leader()).count(), 1);
        let mut order = results.iter().map(|r| r.index()).collect::<Vec<_>>();
        order.sort();
        assert_eq!(order, [0, 1, 2]);
        assert_eq!(barrier.n_waiting(), 0);
        // A second round, cut short by a timeout: the barrier breaks for the next comer.
        assert_eq!(barrier.wait_timeout(Duration::from_millis(5)).unwrap(), None);
        assert_eq!(barrier.wait().expect_err("broken").kind(), ErrorKind::BrokenBarrier);
        assert!(Barrier::new(0).is_err());
    }

    #[test]
    fn a_reset_breaks_the_round_under_way_and_mends_the_barrier() {
        let barrier = Barrier::new(2).unwrap();
        barrier.abort();
        barrier.reset();
        assert!(!barrier.is_broken());
        let theirs = barrier.try_clone().unwrap();
        let waiter = std::thread::spawn(move || theirs.wait_timeout(Duration::from_secs(30)));
        let deadline = Instant::now() + Duration::from_secs(30);
        while barrier.n_waiting() < 1 {
            assert!(Instant::now() < deadline, "the waiter never arrived");
            std::thread::yield_now();
        }
        barrier.reset();
        let outcome = waiter.join().unwrap().map(|_| ()).map_err(|e| e.kind());
        assert_eq!(outcome, Err(ErrorKind::BrokenBarrier), "the waiter of the reset round");
        let theirs = barrier.try_clone().unwrap();
        let waiter = std::thread::spawn(move || theirs.wait_timeout(Duration::from_secs(30)));
        assert!(barrier.wait_timeout(Duration::from_secs(30)).unwrap().is_some());
        assert!(waiter.join().unwrap().unwrap().is_some(), "a whole round after the reset");
    }
}
