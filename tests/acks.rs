//! Storage acknowledgements (tandem's message type 100) and the echo option, against real nodes.
//!
//! The claim under test: `Stored(n)` reaches a client only once its first `n` update messages
//! are durable. It is checked by reading the store from the test after the acknowledgement, and
//! by breaking the store: a node over a [`FlakyStore`] (a real SQLite store whose appends fail
//! while a flag is set) keeps serving from memory, withholds acknowledgements, and refuses writes
//! with 1013 once its bound on unstored updates is reached.
//!
//! The last four pin down ways an acknowledgement could cover data that is not stored (pending
//! updates, partly integrated ones, content known only from another node) or never come.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::{append_text, full_state, raw, send_binary, text, Raw, TestServer, WAIT};
use futures_util::StreamExt;
use tandem::app::{App, Running};
use tandem::broker::memory::MemoryBus;
use tandem::config::Config;
use tandem::ids::RoomId;
use tandem::store::sqlite::SqliteStore;
use tandem::store::{Append, Compacted, DynStore, Fold, Store, StoreError, StoredRoom};
use tandem_client::{Client, ClientError, CloseOrigin};
use tandem_protocol::{CloseCode, Message, MessageReader, SyncMessage};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use yrs::updates::decoder::Decode;
use yrs::{Doc, ReadTxn, Transact, Update};

/// How long a test watches for something that must not happen.
const QUIET: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------------------------------
// A node over a store the test can break.

/// Fault injection over a real store: a [`SqliteStore`] whose appends fail while `down` is set.
/// Everything else (loads, compactions) goes to the real store.
struct FlakyStore {
    inner: DynStore,
    down: AtomicBool,
    /// Appends refused so far.
    refused: AtomicU64,
}

#[async_trait]
impl Store for FlakyStore {
    async fn load(&self, room: &RoomId) -> Result<StoredRoom, StoreError> {
        self.inner.load(room).await
    }

    async fn append(&self, batch: &[Append]) -> Result<Vec<i64>, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Io(std::io::Error::other(
                "injected failure: store down",
            )));
        }
        self.inner.append(batch).await
    }

    async fn compact(&self, room: &RoomId, fold: &dyn Fold) -> Result<Compacted, StoreError> {
        self.inner.compact(room, fold).await
    }

    async fn rooms(&self) -> Result<Vec<RoomId>, StoreError> {
        self.inner.rooms().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    async fn close(&self) {
        self.inner.close().await
    }
}

/// A node on 127.0.0.1:0 over a [`FlakyStore`] on a fresh SQLite file; shut down on drop.
struct FlakyServer {
    running: Option<Running>,
    store: Arc<FlakyStore>,
    /// The SQLite file's directory, when this node owns it.
    _dir: Option<tempfile::TempDir>,
}

