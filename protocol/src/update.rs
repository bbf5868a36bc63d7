//! The structure of a Yjs v1 update, read and checked before a CRDT engine integrates it.
//!
//! A v1 update is, per client, a run of blocks (items, GC ranges, skips) at consecutive clocks,
//! then a delete set. [`UpdateShape::read`] walks those bytes without building anything the
//! engine builds: it records each block's clock range and the ids it depends on (its left and
//! right origins and its parent), and refuses what no Yjs or yrs encoder writes and what the
//! engine would mishandle:
//!
//! - a client with two block runs (yrs 0.28 then holds blocks with overlapping clocks and uses
//!   freed memory, fuzz finding 11 in docs/fuzzing.md);
//! - `Any` values nested deeper than [`MAX_ANY_DEPTH`] (yrs decodes and drops them recursively:
//!   about 10,000 levels, 20 KB, overflow a 2 MiB thread stack and abort the process, finding 12);
//! - clocks past `u32::MAX`, empty GC ranges and skips, empty or overlapping deletions;
//! - subdocuments (yrs 0.28 never frees a document that holds one, finding 14);
//! - content kinds that Yjs and yrs read differently (legacy JSON content, XML hooks, bit 4 of
//!   the info byte, weak links) or that neither defines, and trailing bytes.
//!
//! [`UpdateShape::check_dependencies`] then tells whether everything the update refers to is in
//! the document already or earlier in the update itself, with no cycle, i.e. whether the engine
//! can integrate it at once without parking blocks that wait for missing ones (the path on which
//! fuzzing found yrs' memory errors).

use std::collections::HashMap;
use std::ops::Range;

use thiserror::Error;

use crate::lib0::{DecodeError, Decoder};

/// Deepest nesting of arrays and maps accepted in an `Any` value (the limit `serde_json` applies
/// to JSON by default).
pub const MAX_ANY_DEPTH: usize = 128;

const HAS_ORIGIN: u8 = 0x80;
const HAS_RIGHT_ORIGIN: u8 = 0x40;
const HAS_PARENT_SUB: u8 = 0x20;
const GC: u8 = 0;
const SKIP: u8 = 10;

/// Why bytes are not an update tandem accepts.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ShapeError {
    /// The lib0 encoding itself is broken.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A client's blocks come in two runs.
    #[error("client {0} has two block runs")]
    DuplicateClient(u64),
    /// A block or deletion reaches past the largest clock (`u32::MAX`).
    #[error("client {0}'s clocks overflow")]
    ClockOverflow(u64),
    /// A GC range or skip of length zero.
    #[error("client {0} has an empty range")]
    EmptyRange(u64),
    /// An info byte whose content kind is unknown, or read differently by Yjs and yrs.
    #[error("unsupported block kind (info byte {0:#04x})")]
    UnsupportedContent(u8),
    /// A subdocument (content kind 9): yrs 0.28 never frees a document that holds one, so every
    /// unload of its room would leak the whole document (fuzz finding 14).
    #[error("subdocuments are not supported")]
    Subdocument,
    /// A shared type kind that is unknown or not accepted (weak links).
    #[error("unsupported type reference {0}")]
    UnsupportedType(u8),
    /// The parent flag is neither 0 (an id) nor 1 (a root name).
    #[error("parent info {0} is neither 0 nor 1")]
    ParentInfo(u64),
    /// An `Any` value has an unknown tag.
    #[error("unknown Any tag {0}")]
    AnyTag(u8),
    /// An `Any` value nests deeper than [`MAX_ANY_DEPTH`].
    #[error("Any value nested deeper than {MAX_ANY_DEPTH}")]
    TooDeep,
    /// A signed varint longer than ten bytes.
    #[error("signed varint too long")]
    VarIntTooLong,
    /// The delete set names a client twice, or its ranges are empty, out of order or overlap.
    #[error("client {0}'s deletions are empty, repeated or out of order")]
    DeleteSet(u64),
}

