//! Regression tests for what the fuzz targets (`fuzz/`, docs/fuzzing.md) found in the server's
//! document engine. Each input is the minimised one the fuzzer reported.
//!
//! Findings that are still open are `#[ignore]`d with the finding's number: they state what the
//! server must guarantee and fail until it does (`cargo nextest run --test fuzz_regressions
//! --run-ignored all`). Un-ignore each with its fix.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use common::{append_text, expect_close, raw, send_binary, text, TestServer, WAIT};
use tandem::doc::{
    check_state_vector, Applied, Comparison, DecodedUpdate, DocError, Misplaced, YDoc,
};
use tandem_client::{Client, ClientOptions};
use tandem_protocol::{CloseCode, Message, SyncMessage};

/// Records the largest allocation requested on a measuring thread, and refuses (returns null
/// for) requests above [`REFUSE_ABOVE`] there, as a kernel without overcommit would: fallible
/// reservations then fail at once instead of touching gigabytes.
struct MaxRequest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);
const REFUSE_ABOVE: usize = 256 << 20;

thread_local! {
    static MEASURING: Cell<bool> = const { Cell::new(false) };
}

/// Whether a request of `size` bytes goes to the system allocator.
fn admit(size: usize) -> bool {
    if !MEASURING.with(Cell::get) {
        return true;
    }
    LARGEST.fetch_max(size, Ordering::Relaxed);
    size <= REFUSE_ABOVE
}

