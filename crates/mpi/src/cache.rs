//! Large payloads shipped once per node: what rank 0 sends an agent twice (every worker's
//! `Start` frame carries the pool's initializer arguments) goes the second time as a reference.
//!
//! A frame whose payload (what follows its control message, see `wire::head`) is at least
//! [`CACHE_MIN`] and which has no blocks travels as `TAG_KEEP` (the tunnel id, the payload's
//! SHA-256, the control message, the payload) the first time, and as `TAG_REF` (the same
//! without the payload) while the agent still keeps it. Rank 0 mirrors what each agent keeps:
//! both sides apply the same rule (the last [`KEPT`] payloads, at most [`KEPT_BYTES`] in all)
//! to the same sequence of messages, because rank 0 decides and sends under one lock per agent
//! and MPI delivers one sender's messages in order. So rank 0 never refers to a payload the
//! agent let go.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::link;
use crate::wire::{self, TAG_FRAME, TunnelFrame};

/// The smallest payload worth a reference.
pub const CACHE_MIN: usize = 1 << 20;

/// How many payloads an agent keeps.
pub const KEPT: usize = 4;

/// How many bytes of payloads an agent keeps at most.
pub const KEPT_BYTES: usize = 4 << 30;

/// The tag of a frame whose payload the agent keeps.
pub const TAG_KEEP: i32 = 3;
/// The tag of a frame that refers to a kept payload.
pub const TAG_REF: i32 = 4;

type Key = [u8; 32];

/// The last payloads kept, oldest first, and the rule that lets them go.
#[derive(Default)]
struct Kept<V> {
    entries: VecDeque<(Key, usize, V)>,
}

impl<V: Clone> Kept<V> {
    fn get(&mut self, key: &Key) -> Option<V> {
        let at = self.entries.iter().position(|(k, _, _)| k == key)?;
        let entry = self.entries.remove(at).expect("found");
        let value = entry.2.clone();
        self.entries.push_back(entry);
        Some(value)
    }

    fn insert(&mut self, key: Key, len: usize, value: V) {
        self.entries.push_back((key, len, value));
        while self.entries.len() > KEPT
            || self.entries.iter().map(|(_, len, _)| len).sum::<usize>() > KEPT_BYTES
        {
            self.entries.pop_front();
        }
    }
}

/// Rank 0's mirror of what one agent keeps (the payloads' keys; the agent has the bytes).
type Mirror = Arc<Mutex<Kept<()>>>;

/// Each agent's [`Mirror`], by rank.
static SHIPPED: Mutex<Option<HashMap<i32, Mirror>>> = Mutex::new(None);

/// Bytes rank 0 has sent as tunnelled frames, references counted at their size.
static SENT_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many bytes of tunnelled frames rank 0 has sent so far.
pub fn sent_bytes() -> u64 {
    SENT_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

fn send(peer: i32, tag: i32, bytes: &[u8]) -> Result<(), String> {
    SENT_BYTES.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
    link::send(peer, tag, bytes)
}

/// Where a frame's payload starts: after the length-prefixed control message at its start.
fn payload_start(body: &[u8]) -> Option<usize> {
    let len = u32::from_le_bytes(body.get(..4)?.try_into().ok()?) as usize;
    Some(4 + len).filter(|&start| start <= body.len())
}

/// Sends frame `body` (with `blocks`) of tunnel `id` to agent `peer`, its large payload as a
/// reference where the agent keeps it already (rank 0's side).
pub fn send_frame(peer: i32, id: u64, body: &[u8], blocks: &[&[u8]]) -> Result<(), String> {
    let split = payload_start(body).filter(|&at| blocks.is_empty() && body.len() - at >= CACHE_MIN);
    let Some(at) = split else {
        return send(peer, TAG_FRAME, &wire::encode_frame(id, body, blocks));
    };
    let (head, payload) = body.split_at(at);
    let key: Key = Sha256::digest(payload).into();
    let mirror = {
        let mut shipped = SHIPPED.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(shipped.get_or_insert_default().entry(peer).or_default())
    };
    // Held while sending, so that the agent sees the messages in the order of the decisions.
    let mut kept = mirror.lock().unwrap_or_else(|p| p.into_inner());
    let mut message = Vec::with_capacity(44 + head.len());
    message.extend_from_slice(&id.to_le_bytes());
    message.extend_from_slice(&key);
    message.extend_from_slice(&(head.len() as u32).to_le_bytes());
    message.extend_from_slice(head);
    if kept.get(&key).is_some() {
        return send(peer, TAG_REF, &message);
    }
    kept.insert(key, payload.len(), ());
    message.extend_from_slice(payload);
    send(peer, TAG_KEEP, &message)
}

/// What an agent keeps of the payloads rank 0 sent.
#[derive(Default)]
pub struct Store {
    kept: Kept<Arc<Vec<u8>>>,
}

impl Store {
    /// The frame a `TAG_KEEP` or `TAG_REF` message stands for (the agent's side).
    pub fn receive(&mut self, tag: i32, bytes: &[u8]) -> Result<TunnelFrame, String> {
        let short = || format!("a cached frame cut short ({} bytes)", bytes.len());
        let id = u64::from_le_bytes(bytes.get(..8).ok_or_else(short)?.try_into().expect("8"));
        let key: Key = bytes.get(8..40).ok_or_else(short)?.try_into().expect("32 bytes");
        let len = u32::from_le_bytes(bytes.get(40..44).ok_or_else(short)?.try_into().expect("4"));
        let head = bytes.get(44..44 + len as usize).ok_or_else(short)?;
        let rest = &bytes[44 + head.len()..];
        let payload = if tag == TAG_KEEP {
            let payload = Arc::new(rest.to_vec());
            self.kept.insert(key, payload.len(), Arc::clone(&payload));
            payload
        } else {
            self.kept.get(&key).ok_or("a reference to a payload this agent does not keep")?
        };
        let mut body = Vec::with_capacity(head.len() + payload.len());
        body.extend_from_slice(head);
        body.extend_from_slice(&payload);
        Ok(TunnelFrame { id, body, blocks: Vec::new() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mirror_and_the_store_let_the_same_payloads_go() {
        let (mut mirror, mut store) = (Kept::<()>::default(), Kept::<u8>::default());
        for key in 0..10u8 {
            for seen in [key, key / 2] {
                let k = [seen; 32];
                if mirror.get(&k).is_none() {
                    mirror.insert(k, 1, ());
                    store.insert(k, 1, seen);
                } else {
                    assert_eq!(store.get(&k), Some(seen), "the store let {seen} go too soon");
                }
            }
        }
        assert_eq!(mirror.entries.len(), KEPT);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut store = Store::default();
        for len in 0..60 {
            assert!(store.receive(TAG_REF, &vec![0xff; len]).is_err());
        }
        let mut unknown = vec![0u8; 44];
        unknown[40..44].copy_from_slice(&0u32.to_le_bytes());
        assert!(store.receive(TAG_REF, &unknown).is_err());
    }
}
