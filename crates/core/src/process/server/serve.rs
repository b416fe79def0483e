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
use std::time::{Duration, Instant};

use crate::process::server::protocol::{Reply, Request, SpareTask, WireStatus};
use crate::runtime::registry;
use crate::runtime::{panic, preload};
use crate::sys::{self, Forked, POLLIN, PollFd};
use crate::transport::channel::{Channel, Frame, FrameError};
use crate::transport::wire;

/// A child the server forked and has not reaped yet, with the socket its exit is reported on
/// (`None`: a spare let go, reaped quietly).
struct Served {
    pidfd: OwnedFd,
    status: Option<Channel>,
}

/// A child forked ahead, waiting on its handoff socket for a request to serve.
struct Spare {
    pid: u32,
    pidfd: OwnedFd,
    handoff: Channel,
    /// The server's [`Environment::generation`] when it was forked.
    generation: u64,
}

/// The environment children are forked with: the last one a client sent, numbered so that a
/// spare forked under an older one is sent the current one.
#[derive(Default)]
struct Environment {
    generation: u64,
}

impl Environment {
    /// Takes on a client's environment, which every child forked from now on inherits.
    fn adopt(&mut self, env: Vec<(Vec<u8>, Vec<u8>)>) {
        adopt_environment(env);
        self.generation += 1;
    }

    /// The current environment, for a spare forked under an older one.
    fn for_spare(&self, spare: &Spare) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
        use std::os::unix::ffi::OsStrExt;
        (spare.generation != self.generation).then(|| {
            std::env::vars_os()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect()
        })
    }
}

