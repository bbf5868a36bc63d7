//! Several real `tandem` processes sharing one fresh Postgres database and a private
//! `redis-server` (no persistence, on a free port: faults here never touch the shared instance):
//! convergence and presence across processes, a node SIGKILLed under load, Redis killed and
//! restarted under load, and one node cut off Postgres for a while.
//!
//! The tests of this file run one at a time ([`SERIAL`]): each starts up to three nodes, each
//! with a Postgres pool of its own, and the shared server's `max_connections` must cover them
//! (besides the other test binaries' databases).
//!
//! `TANDEM_TEST_ECHO_LOGS=1` echoes every node's stderr, prefixed with its name.

mod common;
#[path = "common/procs.rs"]
mod procs;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{full_state, text};
use procs::{postgres_addr, with_host, RedisProcess, TandemProcess, TcpProxy, TestDatabase};
use serde_json::json;
use tandem::ids::RoomId;
use tandem::store::postgres::PostgresStore;
use tandem::store::Store;
use tandem_client::{Client, ClientError};
use tokio::time::{sleep, timeout, Instant};
use yrs::updates::decoder::Decode;
use yrs::Transact;

/// How long one wait (sync, acknowledgement, convergence) may take before the test fails.
const WAIT: Duration = Duration::from_secs(20);

/// The root `Y.Text` every test edits.
const TEXT: &str = "t";

/// One test at a time in this binary (see the module docs).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn tandem_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tandem"))
}

/// A room name no other test (or earlier run) uses.
fn unique_room(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

/// A token that occurs exactly once in a test's text: `[w{writer}.{n}]`.
fn token(writer: &str, n: usize) -> String {
    format!("[{writer}.{n}]")
}

/// The tokens of `tokens` missing from `text`.
fn missing<'a>(text: &str, tokens: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    tokens
        .into_iter()
        .filter(|t| !text.contains(t.as_str()))
        .cloned()
        .collect()
}

/// Appends `s` to the text without blocking a runtime thread on the document's lock: the
/// client's connection task takes the same lock asynchronously. (Blocking in `transact_mut` from
/// a task was seen to hang forever, with the other worker threads idle; see the report.)
async fn append_text(doc: &yrs::Doc, name: &str, s: &str) {
    use yrs::Text;
    let t = doc.get_or_insert_text(name);
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(mut txn) = doc.try_transact_mut() {
            let len = t.len(&txn);
            t.insert(&mut txn, len, s);
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the document stayed locked for {WAIT:?}"
        );
        sleep(Duration::from_millis(1)).await;
    }
}

/// Starts `n` nodes `node-0` … on `database_url` and `redis_url`.
async fn start_nodes(n: usize, database_url: &str, redis_url: &str) -> Vec<TandemProcess> {
    let mut nodes = Vec::new();
    for i in 0..n {
        nodes.push(
            TandemProcess::start(
                tandem_bin(),
                &format!("node-{i}"),
                &[
                    "--database-url".into(),
                    database_url.into(),
                    "--redis-url".into(),
                    redis_url.into(),
                ],
            )
            .await,
        );
    }
    nodes
}

