//! `join-storm`: N clients join one room that holds a large document, all at once, against one or
//! more targets (tandem, the stock y-websocket server, Hocuspocus), one after another: how long
//! each client takes to get the whole document, how many fail, and what the storm costs the
//! server (CPU, memory, bytes sent per joining client).
//!
//! Per target: a writer connects and builds the document (a Y.Text typed in bursts at moving
//! positions with a few deletions, and/or a Y.Array of small maps, until it encodes to about
//! `--doc-bytes`), one sync update message per transaction. A reference client then joins until
//! the step 2 it gets decodes to exactly the writer's document (state vector and content), so the
//! server holds all of it before the storm. Then N clients start together (or `--concurrency` at
//! a time): each opens its socket, sends sync step 1 with an empty state vector and stops its
//! clock when the step 2 answer has arrived. A few probes spread over the join order decode the
//! step 2 with yrs and check the content against the writer's; the others check its size against
//! the reference's. The server's CPU (user and system apart, `/proc/PID/stat`) is sampled when
//! the storm starts and when the last client is done; its RSS every [`RSS_SAMPLE`] in between.
//! The writer and every joined client stay connected until the storm is over; the RSS is read
//! once more after the joined clients closed.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use yrs::updates::decoder::Decode;
use yrs::{Any, Array, Doc, GetString, ReadTxn, StateVector, Text, Transact, Update};

use crate::peers::{self, Cell, Server, Target};
use crate::procstat;
use crate::wire::{self, ConnectOptions, Dialect, Tasks, Ws};

type Res<T> = Result<T, String>;

/// How often the server's RSS is read during the storm (for its peak).
const RSS_SAMPLE: Duration = Duration::from_millis(20);

/// How long the server may take after the writer's last update to serve the whole document.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long after the joined clients closed their sockets the server's RSS is read again.
const AFTER_CLOSE: Duration = Duration::from_secs(2);

/// Distinct errors kept in the report (the rest are only counted).
const ERRORS_KEPT: usize = 5;

/// What the document is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DocKind {
    /// One Y.Text (`text`).
    Text,
    /// One Y.Array (`items`) of small maps.
    Array,
    /// Both, about half of the edits each.
    Mixed,
}

