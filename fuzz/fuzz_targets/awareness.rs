//! Awareness update payloads (`varUint(n)` then n × client id, clock, JSON state) and what a room
//! does with one that decodes: `tandem::room::awareness::Awareness::apply`.
//!
//! Checked: no panic; a payload that decodes re-encodes to exactly its bytes (the decoder is
//! strict and refuses trailing bytes); every state is JSON; applying is idempotent (the same
//! update a second time is never news); the room's full state always decodes and holds only live
//! states; removing the owner leaves nothing live and yields decodable null states.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem::ids::ConnId;
use tandem::room::awareness::{Awareness, Owner};
use tandem_protocol::awareness::encode_entries;
use tandem_protocol::AwarenessUpdate;
use tokio::time::Instant;

fn check_payload(payload: &[u8], want_live: bool) -> usize {
    let update = AwarenessUpdate::decode(payload).expect("the room's own payload decodes");
    for e in &update.entries {
        assert_eq!(!e.is_removal(), want_live, "{e:?}");
    }
    update.entries.len()
}

fuzz_target!(|payload: &[u8]| {
    let Ok(update) = AwarenessUpdate::decode(payload) else {
        return;
    };
    let mut out = Vec::new();
    encode_entries(&mut out, update.entries.iter().copied());
    assert_eq!(out, payload, "re-encoding differs");
    for e in &update.entries {
        assert!(
            serde_json::from_str::<&serde_json::value::RawValue>(e.state).is_ok(),
            "{e:?}"
        );
        // What a stock client does with it; its verdict does not matter here, only no panic.
        let _ = serde_json::from_str::<serde_json::Value>(e.state);
    }

    let now = Instant::now();
    let owner = Owner::Local(ConnId(1));
    let mut room = Awareness::new();
    let news = room.apply(&owner, &update, now);
    // The first entry for a client id never seen is always news.
    assert_eq!(news, !update.entries.is_empty());
    assert!(
        !room.apply(&owner, &update, now),
        "the same update twice is news"
    );
    let live = room.live();
    match room.full_state() {
        Some(full) => assert_eq!(check_payload(&full, true), live),
        None => assert_eq!(live, 0),
    }
    // Another connection replaying the same entries is not news either.
    assert!(!room.apply(&Owner::Local(ConnId(2)), &update, now));
    if let Some(nulls) = room.remove_owner(&owner) {
        check_payload(&nulls, false);
    }
    assert_eq!(room.live(), 0);
    assert!(room.full_state().is_none());
});
