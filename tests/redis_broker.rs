//! The Redis broker against real Redis: the shared server (`TANDEM_TEST_REDIS_URL`, default
//! `redis://127.0.0.1:6379`, started by `scripts/test.sh`), private `redis-server` processes
//! that the tests kill and restart, and a private three-master Redis Cluster for sharded pub/sub.
//!
//! Tests run in parallel on the shared server, so every test uses its own room names and
//! recognises its node-channel envelopes by a unique payload. "Nothing arrived" is checked
//! without sleeping: the publisher sends a marker after the envelope that must not arrive, and
//! Redis keeps one connection's order, so once the marker is read the envelope would have been.

use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[path = "common/procs.rs"]
mod procs;

use bytes::Bytes;
use procs::{free_port, RedisProcess};
use tandem::broker::redis::{connect, RedisBroker, RedisOptions};
use tandem::broker::{room_channel, Broker, BrokerError, Inbound, PublishError};
use tandem::ids::RoomId;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout, Instant};

/// How long any single wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(15);

fn shared_redis_url() -> String {
    std::env::var("TANDEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A name no other test (or earlier run) uses.
fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}-{:08x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    )
}

fn room(prefix: &str) -> RoomId {
    RoomId::new(&unique(prefix)).unwrap()
}

/// What a node's handler saw, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Room(String, Bytes),
    Node(Bytes),
    Gap,
}

/// An [`Inbound`] that forwards everything to the test. With a `hold` gate, room envelopes wait
/// while the gate is closed, blocking the reader as a slow handler would.
struct Recorder {
    tx: mpsc::UnboundedSender<Seen>,
    hold: Option<Arc<Gate>>,
}

/// A latch a blocked handler waits on.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    closed: bool,
    waiting: bool,
}

impl Gate {
    fn close(&self) {
        self.state.lock().unwrap().closed = true;
    }
    fn open(&self) {
        self.state.lock().unwrap().closed = false;
        self.changed.notify_all();
    }
    fn is_waiting(&self) -> bool {
        self.state.lock().unwrap().waiting
    }
    /// Blocks the calling thread while the gate is closed (bounded by `WAIT`).
    fn pass(&self) {
        let mut state = self.state.lock().unwrap();
        state.waiting = state.closed;
        let (mut state, _) = self
            .changed
            .wait_timeout_while(state, WAIT, |s| s.closed)
            .unwrap();
        state.waiting = false;
    }
}

impl Inbound for Recorder {
    fn envelope(&self, room: &RoomId, envelope: Bytes) {
        if let Some(gate) = &self.hold {
            gate.pass();
        }
        let _ = self.tx.send(Seen::Room(room.to_string(), envelope));
    }
    fn node_event(&self, envelope: Bytes) {
        let _ = self.tx.send(Seen::Node(envelope));
    }
    fn gap(&self) {
        let _ = self.tx.send(Seen::Gap);
    }
}

/// One "node": a broker and what its handler saw.
struct Node {
    broker: RedisBroker,
    seen: mpsc::UnboundedReceiver<Seen>,
}

impl Node {
    async fn start(opts: RedisOptions) -> Self {
        Self::start_holding(opts, None).await
    }

    async fn start_holding(opts: RedisOptions, hold: Option<Arc<Gate>>) -> Self {
        let url = opts.url.clone();
        let (tx, seen) = mpsc::unbounded_channel();
        let broker = match timeout(WAIT, connect(opts, Arc::new(Recorder { tx, hold }))).await {
            Ok(Ok(broker)) => broker,
            Ok(Err(e)) => panic!(
                "cannot reach Redis at {url}: {e}. Start one (scripts/test.sh does: \
                 redis-server --port 6379 --save '' --appendonly no) or point \
                 TANDEM_TEST_REDIS_URL at one"
            ),
            Err(_) => panic!("connecting to Redis at {url} took longer than {WAIT:?}"),
        };
        Self { broker, seen }
    }