/// Why an update cannot be integrated at once into a document (see
/// [`UpdateShape::check_dependencies`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DependencyError {
    /// The update's blocks for a client start past what the document holds of it.
    #[error("client {client} starts at clock {start}, the document holds {held}")]
    StartsPast {
        /// The client.
        client: u64,
        /// Its first clock in the update.
        start: u32,
        /// Its clock in the document.
        held: u32,
    },
    /// The update contains skips (gaps left in a client's clocks).
    #[error("client {0}'s blocks leave a gap")]
    Skip(u64),
    /// A block refers to (or a deletion covers) content neither the document nor the update has.
    #[error("refers to {client}:{clock}, which is missing")]
    Missing {
        /// Client of the missing id.
        client: u64,
        /// Clock of the missing id.
        clock: u32,
    },
    /// Blocks of the update depend on each other in a cycle.
    #[error("block {client}:{clock} depends on itself")]
    Cycle {
        /// Client of a block on the cycle.
        client: u64,
        /// Clock of that block.
        clock: u32,
    },
}

/// An id: a client and a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Id {
    /// The client.
    pub client: u64,
    /// The clock.
    pub clock: u32,
}

/// What kind of block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// An item (content, possibly deleted).
    Item,
    /// A garbage-collected range.
    Gc,
    /// A skipped range: the update does not carry these clocks.
    Skip,
}

/// One block of an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Its first clock.
    pub clock: u32,
    /// How many clocks it spans (at least 1).
    pub len: u32,
    /// What it is.
    pub kind: BlockKind,
    /// The ids it depends on: left origin, right origin, parent (items only).
    pub deps: [Option<Id>; 3],
    /// The type it names as its parent: only items without origins name one.
    pub parent: Option<ParentRef>,
    /// The map key it names (with its parent).
    pub parent_sub: Option<Box<str>>,
    /// Whether its content is deleted content (kind 1), which integrates already deleted.
    pub content_deleted: bool,
}

/// A parent type named by an item.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ParentRef {
    /// A root type, by name.
    Root(Box<str>),
    /// A nested type: the id of the item that holds it.
    Nested(Id),
}

/// A block of an update: its client's run (an index into [`UpdateShape::clients`]) and its
/// index among that run's blocks.
pub type BlockAt = (usize, usize);

/// A client's run of blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRun {
    /// The client.
    pub client: u64,
    /// Its first clock.
    pub start: u32,
    /// One past its last clock.
    pub end: u32,
    blocks: Range<usize>,
}

/// A range of deleted clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deletion {
    /// The client.
    pub client: u64,
    /// The first deleted clock.
    pub clock: u32,
    /// How many clocks.
    pub len: u32,
}

/// The structure of a v1 update (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateShape {
    clients: Vec<ClientRun>,
    blocks: Vec<Block>,
    /// Each block's first clock, apart from the blocks so that finding one by clock searches
    /// a dense array.
    starts: Vec<u32>,
    deletions: Vec<Deletion>,
    /// Runs by client, for updates with many clients (a whole state); the few runs of an edit
    /// are found by scanning.
    by_client: Option<HashMap<u64, usize>>,
}

/// Runs up to which finding a client's run scans instead of hashing.
const SCAN_RUNS: usize = 16;

impl UpdateShape {
    /// Reads and checks the structure of a v1 update.
    pub fn read(bytes: &[u8]) -> Result<Self, ShapeError> {
        let mut dec = Decoder::new(bytes);
        let mut shape = UpdateShape::default();
        let runs = dec.read_var_uint()?;
        // Each run takes at least three bytes: no reservation beyond what the input can hold.
        shape
            .clients
            .reserve(runs.min(dec.remaining().len() as u64 / 3) as usize);
        for _ in 0..runs {
            let count = dec.read_var_uint()?;
            let client = dec.read_var_uint()?;
            if shape.run_of(client).is_some() {
                return Err(ShapeError::DuplicateClient(client));
            }
            let start = clock(dec.read_var_uint()?, client)?;
            let first = shape.blocks.len();
            let mut at = start;
            for _ in 0..count {
                if let Some(block) = read_block(&mut dec, client, at)? {
                    at = clock(u64::from(at) + u64::from(block.len), client)?;
                    shape.starts.push(block.clock);
                    shape.blocks.push(block);
                }
            }
            shape.clients.push(ClientRun {
                client,
                start,
                end: at,
                blocks: first..shape.blocks.len(),
            });
            match &mut shape.by_client {
                Some(map) => {
                    map.insert(client, shape.clients.len() - 1);
                }
                None if shape.clients.len() > SCAN_RUNS => {
                    let map = shape.clients.iter().enumerate();
                    shape.by_client = Some(map.map(|(i, r)| (r.client, i)).collect());
                }
                None => {}
            }
        }
        shape.deletions = read_delete_set(&mut dec)?;
        if !dec.is_empty() {
            return Err(DecodeError::TrailingBytes(dec.remaining().len()).into());
        }
        Ok(shape)
    }

