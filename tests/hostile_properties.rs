//! Property: hostile bytes cannot hurt a room. Two healthy clients share a room with known text
//! and presence; for each case a raw socket sends arbitrary frames (random bytes, or valid message
//! headers around random, truncated or corrupted payloads). Afterwards:
//!
//! - the server is alive: a newcomer joins and syncs to exactly what the healthy clients hold;
//! - the document changed only by the updates in the hostile bytes that the server's own
//!   decoders accept: a reference copy of the room's document (taken from the step 2 the room
//!   sends before each case) gets exactly those, applied as the room applies them (with its
//!   dependency check; a refused update ends what the connection can change), and must match the
//!   room afterwards (only if the engine panics, which restarts the room from its store, is just
//!   convergence checked);
//! - the healthy clients are still connected, converge on new edits, and once the hostile
//!   connection has gone see exactly the same presence as before.
//!
//! Ordering without sleeps: the hostile socket is closed and read to its end, so every command
//! of it is in the room's inbox; then an edit from each healthy client must reach the other. The
//! room handles its inbox in order, so both have seen everything the hostile frames caused.
//! One server per test, not per case.

mod common;

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use common::{append_text, raw, text, TestServer, WAIT};
use futures_util::{SinkExt, StreamExt};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::{json, Value};
use tandem::doc::{check_state_vector, DecodedUpdate, DocError, YDoc};
use tandem_client::{Client, ClientOptions};
use tandem_protocol::awareness::{encode_entries, AwarenessEntry};
use tandem_protocol::lib0::write_var_uint;
use tandem_protocol::{AwarenessUpdate, Message, MessageReader, SyncMessage};
use yrs::{ReadTxn, Transact};

/// A runner for `HOSTILE_CASES` cases (32 by default) from seed `HOSTILE_SEED` (a number, or
/// `random`; a fixed seed by default, so that the normal test run always tries the same cases).
/// Hunt with e.g. `HOSTILE_SEED=random HOSTILE_CASES=1000`.
fn runner() -> TestRunner {
    let cases = std::env::var("HOSTILE_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let seed = std::env::var("HOSTILE_SEED").unwrap_or_default();
    if seed == "random" {
        return TestRunner::new(config);
    }
    let seed: u64 = seed.parse().unwrap_or(1);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes))
}

/// The healthy side of a room, and a reference copy of its document to which exactly what the
/// server's decoders let through is applied.
struct Room {
    server: TestServer,
    name: &'static str,
    a: Client,
    b: Client,
    presence: HashMap<u64, Value>,
    reference: YDoc,
    round: u32,
}

impl Room {
    async fn start(name: &'static str) -> Self {
        let server = TestServer::start().await;
        let join = |who: &str| ClientOptions {
            initial_awareness: Some(json!({ "user": who })),
            ..ClientOptions::default()
        };
        let a = Client::connect_with(&server.url(name), join("a"))
            .await
            .unwrap();
        let b = Client::connect_with(&server.url(name), join("b"))
            .await
            .unwrap();
        a.wait_synced(WAIT).await.unwrap();
        b.wait_synced(WAIT).await.unwrap();
        append_text(a.doc(), "t", "base");
        b.wait_until(WAIT, |d| text(d, "t") == "base")
            .await
            .unwrap();
        let presence = HashMap::from([
            (a.client_id(), json!({ "user": "a" })),
            (b.client_id(), json!({ "user": "b" })),
        ]);
        for c in [&a, &b] {
            c.wait_awareness(WAIT, |m| *m == presence).await.unwrap();
        }
        let mut room = Self {
            server,
            name,
            a,
            b,
            presence,
            reference: YDoc::new(),
            round: 0,
        };
        room.reference = room.room_state().await.unwrap();
        room
    }

