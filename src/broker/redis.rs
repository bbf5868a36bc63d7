//! The Redis broker: room and node channels over Redis pub/sub, or sharded pub/sub
//! (SSUBSCRIBE/SPUBLISH) on a Redis Cluster, with the `fred` client.
//!
//! Two connections per node, because a subscribed connection can run no other command:
//! - a **publisher** ([`Client`]) fed by a bounded queue: [`Broker::publish`] never waits for Redis;
//!   a task drains the queue and sends each batch as one pipeline of PUBLISH/SPUBLISH;
//! - a **subscriber** ([`SubscriberClient`]) whose messages a reader task hands to [`Inbound`].
//!
//! Delivery is at most once, as the [`Broker`] contract says, and every possible loss ends in
//! [`Inbound::gap`]:
//! - the subscriber reconnected (Redis restarted, the network broke): the subscriptions are made
//!   again on the new connection, *then* the gap is reported, so the resync's answers are heard;
//! - the reader fell behind fred's message buffer ([`RedisOptions::inbound_capacity`]);
//! - the publisher dropped envelopes it could not send (Redis down, a command timed out): reported
//!   once the publisher is connected again (on its reconnect, or after its next successful batch).
//!
//! When [`Broker::subscribe`] or [`Broker::unsubscribe`] returns, Redis has applied it (fred
//! completes SUBSCRIBE/UNSUBSCRIBE once written, so the broker follows them with a PING on the
//! same connection and waits for its answer).
//!
//! Redis delivers a node's own publishes back to it when it is subscribed to the channel; this
//! broker does not filter them (the hub drops envelopes whose origin is its own node).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fred::bytes_utils::Str;
use fred::clients::{Client, SubscriberClient};
use fred::error::Error as FredError;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use fred::socket2::TcpKeepalive;
use fred::types::config::{
    Config, ConnectionConfig, Options, PerformanceConfig, ReconnectPolicy, TcpConfig,
};
use fred::types::{Builder, ClientState, ClusterHash, Key, Message, Value};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{channel_room, room_channel, Broker, BrokerError, Inbound, PublishError, NODE_CHANNEL};
use crate::ids::RoomId;
use crate::metrics::METRICS;

/// Default for [`RedisOptions::queue_capacity`]: envelopes waiting for the publisher task.
pub const DEFAULT_QUEUE_CAPACITY: usize = 8192;
/// Default for [`RedisOptions::inbound_capacity`]: messages fred buffers for the reader task.
pub const DEFAULT_INBOUND_CAPACITY: usize = 4096;
/// Events (reconnects, errors) fred buffers for the publisher connection's watcher.
const PUBLISHER_EVENTS: usize = 64;
/// Most envelopes sent in one pipeline.
pub const PUBLISH_BATCH: usize = 256;
/// Most channels named in one SUBSCRIBE when subscriptions are made again after a reconnect.
const RESUBSCRIBE_CHUNK: usize = 512;
/// Time allowed to open a TCP connection (and run AUTH, HELLO, CLUSTER SLOTS on it).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed for one command (a publish pipeline, PING, SUBSCRIBE) before it counts as failed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// First delay before reconnecting; it doubles after every failed attempt ...
pub const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(100);
/// ... up to this delay. Attempts are unlimited.
pub const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(5);
/// Random delay added to each reconnect delay, so that nodes do not reconnect in lockstep.
pub const RECONNECT_JITTER: Duration = Duration::from_millis(50);
/// How long [`Broker::close`] waits for the queue to drain and for each client to quit.
pub const CLOSE_DEADLINE: Duration = Duration::from_secs(2);
/// Pause between attempts to restore subscriptions after a reconnect when SUBSCRIBE fails.
const RESUBSCRIBE_RETRY: Duration = Duration::from_millis(500);
/// TCP keepalive: a silently dead peer (a subscriber only reads) is noticed within about
/// `KEEPALIVE_IDLE + 3 * KEEPALIVE_INTERVAL`.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Commands waiting in each fred client's router before it answers "backpressure".
const COMMAND_BUFFER: usize = 4096;
/// Times fred writes a command whose connection broke before the answer: a publish in flight
/// during a reconnect may reach Redis twice (harmless: CRDT updates are idempotent).
const COMMAND_ATTEMPTS: u32 = 3;

