//! A process pool beside rayon, what a Rust user picks instead of one: `pool.map` (default
//! chunk size) and `par_iter().map().collect()` of the same CPU-bound work on the same
//! machine, in the same run, with a pool of `cpu_count()` workers and rayon's default pool
//! (as many threads). Three grains: 1,000,000 items of about 1 µs, 200,000 of about 10 µs,
//! 4,000 of about 1 ms. The work is a loop calibrated here to take that long.
//!
//! `cargo bench -p multiproc-tests --bench rayon` (`-- --quick` for a smoke run).

mod common;

use std::time::{Duration, Instant};

use common::{Table, Target, Value, measure};
use multiproc::{Context, task};
use rayon::prelude::*;

/// About `rounds` steps of arithmetic the optimizer cannot skip.
fn spin(x: u64, rounds: u64) -> u64 {
    let mut h = x | 1;
    for i in 0..rounds {
        h = std::hint::black_box(h.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(7) ^ i);
    }
    h
}

/// The work of one item: `spin` for the worker's calibrated number of rounds.
#[task]
fn work(rounds: &u64, x: u64) -> u64 {
    spin(x, *rounds)
}

/// The initializer: the rounds every item spins.
#[task]
fn keep(rounds: u64) -> u64 {
    rounds
}

/// Rounds of `spin` that take about `target`, measured on this machine.
fn calibrate(target: Duration) -> u64 {
    let trial = 1_000_000;
    let started = Instant::now();
    std::hint::black_box(spin(1, trial));
    let per_round = started.elapsed().as_secs_f64() / trial as f64;
    ((target.as_secs_f64() / per_round) as u64).max(1)
}

