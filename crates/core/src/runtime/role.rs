//! Roles: how a re-executed binary learns, before `main`, that it is a spawned child or a
//! forkserver rather than the user's program.
//!
//! The parent sets `MULTIPROC_ROLE=<role>:<fd>` in the new process's environment, where `<fd>`
//! is the inherited bootstrap socket. [`take_role`] runs from an `.init_array` constructor (or
//! from `multiproc::init()` where the constructor is turned off), removes the variable so that
//! the child's own children do not see it, and hands the socket to the role's entry point,
//! which never returns: the user's `main` never runs in a child. Roles register themselves in a
//! link-time table, so the forkserver crate can add its role without core depending on it.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::sys;

/// The environment variable that carries a re-executed process's role.
pub const ROLE_ENV: &str = "MULTIPROC_ROLE";

/// Exit code of a re-executed process that could not take its role (a malformed variable, a
/// missing socket, an unknown role).
pub const EXIT_BOOTSTRAP_FAILED: i32 = 120;

/// One role a re-executed binary can take.
#[derive(Debug)]
pub struct Role {
    /// The name in `MULTIPROC_ROLE`.
    pub name: &'static str,
    /// The entry point, given the inherited socket; it ends the process.
    pub main: fn(OwnedFd) -> !,
}

/// Every role linked into this executable.
// linkme places the table with `#[link_section]`, which the unsafe_code lint flags; no unsafe
// operation is involved.
#[allow(unsafe_code)]
#[linkme::distributed_slice]
pub static ROLES: [Role];

// The `.init_array` constructor (feature `ctor`) runs this before `main`.
#[allow(unsafe_code)]
#[linkme::distributed_slice(sys::BEFORE_MAIN)]
static TAKE_ROLE_BEFORE_MAIN: fn() = take_role;

/// The value of [`ROLE_ENV`] for `role` with its socket at `fd`.
pub fn role_env_value(role: &str, fd: i32) -> String {
    format!("{role}:{fd}")
}

/// Ends this process if it was started as a multiproc child but never took its role, before
/// it can start children of its own.
///
/// That happens only when the `ctor` feature is off and `main` forgot to call
/// `multiproc::init()`: the child then runs the parent's `main`, which starts another child,
/// which runs `main` again: a fork bomb. Every start calls this first, so the first such child
/// stops at its first start, with the reason on stderr (and its parent sees a child that died
/// before its handshake).
pub fn refuse_untaken_role() {
    if let Some(value) = std::env::var_os(ROLE_ENV) {
        eprintln!(
            "multiproc: this process was started as a multiproc child ({ROLE_ENV}={value:?}) \
             but never took its role, so it ran the program's main and tried to start a child \
             of its own: call multiproc::init() first thing in main (the `ctor` feature, which \
             does it before main, is off)"
        );
        sys::exit_immediately(EXIT_BOOTSTRAP_FAILED)
    }
}

/// Takes the role named in the environment, if any; returns only in the user's program.
///
/// Idempotent: the constructor and an explicit `multiproc::init()` may both call it.
pub fn take_role() {
    static TAKEN: AtomicBool = AtomicBool::new(false);
    if TAKEN.swap(true, Ordering::SeqCst) {
        return;
    }
    let Some(value) = sys::take_env(ROLE_ENV) else {
        return;
    };
    let value = value.to_string_lossy().into_owned();
    let fail = |why: String| -> ! {
        eprintln!("multiproc: cannot take role from {ROLE_ENV}={value:?}: {why}");
        sys::exit_immediately(EXIT_BOOTSTRAP_FAILED)
    };
    let Some((name, fd)) = value.split_once(':') else { fail("expected <role>:<fd>".into()) };
    let Ok(fd) = fd.parse::<i32>() else { fail(format!("`{fd}` is not an fd number")) };
    let Some(role) = ROLES.iter().find(|role| role.name == name) else {
        fail(format!("no role `{name}` is linked into this executable"))
    };
    match sys::adopt_inherited_socket(fd) {
        Ok(socket) => (role.main)(socket),
        Err(e) => fail(e.to_string()),
    }
}
