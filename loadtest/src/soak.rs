//! `soak`: a long run with connect/disconnect churn against one or more targets (tandem, the
//! stock y-websocket server, Hocuspocus), one after another, and whether the server returns to
//! its baseline once everyone has left.
//!
//! Per room, W writers push their send time into their own Y.Array at the room's rate (as in
//! `rooms`), S stable readers stay for the whole run (they give the lost and duplicated
//! deliveries; the first of each room also decodes every update with yrs and records latency in
//! an HDR histogram corrected for coordinated omission), and the rest churn: every second a
//! fraction of the whole population leaves (chosen at random among the churning clients that are
//! open; half of them with a close handshake, half by dropping the socket) and as many new
//! clients join the rooms they left, each with a full sync (step 1 with an empty state vector,
//! wait for step 2). Every second the server is sampled: RSS and threads (`/proc/PID/status`),
//! open file descriptors (`/proc/PID/fd`), CPU (`/proc/PID/stat`) and, for tandem, the
//! `tandem_connections`, `tandem_rooms_loaded` and `tandem_awareness_states` gauges from its
//! `/metrics`. At the end every client disconnects and the server is sampled every second until
//! each figure is back within its tolerance of the baseline taken before the first connection
//! (or the settle deadline passes). tandem keeps an empty room for `--room-idle-grace` (30 s by
//! default); the run passes a shorter one (`--room-idle-grace`, 2 s by default) so that settling
//! stays short.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::peers::{self, Cell, Server, Target};
use crate::wire::{self, now_us, ConnectOptions, Dialect, ProbeDoc, Tasks, Ws};
use crate::{charts, procstat, progress};

type Res<T> = Result<T, String>;

/// The longest `--duration` accepted: the run is bounded.
const MAX_DURATION: Duration = Duration::from_secs(3600);
/// The sampling and churn period.
const TICK: Duration = Duration::from_secs(1);
/// Deadline for one `/metrics` scrape.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client leaving with a close handshake waits for the server's close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline for the initial population to be connected and synced.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);

/// Arguments of the `soak` scenario.
#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// A server to measure; repeat to compare.
    #[arg(long = "target", value_enum, default_values_t = [Target::Tandem])]
    targets: Vec<Target>,
    /// Rooms.
    #[arg(long, default_value_t = 20)]
    rooms: usize,
    /// The steady population: client connections in total, spread evenly over the rooms
    /// (writers and stable readers included).
    #[arg(long, default_value_t = 500)]
    clients: usize,
    /// Writers per room; they stay for the whole run.
    #[arg(long, default_value_t = 1)]
    writers: usize,
    /// Readers per room that stay for the whole run (losses and duplicates are counted on
    /// them; the first of each room also measures latency).
    #[arg(long, default_value_t = 3)]
    stable: usize,
    /// Updates per second per room (over the room's writers).
    #[arg(long, default_value_t = 5.0)]
    rate: f64,
    /// Length of the churn run (at most one hour).
    #[arg(long, default_value = "120s", value_parser = crate::parse_secs)]
    duration: Duration,
    /// Share of the population that leaves, and is replaced by new clients, every second.
    #[arg(long, default_value_t = 0.05)]
    churn: f64,
    /// Seed of the churn's choices (who leaves, and how); default: from the clock.
    #[arg(long)]
    seed: Option<u64>,
    /// tandem's `--room-idle-grace` for the run (tandem's own default is 30 s).
    #[arg(long, default_value = "2s", value_parser = crate::parse_secs)]
    room_idle_grace: Duration,
    /// Deadline for the server to return to its baseline after everyone left.
    #[arg(long, default_value = "30s", value_parser = crate::parse_secs)]
    settle_timeout: Duration,
    /// Deadline for the stable readers' last deliveries after the writers stopped.
    #[arg(long, default_value = "10s", value_parser = crate::parse_secs)]
    drain_timeout: Duration,
    /// RSS counts as back to baseline within this many MiB above it.
    #[arg(long, default_value_t = 16.0)]
    rss_tolerance_mib: f64,
    /// Threads count as back to baseline within this many above it.
    #[arg(long, default_value_t = 2)]
    threads_tolerance: u64,
    /// Open file descriptors count as back to baseline within this many above it.
    #[arg(long, default_value_t = 2)]
    fds_tolerance: u64,
    /// Connections opening at once while the initial population connects.
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// The servers to start.
    #[command(flatten)]
    servers: peers::ServerPaths,
    /// Write a results folder: report.json and SVG charts (latency, throughput, server figures
    /// over time).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

impl SoakArgs {
    /// Clients per room that churn.
    fn churners_per_room(&self) -> usize {
        self.clients / self.rooms - self.writers - self.stable
    }
}

