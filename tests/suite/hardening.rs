//! What hostile bytes and values at the edge of the kernel's limits do, under the start method
//! being tested: each is an error on the call that met it, never an abort or a silent exit.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use libtest_mimic::Failed;
use multiproc::{Connection, Context, ErrorKind, Fd, RecvTimeoutError, task};
use serde::de::Deserializer;
use serde::ser::{SerializeTuple, Serializer};
use serde::{Deserialize, Serialize};

use crate::Scenario;
use crate::common::{
    DEADLINE, Gate, check_in, ensure, fd_count, join, living_children, read_pid, wait_gone, warm_up,
};
use multiproc_core::sys;

pub const SCENARIOS: &[Scenario] = &[
    ("a_deeply_nested_message_is_a_decode_error_not_an_abort", deep_message),
    ("a_deeply_nested_result_is_a_decode_error_not_an_abort", deep_result),
    ("deeply_nested_arguments_fail_the_child_not_crash_it", deep_arguments),
    ("a_result_with_more_descriptors_than_a_message_carries_is_an_encode_error", many_fds_result),
    ("arguments_with_too_many_descriptors_fail_before_any_child_starts", many_fds_arguments),
    ("a_child_starts_in_the_parents_directory_and_environment_as_of_start", cwd_and_env),
    ("a_childs_stdin_is_dev_null", stdin_is_dev_null),
    ("a_child_runs_its_task_when_its_parent_exits_right_after_start", parent_exits_at_once),
    ("a_child_that_never_took_its_role_stops_at_its_first_start", forgot_init),
];

/// The environment variable that makes the suite's binary a helper process instead of the
/// test runner (see [`helper_main`]).
pub const HELPER_ENV: &str = "MULTIPROC_SUITE_HELPER";

/// How deep [`Deep`] nests: far past the codec's bound, far past any stack.
const LEVELS: usize = 1_000_000;

/// A recursive value, as a receiver decodes it.
#[derive(Deserialize)]
#[allow(dead_code)]
enum Tree {
    Leaf,
    Node(Box<Tree>),
}

/// Bytes that decode as a [`Tree`] a million levels deep. Its sender writes them flat (a tuple
/// of bytes, one level), so that only the receiver meets the depth: what a hostile or broken
/// peer would send.
#[derive(Debug)]
pub struct Deep;

impl Serialize for Deep {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // `Node` is variant 1, `Leaf` variant 0, each one byte.
        let mut tuple = serializer.serialize_tuple(LEVELS + 1)?;
        for _ in 0..LEVELS {
            tuple.serialize_element(&1u8)?;
        }
        tuple.serialize_element(&0u8)?;
        tuple.end()
    }
}

impl<'de> Deserialize<'de> for Deep {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Tree::deserialize(deserializer).map(|_| Deep)
    }
}

/// Sends one [`Deep`] on `conn`.
#[task]
fn send_deep(conn: Connection<Deep>) {
    conn.send(&Deep).expect("send");
}

fn deep_message(ctx: &Context) -> Result<(), Failed> {
    let (mut ours, theirs) = ctx.pipe::<Deep>()?;
    let p = ctx.process(send_deep, theirs).start()?;
    match ours.recv_timeout(DEADLINE) {
        Err(RecvTimeoutError::Failed(e)) => {
            ensure(e.kind() == ErrorKind::Decode, || format!("kind {:?}: {e}", e.kind()))?;
            ensure(e.to_string().contains("nests deeper"), || format!("{e}"))?;
        }
        Ok(_) => return Err("a million levels decoded".into()),
        Err(e) => return Err(format!("expected a decode error, got {e:?}").into()),
    }
    join(p)??;
    Ok(())
}

/// Returns a [`Deep`].
#[task]
fn make_deep() -> Deep {
    Deep
}

fn deep_result(ctx: &Context) -> Result<(), Failed> {
    match join(ctx.process(make_deep, ()).start()?)? {
        Err(e) => ensure(e.kind() == ErrorKind::Decode, || format!("kind {:?}: {e}", e.kind())),
        Ok(_) => Err("a million levels decoded".into()),
    }
}

/// Takes a [`Deep`]: under spawn and forkserver the child decodes it.
#[task]
fn take_deep(_deep: Deep) -> u32 {
    7
}

fn deep_arguments(ctx: &Context) -> Result<(), Failed> {
    let outcome = join(ctx.process(take_deep, Deep).start()?)?;
    if ctx.method().moves_arguments() {
        // fork moves the value into the child: nothing is decoded.
        ensure(matches!(outcome, Ok(7)), || format!("under fork: {outcome:?}"))
    } else {
        let e = outcome.err().ok_or("a million levels decoded")?;
        ensure(e.kind() == ErrorKind::Decode, || format!("kind {:?}: {e}", e.kind()))
    }
}

