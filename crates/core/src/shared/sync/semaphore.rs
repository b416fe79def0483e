//! [`Semaphore`] and [`BoundedSemaphore`]: a count that processes take from and give back to.

use std::fmt;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Kind, Page, W_BOUND, W_STATE, deadline_in, page_wire};
use crate::error::{Error, ErrorKind, Result};

/// A counter that processes take from and give back to (Python's
/// `multiprocessing.Semaphore`): `acquire` waits while it is zero.
///
/// It has no owner: any process may release what another acquired, and one that is killed
/// between acquire and release leaves the count one lower for good (as with Python's and
/// POSIX semaphores). Where a slot must come back when its holder dies, use a
/// [`Lock`](super::Lock) per slot, which the kernel releases.
pub struct Semaphore {
    page: Page,
}

impl Semaphore {
    /// A semaphore whose count starts at `value`.
    pub fn new(value: u32) -> Result<Semaphore> {
        let page = Page::new(Kind::Semaphore, 0)?;
        page.word(W_STATE).store(value, SeqCst);
        Ok(Semaphore { page })
    }

    fn from_page(page: Page) -> Semaphore {
        Semaphore { page }
    }

    /// Takes one from the count, waiting while it is zero.
    pub fn acquire(&self) -> Result<()> {
        self.acquire_until(None).map(drop)
    }

    /// Takes one if the count is above zero now; never waits.
    pub fn try_acquire(&self) -> Result<bool> {
        self.acquire_until(Some(Instant::now()))
    }

    /// Takes one, waiting at most `timeout`; whether it did.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<bool> {
        self.acquire_until(deadline_in(timeout))
    }

    /// Takes one, waiting in the tokio runtime's reactor while the count is zero (no thread
    /// waits); a future dropped before it finished took nothing.
    #[cfg(feature = "tokio")]
    pub async fn acquire_async(&self) -> Result<()> {
        self.page.until_async(None, || Ok(self.take_one().then_some(()))).await
    }

    /// Takes one if the count is above zero.
    fn take_one(&self) -> bool {
        let count = self.page.word(W_STATE);
        count.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok()
    }

    fn acquire_until(&self, deadline: Option<Instant>) -> Result<bool> {
        loop {
            if !self.page.wait_until(deadline, |n| n > 0)? {
                return Ok(false);
            }
            if self.take_one() {
                return Ok(true);
            }
        }
    }

    /// Gives one back, waking one waiter; an [`ErrorKind::InvalidState`] error past a bounded
    /// semaphore's bound.
    pub fn release(&self) -> Result<()> {
        let bound = self.page.word(W_BOUND).load(SeqCst);
        let count = self.page.word(W_STATE);
        let raised = count.fetch_update(SeqCst, SeqCst, |n| {
            let past = (bound != 0 && n >= bound) || n == u32::MAX;
            (!past).then_some(n + 1)
        });
        if let Err(n) = raised {
            return Err(Error::new(
                ErrorKind::InvalidState,
                format!("semaphore released too many times (its count is {n}, bound {bound})"),
            ));
        }
        self.page.wake(1);
        Ok(())
    }

    /// The count now (others may change it at any moment).
    pub fn value(&self) -> u32 {
        self.page.word(W_STATE).load(SeqCst)
    }

    /// Another handle to the same semaphore.
    pub fn try_clone(&self) -> Result<Semaphore> {
        Ok(Semaphore { page: self.page.try_clone()? })
    }
}

page_wire!(Semaphore, Kind::Semaphore);

impl fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Semaphore").field("value", &self.value()).finish()
    }
}

/// A [`Semaphore`] whose count may never exceed its start value (Python's
/// `BoundedSemaphore`): a release past it is an [`ErrorKind::InvalidState`] error.
///
/// It dereferences to [`Semaphore`] for `acquire` and `release`.
pub struct BoundedSemaphore {
    semaphore: Semaphore,
}

impl BoundedSemaphore {
    /// A semaphore whose count starts at, and never exceeds, `value`.
    pub fn new(value: u32) -> Result<BoundedSemaphore> {
        let semaphore = Semaphore::new(value)?;
        semaphore.page.word(W_BOUND).store(value.max(1), SeqCst);
        Ok(BoundedSemaphore { semaphore })
    }

    /// Another handle to the same semaphore.
    pub fn try_clone(&self) -> Result<BoundedSemaphore> {
        Ok(BoundedSemaphore { semaphore: self.semaphore.try_clone()? })
    }
}

impl std::ops::Deref for BoundedSemaphore {
    type Target = Semaphore;

    fn deref(&self) -> &Semaphore {
        &self.semaphore
    }
}

impl Serialize for BoundedSemaphore {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.semaphore.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for BoundedSemaphore {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let semaphore = Semaphore::deserialize(deserializer)?;
        if semaphore.page.word(W_BOUND).load(SeqCst) == 0 {
            return Err(D::Error::custom("a plain semaphore where a bounded one was expected"));
        }
        Ok(BoundedSemaphore { semaphore })
    }
}

impl fmt::Debug for BoundedSemaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundedSemaphore").field("value", &self.value()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bounded_semaphore_refuses_a_release_past_its_bound() {
        let semaphore = BoundedSemaphore::new(2).unwrap();
        assert!(semaphore.try_acquire().unwrap());
        semaphore.release().unwrap();
        let error = semaphore.release().expect_err("past the bound");
        assert_eq!(error.kind(), ErrorKind::InvalidState);
        assert_eq!(semaphore.value(), 2);
    }
}
