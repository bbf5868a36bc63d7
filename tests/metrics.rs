//! `/metrics` over HTTP: the whole exposition passes a strict text-format parser, every family
//! the operations dashboard needs is there, and counters move by exactly what clients did.
//!
//! Metrics are process-wide. nextest runs each test in its own process; `cargo test` runs this
//! file's tests as threads of one process, so each test takes [`SERIAL`] and shuts its server down
//! before letting go: the deltas a test checks are then its own under either runner.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::{append_text, expect_close, raw, send_binary, Raw, TestServer, WAIT};
use futures_util::{SinkExt, StreamExt};
use tandem::metrics::METRICS;
use tandem_client::Client;
use tandem_protocol::{AwarenessEntry, AwarenessUpdate, CloseCode, Message, SyncMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message as Ws;
use yrs::{ReadTxn, Transact};

/// Held by every test for its whole run (see the module documentation).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// A strict parser for the Prometheus text format (version 0.0.4).
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

type Labels = BTreeMap<String, String>;

/// A parsed exposition: families with their type and help, and every sample.
#[derive(Debug, Default)]
struct Exposition {
    kinds: HashMap<String, Kind>,
    help: HashMap<String, String>,
    samples: BTreeMap<(String, Labels), f64>,
}

impl Exposition {
    /// The value of one series; panics if it is missing.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.try_get(name, labels)
            .unwrap_or_else(|| panic!("no series {name}{labels:?}"))
    }

    fn try_get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples.get(&(name.to_string(), labels)).copied()
    }

    /// A series without labels.
    fn value(&self, name: &str) -> f64 {
        self.get(name, &[])
    }

    /// Every series of sample name `name`.
    fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a Labels, f64)> + 'a {
        self.samples
            .iter()
            .filter(move |((n, _), _)| n == name)
            .map(|((_, l), v)| (l, *v))
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A sample value as Go's `ParseFloat` writes them: digits, or `NaN`, `+Inf`, `-Inf`.
fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "NaN" => return Ok(f64::NAN),
        "+Inf" => return Ok(f64::INFINITY),
        "-Inf" => return Ok(f64::NEG_INFINITY),
        _ => {}
    }
    let plausible = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
        && s.chars().any(|c| c.is_ascii_digit());
    if !plausible {
        return Err(format!("bad value {s:?}"));
    }
    s.parse::<f64>()
        .map_err(|e| format!("bad value {s:?}: {e}"))
}

/// Checks the escapes of a HELP docstring (only `\\` and `\n`).
fn check_help_escapes(doc: &str) -> Result<(), String> {
    let mut chars = doc.chars();
    while let Some(c) = chars.next() {
        if c == '\\' && !matches!(chars.next(), Some('\\' | 'n')) {
            return Err(format!("bad escape in HELP {doc:?}"));
        }
    }
    Ok(())
}

/// Parses `{name="value",...}` at the start of `s`; returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Labels::new();
    let mut rest = s.strip_prefix('{').ok_or("labels must start with {")?;
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let name = &rest[..eq];
        if !is_label_name(name) || name.starts_with("__") {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value must be quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape in label value: {other:?}")),
                },
                Some((_, '\n')) => return Err("newline in label value".into()),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("duplicate label {name:?}"));
        }
        rest = &rest[end + 1..];
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("labels must be separated by commas".into());
        }
    }
}

