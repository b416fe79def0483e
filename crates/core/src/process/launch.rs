//! The start path every child takes, a lone `Process` or a pool's worker: the `Start` message,
//! the channel, the start method's `start`, the task's delivery, and the parent's side of the
//! handshake.

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::process::method::{ChildHandle, ChildMain, Payload, StartMethod, StartRequest};
use crate::runtime::child::fingerprint;
use crate::runtime::identity::ProcessInfo;
use crate::transport::channel::{Channel, FrameError};
use crate::transport::codec::Attachments;
use crate::transport::wire::{self, FailReason, PROTOCOL_VERSION, Setup, Start, WorkerSetup};

/// The `Start` message for a child called `name` that runs `task` (or, with `worker`, serves a
/// pool).
pub(crate) fn start_message(
    task: &str,
    name: &str,
    method: &str,
    daemon: bool,
    worker: Option<WorkerSetup>,
    setup: Option<Setup>,
) -> Start {
    Start {
        version: PROTOCOL_VERSION,
        fingerprint: fingerprint(),
        task: task.to_owned(),
        name: name.to_owned(),
        method: method.to_owned(),
        parent_pid: std::process::id(),
        daemon,
        log: crate::runtime::log::inherited_level(),
        worker,
        setup,
    }
}

/// How a new child gets its work.
pub(crate) enum Work {
    /// Encoded arguments and what travels beside them, sent with the `Start` message (spawn,
    /// forkserver); shared, so that every worker of a pool is sent one copy of its
    /// initializer's arguments.
    Sent(Arc<Vec<u8>>, Attachments),
    /// The child's body, run in a forked copy of this process (fork).
    Moved(ChildMain),
}

/// A started child: its handle and the parent's end of its channel.
pub(crate) struct Launched {
    pub(crate) child: Box<dyn ChildHandle>,
    pub(crate) channel: Channel,
    /// Its entry among the active children, for as long as its handle lives.
    pub(crate) active: crate::process::active::Active,
}

/// The largest `Start` message with its arguments that [`launch`] writes before the child
/// exists. A Unix stream socket takes a first write of up to half its send buffer, less 64
/// bytes, as one buffer without waiting; the smallest send buffer Linux allows is above 4 KiB,
/// so this much and the 16-byte frame header always fit.
const PRESEND_MAX: usize = 2048;

/// Starts a child with `method` and hands it `start` and its work; `setup_fds` are the
/// descriptors its setup's streams take (sent first with the `Start`; a forked child was
/// handed them in memory).
///
/// A child that dies before it reads its work is not an error here: whoever waits for it
/// learns how it ended.
pub(crate) fn launch(
    method: &dyn StartMethod,
    start: &Start,
    work: Work,
    setup_fds: &[BorrowedFd<'_>],
) -> Result<Launched> {
    crate::runtime::role::refuse_untaken_role();
    let name = &start.name;
    let (parent_end, child_end) =
        Channel::pair().map_err(|e| Error::io(format!("socketpair for {name}"), e))?;
    let (payload, mut sent_args) = match work {
        Work::Moved(main) => (Payload::Moved(main), None),
        Work::Sent(args, attachments) => (Payload::Sent, Some((args, attachments))),
    };
    // A small `Start` goes into the channel before the child exists, so that a child forked by
    // the forkserver finds its task as soon as it runs, instead of waiting for us to learn its
    // pid and then write: that saves a round trip through this process on every start.
    if let Some((args, attachments)) = &sent_args
        && presend(&parent_end, start, args, attachments, setup_fds)?
    {
        sent_args = None;
    }
    // Allocated before the fork: after it, every page this process writes is a copy-on-write
    // fault while the child lives.
    let mut info = ProcessInfo {
        name: name.clone(),
        pid: 0,
        start_method: Some(start.method.clone()),
        daemon: start.daemon,
    };
    let request =
        StartRequest { channel: child_end.into_fd(), parent_end: parent_end.as_fd(), payload };
    let child = method.start(request)?;
    let pid = child.pid();
    info.pid = pid;
    let active = crate::process::active::record(info);
    tracing::debug!(pid, name = %name, method = method.name(), task = %start.task, "process started");
    if let Some((args, attachments)) = sent_args {
        let fds = with_setup_fds(setup_fds, &attachments);
        let blocks = &attachments.blocks;
        let sent =
            wire::send(&parent_end, start, &args, &fds, blocks, None, Some(child.sentinel()));
        match sent {
            Ok(())
            | Err(wire::SendError::Frame(FrameError::Disconnected | FrameError::Aborted)) => {}
            Err(e) => {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!("sending the task to process {pid} ({name}): {e}"),
                ));
            }
        }
    }
    Ok(Launched { child, channel: parent_end, active })
}

/// Writes `start` and its arguments into a new child's channel if they fit its buffer whole, so
/// that the write cannot block before anyone reads; true if it did.
fn presend(
    channel: &Channel,
    start: &Start,
    args: &[u8],
    attachments: &Attachments,
    setup_fds: &[BorrowedFd<'_>],
) -> Result<bool> {
    if !attachments.blocks.is_empty() || args.len() > PRESEND_MAX {
        return Ok(false);
    }
    let head = wire::head(start).map_err(|e| {
        Error::new(ErrorKind::Encode, format!("the start message of {}: {e}", start.name))
    })?;
    if head.len() + args.len() > PRESEND_MAX {
        return Ok(false);
    }
    let fds = with_setup_fds(setup_fds, attachments);
    channel.send(&[&head, args], &fds, &[], None, None).map_err(|e| {
        Error::new(ErrorKind::Io, format!("writing the task of {}: {e}", start.name))
    })?;
    Ok(true)
}

/// The descriptors of a `Start` frame: the setup's first, then the arguments'.
fn with_setup_fds<'a>(
    setup_fds: &[BorrowedFd<'a>],
    attachments: &'a Attachments,
) -> Vec<BorrowedFd<'a>> {
    setup_fds.iter().copied().chain(attachments.borrowed_fds()).collect()
}

/// The parent's side of the handshake: `None` if the child's `Hello` matches us.
pub(crate) fn check_hello(
    label: impl FnOnce() -> String,
    version: u32,
    theirs: u64,
) -> Option<Error> {
    (version != PROTOCOL_VERSION || theirs != fingerprint()).then(|| {
        let label = label();
        Error::new(
            ErrorKind::StartFailed,
            format!(
                "{label} handshake failed: protocol version {version}, expected \
                 {PROTOCOL_VERSION}; executable {theirs:016x}, expected {:016x}",
                fingerprint()
            ),
        )
    })
}

/// The error kind for a child's `Failed` reason.
pub(crate) fn fail_kind(reason: FailReason) -> ErrorKind {
    match reason {
        FailReason::UnknownTask => ErrorKind::UnknownTask,
        FailReason::DuplicateTask => ErrorKind::DuplicateTask,
        FailReason::VersionMismatch | FailReason::FingerprintMismatch => ErrorKind::StartFailed,
        FailReason::ArgsUndecodable => ErrorKind::Decode,
        FailReason::ResultUnencodable => ErrorKind::Encode,
        FailReason::Protocol => ErrorKind::Protocol,
        FailReason::Setup => ErrorKind::StartFailed,
    }
}