    /// Each client's run of blocks, in the order of the update.
    pub fn clients(&self) -> &[ClientRun] {
        &self.clients
    }

    /// The blocks of `run`.
    pub fn blocks(&self, run: &ClientRun) -> &[Block] {
        &self.blocks[run.blocks.clone()]
    }

    /// The delete set.
    pub fn deletions(&self) -> &[Deletion] {
        &self.deletions
    }

    /// Checks that a document holding clocks `held(client)` (its state vector) can integrate
    /// this update at once: no client's blocks start past what it holds, no skips, every id a
    /// block depends on and every deleted clock is in the document or in the update, and the
    /// update's blocks do not depend on each other in a cycle.
    ///
    /// What a client sends passes when the client is well-behaved: it only ever sees what its
    /// document holds, so whatever it refers to is there, or in the update with what it sends.
    pub fn check_dependencies(&self, held: impl Fn(u64) -> u32) -> Result<(), DependencyError> {
        self.integration_order(held).map(|_| ())
    }

    /// Like [`check_dependencies`](Self::check_dependencies), and on success the order in which
    /// the engine can integrate the blocks: each after every block of the update it depends on.
    pub fn integration_order(
        &self,
        held: impl Fn(u64) -> u32,
    ) -> Result<Vec<BlockAt>, DependencyError> {
        for run in &self.clients {
            let have = held(run.client);
            if run.start > have {
                return Err(DependencyError::StartsPast {
                    client: run.client,
                    start: run.start,
                    held: have,
                });
            }
            if self.blocks(run).iter().any(|b| b.kind == BlockKind::Skip) {
                return Err(DependencyError::Skip(run.client));
            }
        }
        // Where `id` is: in the document (None), or in block `j` of run `i` (Some((i, j))).
        let locate = |id: Id| -> Result<Option<BlockAt>, DependencyError> {
            if id.clock < held(id.client) {
                return Ok(None);
            }
            self.locate(id).map(Some).ok_or(DependencyError::Missing {
                client: id.client,
                clock: id.clock,
            })
        };
        for d in &self.deletions {
            // The last deleted clock must be there; runs are contiguous, so all of them are.
            locate(Id {
                client: d.client,
                clock: d.clock + (d.len - 1),
            })?;
        }
        // Integrate in dependency order, as the engine would: `done[i]` blocks of run `i` are in.
        // An explicit stack, not recursion: hostile chains can be as long as the update.
        let mut done = vec![0usize; self.clients.len()];
        let mut order = Vec::with_capacity(self.blocks.len());
        let mut active = vec![false; self.clients.len()];
        let mut stack: Vec<(usize, usize)> = Vec::new();
        for root in 0..self.clients.len() {
            stack.push((root, self.clients[root].blocks.len()));
            active[root] = true;
            while let Some(&(i, target)) = stack.last() {
                if done[i] >= target {
                    stack.pop();
                    active[i] = false;
                    continue;
                }
                let run = &self.clients[i];
                let block = &self.blocks(run)[done[i]];
                let mut needs = None;
                for &dep in block.deps.iter().flatten() {
                    // Earlier in this block's own run: integrated already, no search needed.
                    if dep.client == run.client && run.start <= dep.clock && dep.clock < block.clock
                    {
                        continue;
                    }
                    let Some((k, j)) = locate(dep)? else { continue };
                    if j < done[k] {
                        continue;
                    }
                    if active[k] {
                        return Err(DependencyError::Cycle {
                            client: run.client,
                            clock: block.clock,
                        });
                    }
                    needs = Some((k, j + 1));
                    break;
                }
                match needs {
                    Some((k, t)) => {
                        active[k] = true;
                        stack.push((k, t));
                    }
                    None => {
                        order.push((i, done[i]));
                        done[i] += 1;
                    }
                }
            }
        }
        Ok(order)
    }

