//! A forked child's runtime allocates nothing between the fork and the task: every page the
//! allocator touches there (its arena, the heap's chunks) is a copy-on-write fault, a few
//! microseconds each, which a fork start pays on top of a raw fork. This binary counts the
//! allocations made in any process but the one that started it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use multiproc::{Context, task};

/// The test's own process: its allocations are not counted.
static MAIN_PID: AtomicU32 = AtomicU32::new(0);
/// Allocations made in a child (a forked copy of this counter starts from the parent's, which
/// stays 0 because the parent's are not counted).
static CHILD_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// The system allocator, counting the calls made outside the main process.
struct Counting;

// SAFETY: every call is passed to the system allocator unchanged; counting touches only an
// atomic.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn count() {
    let main = MAIN_PID.load(Relaxed);
    if main != 0 && std::process::id() != main {
        CHILD_ALLOCATIONS.fetch_add(1, Relaxed);
    }
}

/// How many allocations this child made before its task began.
#[task]
fn allocations_before_the_task() -> u64 {
    CHILD_ALLOCATIONS.load(Relaxed)
}

/// A fork child says hello, adopts its identity, log level and panic hook, and enters its
/// task without one allocation, for the first child and every later one.
fn a_fork_child_allocates_nothing_before_its_task() -> multiproc::Result<()> {
    MAIN_PID.store(std::process::id(), Relaxed);
    let ctx = Context::new("fork")?;
    for child in 0..3 {
        let mut process = ctx.process(allocations_before_the_task, ()).start()?;
        let allocations = process
            .join_timeout(std::time::Duration::from_secs(30))?
            .unwrap_or_else(|| panic!("child {child} still running after 30 s"));
        assert_eq!(allocations, 0, "child {child} allocated before its task");
    }
    Ok(())
}

multiproc::test_main!(a_fork_child_allocates_nothing_before_its_task);
