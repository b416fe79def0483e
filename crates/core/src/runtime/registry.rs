//! The task registry: a link-time table of every `#[multiproc::task]` in the executable, looked
//! up by name.
//!
//! Entries are placed by `linkme` into one linker section, so the table exists before `main`
//! (a spawned child looks tasks up from an `.init_array` constructor) and needs no
//! registration code to run. A task travels between processes by name only; no integer from
//! the wire is ever turned into a function pointer.
//!
//! Every task is stored as `fn(&S, A) -> R`, where `S` is the state it reads: `()` for an
//! ordinary task, a pool initializer's value for a task declared `fn f(state: &S, ..)`. The
//! runners take the state type-erased (`&dyn Any`) and check its type before the call, so a
//! mismatch is an error, never a reinterpretation.

use std::any::Any;
use std::collections::HashMap;
use std::sync::OnceLock;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, ErrorKind};
use crate::runtime::panic::catch_panic;
use crate::transport::codec::{self, CodecError};
use crate::transport::wire::{BATCH_ITEMS, BATCH_PLAIN, ItemResult};

/// State built by an initializer (a pool worker's, the forkserver's preload), type-erased.
pub type State = Box<dyn Any + Send>;

/// Runs a task once: `(state, encoded arguments)` → encoded return value.
pub type RunFn = fn(&dyn Any, &[u8]) -> Result<Vec<u8>, CallError>;

/// Runs a task over a batch: `(state, encoded Vec of arguments, output)`.
pub type RunBatchFn = fn(&dyn Any, &[u8], &mut Vec<u8>) -> Result<(), CallError>;

/// One registered task: its stable name and type-erased runners over encoded bytes.
#[derive(Debug)]
pub struct TaskEntry {
    /// `module::path::function`.
    pub name: &'static str,
    /// Decodes the arguments, runs the task once with `state`, and encodes its return value.
    pub run: RunFn,
    /// Decodes a `Vec` of arguments, runs the task on each (a panic fails only its item) and
    /// appends the encoded `Vec<ItemResult<R>>` to the output.
    pub run_batch: RunBatchFn,
    /// Decodes the arguments, runs the (stateless) task and keeps its return value as state.
    pub make_state: fn(codec::Input<'_>) -> Result<State, CallError>,
}

/// Why a type-erased call could not complete (a panic is not one of these: it unwinds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// The argument bytes did not decode as the task's argument type.
    Args(CodecError),
    /// The return value could not be encoded.
    Result(CodecError),
    /// The state at hand is not the type the task reads (a bug in the caller's wiring).
    State(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Args(e) => write!(f, "arguments did not decode: {e}"),
            CallError::Result(e) => write!(f, "return value could not be encoded: {e}"),
            CallError::State(message) => f.write_str(message),
        }
    }
}

/// The state a task of state type `S` reads: `S` itself, or `()` for a stateless task, which
/// runs anywhere.
fn state_as<S: 'static>(state: &dyn Any) -> Result<&S, CallError> {
    state.downcast_ref::<S>().or_else(|| (&() as &dyn Any).downcast_ref::<S>()).ok_or_else(|| {
        CallError::State(format!(
            "the task reads state of type {}, which this process does not hold",
            std::any::type_name::<S>()
        ))
    })
}

/// The table itself, filled at link time.
// linkme's `#[link_section]` trips the unsafe_code lint; no unsafe operation is involved.
#[allow(unsafe_code)]
#[linkme::distributed_slice]
pub static TASKS: [TaskEntry];

/// Decodes `args`, calls `f`, and encodes what it returns: the body of every [`TaskEntry::run`].
pub fn run_encoded<S: 'static, A: DeserializeOwned, R: Serialize>(
    f: fn(&S, A) -> R,
    state: &dyn Any,
    args: &[u8],
) -> Result<Vec<u8>, CallError> {
    let state = state_as::<S>(state)?;
    let args = codec::decode::<A>(args).map_err(CallError::Args)?;
    encode_result(&f(state, args))
}

