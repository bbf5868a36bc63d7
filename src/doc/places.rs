//! [`Places`]: where each item of a document sits (its parent type and map key), so that an
//! update whose item has its left origin in one place and its right origin in another is
//! refused before yrs integrates it.
//!
//! A Yjs item's origins are its neighbours at the moment it was created, so both lie in the
//! sequence (or map entry) the item joins. yrs 0.28 takes an item's parent from its left origin
//! but its map key from whichever origin has one: an item placed between a character of a text
//! and a map entry goes into the text's sequence *and* becomes a map entry of that text, and the
//! room's own encoding of that state (a newcomer's sync step 2, a snapshot) no longer decodes to
//! what the room holds (fuzz finding 13 in docs/fuzzing.md). No client that only inserts
//! between neighbours sends such an item; yrs' public API does not tell where an item sits, so
//! tandem keeps its own record, a few runs of clocks per client and place.

use tandem_protocol::{BlockAt, BlockKind, Id, ParentRef, UpdateShape};

use crate::hashing::FastMap;

/// A parent type and, for map entries, the key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Place {
    parent: ParentRef,
    sub: Option<Box<str>>,
}

/// An index into [`Places::table`]; [`UNKNOWN`] for garbage-collected ranges and items whose
/// place cannot be told (both origins collected).
pub(super) type PlaceIdx = u32;
const UNKNOWN: PlaceIdx = PlaceIdx::MAX;

/// Consecutive clocks of one client in one place.
#[derive(Debug, Clone, Copy)]
struct Run {
    start: u32,
    end: u32,
    place: PlaceIdx,
}

/// An item of an update that cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Misplaced {
    /// Its left origin lies in one type or map entry and its right origin in another.
    #[error(
        "block {client}:{clock} has its left origin in one type or map entry and its right \
         origin in another"
    )]
    Origins {
        /// The item's client.
        client: u64,
        /// The item's clock.
        clock: u32,
    },
    /// It starts inside what the document already holds of its client, and names another
    /// place than the held clocks it continues.
    #[error(
        "block {client}:{clock} repeats clocks the document holds and continues them in another \
         type or map entry"
    )]
    Overlap {
        /// The item's client.
        client: u64,
        /// The item's clock.
        clock: u32,
    },
    /// It is a live value of a map entry that spans more than one clock.
    #[error(
        "block {client}:{clock} is a map entry's value {len} clocks long that the update does \
         not delete"
    )]
    LongEntry {
        /// The item's client.
        client: u64,
        /// The item's clock.
        clock: u32,
        /// How many clocks it spans.
        len: u32,
    },
}

/// The places of an update's new blocks, worked out by [`Places::check`] and kept by
/// [`Places::record`] once the engine integrated the update.
#[derive(Debug, Default)]
pub(super) struct Placed {
    runs: Vec<(u64, Run)>,
    new_places: Vec<Place>,
}

/// Where each item of a document sits, as runs of clocks per client.
#[derive(Debug, Default)]
pub(super) struct Places {
    runs: FastMap<u64, Vec<Run>>,
    table: Vec<Place>,
    index: FastMap<Place, PlaceIdx>,
}

impl Places {
    /// The places of everything in `state`, a document's full state (every block it depends on
    /// is in it). What cannot be read or ordered is left out: lookups of it say "unknown", and
    /// unknown never refuses.
    pub(super) fn of_state(state: &[u8]) -> Self {
        let mut places = Self::default();
        if let Ok(shape) = UpdateShape::read(state) {
            places.learn(&shape, |_| 0);
        }
        places
    }

    /// Works out the place of each block of `shape` that the document (holding `held(client)`
    /// clocks of each client) does not hold yet, in `order` (see
    /// [`UpdateShape::integration_order`]), refusing an item whose origins lie in different
    /// places.
    pub(super) fn check(
        &self,
        shape: &UpdateShape,
        order: &[BlockAt],
        held: impl Fn(u64) -> u32,
    ) -> Result<Placed, Misplaced> {
        self.place(shape, order, held, true)
    }

