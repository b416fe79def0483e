//! Pool scenarios, under the start method being tested: results and state, laziness, async
//! handles, every per-item failure, worker replacement, termination, and use from threads.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use multiproc::{Context, ErrorKind, ExitStatus, Pool, task};
use multiproc_core::sys;
use serde::{Serialize, Serializer};

use crate::Scenario;
use crate::common::{
    DEADLINE, Gate, add, descendants, ensure, fd_count, gated, living_children, nap, read_pid,
    wait_gone, warm_up, whoami, zombie_children,
};

pub const SCENARIOS: &[Scenario] = &[
    ("pool_map_returns_results_in_order", map_in_order),
    ("pool_imap_reports_an_exact_size_hint_and_len", imap_len),
    ("pool_map_and_imap_with_a_progress_bar_return_what_they_would_without", with_bar),
    ("pool_initializer_state_is_built_once_per_worker", initializer_state),
    (
        "pool_large_initializer_arguments_reach_every_worker_and_replacement",
        large_initializer_arguments,
    ),
    (
        "pool_large_initializer_arguments_that_encode_differently_fail_build_and_leave_nothing",
        fickle_initializer_arguments,
    ),
    ("pool_imap_consumes_an_endless_input_lazily", imap_lazy),
    ("pool_imap_unordered_yields_every_result", imap_unordered),
    ("pool_apply_async_get_timeout_ready_wait", apply_async),
    ("pool_panic_fails_only_its_item", panic_per_item),
    ("pool_killed_worker_fails_its_item_and_is_replaced", killed_worker),
    ("pool_worker_death_loses_no_result_it_held_back", death_keeps_held_results),
    (
        "pool_held_back_results_do_not_wait_for_a_slow_batch",
        held_results_arrive_during_a_slow_batch,
    ),
    ("pool_unencodable_result_fails_its_item", unencodable_item),
    ("pool_imap_unencodable_argument_comes_after_earlier_results", unencodable_argument),
    ("pool_exit_and_undecodable_results_fail_their_batch_only", exit_and_undecodable),
    ("pool_initializer_panic_fails_build", initializer_panic),
    ("pool_terminate_with_10000_outstanding_tasks", terminate_outstanding),
    ("pool_task_timeout_kills_and_replaces_the_worker", task_timeout),
    ("pool_max_tasks_per_child_replaces_workers", max_tasks),
    ("pool_used_from_four_threads_at_once", from_threads),
    ("pool_close_and_join", close_and_join),
    ("pool_polling_ready_alone_sees_every_result_arrive", ready_alone),
    ("pool_idle_pool_reaps_and_replaces_retired_workers", idle_pool_replaces_retired),
    ("pool_idle_pool_replaces_a_killed_worker_unasked", idle_pool_replaces_killed),
    ("pool_processes_start_beside_a_pool_and_right_after_its_build", start_beside_pools),
];

/// The scenarios above whose values hold descriptors (shared memory, queues), which the mpi
/// context refuses at submission (its own scenarios check that): left out of its column.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub const NEEDS_DESCRIPTORS: &[&str] = &[
    "pool_large_initializer_arguments_reach_every_worker_and_replacement",
    "pool_held_back_results_do_not_wait_for_a_slow_batch",
];

/// Squares a number.
#[task]
pub fn square(x: u64) -> u64 {
    x * x
}

/// Panics on 13 and 27, so that the first failed item is known.
#[task]
fn square_but_13(x: u64) -> u64 {
    assert!(x != 13 && x != 27, "no {x}");
    x * x
}

fn with_bar(ctx: &Context) -> Result<(), Failed> {
    let build = || ctx.pool().processes(2).progress(true).build();
    with_pool(ctx, build, |pool| {
        let expected: Vec<u64> = (0..100).map(|x| x * x).collect();
        ensure(pool.map(square, 0..100)? == expected, || "map".into())?;
        let imap = pool.imap(square, (0..100).collect::<Vec<u64>>());
        ensure(imap.len() == 100, || "len".into())?;
        let got = imap.collect::<multiproc::Result<Vec<_>>>()?;
        ensure(got == expected, || "imap".into())?;
        // The first failure in item order is what map returns, as without a bar.
        let error = pool.map(square_but_13, 0..40).expect_err("13 panics");
        let message = error.panic().map(|p| p.message.clone()).unwrap_or_default();
        ensure(message == "no 13", || format!("{error:?}"))
    })
}

