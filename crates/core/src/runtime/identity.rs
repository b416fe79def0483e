//! Who this process is (Python's `current_process()` and `parent_process()`): a child learns
//! its name, start method, daemon flag and parent from its `Start` message; any other process
//! is the `MainProcess`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use crate::sys::{self, POLLIN, PollFd};
use crate::transport::wire::Start;

/// What is known of a process: this one ([`current_process`]), or a child from
/// `active_children()`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessInfo {
    /// Its name (`Process-N`, `PoolWorker-N`, the name given to the builder; `MainProcess`
    /// for a process multiproc did not start).
    pub name: String,
    /// Its pid.
    pub pid: u32,
    /// The start method that made it (`None` for a process multiproc did not start).
    pub start_method: Option<String>,
    /// Whether it is a daemon (pool workers are).
    pub daemon: bool,
}

/// This child's identity and its parent's pid, from its `Start`.
struct Identity {
    name: String,
    start_method: String,
    daemon: bool,
    parent: u32,
}

/// Set by each child for itself: a child forked from a child inherits its parent's, and
/// replaces it.
static IDENTITY: RwLock<Option<Identity>> = RwLock::new(None);

fn identity() -> std::sync::RwLockReadGuard<'static, Option<Identity>> {
    IDENTITY.read().unwrap_or_else(|p| p.into_inner())
}

/// Takes this child's identity from its `Start`, moving its name and start method out (they
/// are left empty there): a forked child allocates nothing for them.
pub(crate) fn adopt(start: &mut Start) {
    *IDENTITY.write().unwrap_or_else(|p| p.into_inner()) = Some(Identity {
        name: std::mem::take(&mut start.name),
        start_method: std::mem::take(&mut start.method),
        daemon: start.daemon,
        parent: start.parent_pid,
    });
}

/// This process: inside a task, the child running it (its name, pid, start method and
/// whether it is a daemon); anywhere else, `MainProcess`.
///
/// ```
/// let me = multiproc_core::current_process();
/// assert_eq!((me.name.as_str(), me.start_method), ("MainProcess", None));
/// ```
pub fn current_process() -> ProcessInfo {
    let pid = std::process::id();
    match &*identity() {
        Some(identity) => ProcessInfo {
            name: identity.name.clone(),
            pid,
            start_method: Some(identity.start_method.clone()),
            daemon: identity.daemon,
        },
        None => ProcessInfo { name: "MainProcess".into(), pid, start_method: None, daemon: false },
    }
}

/// The process that started this one, inside a task (`None` elsewhere); under forkserver the
/// process that asked for the child, not the server that forked it.
///
/// Its [`sentinel`](ParentProcess::sentinel) becomes readable when the parent ends, so a
/// child can watch its parent (with `multiproc::wait`, or its own poll); a parent that
/// has ended by the time this is called is reported with `is_alive() == false`.
pub fn parent_process() -> Option<ParentProcess> {
    let pid = identity().as_ref()?.parent;
    let pidfd = sys::pidfd_open(pid).ok();
    Some(ParentProcess { pid, pidfd })
}

/// The parent of this child ([`parent_process`]).
#[derive(Debug)]
pub struct ParentProcess {
    pid: u32,
    /// `None`: it had ended already (no such process) when looked up.
    pidfd: Option<OwnedFd>,
}

impl ParentProcess {
    /// The parent's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the parent is still running.
    pub fn is_alive(&self) -> bool {
        !self.wait_until(Some(Instant::now()))
    }

    /// Waits at most `timeout` for the parent to end; whether it did.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.wait_until(Instant::now().checked_add(timeout))
    }

    fn wait_until(&self, deadline: Option<Instant>) -> bool {
        let Some(pidfd) = &self.pidfd else { return true };
        let mut set = [PollFd::new(pidfd.as_fd(), POLLIN)];
        sys::poll(&mut set, deadline).map_or(true, |ready| ready > 0)
    }

    /// A descriptor that becomes readable when the parent ends (its pidfd); `None` if it had
    /// ended before [`parent_process`] looked.
    pub fn sentinel(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_ref().map(AsFd::as_fd)
    }
}
