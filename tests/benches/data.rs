//! Large-data benchmark: 100 MB as a pool task's argument and back (as `Bytes` and as a
//! `Vec<u8>`), and the same 100 MB handed over through shared memory, under each start method;
//! beside a raw Unix-socket transfer of 200 MB between two processes, `memcpy`, an empty task,
//! and Python's `multiprocessing` (bytes through `Pool.apply`, `shared_memory.SharedMemory`).
//!
//! `cargo bench -p multiproc-tests --bench data` (`-- --quick`: 4 MB).

mod common;

use std::io::{Read, Write};

use common::{Table, Target, Value, measure, measure_pair, python, python_time, with_forked_peer};
use multiproc::{Bytes, Context, SharedMemory, task};

/// Returns its argument.
#[task]
fn echo_bytes(data: Bytes) -> Bytes {
    data
}

/// Returns its argument, copied into the message and out of it at each end.
#[task]
fn echo_vec(data: Vec<u8>) -> Vec<u8> {
    data
}

/// Does nothing.
#[task]
fn empty() {}

/// Reads the first and the last byte of shared memory it was handed.
#[task]
fn touch(memory: SharedMemory) -> u32 {
    let (mut first, mut last) = ([0u8], [0u8]);
    memory.read_at(0, &mut first).expect("first byte");
    memory.read_at(memory.len() - 1, &mut last).expect("last byte");
    u32::from(first[0]) + u32::from(last[0])
}

/// `size` bytes to a forked peer and back over a Unix stream socket.
fn raw_there_and_back(size: usize, runs: usize) -> common::Stats {
    with_forked_peer(
        |mut theirs| {
            let mut buf = vec![0u8; size];
            while theirs.read_exact(&mut buf).is_ok() && theirs.write_all(&buf).is_ok() {}
        },
        |ours| {
            let mut buf = vec![b'x'; size];
            measure(runs, || {
                ours.write_all(&buf).expect("there");
                ours.read_exact(&mut buf).expect("back");
            })
        },
    )
}

fn main() -> Result<(), multiproc::Error> {
    let quick = common::quick();
    let size: usize = if quick { 4 << 20 } else { 100_000_000 };
    let runs: usize = if quick { 3 } else { 10 };
    let mb = size / 1_000_000;
    let mut table = Table::new(format!(
        "{mb} MB handed to a pool worker (median of {runs}; Vec<u8>: of {})",
        runs.div_ceil(3)
    ));
    let raw = raw_there_and_back(size, runs);
    let data = vec![b'x'; size];
    let mut copy = vec![0u8; size];
    let memcpy = measure(runs, || copy.copy_from_slice(std::hint::black_box(&data)));
    let memory = SharedMemory::new(size)?;
    let fill = measure(runs, || memory.write_at(0, std::hint::black_box(&data)).expect("fill"));
    table.row(
        &format!("filling {mb} MB of shared memory vs memcpy"),
        "any",
        Value::Time(fill.median),
        Value::Time(memcpy.median),
        Value::Missing("–"),
        Target::None,
    );
    let bytes = Bytes::from(data.clone());
    for method in ["fork", "spawn", "forkserver"] {
        let ctx = Context::new(method)?;
        let pool = ctx.pool().processes(1).build()?;
        // What comes back is the next argument: no copy of ours inside the timing.
        let mut held = Some(bytes.clone());
        let as_bytes = measure(runs, || {
            let back = pool.apply(echo_bytes, held.take().expect("held")).expect("echo");
            assert_eq!(back.len(), size);
            held = Some(back);
        });
        let mut held = Some(data.clone());
        let as_vec = measure(runs.div_ceil(3), || {
            let back = pool.apply(echo_vec, held.take().expect("held")).expect("echo");
            assert_eq!(back.len(), size);
            held = Some(back);
        });
        let (shared, nothing) = measure_pair(
            runs,
            || {
                let handle = memory.try_clone().expect("handle");
                assert_eq!(pool.apply(touch, handle).expect("touch"), 2 * u32::from(b'x'));
            },
            || pool.apply(empty, ()).expect("empty"),
        );
        drop(pool);
        let py = python("data_bench.py", &[method.into(), size.to_string(), runs.to_string()]);
        table.row(
            &format!("{mb} MB Bytes argument and back vs raw socket, {mb} MB each way"),
            method,
            Value::Time(as_bytes.median),
            Value::Time(raw.median),
            python_time(&py, "argument"),
            Target::AtMost(2.0),
        );
        table.row(
            &format!("{mb} MB Vec<u8> argument and back vs raw socket"),
            method,
            Value::Time(as_vec.median),
            Value::Time(raw.median),
            python_time(&py, "argument"),
            Target::None,
        );
        let beyond = shared.median.saturating_sub(nothing.median);
        table.row(
            &format!("{mb} MB through SharedMemory vs an empty task"),
            method,
            Value::Time(shared.median),
            Value::Time(nothing.median),
            python_time(&py, "shared"),
            Target::Words(format!(
                "≤ 1 ms beyond an empty task: {:.3} ms, {}",
                beyond.as_secs_f64() * 1e3,
                if beyond.as_millis() < 1 { "met" } else { "**missed**" }
            )),
        );
    }
    table.note(
        "Python sends bytes through Pool.apply (pickled there and back) and shared memory by \
         name (shared_memory.SharedMemory).",
    );
    table.note(
        "A Vec<u8> is copied whole into the message and out of it again at each end (the codec \
         writes a slice of numbers as one block). Bytes travels out of band: written from where \
         it lies after the message, and received into a reused buffer.",
    );
    table.finish();
    Ok(())
}
