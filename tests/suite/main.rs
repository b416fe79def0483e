//! The integration suite: every scenario runs under the start method named by
//! `MULTIPROC_START_METHOD` (`cargo xtask test-all-methods` runs it once per method), and asserts
//! that this is the method that ran.
//!
//! The harness is libtest-mimic rather than libtest so that every test runs on the main thread,
//! one at a time: the fork start method refuses multi-threaded callers, and the fd and zombie
//! accounting around process-heavy tests must not count another test's children.

mod asyncio;
mod bytes;
mod common;
mod failures;
mod forkserver;
mod hardening;
mod introspect;
mod ipc;
mod lifecycle;
#[cfg(feature = "mpi")]
mod mpi;
mod pool;
mod protocol;
mod queue;
mod setup;
mod sync;

use libtest_mimic::{Arguments, Failed, Trial};
use multiproc::Context;

/// One scenario: a name and a body run against the context under test.
pub type Scenario = (&'static str, fn(&Context) -> Result<(), Failed>);

fn main() -> std::process::ExitCode {
    let ctx = Context::from_env().unwrap_or_else(|e| panic!("{e}"));
    if let Ok(role) = std::env::var(hardening::HELPER_ENV) {
        return hardening::helper_main(&role, &ctx);
    }
    let mut args = Arguments::from_args();
    let method = ctx.start_method();
    // One test at a time, on the main thread: the fork start method refuses to fork a
    // multi-threaded process, and the fd and zombie accounting of one test must not see the
    // children of another.
    args.test_threads = Some(1);
    let mut scenarios = [
        lifecycle::SCENARIOS,
        failures::SCENARIOS,
        hardening::SCENARIOS,
        protocol::SCENARIOS,
        pool::SCENARIOS,
        ipc::SCENARIOS,
        queue::SCENARIOS,
        bytes::SCENARIOS,
        asyncio::SCENARIOS,
        sync::SCENARIOS,
        setup::SCENARIOS,
        introspect::SCENARIOS,
    ]
    .concat();
    if method == "forkserver" {
        scenarios.extend_from_slice(forkserver::SCENARIOS);
    }
    // (Without the feature, `Context::from_env` above refuses "mpi".)
    #[cfg(feature = "mpi")]
    if method == "mpi" {
        // Under mpirun: the pool scenarios, but those whose values hold descriptors (which
        // the mpi context refuses, as its own scenarios check), and the mpi context's own.
        scenarios = pool::SCENARIOS
            .iter()
            .filter(|(name, _)| !pool::NEEDS_DESCRIPTORS.contains(name))
            .chain(
                asyncio::SCENARIOS
                    .iter()
                    .filter(|(name, _)| asyncio::POOL_AND_PROCESS.contains(name)),
            )
            .chain(mpi::SCENARIOS)
            .copied()
            .collect();
    }
    let trials = scenarios
        .into_iter()
        .map(|(name, body)| {
            let ctx = ctx.clone();
            Trial::test(format!("{method}::{name}"), move || {
                assert_eq!(ctx.start_method(), method);
                body(&ctx)
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}
