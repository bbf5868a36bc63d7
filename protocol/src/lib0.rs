//! lib0 encoding: unsigned LEB128 `varUint`, length-prefixed byte arrays and UTF-8 strings.

use thiserror::Error;

/// Largest value a `varUint` may carry: lib0 encodes JavaScript numbers, so 2^53 - 1.
pub const MAX_VAR_UINT: u64 = (1 << 53) - 1;

/// Why a byte sequence is not valid lib0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The input ended inside a value.
    #[error("unexpected end of input")]
    UnexpectedEnd,
    /// A `varUint` was longer than needed, or larger than 2^53 - 1.
    #[error("varUint overflows 53 bits or is overlong")]
    VarUintOverflow,
    /// A length prefix claims more bytes than remain.
    #[error("length prefix {0} exceeds the remaining input")]
    LengthTooLarge(u64),
    /// A `varString` is not valid UTF-8.
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    /// A message type this protocol does not define.
    #[error("unknown message type {0}")]
    UnknownMessageType(u64),
    /// A sync sub-message type this protocol does not define.
    #[error("unknown sync message type {0}")]
    UnknownSyncType(u64),
    /// An auth sub-message type this protocol does not define (only permission denied, 0, exists).
    #[error("unknown auth message type {0}")]
    UnknownAuthType(u64),
    /// A tandem acknowledgement sub-type this protocol does not define.
    #[error("unknown ack message type {0}")]
    UnknownAckType(u64),
    /// An awareness state is not valid JSON.
    #[error("awareness state is not valid JSON")]
    InvalidJson,
    /// Bytes were left over where the structure must end.
    #[error("{0} trailing bytes")]
    TrailingBytes(usize),
}

/// Reads lib0 values from a byte slice, borrowing from it.
#[derive(Debug, Clone)]
pub struct Decoder<'a> {
    buf: &'a [u8],
}

impl<'a> Decoder<'a> {
    /// A decoder at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// The bytes not yet read.
    pub fn remaining(&self) -> &'a [u8] {
        self.buf
    }

    /// Whether everything has been read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Reads one byte.
    pub fn read_u8(&mut self) -> Result<u8, DecodeError> {
        let (&b, rest) = self.buf.split_first().ok_or(DecodeError::UnexpectedEnd)?;
        self.buf = rest;
        Ok(b)
    }

    /// Reads a `varUint`, rejecting truncated, overlong and over-53-bit encodings.
    pub fn read_var_uint(&mut self) -> Result<u64, DecodeError> {
        let mut value: u64 = 0;
        let mut shift = 0u32;
        loop {
            let b = self.read_u8()?;
            let group = u64::from(b & 0x7f);
            if shift >= 53 || (shift > 0 && group << shift >> shift != group) {
                return Err(DecodeError::VarUintOverflow);
            }
            value |= group << shift;
            if b & 0x80 == 0 {
                // A final zero group after the first byte is overlong (e.g. `80 00`).
                if shift > 0 && group == 0 {
                    return Err(DecodeError::VarUintOverflow);
                }
                break;
            }
            shift += 7;
        }
        if value > MAX_VAR_UINT {
            return Err(DecodeError::VarUintOverflow);
        }
        Ok(value)
    }

    /// Reads exactly `len` bytes.
    pub fn read_exact(&mut self, len: u64) -> Result<&'a [u8], DecodeError> {
        if len > self.buf.len() as u64 {
            return Err(DecodeError::LengthTooLarge(len));
        }
        let (head, rest) = self.buf.split_at(len as usize);
        self.buf = rest;
        Ok(head)
    }

    /// Reads a `varUint8Array`: a length, then that many bytes.
    pub fn read_var_bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.read_var_uint()?;
        self.read_exact(len)
    }

    /// Reads a `varString`: a UTF-8 byte length, then the bytes.
    pub fn read_var_string(&mut self) -> Result<&'a str, DecodeError> {
        let bytes = self.read_var_bytes()?;
        std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8)
    }
}

/// Appends `value` as a `varUint`.
pub fn write_var_uint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Appends `bytes` as a `varUint8Array`.
pub fn write_var_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    write_var_uint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Appends `s` as a `varString`.
pub fn write_var_string(out: &mut Vec<u8>, s: &str) {
    write_var_bytes(out, s.as_bytes());
}

