//! A 100 MB dataset shared with every pool worker through sealed shared memory (each worker
//! maps the same pages), compared with sending it to each worker as an argument.
//!
//! `cargo run --release --example shared_dataset`

use std::time::Instant;

use multiproc::{Context, SealedSlice, task};

/// Elements of the dataset: 100 MB of `u64`.
const LEN: usize = (100 << 20) >> 3;

/// The initializer of the shared-memory pool: keeps the mapped slice.
#[task]
fn keep_shared(data: SealedSlice<u64>) -> SealedSlice<u64> {
    data
}

/// The initializer of the argument pool: keeps the vector it was sent.
#[task]
fn keep_vec(data: Vec<u64>) -> Vec<u64> {
    data
}

/// Sums one tenth of the shared dataset.
#[task]
fn sum_shared(data: &SealedSlice<u64>, part: usize) -> u64 {
    tenth(data, part)
}

/// Sums one tenth of the worker's own copy.
#[task]
fn sum_vec(data: &Vec<u64>, part: usize) -> u64 {
    tenth(data, part)
}

fn tenth(data: &[u64], part: usize) -> u64 {
    let size = data.len() / 10;
    data[part * size..(part + 1) * size].iter().sum()
}

fn main() -> Result<(), multiproc::Error> {
    let ctx = Context::default();
    let processes = 4;
    let data: Vec<u64> = (0..LEN as u64).collect();
    let expected: u64 = data.iter().sum();
    println!("start method: {}, {processes} workers, {} MB", ctx.start_method(), (LEN * 8) >> 20);

    let started = Instant::now();
    let shared = SealedSlice::from_slice(&data)?;
    let copy_in = started.elapsed();
    let started = Instant::now();
    let pool = ctx.pool().processes(processes).initializer(keep_shared, shared).build()?;
    let handover = started.elapsed();
    let started = Instant::now();
    let total: u64 = pool.map(sum_shared, 0..10)?.into_iter().sum();
    let work = started.elapsed();
    assert_eq!(total, expected);
    drop(pool);
    println!(
        "  sealed shared memory: {handover:?} to start the pool and hand it over, {work:?} of \
         work ({copy_in:?} to copy the data into shared memory once)"
    );

    let started = Instant::now();
    let pool = ctx.pool().processes(processes).initializer(keep_vec, data).build()?;
    let handover_vec = started.elapsed();
    let started = Instant::now();
    let total: u64 = pool.map(sum_vec, 0..10)?.into_iter().sum();
    let work_vec = started.elapsed();
    assert_eq!(total, expected);
    drop(pool);
    println!(
        "  sent as an argument:  {handover_vec:?} to start the pool and hand it over, \
         {work_vec:?} of work"
    );
    println!(
        "  handing over through shared memory was {:.1}x faster",
        handover_vec.as_secs_f64() / handover.as_secs_f64()
    );
    Ok(())
}
