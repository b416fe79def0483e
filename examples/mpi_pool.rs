//! The same Pool code on the nodes of an MPI job: a 10-million-element vector as every
//! worker's state (built once per worker from arguments sent once), `imap` over items, and a
//! worker that crashes mid-task failing only its item.
//!
//! ```text
//! cargo build --release -p multiproc-examples --features mpi --example mpi_pool
//! mpirun -n 3 target/release/examples/mpi_pool        # rank 0 and two node agents
//! ```
//!
//! Rank 0 runs `main`; ranks 1 and 2 become node agents before `main` and run the workers.
//! Change `"mpi"` to `"forkserver"` and the program runs on this machine alone, unchanged.

use multiproc::{Context, ErrorKind, task};

/// Elements of the workers' vector.
const LEN: u64 = 10_000_000;

/// The initializer: the worker's state is the vector itself.
#[task]
fn keep(data: Vec<u64>) -> Vec<u64> {
    data
}

/// The sum of the 1,000 elements from `start`, with the node it ran on.
#[task]
fn window(data: &Vec<u64>, start: u64) -> (u64, String) {
    let start = (start % (LEN - 1000)) as usize;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    (data[start..start + 1000].iter().sum(), host.trim().to_owned())
}

/// Crashes its worker (as a segfaulting C library would) on item 13.
#[task]
fn fragile(_data: &Vec<u64>, item: u64) -> u64 {
    if item == 13 {
        std::process::abort();
    }
    item
}

fn main() -> Result<(), multiproc::Error> {
    let ctx = match Context::new("mpi") {
        Ok(ctx) => ctx,
        Err(e) if e.kind() == ErrorKind::StartFailed => {
            eprintln!("{e}");
            std::process::exit(2);
        }
        Err(e) => return Err(e),
    };
    let data: Vec<u64> = (0..LEN).collect();
    let pool = ctx.pool().processes(2).initializer(keep, data).build()?;

    let mut hosts = std::collections::BTreeSet::new();
    let mut total = 0u64;
    for result in pool.imap(window, 0..2_000u64) {
        let (sum, host) = result?;
        total = total.wrapping_add(sum);
        hosts.insert(host);
    }
    let expected: u64 = (0..2_000u64)
        .map(|s| {
            let s = s % (LEN - 1000);
            (s..s + 1000).sum::<u64>()
        })
        .fold(0, u64::wrapping_add);
    assert_eq!(total, expected);
    println!("imap over 2000 windows of the workers' vector: sum {total}, on {hosts:?}");

    let results: Vec<_> = pool.imap(fragile, 0..20u64).collect();
    let failed: Vec<usize> =
        (0..).zip(&results).filter(|(_, r)| r.is_err()).map(|(i, _)| i).collect();
    assert_eq!(failed, [13], "only the crashed item fails");
    println!("a worker crashed on item 13: {}", results[13].as_ref().unwrap_err());
    println!("the other 19 items returned, and the pool goes on: {}", pool.apply(fragile, 7)?);
    Ok(())
}
