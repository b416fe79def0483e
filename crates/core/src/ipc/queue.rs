//! [`Queue`] and [`JoinableQueue`]: multi-producer, multi-consumer queues of serde values shared
//! by any number of processes (Python's `multiprocessing.Queue` and `JoinableQueue`).
//!
//! A queue is a `SOCK_SEQPACKET` socket pair plus one page of shared counters. Every `put` is one
//! `sendmsg` of a whole record, and every `get` one `recvmsg` of a whole record, so the kernel
//! keeps messages from many producers apart and hands each to exactly one consumer; no lock is
//! taken around the socket. There is no feeder thread either: `put` returns once the message is
//! in the kernel, so a process that exits right after a `put` loses nothing (Python's queue may
//! lose it, or hang the exit, while its feeder thread flushes).
//!
//! When the socket is full, records without descriptors go to an overflow log in shared memory
//! (`overflow`), so an unbounded queue's `put` never waits for a consumer, and what it put is
//! still safe from the producer's exit.
//!
//! A record carries up to [`INLINE_MAX`] bytes inline; a larger message is written to a sealed
//! memory file that travels beside the record, so message size is not limited by the socket
//! buffer. Descriptors inside a value ([`crate::Fd`], connections, shared memory) travel with
//! it.
//!
//! The shared page holds the capacity and free slots of a bounded queue (a counting semaphore
//! on a futex, so `put` blocks while the queue is full), the approximate length, and a joinable
//! queue's count of unfinished items. A queue is freed when the last process holding it drops
//! it or exits.

use std::fmt;
use std::io::{self, IoSlice};
use std::marker::PhantomData;
use std::ops::Deref;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, ErrorKind, Result};
use crate::ipc::overflow::{self, Overflow};
use crate::process::tracked;
use crate::shared::shm::{SealedMemory, SharedMemory};
use crate::sys::{self, Mapping, POLLIN, POLLOUT, PollFd};
use crate::transport::codec;
use crate::transport::fd::Fd;

/// The largest encoded message sent inline in a record; larger ones travel in a sealed memory
/// file.
pub const INLINE_MAX: usize = 32 * 1024;

/// First byte of a record: the message follows inline.
const TAG_INLINE: u8 = 0;
/// First byte of a record: the message is in the memory file passed as the record's last fd.
const TAG_SPILLED: u8 = 1;
/// A record that carries no message: it wakes a consumer waiting on the socket, to look in the
/// overflow log.
const TAG_NUDGE: u8 = 2;

/// Words of the shared control page.
const MAGIC: usize = 0;
const CAPACITY: usize = 1;
const FREE: usize = 2;
const FREE_WAITERS: usize = 3;
const UNFINISHED: usize = 4;
const JOIN_WAITERS: usize = 5;
const LENGTH: usize = 6;
const JOINABLE: usize = 7;
/// The overflow log's words start here.
const OVERFLOW: usize = 8;
const WORDS: usize = OVERFLOW + overflow::WORDS;

/// Marks a control page of this layout ("MPQ2").
const PAGE_MAGIC: u32 = 0x4d50_5132;

