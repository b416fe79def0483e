//! The child runtime: what every child process runs, whichever start method made it.
//!
//! A child says hello (protocol version, executable fingerprint, pid), gets its task (read from
//! the channel, or already in memory after a fork), runs it under `catch_unwind` with a panic
//! hook that records message, location and backtrace, sends back what happened, and ends with
//! `_exit`. Ending with `_exit` matters after a fork: the child must never return into, or
//! unwind through, the stack frames it copied from its parent.

use std::convert::Infallible;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{ErrorKind, RemotePanic};
use crate::runtime::panic::{catch_panic, install_panic_hook};
use crate::runtime::registry::{self, CallError};
use crate::runtime::role::Role;
use crate::runtime::worker;
use crate::shared::arriving::ArrivingMemory;
use crate::sys::{self, POLLRDHUP, PollFd};
use crate::transport::channel::{Channel, FrameError};
use crate::transport::codec::{self, Attachments};
use crate::transport::wire::{self, FailReason, PROTOCOL_VERSION, Start, ToParent};

/// Exit code of a child whose task returned.
pub const EXIT_OK: i32 = 0;
/// Exit code of a child whose task panicked or could not run (as Python's uncaught exception).
pub const EXIT_FAILED: i32 = 1;
/// Exit code of a daemon child that ended because its parent went away.
pub const EXIT_ORPHANED: i32 = 121;

/// How often a daemon child checks that its parent is still there.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);

// linkme's `#[link_section]` trips the unsafe_code lint; no unsafe operation is involved.
#[allow(unsafe_code)]
#[linkme::distributed_slice(crate::runtime::role::ROLES)]
static CHILD_ROLE: Role = Role { name: "child", main: serve_inherited };

fn serve_inherited(socket: OwnedFd) -> ! {
    serve(Channel::from_fd(socket))
}

/// The executable fingerprint of this process, computed once.
pub fn fingerprint() -> u64 {
    static FINGERPRINT: OnceLock<u64> = OnceLock::new();
    *FINGERPRINT.get_or_init(|| sys::executable_fingerprint().unwrap_or(0))
}

/// Sets up, in a process about to fork, the state that every child runtime would otherwise
/// set up in its own copy: the task index, the calling thread's handle, the codec's
/// thread-local tables (whose destructors are registered on first use), stdout's buffer.
///
/// A forked child shares its parent's memory only until it writes to it. Each of these, done
/// first in the child, cost it page faults (copies of the pages it wrote, lazy symbol binding
/// inside libc, the registry's hash map): about fifteen per child, each some microseconds on a
/// virtual machine. Done once here, they cost every later child nothing.
pub fn warm_up() {
    registry::build_index_now();
    let _ = thread::current();
    codec::warm_up();
    let _ = std::io::stdout();
}

/// What the task did, ready to be sent.
pub(super) enum Outcome {
    /// The encoded value and what travels beside it.
    Returned(Vec<u8>, Attachments),
    Panicked(RemotePanic),
    Failed(FailReason, String),
}

/// Entry point of a child that gets its task over the channel (spawn, forkserver).
pub fn serve(channel: Channel) -> ! {
    with_start(channel, |channel, mut start, args, fds, blocks| {
        if let Some(setup) = start.worker.take() {
            prepare(&mut start, &channel);
            let initializer = setup.initializer;
            let in_memory = setup.args_in_memory;
            // Arguments in memory arrive while we read them: the channel, which hangs up if the
            // parent writing them dies, says when to stop waiting.
            let parent = in_memory.then(|| channel.as_fd().try_clone_to_owned());
            worker::run(channel, setup.ring, move || match initializer {
                Some(name) => {
                    let entry =
                        registry::lookup(&name).map_err(|e| (lookup_failure(&e), e.to_string()))?;
                    let make_state = || {
                        let Some(parent) = parent else {
                            return (entry.make_state)(codec::Input::whole(args));
                        };
                        let parent = parent.map_err(|e| {
                            registry::CallError::State(format!("dup of the channel: {e}"))
                        })?;
                        let memory: ArrivingMemory =
                            codec::decode(args).map_err(registry::CallError::Args)?;
                        let reader = memory.reader(parent.as_fd()).map_err(|e| {
                            registry::CallError::Args(codec::CodecError::new(e.to_string()))
                        })?;
                        (entry.make_state)(reader.input())
                    };
                    codec::with_attachments(fds, blocks, make_state)
                        .map_err(|e| (call_failure(&e), e.to_string()))
                }
                None => Ok(Box::new(())),
            })
        }
        run_sent(channel, start, args, fds, blocks)
    })
}

