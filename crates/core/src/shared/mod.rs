//! Memory shared between processes.
//!
//! [`SharedMemory`](shm::SharedMemory), [`SharedSlice`](shm::SharedSlice) and their sealed
//! forms ([`shm`]).
//!
//! Architecture invariant: shared memory travels as a descriptor value; it knows nothing of
//! processes. It imports `transport`, `sys` and the error types.

pub mod shm;
