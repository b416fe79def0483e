//! Start-up benchmark: start → join of a trivial task under each start method, beside the raw
//! syscalls it is built on, measured in the same run. Prints median / min / max and ratios.
//!
//! `cargo xtask bench` (or `-- --quick` for a smoke run whose numbers mean nothing).

mod common;

use common::{Stats, measure};
use multiproc::{Context, task};
use multiproc_core::sys::{self, Forked};
use multiproc_core::{ChildHandle, DirectChild};

/// The trivial task.
#[task]
fn noop() {}

/// When set, `main` exits at once: the raw `posix_spawn` baseline runs this binary to `main`.
const EXIT_AT_ONCE: &str = "MULTIPROC_BENCH_EXIT_AT_ONCE";

fn raw_fork() {
    match sys::fork_single_threaded(&[]) {
        Ok(Forked::Child) => sys::exit_immediately(0),
        Ok(Forked::Parent(pid)) => {
            let mut child = DirectChild::new(pid).expect("pidfd");
            child.wait_deadline(None).expect("wait");
        }
        Err((_, e)) => panic!("fork: {e}"),
    }
}

fn raw_spawn() {
    let argv = multiproc_spawn::own_argv().expect("argv");
    let mut env: Vec<std::ffi::CString> = Vec::new();
    env.push(std::ffi::CString::new(format!("{EXIT_AT_ONCE}=1")).unwrap());
    let (_keep, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let pid = sys::spawn_self(&argv, &env, std::os::fd::AsFd::as_fd(&theirs)).expect("spawn");
    let mut child = DirectChild::new(pid).expect("pidfd");
    child.wait_deadline(None).expect("wait");
}

fn start_join(ctx: &Context) {
    ctx.process(noop, ()).start().expect("start").join().expect("join");
}

fn main() {
    if std::env::var_os(EXIT_AT_ONCE).is_some() {
        return;
    }
    let quick = common::quick();
    let runs = if quick { 5 } else { 300 };
    let row = |name: &str, s: &Stats, base: Option<&Stats>| {
        let ratio = base.map_or(String::new(), |b| {
            format!("{:.2}", s.median.as_secs_f64() / b.median.as_secs_f64())
        });
        println!(
            "| {name:<34} | {:>9.1} | {:>9.1} | {:>9.1} | {ratio:>6} |",
            s.median.as_secs_f64() * 1e6,
            s.min.as_secs_f64() * 1e6,
            s.max.as_secs_f64() * 1e6
        );
    };
    println!(
        "start → join of a trivial task, {runs} runs each (µs){}",
        if quick { " — quick mode, numbers are not meaningful" } else { "" }
    );
    println!("| workload                           |    median |       min |       max |  ratio |");
    println!("|------------------------------------|----------:|----------:|----------:|-------:|");
    let fork_base = measure(runs, raw_fork);
    row("raw fork + _exit + waitid", &fork_base, None);
    let spawn_base = measure(runs, raw_spawn);
    row("raw posix_spawn (exits in main)", &spawn_base, None);
    let fork = Context::new("fork").unwrap();
    row("multiproc fork ÷ raw fork", &measure(runs, || start_join(&fork)), Some(&fork_base));
    let spawn = Context::new("spawn").unwrap();
    row(
        "multiproc spawn ÷ raw posix_spawn",
        &measure(runs, || start_join(&spawn)),
        Some(&spawn_base),
    );
    // Cold start: the first process of a fresh forkserver, which includes launching the server.
    // Killing the server between runs makes each run cold.
    let forkserver = Context::new("forkserver").unwrap();
    let cold = measure(runs.min(50), || {
        if let Some(pid) = multiproc::forkserver_pid() {
            let pidfd = sys::pidfd_open(pid).expect("server pidfd");
            sys::pidfd_send_signal(std::os::fd::AsFd::as_fd(&pidfd), libc::SIGKILL).expect("kill");
            let mut set = [sys::PollFd::new(std::os::fd::AsFd::as_fd(&pidfd), sys::POLLIN)];
            sys::poll(&mut set, None).expect("poll");
        }
        start_join(&forkserver)
    });
    row("forkserver cold start ÷ posix_spawn", &cold, Some(&spawn_base));
    let warm = measure(runs, || start_join(&forkserver));
    row("multiproc forkserver ÷ raw fork", &warm, Some(&fork_base));
}
