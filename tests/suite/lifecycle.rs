//! Scenarios of a healthy child: return values, names, timeouts, signals, daemons, many starts.

use std::os::fd::AsFd;
use std::time::Duration;

use libtest_mimic::Failed;
use multiproc::{Context, ErrorKind, ExitStatus};
use multiproc_core::sys::{self, POLLIN, PollFd};

use crate::Scenario;
use crate::common::{
    DEADLINE, add, ensure, fd_count, join, nap, wait_gone, warm_up, whoami, zombie_children,
};

pub const SCENARIOS: &[Scenario] = &[
    ("return_value", return_value),
    ("runs_in_another_process", runs_in_another_process),
    ("join_timeout_returns_while_running", join_timeout_returns_while_running),
    ("terminate_gives_minus_15", terminate_gives_minus_15),
    ("kill_gives_minus_9", kill_gives_minus_9),
    ("sentinel_becomes_readable_at_exit", sentinel_becomes_readable_at_exit),
    ("dropping_a_running_daemon_kills_it", dropping_a_running_daemon_kills_it),
    ("daemon_exits_when_its_parent_dies", daemon_exits_when_its_parent_dies),
    ("sequential_starts_leak_nothing", sequential_starts_leak_nothing),
    ("arguments_around_the_presend_bound", arguments_around_the_presend_bound),
    ("concurrent_starts_from_8_threads", concurrent_starts_from_8_threads),
];

fn return_value(ctx: &Context) -> Result<(), Failed> {
    let p = ctx.process(add, (2, 3)).name("adder").start()?;
    ensure(p.name() == "adder", || format!("name {}", p.name()))?;
    ensure(p.start_method() == ctx.start_method(), || "start method".into())?;
    ensure(!p.is_daemon(), || "daemon by default".into())?;
    ensure(join(p)?? == 5, || "2 + 3".into())
}

fn runs_in_another_process(ctx: &Context) -> Result<(), Failed> {
    let p = ctx.process(whoami, ()).start()?;
    let pid = p.pid();
    let reported = join(p)??;
    ensure(reported == pid, || format!("child says {reported}, handle says {pid}"))?;
    ensure(pid != std::process::id(), || "ran in the parent".into())
}

fn join_timeout_returns_while_running(ctx: &Context) -> Result<(), Failed> {
    let mut p = ctx.process(nap, DEADLINE).start()?;
    let early = p.join_timeout(Duration::from_millis(50))?;
    ensure(early.is_none(), || "join_timeout returned a value from a sleeping child".into())?;
    ensure(p.is_alive(), || "child not alive".into())?;
    ensure(p.exitcode().is_none(), || "exitcode while running".into())?;
    p.kill()?;
    let err = join(p)?.expect_err("a killed child has no value");
    ensure(err.exit_status() == Some(ExitStatus::Signaled(libc::SIGKILL)), || format!("{err:?}"))
}

fn signal_scenario(ctx: &Context, terminate: bool, expected: i32) -> Result<(), Failed> {
    let mut p = ctx.process(nap, DEADLINE).start()?;
    if terminate {
        p.terminate()?
    } else {
        p.kill()?
    }
    let joined = p.join_timeout(DEADLINE).map(|value| value.is_some());
    ensure(p.exitcode() == Some(expected), || format!("exitcode {:?}", p.exitcode()))?;
    ensure(joined.is_err_and(|e| e.kind() == ErrorKind::ChildExited), || "kind".into())
}

fn terminate_gives_minus_15(ctx: &Context) -> Result<(), Failed> {
    signal_scenario(ctx, true, -15)
}

fn kill_gives_minus_9(ctx: &Context) -> Result<(), Failed> {
    signal_scenario(ctx, false, -9)
}

fn sentinel_becomes_readable_at_exit(ctx: &Context) -> Result<(), Failed> {
    let mut p = ctx.process(nap, DEADLINE).start()?;
    {
        let mut set = [PollFd::new(p.sentinel(), POLLIN)];
        let ready = sys::poll(&mut set, Some(std::time::Instant::now()))?;
        ensure(ready == 0, || "sentinel ready while the child runs".into())?;
    }
    p.kill()?;
    let mut set = [PollFd::new(p.sentinel(), POLLIN)];
    let ready = sys::poll(&mut set, Some(std::time::Instant::now() + DEADLINE))?;
    ensure(ready == 1, || "sentinel not ready after kill".into())?;
    ensure(p.exitcode() == Some(-9), || format!("exitcode {:?}", p.exitcode()))
}

fn dropping_a_running_daemon_kills_it(ctx: &Context) -> Result<(), Failed> {
    let p = ctx.process(nap, DEADLINE).daemon(true).start()?;
    let pidfd = sys::pidfd_open(p.pid())?;
    drop(p);
    let mut set = [PollFd::new(pidfd.as_fd(), POLLIN)];
    ensure(sys::poll(&mut set, Some(std::time::Instant::now()))? == 1, || {
        "daemon still running after its handle was dropped".into()
    })?;
    ensure(zombie_children().is_empty(), || "zombie left".into())
}