/// Runs the scenario against every target in turn and prints one report.
pub async fn soak(args: SoakArgs) -> Res<()> {
    if args.rooms == 0
        || args.writers == 0
        || args.stable == 0
        || args.clients / args.rooms.max(1) <= args.writers + args.stable
        || args.rate <= 0.0
        || !(0.0..=1.0).contains(&args.churn)
        || args.duration < TICK
        || args.duration > MAX_DURATION
    {
        return Err(format!(
            "need rooms >= 1, writers >= 1, stable >= 1, clients / rooms > writers + stable, \
             rate > 0, 0 <= churn <= 1, 1 s <= duration <= {} s",
            MAX_DURATION.as_secs()
        ));
    }
    let nofile = procstat::raise_nofile()?;
    let population = args.clients / args.rooms * args.rooms;
    if (population as u64) * 2 + 200 > nofile {
        eprintln!("warning: {population} connections with an open-files limit of {nofile}");
    }
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let mut runs = Vec::new();
    for &target in &args.targets {
        eprintln!("soak: {} ...", target.name());
        let report = peers::report_or_error(target, run_target(&args, target, seed).await);
        runs.push(report);
    }
    let report = json!({
        "scenario": "soak",
        "rooms": args.rooms,
        "population": population,
        "writers_per_room": args.writers,
        "stable_readers_per_room": args.stable,
        "churning_per_room": args.churners_per_room(),
        "rate_per_room": args.rate,
        "duration_secs": args.duration.as_secs_f64(),
        "churn_per_s": args.churn,
        "seed": seed,
        "tandem_room_idle_grace_secs": args.room_idle_grace.as_secs_f64(),
        "tolerance": {
            "rss_kib": args.rss_tolerance_mib * 1024.0,
            "threads": args.threads_tolerance,
            "fds": args.fds_tolerance,
            "tandem_gauges": 0,
        },
        "open_files_limit": nofile,
        "runs": runs,
    });
    peers::emit(&report, args.out.as_deref(), args.json, print_table)
}

/// Starts `target`, soaks it and stops it; the run's report.
async fn run_target(args: &SoakArgs, target: Target, seed: u64) -> Res<Value> {
    let grace = format!("{}ms", args.room_idle_grace.as_millis());
    let tandem_args = ["--room-idle-grace", grace.as_str()];
    let server = Server::start(
        target,
        &args.servers.tandem,
        &args.servers.peers,
        &tandem_args,
    )
    .await?;
    let mut out = measure(args, target, &server, seed).await;
    if let Ok(report) = &mut out {
        report["server_warnings"] = json!(server.warnings());
    }
    server.stop().await;
    out
}

/// One reading of the server.
#[derive(Debug, Clone, Copy, Default)]
struct Reading {
    cpu: procstat::Sample,
    threads: u64,
    fds: u64,
    /// tandem's gauges; `None` for the peers or when the scrape failed.
    gauges: Option<Gauges>,
}

/// tandem's gauges from `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
struct Gauges {
    connections: i64,
    rooms_loaded: i64,
    awareness_states: i64,
}

/// Reads the server's figures; the `/metrics` scrape only when `tandem`.
async fn read_server(pid: u32, addr: &str, tandem: bool) -> Res<Reading> {
    let cpu = procstat::sample(pid)?;
    let threads = procstat::threads(pid)?;
    // Before the scrape, whose own socket would count.
    let fds = procstat::open_fds(pid)?;
    let gauges = if tandem {
        scrape(addr).await.ok()
    } else {
        None
    };
    Ok(Reading {
        cpu,
        threads,
        fds,
        gauges,
    })
}

/// `GET /metrics` over HTTP/1.0 (no chunked encoding; the server closes after the body).
async fn scrape(addr: &str) -> Res<Gauges> {
    let fetch = async {
        let mut s = TcpStream::connect(addr).await?;
        let req = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        Ok::<_, std::io::Error>(text)
    };
    let text = tokio::time::timeout(SCRAPE_TIMEOUT, fetch)
        .await
        .map_err(|_| "metrics scrape timed out".to_string())?
        .map_err(|e| format!("metrics scrape: {e}"))?;
    let gauge = |name: &str| -> Res<i64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as i64)
            .ok_or_else(|| format!("/metrics: no {name}"))
    };
    Ok(Gauges {
        connections: gauge("tandem_connections")?,
        rooms_loaded: gauge("tandem_rooms_loaded")?,
        awareness_states: gauge("tandem_awareness_states")?,
    })
}

impl Reading {
    /// One `timeline` entry; `cpu_percent` over the time since `prev`, when given.
    fn json(&self, t_secs: f64, phase: &str, prev: Option<(&Reading, f64)>) -> Value {
        let mut v = json!({
            "t_secs": t_secs,
            "phase": phase,
            "rss_kib": self.cpu.rss_kib,
            "threads": self.threads,
            "fds": self.fds,
        });
        if let Some((p, dt)) = prev.filter(|(_, dt)| *dt > 0.0) {
            let used =
                (self.cpu.user_us + self.cpu.sys_us).saturating_sub(p.cpu.user_us + p.cpu.sys_us);
            v["cpu_percent"] = json!(used as f64 / dt / 1e4);
        }
        if let Some(g) = self.gauges {
            v["tandem_connections"] = json!(g.connections);
            v["tandem_rooms_loaded"] = json!(g.rooms_loaded);
            v["tandem_awareness_states"] = json!(g.awareness_states);
        }
        v
    }
}

