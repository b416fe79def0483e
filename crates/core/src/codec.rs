//! The value codec: serde + bincode 2, behind two functions so that the format can be replaced.
//!
//! Every decode is bounded. bincode allocates a `String` or byte buffer of the length its prefix
//! claims before reading it, so an unbounded decoder handed a length of 2^60 would try to
//! allocate that much and abort. We decode with a byte limit chosen from the size of the input.
//! bincode counts against the limit the in-memory size of every primitive it decodes, and a
//! varint-encoded integer can grow 16-fold (one byte on the wire, a `u128` in memory), so an
//! honest value never claims more than 16 times its encoded size. The limit is the smallest of a
//! few power-of-16 tiers at or above 16 times the input: an honest value always fits, and a
//! lying length can never cost more than 256 times the bytes that actually arrived.

use std::cell::RefCell;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use bincode::config;
use serde::Serialize;
use serde::de::{DeserializeOwned, DeserializeSeed};

/// A value that could not be encoded, or bytes that did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError(String);

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CodecError {}

impl CodecError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        CodecError(message.into())
    }
}

/// A large byte buffer that travels beside a message instead of inside it (see
/// [`Bytes`](crate::Bytes)): shared, so that the message can hold it until it is written.
pub type Block = Arc<crate::buffer::Buffer>;

/// What travels beside a message's bytes: descriptors (SCM_RIGHTS) and large byte blocks.
#[derive(Debug, Default)]
pub struct Attachments {
    /// Duplicates of the descriptors the encoded values hold, in index order.
    pub fds: Vec<OwnedFd>,
    /// The blocks the encoded values refer to, in index order.
    pub blocks: Vec<Block>,
}

impl Attachments {
    /// Another set for another message: the descriptors duplicated, the blocks shared.
    pub fn try_clone(&self) -> std::io::Result<Attachments> {
        let fds = self.fds.iter().map(OwnedFd::try_clone).collect::<std::io::Result<_>>()?;
        Ok(Attachments { fds, blocks: self.blocks.clone() })
    }

    /// Bytes of all blocks together.
    pub fn block_bytes(&self) -> usize {
        self.blocks.iter().map(|block| block.len()).sum()
    }

    /// The descriptors, borrowed, as a send takes them.
    pub fn borrowed_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.fds.iter().map(AsFd::as_fd).collect()
    }
}

/// The most blocks one message carries; a `Bytes` beyond them is written inline.
pub const MAX_BLOCKS: usize = 1024;

/// The side table of a message being encoded.
struct Outgoing {
    fds: Vec<OwnedFd>,
    /// `None`: the transport has no room for blocks, so large buffers are written inline.
    blocks: Option<Vec<Block>>,
}

/// The side table of a message being decoded; each entry is taken at most once.
struct Incoming {
    fds: Vec<Option<OwnedFd>>,
    blocks: Vec<Option<Vec<u8>>>,
}

thread_local! {
    /// Descriptors (and blocks) collected while encoding inside [`collecting`].
    static OUTGOING: RefCell<Option<Outgoing>> = const { RefCell::new(None) };
    /// Descriptors and blocks that arrived with the bytes being decoded inside
    /// [`with_attachments`].
    static INCOMING: RefCell<Option<Incoming>> = const { RefCell::new(None) };
    /// Descriptor numbers seen while [`fds_in`] walks a value.
    static PROBE: RefCell<Option<Vec<RawFd>>> = const { RefCell::new(None) };
}

/// The descriptor numbers that `value` holds (its `Fd`s, `Connection`s, shared memory),
/// found by encoding it into nothing; no descriptor is duplicated.
pub fn fds_in<T: Serialize + ?Sized>(value: &T) -> Vec<RawFd> {
    let mut restore =
        Restore { table: &PROBE, previous: Some(PROBE.with(|c| c.replace(Some(Vec::new())))) };
    let _ = bincode::serde::encode_into_std_write(value, &mut std::io::sink(), base());
    PROBE.with(|c| c.replace(restore.previous.take().flatten())).unwrap_or_default()
}

