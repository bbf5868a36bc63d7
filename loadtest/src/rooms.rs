//! `rooms`: R rooms × C clients each against one or more targets (tandem, the stock y-websocket
//! server, Hocuspocus), one after another, and the server's CPU per delivered update.
//!
//! Per room: W writers, each with its own yrs document, push their send time (µs since the Unix
//! epoch) into their own Y.Array (`ts{w}`) at the room's rate, one transaction and one sync update
//! message per update. P probes decode every update with yrs and record latency (receive time −
//! send time, one clock) in an HDR histogram corrected for coordinated omission. The other
//! connections only count update messages, over the raw client of [`crate::raw`]. The server's user
//! and system CPU time (`/proc/PID/stat`) and memory (`/proc/PID/status`) are sampled when the
//! warmup ends and when the measured window ends; deliveries are counted at the same instants, and
//! so are the load generator's own CPU and the machine's busy time (what else ran). Deliveries are
//! also counted per second of the run, and the latency histogram's percentile curve is kept, for
//! the charts of `--out` ([`crate::charts`]). The run itself ([`Plan`], [`run_target`]) is shared
//! with `fanout`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::peers::{self, Cell, Server, Target};
use crate::raw::{self, Next, RawConn};
use crate::wire::{self, now_us, Dialect, ProbeDoc, Tasks, Ws};
use crate::{charts, procstat, progress, rounds};

type Res<T> = Result<T, String>;

/// Arguments of the `rooms` scenario.
#[derive(Debug, clap::Args)]
pub struct RoomsArgs {
    /// A server to measure; repeat to compare (the first tandem is the reference for ratios).
    #[arg(long = "target", value_enum, default_values_t = [Target::Tandem])]
    targets: Vec<Target>,
    /// Rooms.
    #[arg(long, default_value_t = 20)]
    rooms: usize,
    /// Connections per room, writers and probes included.
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// Writers per room.
    #[arg(long, default_value_t = 1)]
    writers: usize,
    /// Latency probes per room (decode every update with yrs).
    #[arg(long, default_value_t = 2)]
    probes: usize,
    /// Updates per second per room (over the room's writers).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Measured window, after the warmup.
    #[arg(long, default_value = "20s", value_parser = crate::parse_secs)]
    duration: Duration,
    /// Sending before the measured window starts.
    #[arg(long, default_value = "3s", value_parser = crate::parse_secs)]
    warmup: Duration,
    /// Deadline for the last deliveries after the writers stopped.
    #[arg(long, default_value = "10s", value_parser = crate::parse_secs)]
    drain_timeout: Duration,
    /// Connections opening at once.
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// The servers to start.
    #[command(flatten)]
    servers: peers::ServerPaths,
    /// Write a results folder: report.json and SVG charts (latency percentiles, deliveries per
    /// second).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Run the targets round-robin this many times: the table shows each target's median run
    /// (by total CPU per delivery) and the range over the rounds; the JSON has every run.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One rooms-shaped run, independent of the command line: `rooms` builds it from its flags,
/// `fanout` (one room, one writer, many observers) from its own.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Rooms.
    pub rooms: usize,
    /// Connections per room, writers and probes included.
    pub clients: usize,
    /// Writers per room.
    pub writers: usize,
    /// Latency probes per room.
    pub probes: usize,
    /// Spread the probes evenly over the room's join order (the last reader to join is one),
    /// instead of making the first readers the probes: a server that fans out in join order
    /// then cannot favour them.
    pub spread_probes: bool,
    /// Updates per second per room.
    pub rate: f64,
    /// Sending before the measured window.
    pub warmup: Duration,
    /// The measured window.
    pub duration: Duration,
    /// Deadline for the last deliveries after the writers stopped.
    pub drain_timeout: Duration,
    /// Connections opening at once.
    pub connect_concurrency: usize,
    /// The tandem binary.
    pub tandem: std::path::PathBuf,
    /// The directory of the Node peers.
    pub peers: std::path::PathBuf,
    /// Extra flags for tandem (see [`Server::start`]).
    pub tandem_args: Vec<&'static str>,
}

impl Plan {
    /// Whether reader slot `c` (0-based, in join order) is a probe.
    fn is_probe(&self, c: usize) -> bool {
        let readers = self.clients - self.writers;
        if self.spread_probes {
            (1..=self.probes).any(|i| i * readers / self.probes == c + 1)
        } else {
            c < self.probes
        }
    }
}

