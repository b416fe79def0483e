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
    warm_up, zombie_children,
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
    ("spares_are_kept_idle_configurable_and_let_go", spares_kept),
    ("a_spare_child_is_one_forked_on_request", spare_is_fresh),
    ("a_killed_spare_is_replaced_and_starts_go_on", killed_spare),
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
    open_fds_here()
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

/// The server's children that have not ended (with no task running: its spares).
fn server_children(server: u32) -> Vec<u32> {
    let list = std::fs::read_to_string(format!("/proc/{server}/task/{server}/children"));
    list.unwrap_or_default()
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
        .collect()
}

/// Waits (within the suite's deadline) until the server has exactly `count` spares, and
/// returns their pids.
fn await_spares(server: u32, count: usize) -> Result<Vec<u32>, Failed> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let now = server_children(server);
        if now.len() == count {
            return Ok(now);
        }
        if Instant::now() >= deadline {
            return Err(format!("server {server} has spares {now:?}, not {count}").into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `(state, voluntary context switches, utime + stime in ticks)` of `pid`.
fn activity(pid: u32) -> Result<(String, u64, u64), Failed> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or("").to_owned()
    };
    let switches = field("voluntary_ctxt_switches:").parse().unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3 of stat, utime 14 and stime 15.
    let ticks = fields.get(11).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
    Ok((field("State:"), switches, ticks))
}

fn spares_kept(ctx: &Context) -> Result<(), Failed> {
    let outcome = (|| {
        multiproc::set_forkserver_spares(3)?;
        warm_up(ctx)?;
        let server = multiproc::forkserver_pid().ok_or("no forkserver")?;
        let spares = await_spares(server, 3)?;
        // Once each has reached its read (a new one runs a moment first), idle spares sleep:
        // over a quarter of a second, none wakes or runs.
        for &pid in &spares {
            let deadline = Instant::now() + DEADLINE;
            while !activity(pid)?.0.starts_with('S') {
                ensure(Instant::now() < deadline, || format!("spare {pid} never sleeps"))?;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let before: Vec<_> = spares.iter().map(|&pid| activity(pid)).collect::<Result<_, _>>()?;
        std::thread::sleep(Duration::from_millis(250));
        let after: Vec<_> = spares.iter().map(|&pid| activity(pid)).collect::<Result<_, _>>()?;
        for ((pid, was), now) in spares.iter().zip(&before).zip(&after) {
            ensure(now.0.starts_with('S'), || format!("spare {pid} is {}", now.0))?;
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))?;
            ensure(name.trim_end() == "multiproc-spare", || format!("spare {pid} is {name:?}"))?;
            ensure(was.1 == now.1 && was.2 == now.2, || {
                format!("idle spare {pid} ran: {was:?} then {now:?}")
            })?;
        }
        // 0 lets them go: they exit, and the server reaps them.
        multiproc::set_forkserver_spares(0)?;
        await_spares(server, 0)?;
        for pid in spares {
            ensure(wait_gone(pid, DEADLINE).is_some(), || format!("spare {pid} still exists"))?;
        }
        // And starts still work without any.
        let sum = join(ctx.process(add, (2, 3)).start()?)??;
        ensure(sum == 5, || format!("2 + 3 = {sum} without spares"))?;
        ensure(multiproc::forkserver_pid() == Some(server), || "the server was replaced".into())
    })();
    multiproc::set_forkserver_spares(multiproc::DEFAULT_FORKSERVER_SPARES)?;
    outcome
}

/// What a child sees of where it runs: its directory, one variable, its name and which
/// signals it ignores and blocks, its descriptors beside stdio, and its parent.
#[task]
fn surroundings(var: String) -> (std::path::PathBuf, Option<String>, String, Vec<String>, u32) {
    let cwd = std::env::current_dir().expect("current_dir");
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let signals: Vec<&str> = status
        .lines()
        .filter(|l| ["Name:", "SigIgn:", "SigBlk:"].iter().any(|k| l.starts_with(k)))
        .collect();
    (
        cwd,
        std::env::var(&var).ok(),
        signals.join(" "),
        open_fds_here(),
        std::os::unix::process::parent_id(),
    )
}

