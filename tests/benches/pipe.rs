//! Pipe benchmark: round trip of a small message, and bulk throughput with 64 KiB and 16 MiB
//! messages, through a `multiproc::Connection` to a child process—beside a raw Unix-socket
//! ping-pong and bulk transfer between two processes, and Python's `multiprocessing.Pipe`,
//! measured in the same run.
//!
//! `cargo bench -p multiproc-tests --bench pipe` (`-- --quick` for a smoke run).

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{
    Stats, Table, Target, Value, across_cpus, measure_pair, on_one_cpu, python, python_placed,
    python_time, with_forked_peer, with_raw_echo,
};
use multiproc::{Bytes, Connection, Context, Queue, RecvError, task};

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

/// Round trips through our pipe to an echo child and through a raw socket to a forked echo
/// process, measured in alternation: (ours, raw).
/// Round trips through our pipe and through a raw socket, to an echo process each, measured in
/// alternation; `settle` runs once both echo processes exist (see `across_cpus`).
fn round_trips(
    ctx: &Context,
    runs: usize,
    settle: &dyn Fn(),
) -> Result<(Stats, Stats), multiproc::Error> {
    let (mut ours, theirs) = ctx.pipe::<u64>()?;
    let child = ctx.process(echo, theirs).start()?;
    let stats = with_raw_echo(|raw| {
        settle();
        let pipe = || {
            ours.send(&7).expect("ping");
            ours.recv().expect("pong");
        };
        measure_pair(runs, pipe, raw)
    });
    drop(ours);
    child.join()?;
    Ok(stats)
}

