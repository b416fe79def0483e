//! multiproc-mpi: the `mpi` context—a pool's workers on the nodes of an MPI job.
//!
//! Launched as `mpirun -n N ./app`, rank 0 runs `main`; every other rank becomes a *node
//! agent* before `main` (as a spawned child takes its role) and never runs the user's code but
//! for tasks. [`Mpi`] is the start method of rank 0: each child it starts (a pool's worker, a
//! `Process`) is a real process that an agent spawns on its node, and whose channel the two
//! ranks carry over MPI, frame by frame (a *tunnel*). The pool's engine on rank 0 sees a worker
//! like any other; so `map`, `imap`, `apply`, initializers, `max_tasks_per_child`,
//! `task_timeout`, and a crashed worker failing its item and being replaced, are the local
//! pool's own code.
//!
//! Why agents and not workers as ranks: when one rank of an MPI job dies, the launcher kills
//! the job. A worker that segfaults or is killed is not a rank here, only a child of its agent,
//! so the job goes on. An agent that dies still ends the job (that is MPI's failure model, and
//! `mpirun` names the rank); so does rank 0.
//!
//! What cannot cross machines—file descriptors, and with them shared memory, pipes, `Fd`s and
//! the synchronization primitives—is refused when it is submitted, with an error that names
//! the `mpi` context ([`carries_descriptors`](multiproc_core::StartMethod::carries_descriptors)).

// Without the `mpi` feature only the wire format and the launcher's environment are built,
// so that `cargo build --workspace` needs no MPI library.
#[cfg(feature = "mpi")]
mod agent;
#[cfg(feature = "mpi")]
mod cache;
#[cfg(feature = "mpi")]
mod link;
#[cfg(feature = "mpi")]
mod rank0;
#[cfg(feature = "mpi")]
mod tunnel;
pub mod wire;

#[cfg(feature = "mpi")]
pub use agent::EXIT_AGENT_FAILED;
#[cfg(feature = "mpi")]
pub use rank0::{AGENT_TIMEOUT, AgentInfo, Mpi, become_agent};

/// Where this process stands in an MPI job, as its launcher's environment says (readable
/// before `MPI_Init`): OpenMPI's `OMPI_COMM_WORLD_RANK`/`_SIZE`, or the PMI variables of
/// MPICH, Intel MPI and Slurm's `srun`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    /// This process's rank.
    pub rank: u32,
    /// The number of ranks in the job.
    pub size: u32,
}

/// This process's [`Launch`], or `None` when no MPI launcher started it.
pub fn launched() -> Option<Launch> {
    let read = |name: &str| std::env::var(name).ok()?.trim().parse::<u32>().ok();
    [("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE")]
        .iter()
        .find_map(|(rank, size)| Some(Launch { rank: read(rank)?, size: read(size)? }))
}
