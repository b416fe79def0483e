//! multiproc-spawn: the `spawn` start method—exec a fresh copy of the current binary.
//!
//! The child is `/proc/self/exe` run with the parent's argv and environment plus
//! `MULTIPROC_ROLE=child:3`. It inherits only its bootstrap socket (at fd 3) and the standard
//! output and error; stdin is `/dev/null`, every other descriptor is closed, signal dispositions
//! are default. The role is taken before `main` (see `multiproc_core::runtime::role`), so the parent's
//! `main` never runs in the child. Safe from any thread: nothing is forked but the exec itself
//! (posix_spawn, a vfork-style clone).

use std::ffi::CString;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;

use multiproc_core::runtime::role::{self, ROLE_ENV};
use multiproc_core::sys::{self, SPAWN_CHANNEL_FD};
use multiproc_core::{
    ChildHandle, DirectChild, Error, ErrorKind, Result, StartMethod, StartRequest,
};

/// The spawn start method.
#[derive(Debug, Default, Clone, Copy)]
pub struct Spawn;

impl StartMethod for Spawn {
    fn name(&self) -> &'static str {
        "spawn"
    }

    fn start(&self, request: StartRequest<'_>) -> Result<Box<dyn ChildHandle>> {
        let argv = own_argv().map_err(|e| Error::io("reading /proc/self/cmdline", e))?;
        let envp = child_environment(&role::role_env_value("child", SPAWN_CHANNEL_FD))
            .map_err(|e| Error::io("building the child environment", e))?;
        let pid = sys::spawn_self(&argv, &envp, request.channel.as_fd()).map_err(|e| {
            Error::new(ErrorKind::StartFailed, format!("spawn failed: exec /proc/self/exe: {e}"))
                .with_source(e)
        })?;
        drop(request.channel);
        let child = DirectChild::new(pid)
            .map_err(|e| Error::io(format!("pidfd_open for spawned child {pid}"), e))?;
        Ok(Box::new(child))
    }
}

/// This process's argv, as the kernel recorded it (works before `main` and whatever the
/// program did to `std::env::args`).
pub fn own_argv() -> std::io::Result<Vec<CString>> {
    let cmdline = std::fs::read("/proc/self/cmdline")?;
    cmdline.split(|&b| b == 0).filter(|arg| !arg.is_empty()).map(sys::cstring).collect()
}

/// The current environment with `MULTIPROC_ROLE` set to `role` (replacing any inherited one).
pub fn child_environment(role: &str) -> std::io::Result<Vec<CString>> {
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(key, _)| key != ROLE_ENV)
        .map(|(key, value)| {
            let mut entry = key.as_bytes().to_vec();
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            sys::cstring(entry)
        })
        .collect::<std::io::Result<_>>()?;
    env.push(sys::cstring(format!("{ROLE_ENV}={role}"))?);
    Ok(env)
}
