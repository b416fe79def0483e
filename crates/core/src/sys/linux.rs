//! Linux backend of `sys`: sockets with SCM_RIGHTS, poll, pidfd, fork, posix_spawn, `.init_array`.
//!
//! # Safety
//!
//! This file is the one place of the workspace where `unsafe` is allowed. Each block states why
//! its preconditions hold; the functions it exports are safe to call from anywhere.

use std::ffi::{CString, OsString, c_char, c_int};
use std::io;
use std::mem::{self, MaybeUninit};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::ptr;
use std::sync::atomic::AtomicU32;
use std::time::Instant;

/// Turns a `-1` return into the thread's `errno`.
fn cvt(ret: c_int) -> io::Result<c_int> {
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

/// Turns a `-1` return of a `ssize_t`/`long` call into the thread's `errno`.
fn cvt_long(ret: isize) -> io::Result<usize> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret as usize) }
}

/// The kernel's `SCM_MAX_FD`: the most descriptors one `sendmsg` may carry.
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// A control-message buffer large enough for [`MAX_FDS_PER_MESSAGE`] descriptors, aligned for
/// `cmsghdr` (which holds a `size_t`).
#[repr(C, align(8))]
struct CmsgBuffer([u8; 1088]);

/// `sendmsg(sock, bufs, SCM_RIGHTS(fds), MSG_NOSIGNAL)`—writes as many bytes of `bufs` as the socket
/// takes, with `fds` riding on the first byte.
///
/// `MSG_NOSIGNAL` turns a vanished peer into `EPIPE` instead of a SIGPIPE that would kill a host
/// program that did not ignore it. With `nonblocking`, a full socket gives `WouldBlock`.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    bufs: &[io::IoSlice<'_>],
    fds: &[BorrowedFd<'_>],
    nonblocking: bool,
) -> io::Result<usize> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} fds in one message, at most {MAX_FDS_PER_MESSAGE}", fds.len()),
        ));
    }
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space =
        [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("the control buffer is too small for the descriptors"));
    }
    let mut flags = SendFlags::NOSIGNAL;
    if nonblocking {
        flags |= SendFlags::DONTWAIT;
    }
    super::retry_eintr(|| Ok(rustix::net::sendmsg(sock, bufs, &mut control, flags)?))
}

/// What one `recvmsg` brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Received {
    /// Bytes read; `0` means the peer closed its end.
    pub len: usize,
    /// The kernel could not hand over every descriptor that was sent (`MSG_CTRUNC`: this
    /// process's descriptor table is full, `RLIMIT_NOFILE`); those that arrived are kept, in
    /// order, and the bytes were read all the same.
    pub fds_truncated: bool,
}

impl Received {
    /// The byte count, or an error if descriptors were lost: for callers that cannot use a
    /// message without all of them.
    pub fn whole(self) -> io::Result<usize> {
        if self.fds_truncated {
            return Err(io::Error::other(
                "file descriptors were truncated in transit (MSG_CTRUNC: too many open files)",
            ));
        }
        Ok(self.len)
    }
}

/// `recvmsg(sock, buf, MSG_CMSG_CLOEXEC)`—reads bytes into `buf` and appends any descriptors
/// that arrived with them to `fds`, already close-on-exec.
///
/// Returns the number of bytes read; `0` means the peer closed its end. With `nonblocking`, an
/// empty socket gives `WouldBlock`. Descriptors that did not fit (the kernel sets `MSG_CTRUNC`)
/// are reported as an error rather than silently lost.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    nonblocking: bool,
) -> io::Result<usize> {
    recvmsg_raw(sock, buf.as_mut_ptr(), buf.len(), fds, nonblocking)?.whole()
}

/// The body of [`recv_with_fds`] over a raw destination: `dest` must be valid for writes of
/// `len` bytes (initialised or not).
fn recvmsg_raw(
    sock: BorrowedFd<'_>,
    dest: *mut u8,
    len: usize,
    fds: &mut Vec<OwnedFd>,
    nonblocking: bool,
) -> io::Result<Received> {
    let mut cmsg = CmsgBuffer([0; 1088]);
    let mut iov = libc::iovec { iov_base: dest.cast(), iov_len: len };
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = cmsg.0.len() as _;
    let mut flags = libc::MSG_CMSG_CLOEXEC;
    if nonblocking {
        flags |= libc::MSG_DONTWAIT;
    }
    let n = super::retry_eintr(|| {
        // SAFETY: msg points at live, writable buffers of the advertised lengths.
        cvt_long(unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, flags) })
    })?;
    // SAFETY: after a successful recvmsg, the control buffer holds `msg_controllen` bytes of
    // well-formed cmsg headers, which the CMSG_* macros walk without leaving the buffer. Every
    // SCM_RIGHTS descriptor is a fresh descriptor this process now owns, taken exactly once.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&msg);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(header);
                let len = (*header).cmsg_len as usize - (data as usize - header as usize);
                let count = len / mem::size_of::<RawFd>();
                for i in 0..count {
                    let raw = ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            header = libc::CMSG_NXTHDR(&msg, header);
        }
    }
    // Only a record-oriented socket truncates: the rest of a record longer than the buffer is
    // gone, so it is an error, never a short message.
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(io::Error::other(format!("a record longer than the {len} bytes expected")));
    }
    Ok(Received { len: n, fds_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0 })
}

/// [`recv_with_fds`] into the spare capacity of `buf`: reserves up to `max` bytes, receives at
/// most that many without initialising them first, and extends `buf` by what arrived.
///
/// This is how a large frame is received without zero-filling (or copying) it first. Unlike
/// [`recv_with_fds`], descriptors the kernel could not hand over are reported in the result,
/// not as an error, so that a stream's bytes are never lost with them.
pub fn recv_into_vec(
    sock: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
    max: usize,
    fds: &mut Vec<OwnedFd>,
    nonblocking: bool,
) -> io::Result<Received> {
    buf.reserve(max);
    let spare = buf.spare_capacity_mut();
    let len = spare.len().min(max);
    // recvmsg only writes into the buffer, so handing it uninitialised bytes is sound.
    let received = recvmsg_raw(sock, spare.as_mut_ptr().cast::<u8>(), len, fds, nonblocking)?;
    // SAFETY: the kernel initialised the first `received.len` bytes of the spare capacity,
    // received.len <= len.
    unsafe { buf.set_len(buf.len() + received.len) };
    Ok(received)
}

/// Readable (`POLLIN`).
pub const POLLIN: i16 = libc::POLLIN;
/// Writable (`POLLOUT`).
pub const POLLOUT: i16 = libc::POLLOUT;
/// The peer shut down its writing side (`POLLRDHUP`).
pub const POLLRDHUP: i16 = libc::POLLRDHUP;
/// Hang-up (`POLLHUP`), reported whether asked for or not.
pub const POLLHUP: i16 = libc::POLLHUP;
/// Error (`POLLERR`), reported whether asked for or not.
pub const POLLERR: i16 = libc::POLLERR;

/// One entry of a `poll(2)` set: rustix's, with the events as the `POLL*` constants here.
#[repr(transparent)]
#[derive(Debug)]
pub struct PollFd<'fd>(rustix::event::PollFd<'fd>);

impl<'fd> PollFd<'fd> {
    /// Watches `fd` for `events` (a union of the `POLL*` constants of this module).
    pub fn new(fd: BorrowedFd<'fd>, events: i16) -> Self {
        let events = rustix::event::PollFlags::from_bits_retain(events as u16);
        Self(rustix::event::PollFd::from_borrowed_fd(fd, events))
    }

    /// The events that were ready after the last [`poll`].
    pub fn revents(&self) -> i16 {
        self.0.revents().bits() as i16
    }

