//! [`Edit`]: a v1 update that inserts at most one string after a left origin and deletes ranges.
//!
//! That is what a text editor sends for nearly every keystroke: one character typed (an item of
//! string content whose left origin is the character before it), a backspace (a delete set
//! alone), or typing over a selection (both). [`Edit::read`] recognises exactly that shape, and
//! nothing else, without allocating for the common case, so that a store can merge a run of
//! keystrokes into one item before a CRDT engine integrates them (tandem's log fold).
//!
//! A string item that continues another one (its left origin is the other's last character,
//! its right origin the same, its clock the next) is the same as one item holding both strings:
//! that is how Yjs itself splits and squashes items. So a run of such edits can be written as one
//! block, and their delete sets as one.

use crate::lib0::{write_var_string, write_var_uint, Decoder};
use crate::update::{read_delete_set, utf16_len, Deletion, Id};

/// The info byte of an item of string content (kind 4) with a left origin.
const STRING_AFTER_ORIGIN: u8 = 0x84;
/// The info bit of a right origin.
const HAS_RIGHT_ORIGIN: u8 = 0x40;

/// A string inserted after a left origin (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insert<'a> {
    /// The inserting client.
    pub client: u64,
    /// The item's first clock.
    pub clock: u32,
    /// How many clocks it spans: its length in UTF-16 code units (at least 1).
    pub len: u32,
    /// Its left origin.
    pub origin: Id,
    /// Its right origin, if it has one.
    pub right: Option<Id>,
    /// The string.
    pub text: &'a str,
}

impl Insert<'_> {
    /// One past its last clock.
    pub fn end(&self) -> u32 {
        self.clock + self.len
    }

    /// Appends this insert as one block of a client's run (info byte, origins, string): what
    /// follows the run's count, client and first clock in a v1 update.
    pub fn write_block(&self, out: &mut Vec<u8>) {
        let right = self.right.map_or(0, |_| HAS_RIGHT_ORIGIN);
        out.push(STRING_AFTER_ORIGIN | right);
        write_id(out, self.origin);
        if let Some(id) = self.right {
            write_id(out, id);
        }
        write_var_string(out, self.text);
    }

    /// Whether `next` continues this insert as the same item would: the next clock of the same
    /// client, right after this insert's last character, before the same right neighbour.
    pub fn continued_by(&self, next: &Insert<'_>) -> bool {
        next.client == self.client
            && next.clock == self.end()
            && next.origin
                == (Id {
                    client: self.client,
                    clock: self.end() - 1,
                })
            && next.right == self.right
    }
}

/// An update holding at most one [`Insert`] and a delete set (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit<'a> {
    /// The string inserted, if any.
    pub insert: Option<Insert<'a>>,
    /// The ranges deleted, sorted by client and clock, each client's ranges apart.
    pub deletions: Vec<Deletion>,
}

impl<'a> Edit<'a> {
    /// Reads `bytes` as an edit; `None` if they are anything else (more than one block, another
    /// content kind, an item without a left origin or naming a map key, clocks past `u32::MAX`,
    /// a malformed delete set, trailing bytes).
    pub fn read(bytes: &'a [u8]) -> Option<Self> {
        let mut dec = Decoder::new(bytes);
        let insert = match dec.read_var_uint().ok()? {
            0 => None,
            1 => Some(read_insert(&mut dec)?),
            _ => return None,
        };
        let deletions = read_delete_set(&mut dec).ok()?;
        if !dec.is_empty() {
            return None;
        }
        Some(Edit { insert, deletions })
    }
}

/// Appends `deletions` as a v1 delete set: sorted by client and clock, overlapping and adjacent
/// ranges joined, each client once. `deletions` is sorted in place.
pub fn write_delete_set(out: &mut Vec<u8>, deletions: &mut [Deletion]) {
    deletions.sort_unstable_by_key(|d| (d.client, d.clock));
    // Joined ranges as (client, start, end), then written by client.
    let mut joined: Vec<(u64, u64, u64)> = Vec::with_capacity(deletions.len());
    for d in deletions.iter() {
        let (start, end) = (u64::from(d.clock), u64::from(d.clock) + u64::from(d.len));
        match joined.last_mut() {
            Some(last) if last.0 == d.client && start <= last.2 => last.2 = last.2.max(end),
            _ => joined.push((d.client, start, end)),
        }
    }
    let clients = joined.chunk_by(|a, b| a.0 == b.0);
    write_var_uint(out, clients.clone().count() as u64);
    for ranges in clients {
        write_var_uint(out, ranges[0].0);
        write_var_uint(out, ranges.len() as u64);
        for &(_, start, end) in ranges {
            write_var_uint(out, start);
            write_var_uint(out, end - start);
        }
    }
}

fn write_id(out: &mut Vec<u8>, id: Id) {
    write_var_uint(out, id.client);
    write_var_uint(out, u64::from(id.clock));
}

fn read_insert<'a>(dec: &mut Decoder<'a>) -> Option<Insert<'a>> {
    if dec.read_var_uint().ok()? != 1 {
        return None;
    }
    let client = dec.read_var_uint().ok()?;
    let clock = u32::try_from(dec.read_var_uint().ok()?).ok()?;
    let info = dec.read_u8().ok()?;
    if info & !HAS_RIGHT_ORIGIN != STRING_AFTER_ORIGIN {
        return None;
    }
    let origin = read_id(dec)?;
    let right = if info & HAS_RIGHT_ORIGIN != 0 {
        Some(read_id(dec)?)
    } else {
        None
    };
    let text = dec.read_var_string().ok()?;
    let len = u32::try_from(utf16_len(text)).ok().filter(|&n| n > 0)?;
    clock.checked_add(len)?;
    Some(Insert {
        client,
        clock,
        len,
        origin,
        right,
        text,
    })
}