    /// Sends `frames` from a raw socket and checks that the room is unharmed.
    async fn check(&mut self, frames: Vec<Vec<u8>>) -> Result<(), TestCaseError> {
        self.round += 1;
        let verdict = simulate(&mut self.reference, &frames);

        let mut hostile = raw(&self.server.url(self.name)).await;
        for frame in frames {
            // The server may already have closed the socket: later sends may fail.
            if hostile
                .send(tokio_tungstenite::tungstenite::Message::binary(frame))
                .await
                .is_err()
            {
                break;
            }
        }
        // The server reads our close only after every frame before it, and closes after a
        // refusal: either way, once the socket ends every command of it is in the room's inbox.
        let _ = hostile.close(None).await;
        let drained = tokio::time::timeout(WAIT, async {
            while let Some(Ok(_)) = hostile.next().await {}
        })
        .await;
        prop_assert!(drained.is_ok(), "the hostile socket did not end");

        // Marker edits both ways: afterwards each healthy client has seen every relay the
        // hostile frames caused.
        let (ma, mb) = (format!("<{}a>", self.round), format!("<{}b>", self.round));
        append_text(self.a.doc(), "t", &ma);
        self.b
            .wait_until(WAIT, |d| text(d, "t").contains(&ma))
            .await
            .map_err(|e| TestCaseError::fail(format!("b lost the marker: {e}")))?;
        append_text(self.b.doc(), "t", &mb);
        self.a
            .wait_until(WAIT, |d| text(d, "t").contains(&mb))
            .await
            .map_err(|e| TestCaseError::fail(format!("a lost the marker: {e}")))?;
        prop_assert!(self.a.close_info().is_none(), "{:?}", self.a.close_info());
        prop_assert!(self.b.close_info().is_none(), "{:?}", self.b.close_info());
        let (text_a, text_b) = (text(self.a.doc(), "t"), text(self.b.doc(), "t"));
        prop_assert_eq!(&text_a, &text_b, "healthy clients diverged");
        prop_assert_eq!(state_vector(self.a.doc()), state_vector(self.b.doc()));

        // The server is alive and serves the healthy clients' document to a newcomer.
        let newcomer = Client::connect(&self.server.url(self.name))
            .await
            .map_err(|e| TestCaseError::fail(format!("newcomer cannot connect: {e}")))?;
        newcomer
            .wait_synced(WAIT)
            .await
            .map_err(|e| TestCaseError::fail(format!("newcomer cannot sync: {e}")))?;
        prop_assert_eq!(&text(newcomer.doc(), "t"), &text_b);
        prop_assert_eq!(state_vector(newcomer.doc()), state_vector(self.b.doc()));
        newcomer.close().await.unwrap();

        // The room's document, exactly (with whatever waits for missing predecessors).
        let room = self.room_state().await?;

        // It is what the reference says: hostile bytes changed it only through updates the
        // decoders accept.
        if verdict == Verdict::Determinate {
            let without_markers = text(room.doc(), "t").replace(&ma, "").replace(&mb, "");
            prop_assert_eq!(
                &without_markers,
                &text(self.reference.doc(), "t"),
                "the room's text is not what the accepted updates make it"
            );
            let ours = [self.a.client_id(), self.b.client_id()];
            let others = |doc: &YDoc| {
                let mut sv = state_vector(doc.doc());
                sv.retain(|client, _| !ours.contains(client));
                sv
            };
            prop_assert_eq!(
                others(&room),
                others(&self.reference),
                "the room's clients are not what the accepted updates make them"
            );
        }

        // Whatever presence the hostile socket announced was nulled when it left.
        for c in [&self.a, &self.b] {
            c.wait_awareness(WAIT, |m| *m == self.presence)
                .await
                .map_err(|e| TestCaseError::fail(format!("presence differs: {e}")))?;
        }

        // The next case starts from the room as it is (markers included).
        self.reference = room;
        Ok(())
    }

    /// A copy of the room's document: the step 2 it sends for an empty state vector holds all
    /// of it, including data that waits for missing predecessors.
    async fn room_state(&self) -> Result<YDoc, TestCaseError> {
        use tokio_tungstenite::tungstenite::Message as Ws;
        let mut ws = raw(&self.server.url(self.name)).await;
        ws.send(Ws::binary(
            Message::Sync(SyncMessage::Step1(&[0])).to_frame(),
        ))
        .await
        .map_err(|e| TestCaseError::fail(format!("step 1: {e}")))?;
        let read = async {
            while let Some(Ok(msg)) = ws.next().await {
                let Ws::Binary(frame) = msg else { continue };
                for item in MessageReader::new(&frame) {
                    if let Ok(Message::Sync(SyncMessage::Step2(update))) = item {
                        return Some(Bytes::copy_from_slice(update));
                    }
                }
            }
            None
        };
        let step2 = tokio::time::timeout(WAIT, read)
            .await
            .ok()
            .flatten()
            .ok_or_else(|| TestCaseError::fail("no step 2 from the room"))?;
        let _ = ws.close(None).await;
        let update = DecodedUpdate::decode(step2)
            .map_err(|e| TestCaseError::fail(format!("the room's step 2 does not decode: {e}")))?;
        let mut doc = YDoc::new();
        doc.apply(update)
            .map_err(|e| TestCaseError::fail(format!("the room's step 2 does not apply: {e}")))?;
        Ok(doc)
    }
}

