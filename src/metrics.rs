//! Process-wide metrics, rendered in the Prometheus text format at `/metrics`.
//!
//! Built on the `prometheus` crate: every metric is a field of the static [`METRICS`] (so call
//! sites read `METRICS.frames_in.inc()`), registered once in the instance's own registry. Updating
//! a metric is a few atomic operations, never a lock; only a scrape takes the registry's lock.
//!
//! Naming follows Prometheus conventions: base units in names (`_seconds`, `_bytes`), `_total`
//! on counters, and labels only from small fixed sets (close codes, causes, store operations):
//! never a room name, a node id or another unbounded value. Process CPU and memory
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`, …) come from the crate's
//! process collector on Linux.

use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use tandem_protocol::CloseCode;

/// A monotonically increasing counter.
#[derive(Debug, Clone)]
pub struct Counter(IntCounter);

impl Counter {
    fn register(registry: &Registry, name: &str, help: &str) -> Self {
        let counter = IntCounter::with_opts(Opts::new(name, help)).expect("valid counter");
        Self(register(registry, counter))
    }

    /// Adds one.
    pub fn inc(&self) {
        self.0.inc();
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.inc_by(n);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

/// A value that goes up and down.
#[derive(Debug, Clone)]
pub struct Gauge(IntGauge);

impl Gauge {
    fn register(registry: &Registry, name: &str, help: &str) -> Self {
        let gauge = IntGauge::with_opts(Opts::new(name, help)).expect("valid gauge");
        Self(register(registry, gauge))
    }

    /// Adds one.
    pub fn inc(&self) {
        self.0.inc();
    }

    /// Subtracts one.
    pub fn dec(&self) {
        self.0.dec();
    }

    /// Adds `n` (which may be negative).
    pub fn add(&self, n: i64) {
        self.0.add(n);
    }

    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.get()
    }
}

/// Upper bounds, in seconds, of the fan-out latency buckets (in-memory work: microseconds).
const FANOUT_BUCKETS: [f64; 10] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05, 0.25,
];

/// Upper bounds, in seconds, of the store latency buckets (a transaction, up to retries).
const STORE_BUCKETS: [f64; 14] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds of the peers-per-room buckets.
const PEER_BUCKETS: [f64; 12] = [
    1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0,
];

/// Upper bounds of the group-commit size buckets (the writer's default batch limit is 256).
const GROUP_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
) -> prometheus::Histogram {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    register(
        registry,
        prometheus::Histogram::with_opts(opts).expect("valid histogram"),
    )
}

/// A histogram of durations, exported in seconds.
#[derive(Debug, Clone)]
pub struct Histogram(prometheus::Histogram);

impl Histogram {
    fn register(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Self {
        Self(histogram(registry, name, help, buckets))
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        self.0.observe(d.as_secs_f64());
    }

    /// Observations recorded.
    pub fn count(&self) -> u64 {
        self.0.get_sample_count()
    }
}

/// A histogram of sizes (peers, rows): plain numbers, no unit.
#[derive(Debug, Clone)]
pub struct SizeHistogram(prometheus::Histogram);

impl SizeHistogram {
    fn register(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Self {
        Self(histogram(registry, name, help, buckets))
    }

    /// Records one size.
    pub fn observe(&self, n: usize) {
        self.0.observe(n as f64);
    }

    /// Observations recorded.
    pub fn count(&self) -> u64 {
        self.0.get_sample_count()
    }

    /// Sum of the observed sizes.
    pub fn sum(&self) -> u64 {
        self.0.get_sample_sum() as u64
    }
}

/// Connections closed by the server, by close code: `tandem_closes_total{code,reason}`, one
/// series per code of [`CloseCode::ALL`] (so codes added there are counted and exported).
#[derive(Debug, Clone)]
pub struct CloseCounters([Counter; CloseCode::ALL.len()]);

impl CloseCounters {
    fn register(registry: &Registry) -> Self {
        let family = IntCounterVec::new(
            Opts::new(
                "tandem_closes_total",
                "Connections closed by the server, by close code and reason.",
            ),
            &["code", "reason"],
        )
        .expect("valid counter family");
        // Every child is made here, once: counting never looks a label up (no lock per close),
        // and every code is exported from the start, at 0.
        let children = CloseCode::ALL
            .map(|c| Counter(family.with_label_values(&[&c.code().to_string(), c.as_str()])));
        register(registry, family);
        Self(children)
    }

    /// Counts one close with `code`.
    pub fn inc(&self, code: CloseCode) {
        if let Some(i) = CloseCode::ALL.iter().position(|&c| c == code) {
            self.0[i].inc();
        }
    }

    /// How many closes with `code` were counted.
    pub fn get(&self, code: CloseCode) -> u64 {
        CloseCode::ALL
            .iter()
            .position(|&c| c == code)
            .map_or(0, |i| self.0[i].get())
    }
}

/// Closes with 1013 (try again later), by why the server closed:
/// `tandem_try_again_later_closes_total{reason}`. Also counted in `tandem_closes_total`.
#[derive(Debug, Clone)]
pub struct TryAgainLaterCloses {
    /// A slow consumer: the connection's outbox passed its byte budget.
    pub slow_consumer: Counter,
    /// A write refused because the bound on unstored updates was reached.
    pub store_backlog: Counter,
    /// A join refused because the room's document could not be loaded.
    pub load_failed: Counter,
    /// A join refused because the room kept unloading while it tried.
    pub room_busy: Counter,
}

impl TryAgainLaterCloses {
    fn register(registry: &Registry) -> Self {
        let family = IntCounterVec::new(
            Opts::new(
                "tandem_try_again_later_closes_total",
                "Connections closed with 1013 (try again later), by reason: slow_consumer, \
                 store_backlog, load_failed, room_busy.",
            ),
            &["reason"],
        )
        .expect("valid counter family");
        let child = |reason: &str| Counter(family.with_label_values(&[reason]));
        let closes = Self {
            slow_consumer: child("slow_consumer"),
            store_backlog: child("store_backlog"),
            load_failed: child("load_failed"),
            room_busy: child("room_busy"),
        };
        register(registry, family);
        closes
    }
}

/// Why a connection or upgrade was refused by authentication or a limit:
/// `tandem_refusals_total{reason}`. Connections refused with a close code are also counted in
/// `tandem_closes_total`; malformed input is counted there (1007, 1009).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// A WebSocket upgrade from a browser origin not in `--allow-origin` (HTTP 403).
    Origin,
    /// No token with the upgrade (4401).
    MissingToken,
    /// A token that does not verify: signature, algorithm, time, audience, issuer (4401).
    InvalidToken,
    /// A valid token without a grant for the room (4403).
    Forbidden,
    /// Too many connections from one address (1013).
    AddressLimit,
    /// The room has as many connections as it may (1013).
    RoomFull,
    /// The node has as many rooms loaded as it may (1013).
    TooManyRooms,
    /// Messages or bytes per second past the connection's rate limit (4429).
    RateLimit,
    /// No valid message in time after connecting (1008).
    FirstMessageTimeout,
    /// Nothing received for the idle timeout (1001).
    IdleTimeout,
    /// A write that would grow the document past its size limit (1009).
    DocumentTooLarge,
}

impl Refused {
    /// Every reason, in label order.
    pub const ALL: [Refused; 11] = [
        Refused::Origin,
        Refused::MissingToken,
        Refused::InvalidToken,
        Refused::Forbidden,
        Refused::AddressLimit,
        Refused::RoomFull,
        Refused::TooManyRooms,
        Refused::RateLimit,
        Refused::FirstMessageTimeout,
        Refused::IdleTimeout,
        Refused::DocumentTooLarge,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Origin => "origin",
            Refused::MissingToken => "missing_token",
            Refused::InvalidToken => "invalid_token",
            Refused::Forbidden => "forbidden",
            Refused::AddressLimit => "address_limit",
            Refused::RoomFull => "room_full",
            Refused::TooManyRooms => "too_many_rooms",
            Refused::RateLimit => "rate_limit",
            Refused::FirstMessageTimeout => "first_message_timeout",
            Refused::IdleTimeout => "idle_timeout",
            Refused::DocumentTooLarge => "document_too_large",
        }
    }
}

/// Refusals by reason; see [`Refused`].
#[derive(Debug, Clone)]
pub struct Refusals([Counter; Refused::ALL.len()]);

impl Refusals {
    fn register(registry: &Registry) -> Self {
        let family = IntCounterVec::new(
            Opts::new(
                "tandem_refusals_total",
                "Connections and upgrades refused by authentication or a limit, by reason.",
            ),
            &["reason"],
        )
        .expect("valid counter family");
        let counters = Refused::ALL.map(|r| Counter(family.with_label_values(&[r.as_str()])));
        register(registry, family);
        Self(counters)
    }

    /// Counts one refusal.
    pub fn inc(&self, why: Refused) {
        self.0[why as usize].inc();
    }

    /// Refusals so far for `why`.
    pub fn get(&self, why: Refused) -> u64 {
        self.0[why as usize].get()
    }
}

/// Failed store operations: `tandem_store_errors_total{operation}`.
#[derive(Debug, Clone)]
pub struct StoreErrors {
    /// Group-commit appends that failed (each is retried).
    pub append: Counter,
    /// Room loads that failed in the store.
    pub load: Counter,
    /// Compactions that failed.
    pub compact: Counter,
}

impl StoreErrors {
    fn register(registry: &Registry) -> Self {
        let family = IntCounterVec::new(
            Opts::new(
                "tandem_store_errors_total",
                "Store operations that failed, by operation: append (retried), load, compact.",
            ),
            &["operation"],
        )
        .expect("valid counter family");
        let child = |op: &str| Counter(family.with_label_values(&[op]));
        let errors = Self {
            append: child("append"),
            load: child("load"),
            compact: child("compact"),
        };
        register(registry, family);
        errors
    }
}

/// Registers `collector` in `registry` and hands it back.
fn register<C: Collector + Clone + 'static>(registry: &Registry, collector: C) -> C {
    registry
        .register(Box::new(collector.clone()))
        .expect("metric names are unique");
    collector
}

/// Every metric of the process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// WebSocket connections accepted.
    pub connections_opened: Counter,
    /// WebSocket connections currently open.
    pub connections_open: Gauge,
    /// Rooms currently loaded.
    pub rooms_loaded: Gauge,
    /// Room loads that failed (store unreachable or corrupt data).
    pub room_load_failures: Counter,
    /// Joins accepted by rooms.
    pub peers_joined: Counter,
    /// Peers in a room, observed each time one joins (the joiner included).
    pub room_peers: SizeHistogram,
    /// Binary frames received from clients.
    pub frames_in: Counter,
    /// Bytes received from clients in binary frames.
    pub bytes_in: Counter,
    /// Frames written to clients.
    pub frames_out: Counter,
    /// Bytes written to clients.
    pub bytes_out: Counter,
    /// Updates that changed a document.
    pub updates_applied: Counter,
    /// Documents set aside, not freed, after yrs panicked on them (see `doc::YDoc`).
    pub documents_leaked: Counter,
    /// Frames queued to peers by fan-out.
    pub deliveries: Counter,
    /// Time from a room taking an update to having queued it for every peer.
    pub fanout_seconds: Histogram,
    /// Awareness (presence) states currently held, across rooms.
    pub awareness_states: Gauge,
    /// Duration of each store append (one transaction, failed attempts included).
    pub store_append_seconds: Histogram,
    /// Time from the store writer taking a batch's first update to the batch being committed
    /// (collection window, retries and append).
    pub store_commit_seconds: Histogram,
    /// Updates per committed group-commit batch.
    pub store_group_size: SizeHistogram,
    /// Failed store operations, by operation.
    pub store_errors: StoreErrors,
    /// Log compactions completed.
    pub compactions: Counter,
    /// Connections the server closed, by close code.
    pub closes: CloseCounters,
    /// Closes with 1013, by why.
    pub try_again_later: TryAgainLaterCloses,
    /// Writes from read-only connections, dropped.
    pub readonly_writes_dropped: Counter,
    /// Refusals by authentication or a limit, by reason.
    pub refused: Refusals,
    /// Envelopes published to other nodes.
    pub broker_published: Counter,
    /// Envelopes received from other nodes.
    pub broker_received: Counter,
    /// Envelopes that could not be queued for publishing (the room resyncs instead).
    pub broker_publish_dropped: Counter,
    /// Possible losses reported by the broker (reconnects, lagging reader).
    pub broker_gaps: Counter,
    /// State exchanges (sync step 1 envelopes) started by rooms.
    pub broker_resyncs: Counter,
    /// Redis: envelopes Redis accepted (PUBLISH/SPUBLISH answered).
    pub redis_published: Counter,
    /// Redis: envelopes the publisher task could not send (Redis down, command failed).
    pub redis_publish_failed: Counter,
    /// Redis: publishes refused because the publisher queue was full.
    pub redis_queue_full: Counter,
    /// Redis: messages read from the subscriber connection (every channel).
    pub redis_received: Counter,
    /// Redis: possible losses reported (reconnects, lagging reader, dropped publishes).
    pub redis_gaps: Counter,
    /// Redis: reconnections of either connection.
    pub redis_reconnects: Counter,
}

/// The process's metrics.
pub static METRICS: std::sync::LazyLock<Metrics> = std::sync::LazyLock::new(Metrics::new);

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of metrics in its own registry (the process's is [`METRICS`]).
    pub fn new() -> Self {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("process metrics registered once");
        let counter = |name: &str, help: &str| Counter::register(&r, name, help);
        let gauge = |name: &str, help: &str| Gauge::register(&r, name, help);
        Self {
            connections_opened: counter(
                "tandem_connections_opened_total",
                "WebSocket connections accepted.",
            ),
            connections_open: gauge("tandem_connections", "WebSocket connections open."),
            rooms_loaded: gauge("tandem_rooms_loaded", "Rooms loaded in memory."),
            room_load_failures: counter(
                "tandem_room_load_failures_total",
                "Room loads that failed.",
            ),
            peers_joined: counter("tandem_peers_joined_total", "Joins accepted by rooms."),
            room_peers: SizeHistogram::register(
                &r,
                "tandem_room_peers",
                "Peers in a room, observed each time a peer joins (the joiner included).",
                &PEER_BUCKETS,
            ),
            frames_in: counter(
                "tandem_frames_received_total",
                "Binary frames received from clients.",
            ),
            bytes_in: counter(
                "tandem_received_bytes_total",
                "Bytes received from clients.",
            ),
            frames_out: counter("tandem_frames_sent_total", "Frames written to clients."),
            bytes_out: counter("tandem_sent_bytes_total", "Bytes written to clients."),
            updates_applied: counter(
                "tandem_updates_applied_total",
                "Updates that changed a document.",
            ),
            documents_leaked: counter(
                "tandem_engine_panics_total",
                "Documents set aside after the CRDT engine panicked on them (their memory is \
                 leaked, not freed, since a panic leaves it inconsistent; the room reloads).",
            ),
            deliveries: counter(
                "tandem_fanout_deliveries_total",
                "Frames queued to peers by fan-out.",
            ),
            fanout_seconds: Histogram::register(
                &r,
                "tandem_fanout_duration_seconds",
                "Time from a room taking an update to having queued it for every peer.",
                &FANOUT_BUCKETS,
            ),
            awareness_states: gauge(
                "tandem_awareness_states",
                "Awareness (presence) states currently held, across rooms.",
            ),
            store_append_seconds: Histogram::register(
                &r,
                "tandem_store_append_duration_seconds",
                "Duration of each store append transaction, failed attempts included.",
                &STORE_BUCKETS,
            ),
            store_commit_seconds: Histogram::register(
                &r,
                "tandem_store_commit_duration_seconds",
                "Time from the store writer taking a batch's first update to the batch being \
                 committed (collection window, retries and append).",
                &STORE_BUCKETS,
            ),
            store_group_size: SizeHistogram::register(
                &r,
                "tandem_store_group_size",
                "Updates per committed group-commit batch.",
                &GROUP_BUCKETS,
            ),
            store_errors: StoreErrors::register(&r),
            compactions: counter("tandem_compactions_total", "Log compactions completed."),
            closes: CloseCounters::register(&r),
            try_again_later: TryAgainLaterCloses::register(&r),
            refused: Refusals::register(&r),
            readonly_writes_dropped: counter(
                "tandem_readonly_writes_dropped_total",
                "Document updates from read-only connections, dropped.",
            ),
            broker_published: counter(
                "tandem_broker_published_total",
                "Envelopes published to other nodes.",
            ),
            broker_received: counter(
                "tandem_broker_received_total",
                "Envelopes received from other nodes.",
            ),
            broker_publish_dropped: counter(
                "tandem_broker_publish_dropped_total",
                "Envelopes not queued for publishing; the room resyncs.",
            ),
            broker_gaps: counter(
                "tandem_broker_gaps_total",
                "Possible losses reported by the broker.",
            ),
            broker_resyncs: counter(
                "tandem_broker_resyncs_total",
                "State exchanges started by rooms.",
            ),
            redis_published: counter(
                "tandem_redis_published_total",
                "Envelopes Redis accepted (PUBLISH/SPUBLISH answered).",
            ),
            redis_publish_failed: counter(
                "tandem_redis_publish_failed_total",
                "Envelopes the Redis publisher could not send (Redis down, command failed).",
            ),
            redis_queue_full: counter(
                "tandem_redis_queue_full_total",
                "Publishes refused because the Redis publisher queue was full.",
            ),
            redis_received: counter(
                "tandem_redis_received_total",
                "Messages read from the Redis subscriber connection.",
            ),
            redis_gaps: counter(
                "tandem_redis_gaps_total",
                "Possible losses reported by the Redis broker.",
            ),
            redis_reconnects: counter(
                "tandem_redis_reconnects_total",
                "Reconnections of the Redis publisher or subscriber connection.",
            ),
            registry: r.clone(),
        }
    }

    /// Renders every metric in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "could not encode metrics");
                String::new()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_every_close_reason_and_counts() {
        let m = Metrics::default();
        m.closes.inc(CloseCode::InvalidData);
        m.closes.inc(CloseCode::InvalidData);
        m.fanout_seconds.observe(Duration::from_micros(80));
        let text = m.render();
        assert!(text.contains("tandem_closes_total{code=\"1007\",reason=\"invalid_data\"} 2"));
        assert!(text.contains("tandem_closes_total{code=\"1009\",reason=\"too_big\"} 0"));
        assert!(text.contains("tandem_fanout_duration_seconds_bucket{le=\"0.0001\"} 1"));
        assert!(text.contains("tandem_fanout_duration_seconds_count 1"));
        for code in CloseCode::ALL {
            let series = format!(
                "tandem_closes_total{{code=\"{}\",reason=\"{}\"}}",
                code.code(),
                code.as_str()
            );
            assert!(text.contains(&series), "{series}");
        }
    }

    #[test]
    fn every_family_has_help_and_type() {
        let m = Metrics::default();
        m.store_group_size.observe(3);
        m.room_peers.observe(2);
        let text = m.render();
        for name in [
            "tandem_connections",
            "tandem_room_peers",
            "tandem_store_group_size",
            "tandem_store_append_duration_seconds",
            "tandem_store_commit_duration_seconds",
            "tandem_store_errors_total",
            "tandem_awareness_states",
            "tandem_try_again_later_closes_total",
            "tandem_readonly_writes_dropped_total",
            "tandem_redis_published_total",
        ] {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
        }
        #[cfg(target_os = "linux")]
        {
            assert!(text.contains("# TYPE process_cpu_seconds_total counter"));
            assert!(text.contains("# TYPE process_resident_memory_bytes gauge"));
        }
    }
}