/// Parses a whole exposition and rejects anything the format does not allow, or that no
/// well-behaved exporter writes: unknown comments, blank lines, samples outside their family's
/// group or without a TYPE, families without HELP, duplicate series, negative counters,
/// counters not named `_total`, and histograms whose buckets are not cumulative or whose `+Inf`
/// bucket differs from `_count`.
fn parse(text: &str) -> Result<Exposition, String> {
    let body = text
        .strip_suffix('\n')
        .ok_or("the exposition must end with a newline")?;
    if body.is_empty() {
        return Err("empty exposition".into());
    }
    let mut out = Exposition::default();
    // The family whose samples may come now, and families whose group has ended.
    let mut current: Option<String> = None;
    let mut closed: std::collections::HashSet<String> = Default::default();
    let mut with_samples: std::collections::HashSet<String> = Default::default();
    for (n, line) in body.split('\n').enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.is_empty() {
            return Err(at("blank line".into()));
        }
        if let Some(comment) = line.strip_prefix('#') {
            let parts: Vec<&str> = comment.splitn(4, ' ').collect();
            let (keyword, name) = match parts.as_slice() {
                ["", keyword, name, _] => (*keyword, *name),
                _ => return Err(at("malformed comment".into())),
            };
            if !is_metric_name(name) {
                return Err(at(format!("bad metric name {name:?}")));
            }
            if closed.contains(name) || with_samples.contains(name) {
                return Err(at(format!("{keyword} after the samples of {name}")));
            }
            if current.as_deref() != Some(name) {
                if let Some(prev) = current.take() {
                    closed.insert(prev);
                }
                current = Some(name.to_string());
            }
            match keyword {
                "HELP" => {
                    let doc = parts[3];
                    if doc.trim().is_empty() {
                        return Err(at("empty HELP".into()));
                    }
                    check_help_escapes(doc).map_err(at)?;
                    if out.help.insert(name.into(), doc.into()).is_some() {
                        return Err(at("second HELP".into()));
                    }
                }
                "TYPE" => {
                    let kind = match parts[3] {
                        "counter" => Kind::Counter,
                        "gauge" => Kind::Gauge,
                        "histogram" => Kind::Histogram,
                        "summary" => Kind::Summary,
                        "untyped" => Kind::Untyped,
                        other => return Err(at(format!("unknown type {other:?}"))),
                    };
                    if out.kinds.insert(name.into(), kind).is_some() {
                        return Err(at("second TYPE".into()));
                    }
                }
                _ => return Err(at("comment other than HELP or TYPE".into())),
            }
            continue;
        }

        // A sample: name, optional labels, one space, value, optional timestamp.
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (Labels::new(), &line[name_end..])
        };
        let rest = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("the value must follow one space".into()))?;
        let mut fields = rest.split(' ');
        let value = parse_value(fields.next().unwrap_or_default()).map_err(at)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|_| at(format!("bad timestamp {ts:?}")))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing fields".into()));
        }

        let family = current
            .clone()
            .ok_or_else(|| at("sample before any TYPE".into()))?;
        let kind = *out
            .kinds
            .get(&family)
            .ok_or_else(|| at(format!("family {family} has no TYPE")))?;
        let suffix = name.strip_prefix(family.as_str());
        let fits = match kind {
            Kind::Counter | Kind::Gauge | Kind::Untyped => suffix == Some(""),
            Kind::Histogram => matches!(suffix, Some("_bucket" | "_sum" | "_count")),
            Kind::Summary => matches!(suffix, Some("" | "_sum" | "_count")),
        };
        if !fits {
            return Err(at(format!(
                "sample {name} is not part of family {family} ({kind:?}): no TYPE, or not grouped"
            )));
        }
        let is_bucket = kind == Kind::Histogram && suffix == Some("_bucket");
        if is_bucket != labels.contains_key("le") {
            return Err(at(
                "`le` belongs on histogram buckets, and only there".into()
            ));
        }
        if is_bucket {
            parse_value(&labels["le"]).map_err(at)?;
        }
        if kind == Kind::Counter {
            if !name.ends_with("_total") {
                return Err(at("counter names end with _total".into()));
            }
            if value.is_nan() || value < 0.0 || value.is_infinite() {
                return Err(at("a counter is finite and not negative".into()));
            }
        }
        with_samples.insert(family);
        if out.samples.insert((name.into(), labels), value).is_some() {
            return Err(at("duplicate series".into()));
        }
    }

    for (family, kind) in &out.kinds {
        if !out.help.contains_key(family) {
            return Err(format!("family {family} has no HELP"));
        }
        if !with_samples.contains(family) {
            return Err(format!("family {family} has no sample"));
        }
        if *kind == Kind::Histogram {
            check_histogram(&out, family)?;
        }
    }
    if let Some(orphan) = out.help.keys().find(|f| !out.kinds.contains_key(*f)) {
        return Err(format!("family {orphan} has HELP but no TYPE"));
    }
    Ok(out)
}

