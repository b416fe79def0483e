//! Introspection under the start method being tested: `current_process()` and
//! `parent_process()` inside a task, `active_children()` and `cpu_count()` in the parent.

use std::time::Duration;

use libtest_mimic::Failed;
use multiproc::{Context, Event, ProcessInfo, task};

use crate::Scenario;
use crate::common::{DEADLINE, ensure, join, nap};

pub const SCENARIOS: &[Scenario] = &[
    ("introspect_a_task_knows_its_process_and_its_parent", current_and_parent),
    ("introspect_a_child_sees_its_parent_end_through_the_sentinel", watches_parent),
    ("introspect_active_children_lists_the_running_ones", active),
    ("introspect_a_child_lists_its_own_children_not_its_siblings", own_children),
    ("introspect_cpu_count_follows_the_affinity_mask", cpus),
];

/// What the task sees of itself and of its parent.
#[task]
fn who() -> (ProcessInfo, Option<(u32, bool)>) {
    let parent = multiproc::parent_process().map(|p| (p.pid(), p.is_alive()));
    (multiproc::current_process(), parent)
}

fn current_and_parent(ctx: &Context) -> Result<(), Failed> {
    let child = ctx.process(who, ()).name("introspected").start()?;
    let pid = child.pid();
    let (me, parent) = join(child)??;
    let expected = ProcessInfo {
        name: "introspected".into(),
        pid,
        start_method: Some(ctx.start_method().into()),
        daemon: false,
    };
    ensure(me == expected, || format!("the child saw {me:?}"))?;
    ensure(parent == Some((std::process::id(), true)), || format!("its parent: {parent:?}"))?;
    let here = multiproc::current_process();
    ensure(here.name == "MainProcess" && here.start_method.is_none(), || format!("{here:?}"))?;
    ensure(multiproc::parent_process().is_none(), || "a parent outside a task".into())?;
    let pool = ctx.pool().processes(1).build()?;
    let (worker, _) = pool.apply(who, ())?;
    ensure(worker.name.starts_with("PoolWorker-") && worker.daemon, || format!("{worker:?}"))?;
    ensure(worker.start_method == Some(ctx.start_method().into()), || format!("{worker:?}"))
}

/// Waits (within the deadline) for its parent to end, then sets `gone`.
#[task]
fn watch_parent(gone: Event) {
    let parent = multiproc::parent_process().expect("a parent");
    if parent.wait_timeout(Duration::from_secs(60)) {
        gone.set();
    }
}

/// Starts a watcher of itself under `method`, and returns at once (ending this process).
#[task]
fn start_watcher(method: String, gone: Event) -> u32 {
    let ctx = Context::new(&method).expect("the method");
    let watcher = ctx.process(watch_parent, gone).start().expect("the watcher");
    let pid = watcher.pid();
    // Not joined: it outlives this process, as a child that watches its parent does.
    std::mem::forget(watcher);
    pid
}

fn watches_parent(ctx: &Context) -> Result<(), Failed> {
    let gone = ctx.event()?;
    let middle = ctx.process(start_watcher, (ctx.start_method().to_owned(), gone.try_clone()?));
    join(middle.start()?)??;
    ensure(gone.wait_timeout(DEADLINE)?, || "the watcher never saw its parent end".into())
}

fn active(ctx: &Context) -> Result<(), Failed> {
    let children = (0..2)
        .map(|_| ctx.process(nap, DEADLINE).start())
        .collect::<multiproc::Result<Vec<_>>>()?;
    let pids: Vec<u32> = children.iter().map(|c| c.pid()).collect();
    let listed = |pids: &[u32]| {
        let active = multiproc::active_children();
        pids.iter().filter(|pid| active.iter().any(|c| c.pid == **pid)).count()
    };
    ensure(listed(&pids) == 2, || format!("{:?} while both ran", multiproc::active_children()))?;
    for mut child in children {
        child.kill()?;
        let _ = child.join();
    }
    ensure(listed(&pids) == 0, || format!("{:?} after both ended", multiproc::active_children()))
}

/// The pids this task sees among its active children: none, then the one it started.
#[task]
fn children_seen(method: String) -> (Vec<u32>, Vec<u32>, u32) {
    let pids = || multiproc::active_children().iter().map(|c| c.pid).collect::<Vec<_>>();
    let before = pids();
    let ctx = Context::new(&method).expect("the method");
    let mut own = ctx.process(nap, DEADLINE).start().expect("a grandchild");
    let during = pids();
    let pid = own.pid();
    own.kill().expect("kill the grandchild");
    let _ = own.join();
    (before, during, pid)
}

/// A forked child's memory holds its parent's list of children: it must not take them for
/// its own.
fn own_children(ctx: &Context) -> Result<(), Failed> {
    let mut sibling = ctx.process(nap, DEADLINE).start()?;
    let seen = ctx.process(children_seen, ctx.start_method().to_owned()).start()?;
    let (before, during, pid) = join(seen)??;
    sibling.kill()?;
    let _ = sibling.join();
    ensure(before.is_empty(), || format!("the child listed {before:?} before it started any"))?;
    ensure(during == [pid], || format!("the child listed {during:?}, its own child is {pid}"))
}

fn cpus(_ctx: &Context) -> Result<(), Failed> {
    use multiproc_core::sys;
    let all = sys::cpu_affinity()?;
    let count = multiproc::cpu_count();
    ensure((1..=all.len()).contains(&count), || format!("{count} CPUs of {} allowed", all.len()))?;
    sys::set_cpu_affinity(&all[..1])?;
    let pinned = multiproc::cpu_count();
    sys::set_cpu_affinity(&all)?;
    ensure(pinned == 1, || format!("{pinned} CPUs with one allowed"))
}
