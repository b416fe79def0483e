//! Start-up benchmark: start → join of a trivial task under each start method, one at a time
//! and 64 at once, beside the raw syscalls it is built on and beside Python's `multiprocessing`,
//! all measured in this run; and the forkserver's cold start.
//!
//! `cargo xtask bench` (or `-- --quick` for a smoke run whose numbers mean nothing).

mod common;

use common::{
    Stats, Table, Target, Value, kill_forkserver, measure, measure_pair, on_one_cpu, python,
    python_time,
};
use multiproc::{Context, task};
use multiproc_core::sys::{self, Forked};
use multiproc_core::{ChildHandle, DirectChild};

/// The trivial task.
#[task]
fn noop() {}

/// When set, `main` exits at once: the raw `posix_spawn` baseline runs this binary to `main`.
const EXIT_AT_ONCE: &str = "MULTIPROC_BENCH_EXIT_AT_ONCE";

/// Processes started together in the burst workload.
const BURST: usize = 64;

/// A raw fork, its child's `_exit`, and the wait for it.
fn raw_fork_join() {
    raw_fork().wait_deadline(None).expect("wait");
}

fn raw_fork() -> DirectChild {
    match sys::fork_single_threaded(&[], 0) {
        Ok(Forked::Child) => sys::exit_immediately(0),
        Ok(Forked::Parent(pid)) => DirectChild::new(pid).expect("pidfd"),
        Err((_, e)) => panic!("fork: {e}"),
    }
}

