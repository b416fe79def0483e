//! The task registry: a link-time table of every `#[multiproc::task]` in the executable, looked
//! up by name.
//!
//! Entries are placed by `linkme` into one linker section, so the table exists before `main`
//! (a spawned child looks tasks up from an `.init_array` constructor) and needs no
//! registration code to run. A task travels between processes by name only; no integer from
//! the wire is ever turned into a function pointer.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{self, CodecError};
use crate::error::{Error, ErrorKind};

/// One registered task: its stable name and a type-erased runner over encoded bytes.
#[derive(Debug)]
pub struct TaskEntry {
    /// `module::path::function`.
    pub name: &'static str,
    /// Decodes the arguments, runs the task and encodes its return value.
    pub run: fn(&[u8]) -> Result<Vec<u8>, CallError>,
}

/// Why a type-erased call could not complete (a panic is not one of these: it unwinds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// The argument bytes did not decode as the task's argument type.
    Args(CodecError),
    /// The return value could not be encoded.
    Result(CodecError),
}

/// The table itself, filled at link time.
// linkme's `#[link_section]` trips the unsafe_code lint; no unsafe operation is involved.
#[allow(unsafe_code)]
#[linkme::distributed_slice]
pub static TASKS: [TaskEntry];

/// Decodes `args`, calls `f`, and encodes what it returns: the body of every [`TaskEntry::run`].
pub fn run_encoded<A: DeserializeOwned, R: Serialize>(
    f: fn(A) -> R,
    args: &[u8],
) -> Result<Vec<u8>, CallError> {
    let args = codec::decode::<A>(args).map_err(CallError::Args)?;
    encode_result(&f(args))
}

/// Encodes a task's return value for the trip back.
pub fn encode_result<R: Serialize>(value: &R) -> Result<Vec<u8>, CallError> {
    codec::encode(value).map_err(CallError::Result)
}

enum Slot {
    One(&'static TaskEntry),
    Duplicate(usize),
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

    fn double(x: u32) -> u32 {
        x * 2
    }

    static ENTRIES: [TaskEntry; 3] = [
        TaskEntry { name: "m::double", run: |b| run_encoded(double, b) },
        TaskEntry { name: "m::twice", run: |b| run_encoded(double, b) },
        TaskEntry { name: "m::twice", run: |b| run_encoded(double, b) },
    ];

    #[test]
    fn finds_unique_names_and_reports_the_rest() {
        let index = build_index(&ENTRIES);
        let entry = lookup_in(&index, "m::double").unwrap();
        let out = (entry.run)(&codec::encode(&21u32).unwrap()).unwrap();
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
        assert!(matches!((entry.run)(b"\xff\xff"), Err(CallError::Args(_))));
    }
}
