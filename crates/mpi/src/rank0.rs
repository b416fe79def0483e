//! Rank 0's side of the job: joining it (every agent's hello), the router that hands each
//! agent's message to its tunnel, the [`Mpi`] start method, and leaving the job at exit.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use multiproc_core::runtime::role::ROLE_ENV;
use multiproc_core::{
    ChildHandle, Error, ErrorKind, ExitStatus, Payload, Result, StartMethod, StartRequest, sys,
};

use crate::cache;
use crate::link::{self, Prober};
use crate::tunnel::{self, Inbound};
use crate::wire::{self, Control, Ended, TAG_CONTROL, TAG_FRAME};
use crate::{agent, launched};

/// How long rank 0 waits for every agent's hello, and for an agent to answer a start.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

// The `.init_array` constructor (or `multiproc::init()`) runs this before `main`.
// linkme places the entry with `#[link_section]`, which the unsafe_code lint flags; no unsafe
// operation is involved.
#[allow(unsafe_code)]
#[linkme::distributed_slice(sys::BEFORE_MAIN)]
static BECOME_AGENT_BEFORE_MAIN: fn() = become_agent;

/// Makes this process a node agent (it never returns) if it is a rank other than 0 of an MPI
/// job, and not a multiproc child that an agent started.
pub fn become_agent() {
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.swap(true, Ordering::SeqCst) || std::env::var_os(ROLE_ENV).is_some() {
        return;
    }
    if launched().is_some_and(|launch| launch.rank != 0) {
        agent::run();
    }
}

/// One agent, as rank 0 knows it.
#[derive(Debug)]
struct Agent {
    rank: i32,
    cpus: u32,
    host: String,
    pid: u32,
    /// The children it runs for us now.
    children: AtomicUsize,
}

/// What rank 0 knows of one tunnel's child.
struct Remote {
    agent: usize,
    /// The writer of the local end (which the engine reads).
    queue: mpsc::Sender<Inbound>,
    /// Where its end is recorded (shared with its `RemoteChild`).
    ended: Arc<EndState>,
}

/// Rank 0's side of the job: the agents, the tunnels, the router thread.
struct Link {
    agents: Vec<Agent>,
    next_id: AtomicU64,
    tunnels: Mutex<HashMap<u64, Remote>>,
    /// Starts waiting for their agent's answer.
    pending: Mutex<HashMap<u64, mpsc::Sender<std::result::Result<u32, String>>>>,
    stop: AtomicBool,
    router: Mutex<Option<std::thread::JoinHandle<()>>>,
    universe: Mutex<Option<mpi::environment::Universe>>,
}

/// The job, joined once per process.
fn link() -> Result<&'static Link> {
    static LINK: OnceLock<std::result::Result<&'static Link, Error>> = OnceLock::new();
    match LINK.get_or_init(join_job) {
        Ok(link) => Ok(link),
        // The first attempt's error, for every later one: MPI starts once per process.
        Err(e) => Err(Error::new(e.kind(), e.to_string())),
    }
}