    /// Waits for the first event matching `want`, skipping others (e.g. other tests' traffic
    /// on the node channel); returns the events skipped before it.
    async fn expect(&mut self, what: &str, want: impl Fn(&Seen) -> bool) -> Vec<Seen> {
        let mut skipped = Vec::new();
        let deadline = Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.seen.recv()).await {
                Ok(Some(seen)) if want(&seen) => return skipped,
                Ok(Some(seen)) => skipped.push(seen),
                Ok(None) => panic!("the handler is gone while waiting for {what}"),
                Err(_) => panic!("timed out waiting for {what}; saw {skipped:?}"),
            }
        }
    }

    /// Waits until every event in `want` was seen, in any order; returns the others.
    async fn expect_all(&mut self, mut want: Vec<Seen>) -> Vec<Seen> {
        let mut others = Vec::new();
        let deadline = Instant::now() + WAIT;
        while !want.is_empty() {
            match tokio::time::timeout_at(deadline, self.seen.recv()).await {
                Ok(Some(seen)) => match want.iter().position(|w| *w == seen) {
                    Some(i) => {
                        want.swap_remove(i);
                    }
                    None => others.push(seen),
                },
                Ok(None) => panic!("the handler is gone while waiting for {want:?}"),
                Err(_) => panic!("timed out waiting for {want:?}; saw {others:?}"),
            }
        }
        others
    }

    /// Publishes `{prefix} {k}` into `room` from `from` every half second until this node's
    /// handler gets one of them; returns the events skipped before it. Resending copes with a
    /// tiny inbound buffer that other tests' node-channel traffic may overflow.
    async fn probe(&mut self, from: &RedisBroker, room: &RoomId, prefix: &str) -> Vec<Seen> {
        let mut skipped = Vec::new();
        let deadline = Instant::now() + WAIT;
        let want_room = room.to_string();
        let want_prefix = format!("{prefix} ");
        for k in 0.. {
            assert!(
                Instant::now() < deadline,
                "no probe {prefix:?} arrived; saw {skipped:?}"
            );
            from.publish(room, bytes(&format!("{prefix} {k}"))).unwrap();
            let resend = (Instant::now() + Duration::from_millis(500)).min(deadline);
            loop {
                match tokio::time::timeout_at(resend, self.seen.recv()).await {
                    Ok(Some(Seen::Room(name, payload)))
                        if name == want_room && payload.starts_with(want_prefix.as_bytes()) =>
                    {
                        return skipped;
                    }
                    Ok(Some(seen)) => skipped.push(seen),
                    Ok(None) => panic!("the handler is gone while probing with {prefix:?}"),
                    Err(_) => break,
                }
            }
        }
        unreachable!("the probe loop only ends by returning or failing")
    }

    async fn expect_room(&mut self, room: &RoomId, payload: &[u8]) -> Vec<Seen> {
        let want = Seen::Room(room.to_string(), Bytes::copy_from_slice(payload));
        self.expect(&format!("{want:?}"), |s| *s == want).await
    }

    async fn expect_node(&mut self, payload: &[u8]) -> Vec<Seen> {
        let want = Seen::Node(Bytes::copy_from_slice(payload));
        self.expect(&format!("{want:?}"), |s| *s == want).await
    }

    async fn expect_gap(&mut self) -> Vec<Seen> {
        self.expect("a gap", |s| *s == Seen::Gap).await
    }
}

