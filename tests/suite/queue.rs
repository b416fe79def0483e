//! Queues shared by several processes, under the start method being tested.

use std::collections::BTreeMap;

use libtest_mimic::Failed;
use multiproc::{Context, JoinableQueue, Queue, TryGetError, task};

use crate::Scenario;
use crate::common::{DEADLINE, ensure, fd_count, join, warm_up, zombie_children};

pub const SCENARIOS: &[Scenario] = &[
    ("queue_8_producers_of_10000_messages_arrive_whole", many_producers),
    ("queue_keeps_what_a_child_put_just_before_it_exited", put_then_exit),
    ("queue_bounded_holds_a_child_producer_to_its_capacity", bounded),
    ("joinable_queue_join_returns_once_workers_marked_every_item_done", joinable),
    ("queue_unbounded_takes_a_million_puts_before_any_get", million_before_get),
    ("queue_child_that_put_100000_is_joined_before_the_parent_drains", joined_before_drain),
];

const PRODUCERS: u32 = 8;
const PER_PRODUCER: u32 = 10_000;

/// The payload of message `seq` from `producer`: its length varies from a few bytes to past
/// the inline record size, so some messages travel in memory while others are inline.
fn payload(producer: u32, seq: u32) -> String {
    let len = if seq % 1000 == 999 { 40_000 } else { (seq % 97) as usize };
    let letter = char::from(b'a' + (producer as u8 % 26));
    std::iter::repeat_n(letter, len).collect()
}

/// Puts `PER_PRODUCER` messages, then returns: the process exits right after its last put.
#[task]
fn produce(queue: Queue<(u32, u32, String)>, producer: u32) {
    for seq in 0..PER_PRODUCER {
        queue.put(&(producer, seq, payload(producer, seq))).expect("put");
    }
}

fn many_producers(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds = fd_count();
    let queue = ctx.queue::<(u32, u32, String)>()?;
    let children = (0..PRODUCERS)
        .map(|producer| ctx.process(produce, (queue.clone(), producer)).start())
        .collect::<Result<Vec<_>, _>>()?;
    // Every producer's messages come out whole and in its own order, however they interleave.
    let mut next: BTreeMap<u32, u32> = BTreeMap::new();
    for received in 0..PRODUCERS * PER_PRODUCER {
        let (producer, seq, text) =
            queue.get_timeout(DEADLINE).map_err(|e| format!("after {received} messages: {e}"))?;
        let expected = next.entry(producer).or_insert(0);
        ensure(seq == *expected, || format!("producer {producer}: {seq} after {expected}"))?;
        ensure(text == payload(producer, seq), || {
            format!("producer {producer} message {seq}: a payload of {} bytes", text.len())
        })?;
        *expected += 1;
    }
    for child in children {
        join(child)??;
    }
    ensure(matches!(queue.try_get(), Err(TryGetError::Empty)), || "a message too many".into())?;
    ensure(next.values().all(|n| *n == PER_PRODUCER), || format!("counts {next:?}"))?;
    drop(queue);
    ensure(zombie_children().is_empty(), || "zombies".into())?;
    ensure(fd_count() == fds, || format!("fds before {fds}, after {}", fd_count()))
}

/// Puts `0..n` and returns at once.
#[task]
fn put_numbers(queue: Queue<u64>, n: u64) {
    for i in 0..n {
        queue.put(&i).expect("put");
    }
}

fn put_then_exit(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds = fd_count();
    let queue = ctx.queue::<u64>()?;
    // The child is gone before anything is read: what it put lives in the kernel, not in a
    // buffer or thread of the child.
    join(ctx.process(put_numbers, (queue.clone(), 100)).start()?)??;
    let mut got = Vec::new();
    while let Ok(value) = queue.try_get() {
        got.push(value);
    }
    ensure(got == (0..100).collect::<Vec<u64>>(), || format!("got {got:?}"))?;
    drop(queue);
    ensure(fd_count() == fds, || format!("fds before {fds}, after {}", fd_count()))
}

fn bounded(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds = fd_count();
    let queue = Queue::<u64>::bounded(4)?;
    let child = ctx.process(put_numbers, (queue.clone(), 500)).start()?;
    for i in 0..500 {
        // The producer is held back: never more than the capacity is in the queue.
        ensure(queue.len() <= 4, || format!("{} messages in a queue of 4", queue.len()))?;
        let value = queue.get_timeout(DEADLINE).map_err(|e| format!("message {i}: {e}"))?;
        ensure(value == i, || format!("message {i} was {value}"))?;
    }
    join(child)??;
    drop(queue);
    ensure(fd_count() == fds, || format!("fds before {fds}, after {}", fd_count()))
}

