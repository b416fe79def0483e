//! A pool whose workers each build a lookup cache once (the initializer), and tasks that read
//! it by reference—compared with sending the cache along with every task.
//!
//! `cargo run --release --example pool_cache` (start method from `MULTIPROC_START_METHOD`,
//! forkserver by default)

use std::time::Instant;

use multiproc::{Context, task};

/// The cache: the binary form of every number below `n`.
#[task]
fn load_cache(n: u32) -> Vec<String> {
    (0..n).map(|i| format!("{i:b}")).collect()
}

/// The number of ones in `i`, read from the worker's cache.
#[task]
fn ones(cache: &Vec<String>, i: u32) -> usize {
    cache[i as usize].matches('1').count()
}

/// The same, with the cache travelling with the task (Python's `functools.partial`).
#[task]
fn ones_from_argument(cache: Vec<String>, i: u32) -> usize {
    cache[i as usize].matches('1').count()
}

fn main() -> Result<(), multiproc::Error> {
    let ctx = Context::default();
    let processes = 4;
    println!("start method: {}, {processes} workers", ctx.start_method());

    // The example: 65,535 items, the cache built once per worker.
    let started = Instant::now();
    let pool = ctx.pool().processes(processes).initializer(load_cache, 65_535).build()?;
    let counts: Vec<usize> = pool.map(ones, 0..65_535)?;
    let whole = started.elapsed();
    assert!(counts.iter().enumerate().all(|(i, c)| *c == (i as u32).count_ones() as usize));
    println!("65,535 items, cache of 65,535 built once per worker: {whole:?} (with pool start)");
    drop(pool);

    // Side by side on a cache small enough to send with every task.
    let n = 4096u32;
    let started = Instant::now();
    let pool = ctx.pool().processes(processes).initializer(load_cache, n).build()?;
    let from_state = pool.map(ones, 0..n)?;
    let state_time = started.elapsed();
    drop(pool);

    let cache = load_cache.call(n);
    let started = Instant::now();
    let pool = ctx.pool().processes(processes).build()?;
    let from_argument = pool.map(ones_from_argument, (0..n).map(|i| (cache.clone(), i)))?;
    let argument_time = started.elapsed();
    drop(pool);

    assert_eq!(from_state, from_argument);
    println!("{n} items, cache of {n} strings:");
    println!("  initializer state (cache built once per worker): {state_time:?}");
    println!("  cache sent as an argument with every task:       {argument_time:?}");
    println!(
        "  the argument version took {:.1}x as long",
        argument_time.as_secs_f64() / state_time.as_secs_f64()
    );
    Ok(())
}
