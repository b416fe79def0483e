//! Locks, conditions, barriers, events, semaphores and shared values between processes, under
//! the start method being tested: handed to children as task arguments, pool initializer
//! state and queue items; a lock whose holder and a barrier whose party is SIGKILLed; their
//! timeouts; and freed with their last handle.

use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use multiproc::{
    Array, Barrier, BoundedSemaphore, Condition, Context, ErrorKind, Event, Lock, LockError,
    Semaphore, SharedAtomicU64, SharedSlice, Value, task,
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
    ("sync_8_processes_x_10000_increments_of_a_value_under_its_lock_give_80000", value_counter),
    ("sync_a_condition_hands_items_from_a_producer_to_a_consumer_process", producer_consumer),
    ("sync_a_barrier_of_4_with_a_party_sigkilled_breaks_for_the_other_3", barrier_party_killed),
    ("sync_a_barrier_releases_4_processes_round_after_round", barrier_rounds),
    ("sync_an_array_in_pool_state_and_a_lock_in_a_queue_item_work", pool_state_and_queue_item),
];

/// Adds one to `value` `times` times, each under its lock.
#[task]
fn increment_value(value: Value<u64>, times: u32) {
    for _ in 0..times {
        *value.get_lock().expect("the value's lock") += 1;
    }
}

fn value_counter(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds = fd_count();
    {
        let value = ctx.value(0u64)?;
        let children = (0..8)
            .map(|_| ctx.process(increment_value, (value.try_clone()?, 10_000)).start())
            .collect::<multiproc::Result<Vec<_>>>()?;
        for child in children {
            join(child)??;
        }
        let total = value.get()?;
        ensure(total == 80_000, || format!("8 × 10,000 increments gave {total}"))?;
    }
    let after = fd_count();
    ensure(after == fds, || format!("fds before {fds}, after {after}"))
}

/// Puts 1..=n into the slots of `items` one at a time: waits under `ready` for the consumer to
/// empty the slot, fills it, notifies.
#[task]
fn produce(ready: Condition, slot: SharedAtomicU64, n: u64) -> bool {
    for item in 1..=n {
        let guard = ready.lock().expect("the condition's lock");
        let empty = ready.wait_timeout_while(guard, Duration::from_secs(60), || slot.load() != 0);
        let (guard, emptied) = empty.expect("the lock again");
        if !emptied {
            return false;
        }
        slot.store(item);
        ready.notify_all();
        drop(guard);
    }
    true
}

fn producer_consumer(ctx: &Context) -> Result<(), Failed> {
    let (ready, slot) = (ctx.condition()?, SharedAtomicU64::new(0)?);
    let n = 200;
    let producer = ctx.process(produce, (ready.try_clone()?, slot.try_clone()?, n)).start()?;
    let mut received = Vec::new();
    while received.len() < n as usize {
        let guard = ready.lock()?;
        let (guard, filled) = ready.wait_timeout_while(guard, DEADLINE, || slot.load() == 0)?;
        ensure(filled, || format!("no item after {} in {DEADLINE:?}", received.len()))?;
        received.push(slot.swap(0));
        ready.notify_all();
        drop(guard);
    }
    ensure(join(producer)??, || "the producer timed out waiting for the consumer".into())?;
    let expected: Vec<u64> = (1..=n).collect();
    ensure(received == expected, || format!("received {received:?}"))
}

/// Waits at `barrier`, once; the kind of error if it failed.
#[task]
pub fn wait_at(barrier: Barrier) -> Result<bool, String> {
    match barrier.wait_timeout(Duration::from_secs(60)) {
        Ok(Some(result)) => Ok(result.is_leader()),
        Ok(None) => Err("timed out".into()),
        Err(e) => Err(format!("{:?}", e.kind())),
    }
}

