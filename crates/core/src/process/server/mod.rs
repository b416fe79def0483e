//! A fork server: a single-threaded process that forks children on request and reports how
//! each ended. The forkserver start method runs one (started by exec); a fork pool runs
//! another, its template (a forked copy of the program, made while it was single-threaded).
//!
//! [`protocol`] is what travels, [`serve`] the server's loop, [`served`] the client's side: a
//! request, its answer, and the handle of a served child.

pub mod protocol;
pub mod serve;
pub mod served;
