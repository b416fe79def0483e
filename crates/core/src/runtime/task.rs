//! The typed handle of a registered task, which `#[multiproc::task]` creates.

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// What a task's arguments and return value must be: sendable to another process under every
/// start method, so that code that compiles under `fork` also runs under `spawn`.
pub trait Portable: Serialize + DeserializeOwned + Send + 'static {}

impl<T: Serialize + DeserializeOwned + Send + 'static> Portable for T {}

/// A task that takes `A` and returns `R`, registered under a stable name; `S` is the state it
/// reads by reference (`()` for an ordinary task).
///
/// Values of this type are made by `#[multiproc::task]`; the function's name becomes a constant
/// of this type, so `ctx.process(add, (2, 3))` checks the argument and return types at compile
/// time. A function whose first parameter is a reference, `fn ones(cache: &Cache, i: u32)`,
/// becomes a `Task<u32, usize, Cache>`: a pool whose initializer returns a `Cache` hands it to
/// every call.
pub struct Task<A, R, S = ()> {
    name: &'static str,
    func: fn(&S, A) -> R,
}

impl<A, R, S> Task<A, R, S> {
    /// Used by `#[multiproc::task]`; not a stable API.
    #[doc(hidden)]
    pub const fn __new(name: &'static str, func: fn(&S, A) -> R) -> Self {
        Task { name, func }
    }

    /// The registered name: `module::path::function`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Runs the task here, in the calling process, with `state`.
    pub fn call_with(&self, state: &S, args: A) -> R {
        (self.func)(state, args)
    }

    /// The function itself, for start methods that run it in a forked copy of this process.
    pub(crate) fn func(&self) -> fn(&S, A) -> R {
        self.func
    }
}

impl<A, R> Task<A, R> {
    /// Runs the (stateless) task here, in the calling process.
    pub fn call(&self, args: A) -> R {
        (self.func)(&(), args)
    }
}

impl<A, R, S> Clone for Task<A, R, S> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A, R, S> Copy for Task<A, R, S> {}

impl<A, R, S> fmt::Debug for Task<A, R, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Task").field(&self.name).finish()
    }
}