fn imap_len(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(2).build(),
        |pool| {
            for ordered in [true, false] {
                let items: Vec<u64> = (0..10).collect();
                let mut results = if ordered {
                    pool.imap(square, items)
                } else {
                    pool.imap_unordered(square, items)
                };
                ensure(results.len() == 10, || format!("len {} before any", results.len()))?;
                for taken in 1..=3 {
                    results.next().ok_or("a result")??;
                    let left = 10 - taken;
                    ensure(
                        results.size_hint() == (left, Some(left)) && results.len() == left,
                        || format!("{:?} after {taken}", results.size_hint()),
                    )?;
                }
                ensure(results.by_ref().count() == 7 && results.len() == 0, || "the rest".into())?;
            }
            // An input of unknown length gives what it can: its own hint, plus what was read.
            let mut filtered = pool.imap(square, (0..10u64).filter(|x| x % 2 == 0));
            ensure(filtered.size_hint() == (0, Some(10)), || {
                format!("{:?}", filtered.size_hint())
            })?;
            filtered.next().ok_or("a result")??;
            ensure(filtered.size_hint() == (4, Some(4)), || format!("{:?}", filtered.size_hint()))
        },
    )
}

/// Our children other than the forkserver.
fn children_besides_server() -> Vec<u32> {
    let server = multiproc::forkserver_pid();
    living_children().into_iter().filter(|pid| Some(*pid) != server).collect()
}

/// Runs `body` with a pool and checks that the pool left no descriptor, zombie or process.
pub fn with_pool<S: 'static>(
    ctx: &Context,
    build: impl FnOnce() -> multiproc::Result<Pool<S>>,
    body: impl FnOnce(&Pool<S>) -> Result<(), Failed>,
) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds = fd_count();
    let pool = build()?;
    let pids = pool.pids();
    let outcome = body(&pool);
    drop(pool);
    outcome?;
    for pid in pids {
        ensure(wait_gone(pid, DEADLINE).is_some(), || format!("worker {pid} outlived its pool"))?;
    }
    ensure(zombie_children().is_empty(), || format!("zombies: {:?}", zombie_children()))?;
    let after = fd_count();
    ensure(after == fds, || format!("fds before the pool {fds}, after {after}"))
}

fn map_in_order(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(2).build(),
        |pool| {
            ensure(pool.start_method() == ctx.start_method(), || "start method".into())?;
            ensure(pool.pids().len() == 2, || format!("pids {:?}", pool.pids()))?;
            let squares = pool.map(square, 0..10_000u64)?;
            let expected: Vec<u64> = (0..10_000u64).map(|x| x * x).collect();
            ensure(squares == expected, || "map results out of order or wrong".into())?;
            ensure(pool.map(square, Vec::new())?.is_empty(), || "empty map".into())
        },
    )
}

/// The popcount cache of the issue: built once per worker.
#[task]
fn load_cache(n: u32) -> (u32, Vec<String>) {
    (std::process::id(), (0..n).map(|i| format!("{i:b}")).collect())
}

/// Counts the ones of `i` from the cache; also says which process built the cache it used.
#[task]
fn ones(cache: &(u32, Vec<String>), i: u32) -> (usize, u32, u32) {
    (cache.1[i as usize].matches('1').count(), cache.0, std::process::id())
}

fn initializer_state(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(3).initializer(load_cache, 4096).build(),
        |pool| {
            let counts = pool.map(ones, 0..4096u32)?;
            for (i, (count, built_by, ran_in)) in counts.iter().enumerate() {
                ensure(*count == i.count_ones() as usize, || format!("popcount of {i}: {count}"))?;
                ensure(built_by == ran_in, || format!("item {i} used another worker's cache"))?;
            }
            let workers: HashSet<u32> = counts.iter().map(|(_, _, pid)| *pid).collect();
            let pool_pids: HashSet<u32> = pool.pids().into_iter().collect();
            ensure(workers.is_subset(&pool_pids), || format!("{workers:?} vs {pool_pids:?}"))
        },
    )
}

/// Initializer state: a large vector, and shared memory whose descriptor travels beside it.
#[task]
fn keep_large(
    data: (Vec<u64>, multiproc::SealedSlice<u32>),
) -> (Vec<u64>, multiproc::SealedSlice<u32>) {
    data
}

/// Reads element `i` of both parts of the state, and says which process did.
#[task]
fn read_large(state: &(Vec<u64>, multiproc::SealedSlice<u32>), i: usize) -> (u64, u32, usize, u32) {
    (state.0[i], state.1[i % state.1.len()], state.0.len(), std::process::id())
}

