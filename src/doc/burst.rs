//! [`Burst`]: stored keystrokes merged into one update before yrs integrates them.
//!
//! A room's log is mostly what editors send for each keystroke ([`Edit`]: one character after
//! the one before it, or a backspace). yrs integrates every update as its own block and squashes
//! neighbours only when a transaction commits, so a log applied update by update costs one
//! integration per keystroke. A burst writes each run of characters that continue one another
//! as one block, and all deletions as one delete set: the same document (Yjs splits and squashes
//! items the same way), for one integration per run.
//!
//! A string may only be merged with what it continues in a *sequence*: in a map entry each item
//! is a value of its own that replaces the one before, so two values merged into one would be a
//! different document (and one yrs mishandles: fuzz finding 15 in docs/fuzzing.md). The burst
//! keeps [`Places`] to know, and admits only edits that integrate at once, with everything they
//! refer to already held. Everything else goes to yrs as it is, in order.

use tandem_protocol::lib0::write_var_uint;
use tandem_protocol::{write_delete_set, Deletion, Edit, Id, Insert, UpdateShape};

use super::places::{PlaceIdx, Places};
use crate::hashing::FastMap;

/// A run of merged characters.
#[derive(Debug)]
struct Piece {
    clock: u32,
    len: u32,
    origin: Id,
    right: Option<Id>,
    text: String,
    place: PlaceIdx,
}

impl Piece {
    fn insert(&self, client: u64) -> Insert<'_> {
        Insert {
            client,
            clock: self.clock,
            len: self.len,
            origin: self.origin,
            right: self.right,
            text: &self.text,
        }
    }
}

/// A client's pieces, at consecutive clocks.
#[derive(Debug)]
struct Pieces {
    client: u64,
    pieces: Vec<Piece>,
}

/// Edits merged so far, and what a document that integrated everything before them holds (see
/// the module docs).
#[derive(Debug, Default)]
pub(super) struct Burst {
    clients: Vec<Pieces>,
    by_client: FastMap<u64, usize>,
    deletions: Vec<Deletion>,
    edits: usize,
    /// Clocks held of each client: by the document, then by the burst.
    held: FastMap<u64, u32>,
    places: Places,
}

impl Burst {
    /// How many edits are merged and not yet taken.
    pub(super) fn edits(&self) -> usize {
        self.edits
    }

    /// Merges `edit` if it integrates at once after what came before (see the module docs);
    /// `false`, changing nothing, if it must go to the engine as it is.
    pub(super) fn admit(&mut self, edit: &Edit<'_>) -> bool {
        let mut new_piece = None;
        if let Some(insert) = &edit.insert {
            if self.held(insert.client) != insert.clock
                || !self.holds(insert.origin)
                || insert.right.is_some_and(|id| !self.holds(id))
            {
                return false;
            }
            if !self.continues_last(insert) {
                let Some(place) = self.places.sequence_of(insert.origin) else {
                    return false;
                };
                if insert
                    .right
                    .is_some_and(|id| self.places.sequence_of(id) != Some(place))
                {
                    return false;
                }
                new_piece = Some(place);
            }
        }
        let held_after = |client| match &edit.insert {
            Some(insert) if insert.client == client => insert.end(),
            _ => self.held(client),
        };
        if edit
            .deletions
            .iter()
            .any(|d| u64::from(d.clock) + u64::from(d.len) > u64::from(held_after(d.client)))
        {
            return false;
        }
        if let Some(insert) = &edit.insert {
            self.push(insert, new_piece);
        }
        self.deletions.extend_from_slice(&edit.deletions);
        self.edits += 1;
        true
    }

    /// Learns what an update that goes to the engine as it is adds (its places and clocks), so
    /// that later edits can be checked against it; `false` if it cannot be integrated at once
    /// (or read): the engine may then park part of it, and the caller must
    /// [`refresh`](Self::refresh) the held clocks from the document.
    pub(super) fn learn(&mut self, part: &[u8]) -> bool {
        let Ok(shape) = UpdateShape::read(part) else {
            return false;
        };
        let held = &self.held;
        if !self
            .places
            .learn(&shape, |c| held.get(&c).copied().unwrap_or(0))
        {
            return false;
        }
        for run in shape.clients() {
            let clock = self.held.entry(run.client).or_insert(0);
            *clock = (*clock).max(run.end);
        }
        true
    }

