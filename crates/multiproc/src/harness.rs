//! `test_main!`: a test harness for the fork start method in a crate's own tests (the
//! `test-main` feature).
//!
//! libtest runs each `#[test]` on a thread of its own, and nextest's process per test still
//! has two threads, so the fork start method refuses them all (it never forks a
//! multi-threaded process). A test target with `harness = false` whose `main` is
//! [`test_main!`](crate::test_main) runs each test on the main thread, one at a time, with
//! libtest's command line (`--list --format terse`, `--exact`, filters, `--ignored`), so that
//! it runs under `cargo test` and under `cargo nextest run`, which starts it once per test.

use std::process::ExitCode;

/// What a test function returns: nothing, or a `Result` whose error fails the test.
pub trait TestOutcome {
    /// `Err` with the failure's text if the test failed.
    fn into_outcome(self) -> Result<(), String>;
}

impl TestOutcome for () {
    fn into_outcome(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E: std::fmt::Debug> TestOutcome for Result<(), E> {
    fn into_outcome(self) -> Result<(), String> {
        self.map_err(|e| format!("{e:?}"))
    }
}

/// A test as the harness runs it: its outcome, with the failure's text.
#[doc(hidden)]
pub type TestFn = fn() -> Result<(), String>;

/// Runs `tests` as [`test_main!`](crate::test_main) describes; used by the macro.
#[doc(hidden)]
pub fn run(tests: &[(&'static str, TestFn)]) -> ExitCode {
    let mut args = libtest_mimic::Arguments::from_args();
    // One at a time on the main thread: a fork needs a single-threaded process.
    args.test_threads = Some(1);
    let trials = tests
        .iter()
        .map(|&(name, test)| libtest_mimic::Trial::test(name, move || test().map_err(Into::into)))
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}

/// The `main` of a `harness = false` test target: runs the named test functions (each `fn()`
/// or `fn() -> Result<(), E>`) on the main thread, one at a time, so that they may use the
/// fork start method, under `cargo test` and `cargo nextest run` alike (the `test-main`
/// feature).
///
/// In `Cargo.toml`:
///
/// ```toml
/// [dev-dependencies]
/// multiproc = { version = "0.1", features = ["test-main"] }
///
/// [[test]]
/// name = "fork_tests"
/// harness = false
/// ```
///
/// and in `tests/fork_tests.rs`:
///
/// ```no_run
/// use multiproc::{Context, task};
///
/// #[task]
/// fn add(a: u64, b: u64) -> u64 { a + b }
///
/// fn adds_in_a_forked_child() -> multiproc::Result<()> {
///     let sum = Context::new("fork")?.process(add, (2, 3)).start()?.join()?;
///     assert_eq!(sum, 5);
///     Ok(())
/// }
///
/// multiproc::test_main!(adds_in_a_forked_child);
/// ```
#[macro_export]
macro_rules! test_main {
    ($($test:ident),* $(,)?) => {
        fn main() -> ::std::process::ExitCode {
            $crate::harness::run(&[$(
                (
                    ::core::stringify!($test),
                    (|| $crate::harness::TestOutcome::into_outcome($test()))
                        as $crate::harness::TestFn,
                ),
            )*])
        }
    };
}
