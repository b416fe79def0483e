//! Pool benchmark: `apply` round trip, `map` throughput of a trivial task, and `imap` with
//! chunks of one, under each start method, beside a raw Unix-socket ping-pong between two
//! processes and beside Python's `multiprocessing.Pool` with the same start method, all
//! measured in this run.
//!
//! `cargo bench -p multiproc-tests --bench pool` (`-- --quick` for a smoke run). Python runs as
//! `python3 -I -S` (no site hooks); without `python3` its columns say so.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Stats, measure, raw_ping_pong};
use multiproc::{Context, task};

/// The trivial task.
#[task]
fn identity(x: u64) -> u64 {
    x
}

/// Python's numbers for one start method.
struct Python {
    apply: Stats,
    map: Duration,
    imap: Duration,
}

fn python(method: &str, processes: usize, applies: usize, map: u64, imap: u64) -> Option<Python> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/python/pool_bench.py");
    let output = Command::new("python3")
        .args(["-I", "-S", script, method])
        .args([processes.to_string(), applies.to_string(), map.to_string(), imap.to_string()])
        .output()
        .ok()?;
    if !output.status.success() {
        eprintln!("python3 {method}: {}", String::from_utf8_lossy(&output.stderr));
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout);
    // {"apply": [..], "map": s, "imap": s}: small enough to pick apart by hand.
    let field = |name: &str| -> Option<&str> {
        let start = text.find(&format!("\"{name}\": "))? + name.len() + 4;
        let rest = &text[start..];
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        Some(if rest.starts_with('[') { &rest[1..rest.find(']')?] } else { &rest[..end] })
    };
    let seconds = |s: &str| s.trim().parse::<f64>().ok().map(Duration::from_secs_f64);
    let apply: Vec<Duration> = field("apply")?.split(',').filter_map(seconds).collect();
    Some(Python {
        apply: Stats::of(apply),
        map: seconds(field("map")?)?,
        imap: seconds(field("imap")?)?,
    })
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() -> Result<(), multiproc::Error> {
    let quick = common::quick();
    let processes = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (applies, map_items, imap_items) =
        if quick { (50, 20_000u64, 2_000u64) } else { (2_000, 1_000_000u64, 100_000u64) };
    println!(
        "pool of {processes} workers: apply round trip ({applies} runs), map of {map_items} \
         items, imap (chunksize 1) of {imap_items} items{}",
        if quick { " — quick mode, numbers are not meaningful" } else { "" }
    );
    let ping = raw_ping_pong(applies);
    println!(
        "raw Unix-socket ping-pong between two processes: median {:.1} µs (min {:.1}, max {:.1})",
        micros(ping.median),
        micros(ping.min),
        micros(ping.max)
    );
    println!(
        "| method | workload | multiproc | ÷ ping-pong | Python | Python ÷ multiproc |\n\
         |---|---|---:|---:|---:|---:|"
    );
    for method in ["fork", "spawn", "forkserver"] {
        let ctx = Context::new(method)?;
        let pool = ctx.pool().processes(processes).build()?;
        let apply = measure(applies, || {
            pool.apply(identity, 1).expect("apply");
        });
        let started = Instant::now();
        let mapped = pool.map(identity, 0..map_items)?;
        let map = started.elapsed();
        assert_eq!(mapped.len() as u64, map_items);
        let started = Instant::now();
        let count = pool.imap(identity, 0..imap_items).filter(Result::is_ok).count();
        let imap = started.elapsed();
        assert_eq!(count as u64, imap_items);
        drop(pool);

        let py = python(method, processes, applies, map_items, imap_items);
        let rate = |items: u64, d: Duration| items as f64 / d.as_secs_f64();
        let py_apply =
            py.as_ref().map_or("n/a".into(), |p| format!("{:.1} µs", micros(p.apply.median)));
        let py_ratio = |ours: f64, theirs: Option<f64>| {
            theirs.map_or("no python3".into(), |t| format!("{:.1}x", t / ours))
        };
        println!(
            "| {method} | apply round trip (median) | {:.1} µs | {:.2} | {py_apply} | {} |",
            micros(apply.median),
            apply.median.as_secs_f64() / ping.median.as_secs_f64(),
            py_ratio(micros(apply.median), py.as_ref().map(|p| micros(p.apply.median))),
        );
        for (name, items, ours, theirs) in [
            ("map, trivial task", map_items, map, py.as_ref().map(|p| p.map)),
            ("imap, chunksize 1", imap_items, imap, py.as_ref().map(|p| p.imap)),
        ] {
            let theirs_rate = theirs.map(|t| rate(items, t));
            println!(
                "| {method} | {name} | {:.0} items/s | | {} | {} |",
                rate(items, ours),
                theirs_rate.map_or("n/a".into(), |r| format!("{r:.0} items/s")),
                // Throughput: ours ÷ theirs is how many times faster we are.
                theirs_rate
                    .map_or("no python3".into(), |r| format!("{:.1}x", rate(items, ours) / r)),
            );
        }
    }
    Ok(())
}