thread_local! {
    /// Where `get` receives records: one buffer per thread, reused.
    static RECORD: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A queue of `T` values that many processes can put to and get from.
///
/// `Clone` gives another handle to the same queue in this process; passing it to a child (as an
/// argument, inside a message, in a pool item) gives the child one too.
pub struct Queue<T> {
    shared: Arc<Shared>,
    _messages: PhantomData<fn(T) -> T>,
}

/// A [`Queue`] that also counts unfinished items: every `put` adds one, every
/// [`task_done`](Self::task_done) takes one away, and [`join`](Self::join) waits for zero.
///
/// It dereferences to [`Queue`] for `put` and `get`.
pub struct JoinableQueue<T> {
    queue: Queue<T>,
}

/// The descriptors and counters behind every handle to one queue in this process.
struct Shared {
    /// Producers write records here...
    put_end: OwnedFd,
    /// ...and consumers read them here.
    get_end: OwnedFd,
    control: SharedMemory,
    /// The overflow log's memory file...
    log_file: OwnedFd,
    /// ...and this process's mapping of it, made when first needed (`None` if it could not
    /// be: the queue then waits for room in its socket, as a bounded kernel buffer makes it).
    log_map: OnceLock<Option<Mapping>>,
    /// An eventfd written whenever a slot is freed or the unfinished count reaches zero while
    /// someone waits: async waiters watch it through the runtime's reactor (futex waiters need
    /// no descriptor). Never read, so that every write wakes every watcher.
    bell: OwnedFd,
}

/// Why [`Queue::try_put`] failed.
#[derive(Debug)]
pub enum TryPutError {
    /// The queue holds its capacity (or the socket buffer is full).
    Full,
    /// The value could not be encoded, or the socket failed.
    Failed(Error),
}

/// Why [`Queue::put_timeout`] failed.
#[derive(Debug)]
pub enum PutTimeoutError {
    /// The queue stayed full until the timeout.
    Timeout,
    /// The value could not be encoded, or the socket failed.
    Failed(Error),
}

/// Why [`Queue::try_get`] failed.
#[derive(Debug)]
pub enum TryGetError {
    /// No message is waiting.
    Empty,
    /// A message did not decode (it is consumed), or the socket failed.
    Failed(Error),
}

/// Why [`Queue::get_timeout`] failed.
#[derive(Debug)]
pub enum GetTimeoutError {
    /// No message arrived in time.
    Timeout,
    /// A message did not decode (it is consumed), or the socket failed.
    Failed(Error),
}

/// A put or get that did not complete, before it is cast into the caller's error type.
enum NotDone {
    /// The deadline passed: the queue stayed full, or empty.
    Deadline,
    Failed(Error),
}

impl<T> Queue<T> {
    /// An unbounded queue: `put` never waits for room (only a message that holds descriptors
    /// waits, while the socket is full: descriptors cannot go to the overflow log).
    pub fn new() -> Result<Self> {
        Self::create(0, false)
    }

    /// A queue that holds at most `capacity` messages; `put` blocks while it is full.
    pub fn bounded(capacity: usize) -> Result<Self> {
        match u32::try_from(capacity) {
            Ok(capacity) if capacity > 0 => Self::create(capacity, false),
            _ => Err(Error::new(
                ErrorKind::InvalidState,
                format!("a queue's capacity must be 1..={}, not {capacity}", u32::MAX),
            )),
        }
    }

    fn create(capacity: u32, joinable: bool) -> Result<Self> {
        let (put_end, get_end) =
            sys::seqpacket_pair().map_err(|e| Error::io("socketpair for a queue", e))?;
        let control = SharedMemory::new(WORDS * 4)?;
        let log_file = sys::memfd("multiproc-queue-log", 0)
            .map_err(|e| Error::io("memfd for a queue's overflow log", e))?;
        let bell = sys::eventfd().map_err(|e| Error::io("eventfd for a queue", e))?;
        let words = control.atomic_words();
        words[CAPACITY].store(capacity, SeqCst);
        words[FREE].store(capacity, SeqCst);
        words[JOINABLE].store(joinable.into(), SeqCst);
        words[MAGIC].store(PAGE_MAGIC, SeqCst);
        Ok(Self::from_shared(Shared {
            put_end,
            get_end,
            control,
            log_file,
            log_map: OnceLock::new(),
            bell,
        }))
    }

    fn from_shared(shared: Shared) -> Self {
        tracked::track(shared.put_end.as_raw_fd());
        tracked::track(shared.get_end.as_raw_fd());
        Queue { shared: Arc::new(shared), _messages: PhantomData }
    }

    /// The most messages the queue holds; `None` when unbounded.
    pub fn capacity(&self) -> Option<usize> {
        match self.word(CAPACITY).load(SeqCst) {
            0 => None,
            capacity => Some(capacity as usize),
        }
    }

    /// How many messages are in the queue: approximate while other processes put and get.
    pub fn len(&self) -> usize {
        self.word(LENGTH).load(SeqCst) as usize
    }

    /// Whether the queue is empty: approximate while other processes put and get.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The consumers' socket: readable when a record is waiting.
    pub(crate) fn get_fd(&self) -> BorrowedFd<'_> {
        self.shared.get_end.as_fd()
    }

    fn word(&self, index: usize) -> &AtomicU32 {
        &self.shared.control.atomic_words()[index]
    }

    fn joinable(&self) -> bool {
        self.word(JOINABLE).load(SeqCst) != 0
    }

    /// The overflow log, mapped in this process on first use.
    fn overflow(&self) -> Option<Overflow<'_>> {
        let shared = &*self.shared;
        let file = shared.log_file.as_fd();
        let map = shared
            .log_map
            .get_or_init(|| Mapping::reserved(file, overflow::RESERVED).ok())
            .as_ref()?;
        Some(Overflow::new(&shared.control.atomic_words()[OVERFLOW..], file, map))
    }

    /// Wakes a consumer that waits on the socket alone, to look in the overflow log. A socket
    /// too full to take the nudge has readers awake already.
    fn nudge(&self) {
        let sock = self.shared.put_end.as_fd();
        let _ = sys::send_with_fds(sock, &[IoSlice::new(&[TAG_NUDGE])], &[], true);
    }
}