unsafe impl GlobalAlloc for MaxRequest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !admit(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` or `System.realloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !admit(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: MaxRequest = MaxRequest;

/// The largest allocation `f` requests on this thread.
fn largest_request<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.store(0, Ordering::Relaxed);
    MEASURING.with(|m| m.set(true));
    let out = f();
    MEASURING.with(|m| m.set(false));
    (out, LARGEST.load(Ordering::Relaxed))
}

const SAME: Comparison = Comparison {
    we_have_more: false,
    they_have_more: false,
};

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Finding 1 (fixed: `plausible_count` in src/doc/ydoc.rs): a state vector or update whose
/// leading count claims hundreds of millions of entries made yrs reserve a hash map for them
/// before reading any: 17 GB requested, 1 GB of it written, 0.7 s of CPU, for the 8-byte frame
/// `00 00 05 9e 9e 9e 9e 02`.
#[test]
fn huge_claimed_counts_are_refused_without_allocating_for_them() {
    // Sync step 1 payload: a state vector claiming 600 280 862 entries.
    let (sv, largest) = largest_request(|| check_state_vector(&[0x9e, 0x9e, 0x9e, 0x9e, 0x02]));
    assert!(sv.is_err());
    assert!(
        largest <= 1 << 20,
        "check_state_vector of 5 bytes asked for {largest} bytes"
    );
    // Update payload: 2^27 clients claimed.
    let (update, largest) =
        largest_request(|| DecodedUpdate::decode(Bytes::from_static(&[0x80, 0x80, 0x80, 0x40])));
    assert!(update.is_err());
    assert!(
        largest <= 1 << 20,
        "DecodedUpdate::decode of 4 bytes asked for {largest} bytes"
    );
}

/// A room document holding "hello" from client 1.
fn hello_room() -> YDoc {
    let client = yrs::Doc::with_client_id(1);
    append_text(&client, "t", "hello");
    YDoc::load(Some(&common::full_state(&client)), &[]).unwrap()
}

/// Finding 2 (fixed): yrs integrates the first block of this update (client 36, a new root), then
/// refuses the second (its parent, 1#2, is a character of "hello", not a type) with
/// `InvalidParent`. tandem closed the sender with 1007 as if nothing had been applied, but the
/// first block stayed in the room: never relayed, never logged, yet sent to every newcomer. Now
/// the engine reports what the transaction integrated (`DocError::PartlyApplied`), and the room
/// relays and stores that part like any change while it still refuses the sender.
const PARTIAL_UPDATE: &str = "020100310300010201020124000301000302000100";

#[test]
fn an_update_refused_after_partial_integration_reports_the_part() {
    let mut room = hello_room();
    let update = DecodedUpdate::decode(Bytes::from(hex(PARTIAL_UPDATE))).unwrap();
    let Err(DocError::PartlyApplied { effective, .. }) = room.apply(update) else {
        panic!("the partly applied update was not reported as such");
    };
    // A peer with the room's former state plus the reported part equals the room.
    let mut peer = hello_room();
    peer.apply(DecodedUpdate::decode(effective).unwrap())
        .unwrap();
    let (sv, digest) = room.sync_summary();
    assert_eq!(peer.compare(&sv, &digest).unwrap(), SAME);
}

#[tokio::test]
async fn what_a_refused_update_left_in_the_room_reaches_everybody() {
    let server = TestServer::start().await;
    let url = server.url("partial");
    let a = Client::connect_with(
        &url,
        ClientOptions {
            client_id: Some(1),
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    a.wait_synced(WAIT).await.unwrap();
    append_text(a.doc(), "t", "hello");
    let b = Client::connect(&url).await.unwrap();
    b.wait_until(WAIT, |d| text(d, "t") == "hello")
        .await
        .unwrap();

    let mut bad = raw(&url).await;
    let frame = Message::Sync(SyncMessage::Update(&hex(PARTIAL_UPDATE))).to_frame();
    send_binary(&mut bad, frame).await;
    let (code, _) = expect_close(&mut bad).await;
    assert_eq!(code, CloseCode::InvalidData.code());

    // Marker round trip: the room has handled the refused update.
    append_text(a.doc(), "t", "!");
    b.wait_until(WAIT, |d| text(d, "t") == "hello!")
        .await
        .unwrap();
    let sv = |c: &Client| {
        use yrs::{ReadTxn, Transact};
        c.doc().transact().state_vector()
    };
    let newcomer = Client::connect(&url).await.unwrap();
    newcomer.wait_synced(WAIT).await.unwrap();
    b.wait_until(WAIT, |d| {
        use yrs::{ReadTxn, Transact};
        d.transact().state_vector() == sv(&newcomer)
    })
    .await
    .expect("a connected client and a newcomer hold the same state");
    // And it was stored: after a restart a newcomer gets the same.
    let mut server = server;
    server.restart().await;
    let later = Client::connect(&server.url("partial")).await.unwrap();
    later.wait_synced(WAIT).await.unwrap();
    assert_eq!(
        sv(&later),
        sv(&newcomer),
        "what the room relayed was not stored"
    );
}

/// Finding 3 (fixed): this 10-byte update (client 0, clock 117: its predecessors are missing) is
/// accepted as pending. yrs then panicked in `merge_pending_v1` whenever the room encoded its
/// state: the next sync step 1, from anyone, poisoned the room, which closed every connection
/// ("room restarting"). The room's step 2 now leaves pending data out (`YDoc::diff` uses
/// `encode_diff`): it is not part of the document until it integrates.
const POISONING_UPDATE: &str = "01010075620000000000";

/// The update relied on yrs reading legacy JSON content differently from Yjs (one string more
/// than the count says): tandem now refuses that content kind while decoding.
#[test]
fn the_poisoning_update_is_refused_while_decoding() {
    let refused = DecodedUpdate::decode(Bytes::from(hex(POISONING_UPDATE)));
    assert!(
        matches!(&refused, Err(DocError::InvalidUpdate(r)) if r.contains("unsupported block kind")),
        "{refused:?}"
    );
}

/// Waiting data (here: an edit whose predecessor never came, applied without the dependency
/// check) is left out of what the room encodes.
#[test]
fn pending_data_does_not_break_the_rooms_encoding() {
    let source = yrs::Doc::with_client_id(5);
    append_text(&source, "t", "a");
    let before = {
        use yrs::{ReadTxn, Transact};
        source.transact().state_vector()
    };
    append_text(&source, "t", "b");
    let only_b = {
        use yrs::{ReadTxn, Transact};
        source.transact().encode_diff_v1(&before)
    };
    let mut room = YDoc::new();
    let update = DecodedUpdate::decode(Bytes::from(only_b)).unwrap();
    assert!(matches!(room.apply(update), Ok(Applied::Pending)));
    let step2 = room.diff(&[0]);
    assert!(
        !matches!(step2, Err(DocError::Panicked)),
        "answering a step 1 panicked inside yrs"
    );
    DecodedUpdate::decode(Bytes::from(step2.unwrap())).expect("the step 2 decodes");
    room.encode_state().expect("the state encodes");
}

#[tokio::test]
async fn a_pending_update_does_not_restart_the_room() {
    let server = TestServer::start().await;
    let url = server.url("poison");
    let a = Client::connect(&url).await.unwrap();
    a.wait_synced(WAIT).await.unwrap();
    append_text(a.doc(), "t", "kept");

    let mut bad = raw(&url).await;
    let frame = Message::Sync(SyncMessage::Update(&hex(POISONING_UPDATE))).to_frame();
    send_binary(&mut bad, frame).await;
    // Anyone's step 1 now makes the room encode its state.
    let newcomer = Client::connect(&url).await.unwrap();
    newcomer
        .wait_until(WAIT, |d| text(d, "t") == "kept")
        .await
        .expect("the newcomer syncs");
    assert!(
        a.close_info().is_none(),
        "the healthy client was disconnected: {:?}",
        a.close_info()
    );
}

/// yrs adds a delete range's clock and length in u32 without a check: with overflow checks (debug
/// builds) that panics while decoding, in release it wraps. Either way the input is only ever
/// refused or harmless: the panic must stay contained in `DecodedUpdate::decode`, and what
/// decodes must apply without a panic.
#[test]
fn a_delete_range_overflowing_u32_is_contained() {
    // No blocks; delete set: client 5, one range at clock 2^32 - 1 of length 1.
    let update = hex("00010501ffffffff0f01");
    match DecodedUpdate::decode(Bytes::from(update)) {
        Err(_) => {}
        Ok(update) => {
            let mut room = hello_room();
            assert!(!matches!(room.apply(update), Err(DocError::Panicked)));
        }
    }
}

/// Finding 4 (fixed): on an empty room, this update (a GC range for client 0 at clocks 3..120,
/// whose predecessors are missing, and a deletion for client 2, unknown) made yrs put the range
/// into its block store past the clocks it holds, a hole: the room's delete set then named clocks
/// its state vector did not, and what it relayed (`00 01 00 01 03 75`) left peers different.
/// (The fuzzers' input also had an empty second run for client 0; that alone is now refused
/// while decoding.) The room now applies only updates that it can integrate at once, from
/// clients and from other nodes alike (`YDoc::apply_checked`): this one is refused and leaves
/// the room as it was.
#[test]
fn an_update_past_the_rooms_clocks_is_refused_and_changes_nothing() {
    let mut room = YDoc::new();
    let before = room.sync_summary();
    let update = DecodedUpdate::decode(Bytes::from(hex("0101000300750102010003"))).unwrap();
    let refused = room.apply_checked(update);
    assert!(
        matches!(refused, Err(DocError::Dependencies(_))),
        "{refused:?}"
    );
    assert_eq!(room.compare(&before.0, &before.1).unwrap(), SAME);
    assert!(DecodedUpdate::decode(Bytes::from(hex("0201000300750000000102010003"))).is_err());
}

/// Finding 5 (fixed): in release builds, where yrs' arithmetic wrapped, the room accepted this
/// update, and from then on the step 2 it sent for an empty state vector (its whole state) made
/// yrs panic when a newcomer applied it (`block_store.rs:317`, an `unwrap` in
/// `BlockStore::push`). yrs is now built with overflow checks in every profile (Cargo.toml), as
/// in debug builds: it panics while decoding the update and tandem refuses it. Run with
/// `--release` to check the release profile.
const STEP2_CRASHING_UPDATE: &str =
    "0104f78632d1ffffffffffffff2d000500010300c40f010300c40f0101009d000000000000";

#[test]
fn the_rooms_step2_applies_at_a_newcomer() {
    let Ok(update) = DecodedUpdate::decode(Bytes::from(hex(STEP2_CRASHING_UPDATE))) else {
        return; // refused while decoding: yrs' clock arithmetic is checked
    };
    let mut room = YDoc::new();
    if room.apply(update).is_err() {
        return;
    }
    let step2 = room.diff(&[0]).unwrap();
    let mut newcomer = YDoc::new();
    let applied = newcomer.apply(DecodedUpdate::decode(Bytes::from(step2)).unwrap());
    assert!(
        !matches!(applied, Err(DocError::Panicked)),
        "the room's step 2 panicked yrs at a newcomer"
    );
}

/// The `update` and `connection` fuzz targets' starting document: text, a map and an array from
/// client 1 (with a deletion), then text from client 2 on top of it.
fn fuzz_base() -> YDoc {
    use yrs::{Array, Map, Text, Transact, WriteTxn};
    let one = yrs::Doc::with_client_id(1);
    {
        let mut txn = one.transact_mut();
        let t = txn.get_or_insert_text("t");
        t.insert(&mut txn, 0, "hello world");
        let m = txn.get_or_insert_map("m");
        m.insert(&mut txn, "k", "v");
        let a = txn.get_or_insert_array("a");
        a.insert_range(&mut txn, 0, [1, 2, 3]);
    }
    {
        let mut txn = one.transact_mut();
        let t = txn.get_or_insert_text("t");
        t.remove_range(&mut txn, 5, 1);
    }
    let two = yrs::Doc::with_client_id(2);
    {
        use yrs::updates::decoder::Decode;
        let mut txn = two.transact_mut();
        let state = yrs::Update::decode_v1(&common::full_state(&one)).unwrap();
        txn.apply_update(state).unwrap();
        let t = txn.get_or_insert_text("t");
        t.insert(&mut txn, 0, ">> ");
    }
    YDoc::load(Some(&common::full_state(&two)), &[]).unwrap()
}

/// Finding 7: applying this 16-byte update (client 1, at a clock far past its last block) to the
/// fuzz targets' starting document (content from clients 1 and 2) panics inside yrs
/// (`block_store.rs:317`, an `unwrap` in `BlockStore::push`). Before the fix, `contain` caught the
/// panic, but the unwinding dropped yrs' `TransactionMut`, whose `Drop` commits the
/// half-integrated transaction: AddressSanitizer reported a heap use-after-free in
/// `Block::try_squash`. Now the transaction is never committed by unwinding and the broken
/// document is set aside (leaked) instead of freed; the panic itself is yrs' (open upstream).
const USE_AFTER_FREE_UPDATE: &str = "010101c4fff7ffff01e1010201077f00";

/// Its first clock (client 1, about 2^35) does not fit in yrs' 32-bit clocks: now refused while
/// decoding, before yrs sees it. The containment that stays in place for any other
/// panic inside yrs is tested in `src/doc/ydoc.rs` (`a_panic_inside_a_write_sets_the_document_aside`).
#[test]
fn the_update_that_panicked_yrs_is_refused_while_decoding() {
    let refused = DecodedUpdate::decode(Bytes::from(hex(USE_AFTER_FREE_UPDATE)));
    assert!(
        matches!(&refused, Err(DocError::InvalidUpdate(r)) if r.contains("overflow")),
        "{refused:?}"
    );
}

/// Finding 7 end to end: the update that panics yrs skips clocks (client 1, far past its last
/// block), so the room now refuses it before yrs sees it: its sender is closed with 1007, the room
/// does not restart (nobody else is disconnected), nothing panics, and newcomers get the document.
/// (If such an update reached yrs, the panic would be contained: see
/// `a_panic_inside_a_write_sets_the_document_aside` in src/doc/ydoc.rs.)
#[tokio::test]
async fn an_update_that_would_panic_yrs_costs_only_its_sender_the_connection() {
    let server = TestServer::start().await;
    let url = server.url("panics");
    let mut seed = raw(&url).await;
    let state = common::full_state(fuzz_base().doc());
    send_binary(
        &mut seed,
        Message::Sync(SyncMessage::Update(&state)).to_frame(),
    )
    .await;
    let a = Client::connect(&url).await.unwrap();
    a.wait_until(WAIT, |d| text(d, "t") == ">> helloworld")
        .await
        .unwrap();

    let mut bad = raw(&url).await;
    let frame = Message::Sync(SyncMessage::Update(&hex(USE_AFTER_FREE_UPDATE))).to_frame();
    send_binary(&mut bad, frame).await;
    let (code, reason) = expect_close(&mut bad).await;
    assert_eq!(code, CloseCode::InvalidData.code(), "{reason}");

    // The room did not restart: the healthy client is still connected and still served.
    append_text(a.doc(), "t", "!");
    let newcomer = Client::connect(&url).await.unwrap();
    newcomer
        .wait_until(WAIT, |d| text(d, "t") == ">> helloworld!")
        .await
        .expect("the newcomer gets the document");
    assert!(a.close_info().is_none(), "{:?}", a.close_info());
    let (status, metrics) = common::http_get(server.running().local_addr(), "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("tandem_engine_panics_total 0"),
        "the engine panicked"
    );
}

/// Finding 8 (release builds only): on the fuzz targets' starting document this update's huge
/// clocks wrapped in u32 and it panicked inside yrs (`store.rs:234`); the unwinding committed the
/// broken transaction, which panicked again (`block_store.rs:62`): "panic in a destructor during
/// cleanup" aborted the process. Fixed twice over: yrs is built with overflow checks in every
/// profile (Cargo.toml), so the update is refused while decoding, and a panic inside a
/// transaction no longer runs its commit.
const ABORTING_UPDATE: &str =
    "010403ffffffffffffffffffff46270103780000000000ffbf0000077720ffff0200000000";

#[test]
fn applying_an_update_does_not_abort_the_process() {
    let Ok(update) = DecodedUpdate::decode(Bytes::from(hex(ABORTING_UPDATE))) else {
        return; // refused while decoding: yrs' clock arithmetic is checked
    };
    let mut room = fuzz_base();
    if matches!(room.apply(update), Err(DocError::Panicked)) {
        assert!(room.is_poisoned());
    }
}

/// Findings 9 and 10 (use-after-free inside yrs' `apply_update`, found under AddressSanitizer):
/// the hostile updates skip clocks (they start past what the room holds of a client, or leave
/// gaps that yrs fills with "skips"). Updates from clients that do that are now refused before yrs
/// sees them (`YDoc::apply_checked`); only AddressSanitizer could show the memory error
/// itself (`cargo fuzz run -O connection|update <file>`, docs/fuzzing.md).
#[test]
fn client_updates_that_skip_clocks_are_refused_before_yrs_integrates_them() {
    // Finding 9: two updates, from two connections, on the fuzz targets' starting document.
    let first = "0104030627010 16d037375620127000306046465657002040003070178010307017801700 0";
    let second = "0101030504010174026869 00";
    // Finding 10: one update.
    let third = "0201014100fd0101010201010101010588010101019aff290101010101010120010103020101ffffff0141010300010201212301000001000304a8e60000010102010700f7012300";
    let clean = |s: &str| s.replace(' ', "");
    let mut room = fuzz_base();
    for (name, raw) in [("9, first", first), ("9, second", second), ("10", third)] {
        let Ok(update) = DecodedUpdate::decode(Bytes::from(hex(&clean(raw)))) else {
            continue; // refused while decoding: never reaches yrs' integration either
        };
        let before = room.sync_summary();
        match room.apply_checked(update) {
            Err(DocError::Dependencies(_)) => {}
            other => panic!("finding {name}: the update reached yrs: {other:?}"),
        }
        assert_eq!(room.compare(&before.0, &before.1).unwrap(), SAME);
    }
}

/// What well-behaved clients send is not refused by the clock check: edits in order, a
/// newcomer's own edits, and a sync step 2 that overlaps what the room holds.
#[test]
fn in_order_client_updates_pass_the_clock_check() {
    use yrs::{ReadTxn, Transact};
    let mut room = hello_room();
    let client = yrs::Doc::with_client_id(1);
    {
        use yrs::updates::decoder::Decode;
        let state = room.encode_state().unwrap().0;
        client
            .transact_mut()
            .apply_update(yrs::Update::decode_v1(&state).unwrap())
            .unwrap();
    }
    // The next edit of client 1, then a step 2 from an older state vector (overlapping).
    let before = client.transact().state_vector();
    append_text(&client, "t", " world");
    let edit = client.transact().encode_diff_v1(&before);
    let applied = room.apply_checked(DecodedUpdate::decode(Bytes::from(edit)).unwrap());
    assert!(
        matches!(applied, Ok(Applied::Changed { .. })),
        "{applied:?}"
    );
    let step2 = client
        .transact()
        .encode_diff_v1(&yrs::StateVector::default());
    let applied = room.apply_checked(DecodedUpdate::decode(Bytes::from(step2)).unwrap());
    assert!(matches!(applied, Ok(Applied::Unchanged)), "{applied:?}");
    // A new client's first edit.
    let newcomer = yrs::Doc::with_client_id(9);
    {
        use yrs::updates::decoder::Decode;
        let state = room.encode_state().unwrap().0;
        newcomer
            .transact_mut()
            .apply_update(yrs::Update::decode_v1(&state).unwrap())
            .unwrap();
    }
    let sv = newcomer.transact().state_vector();
    append_text(&newcomer, "t", "!");
    let edit = newcomer.transact().encode_diff_v1(&sv);
    let applied = room.apply_checked(DecodedUpdate::decode(Bytes::from(edit)).unwrap());
    assert!(
        matches!(applied, Ok(Applied::Changed { .. })),
        "{applied:?}"
    );
}

/// Finding 11 (fixed): a 270-byte update that passed the clock check made yrs use freed memory
/// in `resolve_conflict` (AddressSanitizer; `cargo fuzz run -O update <file>`). It lists client
/// 1's blocks in two runs, the second going back to clock 0, so yrs held blocks with overlapping
/// clocks. Encoders write each client once, and never write overlong varints (this input has
/// some): tandem refuses either while decoding, before yrs sees the bytes (the unit tests of
/// `tandem_protocol::update` check the second run alone).
const FINDING_11: &str = "AgcBAAEBAQABIQEBAQEAASEBAQEBAQEBAQEB/AABAQEhCwIBAAEBAQEBAQABAQIHAQABAQEAASEBAQEBAAEhAQEBAQEBAAEhAQEBAQEBAQEBAfwAAQEBIQsCAQABAQEBAQEAAQECBwEAAQEBAAEhAQEBAQABIQEBAQEBAQEBAQH8AAEBASELAgEAAQEBAQEBAAEBAQABQAEBAQFbAQIBAWD46bJYLYR6AQABQAEBAQFbAQIBAQEBAQEBAfwAAQEBIQsCAQABAQEBAQEAAQEBAAFAAQEBAVsBAgEBYPjpslgthHoBAAFAAQEBAVsBAgEBYPjpslgthHo=";

#[test]
fn an_update_listing_a_client_twice_is_refused_while_decoding() {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(FINDING_11)
        .unwrap();
    let refused = DecodedUpdate::decode(Bytes::from(bytes));
    assert!(
        matches!(&refused, Err(DocError::InvalidUpdate(_))),
        "{refused:?}"
    );
}

/// An update carrying one `Any` value nested `depth` arrays deep (client 1, clock 0, under root
/// `t`): two bytes per level.
fn nested_any_update(depth: usize) -> Vec<u8> {
    let mut update = vec![1, 1, 1, 0, 8, 1, 1, b't', 1];
    for _ in 0..depth {
        update.extend_from_slice(&[117, 1]);
    }
    update.extend_from_slice(&[126, 0]);
    update
}

/// Finding 12 (fixed): yrs decodes (and drops, and encodes) `Any` values recursively, with no
/// bound on depth. An update of 20 KB nesting an array 10,000 deep overflowed the stack of the
/// thread decoding it, which aborts the whole process: any client with write access could stop
/// the server. Found by reading yrs' decoder after the fuzzers (whose inputs are at most 4 KB,
/// about 2,000 levels) found nothing there. tandem's own reader now refuses nesting deeper than
/// 128 before yrs sees the bytes.
#[test]
fn deeply_nested_values_are_refused_before_yrs_decodes_them() {
    let refused = DecodedUpdate::decode(Bytes::from(nested_any_update(10_000)));
    assert!(
        matches!(&refused, Err(DocError::InvalidUpdate(r)) if r.contains("nested deeper")),
        "{refused:?}"
    );
    // What real documents nest is accepted.
    let mut room = YDoc::new();
    let update = DecodedUpdate::decode(Bytes::from(nested_any_update(64))).unwrap();
    assert!(matches!(
        room.apply_checked(update),
        Ok(Applied::Changed { .. })
    ));
}

/// Finding 12 end to end: the sender of the nesting bomb (500,000 levels, 1 MB) is closed with
/// 1007, and the server goes on serving the room.
#[tokio::test]
async fn a_nesting_bomb_costs_only_its_sender_the_connection() {
    let server = TestServer::start().await;
    let url = server.url("nesting");
    let a = Client::connect(&url).await.unwrap();
    a.wait_synced(WAIT).await.unwrap();
    append_text(a.doc(), "t", "kept");

    let mut bad = raw(&url).await;
    let bomb = nested_any_update(500_000);
    send_binary(
        &mut bad,
        Message::Sync(SyncMessage::Update(&bomb)).to_frame(),
    )
    .await;
    let (code, reason) = expect_close(&mut bad).await;
    assert_eq!(code, CloseCode::InvalidData.code(), "{reason}");

    let newcomer = Client::connect(&url).await.unwrap();
    newcomer
        .wait_until(WAIT, |d| text(d, "t") == "kept")
        .await
        .expect("the newcomer gets the document");
    assert!(a.close_info().is_none(), "{:?}", a.close_info());
}

/// Finding 13: an item whose left and right origins do not belong together (here client 3's four
/// characters, left origin 1:2 in the text `t`, right origin 1:11 the entry `k` of the map `m`)
/// used to integrate into the text's sequence *and* as an entry `k` of the text (yrs takes the
/// map key from either origin); the room's own encoding of that state (a newcomer's step 2, a
/// snapshot) then made newcomers hold the characters as deleted. Such an item is now refused
/// before yrs sees it; an ordinary edit after it applies, and a newcomer gets what the room holds.
#[test]
fn a_newcomer_gets_what_the_room_holds_after_odd_origins() {
    let mut room = fuzz_base();
    let before = room.sync_summary();
    let odd = DecodedUpdate::decode(Bytes::from(hex("01010300c40102010b040001120100"))).unwrap();
    let refused = room.apply_checked(odd);
    assert!(
        matches!(refused, Err(DocError::Misplaced(_))),
        "{refused:?}"
    );
    assert_eq!(
        room.sync_summary(),
        before,
        "a refused update changes nothing"
    );
    // Client 7: "hi" at the start of `t`, an ordinary edit.
    let hi = DecodedUpdate::decode(Bytes::from(hex("010107000401017402686900"))).unwrap();
    assert!(matches!(
        room.apply_checked(hi),
        Ok(Applied::Changed { .. })
    ));
    let (sv, digest) = room.sync_summary();
    let mut newcomer = YDoc::new();
    let step2 = DecodedUpdate::decode(Bytes::from(room.diff(&[0]).unwrap())).unwrap();
    newcomer.apply_checked(step2).unwrap();
    assert_eq!(newcomer.compare(&sv, &digest).unwrap(), SAME);
}

/// The record of where items sit survives a reload: a room loaded from its snapshot refuses the
/// same misplaced item, and still takes edits that insert between real neighbours, in the text
/// and in the map.
#[test]
fn a_reloaded_room_still_refuses_misplaced_items() {
    let mut live = fuzz_base();
    let (snapshot, _) = live.encode_state().unwrap();
    let mut room = YDoc::load(Some(&snapshot), &[]).unwrap();
    let odd = DecodedUpdate::decode(Bytes::from(hex("01010300c40102010b040001120100"))).unwrap();
    assert!(matches!(
        room.apply_checked(odd),
        Err(DocError::Misplaced(_))
    ));
    use yrs::{Map, ReadTxn, Text, Transact, WriteTxn};
    let writer = yrs::Doc::with_client_id(9);
    {
        use yrs::updates::decoder::Decode;
        let mut txn = writer.transact_mut();
        txn.apply_update(yrs::Update::decode_v1(&snapshot).unwrap())
            .unwrap();
    }
    let before = writer.transact().state_vector();
    {
        let mut txn = writer.transact_mut();
        let t = txn.get_or_insert_text("t");
        t.insert(&mut txn, 4, "[between]");
        let m = txn.get_or_insert_map("m");
        m.insert(&mut txn, "k", "w");
        m.insert(&mut txn, "other", "x");
    }
    let edit = writer.transact().encode_state_as_update_v1(&before);
    let applied = room.apply_checked(DecodedUpdate::decode(Bytes::from(edit)).unwrap());
    assert!(
        matches!(applied, Ok(Applied::Changed { .. })),
        "{applied:?}"
    );
    assert_eq!(room.sync_summary(), {
        live.apply_checked(
            DecodedUpdate::decode(Bytes::from(
                writer
                    .transact()
                    .encode_state_as_update_v1(&yrs::StateVector::default()),
            ))
            .unwrap(),
        )
        .unwrap();
        live.sync_summary()
    });
}

/// Finding 14: yrs 0.28 never frees a document that holds a subdocument (the `update` campaign's
/// leak check at exit; a document of 6 KB with one subdocument left about 8.9 KB allocated on
/// every load and drop). A room unloads and loads its document again and again, so a writer
/// could make the server leak a whole document each time. Subdocuments are refused while
/// decoding, before yrs sees them.
#[test]
fn subdocuments_are_refused_while_decoding() {
    use yrs::{Map, ReadTxn, Transact, WriteTxn};
    let doc = yrs::Doc::with_client_id(5);
    {
        let mut txn = doc.transact_mut();
        let m = txn.get_or_insert_map("m");
        m.insert(&mut txn, "sub", yrs::Doc::new());
    }
    let update = doc
        .transact()
        .encode_state_as_update_v1(&yrs::StateVector::default());
    let refused = DecodedUpdate::decode(Bytes::from(update));
    assert!(
        matches!(&refused, Err(DocError::InvalidUpdate(why)) if why.contains("subdocument")),
        "{refused:?}"
    );
}

/// Finding 15: found by the `update` campaign with finding 14 fixed. On the fuzz targets'
/// starting document, one update of two clients: client 0 writes a 5-character string into the
/// map entry `m.k` (its left origin is the entry's value), and client 47 inserts with only a
/// right origin inside that string, which splits it. yrs integrated it, but in the room's own
/// snapshot the string is two items, and the second, loaded on its own, deletes the first: the
/// snapshot held less than the room. A live map value longer than one clock is now refused.
#[test]
fn a_live_map_value_longer_than_one_clock_is_refused() {
    let input = hex(concat!(
        "02012f00440008033e3e20050000040101740568650a006f81",
        "01040184010b05770b00000c2801016d01010000030101010205"
    ));
    let mut room = fuzz_base();
    let before = room.sync_summary();
    let update = DecodedUpdate::decode(Bytes::from(input)).unwrap();
    let refused = room.apply_checked(update);
    assert!(
        matches!(
            refused,
            Err(DocError::Misplaced(Misplaced::LongEntry {
                client: 0,
                clock: 6,
                len: 5
            }))
        ),
        "{refused:?}"
    );
    assert_eq!(room.compare(&before.0, &before.1).unwrap(), SAME);
}

/// What finding 15's rule must let through: a client that keeps deleted values (no garbage
/// collection) merges a map entry's overwritten and deleted values into one item longer than one
/// clock, and another client set the entry concurrently next to the first of them, which splits
/// the long item in the room. The room takes both, and its snapshot holds what it holds.
#[test]
fn deleted_map_values_merged_into_one_item_pass_and_survive_a_reload() {
    use yrs::updates::decoder::Decode;
    use yrs::{Map, ReadTxn, Transact, WriteTxn};
    let state = |doc: &yrs::Doc| {
        doc.transact()
            .encode_state_as_update_v1(&yrs::StateVector::default())
    };
    let options = |client: u64| yrs::Options {
        skip_gc: true,
        ..yrs::Options::with_client_id(yrs::ClientID::new(client))
    };
    let one = yrs::Doc::with_options(options(1));
    {
        let mut txn = one.transact_mut();
        let m = txn.get_or_insert_map("m");
        m.insert(&mut txn, "k", 1.0);
    }
    let two = yrs::Doc::with_options(options(2));
    two.transact_mut()
        .apply_update(yrs::Update::decode_v1(&state(&one)).unwrap())
        .unwrap();
    {
        let mut txn = one.transact_mut();
        let m = txn.get_or_insert_map("m");
        m.insert(&mut txn, "k", 2.0);
        m.insert(&mut txn, "k", 3.0);
        m.remove(&mut txn, "k");
    }
    // Client 2 sets `k` next to client 1's first value, concurrently.
    {
        let mut txn = two.transact_mut();
        let m = txn.get_or_insert_map("m");
        m.insert(&mut txn, "k", "two");
    }
    let first = state(&one);
    let shape = tandem_protocol::UpdateShape::read(&first).unwrap();
    let long = shape.clients().iter().any(|run| {
        shape
            .blocks(run)
            .iter()
            .any(|b| b.len > 1 && !b.content_deleted)
    });
    assert!(long, "client 1's state holds one item for its three values");
    let mut room = YDoc::new();
    room.apply_checked(DecodedUpdate::decode(Bytes::from(first)).unwrap())
        .unwrap();
    let held = yrs::StateVector::decode_v1(&room.state_vector()).unwrap();
    let second = two.transact().encode_state_as_update_v1(&held);
    room.apply_checked(DecodedUpdate::decode(Bytes::from(second)).unwrap())
        .unwrap();
    let (snapshot, _) = room.encode_state().unwrap();
    let reloaded = YDoc::load(Some(&snapshot), &[]).unwrap();
    let (sv, digest) = room.sync_summary();
    assert_eq!(reloaded.compare(&sv, &digest).unwrap(), SAME);
    let txn = room.doc().transact();
    let value = txn.get_map("m").unwrap().get(&txn, "k");
    assert_eq!(value.map(|v| v.to_string(&txn)), Some("two".into()));
}

/// Found by the `connection` target built with debug assertions (session 5): a sync step 1
/// whose state vector names a client id past 53 bits reached yrs' reader, which asserts (in
/// debug builds) that ids fit in 53 bits and, in release builds, silently merges such an id
/// with another. State vectors are now read strictly before yrs sees them.
#[test]
fn state_vectors_with_ids_past_53_bits_or_trailing_bytes_are_refused() {
    let refused =
        |sv: &[u8]| matches!(check_state_vector(sv), Err(DocError::InvalidStateVector(_)));
    // The fuzzer's state vector: two entries, the first client id ten bytes long.
    let found = [
        0x02, 0xff, 0xff, 0x83, 0x83, 0x83, 0x83, 0x83, 0x83, 0x83, 0xff, 0x04, 0xff, 0x01, 0x00,
    ];
    assert!(refused(&found));
    // 2^53 as a client id; a clock past 32 bits; a byte after the last entry.
    assert!(refused(&[
        1, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10, 0
    ]));
    assert!(refused(&[1, 5, 0x80, 0x80, 0x80, 0x80, 0x10]));
    assert!(refused(&[1, 5, 3, 0]));
    // What clients send: 2^53 - 1 and a 32-bit clock pass, as does the empty state vector.
    assert!(check_state_vector(&[0]).is_ok());
    let mut honest = vec![2];
    tandem_protocol::lib0::write_var_uint(&mut honest, (1 << 53) - 1);
    tandem_protocol::lib0::write_var_uint(&mut honest, u64::from(u32::MAX));
    honest.extend_from_slice(&[7, 3]);
    assert!(check_state_vector(&honest).is_ok());
}

/// Finding 17: found by the `connection` target at the end of session 5 (minimised to 40 bytes,
/// three updates from one writer). Client 7 types "hi" into a root type; then an update repeats
/// client 7's clock 0, three characters long, as if written into another root type. yrs
/// integrates only the new third character, with the last held clock as its left origin: it
/// joins the first type's sequence but is counted in the other type's length, and deleting all
/// three characters then underflows a length inside yrs (a panic; with overflow checks, as
/// in tandem's release build, the room is discarded). Now refused: a block that continues held
/// clocks must lie where they do.
#[test]
fn a_block_that_continues_held_clocks_in_another_type_is_refused() {
    let mut room = YDoc::new();
    let decode = |bytes: &[u8]| DecodedUpdate::decode(Bytes::copy_from_slice(bytes)).unwrap();
    room.apply_checked(decode(&[1, 1, 7, 0, 4, 1, 1, 3, 2, b'h', b'i', 0]))
        .unwrap();
    let before = room.sync_summary();
    let refused = room.apply_checked(decode(&[1, 1, 7, 0, 4, 1, 0, 3, 2, b'h', b'i', 0]));
    assert!(
        matches!(
            refused,
            Err(DocError::Misplaced(Misplaced::Overlap {
                client: 7,
                clock: 0
            }))
        ),
        "{refused:?}"
    );
    assert_eq!(room.compare(&before.0, &before.1).unwrap(), SAME);
    // The deletion that made yrs panic now applies to what the room holds.
    room.apply_checked(decode(&[0, 1, 7, 1, 0, 2])).unwrap();
    // A repeat in the same place (a sync step 2 overlapping updates that came first) passes.
    let mut room = YDoc::new();
    room.apply_checked(decode(&[1, 1, 7, 0, 4, 1, 1, b't', 2, b'h', b'i', 0]))
        .unwrap();
    room.apply_checked(decode(&[1, 1, 7, 0, 4, 1, 1, b't', 3, b'h', b'i', b'!', 0]))
        .unwrap();
    assert_eq!(text(room.doc(), "t"), "hi!");
}
