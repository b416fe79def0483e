//! The mpi context (rank 0 and two node agents of one worker each, on this machine) beside the
//! forkserver pool of two workers and beside `mpi4py.futures`, all in the same run: a map of
//! 100,000 trivial items, `imap` with chunksize 1, and the `apply` round trip.
//!
//! The benchmark itself is no MPI process: it measures the forkserver pool, then runs itself
//! and mpi4py under `mpirun -n 3`, and reads their numbers from their output.
//!
//! `cargo xtask bench` (or `-- --quick` for a smoke run whose numbers mean nothing).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Stats, Table, Target, Value, measure, numbers};
use multiproc::{Context, Pool, task};

/// The trivial task.
#[task]
fn identity(x: u64) -> u64 {
    x
}

/// Set in the copy of this benchmark that runs as an MPI job.
const AS_JOB: &str = "MULTIPROC_BENCH_MPI_JOB";

/// The three workloads on `pool`: the medians of map and imap over `items`, and of `applies`
/// apply round trips.
fn workloads(pool: &Pool, items: u64, runs: usize, applies: usize) -> (Stats, Stats, Stats) {
    let inputs: Vec<u64> = (0..items).collect();
    let map = measure(runs, || {
        assert_eq!(pool.map(identity, inputs.clone()).expect("map").len(), inputs.len());
    });
    let imap = measure(runs, || {
        // The pool's default chunk size for imap is 1.
        let stream = pool.imap(identity, inputs.clone());
        let taken = stream.fold(0, |n, result| {
            result.expect("imap");
            n + 1
        });
        assert_eq!(taken, inputs.len());
    });
    let apply = measure(applies, || {
        assert_eq!(pool.apply(identity, 7).expect("apply"), 7);
    });
    (map, imap, apply)
}

fn sizes() -> (u64, usize, usize) {
    if common::quick() { (2_000, 2, 20) } else { (100_000, 5, 2_000) }
}

/// `mpirun -n 3`, with a time limit. OpenMPI's settings for a container on a small machine
/// (root, oversubscription, yielding ranks, loopback) come from the environment: `cargo xtask
/// bench` and `.ci/run` set them.
fn mpirun() -> Command {
    let mut job = Command::new("mpirun");
    job.args(["-n", "3", "--timeout", "600"]);
    job
}

fn main() -> multiproc::Result<()> {
    let (items, runs, applies) = sizes();
    if std::env::var_os(AS_JOB).is_some() {
        // Rank 0 of the job: two agents, one worker each.
        let pool = Context::new("mpi")?.pool().processes(2).build()?;
        let (map, imap, apply) = workloads(&pool, items, runs, applies);
        println!("map {}", map.median.as_secs_f64());
        println!("imap {}", imap.median.as_secs_f64());
        println!("apply {}", apply.median.as_secs_f64());
        return Ok(());
    }
    let local = Context::new("forkserver")?.pool().processes(2).build()?;
    let (map, imap, apply) = workloads(&local, items, runs, applies);
    drop(local);

    let exe = std::env::current_exe().expect("this benchmark's path");
    let mut ours = mpirun();
    ours.arg(&exe).env(AS_JOB, "1");
    if common::quick() {
        ours.arg("--quick");
    }
    let ours = numbers(ours, "the mpi job").expect("the mpi context's numbers");
    let script = format!("{}/benches/python/mpi4py_bench.py", env!("CARGO_MANIFEST_DIR"));
    let mut py = mpirun();
    // Not `-S`: mpi4py is a package in site-packages.
    py.args(["python3", "-I", "-m", "mpi4py.futures", &script]);
    py.args([items.to_string(), runs.to_string(), applies.to_string()]);
    let py = numbers(py, "mpi4py.futures (pip install mpi4py)");

    let secs = |map: &std::collections::HashMap<String, f64>, key: &str| {
        map.get(key).map(|s| Duration::from_secs_f64(*s))
    };
    let rate = |took: Duration| Value::rate(items as f64, took, "items");
    let py_rate = |key: &str| match py.as_ref().map(|py| secs(py, key)) {
        Some(Some(took)) => rate(took),
        _ => Value::Missing("no mpi4py"),
    };
    let ours_map = secs(&ours, "map").expect("map");
    let ours_imap = secs(&ours, "imap").expect("imap");
    let ours_apply = secs(&ours, "apply").expect("apply");
    let mut table = Table::new(format!(
        "The mpi context: rank 0 and 2 agents × 1 worker under mpirun -n 3, beside a forkserver \
         pool of 2 and mpi4py.futures (map and imap of {items} items: median of {runs}; apply: \
         median of {applies})"
    ));
    let share = |local: Duration, ours: Duration| local.as_secs_f64() / ours.as_secs_f64();
    let judged = |value: f64, target: f64, what: &str| {
        let verdict = if value >= target { "met" } else { "**missed**" };
        format!("≥ {target}× {what}: {value:.2}×, {verdict}")
    };
    table.row(
        &format!("map, trivial task, {items} items, vs the forkserver pool"),
        "mpi",
        rate(ours_map),
        rate(map.median),
        py_rate("chunk100"),
        Target::Words(judged(share(map.median, ours_map), 0.5, "the local pool's throughput")),
    );
    table.row(
        &format!("imap, chunksize 1, {items} items, vs the forkserver pool"),
        "mpi",
        rate(ours_imap),
        rate(imap.median),
        py_rate("chunk1"),
        Target::PythonRatio(10.0),
    );
    let py_best = py.as_ref().and_then(|py| secs(py, "chunk100"));
    table.row(
        &format!("map, trivial task, {items} items, vs mpi4py.futures at chunksize 100"),
        "mpi",
        rate(ours_map),
        py_best.map_or(Value::Missing("no mpi4py"), rate),
        py_rate("chunk100"),
        Target::PythonRatio(2.0),
    );
    table.row(
        "apply round trip vs the forkserver pool's",
        "mpi",
        Value::Time(ours_apply),
        Value::Time(apply.median),
        match py.as_ref().and_then(|py| secs(py, "apply")) {
            Some(took) => Value::Time(took),
            None => Value::Missing("no mpi4py"),
        },
        Target::None,
    );
    table.note(
        "Each item of the mpi context crosses two more hops than a local pool's: rank 0's engine \
         → its tunnel thread → MPI → the agent → the worker, and back. The map row is batches \
         (default chunk size), so it pays them once per batch; imap with chunksize 1 and apply \
         pay them per item.",
    );
    table.note(
        "Python's column is mpi4py.futures (`mpirun -n 3 python3 -m mpi4py.futures`: two worker \
         ranks): at chunksize 100, its best, for the map rows; at chunksize 1 for the imap row.",
    );
    table.finish();
    Ok(())
}
