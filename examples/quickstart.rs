//! Quickstart: run a task in a child process under every start method and print what happened.
//!
//! `cargo run --release --example quickstart`

use std::time::{Duration, Instant};

use multiproc::{Context, ErrorKind, task};

/// Adds two numbers in another process.
#[task]
fn add(a: u64, b: u64) -> u64 {
    a + b
}

/// Reports which process it ran in.
#[task]
fn whoami() -> u32 {
    std::process::id()
}

/// Panics, to show that a child's panic comes back as data.
#[task]
fn explode(message: String) -> u64 {
    panic!("{message}")
}

/// Exits with a code, without returning a value.
#[task]
fn quit(code: i32) {
    std::process::exit(code)
}

/// Sleeps, to have something to terminate.
#[task]
fn nap(duration: Duration) {
    std::thread::sleep(duration)
}

fn main() -> Result<(), multiproc::Error> {
    println!("parent pid {}", std::process::id());
    for &method in multiproc::all_start_methods() {
        let ctx = Context::new(method)?;

        let started = Instant::now();
        let p = ctx.process(add, (2, 3)).name("adder").start()?;
        let pid = p.pid();
        let sum = p.join()?;
        println!(
            "[{method:>10}] add(2, 3) = {sum} in pid {pid} ({:?} start to join)",
            started.elapsed()
        );

        let child_pid = ctx.process(whoami, ()).start()?.join()?;
        println!("[{method:>10}] whoami() ran in pid {child_pid}");

        let err = ctx.process(explode, "boom".to_string()).start()?.join().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Panicked);
        println!(
            "[{method:>10}] explode(): {err}, exit code {:?}",
            err.exit_status().map(|s| s.exitcode())
        );

        let err = ctx.process(quit, 7).start()?.join().unwrap_err();
        println!("[{method:>10}] quit(7): {err}");

        let mut sleeper = ctx.process(nap, Duration::from_secs(60)).daemon(true).start()?;
        sleeper.terminate()?;
        let err = sleeper.join_timeout(Duration::from_secs(10)).unwrap_err();
        println!("[{method:>10}] terminated nap(60s): {err}; exitcode {:?}", sleeper.exitcode());
    }
    Ok(())
}