fn large_initializer_arguments(ctx: &Context) -> Result<(), Failed> {
    // 4 MB encoded: past the size at which spawn and forkserver hand the arguments over in
    // shared memory; the slice's descriptor must keep its index beside the memory's own.
    let len = 500_000usize;
    let values: Vec<u64> = (0..len as u64).map(|v| v * 3).collect();
    with_pool(
        ctx,
        || {
            let small = multiproc::SealedSlice::from_slice(&[7u32, 8, 9])?;
            ctx.pool()
                .processes(2)
                .max_tasks_per_child(3)
                .chunksize(1)
                .initializer(keep_large, (values.clone(), small))
                .build()
        },
        |pool| {
            let picks: Vec<usize> = (0..12).map(|k| k * 41_659).collect();
            let seen = pool.map(read_large, picks.clone())?;
            for (i, (value, small, seen_len, _)) in picks.iter().zip(&seen) {
                ensure(*value == values[*i] && *seen_len == len, || {
                    format!("item {i}: {value} of {seen_len} elements")
                })?;
                ensure(*small == [7, 8, 9][i % 3], || format!("item {i}: slice gave {small}"))?;
            }
            // 12 tasks at 3 per worker: replacements were started, and got the state too.
            let workers: HashSet<u32> = seen.iter().map(|(_, _, _, pid)| *pid).collect();
            ensure(workers.len() >= 4, || format!("only {} workers ran tasks", workers.len()))
        },
    )
}

fn imap_lazy(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(2).build(),
        |pool| {
            let produced = AtomicUsize::new(0);
            let endless = (0u64..).inspect(|_| {
                produced.fetch_add(1, Ordering::Relaxed);
            });
            let first: Vec<u64> =
                pool.imap(square, endless).take(100).collect::<multiproc::Result<_>>()?;
            ensure(first == (0..100u64).map(|x| x * x).collect::<Vec<_>>(), || {
                "imap results".into()
            })?;
            // Chunks of one, at most 128 per worker + 1 in flight beyond what was taken (the
            // bound `Pool::imap` documents).
            let produced = produced.load(Ordering::Relaxed);
            ensure(produced <= 100 + 128 * 2 + 1 + 1, || {
                format!("imap took {produced} items from the input to yield 100")
            })
        },
    )
}

fn imap_unordered(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(3).chunksize(7).build(),
        |pool| {
            let mut got: Vec<u64> =
                pool.imap_unordered(square, 0..1000u64).collect::<multiproc::Result<_>>()?;
            got.sort_unstable();
            ensure(got == (0..1000u64).map(|x| x * x).collect::<Vec<_>>(), || {
                "imap_unordered lost or changed results".into()
            })
        },
    )
}

fn apply_async(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(2).build(),
        |pool| {
            ensure(pool.apply(add, (20, 22))? == 42, || "apply".into())?;
            let gate = Gate::new("apply")?;
            let mut pending = pool.apply_async(gated, (gate.path(), 7))?;
            let mut stream = gate.accept()?;
            let pid = read_pid(&mut stream)?;
            ensure(pool.pids().contains(&pid), || format!("ran in {pid}, not a worker"))?;
            // The task is provably still running: it waits for us.
            ensure(!pending.ready(), || "ready before the task could finish".into())?;
            ensure(pending.get_timeout(Duration::from_millis(20))?.is_none(), || {
                "get_timeout returned a value the task had not produced".into()
            })?;
            stream.write_all(b"!")?;
            ensure(pending.wait_timeout(DEADLINE), || "wait_timeout".into())?;
            ensure(pending.ready(), || "not ready after wait".into())?;
            let value = pending.get_timeout(DEADLINE)?;
            ensure(value == Some(7), || format!("got {value:?}"))?;
            let again = pending.get_timeout(DEADLINE).expect_err("taken");
            ensure(again.kind() == ErrorKind::ResultTaken, || format!("{again:?}"))?;
            let sums = pool.map_async(add, (0..100u64).map(|i| (i, i)))?;
            sums.wait();
            ensure(sums.get()? == (0..100u64).map(|i| 2 * i).collect::<Vec<_>>(), || {
                "map_async".into()
            })
        },
    )
}

/// Panics on 13, squares the rest.
#[task]
fn unlucky(x: u64) -> u64 {
    if x == 13 {
        panic!("thirteen");
    }
    x * x
}