/// The body of every [`TaskEntry::run_batch`]: one panic, or one value that cannot be encoded,
/// fails its own item and no other.
///
/// The output is tagged (see [`BATCH_PLAIN`]): when every item returned and the values encode,
/// the `Vec<R>` of them, which the parent decodes in one call (one copy for numbers);
/// otherwise a `Vec<ItemResult<R>>`, written item by item (bincode writes a sequence as its
/// length followed by the elements).
pub fn run_batch<S: 'static, A: DeserializeOwned, R: Serialize>(
    f: fn(&S, A) -> R,
    state: &dyn Any,
    args: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CallError> {
    let state = state_as::<S>(state)?;
    let items = codec::decode::<Vec<A>>(args).map_err(CallError::Args)?;
    let count = items.len();
    let mut items = items.into_iter();
    let mut values = Vec::with_capacity(count);
    let mut panicked = None;
    for item in items.by_ref() {
        match catch_panic(|| f(state, item)) {
            Ok(value) => values.push(value),
            Err(panic) => {
                panicked = Some(panic);
                break;
            }
        }
    }
    let start = out.len();
    if panicked.is_none() {
        out.push(BATCH_PLAIN);
        if codec::encode_into(&values, out).is_ok() {
            return Ok(());
        }
        // A value that does not encode fails its own item: told item by item below.
        out.truncate(start);
    }
    out.push(BATCH_ITEMS);
    codec::encode_into(&(count as u64), out).map_err(CallError::Result)?;
    let returned = values.into_iter().map(Ok);
    let rest =
        panicked.map(Err).into_iter().chain(items.map(|item| catch_panic(|| f(state, item))));
    for outcome in returned.chain(rest) {
        let mark = out.len();
        let written = match outcome {
            Ok(value) => codec::encode_into(&ItemResult::Returned(&value), out),
            Err(panic) => codec::encode_into(&ItemResult::<&R>::Panicked(panic), out),
        };
        if let Err(e) = written {
            out.truncate(mark);
            codec::encode_into(&ItemResult::<&R>::Unencodable(e.to_string()), out)
                .map_err(CallError::Result)?;
        }
    }
    Ok(())
}

/// The body of every [`TaskEntry::make_state`]: only a stateless task can build state.
pub fn make_state<S: 'static, A: DeserializeOwned, R: Send + 'static>(
    f: fn(&S, A) -> R,
    args: codec::Input<'_>,
) -> Result<State, CallError> {
    let state = state_as::<S>(&())?;
    let args = codec::decode_input::<A>(args).map_err(CallError::Args)?;
    Ok(Box::new(f(state, args)))
}

/// Encodes a task's return value for the trip back.
pub fn encode_result<R: Serialize>(value: &R) -> Result<Vec<u8>, CallError> {
    codec::encode(value).map_err(CallError::Result)
}