impl RoomsArgs {
    fn plan(&self) -> Plan {
        Plan {
            rooms: self.rooms,
            clients: self.clients,
            writers: self.writers,
            probes: self.probes,
            spread_probes: false,
            rate: self.rate,
            warmup: self.warmup,
            duration: self.duration,
            drain_timeout: self.drain_timeout,
            connect_concurrency: self.connect_concurrency,
            tandem: self.servers.tandem.clone(),
            peers: self.servers.peers.clone(),
            tandem_args: Vec::new(),
        }
    }
}

/// Runs the scenario against every target in turn and prints one report.
pub async fn rooms(args: RoomsArgs) -> Res<()> {
    if args.rooms == 0
        || args.writers == 0
        || args.clients < args.writers + args.probes + 1
        || args.rate <= 0.0
    {
        return Err("need rooms >= 1, writers >= 1, clients > writers + probes, rate > 0".into());
    }
    let nofile = procstat::raise_nofile()?;
    let conns = args.rooms * args.clients;
    if (conns as u64) * 2 + 200 > nofile {
        eprintln!("warning: {conns} connections with an open-files limit of {nofile}");
    }
    let plan = args.plan();
    let plan = &plan;
    let all = rounds::round_robin(
        "rooms",
        &args.targets,
        args.rounds as usize,
        |target| async move { peers::report_or_error(target, run_target(plan, target).await) },
    )
    .await;
    let runs = rounds::medians(&all);
    let mut report = json!({
        "scenario": "rooms",
        "rooms": args.rooms,
        "clients_per_room": args.clients,
        "writers_per_room": args.writers,
        "probes_per_room": args.probes,
        "connections": conns,
        "rate_per_room": args.rate,
        "warmup_secs": args.warmup.as_secs_f64(),
        "window_secs": args.duration.as_secs_f64(),
        "open_files_limit": nofile,
        "ratios_vs_tandem": peers::cpu_ratios(&runs),
        "runs": runs,
    });
    if all.len() > 1 {
        report["all_rounds"] = json!(all);
    }
    peers::emit(&report, args.out.as_deref(), args.json, print_table)
}

/// Counts of one room, shared with its connection tasks.
struct RoomCounters {
    /// Update messages sent by the room's writers.
    sent: AtomicU64,
    /// Update messages received, one counter per non-writer connection.
    received: Vec<AtomicU64>,
}

struct Shared {
    rooms: Vec<RoomCounters>,
    /// Connections whose socket ended before the run did.
    dropped: AtomicU64,
    /// Latencies in µs, probes only, for updates sent inside the measured window.
    latency: Mutex<Histogram<u64>>,
    /// The same per probe, by the probe's join index in its room (`Conn::slot`).
    probe_latency: Mutex<BTreeMap<usize, Histogram<u64>>>,
    /// Probe updates that added nothing new to the probe's document (re-deliveries).
    probe_duplicates: AtomicU64,
    window: Mutex<(u64, u64)>,
    interval_us: u64,
}