/// Puts back the side table that was there before, even if the closure panicked; `previous`
/// is `None` once the owner has put it back itself (and taken its own table out).
struct Restore<T: 'static> {
    table: &'static std::thread::LocalKey<RefCell<Option<T>>>,
    previous: Option<Option<T>>,
}

impl<T> Drop for Restore<T> {
    fn drop(&mut self) {
        // Only if not put back yet: a nested encode (a task that starts a process, run while
        // its own result is being collected) must leave the outer table in place.
        if let Some(previous) = self.previous.take() {
            self.table.with(|cell| cell.replace(previous));
        }
    }
}

/// Runs `f` (which encodes values) and returns, beside its result, what must travel with the
/// bytes: duplicates of the descriptors the values hold, and the large buffers they refer to
/// (to be written after the message by a channel that carries blocks).
///
/// Outside such a call, encoding a value that holds a descriptor fails: there would be no way
/// to send it.
pub fn collecting<R>(f: impl FnOnce() -> R) -> (R, Attachments) {
    let (result, outgoing) = collect(Some(Vec::new()), f);
    let Outgoing { fds, blocks } = outgoing;
    (result, Attachments { fds, blocks: blocks.unwrap_or_default() })
}

/// [`collecting`] for a transport that carries descriptors but no blocks (a queue's
/// records): every buffer is written inline.
pub fn collecting_fds<R>(f: impl FnOnce() -> R) -> (R, Vec<OwnedFd>) {
    let (result, outgoing) = collect(None, f);
    (result, outgoing.fds)
}

fn collect<R>(blocks: Option<Vec<Block>>, f: impl FnOnce() -> R) -> (R, Outgoing) {
    let fresh = Outgoing { fds: Vec::new(), blocks };
    let mut restore =
        Restore { table: &OUTGOING, previous: Some(OUTGOING.with(|c| c.replace(Some(fresh)))) };
    let result = f();
    let outgoing = OUTGOING.with(|c| c.replace(restore.previous.take().flatten()));
    (result, outgoing.expect("installed above"))
}

/// Runs `f` (which decodes values) with the descriptors and blocks that arrived with the
/// bytes at hand; a value that holds one takes it by index. What no value took is closed or
/// freed when `f` returns.
pub fn with_attachments<R>(fds: Vec<OwnedFd>, blocks: Vec<Vec<u8>>, f: impl FnOnce() -> R) -> R {
    let table = Some(Incoming {
        fds: fds.into_iter().map(Some).collect(),
        blocks: blocks.into_iter().map(Some).collect(),
    });
    let _restore =
        Restore { table: &INCOMING, previous: Some(INCOMING.with(|c| c.replace(table))) };
    f()
}

/// [`with_attachments`] with descriptors only.
pub fn with_fds<R>(fds: Vec<OwnedFd>, f: impl FnOnce() -> R) -> R {
    with_attachments(fds, Vec::new(), f)
}

/// Records a duplicate of `fd` for the message being encoded; returns its index.
pub(crate) fn push_fd(fd: BorrowedFd<'_>) -> Result<u32, String> {
    let probed = PROBE.with(|cell| {
        cell.borrow_mut().as_mut().map(|fds| {
            fds.push(fd.as_raw_fd());
            0
        })
    });
    if let Some(index) = probed {
        return Ok(index);
    }
    OUTGOING.with(|cell| {
        let mut table = cell.borrow_mut();
        let Some(outgoing) = table.as_mut() else {
            return Err("a file descriptor cannot travel in this message".to_owned());
        };
        let copy = fd.try_clone_to_owned().map_err(|e| format!("dup of a passed fd: {e}"))?;
        outgoing.fds.push(copy);
        u32::try_from(outgoing.fds.len() - 1).map_err(|_| "too many file descriptors".to_owned())
    })
}