/// `MPI_Init`, every agent's hello, and the router.
fn join_job() -> Result<&'static Link> {
    let how = "launch the program with an MPI launcher, one agent rank per node beside rank 0: \
               `mpirun -n 3 ./app` on one machine, `mpirun --map-by ppr:1:node ./app` or \
               `srun --ntasks-per-node=1 ./app` on a cluster";
    let Some(launch) = launched() else {
        return Err(Error::new(
            ErrorKind::StartFailed,
            format!("the mpi context needs an MPI job, and this process is not in one: {how}"),
        ));
    };
    if launch.size < 2 {
        return Err(Error::new(
            ErrorKind::StartFailed,
            format!("the mpi context needs at least one agent rank beside rank 0: {how}"),
        ));
    }
    let universe = link::init().map_err(|e| Error::new(ErrorKind::StartFailed, e))?;
    let deadline = Instant::now() + AGENT_TIMEOUT;
    let mut prober = Prober::default();
    let mut agents: Vec<Option<Agent>> = (1..launch.size).map(|_| None).collect();
    while agents.iter().any(Option::is_none) {
        let Some(message) = prober.next(Some(deadline)) else {
            let missing: Vec<usize> =
                (1..).zip(&agents).filter(|(_, a)| a.is_none()).map(|(r, _)| r).collect();
            return Err(Error::new(
                ErrorKind::StartFailed,
                format!("MPI ranks {missing:?} did not say hello within {AGENT_TIMEOUT:?}"),
            ));
        };
        let hello = (message.tag == TAG_CONTROL)
            .then(|| wire::decode_control(&message.bytes).ok())
            .flatten();
        let slot = usize::try_from(message.source - 1).ok().and_then(|i| agents.get_mut(i));
        match (hello, slot) {
            (Some(Control::Hello { cpus, host, fingerprint, pid }), Some(slot)) => {
                if fingerprint != multiproc_core::runtime::child::fingerprint() {
                    return Err(Error::new(
                        ErrorKind::StartFailed,
                        format!(
                            "MPI rank {} (on {host}) runs another executable than rank 0: every \
                             rank must run the same binary",
                            message.source
                        ),
                    ));
                }
                let rank = message.source;
                *slot = Some(Agent { rank, cpus, host, pid, children: AtomicUsize::new(0) });
            }
            _ => tracing::warn!(source = message.source, "an unexpected message before hello"),
        }
    }
    let link: &'static Link = Box::leak(Box::new(Link {
        agents: agents.into_iter().flatten().collect(),
        next_id: AtomicU64::new(1),
        tunnels: Mutex::default(),
        pending: Mutex::default(),
        stop: AtomicBool::new(false),
        router: Mutex::new(None),
        universe: Mutex::new(Some(universe)),
    }));
    let router = std::thread::Builder::new()
        .name("multiproc-mpi-router".into())
        .spawn(move || {
            // Without its router rank 0 would wait forever for its workers: a bug there ends
            // the process, and with it (MPI's way) the job, rather than hang it.
            if std::panic::catch_unwind(|| route(link)).is_err() {
                eprintln!("multiproc: the mpi router of rank 0 panicked; ending the job");
                std::process::abort();
            }
        })
        .map_err(|e| Error::io("starting the mpi router", e))?;
    *link.router.lock().unwrap_or_else(|p| p.into_inner()) = Some(router);
    let _ = LINK_FOR_EXIT.set(link);
    sys::at_exit(leave_job).map_err(|e| Error::io("atexit", e))?;
    tracing::debug!(agents = link.agents.len(), "joined the MPI job");
    Ok(link)
}

/// Rank 0's router: hands each message from an agent to its tunnel or its waiting start.
fn route(link: &'static Link) {
    let mut prober = Prober::default();
    while !link.stop.load(Ordering::SeqCst) {
        let Some(message) = prober.next(Some(Instant::now() + Duration::from_millis(10))) else {
            continue;
        };
        if message.tag == TAG_FRAME {
            match wire::decode_frame(&message.bytes) {
                Ok(frame) => {
                    let tunnels = link.tunnels.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(remote) = tunnels.get(&frame.id) {
                        let _ = remote.queue.send(Inbound::Frame(frame));
                    }
                }
                Err(e) => {
                    tracing::error!(rank = message.source, "a frame that does not decode: {e}")
                }
            }
            continue;
        }
        match wire::decode_control(&message.bytes) {
            Ok(Control::Started { id, pid }) => answer(link, id, Ok(pid)),
            Ok(Control::StartFailed { id, message }) => answer(link, id, Err(message)),
            Ok(Control::Ended { id, how }) => {
                let remote = link.tunnels.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                if let Some(remote) = remote {
                    link.agents[remote.agent].children.fetch_sub(1, Ordering::SeqCst);
                    let status = match how {
                        Ended::Exited(code) => ExitStatus::Exited(code),
                        Ended::Signaled(signal) => ExitStatus::Signaled(signal),
                        Ended::Unknown => ExitStatus::Unknown,
                    };
                    // After the frames before it are in the local socket.
                    let ended = remote.ended;
                    let _ = remote.queue.send(Inbound::Then(Box::new(move || ended.end(status))));
                }
            }
            Ok(other) => tracing::warn!(rank = message.source, "an agent sent {other:?}"),
            Err(e) => tracing::error!(rank = message.source, "a control message: {e}"),
        }
    }
}