impl Shared {
    fn delivered(&self) -> u64 {
        self.rooms
            .iter()
            .flat_map(|r| r.received.iter())
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
    fn sent(&self) -> u64 {
        self.rooms
            .iter()
            .map(|r| r.sent.load(Ordering::Relaxed))
            .sum()
    }
}

enum Role {
    Writer(usize),
    Probe,
    Counter,
}

struct Conn {
    room: usize,
    role: Role,
    /// Index into the room's `received` (non-writers).
    slot: usize,
}

/// Latencies in µs, up to 10 minutes, 3 significant digits.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// Reads a probe's connection until it ends: counts update messages and decodes them.
async fn receive(ws: Ws, dialect: Dialect, conn: Conn, writers: usize, shared: Arc<Shared>) {
    let (_sink, mut stream) = ws.split();
    let counter = &shared.rooms[conn.room].received[conn.slot];
    let mut probe = matches!(conn.role, Role::Probe).then(|| ProbeDoc::new(writers));
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(Message::Binary(b)) => {
                let r = wire::parse(dialect, &b);
                if r.updates.is_empty() {
                    continue;
                }
                counter.fetch_add(r.updates.len() as u64, Ordering::Relaxed);
                if let Some(p) = &mut probe {
                    let now = now_us();
                    let (from, to) = *shared.window.lock().unwrap();
                    for u in r.updates {
                        match p.apply(u) {
                            Some(ts) if ts.is_empty() => {
                                shared.probe_duplicates.fetch_add(1, Ordering::Relaxed);
                            }
                            Some(ts) => {
                                let mut h = shared.latency.lock().unwrap();
                                let mut per = shared.probe_latency.lock().unwrap();
                                let mine = per.entry(conn.slot).or_insert_with(latency_histogram);
                                for t in ts.into_iter().filter(|t| *t >= from && *t < to) {
                                    let v = now.saturating_sub(t).max(1);
                                    let _ = h.record_correct(v, shared.interval_us);
                                    let _ = mine.record_correct(v, shared.interval_us);
                                }
                            }
                            None => {}
                        }
                    }
                }
            }
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    shared.dropped.fetch_add(1, Ordering::Relaxed);
}

/// Reads a counting connection until it ends: counts update messages.
async fn count(mut raw: RawConn, dialect: Dialect, conn: Conn, shared: Arc<Shared>) {
    let counter = &shared.rooms[conn.room].received[conn.slot];
    let _ended = raw
        .read_messages(|m| {
            let n = wire::parse(dialect, m).updates.len() as u64;
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
            Next::More
        })
        .await;
    shared.dropped.fetch_add(1, Ordering::Relaxed);
}

/// The joined connections that are not probes, by kind.
#[derive(Default)]
struct Connected {
    /// Raw connections that count ([`count`]).
    counters: Vec<(Conn, RawConn)>,
    /// The writers' WebSockets.
    writers: Vec<(Conn, Ws)>,
}

/// Joins `batch` (counters first, then writers), at most `plan.connect_concurrency` at once.
async fn connect_batch(
    plan: &Plan,
    addr: &str,
    dialect: Dialect,
    batch: Vec<Conn>,
    job: &dyn Fn(&Conn) -> (String, Option<std::net::Ipv4Addr>),
    connected: &mut Connected,
) -> Res<()> {
    let (writers, counters): (Vec<Conn>, Vec<Conn>) = batch
        .into_iter()
        .partition(|c| matches!(c.role, Role::Writer(_)));
    let jobs = counters.iter().map(job).collect();
    let raws = raw::join_all(addr, dialect, jobs, plan.connect_concurrency).await?;
    connected.counters.extend(counters.into_iter().zip(raws));
    let jobs = writers.iter().map(job).collect();
    let sockets = wire::connect_all(addr, dialect, jobs, plan.connect_concurrency).await?;
    connected.writers.extend(writers.into_iter().zip(sockets));
    Ok(())
}

/// Sends updates from `start + offset` every `period` until `end`; drains what comes back.
#[allow(clippy::too_many_arguments)]
async fn write(
    ws: Ws,
    dialect: Dialect,
    room_name: String,
    room: usize,
    w: usize,
    times: (Instant, Duration, Duration, Instant),
    shared: Arc<Shared>,
) {
    let (mut sink, mut stream) = ws.split();
    // Both halves in this one task, so that aborting it closes the socket.
    let drain = async {
        while let Some(m) = stream.next().await {
            if matches!(m, Ok(Message::Close(_)) | Err(_)) {
                break;
            }
        }
        shared.dropped.fetch_add(1, Ordering::Relaxed);
    };
    let send = async {
        wire::send_stamped(&mut sink, dialect, &room_name, w, times, || {
            shared.rooms[room].sent.fetch_add(1, Ordering::Relaxed);
        })
        .await;
        // Keep the socket open (and drained) until the run ends: the caller aborts this task.
        std::future::pending::<()>().await;
    };
    tokio::join!(drain, send);
}

/// The runtime the probes connect and read on: one worker thread of its own, kept for the
/// process's life.
fn probe_runtime() -> &'static tokio::runtime::Handle {
    static PROBES: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    PROBES
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("probes")
                .enable_all()
                .build()
                .expect("the probes' runtime")
        })
        .handle()
}

/// Starts `target`, runs `plan` against it and stops it; the run's report.
pub async fn run_target(plan: &Plan, target: Target) -> Res<Value> {
    let server = Server::start(target, &plan.tandem, &plan.peers, &plan.tandem_args).await?;
    let mut out = measure(plan, target, &server).await;
    if let Ok(report) = &mut out {
        report["server_warnings"] = json!(server.warnings());
    }
    server.stop().await;
    out
}