/// Counts shared with the connection tasks.
struct Shared {
    /// Update messages each room's writers sent.
    sent: Vec<AtomicU64>,
    /// Update messages each stable reader received, by room.
    stable: Vec<Vec<AtomicU64>>,
    /// Update messages received by every reader, stable or churning: the throughput.
    delivered: AtomicU64,
    /// Set once the run is over: sockets ending after it are not counted as ended early.
    over: AtomicBool,
    /// Writers and stable readers in the run.
    fixed_clients: usize,
    /// Writers and stable readers whose socket ended before the run was over.
    stable_ended: AtomicU64,
    /// Latencies in µs from the probes (the first stable reader of each room).
    latency: Mutex<Histogram<u64>>,
    /// Probe updates that added nothing new to the probe's document (re-deliveries).
    probe_no_ops: AtomicU64,
    /// The writers' interval, for the coordinated-omission correction.
    interval_us: u64,
    /// Joins during the churn that synced.
    joins: AtomicU64,
    /// Joins (initial or during the churn) that failed, and the first error.
    join_failures: AtomicU64,
    first_join_error: Mutex<Option<String>>,
    /// From a joining client's TCP connect to its sync step 2, µs (churn joins only).
    join_latency: Mutex<Histogram<u64>>,
    /// Churning clients open now.
    churners_open: AtomicI64,
    /// Churning clients whose socket the server ended.
    churners_ended_by_server: AtomicU64,
}

/// Latencies in µs, up to 10 minutes, 3 significant digits.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// How a churning client leaves.
#[derive(Debug, Clone, Copy)]
enum Leave {
    /// Sends a close frame and waits (bounded) for the server's.
    Handshake,
    /// Drops the socket without a close frame.
    Drop,
}

/// Why a churning client joins.
enum JoinKind {
    /// Part of the initial population: at most as many connect at once as the semaphore has
    /// permits, and the join is not in the churn figures.
    Initial(Arc<Semaphore>),
    /// Replaces a client that left: connects at once; counted and timed in the churn figures.
    Churn,
}

/// A churning client's state: connecting and syncing.
const CONNECTING: u8 = 0;
/// Synced and reading.
const OPEN: u8 = 1;
/// Gone: left, ended by the server, or failed to join.
const DONE: u8 = 2;

/// A churning client, as the churn loop sees it. Dropping it aborts its task (and so closes its
/// socket): no early return leaves clients behind.
struct Churner {
    room: usize,
    state: Arc<AtomicU8>,
    /// Taken when the client is told to leave; the client stays in the list until it is gone.
    leave: Option<oneshot::Sender<Leave>>,
    task: JoinHandle<()>,
}

impl Drop for Churner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a churning client needs to join: the server, its framing and the room names.
#[derive(Clone)]
struct Joiner {
    addr: String,
    dialect: Dialect,
    room_names: Arc<Vec<String>>,
}

impl Joiner {
    /// Spawns a churning client in `room`.
    fn spawn(&self, room: usize, sh: &Arc<Shared>, kind: JoinKind) -> Churner {
        let state = Arc::new(AtomicU8::new(CONNECTING));
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(churner(
            self.clone(),
            room,
            Arc::clone(sh),
            Arc::clone(&state),
            kind,
            rx,
        ));
        Churner {
            room,
            state,
            leave: Some(tx),
            task,
        }
    }
}

/// A churning client: joins and syncs, counts the updates it receives, leaves when told.
async fn churner(
    t: Joiner,
    room: usize,
    sh: Arc<Shared>,
    state: Arc<AtomicU8>,
    kind: JoinKind,
    mut leave: oneshot::Receiver<Leave>,
) {
    let permit = match &kind {
        JoinKind::Initial(gate) => Arc::clone(gate).acquire_owned().await.ok(),
        JoinKind::Churn => None,
    };
    let started = Instant::now();
    let name = &t.room_names[room];
    let opts = ConnectOptions::default();
    let ws = match tokio::time::timeout(
        wire::HANDSHAKE_TIMEOUT,
        wire::handshake(&t.addr, name, t.dialect, opts),
    )
    .await
    {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => return join_failed(&sh, &state, e),
        Err(_) => return join_failed(&sh, &state, format!("{name}: no sync in time")),
    };
    drop(permit);
    if matches!(kind, JoinKind::Churn) {
        sh.joins.fetch_add(1, Ordering::Relaxed);
        let us = (started.elapsed().as_micros() as u64).max(1);
        let _ = sh.join_latency.lock().unwrap().record(us);
    }
    sh.churners_open.fetch_add(1, Ordering::Relaxed);
    state.store(OPEN, Ordering::Relaxed);
    let (mut sink, mut stream) = ws.split();
    loop {
        tokio::select! {
            how = &mut leave => {
                if let Ok(Leave::Handshake) = how {
                    let _ = sink.send(Message::Close(None)).await;
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                        while let Some(Ok(m)) = stream.next().await {
                            if matches!(m, Message::Close(_)) {
                                break;
                            }
                        }
                    })
                    .await;
                }
                break;
            }
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    let n = wire::parse(t.dialect, &b).updates.len() as u64;
                    sh.delivered.fetch_add(n, Ordering::Relaxed);
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => {
                    if !sh.over.load(Ordering::Relaxed) {
                        sh.churners_ended_by_server.fetch_add(1, Ordering::Relaxed);
                    }
                    break;
                }
                Some(Ok(_)) => {}
            },
        }
    }
    sh.churners_open.fetch_sub(1, Ordering::Relaxed);
    state.store(DONE, Ordering::Relaxed);
}