/// How many descriptors [`open_many`] returns: more than one `sendmsg` carries (253).
const TOO_MANY: usize = 300;

/// Opens `/dev/null` `n` times.
#[task]
fn open_many(n: usize) -> Vec<Fd<File>> {
    (0..n).map(|_| Fd::new(File::open("/dev/null").expect("open /dev/null"))).collect()
}

fn many_fds_result(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let before = fd_count();
    match join(ctx.process(open_many, TOO_MANY).start()?)? {
        Err(e) => {
            ensure(e.kind() == ErrorKind::Encode, || format!("kind {:?}: {e}", e.kind()))?;
            ensure(e.to_string().contains("300 descriptors"), || format!("{e}"))?;
        }
        Ok(fds) => return Err(format!("{} descriptors arrived", fds.len()).into()),
    }
    // Up to the limit they travel.
    let fds = join(ctx.process(open_many, 253).start()?)??;
    ensure(fds.len() == 253, || format!("{} arrived", fds.len()))?;
    drop(fds);
    let after = fd_count();
    ensure(after == before, || format!("fds before {before}, after {after}"))
}

/// Counts the descriptors it was given.
#[task]
fn count_fds(fds: Vec<Fd<File>>) -> usize {
    fds.len()
}

fn many_fds_arguments(ctx: &Context) -> Result<(), Failed> {
    warm_up(ctx)?;
    let fds: Vec<_> =
        (0..TOO_MANY).map(|_| File::open("/dev/null").map(Fd::new)).collect::<Result<_, _>>()?;
    let children = living_children().len();
    let started = ctx.process(count_fds, fds).start();
    if ctx.method().moves_arguments() {
        // fork moves the descriptors into the child's copy of the table: no message carries
        // them, so there is no limit to meet.
        let count = join(started?)??;
        return ensure(count == TOO_MANY, || format!("{count} arrived"));
    }
    match started {
        Err(e) => {
            ensure(e.kind() == ErrorKind::Encode, || format!("kind {:?}: {e}", e.kind()))?;
            ensure(e.to_string().contains("300 descriptors"), || format!("{e}"))?;
        }
        Ok(p) => return Err(format!("started {} with 300 descriptors", p.pid()).into()),
    }
    let now = living_children().len();
    ensure(now == children, || format!("{children} children before, {now} after"))
}

/// Where the child is and what it sees of `var`.
#[task]
fn where_and_what(var: String) -> (PathBuf, Option<String>, Option<String>) {
    let cwd = std::env::current_dir().expect("current_dir");
    (cwd, std::env::var(&var).ok(), std::env::var("MULTIPROC_SUITE_REMOVED").ok())
}

/// Sets this (single-threaded: the suite runs on the main thread) process's environment.
fn set_environment(change: impl FnOnce(&mut Vec<(OsString, OsString)>)) -> Result<(), Failed> {
    let mut vars: Vec<_> = std::env::vars_os().collect();
    change(&mut vars);
    Ok(sys::replace_environment(&vars)?)
}

