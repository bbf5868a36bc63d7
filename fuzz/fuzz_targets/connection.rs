//! The connection state machine without sockets or tasks: arbitrary frames from four connections
//! of one room go through the checks `handle_frame` (src/session/conn.rs) makes, message by
//! message, and what passes is handled the way the room actor (src/room/actor.rs) handles it:
//! updates applied to the room's `YDoc`, awareness to its `Awareness` map, step 1 answered with
//! a diff. A refused connection is closed: its later frames are ignored and its awareness states
//! are nulled, as when it leaves.
//!
//! Input: frames separated by `FRAME_SEPARATOR`; the first byte of each picks the connection
//! (low two bits): 0 and 1 read-write, 2 read-only with awareness, 3 read-only without.
//!
//! Checked: no panic, contained or not; a message refused by its check or by the engine leaves
//! the document's content (state vector and deletions) unchanged; a state vector that passes
//! the check gets a diff that decodes; a peer that receives every relayed update ends with the
//! room's content; a newcomer syncing from an empty state vector gets it too; every awareness
//! payload the room sends (full state, nulls) decodes. With `TANDEM_FUZZ_ALLOW_KNOWN=1` the
//! invariants that the open findings break (docs/fuzzing.md) are relaxed, and a panic inside yrs
//! discards the room as the server does (the input ends there).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tandem::doc::{check_state_vector, Applied, Comparison, DecodedUpdate, DocError, YDoc};
use tandem::ids::ConnId;
use tandem::room::awareness::{Awareness, Owner};
use tandem_fuzz::{base_document, frames, install_panic_filter, known_issue, known_panic_happened};
use tandem_protocol::{AwarenessUpdate, Message, MessageReader, SyncMessage};
use tokio::time::Instant;

const CONNS: usize = 4;

const SAME: Comparison = Comparison {
    we_have_more: false,
    they_have_more: false,
};

#[derive(Clone, Copy)]
struct Perms {
    write: bool,
    awareness: bool,
}

fn perms(conn: usize) -> Perms {
    Perms {
        write: conn < 2,
        awareness: conn < 3,
    }
}

struct Room {
    doc: YDoc,
    awareness: Awareness,
    /// A client that received every update the room relayed.
    peer: YDoc,
    open: [bool; CONNS],
    /// A refused update changed the document (a known issue, tolerated with `allow_known`):
    /// the peer cannot have what was never relayed.
    diverged: bool,
}

/// Why a connection stops.
enum Stop {
    /// `handle_frame` or the room refused something: the connection is closed.
    Refused,
    /// The engine panicked (the known yrs panic, with `TANDEM_FUZZ_ALLOW_KNOWN`): the server
    /// discards the room and closes every connection, so this input is done.
    Poisoned,
}

fn owner(conn: usize) -> Owner {
    Owner::Local(ConnId(conn as u64))
}

fn check_awareness_payload(payload: &[u8]) {
    AwarenessUpdate::decode(payload).expect("an awareness payload the room sends decodes");
}

/// A contained engine panic: only the known one can get here, any other aborts.
fn poisoned(e: &DocError) -> Option<Stop> {
    matches!(e, DocError::Panicked).then(|| {
        assert!(known_panic_happened(), "yrs panicked (contained)");
        Stop::Poisoned
    })
}

impl Room {
    fn new() -> Self {
        let load = || YDoc::load(Some(base_document()), &[]).expect("base loads");
        Self {
            doc: load(),
            awareness: Awareness::new(),
            peer: load(),
            open: [true; CONNS],
            diverged: false,
        }
    }

    /// `handle_frame`: each message checked, then handed to the room.
    fn frame(&mut self, conn: usize, frame: Bytes) -> Result<(), Stop> {
        let p = perms(conn);
        // Set when the room refuses an update: the actor closes the outbox, but the reader has
        // already sent it the rest of the frame, which the actor still handles.
        let mut closed_by_room = false;
        let mut reader = MessageReader::new(&frame);
        while let Some(next) = reader.next_raw() {
            let (msg, raw) = next.map_err(|_| Stop::Refused)?;
            match msg {
                Message::Sync(SyncMessage::Step1(sv)) => {
                    if let Err(e) = check_state_vector(sv) {
                        return Err(poisoned(&e).unwrap_or(Stop::Refused));
                    }
                    self.answer_step1(sv)?;
                }
                Message::Sync(SyncMessage::Step2(_) | SyncMessage::Update(_)) if !p.write => {}
                Message::Sync(SyncMessage::Step2(u) | SyncMessage::Update(u)) => {
                    let update = match DecodedUpdate::decode(frame.slice_ref(u)) {
                        Ok(update) => update,
                        Err(e) => return Err(poisoned(&e).unwrap_or(Stop::Refused)),
                    };
                    if !self.apply(update)? {
                        closed_by_room = true;
                    }
                }
                Message::Awareness(_) if !p.awareness => {}
                Message::Awareness(payload) => {
                    let update = AwarenessUpdate::decode(payload).map_err(|_| Stop::Refused)?;
                    assert!(raw.ends_with(payload));
                    self.awareness.apply(&owner(conn), &update, Instant::now());
                }
                Message::QueryAwareness => {
                    if let Some(state) = self.awareness.full_state() {
                        check_awareness_payload(&state);
                    }
                }
                Message::AckRequest => {}
                Message::Stored(_) | Message::AuthDenied(_) => return Err(Stop::Refused),
            }
        }
        if closed_by_room {
            Err(Stop::Refused)
        } else {
            Ok(())
        }
    }

