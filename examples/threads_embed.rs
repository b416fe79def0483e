//! A multi-threaded program (worker threads allocating and holding locks, as a tokio or rayon
//! runtime does) that starts children through the forkserver while it is busy, and shows that
//! the fork context refuses the same thing with a clear error.
//!
//! `cargo run --release --example threads_embed`

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use multiproc::{Context, ErrorKind, task};

/// Squares a number in a child process.
#[task]
fn square(x: u64) -> u64 {
    x * x
}

fn main() -> Result<(), multiproc::Error> {
    let stop = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Mutex::new(Vec::<String>::new()));
    let workers: Vec<_> = (0..8)
        .map(|i| {
            let (stop, shared) = (Arc::clone(&stop), Arc::clone(&shared));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let mut log = shared.lock().unwrap();
                    log.push(format!("worker {i} was here"));
                    if log.len() > 1000 {
                        log.clear();
                    }
                }
            })
        })
        .collect();

    let forkserver = Context::new("forkserver")?;
    let started = Instant::now();
    let mut total = 0;
    for x in 0..200u64 {
        total += forkserver.process(square, x).start()?.join()?;
    }
    println!(
        "forkserver: 200 children started beside 8 busy threads in {:?}, sum of squares {total}",
        started.elapsed()
    );

    let fork = Context::new("fork")?;
    match fork.process(square, 3).start() {
        Err(err) if err.kind() == ErrorKind::ForkRefused => {
            println!("fork: refused, as it should be: {err}")
        }
        Err(err) => return Err(err),
        Ok(_) => panic!("fork started a child from a multi-threaded process"),
    }

    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.join().expect("worker");
    }
    Ok(())
}
