//! The behavioural test suite every [`Store`](super::Store) implementation must pass.
//!
//! Each check is an `async fn(DynStore)` that knows nothing about the backend. A backend runs the
//! whole suite with one line in its test module, given an `async fn() -> (DynStore, Guard)` that
//! makes a fresh, empty store (`Guard` keeps e.g. a temp dir alive until the test ends):
//!
//! ```ignore
//! crate::store::suite::store_suite!(my_backend_store);
//! ```
//!
//! Backends that several processes can share also run [`two_nodes_racing_lose_and_duplicate_nothing`]
//! with two stores opened on the same database.
//!
//! Compaction checks use real Yjs updates and the real [`YrsFold`]: "nothing lost" is checked by
//! decoding the stored document, not by counting bytes. Every such update comes from a client of
//! its own, so a state vector says exactly which updates a snapshot holds.
//!
//! Ordering note for SQL backends: `rooms()` must sort by bytes (`COLLATE "C"` on Postgres), the
//! order of [`RoomId`]'s `Ord`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use yrs::updates::decoder::Decode;
use yrs::{Doc, Map, StateVector, Transact, Update};

use super::{Append, Compacted, DynStore, Fold, Folded, Snapshot, StoreError, StoredRoom};
use crate::doc::{YDoc, YrsFold};
use crate::ids::RoomId;

/// Generates one `#[tokio::test]` per suite check, each on a fresh store from `$factory`.
macro_rules! store_suite {
    ($factory:path) => {
        $crate::store::suite::store_suite!(@tests $factory;
            empty_room_loads_nothing,
            appended_updates_load_in_id_order,
            ids_increase_across_rooms_and_batches,
            one_batch_spans_many_rooms,
            empty_batch_appends_nothing,
            compaction_folds_exactly_what_it_read,
            compacting_an_empty_log_changes_nothing,
            a_failing_fold_changes_nothing,
            load_after_compaction_is_the_snapshot_and_the_remaining_rows,
            compacting_a_long_log_deletes_every_folded_row,
            rooms_lists_every_room_in_name_order,
            ping_answers,
            megabyte_blobs_round_trip,
            batch_beyond_the_parameter_limit_is_stored,
            concurrent_appends_lose_and_duplicate_nothing,
            concurrent_compactions_fold_each_row_once,
            appends_racing_compactions_lose_nothing,
            loads_racing_compactions_see_each_update_once,
        );
    };
    (@tests $factory:path; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                // `_guard` (e.g. the store's temp dir) lives until the store is closed.
                let (store, _guard) = $factory().await;
                $crate::store::suite::$check(store.clone()).await;
                store.close().await;
            }
        )*
    };
}
pub(crate) use store_suite;

/// The root map every suite update writes to.
const MAP: &str = "m";

fn room(name: &str) -> RoomId {
    RoomId::new(name).expect("valid room name")
}

fn append(room_name: &str, data: impl Into<Bytes>) -> Append {
    Append {
        room: room(room_name),
        data: data.into(),
        origin: Arc::from("suite"),
    }
}

fn ids_of(loaded: &StoredRoom) -> Vec<i64> {
    loaded.updates.iter().map(|(id, _)| *id).collect()
}

fn key(client: u64) -> String {
    format!("k{client}")
}

fn value(client: u64) -> String {
    format!("v{client}")
}

/// A real Yjs update from a peer of its own: client `client` sets `key(client)` of the root map to
/// `value(client)`.
pub(crate) fn keyed_update(client: u64) -> Bytes {
    let doc = Doc::with_client_id(client);
    let map = doc.get_or_insert_map(MAP);
    let mut txn = doc.transact_mut();
    map.insert(&mut txn, key(client), value(client));
    Bytes::from(txn.encode_update_v1())
}

/// Appends for `room_name` carrying the keyed updates of `clients`.
fn keyed_appends(room_name: &str, clients: impl IntoIterator<Item = u64>) -> Vec<Append> {
    clients
        .into_iter()
        .map(|client| append(room_name, keyed_update(client)))
        .collect()
}

fn data_of(batch: &[Append]) -> Vec<Bytes> {
    batch.iter().map(|a| a.data.clone()).collect()
}

