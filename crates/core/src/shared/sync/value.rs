//! Values in shared memory: [`Value`] and [`Array`] behind their own lock (Python's
//! `Value` / `Array` with `get_lock()`), and [`SharedAtomicU64`], which needs none.

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use bytemuck::Pod;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::lock::{LockGuard, even_if_owner_died, lock_page, lock_page_new};
use super::{
    HEADER, Kind, LockResult, Page, TryLockResult, W_EXTRA, W_STATE, deadline_in, page_wire,
};
use crate::error::{Error, ErrorKind, Result};

/// A name for `T` that a received page is checked against (FNV-1a of its type name: the same
/// in every process of one build, which is what exchanges pages).
fn type_tag<T>() -> u32 {
    std::any::type_name::<T>()
        .bytes()
        .fold(0x811c_9dc5_u32, |hash, byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193))
}

/// `len` values of `T` in shared memory behind a lock that survives the death of its holder
/// (Python's `multiprocessing.Array(typecode, len)` with `get_lock()`): the guard of
/// [`get_lock`](Self::get_lock) is the slice, `&[T]` and `&mut [T]`.
///
/// `T` is any [`Pod`] type (integers, floats, `#[derive(Pod)]` structs) aligned to at most 64
/// bytes. A received handle is checked to hold `T`s.
///
/// ```no_run
/// # fn main() -> multiproc_core::Result<()> {
/// let histogram = multiproc_core::Array::<u64>::new(16)?;
/// // pass `histogram.try_clone()?` to each child, which does the same:
/// histogram.get_lock().expect("not left by a dead holder")[3] += 1;
/// assert_eq!(histogram.to_vec().expect("read")[3], 1);
/// # Ok(()) }
/// ```
pub struct Array<T> {
    page: Page,
    len: usize,
    _values: PhantomData<fn() -> T>,
}

/// The held lock of an [`Array`]: the slice of its values. Dropping it releases the lock.
#[must_use = "the lock is released when the guard is dropped"]
pub struct ArrayGuard<'a, T> {
    guard: LockGuard<'a>,
    len: usize,
    _values: PhantomData<&'a mut [T]>,
}

impl<T: Pod> Array<T> {
    /// `len` zeroed values.
    pub fn new(len: usize) -> Result<Array<T>> {
        if size_of::<T>() == 0 || align_of::<T>() > HEADER {
            return Err(Error::new(
                ErrorKind::InvalidState,
                "a shared array holds values of a non-zero size aligned to at most 64 bytes",
            ));
        }
        let bytes = len.checked_mul(size_of::<T>()).and_then(|b| b.checked_add(HEADER));
        let bytes = bytes.ok_or_else(|| Error::new(ErrorKind::InvalidState, "array too long"))?;
        let page = lock_page_new(Kind::Value, bytes)?;
        page.word(W_STATE).store(type_tag::<T>(), SeqCst);
        page.word(W_EXTRA).store(size_of::<T>() as u32, SeqCst);
        Ok(Array { page, len, _values: PhantomData })
    }

    /// An array holding a copy of `values`.
    pub fn from_slice(values: &[T]) -> Result<Array<T>> {
        let array = Array::new(values.len())?;
        even_if_owner_died(array.get_lock())?.copy_from_slice(values);
        Ok(array)
    }

    /// How many values it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Takes the lock, waiting as long as it takes: the guard is the values.
    pub fn get_lock(&self) -> LockResult<ArrayGuard<'_, T>> {
        let taken = lock_page(&self.page, None).map(|guard| guard.expect("no deadline"));
        self.guarded(taken)
    }

    /// Takes the lock, waiting at most `timeout`; `Ok(None)` if it is still held then.
    pub fn get_lock_timeout(&self, timeout: Duration) -> TryLockResult<ArrayGuard<'_, T>> {
        self.try_guarded(lock_page(&self.page, deadline_in(timeout)))
    }

    /// Takes the lock if it is free now; `Ok(None)` if it is held.
    pub fn try_get_lock(&self) -> TryLockResult<ArrayGuard<'_, T>> {
        self.try_guarded(lock_page(&self.page, Some(Instant::now())))
    }

    /// Takes the lock in the tokio runtime's reactor (no thread waits), as
    /// [`Lock::lock_async`](super::Lock::lock_async) does.
    #[cfg(feature = "tokio")]
    pub async fn get_lock_async(&self) -> LockResult<ArrayGuard<'_, T>> {
        let taken = super::lock::lock_page_async(&self.page).await;
        self.guarded(taken)
    }

    /// A copy of the values, taken under the lock.
    pub fn to_vec(&self) -> LockResult<Vec<T>> {
        match self.get_lock() {
            Ok(values) => Ok(values.to_vec()),
            Err(e) => Err(e.map(|values| values.to_vec())),
        }
    }

    fn guard<'a>(&self, guard: LockGuard<'a>) -> ArrayGuard<'a, T> {
        ArrayGuard { guard, len: self.len, _values: PhantomData }
    }

    fn guarded<'a>(&self, taken: LockResult<LockGuard<'a>>) -> LockResult<ArrayGuard<'a, T>> {
        taken.map(|guard| self.guard(guard)).map_err(|e| e.map(|guard| self.guard(guard)))
    }

    fn try_guarded<'a>(
        &self,
        taken: TryLockResult<LockGuard<'a>>,
    ) -> TryLockResult<ArrayGuard<'a, T>> {
        taken
            .map(|guard| guard.map(|guard| self.guard(guard)))
            .map_err(|e| e.map(|g| self.guard(g)))
    }

    /// Another handle to the same values.
    pub fn try_clone(&self) -> Result<Array<T>> {
        Ok(Array { page: self.page.try_clone()?, len: self.len, _values: PhantomData })
    }

    /// Checks a received page for `T`s: its tag, element size and a length that fits.
    fn from_received(page: Page) -> std::result::Result<Array<T>, String> {
        let tag = page.word(W_STATE).load(SeqCst);
        let size = page.word(W_EXTRA).load(SeqCst) as usize;
        if tag != type_tag::<T>() || size != size_of::<T>() || size == 0 {
            return Err(format!("not a shared array of {}", std::any::type_name::<T>()));
        }
        let data = page.map.len() - HEADER;
        if data % size != 0 {
            return Err(format!("a shared array page of {} bytes", page.map.len()));
        }
        Ok(Array { len: data / size, page, _values: PhantomData })
    }
}

