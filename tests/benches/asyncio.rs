//! Async benchmark (the `tokio` feature): an awaited `apply` beside a blocking one, and
//! 100,000 `apply_async` awaited at once beside a blocking `imap` of the same items, under
//! each start method, in a tokio runtime with two worker threads, all measured in this run.
//!
//! `cargo bench -p multiproc-tests --bench asyncio` (`-- --quick` for a smoke run).

mod common;

use std::time::{Duration, Instant};

use common::{Stats, Table, Target, Value, measure_pair};
use multiproc::{Context, task};

/// The trivial task.
#[task]
fn identity(x: u64) -> u64 {
    x
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let quick = common::quick();
    let processes = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (applies, items, runs) = if quick { (50, 5_000u64, 1) } else { (2_000, 100_000u64, 7) };
    let mut table = Table::new(format!(
        "Async handles in a tokio runtime of 2 worker threads, pool of {processes} workers: \
         awaited apply round trip beside a blocking one (medians of {applies}, alternated), \
         {items} apply_async awaited at once beside a blocking imap (chunksize 1) of as many \
         items (medians of {runs}, alternated)"
    ));
    for method in ["fork", "spawn", "forkserver"] {
        let ctx = Context::new(method)?;
        // Built before the runtime's threads exist: under fork, its template forks any
        // worker it needs later.
        let pool = std::sync::Arc::new(ctx.pool().processes(processes).build()?);
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;

        let (awaited, blocking) = {
            let pool = std::sync::Arc::clone(&pool);
            runtime.block_on(runtime.spawn(async move {
                let (mut awaited, mut blocking) = (Vec::new(), Vec::new());
                for _ in 0..applies {
                    let started = Instant::now();
                    let pending = pool.apply_async(identity, 1).expect("apply_async");
                    assert_eq!(pending.await.expect("awaited apply"), 1);
                    awaited.push(started.elapsed());
                    let started = Instant::now();
                    assert_eq!(pool.apply(identity, 1).expect("apply"), 1);
                    blocking.push(started.elapsed());
                }
                (Stats::of(awaited), Stats::of(blocking))
            }))?
        };
        table.row(
            "awaited apply round trip vs blocking apply",
            method,
            Value::Time(awaited.median),
            Value::Time(blocking.median),
            Value::Missing("–"),
            Target::AtMost(1.2),
        );

        let (concurrent, imap) = {
            let awaited_pool = std::sync::Arc::clone(&pool);
            let handle = runtime.handle().clone();
            let concurrent = move || {
                let pool = std::sync::Arc::clone(&awaited_pool);
                let values = handle
                    .block_on(handle.spawn(async move {
                        let pending =
                            (0..items).map(|x| pool.apply_async(identity, x).expect("apply_async"));
                        futures::future::join_all(pending).await
                    }))
                    .expect("the task");
                assert_eq!(values.into_iter().filter(Result::is_ok).count() as u64, items);
            };
            let imap = || {
                let count = pool.imap(identity, 0..items).filter(Result::is_ok).count();
                assert_eq!(count as u64, items);
            };
            measure_pair(runs, concurrent, imap)
        };
        table.row(
            &format!("{items} apply_async awaited at once vs blocking imap"),
            method,
            Value::rate(items as f64, concurrent.median, "items"),
            Value::rate(items as f64, imap.median, "items"),
            Value::Missing("–"),
            Target::AtMost(1.25),
        );
        drop(runtime);
        drop(pool);
        // A pause between methods, so that one's workers have gone before the next measures.
        std::thread::sleep(Duration::from_millis(100));
    }
    table.note(
        "The ratio is ours ÷ baseline in cost (time per item for rates): the awaited throughput \
         target, at least 0.8× the blocking imap's, is a cost of at most 1.25× its.",
    );
    table.note(
        "An awaited result wakes its task from the pool's progress thread, which holds the \
         pool's turn while futures wait; a blocking caller drives the pool itself.",
    );
    table.finish();
    Ok(())
}
