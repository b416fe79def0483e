//! Locks, events and semaphores between processes, under the start method being tested: handed
//! to children as task arguments, a lock whose holder is SIGKILLed, their timeouts, and freed
//! with their last handle.

use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use multiproc::{
    BoundedSemaphore, Context, ErrorKind, Event, Lock, LockError, Semaphore, SharedSlice, task,
};

use crate::Scenario;
use crate::common::{DEADLINE, ensure, fd_count, join, warm_up};

pub const SCENARIOS: &[Scenario] = &[
    ("sync_an_event_set_by_a_child_wakes_the_parent", event_from_child),
    ("sync_a_semaphore_counts_across_processes", semaphore_across),
    ("sync_a_bounded_semaphore_refuses_a_childs_extra_release", bounded_in_child),
    ("sync_timeouts_return_after_their_timeout", timeouts),
    ("sync_1000_primitives_made_and_dropped_leave_nothing", made_and_dropped),
    ("sync_8_processes_x_10000_increments_under_a_lock_give_80000", increments_under_lock),
    ("sync_a_lock_whose_holder_was_sigkilled_says_so_and_is_taken", holder_killed),
    ("sync_8_processes_x_10000_fetch_add_on_a_shared_atomic_give_80000", atomic_counter),
];

/// Adds one to `counter` `times` times.
#[task]
fn count_up(counter: multiproc::SharedAtomicU64, times: u32) {
    for _ in 0..times {
        counter.fetch_add(1);
    }
}

fn atomic_counter(ctx: &Context) -> Result<(), Failed> {
    let counter = multiproc::SharedAtomicU64::new(5)?;
    let children = (0..8)
        .map(|_| ctx.process(count_up, (counter.try_clone()?, 10_000)).start())
        .collect::<multiproc::Result<Vec<_>>>()?;
    for child in children {
        join(child)??;
    }
    ensure(counter.load() == 80_005, || format!("8 × 10,000 on 5 gave {}", counter.load()))?;
    ensure(counter.compare_exchange(80_005, 1) == Ok(80_005), || "compare_exchange".into())?;
    ensure(counter.fetch_max(7) == 1 && counter.load() == 7, || "fetch_max".into())
}

/// Adds one to `counter[0]` `times` times, each under `lock` (a read and a write apart: without
/// the lock, increments are lost).
#[task]
fn increment(lock: Lock, counter: SharedSlice<u64>, times: u32) {
    for _ in 0..times {
        let _held = lock.lock().expect("lock");
        let now = counter.get(0).expect("read");
        counter.set(0, now + 1).expect("write");
    }
}

fn increments_under_lock(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds = fd_count();
    {
        let lock = ctx.lock()?;
        let counter = SharedSlice::<u64>::new(1)?;
        let children = (0..8)
            .map(|_| {
                ctx.process(increment, (lock.try_clone()?, counter.try_clone()?, 10_000)).start()
            })
            .collect::<multiproc::Result<Vec<_>>>()?;
        for child in children {
            join(child)??;
        }
        let total = counter.get(0)?;
        ensure(total == 80_000, || format!("8 × 10,000 increments gave {total}"))?;
    }
    let after = fd_count();
    ensure(after == fds, || format!("fds before {fds}, after {after}"))
}

/// Takes `lock`, says so on `held`, and keeps it until it is killed.
#[task]
fn hold_until_killed(lock: Lock, held: Event) {
    let guard = lock.lock().expect("lock");
    held.set();
    std::thread::sleep(Duration::from_secs(600));
    drop(guard);
}

fn holder_killed(ctx: &Context) -> Result<(), Failed> {
    let (lock, held) = (ctx.lock()?, ctx.event()?);
    let mut holder =
        ctx.process(hold_until_killed, (lock.try_clone()?, held.try_clone()?)).start()?;
    ensure(held.wait_timeout(DEADLINE)?, || "the holder never took the lock".into())?;
    ensure(matches!(lock.try_lock(), Ok(None)), || "free while held".into())?;
    holder.kill()?;
    ensure(holder.join().is_err(), || "the killed holder returned".into())?;
    match lock.lock_timeout(DEADLINE) {
        Err(LockError::OwnerDied(guard)) => drop(guard),
        Ok(Some(_)) => return Err("taken with no word of the dead owner".into()),
        Ok(None) => return Err(format!("still held {DEADLINE:?} after its holder died").into()),
        Err(LockError::Failed(e)) => return Err(format!("{e}").into()),
    }
    // Consistent again: the next lock is an ordinary one.
    ensure(matches!(lock.try_lock(), Ok(Some(_))), || "the lock after repair".into())
}

