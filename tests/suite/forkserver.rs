//! Forkserver-only scenarios: busy threads in the caller, a killed server, no reachable
//! address, and the server following its parent out.

use std::io::Read;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use multiproc::{Context, task};
use multiproc_core::sys::{self, POLLIN, PollFd};

use crate::Scenario;
use crate::common::{DEADLINE, add, ensure, fd_count, join, nap, wait_gone, zombie_children};

pub const SCENARIOS: &[Scenario] = &[
    ("starts_1000_times_beside_16_busy_threads", busy_threads),
    ("killed_server_is_replaced_and_its_children_report", killed_server),
    ("server_has_no_socket_address", no_socket_address),
    ("server_and_daemons_follow_a_killed_parent", follows_killed_parent),
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
