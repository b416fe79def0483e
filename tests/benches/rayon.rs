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
    table.note(
        "÷ baseline is a cost ratio (ours ÷ rayon's time); the target column gives the \
         throughput ratio. Copying the input for each run (a Vec of u64) is part of ours. The \
         pools are built before rayon starts its threads (a fork pool's template is forked \
         while the process is single-threaded).",
    );
    table.finish();
    Ok(())
}
