//! A node agent: what every rank but 0 becomes, before `main`.
//!
//! It starts the children rank 0 asks for with the spawn method (an MPI process must not fork
//! itself; `posix_spawn` is safe), tunnels each child's channel to rank 0, signals them when
//! asked, and reports how each ended. A child that crashes is one report; the agent, and so
//! the MPI job, goes on. At `Shutdown`, or when rank 0 is gone, it kills what still runs and
//! leaves the job with `MPI_Finalize`.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use multiproc_core::process::method::signal_unless_ended;
use multiproc_core::transport::channel::Channel;
use multiproc_core::{ExitStatus, Payload, StartMethod, StartRequest, sys};

use crate::cache;
use crate::link::{self, Prober};
use crate::tunnel::{self, Inbound};
use crate::wire::{self, Control, Ended, TAG_CONTROL, TAG_FRAME};

/// Exit code of an agent that could not join the job (MPI would not start, rank 0 spoke
/// nonsense).
pub const EXIT_AGENT_FAILED: i32 = 121;

/// How long a child may live on after its channel closed before the agent kills it.
const AFTER_EOF: Duration = Duration::from_secs(10);

/// A child this agent started.
struct Child {
    /// Its pidfd (a duplicate; the tunnel's reader holds the handle that reaps it).
    pidfd: OwnedFd,
    /// Its tunnel's writer.
    queue: mpsc::Sender<Inbound>,
}

/// The agent's whole life; it ends the process.
pub fn run() -> ! {
    let universe = match link::init() {
        Ok(universe) => universe,
        Err(e) => {
            eprintln!("multiproc mpi agent: {e}");
            sys::exit_immediately(EXIT_AGENT_FAILED);
        }
    };
    let (rank, _) = link::rank_and_size();
    let hello = Control::Hello {
        cpus: multiproc_core::cpu_count() as u32,
        host: sys::host_name(),
        pid: std::process::id(),
        fingerprint: multiproc_core::runtime::child::fingerprint(),
    };
    if let Err(e) = link::send(0, TAG_CONTROL, &wire::encode_control(&hello)) {
        eprintln!("multiproc mpi agent {rank}: {e}");
        sys::exit_immediately(EXIT_AGENT_FAILED);
    }
    let children: Arc<Mutex<HashMap<u64, Child>>> = Arc::default();
    let mut prober = Prober::default();
    let mut store = cache::Store::default();
    loop {
        let Some(message) = prober.next(None) else { continue };
        if message.source != 0 {
            tracing::warn!(rank, source = message.source, "a message from a rank that is not 0");
            continue;
        }
        if [TAG_FRAME, cache::TAG_KEEP, cache::TAG_REF].contains(&message.tag) {
            let frame = if message.tag == TAG_FRAME {
                wire::decode_frame(&message.bytes)
            } else {
                store.receive(message.tag, &message.bytes)
            };
            match frame {
                Ok(frame) => {
                    let children = children.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(child) = children.get(&frame.id) {
                        let _ = child.queue.send(Inbound::Frame(frame));
                    }
                }
                Err(e) => tracing::error!(rank, "rank 0 sent a frame that does not decode: {e}"),
            }
            continue;
        }
        let control = match wire::decode_control(&message.bytes) {
            Ok(control) => control,
            Err(e) => {
                tracing::error!(rank, "rank 0 sent a control message that does not decode: {e}");
                continue;
            }
        };
        match control {
            Control::Start { id } => start(id, &children),
            Control::Signal { id, signal } => {
                if let Some(child) = children.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
                    let _ = signal_unless_ended(child.pidfd.as_fd(), None, signal);
                }
            }
            Control::Close { id } => {
                if let Some(child) = children.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
                    let _ = child.queue.send(Inbound::Close);
                }
            }
            Control::Shutdown => break,
            other => tracing::warn!(rank, "rank 0 sent {other:?}, which an agent does not take"),
        }
    }
    shut_down(&children);
    link::finalize(universe);
    sys::exit_immediately(0)
}

/// Starts the child of tunnel `id` and its tunnel, and tells rank 0.
fn start(id: u64, children: &Arc<Mutex<HashMap<u64, Child>>>) {
    let reply = match spawn_child(id, children) {
        Ok(pid) => Control::Started { id, pid },
        Err(message) => Control::StartFailed { id, message },
    };
    let _ = link::send(0, TAG_CONTROL, &wire::encode_control(&reply));
}

fn spawn_child(id: u64, children: &Arc<Mutex<HashMap<u64, Child>>>) -> Result<u32, String> {
    let (ours, theirs) = Channel::pair().map_err(|e| format!("socketpair: {e}"))?;
    let request = StartRequest {
        channel: theirs.into_fd(),
        parent_end: ours.as_fd(),
        payload: Payload::Sent,
    };
    let mut child = multiproc_spawn::Spawn.start(request).map_err(|e| e.to_string())?;
    let pid = child.pid();
    let pidfd = child.pidfd().try_clone_to_owned().map_err(|e| format!("dup: {e}"))?;
    // Registered before the tunnel runs, so that the first frame from rank 0 finds it.
    let mut table = children.lock().unwrap_or_else(|p| p.into_inner());
    let ended = Arc::clone(children);
    let (queue, reader) = tunnel::open(id, ours.into_fd(), 0, tunnel::send_whole, move |garbled| {
        // The child closed its channel: it ended, or is about to (its status follows its last
        // frame, which the reader has sent). A child whose channel carried garbage, or whose
        // frames could not go on, is killed, as a local pool's engine would: rank 0 never saw
        // what it wrote. One that outlives its channel by `AFTER_EOF` is killed too.
        if garbled {
            let _ = child.signal(libc::SIGKILL);
        }
        let mut status = child.wait_deadline(Some(Instant::now() + AFTER_EOF)).ok().flatten();
        if status.is_none() {
            let _ = child.signal(libc::SIGKILL);
            status = child.wait_deadline(None).ok().flatten();
        }
        ended.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        let how = match status {
            Some(ExitStatus::Exited(code)) => Ended::Exited(code),
            Some(ExitStatus::Signaled(signal)) => Ended::Signaled(signal),
            _ => Ended::Unknown,
        };
        let _ = link::send(0, TAG_CONTROL, &wire::encode_control(&Control::Ended { id, how }));
    })
    .map_err(|e| format!("starting the tunnel's writer: {e}"))?;
    table.insert(id, Child { pidfd, queue });
    drop(table);
    // Rank 0 knows the tunnel (it registered it before asking): the child's frames may go
    // before the answer.
    reader.start().map_err(|e| format!("starting the tunnel's reader: {e}"))?;
    Ok(pid)
}

/// Kills every child still running and waits (boundedly) for their tunnels to report them.
fn shut_down(children: &Mutex<HashMap<u64, Child>>) {
    for child in children.lock().unwrap_or_else(|p| p.into_inner()).values() {
        let _ = signal_unless_ended(child.pidfd.as_fd(), None, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !children.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
}
