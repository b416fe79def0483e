//! Per-child setup under the start method being tested: environment, working directory and
//! standard streams set on a `ProcessBuilder` or `PoolBuilder`, applied by the child itself;
//! a panicking child's stderr.

use std::io::{Read, Write};
use std::path::PathBuf;

use libtest_mimic::Failed;
use multiproc::{Context, ErrorKind, Stdio, task};

use crate::Scenario;
use crate::common::{ensure, fd_count, join, warm_up};

pub const SCENARIOS: &[Scenario] = &[
    ("setup_env_and_current_dir_are_the_childs_own", env_and_dir),
    ("setup_stdout_and_stderr_piped_or_to_a_file_and_stdin_piped_or_null", streams),
    ("setup_a_working_directory_that_cannot_be_entered_fails_the_start", bad_dir),
    ("setup_a_pools_workers_write_their_stdout_to_one_pipe", pool_stdout),
    ("setup_a_childs_panic_is_printed_once_without_a_backtrace_unless_asked", panic_printed_once),
];

/// Three variables (as the child sees them) and its working directory.
#[task]
fn environment(names: Vec<String>) -> (Vec<Option<String>>, PathBuf, usize) {
    let values = names.iter().map(|name| std::env::var(name).ok()).collect();
    (values, std::env::current_dir().expect("cwd"), std::env::vars_os().count())
}

fn env_and_dir(ctx: &Context) -> Result<(), Failed> {
    let dir = std::env::temp_dir();
    let names = vec!["MULTIPROC_SETUP_SET".to_owned(), "HOME".into(), "PATH".into()];
    let child = ctx
        .process(environment, names.clone())
        .env("MULTIPROC_SETUP_SET", "yes")
        .env_remove("HOME")
        .current_dir(&dir)
        .start()?;
    let (values, cwd, _) = join(child)??;
    let path = std::env::var("PATH").ok();
    ensure(values == [Some("yes".into()), None, path], || format!("variables {values:?}"))?;
    let expected = dir.canonicalize()?;
    ensure(cwd == expected, || format!("cwd {cwd:?}, expected {expected:?}"))?;
    ensure(std::env::var("MULTIPROC_SETUP_SET").is_err(), || "set in the parent too".into())?;
    // A cleared environment holds only what was set after the clearing.
    let child = ctx.process(environment, names).env_clear().env("MULTIPROC_SETUP_SET", "only");
    let (values, _, count) = join(child.start()?)??;
    ensure(values == [Some("only".into()), None, None] && count == 1, || {
        format!("cleared: {values:?}, {count} variables")
    })
}

/// Writes to stdout and stderr, and returns what its stdin held.
#[task]
fn talk(out: String, err: String) -> String {
    print!("{out}");
    std::io::stdout().flush().expect("flush");
    eprint!("{err}");
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).expect("stdin");
    input
}

fn streams(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds = fd_count();
    {
        let err_file = tempfile_in_target("setup-stderr")?;
        let mut child = ctx
            .process(talk, ("to stdout\n".to_owned(), "to stderr\n".to_owned()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err_file)?)
            .start()?;
        let mut stdin = child.stdin().ok_or("no stdin pipe")?;
        stdin.write_all(b"from the parent")?;
        drop(stdin);
        let mut out = String::new();
        child.stdout().ok_or("no stdout pipe")?.read_to_string(&mut out)?;
        ensure(child.stdout().is_none(), || "the reader was taken twice".into())?;
        let input = join(child)??;
        ensure(out == "to stdout\n", || format!("stdout {out:?}"))?;
        ensure(input == "from the parent", || format!("stdin {input:?}"))?;
        let err = std::fs::read_to_string(&err_file)?;
        ensure(err == "to stderr\n", || format!("stderr file {err:?}"))?;
        std::fs::remove_file(&err_file)?;
        // By default stdin is /dev/null: the child reads nothing at once; null output vanishes.
        let child = ctx
            .process(talk, ("dropped".to_owned(), "dropped".to_owned()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .start()?;
        let input = join(child)??;
        ensure(input.is_empty(), || format!("default stdin gave {input:?}"))?;
    }
    let after = fd_count();
    ensure(after == fds, || format!("fds before {fds}, after {after}"))
}

/// A path under the target directory for a file this test writes.
fn tempfile_in_target(name: &str) -> Result<PathBuf, Failed> {
    let dir = std::env::temp_dir().join(format!("multiproc-suite-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir.join(format!(
        "{name}-{}",
        std::time::SystemTime::now().elapsed().map_or(0, |d| d.as_nanos())
    )))
}

fn bad_dir(ctx: &Context) -> Result<(), Failed> {
    let child =
        ctx.process(environment, vec![]).current_dir("/nonexistent/multiproc-suite").start()?;
    let error = join(child)?.expect_err("started in a directory that does not exist");
    ensure(error.kind() == ErrorKind::StartFailed, || format!("{error:?}"))?;
    ensure(error.to_string().contains("nonexistent"), || format!("{error}"))
}

/// Prints its item on a line of its own.
#[task]
fn print_item(item: u32) {
    println!("item {item}");
}

fn pool_stdout(ctx: &Context) -> Result<(), Failed> {
    let pool = ctx.pool().processes(2).max_tasks_per_child(5).stdout(Stdio::piped()).build()?;
    let mut reader = pool.stdout().ok_or("no stdout pipe")?;
    ensure(pool.stdout().is_none(), || "the reader was taken twice".into())?;
    pool.map(print_item, 0..20)?;
    // The workers, replacements included, hold the pipe's writing ends until the pool ends.
    drop(pool);
    let mut out = String::new();
    reader.read_to_string(&mut out)?;
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort_by_key(|line| line[5..].parse::<u32>().unwrap_or(u32::MAX));
    let expected: Vec<String> = (0..20).map(|i| format!("item {i}")).collect();
    ensure(lines == expected, || format!("the workers printed {out:?}"))
}

/// Panics with a message.
#[task]
fn panic_with(message: String) {
    panic!("{message}")
}

fn panic_printed_once(ctx: &Context) -> Result<(), Failed> {
    for backtrace in [false, true] {
        let builder =
            ctx.process(panic_with, "a distinctive message".to_owned()).stderr(Stdio::piped());
        let builder = if backtrace {
            builder.env("RUST_BACKTRACE", "1")
        } else {
            builder.env_remove("RUST_BACKTRACE")
        };
        let mut child = builder.start()?;
        let mut err = String::new();
        child.stderr().ok_or("no stderr pipe")?.read_to_string(&mut err)?;
        let error = join(child)?.expect_err("it panicked");
        let printed = err.matches("a distinctive message").count();
        ensure(printed == 1, || format!("the message printed {printed} times: {err}"))?;
        let frames = err.contains("stack backtrace");
        ensure(frames == backtrace, || format!("RUST_BACKTRACE set: {backtrace}; stderr: {err}"))?;
        let carried = error.panic().is_some_and(|p| !p.backtrace.is_empty());
        ensure(carried, || format!("no backtrace in the error: {error:?}"))?;
    }
    Ok(())
}
