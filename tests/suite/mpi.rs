//! The mpi context's own scenarios, run under `mpirun -n 3` (rank 0 and two node agents)
//! beside the pool scenarios: where its workers run, what cannot cross machines, and a large
//! initializer state.

use std::collections::HashSet;

use libtest_mimic::Failed;
use multiproc::{Context, ErrorKind, SharedMemory, task};

use crate::Scenario;
use crate::common::{DEADLINE, ensure, join};
use crate::pool::{square, with_pool};

pub const SCENARIOS: &[Scenario] = &[
    ("mpi_workers_run_under_the_agents_spread_over_them", placement),
    ("mpi_values_holding_descriptors_are_refused_at_submission", descriptors_refused),
    (
        "mpi_a_large_initializer_vector_reaches_every_worker_and_replacement_once_per_node",
        large_state,
    ),
    ("mpi_a_process_runs_under_an_agent", process),
    ("mpi_a_worker_that_writes_garbage_into_its_channel_fails_its_item", garbage_frame),
];

/// This worker's pid and its parent's (its node's agent).
#[task]
fn lineage() -> (u32, u32) {
    (std::process::id(), std::os::unix::process::parent_id())
}

/// Holds a task in its worker until `until` has passed, so that several workers run at once.
#[task]
fn lineage_after(until_ms: u64) -> (u32, u32) {
    std::thread::sleep(std::time::Duration::from_millis(until_ms));
    (std::process::id(), std::os::unix::process::parent_id())
}

fn placement(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(2).chunksize(1).build(),
        |pool| {
            // Two tasks that overlap in time land on the two workers.
            let seen = pool.map(lineage_after, vec![200u64, 200])?;
            let agents: HashSet<u32> = seen.iter().map(|(_, parent)| *parent).collect();
            let here = std::process::id();
            ensure(agents.len() == 2 && !agents.contains(&here), || {
                format!("workers {seen:?}: rank 0 is {here}; each agent should run one")
            })?;
            let pids: HashSet<u32> = pool.pids().into_iter().collect();
            let workers: HashSet<u32> = seen.iter().map(|(pid, _)| *pid).collect();
            ensure(pids == workers, || format!("pool.pids() {pids:?}, tasks ran in {workers:?}"))?;
            let (_, parent) = pool.apply(lineage, ())?;
            ensure(agents.contains(&parent), || format!("apply ran under {parent}"))
        },
    )
}

/// Sums a shared block (never runs: refused before it is sent).
#[task]
fn read_shared(memory: SharedMemory) -> usize {
    memory.len()
}

/// Keeps a vector as the worker's state.
#[task]
fn keep(data: Vec<u64>) -> Vec<u64> {
    data
}

/// Element `i` of the state, its length, and the worker's pid.
#[task]
fn element(state: &Vec<u64>, i: usize) -> (u64, usize, u32) {
    (state[i], state.len(), std::process::id())
}

fn descriptors_refused(ctx: &Context) -> Result<(), Failed> {
    let refused = |error: multiproc::Error| -> Result<(), Failed> {
        let text = error.to_string();
        ensure(error.kind() == ErrorKind::Encode && text.contains("`mpi` context"), || {
            format!("{:?}: {text}", error.kind())
        })
    };
    with_pool(
        ctx,
        || ctx.pool().processes(2).build(),
        |pool| {
            let memory = SharedMemory::new(64)?;
            refused(pool.apply(read_shared, memory.try_clone()?).expect_err("an fd"))?;
            refused(pool.map(read_shared, vec![memory.try_clone()?]).expect_err("an fd"))?;
            let mut stream = pool.imap(read_shared, vec![memory.try_clone()?]);
            refused(stream.next().expect("one result").expect_err("an fd"))?;
            drop(stream);
            // Nothing was sent: the pool is as it was.
            ensure(pool.map(square, 0..100u64)?.len() == 100, || "the pool after".into())
        },
    )?;
    let memory = SharedMemory::new(64)?;
    let built = ctx.pool().processes(1).initializer(read_shared, memory.try_clone()?).build();
    refused(built.expect_err("an initializer argument holding an fd"))?;
    refused(ctx.process(read_shared, memory).start().expect_err("a process argument"))
}

fn large_state(ctx: &Context) -> Result<(), Failed> {
    // 8 MB: past the size at which other methods hand it over in shared memory; here it
    // travels to each worker, and to each replacement.
    let len = 1_000_000usize;
    let values: Vec<u64> = (0..len as u64).map(|v| v * 7).collect();
    let job = multiproc::mpi::Mpi::new()?;
    let sent_before = job.sent_bytes();
    with_pool(
        ctx,
        || {
            let pool = ctx.pool().processes(2).max_tasks_per_child(3).chunksize(1);
            pool.initializer(keep, values.clone()).build()
        },
        |pool| {
            let picks: Vec<usize> = (0..12).map(|k| k * 83_311).collect();
            let seen = pool.map(element, picks.clone())?;
            for (i, (value, seen_len, _)) in picks.iter().zip(&seen) {
                ensure(*value == values[*i] && *seen_len == len, || {
                    format!("item {i}: {value} of {seen_len} elements")
                })?;
            }
            let workers: HashSet<u32> = seen.iter().map(|(_, _, pid)| *pid).collect();
            ensure(workers.len() >= 4, || format!("only {} workers ran tasks", workers.len()))?;
            // Shipped once per node (two agents), not once per worker: the others were
            // sent a reference.
            let sent = job.sent_bytes() - sent_before;
            let encoded = (len * 8) as u64;
            ensure(sent < 3 * encoded, || {
                format!("{sent} bytes sent for {} workers of a {encoded}-byte state", workers.len())
            })
        },
    )
}

fn process(ctx: &Context) -> Result<(), Failed> {
    let (pid, parent) = join(ctx.process(lineage, ()).start()?)??;
    ensure(parent != std::process::id() && pid != std::process::id(), || {
        format!("the process {pid} ran under {parent}, rank 0 is {}", std::process::id())
    })
}

/// Writes a frame header that claims more than any frame may hold into this worker's own
/// channel (fd 3 in a spawned child, where every mpi worker is), then waits.
#[task]
fn scribble() -> u64 {
    use std::io::Write;
    let channel = multiproc_core::sys::adopt_inherited_socket(3).expect("the worker's channel");
    let mut stream = std::os::unix::net::UnixStream::from(channel);
    let _ = stream.write_all(&[0xff; 16]);
    // The descriptor is the worker's channel's: not ours to close.
    std::mem::forget(stream);
    std::thread::sleep(DEADLINE);
    0
}

/// The agent reads the garbage, not rank 0: it must still end the worker, so that the item
/// fails (in a local pool the engine kills such a worker) instead of waiting forever.
fn garbage_frame(ctx: &Context) -> Result<(), Failed> {
    with_pool(
        ctx,
        || ctx.pool().processes(1).build(),
        |pool| {
            let mut pending = pool.apply_async(scribble, ())?;
            let error = match pending.get_timeout(DEADLINE / 2) {
                Ok(None) => return Err("the item neither returned nor failed".into()),
                Ok(Some(value)) => return Err(format!("returned {value}").into()),
                Err(error) => error,
            };
            ensure(error.kind() == ErrorKind::ChildExited, || format!("{error:?}"))?;
            ensure(pool.apply(square, 9)? == 81, || "the pool after".into())
        },
    )
}
