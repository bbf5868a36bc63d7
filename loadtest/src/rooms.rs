//! `rooms`: R rooms × C clients each against one or more targets (tandem, the stock y-websocket
//! server, Hocuspocus), one after another, and the server's CPU per delivered update.
//!
//! Per room: W writers, each with its own yrs document, push their send time (µs since the Unix
//! epoch) into their own Y.Array (`ts{w}`) at the room's rate, one transaction and one sync update
//! message per update. P probes decode every update with yrs and record latency (receive time −
//! send time, one clock) in an HDR histogram corrected for coordinated omission. The other
//! connections only count update messages. The server's user and system CPU time
//! (`/proc/PID/stat`) and memory (`/proc/PID/status`) are sampled when the warmup ends and when
//! the measured window ends; deliveries are counted at the same instants.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use yrs::updates::decoder::Decode;
use yrs::{Array, ArrayRef, Doc, Out, Transact, Update};

use crate::peers::{Server, Target};
use crate::procstat;
use crate::wire::{self, Dialect};

type Res<T> = Result<T, String>;
type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// The tandem binary to spawn.
    #[arg(long, default_value = "target/release/tandem")]
    tandem: std::path::PathBuf,
    /// The directory of the Node peers (package.json, the start scripts).
    #[arg(long, default_value = "loadtest/peers")]
    peers: std::path::PathBuf,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
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
    let mut runs = Vec::new();
    for &target in &args.targets {
        eprintln!("rooms: {} ...", target.name());
        let report = match run_target(&args, target).await {
            Ok(r) => r,
            Err(e) => json!({ "target": target.name(), "error": e }),
        };
        runs.push(report);
    }
    let report = json!({
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
        "runs": runs,
        "ratios_vs_tandem": ratios(&runs),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap());
    } else {
        print_table(&report);
    }
    Ok(())
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

/// Connects and syncs one client: Hocuspocus auth first (and its answer), then step 1, then
/// waits for the step 2 answer.
async fn handshake(url: &str, dialect: Dialect, room: &str) -> Res<Ws> {
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .map_err(|e| format!("connect {url}: {e}"))?;
    if let Some(auth) = dialect.auth(room, "loadtest") {
        ws.send(Message::Binary(auth.into()))
            .await
            .map_err(|e| format!("send auth: {e}"))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => match wire::parse(dialect, &b).auth {
                    Some(2) => break,
                    Some(other) => return Err(format!("auth answered with sub-type {other}")),
                    None => {}
                },
                Some(Ok(_)) => {}
                other => return Err(format!("socket ended during auth: {other:?}")),
            }
        }
    }
    ws.send(Message::Binary(dialect.step1(room, &[0]).into()))
        .await
        .map_err(|e| format!("send step1: {e}"))?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                if !wire::parse(dialect, &b).step2.is_empty() {
                    return Ok(ws);
                }
            }
            Some(Ok(_)) => {}
            other => return Err(format!("socket ended during sync: {other:?}")),
        }
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

/// A probe's document: per writer array and how many elements were read already.
struct ProbeDoc {
    doc: Doc,
    arrays: Vec<ArrayRef>,
    seen: Vec<u32>,
}

impl ProbeDoc {
    fn new(writers: usize) -> ProbeDoc {
        let doc = Doc::new();
        let arrays = (0..writers)
            .map(|w| doc.get_or_insert_array(format!("ts{w}").as_str()))
            .collect();
        ProbeDoc {
            doc,
            arrays,
            seen: vec![0; writers],
        }
    }

    /// Applies an update and returns the send times it brought; `None` if it did not decode.
    fn apply(&mut self, update: &[u8]) -> Option<Vec<u64>> {
        let u = Update::decode_v1(update).ok()?;
        let mut txn = self.doc.transact_mut();
        txn.apply_update(u).ok()?;
        let mut out = Vec::new();
        for (w, arr) in self.arrays.iter().enumerate() {
            let len = arr.len(&txn);
            for i in self.seen[w]..len {
                if let Some(Out::Any(yrs::Any::Number(n))) = arr.get(&txn, i) {
                    if let Some(v) = n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)) {
                        out.push(v as u64);
                    }
                }
            }
            self.seen[w] = self.seen[w].max(len);
        }
        Some(out)
    }
}