    /// Whether any of `events` (or a hang-up or error, which always wake a poll) is ready.
    pub fn ready(&self, events: i16) -> bool {
        self.revents() & (events | POLLHUP | POLLERR) != 0
    }
}

/// `poll(fds, deadline)`—waits until an entry is ready or `deadline` passes (never, for `None`).
///
/// Returns how many entries are ready; `0` means the deadline passed. `EINTR` restarts the wait
/// with the time that is left.
pub fn poll(fds: &mut [PollFd<'_>], deadline: Option<Instant>) -> io::Result<usize> {
    // SAFETY: `PollFd` is a transparent wrapper of rustix's, so the slices have one layout.
    let fds = unsafe { &mut *(std::ptr::from_mut(fds) as *mut [rustix::event::PollFd<'_>]) };
    loop {
        let timeout = deadline.map(|deadline| {
            // Rounded up to the next millisecond, as poll(2) would: a wait never returns a
            // hair before its deadline and spins.
            let left = deadline.saturating_duration_since(Instant::now());
            let left =
                std::time::Duration::from_micros(left.as_micros().div_ceil(1000) as u64 * 1000);
            rustix::event::Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: left.subsec_nanos().into(),
            }
        });
        match rustix::event::poll(fds, timeout.as_ref()) {
            Ok(n) => return Ok(n),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// How many threads the calling process has, from procfs.
pub fn thread_count() -> io::Result<usize> {
    // One statx: procfs gives the task directory a link count of 2 + its number of threads.
    // A kernel that stops doing so (a count below 3) falls back to reading the status file.
    let links = std::fs::metadata("/proc/self/task")?.nlink();
    if links >= 3 {
        return Ok(links as usize - 2);
    }
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no Threads: line in /proc/self/status"))
}

/// Which side of a `fork` the caller is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// The new process.
    Child,
    /// The original process; the child has this pid.
    Parent(u32),
}

/// Permission to `fork` a process that has more than one thread.
///
/// Holding one is a promise, made with `unsafe`, that the code the child runs after the fork
/// does not need a lock or an allocator state that another thread of the parent might have held
/// at the instant of the fork.
#[derive(Debug, Clone, Copy)]
pub struct MultithreadedForkPermit(());

impl MultithreadedForkPermit {
    /// Grants permission to fork while other threads run.
    ///
    /// # Safety
    ///
    /// Only the forking thread is copied into the child. Any lock another thread held at that
    /// moment (the allocator's, stdout's, a `Mutex` in your code or a library's) stays locked
    /// forever in the child, so a child that touches one deadlocks. The caller guarantees that
    /// the tasks it runs under this permit avoid every such lock, or that no other thread can
    /// hold one across a fork (for example because every other thread is parked in a known
    /// place).
    pub unsafe fn new() -> Self {
        Self(())
    }
}

/// `fork()`—but only while the calling process has exactly one thread besides the `parked`
/// threads of the library's own (parked where they hold no lock: see `runtime::threads`).
///
/// Returns `Err((n, _))` naming the thread count `n` when other threads exist, because a fork
/// then copies locks that those threads may hold (the malloc lock is the classic) into a child
/// that has no thread to release them. A thread that has just ended (joined, but not yet
/// removed by the kernel) is waited for, briefly, before the count counts as too high.
///
/// In the child, the descriptors in `close_in_child` are closed: they belong to the parent.
pub fn fork_single_threaded(
    close_in_child: &[BorrowedFd<'_>],
    parked: usize,
) -> Result<Forked, (usize, io::Error)> {
    let allowed = 1 + parked;
    let patience = Instant::now() + std::time::Duration::from_millis(20);
    loop {
        let threads = thread_count().map_err(|e| (0, e))?;
        if threads <= allowed {
            break;
        }
        if Instant::now() >= patience {
            return Err((threads, io::Error::other("process is multi-threaded")));
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    // SAFETY: the process has one running thread (checked above); the others are parked by
    // the library where they hold no lock, so no lock can be held across the fork by a thread
    // that does not exist in the child.
    fork_raw(close_in_child).map_err(|e| (1, e))
}

/// `fork()` with other threads running, under a caller's [`MultithreadedForkPermit`].
pub fn fork_with_permit(
    _permit: MultithreadedForkPermit,
    close_in_child: &[BorrowedFd<'_>],
) -> io::Result<Forked> {
    // The permit's constructor made the caller promise that the child avoids every lock
    // another thread may hold.
    fork_raw(close_in_child)
}

/// `fork()`, for the single-threaded forkserver (its callers state why that is sound).
///
/// Every signal is blocked across the fork, and stays blocked in the child until it calls
/// [`reset_signals`]: a signal sent to the child before it has given up the server's
/// dispositions (the server ignores SIGINT) stays pending instead of being discarded, and is
/// delivered with its default action once the child unblocks it.
pub fn fork_in_single_threaded_server(close_in_child: &[BorrowedFd<'_>]) -> io::Result<Forked> {
    debug_assert_eq!(thread_count().ok(), Some(1));
    let mut all = MaybeUninit::<libc::sigset_t>::uninit();
    let mut previous = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: `all` is initialised by sigfillset before sigprocmask reads it; sigprocmask
    // writes the old mask into `previous`, which is read only after that succeeded.
    let blocked = unsafe {
        libc::sigfillset(all.as_mut_ptr());
        libc::sigprocmask(libc::SIG_BLOCK, all.as_ptr(), previous.as_mut_ptr()) == 0
    };
    let forked = fork_raw(close_in_child);
    if blocked && !matches!(forked, Ok(Forked::Child)) {
        // SAFETY: `previous` was filled by the successful sigprocmask above.
        unsafe { libc::sigprocmask(libc::SIG_SETMASK, previous.as_ptr(), ptr::null_mut()) };
    }
    forked
}

/// `fork()`, then in the child `close()` each of `close_in_child`.
///
/// The descriptors to close are owned by values in the caller's stack frames (the parent's end
/// of the new child's channel, say). The child never returns into those frames—every caller
/// runs the child to `_exit`—so closing the child's copies cannot break an owner's invariant.
fn fork_raw(close_in_child: &[BorrowedFd<'_>]) -> io::Result<Forked> {
    // SAFETY: fork has no memory-safety preconditions of its own; the callers above establish
    // that the child will not deadlock on a lock held by a thread it does not have.
    match cvt(unsafe { libc::fork() })? {
        0 => {
            for fd in close_in_child {
                // SAFETY: see above: the owners of these descriptors are never used again in
                // this (child) process, so no one will use or close the numbers after us.
                unsafe { libc::close(fd.as_raw_fd()) };
            }
            Ok(Forked::Child)
        }
        pid => Ok(Forked::Parent(pid as u32)),
    }
}

/// `recv(sock, buf, MSG_PEEK | MSG_DONTWAIT)`—copies what is waiting in a socket without
/// taking it; `Ok(0)` is end-of-stream, `WouldBlock` nothing yet.
pub fn peek(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
    super::retry_eintr(|| Ok(rustix::net::recv(sock, &mut *buf, flags)?.0))
}

/// `/dev/null`, opened read-only (CLOEXEC) once per process: what a forked child gets as its
/// stdin, opened before the fork so that the child only has to `dup2` it.
pub fn dev_null() -> io::Result<BorrowedFd<'static>> {
    static DEV_NULL: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();
    if let Some(fd) = DEV_NULL.get() {
        return Ok(fd.as_fd());
    }
    let file = std::fs::File::open("/dev/null")?;
    Ok(DEV_NULL.get_or_init(|| file.into()).as_fd())
}

/// `pipe2(O_CLOEXEC)`—a pipe's reading and writing ends.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}

/// `dup2(fd, index)`—makes `fd` this process's stdin (0), stdout (1) or stderr (2).
pub fn set_std_stream(index: usize, fd: BorrowedFd<'_>) -> io::Result<()> {
    super::retry_eintr(|| match index {
        0 => Ok(rustix::stdio::dup2_stdin(fd)?),
        1 => Ok(rustix::stdio::dup2_stdout(fd)?),
        _ => Ok(rustix::stdio::dup2_stderr(fd)?),
    })
}

/// `dup2(fd, 0)`—makes `fd` this process's stdin. Async-signal-safe: a forked child of a
/// multi-threaded parent may call it.
pub fn set_stdin(fd: BorrowedFd<'_>) -> io::Result<()> {
    super::retry_eintr(|| Ok(rustix::stdio::dup2_stdin(fd)?))
}

/// Closes `fds` in a child forked from this process, before it runs its task.
///
/// The owners of these descriptors (pipe ends the child was not given) live in memory the
/// child copied from its parent and never uses: its task gets only its own arguments, and the
/// child ends with `_exit` without dropping anything it copied. A task that reaches such an
/// owner through a global would find the descriptor closed (an error, not undefined
/// behaviour: the number is not reused by this function).
pub fn close_in_forked_child(fds: &[RawFd]) {
    for fd in fds {
        // SAFETY: see above: nothing in the child will use these numbers as the descriptors
        // they were, and close has no memory preconditions.
        unsafe { libc::close(*fd) };
    }
}

/// `_exit(code)`—ends the process at once: no atexit handlers, no destructors, no unwinding.
///
/// A forked child ends here so that it never returns into (or unwinds through) the stack frames
/// it copied from its parent.
pub fn exit_immediately(code: i32) -> ! {
    // SAFETY: _exit is async-signal-safe and has no preconditions.
    unsafe { libc::_exit(code) }
}

/// `atexit(handler)`: runs `handler` when the process returns from `main` or calls
/// `std::process::exit` (not at `_exit`, nor when killed). For a library that must say goodbye
/// to a peer before the process ends (an MPI job's rank 0 ends the job cleanly).
pub fn at_exit(handler: extern "C" fn()) -> io::Result<()> {
    // SAFETY: atexit only records the function pointer, which is valid for the whole process.
    match unsafe { libc::atexit(handler) } {
        0 => Ok(()),
        _ => Err(io::Error::other("atexit: no room for another handler")),
    }
}

/// This machine's host name (the kernel's `nodename`), or `"?"` if it cannot be read.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "?".to_owned(), |name| name.trim_end().to_owned())
}

/// `getppid()`.
pub fn parent_pid() -> u32 {
    rustix::process::getppid().map_or(0, |pid| pid.as_raw_nonzero().get() as u32)
}

/// `fcntl(fd, F_DUPFD_CLOEXEC, min)`—a close-on-exec duplicate of `fd` numbered `min` or
/// above.
pub fn dup_at_least(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    Ok(rustix::io::fcntl_dupfd_cloexec(fd, min)?)
}

/// `pidfd_open(pid, 0)`—a descriptor that names this process for as long as the descriptor
/// lives, immune to pid reuse; it becomes readable when the process exits.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw);
    let pid = pid.ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
    Ok(rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?)
}

/// Whether process `pid` has ended: there is no such process, or its pidfd is readable (it
/// exited and may be a zombie not yet reaped). A pid of this pid namespace.
pub fn process_ended(pid: u32) -> bool {
    match pidfd_open(pid) {
        Err(e) => e.raw_os_error() == Some(libc::ESRCH),
        Ok(pidfd) => {
            let mut fds = [PollFd::new(pidfd.as_fd(), POLLIN)];
            poll(&mut fds, Some(Instant::now())).is_ok_and(|ready| ready > 0)
        }
    }
}

/// `pidfd_send_signal(pidfd, signal, NULL, 0)`—sends `signal` to exactly the process the
/// descriptor names. A process that has already exited gives `ESRCH`.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: i32) -> io::Result<()> {
    let signal = rustix::process::Signal::from_named_raw(signal)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(rustix::process::pidfd_send_signal(pidfd, signal)?)
}

/// How a reaped child ended, as `waitid` reports it (`process::status::ExitStatus` is the
/// domain type made from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    /// `CLD_EXITED`, with the exit code.
    Exited(i32),
    /// `CLD_KILLED` or `CLD_DUMPED`, with the signal.
    Signaled(i32),
}

/// `waitid(P_PIDFD, pidfd, WEXITED [| WNOHANG])`—reaps the child the descriptor names.
///
/// Returns `None` when `block` is false and the child is still running. Only works for our own
/// children; this is the only way multiproc reaps, so it never steals another library's child
/// the way `waitpid(-1)` would.
pub fn pidfd_wait(pidfd: BorrowedFd<'_>, block: bool) -> io::Result<Option<ChildExit>> {
    use rustix::process::{WaitId, WaitIdOptions};
    let mut options = WaitIdOptions::EXITED;
    if !block {
        options |= WaitIdOptions::NOHANG;
    }
    let status =
        super::retry_eintr(|| Ok(rustix::process::waitid(WaitId::PidFd(pidfd), options)?))?;
    Ok(status.map(|status| match (status.exit_status(), status.terminating_signal()) {
        (Some(code), _) => ChildExit::Exited(code),
        (None, Some(signal)) => ChildExit::Signaled(signal),
        (None, None) => ChildExit::Exited(255),
    }))
}

/// The fd number a spawned child finds its bootstrap socket at.
pub const SPAWN_CHANNEL_FD: RawFd = 3;

/// `posix_spawn("/proc/self/exe", argv, envp)` with the bootstrap socket at fd 3, stdin on
/// `/dev/null`, every other descriptor above 2 closed, signal mask empty and all dispositions
/// default. Returns the child's pid.
///
/// glibc implements this with `clone(CLONE_VM | CLONE_VFORK)`, so no page tables are copied and
/// an exec failure comes back as this call's error rather than as a child that exits 127.
pub fn spawn_self(argv: &[CString], envp: &[CString], channel: BorrowedFd<'_>) -> io::Result<u32> {
    // A dup2 onto itself would keep CLOEXEC set, so the channel must not already sit at fd 3.
    let moved;
    let channel = if channel.as_raw_fd() == SPAWN_CHANNEL_FD {
        moved = channel.try_clone_to_owned()?;
        moved.as_fd()
    } else {
        channel
    };
    let mut argv_ptrs: Vec<*mut c_char> = argv.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv_ptrs.push(ptr::null_mut());
    let mut envp_ptrs: Vec<*mut c_char> = envp.iter().map(|e| e.as_ptr().cast_mut()).collect();
    envp_ptrs.push(ptr::null_mut());
    let path = c"/proc/self/exe";
    let dev_null = c"/dev/null";

    let mut actions = MaybeUninit::<libc::posix_spawn_file_actions_t>::uninit();
    let mut attr = MaybeUninit::<libc::posix_spawnattr_t>::uninit();
    // SAFETY: every pointer handed to the posix_spawn family is valid for the duration of the
    // call: the actions and attributes are initialised before use and destroyed after, argv and
    // envp are NULL-terminated arrays of NUL-terminated strings that outlive the call.
    unsafe {
        errno_value(libc::posix_spawn_file_actions_init(actions.as_mut_ptr()))?;
        let actions_ptr = actions.as_mut_ptr();
        let result = (|| {
            errno_value(libc::posix_spawn_file_actions_adddup2(
                actions_ptr,
                channel.as_raw_fd(),
                SPAWN_CHANNEL_FD,
            ))?;
            errno_value(libc::posix_spawn_file_actions_addopen(
                actions_ptr,
                0,
                dev_null.as_ptr(),
                libc::O_RDONLY,
                0,
            ))?;
            errno_value(libc::posix_spawn_file_actions_addclosefrom_np(
                actions_ptr,
                SPAWN_CHANNEL_FD + 1,
            ))?;
            errno_value(libc::posix_spawnattr_init(attr.as_mut_ptr()))?;
            let attr_ptr = attr.as_mut_ptr();
            let spawned = (|| {
                let mut set = MaybeUninit::<libc::sigset_t>::uninit();
                libc::sigemptyset(set.as_mut_ptr());
                errno_value(libc::posix_spawnattr_setsigmask(attr_ptr, set.as_ptr()))?;
                libc::sigfillset(set.as_mut_ptr());
                errno_value(libc::posix_spawnattr_setsigdefault(attr_ptr, set.as_ptr()))?;
                errno_value(libc::posix_spawnattr_setflags(
                    attr_ptr,
                    (libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF) as _,
                ))?;
                let mut pid: libc::pid_t = 0;
                errno_value(libc::posix_spawn(
                    &mut pid,
                    path.as_ptr(),
                    actions_ptr,
                    attr_ptr,
                    argv_ptrs.as_ptr(),
                    envp_ptrs.as_ptr(),
                ))?;
                Ok(pid as u32)
            })();
            libc::posix_spawnattr_destroy(attr_ptr);
            spawned
        })();
        libc::posix_spawn_file_actions_destroy(actions_ptr);
        result
    }
}

/// The posix_spawn and pthread families return an errno value instead of setting `errno`.
fn errno_value(ret: c_int) -> io::Result<()> {
    if ret == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(ret)) }
}

/// Takes ownership of an inherited descriptor named by number (a spawned child's fd 3).
///
/// Fails unless `fd` is an open socket. Marks it close-on-exec again, so that programs the child
/// itself starts do not inherit it.
pub fn adopt_inherited_socket(fd: RawFd) -> io::Result<OwnedFd> {
    let mut stat = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes into the provided buffer; an invalid fd gives EBADF.
    cvt(unsafe { libc::fstat(fd, stat.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so the buffer is initialised.
    let stat = unsafe { stat.assume_init() };
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::other(format!("inherited fd {fd} is not a socket")));
    }
    // SAFETY: F_SETFD on an open descriptor.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) })?;
    // SAFETY: the fd is open (fstat succeeded) and was handed to this process for it alone: the
    // environment variable that named it has been removed, so nothing else will claim it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes this process's environment exactly `vars`, changing only what differs; refused
/// (`Err`) unless the process has one thread.
///
/// The forkserver calls it before a fork, so that its child starts with its client's
/// environment as it was at `start()`; a test helper calls it at the top of `main`.
pub fn replace_environment(vars: &[(OsString, OsString)]) -> io::Result<()> {
    if thread_count()? != 1 {
        return Err(io::Error::other(
            "the environment is changed only in a single-threaded process",
        ));
    }
    let current: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    for (key, _) in &current {
        if !vars.iter().any(|(wanted, _)| wanted == key) {
            // SAFETY: the process has one thread (checked above), so no other thread can read
            // the environment while it changes.
            unsafe { std::env::remove_var(key) };
        }
    }
    for (key, value) in vars {
        if !current.iter().any(|(k, v)| k == key && v == value) {
            // SAFETY: as above, single-threaded. `key` came from another process's environment,
            // where it was a valid name (no `=`, no NUL), and so was `value`.
            unsafe { std::env::set_var(key, value) };
        }
    }
    Ok(())
}

/// `open(".", O_PATH | O_DIRECTORY | O_CLOEXEC)`—this process's working directory as a
/// descriptor, which another process can `fchdir` into even if the directory has been renamed
/// or removed meanwhile (as a forked or spawned child inherits it).
pub fn open_cwd() -> io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    Ok(rustix::fs::open(".", flags, Mode::empty())?)
}

/// `prctl(PR_GET_NAME)`—the calling thread's name (of a single-threaded process, what `ps`
/// and `/proc/<pid>/comm` show).
pub fn thread_name() -> io::Result<std::ffi::CString> {
    Ok(rustix::thread::name()?)
}

/// `prctl(PR_SET_NAME, name)`—names the calling thread (at most 15 bytes are kept).
pub fn set_thread_name(name: &std::ffi::CStr) -> io::Result<()> {
    Ok(rustix::thread::set_name(name)?)
}

/// `fchdir(dir)`—makes `dir` the working directory.
pub fn fchdir(dir: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::process::fchdir(dir)?)
}

/// Reads and removes the environment variable `name`.
///
/// Removal needs a single-threaded process (another thread could be reading the environment);
/// when other threads exist the variable is read but left in place.
pub fn take_env(name: &str) -> Option<OsString> {
    let value = std::env::var_os(name)?;
    if thread_count().ok() == Some(1) {
        // SAFETY: the process has one thread, so no other thread can read the environment
        // while it changes.
        unsafe { std::env::remove_var(name) };
    }
    Some(value)
}

/// The catchable signals whose disposition is not `SIG_DFL`: those ignored or handled.
///
/// One `sigaction` query per signal. The forkserver asks once, whenever its dispositions may
/// have changed, so that each child resets only these instead of making some sixty calls.
pub fn signals_not_default() -> Vec<i32> {
    (1..libc::SIGRTMAX())
        .filter(|&signal| signal != libc::SIGKILL && signal != libc::SIGSTOP)
        .filter(|&signal| {
            let mut old = MaybeUninit::<libc::sigaction>::uninit();
            // SAFETY: a null new action only reads the disposition, which the kernel writes
            // into `old`; `old` is read only after the call succeeded.
            let queried = unsafe { libc::sigaction(signal, ptr::null(), old.as_mut_ptr()) == 0 };
            // SAFETY: initialised by the successful sigaction above.
            queried && unsafe { old.assume_init() }.sa_sigaction != libc::SIG_DFL
        })
        .collect()
}

/// Resets each of `signals` to its default disposition and unblocks all signals.
///
/// Used in a forkserver child, with the server's [`signals_not_default`], so that the server's
/// own choices (it ignores SIGINT) do not leak into user code.
pub fn reset_signals(signals: &[i32]) {
    for &signal in signals {
        // SAFETY: installing SIG_DFL for a valid signal number has no memory preconditions.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: set is initialised by sigemptyset before sigprocmask reads it.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigprocmask(libc::SIG_SETMASK, set.as_ptr(), ptr::null_mut());
    }
}

/// Sets `signal` to be ignored (`SIG_IGN`).
pub fn ignore_signal(signal: i32) {
    // SAFETY: installing SIG_IGN for a valid signal number has no memory preconditions.
    unsafe { libc::signal(signal, libc::SIG_IGN) };
}

/// A cheap identity of the running executable: device, inode, size and modification time of
/// `/proc/self/exe`. Parent and child compare it in the handshake to detect different builds.
pub fn executable_fingerprint() -> io::Result<u64> {
    let meta = std::fs::metadata("/proc/self/exe")?;
    // FNV-1a over the four numbers: stable across processes, no dependency.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for word in [meta.dev(), meta.ino(), meta.size(), meta.mtime() as u64, meta.mtime_nsec() as u64]
    {
        for byte in word.to_le_bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    Ok(hash)
}

/// The functions this executable runs before `main`, from its `.init_array` entry: the runtime
/// registers the one that takes a re-executed process's role, so that `sys` itself knows
/// nothing of roles.
// linkme places the table with `#[link_section]`, which the unsafe_code lint flags; no unsafe
// operation is involved.
#[allow(unsafe_code)]
#[linkme::distributed_slice]
pub static BEFORE_MAIN: [fn()];

/// The `.init_array` entry that lets a re-executed binary take its role before `main`.
///
/// glibc calls `.init_array` functions with `(argc, argv, envp)` after the dynamic loader has
/// relocated everything and before `main`; the process is single-threaded then.
#[cfg(feature = "ctor")]
#[used]
#[unsafe(link_section = ".init_array")]
static INIT_ARRAY_ENTRY: extern "C" fn(c_int, *const *const c_char, *const *const c_char) =
    init_array_entry;

#[cfg(feature = "ctor")]
extern "C" fn init_array_entry(
    _argc: c_int,
    _argv: *const *const c_char,
    _envp: *const *const c_char,
) {
    for before_main in BEFORE_MAIN {
        before_main();
    }
}

/// Converts a string into a `CString`, mapping an interior NUL to an error.
pub fn cstring(value: impl Into<Vec<u8>>) -> io::Result<CString> {
    CString::new(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// `memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING)` then `ftruncate(len)`: anonymous
/// memory that lives as long as some process holds the descriptor or a mapping of it.
pub fn memfd(name: &str, len: usize) -> io::Result<OwnedFd> {
    use rustix::fs::MemfdFlags;
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    set_file_size(fd.as_fd(), len as u64)?;
    Ok(fd)
}

/// `ftruncate(fd, len)`—grows or shrinks the file behind `fd`; shrinking frees a memfd's pages.
pub fn set_file_size(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    if i64::try_from(len).is_err() {
        return Err(io::Error::other("file size overflow"));
    }
    super::retry_eintr(|| Ok(rustix::fs::ftruncate(fd, len)?))
}

/// Whether process `pid` still runs (it exists and is not a zombie), from `/proc/<pid>/stat`.
pub fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

/// The size of the file behind `fd` (`fstat`).
pub fn file_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(rustix::fs::fstat(fd)?.st_size as u64)
}

/// Writes all of `data` at `offset` in the file behind `fd` (`pwrite`). Into a memfd, the
/// kernel allocates the pages as it copies: no page fault per page, as writing through a fresh
/// mapping takes.
pub fn write_all_at(fd: BorrowedFd<'_>, data: &[u8], offset: u64) -> io::Result<()> {
    let mut written = 0;
    while written < data.len() {
        let at = offset + written as u64;
        match rustix::io::pwrite(fd, &data[written..], at) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Seals `fd` against writing, shrinking and growing, and against further sealing
/// (`F_ADD_SEALS`). Fails with `EBUSY` while a writable shared mapping of it exists.
pub fn seal_read_only(fd: BorrowedFd<'_>) -> io::Result<()> {
    use rustix::fs::SealFlags;
    let seals = SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL;
    Ok(rustix::fs::fcntl_add_seals(fd, seals)?)
}

/// Seals `fd` against shrinking and growing, and against further sealing: a process that
/// maps it can never fault past its end, whoever else holds it.
pub fn seal_size(fd: BorrowedFd<'_>) -> io::Result<()> {
    use rustix::fs::SealFlags;
    Ok(rustix::fs::fcntl_add_seals(fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?)
}

/// Whether `fd` is sealed so that its size can never change again.
pub fn is_size_sealed(fd: BorrowedFd<'_>) -> io::Result<bool> {
    use rustix::fs::SealFlags;
    Ok(rustix::fs::fcntl_get_seals(fd)?.contains(SealFlags::SHRINK | SealFlags::GROW))
}

/// Whether `fd` is sealed so that its contents and size can never change again.
pub fn is_sealed_read_only(fd: BorrowedFd<'_>) -> io::Result<bool> {
    use rustix::fs::SealFlags;
    let needed = SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW;
    Ok(rustix::fs::fcntl_get_seals(fd)?.contains(needed))
}

/// `socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC)`: a connected pair whose every
/// `sendmsg` is one record, delivered whole to exactly one `recvmsg` and never interleaved with
/// another sender's—what lets many processes share one end.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let family = AddressFamily::UNIX;
    Ok(rustix::net::socketpair(family, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?)
}

/// `eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)`: a counter that is readable while above zero, and
/// that wakes every poller on each write.
pub fn eventfd() -> io::Result<OwnedFd> {
    use rustix::event::EventfdFlags;
    Ok(rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?)
}

/// `timerfd_create(CLOCK_MONOTONIC)` armed to expire every `interval`: readable (an edge for
/// a reactor) at each expiry, whether read or not.
pub fn timerfd_every(interval: std::time::Duration) -> io::Result<OwnedFd> {
    use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};
    let flags = TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK;
    let timer = rustix::time::timerfd_create(TimerfdClockId::Monotonic, flags)?;
    let every = Timespec {
        tv_sec: interval.as_secs() as i64,
        tv_nsec: interval.subsec_nanos().max(1).into(),
    };
    let spec = Itimerspec { it_interval: every, it_value: every };
    rustix::time::timerfd_settime(&timer, TimerfdTimerFlags::empty(), &spec)?;
    Ok(timer)
}

/// Adds one to an [`eventfd`]'s counter (a counter at its maximum is left there: it is
/// readable already).
pub fn eventfd_add_one(fd: BorrowedFd<'_>) {
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

/// Reads an [`eventfd`]'s counter, setting it back to zero (nothing happens if it is zero).
pub fn eventfd_take(fd: BorrowedFd<'_>) {
    let mut count = [0u8; 8];
    let _ = rustix::io::read(fd, &mut count);
}

/// Fills `buf` from the kernel's cryptographically secure generator (`getrandom(2)`).
pub fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        let flags = rustix::rand::GetRandomFlags::empty();
        filled += super::retry_eintr(|| Ok(rustix::rand::getrandom(&mut *rest, flags)?))?;
    }
    Ok(())
}

/// An empty vector with room for `len` bytes. A large one (≥ 4 MiB) is advised to use
/// transparent huge pages (`MADV_HUGEPAGE`), so that filling it costs one page fault per 2 MiB
/// instead of one per 4 KiB: for a 100 MB message, the faults were most of the time spent.
pub fn large_buffer(len: usize) -> Vec<u8> {
    let buf = Vec::<u8>::with_capacity(len);
    advise_huge_pages(buf.as_ptr() as usize, len);
    buf
}

/// `madvise(MADV_HUGEPAGE)` on the 2 MiB-aligned part of the `len` bytes at `addr`, when
/// there are at least 4 MiB: backed by huge pages where the kernel's transparent huge pages
/// allow it, filling them takes one fault per 2 MiB instead of per 4 KiB.
fn advise_huge_pages(addr: usize, len: usize) {
    const HUGE: usize = 2 << 20;
    if len < 2 * HUGE {
        return;
    }
    let start = addr.next_multiple_of(HUGE);
    let end = (addr + len) / HUGE * HUGE;
    if end > start {
        let advice = rustix::mm::Advice::LinuxHugepage;
        // SAFETY: callers pass memory of their own allocation; MADV_HUGEPAGE only changes how
        // the kernel backs those pages, never their contents. Failure (no THP support) is
        // harmless: the advice is dropped.
        let _ = unsafe { rustix::mm::madvise(start as *mut std::ffi::c_void, end - start, advice) };
    }
}

/// The CPUs the calling thread may run on (`sched_getaffinity(0)`), in ascending order.
pub fn cpu_affinity() -> io::Result<Vec<usize>> {
    let set = rustix::thread::sched_getaffinity(None)?;
    Ok((0..rustix::thread::CpuSet::MAX_CPU).filter(|&cpu| set.is_set(cpu)).collect())
}

/// Lets the calling thread (and the processes it starts from now on, which inherit the mask)
/// run only on `cpus` (`sched_setaffinity(0)`). The benchmarks use it to measure a round trip
/// between processes that share one CPU.
pub fn set_cpu_affinity(cpus: &[usize]) -> io::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    for &cpu in cpus {
        if cpu >= rustix::thread::CpuSet::MAX_CPU {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        set.set(cpu);
    }
    rustix::thread::sched_setaffinity(None, &set)?;
    SEVERAL_CPUS.store(0, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// What [`several_cpus`] found: 0 not looked yet, 1 one CPU, 2 several.
static SEVERAL_CPUS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether the calling process may run on more than one CPU: looked up once, and again after
/// each [`set_cpu_affinity`] (a mask changed by other means is not seen).
pub fn several_cpus() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    match SEVERAL_CPUS.load(Relaxed) {
        0 => {
            let several = cpu_affinity().is_ok_and(|cpus| cpus.len() > 1);
            SEVERAL_CPUS.store(if several { 2 } else { 1 }, Relaxed);
            several
        }
        found => found == 2,
    }
}

/// Below this many bytes, memory is left to be faulted in page by page as it is filled.
const PREFAULT_MIN: usize = 1 << 20;

/// `madvise(MADV_POPULATE_WRITE)` over the whole pages inside `spare`—maps them writable in one
/// call, just before the caller fills them.
///
/// Filling fresh memory otherwise takes one page fault per 4 KiB. On the virtual machines we
/// measure on a fault costs about 1.8 µs, and for 80 MB, populating first and then copying took
/// 31 ms where copying into unmapped pages took 42 ms. Nothing under 1 MiB is touched, and a
/// kernel without the advice (before 5.14) simply leaves the faults to happen.
pub fn prefault<T>(spare: &mut [MaybeUninit<T>]) {
    const PAGE: usize = 4096;
    let len = size_of_val(spare);
    if len < PREFAULT_MIN {
        return;
    }
    advise_huge_pages(spare.as_ptr() as usize, len);
    let start = (spare.as_ptr() as usize).next_multiple_of(PAGE);
    let end = (spare.as_ptr() as usize + len) / PAGE * PAGE;
    if end > start {
        let advice = rustix::mm::Advice::LinuxPopulateWrite;
        // SAFETY: [start, end) lies inside `spare`, which we borrow mutably, so no one else
        // uses it; MADV_POPULATE_WRITE faults pages in as a write would, changing no byte.
        let _ = unsafe { rustix::mm::madvise(start as *mut std::ffi::c_void, end - start, advice) };
    }
}

/// A vector of the `P`s that `bytes` holds as they lie in memory (a whole number of them),
/// copied into prefaulted memory.
pub fn vec_from_bytes<P: bytemuck::Pod>(bytes: &[u8]) -> Vec<P> {
    let count = bytes.len() / size_of::<P>();
    assert_eq!(count * size_of::<P>(), bytes.len(), "a whole number of elements");
    let copied = vec_filled::<P, std::convert::Infallible>(count, |out| {
        copy_into(out, bytes);
        Ok(())
    });
    match copied {
        Ok(vec) => vec,
    }
}

/// Copies `from` into `out`, which must be as long (`<[MaybeUninit<u8>]>::write_copy_of_slice`,
/// which this crate's minimum Rust does not have).
pub fn copy_into(out: &mut [MaybeUninit<u8>], from: &[u8]) {
    assert_eq!(out.len(), from.len(), "copy_into: lengths differ");
    // SAFETY: both are `from.len()` bytes long (checked); `out` is borrowed mutably, so it
    // cannot overlap `from`; writing bytes into `MaybeUninit<u8>`s is always allowed.
    unsafe { ptr::copy_nonoverlapping(from.as_ptr(), out.as_mut_ptr().cast::<u8>(), from.len()) };
}

/// A vector of `count` `P`s whose bytes `fill` writes, every one of them, into prefaulted
/// memory; `fill`'s error, if it fails (nothing is kept).
pub fn vec_filled<P: bytemuck::Pod, E>(
    count: usize,
    fill: impl FnOnce(&mut [MaybeUninit<u8>]) -> Result<(), E>,
) -> Result<Vec<P>, E> {
    let mut vec = Vec::<P>::with_capacity(count);
    prefault(vec.spare_capacity_mut());
    let spare = vec.spare_capacity_mut();
    // SAFETY: the spare capacity holds at least `count` elements, `count * size_of::<P>()`
    // bytes, viewed as the uninitialised bytes they are.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(
            spare.as_mut_ptr().cast::<MaybeUninit<u8>>(),
            count * size_of::<P>(),
        )
    };
    fill(bytes)?;
    // SAFETY: `fill` succeeded, which means it wrote every byte of the first `count` elements;
    // every bit pattern is a valid `P` (`Pod`).
    unsafe { vec.set_len(count) };
    Ok(vec)
}

/// Whether `error` is `EMSGSIZE`: a record larger than the socket can ever take whole.
pub fn is_message_too_long(error: &io::Error) -> bool {
    error.raw_os_error() == Some(libc::EMSGSIZE)
}

/// `FUTEX_WAIT` on a word that other processes may share (not the `_PRIVATE` variant): sleeps
/// while `*word == expected`, until woken or `deadline` passes.
///
/// Returns `false` only when the deadline passed; `true` when woken, interrupted, or the word
/// no longer held `expected`—the caller re-reads the word either way.
pub fn futex_wait(word: &AtomicU32, expected: u32, deadline: Option<Instant>) -> io::Result<bool> {
    let timeout = match deadline {
        None => None,
        Some(deadline) => {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            Some(rustix::thread::futex::Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: left.subsec_nanos().into(),
            })
        }
    };
    // Not FUTEX_PRIVATE_FLAG: the word may be in memory shared with other processes.
    let flags = rustix::thread::futex::Flags::empty();
    match rustix::thread::futex::wait(word, flags, expected, timeout.as_ref()) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::TIMEDOUT) => Ok(false),
        Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// `FUTEX_WAKE`: wakes up to `count` processes or threads sleeping in [`futex_wait`] on `word`.
pub fn futex_wake(word: &AtomicU32, count: u32) {
    let count = count.min(i32::MAX as u32);
    let _ = rustix::thread::futex::wake(word, rustix::thread::futex::Flags::empty(), count);
}

/// A shared mapping of `len` bytes of a memory file, unmapped on drop.
///
/// A writable mapping may be written by other processes at any time, so it never hands out a
/// reference into the memory: bytes are copied in and out ([`Mapping::read_at`],
/// [`Mapping::write_at`]). Only a mapping of a sealed file ([`Mapping::sealed`]), whose bytes
/// can never change again, lends a slice.
#[derive(Debug)]
pub struct Mapping {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    /// The file is sealed read-only: the bytes never change, so slices may be lent.
    sealed: bool,
    /// Mapped `PROT_WRITE`: bytes may be written and atomic words handed out.
    writable: bool,
}

// SAFETY: the mapping is plain memory owned by this value; every access either copies through
// raw pointers (writable mappings) or reads memory no process can change (sealed ones).
unsafe impl Send for Mapping {}
// SAFETY: as above; `write_at` copies through a raw pointer with no reference alive into the
// memory, and concurrent copies race only on the bytes' values, like writes from another
// process.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// `mmap(len, PROT_READ | PROT_WRITE, MAP_SHARED, fd)`.
    pub fn writable(fd: BorrowedFd<'_>, len: usize) -> io::Result<Mapping> {
        Self::map(fd, len, rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE, false)
    }

    /// `mmap(len, PROT_READ, MAP_SHARED, fd)` of a file that is not sealed: another process
    /// may still be writing it, so its bytes are lent only by [`Mapping::bytes_unchecked`],
    /// whose caller knows which of them no longer change.
    pub fn read_only(fd: BorrowedFd<'_>, len: usize) -> io::Result<Mapping> {
        Self::map(fd, len, rustix::mm::ProtFlags::READ, false)
    }

    /// `mmap(len, PROT_READ, MAP_SHARED, fd)` of a file that must be sealed read-only (checked
    /// here) and at least `len` bytes long.
    pub fn sealed(fd: BorrowedFd<'_>, len: usize) -> io::Result<Mapping> {
        if !is_sealed_read_only(fd)? {
            return Err(io::Error::other("the memory is not sealed read-only"));
        }
        Self::map(fd, len, rustix::mm::ProtFlags::READ, true)
    }

    /// `mmap(len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd)` of a file that may
    /// be shorter than `len` and grow later ([`set_file_size`]): address space reserved once,
    /// so that the file can grow without any process remapping it.
    ///
    /// Touching a page beyond the file's current end raises SIGBUS, so its user must keep every
    /// access below a size it knows the file has: the queue's overflow log grows the file
    /// before it publishes the larger size, and publishes a smaller size before it shrinks the
    /// file, all under its lock.
    pub fn reserved(fd: BorrowedFd<'_>, len: usize) -> io::Result<Mapping> {
        use rustix::mm::{MapFlags, ProtFlags};
        let prot = ProtFlags::READ | ProtFlags::WRITE;
        // Pages past the file's end are not backed; see above for why none is touched.
        let ptr = mmap_shared(fd, len, prot, MapFlags::SHARED | MapFlags::NORESERVE)?;
        Ok(Mapping { ptr, len, sealed: false, writable: true })
    }

    fn map(
        fd: BorrowedFd<'_>,
        len: usize,
        prot: rustix::mm::ProtFlags,
        sealed: bool,
    ) -> io::Result<Mapping> {
        let size = file_size(fd)?;
        if (size as u128) < len as u128 {
            return Err(io::Error::other(format!("memory of {size} bytes, expected {len}")));
        }
        let writable = prot.contains(rustix::mm::ProtFlags::WRITE);
        if len == 0 {
            return Ok(Mapping { ptr: std::ptr::NonNull::dangling(), len, sealed, writable });
        }
        // The file is at least `len` bytes long (checked above), so every mapped page is
        // backed.
        let ptr = mmap_shared(fd, len, prot, rustix::mm::MapFlags::SHARED)?;
        Ok(Mapping { ptr, len, sealed, writable })
    }

    /// Mapped bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `out.len()` bytes from `offset` into `out`.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> io::Result<()> {
        self.check(offset, out.len())?;
        // SAFETY: the range is inside the mapping (checked above), and `out` is a distinct
        // Rust buffer, so the regions do not overlap.
        unsafe {
            ptr::copy_nonoverlapping(self.ptr.as_ptr().add(offset), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    /// Copies `data` into the mapping at `offset`; the mapping must be writable.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::other("the memory is mapped read-only"));
        }
        self.check(offset, data.len())?;
        // SAFETY: the range is inside a writable mapping (checked above); no reference into
        // the mapping exists (writable mappings never lend one), and `data` is a distinct Rust
        // buffer.
        unsafe {
            ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        };
        Ok(())
    }

    /// The bytes of a sealed mapping; `None` for any other, whose bytes may change under
    /// any reference.
    pub fn as_slice(&self) -> Option<&[u8]> {
        // SAFETY: a sealed mapping is read-only and its file can never be written again
        // (F_SEAL_WRITE, verified when mapped), so the bytes are immutable for the life of the
        // mapping, which `&self` outlives.
        self.sealed.then(|| unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) })
    }

    /// Every mapped byte, sealed or not.
    ///
    /// # Safety
    ///
    /// The caller reads through the slice only bytes that no process changes while it is
    /// borrowed (those another process wrote and published before, and never writes again).
    pub unsafe fn bytes_unchecked(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: ptr/len describe a live mapping that `&self` outlives; what is read through
        // it does not change (the caller's promise), so the shared reference is sound.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The mapping as 32-bit atomic words, for counters that several processes update: an
    /// atomic access is defined however other processes touch the same word. Empty for a read-only
    /// mapping.
    pub fn atomic_words(&self) -> &[AtomicU32] {
        if !self.writable {
            return &[];
        }
        // SAFETY: the mapping is page-aligned and writable, and AtomicU32 has the size and
        // alignment of u32; every access through the slice is atomic, which is sound however
        // other processes (or `write_at`) change the memory. The slice borrows `self`, so it
        // ends before the unmapping.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU32>(), self.len / 4) }
    }

    /// The 32-bit atomic word at byte `offset` (a multiple of 4 inside the mapping); `None` for
    /// a read-only mapping or an offset out of bounds or misaligned.
    #[inline]
    pub fn atomic_u32(&self, offset: usize) -> Option<&AtomicU32> {
        let fits = offset.checked_add(4).is_some_and(|end| end <= self.len);
        if !self.writable || !fits || offset % 4 != 0 {
            return None;
        }
        // SAFETY: in bounds and 4-aligned (the mapping is page-aligned), writable, and every
        // access through the reference is atomic, which is sound however other processes change
        // the memory; the reference borrows `self`, so it ends before the unmapping.
        Some(unsafe { &*self.ptr.as_ptr().add(offset).cast::<AtomicU32>() })
    }

    /// The 64-bit atomic word at byte `offset` (a multiple of 8 inside the mapping); `None` for
    /// a read-only mapping or an offset out of bounds or misaligned.
    pub fn atomic_u64(&self, offset: usize) -> Option<&std::sync::atomic::AtomicU64> {
        let fits = offset.checked_add(8).is_some_and(|end| end <= self.len);
        if !self.writable || !fits || offset % 8 != 0 {
            return None;
        }
        // SAFETY: in bounds and 8-aligned (the mapping is page-aligned), writable, and every
        // access through the reference is atomic, which is sound however other processes change
        // the memory; the reference borrows `self`, so it ends before the unmapping.
        Some(unsafe { &*self.ptr.as_ptr().add(offset).cast::<std::sync::atomic::AtomicU64>() })
    }

    fn check(&self, offset: usize, len: usize) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(io::Error::other(format!(
                "range {offset}+{len} outside a mapping of {} bytes",
                self.len
            ))),
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: ptr/len describe a mapping made by `map` and never unmapped before; no
            // reference into it outlives `self` (slices borrow `self`).
            let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

/// A fresh shared mapping of the first `len` bytes of `fd`, at an address the kernel picks.
fn mmap_shared(
    fd: BorrowedFd<'_>,
    len: usize,
    prot: rustix::mm::ProtFlags,
    flags: rustix::mm::MapFlags,
) -> io::Result<std::ptr::NonNull<u8>> {
    // SAFETY: with a NULL address the kernel picks a range no existing mapping uses, so the
    // new one cannot overlap memory Rust owns; the caller keeps the pointer only as a
    // `Mapping`, which unmaps it on drop.
    let ptr = unsafe { rustix::mm::mmap(ptr::null_mut(), len, prot, flags, fd, 0) }?;
    std::ptr::NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))
}

/// Registers `fd` with the current tokio runtime's reactor, for `interest` (the `tokio`
/// feature). Panics outside a runtime, as tokio does; callers check first.
#[cfg(feature = "tokio")]
pub fn register_with_reactor(
    fd: OwnedFd,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is open until it is dropped, which happens only when the `AsyncFd`
    // that owns it is (or gives it back), and its `as_raw_fd` never changes.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into())
}

/// How a robust lock was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// From a holder that released it.
    Released,
    /// From a holder that died holding it (`EOWNERDEAD`): the lock is ours and consistent again,
    /// but what it protects may be half-changed.
    OwnerDied,
}

/// The bytes a [`RobustMutex`] takes in shared memory.
pub const ROBUST_MUTEX_BYTES: usize = size_of::<libc::pthread_mutex_t>();

/// A process-shared, robust pthread mutex in a shared mapping: glibc keeps each thread's held
/// robust mutexes on the kernel's robust-futex list, and the kernel marks every one a dying
/// thread held (`FUTEX_OWNER_DIED`), SIGKILL included, so that the next locker gets
/// `EOWNERDEAD` instead of waiting forever.
///
/// Borrowed from a [`Mapping`], whose memory it lives in, at an offset aligned for it.
#[derive(Debug, Clone, Copy)]
pub struct RobustMutex<'a> {
    ptr: *mut libc::pthread_mutex_t,
    _map: std::marker::PhantomData<&'a Mapping>,
}

