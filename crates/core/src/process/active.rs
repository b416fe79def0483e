//! The children this process started that have not ended (Python's `active_children()`): each
//! start records the child's name, pid and method for as long as its handle lives (a
//! `Process`, a pool's worker, a dropped process still running); a lookup leaves out those
//! that have ended.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::runtime::identity::ProcessInfo;
use crate::sys;

static CHILDREN: Mutex<Vec<(u64, ProcessInfo)>> = Mutex::new(Vec::new());

/// A child's entry among the active children; dropping it (with the child's handle) removes
/// the entry.
#[derive(Debug)]
pub(crate) struct Active(u64);

/// Records a child just started, until the returned entry is dropped.
pub(crate) fn record(info: ProcessInfo) -> Active {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner()).push((id, info));
    Active(id)
}

impl Drop for Active {
    fn drop(&mut self) {
        let mut children = CHILDREN.lock().unwrap_or_else(|p| p.into_inner());
        children.retain(|(id, _)| *id != self.0);
    }
}

/// Forgets the entries a forked child copied from its parent: they are its siblings.
pub(crate) fn forget_inherited() {
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

/// The children this process started (processes and pool workers, under every method) that
/// have not ended yet, in the order they started (Python's `multiprocessing.active_children()`,
/// except that it reaps nothing: their handles still report how they ended).
pub fn active_children() -> Vec<ProcessInfo> {
    let children = CHILDREN.lock().unwrap_or_else(|p| p.into_inner()).clone();
    children
        .into_iter()
        .map(|(_, info)| info)
        .filter(|info| !sys::process_ended(info.pid))
        .collect()
}

/// The CPUs a pool uses by default: those this process may run on, within its cgroup's CPU
/// quota (`std::thread::available_parallelism`; Python's `os.process_cpu_count()`, not
/// `os.cpu_count()`, which counts every CPU of the machine). At least 1.
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