fn answer(link: &Link, id: u64, result: std::result::Result<u32, String>) {
    if let Some(waiter) = link.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id) {
        let _ = waiter.send(result);
    }
}

/// Where a remote child's end is recorded, and the pipe that wakes whoever polls for it.
struct EndState {
    /// The status, and the pipe's write end until the status is known.
    state: Mutex<(Option<ExitStatus>, Option<std::fs::File>)>,
}

impl EndState {
    fn new(bell: OwnedFd) -> EndState {
        EndState { state: Mutex::new((None, Some(bell.into()))) }
    }

    fn status(&self) -> Option<ExitStatus> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// Records the end and rings the bell. The write end is closed before the lock is let go,
    /// so that a caller who sees the status finds the pipe's descriptor gone.
    fn end(&self, status: ExitStatus) {
        use std::io::Write;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.0 = Some(status);
        if let Some(mut bell) = state.1.take() {
            let _ = bell.write_all(&[1]);
        }
    }
}

/// At rank 0's exit: stops the router, tells every agent to leave, and leaves the job
/// (`MPI_Finalize`), so that `mpirun` sees a clean end.
extern "C" fn leave_job() {
    let Some(link) = LINK_FOR_EXIT.get() else { return };
    link.stop.store(true, Ordering::SeqCst);
    if let Some(router) = link.router.lock().unwrap_or_else(|p| p.into_inner()).take() {
        let _ = router.join();
    }
    for agent in &link.agents {
        let _ = link::send(agent.rank, TAG_CONTROL, &wire::encode_control(&Control::Shutdown));
    }
    if let Some(universe) = link.universe.lock().unwrap_or_else(|p| p.into_inner()).take() {
        link::finalize(universe);
    }
}

/// The job rank 0 joined, for [`leave_job`].
static LINK_FOR_EXIT: OnceLock<&'static Link> = OnceLock::new();

/// The `mpi` start method (rank 0 of an MPI job): each child runs on one of the job's agents,
/// the least busy.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mpi;

impl Mpi {
    /// Joins the MPI job (once per process: `MPI_Init`, then every agent's hello). Fails with
    /// an error that says how to launch when this process is not rank 0 of a job with at least
    /// one agent.
    pub fn new() -> Result<Mpi> {
        link()?;
        Ok(Mpi)
    }

    /// How many bytes of tunnelled frames this rank has sent its agents so far (a payload sent
    /// again as a reference counts at the reference's size): what shipping a pool's work cost.
    pub fn sent_bytes(&self) -> u64 {
        cache::sent_bytes()
    }

    /// The job's node agents.
    pub fn agents(&self) -> Vec<AgentInfo> {
        let Ok(link) = link() else { return Vec::new() };
        let info = |a: &Agent| AgentInfo {
            rank: a.rank as u32,
            host: a.host.clone(),
            pid: a.pid,
            cpus: a.cpus,
        };
        link.agents.iter().map(info).collect()
    }
}

/// A node agent of the job, as it introduced itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// Its MPI rank.
    pub rank: u32,
    /// Its node's host name.
    pub host: String,
    /// Its pid on that node.
    pub pid: u32,
    /// The CPUs it may use: the workers it counts for in a pool's default size.
    pub cpus: u32,
}

