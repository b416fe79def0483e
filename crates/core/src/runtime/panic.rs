//! Panic capture: a panic in a child's task becomes a [`RemotePanic`] (message, location,
//! backtrace) instead of an unwind out of the child runtime.
//!
//! Both the child runtime and the registry's batch runner (which fails only the item that
//! panicked) catch panics here, and the forkserver catches its preload's.

use std::panic::{self, AssertUnwindSafe};
use std::sync::{Mutex, OnceLock};
use std::thread::{self, ThreadId};

use crate::error::RemotePanic;

static TASK_THREAD: OnceLock<ThreadId> = OnceLock::new();
/// A panic hook, as `std::panic::take_hook` returns it.
type Hook = Box<dyn Fn(&panic::PanicHookInfo<'_>) + Sync + Send>;
/// The hook [`install_panic_hook`] found, which ours calls after recording.
static PREVIOUS_HOOK: OnceLock<Hook> = OnceLock::new();
static LAST_PANIC: Mutex<Option<RemotePanic>> = Mutex::new(None);

/// Records the panics of the calling thread (message, location, backtrace) for
/// [`catch_panic`]; the first call wins, later ones do nothing (a forked child inherits its
/// server's hook).
pub fn install_panic_hook() {
    if TASK_THREAD.set(thread::current().id()).is_err() {
        return;
    }
    // Our hook captures nothing and the one it replaces is kept in a static: installing it
    // allocates nothing (a forked child's every allocation touches pages it shares with its
    // parent, each a copy-on-write fault).
    let _ = PREVIOUS_HOOK.set(panic::take_hook());
    panic::set_hook(Box::new(|info| {
        if TASK_THREAD.get() == Some(&thread::current().id()) {
            let panic = RemotePanic {
                message: payload_message(info.payload()),
                location: info
                    .location()
                    .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column())),
                backtrace: std::backtrace::Backtrace::force_capture().to_string(),
            };
            if let Ok(mut slot) = LAST_PANIC.lock() {
                slot.get_or_insert(panic);
            }
        }
        if let Some(previous) = PREVIOUS_HOOK.get() {
            previous(info);
        }
    }));
}

/// The text of a panic payload: the `&str` or `String` that `panic!` made.
fn payload_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "Box<dyn Any>".to_owned())
}

/// Runs `f`, turning a panic into a [`RemotePanic`] with message, location and (when the
/// child runtime's hook is installed on this thread) backtrace.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, RemotePanic> {
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => Ok(value),
        Err(payload) => {
            let recorded = LAST_PANIC.lock().ok().and_then(|mut slot| slot.take());
            let panic = recorded.unwrap_or_else(|| RemotePanic {
                message: payload_message(&*payload),
                location: None,
                backtrace: String::new(),
            });
            // Dropping a panic payload can itself panic; leak it instead (it is small, and a
            // payload is only made by a panic).
            std::mem::forget(payload);
            Err(panic)
        }
    }
}
