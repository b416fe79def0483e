//! The typed handle of a registered task, which `#[multiproc::task]` creates.

use std::fmt;
use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// What a task's arguments and return value must be: sendable to another process under every
/// start method, so that code that compiles under `fork` also runs under `spawn`.
pub trait Portable: Serialize + DeserializeOwned + Send + 'static {}

impl<T: Serialize + DeserializeOwned + Send + 'static> Portable for T {}

/// A task that takes `A` and returns `R`, registered under a stable name.
///
/// Values of this type are made by `#[multiproc::task]`; the function's name becomes a constant
/// of this type, so `ctx.process(add, (2, 3))` checks the argument and return types at compile
/// time.
pub struct Task<A, R> {
    name: &'static str,
    func: fn(A) -> R,
    _types: PhantomData<fn(A) -> R>,
}

impl<A, R> Task<A, R> {
    /// Used by `#[multiproc::task]`; not a stable API.
    #[doc(hidden)]
    pub const fn __new(name: &'static str, func: fn(A) -> R) -> Self {
        Task { name, func, _types: PhantomData }
    }

    /// The registered name: `module::path::function`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Runs the task here, in the calling process.
    pub fn call(&self, args: A) -> R {
        (self.func)(args)
    }

    /// The function itself, for start methods that run it in a forked copy of this process.
    pub(crate) fn func(&self) -> fn(A) -> R {
        self.func
    }
}

impl<A, R> Clone for Task<A, R> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A, R> Copy for Task<A, R> {}

impl<A, R> fmt::Debug for Task<A, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Task").field(&self.name).finish()
    }
}
