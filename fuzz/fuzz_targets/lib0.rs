//! lib0 primitives: varUint, varUint8Array, varString, readExact, readU8.
//!
//! The input is both the program and the data: each step reads one selector byte from the
//! decoder, then performs the selected read on what follows. Every successful read is checked
//! against an independent reference decoder and against the encoder (tandem decodes strictly, so
//! a value re-encodes to exactly the bytes it was read from).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_protocol::lib0::{
    var_uint_len, write_var_bytes, write_var_string, write_var_uint, DecodeError, Decoder,
    MAX_VAR_UINT,
};

/// A plain reading of the wire contract (PROTOCOL.md, "Encoding"), written independently of
/// `Decoder::read_var_uint`: returns the value and the bytes it took, or `None` when invalid.
fn reference_var_uint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value: u128 = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if i >= 8 {
            // 8 groups carry 56 bits, more than 53: a ninth byte is never valid.
            return None;
        }
        value |= u128::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if i > 0 && b == 0 {
                return None; // overlong: a final zero group
            }
            return (value <= u128::from(MAX_VAR_UINT)).then_some((value as u64, i + 1));
        }
    }
    None // truncated
}

fn consumed(before: &[u8], dec: &Decoder<'_>) -> usize {
    let after = dec.remaining();
    // The decoder only ever moves forward inside its input.
    assert!(after.len() <= before.len());
    assert_eq!(
        after.as_ptr() as usize,
        before.as_ptr() as usize + (before.len() - after.len()),
        "remaining() is not a suffix of the input"
    );
    before.len() - after.len()
}

fuzz_target!(|data: &[u8]| {
    let mut dec = Decoder::new(data);
    while let Ok(op) = dec.read_u8() {
        let before = dec.remaining();
        match op % 5 {
            0 => {
                let r = dec.read_var_uint();
                let n = consumed(before, &dec);
                match (r, reference_var_uint(before)) {
                    (Ok(v), Some((w, len))) => {
                        assert_eq!(v, w);
                        assert_eq!(n, len);
                        assert!(v <= MAX_VAR_UINT);
                        assert_eq!(var_uint_len(v), n);
                        let mut out = Vec::new();
                        write_var_uint(&mut out, v);
                        assert_eq!(out, &before[..n], "not canonical");
                    }
                    (Err(e), None) => {
                        assert!(
                            matches!(e, DecodeError::UnexpectedEnd | DecodeError::VarUintOverflow),
                            "{e:?}"
                        );
                        return; // the rest of the input is not meaningful after an error
                    }
                    (r, reference) => panic!("decoder {r:?}, reference {reference:?}"),
                }
            }
            1 | 2 => {
                let r = if op % 5 == 1 {
                    dec.read_var_bytes()
                } else {
                    dec.read_var_string().map(str::as_bytes)
                };
                let n = consumed(before, &dec);
                match r {
                    Ok(bytes) => {
                        let (len, prefix) = reference_var_uint(before).expect("length decoded");
                        assert_eq!(bytes.len() as u64, len);
                        assert_eq!(n, prefix + bytes.len());
                        assert_eq!(bytes, &before[prefix..n]);
                        let mut out = Vec::new();
                        if op % 5 == 1 {
                            write_var_bytes(&mut out, bytes);
                        } else {
                            let s = std::str::from_utf8(bytes).expect("a string is UTF-8");
                            write_var_string(&mut out, s);
                        }
                        assert_eq!(out, &before[..n]);
                    }
                    Err(DecodeError::LengthTooLarge(len)) => {
                        let (want, _) = reference_var_uint(before).expect("length decoded");
                        assert_eq!(len, want);
                        assert!(len as usize > before.len() - n);
                        return;
                    }
                    Err(DecodeError::InvalidUtf8) => {
                        assert_eq!(op % 5, 2);
                        let (len, prefix) = reference_var_uint(before).expect("length decoded");
                        let body = &before[prefix..prefix + len as usize];
                        assert!(std::str::from_utf8(body).is_err());
                        return;
                    }
                    Err(e) => {
                        assert!(
                            matches!(e, DecodeError::UnexpectedEnd | DecodeError::VarUintOverflow),
                            "{e:?}"
                        );
                        assert!(reference_var_uint(before).is_none());
                        return;
                    }
                }
            }
            3 => {
                // A length from the input itself, possibly far larger than what remains.
                let Ok(len) = dec.read_var_uint() else { return };
                let rest = dec.remaining();
                match dec.read_exact(len) {
                    Ok(bytes) => {
                        assert_eq!(bytes.len() as u64, len);
                        assert_eq!(bytes, &rest[..len as usize]);
                    }
                    Err(DecodeError::LengthTooLarge(l)) => {
                        assert_eq!(l, len);
                        assert!(len > rest.len() as u64);
                        assert_eq!(dec.remaining(), rest, "a failed read_exact consumed input");
                    }
                    Err(e) => panic!("read_exact: {e:?}"),
                }
            }
            _ => match dec.read_u8() {
                Ok(b) => assert_eq!(b, before[0]),
                Err(e) => {
                    assert_eq!(e, DecodeError::UnexpectedEnd);
                    assert!(before.is_empty());
                    return;
                }
            },
        }
    }
});