async fn measure(plan: &Plan, target: Target, server: &Server) -> Res<Value> {
    let dialect = target.dialect();
    let idle = procstat::sample(server.pid)?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let room_names: Vec<String> = (0..plan.rooms)
        .map(|r| format!("loadtest-rooms-{stamp}-{r}"))
        .collect();
    let readers = plan.clients - plan.writers;
    let period = Duration::from_secs_f64(plan.writers as f64 / plan.rate);
    let shared = Arc::new(Shared {
        rooms: (0..plan.rooms)
            .map(|_| RoomCounters {
                sent: AtomicU64::new(0),
                received: (0..readers).map(|_| AtomicU64::new(0)).collect(),
            })
            .collect(),
        dropped: AtomicU64::new(0),
        latency: Mutex::new(latency_histogram()),
        probe_latency: Mutex::new(BTreeMap::new()),
        probe_duplicates: AtomicU64::new(0),
        window: Mutex::new((u64::MAX, u64::MAX)),
        interval_us: period.as_micros() as u64,
    });

    // Connect everything, writers last in each room, a bounded number at once. A probe connects
    // and reads on a runtime of its own (its own thread and its own epoll), so that its receive
    // time is taken when its frame arrives, not after the hundreds of counting connections that
    // became readable with it: the load generator must not be what the latency measures.
    let connect_start = Instant::now();
    let mut tasks = Tasks(Vec::new());
    let mut connected = Connected::default();
    let mut batch: Vec<Conn> = Vec::new();
    let job = |conn: &Conn| (room_names[conn.room].clone(), None);
    for (r, _) in room_names.iter().enumerate() {
        for c in 0..plan.clients {
            let role = if c < readers && plan.is_probe(c) {
                Role::Probe
            } else if c < readers {
                Role::Counter
            } else {
                Role::Writer(c - readers)
            };
            let conn = Conn {
                room: r,
                role,
                slot: c,
            };
            if !matches!(conn.role, Role::Probe) {
                batch.push(conn);
                continue;
            }
            // Everything before the probe joins first, so that join order is kept.
            let before = std::mem::take(&mut batch);
            connect_batch(plan, &server.addr, dialect, before, &job, &mut connected).await?;
            let (addr, probe_job, sh) = (server.addr.clone(), job(&conn), Arc::clone(&shared));
            let writers = plan.writers;
            let (joined, joined_rx) = tokio::sync::oneshot::channel();
            tasks.0.push(probe_runtime().spawn(async move {
                match wire::connect_all(&addr, dialect, vec![probe_job], 1).await {
                    Ok(mut ws) => {
                        let _ = joined.send(Ok(()));
                        if let Some(ws) = ws.pop() {
                            receive(ws, dialect, conn, writers, sh).await;
                        }
                    }
                    Err(e) => {
                        let _ = joined.send(Err(e));
                    }
                }
            }));
            joined_rx
                .await
                .map_err(|_| "a probe's connection task ended".to_string())??;
        }
    }
    connect_batch(plan, &server.addr, dialect, batch, &job, &mut connected).await?;
    let connect_secs = connect_start.elapsed().as_secs_f64();
    let connected_sample = procstat::sample(server.pid)?;

    // Start the counters (the probes already read), settle, then the writers.
    for (conn, raw) in connected.counters {
        let sh = Arc::clone(&shared);
        tasks.0.push(tokio::spawn(count(raw, dialect, conn, sh)));
    }
    let writers = connected.writers;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now() + Duration::from_millis(100);
    let window_start = start + plan.warmup;
    let end = window_start + plan.duration;
    {
        let base = now_us() + 100_000;
        *shared.window.lock().unwrap() = (
            base + plan.warmup.as_micros() as u64,
            base + (plan.warmup + plan.duration).as_micros() as u64,
        );
    }
    let all = (plan.rooms * plan.writers) as u32;
    for (i, (conn, ws)) in writers.into_iter().enumerate() {
        let Role::Writer(w) = conn.role else {
            unreachable!()
        };
        let offset = period * (i as u32) / all;
        tasks.0.push(tokio::spawn(write(
            ws,
            dialect,
            room_names[conn.room].clone(),
            conn.room,
            w,
            (start, offset, period, end),
            Arc::clone(&shared),
        )));
    }

    // Deliveries in each second from the writers' start until the drain ends (for charts).
    let per_second = Arc::new(Mutex::new(Vec::new()));
    {
        let (shared, per_second) = (Arc::clone(&shared), Arc::clone(&per_second));
        tasks.0.push(tokio::spawn(async move {
            let mut last = shared.delivered();
            let mut tick = tokio::time::interval_at(
                (start + Duration::from_secs(1)).into(),
                Duration::from_secs(1),
            );
            loop {
                tick.tick().await;
                let now = shared.delivered();
                per_second.lock().unwrap().push(now - last);
                last = now;
            }
        }));
    }
    let status = || format!("{} sent, {} delivered", shared.sent(), shared.delivered());
    progress::wait_until(window_start, "warmup", status).await;
    let (me, m0) = (procstat::sample(std::process::id())?, procstat::machine()?);
    let (cpu0, threads0, del0, sent0, t0) = (
        procstat::sample(server.pid)?,
        procstat::thread_samples(server.pid)?,
        shared.delivered(),
        shared.sent(),
        Instant::now(),
    );
    progress::wait_until(end, "measure", status).await;
    let (cpu1, threads1, del1, sent1, t1) = (
        procstat::sample(server.pid)?,
        procstat::thread_samples(server.pid)?,
        shared.delivered(),
        shared.sent(),
        Instant::now(),
    );
    let (me1, m1) = (procstat::sample(std::process::id())?, procstat::machine()?);

    // Drain: until every reader has every update its room sent, or the deadline.
    let drain_end = Instant::now() + plan.drain_timeout;
    let complete = |sh: &Shared| {
        sh.rooms.iter().all(|r| {
            let s = r.sent.load(Ordering::Relaxed);
            r.received.iter().all(|c| c.load(Ordering::Relaxed) >= s)
        })
    };
    while !complete(&shared) && Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_secs = (Instant::now() - end).as_secs_f64();
    let last = procstat::sample(server.pid)?;
    let dropped = shared.dropped.load(Ordering::Relaxed);
    drop(tasks);

    let (mut expected, mut received, mut lost, mut duplicated) = (0u64, 0u64, 0u64, 0u64);
    for r in &shared.rooms {
        let s = r.sent.load(Ordering::Relaxed);
        for c in &r.received {
            let c = c.load(Ordering::Relaxed);
            expected += s;
            received += c;
            lost += s.saturating_sub(c);
            duplicated += c.saturating_sub(s);
        }
    }
    let window = (t1 - t0).as_secs_f64();
    let deliveries = del1 - del0;
    let lat = peers::latency_json(&shared.latency.lock().unwrap());
    let per_probe: Vec<Value> = shared
        .probe_latency
        .lock()
        .unwrap()
        .iter()
        .map(|(slot, h)| {
            let mut v = peers::latency_json(h);
            v["join_index"] = json!(slot);
            v
        })
        .collect();
    let conns = (plan.rooms * plan.clients) as f64;
    let mut cpu = procstat::cpu_json(&cpu0, &cpu1, window, deliveries);
    cpu["threads"] = procstat::threads_json(&threads0, &threads1, deliveries);
    Ok(json!({
        "target": target.name(),
        "pid": server.pid,
        "connect_secs": connect_secs,
        "window_secs": window,
        "updates_sent_in_window": sent1 - sent0,
        "deliveries_in_window": deliveries,
        "deliveries_per_s": deliveries as f64 / window,
        "cpu": cpu,
        "latency": lat,
        "latency_curve": charts::percentile_curve(&shared.latency.lock().unwrap()),
        "deliveries_per_second": *per_second.lock().unwrap(),
        "latency_per_probe": per_probe,
        "machine": procstat::context_json(&m0, &m1, (&cpu0, &cpu1), (&me, &me1), window),
        "expected_deliveries": expected,
        "received_deliveries": received,
        "lost": lost,
        "duplicated": duplicated,
        "probe_no_op_updates": shared.probe_duplicates.load(Ordering::Relaxed),
        "sockets_ended_early": dropped,
        "drain_secs": drain_secs,
        "memory_kib": {
            "rss_idle": idle.rss_kib,
            "rss_connected": connected_sample.rss_kib,
            "rss_end": last.rss_kib,
            "hwm": last.hwm_kib,
            "rss_per_connection": last.rss_kib.saturating_sub(idle.rss_kib) as f64 / conns,
        },
    }))
}

