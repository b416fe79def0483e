//! Synchronization benchmark: an uncontended `Lock` beside `std::sync::Mutex` in one process;
//! an `Event` ping-pong between a parent and a child; and 8 processes adding to a shared
//! `Value` under its lock, beside 8 threads adding to a `std::sync::Mutex` — each beside
//! Python's `multiprocessing` doing the same, measured in this run, under each start method.
//!
//! `cargo bench -p multiproc-tests --bench sync` (`-- --quick` for a smoke run).

mod common;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use common::{Stats, Table, Target, Value, on_one_cpu, python, python_time};
use multiproc::{Context, Event, Semaphore, task};
use multiproc_core::sys;

/// Answers `round_trips` pings: waits for `ping`, clears it, sets `pong`.
#[task]
fn answer(ping: Event, pong: Event, round_trips: u32) {
    for _ in 0..round_trips {
        ping.wait().expect("ping");
        ping.clear();
        pong.set();
    }
}

/// The raw baseline of [`answer`]: two futex words at the start of a shared memfd (ping,
/// pong), no spinning, nothing but the syscalls.
#[task]
fn raw_answer(memory: multiproc::Fd<OwnedFd>, round_trips: u32) {
    let map = sys::Mapping::writable(memory.as_fd(), 4096).expect("mmap");
    let (ping, pong) = (map.atomic_u32(0).expect("ping"), map.atomic_u32(4).expect("pong"));
    for _ in 0..round_trips {
        while ping.load(SeqCst) == 0 {
            sys::futex_wait(ping, 0, None).expect("futex wait");
        }
        ping.store(0, SeqCst);
        pong.store(1, SeqCst);
        sys::futex_wake(pong, 1);
    }
}

/// One raw ping-pong run, timed as [`ping_pong`] is.
fn raw_ping_pong(ctx: &Context, round_trips: u32) -> Result<Duration, multiproc::Error> {
    let memory = sys::memfd("raw-ping-pong", 4096).expect("memfd");
    let map = sys::Mapping::writable(memory.as_fd(), 4096).expect("mmap");
    let (ping, pong) = (map.atomic_u32(0).expect("ping"), map.atomic_u32(4).expect("pong"));
    let fd = multiproc::Fd::new(memory.try_clone().expect("dup"));
    let child = ctx.process(raw_answer, (fd, round_trips)).start()?;
    let mut started = Instant::now();
    for i in 0..round_trips {
        if i == 1 {
            started = Instant::now();
        }
        ping.store(1, SeqCst);
        sys::futex_wake(ping, 1);
        while pong.load(SeqCst) == 0 {
            sys::futex_wait(pong, 0, None).expect("futex wait");
        }
        pong.store(0, SeqCst);
    }
    let took = started.elapsed() / (round_trips - 1);
    child.join()?;
    Ok(took)
}

/// Says it is ready, waits for `go`, then adds 1 to `value` `increments` times under its lock.
#[task]
fn count(value: multiproc::Value<u64>, ready: Semaphore, go: Event, increments: u32) {
    ready.release().expect("ready");
    go.wait().expect("go");
    for _ in 0..increments {
        *value.get_lock().expect("the value's lock") += 1;
    }
}

/// The median time of one of `n` operations, over `runs` runs of `body(n)`.
fn per_op(runs: usize, n: u32, mut body: impl FnMut(u32)) -> Duration {
    Stats::of(
        (0..runs)
            .map(|_| {
                let started = Instant::now();
                body(n);
                Duration::from_secs_f64(started.elapsed().as_secs_f64() / f64::from(n))
            })
            .collect(),
    )
    .median
}

/// One ping-pong run: the time of a round trip, the first (which waits for the child's start)
/// not counted.
fn ping_pong(ctx: &Context, round_trips: u32) -> Result<Duration, multiproc::Error> {
    let (ping, pong) = (Event::new()?, Event::new()?);
    let child = ctx.process(answer, (ping.try_clone()?, pong.try_clone()?, round_trips)).start()?;
    let mut started = Instant::now();
    for i in 0..round_trips {
        if i == 1 {
            started = Instant::now();
        }
        ping.set();
        pong.wait()?;
        pong.clear();
    }
    let took = started.elapsed() / (round_trips - 1);
    child.join()?;
    Ok(took)
}

/// One counter run: from the go signal to the last join.
fn counter(ctx: &Context, processes: u32, increments: u32) -> Result<Duration, multiproc::Error> {
    let (value, ready, go) = (multiproc::Value::new(0u64)?, Semaphore::new(0)?, Event::new()?);
    let children = (0..processes)
        .map(|_| {
            let args = (value.try_clone()?, ready.try_clone()?, go.try_clone()?, increments);
            ctx.process(count, args).start()
        })
        .collect::<multiproc::Result<Vec<_>>>()?;
    for _ in 0..processes {
        ready.acquire()?;
    }
    let started = Instant::now();
    go.set();
    for child in children {
        child.join()?;
    }
    let took = started.elapsed();
    assert_eq!(value.get()?, u64::from(processes * increments));
    Ok(took)
}

