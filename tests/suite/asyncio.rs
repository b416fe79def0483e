//! Async handles (the `tokio` feature), under the start method being tested: futures for
//! pool results, processes, pipes and queues, `imap` as a stream, `wait_async`, on both kinds
//! of tokio runtime. Under fork, only a current-thread runtime can start processes (a
//! multi-thread one has threads a fork refuses); a pool built before the runtime starts is
//! served by its template, so it works from either.

use std::collections::HashSet;
use std::future::Future;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libtest_mimic::Failed;
use multiproc::{Context, ErrorKind, ExitStatus, task};

use crate::Scenario;
use crate::common::{DEADLINE, Gate, ensure, fd_count, gated, join, nap, read_pid, warm_up};
use crate::pool::{square, with_pool};

/// The scenarios above that use only pools and processes, and so run under the mpi context
/// too (the others hold pipes, queues and locks: descriptors, which it refuses).
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub const POOL_AND_PROCESS: &[&str] = &[
    "async_10000_awaited_results_on_2_threads_use_no_thread_each",
    "async_a_killed_worker_fails_its_future_as_it_fails_get",
    "async_a_dropped_future_cancels_its_queued_task",
    "async_imap_is_a_stream_in_order_and_unordered",
    "async_a_process_killed_from_another_task_resolves_with_the_signal",
];

pub const SCENARIOS: &[Scenario] = &[
    ("async_10000_awaited_results_on_2_threads_use_no_thread_each", ten_thousand_awaited),
    ("async_a_killed_worker_fails_its_future_as_it_fails_get", killed_worker_future),
    ("async_a_dropped_future_cancels_its_queued_task", dropped_future_cancels),
    ("async_imap_is_a_stream_in_order_and_unordered", imap_stream),
    ("async_a_process_killed_from_another_task_resolves_with_the_signal", process_killed),
    ("async_pipe_and_queues_send_and_receive_through_the_reactor", pipe_and_queues),
    ("async_wait_mixes_results_processes_and_connections", wait_mixed),
    ("async_sync_primitives_wake_futures_from_other_processes", sync_primitives),
    ("async_lock_async_takes_a_lock_from_a_sigkilled_holder", lock_from_killed_holder),
];

/// Waits for `go`, then takes `condition`'s lock, sets `flag` and notifies every waiter.
#[task]
fn notify_when_told(
    condition: multiproc::Condition,
    flag: multiproc::SharedAtomicU64,
    go: multiproc::Event,
) {
    go.wait_timeout(DEADLINE).expect("wait for go");
    let _guard = condition.lock().expect("the condition's lock");
    flag.store(1);
    condition.notify_all();
}

fn sync_primitives(ctx: &Context) -> Result<(), Failed> {
    use crate::sync::{release_times, set_when_told, wait_at};
    warm_up(ctx)?;
    let fds = fd_count();
    let runtime = runtime(ctx)?;
    let (go, done) = (ctx.event()?, ctx.event()?);
    let semaphore = ctx.semaphore(0)?;
    let (condition, flag) = (ctx.condition()?, multiproc::SharedAtomicU64::new(0)?);
    let barrier = ctx.barrier(2)?;
    let children = (
        ctx.process(set_when_told, (go.try_clone()?, done.try_clone()?)).start()?,
        ctx.process(release_times, (semaphore.try_clone()?, 3)).start()?,
        ctx.process(notify_when_told, (condition.try_clone()?, flag.try_clone()?, go.try_clone()?))
            .start()?,
        ctx.process(wait_at, barrier.try_clone()?).start()?,
    );
    let threads_before = threads();
    let (notified, led) = run(&runtime, async {
        // 100 futures wait on one event with no thread each.
        let waiters = (0..100).map(|_| done.wait_async()).collect::<Vec<_>>();
        let all_done = futures::future::join_all(waiters);
        let guard = condition.lock()?;
        let notified = condition.wait_async(guard);
        go.set();
        for result in all_done.await {
            result?;
        }
        ensure(threads() <= threads_before, || {
            format!("{} threads, {threads_before} before", threads())
        })?;
        for _ in 0..3 {
            semaphore.acquire_async().await?;
        }
        let notified = notified.await.map(|guard| {
            drop(guard);
            flag.load() == 1
        })?;
        let led = barrier.wait_async().await?.is_leader();
        Ok((notified, led))
    })?;
    drop(runtime);
    ensure(notified, || "the condition woke before the flag was set".into())?;
    ensure(join(children.0)?? && join(children.1)?.is_ok(), || {
        "the event's and semaphore's children".into()
    })?;
    join(children.2)??;
    let theirs = join(children.3)??;
    ensure(theirs.is_ok_and(|theirs_led| theirs_led != led), || {
        "one leader of the barrier".into()
    })?;
    ensure(semaphore.value() == 0, || format!("semaphore at {}", semaphore.value()))?;
    drop((go, done, semaphore, condition, flag, barrier));
    let after = fd_count();
    ensure(after == fds, || format!("fds before {fds}, after {after}"))
}

