//! The decoding half of the codec: bincode's primitives back into serde's data model.
//!
//! The input is always a slice in memory, so a length the bytes claim is checked against the
//! bytes that are actually left before anything is allocated for it: a string or a packed
//! sequence is borrowed from the input first and copied only once it is known to be there,
//! and the size hint an element-wise sequence gives its visitor never exceeds the bytes left.
//! No byte limit is needed, and none is paid for per element.

use bincode::de::read::{BorrowReader, Reader};
use bincode::de::{BorrowDecode, DecoderImpl};
use bincode::error::DecodeError;
use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};

use std::mem::MaybeUninit;

use super::packed::{self, Kind};
use super::{Arrival, CodecError, Input, config};

/// A sequence may claim more elements than there are bytes left only if its elements take no
/// bytes (a `Vec<()>`); beyond this many, such a claim is taken for what it almost surely is, a
/// corrupt length, rather than looped over.
const MAX_EMPTY_ELEMENTS: usize = 1 << 24;

/// What is left of the input.
struct Cursor<'de> {
    /// The bytes left that are known to be in place (all of them, unless arriving).
    rest: &'de [u8],
    /// For input still arriving: all of it, and what says how much is in place.
    arriving: Option<(&'de [u8], &'de dyn Arrival)>,
}

impl<'de> Cursor<'de> {
    /// Bytes left to read, in place or not.
    #[inline]
    fn left(&self) -> usize {
        match self.arriving {
            None => self.rest.len(),
            Some((all, _)) => all.len() - self.position(all),
        }
    }

    /// How far into `all` (the whole arriving input) the reading is.
    fn position(&self, all: &[u8]) -> usize {
        self.rest.as_ptr() as usize - all.as_ptr() as usize
    }

    /// Makes `rest` hold at least `len` bytes, waiting for arriving input; fails if the input
    /// is shorter, or will never arrive.
    #[cold]
    fn more(&mut self, len: usize) -> Result<(), DecodeError> {
        let Some((all, arrival)) = self.arriving else {
            return Err(DecodeError::UnexpectedEnd { additional: len - self.rest.len() });
        };
        let position = self.position(all);
        let needed = position + len;
        if needed > all.len() {
            return Err(DecodeError::UnexpectedEnd { additional: needed - all.len() });
        }
        let ready = arrival.wait_for(needed).map_err(DecodeError::OtherString)?;
        self.rest = &all[position..ready.clamp(needed, all.len())];
        Ok(())
    }

    /// The next byte, without taking it.
    fn peek_byte(&mut self) -> Option<u8> {
        if self.rest.is_empty() && self.arriving.is_some() {
            self.more(1).ok()?;
        }
        self.rest.first().copied()
    }

    /// Copies the next `out.len()` bytes into `out` as they arrive.
    fn copy_arriving(&mut self, out: &mut [MaybeUninit<u8>]) -> Result<(), DecodeError> {
        let mut done = 0;
        while done < out.len() {
            if self.rest.is_empty() {
                self.more(1)?;
            }
            let n = self.rest.len().min(out.len() - done);
            let (piece, rest) = self.rest.split_at(n);
            crate::sys::copy_into(&mut out[done..done + n], piece);
            self.rest = rest;
            done += n;
        }
        Ok(())
    }
}

impl Reader for Cursor<'_> {
    #[inline]
    fn read(&mut self, bytes: &mut [u8]) -> Result<(), DecodeError> {
        let taken = self.take_bytes(bytes.len())?;
        bytes.copy_from_slice(taken);
        Ok(())
    }

    #[inline]
    fn peek_read(&mut self, n: usize) -> Option<&[u8]> {
        // Short of arriving input, `None` sends bincode to `read`, which waits.
        self.rest.get(..n)
    }

    #[inline]
    fn consume(&mut self, n: usize) {
        self.rest = &self.rest[n.min(self.rest.len())..];
    }
}