/// Arguments of the `join-storm` scenario.
#[derive(Debug, clap::Args)]
pub struct JoinStormArgs {
    /// A server to measure; repeat to compare (the first tandem is the reference for ratios).
    #[arg(long = "target", value_enum, default_values_t = [Target::Tandem])]
    targets: Vec<Target>,
    /// Clients joining the room in the storm.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Joining clients that decode the document with yrs and check its content.
    #[arg(long, default_value_t = 4)]
    probes: usize,
    /// The document's encoded size to reach, in bytes (sync step 2 from an empty state vector).
    #[arg(long, default_value_t = 1_000_000)]
    doc_bytes: usize,
    /// What the document is made of.
    #[arg(long, value_enum, default_value_t = DocKind::Mixed)]
    doc_kind: DocKind,
    /// Edits per transaction (and per update message) while the writer builds the document.
    #[arg(long, default_value_t = 200)]
    edits_per_update: usize,
    /// Clients connecting at once; 0: all of them.
    #[arg(long, default_value_t = 0)]
    concurrency: usize,
    /// Deadline for the whole storm (every client is done or failed by then).
    #[arg(long, default_value = "120s", value_parser = crate::parse_secs)]
    timeout: Duration,
    /// The servers to start.
    #[command(flatten)]
    servers: peers::ServerPaths,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs the scenario against every target in turn and prints one report.
pub async fn join_storm(args: JoinStormArgs) -> Res<()> {
    if args.clients == 0
        || args.probes > args.clients
        || args.doc_bytes == 0
        || args.edits_per_update == 0
    {
        return Err(
            "need clients >= 1, probes <= clients, doc-bytes >= 1, edits-per-update >= 1".into(),
        );
    }
    let nofile = procstat::raise_nofile()?;
    if (args.clients as u64) * 2 + 200 > nofile {
        eprintln!(
            "warning: {} connections with an open-files limit of {nofile}",
            args.clients
        );
    }
    let build_start = Instant::now();
    let built = build_doc(args.doc_kind, args.doc_bytes, args.edits_per_update);
    let build_secs = build_start.elapsed().as_secs_f64();
    let mut runs = Vec::new();
    for &target in &args.targets {
        eprintln!("join-storm: {} ...", target.name());
        runs.push(peers::report_or_error(
            target,
            run_target(&args, &built, target).await,
        ));
    }
    let report = json!({
        "scenario": "join-storm",
        "clients": args.clients,
        "probes": args.probes,
        "concurrency": if args.concurrency == 0 { args.clients } else { args.concurrency },
        "doc": {
            "kind": format!("{:?}", args.doc_kind).to_lowercase(),
            "target_bytes": args.doc_bytes,
            "encoded_bytes": built.encoded_bytes,
            "update_messages": built.updates.len(),
            "update_bytes": built.updates.iter().map(Vec::len).sum::<usize>(),
            "text_bytes": built.expected.text.len(),
            "array_len": built.expected.array_len,
            "build_secs": build_secs,
        },
        "timeout_secs": args.timeout.as_secs_f64(),
        "open_files_limit": nofile,
        "cpu_per": "synced join",
        "runs": runs,
        "ratios_vs_tandem": ratios(&runs),
    });
    peers::emit(&report, None, args.json, print_table)
}

/// What a complete copy of the document holds.
struct Expected {
    state_vector: StateVector,
    text: String,
    array_len: u32,
}

impl Expected {
    /// Decodes a sync step 2 payload into a fresh document and compares it with this one.
    fn check(&self, step2: &[u8]) -> Res<()> {
        let update = Update::decode_v1(step2).map_err(|e| format!("step 2 decode: {e}"))?;
        let doc = Doc::new();
        let text = doc.get_or_insert_text("text");
        let arr = doc.get_or_insert_array("items");
        let mut txn = doc.transact_mut();
        txn.apply_update(update)
            .map_err(|e| format!("step 2 apply: {e}"))?;
        if txn.state_vector() != self.state_vector {
            return Err("state vector differs from the writer's".into());
        }
        let got = text.get_string(&txn);
        if got != self.text {
            return Err(format!(
                "text differs: {} bytes, expected {}",
                got.len(),
                self.text.len()
            ));
        }
        let len = arr.len(&txn);
        if len != self.array_len {
            return Err(format!(
                "array has {len} items, expected {}",
                self.array_len
            ));
        }
        Ok(())
    }
}

/// The document the writer sends, built once and sent to every target.
struct Built {
    /// One v1 update per transaction, in order.
    updates: Vec<Vec<u8>>,
    /// What a complete copy holds.
    expected: Expected,
    /// The whole document encoded from an empty state vector, in bytes.
    encoded_bytes: usize,
}

/// A small deterministic generator (64-bit LCG, high bits), so that every run builds the same
/// document.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

const WORDS: [&str; 12] = [
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
];

/// Edits a document until it encodes to at least `target_bytes`: text typed word by word at a
/// cursor that jumps to a random place every 16 edits or so, with a short deletion every 32
/// edits or so (tombstones and a delete set, as real documents have), and array items appended,
/// or inserted at a random index one time in eight.
fn build_doc(kind: DocKind, target_bytes: usize, edits_per_update: usize) -> Built {
    let doc = Doc::new();
    let text = doc.get_or_insert_text("text");
    let arr = doc.get_or_insert_array("items");
    let mut rng = Lcg(0x005e_ed0f_1012);
    let mut cursor = 0u32;
    let mut updates = Vec::new();
    let mut approx = 0usize;
    let mut n = 0u64;
    let encoded_bytes = loop {
        let mut txn = doc.transact_mut();
        for _ in 0..edits_per_update {
            let word = WORDS[rng.below(WORDS.len() as u64) as usize];
            let on_text = match kind {
                DocKind::Text => true,
                DocKind::Array => false,
                DocKind::Mixed => rng.below(2) == 0,
            };
            if on_text {
                let len = text.len(&txn);
                if rng.below(16) == 0 {
                    cursor = rng.below(u64::from(len) + 1) as u32;
                }
                cursor = cursor.min(len);
                if rng.below(32) == 0 && cursor < len {
                    let del = (1 + rng.below(8) as u32).min(len - cursor);
                    text.remove_range(&mut txn, cursor, del);
                } else {
                    let chunk = format!("{word} ");
                    text.insert(&mut txn, cursor, &chunk);
                    cursor += chunk.len() as u32;
                }
            } else {
                let item = Any::from(HashMap::from([
                    ("n".to_string(), Any::from(n as f64)),
                    ("w".to_string(), Any::from(word)),
                ]));
                let len = arr.len(&txn);
                if rng.below(8) == 0 {
                    let at = rng.below(u64::from(len) + 1) as u32;
                    arr.insert(&mut txn, at, item);
                } else {
                    arr.push_back(&mut txn, item);
                }
            }
            n += 1;
        }
        let update = txn.encode_update_v1();
        drop(txn);
        approx += update.len();
        updates.push(update);
        if approx >= target_bytes {
            // The sum of the updates overestimates (headers, deletions merged later): check.
            let exact = doc
                .transact()
                .encode_state_as_update_v1(&StateVector::default())
                .len();
            if exact >= target_bytes {
                break exact;
            }
            approx = exact;
        }
    };
    let txn = doc.transact();
    let expected = Expected {
        state_vector: txn.state_vector(),
        text: text.get_string(&txn),
        array_len: arr.len(&txn),
    };
    Built {
        updates,
        expected,
        encoded_bytes,
    }
}

/// A finished join: the socket (kept open until the storm ends), the frame holding the step 2,
/// where its payload lies in it, and what arrived until then.
struct Joined {
    ws: Ws,
    frame: Bytes,
    step2: Range<usize>,
    /// Payload bytes of every frame received after the socket opened, the step 2's included.
    bytes: u64,
    /// When the step 2 arrived.
    at: Instant,
}

impl Joined {
    fn step2(&self) -> &[u8] {
        &self.frame[self.step2.clone()]
    }
}

/// Opens a socket to the room, sends step 1 with an empty state vector and waits for the step 2
/// answer (the server's own step 1 and awareness may come first).
async fn join(addr: &str, room: &str, dialect: Dialect) -> Res<Joined> {
    let mut ws = wire::open(addr, room, dialect, ConnectOptions::default()).await?;
    ws.send(Message::Binary(dialect.step1(room, &[0]).into()))
        .await
        .map_err(|e| format!("send step 1: {e}"))?;
    let mut bytes = 0u64;
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(frame))) => {
                bytes += frame.len() as u64;
                let found = wire::parse(dialect, &frame).step2.first().map(|s| {
                    let from = s.as_ptr() as usize - frame.as_ptr() as usize;
                    from..from + s.len()
                });
                if let Some(step2) = found {
                    return Ok(Joined {
                        ws,
                        frame,
                        step2,
                        bytes,
                        at: Instant::now(),
                    });
                }
            }
            Some(Ok(_)) => {}
            other => return Err(format!("socket ended before step 2: {other:?}")),
        }
    }
}