// SAFETY: the mutex is made for use by many threads and processes at once; the pointer is only
// handed to pthread functions, which synchronize through the kernel.
unsafe impl Send for RobustMutex<'_> {}
// SAFETY: as above.
unsafe impl Sync for RobustMutex<'_> {}

/// `PTHREAD_PROCESS_SHARED` and `PTHREAD_MUTEX_ROBUST` (glibc's values; the libc crate does
/// not name them on Linux).
const PTHREAD_PROCESS_SHARED: c_int = 1;
const PTHREAD_MUTEX_ROBUST: c_int = 1;

impl<'a> RobustMutex<'a> {
    /// The mutex at `offset` in `map`; `None` if it would not fit or is misaligned.
    #[inline]
    pub fn at(map: &'a Mapping, offset: usize) -> Option<RobustMutex<'a>> {
        let fits = offset.checked_add(ROBUST_MUTEX_BYTES).is_some_and(|end| end <= map.len());
        let aligned = offset % std::mem::align_of::<libc::pthread_mutex_t>() == 0;
        (fits && aligned && !map.sealed).then(|| RobustMutex {
            // SAFETY: in bounds (checked above) of a live writable mapping.
            ptr: unsafe { map.ptr.as_ptr().add(offset) }.cast(),
            _map: std::marker::PhantomData,
        })
    }

    /// Initialises the mutex: process-shared, robust, and error-checking (`recursive: false`:
    /// an unlock by a thread that does not hold it fails) or recursive. Done once, by the
    /// process that made the memory, before any other process can reach it.
    pub fn init(&self, recursive: bool) -> io::Result<()> {
        let kind =
            if recursive { libc::PTHREAD_MUTEX_RECURSIVE } else { libc::PTHREAD_MUTEX_ERRORCHECK };
        let mut attr = MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
        // SAFETY: the attribute object is initialised before use and destroyed after; the
        // mutex memory is ours, not yet shared, and large and aligned enough (`at`).
        unsafe {
            errno_value(libc::pthread_mutexattr_init(attr.as_mut_ptr()))?;
            let result = (|| {
                errno_value(libc::pthread_mutexattr_settype(attr.as_mut_ptr(), kind))?;
                errno_value(libc::pthread_mutexattr_setpshared(
                    attr.as_mut_ptr(),
                    PTHREAD_PROCESS_SHARED,
                ))?;
                errno_value(libc::pthread_mutexattr_setrobust(
                    attr.as_mut_ptr(),
                    PTHREAD_MUTEX_ROBUST,
                ))?;
                errno_value(libc::pthread_mutex_init(self.ptr, attr.as_ptr()))
            })();
            libc::pthread_mutexattr_destroy(attr.as_mut_ptr());
            result
        }
    }

    /// Locks, waiting until `deadline` (`Ok(None)` when it passes first); the guard unlocks
    /// when dropped, and lends the bytes of `map` the mutex guards.
    #[inline]
    pub fn lock(
        self,
        deadline: Option<Instant>,
    ) -> io::Result<Option<(Acquired, RobustGuard<'a>)>> {
        let acquired = self.acquire(deadline)?;
        Ok(acquired.map(|how| (how, RobustGuard { mutex: self })))
    }

    /// Whether this is the mutex at `other`'s address.
    pub fn is(&self, other: &RobustMutex<'_>) -> bool {
        std::ptr::eq(self.ptr, other.ptr)
    }

    #[inline]
    fn acquire(&self, deadline: Option<Instant>) -> io::Result<Option<Acquired>> {
        let ret = match deadline {
            // SAFETY: the mutex was initialised by its maker (`init`) and lives in the mapping.
            None => unsafe { libc::pthread_mutex_lock(self.ptr) },
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    // SAFETY: as above.
                    unsafe { libc::pthread_mutex_trylock(self.ptr) }
                } else {
                    // pthread_mutex_timedlock takes CLOCK_REALTIME.
                    let at = std::time::SystemTime::now() + left;
                    let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                    let abs = libc::timespec {
                        tv_sec: since.as_secs() as libc::time_t,
                        tv_nsec: since.subsec_nanos() as libc::c_long,
                    };
                    // SAFETY: as above; `abs` lives across the call.
                    unsafe { libc::pthread_mutex_timedlock(self.ptr, &abs) }
                }
            }
        };
        match ret {
            0 => Ok(Some(Acquired::Released)),
            libc::EOWNERDEAD => {
                // SAFETY: we hold the mutex (EOWNERDEAD hands it over); marking it consistent
                // keeps it usable after we unlock.
                errno_value(unsafe { libc::pthread_mutex_consistent(self.ptr) })?;
                Ok(Some(Acquired::OwnerDied))
            }
            libc::ETIMEDOUT | libc::EBUSY => Ok(None),
            error => Err(io::Error::from_raw_os_error(error)),
        }
    }

    /// Unlocks; `EPERM` if the calling thread does not hold it.
    #[inline]
    fn unlock(&self) -> io::Result<()> {
        // SAFETY: the mutex was initialised by its maker and lives in the mapping.
        errno_value(unsafe { libc::pthread_mutex_unlock(self.ptr) })
    }
}