/// Entry point of a pool worker forked by its pool's template: it reads its `Start` from the
/// channel, but its state is made by `make_state`, from the initializer and arguments the
/// template holds in memory.
pub fn serve_template_worker(
    channel: Channel,
    make_state: impl FnOnce() -> Result<registry::State, CallError>,
) -> ! {
    with_start(channel, |channel, mut start, _, _, _| {
        if start.worker.is_none() {
            let why = "a pool template's child was sent a task, not a worker's setup".to_owned();
            finish(&channel, Outcome::Failed(FailReason::Protocol, why));
        }
        prepare(&mut start, &channel);
        let ring = start.worker.as_ref().is_some_and(|setup| setup.ring);
        worker::run(channel, ring, || make_state().map_err(|e| (call_failure(&e), e.to_string())))
    })
}

/// Says hello, reads the `Start` frame, checks the handshake, and hands the rest to `then`:
/// the channel, the message, the encoded arguments and what travels beside them.
fn with_start(
    mut channel: Channel,
    then: impl FnOnce(Channel, Start, &[u8], Vec<OwnedFd>, Vec<Vec<u8>>) -> Infallible,
) -> ! {
    // A parent that has already exited cannot hear the hello, but its task may be in the
    // channel already (written before we existed): a non-daemon child runs it anyway, as it
    // would had the parent lived, and a daemon follows its parent once it has read the `Start`.
    say_hello_or_exit(&channel);
    let mut frame = match channel.recv(None, None) {
        Ok(frame) => frame,
        // The parent went away before telling us what to do: nothing to report, nobody to
        // report it to.
        Err(FrameError::Disconnected) => sys::exit_immediately(EXIT_FAILED),
        Err(e) => finish(&channel, Outcome::Failed(FailReason::Protocol, format!("{e}"))),
    };
    let fds = std::mem::take(&mut frame.fds);
    let blocks = std::mem::take(&mut frame.blocks);
    let (start, args) = match wire::decode::<Start>(&frame) {
        Ok(decoded) => decoded,
        Err(e) => finish(
            &channel,
            Outcome::Failed(FailReason::Protocol, format!("start frame did not decode: {e}")),
        ),
    };
    if let Some(failure) = check_handshake(&start) {
        finish(&channel, failure);
    }
    let mut fds = fds;
    let taken = start.setup.as_ref().map_or(0, wire::Setup::fd_count);
    if fds.len() < taken {
        let why = format!("the setup takes {taken} descriptors, {} came", fds.len());
        finish(&channel, Outcome::Failed(FailReason::Protocol, why));
    }
    let rest = fds.split_off(taken);
    set_up(&start, fds, &channel);
    match then(channel, start, args, rest, blocks) {}
}

/// Applies the `Start`'s setup, whose streams take `fds`; a child that cannot is ended with
/// the reason.
fn set_up(start: &Start, fds: Vec<OwnedFd>, channel: &Channel) {
    if let Some(setup) = &start.setup
        && let Err(why) = crate::runtime::setup::apply(setup, fds)
    {
        finish(channel, Outcome::Failed(FailReason::Setup, why));
    }
}

/// Runs a task sent by name with its arguments, and ends the process.
fn run_sent(
    channel: Channel,
    mut start: Start,
    args: &[u8],
    fds: Vec<OwnedFd>,
    blocks: Vec<Vec<u8>>,
) -> ! {
    let entry = match registry::lookup(&start.task) {
        Ok(entry) => entry,
        Err(e) => finish(&channel, Outcome::Failed(lookup_failure(&e), e.to_string())),
    };
    prepare(&mut start, &channel);
    let outcome =
        run_guarded(&start, || codec::with_attachments(fds, blocks, || (entry.run)(&(), args)));
    finish(&channel, outcome)
}

/// The wire's reason for a failed registry lookup.
pub(super) fn lookup_failure(error: &crate::Error) -> FailReason {
    match error.kind() {
        ErrorKind::DuplicateTask => FailReason::DuplicateTask,
        _ => FailReason::UnknownTask,
    }
}

/// Entry point of a forked child whose task and arguments are already in memory (fork).
pub fn run_moved(
    channel: Channel,
    mut start: Start,
    setup_fds: Vec<OwnedFd>,
    call: impl FnOnce() -> Result<Vec<u8>, CallError>,
) -> ! {
    // The task is in memory: it runs whether or not the parent is still there to hear the
    // hello (see `serve`); a daemon follows its parent from `prepare` on.
    say_hello_or_exit(&channel);
    set_up(&start, setup_fds, &channel);
    prepare(&mut start, &channel);
    let outcome = run_guarded(&start, call);
    finish(&channel, outcome)
}