/// Starts `target`, runs the storm against it and stops it; the run's report.
async fn run_target(args: &JoinStormArgs, built: &Built, target: Target) -> Res<Value> {
    // The default of 5,000 connections per room would cap --clients.
    let server = Server::start(
        target,
        &args.servers.tandem,
        &args.servers.peers,
        &["--max-connections-per-room", "0"],
    )
    .await?;
    let mut out = storm(args, built, target, &server).await;
    if let Ok(report) = &mut out {
        report["server_warnings"] = json!(server.warnings());
    }
    server.stop().await;
    out
}

/// One client's outcome in the storm.
struct Outcome {
    /// Connect start to step 2 received.
    elapsed: Duration,
    step2_len: usize,
    bytes: u64,
    /// Probes only: the content check, and how long decoding and checking took.
    check: Option<(Res<()>, Duration)>,
}

async fn storm(args: &JoinStormArgs, built: &Built, target: Target, server: &Server) -> Res<Value> {
    let dialect = target.dialect();
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let room = format!("loadtest-join-{stamp}");
    let idle = procstat::sample(server.pid)?;

    // The writer builds the document and stays, draining what the server sends it (the stock
    // server echoes updates), so that the room stays loaded.
    let mut keep = Tasks::default();
    let write_start = Instant::now();
    let writer = wire::handshake(&server.addr, &room, dialect, ConnectOptions::default()).await?;
    let (mut writer_sink, mut stream) = writer.split();
    keep.0.push(tokio::spawn(async move {
        while let Some(Ok(_)) = stream.next().await {}
    }));
    for update in &built.updates {
        writer_sink
            .send(Message::Binary(dialect.update(&room, update).into()))
            .await
            .map_err(|e| format!("writer send: {e}"))?;
    }
    let write_secs = write_start.elapsed().as_secs_f64();

    // Wait until a fresh client gets the whole document.
    let settle_end = Instant::now() + SETTLE_TIMEOUT;
    let reference = loop {
        let left = settle_end.saturating_duration_since(Instant::now());
        let attempt = tokio::time::timeout(left, join(&server.addr, &room, dialect))
            .await
            .map_err(|_| format!("no complete document within {SETTLE_TIMEOUT:?}"))??;
        match built.expected.check(attempt.step2()) {
            Ok(()) => break attempt,
            Err(e) if Instant::now() >= settle_end => {
                return Err(format!("document incomplete after {SETTLE_TIMEOUT:?}: {e}"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    };
    let settle_secs = write_start.elapsed().as_secs_f64() - write_secs;
    let reference_len = reference.step2.len();
    drop(reference);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loaded = procstat::sample(server.pid)?;

    // The storm.
    let n = args.clients;
    let concurrency = if args.concurrency == 0 {
        n
    } else {
        args.concurrency
    };
    let sem = Arc::new(Semaphore::new(concurrency));
    let synced = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let expected = Arc::new(Expected {
        state_vector: built.expected.state_vector.clone(),
        text: built.expected.text.clone(),
        array_len: built.expected.array_len,
    });
    let start = Instant::now() + Duration::from_millis(100);
    let deadline = start + args.timeout;
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let probe = (1..=args.probes).any(|p| p * n / args.probes == i + 1);
        let (addr, room) = (server.addr.clone(), room.clone());
        let (sem, synced, failed) = (Arc::clone(&sem), Arc::clone(&synced), Arc::clone(&failed));
        let expected = Arc::clone(&expected);
        handles.push(tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let _permit = sem.acquire_owned().await;
            let t0 = Instant::now();
            let joined =
                match tokio::time::timeout_at(deadline.into(), join(&addr, &room, dialect)).await {
                    Ok(Ok(j)) => j,
                    Ok(Err(e)) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        return (Err(e), None);
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        return (Err("no step 2 before the storm's deadline".into()), None);
                    }
                };
            // Off the runtime's workers: decoding a large document would hold up the other
            // clients' reads (and their receive times).
            let check = if probe {
                let (frame, range) = (joined.frame.clone(), joined.step2.clone());
                tokio::task::spawn_blocking(move || {
                    let c0 = Instant::now();
                    (expected.check(&frame[range]), c0.elapsed())
                })
                .await
                .ok()
            } else {
                None
            };
            synced.fetch_add(1, Ordering::Relaxed);
            let outcome = Outcome {
                elapsed: joined.at.saturating_duration_since(t0),
                step2_len: joined.step2.len(),
                bytes: joined.bytes,
                check,
            };
            (Ok((outcome, joined.at)), Some(joined.ws))
        }));
    }

    // Watch: progress, the server's RSS, until every client is done or the deadline.
    tokio::time::sleep_until(start.into()).await;
    let (me0, m0, cpu0) = (
        procstat::sample(std::process::id())?,
        procstat::machine()?,
        procstat::sample(server.pid)?,
    );
    let bar = ProgressBar::new(n as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {elapsed} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix("join");
    let mut rss_peak = cpu0.rss_kib;
    loop {
        if let Ok(s) = procstat::sample(server.pid) {
            rss_peak = rss_peak.max(s.rss_kib);
        }
        let (ok, bad) = (
            synced.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
        );
        bar.set_position(ok + bad);
        bar.set_message(format!("{ok} synced, {bad} failed"));
        if ok + bad >= n as u64 || Instant::now() >= deadline + Duration::from_secs(1) {
            break;
        }
        tokio::time::sleep(RSS_SAMPLE).await;
    }
    bar.finish_and_clear();
    let (cpu1, me1, m1, t1) = (
        procstat::sample(server.pid)?,
        procstat::sample(std::process::id())?,
        procstat::machine()?,
        Instant::now(),
    );
    rss_peak = rss_peak.max(cpu1.rss_kib);

    let mut outcomes = Vec::with_capacity(n);
    let mut sockets = Tasks::default();
    let mut errors: Vec<(String, u64)> = Vec::new();
    let mut failures = 0u64;
    let mut last_at = start;
    for h in handles {
        let (result, ws) = match h.await {
            Ok(r) => r,
            Err(e) => (Err(format!("join task: {e}")), None),
        };
        match result {
            Ok((o, at)) => {
                last_at = last_at.max(at);
                outcomes.push(o);
            }
            Err(e) => {
                failures += 1;
                match errors.iter().position(|(m, _)| *m == e) {
                    Some(i) => errors[i].1 += 1,
                    None if errors.len() < ERRORS_KEPT => errors.push((e, 1)),
                    None => {}
                }
            }
        }
        // Hold the socket (reading nothing) until the report is done, then close it.
        if let Some(ws) = ws {
            sockets.0.push(tokio::spawn(async move {
                let _ws = ws;
                std::future::pending::<()>().await;
            }));
        }
    }
    let last = procstat::sample(server.pid)?;
    // What the server keeps once the joined clients left (the writer stays): per-connection
    // buffers go with their connections, allocator caches do not.
    drop(sockets);
    tokio::time::sleep(AFTER_CLOSE).await;
    let closed = procstat::sample(server.pid)?;
    drop(writer_sink);
    drop(keep);

    let mut hist = latency_histogram();
    let mut probe_ok = 0u64;
    let mut probe_errors = Vec::new();
    let mut check_max = Duration::ZERO;
    let mut short = 0u64;
    let (mut step2_min, mut step2_max) = (usize::MAX, 0usize);
    let mut bytes = 0u64;
    for o in &outcomes {
        let _ = hist.record((o.elapsed.as_micros() as u64).max(1));
        step2_min = step2_min.min(o.step2_len);
        step2_max = step2_max.max(o.step2_len);
        bytes += o.bytes;
        match &o.check {
            Some((Ok(()), d)) => {
                probe_ok += 1;
                check_max = check_max.max(*d);
            }
            Some((Err(e), _)) => probe_errors.push(e.clone()),
            None if o.step2_len < reference_len => short += 1,
            None => {}
        }
    }
    let joined = outcomes.len() as u64;
    let storm_secs = (t1 - start).as_secs_f64();
    let all_synced_secs = (failures == 0 && joined == n as u64)
        .then(|| last_at.saturating_duration_since(start).as_secs_f64());
    let per_join = |v: u64| {
        if joined == 0 {
            Value::Null
        } else {
            json!(v as f64 / joined as f64)
        }
    };
    Ok(json!({
        "target": target.name(),
        "pid": server.pid,
        "write_secs": write_secs,
        "settle_secs": settle_secs,
        "reference_step2_bytes": reference_len,
        "clients": n,
        "synced": joined,
        "failures": failures,
        "errors": errors.iter().map(|(e, c)| json!({ "error": e, "count": c })).collect::<Vec<_>>(),
        "probes_verified": probe_ok,
        "probe_errors": probe_errors,
        "probe_check_max_ms": check_max.as_secs_f64() * 1000.0,
        "short_step2": short,
        "step2_bytes": { "min": (joined > 0).then_some(step2_min), "max": (joined > 0).then_some(step2_max) },
        "complete": failures == 0 && probe_errors.is_empty() && short == 0 && joined == n as u64,
        "latency": peers::latency_json(&hist),
        "all_synced_secs": all_synced_secs,
        "last_synced_secs": last_at.saturating_duration_since(start).as_secs_f64(),
        "storm_secs": storm_secs,
        "cpu": procstat::cpu_json(&cpu0, &cpu1, storm_secs, joined),
        "machine": procstat::context_json(&m0, &m1, (&cpu0, &cpu1), (&me0, &me1), storm_secs),
        "bytes_received": {
            "total": bytes,
            "per_joined_client": per_join(bytes),
        },
        "memory_kib": {
            "rss_idle": idle.rss_kib,
            "rss_loaded": loaded.rss_kib,
            "rss_peak_storm": rss_peak,
            "rss_end": last.rss_kib,
            "rss_after_close": closed.rss_kib,
            "hwm": last.hwm_kib,
            "rss_growth_per_joined_client": per_join(last.rss_kib.saturating_sub(loaded.rss_kib)),
        },
    }))
}

/// Join times in µs, up to 10 minutes, 3 significant digits.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// Peer / tandem, per peer: CPU per synced join ([`peers::cpu_ratios`]), join time p50 and p99,
/// and the time until every client was synced.
fn ratios(runs: &[Value]) -> Value {
    let mut out = peers::cpu_ratios(runs);
    let Some(base) = runs
        .iter()
        .find(|r| r["target"] == "tandem" && r.get("error").is_none())
    else {
        return out;
    };
    for r in runs
        .iter()
        .filter(|r| r["target"] != "tandem" && r.get("error").is_none())
    {
        let q = |v: &Value, b: &Value| match (v.as_f64(), b.as_f64()) {
            (Some(a), Some(b)) if b > 0.0 => json!(a / b),
            _ => Value::Null,
        };
        let name = r["target"].as_str().unwrap_or("?");
        out[name]["join_p50"] = q(&r["latency"]["p50_ms"], &base["latency"]["p50_ms"]);
        out[name]["join_p99"] = q(&r["latency"]["p99_ms"], &base["latency"]["p99_ms"]);
        out[name]["last_synced"] = q(&r["last_synced_secs"], &base["last_synced_secs"]);
    }
    out
}

fn print_table(r: &Value) {
    let d = &r["doc"];
    println!(
        "join-storm: {} clients ({} probes, {} at once) join one room holding a {} document of {} bytes encoded ({} update messages); deadline {} s",
        r["clients"], r["probes"], r["concurrency"], d["kind"].as_str().unwrap_or("?"),
        d["encoded_bytes"], d["update_messages"], r["timeout_secs"]
    );
    let runs = r["runs"].as_array().cloned().unwrap_or_default();
    let f = peers::num;
    let yes_no = |v: &Value| match v.as_bool() {
        Some(true) => "yes".to_string(),
        Some(false) => "NO".to_string(),
        None => "-".to_string(),
    };
    let rows: Vec<(&str, Cell<'_>)> = vec![
        ("join p50 ms", Box::new(|v| f(&v["latency"]["p50_ms"], 1))),
        ("join p99 ms", Box::new(|v| f(&v["latency"]["p99_ms"], 1))),
        ("join max ms", Box::new(|v| f(&v["latency"]["max_ms"], 1))),
        (
            "all synced after s",
            Box::new(|v| f(&v["all_synced_secs"], 2)),
        ),
        ("synced", Box::new(|v| v["synced"].to_string())),
        ("failures", Box::new(|v| v["failures"].to_string())),
        (
            "probes verified",
            Box::new(|v| v["probes_verified"].to_string()),
        ),
        ("short step 2", Box::new(|v| v["short_step2"].to_string())),
        ("complete", Box::new(move |v| yes_no(&v["complete"]))),
        (
            "step 2 KiB",
            Box::new(|v| {
                f(
                    &json!(v["reference_step2_bytes"].as_f64().map(|b| b / 1024.0)),
                    1,
                )
            }),
        ),
        (
            "KiB sent / client",
            Box::new(|v| {
                f(
                    &json!(v["bytes_received"]["per_joined_client"]
                        .as_f64()
                        .map(|b| b / 1024.0)),
                    1,
                )
            }),
        ),
        (
            "user CPU ms (storm)",
            Box::new(|v| f(&json!(v["cpu"]["user_us"].as_f64().map(|u| u / 1000.0)), 1)),
        ),
        (
            "sys CPU ms (storm)",
            Box::new(|v| f(&json!(v["cpu"]["sys_us"].as_f64().map(|u| u / 1000.0)), 1)),
        ),
        (
            "user CPU µs / join",
            Box::new(|v| f(&v["cpu"]["user_us_per_delivery"], 0)),
        ),
        (
            "sys CPU µs / join",
            Box::new(|v| f(&v["cpu"]["sys_us_per_delivery"], 0)),
        ),
        ("server CPU %", Box::new(|v| f(&v["cpu"]["cpu_percent"], 1))),
        (
            "load generator cores",
            Box::new(|v| f(&v["machine"]["load_generator_cores"], 2)),
        ),
        (
            "other processes' cores",
            Box::new(|v| f(&v["machine"]["others_cores"], 2)),
        ),
        (
            "RSS loaded MiB",
            Box::new(|v| peers::mib(&v["memory_kib"]["rss_loaded"])),
        ),
        (
            "RSS peak (storm) MiB",
            Box::new(|v| peers::mib(&v["memory_kib"]["rss_peak_storm"])),
        ),
        (
            "RSS end MiB",
            Box::new(|v| peers::mib(&v["memory_kib"]["rss_end"])),
        ),
        (
            "RSS after close MiB",
            Box::new(|v| peers::mib(&v["memory_kib"]["rss_after_close"])),
        ),
        ("writer send s", Box::new(|v| f(&v["write_secs"], 2))),
    ];
    peers::print_comparison(&runs, &rows, &Value::Null);
    if let Some(m) = r["ratios_vs_tandem"].as_object() {
        for (peer, q) in m {
            println!(
                "{peer} / tandem: CPU per join user ×{}, sys ×{}, total ×{}; join p50 ×{}, p99 ×{}; last synced ×{}",
                f(&q["user_cpu_per_delivery"], 1),
                f(&q["sys_cpu_per_delivery"], 1),
                f(&q["total_cpu_per_delivery"], 1),
                f(&q["join_p50"], 1),
                f(&q["join_p99"], 1),
                f(&q["last_synced"], 1)
            );
        }
    }
    for run in &runs {
        let name = run["target"].as_str().unwrap_or("?");
        for e in run["errors"].as_array().into_iter().flatten() {
            println!(
                "{name}: {} × {}",
                e["count"],
                e["error"].as_str().unwrap_or("")
            );
        }
        for e in run["probe_errors"].as_array().into_iter().flatten() {
            println!("{name}: probe: {}", e.as_str().unwrap_or(""));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_document_reaches_its_size_and_checks_against_itself() {
        for kind in [DocKind::Text, DocKind::Array, DocKind::Mixed] {
            let built = build_doc(kind, 20_000, 50);
            assert!(built.encoded_bytes >= 20_000);
            // Replaying the writer's updates gives a complete copy; all but the last does not.
            let replay = |updates: &[Vec<u8>]| {
                let doc = Doc::new();
                let mut txn = doc.transact_mut();
                for u in updates {
                    txn.apply_update(Update::decode_v1(u).unwrap()).unwrap();
                }
                txn.encode_state_as_update_v1(&StateVector::default())
            };
            assert_eq!(built.expected.check(&replay(&built.updates)), Ok(()));
            let partial = replay(&built.updates[..built.updates.len() - 1]);
            assert!(built.expected.check(&partial).is_err());
        }
    }
}
