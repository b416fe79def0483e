//! Pipes and descriptors as values, under the start method being tested.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;

use libtest_mimic::Failed;
use multiproc::{
    Client, Connection, Context, ErrorKind, Fd, Listener, RecvError, RecvTimeoutError, SealedSlice,
    SharedSlice, task,
};
use multiproc_core::sys;

use crate::Scenario;
use crate::common::{DEADLINE, ensure, fd_count, join, warm_up, zombie_children};

pub const SCENARIOS: &[Scenario] = &[
    ("pipe_child_sends_then_exits_and_nothing_is_lost", sends_then_exits),
    ("pipe_carries_a_64_mib_message_both_ways", big_message),
    ("pipe_peer_that_dies_is_disconnected_not_a_hang", peer_dies),
    ("pipe_child_sees_the_end_when_the_parent_drops_its_end", parent_drops_end),
    ("wait_returns_the_ready_connections_and_processes", wait_for_any),
    ("fd_passed_to_a_child_works_and_closes_with_its_owner", fd_to_child),
    ("fd_returned_by_a_child_works", fd_from_child),
    ("fd_in_pool_items", fd_in_pool),
    ("shared_memory_written_by_a_child_is_seen_by_the_parent", shared_written_by_child),
    ("sealed_slice_is_read_by_pool_workers_in_place", sealed_in_pool),
    ("listener_accepts_a_child_with_the_key_and_refuses_one_without", listener_by_name),
];

/// Sends `0..n` on `conn`, then returns: the process exits right after its last send.
#[task]
fn send_numbers(conn: Connection<u64>, n: u64) {
    for i in 0..n {
        conn.send(&i).expect("send");
    }
}

/// Receives everything until the sender is gone; fails the test on a timeout instead of
/// hanging.
fn drain(conn: &mut Connection<u64>) -> Result<Vec<u64>, Failed> {
    let mut got = Vec::new();
    loop {
        match conn.recv_timeout(DEADLINE) {
            Ok(value) => got.push(value),
            Err(RecvTimeoutError::Disconnected) => return Ok(got),
            Err(e) => return Err(format!("after {} messages: {e}", got.len()).into()),
        }
    }
}

fn sends_then_exits(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds = fd_count();
    let (mut ours, theirs) = ctx.pipe::<u64>()?;
    let child = ctx.process(send_numbers, (theirs, 10_000)).start()?;
    let got = drain(&mut ours)?;
    join(child)??;
    ensure(got == (0..10_000).collect::<Vec<u64>>(), || {
        format!(
            "{} of 10000 messages, in order: {}",
            got.len(),
            got.windows(2).all(|w| w[0] < w[1])
        )
    })?;
    drop(ours);
    ensure(fd_count() == fds, || "fds".into())
}

/// Receives one message and sends it back reversed.
#[task]
fn echo_reversed(mut conn: Connection<Vec<u8>>) {
    let mut message = conn.recv().expect("recv");
    message.reverse();
    conn.send(&message).expect("send");
}

