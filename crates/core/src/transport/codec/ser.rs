//! The encoding half of the codec: serde's data model onto bincode's primitives.
//!
//! Numbers, strings and lengths are written by bincode's own `Encode` impls (varint integers,
//! length-prefixed strings); this module decides what serde's compound shapes become, which is
//! bincode's layout too, with one addition: a slice of plain numbers is written whole (see
//! [`packed`](super::packed)).

use bincode::enc::write::Writer;
use bincode::enc::{Encode, Encoder as _, EncoderImpl};
use bincode::error::EncodeError;
use serde::ser::{self, Serialize};

use super::{CodecError, packed};

/// A serde `Serializer` writing to `W`.
pub(super) struct Encoder<W: Writer> {
    inner: EncoderImpl<W, bincode::config::Configuration>,
    /// How many compound values the value being written is inside of: a value the receiver
    /// would refuse as too deep ([`MAX_DEPTH`](super::MAX_DEPTH)) fails here, as the sender's
    /// `Encode` error, instead of on the other side.
    depth: u32,
}

impl<W: Writer> Encoder<W> {
    pub(super) fn new(out: W) -> Self {
        Encoder { inner: EncoderImpl::new(out, super::config()), depth: 0 }
    }

    /// Enters one compound level; [`leave`](Self::leave) undoes it.
    #[inline]
    fn enter(&mut self) -> Result<&mut Self, CodecError> {
        if self.depth >= super::MAX_DEPTH {
            return Err(CodecError::new(format!(
                "the value nests deeper than {} levels",
                super::MAX_DEPTH
            )));
        }
        self.depth += 1;
        Ok(self)
    }

    #[inline]
    fn leave(&mut self) {
        self.depth -= 1;
    }

    /// Writes `value` one compound level deeper.
    #[inline]
    fn nested<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), CodecError> {
        value.serialize(&mut *self.enter()?)?;
        self.leave();
        Ok(())
    }

    /// Writes `value` the way bincode does.
    #[inline]
    fn put<T: Encode + ?Sized>(&mut self, value: &T) -> Result<(), CodecError> {
        value.encode(&mut self.inner).map_err(encode_error)
    }

    /// Starts a variant with fields: its index, then the fields as they come.
    fn begin_variant(&mut self, index: u32) -> Result<&mut Self, CodecError> {
        self.put(&index)?;
        self.enter()
    }

    /// Writes a sequence or map length.
    fn put_len(&mut self, len: Option<usize>) -> Result<(), CodecError> {
        let len = len.ok_or_else(|| CodecError::new("a sequence must know its length"))?;
        self.put(&(len as u64))
    }
}

fn encode_error(e: EncodeError) -> CodecError {
    CodecError::new(e.to_string())
}

impl ser::Error for CodecError {
    fn custom<T: std::fmt::Display>(message: T) -> Self {
        CodecError::new(message.to_string())
    }
}

macro_rules! primitives {
    ($($method:ident($ty:ty)),* $(,)?) => {
        $(
            #[inline]
            fn $method(self, value: $ty) -> Result<(), CodecError> {
                self.put(&value)
            }
        )*
    };
}

impl<W: Writer> ser::Serializer for &mut Encoder<W> {
    type Ok = ();
    type Error = CodecError;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    primitives! {
        serialize_bool(bool), serialize_char(char), serialize_str(&str), serialize_bytes(&[u8]),
        serialize_u8(u8), serialize_u16(u16), serialize_u32(u32), serialize_u64(u64),
        serialize_u128(u128), serialize_i8(i8), serialize_i16(i16), serialize_i32(i32),
        serialize_i64(i64), serialize_i128(i128), serialize_f32(f32), serialize_f64(f64),
    }

    fn serialize_none(self) -> Result<(), CodecError> {
        self.put(&0u8)
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), CodecError> {
        self.put(&1u8)?;
        self.nested(value)
    }

    fn serialize_unit(self) -> Result<(), CodecError> {
        Ok(())
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), CodecError> {
        Ok(())
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        index: u32,
        _variant: &'static str,
    ) -> Result<(), CodecError> {
        self.put(&index)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), CodecError> {
        self.nested(value)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        index: u32,
        _variant: &'static str,
        value: &T,
    ) -> Result<(), CodecError> {
        self.put(&index)?;
        self.nested(value)
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<Self, CodecError> {
        self.put_len(len)?;
        self.enter()
    }

    /// A slice of plain numbers is written whole; anything else element by element.
    fn collect_seq<I>(self, iter: I) -> Result<(), CodecError>
    where
        I: IntoIterator,
        I::Item: Serialize,
    {
        let iter = iter.into_iter();
        if let Some((kind, bytes)) = packed::as_bytes(&iter) {
            self.put(&packed::PACKED)?;
            self.put(&(kind as u8))?;
            self.put(&((bytes.len() / kind.width()) as u64))?;
            return self.inner.writer().write(bytes).map_err(encode_error);
        }
        let (low, high) = iter.size_hint();
        self.put_len((Some(low) == high).then_some(low))?;
        self.enter()?;
        for item in iter {
            item.serialize(&mut *self)?;
        }
        self.leave();
        Ok(())
    }

    fn serialize_tuple(self, _len: usize) -> Result<Self, CodecError> {
        self.enter()
    }

    fn serialize_tuple_struct(self, _name: &'static str, _len: usize) -> Result<Self, CodecError> {
        self.enter()
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self, CodecError> {
        self.begin_variant(index)
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Self, CodecError> {
        self.put_len(len)?;
        self.enter()
    }

    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Self, CodecError> {
        self.enter()
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self, CodecError> {
        self.begin_variant(index)
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

/// One body for every compound's element, field and end: the shape was fixed when it began.
macro_rules! compound {
    ($($trait:ident :: $method:ident $(($key:ident))?),* $(,)?) => {
        $(
            impl<W: Writer> ser::$trait for &mut Encoder<W> {
                type Ok = ();
                type Error = CodecError;

                #[inline]
                fn $method<T: Serialize + ?Sized>(
                    &mut self,
                    $($key: &'static str,)?
                    value: &T,
                ) -> Result<(), CodecError> {
                    $(let _ = $key;)?
                    value.serialize(&mut **self)
                }

                fn end(self) -> Result<(), CodecError> {
                    self.leave();
                    Ok(())
                }
            }
        )*
    };
}

compound! {
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field,
    SerializeStruct::serialize_field(key),
    SerializeStructVariant::serialize_field(key),
}

impl<W: Writer> ser::SerializeMap for &mut Encoder<W> {
    type Ok = ();
    type Error = CodecError;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), CodecError> {
        key.serialize(&mut **self)
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), CodecError> {
        value.serialize(&mut **self)
    }

    fn end(self) -> Result<(), CodecError> {
        self.leave();
        Ok(())
    }
}