fn panic_per_item(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(2).build(),
        |pool| {
            let before: HashSet<u32> = pool.pids().into_iter().collect();
            let error = pool.map(unlucky, 0..50u64).expect_err("item 13 panics");
            ensure(error.kind() == ErrorKind::Panicked, || format!("{error:?}"))?;
            let panic = error.panic().ok_or("no panic details")?;
            ensure(panic.message == "thirteen", || format!("{panic:?}"))?;
            ensure(panic.location.as_deref().is_some_and(|l| l.contains("pool.rs")), || {
                format!("location {:?}", panic.location)
            })?;
            ensure(error.to_string().contains("item 13"), || error.to_string())?;
            let each: Vec<multiproc::Result<u64>> = pool.imap(unlucky, 0..50u64).collect();
            for (i, result) in each.iter().enumerate() {
                match result {
                    Ok(value) => ensure(i != 13 && *value == (i * i) as u64, || format!("{i}"))?,
                    Err(e) => ensure(i == 13 && e.kind() == ErrorKind::Panicked, || {
                        format!("item {i}: {e}")
                    })?,
                }
            }
            let after: HashSet<u32> = pool.pids().into_iter().collect();
            ensure(before == after, || "a panic replaced a worker".into())
        },
    )
}

fn killed_worker(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(2).build(),
        |pool| {
            let gate = Gate::new("kill")?;
            let doomed = pool.apply_async(gated, (gate.path(), 1))?;
            let mut stream = gate.accept()?;
            let victim = read_pid(&mut stream)?;
            let others = pool.map_async(square, 0..200u64)?;
            let pidfd = sys::pidfd_open(victim)?;
            sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL)?;
            let error = doomed.get().expect_err("its worker was killed");
            ensure(error.kind() == ErrorKind::ChildExited, || format!("{error:?}"))?;
            ensure(error.exit_status() == Some(ExitStatus::Signaled(libc::SIGKILL)), || {
                format!("status {:?}", error.exit_status())
            })?;
            ensure(others.get()? == (0..200u64).map(|x| x * x).collect::<Vec<_>>(), || {
                "other items".into()
            })?;
            let pids = pool.pids();
            ensure(pids.len() == 2 && !pids.contains(&victim), || {
                format!("workers {pids:?} after {victim} was killed")
            })?;
            ensure(pool.apply(add, (1, 1))? == 2, || "pool after replacement".into())
        },
    )
}

/// Returns `x`, except that at 300 its worker process exits at once, with code 3. From 200
/// on, each item takes 20 µs: still quick enough for its result to be held back, and slow
/// enough that the parent, waiting for the worker, is asleep when the worker dies.
#[task]
fn exit_at_300(x: u64) -> u64 {
    if x == 300 {
        sys::exit_immediately(3);
    }
    if x >= 200 {
        spin_for(Duration::from_micros(20));
    }
    x
}

/// Keeps the CPU busy for `time` (a task that takes that long, without sleeping).
fn spin_for(time: Duration) {
    let started = Instant::now();
    while started.elapsed() < time {
        std::hint::spin_loop();
    }
}

fn death_keeps_held_results(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        // One worker: nothing else wakes the parent, so it sees the death before it has read
        // what the worker held back.
        || ctx.pool().processes(1).build(),
        |pool| {
            // Quick items, one per batch: a worker holds back the results of batches it runs
            // while the next is already in hand, so it dies with finished results not yet
            // sent. Every one of them must still arrive; only item 300 fails.
            let results: Vec<_> = pool.imap(exit_at_300, 0..2000u64).collect();
            ensure(results.len() == 2000, || format!("{} results", results.len()))?;
            for (i, result) in results.iter().enumerate() {
                match result {
                    Ok(value) if i != 300 && *value == i as u64 => {}
                    Err(e)
                        if i == 300
                            && e.kind() == ErrorKind::ChildExited
                            && e.exit_status() == Some(ExitStatus::Exited(3)) => {}
                    other => return Err(format!("item {i}: {other:?}").into()),
                }
            }
            Ok(())
        },
    )
}

/// Returns the first value that arrives on `release`: a task that runs until the test lets
/// it finish.
#[task]
fn wait_for(release: multiproc::Queue<u64>) -> u64 {
    release.get_timeout(DEADLINE).expect("released within the deadline")
}

/// The square of `x`, after 60 µs: quick enough for its result to be held back, slow enough
/// that the parent has gone back to sleep by the time the first one is done.
#[task]
fn brief_square(x: u64) -> u64 {
    spin_for(Duration::from_micros(60));
    x * x
}