/// Waits for `n` parties to be waiting at `barrier`, within the deadline.
fn until_waiting(barrier: &Barrier, n: u32) -> Result<(), Failed> {
    let started = Instant::now();
    while barrier.n_waiting() < n {
        ensure(started.elapsed() < DEADLINE, || format!("{} of {n} arrived", barrier.n_waiting()))?;
        std::thread::yield_now();
    }
    Ok(())
}

fn barrier_party_killed(ctx: &Context) -> Result<(), Failed> {
    let barrier = ctx.barrier(4)?;
    let broken = format!("{:?}", ErrorKind::BrokenBarrier);
    let first = (0..2)
        .map(|_| ctx.process(wait_at, barrier.try_clone()?).start())
        .collect::<multiproc::Result<Vec<_>>>()?;
    let mut victim = ctx.process(wait_at, barrier.try_clone()?).start()?;
    until_waiting(&barrier, 3)?;
    victim.kill()?;
    ensure(victim.join().is_err(), || "the killed party returned".into())?;
    for party in first {
        let outcome = join(party)??;
        ensure(outcome.as_ref().err() == Some(&broken), || format!("a waiter got {outcome:?}"))?;
    }
    let late = join(ctx.process(wait_at, barrier.try_clone()?).start()?)??;
    ensure(late.as_ref().err() == Some(&broken), || format!("the fourth got {late:?}"))?;
    ensure(barrier.is_broken(), || "not broken".into())
}

/// Waits at `barrier` `rounds` times, adding to `arrived` before each; whether it saw all of
/// each round's arrivals when it was let through, and how often it led.
#[task]
fn rounds_at(barrier: Barrier, arrived: SharedAtomicU64, rounds: u64) -> (bool, u64) {
    let parties = u64::from(barrier.parties());
    let (mut in_step, mut led) = (true, 0);
    for round in 1..=rounds {
        arrived.fetch_add(1);
        let result = barrier.wait_timeout(Duration::from_secs(60)).expect("not broken");
        let Some(result) = result else { return (false, led) };
        in_step &= arrived.load() >= round * parties;
        led += u64::from(result.is_leader());
    }
    (in_step, led)
}

fn barrier_rounds(ctx: &Context) -> Result<(), Failed> {
    let (barrier, arrived, rounds) = (ctx.barrier(4)?, SharedAtomicU64::new(0)?, 50);
    let parties = (0..4)
        .map(|_| {
            ctx.process(rounds_at, (barrier.try_clone()?, arrived.try_clone()?, rounds)).start()
        })
        .collect::<multiproc::Result<Vec<_>>>()?;
    let mut leaders = 0;
    for party in parties {
        let (in_step, led) = join(party)??;
        ensure(in_step, || "a party was let through before its round was complete".into())?;
        leaders += led;
    }
    ensure(leaders == rounds, || format!("{leaders} leaders in {rounds} rounds"))?;
    ensure(arrived.load() == 4 * rounds && !barrier.is_broken(), || "the rounds".into())
}

/// The initializer: keeps the array it was handed.
#[task]
fn keep_array(counts: Array<u32>) -> Array<u32> {
    counts
}

/// Counts `i` in the worker's array, under its lock.
#[task]
fn count_in(counts: &Array<u32>, i: usize) {
    counts.get_lock().expect("the array's lock")[i % 4] += 1;
}

/// Takes the lock that arrives on `locks`, says so, and waits for `done` before releasing it.
#[task]
fn lock_from_queue(locks: multiproc::Queue<Lock>, held: Event, done: Event) -> bool {
    let lock = locks.get_timeout(Duration::from_secs(60)).expect("a lock from the queue");
    let guard = lock.lock().expect("the lock");
    held.set();
    let told = done.wait_timeout(Duration::from_secs(60)).expect("wait");
    drop(guard);
    told
}