    fn place(
        &self,
        shape: &UpdateShape,
        order: &[BlockAt],
        held: impl Fn(u64) -> u32,
        strict: bool,
    ) -> Result<Placed, Misplaced> {
        let mut placed = Placed::default();
        // The place of each block of the update, by its index among all blocks; filled in
        // `order`, so that a block's origins in the update are placed before it.
        let mut of_block = vec![UNKNOWN; shape.block_count()];
        // Items longer than one clock placed in a map entry: see [`check_deleted`].
        let mut long_entries = Vec::new();
        let lookup = |of_block: &[PlaceIdx], id: Id| -> PlaceIdx {
            if id.clock < held(id.client) {
                return self.get(id);
            }
            shape
                .locate(id)
                .map_or(UNKNOWN, |at| of_block[shape.block_index(at)])
        };
        for &(i, j) in order {
            let block = shape.block((i, j));
            if block.kind != BlockKind::Item {
                continue;
            }
            let place = match &block.parent {
                Some(parent) => self.intern(
                    &mut placed,
                    Place {
                        parent: parent.clone(),
                        sub: block.parent_sub.clone(),
                    },
                ),
                None => {
                    let left = block.deps[0].map_or(UNKNOWN, |id| lookup(&of_block, id));
                    let right = block.deps[1].map_or(UNKNOWN, |id| lookup(&of_block, id));
                    if strict && left != UNKNOWN && right != UNKNOWN && left != right {
                        return Err(Misplaced::Origins {
                            client: shape.clients()[i].client,
                            clock: block.clock,
                        });
                    }
                    if left != UNKNOWN {
                        left
                    } else {
                        right
                    }
                }
            };
            // A block that starts inside what the document holds of its client and goes past
            // it: yrs integrates only its new part, with the last held clock as its left
            // origin, whatever the block names as its parent or origins. That clock must lie
            // where the block does.
            let client = shape.clients()[i].client;
            let have = held(client);
            if strict && block.clock < have && have < block.clock + block.len && place != UNKNOWN {
                let prefix = self.get(Id {
                    client,
                    clock: have - 1,
                });
                if prefix != UNKNOWN && prefix != place {
                    return Err(Misplaced::Overlap {
                        client,
                        clock: block.clock,
                    });
                }
            }
            of_block[shape.block_index((i, j))] = place;
            if strict && block.len > 1 && !block.content_deleted && self.keyed(&placed, place) {
                long_entries.push((client, block.clock, block.len));
            }
        }
        if !long_entries.is_empty() {
            check_deleted(shape, &long_entries)?;
        }
        for (i, run) in shape.clients().iter().enumerate() {
            let have = held(run.client);
            // Neighbouring blocks in one place make one run.
            let mut current: Option<Run> = None;
            for (j, block) in shape.blocks(run).iter().enumerate() {
                let end = block.clock + block.len;
                if end <= have {
                    continue;
                }
                let place = of_block[shape.block_index((i, j))];
                match &mut current {
                    Some(run) if run.place == place => run.end = end,
                    _ => {
                        let next = Run {
                            start: block.clock.max(have),
                            end,
                            place,
                        };
                        if let Some(done) = current.replace(next) {
                            placed.runs.push((run.client, done));
                        }
                    }
                }
            }
            if let Some(done) = current {
                placed.runs.push((run.client, done));
            }
        }
        Ok(placed)
    }

    /// The index of `place`: in the table, or among the update's new places.
    fn intern(&self, placed: &mut Placed, place: Place) -> PlaceIdx {
        if let Some(&idx) = self.index.get(&place) {
            return idx;
        }
        let k = match placed.new_places.iter().position(|p| *p == place) {
            Some(k) => k,
            None => {
                placed.new_places.push(place);
                placed.new_places.len() - 1
            }
        };
        (self.table.len() + k) as PlaceIdx
    }

    /// Whether `place` (in the table or among `placed`'s new places) is a map entry.
    fn keyed(&self, placed: &Placed, place: PlaceIdx) -> bool {
        let place = place as usize;
        let entry = match self.table.get(place) {
            Some(entry) => Some(entry),
            None => placed.new_places.get(place - self.table.len()),
        };
        entry.is_some_and(|p| p.sub.is_some())
    }

    /// Keeps the places of an update the engine integrated.
    pub(super) fn record(&mut self, placed: Placed) {
        for place in placed.new_places {
            self.index
                .insert(place.clone(), self.table.len() as PlaceIdx);
            self.table.push(place);
        }
        for (client, run) in placed.runs {
            self.push_run(client, run);
        }
    }

    /// Keeps that `client`'s clocks `start..end`, past what it held so far, sit in `place` (a
    /// place this record knows: see [`sequence_of`](Self::sequence_of)).
    pub(super) fn record_run(&mut self, client: u64, start: u32, end: u32, place: PlaceIdx) {
        self.push_run(client, Run { start, end, place });
    }

    fn push_run(&mut self, client: u64, run: Run) {
        let runs = self.runs.entry(client).or_default();
        match runs.last_mut() {
            Some(last) if last.end == run.start && last.place == run.place => last.end = run.end,
            // Clocks only grow: an update adds past what the document holds.
            Some(last) if last.end > run.start => {}
            _ => runs.push(run),
        }
    }

