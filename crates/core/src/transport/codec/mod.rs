//! The value codec: serde's data model over bincode's primitives, behind a few functions so
//! that the format can be replaced.
//!
//! `ser` and `de` map serde's shapes the way bincode's own serde support does (varint
//! integers, length-prefixed strings and sequences, variant indices), with two differences
//! that matter for speed. A slice of plain numbers is written whole and read back into a
//! `Vec` in one copy (`packed`). And a decode needs no byte limit: the input is always a
//! slice in memory, so every length is checked against the bytes actually left before
//! anything is allocated for it (bincode's own decoder allocates a claimed string length
//! first, and with a limit, pays for counting on every element).
//!
//! Descriptors and large [`Bytes`](crate::Bytes) travel beside the encoded bytes, through the
//! thread-local side tables below.

mod de;
mod packed;
mod ser;

use std::cell::RefCell;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use serde::Serialize;
use serde::de::{DeserializeOwned, DeserializeSeed};

/// How deeply compound values (options, newtypes, sequences, maps, structs, enum variants) may
/// nest in one encoded value.
///
/// Both halves are recursive, one stack frame or more per level, so bytes from another process
/// that nest a million levels deep would overflow the receiver's stack, which aborts the
/// process rather than unwinding. Past this depth a decode is an error, and so is an encode,
/// so that the sender learns it before the receiver refuses it. It is what serde_json allows
/// twice over, and fits a 2 MiB thread stack in a debug build with room to spare.
pub const MAX_DEPTH: u32 = 256;

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
pub type Block = Arc<crate::transport::buffer::Buffer>;

/// What travels beside a message's bytes: descriptors (SCM_RIGHTS) and large byte blocks.
#[derive(Debug, Default)]
pub struct Attachments {
    /// Duplicates of the descriptors the encoded values hold, in index order.
    pub fds: Vec<OwnedFd>,
    /// The blocks the encoded values refer to, in index order.
    pub blocks: Vec<Block>,
}

impl Attachments {
    /// Refuses a set that one message cannot carry: the kernel passes at most
    /// [`MAX_FDS_PER_MESSAGE`](crate::sys::MAX_FDS_PER_MESSAGE) descriptors per `sendmsg`. A
    /// value holding more is as unsendable as one that does not serialize, and is reported the
    /// same way, before anything is sent.
    pub fn check_fits_one_message(&self) -> Result<(), CodecError> {
        let (count, max) = (self.fds.len(), crate::sys::MAX_FDS_PER_MESSAGE);
        if count > max {
            return Err(CodecError::new(format!(
                "the value holds {count} descriptors; one message carries at most {max}"
            )));
        }
        Ok(())
    }

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

/// Touches this thread's side tables, which registers their destructors with the C runtime.
///
/// A process that forks calls this first (see `child::warm_up`), so that each child finds them
/// registered instead of doing it in its own copy of memory.
pub(crate) fn warm_up() {
    OUTGOING.with(|_| ());
    INCOMING.with(|_| ());
    PROBE.with(|_| ());
}

/// The descriptor numbers that `value` holds (its `Fd`s, `Connection`s, shared memory),
/// found by encoding it into nothing; no descriptor is duplicated.
pub fn fds_in<T: Serialize + ?Sized>(value: &T) -> Vec<RawFd> {
    let mut restore =
        Restore { table: &PROBE, previous: Some(PROBE.with(|c| c.replace(Some(Vec::new())))) };
    let _ = value.serialize(&mut ser::Encoder::new(Discard));
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

/// bincode's settings for the primitives: little-endian varint integers, no limit.
fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Appends the encoding of `value` to `out`.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    encode_with(value, Sink(out))
}

/// Appends the encoding of `value` to `out`, a buffer that holds a small message on the stack.
pub fn encode_into_small<T: Serialize + ?Sized, A: smallvec::Array<Item = u8>>(
    value: &T,
    out: &mut smallvec::SmallVec<A>,
) -> Result<(), CodecError> {
    encode_with(value, SmallSink(out))
}

/// Encodes `value` into `writer`.
fn encode_with<T: Serialize + ?Sized, W: bincode::enc::write::Writer>(
    value: &T,
    writer: W,
) -> Result<(), CodecError> {
    value
        .serialize(&mut ser::Encoder::new(writer))
        .map_err(|e| CodecError(format!("cannot encode {}: {e}", std::any::type_name::<T>())))
}

/// The writer of [`encode_into_small`].
struct SmallSink<'a, A: smallvec::Array<Item = u8>>(&'a mut smallvec::SmallVec<A>);