/// Says hello; a parent that is gone already is no reason to stop (see [`serve`]), but a
/// channel that does not work at all is.
fn say_hello_or_exit(channel: &Channel) {
    match say_hello(channel) {
        Ok(()) | Err(wire::SendError::Frame(FrameError::Disconnected)) => {}
        Err(_) => sys::exit_immediately(EXIT_FAILED),
    }
}

fn say_hello(channel: &Channel) -> Result<(), wire::SendError> {
    let hello = ToParent::Hello {
        version: PROTOCOL_VERSION,
        fingerprint: fingerprint(),
        pid: std::process::id(),
    };
    wire::send(channel, &hello, &[], &[], &[], None, None)
}

/// The child's side of the handshake: refuse a parent of another version or executable.
fn check_handshake(start: &Start) -> Option<Outcome> {
    if start.version != PROTOCOL_VERSION {
        return Some(Outcome::Failed(
            FailReason::VersionMismatch,
            format!("protocol version {}, expected {PROTOCOL_VERSION}", start.version),
        ));
    }
    if start.fingerprint != fingerprint() {
        return Some(Outcome::Failed(
            FailReason::FingerprintMismatch,
            format!(
                "parent executable fingerprint {:016x} differs from the child's {:016x}: \
                 parent and child are different builds",
                start.fingerprint,
                fingerprint()
            ),
        ));
    }
    None
}

/// Adopts the parent's settings: log level, panic capture, and (for a daemon) the watch that
/// ends the child when its parent goes away.
fn prepare(start: &mut Start, channel: &Channel) {
    crate::runtime::identity::adopt(start);
    crate::runtime::log::adopt(start.log.as_deref());
    install_panic_hook();
    if start.daemon {
        watch_parent(channel);
    }
}

/// Starts a thread that ends this (daemon) child within [`WATCH_INTERVAL`] of its parent
/// going away: the parent's end of the channel closes (`POLLRDHUP`), or we are re-parented.
fn watch_parent(channel: &Channel) {
    let Ok(socket) = channel.as_fd().try_clone_to_owned() else {
        return;
    };
    let parent = sys::parent_pid();
    let _ = thread::Builder::new().name("multiproc-parent-watch".into()).spawn(move || {
        loop {
            let mut set = [PollFd::new(socket.as_fd(), POLLRDHUP)];
            let _ = sys::poll(&mut set, Some(Instant::now() + WATCH_INTERVAL));
            if set[0].ready(POLLRDHUP) || sys::parent_pid() != parent {
                sys::exit_immediately(EXIT_ORPHANED);
            }
        }
    });
}

fn run_guarded(start: &Start, call: impl FnOnce() -> Result<Vec<u8>, CallError>) -> Outcome {
    // The name moved to this process's identity (see `prepare`); the span reads it back only
    // when it is enabled.
    let span = tracing::debug_span!(
        "child",
        pid = std::process::id(),
        name = %crate::runtime::identity::current_process().name
    );
    let _entered = span.enter();
    tracing::debug!(task = %start.task, "running task");
    match codec::collecting(|| catch_panic(call)) {
        (Ok(Ok(bytes)), attachments) => match attachments.check_fits_one_message() {
            Ok(()) => Outcome::Returned(bytes, attachments),
            Err(e) => Outcome::Failed(FailReason::ResultUnencodable, format!("{e}")),
        },
        (Ok(Err(error)), _) => Outcome::Failed(call_failure(&error), error.to_string()),
        (Err(panic), _) => Outcome::Panicked(panic),
    }
}

/// The wire's reason for a failed type-erased call.
pub(super) fn call_failure(error: &CallError) -> FailReason {
    match error {
        CallError::Args(_) => FailReason::ArgsUndecodable,
        CallError::Result(_) => FailReason::ResultUnencodable,
        CallError::State(_) => FailReason::Protocol,
    }
}

/// Sends the outcome, flushes stdio and ends the process.
pub(super) fn finish(channel: &Channel, outcome: Outcome) -> ! {
    let (message, payload, attachments, code) = match outcome {
        Outcome::Returned(bytes, attachments) => (ToParent::Returned, bytes, attachments, EXIT_OK),
        Outcome::Panicked(panic) => {
            (ToParent::Panicked(panic), Vec::new(), Attachments::default(), EXIT_FAILED)
        }
        Outcome::Failed(reason, message) => {
            (ToParent::Failed { reason, message }, Vec::new(), Attachments::default(), EXIT_FAILED)
        }
    };
    let fds = attachments.borrowed_fds();
    // A parent that is gone cannot be told; the exit code still says what happened.
    let _ = wire::send(channel, &message, &payload, &fds, &attachments.blocks, None, None);
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    sys::exit_immediately(code)
}
