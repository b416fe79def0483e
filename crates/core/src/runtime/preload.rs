//! The forkserver's preloaded value, as the server's children reach it.
//!
//! The server builds the value once, before its first fork, and [`install`]s it; every child it
//! forks inherits it copy-on-write and reads it through [`preloaded`], typed. The first call
//! with the right type moves the value out of its type-erased slot into a `'static` shared
//! reference, so later calls cost one atomic load and a type check.

use std::any::Any;
use std::sync::{Mutex, OnceLock};

use crate::runtime::registry::State;

/// The value as the preload task returned it, until the first typed access.
static HELD: Mutex<Option<State>> = Mutex::new(None);

/// The value after the first typed access.
static SHARED: OnceLock<&'static (dyn Any + Send + Sync)> = OnceLock::new();

/// Keeps `state` as this process's preloaded value (the forkserver calls this once, before it
/// forks; its children inherit it).
pub fn install(state: State) {
    let mut held = HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    *held = Some(state);
}

/// The value the forkserver's preload task returned, in a child of that forkserver.
///
/// `None` in every other process (the user's program, children of `fork` or `spawn`), when no
/// preload was set, or when `T` is not the type the preload task returned.
pub fn preloaded<T: Any + Send + Sync>() -> Option<&'static T> {
    if let Some(shared) = SHARED.get() {
        return shared.downcast_ref::<T>();
    }
    let mut held = HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let state = held.take()?;
    match state.downcast::<T>() {
        Ok(value) => {
            let value: &'static T = Box::leak(value);
            let shared = *SHARED.get_or_init(|| value);
            shared.downcast_ref::<T>()
        }
        Err(state) => {
            *held = Some(state);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_access_checks_the_type_and_keeps_the_value() {
        assert_eq!(preloaded::<u64>(), None);
        install(Box::new(vec![7u64; 3]));
        assert_eq!(preloaded::<String>(), None);
        let first = preloaded::<Vec<u64>>().expect("installed above");
        assert_eq!(first, &vec![7, 7, 7]);
        let second = preloaded::<Vec<u64>>().expect("still there");
        assert!(std::ptr::eq(first, second));
        assert_eq!(preloaded::<String>(), None);
    }
}
