//! Sequences of plain numbers (`Vec<u8>`, `&[u64]`, `Vec<f32>`, ...) written as one block of
//! memory instead of element by element.
//!
//! serde hands a format one element at a time, so a 100 MB `Vec<u8>` costs 100 million calls
//! each way. The encoder recognises a slice of numbers in `collect_seq` (which serde's `Vec`,
//! slice and `Box<[T]>` impls call) and writes `PACKED`, the element kind, the length and the
//! elements as they lie in memory. The decoder, asked for a `Vec` of that very number type,
//! copies the block into one; asked for anything else (a `VecDeque`, a `Vec` of a wider type,
//! a user's visitor) it hands the elements over one by one, so the wire form never limits
//! what a value may be decoded as.
//!
//! Elements are in the machine's byte order: both ends of every multiproc channel are on
//! one host.

use serde::de::Visitor;

use crate::sys;

/// First byte of a packed sequence. A sequence's length is a bincode varint, whose first byte
/// is at most 253 (254 only starts a `u128`), so 255 never starts an element-wise sequence.
pub(super) const PACKED: u8 = 255;

/// What the elements of a packed sequence are (the byte after [`PACKED`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    U8 = 1,
    U16,
    U32,
    U64,
    U128,
    I8,
    I16,
    I32,
    I64,
    I128,
    F32,
    F64,
}

/// `usize` and `isize` travel as the fixed-width type of the same size (serde, too, writes
/// them as `u64` / `i64`).
const USIZE: Kind = if usize::BITS == 64 { Kind::U64 } else { Kind::U32 };
const ISIZE: Kind = if usize::BITS == 64 { Kind::I64 } else { Kind::I32 };

impl Kind {
    /// The kind this byte names, if any.
    pub(super) fn from_byte(byte: u8) -> Option<Kind> {
        use Kind::*;
        [U8, U16, U32, U64, U128, I8, I16, I32, I64, I128, F32, F64]
            .into_iter()
            .find(|kind| *kind as u8 == byte)
    }

    /// Bytes per element.
    pub(super) fn width(self) -> usize {
        use Kind::*;
        match self {
            U8 | I8 => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 => 8,
            U128 | I128 => 16,
        }
    }
}

/// Reads one element of `kind` from the start of `bytes` (at least `kind.width()` long).
macro_rules! element {
    ($ty:ty, $bytes:expr) => {
        <$ty>::from_ne_bytes($bytes[..size_of::<$ty>()].try_into().expect("width checked"))
    };
}

/// Hands one element of `kind`, the first `kind.width()` bytes of `bytes`, to `visitor`.
pub(super) fn visit<'de, V: Visitor<'de>, E: serde::de::Error>(
    kind: Kind,
    bytes: &[u8],
    visitor: V,
) -> Result<V::Value, E> {
    match kind {
        Kind::U8 => visitor.visit_u8(bytes[0]),
        Kind::U16 => visitor.visit_u16(element!(u16, bytes)),
        Kind::U32 => visitor.visit_u32(element!(u32, bytes)),
        Kind::U64 => visitor.visit_u64(element!(u64, bytes)),
        Kind::U128 => visitor.visit_u128(element!(u128, bytes)),
        Kind::I8 => visitor.visit_i8(element!(i8, bytes)),
        Kind::I16 => visitor.visit_i16(element!(i16, bytes)),
        Kind::I32 => visitor.visit_i32(element!(i32, bytes)),
        Kind::I64 => visitor.visit_i64(element!(i64, bytes)),
        Kind::I128 => visitor.visit_i128(element!(i128, bytes)),
        Kind::F32 => visitor.visit_f32(element!(f32, bytes)),
        Kind::F64 => visitor.visit_f64(element!(f64, bytes)),
    }
}

macro_rules! numbers {
    ($($ty:ty => $kind:expr),* $(,)?) => {
        /// The elements that `iter` would yield, as one block of memory, when it walks a slice
        /// of plain numbers.
        pub(super) fn as_bytes<I>(iter: &I) -> Option<(Kind, &[u8])> {
            $(
                if let Some(slice) = sys::as_slice::<I, $ty>(iter) {
                    return Some(($kind, bytemuck::cast_slice(slice)));
                }
            )*
            None
        }

        /// `bytes` (whole elements of `kind`) as a `V`, when `V` is a `Vec` of exactly that
        /// number type.
        pub(super) fn to_vec<V>(kind: Kind, bytes: &[u8]) -> Option<V> {
            $(
                if kind == $kind && unty::type_equal::<V, Vec<$ty>>() {
                    return sys::vec_as::<V, $ty>(sys::vec_from_bytes(bytes)).ok();
                }
            )*
            None
        }

        /// [`to_vec`] of `size` bytes that `fill` copies in, into memory faulted in first:
        /// for elements that are still arriving. `None` if `V` is not a `Vec` of exactly that
        /// number type (then `fill` is not called).
        pub(super) fn to_vec_filled<V, E>(
            kind: Kind,
            size: usize,
            fill: impl FnOnce(&mut [std::mem::MaybeUninit<u8>]) -> Result<(), E>,
        ) -> Option<Result<V, E>> {
            $(
                if kind == $kind && unty::type_equal::<V, Vec<$ty>>() {
                    let vec = sys::vec_filled::<$ty, E>(size / kind.width(), fill);
                    return vec.map(|vec| sys::vec_as::<V, $ty>(vec).ok()).transpose();
                }
            )*
            None
        }
    };
}

numbers! {
    u8 => Kind::U8, u16 => Kind::U16, u32 => Kind::U32, u64 => Kind::U64, u128 => Kind::U128,
    i8 => Kind::I8, i16 => Kind::I16, i32 => Kind::I32, i64 => Kind::I64, i128 => Kind::I128,
    f32 => Kind::F32, f64 => Kind::F64, usize => USIZE, isize => ISIZE,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_byte() {
        for byte in 0..=255u8 {
            if let Some(kind) = Kind::from_byte(byte) {
                assert_eq!(kind as u8, byte);
            }
        }
        assert_eq!(Kind::from_byte(0), None);
        assert_eq!(Kind::from_byte(Kind::F64 as u8), Some(Kind::F64));
    }

    #[test]
    fn slices_of_numbers_are_seen_whole_and_nothing_else_is() {
        let values = [1u32, 2, 3];
        let iter = values.iter();
        let (kind, bytes) = as_bytes(&iter).unwrap();
        assert_eq!((kind, bytes.len()), (Kind::U32, 12));
        assert!(as_bytes(&[true, false].iter()).is_none());
        assert!(as_bytes(&['a'].iter()).is_none());
        assert!(as_bytes(&values.iter().map(|v| v + 1)).is_none());
    }

    #[test]
    fn a_vec_is_made_only_for_its_own_kind() {
        let bytes = bytemuck::cast_slice::<u32, u8>(&[5, 6]).to_vec();
        assert_eq!(to_vec::<Vec<u32>>(Kind::U32, &bytes), Some(vec![5, 6]));
        assert_eq!(to_vec::<Vec<i32>>(Kind::U32, &bytes), None);
        assert_eq!(to_vec::<Vec<u64>>(Kind::U32, &bytes), None);
        assert_eq!(to_vec::<std::collections::VecDeque<u32>>(Kind::U32, &bytes), None);
    }
}