/// A document's state vector as clock per client, leaving out zero clocks (yrs may keep an
/// entry for a client it has nothing from yet, e.g. after an update that is still pending).
fn state_vector(doc: &yrs::Doc) -> BTreeMap<u64, u32> {
    doc.transact()
        .state_vector()
        .iter()
        .filter(|(_, &clock)| clock > 0)
        .map(|(client, &clock)| (client.get(), clock))
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The reference holds exactly what the room holds.
    Determinate,
    /// The engine panicked on an update: the room restarts from its store, whose content
    /// depends on what was committed by then.
    Indeterminate,
}

/// Feeds `frames` to `reference` with the checks `handle_frame` makes: messages up to the first
/// that fails its check take effect, and a refused connection reads nothing more.
fn simulate(reference: &mut YDoc, frames: &[Vec<u8>]) -> Verdict {
    for frame in frames {
        let frame = Bytes::copy_from_slice(frame);
        let mut reader = MessageReader::new(&frame);
        while let Some(next) = reader.next_raw() {
            let Ok((msg, _)) = next else {
                return Verdict::Determinate;
            };
            match msg {
                Message::Sync(SyncMessage::Step1(sv)) => {
                    if check_state_vector(sv).is_err() {
                        return Verdict::Determinate;
                    }
                }
                Message::Sync(SyncMessage::Step2(u) | SyncMessage::Update(u)) => {
                    let Ok(update) = DecodedUpdate::decode(frame.slice_ref(u)) else {
                        return Verdict::Determinate;
                    };
                    // As the room applies a client's update. A refused one takes its sender out
                    // of the room: nothing after it counts (what yrs integrated before refusing,
                    // `PartlyApplied`, stays, here as in the room).
                    match reference.apply_checked(update) {
                        Ok(_) => {}
                        Err(DocError::Panicked) => return Verdict::Indeterminate,
                        Err(_) => return Verdict::Determinate,
                    }
                }
                Message::Awareness(p) => {
                    if AwarenessUpdate::decode(p).is_err() {
                        return Verdict::Determinate;
                    }
                }
                Message::QueryAwareness | Message::AckRequest => {}
                Message::Stored(_) | Message::AuthDenied(_) => return Verdict::Determinate,
            }
        }
    }
    Verdict::Determinate
}

// ---- strategies ----

fn var_bytes(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_var_uint(&mut out, payload.len() as u64);
    out.extend_from_slice(payload);
    out
}

/// Real updates a hostile client could have made, to truncate and corrupt.
fn real_updates() -> Vec<Vec<u8>> {
    use yrs::{Array, Map, Text, WriteTxn};
    let doc = yrs::Doc::with_client_id(4242);
    let mut out = Vec::new();
    let mut edit = |f: &dyn Fn(&mut yrs::TransactionMut)| {
        let mut txn = doc.transact_mut();
        f(&mut txn);
        out.push(txn.encode_update_v1());
    };
    edit(&|txn| {
        let t = txn.get_or_insert_text("t");
        t.insert(txn, 0, "EVIL TEXT");
    });
    edit(&|txn| {
        let t = txn.get_or_insert_text("t");
        t.remove_range(txn, 1, 3);
        let m = txn.get_or_insert_map("m");
        m.insert(txn, "k", "v");
    });
    edit(&|txn| {
        let a = txn.get_or_insert_array("a");
        a.insert_range(txn, 0, [1, 2, 3]);
    });
    out
}

fn awareness_payload() -> impl Strategy<Value = Vec<u8>> {
    let state = prop_oneof![
        Just("null".to_string()),
        Just("{}".to_string()),
        "\\PC{0,20}",
        "[{}\\[\\]\":,0-9a-z ]{0,24}",
    ];
    proptest::collection::vec((0u64..1 << 20, 0u64..8, state), 0..3).prop_map(|entries| {
        let mut out = Vec::new();
        encode_entries(
            &mut out,
            entries
                .iter()
                .map(|(client_id, clock, state)| AwarenessEntry {
                    client_id: *client_id,
                    clock: *clock,
                    state,
                }),
        );
        out
    })
}

