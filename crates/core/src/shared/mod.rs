//! Memory shared between processes.
//!
//! [`SharedMemory`](shm::SharedMemory), [`SharedSlice`](shm::SharedSlice) and their sealed
//! forms ([`shm`]); synchronization without an owner, futexes in a shared page ([`sync`]).
//!
//! Architecture invariant: shared memory travels as a descriptor value; it knows nothing of
//! processes. It imports `transport`, `sys` and the error types.

pub mod shm;
pub mod sync;