impl<'de> BorrowReader<'de> for Cursor<'de> {
    #[inline]
    fn take_bytes(&mut self, length: usize) -> Result<&'de [u8], DecodeError> {
        if length > self.rest.len() {
            self.more(length)?;
        }
        let (taken, rest) = self.rest.split_at(length);
        self.rest = rest;
        Ok(taken)
    }
}

/// A serde `Deserializer` reading from a slice.
pub(super) struct Decoder<'de> {
    /// bincode's decoder over what is left of the input, kept for the whole decode (building
    /// one per primitive costs a store-forwarding stall on every element).
    inner: DecoderImpl<Cursor<'de>, bincode::config::Configuration, ()>,
    /// How many compound values (options, newtypes, sequences, maps, structs, enums) the value
    /// being decoded is inside of; see [`MAX_DEPTH`](super::MAX_DEPTH).
    depth: u32,
}

impl<'de> Decoder<'de> {
    pub(super) fn new(input: &'de [u8]) -> Self {
        Self::with_cursor(Cursor { rest: input, arriving: None })
    }

    /// A decoder of `input`, which may still be arriving.
    pub(super) fn with_input(input: Input<'de>) -> Self {
        match input.arrival {
            None => Self::new(input.bytes),
            Some(arrival) => Self::with_cursor(Cursor {
                rest: &input.bytes[..0],
                arriving: Some((input.bytes, arrival)),
            }),
        }
    }

    fn with_cursor(cursor: Cursor<'de>) -> Self {
        Decoder { inner: DecoderImpl::new(cursor, config(), ()), depth: 0 }
    }

    /// Decodes one level deeper: every compound value goes through here, so that bytes that
    /// nest a million levels deep are an error and not a stack overflow, which would abort
    /// the process.
    #[inline]
    fn nested<R>(
        &mut self,
        decode: impl FnOnce(&mut Self) -> Result<R, CodecError>,
    ) -> Result<R, CodecError> {
        if self.depth >= super::MAX_DEPTH {
            return Err(CodecError::new(format!(
                "the value nests deeper than {} levels",
                super::MAX_DEPTH
            )));
        }
        self.depth += 1;
        let result = decode(self);
        self.depth -= 1;
        result
    }

    /// What is left of the input.
    #[inline]
    fn rest(&mut self) -> &mut Cursor<'de> {
        bincode::de::Decoder::reader(&mut self.inner)
    }

    /// Bytes not decoded yet.
    pub(super) fn left(&mut self) -> usize {
        self.rest().left()
    }

    /// Reads a `T` the way bincode writes it.
    #[inline]
    fn get<T: BorrowDecode<'de, ()>>(&mut self) -> Result<T, CodecError> {
        T::borrow_decode(&mut self.inner).map_err(decode_error)
    }

    /// Reads a sequence or map length, refusing one that the bytes left cannot hold.
    fn get_len(&mut self) -> Result<usize, CodecError> {
        let len = usize::try_from(self.get::<u64>()?)
            .map_err(|_| CodecError::new("a length does not fit in memory"))?;
        let left = self.left();
        if len > left && len > MAX_EMPTY_ELEMENTS {
            return Err(CodecError::new(format!(
                "the bytes claim {len} elements with only {left} bytes left"
            )));
        }
        Ok(len)
    }

    /// The kind and elements of a packed sequence, if one comes next (see `packed`).
    fn get_packed(&mut self) -> Result<Option<(Kind, &'de [u8])>, CodecError> {
        let Some((kind, size)) = self.get_packed_head()? else { return Ok(None) };
        self.take(size).map(|bytes| Some((kind, bytes)))
    }

    /// The kind of a packed sequence and the size of its elements in bytes, if one comes next;
    /// its elements are next to read.
    fn get_packed_head(&mut self) -> Result<Option<(Kind, usize)>, CodecError> {
        if self.rest().peek_byte() != Some(packed::PACKED) {
            return Ok(None);
        }
        self.take(1)?;
        let byte = self.get::<u8>()?;
        let kind = Kind::from_byte(byte)
            .ok_or_else(|| CodecError::new(format!("unknown packed element kind {byte}")))?;
        let len = usize::try_from(self.get::<u64>()?).unwrap_or(usize::MAX);
        let left = self.left();
        let size = len.checked_mul(kind.width()).filter(|size| *size <= left).ok_or_else(|| {
            CodecError::new(format!(
                "the bytes claim {len} packed elements with only {left} bytes left"
            ))
        })?;
        Ok(Some((kind, size)))
    }

    /// A byte string: length-prefixed, or a packed sequence of `u8`, which is what a `Vec<u8>`
    /// or `&[u8]` is written as (so a `Vec<u8>` still reads as `serde_bytes` or `Bytes`, as it
    /// did with bincode).
    fn get_bytes(&mut self) -> Result<&'de [u8], CodecError> {
        match self.get_packed()? {
            None => self.get::<&'de [u8]>(),
            Some((Kind::U8, bytes)) => Ok(bytes),
            Some((kind, _)) => {
                Err(CodecError::new(format!("expected bytes, found packed {kind:?} elements")))
            }
        }
    }

    /// Takes the next `len` bytes.
    fn take(&mut self, len: usize) -> Result<&'de [u8], CodecError> {
        self.rest().take_bytes(len).map_err(decode_error)
    }

    /// `visitor` over `len` elements written one after another.
    fn elements<V: Visitor<'de>>(
        &mut self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        self.nested(|de| visitor.visit_seq(Elements::new(de, len)))
    }
}

