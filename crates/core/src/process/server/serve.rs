//! The loop of a fork server: a single-threaded process that forks one child per `Fork`
//! request, answers on the request's status socket with the pid and a pidfd, reaps each child
//! through its pidfd and reports the exit status there.
//!
//! Two processes run it: the forkserver (started by exec, it may first run a preload task,
//! whose value every child inherits copy-on-write) and a fork pool's template (a forked copy
//! of the program, made while it was single-threaded). Neither ever starts a thread, so every
//! `fork` here happens where no other thread can hold a lock.

use std::convert::Infallible;
use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::process::server::protocol::{Reply, Request, WireStatus};
use crate::runtime::registry;
use crate::runtime::{panic, preload};
use crate::sys::{self, Forked, POLLIN, PollFd};
use crate::transport::channel::{Channel, Frame, FrameError};
use crate::transport::wire;

/// A child the server forked and has not reaped yet.
struct Served {
    pidfd: OwnedFd,
    status: Channel,
}

/// Serves `Fork` (and one `Preload`) requests from `control` until it reaches end-of-file,
/// then exits; each child runs `child_main` with its channel and every signal unblocked. With
/// `reset_dispositions`, each child first sets back to the default every signal disposition
/// the server has changed (the forkserver ignores SIGINT); without, children keep the
/// server's (a template's are the program's own, as a forked child's would be).
pub fn serve(
    control: Channel,
    child_main: &dyn Fn(Channel) -> Infallible,
    reset_dispositions: bool,
) -> ! {
    let mut control = control;
    let mut children: Vec<Served> = Vec::new();
    let not_default = || if reset_dispositions { sys::signals_not_default() } else { Vec::new() };
    // What each child must reset; asked again after a preload, whose code may install handlers.
    let mut to_reset = not_default();
    // One descriptor held back for the moment a request arrives: closed just before reading
    // requests, it leaves room for the first one's status socket (sent first) even when
    // children have filled the table, so that request can be answered instead of lost.
    let mut reserve = spare_descriptor();
    loop {
        let ready = {
            let mut set: Vec<PollFd<'_>> = Vec::with_capacity(children.len() + 1);
            set.push(PollFd::new(control.as_fd(), POLLIN));
            set.extend(children.iter().map(|c| PollFd::new(c.pidfd.as_fd(), POLLIN)));
            if sys::poll(&mut set, None).is_err() {
                continue;
            }
            set.iter().map(|entry| entry.revents() != 0).collect::<Vec<bool>>()
        };
        if ready[0] {
            // Take every complete request first, so that a child forked for one of them can
            // close the descriptors that came with the others.
            drop(reserve.take());
            // Each with whether its descriptors arrived whole.
            let mut frames: Vec<(Frame, bool)> = Vec::new();
            let ended = loop {
                match control.try_recv() {
                    Ok(Some(frame)) => frames.push((frame, true)),
                    Ok(None) => break false,
                    // Out of descriptors: the request is read, and answered below.
                    Err(FrameError::FdsTruncated { frame, .. }) => frames.push((frame, false)),
                    // A request with descriptors it does not claim: dropped, with them.
                    Err(FrameError::ExtraFds { .. } | FrameError::MissingFds { .. }) => {}
                    Err(_) => break true,
                }
            };
            let mut frames = frames.into_iter();
            while let Some((frame, whole)) = frames.next() {
                match wire::decode::<Request>(&frame) {
                    Ok((Request::Preload { task }, args)) if children.is_empty() && whole => {
                        run_preload(&task, args, &control);
                        to_reset = not_default();
                    }
                    Ok((Request::Fork { env }, _)) => {
                        // Taken on even for a request that fails: the client counts it sent.
                        if let Some(env) = env {
                            adopt_environment(env);
                        }
                        if whole {
                            let later = frames.as_slice();
                            let child = Child { main: child_main, to_reset: &to_reset };
                            fork_one(frame, &control, later, &mut children, child);
                        } else {
                            let why = "could not receive the request's descriptors";
                            refuse_out_of_descriptors(frame.fds.into_iter().next(), why);
                        }
                    }
                    // A malformed or out-of-order request is dropped, with its fds.
                    _ => {}
                }
            }
            reserve = spare_descriptor();
            if ended {
                // The program that started us is gone (or broke the protocol): end. The
                // children keep running; daemons among them notice and follow.
                sys::exit_immediately(0);
            }
        }
        let mut index = 1;
        children.retain(|served| {
            let was_ready = ready.get(index).copied().unwrap_or(false);
            index += 1;
            !(was_ready && report_exit(served))
        });
    }
}

/// Reaps a child whose pidfd became readable and reports how it ended; true once reaped.
fn report_exit(served: &Served) -> bool {
    let status = match sys::pidfd_wait(served.pidfd.as_fd(), false) {
        Ok(Some(sys::ChildExit::Exited(code))) => WireStatus::Exited(code),
        Ok(Some(sys::ChildExit::Signaled(signal))) => WireStatus::Signaled(signal),
        Err(_) => WireStatus::Exited(255),
        Ok(None) => return false,
    };
    let _ = wire::send(&served.status, &Reply::Exited(status), &[], &[], &[], None, None);
    true
}

