//! Forkserver-only scenarios: busy threads in the caller, a killed server, no reachable
//! address, the server following its parent out, preload, and SIGINT.
//!
//! A forkserver's preload is set once per process, before its first start, so the preload
//! scenarios run in a spawned process that has a forkserver of its own.

use std::io::Read;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use multiproc::{Context, task};
use multiproc_core::sys::{self, POLLIN, PollFd};

use crate::Scenario;
use crate::common::{
    DEADLINE, Gate, add, ensure, fd_count, gated, join, living_children, nap, read_pid, wait_gone,
    zombie_children,
};

pub const SCENARIOS: &[Scenario] = &[
    ("starts_1000_times_beside_16_busy_threads", busy_threads),
    ("killed_server_is_replaced_and_its_children_report", killed_server),
    ("server_has_no_socket_address", no_socket_address),
    ("server_and_daemons_follow_a_killed_parent", follows_killed_parent),
    ("preload_is_shared_by_every_child", preload_shared),
    ("preload_panic_fails_every_start_without_relaunch", preload_panic),
    ("server_ignores_sigint_and_children_do_not", sigint),
    ("children_hold_only_stdio_and_their_channel", children_fds),
    ("join_does_not_wait_for_the_servers_report", join_without_report),
    ("a_stopped_server_fails_start_in_bounded_time_and_is_replaced", stopped_server),
    ("a_start_whose_server_is_killed_never_says_failed_for_a_child_that_ran", killed_mid_start),
    ("a_server_out_of_descriptors_refuses_those_starts_and_goes_on", out_of_descriptors),
];

