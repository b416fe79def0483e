//! `cargo xtask`: the project's automation, so that CI and a developer run the same commands.
//!
//! - `test-all-methods`: the workspace's unit tests, then the integration suite once per start
//!   method (and, where `mpirun` is on the PATH, its pool scenarios as an MPI job of rank 0 and
//!   two node agents), with a method × passed/failed table; non-zero exit if anything failed.
//! - `ci`: fmt, clippy `-D warnings`, test-all-methods, docs with warnings denied, every example
//!   with a timeout, and the benchmarks in quick mode (which checks that they run, not their times).
//! - `bench [--quick]`: the benchmarks (start-up, forkserver preload memory, pool, large data,
//!   bound data, pipes, and with `mpirun` the mpi context), each beside raw-syscall baselines and Python's `multiprocessing`
//!   measured in the same run; the tables go to `BENCHMARKS.md` (quick mode:
//!   `target/bench-quick.md`).

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// The start methods the integration suite runs under.
const METHODS: &[&str] = &["fork", "spawn", "forkserver"];

/// How long one MPI job of the suite may run (`mpirun --timeout`), in seconds.
const MPI_TIMEOUT_SECS: &str = "600";

/// Whether `mpirun` is on the PATH: then the suite gets its `mpi` column, and the mpi example
/// runs.
fn have_mpirun() -> bool {
    Command::new("mpirun")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// OpenMPI set up as a container on a small machine needs it: root allowed, more ranks than
/// cores, ranks that yield when idle, TCP kept to loopback. A variable the caller set is left
/// as it is.
fn with_mpi_env(mut cmd: Command) -> Command {
    for (key, value) in [
        ("OMPI_ALLOW_RUN_AS_ROOT", "1"),
        ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"),
        ("OMPI_MCA_rmaps_base_oversubscribe", "1"),
        ("OMPI_MCA_mpi_yield_when_idle", "1"),
        ("OMPI_MCA_btl_tcp_if_include", "lo"),
        ("OMPI_MCA_oob_tcp_if_include", "lo"),
    ] {
        if std::env::var_os(key).is_none() {
            cmd.env(key, value);
        }
    }
    cmd
}

/// A cargo command whose binaries run as MPI jobs (see [`with_mpi_env`]).
fn mpi_cargo() -> Command {
    with_mpi_env(cargo())
}

/// How long one example may run in CI.
const EXAMPLE_TIMEOUT: Duration = Duration::from_secs(300);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test-all-methods") => test_all_methods(),
        Some("ci") => ci(),
        Some("bench") => bench(args.iter().any(|a| a == "--quick")),
        _ => {
            eprintln!("usage: cargo xtask <test-all-methods | ci | bench [--quick]>");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn run(mut cmd: Command, what: &str) -> Result<(), String> {
    eprintln!("xtask: {what}");
    let status = cmd.status().map_err(|e| format!("{what}: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("{what} failed: {status}")) }
}

/// Runs a test command, echoing its output, and returns (passed, failed) from libtest's
/// closing lines.
fn run_counting(mut cmd: Command, what: &str) -> Result<(usize, usize, bool), String> {
    eprintln!("xtask: {what}");
    let output = cmd.stderr(Stdio::inherit()).output().map_err(|e| format!("{what}: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    print!("{stdout}");
    let (mut passed, mut failed) = (0, 0);
    for line in stdout.lines().filter(|l| l.starts_with("test result:")) {
        passed += count_before(line, " passed");
        failed += count_before(line, " failed");
    }
    Ok((passed, failed, output.status.success()))
}

/// Runs `cargo nextest run`, echoing its output, and returns (passed, failed) from its
/// summary line (which it writes to stderr).
fn run_nextest(mut cmd: Command, what: &str) -> Result<(usize, usize, bool), String> {
    eprintln!("xtask: {what}");
    let output = cmd.output().map_err(|e| format!("{what}: {e} (is cargo-nextest installed?)"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    print!("{}", String::from_utf8_lossy(&output.stdout));
    eprint!("{stderr}");
    let summary = stderr.lines().rev().find(|l| l.trim_start().starts_with("Summary"));
    let Some(summary) = summary else {
        return Ok((0, 0, false));
    };
    Ok((
        count_before(summary, " passed"),
        count_before(summary, " failed"),
        output.status.success(),
    ))
}

fn count_before(line: &str, label: &str) -> usize {
    line.find(label)
        .and_then(|end| line[..end].rsplit([' ', '.']).next()?.parse().ok())
        .unwrap_or(0)
}

fn test_all_methods() -> Result<(), String> {
    let mut rows = Vec::new();
    let mut unit = cargo();
    unit.args(["test", "--workspace", "--exclude", "multiproc-tests"]);
    rows.push(("unit + doc".to_owned(), run_counting(unit, "unit tests of every crate")?));
    for method in METHODS {
        let mut suite = cargo();
        suite.args(["test", "-p", "multiproc-tests", "--test", "suite"]);
        suite.env("MULTIPROC_START_METHOD", method);
        let what = format!("integration suite under {method}");
        rows.push((method.to_string(), run_counting(suite, &what)?));
    }
    if have_mpirun() {
        // The pool scenarios across ranks: cargo runs the suite's binary through mpirun.
        let mut suite = mpi_cargo();
        suite.args(["test", "-p", "multiproc-tests", "--features", "mpi", "--test", "suite"]);
        suite.env("MULTIPROC_START_METHOD", "mpi");
        let runner = format!("mpirun -n 3 --timeout {MPI_TIMEOUT_SECS}");
        suite.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", runner);
        rows.push(("mpi".to_owned(), run_counting(suite, "integration suite under mpirun -n 3")?));
        let mut agent = mpi_cargo();
        agent.args(["test", "-p", "multiproc-tests", "--features", "mpi", "--test", "mpi_agent"]);
        let what = "an MPI agent SIGKILLed (mpi_agent)";
        rows.push(("mpi agent death".to_owned(), run_counting(agent, what)?));
    } else {
        eprintln!("xtask: no mpirun on the PATH: the mpi column is left out");
    }
    let mut harness = cargo();
    harness.args(["test", "-p", "multiproc-tests", "--test", "harness"]);
    let what = "multiproc::test_main! under cargo test";
    rows.push(("test_main!".to_owned(), run_counting(harness, what)?));
    let mut allocations = cargo();
    allocations.args(["test", "-p", "multiproc-tests", "--test", "fork_allocations"]);
    let what = "a fork child allocates nothing before its task";
    rows.push(("fork allocations".to_owned(), run_counting(allocations, what)?));
    // Each test its own process, as nextest runs them: what a test assumes of the tests
    // before it shows up here.
    for method in METHODS {
        let mut nextest = cargo();
        nextest.args(["nextest", "run", "--no-fail-fast", "-p", "multiproc-tests"]);
        nextest.args(["--test", "suite", "--test", "harness"]);
        nextest.env("MULTIPROC_START_METHOD", method);
        let what = format!("integration suite under {method}, cargo nextest");
        rows.push((format!("nextest {method}"), run_nextest(nextest, &what)?));
    }
    println!();
    println!("| start method       | passed | failed | status |");
    println!("|--------------------|-------:|-------:|--------|");
    let mut all_ok = true;
    let (mut total_passed, mut total_failed) = (0, 0);
    for (name, (passed, failed, ok)) in &rows {
        let ok = *ok && *failed == 0 && *passed > 0;
        all_ok &= ok;
        total_passed += passed;
        total_failed += failed;
        println!(
            "| {name:<18} | {passed:>6} | {failed:>6} | {} |",
            if ok { "ok" } else { "FAILED" }
        );
    }
    println!();
    println!("all methods: {total_passed} passed, {total_failed} failed");
    if all_ok { Ok(()) } else { Err("some start method failed".into()) }
}

fn ci() -> Result<(), String> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--check"]);
    run(fmt, "cargo fmt --check")?;
    let mut clippy = cargo();
    clippy.args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]);
    run(clippy, "cargo clippy -D warnings")?;
    // The library as users get it by default, without the `tokio` feature the tests turn on.
    let mut default_features = cargo();
    default_features.args([
        "clippy",
        "-p",
        "multiproc",
        "-p",
        "multiproc-core",
        "--",
        "-D",
        "warnings",
    ]);
    run(default_features, "cargo clippy of the default features")?;
    if have_mpirun() {
        let mut with_mpi = cargo();
        with_mpi.args(["clippy", "-p", "multiproc-mpi", "-p", "multiproc-tests"]);
        with_mpi.args(["-p", "multiproc-examples", "--all-targets", "--features"]);
        with_mpi.args(["multiproc-mpi/mpi,multiproc-tests/mpi,multiproc-examples/mpi"]);
        with_mpi.args(["--", "-D", "warnings"]);
        run(with_mpi, "cargo clippy with the mpi feature")?;
    }
    test_all_methods()?;
    let mut doc = cargo();
    doc.args(["doc", "--workspace", "--no-deps"]).env("RUSTDOCFLAGS", "-D warnings");
    if have_mpirun() {
        doc.args(["--features", "multiproc/mpi"]);
    }
    run(doc, "cargo doc with warnings denied")?;
    run_examples()?;
    bench(true)
}

fn run_examples() -> Result<(), String> {
    let mpi = have_mpirun();
    let mut build = cargo();
    build.args(["build", "--release", "-p", "multiproc-examples", "--examples"]);
    if mpi {
        build.args(["--features", "mpi"]);
    }
    run(build, "build the examples")?;
    let mut names: Vec<String> = std::fs::read_dir(root().join("examples"))
        .map_err(|e| format!("examples/: {e}"))?
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".rs").map(str::to_owned)
        })
        .collect();
    names.sort();
    for name in names {
        let binary = root().join("target/release/examples").join(&name);
        // The mpi examples run as an MPI job: rank 0 and two node agents.
        let mut command = if name.starts_with("mpi_") {
            if !mpi {
                eprintln!("xtask: example {name} skipped: no mpirun on the PATH");
                continue;
            }
            let mut job = with_mpi_env(Command::new("mpirun"));
            job.args(["-n", "3", "--timeout", MPI_TIMEOUT_SECS]).arg(&binary);
            job
        } else {
            Command::new(&binary)
        };
        eprintln!("xtask: example {name}");
        let mut child = command.spawn().map_err(|e| format!("{name}: {e}"))?;
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| format!("{name}: {e}"))? {
                break status;
            }
            if started.elapsed() > EXAMPLE_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("example {name} ran longer than {EXAMPLE_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if !status.success() {
            return Err(format!("example {name} failed: {status}"));
        }
    }
    Ok(())
}

/// The benchmarks, in the order `cargo xtask bench` runs them.
const BENCHES: &[&str] =
    &["startup", "preload", "pool", "asyncio", "data", "bound", "pipe", "sync", "rayon"];

/// Runs every benchmark; each appends its tables to a report, which becomes `BENCHMARKS.md`
/// (full mode) or `target/bench-quick.md` (quick mode, so that CI never rewrites the real one).
fn bench(quick: bool) -> Result<(), String> {
    let partial = root().join("target/bench-report.partial.md");
    let _ = std::fs::remove_file(&partial);
    let mpi = have_mpirun();
    if !mpi {
        eprintln!("xtask: no mpirun on the PATH: the mpi benchmark is left out");
    }
    for name in BENCHES.iter().chain(mpi.then_some(&"mpi")) {
        let mut cmd = if *name == "mpi" { mpi_cargo() } else { cargo() };
        cmd.args(["bench", "-p", "multiproc-tests", "--bench", name]);
        if *name == "mpi" {
            cmd.args(["--features", "mpi"]);
        }
        cmd.arg("--");
        if quick {
            cmd.arg("--quick");
        }
        cmd.env("MULTIPROC_BENCH_REPORT", &partial);
        run(cmd, &format!("benchmark {name}{}", if quick { " (quick)" } else { "" }))?;
    }
    let tables = std::fs::read_to_string(&partial).map_err(|e| format!("the report: {e}"))?;
    let report =
        if quick { root().join("target/bench-quick.md") } else { root().join("BENCHMARKS.md") };
    std::fs::write(&report, format!("{}{tables}", report_header(quick)))
        .map_err(|e| format!("{}: {e}", report.display()))?;
    eprintln!("xtask: wrote {}", report.display());
    Ok(())
}

/// What a reader needs to weigh the numbers: when, on what, against which Python.
fn report_header(quick: bool) -> String {
    let output = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| format!("({program} not available)"))
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "# Benchmarks\n\n\
         Written by `cargo xtask bench{flag}`{mode} on {date}.\n\n\
         - Machine: {cores} cores ({cpu}), Linux {kernel}\n\
         - Python: {python} (run as `python3 -I -S`: no site hooks)\n\
         - Rust: {rustc}\n\n\
         Every number is a median from this run. **÷ baseline** is ours over the raw-syscall \
         baseline measured in the same run (lower is better; 1.00× is the physical limit). \
         **Python ÷ multiproc** is Python's time over ours, or our rate over Python's: above 1, \
         multiproc is faster. Targets are the project's (issue 6); a row says whether this run \
         met its target. On a shared machine, ratios move by ±0.3 or more between runs: \
         compare the rows of one run with each other. Start → join, `apply`, the pipe round \
         trip and the shared-memory row time ours and the baseline in alternation, a run of \
         each in turn, so that the machine's drift falls on both; the rows marked \"on one \
         CPU\" pin every process, Python's included, to one CPU.\n\n",
        flag = if quick { " --quick" } else { "" },
        mode = if quick { " (a smoke run: the numbers mean nothing)" } else { "" },
        date = output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        kernel = output("uname", &["-r"]),
        python = output("python3", &["--version"]),
        rustc = output("rustc", &["--version"]),
    )
}