fn lock_from_killed_holder(ctx: &Context) -> Result<(), Failed> {
    use crate::sync::hold_until_killed;
    let runtime = runtime(ctx)?;
    let (lock, held) = (ctx.lock()?, ctx.event()?);
    let mut holder =
        ctx.process(hold_until_killed, (lock.try_clone()?, held.try_clone()?)).start()?;
    ensure(held.wait_timeout(DEADLINE)?, || "the holder never took the lock".into())?;
    let taken = run(&runtime, async {
        // Nothing will ring the lock's bell: the holder is killed, not released.
        let waiting = lock.lock_async();
        holder.kill()?;
        Ok(match waiting.await {
            Err(multiproc::LockError::OwnerDied(guard)) => {
                drop(guard);
                "owner died".to_string()
            }
            Ok(_) => "taken with no word of the dead owner".to_string(),
            Err(multiproc::LockError::Failed(e)) => e.to_string(),
        })
    })?;
    ensure(holder.join().is_err(), || "the killed holder returned".into())?;
    ensure(taken == "owner died", || taken.clone())
}

/// A runtime this method can start processes from: current-thread under fork, two worker
/// threads otherwise.
fn runtime(ctx: &Context) -> Result<tokio::runtime::Runtime, Failed> {
    let mut builder = if ctx.start_method() == "fork" {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(2);
        builder
    };
    Ok(builder.enable_all().build()?)
}

/// Runs `future` on `runtime` within the suite's deadline.
fn run<T>(
    runtime: &tokio::runtime::Runtime,
    future: impl Future<Output = Result<T, Failed>>,
) -> Result<T, Failed> {
    runtime.block_on(async {
        match tokio::time::timeout(DEADLINE, future).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("not done within {DEADLINE:?}").into()),
        }
    })
}

/// Threads of this process.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map(|dir| dir.count()).unwrap_or(0)
}

fn ten_thousand_awaited(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(2).build(),
        |pool| {
            // Two runtime threads, whatever the start method: the pool's workers exist already
            // (under fork, its template forks any replacement).
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let before = threads();
            let results = (0..10_000u64)
                .map(|x| pool.apply_async(square, x))
                .collect::<multiproc::Result<Vec<_>>>()?;
            let outcome = run(&runtime, async {
                let handles: Vec<_> = results.into_iter().map(tokio::spawn).collect();
                // Every future has been polled (and is waiting) once the runtime has had a
                // turn; the thread count then says whether anything waits on a thread.
                tokio::task::yield_now().await;
                let during = threads();
                let mut values = Vec::with_capacity(handles.len());
                for handle in handles {
                    values.push(handle.await??);
                }
                Ok((during, values))
            });
            drop(runtime);
            let (during, values) = outcome?;
            ensure(values == (0..10_000u64).map(|x| x * x).collect::<Vec<_>>(), || {
                "awaited results wrong or out of order".into()
            })?;
            ensure(during <= before + 1, || {
                format!("{before} threads before 10,000 awaited results, {during} while pending")
            })
        },
    )
}