fn pool_state_and_queue_item(ctx: &Context) -> Result<(), Failed> {
    let counts = ctx.array::<u32>(4)?;
    let pool = ctx.pool().processes(2).initializer(keep_array, counts.try_clone()?).build()?;
    pool.map(count_in, 0..400)?;
    let seen = counts.to_vec()?;
    ensure(seen == [100; 4], || format!("counts {seen:?}"))?;
    let (locks, held, done) = (ctx.queue::<Lock>()?, ctx.event()?, ctx.event()?);
    let child = ctx.process(lock_from_queue, (locks.clone(), held.try_clone()?, done.try_clone()?));
    let child = child.start()?;
    let lock = ctx.lock()?;
    locks.put(&lock.try_clone()?)?;
    ensure(held.wait_timeout(DEADLINE)?, || "the child never took the lock".into())?;
    ensure(matches!(lock.try_lock(), Ok(None)), || "free while the child holds it".into())?;
    done.set();
    ensure(join(child)??, || "the child was not told".into())?;
    ensure(matches!(lock.lock_timeout(DEADLINE), Ok(Some(_))), || "not released".into())
}

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
pub fn hold_until_killed(lock: Lock, held: Event) {
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
pub fn set_when_told(go: Event, done: Event) -> bool {
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
pub fn release_times(semaphore: Semaphore, times: u32) {
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
    let (lock, condition, value) = (ctx.lock()?, ctx.condition()?, ctx.value(0u32)?);
    let timeout = Duration::from_millis(50);
    // Generous slack: the machine is shared; what must not happen is a wait that ignores its
    // timeout.
    let slack = Duration::from_secs(5);
    // Held by another process, so that this one's timed takes must wait.
    let (held, done) = (ctx.event()?, ctx.event()?);
    let holder = ctx
        .process(
            hold_both,
            (lock.try_clone()?, value.try_clone()?, held.try_clone()?, done.try_clone()?),
        )
        .start()?;
    ensure(held.wait_timeout(DEADLINE)?, || "the holder never took the locks".into())?;
    let barrier = ctx.barrier(2)?;
    for (what, waited) in [
        ("event", Box::new(|| event.wait_timeout(timeout)) as Box<dyn Fn() -> _>),
        ("semaphore", Box::new(|| semaphore.acquire_timeout(timeout))),
        ("lock", Box::new(|| Ok(lock.lock_timeout(timeout)?.is_some()))),
        ("value", Box::new(|| Ok(value.get_lock_timeout(timeout)?.is_some()))),
        (
            "condition",
            Box::new(|| {
                let guard = condition.lock()?;
                let waited = condition.wait_timeout(guard, timeout)?;
                Ok(waited.1)
            }),
        ),
        ("barrier", Box::new(|| Ok(barrier.wait_timeout(timeout)?.is_some()))),
    ] {
        let started = Instant::now();
        let got = waited()?;
        let took = started.elapsed();
        ensure(!got, || format!("{what}: ready without anyone making it so"))?;
        ensure(took >= timeout && took < timeout + slack, || format!("{what}: took {took:?}"))?;
    }
    done.set();
    ensure(join(holder)??, || "the holder was not told".into())
}

/// Takes `lock` and `value`'s lock, says so on `held`, and keeps them until `done`.
#[task]
fn hold_both(lock: Lock, value: Value<u32>, held: Event, done: Event) -> bool {
    let guards = (lock.lock().expect("lock"), value.get_lock().expect("value"));
    held.set();
    let told = done.wait_timeout(Duration::from_secs(60)).expect("wait");
    drop(guards);
    told
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
        let atomic = SharedAtomicU64::new(i.into())?;
        let (condition, barrier) = (ctx.condition()?, ctx.barrier(i % 3 + 1)?);
        let (value, array) = (ctx.value(i)?, ctx.array::<u16>(i as usize % 50)?);
        ensure(matches!(condition.try_lock(), Ok(Some(_))), || "a fresh condition".into())?;
        ensure(value.get().is_ok_and(|v| v == i), || "a fresh value".into())?;
        ensure(array.to_vec().is_ok_and(|a| a.len() == i as usize % 50), || "an array".into())?;
        drop((condition, barrier, value, array));
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