/// Serves `Fork` (and one `Preload`) requests from `control` until it reaches end-of-file,
/// then exits; each child runs `child_main` with its channel and every signal unblocked. With
/// `reset_dispositions`, each child first sets back to the default every signal disposition
/// the server has changed (the forkserver ignores SIGINT); without, children keep the
/// server's (a template's are the program's own, as a forked child's would be).
///
/// After a `Spares` request the server keeps that many children forked ahead: a `Fork` is
/// handed to one of them (it enters the request's directory and environment, then runs
/// `child_main`), and the replacement is forked once no request is waiting, so that a start
/// does not wait for a fork.
pub fn serve(
    control: Channel,
    child_main: &dyn Fn(Channel) -> Infallible,
    reset_dispositions: bool,
) -> ! {
    let mut control = control;
    let mut children: Vec<Served> = Vec::new();
    let mut spares: Vec<Spare> = Vec::new();
    let mut wanted_spares = 0;
    // Forking a spare failed (no memory, no pids, no descriptors): none is tried again until
    // the next request, rather than in a loop.
    let mut spares_failed = false;
    let mut env = Environment::default();
    let not_default = || if reset_dispositions { sys::signals_not_default() } else { Vec::new() };
    // What each child must reset; asked again after a preload, whose code may install handlers.
    let mut to_reset = not_default();
    // One descriptor held back for the moment a request arrives: closed just before reading
    // requests, it leaves room for the first one's status socket (sent first) even when
    // children have filled the table, so that request can be answered instead of lost.
    let mut reserve = spare_descriptor();
    let mut last_request = Instant::now();
    loop {
        // With spares missing, the poll waits only until the server has been quiet for
        // `SPARE_QUIET`: requests first, forks ahead after, while nobody waits.
        let lacking = spares.len() < wanted_spares && !spares_failed;
        let refill_at = last_request + SPARE_QUIET;
        let ready = {
            let mut set: Vec<PollFd<'_>> = Vec::with_capacity(children.len() + spares.len() + 1);
            set.push(PollFd::new(control.as_fd(), POLLIN));
            set.extend(children.iter().map(|c| PollFd::new(c.pidfd.as_fd(), POLLIN)));
            set.extend(spares.iter().map(|s| PollFd::new(s.pidfd.as_fd(), POLLIN)));
            if sys::poll(&mut set, lacking.then_some(refill_at)).is_err() {
                continue;
            }
            set.iter().map(|entry| entry.revents() != 0).collect::<Vec<bool>>()
        };
        if lacking && !ready.contains(&true) && Instant::now() >= refill_at {
            // The reserve stays held (a spare never takes the slot a request's answer needs),
            // and is closed in the spare.
            let others = Others {
                control: &control,
                later: &[],
                children: &children,
                spares: &spares,
                reserve: reserve.as_ref(),
            };
            let child = Child { main: child_main, to_reset: &to_reset };
            match fork_spare(others, child, env.generation) {
                Some(spare) => spares.push(spare),
                None => spares_failed = true,
            }
            continue;
        }
        if ready[0] {
            last_request = Instant::now();
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
                    Ok((Request::Preload { task }, args))
                        if children.is_empty() && spares.is_empty() && whole =>
                    {
                        run_preload(&task, args, &control);
                        to_reset = not_default();
                    }
                    Ok((Request::Spares { count }, _)) => {
                        wanted_spares = usize::try_from(count).unwrap_or(usize::MAX);
                        // Those let go read end-of-file on their handoff socket and exit.
                        while spares.len() > wanted_spares {
                            let spare = spares.pop().expect("more than wanted");
                            children.push(Served { pidfd: spare.pidfd, status: None });
                        }
                    }
                    Ok((Request::Fork { env: sent }, _)) => {
                        spares_failed = false;
                        // Taken on even for a request that fails: the client counts it sent.
                        if let Some(sent) = sent {
                            env.adopt(sent);
                        }
                        if !whole {
                            let why = "could not receive the request's descriptors";
                            refuse_out_of_descriptors(frame.fds.into_iter().next(), why);
                            continue;
                        }
                        let Some(request) = ForkRequest::take(frame) else { continue };
                        if let Some(spare) = spares.pop() {
                            match hand_off(spare, &request, &env) {
                                Ok((pid, pidfd)) => {
                                    answer_forked(&request.status, pid, &pidfd);
                                    children.push(Served { pidfd, status: Some(request.status) });
                                    continue;
                                }
                                // That spare died: it is reaped, and the request forked for.
                                Err(dead) => children.push(Served { pidfd: dead, status: None }),
                            }
                        }
                        let others = Others {
                            control: &control,
                            later: frames.as_slice(),
                            children: &children,
                            spares: &spares,
                            reserve: None,
                        };
                        let child = Child { main: child_main, to_reset: &to_reset };
                        if let Some(served) = fork_one(request, others, child) {
                            children.push(served);
                        }
                    }
                    // A malformed or out-of-order request is dropped, with its fds.
                    _ => {}
                }
            }
            reserve = spare_descriptor();
            if ended {
                // The program that started us is gone (or broke the protocol): end. The
                // children keep running; daemons among them notice and follow; spares read
                // end-of-file and exit.
                sys::exit_immediately(0);
            }
        }
        let mut index = 1;
        children.retain(|served| {
            let was_ready = ready.get(index).copied().unwrap_or(false);
            index += 1;
            !(was_ready && report_exit(served))
        });
        // A spare that ended unused (killed by someone) is reaped; another is forked later.
        spares.retain(|spare| {
            let was_ready = ready.get(index).copied().unwrap_or(false);
            index += 1;
            !was_ready || matches!(sys::pidfd_wait(spare.pidfd.as_fd(), false), Ok(None))
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
    if let Some(channel) = &served.status {
        let _ = wire::send(channel, &Reply::Exited(status), &[], &[], &[], None, None);
    }
    true
}

/// Runs the preload task and keeps its value for the children to come; on failure, reports it
/// and exits, so that the client never forks from a server without its preload.
fn run_preload(task: &str, args: &[u8], control: &Channel) {
    panic::install_panic_hook();
    let outcome = registry::lookup(task).map_err(|e| (None, e.to_string())).and_then(|entry| {
        match panic::catch_panic(|| (entry.make_state)(crate::transport::codec::Input::whole(args)))
        {
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

/// What the server holds besides the child being forked, which that child must not inherit:
/// the control socket, the descriptors of requests still waiting (received, or queued inside
/// the control channel for a frame not yet complete), the other children's pidfds and status
/// sockets, the spares' pidfds and handoff sockets (a spare learns that the server is gone by
/// end-of-file on its handoff socket, which only the server may hold), and the reserve
/// descriptor.
struct Others<'a> {
    control: &'a Channel,
    later: &'a [(Frame, bool)],
    children: &'a [Served],
    spares: &'a [Spare],
    /// The server's reserve descriptor, if it holds it.
    reserve: Option<&'a OwnedFd>,
}

impl Others<'_> {
    /// Forks, closing in the child every descriptor of the list above and `also` (the
    /// server's end of something the child holds the other end of).
    fn fork(&self, also: BorrowedFd<'_>) -> std::io::Result<Forked> {
        let mut close = self.descriptors();
        close.push(also);
        sys::fork_in_single_threaded_server(&close)
    }

    /// Every descriptor of the list above.
    fn descriptors(&self) -> Vec<BorrowedFd<'_>> {
        let mut close: Vec<BorrowedFd<'_>> = vec![self.control.as_fd()];
        close.extend(self.reserve.map(AsFd::as_fd));
        close.extend(self.later.iter().flat_map(|(frame, _)| frame.fds.iter().map(AsFd::as_fd)));
        close.extend(self.control.queued_fds());
        for served in self.children {
            close.push(served.pidfd.as_fd());
            close.extend(served.status.as_ref().map(Channel::as_fd));
        }
        for spare in self.spares {
            close.push(spare.pidfd.as_fd());
            close.push(spare.handoff.as_fd());
        }
        close
    }
}

/// A `Fork` request's descriptors: where to answer, the child's channel, the directory to
/// start in.
struct ForkRequest {
    status: Channel,
    channel: OwnedFd,
    cwd: OwnedFd,
}

impl ForkRequest {
    /// The request's descriptors, if it came with exactly these three. Checks that the child's
    /// pidfd will find a slot in the table and enters the directory (the child starts where
    /// its client was at `start()`), answering on the status socket if either fails.
    fn take(frame: Frame) -> Option<ForkRequest> {
        let mut fds = frame.fds.into_iter();
        let (Some(status), Some(channel), Some(cwd), None) =
            (fds.next(), fds.next(), fds.next(), fds.next())
        else {
            return None;
        };
        // The child's pidfd needs a slot in the table once it is forked: make sure there is
        // one first, so that a fork never happens that could not be reported.
        match status.try_clone() {
            Ok(probe) => drop(probe),
            Err(_) => {
                let why = "has no descriptor left for the child's pidfd";
                refuse_out_of_descriptors(Some(status), why);
                return None;
            }
        }
        let status = Channel::from_fd(status);
        if let Err(e) = sys::fchdir(cwd.as_fd()) {
            refuse(
                &status,
                format!("the fork server could not enter the caller's working directory: {e}"),
            );
            return None;
        }
        Some(ForkRequest { status, channel, cwd })
    }
}

/// Answers a request with `ForkFailed`.
fn refuse(status: &Channel, message: String) {
    let _ = wire::send(status, &Reply::ForkFailed { message }, &[], &[], &[], None, None);
}

/// Says `Forked` on the request's status socket, with the child's pidfd.
fn answer_forked(status: &Channel, pid: u32, pidfd: &OwnedFd) {
    let reply = Reply::Forked { pid };
    let _ = wire::send(status, &reply, &[], &[pidfd.as_fd()], &[], None, None);
}

/// Forks the child of `request` now.
fn fork_one(request: ForkRequest, others: Others<'_>, child: Child<'_>) -> Option<Served> {
    let ForkRequest { status, channel, cwd } = request;
    drop(cwd);
    match others.fork(status.as_fd()) {
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
                    answer_forked(&status, pid, &pidfd);
                    Some(Served { pidfd, status: Some(status) })
                }
                Err(e) => {
                    refuse(&status, format!("pidfd_open({pid}) in the fork server: {e}"));
                    None
                }
            }
        }
        Err(e) => {
            refuse(&status, format!("fork in the fork server: {e}"));
            None
        }
    }
}