impl<T: Serialize + DeserializeOwned> Queue<T> {
    /// Puts `value` (and the descriptors it holds) at the back of the queue; blocks while the
    /// queue is full. When it returns, the message is in the kernel: it survives this process.
    pub fn put(&self, value: &T) -> Result<()> {
        self.put_until(value, None).map_err(|e| match e {
            NotDone::Failed(e) => e,
            NotDone::Deadline => unreachable!("no deadline"),
        })
    }

    /// Puts `value` if there is room now; never blocks.
    pub fn try_put(&self, value: &T) -> std::result::Result<(), TryPutError> {
        self.put_until(value, Some(Instant::now())).map_err(|e| match e {
            NotDone::Deadline => TryPutError::Full,
            NotDone::Failed(e) => TryPutError::Failed(e),
        })
    }

    /// Puts `value`, waiting at most `timeout` for room.
    pub fn put_timeout(
        &self,
        value: &T,
        timeout: Duration,
    ) -> std::result::Result<(), PutTimeoutError> {
        self.put_until(value, Some(Instant::now() + timeout)).map_err(|e| match e {
            NotDone::Deadline => PutTimeoutError::Timeout,
            NotDone::Failed(e) => PutTimeoutError::Failed(e),
        })
    }

    /// Takes the message at the front of the queue, waiting for one as long as it takes.
    ///
    /// A queue never reports that its producers are gone (any process holding it may still
    /// put); use [`get_timeout`](Self::get_timeout) for a deadline.
    pub fn get(&self) -> Result<T> {
        self.get_until(None).map_err(|e| match e {
            NotDone::Failed(e) => e,
            NotDone::Deadline => unreachable!("no deadline"),
        })
    }

    /// Takes a message if one is waiting; never blocks.
    pub fn try_get(&self) -> std::result::Result<T, TryGetError> {
        self.get_until(Some(Instant::now())).map_err(|e| match e {
            NotDone::Deadline => TryGetError::Empty,
            NotDone::Failed(e) => TryGetError::Failed(e),
        })
    }

    /// Takes a message, waiting at most `timeout` for one.
    pub fn get_timeout(&self, timeout: Duration) -> std::result::Result<T, GetTimeoutError> {
        self.get_until(Some(Instant::now() + timeout)).map_err(|e| match e {
            NotDone::Deadline => GetTimeoutError::Timeout,
            NotDone::Failed(e) => GetTimeoutError::Failed(e),
        })
    }

    fn put_until(&self, value: &T, deadline: Option<Instant>) -> std::result::Result<(), NotDone> {
        let (record, fds) = codec::collecting_fds(|| {
            let mut record = vec![TAG_INLINE];
            codec::encode_into(value, &mut record).map(|()| record)
        });
        let record = record.map_err(|e| {
            NotDone::Failed(Error::new(ErrorKind::Encode, format!("queue message: {e}")))
        })?;
        // A large message with descriptors goes to a memory file now; one without may go to
        // the overflow log whole instead (`send_or_log`).
        let (record, fds) = if !fds.is_empty() && record.len() - 1 > INLINE_MAX {
            spill(&record[1..], fds).map_err(NotDone::Failed)?
        } else {
            (record, fds)
        };
        if !self.acquire_slot(deadline).map_err(NotDone::Failed)? {
            return Err(NotDone::Deadline);
        }
        if self.joinable() {
            self.word(UNFINISHED).fetch_add(1, SeqCst);
        }
        self.word(LENGTH).fetch_add(1, SeqCst);
        let sent = if fds.is_empty() {
            self.send_or_log(record, deadline)
        } else {
            self.send_record(record, fds, deadline)
        };
        if sent.is_err() {
            self.word(LENGTH).fetch_sub(1, SeqCst);
            if self.joinable() {
                self.finish_one();
            }
            self.release_slot();
        }
        sent
    }