/// The recent logs of every node, for failure messages.
fn logs(nodes: &[&TandemProcess]) -> String {
    nodes
        .iter()
        .map(|n| format!("--- {} ---\n{}", n.name(), n.logs(60)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Connects to `url` and waits for the initial sync.
async fn join(url: &str) -> Client {
    let c = timeout(WAIT, Client::connect(url))
        .await
        .unwrap_or_else(|_| panic!("connecting to {url} timed out"))
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    c.wait_synced(WAIT)
        .await
        .unwrap_or_else(|e| panic!("initial sync on {url}: {e}"));
    c
}

/// Waits until `c`'s text holds every token of `tokens`.
async fn wait_for_tokens(
    c: &Client,
    tokens: &BTreeSet<String>,
    what: &str,
    nodes: &[&TandemProcess],
) {
    if let Err(e) = c
        .wait_until(WAIT, |doc| missing(&text(doc, TEXT), tokens).is_empty())
        .await
    {
        panic!(
            "{what}: not every token arrived ({e}); missing {:?}\n{}",
            missing(&text(c.doc(), TEXT), tokens),
            logs(nodes)
        );
    }
}

/// What Postgres holds for `room`: snapshot and log merged into one document's text.
async fn stored_text(database_url: &str, room: &str) -> String {
    let store = PostgresStore::connect(database_url)
        .await
        .expect("connect to the test database");
    let stored = store
        .load(&RoomId::new(room).unwrap())
        .await
        .expect("load the room");
    let doc = yrs::Doc::new();
    {
        let mut txn = doc.transact_mut();
        if let Some(snapshot) = &stored.snapshot {
            txn.apply_update(yrs::Update::decode_v1(&snapshot.state).unwrap())
                .unwrap();
        }
        for (_, data) in &stored.updates {
            txn.apply_update(yrs::Update::decode_v1(data).unwrap())
                .unwrap();
        }
    }
    store.close().await;
    text(&doc, TEXT)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_processes_converge_and_share_presence() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let db = TestDatabase::create().await;
    let redis_dir = tempfile::tempdir().unwrap();
    let redis = RedisProcess::start_anywhere(redis_dir.path()).await;
    let nodes = start_nodes(3, db.url(), &redis.url()).await;
    let all: Vec<&TandemProcess> = nodes.iter().collect();
    let room = unique_room("converge");

    // Two clients on every node, all editing the same text at once.
    let mut clients = Vec::new();
    for node in &nodes {
        for _ in 0..2 {
            clients.push(join(&node.url(&room)).await);
        }
    }
    let mut writers = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let c = c.clone();
        writers.push(tokio::spawn(async move {
            let mut tokens = Vec::new();
            for n in 0..40 {
                let t = token(&format!("w{i}"), n);
                append_text(c.doc(), TEXT, &t).await;
                tokens.push(t);
                sleep(Duration::from_millis(3)).await;
            }
            tokens
        }));
    }
    let mut tokens = BTreeSet::new();
    for w in writers {
        tokens.extend(w.await.unwrap());
    }
    for (i, c) in clients.iter().enumerate() {
        wait_for_tokens(c, &tokens, &format!("client {i} (node {})", i / 2), &all).await;
    }
    let expected = text(clients[0].doc(), TEXT);
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(text(c.doc(), TEXT), expected, "client {i} diverged");
    }

    // Presence set on node 0 is seen on node 2.
    let presence = json!({ "user": "ada", "node": "node-0" });
    clients[0].set_awareness(presence.clone());
    let seen = |states: &std::collections::HashMap<u64, serde_json::Value>| {
        states.values().any(|v| *v == presence)
    };
    if let Err(e) = clients[5].wait_awareness(WAIT, seen).await {
        panic!(
            "node 2 never saw node 0's presence ({e}): {:?}\n{}",
            clients[5].awareness(),
            logs(&all)
        );
    }

    // A late joiner on node 2 gets the whole text and the presence.
    let late = join(&nodes[2].url(&room)).await;
    assert_eq!(text(late.doc(), TEXT), expected, "late joiner's text");
    if let Err(e) = late.wait_awareness(WAIT, seen).await {
        panic!(
            "the late joiner never saw node 0's presence ({e}): {:?}\n{}",
            late.awareness(),
            logs(&all)
        );
    }
    eprintln!(
        "three_processes_converge_and_share_presence: {} tokens, {:?}",
        tokens.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_one_node_under_load_keeps_every_acknowledged_update() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let db = TestDatabase::create().await;
    let redis_dir = tempfile::tempdir().unwrap();
    let redis = RedisProcess::start_anywhere(redis_dir.path()).await;
    let mut nodes = start_nodes(2, db.url(), &redis.url()).await;
    let room = unique_room("sigkill");

    // Writers on node A: a batch of edits, then wait for its acknowledgement, again and again.
    let acked = Arc::new(Mutex::new(BTreeSet::<String>::new()));
    let mut writers = Vec::new();
    for i in 0..3 {
        let c = join(&nodes[0].url(&room)).await;
        let acked = Arc::clone(&acked);
        writers.push(tokio::spawn(async move {
            let mut written = Vec::new();
            let mut n = 0;
            // Bounded: the node is killed long before this many batches.
            while n < 100_000 {
                let batch: Vec<String> = (0..3).map(|k| token(&format!("w{i}"), n + k)).collect();
                n += batch.len();
                // Every update message before the batch is on the wire (the last wait saw to
                // that), and each edit below is one more.
                let before = c.sent_updates();
                for t in &batch {
                    append_text(c.doc(), TEXT, t).await;
                    written.push(t.clone());
                }
                match c.wait_stored(WAIT).await {
                    // Counted as acknowledged only if the server's count covers the batch:
                    // `wait_stored` also returns Ok for edits made after the connection ended
                    // (see `wait_stored_after_the_connection_ended_is_an_error`).
                    Ok(()) if c.stored() >= before + batch.len() as u64 => {
                        acked.lock().unwrap().extend(batch)
                    }
                    Ok(()) => break,
                    Err(ClientError::Timeout(_)) => {
                        panic!("writer {i}: no acknowledgement in {WAIT:?} with the node up")
                    }
                    Err(_) => break, // the node is gone
                }
            }
            (c, written)
        }));
    }

    // Kill node A mid-stream, once a good part is acknowledged (900 tokens: 300 update
    // messages, so the room may have been compacted into a snapshot already).
    timeout(WAIT, async {
        while acked.lock().unwrap().len() < 900 {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("writers too slow to be acknowledged\n{}", nodes[0].logs(60)));
    eprintln!(
        "sigkill: killing node A {:?} in, {} tokens acknowledged",
        started.elapsed(),
        acked.lock().unwrap().len()
    );
    nodes[0].kill().await;
    let mut old = Vec::new();
    for w in writers {
        old.push(
            timeout(WAIT + Duration::from_secs(5), w)
                .await
                .expect("writer ends after the kill")
                .unwrap(),
        );
    }
    let acked = acked.lock().unwrap().clone();
    let written: BTreeSet<String> = old.iter().flat_map(|(_, w)| w.iter().cloned()).collect();
    eprintln!(
        "sigkill: {} tokens written, {} acknowledged before the kill",
        written.len(),
        acked.len()
    );

    // Every acknowledged token is in Postgres and on node B, before any client resends anything.
    let stored = stored_text(db.url(), &room).await;
    let lost = missing(&stored, &acked);
    assert!(
        lost.is_empty(),
        "acknowledged but not in Postgres: {lost:?}"
    );
    let b = &nodes[1];
    let fresh = join(&b.url(&room)).await;
    let lost = missing(&text(fresh.doc(), TEXT), &acked);
    assert!(
        lost.is_empty(),
        "acknowledged but not on node B: {lost:?}\n{}",
        b.logs(60)
    );

    // The writers reconnect to B and send their state, as a provider's reconnection would.
    let mut again = Vec::new();
    for (i, (c, _)) in old.iter().enumerate() {
        let n = join(&b.url(&room)).await;
        n.doc()
            .transact_mut()
            .apply_update(yrs::Update::decode_v1(&full_state(c.doc())).unwrap())
            .unwrap();
        if let Err(e) = n.wait_stored(WAIT).await {
            panic!(
                "writer {i}'s resent state not stored on B: {e}\n{}",
                b.logs(60)
            );
        }
        again.push(n);
    }
    // Now everything written, acknowledged or not, is on B (the fresh client sees it) and stored.
    wait_for_tokens(&fresh, &written, "fresh client on B", &[b]).await;
    let expected = text(fresh.doc(), TEXT);
    for (i, c) in again.iter().enumerate() {
        wait_for_tokens(c, &written, &format!("reconnected writer {i}"), &[b]).await;
        assert_eq!(
            text(c.doc(), TEXT),
            expected,
            "reconnected writer {i} diverged"
        );
    }
    let stored = stored_text(db.url(), &room).await;
    let lost = missing(&stored, &written);
    assert!(
        lost.is_empty(),
        "resent and acknowledged but not in Postgres: {lost:?}"
    );
    assert_eq!(stored, expected, "Postgres and node B disagree");
    eprintln!(
        "sigkill_one_node_under_load_keeps_every_acknowledged_update: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restart_under_load_converges() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let db = TestDatabase::create().await;
    let redis_dir = tempfile::tempdir().unwrap();
    let mut redis = RedisProcess::start_anywhere(redis_dir.path()).await;
    let port = redis.port();
    let nodes = start_nodes(2, db.url(), &redis.url()).await;
    let all: Vec<&TandemProcess> = nodes.iter().collect();
    let room = unique_room("redis-restart");

    let mut clients = Vec::new();
    for node in &nodes {
        for _ in 0..2 {
            clients.push(join(&node.url(&room)).await);
        }
    }
    // Everyone edits until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let (c, stop) = (c.clone(), Arc::clone(&stop));
        writers.push(tokio::spawn(async move {
            let mut tokens = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 10_000 {
                let t = token(&format!("w{i}"), n);
                append_text(c.doc(), TEXT, &t).await;
                tokens.push(t);
                n += 1;
                sleep(Duration::from_millis(15)).await;
            }
            tokens
        }));
    }

    sleep(Duration::from_millis(500)).await;
    redis.kill().await;
    sleep(Duration::from_secs(1)).await;
    let redis = RedisProcess::start_on(redis_dir.path(), port).await;
    // Edits continue for a while after Redis is back.
    sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut tokens = BTreeSet::new();
    for w in writers {
        tokens.extend(w.await.unwrap());
    }

    for (i, c) in clients.iter().enumerate() {
        wait_for_tokens(c, &tokens, &format!("client {i} (node {})", i / 2), &all).await;
    }
    let expected = text(clients[0].doc(), TEXT);
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(text(c.doc(), TEXT), expected, "client {i} diverged");
    }
    drop(redis);
    eprintln!(
        "redis_restart_under_load_converges: {} tokens, {:?}",
        tokens.len(),
        started.elapsed()
    );
}

/// The cut lasts 10 s: twice the store's 5 s acquire timeout, so group commits fail and are
/// retried while the node keeps serving from memory.
const POSTGRES_CUT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_cut_for_a_while_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let db = TestDatabase::create().await;
    let proxy = TcpProxy::start(postgres_addr(db.url())).await;
    let node = TandemProcess::start(
        tandem_bin(),
        "node-pg",
        &["--database-url".into(), with_host(db.url(), proxy.addr())],
    )
    .await;
    let all = [&node];
    let room = unique_room("pg-cut");
    let a = join(&node.url(&room)).await;
    let b = join(&node.url(&room)).await;

    let mut tokens = BTreeSet::new();
    let mut n = 0;
    async fn edit(c: &Client, who: &str, n: &mut usize, tokens: &mut BTreeSet<String>) -> String {
        let t = token(who, *n);
        *n += 1;
        append_text(c.doc(), TEXT, &t).await;
        tokens.insert(t.clone());
        t
    }
    for _ in 0..5 {
        edit(&a, "a", &mut n, &mut tokens).await;
        edit(&b, "b", &mut n, &mut tokens).await;
    }
    a.wait_stored(WAIT).await.expect("stored before the cut");
    b.wait_stored(WAIT).await.expect("stored before the cut");
    assert_eq!(
        node.http_status("/readyz").await.unwrap(),
        200,
        "ready before the cut"
    );

    proxy.cut();
    let cut_at = Instant::now();
    let mut saw_not_ready = false;
    let mut cut_tokens = BTreeSet::new();
    while cut_at.elapsed() < POSTGRES_CUT {
        let ta = edit(&a, "a", &mut n, &mut tokens).await;
        let tb = edit(&b, "b", &mut n, &mut tokens).await;
        cut_tokens.insert(ta.clone());
        cut_tokens.insert(tb.clone());
        // Relayed between the clients although nothing can be stored.
        let relayed = a
            .wait_until(WAIT, |d| text(d, TEXT).contains(&tb))
            .await
            .and(b.wait_until(WAIT, |d| text(d, TEXT).contains(&ta)).await);
        if let Err(e) = relayed {
            panic!("edits not relayed during the cut: {e}\n{}", logs(&all));
        }
        if !saw_not_ready {
            saw_not_ready = node.http_status("/readyz").await.unwrap() == 503;
        }
        sleep(Duration::from_millis(100)).await;
    }
    // Nothing written during the cut can have been acknowledged.
    let during = cut_at.elapsed();
    match a.wait_stored(Duration::from_millis(500)).await {
        Err(ClientError::Timeout(_)) => {}
        other => panic!(
            "wait_stored during the cut ({during:?} in) should time out, got {other:?}\n{}",
            logs(&all)
        ),
    }
    assert!(
        saw_not_ready,
        "/readyz never reported 503 during the {POSTGRES_CUT:?} cut\n{}",
        logs(&all)
    );
    proxy.restore();
    let restored_at = Instant::now();

    // A few more edits after the cut, then every edit is acknowledged and stored.
    for _ in 0..3 {
        edit(&a, "a", &mut n, &mut tokens).await;
        edit(&b, "b", &mut n, &mut tokens).await;
    }
    for (name, c) in [("a", &a), ("b", &b)] {
        if let Err(e) = c.wait_stored(WAIT).await {
            panic!(
                "client {name}: not acknowledged after the cut ended: {e}\n{}",
                logs(&all)
            );
        }
    }
    let acked_after = restored_at.elapsed();
    let deadline = Instant::now() + WAIT;
    loop {
        match node.http_status("/readyz").await {
            Ok(200) => break,
            other => assert!(
                Instant::now() < deadline,
                "/readyz not ready after the cut: {other:?}\n{}",
                logs(&all)
            ),
        }
        sleep(Duration::from_millis(100)).await;
    }
    let stored = stored_text(db.url(), &room).await;
    let lost = missing(&stored, &tokens);
    assert!(
        lost.is_empty(),
        "acknowledged but not in Postgres: {lost:?} (edited during the cut: {})",
        cut_tokens.len()
    );
    for (name, c) in [("a", &a), ("b", &b)] {
        wait_for_tokens(c, &tokens, &format!("client {name}"), &all).await;
    }
    assert_eq!(text(a.doc(), TEXT), text(b.doc(), TEXT), "clients diverged");
    eprintln!(
        "postgres_cut_for_a_while_loses_nothing: {} tokens ({} during the cut), acknowledged {:?} \
         after the cut ended, {:?} in all",
        tokens.len(),
        cut_tokens.len(),
        acked_after,
        started.elapsed()
    );
}

/// The client's `wait_stored` must not report edits made after the connection ended as stored:
/// its contract is `Err(Closed)` when the connection ended first. Found by the SIGKILL test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_stored_after_the_connection_ended_is_an_error() {
    let _serial = SERIAL.lock().await;
    let db = TestDatabase::create().await;
    let mut node = TandemProcess::start(
        tandem_bin(),
        "node-ack",
        &["--database-url".into(), db.url().into()],
    )
    .await;
    let room = unique_room("ack-after-close");
    let c = join(&node.url(&room)).await;
    append_text(c.doc(), TEXT, "stored").await;
    c.wait_stored(WAIT)
        .await
        .expect("stored while the node is up");
    node.kill().await;
    c.wait_closed(WAIT)
        .await
        .expect("the connection ends with the node");
    append_text(c.doc(), TEXT, "never sent").await;
    let result = c.wait_stored(WAIT).await;
    assert!(
        matches!(result, Err(ClientError::Closed(_))),
        "an edit made after the connection ended reported as {result:?} ({c:?})"
    );
}