/// The descriptors open in this process above stderr, but for the directory listing them.
fn open_fds_here() -> Vec<String> {
    let entries: Vec<_> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| dir.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    entries
        .iter()
        .filter_map(|path| {
            let number: i32 = path.file_name()?.to_str()?.parse().ok()?;
            let target = std::fs::read_link(path).ok()?;
            (number > 2 && !target.starts_with("/proc"))
                .then(|| target.to_string_lossy().into_owned())
        })
        .collect()
}

fn spare_is_fresh(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let server = multiproc::forkserver_pid().ok_or("no forkserver")?;
    // The spares exist before the directory and environment change below.
    let spares = await_spares(server, multiproc::DEFAULT_FORKSERVER_SPARES as usize)?;
    let home = std::env::current_dir()?;
    let dir = std::env::temp_dir().join(format!("multiproc-spare-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    let var = format!("MULTIPROC_SUITE_SPARE_{}", std::process::id());
    std::env::set_current_dir(&dir)?;
    let mut vars: Vec<_> = std::env::vars_os().collect();
    vars.push((var.clone().into(), "set after the spares".into()));
    sys::replace_environment(&vars)?;
    let seen = ctx.process(surroundings, var.clone()).start().map_err(Failed::from).and_then(|p| {
        let pid = p.pid();
        join(p)?.map(|seen| (pid, seen)).map_err(Failed::from)
    });
    // The same, forked on request, to compare with.
    let fresh = multiproc::set_forkserver_spares(0).map_err(Failed::from).and_then(|()| {
        await_spares(server, 0)?;
        join(ctx.process(surroundings, var.clone()).start()?)?.map_err(Failed::from)
    });
    std::env::set_current_dir(&home)?;
    vars.retain(|(key, _)| key.to_str() != Some(var.as_str()));
    sys::replace_environment(&vars)?;
    let _ = std::fs::remove_dir(&dir);
    multiproc::set_forkserver_spares(multiproc::DEFAULT_FORKSERVER_SPARES)?;
    let (pid, (cwd, value, signals, fds, parent)) = seen?;
    ensure(spares.contains(&pid), || format!("child {pid} was not one of the spares {spares:?}"))?;
    ensure(cwd == dir, || format!("the spare ran in {}, not {}", cwd.display(), dir.display()))?;
    ensure(value.as_deref() == Some("set after the spares"), || format!("it saw {value:?}"))?;
    ensure(fds.len() == 1 && fds[0].starts_with("socket:"), || format!("it holds {fds:?}"))?;
    ensure(parent == server, || format!("its parent is {parent}, not the server {server}"))?;
    let (fresh_cwd, fresh_value, fresh_signals, fresh_fds, _) = fresh?;
    ensure(fresh_cwd == cwd && fresh_value == value, || "a fresh fork sees otherwise".into())?;
    // No standard signal (1 to 31) ignored, SIGINT among them, which the server ignores; the
    // bits above are glibc's own.
    let ignored = signals
        .split_whitespace()
        .skip_while(|word| *word != "SigIgn:")
        .nth(1)
        .and_then(|mask| u64::from_str_radix(mask, 16).ok());
    ensure(signals == fresh_signals && ignored.is_some_and(|m| m & 0x7fff_ffff == 0), || {
        format!("signals: spare {signals:?}, fresh {fresh_signals:?}")
    })?;
    ensure(fresh_fds.len() == fds.len(), || format!("fds: spare {fds:?}, fresh {fresh_fds:?}"))
}

fn killed_spare(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let server = multiproc::forkserver_pid().ok_or("no forkserver")?;
    let wanted = multiproc::DEFAULT_FORKSERVER_SPARES as usize;
    let spares = await_spares(server, wanted)?;
    let victim = sys::pidfd_open(spares[0])?;
    sys::pidfd_send_signal(victim.as_fd(), libc::SIGKILL)?;
    ensure(wait_gone(spares[0], DEADLINE).is_some(), || "the killed spare is still there".into())?;
    for i in 0..5 {
        let sum = join(ctx.process(add, (i, 1)).start()?)??;
        ensure(sum == i + 1, || format!("start {i} after a spare was killed gave {sum}"))?;
    }
    let now = await_spares(server, wanted)?;
    ensure(!now.contains(&spares[0]), || format!("the dead spare is listed: {now:?}"))?;
    ensure(multiproc::forkserver_pid() == Some(server), || "the server was replaced".into())
}