/// How to reach Redis. `Debug` hides the URL's password.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// Where Redis is:
    /// - `redis://[[user:]password@]host[:port][/db]`: a single server;
    /// - `redis-cluster://[[user:]password@]host:port[?node=host:port&node=…]`: a Redis Cluster;
    ///   one reachable node is enough, the others are discovered (CLUSTER SLOTS). Extra `node`
    ///   parameters are seeds used when the first one is down.
    ///
    /// `valkey://` and `valkey-cluster://` are accepted as aliases. TLS (`rediss://`) is not built
    /// in.
    pub url: String,
    /// Room channels use sharded pub/sub (SSUBSCRIBE/SPUBLISH, Redis 7+), so that on a cluster a
    /// room's traffic stays on the shard that owns its hash tag instead of crossing every node.
    /// The node channel always uses classic pub/sub (every node must hear it).
    pub sharded: bool,
    /// Envelopes queued for the publisher task; when full, publishing fails with
    /// [`PublishError::Full`]. Default [`DEFAULT_QUEUE_CAPACITY`].
    pub queue_capacity: usize,
    /// Messages fred buffers between the subscriber connection and the reader task; a reader
    /// further behind loses the oldest and reports a gap. Default [`DEFAULT_INBOUND_CAPACITY`].
    pub inbound_capacity: usize,
}

impl RedisOptions {
    /// Options for `url` with the defaults: classic pub/sub, default queue sizes.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            sharded: false,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            inbound_capacity: DEFAULT_INBOUND_CAPACITY,
        }
    }
}

impl std::fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOptions")
            .field("url", &redact(&self.url))
            .field("sharded", &self.sharded)
            .field("queue_capacity", &self.queue_capacity)
            .field("inbound_capacity", &self.inbound_capacity)
            .finish()
    }
}

/// `url` without the credentials between `://` and `@`.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}***{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Counters of one [`RedisBroker`]. All only grow. Each is also added to the process-wide
/// `tandem_redis_*_total` counters of [`METRICS`], which `/metrics` exports.
#[derive(Debug, Default)]
pub struct RedisStats {
    published: AtomicU64,
    dropped: AtomicU64,
    queue_full: AtomicU64,
    received: AtomicU64,
    gaps: AtomicU64,
    reconnects: AtomicU64,
}

impl RedisStats {
    /// Envelopes Redis accepted (PUBLISH/SPUBLISH answered).
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }
    /// Envelopes the publisher task could not send (Redis down, command failed or timed out).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
    /// Publishes refused with [`PublishError::Full`].
    pub fn queue_full(&self) -> u64 {
        self.queue_full.load(Ordering::Relaxed)
    }
    /// Messages read from the subscriber connection.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
    /// Times [`Inbound::gap`] was called.
    pub fn gaps(&self) -> u64 {
        self.gaps.load(Ordering::Relaxed)
    }
    /// Reconnections of either connection (after the first connect).
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

/// One envelope waiting for the publisher task.
struct Outgoing {
    channel: Str,
    /// SPUBLISH rather than PUBLISH.
    sharded: bool,
    payload: Bytes,
}

/// What the tasks share with the broker.
struct Shared {
    inbound: Arc<dyn Inbound>,
    stats: Arc<RedisStats>,
    /// Set when the publisher dropped envelopes and the loss was not yet reported as a gap.
    publish_lost: AtomicBool,
}

impl Shared {
    fn report_gap(&self, why: &str) {
        info!(why, "redis broker: envelopes may have been lost, resyncing");
        self.stats.gaps.fetch_add(1, Ordering::Relaxed);
        METRICS.redis_gaps.inc();
        self.inbound.gap();
    }