fn busy_threads(ctx: &Context) -> Result<(), Failed> {
    let stop = Arc::new(AtomicBool::new(false));
    let lock = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let (stop, lock) = (Arc::clone(&stop), Arc::clone(&lock));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // Allocate and hold a lock, over and over: what a forked copy of this
                    // process would deadlock on.
                    let mut held = lock.lock().unwrap();
                    held.push(vec![i as u8; 4096]);
                    if held.len() > 64 {
                        held.clear();
                    }
                }
            })
        })
        .collect();
    // One warm-up start so that the server (and its control socket) exist before counting.
    let warm = join(ctx.process(add, (0, 0)).start()?)??;
    let before = fd_count();
    let outcome = (|| -> Result<(), Failed> {
        for i in 0..1000u64 {
            let sum = join(ctx.process(add, (i, 1)).start()?)??;
            ensure(sum == i + 1, || format!("start {i}: {sum}"))?;
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        let _ = thread.join();
    }
    outcome?;
    let after = fd_count();
    ensure(warm == 0, || "warm-up".into())?;
    ensure(after == before, || format!("fds before {before}, after {after}"))?;
    ensure(zombie_children().is_empty(), || "zombies".into())
}

/// Returns `value` once its (inherited) socket has something to read: lets the test decide
/// when a child that outlives its server may finish.
#[task]
fn wait_then_echo(value: u64, gate: std::path::PathBuf) -> u64 {
    let mut socket = std::os::unix::net::UnixStream::connect(gate).expect("connect to gate");
    let mut byte = [0u8; 1];
    socket.read_exact(&mut byte).expect("gate");
    value
}

fn killed_server(ctx: &Context) -> Result<(), Failed> {
    use std::io::Write;
    let path = std::env::temp_dir().join(format!("multiproc-gate-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    let running = ctx.process(wait_then_echo, (41, path.clone())).start()?;
    let server = multiproc::forkserver_pid().ok_or("no forkserver after a start")?;
    let (mut gate, _) = accept_by(&listener, Instant::now() + DEADLINE)?;
    let _ = std::fs::remove_file(&path);

    let server_fd = sys::pidfd_open(server)?;
    sys::pidfd_send_signal(server_fd.as_fd(), libc::SIGKILL)?;
    ensure(wait_gone(server, DEADLINE).is_some(), || "server survived SIGKILL".into())?;

    // The next start notices the dead server and launches a new one.
    let sum = join(ctx.process(add, (20, 22)).start()?)??;
    ensure(sum == 42, || "start after the server died".into())?;
    let replacement = multiproc::forkserver_pid().ok_or("no replacement server")?;
    ensure(replacement != server, || "the dead server is still registered".into())?;

    // The child the dead server forked still reports its result.
    gate.write_all(b"!")?;
    let value = join(running)??;
    ensure(value == 41, || format!("orphaned child returned {value}"))
}

fn accept_by(
    listener: &std::os::unix::net::UnixListener,
    deadline: Instant,
) -> Result<(std::os::unix::net::UnixStream, std::os::unix::net::SocketAddr), Failed> {
    let mut set = [PollFd::new(listener.as_fd(), POLLIN)];
    ensure(sys::poll(&mut set, Some(deadline))? == 1, || "nobody connected".into())?;
    Ok(listener.accept()?)
}

/// Socket inodes held open by process `pid`.
fn socket_inodes(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    dir.filter_map(|entry| {
        let target = std::fs::read_link(entry.ok()?.path()).ok()?;
        let target = target.to_str()?;
        Some(target.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
    })
    .collect()
}

fn no_socket_address(ctx: &Context) -> Result<(), Failed> {
    join(ctx.process(add, (1, 1)).start()?)??;
    let server = multiproc::forkserver_pid().ok_or("no forkserver")?;
    let inodes = socket_inodes(server);
    ensure(!inodes.is_empty(), || "the server holds no socket".into())?;
    let table = std::fs::read_to_string("/proc/net/unix")?;
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Num RefCount Protocol Flags Type St Inode [Path]
        if fields.len() > 7 && inodes.iter().any(|inode| inode == fields[6]) {
            return Err(format!("server socket {} has an address: {}", fields[6], fields[7]).into());
        }
    }
    Ok(())
}

/// Starts a forkserver child (a daemon that naps), reports the server's pid and the child's
/// through `report`, then naps until killed.
#[task]
fn forkserver_parent(report: std::path::PathBuf) {
    use std::io::Write;
    let ctx = Context::new("forkserver").expect("forkserver context");
    let daemon = ctx.process(nap, DEADLINE).daemon(true).start().expect("start");
    let server = multiproc::forkserver_pid().expect("server pid");
    let mut socket = std::os::unix::net::UnixStream::connect(report).expect("connect");
    let mut message = server.to_le_bytes().to_vec();
    message.extend_from_slice(&daemon.pid().to_le_bytes());
    socket.write_all(&message).expect("report");
    std::thread::sleep(DEADLINE);
    drop(daemon);
}

fn follows_killed_parent(_ctx: &Context) -> Result<(), Failed> {
    let path = std::env::temp_dir().join(format!("multiproc-parent-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    // The middle process is spawned, so that it has a forkserver of its own.
    let mut middle = Context::new("spawn")?.process(forkserver_parent, path.clone()).start()?;
    let (mut conn, _) = accept_by(&listener, Instant::now() + DEADLINE)?;
    let _ = std::fs::remove_file(&path);
    conn.set_read_timeout(Some(DEADLINE))?;
    let mut pids = [0u8; 8];
    conn.read_exact(&mut pids)?;
    let server = u32::from_le_bytes(pids[..4].try_into().unwrap());
    let daemon = u32::from_le_bytes(pids[4..].try_into().unwrap());

    middle.kill()?;
    let _ = middle.join_timeout(DEADLINE);
    for (what, pid) in [("forkserver", server), ("daemon child", daemon)] {
        match wait_gone(pid, Duration::from_secs(10)) {
            Some(took) => eprintln!("{what} {pid} exited {took:?} after its parent was killed"),
            None => return Err(format!("{what} {pid} outlived its parent by 10 s").into()),
        }
    }
    Ok(())
}

/// The preload: a table with a known sum.
#[task]
fn build_table(n: u64) -> Vec<u64> {
    (0..n).collect()
}

/// What a forkserver child sees of the preload: the table's sum and address.
#[task]
fn read_table() -> Option<(u64, u64)> {
    multiproc::preloaded::<Vec<u64>>().map(|table| (table.iter().sum(), table.as_ptr() as u64))
}

/// What [`preload_in_own_process`] saw.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct PreloadReport {
    children: Vec<Option<(u64, u64)>>,
    in_parent: bool,
    late_set: String,
}

/// Sets a preload, starts three forkserver children, and tries to set a preload again.
#[task]
fn preload_in_own_process(n: u64) -> Result<PreloadReport, String> {
    let text = |e: multiproc::Error| format!("{:?}: {e}", e.kind());
    multiproc::set_forkserver_preload(build_table, n).map_err(text)?;
    let ctx = Context::new("forkserver").map_err(text)?;
    let mut children = Vec::new();
    for _ in 0..3 {
        children.push(ctx.process(read_table, ()).start().and_then(|p| p.join()).map_err(text)?);
    }
    let late_set = match multiproc::set_forkserver_preload(build_table, 1) {
        Ok(()) => "accepted".to_owned(),
        Err(e) => text(e),
    };
    let in_parent = multiproc::preloaded::<Vec<u64>>().is_some();
    Ok(PreloadReport { children, in_parent, late_set })
}

fn preload_shared(_ctx: &Context) -> Result<(), Failed> {
    let n = 100_000u64;
    let report = join(Context::new("spawn")?.process(preload_in_own_process, n).start()?)???;
    let expected = n * (n - 1) / 2;
    ensure(report.children.len() == 3, || format!("{report:?}"))?;
    let addresses: Vec<u64> = report
        .children
        .iter()
        .map(|seen| match seen {
            Some((sum, address)) if *sum == expected => Ok(*address),
            other => Err(format!("a child saw {other:?}, expected the sum {expected}")),
        })
        .collect::<Result<_, _>>()?;
    // Forked from one server, every child finds the table at the server's address.
    ensure(addresses.iter().all(|a| *a == addresses[0]), || format!("{addresses:?}"))?;
    ensure(!report.in_parent, || "the user's program sees a preload".into())?;
    ensure(report.late_set.starts_with("InvalidState"), || report.late_set.clone())
}

/// A preload that panics.
#[task]
fn broken_table(message: String) -> Vec<u64> {
    panic!("{message}")
}

/// Sets a panicking preload and tries two starts; reports each error and the children left.
#[task]
fn preload_panic_in_own_process() -> Vec<String> {
    multiproc::set_forkserver_preload(broken_table, "no table today".to_owned()).expect("set");
    let ctx = Context::new("forkserver").expect("forkserver context");
    let mut report = Vec::new();
    for _ in 0..2 {
        match ctx.process(add, (1, 2)).start() {
            Ok(p) => report.push(format!("started {}: {:?}", p.pid(), p.join())),
            Err(e) => report.push(format!(
                "{:?}|{}|{}",
                e.kind(),
                e.panic().map(|p| p.message.as_str()).unwrap_or("no panic"),
                e.panic().and_then(|p| p.location.clone()).unwrap_or_default()
            )),
        }
    }
    report.push(format!("server {:?}", multiproc::forkserver_pid()));
    report.push(format!("children {:?}", living_children()));
    report
}

fn preload_panic(_ctx: &Context) -> Result<(), Failed> {
    let report = join(Context::new("spawn")?.process(preload_panic_in_own_process, ()).start()?)??;
    ensure(report.len() == 4, || format!("{report:?}"))?;
    for attempt in &report[..2] {
        ensure(attempt.starts_with("Panicked|no table today|"), || format!("{report:?}"))?;
        ensure(attempt.contains("forkserver.rs"), || format!("no location: {report:?}"))?;
    }
    ensure(report[2] == "server None", || format!("{report:?}"))?;
    ensure(report[3] == "children []", || format!("a server was left running: {report:?}"))
}

fn sigint(ctx: &Context) -> Result<(), Failed> {
    join(ctx.process(add, (1, 1)).start()?)??;
    let server = multiproc::forkserver_pid().ok_or("no forkserver")?;
    let mut napping = ctx.process(nap, DEADLINE).start()?;
    let server_fd = sys::pidfd_open(server)?;
    sys::pidfd_send_signal(server_fd.as_fd(), libc::SIGINT)?;
    napping.signal(libc::SIGINT)?;
    let error = match join(napping)? {
        Ok(()) => return Err("a child ignored SIGINT".into()),
        Err(e) => e,
    };
    ensure(error.exit_status().and_then(|s| s.signal()) == Some(libc::SIGINT), || {
        format!("child ended with {error}")
    })?;
    // The server took the same signal and still serves.
    let sum = join(ctx.process(add, (2, 2)).start()?)??;
    ensure(sum == 4, || "start after SIGINT".into())?;
    ensure(multiproc::forkserver_pid() == Some(server), || "the server was replaced".into())
}

/// The descriptors open in this process above stderr (without the one that lists them).
#[task]
fn open_fds() -> Vec<String> {
    let entries: Vec<_> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| dir.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    entries
        .iter()
        .filter_map(|path| {
            let number: i32 = path.file_name()?.to_str()?.parse().ok()?;
            let target = std::fs::read_link(path).ok()?;
            if number <= 2 {
                return None;
            }
            // The directory being listed shows up as an fd of its own.
            (!target.starts_with("/proc")).then(|| target.to_string_lossy().into_owned())
        })
        .collect()
}

fn children_fds(ctx: &Context) -> Result<(), Failed> {
    // Eight threads start children at once, so that requests queue up in the server while it
    // forks: a child must not inherit the descriptors of the requests behind its own.
    let reports: Vec<Result<Vec<String>, String>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    (0..10)
                        .map(|_| {
                            let p = ctx.process(open_fds, ()).start().map_err(|e| e.to_string())?;
                            match join(p) {
                                Ok(Ok(fds)) => Ok(fds),
                                Ok(Err(e)) => Err(e.to_string()),
                                Err(e) => Err(format!("{e:?}")),
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads.into_iter().flat_map(|t| t.join().unwrap_or_default()).collect()
    });
    ensure(reports.len() == 80, || format!("{} reports", reports.len()))?;
    for report in reports {
        let fds = report?;
        // Beside stdio: the child's own channel, nothing else.
        ensure(fds.len() == 1 && fds[0].starts_with("socket:"), || {
            format!("a child holds {fds:?} beside stdio")
        })?;
    }
    Ok(())
}

/// `join` of a child that returned needs only the child to be gone, not the server's report of
/// its status: with the server stopped, join still returns the value; continued, the server
/// reaps the child.
fn join_without_report(ctx: &Context) -> Result<(), Failed> {
    use std::io::Write;
    join(ctx.process(add, (0, 0)).start()?)??;
    let server = multiproc::forkserver_pid().ok_or("no forkserver after a start")?;
    let server = sys::pidfd_open(server)?;
    let gate = Gate::new("report")?;
    let process = ctx.process(gated, (gate.path(), 7)).start()?;
    let mut conn = gate.accept()?;
    let child = read_pid(&mut conn)?;
    sys::pidfd_send_signal(server.as_fd(), libc::SIGSTOP)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let joiner = std::thread::spawn(move || {
        let _ = tx.send(process.join().map_err(|e| e.to_string()));
    });
    conn.write_all(&[1])?;
    let joined = rx.recv_timeout(DEADLINE);
    // Whatever happened, the server goes on: a join that waited for it returns now.
    sys::pidfd_send_signal(server.as_fd(), libc::SIGCONT)?;
    let _ = joiner.join();
    ensure(joined == Ok(Ok(7)), || format!("join with the server stopped: {joined:?}"))?;
    ensure(wait_gone(child, DEADLINE).is_some(), || format!("child {child} was not reaped"))
}

fn stopped_server(ctx: &Context) -> Result<(), Failed> {
    join(ctx.process(add, (1, 1)).start()?)??;
    let server = multiproc::forkserver_pid().ok_or("no forkserver after a start")?;
    let server_fd = sys::pidfd_open(server)?;
    sys::pidfd_send_signal(server_fd.as_fd(), libc::SIGSTOP)?;
    multiproc::set_forkserver_start_timeout(Duration::from_millis(300));
    let started = ctx.process(add, (2, 2)).start();
    multiproc::set_forkserver_start_timeout(multiproc::DEFAULT_FORKSERVER_START_TIMEOUT);
    // The stopped server was killed: it cannot fork the child later.
    ensure(wait_gone(server, DEADLINE).is_some(), || format!("server {server} still there"))?;
    match started {
        Err(e) => {
            ensure(e.kind() == multiproc::ErrorKind::StartFailed, || format!("{e:?}"))?;
            ensure(e.to_string().contains("did not answer"), || e.to_string())?;
        }
        Ok(p) => return Err(format!("a stopped server started {}", p.pid()).into()),
    }
    // The next start has a new server.
    ensure(join(ctx.process(add, (3, 4)).start()?)?? == 7, || "sum".into())?;
    let now = multiproc::forkserver_pid();
    ensure(now.is_some() && now != Some(server), || format!("server {now:?} after {server}"))?;
    ensure(zombie_children().is_empty(), || format!("zombies {:?}", zombie_children()))
}

/// Creates `dir/id`: a trace that the task ran.
#[task]
fn leave_mark(dir: std::path::PathBuf, id: u32) {
    std::fs::write(dir.join(id.to_string()), b"ran").expect("write the mark");
}

fn killed_mid_start(ctx: &Context) -> Result<(), Failed> {
    let dir = std::env::temp_dir().join(format!("multiproc-marks-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    join(ctx.process(add, (1, 1)).start()?)??;
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..8u32)
        .map(|t| {
            let (ctx, dir, outcomes) = (ctx.clone(), dir.clone(), Arc::clone(&outcomes));
            std::thread::spawn(move || {
                for i in 0..25u32 {
                    let id = t * 100 + i;
                    let outcome = ctx.process(leave_mark, (dir.clone(), id)).start().map(join);
                    outcomes.lock().unwrap().push((id, outcome));
                }
            })
        })
        .collect();
    // Kill the server twice while the starts go on.
    let mut previous = None;
    let until = Instant::now() + DEADLINE;
    for _ in 0..2 {
        // The server now serving, once the one killed before is replaced.
        let server = loop {
            match multiproc::forkserver_pid() {
                Some(pid) if Some(pid) != previous => break pid,
                _ if Instant::now() > until => return Err("no new forkserver in time".into()),
                _ => std::thread::yield_now(),
            }
        };
        previous = Some(server);
        let server_fd = sys::pidfd_open(server)?;
        sys::pidfd_send_signal(server_fd.as_fd(), libc::SIGKILL)?;
        ensure(wait_gone(server, DEADLINE).is_some(), || "server survived SIGKILL".into())?;
    }
    for thread in threads {
        thread.join().map_err(|_| "a starting thread panicked")?;
    }
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    ensure(outcomes.len() == 200, || format!("{} outcomes", outcomes.len()))?;
    let mut failed = 0;
    for (id, outcome) in outcomes {
        let ran = dir.join(id.to_string()).exists();
        match outcome {
            Ok(joined) => {
                joined?.map_err(|e| format!("start {id} joined with {e}"))?;
                ensure(ran, || format!("start {id} joined but left no mark"))?;
            }
            Err(e) if e.kind() == multiproc::ErrorKind::StartFailed => {
                failed += 1;
                ensure(!ran, || format!("start {id} said {e} but its task ran"))?;
            }
            Err(e) if e.kind() == multiproc::ErrorKind::OutcomeUnknown => failed += 1,
            Err(e) => return Err(format!("start {id}: {e:?}").into()),
        }
    }
    eprintln!("{failed} of 200 starts failed while the server was killed twice");
    let _ = std::fs::remove_dir_all(&dir);
    ensure(zombie_children().is_empty(), || format!("zombies {:?}", zombie_children()))
}

fn out_of_descriptors(ctx: &Context) -> Result<(), Failed> {
    join(ctx.process(add, (1, 1)).start()?)??;
    let server = multiproc::forkserver_pid().ok_or("no forkserver after a start")?;
    // Each child the server watches costs it two descriptors (pidfd, status socket).
    let limited = std::process::Command::new("prlimit")
        .args(["--pid", &server.to_string(), "--nofile=24:24"])
        .status()?;
    ensure(limited.success(), || format!("prlimit failed: {limited}"))?;
    let mut running = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..40 {
        match ctx.process(nap, DEADLINE).start() {
            Ok(p) => running.push(p),
            Err(e) => refused.push(e),
        }
    }
    let outcome = (|| {
        ensure(!running.is_empty() && !refused.is_empty(), || {
            format!("{} started, {} refused", running.len(), refused.len())
        })?;
        for e in &refused {
            ensure(e.kind() == multiproc::ErrorKind::StartFailed, || format!("{e:?}"))?;
            ensure(e.to_string().contains("too many open files in the fork server"), || {
                e.to_string()
            })?;
        }
        Ok::<(), Failed>(())
    })();
    for mut p in running.drain(..) {
        p.kill()?;
        let _ = join(p)?;
    }
    outcome?;
    // The same server goes on serving once its children have ended.
    ensure(join(ctx.process(add, (2, 3)).start()?)?? == 5, || "sum".into())?;
    let now = multiproc::forkserver_pid();
    ensure(now == Some(server), || format!("server {now:?}, was {server}"))?;
    eprintln!("{} of 40 starts refused by a forkserver limited to 24 descriptors", refused.len());
    // Leave a server without the limit to the scenarios that follow.
    let server_fd = sys::pidfd_open(server)?;
    sys::pidfd_send_signal(server_fd.as_fd(), libc::SIGKILL)?;
    ensure(wait_gone(server, DEADLINE).is_some(), || "server survived SIGKILL".into())?;
    join(ctx.process(add, (0, 0)).start()?)??;
    ensure(zombie_children().is_empty(), || format!("zombies {:?}", zombie_children()))
}
