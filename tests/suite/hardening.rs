//! What hostile bytes and values at the edge of the kernel's limits do, under the start method
//! being tested: each is an error on the call that met it, never an abort or a silent exit.

use std::fs::File;

use libtest_mimic::Failed;
use multiproc::{Connection, Context, ErrorKind, Fd, RecvTimeoutError, task};
use serde::de::Deserializer;
use serde::ser::{SerializeTuple, Serializer};
use serde::{Deserialize, Serialize};

use crate::Scenario;
use crate::common::{DEADLINE, ensure, fd_count, join, living_children, warm_up};

pub const SCENARIOS: &[Scenario] = &[
    ("a_deeply_nested_message_is_a_decode_error_not_an_abort", deep_message),
    ("a_deeply_nested_result_is_a_decode_error_not_an_abort", deep_result),
    ("deeply_nested_arguments_fail_the_child_not_crash_it", deep_arguments),
    ("a_result_with_more_descriptors_than_a_message_carries_is_an_encode_error", many_fds_result),
    ("arguments_with_too_many_descriptors_fail_before_any_child_starts", many_fds_arguments),
];

/// How deep [`Deep`] nests: far past the codec's bound, far past any stack.
const LEVELS: usize = 1_000_000;

/// A recursive value, as a receiver decodes it.
#[derive(Deserialize)]
#[allow(dead_code)]
enum Tree {
    Leaf,
    Node(Box<Tree>),
}

/// Bytes that decode as a [`Tree`] a million levels deep. Its sender writes them flat (a tuple
/// of bytes, one level), so that only the receiver meets the depth: what a hostile or broken
/// peer would send.
#[derive(Debug)]
pub struct Deep;

impl Serialize for Deep {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // `Node` is variant 1, `Leaf` variant 0, each one byte.
        let mut tuple = serializer.serialize_tuple(LEVELS + 1)?;
        for _ in 0..LEVELS {
            tuple.serialize_element(&1u8)?;
        }
        tuple.serialize_element(&0u8)?;
        tuple.end()
    }
}

impl<'de> Deserialize<'de> for Deep {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Tree::deserialize(deserializer).map(|_| Deep)
    }
}

/// Sends one [`Deep`] on `conn`.
#[task]
fn send_deep(conn: Connection<Deep>) {
    conn.send(&Deep).expect("send");
}

fn deep_message(ctx: &Context) -> Result<(), Failed> {
    let (mut ours, theirs) = ctx.pipe::<Deep>()?;
    let p = ctx.process(send_deep, theirs).start()?;
    match ours.recv_timeout(DEADLINE) {
        Err(RecvTimeoutError::Failed(e)) => {
            ensure(e.kind() == ErrorKind::Decode, || format!("kind {:?}: {e}", e.kind()))?;
            ensure(e.to_string().contains("nests deeper"), || format!("{e}"))?;
        }
        Ok(_) => return Err("a million levels decoded".into()),
        Err(e) => return Err(format!("expected a decode error, got {e:?}").into()),
    }
    join(p)??;
    Ok(())
}

/// Returns a [`Deep`].
#[task]
fn make_deep() -> Deep {
    Deep
}

fn deep_result(ctx: &Context) -> Result<(), Failed> {
    match join(ctx.process(make_deep, ()).start()?)? {
        Err(e) => ensure(e.kind() == ErrorKind::Decode, || format!("kind {:?}: {e}", e.kind())),
        Ok(_) => Err("a million levels decoded".into()),
    }
}

/// Takes a [`Deep`]: under spawn and forkserver the child decodes it.
#[task]
fn take_deep(_deep: Deep) -> u32 {
    7
}

fn deep_arguments(ctx: &Context) -> Result<(), Failed> {
    let outcome = join(ctx.process(take_deep, Deep).start()?)?;
    if ctx.method().moves_arguments() {
        // fork moves the value into the child: nothing is decoded.
        ensure(matches!(outcome, Ok(7)), || format!("under fork: {outcome:?}"))
    } else {
        let e = outcome.err().ok_or("a million levels decoded")?;
        ensure(e.kind() == ErrorKind::Decode, || format!("kind {:?}: {e}", e.kind()))
    }
}

/// How many descriptors [`open_many`] returns: more than one `sendmsg` carries (253).
const TOO_MANY: usize = 300;

/// Opens `/dev/null` `n` times.
#[task]
fn open_many(n: usize) -> Vec<Fd<File>> {
    (0..n).map(|_| Fd::new(File::open("/dev/null").expect("open /dev/null"))).collect()
}

fn many_fds_result(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let before = fd_count();
    match join(ctx.process(open_many, TOO_MANY).start()?)? {
        Err(e) => {
            ensure(e.kind() == ErrorKind::Encode, || format!("kind {:?}: {e}", e.kind()))?;
            ensure(e.to_string().contains("300 descriptors"), || format!("{e}"))?;
        }
        Ok(fds) => return Err(format!("{} descriptors arrived", fds.len()).into()),
    }
    // Up to the limit they travel.
    let fds = join(ctx.process(open_many, 253).start()?)??;
    ensure(fds.len() == 253, || format!("{} arrived", fds.len()))?;
    drop(fds);
    let after = fd_count();
    ensure(after == before, || format!("fds before {before}, after {after}"))
}

/// Counts the descriptors it was given.
#[task]
fn count_fds(fds: Vec<Fd<File>>) -> usize {
    fds.len()
}

fn many_fds_arguments(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds: Vec<_> =
        (0..TOO_MANY).map(|_| File::open("/dev/null").map(Fd::new)).collect::<Result<_, _>>()?;
    let children = living_children().len();
    let started = ctx.process(count_fds, fds).start();
    if ctx.method().moves_arguments() {
        // fork moves the descriptors into the child's copy of the table: no message carries
        // them, so there is no limit to meet.
        let count = join(started?)??;
        return ensure(count == TOO_MANY, || format!("{count} arrived"));
    }
    match started {
        Err(e) => {
            ensure(e.kind() == ErrorKind::Encode, || format!("kind {:?}: {e}", e.kind()))?;
            ensure(e.to_string().contains("300 descriptors"), || format!("{e}"))?;
        }
        Ok(p) => return Err(format!("started {} with 300 descriptors", p.pid()).into()),
    }
    let now = living_children().len();
    ensure(now == children, || format!("{children} children before, {now} after"))
}
