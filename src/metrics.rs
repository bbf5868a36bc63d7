//! Process-wide counters, rendered in the Prometheus text format at `/metrics`.
//!
//! A small fixed set of atomics: no room names or other unbounded values become labels. The
//! operations issue extends this set; every refusal already counts here by close code.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tandem_protocol::CloseCode;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Subtracts one.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds, in seconds, of the latency histogram buckets.
const BUCKETS: [f64; 10] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05, 0.25,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Connections closed by the server, by close code.
#[derive(Debug, Default)]
pub struct CloseCounters([Counter; CloseCode::ALL.len()]);

impl CloseCounters {
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

/// Every metric of the process.
#[derive(Debug, Default)]
pub struct Metrics {
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
    /// Frames queued to peers by fan-out.
    pub deliveries: Counter,
    /// Time from a room taking an update to having queued it for every peer.
    pub fanout_seconds: Histogram,
    /// Log compactions completed.
    pub compactions: Counter,
    /// Connections the server closed, by close code.
    pub closes: CloseCounters,
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
}

/// The process's metrics.
pub static METRICS: std::sync::LazyLock<Metrics> = std::sync::LazyLock::new(Metrics::default);

impl Metrics {
    /// Renders every metric in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let counters: [(&str, &str, &Counter); 15] = [
            (
                "tandem_broker_published_total",
                "Envelopes published to other nodes.",
                &self.broker_published,
            ),
            (
                "tandem_broker_received_total",
                "Envelopes received from other nodes.",
                &self.broker_received,
            ),
            (
                "tandem_broker_publish_dropped_total",
                "Envelopes not queued for publishing; the room resyncs.",
                &self.broker_publish_dropped,
            ),
            (
                "tandem_broker_gaps_total",
                "Possible losses reported by the broker.",
                &self.broker_gaps,
            ),
            (
                "tandem_broker_resyncs_total",
                "State exchanges started by rooms.",
                &self.broker_resyncs,
            ),
            (
                "tandem_connections_opened_total",
                "WebSocket connections accepted.",
                &self.connections_opened,
            ),
            (
                "tandem_room_load_failures_total",
                "Room loads that failed.",
                &self.room_load_failures,
            ),
            (
                "tandem_peers_joined_total",
                "Joins accepted by rooms.",
                &self.peers_joined,
            ),
            (
                "tandem_frames_received_total",
                "Binary frames received from clients.",
                &self.frames_in,
            ),
            (
                "tandem_received_bytes_total",
                "Bytes received from clients.",
                &self.bytes_in,
            ),
            (
                "tandem_frames_sent_total",
                "Frames written to clients.",
                &self.frames_out,
            ),
            (
                "tandem_sent_bytes_total",
                "Bytes written to clients.",
                &self.bytes_out,
            ),
            (
                "tandem_updates_applied_total",
                "Updates that changed a document.",
                &self.updates_applied,
            ),
            (
                "tandem_fanout_deliveries_total",
                "Frames queued to peers by fan-out.",
                &self.deliveries,
            ),
            (
                "tandem_compactions_total",
                "Log compactions completed.",
                &self.compactions,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.get()
            );
        }
        let gauges: [(&str, &str, &Gauge); 2] = [
            (
                "tandem_connections",
                "WebSocket connections open.",
                &self.connections_open,
            ),
            (
                "tandem_rooms_loaded",
                "Rooms loaded in memory.",
                &self.rooms_loaded,
            ),
        ];
        for (name, help, g) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                g.get()
            );
        }
        let name = "tandem_closes_total";
        let _ = writeln!(
            out,
            "# HELP {name} Connections closed by the server, by reason.\n# TYPE {name} counter"
        );
        for code in CloseCode::ALL {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{}\",code=\"{}\"}} {}",
                code.as_str(),
                code.code(),
                self.closes.get(code)
            );
        }
        self.fanout_seconds.render(
            &mut out,
            "tandem_fanout_duration_seconds",
            "Time from a room taking an update to having queued it for every peer.",
        );
        out
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
        assert!(text.contains("tandem_closes_total{reason=\"invalid_data\",code=\"1007\"} 2"));
        assert!(text.contains("tandem_closes_total{reason=\"too_big\",code=\"1009\"} 0"));
        assert!(text.contains("tandem_fanout_duration_seconds_bucket{le=\"0.0001\"} 1"));
        assert!(text.contains("tandem_fanout_duration_seconds_count 1"));
    }
}