    /// The position of `client`'s run in [`clients`](Self::clients).
    pub fn run_of(&self, client: u64) -> Option<usize> {
        match &self.by_client {
            Some(map) => map.get(&client).copied(),
            None => self.clients.iter().position(|r| r.client == client),
        }
    }

    /// The block of this update that holds `id`, if the update carries that clock.
    pub fn locate(&self, id: Id) -> Option<BlockAt> {
        let i = self.run_of(id.client)?;
        let run = &self.clients[i];
        if id.clock < run.start || id.clock >= run.end {
            return None;
        }
        let j = self.starts[run.blocks.clone()].partition_point(|&c| c <= id.clock) - 1;
        Some((i, j))
    }

    /// How many blocks the update has, in all runs.
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// The position of the block at `at` among all blocks, in `0..block_count()`.
    pub fn block_index(&self, at: BlockAt) -> usize {
        self.clients[at.0].blocks.start + at.1
    }

    /// The block at `at` (see [`integration_order`](Self::integration_order)).
    pub fn block(&self, at: BlockAt) -> &Block {
        &self.blocks(&self.clients[at.0])[at.1]
    }
}

/// A clock, refused past `u32::MAX` (yrs keeps clocks in 32 bits).
fn clock(value: u64, client: u64) -> Result<u32, ShapeError> {
    u32::try_from(value).map_err(|_| ShapeError::ClockOverflow(client))
}

fn read_id(dec: &mut Decoder<'_>) -> Result<Id, ShapeError> {
    let client = dec.read_var_uint()?;
    let clock = clock(dec.read_var_uint()?, client)?;
    Ok(Id { client, clock })
}

fn read_len(dec: &mut Decoder<'_>, client: u64) -> Result<u32, ShapeError> {
    clock(dec.read_var_uint()?, client)
}

/// Reads one block at `at`; `None` for an item with empty content, which yrs drops.
fn read_block(dec: &mut Decoder<'_>, client: u64, at: u32) -> Result<Option<Block>, ShapeError> {
    let info = dec.read_u8()?;
    let range = |len: u32, kind| {
        if len == 0 {
            return Err(ShapeError::EmptyRange(client));
        }
        Ok(Some(Block {
            clock: at,
            len,
            kind,
            deps: [None; 3],
            parent: None,
            parent_sub: None,
            content_deleted: false,
        }))
    };
    match info {
        GC => return range(read_len(dec, client)?, BlockKind::Gc),
        SKIP => return range(read_len(dec, client)?, BlockKind::Skip),
        _ => {}
    }
    // Yjs reads the content kind from bits 0-4, yrs from bits 0-3: refuse bit 4.
    let kind = info & 0x1f;
    if kind == 9 {
        return Err(ShapeError::Subdocument);
    }
    if !(1..=8).contains(&kind) || kind == 2 {
        return Err(ShapeError::UnsupportedContent(info));
    }
    let mut deps = [None; 3];
    let mut parent = None;
    let mut parent_sub = None;
    if info & HAS_ORIGIN != 0 {
        deps[0] = Some(read_id(dec)?);
    }
    if info & HAS_RIGHT_ORIGIN != 0 {
        deps[1] = Some(read_id(dec)?);
    }
    if info & (HAS_ORIGIN | HAS_RIGHT_ORIGIN) == 0 {
        match dec.read_var_uint()? {
            1 => parent = Some(ParentRef::Root(dec.read_var_string()?.into())),
            0 => {
                let id = read_id(dec)?;
                deps[2] = Some(id);
                parent = Some(ParentRef::Nested(id));
            }
            other => return Err(ShapeError::ParentInfo(other)),
        }
        if info & HAS_PARENT_SUB != 0 {
            parent_sub = Some(dec.read_var_string()?.into());
        }
    }
    let len = read_content(dec, kind, client)?;
    if len == 0 {
        return Ok(None);
    }
    Ok(Some(Block {
        clock: at,
        len,
        kind: BlockKind::Item,
        deps,
        parent,
        parent_sub,
        content_deleted: kind == 1,
    }))
}

