//! Forkserver preload benchmark: a large table built once in the server and shared
//! copy-on-write by 8 children, each of which reads all of it. Prints the time to build it, the
//! time to start and join each child, and the private memory (`Private_Dirty` from
//! `/proc/<pid>/smaps_rollup`) of the server and of every child.
//!
//! `cargo bench -p multiproc-tests --bench preload` (500 MB), `-- --quick` (50 MB).

mod common;

use std::time::Instant;

use common::{Table, Target, Value};

use multiproc::{Context, task};

/// The preload: `bytes` of `u64`s, every page written, so that it is all dirty in the server.
#[task]
fn build_table(bytes: u64) -> Vec<u64> {
    (0..bytes / 8).collect()
}

/// Reads the whole table, then reports its sum, this process's `Private_Dirty` and `Rss` in KiB.
#[task]
fn read_table() -> (u64, u64, u64) {
    let table = multiproc::preloaded::<Vec<u64>>().expect("the preload is set");
    let sum = table.iter().fold(0u64, |acc, x| acc.wrapping_add(*x));
    let (dirty, rss) = memory_kib(std::process::id());
    (sum, dirty, rss)
}

/// `Private_Dirty` and `Rss` of process `pid`, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        rollup
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("Private_Dirty:"), field("Rss:"))
}

fn main() -> Result<(), multiproc::Error> {
    let quick = common::quick();
    let bytes: u64 = if quick { 50 << 20 } else { 500 << 20 };
    let children = 8;
    multiproc::set_forkserver_preload(build_table, bytes)?;
    let ctx = Context::new("forkserver")?;

    let started = Instant::now();
    ctx.process(read_table, ()).start()?.join()?;
    let cold = started.elapsed();
    let server = multiproc::forkserver_pid().expect("the server runs");

    let started = Instant::now();
    let running: Vec<_> =
        (0..children).map(|_| ctx.process(read_table, ()).start()).collect::<Result<_, _>>()?;
    let reports: Vec<(u64, u64, u64)> =
        running.into_iter().map(|p| p.join()).collect::<Result<_, _>>()?;
    let together = started.elapsed();

    let words = bytes / 8;
    let expected = words * (words - 1) / 2;
    assert!(reports.iter().all(|(sum, _, _)| *sum == expected), "a child saw another table");
    let (server_dirty, _) = memory_kib(server);
    let mb = |kib: u64| Value::Text(format!("{:.1} MB", kib as f64 / 1024.0));
    let total: u64 = reports.iter().map(|(_, dirty, _)| dirty).sum();
    let worst = reports.iter().map(|(_, dirty, _)| *dirty).max().unwrap_or(0);
    let mut table = Table::new(format!(
        "Forkserver preload of a {} MB table shared by {children} children",
        bytes >> 20
    ));
    table.row(
        "first start: server launch, building the table, one child",
        "forkserver",
        Value::Time(cold),
        Value::Missing("–"),
        Value::Missing("–"),
        Target::None,
    );
    table.row(
        &format!("{children} children that each read the whole table, started and joined"),
        "forkserver",
        Value::Time(together),
        Value::Missing("–"),
        Value::Missing("–"),
        Target::None,
    );
    table.row(
        "Private_Dirty of the child with the most, vs the server's (one copy)",
        "forkserver",
        mb(worst),
        mb(server_dirty),
        Value::Missing("–"),
        Target::Words("children share the table: their private memory stays near zero".into()),
    );
    table.note(format!(
        "All {children} children together: Private_Dirty {:.1} MB, {:.2}% of one copy each \
         (Rss of each child includes the whole shared table).",
        total as f64 / 1024.0,
        100.0 * (total as f64 / children as f64) / (bytes as f64 / 1024.0)
    ));
    table.note(
        "Python's forkserver preloads modules, not values; there is no like-for-like Python row.",
    );
    table.finish();
    Ok(())
}
