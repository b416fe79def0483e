//! Talking between processes: pipes, queues, listeners and `wait()`.
//!
//! [`Connection`](pipe::Connection) and `pipe()` ([`pipe`]), [`Queue`](queue::Queue) and
//! [`JoinableQueue`](queue::JoinableQueue) ([`queue`], with its overflow log), [`Listener`](listener::Listener) and
//! [`Client`](listener::Client) between unrelated processes ([`listener`]), and waiting on any of
//! them at once ([`wait`](mod@wait)).
//!
//! Architecture invariant: nothing here knows about pools. It imports `process` (to wait on a
//! `Process`), `shared`, `transport`, `sys` and the error types.

pub mod listener;
mod overflow;
pub mod pipe;
pub mod queue;
pub mod wait;