/// The clients whose updates an encoded state vector covers.
fn clients_in(state_vector: &[u8]) -> BTreeSet<u64> {
    StateVector::decode_v1(state_vector)
        .expect("state vector decodes")
        .iter()
        .map(|(client, _)| client.get())
        .collect()
}

/// Checks that `stored` holds exactly the keyed updates of `clients`, each once:
/// - merging its snapshot and log decodes to a document with exactly their keys and values;
/// - no update is both folded into the snapshot and still in the log, and none is logged twice;
/// - the log is in strictly increasing id order.
pub(crate) fn assert_holds_exactly(stored: &StoredRoom, clients: &BTreeSet<u64>) {
    let held = held_once(stored);
    assert_eq!(&held, clients, "updates held by snapshot + log");
}

/// The clients whose keyed updates `stored` holds, having checked that it holds each of them
/// once: no update both folded into the snapshot and still in the log, none logged twice, the log
/// in strictly increasing id order, and the merged document holding exactly their keys and values.
fn held_once(stored: &StoredRoom) -> BTreeSet<u64> {
    let folded = stored
        .snapshot
        .as_ref()
        .map(|s| {
            let clients = clients_in(&s.state_vector);
            let derived = yrs::encode_state_vector_from_update_v1(&s.state).expect("state decodes");
            assert_eq!(clients, clients_in(&derived), "state_vector matches state");
            clients
        })
        .unwrap_or_default();
    let mut logged = BTreeSet::new();
    for (id, data) in &stored.updates {
        let update = Update::decode_v1(data).expect("log row decodes");
        for (client, _) in update.state_vector().iter() {
            let client = client.get();
            assert!(
                !folded.contains(&client),
                "row {id} (client {client}) is also folded into the snapshot"
            );
            assert!(
                logged.insert(client),
                "client {client} is logged twice (row {id})"
            );
        }
    }
    assert!(
        stored.updates.windows(2).all(|w| w[0].0 < w[1].0),
        "log in strictly increasing id order: {:?}",
        ids_of(stored)
    );
    let held: BTreeSet<u64> = folded.union(&logged).copied().collect();

    let rows: Vec<Bytes> = stored.updates.iter().map(|(_, d)| d.clone()).collect();
    let doc = YDoc::load(stored.snapshot.as_ref().map(|s| &s.state[..]), &rows)
        .expect("the stored room decodes");
    let map = doc.doc().get_or_insert_map(MAP);
    let got: BTreeMap<String, String> = {
        let txn = doc.doc().transact();
        map.iter(&txn)
            .map(|(k, v)| (k.to_string(), v.to_string(&txn)))
            .collect()
    };
    let want: BTreeMap<String, String> = held.iter().map(|&c| (key(c), value(c))).collect();
    if got != want {
        let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
        let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
        panic!(
            "document differs from the updates held: {} keys missing {missing:?}, {} unexpected {extra:?}",
            missing.len(),
            extra.len()
        );
    }
    held
}

/// A [`YrsFold`] that records what each call was given.
#[derive(Default)]
struct RecordingFold {
    calls: Mutex<Vec<(Option<Bytes>, Vec<Bytes>)>>,
}

impl RecordingFold {
    fn calls(&self) -> Vec<(Option<Bytes>, Vec<Bytes>)> {
        self.calls.lock().expect("calls").clone()
    }
}

impl Fold for RecordingFold {
    fn fold(&self, snapshot: Option<&[u8]>, updates: &[Bytes]) -> Result<Folded, String> {
        self.calls
            .lock()
            .expect("calls")
            .push((snapshot.map(Bytes::copy_from_slice), updates.to_vec()));
        YrsFold.fold(snapshot, updates)
    }
}

/// A fold that always refuses.
struct RefusingFold;

impl Fold for RefusingFold {
    fn fold(&self, _: Option<&[u8]>, _: &[Bytes]) -> Result<Folded, String> {
        Err("refused by the test".into())
    }
}

pub(crate) async fn empty_room_loads_nothing(store: DynStore) {
    let loaded = store.load(&room("nobody-here")).await.expect("load");
    assert!(loaded.is_empty());
    assert_eq!(loaded, StoredRoom::default());
    assert_eq!(loaded.last_id(), 0);
    assert!(store.rooms().await.expect("rooms").is_empty());
}