    /// Sends a record without descriptors to the socket if it has room now and the overflow log
    /// is empty, else appends it to the log: never waits for a consumer.
    ///
    /// While the log holds records, every producer appends to it, and consumers take from the
    /// socket first: so one producer's messages are taken in the order it put them.
    fn send_or_log(
        &self,
        record: Vec<u8>,
        deadline: Option<Instant>,
    ) -> std::result::Result<(), NotDone> {
        let Some(log) = self.overflow() else {
            return self.send_record(record, Vec::new(), deadline);
        };
        if log.count() == 0 {
            let (first, fds) = if record.len() - 1 > INLINE_MAX {
                spill(&record[1..], Vec::new()).map_err(NotDone::Failed)?
            } else {
                (record.clone(), Vec::new())
            };
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
            let sock = self.shared.put_end.as_fd();
            match sys::send_with_fds(sock, &[IoSlice::new(&first)], &borrowed, true) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || sys::is_message_too_long(&e) => {
                }
                Err(e) => return Err(NotDone::Failed(Error::io("queue put", e))),
            }
        }
        match log.push(&record) {
            Ok(Some(was_empty)) => {
                if was_empty {
                    self.nudge();
                }
                Ok(())
            }
            // Past what the log can hold: wait for room in the socket instead.
            Ok(None) => self.send_record(record, Vec::new(), deadline),
            Err(e) => Err(NotDone::Failed(Error::io("queue overflow log", e))),
        }
    }

    /// Sends one record, waiting for room in the socket until `deadline`; an inline record the
    /// socket can never take whole is spilled to memory and sent again.
    fn send_record(
        &self,
        mut record: Vec<u8>,
        mut fds: Vec<OwnedFd>,
        deadline: Option<Instant>,
    ) -> std::result::Result<(), NotDone> {
        let sock = self.shared.put_end.as_fd();
        loop {
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
            let sent =
                sys::send_with_fds(sock, &[IoSlice::new(&record)], &borrowed, deadline.is_some());
            drop(borrowed);
            match sent {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !wait_ready(sock, POLLOUT, deadline).map_err(NotDone::Failed)? {
                        return Err(NotDone::Deadline);
                    }
                }
                Err(e) if sys::is_message_too_long(&e) && record[0] == TAG_INLINE => {
                    (record, fds) = spill(&record[1..], fds).map_err(NotDone::Failed)?;
                }
                Err(e) => return Err(NotDone::Failed(Error::io("queue put", e))),
            }
        }
    }

    fn get_until(&self, deadline: Option<Instant>) -> std::result::Result<T, NotDone> {
        let sock = self.shared.get_end.as_fd();
        RECORD.with_borrow_mut(|record| {
            loop {
                record.clear();
                let mut fds = Vec::new();
                let received = sys::recv_into_vec(sock, record, INLINE_MAX + 1, &mut fds, true)
                    .and_then(sys::Received::whole);
                match received {
                    Ok(0) => {
                        return Err(NotDone::Failed(Error::new(
                            ErrorKind::Protocol,
                            "queue: an empty record (the queue's socket was shut down)",
                        )));
                    }
                    // A nudge: look again, in the socket and then in the log.
                    Ok(1) if record[0] == TAG_NUDGE => {}
                    Ok(_) => {
                        // Saturating: a record some process wrote without `put` must not wrap
                        // the count.
                        let _ =
                            self.word(LENGTH).fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1));
                        self.release_slot();
                        return self.decode(record, fds).map_err(NotDone::Failed);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // The socket is empty: what overflowed comes next.
                        if let Some(log) = self.overflow().filter(|log| log.count() > 0) {
                            match log.pop(record) {
                                Ok(Some(more)) => {
                                    if more {
                                        // Pass the wake-up on, for the next record.
                                        self.nudge();
                                    }
                                    let _ = self
                                        .word(LENGTH)
                                        .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1));
                                    self.release_slot();
                                    return self
                                        .decode(record, Vec::new())
                                        .map_err(NotDone::Failed);
                                }
                                Ok(None) => {}
                                Err(e) => {
                                    return Err(NotDone::Failed(Error::io(
                                        "queue overflow log",
                                        e,
                                    )));
                                }
                            }
                        }
                        if !wait_ready(sock, POLLIN, deadline).map_err(NotDone::Failed)? {
                            return Err(NotDone::Deadline);
                        }
                    }
                    Err(e) => return Err(NotDone::Failed(Error::io("queue get", e))),
                }
            }
        })
    }

    /// Decodes a received record; a message that does not decode is consumed, and counts as
    /// done in a joinable queue (nobody received an item to finish).
    fn decode(&self, record: &[u8], mut fds: Vec<OwnedFd>) -> Result<T> {
        let decoded = match record[0] {
            TAG_INLINE => {
                codec::with_fds(fds, || codec::decode::<T>(&record[1..])).map_err(|e| e.to_string())
            }
            TAG_SPILLED => match fds.pop().map(SealedMemory::from_fd) {
                Some(Ok(memory)) => codec::with_fds(fds, || codec::decode::<T>(memory.as_slice()))
                    .map_err(|e| e.to_string()),
                Some(Err(e)) => Err(e.to_string()),
                None => Err("a spilled message without its memory".to_owned()),
            },
            tag => Err(format!("unknown record tag {tag}")),
        };
        decoded.map_err(|message| {
            if self.joinable() {
                self.finish_one();
            }
            Error::new(ErrorKind::Decode, format!("queue message did not decode: {message}"))
        })
    }

    /// Takes a free slot of a bounded queue, waiting until `deadline`; `false` if it passed.
    fn acquire_slot(&self, deadline: Option<Instant>) -> Result<bool> {
        if self.capacity().is_none() {
            return Ok(true);
        }
        let (free, waiters) = (self.word(FREE), self.word(FREE_WAITERS));
        loop {
            let slots = free.load(SeqCst);
            if slots > 0 {
                if free.compare_exchange(slots, slots - 1, SeqCst, SeqCst).is_ok() {
                    return Ok(true);
                }
                continue;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
            // Registering before the second look means a release either is seen here or sees
            // this waiter and wakes it.
            waiters.fetch_add(1, SeqCst);
            let slept =
                if free.load(SeqCst) == 0 { sys::futex_wait(free, 0, deadline) } else { Ok(true) };
            waiters.fetch_sub(1, SeqCst);
            slept.map_err(|e| Error::io("futex wait for room in a queue", e))?;
        }
    }

    /// Returns a slot taken by [`acquire_slot`](Self::acquire_slot).
    fn release_slot(&self) {
        if self.capacity().is_none() {
            return;
        }
        self.word(FREE).fetch_add(1, SeqCst);
        if self.word(FREE_WAITERS).load(SeqCst) > 0 {
            sys::futex_wake(self.word(FREE), 1);
            sys::eventfd_add_one(self.shared.bell.as_fd());
        }
    }
}

