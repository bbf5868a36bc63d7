//! `tandem-loadtest`: measurements against real `tandem` processes on loopback.
//!
//! `hop` spawns one or two nodes (sharing a private `redis-server` and one store: a SQLite file by
//! default, a fresh Postgres database with `--postgres`), connects writers and a same-node
//! observer on node A and a cross-node observer on node B, sends a fixed number of updates at a
//! fixed rate and reports delivery latency (same-node, cross-node), storage acknowledgement
//! latency, Redis PUBLISHes per update and, with Postgres, rows and bytes written per update.
//! `rooms` runs R rooms × C clients against tandem, the stock y-websocket server and Hocuspocus
//! (`loadtest/peers/`) one after another and compares the servers' CPU per delivered update.
//! `fanout` is one writer and N observers in one room against the same targets: delivery
//! latency (p50 to max), losses, CPU and memory per delivery. `idle` holds N synced, silent
//! connections over R rooms (in several worker processes of this binary when N is large) and
//! reports the server's memory and CPU per idle connection, the kernel's socket memory and the
//! projection to a million connections. `soak` churns a steady population over R rooms for
//! minutes, samples the server's RSS, threads and open files every second and reports whether
//! they return to their baseline once everyone left. `rooms`, `fanout` and `soak` take
//! `--out DIR` for a results folder (report.json and SVG charts, [`charts`]); `rooms` and
//! `fanout` take `--rounds N` to run their targets round-robin N times and report each one's
//! median run ([`rounds`]). In both, the connections that only count updates speak raw
//! WebSocket ([`raw`]), so that the load generator takes as little CPU as it can from the
//! server it measures.
//! `join-storm` has N clients join one room holding a large document at once (time to the whole
//! document, failures, server CPU, peak memory, bytes per join); `awareness` has R rooms × C
//! clients send cursor awareness updates at a rate (latency, deliveries per second, losses, CPU
//! per delivery); both against the same targets.
//! `disk` measures the disk's `fdatasync` latency, the floor under any durable
//! acknowledgement; `relay` measures the floor under `rooms`' CPU per delivery: a bare relay
//! thread that sends each delivery with one `write` and does nothing else (`--rooms 1 --clients
//! 1501 --rate 20` lays it out as `fanout`; with `--crdt` it applies each real Yjs update to a
//! yrs document per room before relaying it: the floor of a CRDT server that keeps nothing).
//! Everything it starts
//! it stops; every wait has a deadline.

mod awareness;
mod charts;
mod disk;
mod fanout;
mod idle;
mod infra;
mod join_storm;
mod peers;
mod procstat;
mod progress;
mod raw;
mod relay;
mod rooms;
mod rounds;
mod soak;
mod wire;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tandem_client::{Client, ClientOptions};
use yrs::{Array, ArrayRef, Doc, Transact};

use infra::{Cluster, Store};

#[derive(Debug, Parser)]
#[command(name = "tandem-loadtest", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Same-node vs cross-node delivery latency, acknowledgement latency, Redis and store writes
    /// per update.
    Hop(HopArgs),
    /// R rooms × C clients against tandem and/or peer servers (stock y-websocket, Hocuspocus):
    /// server CPU per delivered update, latency, losses, memory; ratios vs tandem.
    Rooms(rooms::RoomsArgs),
    /// 1 writer -> N observers in one room against tandem and/or peer servers: delivery latency
    /// (HDR, corrected for coordinated omission), losses, server CPU and memory per delivery.
    Fanout(fanout::FanoutArgs),
    /// N idle connections over R rooms: server memory and CPU per idle connection, kernel
    /// socket memory, connect time, projection to 1,000,000 connections.
    Idle(idle::IdleArgs),
    /// Internal: one `idle` worker process holding a slice of the connections.
    #[command(hide = true)]
    IdleWorker(idle::WorkerArgs),
    /// N clients join one room holding a large document at once: time to the whole document
    /// (p50, p99, max, all synced), failures, server CPU, peak memory and bytes per join.
    JoinStorm(join_storm::JoinStormArgs),
    /// R rooms × C clients each sending awareness updates (cursors) at a rate: delivery
    /// latency, deliveries per second, lost deliveries, server CPU per delivery and memory.
    Awareness(awareness::AwarenessArgs),
    /// A long run with connect/disconnect churn over R rooms: server RSS, threads, open files
    /// (and tandem's gauges) each second, and whether they return to baseline after everyone
    /// left; losses among the clients that stayed.
    Soak(soak::SoakArgs),
    /// The disk's `fdatasync` latency under a steady trickle of small writes (what a store's
    /// commit waits for): p50 to max and every stall, to tell the machine's tail from the
    /// server's.
    Disk(disk::DiskArgs),
    /// The floor under `rooms`' CPU per delivery on this machine: one thread relays frames
    /// between loopback sockets laid out like `rooms` (epoll, one write per delivery, nothing
    /// else); its own user and system CPU per delivery.
    Relay(relay::RelayArgs),
}

