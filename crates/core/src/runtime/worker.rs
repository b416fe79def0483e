//! The pool worker: the child side of a pool, which builds its state once and then runs
//! batches until its parent closes the channel.
//!
//! The parent side (the engine that feeds workers batches) is in `pool`; the two meet only in
//! the `wire` messages (`WorkerSetup`, `ToWorker`, `BatchDone`) and the results `ring`.

use std::io::Write;
use std::time::Instant;

use crate::runtime::child::{EXIT_FAILED, EXIT_OK, Outcome, call_failure, finish, lookup_failure};
use crate::runtime::panic::catch_panic;
use crate::runtime::registry::{self, State};
use crate::sys;
use crate::transport::channel::{Channel, FrameError};
use crate::transport::codec::{self, Attachments};
use crate::transport::ring::{HOLD_BELOW, MAX_HELD, Ring};
use crate::transport::wire::{self, FailReason, ToParent, ToWorker};

/// The pool worker: builds its state (a panic there is reported like a task's, and ends the
/// worker), says `Ready` (with a results ring if `ring`), then runs batches until the parent closes the channel.
///
/// Within a batch a panic fails only its item ([`registry::run_batch`]), so a worker outlives
/// the panics of the tasks it runs; it ends with `_exit(0)` at end-of-file, after flushing.
pub(super) fn run(
    mut channel: Channel,
    ring: bool,
    make_state: impl FnOnce() -> Result<State, (FailReason, String)>,
) -> ! {
    let state = match catch_panic(make_state) {
        Ok(Ok(state)) => state,
        Ok(Err((reason, message))) => finish(&channel, Outcome::Failed(reason, message)),
        Err(panic) => finish(&channel, Outcome::Panicked(panic)),
    };
    // The ring for results held back (see `pool::ring`) travels with `Ready`; without one
    // (it could not be made, or the channel carries no descriptors), every result goes to the
    // socket.
    let mut ring = if ring { Ring::create().ok() } else { None };
    let ring_fd: Vec<_> = ring.iter().map(Ring::fd).collect();
    if wire::send(&channel, &ToParent::Ready, &[], &ring_fd, &[], None, None).is_err() {
        sys::exit_immediately(EXIT_FAILED);
    }
    drop(ring_fd);
    // Waits for the next task sleep at once (see `Channel::set_spins`).
    channel.set_spins(false);
    let mut out = Vec::new();
    let mut held = 0;
    loop {
        let mut frame = match channel.recv(None, None) {
            Ok(frame) => frame,
            Err(FrameError::Disconnected) => {
                let _ = std::io::stdout().flush();
                let _ = std::io::stderr().flush();
                sys::exit_immediately(EXIT_OK)
            }
            Err(_) => sys::exit_immediately(EXIT_FAILED),
        };
        let fds = std::mem::take(&mut frame.fds);
        let blocks = std::mem::take(&mut frame.blocks);
        let (ToWorker::Batch { id, task }, args) = match wire::decode::<ToWorker>(&frame) {
            Ok(decoded) => decoded,
            Err(e) => finish(
                &channel,
                Outcome::Failed(FailReason::Protocol, format!("batch frame did not decode: {e}")),
            ),
        };
        out.clear();
        let started = Instant::now();
        let (reply, attachments) = codec::collecting(|| match registry::lookup(&task) {
            Ok(entry) => {
                let run = || (entry.run_batch)(&*state, args, &mut out);
                match codec::with_attachments(fds, blocks, run) {
                    Ok(()) => ToParent::BatchDone { id },
                    Err(e) => ToParent::BatchFailed {
                        id,
                        reason: call_failure(&e),
                        message: e.to_string(),
                    },
                }
            }
            Err(e) => {
                ToParent::BatchFailed { id, reason: lookup_failure(&e), message: e.to_string() }
            }
        });
        // The batch's results travel as one message, so together they must fit one.
        let (reply, attachments) = match attachments.check_fits_one_message() {
            Err(e) if matches!(reply, ToParent::BatchDone { .. }) => {
                let reason = FailReason::ResultUnencodable;
                let message = format!("the batch's results: {e}");
                (ToParent::BatchFailed { id, reason, message }, Attachments::default())
            }
            _ => (reply, attachments),
        };
        let payload: &[u8] = if matches!(reply, ToParent::BatchDone { .. }) { &out } else { &[] };
        let head = wire::head(&reply).unwrap_or_else(|_| sys::exit_immediately(EXIT_FAILED));
        // Held back while the next batch is already here and this one was quick: the result
        // of the last batch at hand goes to the socket and wakes the parent.
        let hold = held < MAX_HELD
            && started.elapsed() < HOLD_BELOW
            && attachments.fds.is_empty()
            && attachments.blocks.is_empty()
            && channel.has_buffered_frame();
        if hold && ring.as_mut().is_some_and(|ring| ring.push(&[&head, payload])) {
            held += 1;
            continue;
        }
        held = 0;
        let out_fds = attachments.borrowed_fds();
        let sent = channel.send(&[&head, payload], &out_fds, &attachments.blocks, None, None);
        if sent.is_err() {
            sys::exit_immediately(EXIT_FAILED);
        }
    }
}
