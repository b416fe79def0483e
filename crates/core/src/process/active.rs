//! The children this process started that have not ended (Python's `active_children()`): each
//! start records the child's name, pid and method for as long as its handle lives (a
//! `Process`, a pool's worker, a dropped process still running); a lookup leaves out those
//! that have ended.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::runtime::identity::ProcessInfo;
use crate::sys;

static CHILDREN: Mutex<Children> = Mutex::new(Children { owner: 0, entries: Vec::new() });

/// The entries, and the pid of the process they belong to: a forked child finds its parent's
/// there, and drops them on its first look rather than at its start, so that a child that never
/// starts one of its own writes nothing here (each page a forked child writes is a
/// copy-on-write fault, about 2 µs on the machine we measure on).
struct Children {
    owner: u32,
    entries: Vec<(u64, ProcessInfo)>,
}

/// This process's entries, with those a forked child inherited dropped.
fn children() -> std::sync::MutexGuard<'static, Children> {
    let mut children = CHILDREN.lock().unwrap_or_else(|p| p.into_inner());
    let me = std::process::id();
    if children.owner != me {
        children.owner = me;
        // The siblings' records are the parent's to free; leaking them in this copy of its
        // memory costs nothing and writes nothing.
        std::mem::forget(std::mem::take(&mut children.entries));
    }
    children
}

/// A child's entry among the active children; dropping it (with the child's handle) removes
/// the entry.
#[derive(Debug)]
pub(crate) struct Active(u64);

/// Records a child just started, until the returned entry is dropped.
pub(crate) fn record(info: ProcessInfo) -> Active {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    children().entries.push((id, info));
    Active(id)
}

impl Drop for Active {
    fn drop(&mut self) {
        children().entries.retain(|(id, _)| *id != self.0);
    }
}

/// The children this process started (processes and pool workers, under every method) that
/// have not ended yet, in the order they started (Python's `multiprocessing.active_children()`,
/// except that it reaps nothing: their handles still report how they ended).
pub fn active_children() -> Vec<ProcessInfo> {
    let children = children().entries.clone();
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