impl<A: smallvec::Array<Item = u8>> bincode::enc::write::Writer for SmallSink<'_, A> {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// The writer of [`fds_in`]: the bytes go nowhere.
struct Discard;

impl bincode::enc::write::Writer for Discard {
    #[inline]
    fn write(&mut self, _bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        Ok(())
    }
}

/// What [`Sink`] makes room for when it first grows.
const SMALL_VALUE: usize = 32;

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
            // A first write makes room for a small value at once: most are, and growing from
            // nothing one field at a time reallocates twice.
            out.reserve(more.max(SMALL_VALUE.saturating_sub(out.len())));
            return;
        }
        let mut bigger = crate::sys::large_buffer(needed.max(2 * out.capacity()));
        bigger.extend_from_slice(out);
        *out = bigger;
    }
}

impl bincode::enc::write::Writer for Sink<'_> {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.append(bytes);
        Ok(())
    }
}

/// The writer of [`encode_in_pieces`]: hands the bytes on to `out` gathered into pieces of
/// at least [`PIECE`] bytes; a write that large by itself (a packed slice) goes straight from
/// the value's own memory.
struct Pieces<'a> {
    kept: Vec<u8>,
    out: &'a mut dyn FnMut(&[u8]) -> Result<(), String>,
    failure: Option<String>,
}

/// How many bytes [`encode_in_pieces`] gathers before it hands them on.
const PIECE: usize = 1 << 20;

impl Pieces<'_> {
    fn hand_on(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        (self.out)(bytes).map_err(|e| {
            self.failure = Some(e);
            bincode::error::EncodeError::Other("the bytes could not be written on")
        })
    }

    fn flush(&mut self) -> Result<(), bincode::error::EncodeError> {
        if self.kept.is_empty() {
            return Ok(());
        }
        let kept = std::mem::take(&mut self.kept);
        let handed = self.hand_on(&kept);
        self.kept = kept;
        self.kept.clear();
        handed
    }
}

impl bincode::enc::write::Writer for Pieces<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        if bytes.len() >= PIECE {
            self.flush()?;
            return self.hand_on(bytes);
        }
        self.kept.extend_from_slice(bytes);
        if self.kept.len() >= PIECE { self.flush() } else { Ok(()) }
    }
}

/// Hands every byte of the encoding of `value`, in order, to `out`, in pieces, without the
/// whole encoding ever being held in memory: what a large value written into a file costs is
/// then one copy. A failure of `out` stops the encoding and is its error.
pub fn encode_in_pieces<T: Serialize + ?Sized>(
    value: &T,
    out: &mut dyn FnMut(&[u8]) -> Result<(), String>,
) -> Result<(), CodecError> {
    let mut writer = Pieces { kept: Vec::new(), out, failure: None };
    let encoded = value.serialize(&mut ser::Encoder::new(&mut writer));
    let cannot = |e: &dyn fmt::Display| {
        CodecError(format!("cannot encode {}: {e}", std::any::type_name::<T>()))
    };
    if let Some(failure) = writer.failure.take() {
        return Err(cannot(&failure));
    }
    encoded.map_err(|e| cannot(&e))?;
    writer.flush().map_err(|e| cannot(&writer.failure.take().unwrap_or_else(|| e.to_string())))
}

/// The writer of [`encode_below`]: a [`Sink`] that refuses to grow to `limit` bytes.
struct Below<'a> {
    sink: Sink<'a>,
    limit: usize,
    reached: bool,
}

