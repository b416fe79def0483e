//! [`Fd`]: a file descriptor that travels as a value—inside task arguments, return values,
//! pool items and messages—and arrives as a working descriptor in the other process.
//!
//! While a value is encoded, each `Fd` in it records a duplicate of its descriptor and writes
//! only that duplicate's index; the duplicates ride beside the bytes (SCM_RIGHTS) and are
//! closed once sent, so the sender's own descriptor stays its own and closes when the sender
//! drops it. Decoding takes each descriptor back by index; bytes that claim a descriptor that
//! did not arrive are an error. Under the fork start method, task arguments are moved, not
//! encoded, and the child's copy of the descriptor table holds the same descriptor.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use serde::de::Error as _;
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::transport::codec;

/// A file descriptor owner that can be sent to another process: `Fd<File>`,
/// `Fd<TcpListener>`, `Fd<UnixStream>`, or a bare `Fd` (an `OwnedFd`).
///
/// ```ignore
/// #[task]
/// fn serve(listener: Fd<TcpListener>) { for stream in listener.incoming() { /* .. */ } }
///
/// let listener = Fd::new(TcpListener::bind("127.0.0.1:0")?);
/// ctx.process(serve, listener).start()?;
/// ```
pub struct Fd<T = OwnedFd>(T);

impl<T> Fd<T> {
    /// Wraps an owner of a descriptor.
    pub fn new(inner: T) -> Self {
        Fd(inner)
    }

    /// The owner itself.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> Deref for Fd<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for Fd<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: AsFd> AsFd for Fd<T> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl<T> From<T> for Fd<T> {
    fn from(inner: T) -> Self {
        Fd(inner)
    }
}

impl<T: AsFd> fmt::Debug for Fd<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use std::os::fd::AsRawFd;
        f.debug_tuple("Fd").field(&self.0.as_fd().as_raw_fd()).finish()
    }
}

impl<T: AsFd> Serialize for Fd<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let index = codec::push_fd(self.0.as_fd()).map_err(S::Error::custom)?;
        serializer.serialize_u32(index)
    }
}

impl<'de, T: From<OwnedFd>> Deserialize<'de> for Fd<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let index = u32::deserialize(deserializer)?;
        let fd = codec::take_fd(index).map_err(D::Error::custom)?;
        Ok(Fd(T::from(fd)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;

    #[test]
    fn a_descriptor_round_trips_through_the_side_tables() {
        let mut file = tempfile("round-trip");
        file.write_all(b"hello").unwrap();
        let value = (7u8, Fd::new(file));
        let (bytes, fds) = codec::collecting_fds(|| codec::encode(&value));
        let bytes = bytes.unwrap();
        assert_eq!(fds.len(), 1);
        assert_ne!(fds[0].as_raw_fd(), value.1.as_raw_fd(), "a duplicate travels");
        let (n, mut got): (u8, Fd<std::fs::File>) =
            codec::with_fds(fds, || codec::decode(&bytes)).unwrap();
        assert_eq!(n, 7);
        got.rewind().unwrap();
        let mut text = String::new();
        got.read_to_string(&mut text).unwrap();
        assert_eq!(text, "hello");
    }

    #[test]
    fn a_claimed_descriptor_that_did_not_arrive_is_an_error() {
        let file = Fd::new(tempfile("missing"));
        let (bytes, _fds) = codec::collecting_fds(|| codec::encode(&file));
        let bytes = bytes.unwrap();
        let missing = codec::with_fds(Vec::new(), || codec::decode::<Fd<std::fs::File>>(&bytes));
        assert!(missing.unwrap_err().to_string().contains("0 arrived"));
        assert!(codec::decode::<Fd<std::fs::File>>(&bytes).is_err());
        // Without a side table, a descriptor cannot be encoded at all.
        assert!(codec::encode(&file).is_err());
    }

    fn tempfile(name: &str) -> std::fs::File {
        let path = std::env::temp_dir().join(format!("multiproc-fd-{name}-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        file
    }
}
