//! Synchronization between processes, under every start method: 8 processes add to one
//! shared `Value` under its lock; a process SIGKILLed while it holds a `Lock` does not leave
//! it locked (the next `lock()` says the owner died); a `Barrier` whose party is killed breaks
//! for the others instead of hanging.
//!
//! `cargo run --release --example shared_counter`

use std::time::{Duration, Instant};

use multiproc::{Barrier, Context, ErrorKind, Event, Lock, LockError, Value, task};

/// Adds one to `total` `times` times, each under its lock.
#[task]
fn add(total: Value<u64>, times: u32) {
    for _ in 0..times {
        *total.get_lock().expect("the lock") += 1;
    }
}

/// Takes `lock`, says so, and holds it until it is killed.
#[task]
fn hold(lock: Lock, held: Event) {
    let _guard = lock.lock().expect("the lock");
    held.set();
    std::thread::sleep(Duration::from_secs(600));
}

/// Waits at `barrier`; what happened.
#[task]
fn meet(barrier: Barrier) -> String {
    match barrier.wait_timeout(Duration::from_secs(60)) {
        Ok(Some(result)) => format!("through (leader: {})", result.is_leader()),
        Ok(None) => "timed out".into(),
        Err(e) => format!("{:?}", e.kind()),
    }
}

fn main() -> Result<(), multiproc::Error> {
    for &method in multiproc::all_start_methods() {
        let ctx = Context::new(method)?;

        let total = ctx.value(0u64)?;
        let started = Instant::now();
        let adders = (0..8)
            .map(|_| ctx.process(add, (total.try_clone()?, 10_000)).start())
            .collect::<multiproc::Result<Vec<_>>>()?;
        for adder in adders {
            adder.join()?;
        }
        let sum = total.get()?;
        assert_eq!(sum, 80_000);
        println!(
            "[{method:>10}] 8 processes x 10,000 increments = {sum} ({:?})",
            started.elapsed()
        );

        let (lock, held) = (ctx.lock()?, ctx.event()?);
        let mut holder = ctx.process(hold, (lock.try_clone()?, held.try_clone()?)).start()?;
        assert!(held.wait_timeout(Duration::from_secs(60))?, "the holder took the lock");
        holder.kill()?;
        let _ = holder.join();
        match lock.lock_timeout(Duration::from_secs(60)) {
            Err(LockError::OwnerDied(_guard)) => {
                println!("[{method:>10}] the lock's holder was killed: the next lock() says so")
            }
            other => panic!("expected OwnerDied, got {other:?}"),
        }

        let barrier = ctx.barrier(3)?;
        let party = ctx.process(meet, barrier.try_clone()?).start()?;
        let mut victim = ctx.process(meet, barrier.try_clone()?).start()?;
        let waiting_since = Instant::now();
        while barrier.n_waiting() < 2 {
            assert!(waiting_since.elapsed() < Duration::from_secs(60), "both arrive");
            std::thread::yield_now();
        }
        victim.kill()?;
        let _ = victim.join();
        let theirs = party.join()?;
        let ours = barrier.wait().map(|_| ()).map_err(|e| e.kind());
        assert_eq!(theirs, format!("{:?}", ErrorKind::BrokenBarrier));
        assert_eq!(ours, Err(ErrorKind::BrokenBarrier));
        println!("[{method:>10}] a barrier party was killed: the others got {theirs}");
    }
    Ok(())
}
