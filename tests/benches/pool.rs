//! Pool benchmark: `apply` round trip, `map` throughput of a trivial task, and `imap` with
//! chunks of one, under each start method, beside a raw Unix-socket ping-pong between two
//! processes and beside Python's `multiprocessing.Pool` with the same start method, all
//! measured in this run.
//!
//! `cargo bench -p multiproc-tests --bench pool` (`-- --quick` for a smoke run). Python runs as
//! `python3 -I -S` (no site hooks); without `python3` its columns say so.

mod common;

use common::{
    Stats, Table, Target, Value, across_cpus, measure, measure_pair, on_one_cpu, python,
    python_placed, python_time, with_raw_echo,
};
use multiproc::{Context, task};

/// The trivial task.
#[task]
fn identity(x: u64) -> u64 {
    x
}

/// `apply` round trips on `pool` and raw socket round trips to a forked echo process, measured
/// in alternation; `settle` runs once the echo process exists (see `across_cpus`).
fn apply_beside_raw(pool: &multiproc::Pool, runs: usize, settle: &dyn Fn()) -> (Stats, Stats) {
    with_raw_echo(|round_trip| {
        settle();
        measure_pair(
            runs,
            || {
                pool.apply(identity, 1).expect("apply");
            },
            round_trip,
        )
    })
}

fn main() -> Result<(), multiproc::Error> {
    let quick = common::quick();
    let processes = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (applies, map_items, imap_items) =
        if quick { (50, 20_000u64, 2_000u64) } else { (2_000, 1_000_000u64, 100_000u64) };
    // map and imap run after one warm-up run, several times; the median counts.
    let (map_runs, imap_runs): (usize, usize) = if quick { (1, 1) } else { (5, 3) };
    let mut table = Table::new(format!(
        "Pool of {processes} workers: apply round trip (median of {applies}), map of {map_items} \
         items (median of {map_runs}), imap (chunksize 1) of {imap_items} items (median of \
         {imap_runs})"
    ));
    for method in ["fork", "spawn", "forkserver"] {
        let ctx = Context::new(method)?;
        let pool = ctx.pool().processes(processes).build()?;
        let map = measure(map_runs, || {
            let mapped = pool.map(identity, 0..map_items).expect("map");
            assert_eq!(mapped.len() as u64, map_items);
        })
        .median;
        let imap = measure(imap_runs, || {
            let count = pool.imap(identity, 0..imap_items).filter(Result::is_ok).count();
            assert_eq!(count as u64, imap_items);
        })
        .median;
        drop(pool);
        // Python's forkserver imap takes about 90 s a run (3.11): once, without a warm-up.
        let py_imap_runs = if method == "forkserver" { 0 } else { imap_runs };

        let py = python(
            "pool_bench.py",
            &[method, &processes.to_string(), &applies.to_string()]
                .map(str::to_owned)
                .into_iter()
                .chain(
                    [map_items, imap_items, map_runs as u64, py_imap_runs as u64]
                        .map(|n| n.to_string()),
                )
                .collect::<Vec<_>>(),
        );
        let py_rate = |name: &str, items: u64| match python_time(&py, name) {
            Value::Time(t) => Value::rate(items as f64, t, "items"),
            other => other,
        };
        // Python 3.11's forkserver re-runs the main module in every worker: no claim there.
        let vs_python = |x: f64, words: &'static str| {
            if method == "forkserver" {
                Target::Words(words.into())
            } else {
                Target::PythonRatio(x)
            }
        };
        table.row(
            &format!("map, trivial task, {map_items} items"),
            method,
            Value::rate(map_items as f64, map, "items"),
            Value::Missing("–"),
            py_rate("map", map_items),
            vs_python(3.0, "≥ 3× Python (no claim against 3.11's forkserver)"),
        );
        table.row(
            &format!("imap, chunksize 1, {imap_items} items"),
            method,
            Value::rate(imap_items as f64, imap, "items"),
            Value::Missing("–"),
            py_rate("imap", imap_items),
            vs_python(10.0, "≥ 10× Python (no claim against 3.11's forkserver)"),
        );
    }
    // apply with the workers on one CPU and this process on the other, then with every process
    // on one CPU; Python's placed alike.
    for method in ["fork", "spawn", "forkserver"] {
        let ctx = Context::new(method)?;
        let args = [method.to_owned(), processes.to_string(), applies.to_string()];
        let args = [args.as_slice(), &["0", "0", "0", "0"].map(str::to_owned)].concat();
        let apply_on = |settle: &dyn Fn()| -> Result<_, multiproc::Error> {
            let pool = ctx.pool().processes(processes).build()?;
            Ok(apply_beside_raw(&pool, applies, settle))
        };
        if let Some((cpus, apart)) = across_cpus(apply_on) {
            let (apply, ping) = apart?;
            table.row(
                "apply round trip vs raw Unix-socket ping-pong, on two CPUs",
                method,
                Value::Time(apply.median),
                Value::Time(ping.median),
                python_time(&python_placed("pool_bench.py", &args, Some(&cpus)), "apply"),
                Target::AtMost(1.5),
            );
        }
        let ((apply, ping), py) = on_one_cpu(|| -> Result<_, multiproc::Error> {
            Ok((apply_on(&|| {})?, python("pool_bench.py", &args)))
        })?;
        table.row(
            "apply round trip vs raw Unix-socket ping-pong, all on one CPU",
            method,
            Value::Time(apply.median),
            Value::Time(ping.median),
            python_time(&py, "apply"),
            Target::AtMost(1.5),
        );
    }
    table.note("Python ÷ multiproc is Python's time over ours: above 1, multiproc is faster.");
    table.note(
        "A caller waiting for its result (and the progress thread, when it drives) polls the \
         workers for a moment before it sleeps (10 µs at first, yielding the CPU between \
         tries; see the pipe table); a worker waiting for its next task sleeps at once. \
         Across CPUs an apply round trip went from 82 µs to 28-31 µs with the caller spinning; \
         with the worker spinning too it was 6-9 µs, but 100,000 apply_async awaited at once \
         fell from 700-780 k to 560-580 k items/s, the workers' spins taking the CPU the \
         parent fed them from.",
    );
    table.note(
        "\"On two CPUs\": the workers (ours, Python's) and the raw echo process run on one CPU, \
         this process and Python's parent on the other, so that every round trip crosses CPUs. \
         Left to the scheduler, one of the two peers alive at once (a worker, the raw echo) \
         shares this process's CPU and gets the fast round trips, which made the ratio a \
         lottery (0.28× to 5.7× in runs minutes apart).",
    );
    table.note(
        "\"All on one CPU\": this process, the workers and Python's are pinned to one CPU (see \
         the start-up table).",
    );
    table.note(
        "Python 3.11's forkserver re-runs the main module in every worker (fixed in 3.13); no \
         win is claimed from its rows.",
    );
    table.finish();
    Ok(())
}