pub(crate) async fn appended_updates_load_in_id_order(store: DynStore) {
    let batch: Vec<Append> = (0..10).map(|i| append("doc", format!("u{i}"))).collect();
    let ids = store.append(&batch).await.expect("append");
    assert_eq!(ids.len(), batch.len());
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids not increasing: {ids:?}"
    );
    assert!(ids[0] >= 1, "ids start at 1: {ids:?}");

    let loaded = store.load(&room("doc")).await.expect("load");
    assert_eq!(loaded.snapshot, None);
    let expected: Vec<(i64, Bytes)> = ids
        .iter()
        .zip(&batch)
        .map(|(id, a)| (*id, a.data.clone()))
        .collect();
    assert_eq!(loaded.updates, expected, "each id must name its own update");
    assert_eq!(loaded.last_id(), *ids.last().expect("ids"));
}

pub(crate) async fn ids_increase_across_rooms_and_batches(store: DynStore) {
    let mut all = Vec::new();
    for round in 0..5 {
        for name in ["a", "b", "c"] {
            let ids = store
                .append(&[append(name, format!("{name}{round}"))])
                .await
                .expect("append");
            all.extend(ids);
        }
    }
    assert_eq!(
        all,
        (1..=15).collect::<Vec<i64>>(),
        "one store-wide sequence from 1"
    );
}

pub(crate) async fn one_batch_spans_many_rooms(store: DynStore) {
    let batch = vec![
        append("x", "x1"),
        append("y", "y1"),
        append("x", "x2"),
        append("z", "z1"),
        append("y", "y2"),
    ];
    let ids = store.append(&batch).await.expect("append");
    assert_eq!(ids.len(), 5);

    let x = store.load(&room("x")).await.expect("load x");
    assert_eq!(
        x.updates,
        vec![(ids[0], Bytes::from("x1")), (ids[2], Bytes::from("x2"))]
    );
    let y = store.load(&room("y")).await.expect("load y");
    assert_eq!(
        y.updates,
        vec![(ids[1], Bytes::from("y1")), (ids[4], Bytes::from("y2"))]
    );
    let z = store.load(&room("z")).await.expect("load z");
    assert_eq!(z.updates, vec![(ids[3], Bytes::from("z1"))]);
}

pub(crate) async fn empty_batch_appends_nothing(store: DynStore) {
    assert!(store.append(&[]).await.expect("append").is_empty());
    assert!(store.rooms().await.expect("rooms").is_empty());
    assert_eq!(
        store.append(&[append("a", "1")]).await.expect("append"),
        vec![1]
    );
}

pub(crate) async fn compaction_folds_exactly_what_it_read(store: DynStore) {
    let first = keyed_appends("doc", 1..=5);
    let ids = store.append(&first).await.expect("append");
    let other = keyed_appends("other", [99]);
    let other_ids = store.append(&other).await.expect("append");

    let fold = RecordingFold::default();
    let compacted = store.compact(&room("doc"), &fold).await.expect("compact");
    let bytes: usize = first.iter().map(|a| a.data.len()).sum();
    assert_eq!(
        compacted,
        Compacted {
            rows: 5,
            bytes,
            upto_id: ids[4]
        }
    );
    assert_eq!(
        fold.calls(),
        vec![(None, data_of(&first))],
        "the fold got no snapshot and every row of the room, in id order"
    );
    let expected = YrsFold.fold(None, &data_of(&first)).expect("fold");
    let loaded = store.load(&room("doc")).await.expect("load");
    let snapshot = Snapshot {
        upto_id: ids[4],
        state: expected.state,
        state_vector: expected.state_vector,
    };
    assert_eq!(
        loaded.snapshot.as_ref(),
        Some(&snapshot),
        "the fold's output"
    );
    assert!(loaded.updates.is_empty(), "every folded row is deleted");
    assert_eq!(loaded.last_id(), ids[4]);
    assert_holds_exactly(&loaded, &(1..=5).collect());

    // Other rooms are neither read nor touched.
    let o = store.load(&room("other")).await.expect("load other");
    assert_eq!(o.snapshot, None);
    assert_eq!(o.updates, vec![(other_ids[0], other[0].data.clone())]);

    // The next compaction gets the stored snapshot and only the rows appended since.
    let second = keyed_appends("doc", 6..=7);
    let later = store.append(&second).await.expect("append");
    let compacted = store.compact(&room("doc"), &fold).await.expect("compact");
    assert_eq!(
        compacted,
        Compacted {
            rows: 2,
            bytes: second.iter().map(|a| a.data.len()).sum(),
            upto_id: later[1]
        }
    );
    assert_eq!(
        fold.calls()[1],
        (Some(snapshot.state.clone()), data_of(&second))
    );
    let loaded = store.load(&room("doc")).await.expect("load");
    assert_eq!(loaded.snapshot.as_ref().map(|s| s.upto_id), Some(later[1]));
    assert_holds_exactly(&loaded, &(1..=7).collect());
}