/// Buckets sorted by bound, cumulative, ending with `+Inf` equal to `_count`; `_sum` present.
fn check_histogram(exp: &Exposition, family: &str) -> Result<(), String> {
    let mut groups: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
    for (labels, count) in exp.series(&format!("{family}_bucket")) {
        let mut rest = labels.clone();
        let le = parse_value(&rest.remove("le").expect("le checked"))?;
        groups.entry(rest).or_default().push((le, count));
    }
    if groups.is_empty() {
        return Err(format!("histogram {family} has no buckets"));
    }
    for (labels, mut buckets) in groups {
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        for pair in buckets.windows(2) {
            if pair[0].0 == pair[1].0 {
                return Err(format!("{family}{labels:?}: bucket le={} twice", pair[0].0));
            }
            if pair[1].1 < pair[0].1 {
                return Err(format!("{family}{labels:?}: buckets are not cumulative"));
            }
        }
        let (last_le, inf_count) = *buckets.last().expect("a bucket");
        if last_le != f64::INFINITY {
            return Err(format!("{family}{labels:?}: no +Inf bucket"));
        }
        let key = |suffix: &str| (format!("{family}{suffix}"), labels.clone());
        let count = exp
            .samples
            .get(&key("_count"))
            .ok_or_else(|| format!("{family}{labels:?}: no _count"))?;
        if *count != inf_count {
            return Err(format!(
                "{family}{labels:?}: +Inf bucket {inf_count} != _count {count}"
            ));
        }
        if !exp.samples.contains_key(&key("_sum")) {
            return Err(format!("{family}{labels:?}: no _sum"));
        }
    }
    Ok(())
}