/// `posix_spawn` of this binary, with this process's environment (as the spawn method passes
/// it) and [`EXIT_AT_ONCE`]: the dynamic loader's work depends on the environment (under
/// `cargo bench`, `LD_LIBRARY_PATH` alone adds about 125 µs to every exec here), so both sides
/// get the same one.
fn raw_spawn() -> DirectChild {
    let argv = multiproc_spawn::own_argv().expect("argv");
    let env: Vec<std::ffi::CString> = std::env::vars_os()
        .map(|(key, value)| {
            use std::os::unix::ffi::OsStrExt;
            [key.as_bytes(), b"=", value.as_bytes()].concat()
        })
        .chain([format!("{EXIT_AT_ONCE}=1").into_bytes()])
        .map(|entry| std::ffi::CString::new(entry).expect("no NUL in the environment"))
        .collect();
    let (_keep, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let pid = sys::spawn_self(&argv, &env, std::os::fd::AsFd::as_fd(&theirs)).expect("spawn");
    DirectChild::new(pid).expect("pidfd")
}

/// Starts `n` children with `start`, then reaps them all.
fn raw_burst(n: usize, start: fn() -> DirectChild) {
    let children: Vec<DirectChild> = (0..n).map(|_| start()).collect();
    for mut child in children {
        child.wait_deadline(None).expect("wait");
    }
}

fn start_join(ctx: &Context) {
    ctx.process(noop, ()).start().expect("start").join().expect("join");
}

fn burst(ctx: &Context, n: usize) {
    let started: Vec<_> = (0..n).map(|_| ctx.process(noop, ()).start().expect("start")).collect();
    for process in started {
        process.join().expect("join");
    }
}

fn main() {
    if std::env::var_os(EXIT_AT_ONCE).is_some() {
        return;
    }
    let quick = common::quick();
    let runs = if quick { 5 } else { 300 };
    let burst_runs = if quick { 2 } else { 15 };
    let time = |s: Stats| Value::Time(s.median);
    let mut table = Table::new(format!(
        "Start → join of a trivial task (median of {runs}; bursts of {BURST}: median of \
         {burst_runs})"
    ));
    let spawn_base = measure(runs, || {
        raw_spawn().wait_deadline(None).expect("wait");
    });

    // Cold start: the first process of a fresh forkserver, server launch included. Killing the
    // server between runs makes each run cold.
    let forkserver = Context::new("forkserver").unwrap();
    let cold = measure(runs.min(50), || {
        kill_forkserver();
        start_join(&forkserver)
    });
    table.row(
        "forkserver cold start (first process) vs raw posix_spawn",
        "forkserver",
        time(cold),
        Value::Time(spawn_base.median),
        Value::Missing("–"),
        Target::AtMost(3.0),
    );

    // Each method beside its raw baseline, measured in alternation: first with processes
    // placed as the scheduler likes, then with every one (Python's included) on one CPU.
    for one_cpu in [false, true] {
        for (method, raw, target) in [
            ("fork", raw_fork as fn() -> DirectChild, 1.5),
            ("spawn", raw_spawn, 1.25),
            ("forkserver", raw_fork, 1.0),
        ] {
            let ctx = Context::new(method).unwrap();
            let measured = || {
                let raw_one = || {
                    raw().wait_deadline(None).expect("wait");
                };
                let one = measure_pair(runs, || start_join(&ctx), raw_one);
                // Bursts only as the scheduler places them: on one CPU they say nothing new.
                let bursts = if one_cpu { 0 } else { burst_runs };
                let many = (bursts > 0)
                    .then(|| measure_pair(bursts, || burst(&ctx, BURST), || raw_burst(BURST, raw)));
                let py = python(
                    "startup_bench.py",
                    &[method.into(), runs.to_string(), BURST.to_string(), bursts.to_string()],
                );
                (one, many, py)
            };
            let ((one, base), many, py) = if one_cpu { on_one_cpu(measured) } else { measured() };
            let base_name =
                if method == "spawn" { "raw posix_spawn" } else { "raw fork+_exit+waitid" };
            let placement = if one_cpu { ", all on one CPU" } else { "" };
            table.row(
                &format!("start → join vs {base_name}{placement}"),
                method,
                time(one),
                Value::Time(base.median),
                python_time(&py, "start_join"),
                Target::AtMost(target),
            );
            if let Some((many, base_burst)) = many {
                table.row(
                    &format!("{BURST} started, then joined, vs {BURST} × {base_name}"),
                    method,
                    time(many),
                    Value::Time(base_burst.median),
                    python_time(&py, "burst"),
                    Target::None,
                );
            }
        }
    }
    // Where a fork start's time beyond a raw fork goes: the minor page faults of the child
    // and of the parent, per start, beside a raw fork's.
    let fork = Context::new("fork").unwrap();
    let faults = |f: &dyn Fn()| {
        (0..20).for_each(|_| f());
        let before = common::minor_faults();
        let n = runs.max(100);
        (0..n).for_each(|_| f());
        let after = common::minor_faults();
        let per = |a: u64, b: u64| (b - a) as f64 / n as f64;
        format!("{:.0} + {:.0}", per(before.children, after.children), per(before.own, after.own))
    };
    let ours = faults(&|| start_join(&fork));
    let theirs = faults(&raw_fork_join);
    table.row(
        "minor page faults per start → join, child + parent, vs raw fork+_exit+waitid",
        "fork",
        Value::Text(ours),
        Value::Text(theirs),
        Value::Missing("–"),
        Target::Words("reported".into()),
    );

    // What spares are for: a start that comes after a quiet moment (a server answering
    // requests) finds one ready, and pays no fork. Timed after a 5 ms pause each, with the
    // default spares and with none.
    let after_pause = |f: &dyn Fn()| {
        f();
        let mut times: Vec<std::time::Duration> = (0..runs.min(100))
            .map(|_| {
                std::thread::sleep(std::time::Duration::from_millis(5));
                let started = std::time::Instant::now();
                f();
                started.elapsed()
            })
            .collect();
        times.sort();
        times[times.len() / 2]
    };
    multiproc::set_forkserver_spares(0).expect("spares");
    let without = after_pause(&|| start_join(&forkserver));
    multiproc::set_forkserver_spares(multiproc::DEFAULT_FORKSERVER_SPARES).expect("spares");
    let with = after_pause(&|| start_join(&forkserver));
    let raw = after_pause(&raw_fork_join);
    table.row(
        "start → join after a 5 ms pause, with spares vs without",
        "forkserver",
        Value::Time(with),
        Value::Time(without),
        Value::Missing("–"),
        Target::Words("reported".into()),
    );
    table.row(
        "start → join after a 5 ms pause vs raw fork+_exit+waitid after one",
        "forkserver",
        Value::Time(with),
        Value::Time(raw),
        Value::Missing("–"),
        Target::AtMost(1.0),
    );

    // The forkserver's idle spares (children forked ahead), beside the server they are
    // forked from.
    start_join(&forkserver);
    let server = multiproc::forkserver_pid().expect("a forkserver runs");
    let spares = {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let spares = common::children_named(server, "multiproc-spare");
            if spares.len() == multiproc::DEFAULT_FORKSERVER_SPARES as usize
                || std::time::Instant::now() > deadline
            {
                break spares;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    };
    let spare_pss: Vec<u64> = spares.iter().filter_map(|&pid| common::pss_kib(pid)).collect();
    table.row(
        &format!("PSS of an idle spare ({} kept) vs the forkserver's", spares.len()),
        "forkserver",
        Value::Text(match spare_pss.iter().max() {
            Some(kib) => format!("{kib} KiB"),
            None => "no spare found".into(),
        }),
        Value::Text(common::pss_kib(server).map_or("–".into(), |kib| format!("{kib} KiB"))),
        Value::Missing("–"),
        Target::Words("reported".into()),
    );
    table.note(
        "The forkserver keeps children forked ahead (spares, `set_forkserver_spares`, default \
         2): a start hands one its request, and the server forks the replacement once it has \
         had no request for 1 ms. The back-to-back rows above use the spares there are, then \
         fork on request; the rows after a 5 ms pause are what a server answering requests \
         sees.",
    );
    table.note(
        "Where a start through spares goes (measured apart, 5 ms between starts): `start()` is \
         most of it (230-250 µs of 250-270 µs here; `join` then finds the result waiting), \
         which is the request waking the server, the server waking the spare and answering. \
         Mapping a spare's pages while it waits (13 faults after the handoff down to 1) moved \
         nothing measurable. What stands between these rows and 1×: the hops through the \
         server, on the start and for the exit status. A client holding the spares' handoff \
         sockets itself, with spares forked by the server as the client's own children \
         (CLONE_PARENT), would leave one hop; that design is not built.",
    );
    table.note(
        "Page faults are what a fork start costs beyond a raw fork: every page either process \
         writes after the fork is a copy-on-write fault, about 2-3 µs each on this VM (a raw \
         fork whose child writes 22 pages and whose parent writes 9 took 60-85 µs longer, the \
         whole gap between the two), and so is the child's first entry into each 64 KiB of \
         code (fork copies no page tables of file mappings). The child's runtime allocates \
         nothing before its task (tests/fork_allocations.rs; it made 7 allocations, and 30 \
         faults per start, before this round, 24 after); what remains is mostly code, about 10 \
         faults in this binary and 3 in libc, beside glibc's fork, the stack and the runtime's \
         statics. Mapping the code ahead does not pay: MADV_POPULATE_READ over this binary's \
         text in the child made start → join slower (107 → 112 µs on one CPU; with libc's \
         text too, 120 → 155 µs): mapping the pages is the cost, not taking the traps. The \
         parent's count is the pages it writes per start: 15 allocations per start → join \
         (21 before this round), on as many pages as the heap's churn spread them over.",
    );
    table.note(
        "The raw posix_spawn baseline runs this benchmark's own binary, which exits in main, with \
         the same environment as a spawned child: under `cargo bench` that includes \
         `LD_LIBRARY_PATH`, whose directories the loader searches on every exec.",
    );
    table.note(
        "\"All on one CPU\": this process, its children and Python's are pinned to one CPU. On this \
         VM a wake-up across CPUs costs about 17 µs each way, so where the scheduler puts parent \
         and child moves the free rows; pinned, every side pays the same context switches.",
    );
    table.note(
        "Python 3.11's forkserver re-runs the main module in every child (fixed in 3.13); its \
         forkserver rows are reported, but no win is claimed from them.",
    );
    table.finish();
}