/// A [`RobustMutex`] this thread holds, made only by [`RobustMutex::lock`]; dropping it unlocks.
/// Holding it is what makes the bytes the mutex guards this thread's to change.
#[derive(Debug)]
pub struct RobustGuard<'a> {
    mutex: RobustMutex<'a>,
}

impl<'a> RobustGuard<'a> {
    /// The mutex held.
    pub fn mutex(&self) -> RobustMutex<'a> {
        self.mutex
    }

    /// The `len` bytes at `offset` of `map`, which must be the mapping the mutex lives in and
    /// bytes every process changes only while holding it (outside the mutex itself); `None`
    /// for another mapping, a range out of bounds, or one over the mutex.
    pub fn bytes_mut<'g>(
        &'g mut self,
        map: &'g Mapping,
        offset: usize,
        len: usize,
    ) -> Option<&'g mut [u8]> {
        let at = self.guarded(map, offset, len)?;
        // SAFETY: in bounds of a live writable mapping, outside the mutex (`guarded`); the
        // mutex is held by this thread for as long as the guard lives, and the slice borrows
        // the guard mutably, so no other reference to these bytes exists in this process, and
        // other processes change them only under the same mutex.
        Some(unsafe { std::slice::from_raw_parts_mut(at, len) })
    }

    /// As [`bytes_mut`](Self::bytes_mut), to read.
    pub fn bytes<'g>(&'g self, map: &'g Mapping, offset: usize, len: usize) -> Option<&'g [u8]> {
        let at = self.guarded(map, offset, len)?;
        // SAFETY: as in `bytes_mut`; the slice borrows the guard, so no mutable one is alive.
        Some(unsafe { std::slice::from_raw_parts(at, len) })
    }

    /// Where the guarded bytes `offset..offset + len` of `map` start, if `map` holds the mutex
    /// and the range is inside it, writable and clear of the mutex.
    fn guarded(&self, map: &Mapping, offset: usize, len: usize) -> Option<*mut u8> {
        let mutex_at = (self.mutex.ptr as usize).checked_sub(map.ptr.as_ptr() as usize)?;
        let mutex_end = mutex_at + ROBUST_MUTEX_BYTES;
        let end = offset.checked_add(len)?;
        let apart = end <= mutex_at || offset >= mutex_end;
        if mutex_end > map.len || map.sealed || end > map.len || !apart {
            return None;
        }
        // SAFETY: `offset` is inside the mapping (checked above).
        Some(unsafe { map.ptr.as_ptr().add(offset) })
    }
}

impl Drop for RobustGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        let _ = self.mutex.unlock();
    }
}