    /// Learns the places of what `shape` adds to a document holding `held(client)` clocks of
    /// each client, if the engine can integrate it at once ([`UpdateShape::integration_order`]);
    /// `false`, learning nothing, if it cannot. Nothing is refused: this reads stored updates,
    /// which were checked when they arrived.
    pub(super) fn learn(&mut self, shape: &UpdateShape, held: impl Fn(u64) -> u32) -> bool {
        let Ok(order) = shape.integration_order(&held) else {
            return false;
        };
        match self.place(shape, &order, held, false) {
            Ok(placed) => {
                self.record(placed);
                true
            }
            Err(_) => false,
        }
    }

    /// The place of `id` if this record knows it and it is a sequence (a type's list of items,
    /// not a map entry): where a string that continues `id` may be merged with it.
    pub(super) fn sequence_of(&self, id: Id) -> Option<PlaceIdx> {
        let place = self.get(id);
        let known = self.table.get(place as usize)?;
        known.sub.is_none().then_some(place)
    }

    /// The place of `id`, or [`UNKNOWN`].
    fn get(&self, id: Id) -> PlaceIdx {
        let Some(runs) = self.runs.get(&id.client) else {
            return UNKNOWN;
        };
        match runs.partition_point(|r| r.start <= id.clock).checked_sub(1) {
            Some(k) if id.clock < runs[k].end => runs[k].place,
            _ => UNKNOWN,
        }
    }

    /// How many runs are kept (for tests and memory accounting).
    #[cfg(test)]
    pub(super) fn runs(&self) -> usize {
        self.runs.values().map(Vec::len).sum()
    }
}