fn big_message(ctx: &Context) -> Result<(), Failed> {
    let (mut ours, theirs) = ctx.pipe::<Vec<u8>>()?;
    let child = ctx.process(echo_reversed, theirs).start()?;
    let message: Vec<u8> =
        (0..64u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    ours.send(&message)?;
    let back = ours.recv_timeout(DEADLINE)?;
    join(child)??;
    ensure(back.len() == message.len(), || format!("{} bytes came back", back.len()))?;
    ensure(back.iter().rev().eq(message.iter()), || "the message changed on the way".into())
}

/// Waits for a message that never comes, until killed.
#[task]
fn wait_forever(mut conn: Connection<u64>) -> u64 {
    conn.recv().unwrap_or(0)
}

fn peer_dies(ctx: &Context) -> Result<(), Failed> {
    let (mut ours, theirs) = ctx.pipe::<u64>()?;
    let mut child = ctx.process(wait_forever, theirs).start()?;
    child.kill()?;
    let _ = join(child)?;
    match ours.recv_timeout(DEADLINE) {
        Err(RecvTimeoutError::Disconnected) => {}
        other => return Err(format!("expected Disconnected, got {other:?}").into()),
    }
    match ours.recv() {
        Err(RecvError::Disconnected) => Ok(()),
        other => Err(format!("expected Disconnected again, got {other:?}").into()),
    }
}

/// Counts messages until the other end is closed.
#[task]
fn count_until_closed(mut conn: Connection<u64>) -> u64 {
    let mut count = 0;
    while conn.recv().is_ok() {
        count += 1;
    }
    count
}

fn parent_drops_end(ctx: &Context) -> Result<(), Failed> {
    let (ours, theirs) = ctx.pipe::<u64>()?;
    // Another pipe alive in the parent, not given to the child: under fork the child must not
    // keep it (or ours) open.
    let (_other_a, _other_b) = ctx.pipe::<u64>()?;
    let child = ctx.process(count_until_closed, theirs).start()?;
    for i in 0..5 {
        ours.send(&i)?;
    }
    drop(ours);
    let count = join(child)??;
    ensure(count == 5, || format!("the child counted {count}"))
}

/// Returns `value` at once.
#[task]
fn give(value: u64) -> u64 {
    value
}

fn wait_for_any(ctx: &Context) -> Result<(), Failed> {
    use multiproc::wait;
    use std::time::Duration;
    let (mut a, a_peer) = ctx.pipe::<u64>()?;
    let (b, _b_peer) = ctx.pipe::<u64>()?;
    let nothing = wait(&[&a, &b], Some(Duration::from_millis(10)))?;
    ensure(nothing.is_empty(), || format!("ready before anything was sent: {nothing:?}"))?;
    a_peer.send(&1)?;
    a_peer.send(&2)?;
    ensure(wait(&[&a, &b], Some(DEADLINE))? == vec![0], || "a message on a".into())?;
    ensure(a.recv()? == 1, || "first message".into())?;
    // The second message may already sit in a's buffer: still ready.
    ensure(wait(&[&b, &a], Some(DEADLINE))? == vec![1], || "a buffered message".into())?;
    ensure(a.recv()? == 2, || "second message".into())?;
    let p = ctx.process(give, 5).start()?;
    ensure(wait(&[&a, &b, &p], Some(DEADLINE))? == vec![2], || "the child's end".into())?;
    ensure(join(p)?? == 5, || "its value".into())?;
    drop(a_peer);
    ensure(wait(&[&a, &b], Some(DEADLINE))? == vec![0], || "end-of-file is ready".into())
}

/// Writes its pid to the file it was handed and reports the fd number it got.
#[task]
fn write_pid(mut file: Fd<File>) -> i32 {
    writeln!(file, "written by {}", std::process::id()).expect("write");
    file.as_raw_fd()
}

fn temp_file(what: &str) -> Result<File, Failed> {
    let path = std::env::temp_dir().join(format!("multiproc-{what}-{}", std::process::id()));
    let file = File::options().read(true).write(true).create(true).truncate(true).open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

fn fd_to_child(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds = fd_count();
    let file = temp_file("fd-to-child")?;
    // A descriptor numbered above 256 travels like any other.
    let high = sys::dup_at_least(file.as_fd(), 300)?;
    ensure(high.as_raw_fd() >= 300, || format!("dup got {}", high.as_raw_fd()))?;
    let high = Fd::new(File::from(high));
    let child = ctx.process(write_pid, high).start()?;
    let child_pid = child.pid();
    let their_fd = join(child)??;
    ensure(their_fd >= 0, || "child fd".into())?;
    let mut file = file;
    file.rewind()?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    ensure(text == format!("written by {child_pid}\n"), || format!("file holds {text:?}"))?;
    drop(file);
    ensure(fd_count() == fds, || format!("fds before {fds}, after {}", fd_count()))?;
    ensure(zombie_children().is_empty(), || "zombies".into())
}

/// Makes a socket pair, writes a greeting into one end, and returns the other.
#[task]
fn make_socket(greeting: String) -> Fd<UnixStream> {
    let (mut a, b) = UnixStream::pair().expect("socketpair");
    a.write_all(greeting.as_bytes()).expect("write");
    Fd::new(b)
}

fn fd_from_child(ctx: &Context) -> Result<(), Failed> {
    let mut stream = join(ctx.process(make_socket, "hello from a child".to_owned()).start()?)??;
    stream.set_read_timeout(Some(DEADLINE))?;
    let mut text = String::new();
    // The child (and with it the other end) is gone: read to end-of-file.
    stream.read_to_string(&mut text)?;
    ensure(text == "hello from a child", || format!("read {text:?}"))
}

/// Appends `line` to the file it was handed.
#[task]
fn append((mut file, line): (Fd<File>, String)) -> usize {
    file.write_all(line.as_bytes()).expect("append");
    line.len()
}

fn fd_in_pool(ctx: &Context) -> Result<(), Failed> {
    let file = temp_file("fd-in-pool")?;
    let pool = ctx.pool().processes(2).build()?;
    let items = (0..20)
        .map(|i| Ok((Fd::new(file.try_clone()?), format!("line {i}\n"))))
        .collect::<std::io::Result<Vec<_>>>()?;
    let written: usize = pool.map(append, items)?.into_iter().sum();
    drop(pool);
    let mut file = file;
    file.rewind()?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    ensure(text.len() == written && text.lines().count() == 20, || format!("{text:?}"))?;
    Ok(())
}

/// Writes `i * i` into every element of the shared slice.
#[task]
fn fill_squares(slice: SharedSlice<u64>) -> usize {
    for i in 0..slice.len() {
        slice.set(i, (i * i) as u64).expect("set");
    }
    slice.len()
}

fn shared_written_by_child(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds = fd_count();
    let slice = SharedSlice::<u64>::new(100_000)?;
    // The child gets the same memory (the descriptor travels; nothing is copied back).
    let filled = join(ctx.process(fill_squares, slice.try_clone()?).start()?)??;
    ensure(filled == slice.len(), || format!("child saw {filled} elements"))?;
    let seen = slice.to_vec();
    ensure(seen.iter().enumerate().all(|(i, v)| *v == (i * i) as u64), || {
        "the parent does not see the child's writes".into()
    })?;
    drop(slice);
    ensure(fd_count() == fds, || format!("fds before {fds}, after {}", fd_count()))
}

/// Sums `data[start..end]` and says where the data is mapped.
#[task]
fn sum_range(data: &SealedSlice<u32>, (start, end): (usize, usize)) -> (u64, u64) {
    (data[start..end].iter().map(|x| u64::from(*x)).sum(), data.as_ptr() as u64)
}

/// The initializer: keeps the sealed slice it was handed.
#[task]
fn keep_slice(data: SealedSlice<u32>) -> SealedSlice<u32> {
    data
}

fn sealed_in_pool(ctx: &Context) -> Result<(), Failed> {
    let values: Vec<u32> = (0..1_000_000).collect();
    let sealed = SealedSlice::from_slice(&values)?;
    let pool = ctx.pool().processes(2).initializer(keep_slice, sealed).build()?;
    let ranges: Vec<(usize, usize)> = (0..10).map(|i| (i * 100_000, (i + 1) * 100_000)).collect();
    let sums = pool.map(sum_range, ranges.clone())?;
    for ((start, end), (sum, _)) in ranges.iter().zip(&sums) {
        let expected: u64 = (*start as u64..*end as u64).sum();
        ensure(*sum == expected, || format!("sum of {start}..{end}: {sum}"))?;
    }
    Ok(())
}

/// Connects to the listener at `name` with `key`, sends 21 and returns the answer; or the kind
/// of error that stopped it.
#[task]
fn call_listener(name: String, key: Vec<u8>) -> Result<u64, String> {
    let mut conn = Client::connect::<u64>(&name, &key).map_err(|e| format!("{:?}", e.kind()))?;
    conn.send(&21).map_err(|e| e.to_string())?;
    conn.recv().map_err(|e| e.to_string())
}

fn listener_by_name(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds = fd_count();
    let name = format!("multiproc-suite-{}-{}", ctx.start_method(), std::process::id());
    let listener = Listener::bind(&name, b"the key")?;
    // Only the name and the key travel: the child finds the listener by itself.
    let intruder = ctx.process(call_listener, (name.clone(), b"a guess".to_vec())).start()?;
    let refused = listener.accept_timeout::<u64>(DEADLINE).map(drop).unwrap_err();
    ensure(refused.kind() == ErrorKind::AuthenticationFailed, || format!("intruder: {refused}"))?;
    let told = join(intruder)??;
    ensure(told == Err("AuthenticationFailed".into()), || format!("the intruder got {told:?}"))?;

    let friend = ctx.process(call_listener, (name.clone(), b"the key".to_vec())).start()?;
    let mut conn = listener.accept_timeout::<u64>(DEADLINE)?;
    let asked = conn.recv_timeout(DEADLINE).map_err(|e| e.to_string())?;
    conn.send(&(asked * 2)).map_err(|e| e.to_string())?;
    let answer = join(friend)??;
    ensure(answer == Ok(42), || format!("the friend got {answer:?}"))?;
    drop((conn, listener));
    ensure(zombie_children().is_empty(), || "zombies".into())?;
    ensure(fd_count() == fds, || format!("fds before {fds}, after {}", fd_count()))
}