impl FlakyServer {
    /// A node whose configuration `tweak` adjusts. Failed appends are retried quickly, so that a
    /// store that comes back is used at once.
    async fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let inner: DynStore = Arc::new(
            SqliteStore::open(&dir.path().join("tandem.db"))
                .await
                .expect("open store"),
        );
        let mut server = Self::over(inner, None, tweak).await;
        server._dir = Some(dir);
        server
    }

    /// A node over its own [`FlakyStore`] wrapping `inner` (which other nodes may share), on
    /// `bus` if given.
    async fn over(
        inner: DynStore,
        bus: Option<&MemoryBus>,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let mut config = Config {
            bind: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        };
        config.writer.retry_initial = Duration::from_millis(5);
        config.writer.retry_max = Duration::from_millis(20);
        tweak(&mut config);
        let store = Arc::new(FlakyStore {
            inner,
            down: AtomicBool::new(false),
            refused: AtomicU64::new(0),
        });
        let listener = tokio::net::TcpListener::bind(config.bind)
            .await
            .expect("bind");
        let mut app = App::with_store(config, store.clone());
        if let Some(bus) = bus {
            app = app.with_bus(bus);
        }
        let running = app.start(listener).expect("start");
        Self {
            running: Some(running),
            store,
            _dir: None,
        }
    }

    fn url(&self, room: &str) -> String {
        let addr = self.running.as_ref().expect("running").local_addr();
        format!("ws://{addr}/{room}")
    }

    /// `GET /readyz`: the status and the JSON body.
    async fn readyz(&self) -> (u16, serde_json::Value) {
        let addr = self.running.as_ref().expect("running").local_addr();
        let (status, body) = common::http_get(addr, "/readyz").await;
        (
            status,
            serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Makes every append fail (`true`) or reach the store again (`false`).
    fn set_store_down(&self, down: bool) {
        self.store.down.store(down, Ordering::SeqCst);
    }

    /// The room's document as the real store holds it.
    async fn stored_doc(&self, room: &str) -> Doc {
        stored_doc(&self.store.inner, room).await
    }
}

impl Drop for FlakyServer {
    fn drop(&mut self) {
        if let Some(r) = &self.running {
            r.shutdown_token().cancel();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers.

/// A room's document as `store` holds it: the snapshot, then every log row, merged with yrs.
async fn stored_doc(store: &DynStore, room: &str) -> Doc {
    let stored = store
        .load(&RoomId::new(room).expect("room name"))
        .await
        .expect("load");
    let doc = Doc::new();
    {
        let mut txn = doc.transact_mut();
        let snapshot = stored.snapshot.iter().map(|s| &s.state);
        for bytes in snapshot.chain(stored.updates.iter().map(|(_, data)| data)) {
            let update = Update::decode_v1(bytes).expect("stored update decodes");
            txn.apply_update(update).expect("stored update applies");
        }
    }
    doc
}

/// A client of `url` that has synced; acknowledgements are on by default.
async fn synced(url: &str) -> Client {
    let client = Client::connect(url).await.expect("connect");
    client.wait_synced(WAIT).await.expect("synced");
    client
}

/// An update from a document of its own: `s` inserted into text `t` by Yjs client `client_id`.
fn foreign_update(client_id: u64, s: &str) -> Vec<u8> {
    let doc = Doc::with_client_id(client_id);
    append_text(&doc, "t", s);
    full_state(&doc)
}

/// What a raw socket received in some time: the acknowledgements and sync updates among it.
#[derive(Debug, Default)]
struct Received {
    /// `n` of every `Stored(n)`, in order.
    acks: Vec<u64>,
    /// The payload of every sync update message, in order.
    updates: Vec<Vec<u8>>,
}

/// Reads the raw socket for `within` and sorts what arrived.
async fn received_within(ws: &mut Raw, within: Duration) -> Received {
    let deadline = Instant::now() + within;
    let mut out = Received::default();
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, ws.next()).await {
        if let WsMessage::Binary(frame) = msg.expect("socket error") {
            for m in MessageReader::new(&frame) {
                let m = m.expect("valid message");
                out.acks.extend(stored_count(&m));
                out.updates.extend(update_payload(&m));
            }
        }
    }
    out
}

/// Reads the raw socket until the server closes it: the close code and every `Stored(n)` before.
async fn acks_until_closed(ws: &mut Raw) -> (Option<u16>, Vec<u64>) {
    let read = async {
        let mut acks = Vec::new();
        while let Some(msg) = ws.next().await {
            match msg.expect("socket error") {
                WsMessage::Binary(frame) => {
                    for m in MessageReader::new(&frame) {
                        acks.extend(stored_count(&m.expect("valid message")));
                    }
                }
                WsMessage::Close(frame) => return (frame.map(|f| u16::from(f.code)), acks),
                _ => {}
            }
        }
        (None, acks)
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("closed in time")
}

/// Reads the raw socket until a message `pick` accepts arrives.
async fn next_matching<T>(ws: &mut Raw, pick: impl Fn(&Message<'_>) -> Option<T>) -> T {
    let read = async {
        while let Some(msg) = ws.next().await {
            if let WsMessage::Binary(frame) = msg.expect("socket error") {
                for m in MessageReader::new(&frame) {
                    if let Some(found) = pick(&m.expect("valid message")) {
                        return found;
                    }
                }
            }
        }
        panic!("socket ended before the expected message");
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("expected message in time")
}

fn stored_count(m: &Message<'_>) -> Option<u64> {
    match m {
        Message::Stored(n) => Some(*n),
        _ => None,
    }
}

fn update_payload(m: &Message<'_>) -> Option<Vec<u8>> {
    match m {
        Message::Sync(SyncMessage::Update(u)) => Some(u.to_vec()),
        _ => None,
    }
}

fn update_frame(update: &[u8]) -> Vec<u8> {
    Message::Sync(SyncMessage::Update(update)).to_frame()
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn edits_are_acknowledged_after_they_are_stored() {
    const EDITS: usize = 40;
    let server = TestServer::start().await;
    let room = "acks/stored";
    let writer = synced(&server.url(room)).await;
    let reader = synced(&server.url(room)).await;
    for i in 0..EDITS {
        append_text(writer.doc(), "t", &format!("[{i}]"));
    }
    let expected: String = (0..EDITS).map(|i| format!("[{i}]")).collect();
    writer.wait_stored(WAIT).await.unwrap();

    // Durable when acknowledged: read from the SQLite file, right after the acknowledgement.
    let store = server.open_store().await;
    assert_eq!(text(&stored_doc(&store, room).await, "t"), expected);

    // Every update message counted alike on both ends: the step 2 answering the node's step 1,
    // then one update a transaction.
    assert_eq!(
        (writer.stored(), writer.sent_updates()),
        (EDITS as u64 + 1, EDITS as u64 + 1)
    );
    reader
        .wait_until(WAIT, |doc| text(doc, "t") == expected)
        .await
        .unwrap();
    // Nothing edited since: resolves at once.
    writer.wait_stored(Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn acknowledgements_are_withheld_while_the_store_is_down() {
    let server = FlakyServer::start(|_| {}).await;
    let room = "acks/down";
    let writer = synced(&server.url(room)).await;
    let reader = synced(&server.url(room)).await;
    append_text(writer.doc(), "t", "before;");
    writer.wait_stored(WAIT).await.unwrap();
    let acked = writer.stored();

    server.set_store_down(true);
    append_text(writer.doc(), "t", "while down;");
    // The node keeps serving from memory: the other client gets the edit at once...
    reader
        .wait_until(WAIT, |doc| text(doc, "t") == "before;while down;")
        .await
        .unwrap();
    // ...but it is not stored, so it is not acknowledged.
    assert!(matches!(
        writer.wait_stored(QUIET).await,
        Err(ClientError::Timeout(_))
    ));
    assert_eq!(writer.stored(), acked);
    assert!(
        server.store.refused.load(Ordering::SeqCst) > 0,
        "the node did try"
    );
    assert_eq!(text(&server.stored_doc(room).await, "t"), "before;");

    server.set_store_down(false);
    writer.wait_stored(WAIT).await.unwrap();
    assert_eq!(writer.stored(), writer.sent_updates());
    assert_eq!(
        text(&server.stored_doc(room).await, "t"),
        "before;while down;"
    );
}

#[tokio::test]
async fn past_the_unstored_bound_writes_are_refused_with_1013() {
    let server = FlakyServer::start(|c| c.writer.queue_capacity = 4).await;
    let room = "acks/bound";
    let writer = synced(&server.url(room)).await;
    append_text(writer.doc(), "t", "stored;");
    writer.wait_stored(WAIT).await.unwrap();
    let acked = writer.stored();

    server.set_store_down(true);
    let mut edits = 0;
    while writer.close_info().is_none() {
        assert!(
            edits < 500,
            "no 1013 after {edits} edits with the store down"
        );
        append_text(writer.doc(), "t", &format!("[{edits}]"));
        edits += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let info = writer.wait_closed(WAIT).await.unwrap();
    assert_eq!(info.close_code(), Some(CloseCode::TryAgainLater), "{info}");
    assert_eq!(info.origin, CloseOrigin::Server);
    // Readiness says why: the bound is reached.
    let (status, body) = server.readyz().await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["writes"]
            .as_str()
            .is_some_and(|w| w.starts_with("full")),
        "{body}"
    );
    // Nothing was acknowledged while the store was down.
    assert_eq!(writer.stored(), acked);
    assert!(matches!(
        writer.wait_stored(WAIT).await,
        Err(ClientError::Closed(_))
    ));

    // The store comes back. The same document reconnects, as a new client, and sends its state,
    // as a bot does after a 1013: again with a pause while the node still refuses (its writer
    // first drains what it queued).
    server.set_store_down(false);
    let deadline = Instant::now() + WAIT;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let again = synced(&server.url(room)).await;
        {
            let state = Update::decode_v1(&full_state(writer.doc())).unwrap();
            again.doc().transact_mut().apply_update(state).unwrap();
        }
        match again.wait_stored(WAIT).await {
            Ok(()) => break,
            Err(ClientError::Closed(info))
                if info.close_code() == Some(CloseCode::TryAgainLater)
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("attempt {attempts}: {e}"),
        }
    }
    let everything = text(writer.doc(), "t");
    assert!(everything.starts_with("stored;[0]"), "{everything}");
    let (status, body) = server.readyz().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(text(&server.stored_doc(room).await, "t"), everything);
}

#[tokio::test]
async fn stock_clients_never_receive_acks() {
    let server = TestServer::start().await;
    let room = "acks/stock";

    // A stock client: step 1, then updates, and never an acknowledgement request.
    let mut stock = raw(&server.url(room)).await;
    send_binary(&mut stock, vec![0x00, 0x00, 0x01, 0x00]).await;
    send_binary(&mut stock, update_frame(&foreign_update(1, "stock;"))).await;
    send_binary(&mut stock, update_frame(&foreign_update(2, "again;"))).await;
    let seen = received_within(&mut stock, QUIET).await;
    assert!(seen.acks.is_empty(), "acknowledged: {seen:?}");
    // The updates were stored meanwhile: there was something to acknowledge.
    let store = server.open_store().await;
    let stored = text(&stored_doc(&store, room).await, "t");
    assert!(
        stored.contains("stock;") && stored.contains("again;"),
        "{stored:?}"
    );

    // The same messages after a request are acknowledged: the check above can see one.
    let mut asking = raw(&server.url(room)).await;
    send_binary(&mut asking, Message::AckRequest.to_frame()).await;
    send_binary(&mut asking, update_frame(&foreign_update(3, "asked;"))).await;
    assert_eq!(next_matching(&mut asking, stored_count).await, 1);
}

#[tokio::test]
async fn echo_option_sends_a_clients_own_update_back_after_commit() {
    let server = FlakyServer::start(|c| c.rooms.echo_own_updates = true).await;
    let room = "acks/echo";
    let mut ws = raw(&server.url(room)).await;
    send_binary(&mut ws, vec![0x00, 0x00, 0x01, 0x00]).await;
    let update = foreign_update(7, "echo me");

    // Not stored, so not echoed.
    server.set_store_down(true);
    send_binary(&mut ws, update_frame(&update)).await;
    let seen = received_within(&mut ws, QUIET).await;
    assert!(
        seen.updates.is_empty(),
        "echoed before it was stored: {seen:?}"
    );

    // Stored: echoed byte for byte, as a sync update, and durable by then.
    server.set_store_down(false);
    assert_eq!(next_matching(&mut ws, update_payload).await, update);
    assert_eq!(text(&server.stored_doc(room).await, "t"), "echo me");
    // Echoes do not imply acknowledgements: this socket never asked for them.
    let seen = received_within(&mut ws, QUIET).await;
    assert!(seen.acks.is_empty(), "acknowledged: {seen:?}");

    // Off by default: the sender gets no copy of its own update.
    let plain = TestServer::start().await;
    let mut ws = raw(&plain.url(room)).await;
    send_binary(&mut ws, vec![0x00, 0x00, 0x01, 0x00]).await;
    send_binary(&mut ws, update_frame(&update)).await;
    let store = plain.open_store().await;
    let deadline = Instant::now() + WAIT;
    while text(&stored_doc(&store, room).await, "t") != "echo me" {
        assert!(Instant::now() < deadline, "the update was never stored");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = received_within(&mut ws, QUIET).await;
    assert!(
        seen.updates.is_empty(),
        "echoed with the option off: {seen:?}"
    );
}

#[tokio::test]
async fn an_update_skipping_its_own_clocks_is_refused_and_never_acknowledged() {
    let server = TestServer::start().await;
    let room = "acks/pending";
    // Client 5 writes "a" then "b"; the update with "b" alone cannot apply without "a".
    let source = Doc::with_client_id(5);
    append_text(&source, "t", "a");
    let before = source.transact().state_vector();
    append_text(&source, "t", "b");
    let only_b = source.transact().encode_state_as_update_v1(&before);

    let mut ws = raw(&server.url(room)).await;
    send_binary(&mut ws, Message::AckRequest.to_frame()).await;
    send_binary(&mut ws, update_frame(&only_b)).await;
    // Refused with 1007 before the room holds any of it, and never acknowledged (the room used
    // to keep it waiting for "a"; no room holds waiting data now).
    let (code, acks) = acks_until_closed(&mut ws).await;
    assert_eq!(code, Some(CloseCode::InvalidData.code()));
    assert!(acks.iter().all(|&n| n == 0), "acknowledged: {acks:?}");
}

#[tokio::test]
async fn an_update_depending_on_what_the_room_lacks_is_refused_whole() {
    let server = TestServer::start().await;
    let room = "acks/partial";
    // Client 6 typed "b" after client 5's "a", which the room has never seen.
    let five = Doc::with_client_id(5);
    append_text(&five, "t", "a");
    let six = Doc::with_client_id(6);
    {
        use yrs::updates::decoder::Decode;
        let a = five
            .transact()
            .encode_state_as_update_v1(&Default::default());
        six.transact_mut()
            .apply_update(yrs::Update::decode_v1(&a).unwrap())
            .unwrap();
    }
    let before = six.transact().state_vector();
    append_text(&six, "t", "b");
    let only_b = six.transact().encode_diff_v1(&before);
    // One message: "x" could apply alone, "b" cannot without "a". (Before the room checked
    // dependencies it applied "x", kept "b" waiting and acknowledged nothing.)
    let both = yrs::merge_updates_v1([&only_b[..], &foreign_update(7, "x")[..]]).unwrap();

    let mut ws = raw(&server.url(room)).await;
    send_binary(&mut ws, Message::AckRequest.to_frame()).await;
    send_binary(&mut ws, update_frame(&both)).await;
    // Refused whole, with 1007, and never acknowledged.
    let (code, acks) = acks_until_closed(&mut ws).await;
    assert_eq!(code, Some(CloseCode::InvalidData.code()));
    assert!(acks.iter().all(|&n| n == 0), "acknowledged: {acks:?}");
    // Nothing of it was stored: a later write from someone else is, alone.
    let mut other = raw(&server.url(room)).await;
    send_binary(&mut other, update_frame(&foreign_update(8, "y"))).await;
    let store = server.open_store().await;
    let deadline = Instant::now() + WAIT;
    while text(&stored_doc(&store, room).await, "t") != "y" {
        assert!(
            Instant::now() < deadline,
            "the later write was never stored"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn content_another_node_has_not_stored_is_not_acknowledged() {
    let dir = tempfile::tempdir().expect("temp dir");
    let shared: DynStore = Arc::new(
        SqliteStore::open(&dir.path().join("tandem.db"))
            .await
            .expect("open store"),
    );
    let bus = MemoryBus::new();
    let node = |i: usize| {
        let shared = shared.clone();
        let bus = &bus;
        async move {
            FlakyServer::over(shared, Some(bus), |c| {
                c.node_id = tandem::ids::NodeId::new(format!("node-{i}"));
            })
            .await
        }
    };
    let (first, second) = (node(0).await, node(1).await);
    let room = "acks/remote";
    let writer = synced(&first.url(room)).await;
    let watcher = synced(&second.url(room)).await;

    // node-0 cannot store; it relays the edit to node-1 through the bus all the same.
    first.set_store_down(true);
    append_text(writer.doc(), "t", "only in memory");
    watcher
        .wait_until(WAIT, |doc| text(doc, "t") == "only in memory")
        .await
        .unwrap();
    assert!(matches!(
        writer.wait_stored(QUIET).await,
        Err(ClientError::Timeout(_))
    ));

    // The writer's document, sent again through node-1 by a bot that reconnected there: the
    // edit changes nothing on node-1, which only has it from the bus, so node-1 may acknowledge
    // it only after storing it itself.
    let mut bot = raw(&second.url(room)).await;
    send_binary(&mut bot, Message::AckRequest.to_frame()).await;
    send_binary(&mut bot, update_frame(&full_state(writer.doc()))).await;
    let got = received_within(&mut bot, QUIET).await;
    let stored = text(&stored_doc(&shared, room).await, "t");
    assert!(
        got.acks.is_empty() || stored == "only in memory",
        "acknowledged {:?} while the store holds {stored:?}",
        got.acks
    );
    assert_eq!(
        got.acks,
        vec![1],
        "node-1 can store it, so it must acknowledge it"
    );
}