/// Reads an item's content of `kind` and returns its length in clocks.
fn read_content(dec: &mut Decoder<'_>, kind: u8, client: u64) -> Result<u32, ShapeError> {
    Ok(match kind {
        // Deleted: a length.
        1 => read_len(dec, client)?,
        // Binary.
        3 => {
            dec.read_var_bytes()?;
            1
        }
        // String: its length in UTF-16 code units.
        4 => {
            let s = dec.read_var_string()?;
            clock(utf16_len(s) as u64, client)?
        }
        // Embed: a JSON string.
        5 => {
            dec.read_var_string()?;
            1
        }
        // Format: a key and a JSON string.
        6 => {
            dec.read_var_string()?;
            dec.read_var_string()?;
            1
        }
        // A shared type.
        7 => {
            match dec.read_u8()? {
                // Array, Map, Text, XmlFragment, XmlText.
                0 | 1 | 2 | 4 | 6 => {}
                // XmlElement carries a name. (XmlHook, 5, does in Yjs but not in yrs 0.28:
                // refused, as the two would read different blocks from what follows.)
                3 => {
                    dec.read_var_string()?;
                }
                other => return Err(ShapeError::UnsupportedType(other)),
            }
            1
        }
        // Any values.
        8 => {
            let n = read_len(dec, client)?;
            for _ in 0..n {
                skip_any(dec)?;
            }
            n
        }
        _ => unreachable!("kinds are checked by the caller"),
    })
}

/// The length of `s` in UTF-16 code units (a string item's clocks): one per character, and one
/// more for each character outside the Basic Multilingual Plane, the only ones UTF-8 writes in
/// four bytes. Counted on the bytes, without decoding the characters.
pub(crate) fn utf16_len(s: &str) -> usize {
    let bytes = s.as_bytes();
    let starts = bytes.iter().filter(|&&b| b & 0xc0 != 0x80).count();
    let wide = bytes.iter().filter(|&&b| b >= 0xf0).count();
    starts + wide
}

/// Reads past one lib0 `Any` value without recursion, refusing nesting deeper than
/// [`MAX_ANY_DEPTH`].
fn skip_any(dec: &mut Decoder<'_>) -> Result<(), ShapeError> {
    // Values still to read at each open level (map entries read their key first).
    let mut open: Vec<(u64, bool)> = Vec::new();
    let mut pending = 1u64;
    let mut in_map = false;
    loop {
        while pending == 0 {
            match open.pop() {
                Some((p, m)) => (pending, in_map) = (p, m),
                None => return Ok(()),
            }
        }
        pending -= 1;
        if in_map {
            dec.read_var_string()?;
        }
        let tag = dec.read_u8()?;
        match tag {
            // undefined, null, false, true
            127 | 126 | 121 | 120 => {}
            125 => skip_var_int(dec)?,
            124 => {
                dec.read_exact(4)?;
            }
            123 | 122 => {
                dec.read_exact(8)?;
            }
            119 => {
                dec.read_var_string()?;
            }
            116 => {
                dec.read_var_bytes()?;
            }
            118 | 117 => {
                let n = dec.read_var_uint()?;
                if open.len() >= MAX_ANY_DEPTH {
                    return Err(ShapeError::TooDeep);
                }
                open.push((pending, in_map));
                pending = n;
                in_map = tag == 118;
            }
            other => return Err(ShapeError::AnyTag(other)),
        }
    }
}

/// Reads past a lib0 signed `varInt`.
fn skip_var_int(dec: &mut Decoder<'_>) -> Result<(), ShapeError> {
    for _ in 0..10 {
        if dec.read_u8()? & 0x80 == 0 {
            return Ok(());
        }
    }
    Err(ShapeError::VarIntTooLong)
}

