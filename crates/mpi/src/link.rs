//! The MPI side of a rank: `MPI_Init`, sending one message, and the receive loop that each
//! rank's router runs.
//!
//! MPI has no descriptor to poll, so a router probes (`MPI_Improbe`) in a loop. While this
//! rank is busy (it sent or received a message within [`ACTIVE`]), it yields between probes:
//! an answer is usually on its way, and a yield gives the CPU to any worker that wants it.
//! Once the rank has been quiet that long it sleeps between probes, for longer and longer (up
//! to [`MAX_NAP`]), and a message brings it back. An idle rank therefore costs a wake-up per
//! millisecond, not a CPU.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, RwLock};
use std::time::{Duration, Instant};

use mpi::point_to_point::{Destination, MatchedReceiveVec, Source};
use mpi::topology::{Communicator, SimpleCommunicator};

/// The longest nap between probes of an idle router.
pub const MAX_NAP: Duration = Duration::from_millis(1);

/// How long after its last message a rank counts as busy.
pub const ACTIVE: Duration = Duration::from_millis(5);

/// When this rank last sent or received a message, in nanoseconds since [`epoch`].
static LAST_MESSAGE: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn note_activity() {
    let now = epoch().elapsed().as_nanos() as u64;
    LAST_MESSAGE.fetch_max(now, Ordering::Relaxed);
}

fn busy() -> bool {
    // Another thread may have noted a message after `now` was read.
    let now = epoch().elapsed().as_nanos() as u64;
    let since = now.saturating_sub(LAST_MESSAGE.load(Ordering::Relaxed));
    since < ACTIVE.as_nanos() as u64
}

/// The largest message MPI can carry here (its count is a C `int`).
pub const MAX_MESSAGE: usize = i32::MAX as usize;

/// Open while MPI may be called: every call takes it shared, [`finalize`] exclusively, so
/// that `MPI_Finalize` never runs beside a send of another thread (a tunnel's reader, say),
/// and nothing calls MPI after it.
static OPEN: RwLock<bool> = RwLock::new(false);

/// Ends MPI for this process (`MPI_Finalize`, when `universe` drops), once no other thread is
/// in an MPI call; every later call fails.
pub fn finalize(universe: mpi::environment::Universe) {
    let mut open = OPEN.write().unwrap_or_else(|p| p.into_inner());
    *open = false;
    drop(universe);
}

/// Starts MPI for this process with the thread support the routers need (any thread may send).
pub fn init() -> Result<mpi::environment::Universe, String> {
    let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Multiple)
        .ok_or_else(|| "MPI was already initialized in this process".to_owned())?;
    if threading != mpi::Threading::Multiple {
        return Err(format!(
            "this MPI library offers {threading:?} thread support; the mpi context needs \
             MPI_THREAD_MULTIPLE"
        ));
    }
    *OPEN.write().unwrap_or_else(|p| p.into_inner()) = true;
    Ok(universe)
}

/// This rank and the job's size.
pub fn rank_and_size() -> (i32, i32) {
    let world = SimpleCommunicator::world();
    (world.rank(), world.size())
}

/// Sends `bytes` to `rank` with `tag` (blocking until MPI has them: at once for small messages).
pub fn send(rank: i32, tag: i32, bytes: &[u8]) -> Result<(), String> {
    if bytes.len() > MAX_MESSAGE {
        return Err(format!(
            "a message of {} bytes is larger than MPI carries ({MAX_MESSAGE})",
            bytes.len()
        ));
    }
    let open = OPEN.read().unwrap_or_else(|p| p.into_inner());
    if !*open {
        return Err("this process has left the MPI job".into());
    }
    SimpleCommunicator::world().process_at_rank(rank).send_with_tag(bytes, tag);
    drop(open);
    note_activity();
    Ok(())
}

/// One received message: its sender, its tag and its bytes.
pub struct Received {
    /// The sender's rank.
    pub source: i32,
    /// The message's tag.
    pub tag: i32,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// The receive loop's state: how long it has found nothing.
#[derive(Debug, Default)]
pub struct Prober {
    empty: u32,
}

impl Prober {
    /// The next message, waiting for it until `deadline` (`None` if nothing came by then, or
    /// this process left the job).
    pub fn next(&mut self, deadline: Option<Instant>) -> Option<Received> {
        let world = SimpleCommunicator::world();
        loop {
            {
                let open = OPEN.read().unwrap_or_else(|p| p.into_inner());
                if !*open {
                    return None;
                }
                if let Some(probed) = world.any_process().immediate_matched_probe() {
                    self.empty = 0;
                    let (bytes, status) = probed.matched_receive_vec::<u8>();
                    note_activity();
                    let (source, tag) = (status.source_rank(), status.tag());
                    return Some(Received { source, tag, bytes });
                }
            }
            self.idle();
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return None;
            }
        }
    }

    /// Waits a little after an empty probe: a yield while the rank is busy, else naps that
    /// double up to [`MAX_NAP`].
    fn idle(&mut self) {
        if busy() {
            self.empty = 0;
            std::thread::yield_now();
            return;
        }
        self.empty = self.empty.saturating_add(1).min(10);
        std::thread::sleep(Duration::from_micros(2u64 << self.empty).min(MAX_NAP));
    }
}