impl<T> Queue<T> {
    /// Takes one from the unfinished count, waking joiners at zero; an error if it is zero.
    fn finish_one(&self) -> bool {
        let unfinished = self.word(UNFINISHED);
        let mut count = unfinished.load(SeqCst);
        loop {
            if count == 0 {
                return false;
            }
            match unfinished.compare_exchange(count, count - 1, SeqCst, SeqCst) {
                Ok(_) => break,
                Err(now) => count = now,
            }
        }
        if count == 1 && self.word(JOIN_WAITERS).load(SeqCst) > 0 {
            sys::futex_wake(unfinished, u32::MAX);
            sys::eventfd_add_one(self.shared.bell.as_fd());
        }
        true
    }

    /// Waits until the unfinished count is zero or `deadline` passes; `false` if it passed.
    fn join_until(&self, deadline: Option<Instant>) -> Result<bool> {
        let (unfinished, waiters) = (self.word(UNFINISHED), self.word(JOIN_WAITERS));
        loop {
            if unfinished.load(SeqCst) == 0 {
                return Ok(true);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
            waiters.fetch_add(1, SeqCst);
            let count = unfinished.load(SeqCst);
            let slept =
                if count != 0 { sys::futex_wait(unfinished, count, deadline) } else { Ok(true) };
            waiters.fetch_sub(1, SeqCst);
            slept.map_err(|e| Error::io("futex wait in a queue's join", e))?;
        }
    }
}

/// Counts an async waiter in a waiters word of the control page while it lives, so that the
/// side that frees a slot or finishes the last item rings the bell.
#[cfg(feature = "tokio")]
struct Waiting<'a>(&'a AtomicU32);

#[cfg(feature = "tokio")]
impl<'a> Waiting<'a> {
    fn new(word: &'a AtomicU32) -> Self {
        word.fetch_add(1, SeqCst);
        Waiting(word)
    }
}

#[cfg(feature = "tokio")]
impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