/// Reads a non-writer connection until it ends: counts update messages; probes also decode them.
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
                                for t in ts.into_iter().filter(|t| *t >= from && *t < to) {
                                    let _ = h.record_correct(
                                        now.saturating_sub(t).max(1),
                                        shared.interval_us,
                                    );
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
    let (start, offset, period, end) = times;
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
        let doc = Doc::new();
        let arr = doc.get_or_insert_array(format!("ts{w}").as_str());
        let mut k: u32 = 0;
        loop {
            let due = start + offset + period * k;
            if due >= end {
                break;
            }
            tokio::time::sleep_until(due.into()).await;
            let update = {
                let mut txn = doc.transact_mut();
                arr.push_back(&mut txn, now_us() as i64);
                txn.encode_update_v1()
            };
            if sink
                .send(Message::Binary(dialect.update(&room_name, &update).into()))
                .await
                .is_err()
            {
                break;
            }
            shared.rooms[room].sent.fetch_add(1, Ordering::Relaxed);
            k += 1;
        }
        // Keep the socket open (and drained) until the run ends: the caller aborts this task.
        std::future::pending::<()>().await;
    };
    tokio::join!(drain, send);
}

/// Aborts the connection tasks when dropped, so that no early return leaves them running.
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

async fn run_target(args: &RoomsArgs, target: Target) -> Res<Value> {
    let server = Server::start(target, &args.tandem, &args.peers).await?;
    let out = measure(args, target, &server).await;
    server.stop().await;
    out
}

