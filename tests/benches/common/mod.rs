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

/// Runs `f` with this process, and every process started meanwhile (they inherit the mask), on
/// one CPU: the first this process may use. The forkserver is stopped before and after, so that
/// the one `f` starts is pinned too and the next one is not.
///
/// On the 2-vCPU machine we measure on, a wake-up that crosses CPUs costs about 17 µs each way
/// (a raw socket round trip: 43 µs across CPUs, 8.6 µs on one), and where the scheduler happens
/// to place two processes decides a latency ratio. On one CPU every side pays the same context
/// switches, and what differs is software.
pub fn on_one_cpu<T>(f: impl FnOnce() -> T) -> T {
    let all = sys::cpu_affinity().expect("sched_getaffinity");
    kill_forkserver();
    sys::set_cpu_affinity(&all[..1]).expect("sched_setaffinity");
    let out = f();
    sys::set_cpu_affinity(&all).expect("sched_setaffinity");
    kill_forkserver();
    out
}

/// The environment variable that tells a Python script to place itself as [`across_cpus`]
/// places us: `PARENT,PEER`, the CPU of the measuring process and the CPU of what it starts.
pub const PYTHON_CPUS_ENV: &str = "MULTIPROC_BENCH_CPUS";

/// Runs `f` with the processes it starts on one CPU and this process on another, so that each
/// round trip between them crosses CPUs, every side's alike. `f` starts its peers first: they
/// inherit this process's mask, pinned to the last CPU it may use (as does a forkserver launched
/// meanwhile). Then it calls the function it is given, which moves this process alone to the
/// first CPU. The forkserver is stopped before and after, as in [`on_one_cpu`].
///
/// Left to the scheduler, three processes on two CPUs (this one, our peer and the raw
/// baseline's) make a lottery: whichever peer shares this process's CPU gets the fast round
/// trips, and a run measured ours at 0.28× or 5.7× the raw one depending on which it was.
/// Returns the CPUs used (`PARENT,PEER`, for [`PYTHON_CPUS_ENV`]) and what `f` returned, or
/// `None` where fewer than two CPUs are available.
pub fn across_cpus<T>(f: impl FnOnce(&dyn Fn()) -> T) -> Option<(String, T)> {
    let all = sys::cpu_affinity().expect("sched_getaffinity");
    let (&parent, &peer) = (all.first()?, all.last()?);
    if parent == peer {
        return None;
    }
    kill_forkserver();
    sys::set_cpu_affinity(&[peer]).expect("sched_setaffinity");
    let out = f(&|| sys::set_cpu_affinity(&[parent]).expect("sched_setaffinity"));
    sys::set_cpu_affinity(&all).expect("sched_setaffinity");
    kill_forkserver();
    Some((format!("{parent},{peer}"), out))
}

/// Kills this process's forkserver, if one runs, and waits until it is gone: the next
/// forkserver start launches a new one.
pub fn kill_forkserver() {
    if let Some(pid) = multiproc::forkserver_pid() {
        let pidfd = sys::pidfd_open(pid).expect("server pidfd");
        sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL).expect("kill");
        let mut set = [sys::PollFd::new(pidfd.as_fd(), sys::POLLIN)];
        sys::poll(&mut set, None).expect("poll");
    }
}

/// Times `ours` and `baseline` in alternating blocks (twenty of each, after a warm-up of each),
/// `runs` times each, and returns their statistics. The two sample the same stretch of a
/// machine whose speed drifts over minutes, so their ratio does not depend on which went first;
/// within a block the same code runs back to back, as it would in a loop, instead of each run
/// finding the caches full of the other's (alternating single runs cost our `apply` 2.4 µs of
/// its 13 on one CPU, and the raw round trip almost nothing).
pub fn measure_pair(
    runs: usize,
    mut ours: impl FnMut(),
    mut baseline: impl FnMut(),
) -> (Stats, Stats) {
    for _ in 0..runs.div_ceil(10) {
        ours();
    }
    for _ in 0..runs.div_ceil(10) {
        baseline();
    }
    let block = runs.div_ceil(20).max(1);
    let timed = |f: &mut dyn FnMut(), n: usize, into: &mut Vec<Duration>| {
        for _ in 0..n {
            let started = Instant::now();
            f();
            into.push(started.elapsed());
        }
    };
    let (mut a, mut b) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    while a.len() < runs {
        let n = block.min(runs - a.len());
        timed(&mut ours, n, &mut a);
        timed(&mut baseline, n, &mut b);
    }
    (Stats::of(a), Stats::of(b))
}