/// Number of bytes `value` takes as a `varUint`.
pub fn var_uint_len(value: u64) -> usize {
    let bits = 64 - (value | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(value: u64) -> Vec<u8> {
        let mut out = Vec::new();
        write_var_uint(&mut out, value);
        out
    }

    fn decoded(bytes: &[u8]) -> Result<u64, DecodeError> {
        let mut dec = Decoder::new(bytes);
        let value = dec.read_var_uint()?;
        assert!(dec.is_empty(), "decoder left {:?}", dec.remaining());
        Ok(value)
    }

    #[test]
    fn var_uint_matches_the_documented_encodings() {
        let table: &[(u64, &[u8])] = &[
            (0, &[0x00]),
            (1, &[0x01]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (300, &[0xac, 0x02]),
            (16_383, &[0xff, 0x7f]),
            (16_384, &[0x80, 0x80, 0x01]),
            (1_234_567, &[0x87, 0xad, 0x4b]),
            (
                MAX_VAR_UINT,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f],
            ),
        ];
        for &(value, bytes) in table {
            assert_eq!(encoded(value), bytes, "encode {value}");
            assert_eq!(decoded(bytes), Ok(value), "decode {bytes:02x?}");
            assert_eq!(var_uint_len(value), bytes.len(), "len {value}");
        }
    }

    #[test]
    fn var_uint_round_trips_around_every_group_boundary() {
        for bits in 0..=53u32 {
            for value in [
                (1u64 << bits).saturating_sub(1),
                1u64 << bits,
                (1u64 << bits) + 1,
            ] {
                if value > MAX_VAR_UINT {
                    continue;
                }
                let bytes = encoded(value);
                assert_eq!(bytes.len(), var_uint_len(value), "{value}");
                assert_eq!(decoded(&bytes), Ok(value), "{value}");
            }
        }
    }

    #[test]
    fn var_uint_len_covers_the_whole_u64_range() {
        assert_eq!(var_uint_len(0), 1);
        assert_eq!(var_uint_len(u64::MAX), 10);
        assert_eq!(encoded(u64::MAX).len(), 10);
    }

    #[test]
    fn truncated_var_uint_is_unexpected_end() {
        assert_eq!(decoded(&[]), Err(DecodeError::UnexpectedEnd));
        assert_eq!(decoded(&[0x80]), Err(DecodeError::UnexpectedEnd));
        assert_eq!(decoded(&[0xac]), Err(DecodeError::UnexpectedEnd));
        assert_eq!(
            decoded(&[0xff, 0xff, 0xff]),
            Err(DecodeError::UnexpectedEnd)
        );
    }

    #[test]
    fn overlong_var_uint_is_rejected() {
        assert_eq!(decoded(&[0x80, 0x00]), Err(DecodeError::VarUintOverflow));
        assert_eq!(decoded(&[0x81, 0x00]), Err(DecodeError::VarUintOverflow));
        assert_eq!(
            decoded(&[0xac, 0x82, 0x00]),
            Err(DecodeError::VarUintOverflow)
        );
        assert_eq!(
            decoded(&[0xff, 0x80, 0x80, 0x00]),
            Err(DecodeError::VarUintOverflow)
        );
    }

    #[test]
    fn var_uint_over_53_bits_is_rejected() {
        // 2^53: one more than the largest JavaScript-safe integer.
        let two_pow_53 = [0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10];
        assert_eq!(decoded(&two_pow_53), Err(DecodeError::VarUintOverflow));
        assert_eq!(
            decoded(&encoded(u64::MAX)),
            Err(DecodeError::VarUintOverflow)
        );
        // A ninth group, even a small one, is past 53 bits.
        let nine = [0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01];
        assert_eq!(decoded(&nine), Err(DecodeError::VarUintOverflow));
        // An endless run of continuation bytes stops at the limit instead of reading on.
        assert_eq!(decoded(&[0xff; 64]), Err(DecodeError::VarUintOverflow));
    }

    #[test]
    fn var_bytes_and_strings_round_trip() {
        let mut out = Vec::new();
        write_var_bytes(&mut out, &[1, 2, 3]);
        write_var_string(&mut out, "héllo");
        write_var_bytes(&mut out, &[]);
        write_var_string(&mut out, "");
        assert_eq!(&out[..4], &[3, 1, 2, 3]);
        assert_eq!(out[4], 6, "byte length, not char count");

        let mut dec = Decoder::new(&out);
        assert_eq!(dec.read_var_bytes(), Ok(&[1u8, 2, 3][..]));
        assert_eq!(dec.read_var_string(), Ok("héllo"));
        assert_eq!(dec.read_var_bytes(), Ok(&[][..]));
        assert_eq!(dec.read_var_string(), Ok(""));
        assert!(dec.is_empty());
    }

    #[test]
    fn length_prefix_past_the_end_is_rejected_without_consuming() {
        let mut dec = Decoder::new(&[0x05, 1, 2, 3]);
        assert_eq!(dec.read_var_bytes(), Err(DecodeError::LengthTooLarge(5)));
        // A huge claimed length must not be allocated or sliced.
        let mut huge = Vec::new();
        write_var_uint(&mut huge, MAX_VAR_UINT);
        huge.push(0);
        let mut dec = Decoder::new(&huge);
        assert_eq!(
            dec.read_var_bytes(),
            Err(DecodeError::LengthTooLarge(MAX_VAR_UINT))
        );
    }

    #[test]
    fn read_exact_and_read_u8_respect_the_end() {
        let mut dec = Decoder::new(&[9, 8]);
        assert_eq!(dec.read_exact(3), Err(DecodeError::LengthTooLarge(3)));
        assert_eq!(dec.read_exact(1), Ok(&[9u8][..]));
        assert_eq!(dec.read_u8(), Ok(8));
        assert_eq!(dec.read_u8(), Err(DecodeError::UnexpectedEnd));
        assert_eq!(dec.read_exact(0), Ok(&[][..]));
    }

    #[test]
    fn invalid_utf8_string_is_rejected() {
        let mut dec = Decoder::new(&[0x02, 0xc3, 0x28]);
        assert_eq!(dec.read_var_string(), Err(DecodeError::InvalidUtf8));
        let mut dec = Decoder::new(&[0x01, 0xff]);
        assert_eq!(dec.read_var_string(), Err(DecodeError::InvalidUtf8));
    }
}
