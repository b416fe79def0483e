//! multiproc-fork: the `fork` start method—`fork(2)` in the calling process.
//!
//! The child is a copy-on-write image of the caller, so the task's arguments are moved into it
//! rather than serialized. Forking copies only the calling thread: a lock that another thread
//! held at that instant (the allocator's, stdout's, one in a logging library) stays locked
//! forever in the child. So [`Fork`] refuses to fork a multi-threaded process unless the caller
//! gave it a [`MultithreadedForkPermit`], which takes `unsafe` to make; the forkserver is the
//! safe way to start processes from a threaded program.

use multiproc_core::runtime::{child, threads};
use multiproc_core::sys::{self, Forked};
use multiproc_core::transport::channel::Channel;
use multiproc_core::{
    ChildHandle, DirectChild, Error, ErrorKind, Payload, Result, StartMethod, StartRequest,
};

pub use multiproc_core::MultithreadedForkPermit;

/// The fork start method.
#[derive(Debug, Default, Clone, Copy)]
pub struct Fork {
    permit: Option<MultithreadedForkPermit>,
}

impl Fork {
    /// Forks only while the calling process has a single thread.
    pub fn new() -> Self {
        Fork { permit: None }
    }

    /// Forks even while other threads run; see [`MultithreadedForkPermit::new`] for what the
    /// caller promised by making the permit.
    pub fn with_permit(permit: MultithreadedForkPermit) -> Self {
        Fork { permit: Some(permit) }
    }
}

impl StartMethod for Fork {
    fn name(&self) -> &'static str {
        "fork"
    }

    fn moves_arguments(&self) -> bool {
        true
    }

    fn start(&self, request: StartRequest<'_>) -> Result<Box<dyn ChildHandle>> {
        let Payload::Moved(main) = request.payload else {
            return Err(Error::new(ErrorKind::Io, "the fork start method needs a moved payload"));
        };
        child::warm_up();
        // A child's stdin is /dev/null under every start method, as in CPython: never the
        // terminal or pipe its parent reads.
        let dev_null = sys::dev_null().map_err(|e| Error::io("open /dev/null", e))?;
        let close_in_child = [request.parent_end];
        let forked = match self.permit {
            Some(permit) => {
                sys::fork_with_permit(permit, &close_in_child).map_err(|e| Error::io("fork", e))?
            }
            None => threads::fork_parked(&close_in_child)
                .map_err(|(count, e)| threads::fork_error(count, e))?,
        };
        match forked {
            // `main` ends the child process; its `Infallible` return type says it never comes
            // back here.
            #[allow(unreachable_code)]
            Forked::Child => {
                if sys::set_stdin(dev_null).is_err() {
                    sys::exit_immediately(child::EXIT_FAILED);
                }
                match main(Channel::from_fd(request.channel)) {}
            }
            Forked::Parent(pid) => {
                // Let the child run first if it shares our CPU, as the kernel's old
                // `sched_child_runs_first` did: everything we do next (closing its channel end,
                // opening its pidfd, each first write to a page the child still shares, which is
                // a copy-on-write fault) would otherwise come before the child's first
                // instruction, and its first message would then have to wake us. On the 2-vCPU
                // machine we measure on, where a new child often starts on its parent's CPU,
                // start→join went from about 280 µs to 230 µs; where the child has a CPU of its
                // own, the yield finds nothing else to run and returns at once.
                std::thread::yield_now();
                drop(request.channel);
                let child = DirectChild::new(pid)
                    .map_err(|e| Error::io(format!("pidfd_open for forked child {pid}"), e))?;
                Ok(Box::new(child))
            }
        }
    }
}
