//! The child's side of the wire protocol, driven by hand: what a child does with a task name
//! it does not know, a parent of another build, or a start frame that does not decode. Only for
//! start methods that send the task over the channel (fork moves it in memory).

use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use multiproc::Context;
use multiproc_core::runtime::child;
use multiproc_core::transport::channel::Channel;
use multiproc_core::transport::wire::{self, FailReason, PROTOCOL_VERSION, Start, ToParent};
use multiproc_core::{ChildHandle, ExitStatus, Payload, StartRequest};

use crate::Scenario;
use crate::common::{DEADLINE, ensure};

pub const SCENARIOS: &[Scenario] = &[
    ("child_refuses_unknown_task", child_refuses_unknown_task),
    ("child_refuses_another_build", child_refuses_another_build),
    ("child_refuses_a_corrupt_start_frame", child_refuses_a_corrupt_start_frame),
];

/// The parent's end of a hand-driven child and its handle.
type RawChild = (Channel, Box<dyn ChildHandle>);

fn start_raw(ctx: &Context) -> Result<Option<RawChild>, Failed> {
    if ctx.method().moves_arguments() {
        return Ok(None);
    }
    let (parent, child_end) = Channel::pair()?;
    let handle = ctx.method().start(StartRequest {
        channel: child_end.into_fd(),
        parent_end: parent.as_fd(),
        payload: Payload::Sent,
    })?;
    Ok(Some((parent, handle)))
}

fn start_message(task: &str, fingerprint: u64) -> Start {
    Start {
        version: PROTOCOL_VERSION,
        fingerprint,
        task: task.into(),
        name: "raw".into(),
        method: "raw".into(),
        parent_pid: std::process::id(),
        daemon: false,
        log: None,
        worker: None,
        setup: None,
    }
}

/// Reads the hello and the failure that follows, and reaps the child.
fn expect_failure(
    mut parent: Channel,
    mut handle: Box<dyn ChildHandle>,
    expected: FailReason,
) -> Result<String, Failed> {
    let deadline = Some(Instant::now() + DEADLINE);
    let hello = parent.recv(deadline, None)?;
    let (hello, _) = wire::decode::<ToParent>(&hello)?;
    ensure(matches!(hello, ToParent::Hello { .. }), || format!("first frame {hello:?}"))?;
    let reply = parent.recv(deadline, None)?;
    let (reply, _) = wire::decode::<ToParent>(&reply)?;
    let status = handle.wait_deadline(deadline)?;
    ensure(status == Some(ExitStatus::Exited(1)), || format!("status {status:?}"))?;
    match reply {
        ToParent::Failed { reason, message } if reason == expected => Ok(message),
        other => Err(format!("expected {expected:?}, got {other:?}").into()),
    }
}

/// Sends `start` to a hand-driven child and returns the message of the failure it answers
/// with (`None` for start methods that do not send the task).
fn refused_start(
    ctx: &Context,
    start: &Start,
    expected: FailReason,
) -> Result<Option<String>, Failed> {
    let Some((parent, handle)) = start_raw(ctx)? else {
        return Ok(None);
    };
    wire::send(&parent, start, &[], &[], &[], None, Some(handle.sentinel()))
        .map_err(|e| e.to_string())?;
    expect_failure(parent, handle, expected).map(Some)
}

fn child_refuses_unknown_task(ctx: &Context) -> Result<(), Failed> {
    let start = start_message("no::such::task", child::fingerprint());
    let Some(message) = refused_start(ctx, &start, FailReason::UnknownTask)? else {
        return Ok(());
    };
    ensure(message.contains("no::such::task"), || message)
}

fn child_refuses_another_build(ctx: &Context) -> Result<(), Failed> {
    let start = start_message(crate::common::add.name(), child::fingerprint() ^ 1);
    let Some(message) = refused_start(ctx, &start, FailReason::FingerprintMismatch)? else {
        return Ok(());
    };
    ensure(message.contains("different builds"), || message)
}

fn child_refuses_a_corrupt_start_frame(ctx: &Context) -> Result<(), Failed> {
    let Some((parent, handle)) = start_raw(ctx)? else {
        return Ok(());
    };
    let deadline = Some(Instant::now() + Duration::from_secs(10));
    parent.send(&[b"\x05\x00\x00\x00garbage bytes"], &[], &[], deadline, None)?;
    expect_failure(parent, handle, FailReason::Protocol).map(drop)
}
