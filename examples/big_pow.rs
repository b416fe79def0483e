//! A method mapped over a pool that lives in `self` (Python's `self.pool.map(self.pow, xs)`,
//! which cannot pickle the pool): the object the method needs is the workers' state, built
//! once per worker by the initializer, and the pool is a field of the struct.
//!
//! `cargo run --release --example big_pow`

use multiproc::{Context, Pool, task};
use serde::{Deserialize, Serialize};

/// What the method needs: here, an exponent.
#[derive(Serialize, Deserialize)]
struct BigPow {
    exponent: u32,
}

/// The initializer: each worker's `BigPow`.
#[task]
fn make(exponent: u32) -> BigPow {
    BigPow { exponent }
}

/// The method, as a task on the worker's state.
#[task]
fn pow(big: &BigPow, x: u64) -> u64 {
    x.wrapping_pow(big.exponent)
}

/// The object the program uses, with its pool inside.
struct Powers {
    pool: Pool<BigPow>,
}

impl Powers {
    fn new(ctx: &Context, exponent: u32) -> multiproc::Result<Powers> {
        Ok(Powers { pool: ctx.pool().processes(2).initializer(make, exponent).build()? })
    }

    fn all(&self, xs: Vec<u64>) -> multiproc::Result<Vec<u64>> {
        self.pool.map(pow, xs)
    }
}

fn main() -> multiproc::Result<()> {
    for &method in multiproc::all_start_methods() {
        let powers = Powers::new(&Context::new(method)?, 3)?;
        let cubes = powers.all((1..=10).collect())?;
        assert_eq!(cubes, (1..=10u64).map(|x| x.pow(3)).collect::<Vec<_>>());
        println!("[{method:>10}] cubes of 1..=10: {cubes:?}");
    }
    Ok(())
}