fn print_table(r: &Value) {
    println!(
        "rooms: {} rooms × {} clients ({} connections), {} writer(s) + {} probe(s) per room, {} updates/s per room, warmup {} s, window {} s",
        r["rooms"], r["clients_per_room"], r["connections"], r["writers_per_room"],
        r["probes_per_room"], r["rate_per_room"], r["warmup_secs"], r["window_secs"]
    );
    let runs = r["runs"].as_array().cloned().unwrap_or_default();
    let f = peers::num;
    let mut rows: Vec<(&str, Cell<'_>)> = peers::cpu_rows();
    rows.extend(peers::machine_rows());
    rows.push(("deliveries / s", Box::new(|v| f(&v["deliveries_per_s"], 0))));
    rows.extend(peers::latency_rows());
    rows.extend::<Vec<(&str, Cell<'_>)>>(vec![
        ("lost", Box::new(|v| v["lost"].to_string())),
        ("duplicated", Box::new(|v| v["duplicated"].to_string())),
        (
            "sockets ended early",
            Box::new(|v| v["sockets_ended_early"].to_string()),
        ),
    ]);
    rows.extend(peers::memory_rows());
    peers::print_comparison(&runs, &rows, &r["ratios_vs_tandem"]);
    peers::print_threads(&runs);
    rounds::print_spread(&runs);
}
