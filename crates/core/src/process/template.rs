//! A fork pool's template: a copy of the program forked once, when the pool is built, that
//! forks the pool's workers from then on.
//!
//! A pool's progress thread makes the program multi-threaded, and a replacement worker (for
//! one that died, or retired under `max_tasks_per_child`) may be needed at any time, from
//! that thread. Forking the program then is what the fork start method refuses. So the pool
//! forks a template at `build()`, while the program is still single-threaded (its library
//! threads parked), and the template, which never starts a thread, runs the fork server loop:
//! every worker is a fork of the template, so each has the program's memory as it was at
//! `build()`, the initializer's arguments moved in, never serialized; and the working
//! directory and environment of the program as of the worker's start, as the forkserver gives
//! its children. The template reaps the workers and reports how they ended.

use std::convert::Infallible;
use std::fmt;
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};
use crate::process::method::{ChildHandle, DirectChild, StartMethod, StartRequest};
use crate::process::server::serve::serve;
use crate::process::server::served::{self, Answer, Link, NotSent};
use crate::runtime::{child, threads};
use crate::sys::{self, Forked};
use crate::transport::channel::Channel;

/// How long a start waits for the template's answer: it is our own child, which does nothing
/// but fork, so only a stopped or starved template takes long.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// The template, as the pool sees it: a start method whose children it forks.
pub(crate) struct Template {
    link: Mutex<Link>,
}

impl Template {
    /// Forks the template; each worker it forks later runs `worker_main` with its channel.
    ///
    /// Fails like any fork from a process with other threads than the library's own.
    pub(crate) fn fork(worker_main: impl Fn(Channel) -> Infallible) -> Result<Template> {
        child::warm_up();
        let dev_null = sys::dev_null().map_err(|e| Error::io("open /dev/null", e))?;
        let (ours, theirs) =
            Channel::pair().map_err(|e| Error::io("socketpair for a pool template", e))?;
        let forked = threads::fork_parked(&[ours.as_fd()])
            .map_err(|(count, e)| threads::fork_error(count, e))?;
        match forked {
            Forked::Child => {
                // Workers read nothing from the terminal, as under every start method.
                if sys::set_stdin(dev_null).is_err() {
                    sys::exit_immediately(child::EXIT_FAILED);
                }
                serve(theirs, &worker_main, false)
            }
            Forked::Parent(pid) => {
                drop(theirs);
                let process = DirectChild::new(pid)
                    .map_err(|e| Error::io(format!("pidfd_open for pool template {pid}"), e))?;
                tracing::debug!(pid, "pool template started");
                Ok(Template { link: Mutex::new(Link::new(ours, process)) })
            }
        }
    }
}

impl StartMethod for Template {
    fn name(&self) -> &'static str {
        "fork"
    }

    fn start(&self, request: StartRequest<'_>) -> Result<Box<dyn ChildHandle>> {
        let (ours, theirs) =
            Channel::pair().map_err(|e| Error::io("socketpair for a worker's status", e))?;
        let mut link = self.link.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let pid = link.process.pid();
        match link.send_fork(request.channel.as_fd(), theirs.as_fd()) {
            Ok(()) => {}
            Err(NotSent::Gone) => {
                let status = link.process.wait_deadline(None).ok().flatten();
                let why = format!("the pool's template process {pid} has ended");
                return Err(Error::new(ErrorKind::StartFailed, why).with_exit_status(status));
            }
            Err(NotSent::Failed(error)) => return Err(error),
        }
        // Only the template holds the status socket's other end now: if it dies, we see EOF.
        drop(theirs);
        drop(request.channel);
        match served::await_forked(ours, Instant::now() + ANSWER_WITHIN) {
            Answer::Forked(child) => Ok(Box::new(child)),
            Answer::Refused(error) => Err(error),
            Answer::Timeout(ours) => {
                // A template that does not answer may still fork later: end it first, so that
                // what we report stays true. The pool can start no more workers.
                let _ = link.process.signal(libc::SIGKILL);
                let _ = link.process.wait_deadline(None);
                let why =
                    format!("the pool's template {pid} did not answer within {ANSWER_WITHIN:?}");
                served::resolve_after_server_died(request.parent_end, ours, why, ANSWER_WITHIN)
            }
            Answer::Ended(ours, e) => {
                let why = format!("the pool's template {pid} ended before it answered ({e})");
                served::resolve_after_server_died(request.parent_end, ours, why, ANSWER_WITHIN)
            }
        }
    }
}

impl Drop for Template {
    fn drop(&mut self) {
        let link = self.link.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        // The pool has reaped its workers through the template's reports already (`terminate`
        // runs first), so nothing is lost by ending it now: killed rather than asked, so that
        // a stopped template cannot hold up the drop. SIGKILL makes the wait bounded.
        let _ = link.control.shutdown_write();
        let _ = link.process.signal(libc::SIGKILL);
        let _ = link.process.wait_deadline(None);
    }
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let link = self.link.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f.debug_struct("Template").field("pid", &link.process.pid()).finish()
    }
}
