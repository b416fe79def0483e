//! `multiproc::test_main!` as a user's crate has it: tests that use the fork start method, run
//! on the main thread, under `cargo test` and under `cargo nextest run` (one process per
//! test), whatever `MULTIPROC_START_METHOD` says.

use multiproc::{Context, ErrorKind, task};

/// Adds two numbers in a child.
#[task]
fn add(a: u64, b: u64) -> u64 {
    a + b
}

/// A forked child runs the task: the harness left this process with one thread.
fn fork_runs_in_the_harness() -> multiproc::Result<()> {
    let ctx = Context::new("fork")?;
    assert_eq!(ctx.process(add, (2, 3)).start()?.join()?, 5);
    Ok(())
}

/// A fork pool builds and maps.
fn fork_pool_runs_in_the_harness() -> multiproc::Result<()> {
    let pool = Context::new("fork")?.pool().processes(2).build()?;
    assert_eq!(pool.map(add, [(1, 1), (2, 2)])?, [2, 4]);
    Ok(())
}

/// The harness runs on the main thread: a test that starts a thread sees fork refused, as
/// it would be anywhere.
fn fork_is_still_refused_beside_a_thread() {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || stopped.recv());
    let refused = Context::new("fork").expect("fork").process(add, (1, 1)).start();
    assert_eq!(refused.expect_err("a second thread").kind(), ErrorKind::ForkRefused);
    drop(stop);
    let _ = thread.join();
}

multiproc::test_main!(
    fork_runs_in_the_harness,
    fork_pool_runs_in_the_harness,
    fork_is_still_refused_beside_a_thread,
);