fn held_results_arrive_during_a_slow_batch(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(1).build(),
        |pool| {
            // Quick batches first: the engine learns to queue several behind a running one.
            for i in 0..50 {
                pool.apply(square, i)?;
            }
            let (first, second) = (ctx.queue::<u64>()?, ctx.queue::<u64>()?);
            let a = pool.apply_async(wait_for, first.clone())?;
            let quick = (0..10u64).map(|i| pool.apply_async(brief_square, i)).collect::<Vec<_>>();
            let b = pool.apply_async(wait_for, second.clone())?;
            // The worker finds the quick batches and `b` waiting in its socket once `a` ends:
            // it holds the quick results back while the next batch is in hand (after we have
            // read `a`'s result), then blocks in `b`. Those results must reach us while `b`
            // still runs.
            first.put(&1)?;
            // Well within the time `b` waits for its release (DEADLINE), which would end it.
            let due = Instant::now() + DEADLINE / 4;
            for (i, result) in quick.into_iter().enumerate() {
                let left = due.saturating_duration_since(Instant::now());
                let got = result?.get_timeout(left)?;
                ensure(got == Some(i as u64 * i as u64), || format!("quick item {i}: {got:?}"))?;
            }
            // A wait that runs out looks at the ring as it ends: the results must have come
            // before that, not thanks to it.
            ensure(Instant::now() < due, || {
                "the quick results came only when the wait for them ran out".into()
            })?;
            let mut a = a;
            ensure(a.get_timeout(DEADLINE)? == Some(1), || "the first slow task".into())?;
            second.put(&2)?;
            let mut b = b;
            ensure(b.get_timeout(DEADLINE)? == Some(2), || "the second slow task".into())
        },
    )
}

/// Serializes only even numbers.
#[derive(Debug, serde::Deserialize)]
pub struct EvenOnly(u64);

impl Serialize for EvenOnly {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.0.is_multiple_of(2) {
            serializer.serialize_u64(self.0)
        } else {
            Err(serde::ser::Error::custom(format!("{} is odd", self.0)))
        }
    }
}

#[task]
fn even_only(x: u64) -> EvenOnly {
    EvenOnly(x)
}

fn unencodable_item(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(1).chunksize(10).build(),
        |pool| {
            let results: Vec<_> = pool.imap(even_only, 0..10u64).collect();
            for (i, result) in results.iter().enumerate() {
                match result {
                    Ok(EvenOnly(v)) => ensure(i % 2 == 0 && *v == i as u64, || format!("{i}"))?,
                    Err(e) => ensure(
                        i % 2 == 1
                            && e.kind() == ErrorKind::Encode
                            && e.to_string().contains(&format!("{i} is odd")),
                        || format!("item {i}: {e}"),
                    )?,
                }
            }
            Ok(())
        },
    )
}

/// Half of an even number.
#[task]
fn halve(x: EvenOnly) -> u64 {
    x.0 / 2
}

fn unencodable_argument(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(2).build(),
        |pool| {
            let items = [0u64, 2, 4, 6, 7, 8].map(EvenOnly);
            let results: Vec<_> = pool.imap(halve, items).collect();
            // The items before it first, in order; the input ends at the one that cannot travel.
            ensure(results.len() == 5, || format!("{results:?}"))?;
            for (i, result) in results[..4].iter().enumerate() {
                ensure(matches!(result, Ok(half) if *half == i as u64), || format!("{results:?}"))?;
            }
            match &results[4] {
                Err(e) if e.kind() == ErrorKind::Encode && e.to_string().contains("7 is odd") => {
                    Ok(())
                }
                other => Err(format!("item 4: {other:?}").into()),
            }
        },
    )
}

fn exit_and_undecodable(ctx: &Context) -> Result<(), Failed> {
    use crate::common::quit;
    use crate::failures::picky;
    with_pool(
        ctx,
        || ctx.pool().processes(2).chunksize(2).build(),
        |pool| {
            // A task that exits its worker: the batch fails with the exit code, the pool goes on.
            let exited = pool.apply(quit, 7).expect_err("the worker exited");
            ensure(exited.kind() == ErrorKind::ChildExited, || format!("{exited:?}"))?;
            ensure(exited.exit_status() == Some(ExitStatus::Exited(7)), || format!("{exited:?}"))?;
            // Results that do not decode in the parent fail their batch (of two), and only it.
            let results: Vec<_> = pool.imap(picky, [0u8, 9, 0, 0]).collect();
            ensure(results.len() == 4, || format!("{} results", results.len()))?;
            for (i, result) in results.iter().enumerate() {
                match result {
                    Err(e) if i < 2 => ensure(e.kind() == ErrorKind::Decode, || format!("{e:?}"))?,
                    Ok(value) if i >= 2 => ensure(value.0 == 0, || "picky 0".into())?,
                    other => return Err(format!("item {i}: {other:?}").into()),
                }
            }
            // map: the batch that did not decode part-way through (its first item did) fails
            // as a whole, and that is map's error; the batches around it decoded.
            let mapped = pool.map(picky, [0u8, 0, 0, 9, 0, 0]).expect_err("a batch did not decode");
            ensure(mapped.kind() == ErrorKind::Decode, || format!("{mapped:?}"))?;
            ensure(pool.map(picky, [0u8; 5])?.len() == 5, || "map after a failed one".into())?;
            ensure(pool.apply(add, (2, 2))? == 4, || "the pool after both".into())?;
            ensure(pool.pids().len() == 2, || format!("workers {:?}", pool.pids()))
        },
    )
}