fn bytes(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

#[tokio::test]
async fn two_nodes_exchange_room_and_node_envelopes() {
    let url = shared_redis_url();
    let mut a = Node::start(RedisOptions::new(&url)).await;
    let mut b = Node::start(RedisOptions::new(&url)).await;
    let r = room("exchange");
    a.broker.subscribe(&r).await.unwrap();
    b.broker.subscribe(&r).await.unwrap();
    a.broker.ping().await.unwrap();

    a.broker.publish(&r, bytes("update from a")).unwrap();
    b.expect_room(&r, b"update from a").await;
    // Redis hands a subscriber its own publishes; the hub filters them by origin.
    a.expect_room(&r, b"update from a").await;

    let heartbeat = unique("heartbeat-b");
    b.broker.publish_node(bytes(&heartbeat)).unwrap();
    a.expect_node(heartbeat.as_bytes()).await;

    b.broker.publish(&r, bytes("update from b")).unwrap();
    a.expect_room(&r, b"update from b").await;

    let (sa, sb) = (a.broker.stats(), b.broker.stats());
    assert!(
        sa.published() >= 1 && sb.published() >= 2,
        "published counts"
    );
    assert!(sa.received() >= 3 && sb.received() >= 1, "received counts");
    assert_eq!((sa.dropped(), sa.gaps(), sa.reconnects()), (0, 0, 0));

    a.broker.close().await;
    assert_eq!(
        a.broker.publish(&r, bytes("late")),
        Err(PublishError::Closed)
    );
    assert!(a.broker.ping().await.is_err());
    a.broker.close().await; // idempotent
    b.broker.close().await;
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let url = shared_redis_url();
    let a = Node::start(RedisOptions::new(&url)).await;
    let mut b = Node::start(RedisOptions::new(&url)).await;
    let (r, other) = (room("unsub"), room("unsub-other"));
    b.broker.subscribe(&r).await.unwrap();
    b.broker.subscribe(&other).await.unwrap();
    a.broker.publish(&r, bytes("before")).unwrap();
    b.expect_room(&r, b"before").await;

    b.broker.unsubscribe(&r).await.unwrap();
    b.broker.unsubscribe(&r).await.unwrap(); // idempotent
    a.broker.publish(&r, bytes("after")).unwrap();
    let marker = unique("marker");
    a.broker.publish_node(bytes(&marker)).unwrap();
    let skipped = b.expect_node(marker.as_bytes()).await;
    assert!(
        !skipped.iter().any(|s| matches!(s, Seen::Room(..))),
        "nothing for an unsubscribed room: {skipped:?}"
    );

    // The other subscription is untouched, and subscribing again resumes delivery.
    a.broker.publish(&other, bytes("still here")).unwrap();
    b.expect_room(&other, b"still here").await;
    b.broker.subscribe(&r).await.unwrap();
    a.broker.publish(&r, bytes("again")).unwrap();
    b.expect_room(&r, b"again").await;
}

#[tokio::test]
async fn subscribe_is_idempotent() {
    let url = shared_redis_url();
    let a = Node::start(RedisOptions::new(&url)).await;
    let mut b = Node::start(RedisOptions::new(&url)).await;
    let r = room("idem");
    for _ in 0..3 {
        b.broker.subscribe(&r).await.unwrap();
    }
    a.broker.publish(&r, bytes("once")).unwrap();
    let marker = unique("marker");
    a.broker.publish_node(bytes(&marker)).unwrap();
    b.expect_room(&r, b"once").await;
    let skipped = b.expect_node(marker.as_bytes()).await;
    assert!(
        !skipped.iter().any(|s| matches!(s, Seen::Room(..))),
        "delivered once, not once per subscribe: {skipped:?}"
    );
    // One unsubscribe undoes any number of subscribes.
    b.broker.unsubscribe(&r).await.unwrap();
    a.broker.publish(&r, bytes("gone")).unwrap();
    let marker = unique("marker");
    a.broker.publish_node(bytes(&marker)).unwrap();
    let skipped = b.expect_node(marker.as_bytes()).await;
    assert!(
        !skipped.iter().any(|s| matches!(s, Seen::Room(..))),
        "{skipped:?}"
    );
}

#[tokio::test]
async fn a_subscription_is_in_effect_when_subscribe_returns() {
    // fred completes SUBSCRIBE and UNSUBSCRIBE once written, not once Redis has applied them.
    // A stopped server makes the difference visible: a call that returned while Redis was not
    // running would race the other node's publish once Redis resumes.
    let dir = tempfile::tempdir().unwrap();
    let server = RedisProcess::start_anywhere(dir.path()).await;
    let a = Node::start(RedisOptions::new(server.url())).await;
    let mut b = Node::start(RedisOptions::new(server.url())).await;
    for round in 0..5 {
        let r = room("in-effect");
        let hello = format!("hello {round}");
        server.signal("-STOP");
        {
            let subscribing = b.broker.subscribe(&r);
            tokio::pin!(subscribing);
            if let Ok(result) = timeout(Duration::from_millis(100), &mut subscribing).await {
                result.unwrap();
                panic!("round {round}: subscribe returned before Redis applied it");
            }
            server.signal("-CONT");
            subscribing.await.unwrap();
        }
        a.broker.publish(&r, bytes(&hello)).unwrap();
        b.expect_room(&r, hello.as_bytes()).await;

        server.signal("-STOP");
        {
            let unsubscribing = b.broker.unsubscribe(&r);
            tokio::pin!(unsubscribing);
            if let Ok(result) = timeout(Duration::from_millis(100), &mut unsubscribing).await {
                result.unwrap();
                panic!("round {round}: unsubscribe returned before Redis applied it");
            }
            server.signal("-CONT");
            unsubscribing.await.unwrap();
        }
        a.broker.publish(&r, bytes("unheard")).unwrap();
        let marker = unique("marker");
        a.broker.publish_node(bytes(&marker)).unwrap();
        let skipped = b.expect_node(marker.as_bytes()).await;
        assert!(
            !skipped.iter().any(|s| matches!(s, Seen::Room(..))),
            "round {round}: {skipped:?}"
        );
    }
}

#[tokio::test]
async fn bad_urls_and_dead_servers_fail_to_connect() {
    let (tx, _rx) = mpsc::unbounded_channel();
    let inbound = Arc::new(Recorder { tx, hold: None });
    let err = connect(RedisOptions::new("http://127.0.0.1:6379"), inbound.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, BrokerError::Config(_)), "{err}");

    let port = free_port();
    let err = timeout(
        WAIT,
        connect(
            RedisOptions::new(format!("redis://127.0.0.1:{port}")),
            inbound,
        ),
    )
    .await
    .expect("a refused connection fails fast")
    .unwrap_err();
    assert!(matches!(err, BrokerError::Unavailable(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flooded_reader_reports_a_gap_and_keeps_reading() {
    let url = shared_redis_url();
    let gate = Arc::new(Gate::default());
    let a = Node::start(RedisOptions::new(&url)).await;
    let mut slow = Node::start_holding(
        RedisOptions {
            inbound_capacity: 4,
            ..RedisOptions::new(&url)
        },
        Some(gate.clone()),
    )
    .await;
    // A third node sees everything promptly: once it has the marker, so has Redis written it
    // to the slow node's socket.
    let mut witness = Node::start(RedisOptions::new(&url)).await;
    let r = room("flood");
    slow.broker.subscribe(&r).await.unwrap();
    witness.broker.subscribe(&r).await.unwrap();

    // The slow handler sits on one envelope while far more than its buffer arrives. Whether
    // fred has read the flood off the socket before the gate opens is up to the scheduler, so
    // the round is repeated until the loss happens (it does on the first round in practice).
    let mut lagged = false;
    for round in 0..10 {
        gate.close();
        // Any room envelope stops the handler at the gate. On a busy machine the tiny buffer can
        // overflow with other tests' node-channel traffic before the reader runs, losing the
        // blocking envelope itself, so it is sent again until one arrives.
        let until = Instant::now() + WAIT;
        let mut attempt = 0;
        while !gate.is_waiting() {
            assert!(
                Instant::now() < until,
                "the slow handler never got an envelope of round {round} ({} received)",
                slow.broker.stats().received(),
            );
            a.broker
                .publish(&r, bytes(&format!("block {round} {attempt}")))
                .unwrap();
            attempt += 1;
            let resend = Instant::now() + Duration::from_millis(500);
            while !gate.is_waiting() && Instant::now() < resend {
                sleep(Duration::from_millis(5)).await;
            }
        }
        for i in 0..200 {
            a.broker
                .publish(&r, bytes(&format!("flood {round} {i}")))
                .unwrap();
        }
        let marker = format!("marker {round}");
        a.broker.publish(&r, bytes(&marker)).unwrap();
        witness.expect_room(&r, marker.as_bytes()).await;
        sleep(Duration::from_millis(50)).await;
        gate.open();
        // The reader goes on after the loss: envelopes published now arrive.
        let skipped = slow.probe(&a.broker, &r, &format!("after {round}")).await;
        if skipped.contains(&Seen::Gap) {
            lagged = true;
            let prefix = format!("flood {round} ");
            let floods = skipped
                .iter()
                .filter(|s| matches!(s, Seen::Room(_, p) if p.starts_with(prefix.as_bytes())))
                .count();
            assert!(
                floods < 200,
                "a gap means something was lost: {floods} delivered"
            );
            break;
        }
    }
    assert!(lagged, "the slow reader never fell behind");
    assert!(slow.broker.stats().gaps() >= 1);
    // Still reading after the gap.
    slow.probe(&a.broker, &r, "afterwards").await;
}

/// Waits until both of the broker's connections are up again.
async fn wait_until_up(broker: &RedisBroker) {
    let deadline = Instant::now() + WAIT;
    while let Err(e) = broker.ping().await {
        assert!(Instant::now() < deadline, "the broker never came back: {e}");
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_restarted_redis_reports_a_gap_and_delivery_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = RedisProcess::start_anywhere(dir.path()).await;
    let port = server.port();
    let mut a = Node::start(RedisOptions::new(server.url())).await;
    let mut b = Node::start(RedisOptions::new(server.url())).await;
    let r = room("restart");
    b.broker.subscribe(&r).await.unwrap();
    a.broker.publish(&r, bytes("before")).unwrap();
    b.expect_room(&r, b"before").await;

    server.kill().await;
    let deadline = Instant::now() + WAIT;
    while a.broker.ping().await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "ping still succeeds with Redis dead"
        );
        sleep(Duration::from_millis(20)).await;
    }
    // Publishing never blocks while Redis is down: what cannot be sent is dropped and counted.
    a.broker.publish(&r, bytes("lost")).unwrap();
    let deadline = Instant::now() + WAIT;
    while a.broker.stats().dropped() == 0 {
        assert!(
            Instant::now() < deadline,
            "the publish was neither sent nor dropped"
        );
        sleep(Duration::from_millis(20)).await;
    }
    // A subscription made while Redis is down takes effect after the reconnect.
    let later = room("restart-later");
    let _ = b.broker.subscribe(&later).await;

    let _server = RedisProcess::start_on(dir.path(), port).await;
    // The subscriber reports the gap once its subscriptions are back; the publisher once it is
    // connected again after dropping.
    b.expect_gap().await;
    a.expect_gap().await;
    wait_until_up(&a.broker).await;
    wait_until_up(&b.broker).await;
    a.broker.publish(&r, bytes("after")).unwrap();
    a.broker.publish(&later, bytes("later")).unwrap();
    b.expect_room(&r, b"after").await;
    b.expect_room(&later, b"later").await;
    assert!(b.broker.stats().reconnects() >= 1);
    assert!(a.broker.stats().reconnects() >= 1);
    a.broker.close().await;
    b.broker.close().await;
}

#[tokio::test]
async fn a_stalled_redis_fills_the_queue_and_publish_refuses_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let server = RedisProcess::start_anywhere(dir.path()).await;
    let a = Node::start(RedisOptions {
        queue_capacity: 4,
        ..RedisOptions::new(server.url())
    })
    .await;
    let r = room("stall");
    server.signal("-STOP");
    // The publisher takes at most one batch and then waits on the stalled server, so the
    // queue of four fills long before 1000 publishes; each call returns at once.
    let mut full = 0;
    for i in 0..1000 {
        match a.broker.publish(&r, bytes(&format!("{i}"))) {
            Ok(()) => {}
            Err(PublishError::Full) => full += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    server.signal("-CONT");
    assert!(full > 0, "a full queue refuses");
    assert_eq!(a.broker.stats().queue_full(), full);
    a.broker.ping().await.unwrap();
}

/// Three masters of a private Redis Cluster, killed when dropped.
struct Cluster {
    nodes: Vec<RedisProcess>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let node = RedisProcess::start_anywhere_with(dir.path(), |port| {
                let conf = dir.path().join(format!("nodes-{port}.conf"));
                vec![
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    conf.to_str().unwrap().into(),
                ]
            })
            .await;
            nodes.push(node);
        }
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port()));
        }
        create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = timeout(WAIT, create.output())
            .await
            .expect("redis-cli --cluster create took too long")
            .expect("cannot run redis-cli: install redis-tools (scripts/test.sh does)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Self { nodes, _dir: dir };
        let deadline = Instant::now() + WAIT;
        for n in &cluster.nodes {
            while !cli(n.port(), &["cluster", "info"])
                .await
                .contains("cluster_state:ok")
            {
                assert!(
                    Instant::now() < deadline,
                    "the cluster never reached state ok"
                );
                sleep(Duration::from_millis(50)).await;
            }
        }
        cluster
    }

    fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.nodes[0].port());
        for (i, n) in self.nodes[1..].iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{}", n.port()));
        }
        url
    }

    /// Each master's port and the slot ranges it serves (from CLUSTER NODES).
    async fn masters(&self) -> Vec<(u16, Vec<(u16, u16)>)> {
        let text = cli(self.nodes[0].port(), &["cluster", "nodes"]).await;
        let mut masters = Vec::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") {
                continue;
            }
            let port = fields[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .expect("a node address");
            let ranges = fields[8..]
                .iter()
                .filter_map(|r| {
                    let (lo, hi) = r.split_once('-').unwrap_or((r, r));
                    Some((lo.parse().ok()?, hi.parse().ok()?))
                })
                .collect();
            masters.push((port, ranges));
        }
        masters
    }
}