/// Takes items until `None`, puts each item's square on `results` and only then marks it
/// done; returns how many items it handled.
#[task]
fn square_items(jobs: JoinableQueue<Option<u64>>, results: Queue<u64>) -> u64 {
    let mut handled = 0;
    loop {
        let job = jobs.get_timeout(DEADLINE).expect("a job within the deadline");
        let Some(n) = job else {
            jobs.task_done().expect("task_done");
            return handled;
        };
        results.put(&(n * n)).expect("put a result");
        handled += 1;
        jobs.task_done().expect("task_done");
    }
}

fn joinable(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds = fd_count();
    let jobs = ctx.joinable_queue::<Option<u64>>()?;
    // Unbounded results, read only after `join`: the workers must never block on them.
    let results = ctx.queue::<u64>()?;
    let workers = (0..3)
        .map(|_| ctx.process(square_items, (jobs.clone(), results.clone())).start())
        .collect::<Result<Vec<_>, _>>()?;
    for n in 0..100 {
        jobs.put(&Some(n))?;
    }
    for _ in &workers {
        jobs.put(&None)?;
    }
    ensure(jobs.join_timeout(DEADLINE)?, || format!("{} items not done", jobs.unfinished()))?;
    // join returned, so every result was put before its item was marked done.
    let mut squares = Vec::new();
    while let Ok(square) = results.try_get() {
        squares.push(square);
    }
    squares.sort_unstable();
    ensure(squares == (0..100).map(|n| n * n).collect::<Vec<_>>(), || {
        format!("{} results after join", squares.len())
    })?;
    let mut handled = 0;
    for worker in workers {
        handled += join(worker)??;
    }
    ensure(handled == 100, || format!("workers handled {handled} items"))?;
    drop((jobs, results));
    ensure(fd_count() == fds, || format!("fds before {fds}, after {}", fd_count()))
}

fn million_before_get(ctx: &Context) -> Result<(), Failed> {
    let queue = ctx.queue::<u64>()?;
    // The socket holds a few hundred records; the rest go to the overflow log, and no put
    // waits for a consumer (there is none yet: this process gets only afterwards).
    for i in 0..1_000_000u64 {
        // A deadline, so that a queue that does wait for a consumer fails here, not hangs.
        queue.put_timeout(&i, DEADLINE).map_err(|e| format!("put {i}: {e:?}"))?;
    }
    ensure(queue.len() == 1_000_000, || format!("len {}", queue.len()))?;
    for i in 0..1_000_000u64 {
        let got = queue.get_timeout(DEADLINE).map_err(|e| format!("get {i}: {e}"))?;
        ensure(got == i, || format!("got {got} where {i} was due"))?;
    }
    ensure(matches!(queue.try_get(), Err(TryGetError::Empty)), || "a message too many".into())?;
    ensure(queue.is_empty(), || format!("len {}", queue.len()))
}

/// Puts `count` messages of 100 bytes, in order, then returns.
#[task]
fn put_many(queue: Queue<(u32, Vec<u8>)>, count: u32) {
    for i in 0..count {
        queue.put(&(i, vec![(i % 251) as u8; 100])).expect("put");
    }
}

fn joined_before_drain(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds = fd_count();
    let queue = ctx.queue::<(u32, Vec<u8>)>()?;
    // The child ends without waiting for anyone to read what it put.
    join(ctx.process(put_many, (queue.clone(), 100_000)).start()?)??;
    for i in 0..100_000 {
        let (n, bytes) = queue.get_timeout(DEADLINE).map_err(|e| format!("get {i}: {e}"))?;
        ensure(n == i && bytes == vec![(i % 251) as u8; 100], || format!("{n} where {i} was due"))?;
    }
    ensure(matches!(queue.try_get(), Err(TryGetError::Empty)), || "a message too many".into())?;
    drop(queue);
    let after = fd_count();
    ensure(after == fds, || format!("fds before {fds}, after {after}"))?;
    ensure(zombie_children().is_empty(), || format!("zombies {:?}", zombie_children()))
}