#[cfg(feature = "tokio")]
impl<T: Serialize + DeserializeOwned> Queue<T> {
    /// [`put`](Self::put) as a future: while the queue is full, waits for room through the
    /// tokio runtime's reactor, with no thread blocked. Dropped before it returns, it has put
    /// nothing.
    pub async fn put_async(&self, value: &T) -> Result<()> {
        use crate::transport::reactor;
        loop {
            match self.try_put(value) {
                Ok(()) => return Ok(()),
                Err(TryPutError::Failed(e)) => return Err(e),
                Err(TryPutError::Full) => {}
            }
            let waited = if self.capacity().is_some() && self.word(FREE).load(SeqCst) == 0 {
                let _waiting = Waiting::new(self.word(FREE_WAITERS));
                reactor::until(self.shared.bell.as_fd(), || Ok(self.word(FREE).load(SeqCst) > 0))
                    .await
            } else {
                // A message with descriptors waits for room in the socket itself.
                reactor::writable(self.shared.put_end.as_fd()).await
            };
            waited.map_err(|e| Error::io("waiting for room in a queue", e))?;
        }
    }

    /// [`get`](Self::get) as a future: waits for a message through the tokio runtime's
    /// reactor. Dropped before it returns, it has taken nothing.
    pub async fn get_async(&self) -> Result<T> {
        loop {
            match self.try_get() {
                Ok(value) => return Ok(value),
                Err(TryGetError::Failed(e)) => return Err(e),
                Err(TryGetError::Empty) => {}
            }
            crate::transport::reactor::readable(&[self.shared.get_end.as_fd()])
                .await
                .map_err(|e| Error::io("waiting for a queue message", e))?;
        }
    }
}

#[cfg(feature = "tokio")]
impl<T> JoinableQueue<T> {
    /// [`join`](Self::join) as a future: waits through the tokio runtime's reactor until every
    /// item put has been marked done.
    pub async fn join_async(&self) -> Result<()> {
        let queue = &self.queue;
        let _waiting = Waiting::new(queue.word(JOIN_WAITERS));
        crate::transport::reactor::until(queue.shared.bell.as_fd(), || {
            Ok(queue.word(UNFINISHED).load(SeqCst) == 0)
        })
        .await
        .map_err(|e| Error::io("waiting for a queue's items to be done", e))
    }
}

/// Writes an encoded message to sealed memory; the record then carries only its tag, and the
/// memory rides as its last descriptor.
fn spill(message: &[u8], mut fds: Vec<OwnedFd>) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
    fds.push(SealedMemory::from_bytes(message)?.into_fd());
    Ok((vec![TAG_SPILLED], fds))
}

/// Polls `sock` for `events` until `deadline`; `false` if it passed first.
fn wait_ready(sock: BorrowedFd<'_>, events: i16, deadline: Option<Instant>) -> Result<bool> {
    let mut set = [PollFd::new(sock, events)];
    let ready = sys::poll(&mut set, deadline).map_err(|e| Error::io("poll on a queue", e))?;
    Ok(ready > 0)
}

impl<T> JoinableQueue<T> {
    /// An unbounded joinable queue.
    pub fn new() -> Result<Self> {
        Queue::create(0, true).map(|queue| JoinableQueue { queue })
    }

    /// A joinable queue that holds at most `capacity` messages.
    pub fn bounded(capacity: usize) -> Result<Self> {
        let Queue { shared, .. } = Queue::<T>::bounded(capacity)?;
        shared.control.atomic_words()[JOINABLE].store(1, SeqCst);
        Ok(JoinableQueue { queue: Queue { shared, _messages: PhantomData } })
    }

    /// Marks one item taken from the queue as finished. Fails with
    /// [`ErrorKind::InvalidState`] when called more times than items were put.
    pub fn task_done(&self) -> Result<()> {
        if self.queue.finish_one() {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::InvalidState,
                "task_done() called more times than items were put",
            ))
        }
    }

    /// How many items were put and not yet marked done, across every process.
    pub fn unfinished(&self) -> usize {
        self.queue.word(UNFINISHED).load(SeqCst) as usize
    }

    /// Waits until every item put has been marked done with [`task_done`](Self::task_done).
    pub fn join(&self) -> Result<()> {
        self.queue.join_until(None).map(drop)
    }

    /// Waits at most `timeout` for every item to be marked done; `Ok(false)` if some were not.
    pub fn join_timeout(&self, timeout: Duration) -> Result<bool> {
        self.queue.join_until(Some(Instant::now() + timeout))
    }
}

impl<T> Deref for JoinableQueue<T> {
    type Target = Queue<T>;

    fn deref(&self) -> &Queue<T> {
        &self.queue
    }
}

impl<T> Clone for Queue<T> {
    fn clone(&self) -> Self {
        Queue { shared: Arc::clone(&self.shared), _messages: PhantomData }
    }
}

impl<T> Clone for JoinableQueue<T> {
    fn clone(&self) -> Self {
        JoinableQueue { queue: self.queue.clone() }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        tracked::untrack(self.put_end.as_raw_fd());
        tracked::untrack(self.get_end.as_raw_fd());
    }
}

