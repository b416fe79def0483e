//! Where one batch's outcome lands: a [`Slot`], shared by the handle that submitted the batch
//! (an `AsyncResult`, an `IMap`) and the batch itself inside the engine.
//!
//! The engine fills the slot when the batch finishes or fails and wakes whoever awaits it; the
//! handle checks, awaits and takes it without the engine's lock, so that a future's `poll`
//! never waits for the driver, and no map keyed by batch number sits between the two.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::{Acquire, Release, SeqCst};
use std::sync::{Mutex, MutexGuard};
use std::task::Waker;

use super::engine::BatchOutcome;

/// One batch's outcome, once it is in.
#[derive(Default)]
pub(crate) struct Slot {
    /// Set once the outcome is in (after it was stored): read without the lock.
    done: AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    outcome: Option<BatchOutcome>,
    /// Who awaits the outcome (a future's `poll`, a `wait()`): the first here, any others in
    /// `more`, all woken when it is in.
    waker: Option<Waker>,
    more: Vec<Waker>,
    /// The handle went away: an outcome that comes is thrown away.
    abandoned: bool,
    /// The batch's encoded arguments, once it has finished: freed with the slot.
    spent: Vec<u8>,
}

impl Slot {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether the outcome is in.
    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Acquire)
    }

    /// Has `waker` woken once the outcome is in; false (and nothing kept) if it is in already.
    /// `awaiting` counts the slots someone awaits: it says `Some(true)` when this one made it
    /// leave zero, so that the caller rings whoever drives for the awaited (see
    /// `Shared::awaited`).
    pub(crate) fn notify(&self, waker: &Waker, awaiting: &AtomicUsize) -> Option<bool> {
        let mut state = self.state();
        if self.is_done() {
            return None;
        }
        match &mut state.waker {
            None => {
                state.waker = Some(waker.clone());
                Some(awaiting.fetch_add(1, SeqCst) == 0)
            }
            // A future's own waker is replaced; a second waiter (a `wait()` beside it) is
            // kept too.
            Some(first) if first.will_wake(waker) => Some(false),
            Some(first) => {
                let first = std::mem::replace(first, waker.clone());
                if !state.more.iter().any(|w| w.will_wake(&first)) {
                    state.more.push(first);
                }
                Some(false)
            }
        }
    }

    /// Stores the outcome (or throws it away, if the handle has gone) and hands the wakers of
    /// those who await it to `wake`. `spent` (the batch's arguments) is kept to be freed with
    /// the slot, most often by the handle's thread, which allocated it.
    pub(crate) fn fill(
        &self,
        outcome: BatchOutcome,
        spent: Vec<u8>,
        awaiting: &AtomicUsize,
        mut wake: impl FnMut(Waker),
    ) {
        let mut state = self.state();
        let discarded = if state.abandoned {
            Some((outcome, spent))
        } else {
            state.spent = spent;
            state.outcome.replace(outcome).map(|old| (old, Vec::new()))
        };
        self.done.store(true, Release);
        let first = state.waker.take();
        let more = std::mem::take(&mut state.more);
        drop(state);
        drop(discarded);
        if let Some(first) = first {
            awaiting.fetch_sub(1, SeqCst);
            wake(first);
        }
        more.into_iter().for_each(wake);
    }

    /// Takes the outcome (`None` if it is not in, or was taken).
    pub(crate) fn take(&self) -> Option<BatchOutcome> {
        self.state().outcome.take()
    }

    /// The handle goes away: forgets the wakers and any outcome, and throws away one that comes
    /// later. Says whether the batch had finished.
    pub(crate) fn abandon(&self, awaiting: &AtomicUsize) -> bool {
        let mut state = self.state();
        state.abandoned = true;
        let outcome = state.outcome.take();
        if state.waker.take().is_some() {
            awaiting.fetch_sub(1, SeqCst);
        }
        let more = std::mem::take(&mut state.more);
        drop(state);
        drop((outcome, more));
        self.is_done()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    fn outcome() -> BatchOutcome {
        Ok((crate::transport::channel::Frame::default(), 0))
    }

    #[test]
    fn a_waiter_is_counted_until_the_outcome_comes_and_is_woken_once() {
        let (slot, awaiting) = (Slot::default(), AtomicUsize::new(0));
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        assert_eq!(slot.notify(&waker, &awaiting), Some(true));
        assert_eq!(slot.notify(&waker, &awaiting), Some(false), "the same waker is kept once");
        assert_eq!(awaiting.load(SeqCst), 1);
        let mut woken = Vec::new();
        slot.fill(outcome(), Vec::new(), &awaiting, |w| woken.push(w));
        woken.into_iter().for_each(Waker::wake);
        assert_eq!((count.0.load(SeqCst), awaiting.load(SeqCst)), (1, 0));
        assert!(slot.is_done());
        assert_eq!(slot.notify(&waker, &awaiting), None, "done: nothing to wait for");
        assert!(slot.take().is_some());
        assert!(slot.take().is_none(), "taken once");
    }

    #[test]
    fn an_abandoned_slot_stops_counting_and_drops_what_comes() {
        let (slot, awaiting) = (Slot::default(), AtomicUsize::new(0));
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        slot.notify(&waker, &awaiting);
        assert!(!slot.abandon(&awaiting));
        assert_eq!(awaiting.load(SeqCst), 0);
        slot.fill(outcome(), vec![1], &awaiting, |_| panic!("nobody awaits an abandoned slot"));
        assert!(slot.is_done() && slot.take().is_none());
    }
}