    /// What the burst learned of where each item sits: the places of everything admitted or
    /// learned, which is the whole document if nothing failed to be learned.
    pub(super) fn into_places(self) -> Places {
        self.places
    }

    /// Replaces the held clocks with the document's state vector.
    pub(super) fn refresh(&mut self, held: FastMap<u64, u32>) {
        self.held = held;
    }

    /// The merged update (a v1 update), if any edit was merged since the last one.
    pub(super) fn take(&mut self) -> Option<Vec<u8>> {
        if self.edits == 0 {
            return None;
        }
        let mut out = Vec::new();
        write_var_uint(&mut out, self.clients.len() as u64);
        for run in self.clients.drain(..) {
            write_var_uint(&mut out, run.pieces.len() as u64);
            write_var_uint(&mut out, run.client);
            write_var_uint(&mut out, u64::from(run.pieces[0].clock));
            for piece in &run.pieces {
                piece.insert(run.client).write_block(&mut out);
            }
        }
        write_delete_set(&mut out, &mut self.deletions);
        self.by_client.clear();
        self.deletions.clear();
        self.edits = 0;
        Some(out)
    }

    fn held(&self, client: u64) -> u32 {
        self.held.get(&client).copied().unwrap_or(0)
    }

    fn holds(&self, id: Id) -> bool {
        id.clock < self.held(id.client)
    }

    fn continues_last(&self, insert: &Insert<'_>) -> bool {
        self.by_client
            .get(&insert.client)
            .and_then(|&k| self.clients[k].pieces.last())
            .is_some_and(|last| last.insert(insert.client).continued_by(insert))
    }