async fn measure(args: &RoomsArgs, target: Target, server: &Server) -> Res<Value> {
    let dialect = target.dialect();
    let idle = procstat::sample(server.pid)?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let room_names: Vec<String> = (0..args.rooms)
        .map(|r| format!("loadtest-rooms-{stamp}-{r}"))
        .collect();
    let readers = args.clients - args.writers;
    let period = Duration::from_secs_f64(args.writers as f64 / args.rate);
    let shared = Arc::new(Shared {
        rooms: (0..args.rooms)
            .map(|_| RoomCounters {
                sent: AtomicU64::new(0),
                received: (0..readers).map(|_| AtomicU64::new(0)).collect(),
            })
            .collect(),
        dropped: AtomicU64::new(0),
        latency: Mutex::new(
            Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds"),
        ),
        probe_duplicates: AtomicU64::new(0),
        window: Mutex::new((u64::MAX, u64::MAX)),
        interval_us: period.as_micros() as u64,
    });

    // Connect everything, writers last in each room, a bounded number at once.
    let connect_start = Instant::now();
    let sem = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let mut pending = Vec::new();
    for (r, name) in room_names.iter().enumerate() {
        for c in 0..args.clients {
            let role = if c < args.probes {
                Role::Probe
            } else if c < readers {
                Role::Counter
            } else {
                Role::Writer(c - readers)
            };
            let url = format!("ws://{}/{name}", server.addr);
            let name = name.clone();
            let sem = Arc::clone(&sem);
            pending.push((
                Conn {
                    room: r,
                    role,
                    slot: c,
                },
                tokio::spawn(async move {
                    let _permit = sem.acquire_owned().await;
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&url, dialect, &name))
                        .await
                        .map_err(|_| format!("{url}: no sync within {HANDSHAKE_TIMEOUT:?}"))?
                }),
            ));
        }
    }
    let mut connected = Vec::new();
    let mut first_err = None;
    for (conn, h) in pending {
        match h.await.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(ws) => connected.push((conn, ws)),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(format!(
            "{} of {} connections failed; first: {e}",
            args.rooms * args.clients - connected.len(),
            args.rooms * args.clients
        ));
    }
    let connect_secs = connect_start.elapsed().as_secs_f64();
    let connected_sample = procstat::sample(server.pid)?;

    // Start the readers, settle, then the writers.
    let mut tasks = Tasks(Vec::new());
    let mut writers = Vec::new();
    for (conn, ws) in connected {
        if matches!(conn.role, Role::Writer(_)) {
            writers.push((conn, ws));
        } else {
            let sh = Arc::clone(&shared);
            tasks
                .0
                .push(tokio::spawn(receive(ws, dialect, conn, args.writers, sh)));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now() + Duration::from_millis(100);
    let window_start = start + args.warmup;
    let end = window_start + args.duration;
    {
        let base = now_us() + 100_000;
        *shared.window.lock().unwrap() = (
            base + args.warmup.as_micros() as u64,
            base + (args.warmup + args.duration).as_micros() as u64,
        );
    }
    let all = (args.rooms * args.writers) as u32;
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

    tokio::time::sleep_until(window_start.into()).await;
    let (cpu0, del0, sent0, t0) = (
        procstat::sample(server.pid)?,
        shared.delivered(),
        shared.sent(),
        Instant::now(),
    );
    tokio::time::sleep_until(end.into()).await;
    let (cpu1, del1, sent1, t1) = (
        procstat::sample(server.pid)?,
        shared.delivered(),
        shared.sent(),
        Instant::now(),
    );

    // Drain: until every reader has every update its room sent, or the deadline.
    let drain_end = Instant::now() + args.drain_timeout;
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
    let user = cpu1.user_us.saturating_sub(cpu0.user_us);
    let sys = cpu1.sys_us.saturating_sub(cpu0.sys_us);
    let per = |us: u64| {
        if deliveries == 0 {
            Value::Null
        } else {
            json!(us as f64 / deliveries as f64)
        }
    };
    let h = shared.latency.lock().unwrap();
    let ms = |v: u64| v as f64 / 1000.0;
    let lat = if h.is_empty() {
        json!({ "count": 0 })
    } else {
        json!({
            "count": h.len(),
            "p50_ms": ms(h.value_at_quantile(0.5)),
            "p99_ms": ms(h.value_at_quantile(0.99)),
            "p999_ms": ms(h.value_at_quantile(0.999)),
            "max_ms": ms(h.max()),
        })
    };
    let conns = (args.rooms * args.clients) as f64;
    Ok(json!({
        "target": target.name(),
        "pid": server.pid,
        "connect_secs": connect_secs,
        "window_secs": window,
        "updates_sent_in_window": sent1 - sent0,
        "deliveries_in_window": deliveries,
        "deliveries_per_s": deliveries as f64 / window,
        "cpu": {
            "user_us": user,
            "sys_us": sys,
            "user_us_per_delivery": per(user),
            "sys_us_per_delivery": per(sys),
            "total_us_per_delivery": per(user + sys),
            "cpu_percent": (user + sys) as f64 / window / 1e4,
        },
        "latency": lat,
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

/// Peer / tandem for the per-delivery CPU figures (how many times tandem's cost a peer pays).
fn ratios(runs: &[Value]) -> Value {
    let Some(base) = runs
        .iter()
        .find(|r| r["target"] == "tandem" && r.get("error").is_none())
    else {
        return Value::Null;
    };
    let mut out = serde_json::Map::new();
    for r in runs
        .iter()
        .filter(|r| r["target"] != "tandem" && r.get("error").is_none())
    {
        let q = |k: &str| match (r["cpu"][k].as_f64(), base["cpu"][k].as_f64()) {
            (Some(a), Some(b)) if b > 0.0 => json!(a / b),
            _ => Value::Null,
        };
        out.insert(
            r["target"].as_str().unwrap_or("?").to_string(),
            json!({
                "user_cpu_per_delivery": q("user_us_per_delivery"),
                "sys_cpu_per_delivery": q("sys_us_per_delivery"),
                "total_cpu_per_delivery": q("total_us_per_delivery"),
            }),
        );
    }
    Value::Object(out)
}

/// Formats one table cell from a run's report.
type Cell<'a> = Box<dyn Fn(&Value) -> String + 'a>;

fn print_table(r: &Value) {
    println!(
        "rooms: {} rooms × {} clients ({} connections), {} writer(s) + {} probe(s) per room, {} updates/s per room, warmup {} s, window {} s",
        r["rooms"], r["clients_per_room"], r["connections"], r["writers_per_room"],
        r["probes_per_room"], r["rate_per_room"], r["warmup_secs"], r["window_secs"]
    );
    let runs = r["runs"].as_array().cloned().unwrap_or_default();
    let f = |v: &Value, p: usize| v.as_f64().map_or("-".into(), |x| format!("{x:.p$}"));
    let rows: Vec<(&str, Cell<'_>)> = vec![
        (
            "user CPU µs / delivery",
            Box::new(|v| f(&v["cpu"]["user_us_per_delivery"], 2)),
        ),
        (
            "sys CPU µs / delivery",
            Box::new(|v| f(&v["cpu"]["sys_us_per_delivery"], 2)),
        ),
        (
            "total CPU µs / delivery",
            Box::new(|v| f(&v["cpu"]["total_us_per_delivery"], 2)),
        ),
        ("server CPU %", Box::new(|v| f(&v["cpu"]["cpu_percent"], 1))),
        ("deliveries / s", Box::new(|v| f(&v["deliveries_per_s"], 0))),
        (
            "latency p50 ms",
            Box::new(|v| f(&v["latency"]["p50_ms"], 2)),
        ),
        (
            "latency p99 ms",
            Box::new(|v| f(&v["latency"]["p99_ms"], 2)),
        ),
        (
            "latency p99.9 ms",
            Box::new(|v| f(&v["latency"]["p999_ms"], 2)),
        ),
        (
            "latency max ms",
            Box::new(|v| f(&v["latency"]["max_ms"], 2)),
        ),
        (
            "latency samples",
            Box::new(|v| v["latency"]["count"].to_string()),
        ),
        ("lost", Box::new(|v| v["lost"].to_string())),
        ("duplicated", Box::new(|v| v["duplicated"].to_string())),
        (
            "sockets ended early",
            Box::new(|v| v["sockets_ended_early"].to_string()),
        ),
        (
            "RSS end MiB",
            Box::new(|v| {
                f(
                    &json!(v["memory_kib"]["rss_end"].as_f64().map(|x| x / 1024.0)),
                    1,
                )
            }),
        ),
        (
            "RSS peak MiB",
            Box::new(|v| {
                f(
                    &json!(v["memory_kib"]["hwm"].as_f64().map(|x| x / 1024.0)),
                    1,
                )
            }),
        ),
        (
            "RSS KiB / connection",
            Box::new(|v| f(&v["memory_kib"]["rss_per_connection"], 1)),
        ),
        ("connect s", Box::new(|v| f(&v["connect_secs"], 2))),
    ];
    print!("{:<26}", "");
    for run in &runs {
        print!(" {:>12}", run["target"].as_str().unwrap_or("?"));
    }
    println!();
    for (name, get) in &rows {
        print!("{name:<26}");
        for run in &runs {
            let s = if run.get("error").is_some() {
                "error".to_string()
            } else {
                get(run)
            };
            print!(" {s:>12}");
        }
        println!();
    }
    if let Some(m) = r["ratios_vs_tandem"].as_object() {
        for (peer, q) in m {
            println!(
                "{peer} / tandem, CPU per delivery: user ×{}, sys ×{}, total ×{}",
                f(&q["user_cpu_per_delivery"], 1),
                f(&q["sys_cpu_per_delivery"], 1),
                f(&q["total_cpu_per_delivery"], 1)
            );
        }
    }
    for run in &runs {
        if let Some(e) = run.get("error") {
            println!(
                "{}: error: {}",
                run["target"].as_str().unwrap_or("?"),
                e.as_str().unwrap_or("")
            );
        }
    }
}
