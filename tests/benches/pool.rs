//! Pool benchmark: `apply` round trip, `map` throughput of a trivial task, and `imap` with
//! chunks of one, under each start method, beside a raw Unix-socket ping-pong between two
//! processes and beside Python's `multiprocessing.Pool` with the same start method, all
//! measured in this run.
//!
//! `cargo bench -p multiproc-tests --bench pool` (`-- --quick` for a smoke run). Python runs as
//! `python3 -I -S` (no site hooks); without `python3` its columns say so.

mod common;

use common::{
    Stats, Table, Target, Value, measure, measure_pair, on_one_cpu, python, python_time,
    with_raw_echo,
};
use multiproc::{Context, task};

/// The trivial task.
#[task]
fn identity(x: u64) -> u64 {
    x
}

/// `apply` round trips on `pool` and raw socket round trips to a forked echo process, measured
/// in alternation.
fn apply_beside_raw(pool: &multiproc::Pool, runs: usize) -> (Stats, Stats) {
    with_raw_echo(|round_trip| {
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
        let (apply, ping) = apply_beside_raw(&pool, applies);
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
        table.row(
            "apply round trip vs raw Unix-socket ping-pong",
            method,
            Value::Time(apply.median),
            Value::Time(ping.median),
            python_time(&py, "apply"),
            Target::AtMost(1.5),
        );
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
    // apply again with every process on one CPU, Python's included.
    for method in ["fork", "spawn", "forkserver"] {
        let ctx = Context::new(method)?;
        let ((apply, ping_one), py) = on_one_cpu(|| -> Result<_, multiproc::Error> {
            let pool = ctx.pool().processes(processes).build()?;
            let apply = apply_beside_raw(&pool, applies);
            drop(pool);
            let args = [method.to_owned(), processes.to_string(), applies.to_string()];
            let none = ["0", "0", "0", "0"].map(str::to_owned);
            Ok((apply, python("pool_bench.py", &[args.as_slice(), &none].concat())))
        })?;
        table.row(
            "apply round trip vs raw Unix-socket ping-pong, all on one CPU",
            method,
            Value::Time(apply.median),
            Value::Time(ping_one.median),
            python_time(&py, "apply"),
            Target::AtMost(1.5),
        );
    }
    table.note("Python ÷ multiproc is Python's time over ours: above 1, multiproc is faster.");
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
