//! Spinning before sleeping: a wait that may get its answer within microseconds tries for it a
//! little, yielding the CPU between tries, before it sleeps in the kernel, and stops trying for
//! a while when answers are slow. A channel's receive
//! ([`Channel::recv`](crate::transport::channel::Channel::recv)) and whoever drives a pool,
//! waiting for its workers, use it.

use std::time::{Duration, Instant};

/// How long, at first, a receive with nothing to wait for but its socket tries for a frame,
/// yielding the CPU between tries, before it sleeps in `poll`.
///
/// A sleeping receiver costs a wake-up: on the virtual machines we measure on, 30-35 µs when
/// the peer runs on another CPU, the whole of a round trip there. Two ends that both spin find
/// each other's frames without sleeping: a ping-pong between two CPUs went from 71-77 µs to
/// 4.3-4.5 µs (the raw socket's, which sleeps, stayed at 69-73 µs); a pool `apply` round trip
/// from 82 µs to 28-31 µs with the caller's wait spinning (its worker does not: see
/// `Channel::set_spins`). Each try yields, so on one CPU the other end runs meanwhile: there the
/// ping-pong went from 1.18× the raw socket's to 1.08×.
const SPIN_MIN_US: u32 = 10;

/// The longest a spin grows to while the peer keeps answering within [`SLOW_PEER`].
///
/// Two ends start spinning together only once one of them catches the other's answer while it
/// spins. From a cold start that answer comes after the other end's wake-up, 30-35 µs here:
/// a spin fixed at 5 µs never caught it, one fixed at 10 µs in some runs only (by a lucky
/// quick wake-up), and a spin that grows to 50 µs does. Once both spin, each spin ends within
/// microseconds, when the frame is there.
const SPIN_MAX_US: u32 = 50;

/// A wait longer than this, from the start of a spin that found nothing to the frame, says the
/// peer is slow to answer: a spin would rarely find its frames, and costs its whole length. A
/// quicker peer is worth spinning for even when a spin missed: it answered late because it
/// was asleep itself, and two ends find each other spinning only if both keep trying (with a
/// back-off after every miss, the ping-pong above never did).
const SLOW_PEER: Duration = Duration::from_micros(250);

/// Waits on a slow peer, in a row, before receives stop spinning for a while.
const MISSES_BEFORE_BACKOFF: u32 = 8;

/// Receives that sleep at once after [`MISSES_BEFORE_BACKOFF`] slow waits; doubled at each
/// further run of them, up to 64 times as many, and reset by a wait that was not slow.
const BACKOFF_RECEIVES: u32 = 64;

/// Whether a wait should spin before it sleeps, and for how long (see [`SPIN_MIN_US`]): it
/// does, unless its recent waits were long ([`SLOW_PEER`]).
#[derive(Debug)]
pub(crate) struct Spin {
    /// How long the next spin may last, in µs: [`SPIN_MIN_US`] at first.
    bound_us: u32,
    /// Slow waits in a row.
    misses: u32,
    /// Receives left that sleep without spinning.
    skip: u32,
}

impl Default for Spin {
    fn default() -> Self {
        Spin { bound_us: SPIN_MIN_US, misses: 0, skip: 0 }
    }
}

impl Spin {
    /// How long this spin may last.
    pub(crate) fn bound(&self) -> Duration {
        Duration::from_micros(u64::from(self.bound_us))
    }

    /// Whether this receive spins.
    pub(crate) fn now(&mut self) -> bool {
        if self.skip == 0 {
            return true;
        }
        self.skip -= 1;
        false
    }

    /// A spin found a frame, or found nothing but the frame came within [`SLOW_PEER`].
    pub(crate) fn hit(&mut self) {
        self.misses = 0;
    }

    /// A spin found nothing, and the frame came `waited` after it began.
    pub(crate) fn waited(&mut self, waited: Duration) {
        if waited < SLOW_PEER {
            self.hit();
            self.bound_us = (self.bound_us * 2).min(SPIN_MAX_US);
            return;
        }
        self.bound_us = SPIN_MIN_US;
        self.misses += 1;
        if self.misses % MISSES_BEFORE_BACKOFF == 0 {
            let runs = self.misses / MISSES_BEFORE_BACKOFF;
            self.skip = BACKOFF_RECEIVES << (runs - 1).min(6);
        }
    }
}

/// Calls `attempt` until it finds something or `spin`'s bound has passed since `started`,
/// yielding the CPU between calls; `Ok(None)` if it found nothing. A find counts as a hit; a
/// miss is for the caller to report, with how long it then waited ([`Spin::waited`]).
pub(crate) fn spin_for<T, E>(
    spin: &mut Spin,
    started: Instant,
    mut attempt: impl FnMut() -> Result<Option<T>, E>,
) -> Result<Option<T>, E> {
    loop {
        if let Some(found) = attempt()? {
            spin.hit();
            return Ok(Some(found));
        }
        if started.elapsed() >= spin.bound() {
            return Ok(None);
        }
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spin_grows_while_the_peer_answers_quickly_and_backs_off_when_it_is_slow() {
        let quick = SLOW_PEER / 2;
        let slow = SLOW_PEER * 2;
        let mut spin = Spin::default();
        assert_eq!(spin.bound_us, SPIN_MIN_US);
        // Missed, but the answer came soon: the next spin may last longer, up to the cap.
        for _ in 0..10 {
            assert!(spin.now());
            spin.waited(quick);
        }
        assert_eq!(spin.bound_us, SPIN_MAX_US);
        // A slow answer shrinks it at once; a run of them stops spinning for a while.
        for missed in 1..MISSES_BEFORE_BACKOFF {
            assert!(spin.now());
            spin.waited(slow);
            assert_eq!((spin.bound_us, spin.misses), (SPIN_MIN_US, missed));
        }
        assert!(spin.now());
        spin.waited(slow);
        let skipped = (0..10 * BACKOFF_RECEIVES).take_while(|_| !spin.now()).count();
        assert_eq!(skipped as u32, BACKOFF_RECEIVES);
        // Each further run of slow waits doubles the pause, up to 64 times the first.
        for run in 2..=9u32 {
            for _ in 0..MISSES_BEFORE_BACKOFF {
                spin.waited(slow);
            }
            let skipped = (0..100 * BACKOFF_RECEIVES).take_while(|_| !spin.now()).count();
            assert_eq!(skipped as u32, BACKOFF_RECEIVES << (run - 1).min(6), "run {run}");
        }
        // One quick answer (or a spin that found its frame) starts over.
        spin.waited(quick);
        assert_eq!(spin.misses, 0);
        for _ in 1..MISSES_BEFORE_BACKOFF {
            spin.waited(slow);
        }
        assert!(spin.now(), "seven slow waits after a quick one are not a run of eight");
    }
}
