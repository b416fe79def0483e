//! The server role: a process started by exec of the current binary in the `forkserver` role,
//! which runs the fork server loop of `multiproc_core::process::server`.
//!
//! It ignores SIGINT (a Ctrl-C in the terminal is for the user's program; the server ends when
//! that program goes away and its control socket reaches end-of-file), says hello, and serves;
//! every child it forks runs the child runtime, which reads its task from its channel.

use std::os::fd::OwnedFd;

use multiproc_core::process::server::protocol::{Reply, VERSION};
use multiproc_core::process::server::serve;
use multiproc_core::runtime::child;
use multiproc_core::runtime::role::Role;
use multiproc_core::sys;
use multiproc_core::transport::channel::Channel;
use multiproc_core::transport::wire;

// linkme places the entry with `#[link_section]`, which trips the unsafe_code lint; no unsafe
// operation is involved.
#[allow(unsafe_code)]
#[linkme::distributed_slice(multiproc_core::runtime::role::ROLES)]
static SERVER_ROLE: Role = Role { name: "forkserver", main: run };

fn run(control: OwnedFd) -> ! {
    sys::ignore_signal(libc::SIGINT);
    child::warm_up();
    let control = Channel::from_fd(control);
    let hello = Reply::Hello { version: VERSION, fingerprint: child::fingerprint() };
    if wire::send(&control, &hello, &[], &[], &[], None, None).is_err() {
        sys::exit_immediately(0);
    }
    serve::serve(control, &|channel| child::serve(channel), true)
}
