//! An agent rank SIGKILLed mid-map: MPI ends the whole job (its failure model; there is no
//! surviving it), and that must happen within a bounded time, with `mpirun` naming the rank,
//! and leave nothing behind: no process of the job, no `/tmp/ompi.*` folder.
//!
//! Beside it: outside an MPI job, `Context::new("mpi")` fails and says how to launch.
//!
//! Run as a plain test (`cargo test --features mpi --test mpi_agent`), it launches itself under
//! `mpirun -n 3`; there, rank 0 runs the victim side.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use multiproc::{Context, task};

/// How long the job may take to end once its agent is killed.
const BOUND: Duration = Duration::from_secs(30);

/// The worker's pid and its agent's.
#[task]
fn lineage(hold_ms: u64) -> (u32, u32) {
    std::thread::sleep(Duration::from_millis(hold_ms));
    (std::process::id(), std::os::unix::process::parent_id())
}

/// Squares a number.
#[task]
fn square(x: u64) -> u64 {
    x * x
}

fn main() -> std::process::ExitCode {
    if multiproc::mpi::launched().is_some() {
        victim();
    }
    let args = libtest_mimic::Arguments::from_args();
    let trials = vec![
        libtest_mimic::Trial::test(
            "an_agent_sigkilled_ends_the_job_in_bounded_time_naming_its_rank_leaving_nothing",
            || {
                driver();
                Ok(())
            },
        ),
        libtest_mimic::Trial::test("without_a_launcher_the_mpi_context_says_how_to_launch", || {
            let error = Context::new("mpi").expect_err("no MPI job here");
            let text = error.to_string();
            if error.kind() != multiproc::ErrorKind::StartFailed || !text.contains("mpirun -n 3") {
                return Err(format!("{:?}: {text}", error.kind()).into());
            }
            Ok(())
        }),
    ];
    libtest_mimic::run(&args, trials).exit_code()
}

/// Rank 0: starts a pool on both agents, prints every pid of the job, kills agent rank 1,
/// and maps until the launcher ends it.
fn victim() -> ! {
    let ctx = Context::new("mpi").expect("the mpi context");
    let pool = ctx.pool().processes(2).chunksize(1).build().expect("a pool");
    let seen = pool.map(lineage, vec![300u64, 300]).expect("lineage");
    let mpi = multiproc::mpi::Mpi::new().expect("the job");
    let agents = mpi.agents();
    let victim = agents.iter().find(|a| a.rank == 1).expect("rank 1").pid;
    let mut pids = vec![std::process::id()];
    pids.extend(agents.iter().map(|a| a.pid));
    pids.extend(seen.iter().map(|(worker, _)| *worker));
    println!("PIDS {}", pids.iter().map(u32::to_string).collect::<Vec<_>>().join(" "));
    println!("KILL {victim}");
    use std::io::Write;
    std::io::stdout().flush().expect("flush");
    let pidfd = multiproc_core::sys::pidfd_open(victim).expect("the agent's pidfd");
    multiproc_core::sys::pidfd_send_signal(std::os::fd::AsFd::as_fd(&pidfd), libc::SIGKILL)
        .expect("SIGKILL the agent");
    let started = Instant::now();
    while started.elapsed() < BOUND * 2 {
        let _ = pool.map(square, 0..1000u64);
    }
    println!("STILL RUNNING");
    std::process::exit(3);
}

fn ompi_folders() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/tmp") else { return Vec::new() };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("ompi."))
        .collect();
    names.sort();
    names
}

/// The plain test: launches the job and checks how it ended.
fn driver() {
    let before = ompi_folders();
    let exe = std::env::current_exe().expect("this test's path");
    let started = Instant::now();
    let mut job = Command::new("mpirun")
        .args(["-n", "3", "--timeout", "120"])
        .arg(&exe)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun (install OpenMPI: apt-get install openmpi-bin libopenmpi-dev)");
    let status = loop {
        if let Some(status) = job.try_wait().expect("wait for mpirun") {
            break status;
        }
        if started.elapsed() > BOUND * 4 {
            let _ = job.kill();
            let _ = job.wait();
            panic!("the job did not end within {:?}", BOUND * 4);
        }
        // Polling a process we launched: nothing in it can tell us sooner.
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    let (mut out, mut err) = (String::new(), String::new());
    job.stdout.take().expect("piped").read_to_string(&mut out).expect("stdout");
    job.stderr.take().expect("piped").read_to_string(&mut err).expect("stderr");
    println!("mpirun: {status} after {took:?}\n--- stdout\n{out}--- stderr\n{err}");
    assert!(out.contains("KILL "), "rank 0 never killed its agent");
    assert!(!out.contains("STILL RUNNING"), "the job outlived its agent by {:?}", BOUND * 2);
    assert!(!status.success(), "mpirun reported success after an agent was killed");
    assert!(took < BOUND + Duration::from_secs(30), "the job took {took:?} to end");
    assert!(err.contains("rank 1"), "mpirun's report does not name rank 1");
    let pids: Vec<u32> = out
        .lines()
        .find_map(|line| line.strip_prefix("PIDS "))
        .expect("the job's pids")
        .split_whitespace()
        .map(|pid| pid.parse().expect("a pid"))
        .collect();
    let deadline = Instant::now() + BOUND;
    let alive = || {
        pids.iter()
            .copied()
            .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
            .collect::<Vec<_>>()
    };
    while !alive().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(alive().is_empty(), "left running: {:?} of {pids:?}", alive());
    assert_eq!(ompi_folders(), before, "OpenMPI's session folders left in /tmp");
    println!("an agent SIGKILLed ended the job in {took:?}, naming rank 1, leaving nothing");
}
