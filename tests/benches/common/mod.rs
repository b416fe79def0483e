//! What the benchmarks share: timing with a warm-up, median / min / max, and the table rows.

use std::time::{Duration, Instant};

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