/// The wire form of a queue: both socket ends and the control page.
#[derive(Serialize, Deserialize)]
struct Handle<F, M> {
    put_end: F,
    get_end: F,
    control: M,
    log: F,
    bell: F,
}

impl<T> Serialize for Queue<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let shared = &*self.shared;
        Handle {
            put_end: Fd::new(shared.put_end.as_fd()),
            get_end: Fd::new(shared.get_end.as_fd()),
            control: &shared.control,
            log: Fd::new(shared.log_file.as_fd()),
            bell: Fd::new(shared.bell.as_fd()),
        }
        .serialize(serializer)
    }
}

impl<'de, T> Deserialize<'de> for Queue<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let Handle { put_end, get_end, control, log, bell } =
            Handle::<Fd<OwnedFd>, SharedMemory>::deserialize(deserializer)?;
        let words = control.atomic_words();
        if words.len() < WORDS || words[MAGIC].load(SeqCst) != PAGE_MAGIC {
            return Err(D::Error::custom("not a multiproc queue's control page"));
        }
        let shared = Shared {
            put_end: put_end.into_inner(),
            get_end: get_end.into_inner(),
            control,
            log_file: log.into_inner(),
            log_map: OnceLock::new(),
            bell: bell.into_inner(),
        };
        Ok(Queue::from_shared(shared))
    }
}

impl<T> Serialize for JoinableQueue<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.queue.serialize(serializer)
    }
}

impl<'de, T> Deserialize<'de> for JoinableQueue<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let queue = Queue::deserialize(deserializer)?;
        if !queue.joinable() {
            return Err(D::Error::custom("a plain queue where a joinable one was expected"));
        }
        Ok(JoinableQueue { queue })
    }
}

impl<T> fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("len", &self.len())
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl<T> fmt::Debug for JoinableQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinableQueue")
            .field("len", &self.len())
            .field("capacity", &self.capacity())
            .field("unfinished", &self.unfinished())
            .finish()
    }
}

