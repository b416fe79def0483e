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

/// Pids of this process's children that are zombies (ended but not reaped).
pub fn zombie_children() -> Vec<u32> {
    let me = std::process::id();
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
            state == Some("Z") && ppid == Some(me)
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