impl<T: Pod> Deref for ArrayGuard<'_, T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        bytemuck::cast_slice(self.guard.bytes(HEADER, self.len * size_of::<T>()))
    }
}

impl<T: Pod> DerefMut for ArrayGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(self.guard.bytes_mut(HEADER, self.len * size_of::<T>()))
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for ArrayGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T> Serialize for Array<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.page.serialize(serializer)
    }
}

impl<'de, T: Pod> Deserialize<'de> for Array<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        Array::from_received(Page::deserialize(deserializer, Kind::Value)?)
            .map_err(D::Error::custom)
    }
}

impl<T> fmt::Debug for Array<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Array").field("len", &self.len).finish_non_exhaustive()
    }
}

/// One `T` in shared memory behind a lock that survives the death of its holder (Python's
/// `multiprocessing.Value` with `get_lock()`): the guard of [`get_lock`](Self::get_lock)
/// dereferences to `T`.
///
/// ```no_run
/// # fn main() -> multiproc_core::Result<()> {
/// let total = multiproc_core::Value::new(0u64)?;
/// // pass `total.try_clone()?` to each child, which does the same:
/// *total.get_lock().expect("not left by a dead holder") += 1;
/// assert_eq!(total.get().expect("read"), 1);
/// # Ok(()) }
/// ```
pub struct Value<T> {
    array: Array<T>,
}

/// The held lock of a [`Value`]: the value. Dropping it releases the lock.
#[must_use = "the lock is released when the guard is dropped"]
pub struct ValueGuard<'a, T> {
    values: ArrayGuard<'a, T>,
}

impl<T: Pod> Value<T> {
    /// A value holding `value`.
    pub fn new(value: T) -> Result<Value<T>> {
        Ok(Value { array: Array::from_slice(&[value])? })
    }

    fn guard(values: ArrayGuard<'_, T>) -> ValueGuard<'_, T> {
        ValueGuard { values }
    }

    /// Takes the lock, waiting as long as it takes: the guard is the value.
    pub fn get_lock(&self) -> LockResult<ValueGuard<'_, T>> {
        self.array.get_lock().map(Value::guard).map_err(|e| e.map(Value::guard))
    }

    /// Takes the lock, waiting at most `timeout`; `Ok(None)` if it is still held then.
    pub fn get_lock_timeout(&self, timeout: Duration) -> TryLockResult<ValueGuard<'_, T>> {
        let taken = self.array.get_lock_timeout(timeout);
        taken.map(|guard| guard.map(Value::guard)).map_err(|e| e.map(Value::guard))
    }

    /// Takes the lock in the tokio runtime's reactor (no thread waits), as
    /// [`Lock::lock_async`](super::Lock::lock_async) does.
    #[cfg(feature = "tokio")]
    pub async fn get_lock_async(&self) -> LockResult<ValueGuard<'_, T>> {
        self.array.get_lock_async().await.map(Value::guard).map_err(|e| e.map(Value::guard))
    }

    /// The value, read under the lock.
    pub fn get(&self) -> LockResult<T> {
        match self.get_lock() {
            Ok(value) => Ok(*value),
            Err(e) => Err(e.map(|value| *value)),
        }
    }

    /// Sets the value under the lock (also when its last holder died: the value is replaced).
    pub fn set(&self, value: T) -> Result<()> {
        *even_if_owner_died(self.get_lock())? = value;
        Ok(())
    }

    /// Another handle to the same value.
    pub fn try_clone(&self) -> Result<Value<T>> {
        Ok(Value { array: self.array.try_clone()? })
    }
}