/// Refuses an item of `long` (client, clock, length: items longer than one clock placed in a
/// map entry) that the update's delete set does not wholly delete.
///
/// A map entry's value is one element: Yjs and yrs only write longer items into a map entry
/// when they merged values that were all deleted. yrs integrates a live long value whole, but
/// once an id inside it is referred to and the item is split, the room's own encoding holds two
/// items, and the second, integrated on its own, deletes the first: a snapshot then decodes to
/// less than the room holds (fuzz finding 15 in docs/fuzzing.md).
fn check_deleted(shape: &UpdateShape, long: &[(u64, u32, u32)]) -> Result<(), Misplaced> {
    // The delete set names each client once, with sorted ranges.
    let mut by_client: FastMap<u64, (usize, usize)> = FastMap::default();
    for (k, d) in shape.deletions().iter().enumerate() {
        by_client.entry(d.client).or_insert((k, k)).1 = k + 1;
    }
    for &(client, clock, len) in long {
        let refused = Misplaced::LongEntry { client, clock, len };
        let &(from, to) = by_client.get(&client).ok_or(refused.clone())?;
        let ranges = &shape.deletions()[from..to];
        // The range that holds `clock`, then ranges that follow on without a gap.
        let mut k = ranges.partition_point(|d| d.clock <= clock);
        let mut covered = clock;
        let end = u64::from(clock) + u64::from(len);
        if k == 0 {
            return Err(refused);
        }
        k -= 1;
        while k < ranges.len() && ranges[k].clock <= covered {
            covered = covered.max(ranges[k].clock.saturating_add(ranges[k].len));
            if u64::from(covered) >= end {
                break;
            }
            k += 1;
        }
        if u64::from(covered) < end {
            return Err(refused);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::testutil::edit;
    use yrs::{Doc, Map, ReadTxn, StateVector, Transact, WriteTxn};

    fn state(doc: &Doc) -> Vec<u8> {
        doc.transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    fn check(places: &Places, update: &[u8], held: &StateVector) -> Result<Placed, Misplaced> {
        let shape = UpdateShape::read(update).unwrap();
        let held = |c| held.get(&yrs::ClientID::new(c));
        let order = shape.integration_order(held).unwrap();
        places.check(&shape, &order, held)
    }

    #[test]
    fn keystrokes_in_one_text_make_one_run() {
        let doc = Doc::with_client_id(1);
        let mut places = Places::default();
        for (i, c) in "hello".chars().enumerate() {
            let held = doc.transact().state_vector();
            let update = edit(&doc, i as u32, &c.to_string());
            places.record(check(&places, &update, &held).unwrap());
        }
        assert_eq!(places.runs(), 1);
        assert_eq!(Places::of_state(&state(&doc)).runs(), 1);
    }

    #[test]
    fn edits_between_real_neighbours_pass_and_misplaced_ones_do_not() {
        let doc = Doc::with_client_id(1);
        edit(&doc, 0, "abcdef");
        {
            let mut txn = doc.transact_mut();
            let m = txn.get_or_insert_map("m");
            m.insert(&mut txn, "k", "v");
        }
        let places = Places::of_state(&state(&doc));
        let held = doc.transact().state_vector();
        // Another client types in the middle of the text and sets the key again.
        let other = Doc::with_client_id(2);
        {
            use yrs::updates::decoder::Decode;
            let mut txn = other.transact_mut();
            txn.apply_update(yrs::Update::decode_v1(&state(&doc)).unwrap())
                .unwrap();
        }
        edit(&other, 3, "xyz");
        {
            let mut txn = other.transact_mut();
            let m = txn.get_or_insert_map("m");
            m.insert(&mut txn, "k", "w");
        }
        let update = other.transact().encode_state_as_update_v1(&held);
        let placed = check(&places, &update, &held).unwrap();
        assert_eq!(placed.runs.len(), 2, "{placed:?}");
        // Client 3: one character with left origin 1:2 (the text), right origin 1:6 (the
        // map entry `k`).
        let odd = [1, 1, 3, 0, 0xc4, 1, 2, 1, 6, 1, b'!', 0];
        assert_eq!(
            check(&places, &odd, &held).unwrap_err(),
            Misplaced::Origins {
                client: 3,
                clock: 0
            }
        );
        // The same with both origins in the text passes.
        let fine = [1, 1, 3, 0, 0xc4, 1, 2, 1, 3, 1, b'!', 0];
        assert!(check(&places, &fine, &held).is_ok());
    }

    #[test]
    fn a_live_map_value_longer_than_one_clock_must_be_deleted_by_its_update() {
        let places = Places::default();
        let held = StateVector::default();
        // Client 5 writes the string "abc" as the value of root map `m`'s key `k`.
        let entry = |delete_set: &[u8]| {
            let mut update = vec![1, 1, 5, 0, 0x24, 1, 1, b'm', 1, b'k', 3, b'a', b'b', b'c'];
            update.extend_from_slice(delete_set);
            update
        };
        let refused = Misplaced::LongEntry {
            client: 5,
            clock: 0,
            len: 3,
        };
        assert_eq!(check(&places, &entry(&[0]), &held).unwrap_err(), refused);
        // Deleted in two ranges that meet: passes.
        assert!(check(&places, &entry(&[1, 5, 2, 0, 2, 2, 1]), &held).is_ok());
        // Deleted but for clock 1: refused.
        let gap = [1, 5, 2, 0, 1, 2, 1];
        assert_eq!(check(&places, &entry(&gap), &held).unwrap_err(), refused);
        // Deleted from clock 1 on: refused.
        let late = [1, 5, 1, 1, 2];
        assert_eq!(check(&places, &entry(&late), &held).unwrap_err(), refused);
        // One character as the value: passes.
        let one = [1, 1, 5, 0, 0x24, 1, 1, b'm', 1, b'k', 1, b'a', 0];
        assert!(check(&places, &one, &held).is_ok());
        // The same three characters in a text (no key): passes.
        let text = [1, 1, 5, 0, 0x04, 1, 1, b't', 3, b'a', b'b', b'c', 0];
        assert!(check(&places, &text, &held).is_ok());
    }

    #[test]
    fn a_state_with_many_clients_is_placed_too() {
        let doc = Doc::with_client_id(1);
        edit(&doc, 0, "x");
        for client in 2..40u64 {
            let other = Doc::with_client_id(client);
            {
                use yrs::updates::decoder::Decode;
                let mut txn = other.transact_mut();
                txn.apply_update(yrs::Update::decode_v1(&state(&doc)).unwrap())
                    .unwrap();
                let m = txn.get_or_insert_map("m");
                m.insert(&mut txn, "k", client as f64);
            }
            edit(&other, 1, "y");
            let mut txn = doc.transact_mut();
            use yrs::updates::decoder::Decode;
            txn.apply_update(yrs::Update::decode_v1(&state(&other)).unwrap())
                .unwrap();
        }
        let places = Places::of_state(&state(&doc));
        let held = doc.transact().state_vector();
        // Left origin 1:0 (the text), right origin 39:0 (the last entry `k` of the map).
        let odd = [1, 1, 50, 0, 0xc4, 1, 0, 39, 0, 1, b'!', 0];
        assert!(check(&places, &odd, &held).is_err());
        // Left origin 1:0, right origin 39:1 (client 39's "y" in the text).
        let fine = [1, 1, 50, 0, 0xc4, 1, 0, 39, 1, 1, b'!', 0];
        assert!(check(&places, &fine, &held).is_ok());
    }
}