macro_rules! queue_errors {
    ($($name:ident { $($variant:ident => $text:literal),* }),* $(,)?) => {$(
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    $($name::$variant => f.write_str($text),)*
                    $name::Failed(e) => write!(f, "{e}"),
                }
            }
        }

        impl std::error::Error for $name {}
    )*};
}
queue_errors! {
    TryPutError { Full => "the queue is full" },
    PutTimeoutError { Timeout => "the queue stayed full until the timeout" },
    TryGetError { Empty => "the queue is empty" },
    GetTimeoutError { Timeout => "no message arrived in time" },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second handle that shares only what a child would: the wire form.
    fn through_the_wire<Q: Serialize, R: DeserializeOwned>(queue: &Q) -> R {
        let (bytes, fds) = codec::collecting_fds(|| codec::encode(queue));
        codec::with_fds(fds, || codec::decode(&bytes.unwrap())).unwrap()
    }

    #[test]
    fn messages_come_out_in_order_through_another_handle() {
        let queue = Queue::<(u32, String)>::new().unwrap();
        let other: Queue<(u32, String)> = through_the_wire(&queue);
        assert!(matches!(other.try_get(), Err(TryGetError::Empty)));
        for i in 0..100 {
            queue.put(&(i, format!("message {i}"))).unwrap();
        }
        assert_eq!(other.len(), 100);
        for i in 0..100 {
            assert_eq!(other.get().unwrap(), (i, format!("message {i}")));
        }
        assert!(other.is_empty());
        let waited = other.get_timeout(Duration::from_millis(20));
        assert!(matches!(waited, Err(GetTimeoutError::Timeout)));
    }

    #[test]
    fn messages_larger_than_a_record_travel_in_memory() {
        let queue = Queue::<Vec<u64>>::new().unwrap();
        let big: Vec<u64> = (0..1_000_000).collect();
        queue.put(&big).unwrap();
        queue.put(&vec![7]).unwrap();
        assert_eq!(queue.get().unwrap(), big);
        assert_eq!(queue.get().unwrap(), vec![7]);
    }

    #[test]
    fn a_bounded_queue_refuses_then_accepts() {
        let queue = Queue::<u8>::bounded(2).unwrap();
        assert_eq!(queue.capacity(), Some(2));
        queue.put(&1).unwrap();
        queue.try_put(&2).unwrap();
        assert!(matches!(queue.try_put(&3), Err(TryPutError::Full)));
        let waited = queue.put_timeout(&3, Duration::from_millis(20));
        assert!(matches!(waited, Err(PutTimeoutError::Timeout)));
        assert_eq!(queue.get().unwrap(), 1);
        queue.try_put(&3).unwrap();
        assert_eq!((queue.get().unwrap(), queue.get().unwrap()), (2, 3));
        assert!(Queue::<u8>::bounded(0).is_err());
    }

    #[test]
    fn a_blocked_put_wakes_when_a_get_makes_room() {
        let queue = Queue::<u32>::bounded(1).unwrap();
        queue.put(&0).unwrap();
        let producer = {
            let queue = queue.clone();
            std::thread::spawn(move || queue.put_timeout(&1, Duration::from_secs(30)).is_ok())
        };
        assert_eq!(queue.get_timeout(Duration::from_secs(30)).unwrap(), 0);
        assert_eq!(queue.get_timeout(Duration::from_secs(30)).unwrap(), 1);
        assert!(producer.join().unwrap());
    }

    #[test]
    fn join_waits_for_every_task_done() {
        let queue = JoinableQueue::<u32>::new().unwrap();
        let other: JoinableQueue<u32> = through_the_wire(&queue);
        assert!(queue.join_timeout(Duration::ZERO).unwrap());
        queue.put(&1).unwrap();
        queue.put(&2).unwrap();
        assert_eq!(queue.unfinished(), 2);
        assert!(!queue.join_timeout(Duration::from_millis(10)).unwrap());
        let worker = std::thread::spawn(move || {
            for _ in 0..2 {
                other.get().unwrap();
                other.task_done().unwrap();
            }
        });
        assert!(queue.join_timeout(Duration::from_secs(30)).unwrap());
        worker.join().unwrap();
        let extra = queue.task_done().unwrap_err();
        assert_eq!(extra.kind(), ErrorKind::InvalidState);
    }

    #[test]
    fn wait_sees_a_waiting_message() {
        let queue = Queue::<u8>::new().unwrap();
        let none = crate::ipc::wait::wait(&[&queue], Some(Duration::from_millis(1))).unwrap();
        assert!(none.is_empty());
        queue.put(&1).unwrap();
        assert_eq!(crate::ipc::wait::wait(&[&queue], Some(Duration::from_secs(30))).unwrap(), [0]);
    }

    #[test]
    fn records_that_are_not_ours_are_errors_not_hangs() {
        let queue = JoinableQueue::<u64>::new().unwrap();
        let raw = |record: &[u8], fds: &[BorrowedFd<'_>]| {
            let sock = queue.shared.put_end.as_fd();
            sys::send_with_fds(sock, &[IoSlice::new(record)], fds, false).unwrap();
        };
        let writable = SharedMemory::new(8).unwrap();
        let (bytes, memory_fds) = codec::collecting_fds(|| codec::encode(&writable));
        drop(bytes);
        raw(&[9, 1, 2], &[]); // an unknown tag
        raw(&[TAG_SPILLED], &[]); // spilled, but no memory came with it
        raw(&[TAG_SPILLED], &[memory_fds[0].as_fd()]); // memory that is not sealed
        raw(&[TAG_INLINE, 0xff], &[]); // a truncated value
        for _ in 0..4 {
            let error = queue.get_timeout(Duration::from_secs(30)).unwrap_err();
            let GetTimeoutError::Failed(error) = error else { panic!("{error}") };
            assert_eq!(error.kind(), ErrorKind::Decode);
        }
        // Nothing was ever put through the queue, so there is nothing to mark done, the length
        // does not wrap, and a good message still gets through after the bad ones.
        assert_eq!((queue.len(), queue.unfinished()), (0, 0));
        queue.put(&7).unwrap();
        assert_eq!(queue.get().unwrap(), 7);
    }

    #[test]
    fn a_message_that_does_not_decode_is_an_error_and_is_done() {
        let queue = JoinableQueue::<String>::new().unwrap();
        let numbers: Queue<u64> = through_the_wire(&*queue);
        queue.put(&"not a number".to_owned()).unwrap();
        let error = numbers.get().unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Decode);
        assert_eq!(queue.unfinished(), 0);
        let plain = Queue::<u8>::new().unwrap();
        let (bytes, fds) = codec::collecting_fds(|| codec::encode(&plain));
        let joinable: std::result::Result<JoinableQueue<u8>, _> =
            codec::with_fds(fds, || codec::decode(&bytes.unwrap()));
        assert!(joinable.is_err());
    }
}
