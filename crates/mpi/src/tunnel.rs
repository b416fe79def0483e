//! A tunnel: one child's channel carried between two ranks, frame by frame.
//!
//! Each end of a tunnel is a local socket (on rank 0, the end a pool's engine would have given
//! a local child; on the agent, the end of the real child's channel) and two threads: the
//! reader takes each frame from the socket and sends it to the other rank; the writer puts the
//! frames the router received into the socket. The writer has a queue of its own, so that a
//! router never blocks on a socket nobody reads, and one slow child holds up no other.

use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::thread;

use multiproc_core::transport::channel::{Channel, FrameError};

use crate::link;
use crate::wire::{self, TAG_FRAME, TunnelFrame};

/// What a tunnel's writer does next, in order.
pub enum Inbound {
    /// Writes a frame that arrived from the other rank.
    Frame(TunnelFrame),
    /// Shuts the socket's write side: the other rank closed its end.
    Close,
    /// Runs once every frame before it was written (rank 0 learns a child's end this way).
    Then(Box<dyn FnOnce() + Send>),
}

/// Starts the two threads of tunnel `id` over `socket`, whose frames go to rank `peer`;
/// `at_end` runs on the reader once the local end closed (it reads end-of-file or an error).
/// Returns the writer's queue.
pub fn open(
    id: u64,
    socket: OwnedFd,
    peer: i32,
    at_end: impl FnOnce() + Send + 'static,
) -> std::io::Result<mpsc::Sender<Inbound>> {
    let write_half = socket.try_clone()?;
    let (queue, inbound) = mpsc::channel::<Inbound>();
    thread::Builder::new().name(format!("mpi-tunnel-{id}-out")).spawn(move || {
        let mut channel = Channel::from_fd(socket);
        read_loop(id, &mut channel, peer);
        at_end();
    })?;
    thread::Builder::new().name(format!("mpi-tunnel-{id}-in")).spawn(move || {
        let channel = Channel::from_fd(write_half);
        let mut broken = false;
        for next in inbound {
            match next {
                Inbound::Frame(frame) if !broken => {
                    let blocks: Vec<_> = frame
                        .blocks
                        .into_iter()
                        .map(|block| std::sync::Arc::new(block.into()))
                        .collect();
                    // A local end that went away takes no more frames; what follows is dropped.
                    broken = channel.send(&[&frame.body], &[], &blocks, None, None).is_err();
                }
                Inbound::Frame(_) => {}
                Inbound::Close => {
                    let _ = channel.shutdown_write();
                }
                Inbound::Then(then) => then(),
            }
        }
    })?;
    Ok(queue)
}

/// Sends every frame read from `channel` to `peer`, until end-of-file.
fn read_loop(id: u64, channel: &mut Channel, peer: i32) {
    loop {
        match channel.recv(None, None) {
            Ok(frame) => {
                if !frame.fds.is_empty() {
                    // Refused at submission; a child's result holding one gets here. Its
                    // receiver finds the descriptors missing and reports the value undecodable.
                    tracing::warn!(
                        id,
                        fds = frame.fds.len(),
                        "a frame's descriptors cannot cross ranks; sent without them"
                    );
                }
                let blocks: Vec<&[u8]> = frame.blocks.iter().map(|b| b.as_slice()).collect();
                let bytes = wire::encode_frame(id, &frame.body, &blocks);
                if let Err(e) = link::send(peer, TAG_FRAME, &bytes) {
                    tracing::error!(id, "tunnel to rank {peer}: {e}");
                    return;
                }
            }
            Err(FrameError::Disconnected) => return,
            Err(e) => {
                tracing::error!(id, "tunnel: a bad frame from the local end: {e}");
                return;
            }
        }
    }
}
