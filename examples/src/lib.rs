//! Runnable examples of multiproc; see the files beside this crate.
