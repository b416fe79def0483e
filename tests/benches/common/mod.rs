//! What the benchmarks share: timing with a warm-up, median / min / max, and raw baselines.
// Each benchmark is its own crate and uses a part of this module.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use multiproc_core::sys::{self, Forked};
use multiproc_core::{ChildHandle, DirectChild};

/// Median, fastest and slowest of a set of runs.
pub struct Stats {
    pub median: Duration,
    pub min: Duration,
    pub max: Duration,
}

impl Stats {
    /// Statistics of `times` (not empty).
    pub fn of(mut times: Vec<Duration>) -> Stats {
        times.sort();
        Stats { median: times[times.len() / 2], min: times[0], max: times[times.len() - 1] }
    }
}

/// Runs `f` a tenth of `runs` times to warm up, then `runs` times, timing each.
pub fn measure(runs: usize, mut f: impl FnMut()) -> Stats {
    for _ in 0..runs.div_ceil(10) {
        f();
    }
    Stats::of(
        (0..runs)
            .map(|_| {
                let started = Instant::now();
                f();
                started.elapsed()
            })
            .collect(),
    )
}

/// Whether the benchmark runs in quick (smoke) mode.
pub fn quick() -> bool {
    std::env::args().any(|arg| arg == "--quick")
}

/// Runs `child` in a forked process with one end of a fresh socket pair, and `parent` here with
/// the other; reaps the child once `parent` has dropped its end.
pub fn with_forked_peer<T>(
    child: impl FnOnce(UnixStream),
    parent: impl FnOnce(&mut UnixStream) -> T,
) -> T {
    let (mut ours, theirs) = UnixStream::pair().expect("socketpair");
    // The child must not keep our end open, or it would never see end-of-file.
    let pid = match sys::fork_single_threaded(&[ours.as_fd()]) {
        Ok(Forked::Child) => {
            child(theirs);
            sys::exit_immediately(0)
        }
        Ok(Forked::Parent(pid)) => pid,
        Err((_, e)) => panic!("fork: {e}"),
    };
    drop(theirs);
    let result = parent(&mut ours);
    drop(ours);
    DirectChild::new(pid).expect("pidfd").wait_deadline(None).expect("reap");
    result
}

/// Round trips of 8 bytes between this process and a forked echo process over a Unix socket.
pub fn raw_ping_pong(runs: usize) -> Stats {
    with_forked_peer(
        |mut theirs| {
            let mut buf = [0u8; 8];
            while theirs.read_exact(&mut buf).is_ok() && theirs.write_all(&buf).is_ok() {}
        },
        |ours| {
            let mut buf = [0u8; 8];
            measure(runs, || {
                ours.write_all(&buf).expect("ping");
                ours.read_exact(&mut buf).expect("pong");
            })
        },
    )
}