    /// Hands one pub/sub message to the handler.
    fn deliver(&self, message: Message) {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        METRICS.redis_received.inc();
        let payload = message.value.into_bytes().unwrap_or_default();
        if &*message.channel == NODE_CHANNEL {
            self.inbound.node_event(payload);
        } else if let Some(room) = channel_room(&message.channel) {
            self.inbound.envelope(&room, payload);
        } else {
            debug!(channel = %message.channel, "redis broker: ignoring a message on a foreign channel");
        }
    }
}

/// A [`Broker`] on Redis. See the module documentation for its connections and gap reporting.
///
/// A node subscribed to a room hears its own publishes on that room (Redis does not filter them):
/// handlers must drop envelopes whose origin is their own node.
pub struct RedisBroker {
    /// Room channels use SSUBSCRIBE/SPUBLISH.
    sharded: bool,
    publisher: Client,
    subscriber: SubscriberClient,
    /// The publisher task's queue; the task drains what is left when the broker closes.
    outgoing: mpsc::Sender<Outgoing>,
    /// Room channels this node wants; the source of truth when subscriptions are made again
    /// after a reconnect (fred's own tracking forgets a channel whose SUBSCRIBE failed).
    rooms: Arc<Mutex<BTreeSet<Str>>>,
    shared: Arc<Shared>,
    /// Stops the tasks; cancelled by `close` or drop.
    cancel: CancellationToken,
    closed: AtomicBool,
    /// The publisher task first (it drains the queue), then the reader and the watcher.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("sharded", &self.sharded)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Connects to Redis (failing fast if it cannot be reached now), subscribes to
/// [`NODE_CHANNEL`] and starts the publisher, reader and connection-watcher tasks. Later
/// disconnections are retried forever (see [`RECONNECT_MIN_DELAY`]).
pub async fn connect(
    opts: RedisOptions,
    inbound: Arc<dyn Inbound>,
) -> Result<RedisBroker, BrokerError> {
    if opts.queue_capacity == 0 || opts.inbound_capacity == 0 {
        return Err(BrokerError::Config(
            "redis queue capacities must be at least 1".into(),
        ));
    }
    let config = client_config(&opts.url)?;
    // fred sizes all of a client's event channels (messages, reconnects, errors) alike and
    // allocates them up front: only the subscriber needs room for a burst of messages.
    let performance = |event_capacity| PerformanceConfig {
        default_command_timeout: COMMAND_TIMEOUT,
        broadcast_channel_capacity: event_capacity,
        ..PerformanceConfig::default()
    };
    let mut builder = Builder::from_config(config);
    builder
        .set_policy(reconnect_policy())
        .set_connection_config(connection_config())
        .set_performance_config(performance(PUBLISHER_EVENTS));
    let publisher = builder.build().map_err(config_error)?;
    builder.set_performance_config(performance(opts.inbound_capacity));
    let subscriber = builder.build_subscriber_client().map_err(config_error)?;

    publisher.init().await.map_err(unavailable)?;
    if let Err(e) = subscriber.init().await {
        let _ = tokio::time::timeout(CLOSE_DEADLINE, publisher.quit()).await;
        return Err(unavailable(e));
    }
    // Taken after `init`, so the first connection's events are not mistaken for reconnects.
    let messages = subscriber.message_rx();
    let sub_events = subscriber.reconnect_rx();
    let pub_events = publisher.reconnect_rx();
    let subscribed = match subscriber.subscribe(NODE_CHANNEL).await {
        Ok(()) => applied(&subscriber, None).await,
        Err(e) => Err(e),
    };
    if let Err(e) = subscribed {
        let _ = tokio::time::timeout(CLOSE_DEADLINE, subscriber.quit()).await;
        let _ = tokio::time::timeout(CLOSE_DEADLINE, publisher.quit()).await;
        return Err(unavailable(e));
    }

    let shared = Arc::new(Shared {
        inbound,
        stats: Arc::new(RedisStats::default()),
        publish_lost: AtomicBool::new(false),
    });
    let rooms = Arc::new(Mutex::new(BTreeSet::new()));
    let cancel = CancellationToken::new();
    let (outgoing, queue) = mpsc::channel(opts.queue_capacity);
    let tasks = vec![
        tokio::spawn(run_publisher(
            queue,
            publisher.clone(),
            shared.clone(),
            cancel.clone(),
        )),
        tokio::spawn(read_messages(messages, shared.clone(), cancel.clone())),
        tokio::spawn(
            Watcher {
                subscriber: subscriber.clone(),
                rooms: rooms.clone(),
                sharded: opts.sharded,
                shared: shared.clone(),
                cancel: cancel.clone(),
            }
            .run(sub_events, pub_events),
        ),
    ];
    info!(
        sharded = opts.sharded,
        clustered = publisher.is_clustered(),
        "redis broker connected"
    );
    Ok(RedisBroker {
        sharded: opts.sharded,
        publisher,
        subscriber,
        outgoing,
        rooms,
        shared,
        cancel,
        closed: AtomicBool::new(false),
        tasks: Mutex::new(tasks),
    })
}

impl RedisBroker {
    /// This broker's counters (shared: they keep counting after this call).
    pub fn stats(&self) -> Arc<RedisStats> {
        self.shared.stats.clone()
    }

