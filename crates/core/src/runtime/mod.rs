//! The child runtime: what a child runs and how it finds its task.
//!
//! The role a re-executed binary takes before `main` ([`role`]), the link-time task table
//! ([`registry`]) and the typed handle of a task ([`task`]), what every child runs ([`child`]),
//! the forkserver's preloaded value ([`preload`]), the log level children adopt ([`log`]), and
//! the library's own threads, which a fork parks ([`threads`]).
//!
//! Architecture invariant: the runtime knows nothing of `Process` or `Pool`, the parent-side
//! handles. It imports `shared`, `transport`, `sys` and the error types.

pub mod child;
pub mod identity;
pub mod log;
pub mod panic;
pub mod preload;
pub mod registry;
pub mod role;
pub(crate) mod setup;
pub mod task;
pub mod threads;
pub mod worker;