impl StartMethod for Mpi {
    fn name(&self) -> &'static str {
        "mpi"
    }

    fn carries_descriptors(&self) -> bool {
        false
    }

    fn default_processes(&self) -> Option<usize> {
        link().ok().map(|link| link.agents.iter().map(|a| a.cpus as usize).sum())
    }

    fn start(&self, request: StartRequest<'_>) -> Result<Box<dyn ChildHandle>> {
        if !matches!(request.payload, Payload::Sent) {
            return Err(Error::new(ErrorKind::Io, "the mpi start method needs a sent payload"));
        }
        let link = link()?;
        // The least busy agent; the lowest rank among equals.
        let (index, agent) = link
            .agents
            .iter()
            .enumerate()
            .min_by_key(|(_, a)| a.children.load(Ordering::SeqCst))
            .expect("at least one agent");
        let id = link.next_id.fetch_add(1, Ordering::SeqCst);
        let (bell_read, bell_write) = sys::pipe().map_err(|e| Error::io("pipe", e))?;
        let ended = Arc::new(EndState::new(bell_write));
        let (answer_to, answer) = mpsc::channel();
        link.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(id, answer_to);
        let rank = agent.rank;
        let (queue, reader) =
            tunnel::open(id, request.channel, rank, cache::send_frame, move |_| {
                // The engine closed its end: the child reads end-of-file.
                let _ =
                    link::send(rank, TAG_CONTROL, &wire::encode_control(&Control::Close { id }));
            })
            .map_err(|e| Error::io("starting a tunnel's threads", e))?;
        link.tunnels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Remote { agent: index, queue, ended: Arc::clone(&ended) });
        agent.children.fetch_add(1, Ordering::SeqCst);
        // The agent learns of the tunnel before its first frame (the `Start` the engine wrote
        // into the channel already): the reader starts after the request.
        let sent = link::send(rank, TAG_CONTROL, &wire::encode_control(&Control::Start { id }));
        let sent =
            sent.and_then(|()| reader.start().map_err(|e| format!("a tunnel's reader: {e}")));
        let started = sent.and_then(|()| match answer.recv_timeout(AGENT_TIMEOUT) {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {AGENT_TIMEOUT:?}")),
        });
        match started {
            Ok(pid) => Ok(Box::new(RemoteChild { id, rank, pid, bell: bell_read, ended })),
            Err(message) => {
                link.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                if link.tunnels.lock().unwrap_or_else(|p| p.into_inner()).remove(&id).is_some() {
                    agent.children.fetch_sub(1, Ordering::SeqCst);
                }
                Err(Error::new(
                    ErrorKind::StartFailed,
                    format!("MPI rank {rank} ({}) could not start a child: {message}", agent.host),
                ))
            }
        }
    }
}

/// A child that an agent runs on its node: signalled through its agent, which reports its end.
#[derive(Debug)]
struct RemoteChild {
    id: u64,
    rank: i32,
    pid: u32,
    /// Readable once the end is known.
    bell: OwnedFd,
    ended: Arc<EndState>,
}

impl std::fmt::Debug for EndState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndState").field("status", &self.status()).finish()
    }
}

impl ChildHandle for RemoteChild {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn sentinel(&self) -> BorrowedFd<'_> {
        self.bell.as_fd()
    }

    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        Ok(self.ended.status())
    }

    fn signal(&self, signal: i32) -> io::Result<()> {
        signal_remote(self.rank, self.id, &self.ended, signal)
    }

    fn signal_sender(&self) -> io::Result<multiproc_core::process::method::SignalSender> {
        let (rank, id, ended) = (self.rank, self.id, Arc::clone(&self.ended));
        Ok(Box::new(move |signal| signal_remote(rank, id, &ended, signal)))
    }
}

/// Asks the agent of rank `rank` to signal the child of tunnel `id`, unless it has ended.
fn signal_remote(rank: i32, id: u64, ended: &EndState, signal: i32) -> io::Result<()> {
    if ended.status().is_some() {
        return Ok(());
    }
    let message = wire::encode_control(&Control::Signal { id, signal });
    link::send(rank, TAG_CONTROL, &message).map_err(io::Error::other)
}