    fn enqueue(&self, outgoing: Outgoing) -> Result<(), PublishError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PublishError::Closed);
        }
        match self.outgoing.try_send(outgoing) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.shared.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                METRICS.redis_queue_full.inc();
                Err(PublishError::Full)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(PublishError::Closed),
        }
    }

    /// SSUBSCRIBE is the one subscription command fred waits on Redis for; the others need
    /// [`applied`].
    async fn send_subscribe(&self, channel: Str) -> Result<(), FredError> {
        if self.sharded {
            self.subscriber.ssubscribe(channel).await
        } else {
            self.subscriber.subscribe(channel).await?;
            applied(&self.subscriber, None).await
        }
    }

    async fn send_unsubscribe(&self, channel: Str) -> Result<(), FredError> {
        if self.sharded {
            self.subscriber.sunsubscribe(channel.clone()).await?;
            applied(&self.subscriber, Some(&channel)).await
        } else {
            self.subscriber.unsubscribe(channel).await?;
            applied(&self.subscriber, None).await
        }
    }

    /// Whether the subscriber is between connections, waiting to reconnect. A channel added to
    /// or removed from `rooms` before this returned `true` is picked up by the resubscription
    /// that follows the reconnect (the reconnect event comes after the state leaves
    /// `Disconnected`).
    fn subscriber_down(&self) -> bool {
        self.subscriber.state() == ClientState::Disconnected
    }
}

#[async_trait]
impl Broker for RedisBroker {
    /// Subscribes to the room's channel. The wish is remembered even when this fails: the
    /// subscription is made again after every reconnect, followed by [`Inbound::gap`]. So an
    /// `Unavailable` error while Redis is down means "delivery starts after the reconnect".
    async fn subscribe(&self, room: &RoomId) -> Result<(), BrokerError> {
        let channel = Str::from(room_channel(room));
        lock(&self.rooms).insert(channel.clone());
        if self.closed.load(Ordering::Acquire) {
            return Err(BrokerError::Unavailable("redis broker closed".into()));
        }
        if self.subscriber_down() {
            return Err(BrokerError::Unavailable(
                "redis subscriber disconnected; subscribing after the reconnect".into(),
            ));
        }
        self.send_subscribe(channel).await.map_err(unavailable)
    }

    async fn unsubscribe(&self, room: &RoomId) -> Result<(), BrokerError> {
        let channel = Str::from(room_channel(room));
        if !lock(&self.rooms).remove(&channel) {
            return Ok(());
        }
        if self.closed.load(Ordering::Acquire) || self.subscriber_down() {
            return Ok(()); // The next connection will not subscribe to it.
        }
        self.send_unsubscribe(channel).await.map_err(unavailable)
    }