#[derive(Debug, clap::Args)]
struct HopArgs {
    /// The tandem binary to spawn.
    #[arg(long, default_value = "target/release/tandem")]
    tandem: PathBuf,
    /// 1: one node without Redis (no cross-node observer); 2: two nodes sharing Redis and a store.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    nodes: u8,
    /// Updates in total (over all writers).
    #[arg(long, default_value_t = 2000)]
    updates: usize,
    /// Updates per second in total (over all writers).
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Writer connections on node A; each sends updates/writers at rate/writers.
    #[arg(long, default_value_t = 1)]
    writers: usize,
    /// Store in Postgres: an admin URL (`postgres://postgres@127.0.0.1:5432/postgres`) in which a
    /// fresh database is created for the run and dropped afterwards. Default: one SQLite file.
    #[arg(long)]
    postgres: Option<String>,
    /// The redis-server binary.
    #[arg(long, default_value = "redis-server")]
    redis_server: String,
    /// With Postgres: after the run, close the clients, wait for the room to unload (which
    /// compacts it) and report the table sizes.
    #[arg(long)]
    compact: bool,
    /// Deadline for delivery and acknowledgements after the last update is sent.
    #[arg(long, default_value = "30s", value_parser = parse_secs)]
    drain_timeout: Duration,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let s = s.trim_end_matches('s');
    s.parse::<f64>()
        .map(Duration::from_secs_f64)
        .map_err(|e| e.to_string())
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        match cli.command {
            Command::Hop(args) => hop(args).await,
            Command::Rooms(args) => rooms::rooms(args).await,
            Command::Fanout(args) => fanout::fanout(args).await,
            Command::Idle(args) => idle::idle(args).await,
            Command::IdleWorker(args) => idle::worker(args).await,
            Command::JoinStorm(args) => join_storm::join_storm(args).await,
            Command::Awareness(args) => awareness::awareness(args).await,
            Command::Soak(args) => soak::soak(args).await,
            Command::Disk(args) => disk::disk(args).await,
            Command::Relay(args) => relay::relay(args).await,
        }
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    if let Err(e) = result {
        eprintln!("tandem-loadtest: {e}");
        std::process::exit(1);
    }
}

type Res<T> = Result<T, String>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Receipt times of each writer's sequence numbers at one observer.
struct Receipts {
    arrays: Vec<ArrayRef>,
    seen: Vec<usize>,
    at: Vec<Vec<Option<Instant>>>,
}

/// Connects an observer and records, for every writer's array, when each element arrived. A
/// writer's element k can only integrate after k-1 (its left origin), so the array's length is
/// the count received.
async fn observer(
    url: &str,
    writers: usize,
    per_writer: usize,
) -> Res<(Client, Arc<Mutex<Receipts>>)> {
    let options = ClientOptions {
        acknowledgements: false,
        ..Default::default()
    };
    let client = Client::connect_with(url, options)
        .await
        .map_err(|e| format!("observer connect {url}: {e}"))?;
    let doc: &Doc = client.doc();
    let receipts = Arc::new(Mutex::new(Receipts {
        arrays: (0..writers)
            .map(|w| doc.get_or_insert_array(format!("s{w}").as_str()))
            .collect(),
        seen: vec![0; writers],
        at: vec![vec![None; per_writer]; writers],
    }));
    let r = Arc::clone(&receipts);
    doc.observe_update_v1("loadtest/receipts", move |txn, _event| {
        let now = Instant::now();
        let mut r = r.lock().unwrap();
        let r = &mut *r;
        for w in 0..r.arrays.len() {
            let len = (r.arrays[w].len(txn) as usize).min(per_writer);
            for k in r.seen[w]..len {
                r.at[w][k] = Some(now);
            }
            r.seen[w] = r.seen[w].max(len);
        }
    })
    .map_err(|_| "observer: document locked".to_string())?;
    client
        .wait_synced(CONNECT_TIMEOUT)
        .await
        .map_err(|e| format!("observer sync {url}: {e}"))?;
    Ok((client, receipts))
}