fn cwd_and_env(ctx: &Context) -> Result<(), Failed> {
    // The forkserver (if that is the method) exists before the changes below.
    set_environment(|vars| vars.push(("MULTIPROC_SUITE_REMOVED".into(), "old".into())))?;
    warm_up(ctx)?;
    let home = std::env::current_dir()?;
    let dir = std::env::temp_dir().join(format!("multiproc-cwd-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    std::env::set_current_dir(&dir)?;
    let mark = format!("mark-{}", std::process::id());
    let changed = set_environment(|vars| {
        vars.retain(|(key, _)| key != "MULTIPROC_SUITE_REMOVED");
        vars.push(("MULTIPROC_SUITE_MARK".into(), mark.clone().into()));
    });
    let seen = changed.and_then(|()| {
        let p = ctx.process(where_and_what, "MULTIPROC_SUITE_MARK".to_owned()).start()?;
        join(p)?.map_err(Failed::from)
    });
    std::env::set_current_dir(&home)?;
    set_environment(|vars| vars.retain(|(key, _)| key != "MULTIPROC_SUITE_MARK"))?;
    let _ = std::fs::remove_dir(&dir);
    let (cwd, value, removed) = seen?;
    ensure(cwd == dir, || format!("child ran in {}, parent in {}", cwd.display(), dir.display()))?;
    ensure(value.as_deref() == Some(mark.as_str()), || format!("child saw {value:?}"))?;
    ensure(removed.is_none(), || format!("a variable the parent removed is {removed:?}"))?;
    // And back: the next child sees the restored state.
    let (cwd, value, _) =
        join(ctx.process(where_and_what, "MULTIPROC_SUITE_MARK".into()).start()?)??;
    ensure(cwd == home && value.is_none(), || format!("then {}, {value:?}", cwd.display()))
}

/// The device and inode of the child's fd 0.
#[task]
fn stdin_identity() -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata("/proc/self/fd/0").expect("fd 0 is open");
    (meta.dev(), meta.ino())
}

fn stdin_is_dev_null(ctx: &Context) -> Result<(), Failed> {
    use std::os::unix::fs::MetadataExt;
    // Make the parent's stdin something else than /dev/null: a socket.
    let saved = std::io::stdin().as_fd().try_clone_to_owned()?;
    let (reader, _writer) = std::os::unix::net::UnixStream::pair()?;
    sys::set_stdin(reader.as_fd())?;
    let seen = ctx.process(stdin_identity, ()).start().map_err(Failed::from).and_then(join);
    sys::set_stdin(saved.as_fd())?;
    let null = std::fs::metadata("/dev/null")?;
    let seen = seen??;
    ensure(seen == (null.dev(), null.ino()), || format!("child's fd 0 is {seen:?}, not /dev/null"))
}

/// Waits until process `parent` has ended, then checks in at the gate.
#[task]
fn outlive(parent: u32, gate: PathBuf) -> u64 {
    let _ = wait_gone(parent, DEADLINE);
    check_in(&gate, 0)
}

/// Runs the suite's binary as a helper process (see [`helper_main`]) and waits for it, with the
/// suite's deadline; returns its exit code and stderr.
fn run_helper(ctx: &Context, role: &str) -> Result<(Option<i32>, String), Failed> {
    // stderr goes to a file, not a pipe: a child that outlives the helper inherits it, and a
    // pipe would not reach its end until that child did.
    let path = std::env::temp_dir().join(format!("multiproc-helper-{}.err", std::process::id()));
    let stderr = File::create(&path)?;
    let mut helper = Command::new(std::env::current_exe()?)
        .env(HELPER_ENV, role)
        .env(multiproc::START_METHOD_ENV, ctx.start_method())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()?;
    let gone = wait_gone(helper.id(), DEADLINE);
    if gone.is_none() {
        let _ = helper.kill();
    }
    let status = helper.wait()?;
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    ensure(gone.is_some(), || format!("helper {role} still ran after {DEADLINE:?}"))?;
    Ok((status.code(), text))
}

fn parent_exits_at_once(ctx: &Context) -> Result<(), Failed> {
    let gate = Gate::new("orphan")?;
    let (code, stderr) = run_helper(ctx, &format!("orphan:{}", gate.path().display()))?;
    ensure(code == Some(0), || format!("helper exited {code:?}: {stderr}"))?;
    // The helper is gone; its child ran its task anyway and reached the gate.
    let mut stream = gate.accept()?;
    let pid = read_pid(&mut stream)?;
    drop(stream);
    ensure(wait_gone(pid, DEADLINE).is_some(), || format!("child {pid} did not end"))
}

fn forgot_init(ctx: &Context) -> Result<(), Failed> {
    let (code, stderr) = run_helper(ctx, "forgot-init")?;
    ensure(code == Some(multiproc_core::runtime::role::EXIT_BOOTSTRAP_FAILED), || {
        format!("helper exited {code:?}: {stderr}")
    })?;
    ensure(stderr.contains("multiproc::init()"), || format!("stderr: {stderr}"))
}

/// The suite binary's helper roles, run instead of the tests when [`HELPER_ENV`] is set:
///
/// - `orphan:<gate>`: starts a child that outlives this process, then returns at once;
/// - `forgot-init`: looks like a multiproc child that never took its role (what a build
///   without the `ctor` feature that forgot `multiproc::init()` is), then tries to start one.
pub fn helper_main(role: &str, ctx: &Context) -> std::process::ExitCode {
    if let Some(gate) = role.strip_prefix("orphan:") {
        let started = ctx.process(outlive, (std::process::id(), PathBuf::from(gate))).start();
        return match started {
            Ok(_child) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if role == "forgot-init" {
        let role_env = multiproc_core::runtime::role::ROLE_ENV;
        let mut vars: Vec<_> = std::env::vars_os().collect();
        vars.push((role_env.into(), "child:3".into()));
        sys::replace_environment(&vars).expect("single-threaded");
        // Must not come back: the process ends inside `start`.
        let started = ctx.process(crate::common::add, (1, 2)).start();
        eprintln!("start returned {:?}", started.map(|p| p.pid()));
        return std::process::ExitCode::from(3);
    }
    eprintln!("unknown helper role {role}");
    std::process::ExitCode::from(2)
}