/// Runs the preload task and keeps its value for the children to come; on failure, reports it
/// and exits, so that the client never forks from a server without its preload.
fn run_preload(task: &str, args: &[u8], control: &Channel) {
    panic::install_panic_hook();
    let outcome = registry::lookup(task).map_err(|e| (None, e.to_string())).and_then(|entry| {
        match panic::catch_panic(|| (entry.make_state)(args)) {
            Ok(Ok(state)) => Ok(state),
            Ok(Err(e)) => Err((None, e.to_string())),
            Err(panic) => Err((Some(panic), String::from("the preload task panicked"))),
        }
    });
    match outcome {
        Ok(state) => {
            preload::install(state);
            if wire::send(control, &Reply::Preloaded, &[], &[], &[], None, None).is_err() {
                sys::exit_immediately(0);
            }
        }
        Err((panic, message)) => {
            let reply = Reply::PreloadFailed { panic, message };
            let _ = wire::send(control, &reply, &[], &[], &[], None, None);
            sys::exit_immediately(1);
        }
    }
}

/// A descriptor to hold in reserve (a duplicate of stdin, which is `/dev/null`); `None` when
/// the table is full.
fn spare_descriptor() -> Option<OwnedFd> {
    std::io::stdin().as_fd().try_clone_to_owned().ok()
}

/// Answers a `Fork` request that cannot be served because the server is out of descriptors,
/// on its status socket (the request's first descriptor), if that arrived.
fn refuse_out_of_descriptors(status: Option<OwnedFd>, why: &str) {
    let Some(status) = status else { return };
    let status = Channel::from_fd(status);
    let message = format!(
        "too many open files in the fork server (pid {}): it {why}; the child was not started",
        std::process::id()
    );
    let reply = Reply::ForkFailed { message };
    let _ = wire::send(&status, &reply, &[], &[], &[], None, None);
}

/// Takes on a client's environment, which every child forked from now on inherits. The
/// server has one thread (its invariant), which changing the environment requires.
fn adopt_environment(env: Vec<(Vec<u8>, Vec<u8>)>) {
    use std::os::unix::ffi::OsStringExt;
    let vars: Vec<_> = env
        .into_iter()
        .map(|(key, value)| (OsString::from_vec(key), OsString::from_vec(value)))
        .collect();
    let _ = sys::replace_environment(&vars);
}

/// What a forked child runs, and the signals it resets first.
struct Child<'a> {
    main: &'a dyn Fn(Channel) -> Infallible,
    to_reset: &'a [i32],
}

fn fork_one(
    frame: Frame,
    control: &Channel,
    later: &[(Frame, bool)],
    children: &mut Vec<Served>,
    child: Child<'_>,
) {
    let mut fds = frame.fds.into_iter();
    let (Some(status), Some(channel), Some(cwd), None) =
        (fds.next(), fds.next(), fds.next(), fds.next())
    else {
        return;
    };
    // The child's pidfd needs a slot in the table once it is forked: make sure there is one
    // first, so that a fork never happens that could not be reported.
    match status.try_clone() {
        Ok(probe) => drop(probe),
        Err(_) => {
            refuse_out_of_descriptors(Some(status), "has no descriptor left for the child's pidfd");
            return;
        }
    }
    let status = Channel::from_fd(status);
    // The child starts where its client was at `start()`.
    let entered = sys::fchdir(cwd.as_fd());
    drop(cwd);
    if let Err(e) = entered {
        let message =
            format!("the fork server could not enter the caller's working directory: {e}");
        let _ = wire::send(&status, &Reply::ForkFailed { message }, &[], &[], &[], None, None);
        return;
    }
    let forked = {
        // The child needs none of the server's descriptors: not the control socket, not its
        // own status socket, not the other children's pidfds and status sockets, not the
        // descriptors of requests still waiting (received, or queued inside the control
        // channel for a frame not yet complete).
        let mut close: Vec<BorrowedFd<'_>> = vec![control.as_fd(), status.as_fd()];
        close.extend(later.iter().flat_map(|(frame, _)| frame.fds.iter().map(AsFd::as_fd)));
        close.extend(control.queued_fds());
        for served in children.iter() {
            close.push(served.pidfd.as_fd());
            close.push(served.status.as_fd());
        }
        sys::fork_in_single_threaded_server(&close)
    };
    match forked {
        // `main` ends the child process; its `Infallible` return type says it never comes
        // back here.
        #[allow(unreachable_code)]
        Ok(Forked::Child) => {
            sys::reset_signals(child.to_reset);
            match (child.main)(Channel::from_fd(channel)) {}
        }
        Ok(Forked::Parent(pid)) => {
            drop(channel);
            match sys::pidfd_open(pid) {
                Ok(pidfd) => {
                    let reply = Reply::Forked { pid };
                    let _ = wire::send(&status, &reply, &[], &[pidfd.as_fd()], &[], None, None);
                    children.push(Served { pidfd, status });
                }
                Err(e) => {
                    let message = format!("pidfd_open({pid}) in the fork server: {e}");
                    let _ = wire::send(
                        &status,
                        &Reply::ForkFailed { message },
                        &[],
                        &[],
                        &[],
                        None,
                        None,
                    );
                }
            }
        }
        Err(e) => {
            let message = format!("fork in the fork server: {e}");
            let _ = wire::send(&status, &Reply::ForkFailed { message }, &[], &[], &[], None, None);
        }
    }
}