pub(crate) async fn compacting_an_empty_log_changes_nothing(store: DynStore) {
    let fold = RecordingFold::default();
    assert_eq!(
        store
            .compact(&room("nobody"), &fold)
            .await
            .expect("compact"),
        Compacted::default()
    );
    assert!(store.load(&room("nobody")).await.expect("load").is_empty());
    assert!(store.rooms().await.expect("rooms").is_empty());

    let ids = store
        .append(&keyed_appends("doc", 1..=2))
        .await
        .expect("append");
    assert_eq!(
        store
            .compact(&room("doc"), &fold)
            .await
            .expect("compact")
            .rows,
        2
    );
    let before = store.load(&room("doc")).await.expect("load");
    assert_eq!(
        store.compact(&room("doc"), &fold).await.expect("compact"),
        Compacted {
            rows: 0,
            bytes: 0,
            upto_id: ids[1]
        }
    );
    assert_eq!(store.load(&room("doc")).await.expect("load"), before);
    assert_eq!(fold.calls().len(), 1, "with nothing to fold, no fold runs");
}

pub(crate) async fn a_failing_fold_changes_nothing(store: DynStore) {
    store
        .append(&keyed_appends("doc", 1..=3))
        .await
        .expect("append");
    store
        .compact(&room("doc"), &YrsFold)
        .await
        .expect("compact");
    store
        .append(&keyed_appends("doc", 4..=5))
        .await
        .expect("append");
    let before = store.load(&room("doc")).await.expect("load");

    let err = store
        .compact(&room("doc"), &RefusingFold)
        .await
        .expect_err("the fold refused");
    assert!(
        matches!(&err, StoreError::Fold(why) if why.contains("refused by the test")),
        "{err:?}"
    );
    assert_eq!(store.load(&room("doc")).await.expect("load"), before);

    // A row the engine cannot decode makes the real fold refuse, and nothing changes either.
    store
        .append(&[append("doc", Bytes::from_static(&[0xff, 0xff, 0xff]))])
        .await
        .expect("append");
    let before = store.load(&room("doc")).await.expect("load");
    let err = store
        .compact(&room("doc"), &YrsFold)
        .await
        .expect_err("garbage does not fold");
    assert!(matches!(err, StoreError::Fold(_)), "{err:?}");
    assert_eq!(store.load(&room("doc")).await.expect("load"), before);
}

pub(crate) async fn load_after_compaction_is_the_snapshot_and_the_remaining_rows(store: DynStore) {
    let first = store
        .append(&keyed_appends("doc", 1..=4))
        .await
        .expect("append");
    store
        .compact(&room("doc"), &YrsFold)
        .await
        .expect("compact");
    let tail = keyed_appends("doc", 5..=6);
    let later = store.append(&tail).await.expect("append");
    assert!(later[0] > first[3], "ids keep growing after compaction");

    let loaded = store.load(&room("doc")).await.expect("load");
    assert_eq!(loaded.snapshot.as_ref().map(|s| s.upto_id), Some(first[3]));
    assert_eq!(
        loaded.updates,
        vec![
            (later[0], tail[0].data.clone()),
            (later[1], tail[1].data.clone())
        ]
    );
    assert_eq!(loaded.last_id(), later[1]);
    assert_holds_exactly(&loaded, &(1..=6).collect());
}

pub(crate) async fn compacting_a_long_log_deletes_every_folded_row(store: DynStore) {
    // More rows than any one statement of a backend is likely to bind.
    const ROWS: u64 = 2_500;
    let batch = keyed_appends("long", 1..=ROWS);
    store.append(&batch).await.expect("append");
    let compacted = store
        .compact(&room("long"), &YrsFold)
        .await
        .expect("compact");
    assert_eq!(compacted.rows, ROWS as usize);
    let loaded = store.load(&room("long")).await.expect("load");
    assert!(loaded.updates.is_empty());
    assert_holds_exactly(&loaded, &(1..=ROWS).collect());
}