#[test]
fn the_strict_parser_accepts_the_format_and_rejects_garbage() {
    let good = "# HELP a_total Things.\n# TYPE a_total counter\na_total{x=\"q\\\"\\\\\"} 3\n\
                # HELP g Level.\n# TYPE g gauge\ng -1.5e3\n\
                # HELP h Sizes.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\n\
                h_sum 4\nh_count 2\n";
    let exp = parse(good).unwrap();
    assert_eq!(exp.get("a_total", &[("x", "q\"\\")]), 3.0);
    assert_eq!(exp.value("g"), -1500.0);

    let help = "# HELP m M.\n# TYPE m gauge\n";
    let hist = "# HELP h H.\n# TYPE h histogram\n";
    let bad = [
        ("garbage", "garbage\n".to_string()),
        ("no trailing newline", format!("{help}m 1")),
        ("blank line", format!("{help}\nm 1\n")),
        ("sample without TYPE", "# HELP m M.\nm 1\n".to_string()),
        ("sample of another family", format!("{help}other 1\n")),
        ("family without HELP", "# TYPE m gauge\nm 1\n".to_string()),
        ("family without samples", help.to_string()),
        ("non-numeric value", format!("{help}m one\n")),
        ("rust-only float spelling", format!("{help}m inf\n")),
        ("two spaces", format!("{help}m  1\n")),
        ("trailing junk", format!("{help}m 1 2 3\n")),
        ("bad timestamp", format!("{help}m 1 soon\n")),
        ("unterminated labels", format!("{help}m{{a=\"b\" 1\n")),
        ("unquoted label", format!("{help}m{{a=b}} 1\n")),
        ("bad escape", format!("{help}m{{a=\"\\x\"}} 1\n")),
        ("duplicate label", format!("{help}m{{a=\"1\",a=\"2\"}} 1\n")),
        ("duplicate series", format!("{help}m 1\nm 2\n")),
        ("stray comment", format!("# hello\n{help}m 1\n")),
        (
            "unknown type",
            "# HELP m M.\n# TYPE m weird\nm 1\n".to_string(),
        ),
        (
            "counter not _total",
            "# HELP c C.\n# TYPE c counter\nc 1\n".to_string(),
        ),
        (
            "negative counter",
            "# HELP c_total C.\n# TYPE c_total counter\nc_total -1\n".to_string(),
        ),
        (
            "regrouped family",
            format!("{help}m{{a=\"1\"}} 1\n# HELP n N.\n# TYPE n gauge\nn 1\nm{{a=\"2\"}} 1\n"),
        ),
        (
            "non-cumulative buckets",
            format!(
                "{hist}h_bucket{{le=\"1\"}} 2\nh_bucket{{le=\"+Inf\"}} 1\nh_sum 1\nh_count 1\n"
            ),
        ),
        (
            "+Inf differs from _count",
            format!("{hist}h_bucket{{le=\"+Inf\"}} 2\nh_sum 1\nh_count 3\n"),
        ),
        (
            "no +Inf bucket",
            format!("{hist}h_bucket{{le=\"1\"}} 1\nh_sum 1\nh_count 1\n"),
        ),
        (
            "le outside buckets",
            format!("{hist}h_bucket{{le=\"+Inf\"}} 1\nh_sum{{le=\"1\"}} 1\nh_count 1\n"),
        ),
    ];
    for (what, text) in bad {
        assert!(parse(&text).is_err(), "accepted {what}: {text:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers: scraping, raw clients.
// ---------------------------------------------------------------------------------------------

/// `GET /metrics` over plain HTTP/1.1: the Content-Type and the strictly parsed body.
async fn scrape_with_type(server: &TestServer) -> (String, Exposition, String) {
    let addr = server.running().local_addr();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut raw))
        .await
        .expect("metrics in time")
        .unwrap();
    let response = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .expect("a Content-Type");
    // Neither chunked nor compressed: the body is the exposition as is.
    let exp = parse(body).unwrap_or_else(|e| panic!("invalid exposition: {e}\n{body}"));
    (content_type, exp, body.to_string())
}

async fn scrape(server: &TestServer) -> Exposition {
    scrape_with_type(server).await.1
}

/// Scrapes until `ready` holds; panics with `what` after [`WAIT`].
async fn scrape_until(
    server: &TestServer,
    what: &str,
    ready: impl Fn(&Exposition) -> bool,
) -> Exposition {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let exp = scrape(server).await;
        if ready(&exp) {
            return exp;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next binary frame the server sends (pings are answered by tungstenite).
async fn next_binary(ws: &mut Raw) -> Vec<u8> {
    let read = async {
        loop {
            match ws.next().await {
                Some(Ok(Ws::Binary(b))) => return b.to_vec(),
                Some(Ok(Ws::Ping(_) | Ws::Pong(_))) => continue,
                other => panic!("expected a binary frame, got {other:?}"),
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("frame in time")
}

/// Closes normally from the client side and waits for the server's answer.
async fn close_raw(mut ws: Raw) {
    ws.close(None).await.expect("close");
    let drain = async { while let Some(Ok(_)) = ws.next().await {} };
    tokio::time::timeout(WAIT, drain)
        .await
        .expect("closed in time");
}

/// `n` incremental Yjs updates, each as a y-websocket update frame.
fn update_frames(n: usize) -> Vec<Vec<u8>> {
    let doc = yrs::Doc::new();
    (0..n)
        .map(|i| {
            let before = doc.transact().state_vector();
            append_text(&doc, "t", &format!("<{i}>"));
            let update = doc.transact().encode_state_as_update_v1(&before);
            Message::Sync(SyncMessage::Update(&update)).to_frame()
        })
        .collect()
}

/// An awareness frame with `entries` (client id, clock, JSON state).
fn awareness_frame(entries: &[(u64, u64, &str)]) -> Vec<u8> {
    let update = AwarenessUpdate {
        entries: entries
            .iter()
            .map(|&(client_id, clock, state)| AwarenessEntry {
                client_id,
                clock,
                state,
            })
            .collect(),
    };
    let mut payload = Vec::new();
    update.encode(&mut payload);
    Message::Awareness(&payload).to_frame()
}

/// Difference of one series between two scrapes (missing counts as 0 before).
fn delta(before: &Exposition, after: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.get(name, labels) - before.try_get(name, labels).unwrap_or(0.0)
}

fn close_labels(code: CloseCode) -> [(&'static str, String); 2] {
    [
        ("code", code.code().to_string()),
        ("reason", code.as_str().to_string()),
    ]
}

fn closes(exp: &Exposition, code: CloseCode) -> f64 {
    let [(k1, v1), (k2, v2)] = close_labels(code);
    exp.get("tandem_closes_total", &[(k1, &v1), (k2, &v2)])
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn exposition_is_strictly_valid_and_has_every_family() {
    let _serial = SERIAL.lock().await;
    let mut server = TestServer::start().await;
    let room = "private-room-name-7f3a";
    let c = Client::connect(&server.url(room)).await.unwrap();
    c.wait_synced(WAIT).await.unwrap();
    append_text(c.doc(), "t", "x");
    c.wait_stored(WAIT).await.unwrap();

    let (content_type, exp, body) = scrape_with_type(&server).await;
    assert_eq!(content_type, "text/plain; version=0.0.4");

    let want = [
        // Connections, rooms, traffic, fan-out.
        ("tandem_connections", Kind::Gauge),
        ("tandem_connections_opened_total", Kind::Counter),
        ("tandem_rooms_loaded", Kind::Gauge),
        ("tandem_room_load_failures_total", Kind::Counter),
        ("tandem_peers_joined_total", Kind::Counter),
        ("tandem_room_peers", Kind::Histogram),
        ("tandem_frames_received_total", Kind::Counter),
        ("tandem_received_bytes_total", Kind::Counter),
        ("tandem_frames_sent_total", Kind::Counter),
        ("tandem_sent_bytes_total", Kind::Counter),
        ("tandem_updates_applied_total", Kind::Counter),
        ("tandem_fanout_deliveries_total", Kind::Counter),
        ("tandem_fanout_duration_seconds", Kind::Histogram),
        ("tandem_awareness_states", Kind::Gauge),
        // Store.
        ("tandem_store_append_duration_seconds", Kind::Histogram),
        ("tandem_store_commit_duration_seconds", Kind::Histogram),
        ("tandem_store_group_size", Kind::Histogram),
        ("tandem_store_errors_total", Kind::Counter),
        ("tandem_compactions_total", Kind::Counter),
        // Closes and refusals.
        ("tandem_closes_total", Kind::Counter),
        ("tandem_try_again_later_closes_total", Kind::Counter),
        ("tandem_readonly_writes_dropped_total", Kind::Counter),
        // Broker, and the Redis broker's own counters.
        ("tandem_broker_published_total", Kind::Counter),
        ("tandem_broker_received_total", Kind::Counter),
        ("tandem_broker_publish_dropped_total", Kind::Counter),
        ("tandem_broker_gaps_total", Kind::Counter),
        ("tandem_broker_resyncs_total", Kind::Counter),
        ("tandem_redis_published_total", Kind::Counter),
        ("tandem_redis_publish_failed_total", Kind::Counter),
        ("tandem_redis_queue_full_total", Kind::Counter),
        ("tandem_redis_received_total", Kind::Counter),
        ("tandem_redis_gaps_total", Kind::Counter),
        ("tandem_redis_reconnects_total", Kind::Counter),
        // The process.
        ("process_cpu_seconds_total", Kind::Counter),
        ("process_resident_memory_bytes", Kind::Gauge),
    ];
    for (family, kind) in want {
        assert_eq!(exp.kinds.get(family), Some(&kind), "family {family}");
    }
    // Every close code, the ones added later included, has its series.
    for code in CloseCode::ALL {
        closes(&exp, code);
    }
    for reason in ["slow_consumer", "store_backlog", "load_failed", "room_busy"] {
        exp.get("tandem_try_again_later_closes_total", &[("reason", reason)]);
    }
    for op in ["append", "load", "compact"] {
        exp.get("tandem_store_errors_total", &[("operation", op)]);
    }
    assert!(exp.value("process_resident_memory_bytes") > 0.0);
    assert!(exp.value("tandem_store_group_size_count") >= 1.0);

    // No unbounded label: only these label names, and no room name anywhere.
    for (name, labels) in exp.samples.keys() {
        for label in labels.keys() {
            assert!(
                ["code", "reason", "operation", "le"].contains(&label.as_str()),
                "{name} has label {label}"
            );
        }
    }
    assert!(!body.contains(room), "a room name leaked into /metrics");

    c.close().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn counters_move_by_exactly_what_clients_did() {
    let _serial = SERIAL.lock().await;
    let mut server = TestServer::start_with(|c| {
        c.session.max_message_bytes = 64 << 10;
        c.rooms.idle_grace = Duration::from_millis(50);
    })
    .await;
    let url = server.url("counted");
    let before = scrape(&server).await;
    let conns = before.value("tandem_connections");
    let rooms = before.value("tandem_rooms_loaded");

    // Two raw clients; each first gets the room's sync step 1.
    let mut a = raw(&url).await;
    let mut b = raw(&url).await;
    let mut bytes_out = next_binary(&mut a).await.len() + next_binary(&mut b).await.len();

    // A sends five updates; the room relays each to B.
    let frames = update_frames(5);
    let bytes_in: usize = frames.iter().map(Vec::len).sum();
    for f in &frames {
        send_binary(&mut a, f.clone()).await;
    }
    for _ in &frames {
        bytes_out += next_binary(&mut b).await.len();
    }
    // All five committed by the group-commit writer.
    let mid = scrape_until(&server, "five updates stored", |e| {
        delta(&before, e, "tandem_store_group_size_sum", &[]) == 5.0
    })
    .await;
    assert_eq!(mid.value("tandem_connections"), conns + 2.0);
    assert_eq!(mid.value("tandem_rooms_loaded"), rooms + 1.0);

    // A malformed frame: refused with 1007 invalid_data.
    let mut bad = raw(&url).await;
    bytes_out += next_binary(&mut bad).await.len();
    let garbage = vec![0xde, 0xad, 0xbe, 0xef, 0x00, 0x13];
    send_binary(&mut bad, garbage.clone()).await;
    assert_eq!(expect_close(&mut bad).await.0, 1007);
    drop(bad);
    // Gone from the room before the next joins (its leave is queued ahead of that join).
    scrape_until(&server, "the refused connection to end", |e| {
        e.value("tandem_connections") == conns + 2.0
    })
    .await;

    // An oversize message: refused with 1009 too_big, before it counts as a received frame.
    let mut big = raw(&url).await;
    bytes_out += next_binary(&mut big).await.len();
    let _ = big.send(Ws::binary(vec![0u8; 100 << 10])).await;
    assert_eq!(expect_close(&mut big).await.0, 1009);
    drop(big);

    close_raw(a).await;
    close_raw(b).await;
    let after = scrape_until(&server, "every connection closed, the room unloaded", |e| {
        e.value("tandem_connections") == conns && e.value("tandem_rooms_loaded") == rooms
    })
    .await;

    let d = |name: &str| delta(&before, &after, name, &[]);
    assert_eq!(d("tandem_connections_opened_total"), 4.0);
    assert_eq!(d("tandem_peers_joined_total"), 4.0);
    // Peers in the room at each join: 1, 2, 3, then 3 again (the refused one had left).
    assert_eq!(d("tandem_room_peers_count"), 4.0);
    assert_eq!(d("tandem_room_peers_sum"), 9.0);
    for (le, n) in [("1", 1.0), ("2", 2.0), ("3", 4.0), ("+Inf", 4.0)] {
        assert_eq!(
            delta(&before, &after, "tandem_room_peers_bucket", &[("le", le)]),
            n,
            "le={le}"
        );
    }
    // In: five updates and the malformed frame; the oversize one never became a frame.
    assert_eq!(d("tandem_frames_received_total"), 6.0);
    assert_eq!(
        d("tandem_received_bytes_total"),
        (bytes_in + garbage.len()) as f64
    );
    // Out: a sync step 1 to each of the four joiners and the five relayed updates to B.
    assert_eq!(d("tandem_frames_sent_total"), 9.0);
    assert_eq!(d("tandem_sent_bytes_total"), bytes_out as f64);
    assert_eq!(d("tandem_updates_applied_total"), 5.0);
    assert_eq!(d("tandem_fanout_deliveries_total"), 5.0);
    assert_eq!(d("tandem_fanout_duration_seconds_count"), 5.0);
    // Refusals, under their code and reason; no other close counted.
    for code in CloseCode::ALL {
        let want = match code {
            CloseCode::InvalidData | CloseCode::TooBig => 1.0,
            _ => 0.0,
        };
        assert_eq!(closes(&after, code) - closes(&before, code), want, "{code}");
    }
    for (labels, v) in after.series("tandem_try_again_later_closes_total") {
        let reason = labels["reason"].as_str();
        let was = before.get("tandem_try_again_later_closes_total", &[("reason", reason)]);
        assert_eq!(v, was, "1013 closes for {reason}");
    }
    // The store: five updates in one or more groups, one append and one commit per group.
    let groups = d("tandem_store_group_size_count");
    assert_eq!(d("tandem_store_group_size_sum"), 5.0);
    assert!((1.0..=5.0).contains(&groups), "{groups} groups");
    assert_eq!(d("tandem_store_append_duration_seconds_count"), groups);
    assert_eq!(d("tandem_store_commit_duration_seconds_count"), groups);
    for (labels, v) in after.series("tandem_store_errors_total") {
        let op = labels["operation"].as_str();
        assert_eq!(
            v,
            before.get("tandem_store_errors_total", &[("operation", op)])
        );
    }
    // The in-process view agrees with the exported one.
    assert_eq!(
        METRICS.closes.get(CloseCode::TooBig) as f64,
        closes(&after, CloseCode::TooBig)
    );
    server.shutdown().await;
}

#[tokio::test]
async fn awareness_states_are_counted_while_held() {
    let _serial = SERIAL.lock().await;
    let mut server = TestServer::start().await;
    let url = server.url("present");
    let before = scrape(&server).await.value("tandem_awareness_states");

    let mut a = raw(&url).await;
    next_binary(&mut a).await;
    send_binary(
        &mut a,
        awareness_frame(&[(11, 1, "{\"n\":1}"), (12, 1, "{}")]),
    )
    .await;
    next_binary(&mut a).await; // The echo: the room took it.
    let held = scrape(&server).await.value("tandem_awareness_states");
    assert_eq!(held, before + 2.0);

    // One client announces it left (a null state with a newer clock).
    send_binary(&mut a, awareness_frame(&[(12, 2, "null")])).await;
    next_binary(&mut a).await;
    assert_eq!(
        scrape(&server).await.value("tandem_awareness_states"),
        before + 1.0
    );

    // The connection closes: its remaining state goes.
    close_raw(a).await;
    scrape_until(&server, "the closed connection's state to go", |e| {
        e.value("tandem_awareness_states") == before
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_close_is_counted_under_its_reason() {
    let _serial = SERIAL.lock().await;
    let mut server = TestServer::start_with(|c| {
        c.session.outbox_bytes = 128 << 10;
        c.session.max_message_bytes = 128 << 10;
    })
    .await;
    let url = server.url("slow");
    let before = scrape(&server).await;
    let mut writer = raw(&url).await;
    next_binary(&mut writer).await;
    // Sends one valid message, then never reads a byte.
    let mut sleeper = raw(&url).await;
    send_binary(&mut sleeper, Message::QueryAwareness.to_frame()).await;

    // 64 KiB updates, paced well under any per-connection rate limit, until the kernel's socket
    // buffers and then the sleeper's outbox budget are full.
    let start = METRICS.try_again_later.slow_consumer.get();
    let doc = yrs::Doc::new();
    let chunk = "x".repeat(64 << 10);
    let deadline = tokio::time::Instant::now() + WAIT;
    while METRICS.try_again_later.slow_consumer.get() == start {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sleeper was never closed as a slow consumer"
        );
        let sv = doc.transact().state_vector();
        append_text(&doc, "t", &chunk);
        let update = doc.transact().encode_state_as_update_v1(&sv);
        send_binary(
            &mut writer,
            Message::Sync(SyncMessage::Update(&update)).to_frame(),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after = scrape(&server).await;
    let slow = [("reason", "slow_consumer")];
    assert_eq!(
        delta(
            &before,
            &after,
            "tandem_try_again_later_closes_total",
            &slow
        ),
        1.0
    );
    assert_eq!(
        closes(&after, CloseCode::TryAgainLater) - closes(&before, CloseCode::TryAgainLater),
        1.0
    );
    drop(sleeper);
    close_raw(writer).await;
    server.shutdown().await;
}