fn ours_bulk(ctx: &Context, size: usize, count: usize) -> Result<Duration, multiproc::Error> {
    let (mut ours, theirs) = ctx.pipe::<Bytes>()?;
    let child = ctx.process(sink, (theirs, count)).start()?;
    let message = Bytes::from(vec![b'x'; size]);
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

/// Puts `0..count` on `queue`, then returns.
#[task]
fn fill(queue: Queue<u64>, count: u64) {
    for i in 0..count {
        queue.put(&i).expect("put");
    }
}

/// A child puts `count` small items on a queue while this process gets them: start to last get.
fn ours_queue(ctx: &Context, count: u64) -> Result<Duration, multiproc::Error> {
    let queue = ctx.queue::<u64>()?;
    let started = Instant::now();
    let child = ctx.process(fill, (queue.clone(), count)).start()?;
    for _ in 0..count {
        queue.get()?;
    }
    let took = started.elapsed();
    child.join()?;
    Ok(took)
}

/// The same over a raw Unix socket: a forked child writes each 8-byte item, this process reads
/// each.
fn raw_queue(count: u64) -> Duration {
    with_forked_peer(
        |mut theirs| {
            for i in 0..count {
                theirs.write_all(&i.to_le_bytes()).expect("write");
            }
        },
        |ours| {
            let started = Instant::now();
            let mut item = [0u8; 8];
            for _ in 0..count {
                ours.read_exact(&mut item).expect("read");
            }
            started.elapsed()
        },
    )
}

fn main() -> Result<(), multiproc::Error> {
    let quick = common::quick();
    let runs = if quick { 100 } else { 10_000 };
    let total: usize = if quick { 16 << 20 } else { 512 << 20 };
    let bulk = [(64 << 10, total >> 16), (16 << 20, total >> 24)];
    let ctx = Context::new("fork")?;
    // Each bulk transfer is repeated, and the medians compared, so that a burst of load on the
    // shared machine does not decide the ratio.
    let repeats: usize = if quick { 1 } else { 5 };
    let queue_items: u64 = if quick { 10_000 } else { 200_000 };
    let mut args = vec![runs.to_string(), repeats.to_string()];
    args.extend(bulk.iter().map(|(size, count)| format!("{size}:{count}")));
    args.push(format!("queue:{queue_items}"));
    let py = python("pipe_bench.py", &args);
    let mut table = Table::new(format!(
        "Pipe between two processes: round trip (median of {runs}) and bulk transfer of {} MiB \
         (median of {repeats})",
        total >> 20
    ));
    let rtt_args = [runs.to_string(), "1".into()];
    let rtt_row = |table: &mut Table, placement: &str, (ours, raw): (Stats, Stats), py| {
        table.row(
            &format!("round trip of a small message vs raw Unix-socket ping-pong, {placement}"),
            "any",
            Value::Time(ours.median),
            Value::Time(raw.median),
            python_time(&py, "rtt"),
            Target::None,
        );
    };
    if let Some((cpus, apart)) = across_cpus(|settle| round_trips(&ctx, runs, settle)) {
        let py = python_placed("pipe_bench.py", &rtt_args, Some(&cpus));
        rtt_row(&mut table, "on two CPUs", apart?, py);
    }
    let (one, py_one) = on_one_cpu(|| -> Result<_, multiproc::Error> {
        let py = python("pipe_bench.py", &rtt_args);
        Ok((round_trips(&ctx, runs, &|| {})?, py))
    })?;
    rtt_row(&mut table, "both on one CPU", one, py_one);
    for (size, count) in bulk {
        let bytes = (size * count) as f64;
        let (mut our_times, mut raw_times) = (Vec::new(), Vec::new());
        for _ in 0..repeats {
            our_times.push(ours_bulk(&ctx, size, count)?);
            raw_times.push(raw_bulk(size, count));
        }
        let rate = |value: Value| match value {
            Value::Time(t) => Value::rate(bytes, t, "B"),
            other => other,
        };
        table.row(
            &format!("bulk, {} KiB messages, vs raw Unix-socket stream", size >> 10),
            "any",
            Value::rate(bytes, Stats::of(our_times).median, "B"),
            Value::rate(bytes, Stats::of(raw_times).median, "B"),
            rate(python_time(&py, &format!("bulk_{size}"))),
            Target::None,
        );
    }
    let (mut our_times, mut raw_times) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        our_times.push(ours_queue(&ctx, queue_items)?);
        raw_times.push(raw_queue(queue_items));
    }
    let items = queue_items as f64;
    table.row(
        &format!("queue put → get, {queue_items} small items, vs raw Unix-socket writes"),
        "any",
        Value::rate(items, Stats::of(our_times).median, "items"),
        Value::rate(items, Stats::of(raw_times).median, "items"),
        match python_time(&py, "queue") {
            Value::Time(t) => Value::rate(items, t, "items"),
            other => other,
        },
        Target::None,
    );
    table.note("The child is started with fork; a pipe does not depend on the start method.");
    table.note(
        "The queue row: a child puts every item while this process gets them, from the child's \
         start to the last get; Python's row uses multiprocessing.Queue the same way.",
    );
    table.note(
        "\"On two CPUs\": every echo process (ours, the raw one, Python's) runs on one CPU and \
         the process that measures on the other, so that every round trip crosses CPUs. Left to \
         the scheduler, one of the two echo processes alive at once shares the measuring \
         process's CPU and gets the fast round trips, which made the ratio a lottery.",
    );
    table.note("Python's rows use multiprocessing.Pipe (send / recv, send_bytes / recv_bytes).");
    table.note(
        "A receive with nothing to watch but its socket spins before it sleeps: it tries again \
         for 10 µs, yielding the CPU between tries, growing to 50 µs while answers keep coming \
         within 250 µs, and stops spinning for a while after 8 longer waits in a row (a slow \
         peer). Two ends that both spin hear each other without a wake-up, which across CPUs \
         on this VM is most of a round trip; on one CPU the yield lets the peer run at once. \
         Measured in one session (raw socket: 69-73 µs across CPUs): across CPUs 71-77 µs \
         without the spin, 4.3-4.5 µs with it; on one CPU 1.18× the raw socket's without, \
         1.08-1.09× with. A spin fixed at 5 µs never locked in; one that backed off after \
         every miss did not either.",
    );
    table.finish();
    Ok(())
}