pub(crate) async fn rooms_lists_every_room_in_name_order(store: DynStore) {
    // Byte order: upper case before lower case, '/' (0x2f) before digits, multi-byte UTF-8 last.
    let names = [
        "team/b",
        "Zeta",
        "team/a",
        "alpha",
        "team/a/notes",
        "été",
        "42",
    ];
    for name in names {
        store.append(&[append(name, "x")]).await.expect("append");
    }
    // A room that was compacted down to its snapshot is still a stored room.
    store
        .append(&keyed_appends("folded", [1]))
        .await
        .expect("append");
    store
        .compact(&room("folded"), &YrsFold)
        .await
        .expect("compact");
    assert!(store
        .load(&room("folded"))
        .await
        .expect("load")
        .updates
        .is_empty());
    // Appending to a room again does not list it twice.
    store.append(&[append("alpha", "y")]).await.expect("append");

    let mut expected: Vec<RoomId> = names.iter().map(|n| room(n)).collect();
    expected.push(room("folded"));
    expected.sort();
    assert_eq!(store.rooms().await.expect("rooms"), expected);
    assert_eq!(
        expected.iter().map(RoomId::as_str).collect::<Vec<_>>(),
        [
            "42",
            "Zeta",
            "alpha",
            "folded",
            "team/a",
            "team/a/notes",
            "team/b",
            "été"
        ]
    );
}

pub(crate) async fn ping_answers(store: DynStore) {
    store.ping().await.expect("ping");
}

pub(crate) async fn megabyte_blobs_round_trip(store: DynStore) {
    let blob: Bytes = (0..1024 * 1024).map(|i| (i * 31 % 251) as u8).collect();
    let ids = store
        .append(&[append("big", blob.clone()), append("big", blob.slice(1..))])
        .await
        .expect("append");
    let loaded = store.load(&room("big")).await.expect("load");
    assert_eq!(
        loaded.updates,
        vec![(ids[0], blob.clone()), (ids[1], blob.slice(1..))]
    );

    // A megabyte document folds into a megabyte snapshot and loads back whole.
    let text: String = (0..1024 * 1024)
        .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
        .collect();
    let update = {
        let doc = Doc::with_client_id(1);
        let map = doc.get_or_insert_map(MAP);
        let mut txn = doc.transact_mut();
        map.insert(&mut txn, "text", text.clone());
        Bytes::from(txn.encode_update_v1())
    };
    store
        .append(&[append("big-doc", update)])
        .await
        .expect("append");
    store
        .compact(&room("big-doc"), &YrsFold)
        .await
        .expect("compact");
    let loaded = store.load(&room("big-doc")).await.expect("load");
    let snapshot = loaded.snapshot.expect("snapshot");
    assert!(snapshot.state.len() > 1024 * 1024);
    let doc = YDoc::load(Some(&snapshot.state), &[]).expect("decode");
    let map = doc.doc().get_or_insert_map(MAP);
    let txn = doc.doc().transact();
    assert_eq!(map.get(&txn, "text").map(|v| v.to_string(&txn)), Some(text));
}

pub(crate) async fn batch_beyond_the_parameter_limit_is_stored(store: DynStore) {
    // 35,000 rows (3 values each) in 35,000 distinct rooms: more bound values in each of the
    // statements a naive one-INSERT implementation would send than SQLite's 32,766 limit.
    const ROWS: usize = 35_000;
    let batch: Vec<Append> = (0..ROWS)
        .map(|i| append(&format!("r{i:05}"), format!("{i}")))
        .collect();
    let ids = store.append(&batch).await.expect("append");
    assert_eq!(ids.len(), ROWS);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids in batch order");
    assert_eq!(store.rooms().await.expect("rooms").len(), ROWS);
    // Samples, including around the chunk sizes a backend is likely to use.
    for i in [
        0,
        1,
        299,
        300,
        301,
        499,
        500,
        899,
        900,
        999,
        1000,
        17_000,
        ROWS - 1,
    ] {
        let loaded = store.load(&room(&format!("r{i:05}"))).await.expect("load");
        assert_eq!(loaded.updates, vec![(ids[i], Bytes::from(format!("{i}")))]);
    }

    // And a single room with that many updates loads whole and in order.
    let batch: Vec<Append> = (0..ROWS).map(|i| append("one", format!("{i}"))).collect();
    let ids = store.append(&batch).await.expect("append");
    let loaded = store.load(&room("one")).await.expect("load");
    assert_eq!(ids_of(&loaded), ids);
    assert!(loaded
        .updates
        .iter()
        .enumerate()
        .all(|(i, (_, data))| *data == format!("{i}").as_bytes()));
}