/// The baseline of the counter: `threads` threads adding to one `std::sync::Mutex`.
fn threads_counter(threads: u32, increments: u32) -> Duration {
    let total = Mutex::new(0u64);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                for _ in 0..increments {
                    *total.lock().expect("not poisoned") += 1;
                }
            });
        }
    });
    let took = started.elapsed();
    assert_eq!(total.into_inner().expect("not poisoned"), u64::from(threads * increments));
    took
}

fn main() -> Result<(), multiproc::Error> {
    let quick = common::quick();
    let (locks, round_trips, increments, runs) =
        if quick { (100_000, 500, 1_000, 1) } else { (2_000_000, 20_000, 10_000, 5) };
    let processes = 8;
    let mut table = Table::new(format!(
        "Synchronization: an uncontended lock()+unlock (median of {runs} runs of {locks}), an \
         Event ping-pong round trip between two processes (medians of {runs} runs of \
         {round_trips}), {processes} processes × {increments} increments of a shared counter \
         under its lock (go signal to last join, median of {runs})"
    ));

    let lock = multiproc::Lock::new()?;
    let ours = per_op(runs, locks, |n| {
        for _ in 0..n {
            drop(std::hint::black_box(lock.lock().expect("free")));
        }
    });
    let mutex = Mutex::new(());
    let std_mutex = per_op(runs, locks, |n| {
        for _ in 0..n {
            drop(std::hint::black_box(mutex.lock().expect("free")));
        }
    });

    let mut first = true;
    for method in ["fork", "spawn", "forkserver"] {
        let ctx = Context::new(method)?;
        let args = [locks, round_trips, processes, increments, runs as u32];
        let mut args: Vec<String> = args.iter().map(u32::to_string).collect();
        args.insert(0, method.to_owned());
        let py = python("sync_bench.py", &args);
        if first {
            table.row(
                "uncontended lock()+unlock, one process, vs std::sync::Mutex",
                "any",
                Value::Time(ours),
                Value::Time(std_mutex),
                python_time(&py, "lock"),
                Target::AtMost(2.0),
            );
            first = false;
        }

        let round_trip = || -> multiproc::Result<(Duration, Duration)> {
            ping_pong(&ctx, 10)?;
            raw_ping_pong(&ctx, 10)?;
            let (mut ours, mut raw) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                ours.push(ping_pong(&ctx, round_trips)?);
                raw.push(raw_ping_pong(&ctx, round_trips)?);
            }
            Ok((Stats::of(ours).median, Stats::of(raw).median))
        };
        let (free, free_raw) = round_trip()?;
        table.row(
            "Event ping-pong round trip vs a raw futex ping-pong, free placement",
            method,
            Value::Time(free),
            Value::Time(free_raw),
            python_time(&py, "ping_pong"),
            Target::PythonRatio(10.0),
        );
        let ((one_cpu, one_cpu_raw), py_one_cpu) = on_one_cpu(|| -> multiproc::Result<_> {
            let mut args = args.clone();
            args.push("ping_pong".into());
            Ok((round_trip()?, python("sync_bench.py", &args)))
        })?;
        table.row(
            "Event ping-pong round trip vs a raw futex ping-pong, both on one CPU",
            method,
            Value::Time(one_cpu),
            Value::Time(one_cpu_raw),
            python_time(&py_one_cpu, "ping_pong"),
            Target::AtMost(1.1),
        );

        counter(&ctx, processes, increments)?;
        let shared = Stats::of(
            (0..runs)
                .map(|_| counter(&ctx, processes, increments))
                .collect::<multiproc::Result<Vec<_>>>()?,
        )
        .median;
        let threads =
            Stats::of((0..runs).map(|_| threads_counter(processes, increments)).collect()).median;
        table.row(
            &format!("{processes} processes × {increments} increments of a Value under its lock, vs {processes} threads on a std Mutex"),
            method,
            Value::Time(shared),
            Value::Time(threads),
            python_time(&py, "counter"),
            Target::Words("reported (Python's Value with its lock beside it)".into()),
        );
    }
    table.note(
        "The lock is a process-shared robust pthread mutex (it survives its holder's death); \
         std::sync::Mutex is a private futex lock that does not.",
    );
    table.note(
        "A waiter spins for at most 5 µs before it sleeps on the futex, when its process may \
         run on more than one CPU: with free placement the two processes usually run on two \
         CPUs and each sees the other's set while spinning. On one CPU nobody spins, and a round \
         trip is two futex wakes and two context switches, as the raw baseline's is: the 10× \
         target against Python is out of reach there (Python's round trip is 5-10× that floor), \
         so the row's target is the floor.",
    );
    table.finish();
    Ok(())
}