/// Latencies in microseconds.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

fn us(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

struct Summary {
    count: u64,
    missing: u64,
    hist: Histogram<u64>,
}

impl Summary {
    fn ms(&self, q: f64) -> f64 {
        if self.count == 0 {
            return f64::NAN;
        }
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
    fn max_ms(&self) -> f64 {
        if self.count == 0 {
            return f64::NAN;
        }
        self.hist.max() as f64 / 1000.0
    }
    fn json(&self) -> Value {
        let num = |v: f64| if v.is_nan() { Value::Null } else { json!(v) };
        json!({
            "count": self.count,
            "missing": self.missing,
            "p50_ms": num(self.ms(0.50)),
            "p90_ms": num(self.ms(0.90)),
            "p99_ms": num(self.ms(0.99)),
            "max_ms": num(self.max_ms()),
            "mean_ms": if self.count == 0 { Value::Null } else { json!(self.hist.mean() / 1000.0) },
        })
    }
}

fn delivery(sent: &[Vec<Option<Instant>>], recv: &Receipts) -> Summary {
    let mut hist = histogram();
    let mut missing = 0;
    for (w, times) in sent.iter().enumerate() {
        for (k, s) in times.iter().enumerate() {
            match (s, recv.at[w][k]) {
                (Some(s), Some(r)) => hist.record(us(r.saturating_duration_since(*s))).unwrap(),
                _ => missing += 1,
            }
        }
    }
    Summary {
        count: hist.len(),
        missing,
        hist,
    }
}

async fn hop(args: HopArgs) -> Res<()> {
    if args.writers == 0 || args.updates < args.writers || args.rate <= 0.0 {
        return Err("need writers >= 1, updates >= writers and rate > 0".into());
    }
    let store = match &args.postgres {
        Some(admin) => Store::postgres(admin)?,
        None => Store::Sqlite,
    };
    let mut cluster = Cluster::start(
        &args.tandem,
        &args.redis_server,
        args.nodes,
        store,
        args.compact,
    )
    .await?;
    let outcome = run_hop(&args, &mut cluster).await;
    let outcome = match outcome {
        Ok(mut report) => {
            report["node_warnings"] = json!(cluster.warnings());
            Ok(report)
        }
        Err(e) => Err(format!("{e}\n{}", cluster.log_tail())),
    };
    cluster.stop().await;
    let report = outcome?;
    peers::emit(&report, None, args.json, print_table)
}

async fn run_hop(args: &HopArgs, cluster: &mut Cluster) -> Res<Value> {
    let w_count = args.writers;
    let per_writer = args.updates / w_count;
    let total = per_writer * w_count;
    let rate_per_writer = args.rate / w_count as f64;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let room = format!("loadtest/hop-{nanos}");
    let url_a = format!("ws://{}/{room}", cluster.nodes[0].addr);
    let url_b = cluster
        .nodes
        .get(1)
        .map(|n| format!("ws://{}/{room}", n.addr));

    cluster.install_counters().await?;

    let (obs_a, rec_a) = observer(&url_a, w_count, per_writer).await?;
    let obs_b = match &url_b {
        Some(u) => Some(observer(u, w_count, per_writer).await?),
        None => None,
    };
    let mut writers = Vec::new();
    for _ in 0..w_count {
        let c = Client::connect(&url_a)
            .await
            .map_err(|e| format!("writer connect: {e}"))?;
        c.wait_synced(CONNECT_TIMEOUT)
            .await
            .map_err(|e| format!("writer sync: {e}"))?;
        writers.push(c);
    }
    // Let the handshakes (sync step 2 replies, awareness, node state exchange) settle, so that
    // the writers' update counters and the publish counter start from a quiet room.
    for c in &writers {
        c.wait_stored(CONNECT_TIMEOUT)
            .await
            .map_err(|e| format!("writer initial ack: {e}"))?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Background PUBLISH rate (heartbeats, periodic state-vector exchange) over a quiet second.
    let idle_window = Duration::from_secs(1);
    let idle0 = cluster.publishes().await?;
    tokio::time::sleep(idle_window).await;
    let idle1 = cluster.publishes().await?;
    let idle_per_sec = (idle1 - idle0) as f64 / idle_window.as_secs_f64();

    let pub0 = cluster.publishes().await?;
    let pg0 = cluster.pg_counters().await?;

    let sent: Vec<Arc<Mutex<Vec<Option<Instant>>>>> = (0..w_count)
        .map(|_| Arc::new(Mutex::new(vec![None; per_writer])))
        .collect();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (w, client) in writers.iter().enumerate() {
        let base = client.sent_updates();
        let client = client.clone();
        let sent = Arc::clone(&sent[w]);
        // The ack tracker: edit k is the (base + k + 1)-th update message on this connection.
        let tracker = {
            let client = client.clone();
            let sent = Arc::clone(&sent);
            let deadline =
                args.drain_timeout + Duration::from_secs_f64(per_writer as f64 / rate_per_writer);
            tokio::spawn(async move {
                let mut acks: Vec<Option<Duration>> = vec![None; per_writer];
                let end = Instant::now() + deadline;
                let mut k = 0;
                while k < per_writer {
                    let target = base + k as u64 + 1;
                    let probe = client.clone();
                    let left = end.saturating_duration_since(Instant::now());
                    if client
                        .wait_awareness(left, move |_| probe.stored() >= target)
                        .await
                        .is_err()
                    {
                        break;
                    }
                    let now = Instant::now();
                    let stored = client.stored();
                    let sent = sent.lock().unwrap();
                    while k < per_writer && base + (k as u64) < stored {
                        acks[k] = sent[k].map(|s| now.saturating_duration_since(s));
                        k += 1;
                    }
                }
                acks
            })
        };
        let writer = tokio::spawn(async move {
            let doc = client.doc();
            let arr = doc.get_or_insert_array(format!("s{w}").as_str());
            let period = Duration::from_secs_f64(1.0 / rate_per_writer);
            let mut k = 0;
            while k < per_writer {
                let due = ((start.elapsed().as_secs_f64() * rate_per_writer) as usize + 1)
                    .min(per_writer);
                while k < due {
                    let t = Instant::now();
                    sent.lock().unwrap()[k] = Some(t);
                    let mut txn = doc.transact_mut();
                    arr.push_back(&mut txn, k as i64);
                    drop(txn);
                    k += 1;
                }
                if k < per_writer {
                    tokio::time::sleep_until((start + period * k as u32).into()).await;
                }
            }
            (start.elapsed(), client.sent_updates() - base)
        });
        tasks.push((writer, tracker));
    }

    let mut send_elapsed = Duration::ZERO;
    let mut ack_lists = Vec::new();
    let mut counted_mismatch = 0u64;
    for (writer, tracker) in tasks {
        let (elapsed, _) = writer.await.map_err(|e| format!("writer task: {e}"))?;
        send_elapsed = send_elapsed.max(elapsed);
        ack_lists.push(tracker.await.map_err(|e| format!("tracker task: {e}"))?);
    }
    let acked_at = start.elapsed();
    // Delivery: wait (bounded) until every observer has every element.
    let all_in = |rec: &Arc<Mutex<Receipts>>| {
        let r = rec.lock().unwrap();
        r.seen.iter().all(|&n| n >= per_writer)
    };
    let drain_end = Instant::now() + args.drain_timeout;
    loop {
        let b_in = obs_b.as_ref().is_none_or(|(_, r)| all_in(r));
        if (all_in(&rec_a) && b_in) || Instant::now() > drain_end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for c in &writers {
        if c.stored() < c.sent_updates() {
            counted_mismatch += c.sent_updates() - c.stored();
        }
    }
    let pub1 = cluster.publishes().await?;
    let pg1 = cluster.pg_counters().await?;
    let run_secs = start.elapsed().as_secs_f64();

    let sent_times: Vec<Vec<Option<Instant>>> =
        sent.iter().map(|s| s.lock().unwrap().clone()).collect();
    let same = delivery(&sent_times, &rec_a.lock().unwrap());
    let cross = obs_b
        .as_ref()
        .map(|(_, r)| delivery(&sent_times, &r.lock().unwrap()));
    let mut ack_hist = histogram();
    let mut ack_missing = 0;
    for list in &ack_lists {
        for a in list {
            match a {
                Some(d) => ack_hist.record(us(*d)).unwrap(),
                None => ack_missing += 1,
            }
        }
    }
    // The slowest acknowledgement in each twentieth of the run (in sending order): shows whether a
    // tail is one stall (a slow commit that every update of those milliseconds waits for) or
    // spread over the run.
    const SLICES: usize = 20;
    let mut ack_slices = vec![0.0f64; SLICES];
    for list in &ack_lists {
        for (k, a) in list.iter().enumerate() {
            if let Some(d) = a {
                let slice = k * SLICES / list.len();
                ack_slices[slice] = ack_slices[slice].max(d.as_secs_f64() * 1e3);
            }
        }
    }
    let ack = Summary {
        count: ack_hist.len(),
        missing: ack_missing,
        hist: ack_hist,
    };

    let publishes = pub1.saturating_sub(pub0);
    let background = idle_per_sec * run_secs;
    let mut report = json!({
        "scenario": "hop",
        "nodes": args.nodes,
        "store": cluster.store.describe(),
        "writers": w_count,
        "updates": total,
        "target_rate_per_s": args.rate,
        "achieved_send_rate_per_s": total as f64 / send_elapsed.as_secs_f64().max(1e-9),
        "send_secs": send_elapsed.as_secs_f64(),
        "all_acked_secs": acked_at.as_secs_f64(),
        "unacked_update_messages_at_end": counted_mismatch,
        "latency": {
            "same_node": same.json(),
            "ack": ack.json(),
            "ack_max_ms_by_twentieth": ack_slices,
        },
        "redis": {
            "publishes": publishes,
            "publishes_per_update": publishes as f64 / total as f64,
            "idle_publishes_per_s": idle_per_sec,
            "publishes_per_update_minus_idle": (publishes as f64 - background).max(0.0) / total as f64,
        },
    });
    if let Some((_, rec_b)) = &obs_b {
        // Per update: receipt at B minus receipt at A (the hop's own cost, independent of how
        // late both were); signed, so from a sorted list rather than a histogram.
        let (a, b) = (rec_a.lock().unwrap(), rec_b.lock().unwrap());
        let mut diffs: Vec<i64> = Vec::new();
        for w in 0..w_count {
            for k in 0..per_writer {
                if let (Some(ra), Some(rb)) = (a.at[w][k], b.at[w][k]) {
                    let d = if rb >= ra {
                        rb.duration_since(ra).as_micros() as i64
                    } else {
                        -(ra.duration_since(rb).as_micros() as i64)
                    };
                    diffs.push(d);
                }
            }
        }
        diffs.sort_unstable();
        let q = |p: f64| {
            diffs
                .get(
                    ((diffs.len() as f64 * p).ceil() as usize)
                        .saturating_sub(1)
                        .min(diffs.len().saturating_sub(1)),
                )
                .map(|v| *v as f64 / 1000.0)
        };
        report["latency"]["per_update_cross_minus_same_ms"] = json!({
            "count": diffs.len(),
            "p50": q(0.50),
            "p90": q(0.90),
            "p99": q(0.99),
            "max": diffs.last().map(|v| *v as f64 / 1000.0),
        });
    }
    if let Some(c) = &cross {
        report["latency"]["cross_node"] = c.json();
        report["latency"]["cross_minus_same_ms"] = json!({
            "p50": c.ms(0.5) - same.ms(0.5),
            "p99": c.ms(0.99) - same.ms(0.99),
        });
    }
    if let (Some((r0, b0)), Some((r1, b1))) = (pg0, pg1) {
        let rows = r1 - r0;
        let bytes = b1 - b0;
        report["postgres"] = json!({
            "rows_inserted": rows,
            "data_bytes_inserted": bytes,
            "rows_per_update": rows as f64 / total as f64,
            "data_bytes_per_update": bytes as f64 / total as f64,
        });
    }
    // Close the clients; with --compact, wait for the room to unload and compact.
    for c in writers {
        let _ = c.close().await;
    }
    let _ = obs_a.close().await;
    if let Some((c, _)) = obs_b {
        let _ = c.close().await;
    }
    if args.compact {
        if let Some(sizes) = cluster
            .compacted_sizes(&room, Duration::from_secs(30))
            .await?
        {
            report["postgres"]["after_compaction"] = sizes;
        }
    }
    Ok(report)
}

fn print_table(r: &Value) {
    println!(
        "hop: {} node(s), store {}, {} writer(s), {} updates at {} /s (achieved {:.0} /s over {:.2} s)",
        r["nodes"], r["store"].as_str().unwrap_or("?"), r["writers"], r["updates"],
        r["target_rate_per_s"], r["achieved_send_rate_per_s"].as_f64().unwrap_or(0.0),
        r["send_secs"].as_f64().unwrap_or(0.0)
    );
    println!(
        "{:<22} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "latency (ms)", "count", "missing", "p50", "p90", "p99", "max"
    );
    let row = |name: &str, v: &Value| {
        let f = |k: &str| v[k].as_f64().map_or("-".to_string(), |x| format!("{x:.3}"));
        println!(
            "{:<22} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9}",
            name,
            v["count"],
            v["missing"],
            f("p50_ms"),
            f("p90_ms"),
            f("p99_ms"),
            f("max_ms")
        );
    };
    row("same-node delivery", &r["latency"]["same_node"]);
    if !r["latency"]["cross_node"].is_null() {
        row("cross-node delivery", &r["latency"]["cross_node"]);
        let d = &r["latency"]["cross_minus_same_ms"];
        println!(
            "cross-node minus same-node percentiles: p50 {:.3} ms, p99 {:.3} ms",
            d["p50"].as_f64().unwrap_or(f64::NAN),
            d["p99"].as_f64().unwrap_or(f64::NAN)
        );
        let d = &r["latency"]["per_update_cross_minus_same_ms"];
        println!(
            "per update, receipt at B minus receipt at A: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            d["p50"].as_f64().unwrap_or(f64::NAN),
            d["p90"].as_f64().unwrap_or(f64::NAN),
            d["p99"].as_f64().unwrap_or(f64::NAN),
            d["max"].as_f64().unwrap_or(f64::NAN)
        );
    }
    row("ack (stored)", &r["latency"]["ack"]);
    if let Some(slices) = r["latency"]["ack_max_ms_by_twentieth"].as_array() {
        let slices: Vec<String> = slices
            .iter()
            .map(|v| format!("{:.0}", v.as_f64().unwrap_or(f64::NAN)))
            .collect();
        println!(
            "slowest ack per twentieth of the run (ms): {}",
            slices.join(" ")
        );
    }
    let red = &r["redis"];
    println!(
        "redis: {} PUBLISH ({:.3} per update; {:.3} per update net of {:.1}/s idle background)",
        red["publishes"],
        red["publishes_per_update"].as_f64().unwrap_or(0.0),
        red["publishes_per_update_minus_idle"]
            .as_f64()
            .unwrap_or(0.0),
        red["idle_publishes_per_s"].as_f64().unwrap_or(0.0)
    );
    if let Some(pg) = r.get("postgres") {
        println!(
            "postgres: {} rows, {} data bytes inserted into `updates` ({:.3} rows, {:.1} bytes per update)",
            pg["rows_inserted"], pg["data_bytes_inserted"],
            pg["rows_per_update"].as_f64().unwrap_or(0.0), pg["data_bytes_per_update"].as_f64().unwrap_or(0.0)
        );
        if let Some(c) = pg.get("after_compaction") {
            println!("postgres after compaction: {c}");
        }
    }
    if let Some(w) = r["node_warnings"].as_array().filter(|w| !w.is_empty()) {
        println!("node warnings/errors ({}):", w.len());
        for l in w.iter().take(10) {
            println!("  {}", l.as_str().unwrap_or(""));
        }
    }
    if r["unacked_update_messages_at_end"].as_u64().unwrap_or(0) > 0 {
        println!(
            "WARNING: {} update messages were not acknowledged by the end",
            r["unacked_update_messages_at_end"]
        );
    }
}