/// Forks a spare: a child that waits for a request on its handoff socket. `None` if the fork
/// (or what it needs) failed.
fn fork_spare(others: Others<'_>, child: Child<'_>, generation: u64) -> Option<Spare> {
    let (ours, theirs) = Channel::pair().ok()?;
    match others.fork(ours.as_fd()) {
        #[allow(unreachable_code)]
        Ok(Forked::Child) => {
            sys::reset_signals(child.to_reset);
            match run_spare(theirs, child.main) {}
        }
        Ok(Forked::Parent(pid)) => {
            drop(theirs);
            // Without a pidfd it could not be watched: it is let go (end-of-file on its
            // handoff socket, it exits) and reaped by init once the server is gone.
            sys::pidfd_open(pid).ok().map(|pidfd| Spare { pid, pidfd, handoff: ours, generation })
        }
        Err(_) => None,
    }
}

/// A spare's life: waits for its request, takes on its directory and environment, and runs
/// `main` with its channel; exits quietly if the server lets it go (or dies) first.
///
/// While it waits it is named [`SPARE_NAME`] (what `ps` shows); it takes back the name it was
/// forked with before it runs `main`.
fn run_spare(mut handoff: Channel, main: &dyn Fn(Channel) -> Infallible) -> Infallible {
    let forked_as = sys::thread_name().ok();
    let _ = sys::set_thread_name(SPARE_NAME);
    let Ok(frame) = handoff.recv(None, None) else { sys::exit_immediately(0) };
    if let Some(name) = forked_as {
        let _ = sys::set_thread_name(&name);
    }
    let Ok((SpareTask { env }, _)) = wire::decode::<SpareTask>(&frame) else {
        sys::exit_immediately(EXIT_SPARE_FAILED)
    };
    let mut fds = frame.fds.into_iter();
    let (Some(channel), Some(cwd), None) = (fds.next(), fds.next(), fds.next()) else {
        sys::exit_immediately(EXIT_SPARE_FAILED)
    };
    // The server entered this directory a moment ago, so this fails only if its permissions
    // changed in between; the child then ends before its hello, which its parent reports as
    // a child that ended at start.
    if sys::fchdir(cwd.as_fd()).is_err() {
        sys::exit_immediately(EXIT_SPARE_FAILED);
    }
    drop(cwd);
    if let Some(env) = env {
        adopt_environment(env);
    }
    drop(handoff);
    main(Channel::from_fd(channel))
}

