//! Pipe benchmark: round trip of a small message, and bulk throughput with 64 KiB and 16 MiB
//! messages, through a `multiproc::Connection` to a child process—beside a raw Unix-socket
//! ping-pong and bulk transfer between two processes, and Python's `multiprocessing.Pipe`,
//! measured in the same run.
//!
//! `cargo bench -p multiproc-tests --bench pipe` (`-- --quick` for a smoke run).

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Stats, measure, raw_ping_pong, with_forked_peer};
use multiproc::{Bytes, Connection, Context, RecvError, task};

/// Echoes every message until the other end closes.
#[task]
fn echo(mut conn: Connection<u64>) {
    while let Ok(value) = conn.recv() {
        if conn.send(&value).is_err() {
            return;
        }
    }
}

/// Receives `count` messages, then answers with an empty one.
#[task]
fn sink(mut conn: Connection<Bytes>, count: usize) {
    for _ in 0..count {
        conn.recv().expect("message");
    }
    conn.send(&Bytes::default()).expect("ack");
}

fn ours_ping_pong(ctx: &Context, runs: usize) -> Result<Stats, multiproc::Error> {
    let (mut ours, theirs) = ctx.pipe::<u64>()?;
    let child = ctx.process(echo, theirs).start()?;
    let stats = measure(runs, || {
        ours.send(&7).expect("ping");
        ours.recv().expect("pong");
    });
    drop(ours);
    child.join()?;
    Ok(stats)
}

fn ours_bulk(ctx: &Context, size: usize, count: usize) -> Result<Duration, multiproc::Error> {
    let (mut ours, theirs) = ctx.pipe::<Bytes>()?;
    let child = ctx.process(sink, (theirs, count)).start()?;
    let message = Bytes(vec![b'x'; size]);
    let started = Instant::now();
    for _ in 0..count {
        ours.send(&message).expect("send");
    }
    match ours.recv() {
        Ok(_) => {}
        Err(RecvError::Disconnected) => panic!("the sink ended early"),
        Err(e) => panic!("{e}"),
    }
    let took = started.elapsed();
    child.join()?;
    Ok(took)
}

fn raw_bulk(size: usize, count: usize) -> Duration {
    with_forked_peer(
        |mut theirs| {
            let mut buf = vec![0u8; size];
            for _ in 0..count {
                theirs.read_exact(&mut buf).expect("read");
            }
            theirs.write_all(&[1]).expect("ack");
        },
        |ours| {
            let message = vec![b'x'; size];
            let started = Instant::now();
            for _ in 0..count {
                ours.write_all(&message).expect("write");
            }
            ours.read_exact(&mut [0u8; 1]).expect("ack");
            started.elapsed()
        },
    )
}

/// Python's median round trip and bulk times, in the order of `bulk`.
fn python(runs: usize, bulk: &[(usize, usize)]) -> Option<(Duration, Vec<Duration>)> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/python/pipe_bench.py");
    let specs = bulk.iter().map(|(size, count)| format!("{size}:{count}"));
    let output =
        Command::new("python3").args(["-I", "-S", script, &runs.to_string()]).args(specs).output();
    let output = output.ok().filter(|o| o.status.success())?;
    let text = String::from_utf8_lossy(&output.stdout);
    let seconds = |s: &str| s.trim().parse::<f64>().ok().map(Duration::from_secs_f64);
    let rtt = text.lines().find_map(|l| l.strip_prefix("rtt ")).and_then(seconds)?;
    let times = text
        .lines()
        .filter_map(|l| l.strip_prefix("bulk "))
        .filter_map(|l| seconds(l.rsplit(' ').next()?))
        .collect();
    Some((rtt, times))
}

fn main() -> Result<(), multiproc::Error> {
    let quick = common::quick();
    let runs = if quick { 100 } else { 10_000 };
    let total: usize = if quick { 16 << 20 } else { 512 << 20 };
    let bulk = [(64 << 10, total >> 16), (16 << 20, total >> 24)];
    let ctx = Context::new("fork")?;
    println!(
        "pipe between two processes (child started with fork){}",
        if quick { " — quick mode, numbers are not meaningful" } else { "" }
    );
    let py = python(runs, &bulk);
    let raw = raw_ping_pong(runs);
    let ours = ours_ping_pong(&ctx, runs)?;
    println!("| workload | multiproc | raw Unix socket | ratio | Python | Python ÷ multiproc |");
    println!("|---|---:|---:|---:|---:|---:|");
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "| round trip, small message (median of {runs}) | {:.1} µs | {:.1} µs | {:.2} | {} | {} |",
        micros(ours.median),
        micros(raw.median),
        ours.median.as_secs_f64() / raw.median.as_secs_f64(),
        py.as_ref().map_or("no python3".into(), |(rtt, _)| format!("{:.1} µs", micros(*rtt))),
        py.as_ref().map_or("n/a".into(), |(rtt, _)| format!(
            "{:.1}x",
            rtt.as_secs_f64() / ours.median.as_secs_f64()
        )),
    );
    for (i, (size, count)) in bulk.iter().enumerate() {
        let gib = |d: Duration| (size * count) as f64 / d.as_secs_f64() / f64::from(1u32 << 30);
        let ours = ours_bulk(&ctx, *size, *count)?;
        let raw = raw_bulk(*size, *count);
        let theirs = py.as_ref().and_then(|(_, times)| times.get(i).copied());
        println!(
            "| bulk, {} KiB messages ({} MiB) | {:.2} GiB/s | {:.2} GiB/s | {:.2} | {} | {} |",
            size >> 10,
            (size * count) >> 20,
            gib(ours),
            gib(raw),
            // As a time ratio: how much longer ours takes than the raw socket.
            ours.as_secs_f64() / raw.as_secs_f64(),
            theirs.map_or("no python3".into(), |t| format!("{:.2} GiB/s", gib(t))),
            theirs
                .map_or("n/a".into(), |t| format!("{:.1}x", t.as_secs_f64() / ours.as_secs_f64())),
        );
    }
    Ok(())
}