/// A room whose channel's hash slot is in `ranges`.
fn room_on(ranges: &[(u16, u16)], prefix: &str) -> RoomId {
    (0..)
        .map(|i| RoomId::new(&format!("{prefix}-{i}")).unwrap())
        .find(|r| {
            let slot = fred::util::redis_keyslot(room_channel(r).as_bytes());
            ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&slot))
        })
        .unwrap()
}

async fn cli(port: u16, args: &[&str]) -> String {
    let out = timeout(
        WAIT,
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("redis-cli took too long")
    .expect("cannot run redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn sharded_brokers_exchange_envelopes_across_cluster_masters() {
    let cluster = Cluster::start().await;
    let masters = cluster.masters().await;
    assert_eq!(masters.len(), 3, "three masters: {masters:?}");
    // One room per master: its channel's hash tag lands in that master's slots.
    let rooms: Vec<RoomId> = masters
        .iter()
        .map(|(port, ranges)| room_on(ranges, &format!("shard-{port}")))
        .collect();

    let opts = RedisOptions {
        sharded: true,
        ..RedisOptions::new(cluster.url())
    };
    let mut a = Node::start(opts.clone()).await;
    let mut b = Node::start(opts).await;
    for r in &rooms {
        a.broker.subscribe(r).await.unwrap();
        b.broker.subscribe(r).await.unwrap();
    }
    a.broker.ping().await.unwrap();
    for r in &rooms {
        a.broker
            .publish(r, bytes(&format!("from a to {r}")))
            .unwrap();
        b.broker
            .publish(r, bytes(&format!("from b to {r}")))
            .unwrap();
    }
    // Shards are separate connections: no order across rooms, so wait for the set.
    let sent_by = |who: &str| -> Vec<Seen> {
        rooms
            .iter()
            .map(|r| Seen::Room(r.to_string(), bytes(&format!("from {who} to {r}"))))
            .collect()
    };
    b.expect_all(sent_by("a")).await;
    a.expect_all(sent_by("b")).await;
    // Sharded channels really are in use: each master knows its room's channel.
    for ((port, _), r) in masters.iter().zip(&rooms) {
        let channels = cli(*port, &["pubsub", "shardchannels"]).await;
        assert!(
            channels.lines().any(|c| c == room_channel(r)),
            "{r} is a sharded channel on its master {port}: {channels:?}"
        );
    }
    // The node channel reaches every node of the cluster.
    b.broker.publish_node(bytes("heartbeat b")).unwrap();
    a.expect_node(b"heartbeat b").await;

    // The marker goes to another room of the same master: one connection each way, in order.
    let marker_room = room_on(&masters[0].1, "marker");
    b.broker.subscribe(&marker_room).await.unwrap();
    b.broker.unsubscribe(&rooms[0]).await.unwrap();
    a.broker.publish(&rooms[0], bytes("unheard")).unwrap();
    a.broker.publish(&marker_room, bytes("marker")).unwrap();
    let skipped = b.expect_room(&marker_room, b"marker").await;
    assert!(
        !skipped.contains(&Seen::Room(rooms[0].to_string(), bytes("unheard"))),
        "{skipped:?}"
    );
    assert_eq!(a.broker.stats().dropped(), 0);
    a.broker.close().await;
    b.broker.close().await;
    drop(cluster);
}