impl<T: Pod> Deref for ValueGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.values[0]
    }
}

impl<T: Pod> DerefMut for ValueGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.values[0]
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for ValueGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl<T> Serialize for Value<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.array.serialize(serializer)
    }
}

impl<'de, T: Pod> Deserialize<'de> for Value<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let array = Array::<T>::deserialize(deserializer)?;
        if array.len() != 1 {
            return Err(D::Error::custom("a shared array where one value was expected"));
        }
        Ok(Value { array })
    }
}

impl<T> fmt::Debug for Value<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Value").finish_non_exhaustive()
    }
}

/// Where a shared atomic's value lies in its page.
const ATOMIC_AT: usize = W_STATE;

/// A 64-bit integer in shared memory that processes update atomically, for counters that need
/// no lock: `fetch_add` and friends, with `SeqCst` ordering.
///
/// ```no_run
/// # fn main() -> multiproc_core::Result<()> {
/// let done = multiproc_core::SharedAtomicU64::new(0)?;
/// // pass `done.try_clone()?` to each child, which calls `done.fetch_add(1)`...
/// println!("{} finished", done.load());
/// # Ok(()) }
/// ```
pub struct SharedAtomicU64 {
    page: Page,
}

impl SharedAtomicU64 {
    /// A new integer holding `value`.
    pub fn new(value: u64) -> Result<SharedAtomicU64> {
        let atomic = SharedAtomicU64 { page: Page::new(Kind::AtomicU64, 0)? };
        atomic.value().store(value, SeqCst);
        Ok(atomic)
    }

    fn from_page(page: Page) -> SharedAtomicU64 {
        SharedAtomicU64 { page }
    }

    fn value(&self) -> &std::sync::atomic::AtomicU64 {
        self.page.map.atomic_u64(ATOMIC_AT).expect("an atomic's page holds its value")
    }

    /// The value now.
    pub fn load(&self) -> u64 {
        self.value().load(SeqCst)
    }

    /// Sets the value.
    pub fn store(&self, value: u64) {
        self.value().store(value, SeqCst);
    }

    /// Sets the value, returning the one before.
    pub fn swap(&self, value: u64) -> u64 {
        self.value().swap(value, SeqCst)
    }

    /// Adds `n` (wrapping), returning the value before.
    pub fn fetch_add(&self, n: u64) -> u64 {
        self.value().fetch_add(n, SeqCst)
    }

    /// Subtracts `n` (wrapping), returning the value before.
    pub fn fetch_sub(&self, n: u64) -> u64 {
        self.value().fetch_sub(n, SeqCst)
    }

    /// Stores the larger of the value and `n`, returning the value before.
    pub fn fetch_max(&self, n: u64) -> u64 {
        self.value().fetch_max(n, SeqCst)
    }

    /// Stores the smaller of the value and `n`, returning the value before.
    pub fn fetch_min(&self, n: u64) -> u64 {
        self.value().fetch_min(n, SeqCst)
    }

    /// Stores `new` if the value is `current`: `Ok(current)`, or `Err(the value)` if it was not.
    pub fn compare_exchange(&self, current: u64, new: u64) -> std::result::Result<u64, u64> {
        self.value().compare_exchange(current, new, SeqCst, SeqCst)
    }

    /// Another handle to the same integer.
    pub fn try_clone(&self) -> Result<SharedAtomicU64> {
        Ok(SharedAtomicU64 { page: self.page.try_clone()? })
    }
}

page_wire!(SharedAtomicU64, Kind::AtomicU64);

impl fmt::Debug for SharedAtomicU64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedAtomicU64").field("value", &self.load()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::through_the_wire;
    use super::*;

    #[test]
    fn an_array_changes_under_its_lock_and_is_checked_for_its_type_when_received() {
        let array = Array::<u32>::from_slice(&[1, 2, 3]).unwrap();
        let received: Array<u32> = through_the_wire(&array).unwrap();
        received.get_lock().unwrap()[1] = 20;
        assert_eq!(array.to_vec().unwrap(), [1, 20, 3]);
        let wrong = through_the_wire::<_, Array<f32>>(&array).expect_err("u32s as f32s");
        assert!(wrong.contains("not a shared array of f32"), "{wrong}");
        assert!(through_the_wire::<_, Value<u32>>(&array).is_err(), "three values as one");
        let held = array.get_lock().unwrap();
        assert!(received.try_get_lock().is_err(), "relocked by its holder");
        drop(held);
        let value = Value::new(7u64).unwrap();
        *value.get_lock().unwrap() += 1;
        value.set(value.get().unwrap() * 2).unwrap();
        assert_eq!(through_the_wire::<_, Value<u64>>(&value).unwrap().get().unwrap(), 16);
    }
}