fn join_failed(sh: &Shared, state: &AtomicU8, e: String) {
    sh.join_failures.fetch_add(1, Ordering::Relaxed);
    sh.first_join_error.lock().unwrap().get_or_insert(e);
    state.store(DONE, Ordering::Relaxed);
}

/// A stable reader: counts update messages; a probe also decodes them and records latency.
async fn stable_reader(
    ws: Ws,
    dialect: Dialect,
    room: usize,
    idx: usize,
    writers: usize,
    sh: Arc<Shared>,
) {
    let (_sink, mut stream) = ws.split();
    let counter = &sh.stable[room][idx];
    let mut probe = (idx == 0).then(|| ProbeDoc::new(writers));
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(Message::Binary(b)) => {
                let r = wire::parse(dialect, &b);
                if r.updates.is_empty() {
                    continue;
                }
                let n = r.updates.len() as u64;
                counter.fetch_add(n, Ordering::Relaxed);
                sh.delivered.fetch_add(n, Ordering::Relaxed);
                let Some(p) = &mut probe else { continue };
                let now = now_us();
                for u in r.updates {
                    match p.apply(u) {
                        Some(ts) if ts.is_empty() => {
                            sh.probe_no_ops.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(ts) => {
                            let mut h = sh.latency.lock().unwrap();
                            for t in ts {
                                let _ =
                                    h.record_correct(now.saturating_sub(t).max(1), sh.interval_us);
                            }
                        }
                        None => {}
                    }
                }
            }
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    if !sh.over.load(Ordering::Relaxed) {
        sh.stable_ended.fetch_add(1, Ordering::Relaxed);
    }
}

/// A writer: an update every `period` from `start + offset` until `end`; then it stays open
/// (and drained) until aborted.
async fn writer(
    ws: Ws,
    dialect: Dialect,
    name: String,
    room: usize,
    w: usize,
    times: (Instant, Duration, Duration, Instant),
    sh: Arc<Shared>,
) {
    let (mut sink, mut stream) = ws.split();
    let drain = async {
        while let Some(m) = stream.next().await {
            if matches!(m, Ok(Message::Close(_)) | Err(_)) {
                break;
            }
        }
        if !sh.over.load(Ordering::Relaxed) {
            sh.stable_ended.fetch_add(1, Ordering::Relaxed);
        }
    };
    let send = async {
        wire::send_stamped(&mut sink, dialect, &name, w, times, || {
            sh.sent[room].fetch_add(1, Ordering::Relaxed);
        })
        .await;
        std::future::pending::<()>().await;
    };
    tokio::join!(drain, send);
}

/// xorshift64*: the churn's choices, reproducible from `--seed`.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng((seed ^ 0x9E37_79B9_7F4A_7C15).max(1))
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (`n > 0`; the modulo bias is irrelevant here).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Churn totals the churn loop keeps.
#[derive(Debug, Default)]
struct ChurnCounts {
    /// Leaves with a close handshake ([`Leave::Handshake`]).
    leaves_handshake: u64,
    /// Leaves dropping the socket ([`Leave::Drop`]).
    leaves_drop: u64,
    /// Leaves wanted but not done: fewer churning clients open than asked for.
    leaves_short: u64,
}

/// What the churn loop hands back.
struct ChurnOutcome {
    churners: Vec<Churner>,
    counts: ChurnCounts,
    timeline: Vec<Value>,
    per_second: Vec<u64>,
    readings: Vec<(f64, Reading)>,
    last: Reading,
    error: Option<String>,
}

/// Every second until `end`: reads the server, then replaces a share of the churning clients.
#[allow(clippy::too_many_arguments)]
async fn churn_loop(
    mut churners: Vec<Churner>,
    t: Joiner,
    sh: Arc<Shared>,
    (pid, tandem): (u32, bool),
    (t0, start, end): (Instant, Instant, Instant),
    per_tick: f64,
    mut rng: Rng,
    first: Reading,
) -> ChurnOutcome {
    let mut out = ChurnOutcome {
        churners: Vec::new(),
        counts: ChurnCounts::default(),
        timeline: Vec::new(),
        per_second: Vec::new(),
        readings: Vec::new(),
        last: first,
        error: None,
    };
    let mut prev = (first, Instant::now(), sh.delivered.load(Ordering::Relaxed));
    let mut carry = 0.0;
    let mut next = start + TICK;
    while next <= end {
        tokio::time::sleep_until(next.into()).await;
        next += TICK;
        let reading = match read_server(pid, &t.addr, tandem).await {
            Ok(r) => r,
            Err(e) => {
                out.error = Some(e);
                break;
            }
        };
        let now = Instant::now();
        let delivered = sh.delivered.load(Ordering::Relaxed);
        let dt = now.duration_since(prev.1).as_secs_f64();
        let mut entry = reading.json(
            now.duration_since(t0).as_secs_f64(),
            "churn",
            Some((&prev.0, dt)),
        );
        entry["clients"] = json!(open_clients(&sh));
        out.timeline.push(entry);
        out.per_second.push(delivered - prev.2);
        out.readings
            .push((now.duration_since(t0).as_secs_f64(), reading));
        prev = (reading, now, delivered);
        out.last = reading;

        churners.retain(|c| c.state.load(Ordering::Relaxed) != DONE);
        carry += per_tick;
        let wanted = carry.floor() as usize;
        carry -= wanted as f64;
        let mut open: Vec<usize> = (0..churners.len())
            .filter(|&i| {
                churners[i].leave.is_some() && churners[i].state.load(Ordering::Relaxed) == OPEN
            })
            .collect();
        let k = wanted.min(open.len());
        out.counts.leaves_short += (wanted - k) as u64;
        let mut joins = Vec::with_capacity(k);
        for j in 0..k {
            let pick = j + rng.below(open.len() - j);
            open.swap(j, pick);
            let c = &mut churners[open[j]];
            let how = if rng.next() & 1 == 0 {
                out.counts.leaves_handshake += 1;
                Leave::Handshake
            } else {
                out.counts.leaves_drop += 1;
                Leave::Drop
            };
            if let Some(tx) = c.leave.take() {
                let _ = tx.send(how);
            }
            joins.push(c.room);
        }
        for room in joins {
            churners.push(t.spawn(room, &sh, JoinKind::Churn));
        }
    }
    out.churners = churners;
    out
}

/// Client connections open now: writers and stable readers (until the run is over) and the
/// churning clients.
fn open_clients(sh: &Shared) -> i64 {
    let fixed = if sh.over.load(Ordering::Relaxed) {
        0
    } else {
        sh.fixed_clients as i64 - sh.stable_ended.load(Ordering::Relaxed) as i64
    };
    fixed + sh.churners_open.load(Ordering::Relaxed)
}

async fn measure(args: &SoakArgs, target: Target, server: &Server, seed: u64) -> Res<Value> {
    let dialect = target.dialect();
    let tandem = matches!(target, Target::Tandem | Target::TandemMemory);
    let pid = server.pid;
    let t0 = Instant::now();
    let baseline = read_server(pid, &server.addr, tandem).await?;
    if tandem && baseline.gauges.is_none() {
        return Err(format!("{}: /metrics did not answer", server.addr));
    }
    let mut timeline = vec![baseline.json(0.0, "baseline", None)];
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let room_names: Arc<Vec<String>> = Arc::new(
        (0..args.rooms)
            .map(|r| format!("loadtest-soak-{stamp}-{r}"))
            .collect(),
    );
    let period = Duration::from_secs_f64(args.writers as f64 / args.rate);
    let sh = Arc::new(Shared {
        sent: (0..args.rooms).map(|_| AtomicU64::new(0)).collect(),
        stable: (0..args.rooms)
            .map(|_| (0..args.stable).map(|_| AtomicU64::new(0)).collect())
            .collect(),
        delivered: AtomicU64::new(0),
        over: AtomicBool::new(false),
        fixed_clients: args.rooms * (args.writers + args.stable),
        stable_ended: AtomicU64::new(0),
        latency: Mutex::new(latency_histogram()),
        probe_no_ops: AtomicU64::new(0),
        interval_us: period.as_micros() as u64,
        joins: AtomicU64::new(0),
        join_failures: AtomicU64::new(0),
        first_join_error: Mutex::new(None),
        join_latency: Mutex::new(latency_histogram()),
        churners_open: AtomicI64::new(0),
        churners_ended_by_server: AtomicU64::new(0),
    });
    let t = Joiner {
        addr: server.addr.clone(),
        dialect,
        room_names: Arc::clone(&room_names),
    };

    // The fixed clients (stable readers, then writers, per room), then the churning ones.
    let connect_start = Instant::now();
    let mut jobs = Vec::new();
    for name in room_names.iter() {
        for _ in 0..args.stable + args.writers {
            jobs.push((name.clone(), None));
        }
    }
    let sockets = wire::connect_all(&server.addr, dialect, jobs, args.connect_concurrency).await?;
    let mut tasks = Tasks(Vec::new());
    let mut writers = Vec::new();
    for (i, ws) in sockets.into_iter().enumerate() {
        let (room, c) = (
            i / (args.stable + args.writers),
            i % (args.stable + args.writers),
        );
        if c < args.stable {
            let sh = Arc::clone(&sh);
            tasks.0.push(tokio::spawn(stable_reader(
                ws,
                dialect,
                room,
                c,
                args.writers,
                sh,
            )));
        } else {
            writers.push((room, c - args.stable, ws));
        }
    }
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let mut churners = Vec::new();
    for room in 0..args.rooms {
        for _ in 0..args.churners_per_room() {
            churners.push(t.spawn(room, &sh, JoinKind::Initial(Arc::clone(&gate))));
        }
    }
    let connect_deadline = Instant::now() + CONNECT_TIMEOUT;
    while churners
        .iter()
        .any(|c| c.state.load(Ordering::Relaxed) == CONNECTING)
    {
        if Instant::now() > connect_deadline {
            return Err(format!(
                "initial population not connected within {CONNECT_TIMEOUT:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failed = sh.join_failures.load(Ordering::Relaxed);
    if failed > 0 {
        let first = sh
            .first_join_error
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_default();
        return Err(format!(
            "{failed} initial connections failed; first: {first}"
        ));
    }
    let connect_secs = connect_start.elapsed().as_secs_f64();
    let connected = read_server(pid, &server.addr, tandem).await?;
    let mut entry = connected.json(t0.elapsed().as_secs_f64(), "connected", None);
    entry["clients"] = json!(open_clients(&sh));
    timeline.push(entry);

    // Writers, spread over the period; the churn loop runs beside them.
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + args.duration;
    let all = (args.rooms * args.writers) as u32;
    for (i, (room, w, ws)) in writers.into_iter().enumerate() {
        let offset = period * (i as u32) / all;
        tasks.0.push(tokio::spawn(writer(
            ws,
            dialect,
            room_names[room].clone(),
            room,
            w,
            (start, offset, period, end),
            Arc::clone(&sh),
        )));
    }
    let (me0, m0) = (procstat::sample(std::process::id())?, procstat::machine()?);
    let cpu0 = procstat::sample(pid)?;
    let per_tick = args.churn * (args.clients / args.rooms * args.rooms) as f64;
    let churn = tokio::spawn(churn_loop(
        churners,
        t.clone(),
        Arc::clone(&sh),
        (pid, tandem),
        (t0, start, end),
        per_tick,
        Rng::new(seed),
        connected,
    ));
    let abort_churn = churn.abort_handle();
    let status = || {
        format!(
            "{} clients, {} joins, {} delivered",
            open_clients(&sh),
            sh.joins.load(Ordering::Relaxed),
            sh.delivered.load(Ordering::Relaxed)
        )
    };
    progress::wait_until(end + Duration::from_millis(50), "soak", status).await;
    let outcome = match churn.await {
        Ok(o) => o,
        Err(e) => {
            abort_churn.abort();
            return Err(format!("churn loop: {e}"));
        }
    };
    let churners = outcome.churners;
    if let Some(e) = outcome.error {
        return Err(e);
    }
    let (cpu1, window) = (procstat::sample(pid)?, start.elapsed().as_secs_f64());
    let (me1, m1) = (procstat::sample(std::process::id())?, procstat::machine()?);
    timeline.extend(outcome.timeline);

    // Drain the stable readers, then everyone leaves at once (sockets dropped).
    let drain_end = Instant::now() + args.drain_timeout;
    let complete = |sh: &Shared| {
        sh.sent.iter().zip(&sh.stable).all(|(s, readers)| {
            let s = s.load(Ordering::Relaxed);
            readers.iter().all(|c| c.load(Ordering::Relaxed) >= s)
        })
    };
    while !complete(&sh) && Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sh.over.store(true, Ordering::Relaxed);
    drop(tasks);
    drop(churners);

    // Settle: until every figure is back within tolerance, or the deadline.
    let tol_rss = (args.rss_tolerance_mib * 1024.0) as u64;
    let back = |r: &Reading| {
        let gauges_back = match (r.gauges, baseline.gauges) {
            (Some(g), Some(b)) => {
                g.connections == b.connections && g.rooms_loaded == b.rooms_loaded
            }
            (None, None) => true,
            _ => false,
        };
        r.cpu.rss_kib <= baseline.cpu.rss_kib + tol_rss
            && r.threads <= baseline.threads + args.threads_tolerance
            && r.fds <= baseline.fds + args.fds_tolerance
            && gauges_back
    };
    let settle_start = Instant::now();
    let mut last = (outcome.last, Instant::now());
    let mut settle_readings = Vec::new();
    loop {
        tokio::time::sleep(TICK).await;
        let r = read_server(pid, &server.addr, tandem).await?;
        let now = Instant::now();
        let dt = now.duration_since(last.1).as_secs_f64();
        let t_secs = now.duration_since(t0).as_secs_f64();
        settle_readings.push(r);
        let mut entry = r.json(t_secs, "settle", Some((&last.0, dt)));
        entry["clients"] = json!(open_clients(&sh));
        timeline.push(entry);
        last = (r, now);
        if back(&r) || settle_start.elapsed() >= args.settle_timeout {
            break;
        }
    }
    let settle_secs = settle_start.elapsed().as_secs_f64();
    let end_reading = last.0;

    let (mut expected, mut received, mut lost, mut duplicated) = (0u64, 0u64, 0u64, 0u64);
    for (s, readers) in sh.sent.iter().zip(&sh.stable) {
        let s = s.load(Ordering::Relaxed);
        for c in readers {
            let c = c.load(Ordering::Relaxed);
            expected += s;
            received += c;
            lost += s.saturating_sub(c);
            duplicated += c.saturating_sub(s);
        }
    }
    let sent: u64 = sh.sent.iter().map(|s| s.load(Ordering::Relaxed)).sum();
    let delivered: u64 = outcome.per_second.iter().sum();
    // Every reading after the baseline: connected, churn, settle.
    let all_readings = || {
        [&connected]
            .into_iter()
            .chain(outcome.readings.iter().map(|(_, r)| r))
            .chain(settle_readings.iter())
    };
    let peak = |f: &dyn Fn(&Reading) -> u64| all_readings().map(f).max();
    let verdict = |base: u64, end: u64, tol: u64| json!({ "baseline": base, "end": end, "tolerance": tol, "back": end <= base + tol });
    let mut returned = json!({
        "rss_kib": verdict(baseline.cpu.rss_kib, end_reading.cpu.rss_kib, tol_rss),
        "threads": verdict(baseline.threads, end_reading.threads, args.threads_tolerance),
        "fds": verdict(baseline.fds, end_reading.fds, args.fds_tolerance),
    });
    if let (Some(b), Some(e)) = (baseline.gauges, end_reading.gauges) {
        let exact =
            |b: i64, e: i64| json!({ "baseline": b, "end": e, "tolerance": 0, "back": b == e });
        returned["tandem_connections"] = exact(b.connections, e.connections);
        returned["tandem_rooms_loaded"] = exact(b.rooms_loaded, e.rooms_loaded);
        returned["tandem_awareness_states"] = exact(b.awareness_states, e.awareness_states);
    }
    let all_back = returned
        .as_object()
        .is_some_and(|m| m.values().all(|v| v["back"] == true));
    let gauge_peak = |f: fn(&Gauges) -> i64| {
        all_readings()
            .filter_map(|r| r.gauges.as_ref().map(f))
            .max()
    };
    Ok(json!({
        "target": target.name(),
        "pid": pid,
        "connect_secs": connect_secs,
        "window_secs": window,
        "updates_sent": sent,
        "deliveries": delivered,
        "deliveries_per_s": delivered as f64 / window,
        "deliveries_per_second": outcome.per_second,
        "cpu": procstat::cpu_json(&cpu0, &cpu1, window, delivered),
        "machine": procstat::context_json(&m0, &m1, (&cpu0, &cpu1), (&me0, &me1), window),
        "latency": peers::latency_json(&sh.latency.lock().unwrap()),
        "latency_curve": charts::percentile_curve(&sh.latency.lock().unwrap()),
        "stable": {
            "readers": args.rooms * args.stable,
            "expected_deliveries": expected,
            "received_deliveries": received,
            "lost": lost,
            "duplicated": duplicated,
            "sockets_ended_early": sh.stable_ended.load(Ordering::Relaxed),
            "probe_no_op_updates": sh.probe_no_ops.load(Ordering::Relaxed),
        },
        "churn": {
            "joins": sh.joins.load(Ordering::Relaxed),
            "join_failures": sh.join_failures.load(Ordering::Relaxed),
            "first_join_error": sh.first_join_error.lock().unwrap().clone(),
            "leaves_with_close_handshake": outcome.counts.leaves_handshake,
            "leaves_dropping_socket": outcome.counts.leaves_drop,
            "leaves_short": outcome.counts.leaves_short,
            "ended_by_server": sh.churners_ended_by_server.load(Ordering::Relaxed),
            "join_latency": peers::latency_json(&sh.join_latency.lock().unwrap()),
        },
        "rss_growth_kib_per_min": rss_slope(&outcome.readings).map(|s| s * 60.0),
        "peak": {
            "rss_kib": peak(&|r| r.cpu.rss_kib),
            "threads": peak(&|r| r.threads),
            "fds": peak(&|r| r.fds),
            "tandem_connections": gauge_peak(|g| g.connections),
            "tandem_rooms_loaded": gauge_peak(|g| g.rooms_loaded),
        },
        "connected": connected.json(0.0, "connected", None),
        "settle_secs": settle_secs,
        "returned": returned,
        "returned_to_baseline": all_back,
        "timeline": timeline,
    }))
}

/// RSS growth in KiB per second over the second half of the churn (least squares), when there
/// are at least 4 readings there: a steady climb while the population is constant is a leak.
fn rss_slope(readings: &[(f64, Reading)]) -> Option<f64> {
    let half = &readings[readings.len() / 2..];
    if half.len() < 4 {
        return None;
    }
    let n = half.len() as f64;
    let mx = half.iter().map(|(t, _)| t).sum::<f64>() / n;
    let my = half.iter().map(|(_, r)| r.cpu.rss_kib as f64).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (t, r) in half {
        sxy += (t - mx) * (r.cpu.rss_kib as f64 - my);
        sxx += (t - mx) * (t - mx);
    }
    (sxx > 0.0).then(|| sxy / sxx)
}

fn print_table(r: &Value) {
    println!(
        "soak: {} rooms, {} clients ({} writer(s), {} stable, {} churning per room), {} updates/s per room, {} s, churn {}/s (seed {}); tandem --room-idle-grace {} s",
        r["rooms"], r["population"], r["writers_per_room"], r["stable_readers_per_room"],
        r["churning_per_room"], r["rate_per_room"], r["duration_secs"], r["churn_per_s"],
        r["seed"], r["tandem_room_idle_grace_secs"]
    );
    let tol = &r["tolerance"];
    println!(
        "back to baseline: RSS within +{} MiB, threads within +{}, open fds within +{}, tandem gauges exactly",
        peers::num(&json!(tol["rss_kib"].as_f64().map(|k| k / 1024.0)), 0),
        tol["threads"],
        tol["fds"]
    );
    let runs = r["runs"].as_array().cloned().unwrap_or_default();
    let f = peers::num;
    let yes_no = |v: &Value| match v.as_bool() {
        Some(true) => "yes".to_string(),
        Some(false) => "NO".to_string(),
        None => "-".to_string(),
    };
    let int = |v: &Value| {
        if v.is_null() {
            "-".to_string()
        } else {
            v.to_string()
        }
    };
    let mut rows: Vec<(&str, Cell<'_>)> = vec![
        (
            "RSS baseline MiB",
            Box::new(|v| peers::mib(&v["returned"]["rss_kib"]["baseline"])),
        ),
        (
            "RSS peak MiB",
            Box::new(|v| peers::mib(&v["peak"]["rss_kib"])),
        ),
        (
            "RSS end MiB",
            Box::new(|v| peers::mib(&v["returned"]["rss_kib"]["end"])),
        ),
        (
            "RSS back",
            Box::new(move |v| yes_no(&v["returned"]["rss_kib"]["back"])),
        ),
        (
            "RSS growth KiB/min (churn)",
            Box::new(|v| f(&v["rss_growth_kib_per_min"], 0)),
        ),
        (
            "threads baseline/peak/end",
            Box::new(move |v| {
                format!(
                    "{}/{}/{}",
                    int(&v["returned"]["threads"]["baseline"]),
                    int(&v["peak"]["threads"]),
                    int(&v["returned"]["threads"]["end"])
                )
            }),
        ),
        (
            "threads back",
            Box::new(move |v| yes_no(&v["returned"]["threads"]["back"])),
        ),
        (
            "fds baseline/peak/end",
            Box::new(move |v| {
                format!(
                    "{}/{}/{}",
                    int(&v["returned"]["fds"]["baseline"]),
                    int(&v["peak"]["fds"]),
                    int(&v["returned"]["fds"]["end"])
                )
            }),
        ),
        (
            "fds back",
            Box::new(move |v| yes_no(&v["returned"]["fds"]["back"])),
        ),
        (
            "connections gauge b/p/e",
            Box::new(move |v| {
                format!(
                    "{}/{}/{}",
                    int(&v["returned"]["tandem_connections"]["baseline"]),
                    int(&v["peak"]["tandem_connections"]),
                    int(&v["returned"]["tandem_connections"]["end"])
                )
            }),
        ),
        (
            "rooms gauge b/p/e",
            Box::new(move |v| {
                format!(
                    "{}/{}/{}",
                    int(&v["returned"]["tandem_rooms_loaded"]["baseline"]),
                    int(&v["peak"]["tandem_rooms_loaded"]),
                    int(&v["returned"]["tandem_rooms_loaded"]["end"])
                )
            }),
        ),
        (
            "all back to baseline",
            Box::new(move |v| yes_no(&v["returned_to_baseline"])),
        ),
        ("settle s", Box::new(|v| f(&v["settle_secs"], 1))),
        ("joins", Box::new(|v| v["churn"]["joins"].to_string())),
        (
            "join failures",
            Box::new(|v| v["churn"]["join_failures"].to_string()),
        ),
        (
            "join p50 ms",
            Box::new(|v| f(&v["churn"]["join_latency"]["p50_ms"], 2)),
        ),
        (
            "join p99 ms",
            Box::new(|v| f(&v["churn"]["join_latency"]["p99_ms"], 2)),
        ),
        (
            "churners ended by server",
            Box::new(|v| v["churn"]["ended_by_server"].to_string()),
        ),
        ("deliveries / s", Box::new(|v| f(&v["deliveries_per_s"], 0))),
        (
            "stable: lost",
            Box::new(|v| v["stable"]["lost"].to_string()),
        ),
        (
            "stable: duplicated",
            Box::new(|v| v["stable"]["duplicated"].to_string()),
        ),
        (
            "stable: ended early",
            Box::new(|v| v["stable"]["sockets_ended_early"].to_string()),
        ),
    ];
    rows.extend(peers::latency_rows());
    rows.extend(peers::cpu_rows());
    rows.extend(peers::machine_rows());
    rows.push(("connect s", Box::new(|v| f(&v["connect_secs"], 2))));
    peers::print_comparison(&runs, &rows, &Value::Null);
    for run in &runs {
        if let Some(e) = run["churn"]["first_join_error"].as_str() {
            println!(
                "{}: first join error: {e}",
                run["target"].as_str().unwrap_or("?")
            );
        }
    }
}