fn killed_worker_future(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(1).build(),
        |pool| {
            let runtime = runtime(ctx)?;
            let mut errors = Vec::new();
            for awaited in [false, true] {
                let gate = Gate::new("async-kill")?;
                let doomed = pool.apply_async(gated, (gate.path(), 1))?;
                let mut stream = gate.accept()?;
                let victim = read_pid(&mut stream)?;
                multiproc_core::sys::pidfd_send_signal(
                    std::os::fd::AsFd::as_fd(&multiproc_core::sys::pidfd_open(victim)?),
                    libc::SIGKILL,
                )?;
                let outcome =
                    if awaited { run(&runtime, async { Ok(doomed.await) })? } else { doomed.get() };
                errors.push(outcome.expect_err("its worker was killed"));
            }
            let (blocking, awaited) = (&errors[0], &errors[1]);
            ensure(awaited.kind() == ErrorKind::ChildExited, || format!("{awaited:?}"))?;
            ensure(awaited.kind() == blocking.kind(), || format!("{awaited:?} vs {blocking:?}"))?;
            ensure(awaited.exit_status() == Some(ExitStatus::Signaled(libc::SIGKILL)), || {
                format!("status {:?}", awaited.exit_status())
            })?;
            ensure(awaited.exit_status() == blocking.exit_status(), || "statuses differ".into())?;
            let again = run(&runtime, async { Ok(pool.apply_async(square, 9)?.await?) })?;
            ensure(again == 81, || "the pool serves after the kill".into())
        },
    )
}

/// Creates the file at `path`: proof that the task ran.
#[task]
fn touch(path: std::path::PathBuf) {
    std::fs::write(path, b"ran").expect("write the marker");
}

fn dropped_future_cancels(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(1).build(),
        |pool| {
            let runtime = runtime(ctx)?;
            let gate = Gate::new("async-cancel")?;
            let marker = std::env::temp_dir()
                .join(format!("multiproc-async-cancel-{}.marker", std::process::id()));
            let _ = std::fs::remove_file(&marker);
            let busy = pool.apply_async(gated, (gate.path(), 5))?;
            let mut stream = gate.accept()?;
            let _ = read_pid(&mut stream)?;
            // The worker holds the batch it runs and one more (its depth before any batch has
            // finished): that one is in its socket, past cancelling. The next stays queued in
            // the pool; it is polled once (so it waits), then dropped.
            let next = pool.apply_async(square, 2)?;
            let queued = pool.apply_async(touch, marker.clone())?;
            let pending = run(&runtime, async {
                let timeout = tokio::time::timeout(Duration::from_millis(1), queued).await;
                Ok(timeout.is_err())
            })?;
            ensure(pending, || "the queued task finished while its worker was busy".into())?;
            drop(stream);
            ensure(busy.get()? == 5 && next.get()? == 4, || "the tasks before it".into())?;
            // Work queued after the dropped future runs: had the dropped one not been
            // cancelled, it would have run before this.
            ensure(pool.apply(square, 3)? == 9, || "a later task".into())?;
            ensure(!marker.exists(), || "the dropped future's task ran".into())
        },
    )
}

fn imap_stream(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(2).build(),
        |pool| {
            let runtime = runtime(ctx)?;
            let (ordered, unordered) = run(&runtime, async {
                let ordered: Vec<u64> = pool
                    .imap(square, 0..2_000u64)
                    .into_stream()
                    .map(|r| r.expect("a square"))
                    .collect()
                    .await;
                let mut unordered = Vec::new();
                let mut stream = pool.imap_unordered(square, 0..2_000u64).into_stream();
                while let Some(result) = stream.next().await {
                    unordered.push(result?);
                }
                Ok((ordered, unordered))
            })?;
            let expected: Vec<u64> = (0..2_000u64).map(|x| x * x).collect();
            ensure(ordered == expected, || "imap stream out of order".into())?;
            let got: HashSet<u64> = unordered.into_iter().collect();
            ensure(got == expected.into_iter().collect(), || "imap_unordered stream".into())
        },
    )
}

fn process_killed(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds = fd_count();
    let runtime = runtime(ctx)?;
    let process = ctx.process(nap, DEADLINE).start()?;
    let signaller = process.signaller()?;
    let started = Instant::now();
    let outcome = run(&runtime, async move {
        let joined = tokio::spawn(process.join_async());
        tokio::spawn(async move { signaller.kill() }).await??;
        Ok(joined.await?)
    })?;
    drop(runtime);
    let error = outcome.expect_err("it was killed");
    ensure(error.exit_status() == Some(ExitStatus::Signaled(libc::SIGKILL)), || {
        format!("{error:?}")
    })?;
    ensure(started.elapsed() < DEADLINE, || "join_async waited for the nap".into())?;
    let after = fd_count();
    ensure(after == fds, || format!("fds before {fds}, after {after}"))
}