    /// Adds `insert`: as a new piece in `place`, or (`None`) onto the client's last piece.
    fn push(&mut self, insert: &Insert<'_>, new_piece: Option<PlaceIdx>) {
        let k = *self.by_client.entry(insert.client).or_insert_with(|| {
            self.clients.push(Pieces {
                client: insert.client,
                pieces: Vec::new(),
            });
            self.clients.len() - 1
        });
        let pieces = &mut self.clients[k].pieces;
        let place = match new_piece {
            Some(place) => {
                pieces.push(Piece {
                    clock: insert.clock,
                    len: insert.len,
                    origin: insert.origin,
                    right: insert.right,
                    text: insert.text.to_owned(),
                    place,
                });
                place
            }
            None => {
                let last = pieces.last_mut().expect("continues the last piece");
                last.len += insert.len;
                last.text.push_str(insert.text);
                last.place
            }
        };
        self.places
            .record_run(insert.client, insert.clock, insert.end(), place);
        self.held.insert(insert.client, insert.end());
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use yrs::updates::decoder::Decode;
    use yrs::{Doc, GetString, Map, ReadTxn, StateVector, Text, Transact, Update};

    use super::*;
    use crate::doc::testutil::{edit, text_of};
    use crate::doc::YDoc;

    /// One random edit of text `t` in `doc` (mostly typing on from the last position, as an
    /// editor does), and the update it made. Offsets are in bytes (yrs' default), always on
    /// character boundaries.
    fn random_edit(doc: &Doc, rng: &mut StdRng, cursor: &mut u32) -> Bytes {
        let text = doc.get_or_insert_text("t");
        let mut txn = doc.transact_mut();
        let now = text.get_string(&txn);
        let boundary = |rng: &mut StdRng| {
            let mut at = rng.random_range(0..=now.len());
            while !now.is_char_boundary(at) {
                at -= 1;
            }
            at as u32
        };
        let mut at = (*cursor as usize).min(now.len());
        while !now.is_char_boundary(at) {
            at -= 1;
        }
        match rng.random_range(0..20) {
            0..=13 => {
                let s = ["a", "b", "é", "😀", "xy"][rng.random_range(0..5)];
                text.insert(&mut txn, at as u32, s);
                *cursor = (at + s.len()) as u32;
            }
            14..=16 if at > 0 => {
                // A backspace.
                let (prev, _) = now[..at].char_indices().last().unwrap();
                text.remove_range(&mut txn, prev as u32, (at - prev) as u32);
                *cursor = prev as u32;
            }
            17 if now.chars().count() > 3 => {
                // Typing over a selection of two characters.
                let from = boundary(rng) as usize;
                let span: usize = now[from..].chars().take(2).map(char::len_utf8).sum();
                text.remove_range(&mut txn, from as u32, span as u32);
                text.insert(&mut txn, from as u32, "z");
                *cursor = from as u32 + 1;
            }
            _ => *cursor = boundary(rng),
        }
        Bytes::from(txn.encode_update_v1())
    }

    /// A document that applied `parts` one transaction each, as yrs alone does.
    fn one_at_a_time(parts: &[Bytes]) -> Doc {
        let doc = Doc::new();
        for part in parts {
            let mut txn = doc.transact_mut();
            txn.apply_update(Update::decode_v1(part).unwrap()).unwrap();
        }
        doc
    }

    fn raw_text(doc: &Doc) -> String {
        doc.get_or_insert_text("t").get_string(&doc.transact())
    }

    /// `loaded` and `reference` hold the same document: the same text, state vector and
    /// deletions, and the loaded one's own encoding decodes to the same text again.
    fn assert_same(loaded: &mut YDoc, reference: &Doc) {
        assert_eq!(text_of(loaded), raw_text(reference));
        let sv = reference.transact().state_vector();
        assert_eq!(loaded.doc().transact().state_vector(), sv);
        let (state, _) = loaded.encode_state().unwrap();
        let again = YDoc::load(Some(&state), &[]).unwrap();
        assert_eq!(text_of(&again), raw_text(reference));
        // Nothing deleted in one is live in the other: the two states merged change nothing.
        let theirs = reference
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        let merged = YDoc::load(Some(&state), &[Bytes::from(theirs)]).unwrap();
        assert_eq!(text_of(&merged), raw_text(reference));
    }

    #[test]
    fn a_typed_and_corrected_text_loads_as_applied_one_at_a_time() {
        for seed in 0..8 {
            let mut rng = StdRng::seed_from_u64(seed);
            let writer = Doc::with_client_id(1 + seed);
            let mut cursor = 0;
            let parts: Vec<Bytes> = (0..1500)
                .map(|_| random_edit(&writer, &mut rng, &mut cursor))
                .collect();
            let mut loaded = YDoc::load(None, &parts).unwrap();
            assert_same(&mut loaded, &one_at_a_time(&parts));
            // And on a snapshot of the first half.
            let (half, _) = YDoc::load(None, &parts[..750])
                .unwrap()
                .encode_state()
                .unwrap();
            let mut loaded = YDoc::load(Some(&half), &parts[750..]).unwrap();
            assert_same(&mut loaded, &one_at_a_time(&parts));
        }
    }

    #[test]
    fn concurrent_writers_load_as_applied_one_at_a_time() {
        for seed in 0..8 {
            let mut rng = StdRng::seed_from_u64(seed);
            let writers: Vec<Doc> = (0..3).map(|i| Doc::with_client_id(10 + i)).collect();
            let mut cursors = [0u32; 3];
            // The log, in the order a room received the updates; each writer has seen a prefix.
            let mut log: Vec<Bytes> = Vec::new();
            let mut seen = [0usize; 3];
            for _ in 0..1500 {
                let w = rng.random_range(0..3);
                if rng.random_range(0..10) == 0 {
                    // This writer catches up with everything the room holds.
                    let mut txn = writers[w].transact_mut();
                    for part in &log[seen[w]..] {
                        txn.apply_update(Update::decode_v1(part).unwrap()).unwrap();
                    }
                    seen[w] = log.len();
                }
                let part = random_edit(&writers[w], &mut rng, &mut cursors[w]);
                log.push(part);
                if seen[w] == log.len() - 1 {
                    seen[w] = log.len();
                }
            }
            let mut loaded = YDoc::load(None, &log).unwrap();
            let reference = one_at_a_time(&log);
            assert_same(&mut loaded, &reference);
        }
    }

    #[test]
    fn keystrokes_typed_in_a_row_become_one_block() {
        let writer = Doc::with_client_id(7);
        let mut burst = Burst::default();
        let first = edit(&writer, 0, "a");
        assert!(burst.learn(&first), "the first character names its parent");
        for (i, c) in "bcdefg".chars().enumerate() {
            let part = edit(&writer, i as u32 + 1, &c.to_string());
            assert!(burst.admit(&Edit::read(&part).unwrap()), "{c}");
        }
        let merged = burst.take().expect("merged");
        let shape = UpdateShape::read(&merged).unwrap();
        assert_eq!(shape.block_count(), 1);
        assert_eq!((shape.clients()[0].start, shape.clients()[0].end), (1, 7));
        assert_eq!(burst.take(), None, "taken once");
    }

    #[test]
    fn keystrokes_out_of_order_wait_for_their_predecessors() {
        let writer = Doc::with_client_id(7);
        let parts: Vec<Bytes> = "abcdef"
            .chars()
            .enumerate()
            .map(|(i, c)| edit(&writer, i as u32, &c.to_string()))
            .collect();
        let order = [0, 2, 3, 1, 4, 5];
        let shuffled: Vec<Bytes> = order.iter().map(|&i| parts[i].clone()).collect();
        let mut loaded = YDoc::load(None, &shuffled).unwrap();
        assert_same(&mut loaded, &one_at_a_time(&shuffled));
        assert_eq!(text_of(&loaded), "abcdef");
    }

    /// Typing on after a character that another writer's insert now follows: the next
    /// character names that insert as its right origin, so it does not continue the run that
    /// ended before it.
    #[test]
    fn a_run_is_not_merged_across_a_concurrent_insert() {
        for (a_id, b_id) in [(1, 2), (2, 1)] {
            let a = Doc::with_client_id(a_id);
            let b = Doc::with_client_id(b_id);
            let sync = |to: &Doc, part: &Bytes| {
                let mut txn = to.transact_mut();
                txn.apply_update(Update::decode_v1(part).unwrap()).unwrap();
            };
            let p1 = edit(&a, 0, "a");
            let p2 = edit(&a, 1, "b");
            sync(&b, &p1);
            sync(&b, &p2);
            let p3 = edit(&b, 2, "z");
            sync(&a, &p3);
            let p4 = edit(&a, 2, "c");
            let log = [p1, p2, p3, p4];
            let mut loaded = YDoc::load(None, &log).unwrap();
            assert_same(&mut loaded, &one_at_a_time(&log));
            assert_eq!(text_of(&loaded), "abcz", "clients {a_id}, {b_id}");
        }
    }

    /// String values of a map entry, each naming the one before as its left origin: no editor
    /// sends that (map values are `Any` content), but a client can. Each replaces the one
    /// before; merged, two of them would be one long value.
    #[test]
    fn map_values_are_never_merged() {
        // Client 1, clock 0: string "a" (info 0x24: string, map key) in root map "m", key "k".
        let first = Bytes::from_static(&[1, 1, 1, 0, 0x24, 1, 1, b'm', 1, b'k', 1, b'a', 0]);
        // Client 1, clocks 1 and 2: strings "b" after 1:0 and "c" after 1:1.
        let second = Bytes::from_static(&[1, 1, 1, 1, 0x84, 1, 0, 1, b'b', 0]);
        let third = Bytes::from_static(&[1, 1, 1, 2, 0x84, 1, 1, 1, b'c', 0]);
        let parts = [first, second, third];
        let reference = one_at_a_time(&parts);
        let expected = {
            let map = reference.get_or_insert_map("m");
            let txn = reference.transact();
            map.get(&txn, "k").map(|v| v.to_string(&txn))
        };
        assert_eq!(expected.as_deref(), Some("c"));
        let loaded = YDoc::load(None, &parts).unwrap();
        let map = loaded.doc().get_or_insert_map("m");
        let txn = loaded.doc().transact();
        assert_eq!(map.get(&txn, "k").map(|v| v.to_string(&txn)), expected);
        assert_eq!(txn.state_vector(), reference.transact().state_vector());
    }
}