/// Records `block` to travel beside the message being encoded and returns its index, or
/// `None` when this message carries no blocks (or no more): the caller writes it inline.
pub(crate) fn push_block(block: &Block) -> Option<u32> {
    // A probe (`fds_in`) looks for descriptors only, even inside an encode that collects.
    if PROBE.with(|cell| cell.borrow().is_some()) {
        return None;
    }
    OUTGOING.with(|cell| {
        let mut table = cell.borrow_mut();
        let blocks = table.as_mut()?.blocks.as_mut()?;
        if blocks.len() >= MAX_BLOCKS {
            return None;
        }
        blocks.push(Arc::clone(block));
        u32::try_from(blocks.len() - 1).ok()
    })
}

/// Takes the descriptor at `index` among those that arrived with the bytes being decoded.
pub(crate) fn take_fd(index: u32) -> Result<OwnedFd, String> {
    take_incoming(index, "file descriptor", |incoming| &mut incoming.fds)
}

/// Takes the block at `index` among those that arrived with the bytes being decoded.
pub(crate) fn take_block(index: u32) -> Result<Vec<u8>, String> {
    take_incoming(index, "block", |incoming| &mut incoming.blocks)
}

/// Takes entry `index` of one of the incoming tables (`what` names it in the error).
fn take_incoming<T>(
    index: u32,
    what: &str,
    table_of: impl Fn(&mut Incoming) -> &mut Vec<Option<T>>,
) -> Result<T, String> {
    INCOMING.with(|cell| {
        let mut incoming = cell.borrow_mut();
        let table = incoming.as_mut().map(table_of);
        let arrived = table.as_ref().map_or(0, |entries| entries.len());
        table.and_then(|entries| entries.get_mut(index as usize)).and_then(Option::take).ok_or_else(
            || {
                format!(
                    "the bytes claim {what} #{index}, but {arrived} arrived with them (or it was taken twice)"
                )
            },
        )
    })
}

fn base() -> config::Configuration {
    config::standard()
}

/// Appends the encoding of `value` to `out`.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    bincode::serde::encode_into_std_write(value, &mut Sink(out), base())
        .map(drop)
        .map_err(|e| CodecError(format!("cannot encode {}: {e}", std::any::type_name::<T>())))
}

/// The writer of [`encode_into`]: appends to a vector which, once it must grow past a few
/// megabytes, moves to a [`sys::large_buffer`](crate::sys::large_buffer) (huge pages) instead of
/// growing page by page.
struct Sink<'a>(&'a mut Vec<u8>);

impl Sink<'_> {
    #[inline]
    fn append(&mut self, bytes: &[u8]) {
        let out = &mut *self.0;
        if bytes.len() > out.capacity() - out.len() {
            Self::grow(out, bytes.len());
        }
        out.extend_from_slice(bytes);
    }

    /// Room for `more` bytes: past 4 MiB, in a huge-page-advised buffer.
    #[cold]
    fn grow(out: &mut Vec<u8>, more: usize) {
        let needed = out.len() + more;
        if needed < 4 << 20 {
            out.reserve(more);
            return;
        }
        let mut bigger = crate::sys::large_buffer(needed.max(2 * out.capacity()));
        bigger.extend_from_slice(out);
        *out = bigger;
    }
}

impl std::io::Write for Sink<'_> {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.append(bytes);
        Ok(bytes.len())
    }

    #[inline]
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.append(bytes);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The encoding of `value`.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    encode_into(value, &mut out)?;
    Ok(out)
}

/// Decodes a `T` that must fill `bytes` exactly.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    decode_seed(std::marker::PhantomData::<T>, bytes)
}