pub(crate) fn read_delete_set(dec: &mut Decoder<'_>) -> Result<Vec<Deletion>, ShapeError> {
    let clients = dec.read_var_uint()?;
    let mut out = Vec::new();
    let mut seen: Vec<u64> = Vec::new();
    for _ in 0..clients {
        let client = dec.read_var_uint()?;
        seen.push(client);
        let ranges = dec.read_var_uint()?;
        let mut floor = 0u64;
        for _ in 0..ranges {
            let start = u64::from(read_len(dec, client)?);
            let len = u64::from(read_len(dec, client)?);
            if len == 0 || start < floor {
                return Err(ShapeError::DeleteSet(client));
            }
            floor = u64::from(clock(start + len, client)?);
            out.push(Deletion {
                client,
                clock: start as u32,
                len: len as u32,
            });
        }
    }
    // A client named twice; sorted rather than searched, so many clients cost n log n.
    seen.sort_unstable();
    if let Some(twice) = seen.windows(2).find(|w| w[0] == w[1]) {
        return Err(ShapeError::DeleteSet(twice[0]));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(client: u64, clock: u32) -> Option<Id> {
        Some(Id { client, clock })
    }

    /// One client, `count` blocks from `start`, then an empty delete set.
    fn update(client: u8, start: u8, blocks: &[&[u8]]) -> Vec<u8> {
        let mut out = vec![1, blocks.len() as u8, client, start];
        for b in blocks {
            out.extend_from_slice(b);
        }
        out.push(0);
        out
    }

    // An item of string "ab" under root "t": info 4, parent info 1, name "t", content.
    const ROOT_AB: &[u8] = &[4, 1, 1, b't', 2, b'a', b'b'];

    #[test]
    fn reads_runs_blocks_and_deletions() {
        // Client 5 from clock 0: "ab" under root t, then "c" after 5:1; deletes 5:0..1.
        let mut bytes = vec![1, 2, 5, 0];
        bytes.extend_from_slice(ROOT_AB);
        bytes.extend_from_slice(&[0x84, 5, 1, 1, b'c']);
        bytes.extend_from_slice(&[1, 5, 1, 0, 1]);
        let shape = UpdateShape::read(&bytes).unwrap();
        let run = &shape.clients()[0];
        assert_eq!((run.client, run.start, run.end), (5, 0, 3));
        let blocks = shape.blocks(run);
        assert_eq!(blocks.len(), 2);
        assert_eq!((blocks[0].clock, blocks[0].len), (0, 2));
        assert_eq!(blocks[1].deps, [id(5, 1), None, None]);
        assert_eq!(
            shape.deletions(),
            &[Deletion {
                client: 5,
                clock: 0,
                len: 1
            }]
        );
        assert_eq!(shape.check_dependencies(|_| 0), Ok(()));
    }

    #[test]
    fn utf16_length_is_counted_on_the_bytes_as_rust_counts_it() {
        for s in [
            "",
            "a",
            "é",
            "€",
            "😀",
            "aé€😀z",
            "😀😀",
            "\u{10ffff}\u{ffff}\u{80}\u{7f}",
        ] {
            let want: usize = s.chars().map(char::len_utf16).sum();
            assert_eq!(utf16_len(s), want, "{s:?}");
        }
    }

    #[test]
    fn string_length_counts_utf16_units() {
        // "é😀" is 1 + 2 UTF-16 units.
        let s = "é😀".as_bytes();
        let mut item = vec![4, 1, 1, b't', s.len() as u8];
        item.extend_from_slice(s);
        let shape = UpdateShape::read(&update(1, 0, &[&item])).unwrap();
        assert_eq!(shape.clients()[0].end, 3);
    }

    #[test]
    fn refuses_what_encoders_never_write() {
        let two_runs = [
            2, 1, 7, 0, 4, 1, 1, b't', 1, b'x', 1, 7, 0, 4, 1, 1, b't', 1, b'y', 0,
        ];
        assert_eq!(
            UpdateShape::read(&two_runs),
            Err(ShapeError::DuplicateClient(7))
        );
        assert_eq!(
            UpdateShape::read(&update(1, 0, &[&[GC, 0]])),
            Err(ShapeError::EmptyRange(1))
        );
        // Legacy JSON content, bit 4, kind 0 as an item, unknown kinds.
        for info in [0x02, 0x14, 0x80, 0x0b, 0x1f] {
            assert_eq!(
                UpdateShape::read(&update(1, 0, &[&[info, 1, 1, b't', 0]])),
                Err(ShapeError::UnsupportedContent(info)),
                "{info:#x}"
            );
        }
        // A weak link (type 7), an XML hook (5: Yjs reads a name after it, yrs does not).
        for type_ref in [7, 5] {
            assert_eq!(
                UpdateShape::read(&update(1, 0, &[&[7, 1, 1, b't', type_ref, 1, b'h']])),
                Err(ShapeError::UnsupportedType(type_ref))
            );
        }
        assert_eq!(
            UpdateShape::read(&update(1, 0, &[&[4, 2, 1, b't', 1, b'x']])),
            Err(ShapeError::ParentInfo(2))
        );
        let mut trailing = update(1, 0, &[ROOT_AB]);
        trailing.push(0);
        assert_eq!(
            UpdateShape::read(&trailing),
            Err(ShapeError::Decode(DecodeError::TrailingBytes(1)))
        );
        // Clocks past u32::MAX: a run starting at 2^32 - 1 with a two-unit string.
        let mut high = vec![1, 1, 1, 0xff, 0xff, 0xff, 0xff, 0x0f];
        high.extend_from_slice(ROOT_AB);
        high.push(0);
        assert_eq!(UpdateShape::read(&high), Err(ShapeError::ClockOverflow(1)));
        // Deletions: empty, overlapping, client twice.
        for ds in [
            &[1u8, 3, 1, 0, 0][..],
            &[1, 3, 2, 0, 2, 1, 1],
            &[2, 3, 1, 0, 1, 3, 1, 4, 1],
        ] {
            let mut bytes = vec![0];
            bytes.extend_from_slice(ds);
            assert_eq!(UpdateShape::read(&bytes), Err(ShapeError::DeleteSet(3)));
        }
    }

    /// The delete set names each client once; the check for a client named twice used to
    /// compare each client with every earlier one, so a 1 MB delete set of distinct clients
    /// (about 250,000) cost some 3 * 10^10 comparisons.
    #[test]
    fn a_delete_set_of_many_clients_is_read_and_a_repeat_far_apart_is_found() {
        use crate::lib0::write_var_uint;
        let clients = 250_000u64;
        let mut bytes = vec![0];
        write_var_uint(&mut bytes, clients + 1);
        for client in 0..clients {
            write_var_uint(&mut bytes, client + 1);
            bytes.extend_from_slice(&[1, 0, 1]);
        }
        let mut repeated = bytes.clone();
        write_var_uint(&mut bytes, clients + 1);
        bytes.extend_from_slice(&[1, 0, 1]);
        let shape = UpdateShape::read(&bytes).unwrap();
        assert_eq!(shape.deletions().len(), clients as usize + 1);
        // The first client again, last.
        repeated.extend_from_slice(&[1, 1, 0, 1]);
        assert_eq!(UpdateShape::read(&repeated), Err(ShapeError::DeleteSet(1)));
    }

    #[test]
    fn any_nesting_is_bounded_without_recursion() {
        let nested = |depth: usize| {
            let mut item = vec![8, 1, 1, b't', 1];
            for _ in 0..depth {
                item.extend_from_slice(&[117, 1]);
            }
            item.push(126);
            update(1, 0, &[&item])
        };
        assert!(UpdateShape::read(&nested(MAX_ANY_DEPTH)).is_ok());
        assert_eq!(
            UpdateShape::read(&nested(MAX_ANY_DEPTH + 1)),
            Err(ShapeError::TooDeep)
        );
        assert_eq!(
            UpdateShape::read(&nested(1_000_000)),
            Err(ShapeError::TooDeep)
        );
        // Every tag, inside a map.
        let mut item = vec![8, 1, 1, b't', 1, 118, 9];
        for value in [
            &[127][..],
            &[126],
            &[125, 0xc1, 0x01],
            &[124, 0, 0, 0, 0],
            &[123, 0, 0, 0, 0, 0, 0, 0, 0],
            &[122, 0, 0, 0, 0, 0, 0, 0, 0],
            &[121],
            &[119, 1, b's'],
            &[116, 2, 0, 0],
        ] {
            item.extend_from_slice(&[1, b'k']);
            item.extend_from_slice(value);
        }
        assert!(UpdateShape::read(&update(1, 0, &[&item])).is_ok());
        assert_eq!(
            UpdateShape::read(&update(1, 0, &[&[8, 1, 1, b't', 1, 115]])),
            Err(ShapeError::AnyTag(115))
        );
    }

    #[test]
    fn dependencies_must_be_held_or_earlier_in_the_update() {
        // Client 2 at clock 0: "x" after 1:4.
        let after = |clock: u8| update(2, 0, &[&[0x84, 1, clock, 1, b'x']]);
        let shape = UpdateShape::read(&after(4)).unwrap();
        assert_eq!(
            shape.check_dependencies(|c| if c == 1 { 5 } else { 0 }),
            Ok(())
        );
        assert_eq!(
            shape.check_dependencies(|c| if c == 1 { 4 } else { 0 }),
            Err(DependencyError::Missing {
                client: 1,
                clock: 4
            })
        );
        // Starting past what the document holds.
        let shape = UpdateShape::read(&update(2, 3, &[ROOT_AB])).unwrap();
        assert_eq!(
            shape.check_dependencies(|_| 2),
            Err(DependencyError::StartsPast {
                client: 2,
                start: 3,
                held: 2
            })
        );
        assert_eq!(shape.check_dependencies(|_| 3), Ok(()));
        // A skip.
        let shape = UpdateShape::read(&update(2, 0, &[&[SKIP, 2], ROOT_AB])).unwrap();
        assert_eq!(
            shape.check_dependencies(|_| 0),
            Err(DependencyError::Skip(2))
        );
        // A deletion of content nobody has.
        let shape = UpdateShape::read(&[0, 1, 4, 1, 0, 2]).unwrap();
        assert_eq!(
            shape.check_dependencies(|c| if c == 4 { 1 } else { 0 }),
            Err(DependencyError::Missing {
                client: 4,
                clock: 1
            })
        );
        assert_eq!(
            shape.check_dependencies(|c| if c == 4 { 2 } else { 0 }),
            Ok(())
        );
    }

    #[test]
    fn dependencies_across_runs_resolve_in_any_order_but_not_in_a_cycle() {
        // Run of client 1: "a" under root; run of client 2 (listed first): "b" after 1:0.
        let ok = [
            2, 1, 2, 0, 0x84, 1, 0, 1, b'b', 1, 1, 0, 4, 1, 1, b't', 1, b'a', 0,
        ];
        assert_eq!(
            UpdateShape::read(&ok).unwrap().check_dependencies(|_| 0),
            Ok(())
        );
        // 1:0 after 2:0 and 2:0 after 1:0.
        let cycle = [
            2, 1, 2, 0, 0x84, 1, 0, 1, b'b', 1, 1, 0, 0x84, 2, 0, 1, b'a', 0,
        ];
        assert!(matches!(
            UpdateShape::read(&cycle).unwrap().check_dependencies(|_| 0),
            Err(DependencyError::Cycle { .. })
        ));
        // A block after itself.
        let own = update(1, 0, &[&[0x84, 1, 0, 1, b'a']]);
        assert!(matches!(
            UpdateShape::read(&own).unwrap().check_dependencies(|_| 0),
            Err(DependencyError::Cycle { .. })
        ));
        // A long chain (each block of client 1 after the previous one) needs no recursion.
        let mut chain = vec![1, 0x80, 0x80, 0x04, 1, 0, 4, 1, 1, b't', 1, b'a'];
        for i in 0..(65_536u32 - 1) {
            chain.push(0x84);
            chain.push(1);
            let mut v = i;
            loop {
                let b = (v & 0x7f) as u8;
                v >>= 7;
                if v == 0 {
                    chain.push(b);
                    break;
                }
                chain.push(b | 0x80);
            }
            chain.extend_from_slice(&[1, b'a']);
        }
        chain.push(0);
        let shape = UpdateShape::read(&chain).unwrap();
        assert_eq!(shape.clients()[0].end, 65_536);
        assert_eq!(shape.check_dependencies(|_| 0), Ok(()));
    }
}