/// Runs `f` with a forked echo process on the other end of a Unix socket; `f` gets a function
/// that makes one raw round trip of 8 bytes.
pub fn with_raw_echo<T>(f: impl FnOnce(&mut dyn FnMut()) -> T) -> T {
    with_forked_peer(
        |mut theirs| {
            let mut buf = [0u8; 8];
            while theirs.read_exact(&mut buf).is_ok() && theirs.write_all(&buf).is_ok() {}
        },
        |ours| {
            let mut buf = [0u8; 8];
            let mut round_trip = || {
                ours.write_all(&buf).expect("ping");
                ours.read_exact(&mut buf).expect("pong");
            };
            f(&mut round_trip)
        },
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
    // The child must not keep our end open, or it would never see end-of-file. A pool's
    // progress thread may be running: it is parked across the fork, as for any of ours.
    let pid = match multiproc_core::runtime::threads::fork_parked(&[ours.as_fd()]) {
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

/// A measured quantity, shown with its unit; ratios between two are taken on their cost (time,
/// or the time per item of a rate), so a ratio above 1 always means "more expensive".
#[derive(Clone, Debug)]
pub enum Value {
    /// A duration.
    Time(Duration),
    /// Items (or bytes, with unit "B") per second.
    Rate(f64, &'static str),
    /// Something that is not a cost (a memory size, a note).
    Text(String),
    /// Not measured (no python3, or no such workload).
    Missing(&'static str),
}

impl Value {
    /// A rate of `items` in `took`.
    pub fn rate(items: f64, took: Duration, unit: &'static str) -> Value {
        Value::Rate(items / took.as_secs_f64(), unit)
    }

    fn cost(&self) -> Option<f64> {
        match self {
            Value::Time(d) => Some(d.as_secs_f64()),
            Value::Rate(r, _) if *r > 0.0 => Some(1.0 / r),
            _ => None,
        }
    }

    fn show(&self) -> String {
        match self {
            Value::Time(d) => {
                let s = d.as_secs_f64();
                if s < 1e-6 {
                    format!("{:.1} ns", s * 1e9)
                } else if s < 1e-3 {
                    format!("{:.1} µs", s * 1e6)
                } else if s < 1.0 {
                    format!("{:.2} ms", s * 1e3)
                } else {
                    format!("{s:.2} s")
                }
            }
            Value::Rate(r, "B") => format!("{:.2} GiB/s", r / f64::from(1u32 << 30)),
            Value::Rate(r, unit) if *r >= 1e6 => format!("{:.2} M {unit}/s", r / 1e6),
            Value::Rate(r, unit) => format!("{:.1} k {unit}/s", r / 1e3),
            Value::Text(text) => text.clone(),
            Value::Missing(why) => (*why).to_owned(),
        }
    }
}

/// What a row must show to meet the project's target.
#[derive(Clone, Debug)]
pub enum Target {
    /// Ours ÷ baseline at most this.
    AtMost(f64),
    /// Python ÷ ours (how many times faster we are) at least this.
    PythonRatio(f64),
    /// A target stated in words, judged by the reader.
    Words(String),
    /// No target.
    None,
}

/// One table of a benchmark. `finish` prints it as Markdown and appends it to the file named by
/// `MULTIPROC_BENCH_REPORT` (set by `cargo xtask bench`, which assembles BENCHMARKS.md).
pub struct Table {
    title: String,
    rows: Vec<String>,
    notes: Vec<String>,
}

impl Table {
    /// An empty table under `title`.
    pub fn new(title: impl Into<String>) -> Table {
        let mut title = title.into();
        if quick() {
            title.push_str(" — quick mode, numbers are not meaningful");
        }
        Table { title, rows: Vec::new(), notes: Vec::new() }
    }

    /// A row: `ours` beside `baseline` (ratio ours ÷ baseline) and `python` (ratio Python ÷
    /// ours: above 1, we are faster), judged against `target`.
    pub fn row(
        &mut self,
        workload: &str,
        method: &str,
        ours: Value,
        baseline: Value,
        python: Value,
        target: Target,
    ) {
        let ratio = |a: &Value, b: &Value| Some(a.cost()? / b.cost()?);
        let vs_base = ratio(&ours, &baseline);
        let vs_python = ratio(&python, &ours);
        let show = |r: Option<f64>| r.map_or("–".to_owned(), |r| format!("{r:.2}×"));
        let verdict = |met: bool| if met { "met" } else { "**missed**" };
        let target = match target {
            Target::AtMost(x) => match vs_base {
                Some(r) => format!("≤ {x}× baseline: {}", verdict(r <= x)),
                None => format!("≤ {x}× baseline"),
            },
            Target::PythonRatio(x) => match vs_python {
                Some(r) => format!("≥ {x}× Python: {}", verdict(r >= x)),
                None => format!("≥ {x}× Python"),
            },
            Target::Words(words) => words,
            Target::None => String::new(),
        };
        self.rows.push(format!(
            "| {workload} | {method} | {} | {} | {} | {} | {} | {target} |",
            ours.show(),
            baseline.show(),
            show(vs_base),
            python.show(),
            show(vs_python),
        ));
    }

    /// A line printed under the table.
    pub fn note(&mut self, line: impl Into<String>) {
        self.notes.push(line.into());
    }

    /// Prints the table and appends it to the run's report.
    pub fn finish(self) {
        let mut text = format!("### {}\n\n", self.title);
        text.push_str(
            "| workload | method | multiproc | baseline | ÷ baseline | Python | Python ÷ multiproc | target |\n\
             |---|---|---:|---:|---:|---:|---:|---|\n",
        );
        for row in &self.rows {
            text.push_str(row);
            text.push('\n');
        }
        if !self.notes.is_empty() {
            text.push('\n');
            for note in &self.notes {
                text.push_str(&format!("- {note}\n"));
            }
        }
        text.push('\n');
        print!("{text}");
        if let Some(path) = std::env::var_os("MULTIPROC_BENCH_REPORT") {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("open the report");
            file.write_all(text.as_bytes()).expect("append to the report");
        }
    }
}

/// Runs `tests/benches/python/<script>` under `python3 -I -S` (no site hooks, so that the
/// machine's start-up customisations do not slow Python down) and reads its `name seconds`
/// lines. `None`, with a message, when python3 is missing or the script failed.
pub fn python(script: &str, args: &[String]) -> Option<std::collections::HashMap<String, f64>> {
    python_placed(script, args, None)
}

/// [`python`], with the script told to place itself on the CPUs `across` (see
/// [`across_cpus`]).
pub fn python_placed(
    script: &str,
    args: &[String],
    across: Option<&str>,
) -> Option<std::collections::HashMap<String, f64>> {
    let path = format!("{}/benches/python/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut command = std::process::Command::new("python3");
    command.args(["-I", "-S", &path]).args(args);
    if let Some(cpus) = across {
        command.env(PYTHON_CPUS_ENV, cpus);
    }
    numbers(command, &format!("python3 {script}"))
}

/// The `name value` lines that `command` printed, or `None` (said on stderr) if it could not
/// run or failed: how the Python baselines, and the benchmarks that run as MPI jobs, report.
pub fn numbers(
    mut command: std::process::Command,
    what: &str,
) -> Option<std::collections::HashMap<String, f64>> {
    let output = match command.output() {
        Ok(output) => output,
        Err(e) => {
            eprintln!("{what} not available ({e}): its columns are skipped");
            return None;
        }
    };
    if !output.status.success() {
        eprintln!("{what} failed: {}", String::from_utf8_lossy(&output.stderr));
        return None;
    }
    Some(
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                let (name, value) = line.split_once(' ')?;
                Some((name.to_owned(), value.trim().parse().ok()?))
            })
            .collect(),
    )
}

/// Python's value for `name` as a time, or why there is none.
pub fn python_time(results: &Option<std::collections::HashMap<String, f64>>, name: &str) -> Value {
    match results {
        None => Value::Missing("no python3"),
        Some(map) => map
            .get(name)
            .map_or(Value::Missing("not reported"), |s| Value::Time(Duration::from_secs_f64(*s))),
    }
}

/// The proportional set size (`Pss` of `/proc/<pid>/smaps_rollup`) of process `pid`, in KiB:
/// its private pages plus its share of those it shares.
pub fn pss_kib(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = rollup.lines().find_map(|l| l.strip_prefix("Pss:"))?;
    line.trim().trim_end_matches("kB").trim().parse().ok()
}

/// The children of process `pid` that are named `name` (`/proc/<pid>/comm`).
pub fn children_named(pid: u32, name: &str) -> Vec<u32> {
    let list = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"));
    list.unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p: &u32| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .collect()
}

/// CPU time this process's threads have used so far (the first field of each
/// `/proc/self/task/<tid>/schedstat`, in nanoseconds): not its children's.
pub fn process_cpu() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return Duration::ZERO };
    let nanos: u64 = tasks
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
            stat.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum();
    Duration::from_nanos(nanos)
}

/// Minor page faults so far (`/proc/self/stat`): this process's own, and those of its children
/// that have been reaped.
pub struct MinorFaults {
    /// This process's (`minflt`).
    pub own: u64,
    /// Its reaped children's (`cminflt`).
    pub children: u64,
}

/// This process's [`MinorFaults`] now.
pub fn minor_faults() -> MinorFaults {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // The fields after the command's closing parenthesis, from the state (field 3) on.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let field = |n: usize| after_name.split_whitespace().nth(n - 3).and_then(|f| f.parse().ok());
    MinorFaults { own: field(10).unwrap_or(0), children: field(11).unwrap_or(0) }
}
