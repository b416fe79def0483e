//! A tunnel: one child's channel carried between two ranks, frame by frame.
//!
//! Each end of a tunnel is a local socket (on rank 0, the end a pool's engine would have given
//! a local child; on the agent, the end of the real child's channel) and two threads: the
//! reader takes each frame from the socket and sends it to the other rank; the writer puts the
//! frames the router received into the socket. The writer has a queue of its own, so that a
//! router never blocks on a socket nobody reads, and one slow child holds up no other.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, mpsc};
use std::thread;

use multiproc_core::transport::channel::{Channel, FrameError};

use crate::wire::TunnelFrame;

/// How a tunnel's reader sends one frame (body, blocks) of tunnel `id` to rank `peer`.
pub type SendFrame = fn(peer: i32, id: u64, body: &[u8], blocks: &[&[u8]]) -> Result<(), String>;

/// Sends a frame as it is (an agent's side).
pub fn send_whole(peer: i32, id: u64, body: &[u8], blocks: &[&[u8]]) -> Result<(), String> {
    crate::link::send(peer, crate::wire::TAG_FRAME, &crate::wire::encode_frame(id, body, blocks))
}

/// What a tunnel's writer does next, in order.
pub enum Inbound {
    /// Writes a frame that arrived from the other rank.
    Frame(TunnelFrame),
    /// Shuts the socket's write side: the other rank closed its end.
    Close,
    /// Runs once every frame before it was written, and the socket closed (rank 0 learns a
    /// child's end this way); nothing is written after it.
    Then(Box<dyn FnOnce() + Send>),
}

/// The reading half of a tunnel, not yet started: see [`open`].
pub struct Reader {
    id: u64,
    socket: OwnedFd,
    peer: i32,
    send: SendFrame,
    at_end: Box<dyn FnOnce(bool) + Send>,
    /// Where the reader's thread is left for the writer, which waits for it at the end.
    handle: Arc<Mutex<Option<thread::JoinHandle<()>>>>,
}

impl Reader {
    /// Starts sending the local end's frames to the other rank. A caller that must say
    /// something first (rank 0 asks the agent to start the child, so that the agent knows the
    /// tunnel before its first frame) says it before this: the messages of one rank to another
    /// arrive in the order they were sent.
    pub fn start(self) -> std::io::Result<()> {
        let Reader { id, socket, peer, send, at_end, handle } = self;
        let mut slot = handle.lock().unwrap_or_else(|p| p.into_inner());
        *slot =
            Some(thread::Builder::new().name(format!("mpi-tunnel-{id}-out")).spawn(move || {
                let mut channel = Channel::from_fd(socket);
                let garbled = !read_loop(id, &mut channel, peer, send);
                // Closed before anyone hears of the end, so that a caller counting its
                // descriptors after the child's end finds this one gone.
                drop(channel);
                at_end(garbled);
            })?);
        Ok(())
    }
}

/// Opens tunnel `id` over `socket`, whose frames go to rank `peer` (each through `send`): starts
/// its writer, and
/// returns the writer's queue and the reader, to be started ([`Reader::start`]). `at_end` runs
/// on the reader once it stops: at end-of-file, or (told `true`) when the local end wrote
/// bytes that are not frames, or a frame could not be sent on.
pub fn open(
    id: u64,
    socket: OwnedFd,
    peer: i32,
    send: SendFrame,
    at_end: impl FnOnce(bool) + Send + 'static,
) -> std::io::Result<(mpsc::Sender<Inbound>, Reader)> {
    let write_half = socket.try_clone()?;
    let (queue, inbound) = mpsc::channel::<Inbound>();
    let handle: Arc<Mutex<Option<thread::JoinHandle<()>>>> = Arc::default();
    let at_end = Box::new(at_end);
    let reader = Reader { id, socket, peer, send, at_end, handle: Arc::clone(&handle) };
    thread::Builder::new().name(format!("mpi-tunnel-{id}-in")).spawn(move || {
        let mut channel = Some(Channel::from_fd(write_half));
        for next in inbound {
            match next {
                Inbound::Frame(frame) => {
                    let Some(open) = &channel else { continue };
                    let blocks: Vec<_> = frame
                        .blocks
                        .into_iter()
                        .map(|block| std::sync::Arc::new(block.into()))
                        .collect();
                    // A local end that went away takes no more frames; what follows is dropped.
                    if open.send(&[&frame.body], &[], &blocks, None, None).is_err() {
                        channel = None;
                    }
                }
                Inbound::Close => {
                    if let Some(open) = &channel {
                        let _ = open.shutdown_write();
                    }
                }
                Inbound::Then(then) => {
                    // The last word of a tunnel. Its socket is closed first, the reader's
                    // descriptor too (a shutdown ends its read), so that whoever learns of the
                    // end from `then` finds no descriptor of the tunnel's left open.
                    if let Some(open) = channel.take() {
                        let _ = open.shutdown();
                    }
                    let reader = handle.lock().unwrap_or_else(|p| p.into_inner()).take();
                    let _ = reader.map(thread::JoinHandle::join);
                    then();
                }
            }
        }
    })?;
    Ok((queue, reader))
}

/// Sends every frame read from `channel` to `peer`: true at end-of-file, false when the
/// channel or the send failed.
fn read_loop(id: u64, channel: &mut Channel, peer: i32, send: SendFrame) -> bool {
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
                if let Err(e) = send(peer, id, &frame.body, &blocks) {
                    tracing::error!(id, "tunnel to rank {peer}: {e}");
                    return false;
                }
            }
            Err(FrameError::Disconnected) => return true,
            Err(e) => {
                tracing::error!(id, "tunnel: a bad frame from the local end: {e}");
                return false;
            }
        }
    }
}
