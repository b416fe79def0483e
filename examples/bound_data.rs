//! Ten tasks that each need the same 10-million-element vector: sent as an argument with every
//! task, versus handed to each worker once as initializer state, versus the same tasks with no
//! bound data to ship (each worker builds the vector itself).
//!
//! `cargo run --release --example bound_data`

use std::time::Instant;

use multiproc::{Context, task};

/// Elements in the bound vector (80 MB of `u64`).
const LEN: u64 = 10_000_000;

/// The initializer: keeps the vector it is given as the worker's state.
#[task]
fn keep(data: Vec<u64>) -> Vec<u64> {
    data
}

/// Reads the bound data from the worker's state: the sum of every `step`-th element.
#[task]
fn strided_sum(data: &Vec<u64>, step: usize) -> u64 {
    data.iter().step_by(step).sum()
}

/// The same, with the data travelling with the task.
#[task]
fn strided_sum_of(data: Vec<u64>, step: usize) -> u64 {
    data.iter().step_by(step).sum()
}

/// The initializer of the baseline: builds the vector in the worker, so nothing is shipped.
#[task]
fn build(len: u64) -> Vec<u64> {
    (0..len).collect()
}

fn main() -> Result<(), multiproc::Error> {
    let ctx = Context::default();
    let processes = 2;
    let data: Vec<u64> = (0..LEN).collect();
    let steps: Vec<usize> = (1..=10).collect();
    println!("start method: {}, {processes} workers, 10 tasks, {LEN} elements", ctx.start_method());

    let pool = ctx.pool().processes(processes).initializer(build, LEN).build()?;
    let started = Instant::now();
    let baseline = pool.map(strided_sum, steps.clone())?;
    let none_time = started.elapsed();
    drop(pool);

    let pool = ctx.pool().processes(processes).build()?;
    let started = Instant::now();
    let per_task = pool.map(strided_sum_of, steps.iter().map(|s| (data.clone(), *s)))?;
    let argument_time = started.elapsed();
    drop(pool);

    let started = Instant::now();
    let pool = ctx.pool().processes(processes).initializer(keep, data.clone()).build()?;
    let setup_time = started.elapsed();
    let started = Instant::now();
    let from_state = pool.map(strided_sum, steps.clone())?;
    let state_time = started.elapsed();
    drop(pool);

    assert_eq!(per_task, baseline);
    assert_eq!(from_state, baseline);
    println!("  no bound data (workers built it):         {none_time:?}");
    println!("  vector sent with every task:              {argument_time:?}");
    println!(
        "  vector as initializer state:              {state_time:?} (+ {setup_time:?} to start \
         the pool and hand each worker the vector once)"
    );
    println!(
        "  per-task argument {:.1}x the initializer; initializer {:.2}x the baseline",
        argument_time.as_secs_f64() / state_time.as_secs_f64(),
        state_time.as_secs_f64() / none_time.as_secs_f64()
    );
    Ok(())
}