/// Sends back what it receives, until the other end closes.
#[task]
fn echo(conn: multiproc::Connection<Vec<u8>>) {
    let mut conn = conn;
    while let Ok(message) = conn.recv() {
        if conn.send(&message).is_err() {
            break;
        }
    }
}

/// Takes `count` numbers from `queue`, marking each done, and puts their sum on `sums`.
#[task]
fn drain_and_sum(
    queue: multiproc::JoinableQueue<u64>,
    sums: multiproc::Queue<u64>,
    count: u64,
) -> u64 {
    let mut sum = 0;
    for _ in 0..count {
        sum += queue.get().expect("a number");
        queue.task_done().expect("task_done");
    }
    sums.put(&sum).expect("put the sum");
    sum
}

fn pipe_and_queues(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds = fd_count();
    let runtime = runtime(ctx)?;
    {
        let (mut ours, theirs) = ctx.pipe::<Vec<u8>>()?;
        let echoer = ctx.process(echo, theirs).start()?;
        // A bounded queue of 4 for 1,000 numbers: put_async waits for room many times.
        let numbers = multiproc::JoinableQueue::<u64>::bounded(4)?;
        let sums = multiproc::Queue::<u64>::new()?;
        let summer = ctx.process(drain_and_sum, (numbers.clone(), sums.clone(), 1_000)).start()?;
        let (echoed, sum) = run(&runtime, async {
            let mut echoed = Vec::new();
            for size in [0usize, 1, 1000, 1 << 20] {
                let message = vec![size as u8; size];
                ours.send_async(&message).await?;
                echoed.push(ours.recv_async().await? == message);
            }
            for n in 0..1_000u64 {
                numbers.put_async(&n).await?;
            }
            numbers.join_async().await?;
            let sum = sums.get_async().await?;
            Ok((echoed, sum))
        })?;
        ensure(echoed.iter().all(|same| *same), || format!("echoes {echoed:?}"))?;
        ensure(sum == (0..1_000u64).sum::<u64>(), || format!("sum {sum}"))?;
        drop(ours);
        echoer.join()?;
        ensure(summer.join()? == sum, || "the summer's own sum".into())?;
    }
    drop(runtime);
    let after = fd_count();
    ensure(after == fds, || format!("fds before {fds}, after {after}"))
}

fn wait_mixed(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(2).build(),
        |pool| {
            let runtime = runtime(ctx)?;
            let slow = ctx.process(nap, DEADLINE).start()?;
            let (ours, _theirs) = ctx.pipe::<u8>()?;
            let gate = Gate::new("async-wait")?;
            let blocked = pool.apply_async(gated, (gate.path(), 1))?;
            let quick = pool.apply_async(square, 4)?;
            let objects: [&dyn multiproc::Waitable; 4] = [&slow, &ours, &blocked, &quick];
            // In a blocking wait and an awaited one, the quick result alone is ready.
            let sync_ready = multiproc::wait(&objects, Some(DEADLINE))?;
            let async_ready = run(&runtime, async { Ok(multiproc::wait_async(&objects).await?) })?;
            ensure(sync_ready == [3] && async_ready == [3], || {
                format!("ready: {sync_ready:?} and {async_ready:?}")
            })?;
            // Read its check-in before the gate closes: closing first could cut the child's
            // write short (EPIPE), which failed this test now and then under load.
            let mut stream = gate.accept()?;
            read_pid(&mut stream)?;
            drop(stream);
            let ready = multiproc::wait(&[&slow, &blocked], Some(DEADLINE))?;
            ensure(ready == [1], || format!("after the gate opened: {ready:?}"))?;
            ensure(blocked.get()? == 1 && quick.get()? == 16, || "results".into())?;
            let mut slow = slow;
            slow.kill()?;
            ensure(slow.join().is_err(), || "the killed nap".into())
        },
    )
}
