//! The few frames the `rooms` scenario writes and reads, for the y-websocket protocol (tandem and
//! the stock Node server) and for Hocuspocus (every frame prefixed with `varString(document)`).
//! See /work/shared/PROTOCOLS.md and protocol/PROTOCOL.md.

/// Which framing a target speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// y-websocket: the room is the URL path, frames carry bare messages.
    YWebsocket,
    /// Hocuspocus: every frame starts with `varString(document)`; auth comes first.
    Hocuspocus,
}

/// Appends `v` as a lib0 `varUint`.
pub fn write_var_uint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends `varUint(len) bytes`.
pub fn write_var_buf(out: &mut Vec<u8>, b: &[u8]) {
    write_var_uint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Reads a lib0 `varUint` at `*pos`, advancing it; `None` when truncated or too long.
pub fn read_var_uint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let byte = *b.get(*pos)?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
}

/// Reads `varUint(len) bytes` at `*pos`, advancing it.
pub fn read_var_buf<'a>(b: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let len = read_var_uint(b, pos)? as usize;
    let end = pos.checked_add(len)?;
    let s = b.get(*pos..end)?;
    *pos = end;
    Some(s)
}

impl Dialect {
    fn prefix(self, room: &str) -> Vec<u8> {
        let mut out = Vec::new();
        if self == Dialect::Hocuspocus {
            write_var_buf(&mut out, room.as_bytes());
        }
        out
    }

    /// Sync step 1 with the given state vector (`00 00 varBuf(sv)`).
    pub fn step1(self, room: &str, state_vector: &[u8]) -> Vec<u8> {
        let mut out = self.prefix(room);
        out.extend_from_slice(&[0, 0]);
        write_var_buf(&mut out, state_vector);
        out
    }

    /// A document update as a sync update message (`00 02 varBuf(update)`).
    pub fn update(self, room: &str, update: &[u8]) -> Vec<u8> {
        let mut out = self.prefix(room);
        out.extend_from_slice(&[0, 2]);
        write_var_buf(&mut out, update);
        out
    }

    /// Hocuspocus's auth message with a token (`varString(doc) 02 00 varString(token)`); `None`
    /// for y-websocket, which has no such message.
    pub fn auth(self, room: &str, token: &str) -> Option<Vec<u8>> {
        if self != Dialect::Hocuspocus {
            return None;
        }
        let mut out = self.prefix(room);
        out.extend_from_slice(&[2, 0]);
        write_var_buf(&mut out, token.as_bytes());
        Some(out)
    }
}

/// What a received frame held, as far as the scenario cares.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Received<'a> {
    /// Sync step 2 payloads (the handshake's answer).
    pub step2: Vec<&'a [u8]>,
    /// Sync update payloads (type 0, or Hocuspocus's sync reply type 4, sub-type 2).
    pub updates: Vec<&'a [u8]>,
    /// Hocuspocus auth answers: the auth sub-type (2 = authenticated, 1 = permission denied).
    pub auth: Option<u64>,
}

/// Parses a frame: y-websocket frames may hold several messages back to back (tandem); a
/// Hocuspocus frame holds one message after its document name. Unknown types end the parse.
pub fn parse(dialect: Dialect, frame: &[u8]) -> Received<'_> {
    let mut r = Received::default();
    let mut pos = 0;
    if dialect == Dialect::Hocuspocus && read_var_buf(frame, &mut pos).is_none() {
        return r;
    }
    while pos < frame.len() {
        let Some(ty) = read_var_uint(frame, &mut pos) else {
            break;
        };
        match ty {
            0 | 4 => {
                let (Some(sub), Some(payload)) = (
                    read_var_uint(frame, &mut pos),
                    read_var_buf(frame, &mut pos),
                ) else {
                    break;
                };
                match sub {
                    1 => r.step2.push(payload),
                    2 => r.updates.push(payload),
                    _ => {}
                }
            }
            1 => {
                if read_var_buf(frame, &mut pos).is_none() {
                    break;
                }
            }
            2 if dialect == Dialect::Hocuspocus => {
                r.auth = read_var_uint(frame, &mut pos);
                break;
            }
            3 => {}
            _ => break,
        }
        if dialect == Dialect::Hocuspocus {
            break;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn var_uint_round_trip() {
        for v in [0u64, 127, 128, 300, 1 << 40] {
            let mut b = Vec::new();
            write_var_uint(&mut b, v);
            assert_eq!(read_var_uint(&b, &mut 0), Some(v));
        }
        let mut b = Vec::new();
        write_var_uint(&mut b, 300);
        assert_eq!(b, [0xac, 0x02]);
    }

    #[test]
    fn hocuspocus_frames() {
        let h = Dialect::Hocuspocus;
        assert_eq!(h.auth("ab", "").unwrap(), [2, b'a', b'b', 2, 0, 0]);
        assert_eq!(h.step1("ab", &[0]), [2, b'a', b'b', 0, 0, 1, 0]);
        assert_eq!(h.update("ab", &[7, 8]), [2, b'a', b'b', 0, 2, 2, 7, 8]);
        let reply = [2, b'a', b'b', 4, 2, 1, 9];
        assert_eq!(parse(h, &reply).updates, vec![&[9u8][..]]);
        assert_eq!(parse(h, &[2, b'a', b'b', 2, 2]).auth, Some(2));
    }

    #[test]
    fn y_websocket_frames() {
        let y = Dialect::YWebsocket;
        assert_eq!(y.step1("r", &[0]), [0, 0, 1, 0]);
        assert_eq!(y.auth("r", ""), None);
        // Two messages in one frame: an awareness message, then an update.
        let frame = [1, 1, 0, 0, 2, 1, 5];
        let r = parse(y, &frame);
        assert_eq!(r.updates, vec![&[5u8][..]]);
        assert!(r.step2.is_empty());
    }
}
