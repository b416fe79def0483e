//! [`Event`]: a flag that processes wait on.

use std::fmt;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use super::{Kind, Page, W_STATE, deadline_in, page_wire};
use crate::error::Result;

/// A flag that processes wait on (Python's `multiprocessing.Event`): `set` wakes every waiter,
/// `clear` resets it. It has no owner: the death of a process leaves it as it was.
///
/// ```no_run
/// # fn main() -> multiproc_core::Result<()> {
/// let ready = multiproc_core::Event::new()?;
/// // pass `ready` to a child, which calls `ready.set()`...
/// assert!(ready.wait_timeout(std::time::Duration::from_secs(5))?);
/// # Ok(()) }
/// ```
pub struct Event {
    page: Page,
}

impl Event {
    /// A new event, not set.
    pub fn new() -> Result<Event> {
        Ok(Event { page: Page::new(Kind::Event, 0)? })
    }

    fn from_page(page: Page) -> Event {
        Event { page }
    }

    /// Sets the flag and wakes every process and thread waiting on it.
    pub fn set(&self) {
        self.page.word(W_STATE).store(1, SeqCst);
        self.page.wake(u32::MAX);
    }

    /// Resets the flag.
    pub fn clear(&self) {
        self.page.word(W_STATE).store(0, SeqCst);
    }

    /// Whether the flag is set.
    pub fn is_set(&self) -> bool {
        self.page.word(W_STATE).load(SeqCst) != 0
    }

    /// Waits until the flag is set.
    pub fn wait(&self) -> Result<()> {
        self.page.wait_until(None, |state| state != 0).map(drop)
    }

    /// Waits at most `timeout` for the flag; whether it was set.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<bool> {
        self.page.wait_until(deadline_in(timeout), |state| state != 0)
    }

    /// Waits until the flag is set, in the tokio runtime's reactor (no thread waits); dropping
    /// the future stops waiting.
    #[cfg(feature = "tokio")]
    pub async fn wait_async(&self) -> Result<()> {
        self.page.until_async(None, || Ok(self.is_set().then_some(()))).await
    }

    /// Another handle to the same event.
    pub fn try_clone(&self) -> Result<Event> {
        Ok(Event { page: self.page.try_clone()? })
    }
}

page_wire!(Event, Kind::Event);

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event").field("set", &self.is_set()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_wakes_a_thread_waiting_on_another_handle() {
        let event = Event::new().unwrap();
        let other = event.try_clone().unwrap();
        let waiter = std::thread::spawn(move || other.wait_timeout(Duration::from_secs(30)));
        event.set();
        assert!(waiter.join().unwrap().unwrap());
        event.clear();
        assert!(!event.wait_timeout(Duration::from_millis(1)).unwrap());
    }
}