/// What [`Fickle`] does when it is encoded a third time.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Change {
    Fail,
    Shorten,
    Panic,
}

/// Large initializer arguments that encode as a plain vector twice, then differently: spawn
/// and forkserver measure large arguments (once to see that they are large, once to size
/// their memory) before the encoding the workers read behind, so this is a `Serialize` impl
/// that changes its mind between them.
struct Fickle {
    values: Vec<u64>,
    change: Change,
    encodings: AtomicUsize,
}

impl Serialize for Fickle {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.encodings.fetch_add(1, Ordering::SeqCst) < 2 {
            return self.values.serialize(serializer);
        }
        match self.change {
            Change::Fail => Err(serde::ser::Error::custom("changed its mind")),
            Change::Shorten => self.values[1..].serialize(serializer),
            Change::Panic => panic!("changed its mind"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Fickle {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let values = Vec::<u64>::deserialize(deserializer)?;
        Ok(Fickle { values, change: Change::Fail, encodings: AtomicUsize::new(0) })
    }
}

/// Keeps the vector of a [`Fickle`].
#[task]
fn keep_fickle(data: Fickle) -> Vec<u64> {
    data.values
}

/// The length of the state's vector.
#[task]
fn state_len(state: &Vec<u64>, _: ()) -> usize {
    state.len()
}

fn fickle_initializer_arguments(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    // 4 MB: past the size at which spawn and forkserver hand arguments over in memory.
    let values: Vec<u64> = (0..500_000).collect();
    for change in [Change::Fail, Change::Shorten, Change::Panic] {
        let fds = fd_count();
        let fickle = Fickle { values: values.clone(), change, encodings: AtomicUsize::new(0) };
        let builder = ctx.pool().processes(2).initializer(keep_fickle, fickle);
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| builder.build()));
        if matches!(ctx.start_method(), "fork" | "mpi") {
            // Moved (fork) or encoded once, whole (mpi): nothing to change its mind between.
            let pool = built.map_err(|_| "build panicked")??;
            let len = pool.apply(state_len, ())?;
            ensure(len == values.len(), || format!("{change:?}: state of {len} values"))?;
            drop(pool);
        } else {
            let message = match built {
                Ok(Ok(pool)) => return Err(format!("{change:?}: built {pool:?}").into()),
                Ok(Err(error)) => {
                    ensure(error.kind() == ErrorKind::Encode, || format!("{change:?}: {error:?}"))?;
                    error.to_string()
                }
                Err(panic) => {
                    panic.downcast_ref::<&str>().map(|m| m.to_string()).unwrap_or_default()
                }
            };
            let expected = match change {
                Change::Fail | Change::Panic => "changed its mind",
                Change::Shorten => "when measured",
            };
            ensure(message.contains(expected), || format!("{change:?}: {message}"))?;
        }
        let left = children_besides_server();
        ensure(left.is_empty(), || format!("{change:?}: left {left:?}"))?;
        ensure(zombie_children().is_empty(), || format!("{change:?}: zombies"))?;
        ensure(fd_count() == fds, || format!("{change:?}: {} fds, {fds} before", fd_count()))?;
    }
    Ok(())
}

/// An initializer that panics.
#[task]
fn broken_init(message: String) -> Vec<u8> {
    panic!("{message}")
}

/// Reads the state of a pool that never gets built.
#[task]
fn first_byte(state: &Vec<u8>, _: ()) -> u8 {
    state[0]
}

fn initializer_panic(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds = fd_count();
    let built = ctx.pool().processes(3).initializer(broken_init, "no cache".to_owned()).build();
    let error = match built {
        Ok(pool) => return Err(format!("built {pool:?}: {:?}", pool.apply(first_byte, ())).into()),
        Err(error) => error,
    };
    ensure(error.kind() == ErrorKind::Panicked, || format!("{error:?}"))?;
    ensure(error.panic().is_some_and(|p| p.message == "no cache"), || format!("{error:?}"))?;
    ensure(error.to_string().contains("initializer"), || error.to_string())?;
    let left = children_besides_server();
    ensure(left.is_empty(), || format!("left {left:?}"))?;
    ensure(zombie_children().is_empty(), || "zombies".into())?;
    ensure(fd_count() == fds, || "fds".into())
}

