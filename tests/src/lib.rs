//! The integration suite of multiproc lives in `suite/`; this library is empty.