/// One message: a valid header with a payload that is random, truncated, corrupted or lying
/// about its length, or a message the server must refuse.
fn message() -> impl Strategy<Value = Vec<u8>> {
    let updates = real_updates();
    let n = updates.len();
    let bytes = || proptest::collection::vec(any::<u8>(), 0..48);
    let sync = prop_oneof![Just(0u8), Just(1u8), Just(2u8)];
    let truncated = {
        let updates = updates.clone();
        (0..n, any::<prop::sample::Index>(), 1u8..3).prop_map(move |(i, cut, sub)| {
            let u = &updates[i];
            let cut = cut.index(u.len()); // strictly shorter than the real update
            [vec![0, sub], var_bytes(&u[..cut])].concat()
        })
    };
    let corrupted = {
        let updates = updates.clone();
        (0..n, any::<prop::sample::Index>(), 1u8..=255, 1u8..3).prop_map(
            move |(i, at, xor, sub)| {
                let mut u = updates[i].clone();
                let at = at.index(u.len());
                u[at] ^= xor;
                [vec![0, sub], var_bytes(&u)].concat()
            },
        )
    };
    prop_oneof![
        (sync.clone(), bytes()).prop_map(|(sub, p)| [vec![0, sub], var_bytes(&p)].concat()),
        (sync, bytes(), 1u64..1 << 40).prop_map(|(sub, p, extra)| {
            // The length prefix claims more than follows.
            let mut out = vec![0, sub];
            write_var_uint(&mut out, p.len() as u64 + extra);
            out.extend_from_slice(&p);
            out
        }),
        truncated,
        corrupted,
        bytes().prop_map(|p| [vec![1], var_bytes(&p)].concat()),
        awareness_payload().prop_map(|p| [vec![1], var_bytes(&p)].concat()),
        Just(vec![3]),
        Just(vec![100, 0]),
        any::<u64>().prop_map(|n| {
            let mut out = vec![100, 1];
            write_var_uint(&mut out, n & ((1 << 53) - 1));
            out
        }),
        "\\PC{0,8}".prop_map(|s| [vec![2, 0], var_bytes(s.as_bytes())].concat()),
        (4u8..100, bytes()).prop_map(|(t, p)| [vec![t], p].concat()),
    ]
}

/// One to three frames of one to three messages each.
fn structured_frames() -> impl Strategy<Value = Vec<Vec<u8>>> {
    proptest::collection::vec(
        proptest::collection::vec(message(), 1..4).prop_map(|m| m.concat()),
        1..4,
    )
}

/// One to three frames of arbitrary bytes.
fn arbitrary_frames() -> impl Strategy<Value = Vec<Vec<u8>>> {
    proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..96), 1..4)
}

fn run(room: &'static str, strategy: impl Strategy<Value = Vec<Vec<u8>>>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let room = std::cell::RefCell::new(rt.block_on(Room::start(room)));
    let mut runner = runner();
    let result = runner.run(&strategy, |frames| {
        let shown = format!("{frames:02x?}");
        let mut room = room.borrow_mut();
        let outcome = rt.block_on(room.check(frames));
        if let Err(e) = &outcome {
            // Shrinking replays cases against the same room, so the first failure is the one
            // that matters.
            eprintln!("round {} failed with frames {shown}: {e}", room.round);
        }
        outcome
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn arbitrary_bytes_cannot_hurt_a_room() {
    run("arbitrary", arbitrary_frames());
}

#[test]
fn corrupted_messages_cannot_hurt_a_room() {
    run("corrupted", structured_frames());
}

/// The strategies do reach the interesting paths: some frames carry updates that decode (and
/// so may change the document), most are refused.
#[test]
fn structured_frames_include_accepted_and_refused_updates() {
    let mut runner = TestRunner::deterministic();
    let strategy = structured_frames();
    let (mut refused, mut accepted) = (0, 0);
    for _ in 0..500 {
        let frames = strategy.new_tree(&mut runner).unwrap().current();
        let mut doc = YDoc::new();
        let before = doc.encode_state().unwrap();
        simulate(&mut doc, &frames);
        if doc.encode_state().unwrap() == before {
            refused += 1;
        } else {
            accepted += 1;
        }
    }
    eprintln!("of 500 generated cases: {refused} left the document alone, {accepted} changed it");
    assert!(refused > 100, "refused {refused}");
    assert!(accepted > 0, "accepted {accepted}");
    // And a frame with a valid update really is accepted by the simulation.
    let mut doc = YDoc::new();
    let update = Message::Sync(SyncMessage::Update(&real_updates()[0])).to_frame();
    assert_eq!(simulate(&mut doc, &[update]), Verdict::Determinate);
    assert_eq!(text(doc.doc(), "t"), "EVIL TEXT");
}