fn terminate_outstanding(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(2).build(),
        |pool| {
            let pids = pool.pids();
            let outstanding: Vec<_> = (0..10_000)
                .map(|_| pool.apply_async(nap, DEADLINE * 10))
                .collect::<multiproc::Result<_>>()?;
            let started = Instant::now();
            pool.terminate();
            eprintln!("terminate with 10,000 outstanding tasks took {:?}", started.elapsed());
            for pid in &pids {
                ensure(wait_gone(*pid, Duration::ZERO).is_some(), || {
                    format!("worker {pid} still runs after terminate()")
                })?;
            }
            ensure(pool.pids().is_empty(), || "workers listed after terminate".into())?;
            for pending in outstanding {
                let error = pending.get().expect_err("cancelled");
                ensure(error.kind() == ErrorKind::Cancelled, || format!("{error:?}"))?;
            }
            let refused = pool.apply(add, (1, 1)).expect_err("terminated");
            ensure(refused.kind() == ErrorKind::InvalidState, || format!("{refused:?}"))
        },
    )
}

fn task_timeout(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(1).task_timeout(Duration::from_millis(300)).build(),
        |pool| {
            let before = pool.pids();
            let error = pool.apply(nap, DEADLINE * 10).expect_err("over its limit");
            ensure(error.kind() == ErrorKind::Timeout, || format!("{error:?}"))?;
            ensure(error.exit_status() == Some(ExitStatus::Signaled(libc::SIGKILL)), || {
                format!("{:?}", error.exit_status())
            })?;
            ensure(pool.apply(add, (2, 3))? == 5, || "after a timeout".into())?;
            let after = pool.pids();
            ensure(after.len() == 1 && after != before, || format!("{before:?} → {after:?}"))
        },
    )
}

fn max_tasks(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(1).max_tasks_per_child(2).chunksize(1).build(),
        |pool| {
            let pids = pool.map(whoami, vec![(); 6])?;
            let mut uses: BTreeMap<u32, usize> = BTreeMap::new();
            for pid in &pids {
                *uses.entry(*pid).or_default() += 1;
            }
            ensure(uses.len() == 3 && uses.values().all(|n| *n == 2), || {
                format!("tasks per worker: {uses:?}")
            })?;
            let pids = pool.map(whoami, vec![(); 5])?;
            ensure(pids.len() == 5, || "second map".into())?;
            pool.close();
            pool.join()?;
            ensure(pool.pids().is_empty(), || "workers after join".into())
        },
    )
}

fn from_threads(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(2).build(),
        |pool| {
            std::thread::scope(|scope| {
                let threads: Vec<_> = (0..4u64)
                    .map(|t| {
                        scope.spawn(move || {
                            let items = (t * 1000..(t + 1) * 1000).collect::<Vec<u64>>();
                            let got = pool.map(square, items.clone());
                            (items, got)
                        })
                    })
                    .collect();
                for thread in threads {
                    let (items, got) = thread.join().map_err(|_| "thread panicked")?;
                    let expected: Vec<u64> = items.iter().map(|x| x * x).collect();
                    ensure(got? == expected, || "a thread got another's results".into())?;
                }
                Ok(())
            })
        },
    )
}

fn close_and_join(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(2).build(),
        |pool| {
            let early = pool.join().expect_err("join before close");
            ensure(early.kind() == ErrorKind::InvalidState, || format!("{early:?}"))?;
            let queued = pool.map_async(square, 0..100u64)?;
            pool.close();
            let refused = pool.apply(add, (1, 1)).expect_err("closed");
            ensure(refused.kind() == ErrorKind::InvalidState, || format!("{refused:?}"))?;
            // Work queued before close() still runs.
            ensure(queued.get()?.len() == 100, || "queued work".into())?;
            let pids = pool.pids();
            pool.join()?;
            for pid in pids {
                ensure(wait_gone(pid, Duration::ZERO).is_some(), || format!("{pid} runs"))?;
            }
            ensure(pool.pids().is_empty(), || "workers after join".into())
        },
    )
}