impl bincode::enc::write::Writer for Below<'_> {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        if self.sink.0.len() + bytes.len() >= self.limit {
            self.reached = true;
            return Err(bincode::error::EncodeError::Other("the encoding reached its limit"));
        }
        self.sink.append(bytes);
        Ok(())
    }
}

/// The encoding of `value` if it is shorter than `limit` bytes; `None`, as soon as it is
/// known not to be (the encoding stops there).
pub fn encode_below<T: Serialize + ?Sized>(
    value: &T,
    limit: usize,
) -> Result<Option<Vec<u8>>, CodecError> {
    let mut out = Vec::new();
    let mut writer = Below { sink: Sink(&mut out), limit, reached: false };
    let encoded = value.serialize(&mut ser::Encoder::new(&mut writer));
    match encoded {
        Ok(()) => Ok(Some(out)),
        Err(_) if writer.reached => Ok(None),
        Err(e) => Err(CodecError(format!("cannot encode {}: {e}", std::any::type_name::<T>()))),
    }
}

/// The writer of [`encoded_len`]: counts the bytes.
struct Count(usize);

impl bincode::enc::write::Writer for Count {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0 += bytes.len();
        Ok(())
    }
}

/// How many bytes the encoding of `value` takes, found by encoding it into nothing (a packed
/// slice is counted, not walked). Inside [`collecting`], the descriptors and blocks the value
/// holds are collected as an encoding would, so an encoding made after it refers to them by
/// the same indices.
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> Result<usize, CodecError> {
    let mut count = Count(0);
    value
        .serialize(&mut ser::Encoder::new(&mut count))
        .map_err(|e| CodecError(format!("cannot encode {}: {e}", std::any::type_name::<T>())))?;
    Ok(count.0)
}

/// The encoding of `value`.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    // Nothing allocated before the first byte (the encoding of `()` has none): a task run in a
    // freshly forked child that returns nothing allocates nothing, where every page the
    // allocator touches would be a copy-on-write fault.
    let mut out = Vec::new();
    encode_into(value, &mut out)?;
    Ok(out)
}

/// Decodes a `T` that must fill `bytes` exactly.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    decode_seed(std::marker::PhantomData::<T>, bytes)
}

/// Bytes that another process is still writing, in order, and that it says how far it has
/// got with: what a decoder reads behind the writer (see [`Input::arriving`]).
pub trait Arrival {
    /// Waits until at least the first `len` bytes are in place and returns how many are (at
    /// least `len`); fails when they never will be (the writer failed, or went away).
    fn wait_for(&self, len: usize) -> Result<usize, String>;
}

/// The encoded bytes a value is decoded from: all in place, or still arriving.
#[derive(Clone, Copy)]
pub struct Input<'a> {
    bytes: &'a [u8],
    arrival: Option<&'a dyn Arrival>,
}

impl<'a> Input<'a> {
    /// Bytes that are all in place.
    pub fn whole(bytes: &'a [u8]) -> Self {
        Input { bytes, arrival: None }
    }

    /// `bytes`, the whole encoding, of which the decoder reads only what `arrival` says is in
    /// place, waiting for the rest as it needs it: a large value decodes behind its writer
    /// instead of after it, and a packed vector is copied piece by piece as it arrives.
    pub fn arriving(bytes: &'a [u8], arrival: &'a dyn Arrival) -> Self {
        Input { bytes, arrival: Some(arrival) }
    }
}

/// Decodes a `T` that must fill `input` exactly.
pub fn decode_input<T: DeserializeOwned>(input: Input<'_>) -> Result<T, CodecError> {
    decode_from(std::marker::PhantomData::<T>, de::Decoder::with_input(input))
}

/// Decodes through `seed` (which may, say, push elements straight into an existing buffer);
/// the value must fill `bytes` exactly.
pub fn decode_seed<'de, S: DeserializeSeed<'de>>(
    seed: S,
    bytes: &'de [u8],
) -> Result<S::Value, CodecError> {
    decode_from(seed, de::Decoder::new(bytes))
}