/// Starts a daemon grandchild, reports its pid through `report` (a Unix socket path), then
/// sleeps until killed.
#[multiproc::task]
fn parent_of_daemon(report: std::path::PathBuf) {
    use std::io::Write;
    let ctx = multiproc::Context::from_env().expect("context in the child");
    let daemon = ctx.process(nap, DEADLINE).daemon(true).start().expect("start grandchild");
    let mut socket = std::os::unix::net::UnixStream::connect(&report).expect("connect");
    socket.write_all(&daemon.pid().to_le_bytes()).expect("report pid");
    std::thread::sleep(DEADLINE);
    drop(daemon);
}

fn daemon_exits_when_its_parent_dies(ctx: &Context) -> Result<(), Failed> {
    use std::io::Read;
    let dir = std::env::temp_dir().join(format!("multiproc-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}.sock", ctx.start_method()));
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    let mut parent = ctx.process(parent_of_daemon, path.clone()).start()?;

    let mut set = [PollFd::new(listener.as_fd(), POLLIN), PollFd::new(parent.sentinel(), POLLIN)];
    sys::poll(&mut set, Some(std::time::Instant::now() + DEADLINE))?;
    ensure(set[0].revents() != 0, || "the middle process never reported".into())?;
    let (mut conn, _) = listener.accept()?;
    conn.set_read_timeout(Some(DEADLINE))?;
    let mut pid = [0u8; 4];
    conn.read_exact(&mut pid)?;
    let grandchild = u32::from_le_bytes(pid);
    let _ = std::fs::remove_file(&path);

    parent.kill()?;
    let joined = parent.join_timeout(DEADLINE).map(|value| value.is_some());
    ensure(joined.is_err(), || "the killed middle process returned a value".into())?;
    match wait_gone(grandchild, Duration::from_secs(10)) {
        Some(took) => {
            eprintln!("daemon grandchild {grandchild} exited {took:?} after its parent was killed");
            Ok(())
        }
        None => Err(format!("daemon grandchild {grandchild} outlived its parent by 10 s").into()),
    }
}

/// The length and byte sum of `bytes`.
#[multiproc::task]
fn measure(bytes: Vec<u8>) -> (usize, u64) {
    (bytes.len(), bytes.iter().map(|&b| u64::from(b)).sum())
}

/// Arguments small enough to be written before the child exists (2 KiB with the message), and
/// larger ones written after, reach the child whole.
fn arguments_around_the_presend_bound(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let before = fd_count();
    for len in [0, 1, 1900, 2000, 2048, 2100, 70_000] {
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let expected = (bytes.len(), bytes.iter().map(|&b| u64::from(b)).sum::<u64>());
        let got = join(ctx.process(measure, bytes).start()?)??;
        ensure(got == expected, || format!("{len} bytes: got {got:?}, expected {expected:?}"))?;
    }
    ensure(fd_count() == before, || format!("fds before {before}, after {}", fd_count()))?;
    ensure(zombie_children().is_empty(), || "zombies left".into())
}

fn sequential_starts_leak_nothing(ctx: &Context) -> Result<(), Failed> {
    // What the first start opens for good (the forkserver's socket, /dev/null) is not a leak:
    // as its own process under nextest, this test may be the first to start a child.
    warm_up(ctx)?;
    let before = fd_count();
    for i in 0..200u64 {
        let sum = join(ctx.process(add, (i, 1)).start()?)??;
        ensure(sum == i + 1, || format!("start {i}: got {sum}"))?;
    }
    let after = fd_count();
    ensure(after == before, || format!("fds before {before}, after {after}"))?;
    let zombies = zombie_children();
    ensure(zombies.is_empty(), || format!("zombies: {zombies:?}"))
}

fn concurrent_starts_from_8_threads(ctx: &Context) -> Result<(), Failed> {
    if ctx.start_method() == "fork" {
        // fork refuses multi-threaded callers; see failures::fork_refused_when_multithreaded.
        return Ok(());
    }
    warm_up(ctx)?;
    let before = fd_count();
    let results: Vec<Result<u64, String>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..8u64)
            .map(|t| {
                scope.spawn(move || -> Result<u64, String> {
                    let mut sum = 0;
                    for i in 0..13u64 {
                        let p = ctx.process(add, (t, i)).start().map_err(|e| e.to_string())?;
                        sum += join(p).map_err(|e| format!("{e:?}"))?.map_err(|e| e.to_string())?;
                    }
                    Ok(sum)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("worker thread")).collect()
    });
    for (t, result) in results.into_iter().enumerate() {
        let t = t as u64;
        let expected: u64 = (0..13).map(|i| t + i).sum();
        ensure(result.as_ref() == Ok(&expected), || format!("thread {t}: {result:?}"))?;
    }
    let after = fd_count();
    ensure(after == before, || format!("fds before {before}, after {after}"))?;
    ensure(zombie_children().is_empty(), || "zombies left".into())
}