fn read_id(dec: &mut Decoder<'_>) -> Option<Id> {
    let client = dec.read_var_uint().ok()?;
    let clock = u32::try_from(dec.read_var_uint().ok()?).ok()?;
    Some(Id { client, clock })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(client: u64, clock: u32) -> Id {
        Id { client, clock }
    }

    #[test]
    fn reads_a_keystroke_a_backspace_and_typing_over_a_selection() {
        // Client 5 types "é" at clock 3 after 5:2, before 9:0; empty delete set.
        let mut key = vec![1, 1, 5, 3, 0xc4, 5, 2, 9, 0];
        key.extend_from_slice(&[2, 0xc3, 0xa9, 0]);
        let edit = Edit::read(&key).expect("a keystroke");
        let insert = edit.insert.expect("an insert");
        assert_eq!(
            (insert.client, insert.clock, insert.len, insert.text),
            (5, 3, 1, "é")
        );
        assert_eq!((insert.origin, insert.right), (id(5, 2), Some(id(9, 0))));
        assert!(edit.deletions.is_empty());

        // A backspace: no blocks, client 5 deletes clocks 2..3.
        let edit = Edit::read(&[0, 1, 5, 1, 2, 1]).expect("a backspace");
        assert_eq!(edit.insert, None);
        assert_eq!(
            edit.deletions,
            [Deletion {
                client: 5,
                clock: 2,
                len: 1
            }]
        );

        // "😀" after 5:0 with no right origin, deleting 5:0..1: two UTF-16 units.
        let mut over = vec![1, 1, 5, 4, 0x84, 5, 0, 4];
        over.extend_from_slice("😀".as_bytes());
        over.extend_from_slice(&[1, 5, 1, 0, 1]);
        let edit = Edit::read(&over).expect("typing over a selection");
        assert_eq!(edit.insert.map(|i| (i.len, i.right)), Some((2, None)));
        assert_eq!(edit.deletions.len(), 1);
    }

    #[test]
    fn anything_else_is_not_an_edit() {
        let refused: &[&[u8]] = &[
            // Two blocks in one run.
            &[1, 2, 5, 0, 0x84, 5, 0, 1, b'a', 0x84, 5, 1, 1, b'b', 0],
            // Two runs.
            &[
                2, 1, 5, 0, 0x84, 1, 0, 1, b'a', 1, 6, 0, 0x84, 1, 0, 1, b'b', 0,
            ],
            // No left origin: a parent named instead.
            &[1, 1, 5, 0, 0x04, 1, 1, b't', 1, b'a', 0],
            // A map key flagged.
            &[1, 1, 5, 0, 0xa4, 5, 0, 1, b'a', 0],
            // Any content, not a string.
            &[1, 1, 5, 0, 0x88, 5, 0, 1, 0x7e, 0],
            // An empty string (yrs drops the item).
            &[1, 1, 5, 0, 0x84, 5, 0, 0, 0],
            // A clock past u32::MAX.
            &[
                1, 1, 5, 0x80, 0x80, 0x80, 0x80, 0x10, 0x84, 5, 0, 1, b'a', 0,
            ],
            // Deletions out of order.
            &[0, 1, 5, 2, 4, 1, 0, 1],
            // Trailing bytes, and truncation.
            &[0, 0, 0],
            &[1, 1, 5, 0, 0x84, 5],
        ];
        for bytes in refused {
            assert_eq!(Edit::read(bytes), None, "{bytes:?}");
        }
    }

    #[test]
    fn a_written_block_reads_back_as_the_same_insert() {
        for right in [None, Some(id(300, 70_000))] {
            let insert = Insert {
                client: 1 << 40,
                clock: 200,
                len: 3,
                origin: id(1 << 40, 199),
                right,
                text: "a😀",
            };
            let mut bytes = vec![1, 1];
            write_var_uint(&mut bytes, insert.client);
            write_var_uint(&mut bytes, u64::from(insert.clock));
            insert.write_block(&mut bytes);
            bytes.push(0);
            let edit = Edit::read(&bytes).expect("an edit");
            assert_eq!(edit.insert, Some(insert));
        }
    }

    #[test]
    fn a_written_delete_set_is_sorted_and_joined() {
        let d = |client, clock, len| Deletion { client, clock, len };
        let mut deletions = vec![
            d(9, 4, 2),
            d(5, 7, 1),
            d(9, 0, 1),
            d(5, 6, 1),
            d(9, 5, 3),
            d(5, 2, 1),
        ];
        let mut bytes = vec![0];
        write_delete_set(&mut bytes, &mut deletions);
        let edit = Edit::read(&bytes).expect("a delete set");
        assert_eq!(
            edit.deletions,
            [d(5, 2, 1), d(5, 6, 2), d(9, 0, 1), d(9, 4, 4)]
        );
        let mut empty = vec![0];
        write_delete_set(&mut empty, &mut []);
        assert_eq!(empty, [0, 0]);
    }

    #[test]
    fn an_insert_continues_another_only_right_after_it_before_the_same_neighbour() {
        let first = Insert {
            client: 5,
            clock: 3,
            len: 2,
            origin: id(1, 0),
            right: Some(id(1, 1)),
            text: "ab",
        };
        let next = Insert {
            clock: 5,
            len: 1,
            origin: id(5, 4),
            text: "c",
            ..first
        };
        assert!(first.continued_by(&next));
        assert!(!first.continued_by(&Insert { clock: 6, ..next }));
        assert!(!first.continued_by(&Insert {
            origin: id(5, 3),
            ..next
        }));
        assert!(!first.continued_by(&Insert {
            right: None,
            ..next
        }));
        assert!(!first.continued_by(&Insert { client: 6, ..next }));
    }
}