fn main() -> Result<(), multiproc::Error> {
    let quick = common::quick();
    let runs = if quick { 1 } else { 3 };
    let scale = if quick { 100 } else { 1 };
    let grains = [
        (Duration::from_micros(1), 1_000_000 / scale, 0.95),
        (Duration::from_micros(10), 200_000 / scale, 0.95),
        (Duration::from_millis(1), 4_000 / scale, 0.95),
    ];
    let workers = multiproc::cpu_count();
    // An idle worker's memory beside an idle Python Pool worker's, per start method: measured
    // first, while this process has one thread (a fork pool's template needs that).
    let mut memory = Vec::new();
    for method in ["fork", "spawn", "forkserver"] {
        let pool = Context::new(method)?.pool().processes(1).build()?;
        let ours = pool.pids().first().and_then(|&pid| common::pss_kib(pid));
        let python = common::python("worker_memory.py", &[method.into()])
            .and_then(|found| found.get("pss").copied());
        memory.push((method, ours, python));
    }
    // Every pool is built before rayon starts its threads: a fork pool's template must be
    // forked from a single-threaded process (later workers are forked by the template).
    let methods = ["forkserver", "fork"];
    let mut pools = Vec::new();
    for (grain, _, _) in grains {
        let rounds = calibrate(grain);
        for method in methods {
            let pool = Context::new(method)?.pool().processes(workers).initializer(keep, rounds);
            pools.push((rounds, method, pool.build()?));
        }
    }
    let mut pools = pools.into_iter();
    let mut table = Table::new(format!(
        "A pool of {workers} workers (map, default chunk size) beside rayon's par_iter().map() \
         on {} threads, items/s (median of {runs})",
        rayon::current_num_threads()
    ));
    for (grain, items, target) in grains {
        let inputs: Vec<u64> = (0..items).collect();
        let (rounds, _, _) = pools.as_slice()[0];
        let expected: Vec<u64> = inputs.par_iter().map(|&x| spin(x, rounds)).collect();
        let threads = measure(runs, || {
            let out: Vec<u64> = inputs.par_iter().map(|&x| spin(x, rounds)).collect();
            assert_eq!(out.len(), inputs.len());
        })
        .median;
        for (_, method, pool) in pools.by_ref().take(methods.len()) {
            let mut mapped = Vec::new();
            let processes = measure(runs, || {
                mapped = pool.map(work, inputs.clone()).expect("map");
            })
            .median;
            assert_eq!(mapped, expected);
            // Throughput: rayon's ÷ ours, so the target reads "at least this much of rayon's".
            let rate = |took: Duration| Value::rate(items as f64, took, "items");
            table.row(
                &format!("{items} items of ~{grain:?} each, vs rayon"),
                method,
                rate(processes),
                rate(threads),
                Value::Missing("–"),
                Target::Words(format!(
                    "≥ {target}× rayon's throughput: {:.2}×, {}",
                    threads.as_secs_f64() / processes.as_secs_f64(),
                    if threads.as_secs_f64() / processes.as_secs_f64() >= target {
                        "met"
                    } else {
                        "**missed**"
                    }
                )),
            );
        }
    }
    // How the 1 µs row grows with the number of workers, and where the one parent that
    // encodes, sends and decodes for all of them stops keeping up: its rate on items that take
    // no time at all.
    let (grain, items, _) = grains[0];
    let rounds = calibrate(grain);
    let inputs: Vec<u64> = (0..items).collect();
    let mut one_worker = None;
    for count in [1, 2, 2 * workers] {
        let pool = Context::new("forkserver")?.pool().processes(count).initializer(keep, rounds);
        let pool = pool.build()?;
        let took = measure(runs, || {
            assert_eq!(pool.map(work, inputs.clone()).expect("map").len(), inputs.len());
        })
        .median;
        let base = *one_worker.get_or_insert(took);
        table.row(
            &format!("{items} items of ~{grain:?} each, {count} worker(s), vs 1 worker"),
            "forkserver",
            Value::rate(items as f64, took, "items"),
            Value::rate(items as f64, base, "items"),
            Value::Missing("–"),
            Target::Words(format!(
                "{:.2}× one worker's throughput",
                base.as_secs_f64() / took.as_secs_f64()
            )),
        );
    }
    // The parent's own CPU time per item (all its threads, not the workers'), on items of no
    // work: a worker of ~1 µs items needs the parent for that long per item, so the parent
    // keeps up with about (a worker's time per item ÷ it) workers.
    let pool =
        Context::new("forkserver")?.pool().processes(workers).initializer(keep, 0).build()?;
    let mut parent_cpu = Vec::new();
    let empty = measure(runs, || {
        let before = common::process_cpu();
        assert_eq!(pool.map(work, inputs.clone()).expect("map").len(), inputs.len());
        parent_cpu.push(common::process_cpu().saturating_sub(before));
    })
    .median;
    parent_cpu.sort();
    let per_item = parent_cpu[parent_cpu.len() / 2].as_secs_f64() / items as f64;
    let worker_item = one_worker.unwrap_or_default().as_secs_f64() / items as f64;
    table.row(
        &format!("{items} items of no work, {workers} workers (the parent's CPU per item)"),
        "forkserver",
        Value::rate(items as f64, empty, "items"),
        Value::Missing("–"),
        Value::Missing("–"),
        Target::Words(format!(
            "parent: {:.0} ns of CPU per item, enough for about {:.0} workers of ~{grain:?} items",
            per_item * 1e9,
            worker_item / per_item.max(1e-12)
        )),
    );
    drop(pool);

    for (method, ours, python) in memory {
        let kib = |v: Option<f64>| Value::Text(v.map_or("–".into(), |v| format!("{v:.0} KiB")));
        let verdict = match (ours, python) {
            (Some(ours), Some(python)) => {
                let ratio = ours as f64 / python;
                format!(
                    "≤ 0.2× Python's: {ratio:.2}×, {}",
                    if ratio <= 0.2 { "met" } else { "**missed**" }
                )
            }
            _ => "≤ 0.2× Python's: not measured".into(),
        };
        table.row(
            "PSS of an idle pool worker vs a Python Pool worker's",
            method,
            kib(ours.map(|v| v as f64)),
            kib(python),
            Value::Missing("–"),
            Target::Words(verdict),
        );
    }
    table.note(
        "÷ baseline is a cost ratio (ours ÷ rayon's time); the target column gives the \
         throughput ratio. Copying the input for each run (a Vec of u64) is part of ours. The \
         pools are built before rayon starts its threads (a fork pool's template is forked \
         while the process is single-threaded).",
    );
    table.finish();
    Ok(())
}