/// Runs `seed` over what `decoder` reads, which the value must fill exactly.
fn decode_from<'de, S: DeserializeSeed<'de>>(
    seed: S,
    mut decoder: de::Decoder<'de>,
) -> Result<S::Value, CodecError> {
    let what = || std::any::type_name::<S::Value>();
    let value = seed
        .deserialize(&mut decoder)
        .map_err(|e| CodecError(format!("cannot decode {}: {e}", what())))?;
    match decoder.left() {
        0 => Ok(value),
        left => Err(CodecError(format!(
            "cannot decode {}: {left} trailing bytes after the value",
            what()
        ))),
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
        let large = crate::Bytes::from(vec![1u8; crate::transport::bytes::BLOCK_MIN]);
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
        let large = crate::Bytes::from(vec![1u8; crate::transport::bytes::BLOCK_MIN]);
        let (_, attachments) = collecting(|| fds_in(&large));
        assert!(attachments.blocks.is_empty());
    }

    /// A value that nests as deep as its bytes say.
    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    enum Tree {
        Leaf,
        Node(Box<Tree>),
    }

    fn tree(depth: usize) -> Tree {
        (0..depth).fold(Tree::Leaf, |tree, _| Tree::Node(Box::new(tree)))
    }

    #[test]
    fn a_million_levels_of_nesting_is_a_decode_error_not_a_stack_overflow() {
        // Variant 1 (`Node`) a million times, then variant 0 (`Leaf`): about 1 MB of bytes.
        let mut bytes = vec![1u8; 1_000_000];
        bytes.push(0);
        let err = decode::<Tree>(&bytes).unwrap_err();
        assert!(err.to_string().contains("nests deeper than 256 levels"), "{err}");
        // The same through every other compound shape that recurses.
        let nested_options = vec![1u8; 1_000_000];
        assert!(decode::<Option<Box<Option<Box<Option<u8>>>>>>(&nested_options).is_err());
    }

    #[test]
    fn nesting_up_to_the_bound_round_trips_and_past_it_fails_to_encode() {
        // Each `Node` is one level (its field); the test thread has libtest's 2 MiB stack.
        let deepest = MAX_DEPTH as usize;
        let bytes = encode(&tree(deepest)).unwrap();
        assert_eq!(decode::<Tree>(&bytes).unwrap(), tree(deepest));
        let err = encode(&tree(deepest + 1)).unwrap_err();
        assert!(err.to_string().contains("nests deeper"), "{err}");
        // Siblings do not add up: only depth counts.
        let wide: Vec<Vec<u32>> = vec![vec![1, 2]; 10_000];
        assert_eq!(decode::<Vec<Vec<u32>>>(&encode(&wide).unwrap()).unwrap(), wide);
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
        // 2^40 claimed, 9 bytes at hand.
        let mut bytes = vec![253u8];
        bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(decode::<String>(&bytes).is_err());
    }

    #[test]
    fn everything_but_a_slice_of_numbers_is_laid_out_as_bincode_lays_it_out() {
        #[derive(Serialize)]
        enum Shape {
            Unit,
            Pair(i16, char),
            Named { text: String, set: std::collections::BTreeSet<u32> },
        }
        let value = (
            Some(u128::MAX),
            [
                Shape::Unit,
                Shape::Pair(-300, 'é'),
                Shape::Named { text: "x".into(), set: [1, 2].into() },
            ],
            std::collections::BTreeMap::from([(1u8, vec!["a".to_owned()])]),
            ((), -1.5f32, false, std::collections::VecDeque::from([70_000u64])),
        );
        let theirs = bincode::serde::encode_to_vec(&value, config()).unwrap();
        assert_eq!(encode(&value).unwrap(), theirs);
    }

    #[test]
    fn a_slice_of_numbers_is_written_whole() {
        let bytes = encode(&vec![7u8; 1000]).unwrap();
        // PACKED, the kind, 1000 as a varint (251 then two bytes), the elements.
        assert_eq!(bytes.len(), 1 + 1 + 3 + 1000);
        assert_eq!(&bytes[..2], &[packed::PACKED, packed::Kind::U8 as u8]);
        let wide = encode(&[1u64, 2, 3][..]).unwrap();
        assert_eq!(wide.len(), 1 + 1 + 1 + 24);
    }

    #[test]
    fn packed_sequences_round_trip_for_every_number_type() {
        fn round_trip<T>(values: Vec<T>)
        where
            T: Serialize + serde::de::DeserializeOwned + PartialEq + fmt::Debug,
        {
            assert_eq!(decode::<Vec<T>>(&encode(&values).unwrap()).unwrap(), values);
            let boxed: Box<[T]> = values.into_boxed_slice();
            assert_eq!(decode::<Box<[T]>>(&encode(&boxed).unwrap()).unwrap(), boxed);
        }
        round_trip(vec![0u8, 255, 7]);
        round_trip(vec![u16::MAX, 1]);
        round_trip(vec![u32::MAX, 1]);
        round_trip(vec![u64::MAX, 1]);
        round_trip(vec![u128::MAX, 1]);
        round_trip(vec![i8::MIN, -1]);
        round_trip(vec![i16::MIN, -1]);
        round_trip(vec![i32::MIN, -1]);
        round_trip(vec![i64::MIN, -1]);
        round_trip(vec![i128::MIN, -1]);
        round_trip(vec![f32::MIN_POSITIVE, -0.0]);
        round_trip(vec![f64::MAX, f64::INFINITY]);
        round_trip(vec![usize::MAX, 0]);
        round_trip(vec![isize::MIN, 0]);
        round_trip(Vec::<u64>::new());
    }

    #[test]
    fn a_packed_sequence_decodes_into_any_type_that_takes_its_elements() {
        let bytes = encode(&vec![1u32, 2, 300]).unwrap();
        assert_eq!(decode::<std::collections::VecDeque<u32>>(&bytes).unwrap(), [1, 2, 300]);
        assert_eq!(decode::<Vec<u64>>(&bytes).unwrap(), [1, 2, 300]);
        assert_eq!(decode::<Vec<i128>>(&bytes).unwrap(), [1, 2, 300]);
        assert_eq!(decode::<std::collections::BTreeSet<u32>>(&bytes).unwrap(), [1, 2, 300].into());
        // A narrower type takes what fits, and says what does not.
        let err = decode::<Vec<u8>>(&bytes).unwrap_err();
        assert!(err.to_string().contains("300"), "{err}");
        // Written element by element, read into a Vec: the same values.
        let deque = std::collections::VecDeque::from([5u16, 6]);
        assert_eq!(decode::<Vec<u16>>(&encode(&deque).unwrap()).unwrap(), [5, 6]);
    }

    #[test]
    fn a_vec_of_bytes_still_reads_as_a_byte_string() {
        /// What `serde_bytes::ByteBuf` is: a byte string read through `deserialize_byte_buf`.
        #[derive(Debug)]
        struct ByteString(Vec<u8>);
        impl<'de> serde::Deserialize<'de> for ByteString {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Visit;
                impl serde::de::Visitor<'_> for Visit {
                    type Value = ByteString;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("bytes")
                    }
                    fn visit_bytes<E>(self, bytes: &[u8]) -> Result<ByteString, E> {
                        Ok(ByteString(bytes.to_vec()))
                    }
                }
                d.deserialize_byte_buf(Visit)
            }
        }
        let bytes = encode(&vec![1u8, 2, 3]).unwrap();
        assert_eq!(decode::<ByteString>(&bytes).unwrap().0, [1, 2, 3]);
        let err = decode::<ByteString>(&encode(&vec![1u16, 2]).unwrap()).unwrap_err();
        assert!(err.to_string().contains("packed U16"), "{err}");
        // And the other way: a byte string reads as a Vec<u8>.
        let written = encode(&Inline(&[4, 5])).unwrap();
        assert_eq!(decode::<Vec<u8>>(&written).unwrap(), [4, 5]);
    }

    /// A byte string written through `serialize_bytes`.
    struct Inline<'a>(&'a [u8]);

    impl Serialize for Inline<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    #[test]
    fn an_encoding_in_pieces_is_the_encoding_in_order() {
        // A large packed vector inside a struct, with small fields around it.
        let large = (7u8, (0..1_000_000u64).collect::<Vec<_>>(), String::from("tail"));
        let mut pieces: Vec<usize> = Vec::new();
        let mut out = Vec::new();
        let mut collect = |piece: &[u8]| -> Result<(), String> {
            pieces.push(piece.len());
            out.extend_from_slice(piece);
            Ok(())
        };
        encode_in_pieces(&large, &mut collect).unwrap();
        assert_eq!(out, encode(&large).unwrap());
        assert_eq!(encoded_len(&large).unwrap(), out.len());
        assert!(pieces.len() >= 2, "the head, then the vector's bytes: {pieces:?}");
        let mut failing = |_: &[u8]| -> Result<(), String> { Err("disk full".into()) };
        let error = encode_in_pieces(&large, &mut failing).unwrap_err();
        assert!(error.to_string().contains("disk full"), "{error}");
    }

    #[test]
    fn an_encoding_below_a_limit_is_whole_or_none() {
        let small = vec![1u32, 2, 3];
        assert_eq!(encode_below(&small, 1 << 10).unwrap(), Some(encode(&small).unwrap()));
        let large = (0..1_000u64).map(|i| i.to_string()).collect::<Vec<_>>();
        assert_eq!(encode_below(&large, 1 << 10).unwrap(), None);
        assert_eq!(encode_below(&large, 1 << 20).unwrap(), Some(encode(&large).unwrap()));
        assert_eq!(encoded_len(&small).unwrap(), encode(&small).unwrap().len());
    }

    #[test]
    fn lying_packed_headers_are_errors_not_allocations() {
        let mut bytes = encode(&vec![1u64; 4]).unwrap();
        bytes.truncate(bytes.len() - 1);
        assert!(decode::<Vec<u64>>(&bytes).unwrap_err().to_string().contains("packed elements"));
        // 2^61 u64s claimed: the size overflows.
        let mut bytes = vec![packed::PACKED, packed::Kind::U64 as u8, 253];
        bytes.extend_from_slice(&(1u64 << 61).to_le_bytes());
        assert!(decode::<Vec<u64>>(&bytes).is_err());
        assert!(decode::<std::collections::VecDeque<u64>>(&bytes).is_err());
        let bytes = [packed::PACKED, 0, 0];
        assert!(decode::<Vec<u64>>(&bytes).unwrap_err().to_string().contains("kind 0"));
    }

    #[test]
    fn an_endless_sequence_of_empty_elements_is_refused() {
        let mut bytes = vec![253u8];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<Vec<()>>(&bytes).unwrap_err().to_string().contains("elements"));
        // An honest one decodes.
        assert_eq!(decode::<Vec<()>>(&encode(&vec![(); 1000]).unwrap()).unwrap().len(), 1000);
    }

    proptest! {
        #[test]
        fn numbers_round_trip_packed_and_element_by_element(
            values in proptest::collection::vec(any::<i64>(), 0..300),
        ) {
            let bytes = encode(&values).unwrap();
            prop_assert_eq!(&decode::<Vec<i64>>(&bytes).unwrap(), &values);
            let deque = decode::<std::collections::VecDeque<i64>>(&bytes).unwrap();
            prop_assert!(deque.iter().eq(values.iter()));
            let floats: Vec<f64> = values.iter().map(|v| *v as f64).collect();
            prop_assert_eq!(decode::<Vec<f64>>(&encode(&floats).unwrap()).unwrap(), floats);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<(Vec<u16>, std::collections::VecDeque<u64>)>(&bytes);
            let _ = decode::<(String, Vec<u64>, Option<(u8, i64)>)>(&bytes);
            let _ = decode::<Vec<String>>(&bytes);
            let _ = decode::<crate::transport::wire::ToParent>(&bytes);
            let _ = decode::<crate::transport::wire::Start>(&bytes);
        }
    }
}