/// Six results on two workers, seen by `ready()` alone: no thread waits on the pool.
fn ready_alone(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(2).build(),
        |pool| {
            let results = (0..6u64)
                .map(|x| pool.apply_async(square, x))
                .collect::<multiproc::Result<Vec<_>>>()?;
            let deadline = Instant::now() + DEADLINE;
            while !results.iter().all(|r| r.ready()) {
                ensure(Instant::now() < deadline, || {
                    let ready = results.iter().filter(|r| r.ready()).count();
                    format!("{ready} of 6 ready after {DEADLINE:?} of polling ready()")
                })?;
                std::thread::yield_now();
            }
            for (x, mut result) in results.into_iter().enumerate() {
                ensure(result.wait_timeout(Duration::ZERO), || "ready, but not at once".into())?;
                let value = result.get_timeout(Duration::ZERO)?;
                ensure(value == Some(x as u64 * x as u64), || format!("result {x}: {value:?}"))?;
            }
            Ok(())
        },
    )
}

/// The pool's workers as the system sees them, without asking the pool: the processes below
/// us that fork nothing (the forkserver and a fork pool's template have children), and every
/// zombie below us. Polled until `done` holds for them, within the deadline.
fn workers_until(
    what: &str,
    mut done: impl FnMut(&[u32], &[u32]) -> bool,
) -> Result<Vec<u32>, Failed> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let below = descendants();
        let zombies: Vec<u32> = below.iter().filter(|d| d.zombie).map(|d| d.pid).collect();
        // The forkserver's spares are leaves too, but no pool's workers.
        let spare = |pid: u32| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            comm.trim_end() == "multiproc-spare"
        };
        let leaves: Vec<u32> = below
            .iter()
            .filter(|d| !d.zombie && !d.parent_of_any && !spare(d.pid))
            .map(|d| d.pid)
            .collect();
        if done(&leaves, &zombies) {
            return Ok(leaves);
        }
        ensure(Instant::now() < deadline, || {
            format!("{what}: after {DEADLINE:?}, workers {leaves:?}, zombies {zombies:?}")
        })?;
        // Polling the system, not waiting for the pool: nothing here drives it.
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn same_set(a: &[u32], b: &[u32]) -> bool {
    a.iter().collect::<HashSet<_>>() == b.iter().collect::<HashSet<_>>()
}

/// `Pool(3)` with `max_tasks_per_child(10)` after 100 tasks: with nobody calling the pool,
/// the workers that retired are reaped (no zombie) and replaced (three live workers), and
/// `pids()` then lists exactly those.
fn idle_pool_replaces_retired(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(3).max_tasks_per_child(10).chunksize(1).build(),
        |pool| {
            let ran = pool.map(whoami, vec![(); 100])?;
            let mut uses: BTreeMap<u32, usize> = BTreeMap::new();
            for pid in ran {
                *uses.entry(pid).or_default() += 1;
            }
            // Those that ran their ten are retired, and must be gone.
            let spent: HashSet<u32> =
                uses.iter().filter(|(_, n)| **n == 10).map(|(p, _)| *p).collect();
            ensure(spent.len() >= 8, || format!("tasks per worker: {uses:?}"))?;
            let workers = workers_until("an idle pool after retirements", |live, zombies| {
                live.len() == 3 && zombies.is_empty() && live.iter().all(|p| !spent.contains(p))
            })?;
            let pids = pool.pids();
            ensure(same_set(&pids, &workers), || format!("pids() {pids:?}, workers {workers:?}"))
        },
    )
}

/// A worker of an idle pool killed from outside: reaped and replaced with nobody calling the
/// pool.
fn idle_pool_replaces_killed(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(2).build(),
        |pool| {
            let before = pool.pids();
            let victim = before[0];
            let pidfd = sys::pidfd_open(victim)?;
            sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL)?;
            let workers = workers_until("an idle pool after a kill", |live, zombies| {
                live.len() == 2 && zombies.is_empty() && !live.contains(&victim)
            })?;
            ensure(workers.contains(&before[1]), || format!("the other worker went: {workers:?}"))?;
            let pids = pool.pids();
            ensure(same_set(&pids, &workers), || format!("pids() {pids:?}, workers {workers:?}"))?;
            ensure(pool.apply(square, 7)? == 49, || "the pool serves after the kill".into())
        },
    )
}

/// A pool's progress thread does not stop the program from starting processes (under fork:
/// it is parked across each fork), not even in the instant after `build()` spawned it.
fn start_beside_pools(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds = fd_count();
    for round in 0..20u64 {
        let pool = ctx.pool().processes(1).build()?;
        let started = ctx.process(add, (round, 1)).start()?;
        ensure(started.join()? == round + 1, || format!("round {round}"))?;
        ensure(pool.apply(add, (round, 2))? == round + 2, || format!("pool, round {round}"))?;
    }
    ensure(zombie_children().is_empty(), || format!("zombies: {:?}", zombie_children()))?;
    let after = fd_count();
    ensure(after == fds, || format!("fds before {fds}, after {after}"))
}
