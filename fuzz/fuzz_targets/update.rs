//! yrs v1 updates as the server takes them: `DecodedUpdate::decode` on the connection's task,
//! then `YDoc::apply_checked` in the room, on an empty document and on one with content (so that updates
//! can refer to existing items).
//!
//! Checked: tandem's own reader of the update's structure (`UpdateShape`) and yrs' decoder read
//! the same blocks and deletions whenever both accept the bytes; no panic, not even one the server would contain (libfuzzer-sys aborts on any panic,
//! caught or not: in the server a contained panic still discards the room and disconnects
//! everyone in it); an update that decodes but does not apply leaves the document's content
//! (state vector and deletions) unchanged; what the room relays (`effective`) decodes and brings
//! a peer that had the same starting state to the room's content; the log the store keeps (the
//! starting state and that update) reloads to the same content; the room's state (its step 2,
//! its snapshot) decodes and reloads to the same content.
//!
//! With `TANDEM_FUZZ_ALLOW_KNOWN=1` the invariants that the open findings break (docs/fuzzing.md)
//! are relaxed and panics inside yrs are contained as the server contains them.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tandem::doc::{Applied, Comparison, DecodedUpdate, DocError, YDoc};
use tandem_fuzz::{base_document, install_panic_filter, known_issue, known_panic_happened};
use tandem_protocol::update::BlockKind;
use tandem_protocol::UpdateShape;
use yrs::updates::decoder::Decode;
use yrs::Update;

const SAME: Comparison = Comparison {
    we_have_more: false,
    they_have_more: false,
};

fn fresh(seeded: bool) -> YDoc {
    if seeded {
        YDoc::load(Some(base_document()), &[]).expect("base loads")
    } else {
        YDoc::new()
    }
}

fn run(raw: &Bytes, seeded: bool) {
    let Ok(update) = DecodedUpdate::decode(raw.clone()) else {
        return;
    };
    let mut room = fresh(seeded);
    let summary = room.sync_summary();
    // An update yrs refused after integrating part of it: the room relays that part.
    let result = match room.apply_checked(update) {
        Err(DocError::PartlyApplied { effective, .. }) => Ok(Applied::Changed {
            effective,
            complete: false,
        }),
        other => other,
    };
    match result {
        // Only a panic inside yrs with `TANDEM_FUZZ_ALLOW_KNOWN` gets here (any other aborts):
        // the server would discard the room, so there is nothing more to check.
        Err(DocError::Panicked) if known_panic_happened() => return,
        Err(DocError::Panicked) => panic!("yrs panicked (contained)"),
        // Compared by content (state vector and deletions): how blocks are split may change.
        Err(_) => assert_eq!(
            room.compare(&summary.0, &summary.1).expect("own summary"),
            SAME,
            "an update refused by yrs changed the document without saying so"
        ),
        Ok(Applied::Unchanged) => assert_eq!(
            room.compare(&summary.0, &summary.1).expect("own summary"),
            SAME,
            "an unchanged document changed"
        ),
        // The dependency check lets through only what integrates at once.
        Ok(Applied::Pending) => panic!("a checked update was left waiting"),
        Ok(Applied::Changed { effective, .. }) => {
            // What the store keeps, the base snapshot and the update as a log row, reloads to
            // the room's content (a load merges keystrokes first: src/doc/burst.rs).
            let base = seeded.then(base_document);
            match YDoc::load(base, std::slice::from_ref(&effective)) {
                Ok(reloaded) => {
                    let (sv, digest) = room.sync_summary();
                    known_issue(
                        reloaded.compare(&sv, &digest).expect("own summary") == SAME,
                        "the room's log reloads to another document",
                    );
                }
                Err(DocError::Panicked) if known_panic_happened() => return,
                Err(e) => panic!("the room's log does not load: {e}"),
            }
            let mut peer = fresh(seeded);
            let Ok(relayed) = DecodedUpdate::decode(effective) else {
                return known_issue(false, "the update the room relays does not decode");
            };
            match peer.apply(relayed) {
                Ok(_) => {}
                Err(DocError::Panicked) if known_panic_happened() => return,
                Err(e) => panic!("the relayed update does not apply: {e}"),
            }
            let (sv, digest) = room.sync_summary();
            known_issue(
                peer.compare(&sv, &digest).expect("own summary") == SAME,
                "a peer that got the relayed update differs from the room",
            );
        }
    }
    // What the room does afterwards with its document: answer a step 1, measure, snapshot.
    let (state, sv) = match room.encode_state() {
        Ok(encoded) => encoded,
        Err(DocError::Panicked) if known_panic_happened() => return,
        Err(e) => panic!("encoding the room's state: {e}"),
    };
    match room.diff(&sv) {
        Ok(_) => {}
        Err(DocError::Panicked) if known_panic_happened() => return,
        Err(e) => panic!("diff against the room's own state vector: {e}"),
    }
    let _ = room.encoded_len();
    let reloaded = match YDoc::load(Some(&state), &[]) {
        Ok(doc) => doc,
        Err(DocError::Panicked) if known_panic_happened() => return,
        Err(_) => return known_issue(false, "the room's own snapshot does not decode"),
    };
    let (sv, digest) = room.sync_summary();
    known_issue(
        reloaded.compare(&sv, &digest).expect("own summary") == SAME,
        "the room's own snapshot does not hold the document",
    );
}

/// Sorted, merged `(client, start, end)` ranges.
fn normalize(mut ranges: Vec<(u64, u32, u32)>) -> Vec<(u64, u32, u32)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u32, u32)> = Vec::new();
    for (c, s, e) in ranges {
        match out.last_mut() {
            Some(last) if last.0 == c && s <= last.2 => last.2 = last.2.max(e),
            _ => out.push((c, s, e)),
        }
    }
    out
}

/// Whatever tandem's reader accepts, yrs reads with the same blocks and deletions: the checks
/// made on the reader's view hold for what yrs integrates.
fn same_reading(data: &[u8]) {
    let Ok(shape) = UpdateShape::read(data) else {
        return;
    };
    let update = match Update::decode_v1(data) {
        Ok(update) => update,
        Err(_) => return, // stricter in yrs (e.g. a string it will not take): refused anyway
    };
    let mut ours = Vec::new();
    for run in shape.clients() {
        for b in shape.blocks(run) {
            if b.kind != BlockKind::Skip {
                ours.push((run.client, b.clock, b.clock + b.len));
            }
        }
    }
    let mut theirs = Vec::new();
    for (client, ranges) in update.insertions(true).iter() {
        for r in ranges.iter() {
            theirs.push((client.get(), r.start, r.end));
        }
    }
    assert_eq!(
        normalize(ours),
        normalize(theirs),
        "blocks read differently"
    );
    let ours = shape
        .deletions()
        .iter()
        .map(|d| (d.client, d.clock, d.clock + d.len))
        .collect();
    let mut theirs = Vec::new();
    for (client, ranges) in update.delete_set().iter() {
        for r in ranges.iter() {
            theirs.push((client.get(), r.start, r.end));
        }
    }
    assert_eq!(
        normalize(ours),
        normalize(theirs),
        "deletions read differently"
    );
}

fuzz_target!(|data: &[u8]| {
    install_panic_filter();
    same_reading(data);
    let raw = Bytes::copy_from_slice(data);
    run(&raw, false);
    run(&raw, true);
});
