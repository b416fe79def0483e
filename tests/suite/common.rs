//! Helpers shared by the scenarios: tasks, deadlines, fd and zombie accounting.

use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use multiproc::{Portable, Process, task};
use multiproc_core::sys::{self, POLLIN, PollFd};

/// The longest any single wait in the suite may take before the test fails instead of hanging.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Turns a failed expectation into a test failure with a message.
pub fn ensure(condition: bool, message: impl FnOnce() -> String) -> Result<(), Failed> {
    if condition { Ok(()) } else { Err(message().into()) }
}

/// Joins with the suite's deadline; a child still running then is killed and reported.
pub fn join<R: Portable>(mut p: Process<R>) -> Result<multiproc::Result<R>, Failed> {
    match p.join_timeout(DEADLINE) {
        Ok(Some(value)) => Ok(Ok(value)),
        Ok(None) => {
            let pid = p.pid();
            let _ = p.kill();
            Err(format!("process {pid} still running after {DEADLINE:?}").into())
        }
        Err(e) => Ok(Err(e)),
    }
}

/// Open descriptors of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|dir| dir.count()).unwrap_or(0)
}

/// Pids of this process's children that are zombies (ended but not reaped); under the mpi
/// context, its agents' too.
pub fn zombie_children() -> Vec<u32> {
    let parents = local_parents();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // Fields after the parenthesised command: state, ppid, ...
            let Some(rest) = stat.rsplit_once(") ").map(|(_, rest)| rest) else {
                return false;
            };
            let mut fields = rest.split_whitespace();
            let state = fields.next();
            let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
            state == Some("Z") && ppid.is_some_and(|ppid| parents.contains(&ppid))
        })
        .collect()
}

/// Waits until process `pid` (not necessarily our child) has ended, or `deadline` passes.
/// Returns how long it took, or `None` on timeout.
pub fn wait_gone(pid: u32, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    let Ok(pidfd) = sys::pidfd_open(pid) else {
        return Some(started.elapsed());
    };
    let mut set = [PollFd::new(std::os::fd::AsFd::as_fd(&pidfd), POLLIN)];
    match sys::poll(&mut set, Some(started + timeout)) {
        Ok(n) if n > 0 => Some(started.elapsed()),
        _ => None,
    }
}

/// Adds two numbers.
#[task]
pub fn add(a: u64, b: u64) -> u64 {
    a + b
}

/// Returns the pid it ran in.
#[task]
pub fn whoami() -> u32 {
    std::process::id()
}

/// Sleeps for `duration`; something to terminate, kill or time out.
#[task]
pub fn nap(duration: Duration) {
    std::thread::sleep(duration)
}

/// Panics with `message`.
#[task]
pub fn explode(message: String) -> u64 {
    panic!("{message}")
}

/// Exits with `code` from inside the task.
#[task]
pub fn quit(code: i32) {
    std::process::exit(code)
}

/// A Unix socket at a temporary path that a child connects to: the test learns from it that
/// the child got somewhere, and decides when the child may go on.
pub struct Gate {
    listener: std::os::unix::net::UnixListener,
    path: std::path::PathBuf,
}

impl Gate {
    /// A gate at a fresh path named after `what`.
    pub fn new(what: &str) -> std::io::Result<Gate> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("multiproc-{what}-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path)?;
        Ok(Gate { listener, path })
    }

    /// Where children connect.
    pub fn path(&self) -> std::path::PathBuf {
        self.path.clone()
    }

    /// The next child's connection, within the suite's deadline.
    pub fn accept(&self) -> Result<std::os::unix::net::UnixStream, Failed> {
        use std::os::fd::AsFd;
        let mut set = [PollFd::new(self.listener.as_fd(), POLLIN)];
        ensure(sys::poll(&mut set, Some(Instant::now() + DEADLINE))? == 1, || {
            format!("nobody came to {} within {DEADLINE:?}", self.path.display())
        })?;
        let (stream, _) = self.listener.accept()?;
        stream.set_read_timeout(Some(DEADLINE))?;
        Ok(stream)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// In a child: connects to the gate at `path`, sends this process's pid, and waits for one
/// byte (or the gate closing) before it returns `value`.
pub fn check_in(path: &std::path::Path, value: u64) -> u64 {
    use std::io::{Read, Write};
    let mut socket = std::os::unix::net::UnixStream::connect(path).expect("connect to gate");
    socket.write_all(&std::process::id().to_le_bytes()).expect("check in");
    let mut byte = [0u8; 1];
    let _ = socket.read(&mut byte);
    value
}

/// Checks in at the gate at `path`, waits for the test's word, then returns `value`.
#[task]
pub fn gated(path: std::path::PathBuf, value: u64) -> u64 {
    check_in(&path, value)
}

/// Reads the pid a child sent with [`check_in`].
pub fn read_pid(stream: &mut std::os::unix::net::UnixStream) -> Result<u32, Failed> {
    use std::io::Read;
    let mut pid = [0u8; 4];
    stream.read_exact(&mut pid)?;
    Ok(u32::from_le_bytes(pid))
}

/// Pids of this process's children that have not ended; under the mpi context, its agents'
/// too.
pub fn living_children() -> Vec<u32> {
    let parents: Vec<String> = local_parents().iter().map(u32::to_string).collect();
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let mut fields = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or("").split(' ');
            let state = fields.next();
            fields.next().is_some_and(|ppid| parents.iter().any(|p| p == ppid))
                && state != Some("Z")
        })
        .collect()
}

/// Starts one process first, so that a forkserver (and its descriptors) exists before a test
/// counts descriptors.
pub fn warm_up(ctx: &multiproc::Context) -> Result<(), Failed> {
    join(ctx.process(add, (0, 0)).start()?)??;
    Ok(())
}

/// One process below this one: its pid, whether it is a zombie, and whether it has children.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descendant {
    pub pid: u32,
    pub zombie: bool,
    pub parent_of_any: bool,
}

/// The processes on this machine whose children are ours: this one, and under the mpi
/// context its node agents (the parents of its workers).
fn local_parents() -> Vec<u32> {
    let parents = vec![std::process::id()];
    #[cfg(feature = "mpi")]
    let parents = {
        let mut parents = parents;
        if std::env::var("MULTIPROC_START_METHOD").is_ok_and(|m| m == "mpi") {
            let host = multiproc_core::sys::host_name();
            let agents = multiproc::mpi::Mpi::new().map(|mpi| mpi.agents()).unwrap_or_default();
            parents.extend(agents.into_iter().filter(|a| a.host == host).map(|a| a.pid));
        }
        parents
    };
    parents
}

/// Every process below this one (children, theirs, and so on; under the mpi context, below
/// its agents), from procfs.
pub fn descendants() -> Vec<Descendant> {
    fn children(pid: u32) -> Vec<u32> {
        // Each thread lists the children it forked.
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
        tasks
            .filter_map(|task| {
                let path = task.ok()?.path().join("children");
                std::fs::read_to_string(path).ok()
            })
            .flat_map(|list| {
                list.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>()
            })
            .collect()
    }
    let zombie = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z'))
    };
    let mut found = Vec::new();
    let mut next: Vec<u32> = local_parents().into_iter().flat_map(children).collect();
    while let Some(pid) = next.pop() {
        let below = children(pid);
        found.push(Descendant { pid, zombie: zombie(pid), parent_of_any: !below.is_empty() });
        next.extend(below);
    }
    found
}