    fn publish(&self, room: &RoomId, envelope: Bytes) -> Result<(), PublishError> {
        self.enqueue(Outgoing {
            channel: room_channel(room).into(),
            sharded: self.sharded,
            payload: envelope,
        })
    }

    fn publish_node(&self, envelope: Bytes) -> Result<(), PublishError> {
        self.enqueue(Outgoing {
            channel: Str::from_static(NODE_CHANNEL),
            sharded: false,
            payload: envelope,
        })
    }

    /// PING on the publisher connection, and the subscriber connection must be up.
    async fn ping(&self) -> Result<(), BrokerError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(BrokerError::Unavailable("redis broker closed".into()));
        }
        let _: String = self.publisher.ping(None).await.map_err(unavailable)?;
        if !self.subscriber.is_connected() {
            return Err(BrokerError::Unavailable(
                "redis subscriber connection is down".into(),
            ));
        }
        Ok(())
    }

    /// Refuses new publishes, lets the publisher task send what is queued (within
    /// [`CLOSE_DEADLINE`]), stops the tasks and quits both connections. Idempotent.
    async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.cancel.cancel();
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        for task in tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(CLOSE_DEADLINE, task).await.is_err() {
                abort.abort();
            }
        }
        let _ = tokio::time::timeout(CLOSE_DEADLINE, self.subscriber.quit()).await;
        let _ = tokio::time::timeout(CLOSE_DEADLINE, self.publisher.quit()).await;
        info!("redis broker closed");
    }
}

impl Drop for RedisBroker {
    /// A broker dropped without [`Broker::close`] still stops its tasks and quits its clients
    /// (fred's connection tasks would otherwise reconnect forever).
    fn drop(&mut self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.cancel.cancel();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (publisher, subscriber) = (self.publisher.clone(), self.subscriber.clone());
            runtime.spawn(async move {
                let _ = tokio::time::timeout(CLOSE_DEADLINE, subscriber.quit()).await;
                let _ = tokio::time::timeout(CLOSE_DEADLINE, publisher.quit()).await;
            });
        }
    }
}

/// Drains the queue in batches until the broker closes, then sends what is left.
async fn run_publisher(
    mut queue: mpsc::Receiver<Outgoing>,
    client: Client,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    loop {
        let n = tokio::select! {
            n = queue.recv_many(&mut batch, PUBLISH_BATCH) => n,
            _ = cancel.cancelled() => break,
        };
        if n == 0 {
            return; // Every sender is gone.
        }
        send_batch(&client, &mut batch, &shared).await;
    }
    queue.close();
    while queue.recv_many(&mut batch, PUBLISH_BATCH).await > 0 {
        send_batch(&client, &mut batch, &shared).await;
    }
}

/// Sends `batch` as one pipeline, or drops it (counted) when the publisher is not connected:
/// fred would otherwise hold it until the reconnect, and a node that is cut off should not
/// replay stale traffic (the gap is healed by the resync instead). On a cluster, "connected"
/// means every master is reachable: while one is down, all publishes are dropped.
async fn send_batch(client: &Client, batch: &mut Vec<Outgoing>, shared: &Shared) {
    let n = batch.len() as u64;
    if !client.is_connected() {
        batch.clear();
        record_drops(shared, n, "redis publisher disconnected");
        return;
    }
    let pipeline = client.pipeline();
    for o in batch.drain(..) {
        let queued: Result<(), FredError> = if o.sharded {
            pipeline.spublish(o.channel, Value::Bytes(o.payload)).await
        } else {
            pipeline.publish(o.channel, Value::Bytes(o.payload)).await
        };
        if let Err(e) = queued {
            warn!(error = %e, "redis publisher: could not queue a publish in the pipeline");
        }
    }
    let results = pipeline.try_all::<Value>().await;
    let sent = if results.len() as u64 == n {
        results.iter().filter(|r| r.is_ok()).count() as u64
    } else {
        0 // One error for the whole pipeline (timeout, connection closed).
    };
    shared.stats.published.fetch_add(sent, Ordering::Relaxed);
    METRICS.redis_published.add(sent);
    if sent < n {
        if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
            warn!(error = %e, lost = n - sent, "redis publisher: publishes failed");
        }
        record_drops(shared, n - sent, "redis publish failed");
    } else if shared.publish_lost.swap(false, Ordering::AcqRel) {
        shared.report_gap("the redis publisher dropped envelopes and is sending again");
    }
}