enum Slot {
    One(&'static TaskEntry),
    Duplicate(usize),
}

/// Builds the name index now, if it is not built yet.
///
/// `child::warm_up` calls this before the forkserver's or the fork method's first fork, so that
/// children inherit the index instead of each building one (a hash map of every task, seeded
/// from `getrandom`) before it can look its task up.
pub(crate) fn build_index_now() {
    index();
}

fn index() -> &'static HashMap<&'static str, Slot> {
    static INDEX: OnceLock<HashMap<&'static str, Slot>> = OnceLock::new();
    INDEX.get_or_init(|| build_index(&TASKS))
}

fn build_index(entries: &'static [TaskEntry]) -> HashMap<&'static str, Slot> {
    let mut map = HashMap::with_capacity(entries.len());
    for entry in entries {
        map.entry(entry.name)
            .and_modify(|slot| {
                *slot = match slot {
                    Slot::One(_) => Slot::Duplicate(2),
                    Slot::Duplicate(n) => Slot::Duplicate(*n + 1),
                }
            })
            .or_insert(Slot::One(entry));
    }
    map
}

/// The task registered under `name`.
///
/// Fails with [`ErrorKind::UnknownTask`] when none is, and [`ErrorKind::DuplicateTask`] when
/// several are (two tasks of one name in one module, e.g. in two test functions).
pub fn lookup(name: &str) -> Result<&'static TaskEntry, Error> {
    lookup_in(index(), name)
}

fn lookup_in(index: &HashMap<&'static str, Slot>, name: &str) -> Result<&'static TaskEntry, Error> {
    match index.get(name) {
        Some(Slot::One(entry)) => Ok(entry),
        Some(Slot::Duplicate(n)) => Err(Error::new(
            ErrorKind::DuplicateTask,
            format!("task name `{name}` is registered {n} times; rename all but one"),
        )),
        None => Err(Error::new(
            ErrorKind::UnknownTask,
            format!(
                "no task named `{name}` is registered in this executable \
                 (declare it with #[multiproc::task]; {} tasks are registered)",
                index.len()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn double(_: &(), x: u32) -> u32 {
        x * 2
    }

    fn scaled(factor: &u32, x: u32) -> u32 {
        assert!(x != 13, "unlucky");
        factor * x
    }

    const fn entry(name: &'static str) -> TaskEntry {
        TaskEntry {
            name,
            run: |s, b| run_encoded(double, s, b),
            run_batch: |s, b, out| run_batch(double, s, b, out),
            make_state: |b| make_state(double, b),
        }
    }

    static ENTRIES: [TaskEntry; 3] = [entry("m::double"), entry("m::twice"), entry("m::twice")];

    #[test]
    fn finds_unique_names_and_reports_the_rest() {
        let index = build_index(&ENTRIES);
        let entry = lookup_in(&index, "m::double").unwrap();
        let out = (entry.run)(&(), &codec::encode(&21u32).unwrap()).unwrap();
        assert_eq!(codec::decode::<u32>(&out).unwrap(), 42);

        let dup = lookup_in(&index, "m::twice").unwrap_err();
        assert_eq!(dup.kind(), ErrorKind::DuplicateTask);
        assert!(dup.to_string().contains("registered 2 times"), "{dup}");

        let unknown = lookup_in(&index, "m::nope").unwrap_err();
        assert_eq!(unknown.kind(), ErrorKind::UnknownTask);
        assert!(unknown.to_string().contains("`m::nope`"), "{unknown}");
    }

    #[test]
    fn undecodable_arguments_are_an_error() {
        let index = build_index(&ENTRIES);
        let entry = lookup_in(&index, "m::double").unwrap();
        assert!(matches!((entry.run)(&(), b"\xff\xff"), Err(CallError::Args(_))));
    }

    #[test]
    fn state_is_checked_and_stateless_tasks_run_anywhere() {
        let args = codec::encode(&4u32).unwrap();
        let out = run_encoded(scaled, &10u32, &args).unwrap();
        assert_eq!(codec::decode::<u32>(&out).unwrap(), 40);
        assert!(matches!(run_encoded(scaled, &(), &args), Err(CallError::State(_))));
        assert!(matches!(run_encoded(scaled, &"text", &args), Err(CallError::State(_))));
        // A stateless task ignores whatever state the worker holds.
        let out = run_encoded(double, &10u32, &args).unwrap();
        assert_eq!(codec::decode::<u32>(&out).unwrap(), 8);
        // Only stateless tasks build state.
        let state = make_state(double, codec::Input::whole(&args)).unwrap();
        assert_eq!(state.downcast_ref::<u32>(), Some(&8));
        assert!(matches!(make_state(scaled, codec::Input::whole(&args)), Err(CallError::State(_))));
    }

    #[test]
    fn a_panic_in_a_batch_fails_only_its_item() {
        let args = codec::encode(&vec![1u32, 13, 3]).unwrap();
        let mut out = Vec::new();
        run_batch(scaled, &2u32, &args, &mut out).unwrap();
        assert_eq!(out[0], BATCH_ITEMS);
        let results = codec::decode::<Vec<ItemResult<u32>>>(&out[1..]).unwrap();
        assert_eq!(results.len(), 3);
        assert_eq!(results[0], ItemResult::Returned(2));
        match &results[1] {
            ItemResult::Panicked(panic) => assert_eq!(panic.message, "unlucky"),
            other => panic!("expected a panic, got {other:?}"),
        }
        assert_eq!(results[2], ItemResult::Returned(6));
        // Without a panic: the values alone.
        let args = codec::encode(&vec![1u32, 2, 3]).unwrap();
        out.clear();
        run_batch(scaled, &2u32, &args, &mut out).unwrap();
        assert_eq!(out[0], BATCH_PLAIN);
        assert_eq!(codec::decode::<Vec<u32>>(&out[1..]).unwrap(), vec![2, 4, 6]);
    }
}