fn decode_error(e: DecodeError) -> CodecError {
    CodecError::new(e.to_string())
}

impl de::Error for CodecError {
    fn custom<T: std::fmt::Display>(message: T) -> Self {
        CodecError::new(message.to_string())
    }
}

macro_rules! primitives {
    ($($method:ident => $visit:ident($ty:ty)),* $(,)?) => {
        $(
            #[inline]
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
                visitor.$visit(self.get::<$ty>()?)
            }
        )*
    };
}

impl<'de> de::Deserializer<'de> for &mut Decoder<'de> {
    type Error = CodecError;

    primitives! {
        deserialize_bool => visit_bool(bool), deserialize_char => visit_char(char),
        deserialize_u8 => visit_u8(u8), deserialize_u16 => visit_u16(u16),
        deserialize_u32 => visit_u32(u32), deserialize_u64 => visit_u64(u64),
        deserialize_u128 => visit_u128(u128), deserialize_i8 => visit_i8(i8),
        deserialize_i16 => visit_i16(i16), deserialize_i32 => visit_i32(i32),
        deserialize_i64 => visit_i64(i64), deserialize_i128 => visit_i128(i128),
        deserialize_f32 => visit_f32(f32), deserialize_f64 => visit_f64(f64),
        deserialize_str => visit_borrowed_str(&'de str),
        deserialize_string => visit_borrowed_str(&'de str),
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        visitor.visit_borrowed_bytes(self.get_bytes()?)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        visitor.visit_borrowed_bytes(self.get_bytes()?)
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, CodecError> {
        Err(CodecError::new("the format is not self-describing: the type must say what comes"))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        self.deserialize_any(visitor)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        self.deserialize_u32(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        match self.get::<u8>()? {
            0 => visitor.visit_none(),
            1 => self.nested(|de| visitor.visit_some(de)),
            tag => Err(CodecError::new(format!("an option's tag is {tag}, not 0 or 1"))),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        self.nested(|de| visitor.visit_newtype_struct(de))
    }

    /// A packed sequence becomes the `Vec` its visitor wants in one copy, when that is a `Vec`
    /// of its very element type; otherwise its elements are handed over one by one.
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        let Some((kind, size)) = self.get_packed_head()? else {
            let len = self.get_len()?;
            return self.elements(len, visitor);
        };
        if self.rest().arriving.is_some() {
            // Copied as it arrives, into memory made ready while it does.
            let cursor = self.rest();
            let fill = |out: &mut [MaybeUninit<u8>]| cursor.copy_arriving(out);
            if let Some(vec) = packed::to_vec_filled::<V::Value, _>(kind, size, fill) {
                return vec.map_err(decode_error);
            }
        }
        let bytes = self.take(size)?;
        match packed::to_vec::<V::Value>(kind, bytes) {
            Some(vec) => Ok(vec),
            None => visitor.visit_seq(Packed { kind, bytes }),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        self.elements(len, visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        self.elements(len, visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        let len = self.get_len()?;
        self.nested(|de| visitor.visit_map(Elements::new(de, len)))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        self.elements(fields.len(), visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        visitor.visit_enum(self)
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

/// The elements of a sequence, tuple or struct, or the entries of a map, one after another.
struct Elements<'a, 'de> {
    de: &'a mut Decoder<'de>,
    len: usize,
    /// The bytes that were left when the elements began: no more elements can follow than
    /// that (bar zero-size ones, which need no room).
    room: usize,
}

impl<'a, 'de> Elements<'a, 'de> {
    fn new(de: &'a mut Decoder<'de>, len: usize) -> Self {
        let room = de.left();
        Elements { de, len, room }
    }

    /// The next element (or map key), if any is left.
    fn next<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, CodecError> {
        if self.len == 0 {
            return Ok(None);
        }
        self.len -= 1;
        seed.deserialize(&mut *self.de).map(Some)
    }

    /// What is left to decode, but never more than there are bytes left: a visitor that
    /// allocates for it cannot be made to allocate more than the input could fill.
    fn size_hint(&self) -> Option<usize> {
        Some(self.len.min(self.room))
    }
}

impl<'de> de::SeqAccess<'de> for Elements<'_, 'de> {
    type Error = CodecError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, CodecError> {
        self.next(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        Elements::size_hint(self)
    }
}

impl<'de> de::MapAccess<'de> for Elements<'_, 'de> {
    type Error = CodecError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, CodecError> {
        self.next(seed)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, CodecError> {
        seed.deserialize(&mut *self.de)
    }

    fn size_hint(&self) -> Option<usize> {
        Elements::size_hint(self)
    }
}

impl<'de> de::EnumAccess<'de> for &mut Decoder<'de> {
    type Error = CodecError;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self), CodecError> {
        let index = self.get::<u32>()?;
        let variant = seed.deserialize(IntoDeserializer::<CodecError>::into_deserializer(index))?;
        Ok((variant, self))
    }
}

impl<'de> de::VariantAccess<'de> for &mut Decoder<'de> {
    type Error = CodecError;

    fn unit_variant(self) -> Result<(), CodecError> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<T::Value, CodecError> {
        self.nested(|de| seed.deserialize(de))
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        self.elements(len, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        self.elements(fields.len(), visitor)
    }
}

/// The elements of a packed sequence, one by one, for a visitor that wants something other
/// than a `Vec` of their type.
struct Packed<'de> {
    kind: Kind,
    /// The elements not handed over yet.
    bytes: &'de [u8],
}

impl<'de> de::SeqAccess<'de> for Packed<'de> {
    type Error = CodecError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, CodecError> {
        if self.bytes.is_empty() {
            return Ok(None);
        }
        let (element, rest) = self.bytes.split_at(self.kind.width());
        self.bytes = rest;
        seed.deserialize(Number { kind: self.kind, bytes: element }).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.bytes.len() / self.kind.width())
    }
}

/// One element of a packed sequence, as a deserializer of its own.
struct Number<'a> {
    kind: Kind,
    bytes: &'a [u8],
}

impl<'de> de::Deserializer<'de> for Number<'_> {
    type Error = CodecError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        packed::visit(self.kind, self.bytes, visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier
        ignored_any
    }
}