/// The name of a spare while it waits for a request.
pub const SPARE_NAME: &std::ffi::CStr = c"multiproc-spare";

/// How long the server must have had no request before it forks a missing spare. Forking
/// right after handing a spare out put the fork beside the new child on a busy machine: on one
/// CPU, start→join of a trivial task went from about 356 µs to 464 µs. After a quiet moment
/// the fork uses time nobody was waiting for; a tight loop of starts (no quiet moment) uses
/// the spares there are, then forks on request as without spares.
const SPARE_QUIET: Duration = Duration::from_millis(1);

/// The exit code of a spare that could not take on its request.
const EXIT_SPARE_FAILED: i32 = 71;

/// Gives `request` to `spare`: its pid and pidfd, or, if it has died, its pidfd (to reap).
fn hand_off(
    spare: Spare,
    request: &ForkRequest,
    env: &Environment,
) -> Result<(u32, OwnedFd), OwnedFd> {
    let task = SpareTask { env: env.for_spare(&spare) };
    let Spare { pid, pidfd, handoff, .. } = spare;
    let fds = [request.channel.as_fd(), request.cwd.as_fd()];
    match wire::send(&handoff, &task, &[], &fds, &[], None, None) {
        Ok(()) => Ok((pid, pidfd)),
        Err(_) => Err(pidfd),
    }
}