/// Decodes through `seed` (which may, say, push elements straight into an existing buffer);
/// the value must fill `bytes` exactly.
pub fn decode_seed<'de, S: DeserializeSeed<'de>>(
    seed: S,
    bytes: &'de [u8],
) -> Result<S::Value, CodecError> {
    // The claims of an honest value stay within 16 times its encoding (see the module docs).
    let claimable = bytes.len().saturating_mul(16);
    macro_rules! tiers {
        ($($shift:literal),*) => {
            $(
                if claimable <= 1usize << $shift {
                    return finish(bincode::serde::seed_decode_from_slice(
                        seed,
                        bytes,
                        base().with_limit::<{ 1usize << $shift }>(),
                    ), bytes.len());
                }
            )*
        };
    }
    tiers!(12, 16, 20, 24, 28, 32, 36, 40, 44, 48);
    Err(CodecError(format!("cannot decode {} bytes: larger than any frame", bytes.len())))
}

fn finish<T>(
    result: Result<(T, usize), bincode::error::DecodeError>,
    len: usize,
) -> Result<T, CodecError> {
    match result {
        Ok((value, used)) if used == len => Ok(value),
        Ok((_, used)) => Err(CodecError(format!(
            "cannot decode {}: {} trailing bytes after the value",
            std::any::type_name::<T>(),
            len - used
        ))),
        Err(e) => Err(CodecError(format!("cannot decode {}: {e}", std::any::type_name::<T>()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips() {
        let value = (7u64, String::from("seven"), vec![1u8, 2, 3], Some(-1i32));
        let bytes = encode(&value).unwrap();
        assert_eq!(decode::<(u64, String, Vec<u8>, Option<i32>)>(&bytes).unwrap(), value);
    }

    #[test]
    fn a_nested_encode_leaves_the_outer_side_table_in_place() {
        let large = crate::Bytes::from(vec![1u8; crate::bytes::BLOCK_MIN]);
        let (outer, attachments) = collecting(|| {
            // A task that starts a process of its own, while its result is being collected.
            let (_, inner) = collecting(|| encode(&large));
            assert_eq!(inner.blocks.len(), 1);
            let (_, fds) = collecting_fds(|| encode(&large));
            assert!(fds.is_empty());
            encode(&large)
        });
        assert!(outer.unwrap().len() < 16, "the large buffer went out of band");
        assert_eq!(attachments.blocks.len(), 1);
    }

    #[test]
    fn a_probe_inside_an_encode_adds_no_blocks_to_it() {
        let large = crate::Bytes::from(vec![1u8; crate::bytes::BLOCK_MIN]);
        let (_, attachments) = collecting(|| fds_in(&large));
        assert!(attachments.blocks.is_empty());
    }

    #[test]
    fn small_varints_that_grow_in_memory_decode() {
        // One byte per element on the wire, 8 or 16 bytes each in memory: the limit must allow
        // for that growth at every size, including just below a tier boundary.
        for len in [10, 255, 4000, 4095, 4096, 70_000] {
            let values: Vec<u64> = (0..len).map(|i| i % 100).collect();
            assert_eq!(decode::<Vec<u64>>(&encode(&values).unwrap()).unwrap(), values);
            let wide: Vec<u128> = (0..len).map(|i| (i % 100) as u128).collect();
            assert_eq!(decode::<Vec<u128>>(&encode(&wide).unwrap()).unwrap(), wide);
        }
    }

    #[test]
    fn rejects_trailing_bytes() {
        let mut bytes = encode(&5u32).unwrap();
        bytes.push(0);
        let err = decode::<u32>(&bytes).unwrap_err();
        assert!(err.to_string().contains("trailing"), "{err}");
    }

    #[test]
    fn huge_length_claim_is_an_error_not_an_allocation() {
        // A varint length prefix of u64::MAX (tag 253 + 8 bytes) followed by nothing.
        let mut bytes = vec![253u8];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<String>(&bytes).is_err());
        assert!(decode::<Vec<u64>>(&bytes).is_err());
        // 2^40 claimed: past the limit for a 9-byte input.
        let mut bytes = vec![253u8];
        bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(decode::<String>(&bytes).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<(String, Vec<u64>, Option<(u8, i64)>)>(&bytes);
            let _ = decode::<Vec<String>>(&bytes);
            let _ = decode::<crate::wire::ToParent>(&bytes);
            let _ = decode::<crate::wire::Start>(&bytes);
        }
    }
}
