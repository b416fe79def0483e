//! [`Bytes`]: a byte buffer that travels as one block, out of band when it is large.
//!
//! serde sees a `Vec<u8>` as a sequence and walks it element by element; `Bytes` tells it the
//! value is a byte string. A small one is written whole into the message. A large one (at least
//! [`BLOCK_MIN`] bytes) sent through a pipe, as task arguments or as a result is not copied into
//! the message at all: the message carries its index, and the channel writes the buffer itself
//! after the frame, from where it lies (like pickle protocol 5's out-of-band buffers). The
//! receiver reads it straight into the allocation that becomes the received `Bytes`. So a
//! 100 MB value costs one kernel copy each way and no serde pass.
//!
//! The buffer is shared (`Arc`), so that a message being sent can hold it without a copy after
//! the value itself was moved or dropped; mutating a `Bytes` whose buffer is still shared
//! copies it first.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use serde::de::{self, EnumAccess, VariantAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::transport::buffer::Buffer;
use crate::transport::codec;

/// The size from which a `Bytes` travels out of band, where the transport supports it.
pub const BLOCK_MIN: usize = 64 * 1024;

/// A byte buffer that travels as one block of bytes, never element by element.
///
/// Cloning is cheap: clones share the buffer until one of them is mutated.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Bytes(Arc<Buffer>);

impl Bytes {
    /// An empty buffer.
    pub fn new() -> Self {
        Bytes::default()
    }

    /// The buffer itself; copied only if a clone still shares it.
    pub fn into_vec(self) -> Vec<u8> {
        match Arc::try_unwrap(self.0) {
            Ok(buffer) => buffer.into_vec(),
            Err(shared) => shared.to_vec(),
        }
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(bytes: Vec<u8>) -> Self {
        Bytes(Arc::new(Buffer::from(bytes)))
    }
}

impl From<&[u8]> for Bytes {
    fn from(bytes: &[u8]) -> Self {
        Bytes::from(bytes.to_vec())
    }
}

impl From<Bytes> for Vec<u8> {
    fn from(bytes: Bytes) -> Self {
        bytes.into_vec()
    }
}

impl Deref for Bytes {
    type Target = Vec<u8>;

    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl DerefMut for Bytes {
    /// The buffer, for writing; copied first if a clone (or a message being sent) shares it.
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        let buffer: &mut Buffer = Arc::make_mut(&mut self.0);
        buffer
    }
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

/// The wire form's name and variants: the bytes themselves, or the index of a block that
/// travels beside the message.
const NAME: &str = "Bytes";
const VARIANTS: &[&str] = &["Inline", "Block"];

/// A borrowed byte string, serialized whole.
struct Inline<'a>(&'a [u8]);

impl Serialize for Inline<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.0.len() >= BLOCK_MIN
            && let Some(index) = codec::push_block(&self.0)
        {
            return serializer.serialize_newtype_variant(NAME, 1, VARIANTS[1], &index);
        }
        serializer.serialize_newtype_variant(NAME, 0, VARIANTS[0], &Inline(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_enum(NAME, VARIANTS, WireVisitor)
    }
}

/// Reads the wire form: which variant, then the bytes or the block.
struct WireVisitor;

impl<'de> Visitor<'de> for WireVisitor {
    type Value = Bytes;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte string or a block index")
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Bytes, A::Error> {
        let (variant, value) = data.variant::<u32>()?;
        match variant {
            0 => value.newtype_variant_seed(InlineSeed),
            1 => {
                let index = value.newtype_variant::<u32>()?;
                codec::take_block(index).map(Bytes::from).map_err(de::Error::custom)
            }
            other => Err(de::Error::invalid_value(
                de::Unexpected::Unsigned(u64::from(other)),
                &"variant 0 (inline) or 1 (block)",
            )),
        }
    }
}

/// Reads an inline byte string with one copy (or none, if the decoder owns it).
struct InlineSeed;

impl<'de> de::DeserializeSeed<'de> for InlineSeed {
    type Value = Bytes;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Bytes, D::Error> {
        deserializer.deserialize_byte_buf(self)
    }
}

impl<'de> Visitor<'de> for InlineSeed {
    type Value = Bytes;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Bytes, E> {
        let mut copy = crate::sys::large_buffer(bytes.len());
        copy.extend_from_slice(bytes);
        Ok(Bytes::from(copy))
    }

    fn visit_byte_buf<E: de::Error>(self, bytes: Vec<u8>) -> Result<Bytes, E> {
        Ok(Bytes::from(bytes))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
        while let Some(byte) = seq.next_element()? {
            bytes.push(byte);
        }
        Ok(Bytes::from(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Bytes {
        Bytes::from((0..=255u8).cycle().take(len).collect::<Vec<u8>>())
    }

    #[test]
    fn travels_as_one_block() {
        let data = sample(100_000);
        let encoded = codec::encode(&data).unwrap();
        // A variant tag and a length prefix, then the bytes as they are.
        assert!(encoded.len() <= data.len() + 10);
        assert!(encoded.ends_with(&data[data.len() - 300..]));
        assert_eq!(codec::decode::<Bytes>(&encoded).unwrap(), data);
    }

    #[test]
    fn a_large_buffer_travels_out_of_band_without_a_copy() {
        let data = sample(BLOCK_MIN);
        let small = sample(BLOCK_MIN - 1);
        let (encoded, attachments) = codec::collecting(|| codec::encode(&(&data, &small)));
        let encoded = encoded.unwrap();
        // The large one is an index; the small one is inline.
        assert!(encoded.len() < small.len() + 20, "{} bytes", encoded.len());
        assert_eq!(attachments.blocks.len(), 1);
        assert!(Arc::ptr_eq(&attachments.blocks[0], &data.0), "the block is the buffer itself");
        let blocks = attachments.blocks.iter().map(|block| block.to_vec()).collect();
        let decoded: (Bytes, Bytes) =
            codec::with_attachments(Vec::new(), blocks, || codec::decode(&encoded)).unwrap();
        assert_eq!(decoded, (data, small));
    }

    #[test]
    fn a_missing_or_reused_block_is_a_decode_error() {
        let data = sample(BLOCK_MIN);
        let (encoded, _) = codec::collecting(|| codec::encode(&(&data, &data)));
        let encoded = encoded.unwrap();
        let missing = codec::with_attachments(Vec::new(), Vec::new(), || {
            codec::decode::<(Bytes, Bytes)>(&encoded)
        });
        assert!(missing.unwrap_err().to_string().contains("block #0"));
        // Both values claim block 0 only if the encoder was lied to; forge it.
        let mut forged = encoded.clone();
        let second = forged.iter().rposition(|&b| b == 1).unwrap();
        forged[second] = 0;
        let reused = codec::with_attachments(Vec::new(), vec![data.to_vec()], || {
            codec::decode::<(Bytes, Bytes)>(&forged)
        });
        assert!(reused.is_err());
    }

    #[test]
    fn writing_to_a_shared_buffer_copies_it() {
        let mut a = sample(10);
        let b = a.clone();
        a[0] = 99;
        assert_eq!(b[0], 0);
        assert_eq!(a[0], 99);
        assert_eq!(b.into_vec().len(), 10);
    }
}
