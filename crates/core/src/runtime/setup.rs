//! The child's side of per-child setup: it applies to itself the environment, working
//! directory and standard streams its parent asked for (`process::setup`), first thing, while
//! it has one thread.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use crate::sys;
use crate::transport::wire::{Setup, StdStream};

/// Applies `setup`, whose streams take `fds` in order; why not, if it could not.
pub(crate) fn apply(setup: &Setup, fds: Vec<OwnedFd>) -> Result<(), String> {
    if setup.env_clear || !setup.env.is_empty() {
        let mut vars: Vec<(OsString, OsString)> =
            if setup.env_clear { Vec::new() } else { std::env::vars_os().collect() };
        for (key, value) in &setup.env {
            let key = OsStr::from_bytes(key);
            if key.is_empty() || key.as_bytes().contains(&b'=') || key.as_bytes().contains(&0) {
                return Err(format!("{key:?} cannot be an environment variable's name"));
            }
            vars.retain(|(name, _)| name != key);
            if let Some(value) = value {
                if value.contains(&0) {
                    return Err(format!("the value of {key:?} holds a NUL byte"));
                }
                vars.push((key.to_owned(), OsString::from_vec(value.clone())));
            }
        }
        sys::replace_environment(&vars).map_err(|e| format!("setting the environment: {e}"))?;
    }
    if let Some(dir) = &setup.current_dir {
        let dir = OsStr::from_bytes(dir);
        std::env::set_current_dir(dir).map_err(|e| format!("cannot enter {dir:?}: {e}"))?;
    }
    let mut fds = fds.into_iter();
    for (index, stream) in setup.streams.iter().enumerate() {
        let fd = match stream {
            StdStream::Keep => continue,
            StdStream::Null => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map(OwnedFd::from)
                .map_err(|e| format!("opening /dev/null: {e}"))?,
            StdStream::Fd => fds.next().ok_or("a stream's descriptor is missing")?,
        };
        sys::set_std_stream(index, fd.as_fd()).map_err(|e| format!("dup2 onto {index}: {e}"))?;
    }
    Ok(())
}
