//! How a child process ended, with Python's exit-code convention.

use std::fmt;

use crate::sys::ChildExit;

/// How a child process ended, as reported by `waitid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// The process called `exit` (or returned from `main`) with this code.
    Exited(i32),
    /// The process was killed by this signal.
    Signaled(i32),
    /// The process ended, but the process that reaped it (a forkserver that was itself
    /// killed) could not say how. Its [`exitcode`](Self::exitcode) is 255.
    Unknown,
}

impl From<ChildExit> for ExitStatus {
    fn from(exit: ChildExit) -> Self {
        match exit {
            ChildExit::Exited(code) => ExitStatus::Exited(code),
            ChildExit::Signaled(signal) => ExitStatus::Signaled(signal),
        }
    }
}

impl ExitStatus {
    /// Python's `Process.exitcode`: the exit code, or `-N` for a process killed by signal `N`.
    pub fn exitcode(self) -> i32 {
        match self {
            ExitStatus::Exited(code) => code,
            ExitStatus::Signaled(signal) => -signal,
            ExitStatus::Unknown => 255,
        }
    }

    /// Whether the process exited with code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Exited(0)
    }

    /// The exit code, if the process exited rather than being killed.
    pub fn code(self) -> Option<i32> {
        match self {
            ExitStatus::Exited(code) => Some(code),
            ExitStatus::Signaled(_) | ExitStatus::Unknown => None,
        }
    }

    /// The signal that killed the process, if one did.
    pub fn signal(self) -> Option<i32> {
        match self {
            ExitStatus::Exited(_) | ExitStatus::Unknown => None,
            ExitStatus::Signaled(signal) => Some(signal),
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Exited(code) => write!(f, "exit code {code}"),
            ExitStatus::Signaled(signal) => write!(f, "signal {signal} ({})", signal_name(*signal)),
            ExitStatus::Unknown => write!(f, "unknown exit status (its reaper died)"),
        }
    }
}

/// The conventional name of a signal number, for messages.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exitcode_follows_python() {
        assert_eq!(ExitStatus::Exited(0).exitcode(), 0);
        assert_eq!(ExitStatus::Exited(7).exitcode(), 7);
        assert_eq!(ExitStatus::Signaled(15).exitcode(), -15);
        assert!(ExitStatus::Exited(0).success());
        assert!(!ExitStatus::Signaled(9).success());
        assert_eq!(ExitStatus::Signaled(9).to_string(), "signal 9 (SIGKILL)");
    }
}
