//! The value codec: serde + bincode 2, behind two functions so that the format can be replaced.
//!
//! Every decode is bounded. bincode allocates a `String` or byte buffer of the length its prefix
//! claims before reading it, so an unbounded decoder handed a length of 2^60 would try to
//! allocate that much and abort. We decode with a byte limit chosen from the size of the input.
//! bincode counts against the limit the in-memory size of every primitive it decodes, and a
//! varint-encoded integer can grow 16-fold (one byte on the wire, a `u128` in memory), so an
//! honest value never claims more than 16 times its encoded size. The limit is the smallest of a
//! few power-of-16 tiers at or above 16 times the input: an honest value always fits, and a
//! lying length can never cost more than 256 times the bytes that actually arrived.

use std::fmt;

use bincode::config;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A value that could not be encoded, or bytes that did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError(String);

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CodecError {}

impl CodecError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        CodecError(message.into())
    }
}

fn base() -> config::Configuration {
    config::standard()
}

/// Appends the encoding of `value` to `out`.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    bincode::serde::encode_into_std_write(value, out, base())
        .map(drop)
        .map_err(|e| CodecError(format!("cannot encode {}: {e}", std::any::type_name::<T>())))
}

/// The encoding of `value`.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    encode_into(value, &mut out)?;
    Ok(out)
}

/// Decodes a `T` that must fill `bytes` exactly.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    // The claims of an honest value stay within 16 times its encoding (see the module docs).
    let claimable = bytes.len().saturating_mul(16);
    macro_rules! tiers {
        ($($shift:literal),*) => {
            $(
                if claimable <= 1usize << $shift {
                    return finish(bincode::serde::decode_from_slice(
                        bytes,
                        base().with_limit::<{ 1usize << $shift }>(),
                    ), bytes.len());
                }
            )*
        };
    }
    tiers!(12, 16, 20, 24, 28, 32, 36, 40, 44, 48);
    Err(CodecError(format!("cannot decode {} bytes: larger than any frame", bytes.len())))
}

fn finish<T>(
    result: Result<(T, usize), bincode::error::DecodeError>,
    len: usize,
) -> Result<T, CodecError> {
    match result {
        Ok((value, used)) if used == len => Ok(value),
        Ok((_, used)) => Err(CodecError(format!(
            "cannot decode {}: {} trailing bytes after the value",
            std::any::type_name::<T>(),
            len - used
        ))),
        Err(e) => Err(CodecError(format!("cannot decode {}: {e}", std::any::type_name::<T>()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips() {
        let value = (7u64, String::from("seven"), vec![1u8, 2, 3], Some(-1i32));
        let bytes = encode(&value).unwrap();
        assert_eq!(decode::<(u64, String, Vec<u8>, Option<i32>)>(&bytes).unwrap(), value);
    }

    #[test]
    fn small_varints_that_grow_in_memory_decode() {
        // One byte per element on the wire, 8 or 16 bytes each in memory: the limit must allow
        // for that growth at every size, including just below a tier boundary.
        for len in [10, 255, 4000, 4095, 4096, 70_000] {
            let values: Vec<u64> = (0..len).map(|i| i % 100).collect();
            assert_eq!(decode::<Vec<u64>>(&encode(&values).unwrap()).unwrap(), values);
            let wide: Vec<u128> = (0..len).map(|i| (i % 100) as u128).collect();
            assert_eq!(decode::<Vec<u128>>(&encode(&wide).unwrap()).unwrap(), wide);
        }
    }

    #[test]
    fn rejects_trailing_bytes() {
        let mut bytes = encode(&5u32).unwrap();
        bytes.push(0);
        let err = decode::<u32>(&bytes).unwrap_err();
        assert!(err.to_string().contains("trailing"), "{err}");
    }

    #[test]
    fn huge_length_claim_is_an_error_not_an_allocation() {
        // A varint length prefix of u64::MAX (tag 253 + 8 bytes) followed by nothing.
        let mut bytes = vec![253u8];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<String>(&bytes).is_err());
        assert!(decode::<Vec<u64>>(&bytes).is_err());
        // 2^40 claimed: past the limit for a 9-byte input.
        let mut bytes = vec![253u8];
        bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(decode::<String>(&bytes).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<(String, Vec<u64>, Option<(u8, i64)>)>(&bytes);
            let _ = decode::<Vec<String>>(&bytes);
            let _ = decode::<crate::wire::ToParent>(&bytes);
            let _ = decode::<crate::wire::Start>(&bytes);
        }
    }
}
