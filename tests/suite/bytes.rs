//! Large `Bytes` values, which travel out of band (after the frame, read into their own
//! buffer), through every path that carries values, under the start method being tested.

use std::os::fd::AsFd;

use libtest_mimic::Failed;
use multiproc::{Bytes, Connection, Context, ErrorKind, ExitStatus, Queue, task};
use multiproc_core::sys;

use crate::Scenario;
use crate::common::{DEADLINE, ensure, fd_count, join, warm_up, zombie_children};

pub const SCENARIOS: &[Scenario] = &[
    ("bytes_large_argument_and_result_arrive_intact", argument_and_result),
    ("bytes_several_large_items_per_pool_batch_arrive_intact", pool_batches),
    ("bytes_through_a_pipe_and_a_queue_at_every_size", pipe_and_queue),
    ("bytes_a_child_killed_while_sending_a_large_result_is_an_error", killed_mid_result),
    (
        "bytes_a_worker_killed_while_sending_a_large_result_fails_its_batch",
        worker_killed_mid_result,
    ),
];

/// Sizes on both sides of the out-of-band threshold (64 KiB), and well past it.
const SIZES: &[usize] = &[0, 1, 65_535, 65_536, 65_537, 3 << 20];

/// `len` bytes that differ with `seed` and with position, so that a swapped, shifted or
/// truncated buffer shows.
fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<_>>())
}

/// Returns both buffers reversed, and the sum of all their bytes.
#[task]
fn reverse_both(large: Bytes, small: Bytes) -> (Bytes, Bytes, u64) {
    let sum = large.iter().chain(small.iter()).map(|&b| u64::from(b)).sum();
    let flip = |b: Bytes| {
        let mut v = b.into_vec();
        v.reverse();
        Bytes::from(v)
    };
    (flip(large), flip(small), sum)
}

fn reversed(b: &Bytes) -> Vec<u8> {
    b.iter().rev().copied().collect()
}

fn argument_and_result(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds = fd_count();
    let (large, small) = (pattern(7, 5 << 20), pattern(9, 100));
    let expected_sum: u64 = large.iter().chain(small.iter()).map(|&b| u64::from(b)).sum();
    let child = ctx.process(reverse_both, (large.clone(), small.clone())).start()?;
    let (back_large, back_small, sum) = join(child)??;
    ensure(sum == expected_sum, || format!("the child summed {sum}, expected {expected_sum}"))?;
    ensure(*back_large == reversed(&large), || "the large result differs".into())?;
    ensure(*back_small == reversed(&small), || "the small result differs".into())?;
    ensure(fd_count() == fds, || format!("fds: {} before, {} after", fds, fd_count()))?;
    ensure(zombie_children().is_empty(), || format!("zombies {:?}", zombie_children()))
}

/// Tags a buffer with its length and first byte, and returns it reversed.
#[task]
fn reverse_one(data: Bytes) -> (usize, Bytes) {
    let mut v = data.into_vec();
    v.reverse();
    (v.len(), Bytes::from(v))
}

fn pool_batches(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds = fd_count();
    let items: Vec<Bytes> = (0..24).map(|i| pattern(i as u8, SIZES[i % SIZES.len()] + i)).collect();
    {
        // Four items per batch: several blocks, and inline values, in one frame each way.
        let pool = ctx.pool().processes(2).chunksize(4).build()?;
        let results = pool.map(reverse_one, items.clone())?;
        ensure(results.len() == items.len(), || format!("{} results", results.len()))?;
        for (i, ((len, back), item)) in results.iter().zip(&items).enumerate() {
            ensure(*len == item.len() && **back == reversed(item), || {
                format!("item {i}: {} bytes back for {}", back.len(), item.len())
            })?;
        }
        pool.close();
        pool.join()?;
    }
    ensure(fd_count() == fds, || format!("fds: {} before, {} after", fds, fd_count()))?;
    ensure(zombie_children().is_empty(), || format!("zombies {:?}", zombie_children()))
}

/// Answers every buffer on the pipe with its reverse, and puts a copy on the queue.
#[task]
fn echo_reversed(mut conn: Connection<Bytes>, queue: Queue<Bytes>) {
    while let Ok(data) = conn.recv() {
        queue.put(&data).expect("put");
        let mut v = data.into_vec();
        v.reverse();
        conn.send(&Bytes::from(v)).expect("send");
    }
}

fn pipe_and_queue(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds = fd_count();
    {
        let (mut ours, theirs) = ctx.pipe::<Bytes>()?;
        let queue = ctx.queue::<Bytes>()?;
        let child = ctx.process(echo_reversed, (theirs, queue.clone())).start()?;
        for (i, &size) in SIZES.iter().chain(SIZES.iter().rev()).enumerate() {
            let sent = pattern(i as u8, size);
            ours.send(&sent)?;
            let back = ours.recv_timeout(DEADLINE)?;
            ensure(*back == reversed(&sent), || format!("pipe: {size} bytes came back wrong"))?;
            let queued = queue.get_timeout(DEADLINE)?;
            ensure(queued == sent, || format!("queue: {size} bytes came out wrong"))?;
        }
        drop(ours);
        join(child)??;
    }
    ensure(fd_count() == fds, || format!("fds: {} before, {} after", fds, fd_count()))?;
    ensure(zombie_children().is_empty(), || format!("zombies {:?}", zombie_children()))
}

/// Says it is about to return, then returns 64 MiB: far more than the socket holds, so the
/// child blocks inside the send of its result until the parent reads.
#[task]
fn announce_then_return(conn: Connection<u8>) -> Bytes {
    let large = Bytes::from(vec![5u8; 64 << 20]);
    conn.send(&1).expect("announce");
    large
}

fn killed_mid_result(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds = fd_count();
    {
        let (mut ours, theirs) = ctx.pipe::<u8>()?;
        let mut child = ctx.process(announce_then_return, theirs).start()?;
        ours.recv_timeout(DEADLINE)?;
        // The child is now returning: encoding its result, or stuck in the middle of sending it.
        child.kill()?;
        let err = join(child)?.expect_err("killed before its result arrived");
        ensure(err.kind() == ErrorKind::ChildExited, || format!("{err:?}"))?;
        ensure(err.exit_status() == Some(ExitStatus::Signaled(libc::SIGKILL)), || {
            format!("{err:?}")
        })?;
    }
    ensure(fd_count() == fds, || format!("fds: {} before, {} after", fds, fd_count()))?;
    ensure(zombie_children().is_empty(), || format!("zombies {:?}", zombie_children()))
}

fn worker_killed_mid_result(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds = fd_count();
    {
        let pool = ctx.pool().processes(1).build()?;
        let (mut ours, theirs) = ctx.pipe::<u8>()?;
        let mut pending = pool.apply_async(announce_then_return, theirs)?;
        ours.recv_timeout(DEADLINE)?;
        for pid in pool.pids() {
            // A pidfd names the worker for sure (it is our unreaped child).
            let pidfd = sys::pidfd_open(pid)?;
            sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL)?;
        }
        let err = pending.get_timeout(DEADLINE).expect_err("killed before its result arrived");
        ensure(err.kind() == ErrorKind::ChildExited, || format!("{err:?}"))?;
        ensure(err.exit_status() == Some(ExitStatus::Signaled(libc::SIGKILL)), || {
            format!("{err:?}")
        })?;
        pool.terminate();
    }
    ensure(fd_count() == fds, || format!("fds: {} before, {} after", fds, fd_count()))?;
    ensure(zombie_children().is_empty(), || format!("zombies {:?}", zombie_children()))
}