pub(crate) async fn concurrent_appends_lose_and_duplicate_nothing(store: DynStore) {
    const TASKS: usize = 8;
    const APPENDS: usize = 40;
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut written = Vec::new();
            for n in 0..APPENDS {
                // Batches of 1-3 updates spread over 3 shared rooms.
                let batch: Vec<Append> = (0..=n % 3)
                    .map(|k| {
                        append(
                            &format!("room{}", (task + n + k) % 3),
                            format!("t{task}-n{n}-k{k}"),
                        )
                    })
                    .collect();
                let ids = store.append(&batch).await.expect("append");
                written.extend(ids.into_iter().zip(batch));
            }
            written
        }));
    }
    let mut expected: BTreeMap<RoomId, Vec<(i64, Bytes)>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for task in tasks {
        for (id, a) in task.await.expect("task") {
            assert!(seen.insert(id), "id {id} handed out twice");
            expected.entry(a.room).or_default().push((id, a.data));
        }
    }
    let submitted: usize = (0..APPENDS).map(|n| n % 3 + 1).sum::<usize>() * TASKS;
    assert_eq!(seen.len(), submitted);
    for (room, mut updates) in expected {
        updates.sort_by_key(|(id, _)| *id);
        let loaded = store.load(&room).await.expect("load");
        assert_eq!(loaded.updates, updates, "room {room}");
    }
}

pub(crate) async fn concurrent_compactions_fold_each_row_once(store: DynStore) {
    const ROWS: u64 = 200;
    const COMPACTORS: usize = 8;
    store
        .append(&keyed_appends("doc", 1..=ROWS))
        .await
        .expect("append");
    // Eight compactors (think: eight nodes) race to fold the same log.
    let start = Arc::new(tokio::sync::Barrier::new(COMPACTORS));
    let mut tasks = Vec::new();
    for _ in 0..COMPACTORS {
        let store = store.clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            store.compact(&room("doc"), &YrsFold).await
        }));
    }
    let mut folded = 0;
    for task in tasks {
        folded += task.await.expect("task").expect("compact").rows;
    }
    assert_eq!(
        folded, ROWS as usize,
        "every row folded by exactly one compaction"
    );
    let loaded = store.load(&room("doc")).await.expect("load");
    assert!(loaded.updates.is_empty());
    assert_holds_exactly(&loaded, &(1..=ROWS).collect());
}

pub(crate) async fn appends_racing_compactions_lose_nothing(store: DynStore) {
    race_appends_and_compactions(&[store]).await;
}

