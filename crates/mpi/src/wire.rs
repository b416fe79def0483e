//! What the ranks of a job say to each other: control messages (encoded with bincode, as the
//! rest of multiproc's control messages), and the frames of a tunnelled channel.
//!
//! Every message is one MPI message. Its tag says which kind it is; MPI delivers the messages
//! of one sender to one receiver in the order they were sent, whatever their tags, as long as
//! the receiver probes for any tag (both routers do), so a child's last frames always come
//! before the news of its end.

use serde::{Deserialize, Serialize};

/// The tag of a [`Control`] message.
pub const TAG_CONTROL: i32 = 1;
/// The tag of a tunnelled frame ([`encode_frame`]).
pub const TAG_FRAME: i32 = 2;

/// The largest control message accepted: they are small, and a peer's garbage must not make
/// the decoder allocate beyond this.
pub const MAX_CONTROL: usize = 64 * 1024;

/// How a child on a node ended, as its agent saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ended {
    /// It exited with this code.
    Exited(i32),
    /// It was killed by this signal.
    Signaled(i32),
    /// Its agent could not tell.
    Unknown,
}

/// A control message between rank 0 and an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// Agent → rank 0, once, after `MPI_Init`: what the node offers.
    Hello {
        /// The CPUs the agent may use (its default number of workers).
        cpus: u32,
        /// The node's host name.
        host: String,
        /// The agent's pid on its node.
        pid: u32,
        /// The agent's executable fingerprint (it must be rank 0's binary).
        fingerprint: u64,
    },
    /// Rank 0 → agent: start a child for tunnel `id` (its `Start` frame follows on the tunnel).
    Start {
        /// The tunnel's number.
        id: u64,
    },
    /// Agent → rank 0: the child of tunnel `id` runs, as `pid` on the agent's node.
    Started {
        /// The tunnel's number.
        id: u64,
        /// The child's pid on its node.
        pid: u32,
    },
    /// Agent → rank 0: the child of tunnel `id` could not be started.
    StartFailed {
        /// The tunnel's number.
        id: u64,
        /// Why.
        message: String,
    },
    /// Rank 0 → agent: send `signal` to the child of tunnel `id`.
    Signal {
        /// The tunnel's number.
        id: u64,
        /// The signal.
        signal: i32,
    },
    /// Rank 0 → agent: rank 0 closed its end of tunnel `id` (the child reads end-of-file).
    Close {
        /// The tunnel's number.
        id: u64,
    },
    /// Agent → rank 0: the child of tunnel `id` ended (after its last frame).
    Ended {
        /// The tunnel's number.
        id: u64,
        /// How.
        how: Ended,
    },
    /// Rank 0 → agent: the job is over; kill what runs and leave.
    Shutdown,
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_CONTROL>()
}

/// The bytes of `message`.
pub fn encode_control(message: &Control) -> Vec<u8> {
    bincode::serde::encode_to_vec(message, config()).expect("a control message encodes")
}

/// The control message in `bytes`, or why they are not one.
pub fn decode_control(bytes: &[u8]) -> Result<Control, String> {
    if bytes.len() > MAX_CONTROL {
        return Err(format!("a control message of {} bytes", bytes.len()));
    }
    match bincode::serde::decode_from_slice(bytes, config()) {
        Ok((message, used)) if used == bytes.len() => Ok(message),
        Ok(_) => Err("trailing bytes after a control message".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A frame of tunnel `id`: the id, the number of blocks, each block's length (all
/// little-endian), then the body and the blocks.
pub fn encode_frame(id: u64, body: &[u8], blocks: &[&[u8]]) -> Vec<u8> {
    let head = 12 + 8 * blocks.len();
    let mut out =
        Vec::with_capacity(head + body.len() + blocks.iter().map(|b| b.len()).sum::<usize>());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
    for block in blocks {
        out.extend_from_slice(&(block.len() as u64).to_le_bytes());
    }
    out.extend_from_slice(body);
    for block in blocks {
        out.extend_from_slice(block);
    }
    out
}

/// A decoded tunnel frame.
#[derive(Debug, PartialEq, Eq)]
pub struct TunnelFrame {
    /// The tunnel's number.
    pub id: u64,
    /// The frame's body.
    pub body: Vec<u8>,
    /// The blocks that travel after it.
    pub blocks: Vec<Vec<u8>>,
}

/// The frame in `bytes`, or why they are not one: lengths are checked against what arrived
/// before anything is allocated.
pub fn decode_frame(bytes: &[u8]) -> Result<TunnelFrame, String> {
    let short = || format!("a tunnelled frame cut short ({} bytes)", bytes.len());
    let id = u64::from_le_bytes(bytes.get(..8).ok_or_else(short)?.try_into().expect("8 bytes"));
    let count = u32::from_le_bytes(bytes.get(8..12).ok_or_else(short)?.try_into().expect("4"));
    let table_end = (count as usize).checked_mul(8).and_then(|n| n.checked_add(12));
    let table = table_end.and_then(|end| bytes.get(12..end)).ok_or_else(short)?;
    let lens: Vec<usize> = table
        .chunks_exact(8)
        .map(|len| u64::from_le_bytes(len.try_into().expect("8 bytes")) as usize)
        .collect();
    let mut rest = &bytes[12 + table.len()..];
    let blocks_len = lens.iter().try_fold(0usize, |sum, &len| sum.checked_add(len));
    let blocks_len = blocks_len.filter(|&n| n <= rest.len()).ok_or_else(short)?;
    let body = rest[..rest.len() - blocks_len].to_vec();
    rest = &rest[body.len()..];
    let mut blocks = Vec::with_capacity(lens.len());
    for len in lens {
        blocks.push(rest[..len].to_vec());
        rest = &rest[len..];
    }
    Ok(TunnelFrame { id, body, blocks })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_an_error() {
        let bytes = encode_frame(7, b"body", &[b"one", b"", b"three"]);
        let frame = decode_frame(&bytes).unwrap();
        assert_eq!(frame.id, 7);
        assert_eq!(frame.body, b"body");
        assert_eq!(frame.blocks, vec![b"one".to_vec(), vec![], b"three".to_vec()]);
        for cut in 0..bytes.len() - 9 {
            // Every prefix that cuts into the header or the blocks is refused, none panics.
            let _ = decode_frame(&bytes[..cut]);
        }
        let mut huge = encode_frame(1, b"", &[]);
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_frame(&huge).is_err());
    }

    #[test]
    fn control_messages_round_trip_and_garbage_is_an_error() {
        let message = Control::Ended { id: 3, how: Ended::Signaled(9) };
        assert_eq!(decode_control(&encode_control(&message)).unwrap(), message);
        assert!(decode_control(&[0xff; 40]).is_err());
        assert!(decode_control(&vec![0; MAX_CONTROL + 1]).is_err());
    }
}