/// Waits for `go`, then sets `done`.
#[task]
fn set_when_told(go: Event, done: Event) -> bool {
    let told = go.wait_timeout(Duration::from_secs(60)).expect("wait for go");
    done.set();
    told
}

fn event_from_child(ctx: &Context) -> Result<(), Failed> {
    let (go, done) = (ctx.event()?, ctx.event()?);
    let child = ctx.process(set_when_told, (go.try_clone()?, done.try_clone()?)).start()?;
    ensure(!done.wait_timeout(Duration::from_millis(20))?, || "set before it was told".into())?;
    go.set();
    ensure(done.wait_timeout(DEADLINE)?, || "the child's set never woke us".into())?;
    ensure(join(child)?? && done.is_set(), || "the child saw no go".into())
}

/// Releases `semaphore` `times` times.
#[task]
fn release_times(semaphore: Semaphore, times: u32) {
    for _ in 0..times {
        semaphore.release().expect("release");
    }
}

fn semaphore_across(ctx: &Context) -> Result<(), Failed> {
    let semaphore = ctx.semaphore(0)?;
    let child = ctx.process(release_times, (semaphore.try_clone()?, 3)).start()?;
    for n in 0..3 {
        ensure(semaphore.acquire_timeout(DEADLINE)?, || format!("acquire {n} timed out"))?;
    }
    join(child)??;
    ensure(!semaphore.try_acquire()?, || "a fourth acquire of three releases".into())?;
    ensure(semaphore.value() == 0, || format!("value {}", semaphore.value()))
}

/// Releases a bounded semaphore that is full; returns the error's kind, as text.
#[task]
fn release_past_bound(semaphore: BoundedSemaphore) -> String {
    match semaphore.release() {
        Ok(()) => "released".into(),
        Err(e) => format!("{:?}", e.kind()),
    }
}

fn bounded_in_child(ctx: &Context) -> Result<(), Failed> {
    let semaphore = ctx.bounded_semaphore(1)?;
    let outcome = join(ctx.process(release_past_bound, semaphore.try_clone()?).start()?)??;
    ensure(outcome == format!("{:?}", ErrorKind::InvalidState), || outcome.clone())?;
    ensure(semaphore.value() == 1, || format!("value {}", semaphore.value()))
}

fn timeouts(ctx: &Context) -> Result<(), Failed> {
    let (event, semaphore) = (ctx.event()?, ctx.semaphore(0)?);
    let timeout = Duration::from_millis(50);
    // Generous slack: the machine is shared; what must not happen is a wait that ignores its
    // timeout.
    let slack = Duration::from_secs(5);
    for (what, waited) in [
        ("event", Box::new(|| event.wait_timeout(timeout)) as Box<dyn Fn() -> _>),
        ("semaphore", Box::new(|| semaphore.acquire_timeout(timeout))),
    ] {
        let started = Instant::now();
        let got = waited()?;
        let took = started.elapsed();
        ensure(!got, || format!("{what}: ready without anyone making it so"))?;
        ensure(took >= timeout && took < timeout + slack, || format!("{what}: took {took:?}"))?;
    }
    Ok(())
}

/// Lines of this process's memory map.
fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps").map(|maps| maps.lines().count()).unwrap_or(0)
}

fn made_and_dropped(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let (fds, maps) = (fd_count(), mappings());
    for i in 0..1000 {
        let event = ctx.event()?;
        let semaphore = ctx.bounded_semaphore(i % 7 + 1)?;
        let (lock, rlock) = (ctx.lock()?, ctx.rlock()?);
        let atomic = multiproc::SharedAtomicU64::new(i.into())?;
        ensure(atomic.fetch_add(1) == u64::from(i), || "a fresh atomic".into())?;
        event.set();
        ensure(semaphore.try_acquire()?, || "a fresh semaphore".into())?;
        ensure(matches!(lock.try_lock(), Ok(Some(_))), || "a fresh lock".into())?;
        ensure(matches!(rlock.try_lock(), Ok(Some(_))), || "a fresh rlock".into())?;
        drop((event, semaphore, lock, rlock, atomic));
    }
    let (fds_after, maps_after) = (fd_count(), mappings());
    ensure(fds_after == fds, || format!("fds before {fds}, after {fds_after}"))?;
    ensure(maps_after <= maps + 2, || format!("mappings before {maps}, after {maps_after}"))
}