    fn answer_step1(&mut self, sv: &[u8]) -> Result<(), Stop> {
        match self.doc.diff(sv) {
            Ok(diff) => {
                known_issue(
                    DecodedUpdate::decode(Bytes::from(diff)).is_ok(),
                    "the step 2 the room sends does not decode",
                );
                Ok(())
            }
            Err(e) => match poisoned(&e) {
                Some(stop) => Err(stop),
                None => panic!("a state vector that passed the check fails the diff: {e}"),
            },
        }
    }

    /// The actor's `apply`: `Ok(false)` when the room refuses the update (and closes the
    /// sender).
    fn apply(&mut self, update: DecodedUpdate) -> Result<bool, Stop> {
        let summary = self.doc.sync_summary();
        // An update yrs refused after integrating part of it: the room relays (and stores) that
        // part and closes the sender.
        let (result, refused) = match self.doc.apply_checked(update) {
            Err(DocError::PartlyApplied { effective, .. }) => (
                Ok(Applied::Changed {
                    effective,
                    complete: false,
                }),
                true,
            ),
            other => (other, false),
        };
        match result {
            Ok(Applied::Changed { effective, .. }) => {
                let Ok(relayed) = DecodedUpdate::decode(effective) else {
                    known_issue(false, "the update the room relays does not decode");
                    self.diverged = true;
                    return Ok(!refused);
                };
                match self.peer.apply(relayed) {
                    Ok(_) => {}
                    Err(e) => match poisoned(&e) {
                        // The peer is a client: its engine panicking is not the room's problem.
                        Some(_) => self.diverged = true,
                        None => panic!("the relayed update does not apply at a peer: {e}"),
                    },
                }
                Ok(!refused)
            }
            // Compared by content (state vector and deletions): how blocks are split may change.
            Ok(Applied::Unchanged) => {
                assert_eq!(
                    self.doc
                        .compare(&summary.0, &summary.1)
                        .expect("own summary"),
                    SAME,
                    "an unchanged document changed"
                );
                Ok(true)
            }
            // The dependency check lets through only what integrates at once.
            Ok(Applied::Pending) => panic!("a checked update was left waiting"),
            Err(e) => {
                if let Some(stop) = poisoned(&e) {
                    return Err(stop);
                }
                if self
                    .doc
                    .compare(&summary.0, &summary.1)
                    .expect("own summary")
                    != SAME
                {
                    panic!("an update refused by yrs changed the document without saying so");
                }
                Ok(false)
            }
        }
    }

    fn leave(&mut self, conn: usize) {
        self.open[conn] = false;
        if let Some(nulls) = self.awareness.remove_owner(&owner(conn)) {
            check_awareness_payload(&nulls);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    install_panic_filter();
    let mut room = Room::new();
    for chunk in frames(data) {
        let Some((&selector, frame)) = chunk.split_first() else {
            continue;
        };
        let conn = usize::from(selector) % CONNS;
        if !room.open[conn] {
            continue;
        }
        match room.frame(conn, Bytes::copy_from_slice(frame)) {
            Ok(()) => {}
            Err(Stop::Refused) => room.leave(conn),
            Err(Stop::Poisoned) => return,
        }
    }
    // The relays carried everything that integrated.
    let (sv, digest) = room.doc.sync_summary();
    if !room.diverged {
        known_issue(
            room.peer.compare(&sv, &digest).expect("own summary") == SAME,
            "a peer that got every relay differs from the room",
        );
    }
    // A newcomer's sync.
    let full = match room.doc.diff(&[0]) {
        Ok(full) => full,
        Err(e) if poisoned(&e).is_some() => return,
        Err(e) => panic!("diff for an empty state vector: {e}"),
    };
    let Ok(step2) = DecodedUpdate::decode(Bytes::from(full)) else {
        return known_issue(false, "the step 2 the room sends does not decode");
    };
    let mut newcomer = YDoc::new();
    match newcomer.apply(step2) {
        Ok(_) => {}
        Err(e) if poisoned(&e).is_some() => return,
        Err(e) => panic!("step 2 does not apply: {e}"),
    }
    known_issue(
        newcomer.compare(&sv, &digest).expect("own summary") == SAME,
        "a newcomer's step 2 does not hold the room's document",
    );
    if let Some(state) = room.awareness.full_state() {
        check_awareness_payload(&state);
    }
    for conn in 0..CONNS {
        room.leave(conn);
    }
    assert_eq!(room.awareness.live(), 0);
});