fn record_drops(shared: &Shared, n: u64, why: &str) {
    if !shared.publish_lost.swap(true, Ordering::AcqRel) {
        warn!(
            why,
            "redis publisher: dropping envelopes until Redis is back"
        );
    }
    shared.stats.dropped.fetch_add(n, Ordering::Relaxed);
    METRICS.redis_publish_failed.add(n);
}

/// Hands every message to the handler until the subscriber quits. Falling behind fred's
/// buffer ([`RecvError::Lagged`]) loses messages: that is a gap, never the end.
async fn read_messages(
    mut messages: broadcast::Receiver<Message>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            next = messages.recv() => next,
        };
        match next {
            Ok(message) => shared.deliver(message),
            Err(RecvError::Lagged(lost)) => {
                warn!(lost, "redis broker: the reader fell behind");
                shared.report_gap("the redis reader fell behind");
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Watches both connections' reconnect events.
struct Watcher {
    subscriber: SubscriberClient,
    rooms: Arc<Mutex<BTreeSet<Str>>>,
    sharded: bool,
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl Watcher {
    async fn run(
        self,
        mut sub_events: broadcast::Receiver<fred::types::config::Server>,
        mut pub_events: broadcast::Receiver<fred::types::config::Server>,
    ) {
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                event = sub_events.recv() => {
                    if matches!(event, Err(RecvError::Closed)) {
                        return;
                    }
                    // A cluster reconnects to each node with one event each: restore once.
                    while !matches!(
                        sub_events.try_recv(),
                        Err(broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed)
                    ) {}
                    self.shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    METRICS.redis_reconnects.inc();
                    info!("redis subscriber reconnected; restoring subscriptions");
                    if self.resubscribe_until_done().await {
                        self.shared.report_gap("the redis subscriber reconnected");
                    }
                }
                event = pub_events.recv() => {
                    if matches!(event, Err(RecvError::Closed)) {
                        return;
                    }
                    self.shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    METRICS.redis_reconnects.inc();
                    info!("redis publisher reconnected");
                    if self.shared.publish_lost.swap(false, Ordering::AcqRel) {
                        self.shared.report_gap("the redis publisher reconnected after dropping envelopes");
                    }
                }
            }
        }
    }

    /// Subscribes the new connection to the node channel and every wanted room, retrying until
    /// it works; `false` if the broker closed first.
    async fn resubscribe_until_done(&self) -> bool {
        loop {
            match self.resubscribe().await {
                Ok(()) => return true,
                Err(e) => {
                    warn!(error = %e, "redis broker: restoring subscriptions failed; retrying")
                }
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return false,
                _ = tokio::time::sleep(RESUBSCRIBE_RETRY) => {}
            }
        }
    }

    async fn resubscribe(&self) -> Result<(), FredError> {
        let rooms: Vec<Key> = lock(&self.rooms).iter().cloned().map(Key::from).collect();
        if self.sharded {
            self.subscriber.subscribe(NODE_CHANNEL).await?;
            // SSUBSCRIBE takes channels of one slot at a time (one shard on a cluster).
            for (_, group) in fred::util::group_by_hash_slot(rooms)? {
                let group = Vec::from(group);
                for chunk in group.chunks(RESUBSCRIBE_CHUNK) {
                    self.subscriber.ssubscribe(chunk.to_vec()).await?;
                }
            }
        } else {
            let mut all = Vec::with_capacity(rooms.len() + 1);
            all.push(Key::from(NODE_CHANNEL));
            all.extend(rooms);
            for chunk in all.chunks(RESUBSCRIBE_CHUNK) {
                self.subscriber.subscribe(chunk.to_vec()).await?;
            }
        }
        applied(&self.subscriber, None).await
    }
}

/// Waits until Redis has applied the (UN)SUBSCRIBE or SUNSUBSCRIBE commands sent before: fred
/// completes those once written, not when Redis answers. A PING on the same connection is
/// answered after them (RESP2 allows PING on a subscribed connection).
///
/// `sharded_channel` names the channel of a SUNSUBSCRIBE, whose shard the PING must reach; the
/// other commands go, on a cluster, to the node of the client id's hash slot (fred's routing of
/// classic pub/sub, so that one connection holds all the classic subscriptions).
async fn applied(
    subscriber: &SubscriberClient,
    sharded_channel: Option<&Str>,
) -> Result<(), FredError> {
    let slot = match sharded_channel {
        Some(channel) => fred::util::redis_keyslot(channel.as_bytes()),
        None => fred::util::redis_keyslot(subscriber.id().as_bytes()),
    };
    let options = Options {
        cluster_hash: Some(ClusterHash::Custom(slot)),
        ..Options::default()
    };
    let _: Value = subscriber.with_options(&options).ping(None).await?;
    Ok(())
}

/// fred's configuration for `url`: the schemes this broker supports, failing fast on the first
/// connection (later ones are retried by the reconnect policy).
fn client_config(url: &str) -> Result<Config, BrokerError> {
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or_default();
    if !matches!(
        scheme,
        "redis" | "valkey" | "redis-cluster" | "valkey-cluster"
    ) {
        return Err(BrokerError::Config(format!(
            "unsupported redis URL scheme {scheme:?}: use redis:// or redis-cluster://"
        )));
    }
    let mut config = Config::from_url(url).map_err(config_error)?;
    config.fail_fast = true;
    Ok(config)
}

/// Exponential backoff from [`RECONNECT_MIN_DELAY`], doubling, capped at
/// [`RECONNECT_MAX_DELAY`], never giving up, plus up to [`RECONNECT_JITTER`].
fn reconnect_policy() -> ReconnectPolicy {
    let mut policy = ReconnectPolicy::new_exponential(
        0,
        RECONNECT_MIN_DELAY.as_millis() as u32,
        RECONNECT_MAX_DELAY.as_millis() as u32,
        2,
    );
    policy.set_jitter(RECONNECT_JITTER.as_millis() as u32);
    policy
}

fn connection_config() -> ConnectionConfig {
    ConnectionConfig {
        connection_timeout: CONNECT_TIMEOUT,
        internal_command_timeout: CONNECT_TIMEOUT,
        max_command_buffer_len: COMMAND_BUFFER,
        max_command_attempts: COMMAND_ATTEMPTS,
        tcp: TcpConfig {
            nodelay: Some(true),
            keepalive: Some(
                TcpKeepalive::new()
                    .with_time(KEEPALIVE_IDLE)
                    .with_interval(KEEPALIVE_INTERVAL),
            ),
            ..TcpConfig::default()
        },
        ..ConnectionConfig::default()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unavailable(e: FredError) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

fn config_error(e: FredError) -> BrokerError {
    BrokerError::Config(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fred::types::MessageKind;
    use std::sync::atomic::AtomicUsize;

    #[derive(Default)]
    struct Recorder {
        rooms: Mutex<Vec<(String, Bytes)>>,
        nodes: Mutex<Vec<Bytes>>,
        gaps: AtomicUsize,
    }

    impl Inbound for Recorder {
        fn envelope(&self, room: &RoomId, envelope: Bytes) {
            lock(&self.rooms).push((room.to_string(), envelope));
        }
        fn node_event(&self, envelope: Bytes) {
            lock(&self.nodes).push(envelope);
        }
        fn gap(&self) {
            self.gaps.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn shared(recorder: &Arc<Recorder>) -> Arc<Shared> {
        Arc::new(Shared {
            inbound: recorder.clone(),
            stats: Arc::default(),
            publish_lost: AtomicBool::new(false),
        })
    }

    fn message(channel: &str, payload: &'static [u8]) -> Message {
        Message {
            channel: Str::from(channel),
            value: Value::Bytes(Bytes::from_static(payload)),
            kind: MessageKind::Message,
            server: fred::types::config::Server::new("127.0.0.1", 6379),
        }
    }

    #[tokio::test]
    async fn messages_are_routed_by_channel_and_foreign_channels_ignored() {
        let recorder = Arc::new(Recorder::default());
        let shared = shared(&recorder);
        let room = RoomId::new("team/doc{1}").unwrap();
        shared.deliver(message(&room_channel(&room), b"u"));
        shared.deliver(message(NODE_CHANNEL, b"hb"));
        shared.deliver(message("someone:else", b"x"));
        assert_eq!(
            *lock(&recorder.rooms),
            vec![("team/doc{1}".to_string(), Bytes::from_static(b"u"))]
        );
        assert_eq!(*lock(&recorder.nodes), vec![Bytes::from_static(b"hb")]);
        assert_eq!(shared.stats.received(), 3);
    }

    #[tokio::test]
    async fn a_lagging_reader_reports_a_gap_and_keeps_reading() {
        let recorder = Arc::new(Recorder::default());
        let shared = shared(&recorder);
        let (tx, rx) = broadcast::channel(4);
        let room = RoomId::new("r").unwrap();
        // Ten messages into a buffer of four before the reader runs: six are lost.
        for _ in 0..10 {
            tx.send(message(&room_channel(&room), b"old")).unwrap();
        }
        let reader = tokio::spawn(read_messages(rx, shared.clone(), CancellationToken::new()));
        tokio::task::yield_now().await;
        tx.send(message(NODE_CHANNEL, b"after")).unwrap();
        drop(tx);
        reader
            .await
            .expect("the reader ends only when the channel closes");
        assert_eq!(recorder.gaps.load(Ordering::SeqCst), 1);
        assert_eq!(shared.stats.gaps(), 1);
        assert_eq!(
            lock(&recorder.rooms).len(),
            4,
            "the retained messages are delivered"
        );
        assert_eq!(*lock(&recorder.nodes), vec![Bytes::from_static(b"after")]);
    }

    #[test]
    fn debug_output_hides_the_password() {
        let opts = RedisOptions::new("redis://user:s3cret@redis.internal:6379/0");
        let shown = format!("{opts:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("redis://***@redis.internal:6379/0"),
            "{shown}"
        );
        assert!(format!("{:?}", RedisOptions::new("redis://h:1")).contains("redis://h:1"));
    }

    #[test]
    fn only_supported_url_schemes_are_accepted() {
        assert!(client_config("redis://127.0.0.1:6379").is_ok());
        let cluster = client_config("redis-cluster://127.0.0.1:7000?node=127.0.0.1:7001").unwrap();
        assert!(cluster.server.is_clustered());
        assert!(cluster.fail_fast);
        for bad in [
            "rediss://h:1",
            "http://h",
            "127.0.0.1:6379",
            "redis+unix:///tmp/s",
        ] {
            assert!(
                matches!(client_config(bad), Err(BrokerError::Config(_))),
                "{bad} should be refused"
            );
        }
    }

    #[test]
    fn the_reconnect_policy_backs_off_exponentially_without_limit() {
        let mut policy = reconnect_policy();
        let delays: Vec<u64> = (0..10).map(|_| policy.next_delay().unwrap()).collect();
        // 100, 200, 400, ... ms with up to 50 ms of jitter, capped at 5 s.
        assert!((100..=150).contains(&delays[0]), "{delays:?}");
        assert!((200..=250).contains(&delays[1]), "{delays:?}");
        assert!(delays[9] == 5000, "{delays:?}");
        assert!(
            (0..1000).all(|_| policy.next_delay() == Some(5000)),
            "attempts never run out"
        );
    }
}