/// Loads while a writer appends one update at a time and compactors fold the log in a loop: every
/// load sees one point in time, so each update is in the snapshot or in the log, never both and
/// never neither; it holds every update acknowledged before the load began, and none that was not
/// yet submitted when it ended.
pub(crate) async fn loads_racing_compactions_see_each_update_once(store: DynStore) {
    const UPDATES: u64 = 150;
    /// The writer waits for a compaction to fold something after each this many appends, so the
    /// loads race compactions on every backend, however fast its appends.
    const FOLD_EVERY: u64 = 25;
    const COMPACTORS: usize = 2;
    // How many updates are acknowledged, and how many were submitted: client `n` is the n-th.
    let acked = Arc::new(AtomicU64::new(0));
    let submitted = Arc::new(AtomicU64::new(0));
    let folded = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut compactors = Vec::new();
    for _ in 0..COMPACTORS {
        let (store, folded, done) = (store.clone(), folded.clone(), done.clone());
        compactors.push(tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                let rows = store
                    .compact(&room("race"), &YrsFold)
                    .await
                    .expect("compact")
                    .rows;
                folded.fetch_add(rows as u64, Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
        }));
    }
    let writer = {
        let (store, acked, submitted, folded) = (
            store.clone(),
            acked.clone(),
            submitted.clone(),
            folded.clone(),
        );
        tokio::spawn(async move {
            for client in 1..=UPDATES {
                submitted.store(client, Ordering::SeqCst);
                store
                    .append(&keyed_appends("race", [client]))
                    .await
                    .expect("append");
                acked.store(client, Ordering::SeqCst);
                if client % FOLD_EVERY == 0 {
                    let before = folded.load(Ordering::SeqCst);
                    while folded.load(Ordering::SeqCst) == before {
                        tokio::task::yield_now().await;
                    }
                }
            }
        })
    };
    let mut loads = 0;
    while !writer.is_finished() {
        let before = acked.load(Ordering::SeqCst);
        let loaded = store.load(&room("race")).await.expect("load");
        let after = submitted.load(Ordering::SeqCst);
        let held = held_once(&loaded);
        assert!(
            (1..=before).all(|c| held.contains(&c)),
            "load {loads} lost an update acknowledged before it began ({before}): {held:?}"
        );
        assert!(
            held.iter().all(|&c| c <= after),
            "load {loads} holds an update submitted after it ended ({after}): {held:?}"
        );
        loads += 1;
        tokio::task::yield_now().await;
    }
    writer.await.expect("writer");
    done.store(true, Ordering::SeqCst);
    for compactor in compactors {
        compactor.await.expect("compactor");
    }
    assert!(loads > 1, "the loads raced the writer ({loads} loads)");
    assert_holds_exactly(
        &store.load(&room("race")).await.expect("load"),
        &(1..=UPDATES).collect(),
    );
}

/// Two nodes (two stores on one database) append to and compact one room at the same time:
/// every update ends up exactly once in the snapshot or the log.
pub(crate) async fn two_nodes_racing_lose_and_duplicate_nothing(first: DynStore, second: DynStore) {
    race_appends_and_compactions(&[first, second]).await;
}

/// Writers append keyed updates to one room (batches of 1-3) while compactors fold it in a loop,
/// spread over `nodes`; then checks that the room holds every update exactly once, and that the
/// compactions together folded each row at most once.
async fn race_appends_and_compactions(nodes: &[DynStore]) {
    const WRITERS: u64 = 4;
    const PER_WRITER: u64 = 60;
    const COMPACTORS: usize = 3;
    let done = Arc::new(AtomicBool::new(false));

    let mut compactors = Vec::new();
    for c in 0..COMPACTORS {
        let store = nodes[c % nodes.len()].clone();
        let done = done.clone();
        compactors.push(tokio::spawn(async move {
            let (mut runs, mut folded) = (0usize, 0usize);
            loop {
                let finished = done.load(Ordering::SeqCst);
                folded += store
                    .compact(&room("race"), &YrsFold)
                    .await
                    .expect("compact")
                    .rows;
                runs += 1;
                if finished {
                    return (runs, folded);
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = nodes[w as usize % nodes.len()].clone();
        writers.push(tokio::spawn(async move {
            let clients: Vec<u64> = (1..=PER_WRITER).map(|i| w * 1_000 + i).collect();
            let mut rows = 0;
            for batch in clients.chunks(1 + w as usize % 3) {
                rows += store
                    .append(&keyed_appends("race", batch.iter().copied()))
                    .await
                    .expect("append")
                    .len();
            }
            rows
        }));
    }
    let mut appended = 0;
    for writer in writers {
        appended += writer.await.expect("writer");
    }
    done.store(true, Ordering::SeqCst);
    let (mut runs, mut folded) = (0, 0);
    for compactor in compactors {
        let (r, f) = compactor.await.expect("compactor");
        runs += r;
        folded += f;
    }

    let loaded = nodes[0].load(&room("race")).await.expect("load");
    let all: BTreeSet<u64> = (0..WRITERS)
        .flat_map(|w| (1..=PER_WRITER).map(move |i| w * 1_000 + i))
        .collect();
    assert_eq!(appended, all.len());
    assert_holds_exactly(&loaded, &all);
    assert_eq!(
        folded + loaded.updates.len(),
        appended,
        "each row folded at most once or still logged ({runs} compactions)"
    );
    assert!(folded > 0, "the compactions did fold something");
    // Every node sees the same room.
    for node in &nodes[1..] {
        assert_eq!(node.load(&room("race")).await.expect("load"), loaded);
    }
}
