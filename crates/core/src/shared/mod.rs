//! Memory shared between processes.
//!
//! [`SharedMemory`](shm::SharedMemory), [`SharedSlice`](shm::SharedSlice) and their sealed
//! forms ([`shm`]); synchronization without an owner, futexes in a shared page ([`sync`]);
//! memory read behind its writer, for a pool's large initializer arguments (`arriving`).
//!
//! Architecture invariant: shared memory travels as a descriptor value; it knows nothing of
//! processes. It imports `transport`, `sys` and the error types.

pub(crate) mod arriving;
pub mod shm;
pub mod sync;
