//! Scenarios of a child that fails: panics, exits, dies before the handshake, returns bytes
//! that do not decode; and of bad input on our side.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use libtest_mimic::Failed;
use multiproc::{ChildFailure, Context, ErrorKind, ExitStatus};
use multiproc_core::{ChildHandle, StartMethod, StartRequest};
use serde::{Deserialize, Deserializer, Serialize};

use crate::Scenario;
use crate::common::{add, ensure, explode, join, quit};

pub const SCENARIOS: &[Scenario] = &[
    ("panic_is_reported_with_location_and_backtrace", panic_is_reported),
    ("exit_code_is_reported", exit_code_is_reported),
    ("exit_zero_without_result_is_an_error", exit_zero_without_result),
    ("death_before_handshake_is_a_start_failure", death_before_handshake),
    ("undecodable_result_is_a_decode_error", undecodable_result),
    ("unknown_start_method_lists_the_valid_ones", unknown_start_method),
    ("fork_refused_when_multithreaded", fork_refused_when_multithreaded),
];

fn panic_is_reported(ctx: &Context) -> Result<(), Failed> {
    let err = join(ctx.process(explode, "kaboom".to_string()).start()?)?.expect_err("panicked");
    ensure(err.kind() == ErrorKind::Panicked, || format!("{err:?}"))?;
    let panic = err.panic().ok_or("no panic details")?;
    ensure(panic.message == "kaboom", || format!("message {:?}", panic.message))?;
    let location = panic.location.as_deref().unwrap_or("");
    ensure(location.contains("common.rs"), || format!("location {location}"))?;
    ensure(panic.backtrace.contains("explode"), || format!("backtrace {}", panic.backtrace))?;
    ensure(err.exit_status() == Some(ExitStatus::Exited(1)), || format!("{err:?}"))?;
    ensure(err.is_child_failure(), || "not a child failure".into())?;
    ensure(err.to_string().contains("kaboom"), || err.to_string())
}

fn exit_code_is_reported(ctx: &Context) -> Result<(), Failed> {
    let mut p = ctx.process(quit, 7).start()?;
    let err = match p.join_timeout(crate::common::DEADLINE) {
        Err(err) => err,
        Ok(other) => return Err(format!("expected an error, got {:?}", other.is_some()).into()),
    };
    ensure(err.kind() == ErrorKind::ChildExited, || format!("{err:?}"))?;
    ensure(err.child_failure() == Some(&ChildFailure::Exited(ExitStatus::Exited(7))), || {
        format!("{err:?}")
    })?;
    ensure(p.exitcode() == Some(7), || format!("exitcode {:?}", p.exitcode()))
}

fn exit_zero_without_result(ctx: &Context) -> Result<(), Failed> {
    let err = join(ctx.process(quit, 0).start()?)?.expect_err("no result");
    ensure(err.kind() == ErrorKind::ChildExited, || format!("{err:?}"))?;
    ensure(err.exit_status() == Some(ExitStatus::Exited(0)), || format!("{err:?}"))
}

/// A start method that hands the child a channel it cannot use (`/dev/null` instead of a
/// socket), so the child dies before it can say hello, under whichever method it wraps.
#[derive(Debug)]
struct BrokenChannel(Arc<dyn StartMethod>);

impl StartMethod for BrokenChannel {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn moves_arguments(&self) -> bool {
        self.0.moves_arguments()
    }
    fn start(&self, request: StartRequest<'_>) -> multiproc::Result<Box<dyn ChildHandle>> {
        let null = OwnedFd::from(std::fs::File::open("/dev/null").expect("/dev/null"));
        self.0.start(StartRequest { channel: null, ..request })
    }
}

fn death_before_handshake(ctx: &Context) -> Result<(), Failed> {
    let broken = Context::with_method(Arc::new(BrokenChannel(Arc::clone(ctx.method()))));
    let err = join(broken.process(add, (1, 1)).start()?)?.expect_err("no handshake");
    ensure(err.kind() == ErrorKind::StartFailed, || format!("{err:?}"))?;
    ensure(err.to_string().contains("before the handshake"), || err.to_string())?;
    ensure(err.exit_status().is_some_and(|s| !s.success()), || format!("{err:?}"))
}

/// Serializes any byte, but deserializes only zero: stands for a parent and child that
/// disagree about a type's encoding.
#[derive(Debug, Serialize)]
pub struct Picky(pub u8);

impl<'de> Deserialize<'de> for Picky {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match u8::deserialize(deserializer)? {
            0 => Ok(Picky(0)),
            other => Err(serde::de::Error::custom(format!("picky refuses {other}"))),
        }
    }
}

#[multiproc::task]
pub fn picky(value: u8) -> Picky {
    Picky(value)
}

fn undecodable_result(ctx: &Context) -> Result<(), Failed> {
    let err = join(ctx.process(picky, 9).start()?)?.expect_err("undecodable");
    ensure(err.kind() == ErrorKind::Decode, || format!("{err:?}"))?;
    ensure(err.to_string().contains("picky refuses 9"), || err.to_string())?;
    let ok = join(ctx.process(picky, 0).start()?)??;
    ensure(ok.0 == 0, || "picky 0".into())
}

fn unknown_start_method(_ctx: &Context) -> Result<(), Failed> {
    let err = Context::new("vfork").expect_err("no such method");
    ensure(err.kind() == ErrorKind::UnknownStartMethod, || format!("{err:?}"))?;
    for name in multiproc::all_start_methods() {
        ensure(err.to_string().contains(name), || format!("{err} does not list {name}"))?;
    }
    Ok(())
}

fn fork_refused_when_multithreaded(ctx: &Context) -> Result<(), Failed> {
    let (release, wait) = std::sync::mpsc::channel::<()>();
    let helper = std::thread::spawn(move || wait.recv());
    let started = ctx.process(add, (1, 2)).start();
    drop(release);
    let _ = helper.join();
    match (ctx.start_method(), started) {
        ("fork", Ok(_)) => Err("fork started a child from a multi-threaded process".into()),
        ("fork", Err(err)) => {
            ensure(err.kind() == ErrorKind::ForkRefused, || format!("{err:?}"))?;
            ensure(err.to_string().contains("2 threads"), || err.to_string())?;
            ensure(err.to_string().contains("forkserver"), || err.to_string())
        }
        (_, started) => ensure(join(started?)?? == 3, || "1 + 2".into()),
    }
}
