//! `idle`: N connections joined to R rooms, synced, then silent; what holding them costs the
//! server.
//!
//! For each target (tandem, the stock y-websocket server, Hocuspocus), one after another: start
//! the server, sample its RSS (`/proc/PID/status`) and the kernel's socket figures
//! (`/proc/net/sockstat` TCP `inuse`/`alloc`/`mem`, `/proc/meminfo` `Slab`), open the N
//! connections in two halves (room `i % R` for connection `i`; each handshake as in the other
//! scenarios: step 1 with an empty state vector, wait for step 2), wait a settle time after each
//! half and sample again, then measure the server's CPU over an idle window. Clients send nothing
//! after the sync and only read (so that pings are answered). Reported: RSS bytes per idle
//! connection (all N, against the fresh server: what the server spends once is in it) and per
//! connection of the second half (what one more connection costs, in rooms that exist already),
//! kernel bytes per socket, idle CPU per connection, connect time, and the projection to
//! 1,000,000 connections (from the second half's figure).
//!
//! Open files: this process raises its soft `RLIMIT_NOFILE` to the hard limit before it starts
//! the server (which inherits it). Each client socket is bound to one of several source addresses
//! in 127.0.0.0/8 (127.0.0.2, 127.0.0.3, …) with `IP_BIND_ADDRESS_NO_PORT`, so that the
//! ephemeral ports of one address do not run out. When N is above `--per-process`, the
//! connections are spread over worker processes: this binary re-executes itself as
//! `idle-worker` with a slice of the connection indices; a worker connects its slice, prints one
//! JSON line (connected, failed, first error, connect time), holds the connections until a line
//! (or end of file) arrives on its stdin, then prints a second JSON line (connections that ended
//! early, frames received after the sync) and exits.

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio_tungstenite::tungstenite::Message;

use crate::peers::{self, Cell, Server, Target};
use crate::procstat::{self, Kernel};
use crate::wire::{self, Tasks, Ws};

type Res<T> = Result<T, String>;

/// Projection target: connections on one server.
const PROJECTED: f64 = 1_000_000.0;
/// How long a worker may take to print its final line and exit once told to close.
const WORKER_STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Arguments of the `idle` scenario.
#[derive(Debug, clap::Args)]
pub struct IdleArgs {
    /// A server to measure; repeat to compare.
    #[arg(long = "target", value_enum, default_values_t = [Target::Tandem])]
    targets: Vec<Target>,
    /// Idle connections in total.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Rooms the connections are spread over (connection i joins room i mod R).
    #[arg(long, default_value_t = 100)]
    rooms: usize,
    /// Window over which the idle server's CPU is measured.
    #[arg(long, default_value = "10s", value_parser = crate::parse_secs)]
    window: Duration,
    /// Wait between the last connection's sync and the memory sample.
    #[arg(long, default_value = "3s", value_parser = crate::parse_secs)]
    settle: Duration,
    /// Connections opening at once (per process).
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Source addresses 127.0.0.2, 127.0.0.3, … to connect from; 0: one per 5,000 connections.
    #[arg(long, default_value_t = 0)]
    sources: usize,
    /// Most connections one process holds; above it, worker processes hold slices of them.
    #[arg(long, default_value_t = 15_000)]
    per_process: usize,
    /// Deadline for all connections to be open and synced.
    #[arg(long, default_value = "120s", value_parser = crate::parse_secs)]
    connect_timeout: Duration,
    /// The servers to start.
    #[command(flatten)]
    servers: peers::ServerPaths,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// A slice of the `idle` connections, held by one process (the `idle-worker` subcommand's
/// arguments, also used in-process).
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// The server, `127.0.0.1:PORT`.
    #[arg(long)]
    addr: String,
    /// The server's kind (for its framing).
    #[arg(long, value_enum)]
    target: Target,
    /// Rooms are `{prefix}-{i mod rooms}`.
    #[arg(long)]
    room_prefix: String,
    /// Rooms in the whole run.
    #[arg(long)]
    rooms: usize,
    /// First connection index of the slice.
    #[arg(long)]
    from: usize,
    /// One past the last connection index of the slice.
    #[arg(long)]
    to: usize,
    /// Source addresses in the whole run (connection i uses 127.0.0.(2 + i mod sources)).
    #[arg(long)]
    sources: usize,
    /// Connections opening at once.
    #[arg(long)]
    connect_concurrency: usize,
}

impl WorkerArgs {
    fn jobs(&self) -> Vec<(String, Option<Ipv4Addr>)> {
        (self.from..self.to)
            .map(|i| {
                (
                    format!("{}-{}", self.room_prefix, i % self.rooms),
                    Some(source(i, self.sources)),
                )
            })
            .collect()
    }

    fn to_args(&self) -> Vec<String> {
        // Target::name is also the value's name on the command line.
        [
            ("--addr", self.addr.clone()),
            ("--target", self.target.name().to_string()),
            ("--room-prefix", self.room_prefix.clone()),
            ("--rooms", self.rooms.to_string()),
            ("--from", self.from.to_string()),
            ("--to", self.to.to_string()),
            ("--sources", self.sources.to_string()),
            (
                "--connect-concurrency",
                self.connect_concurrency.to_string(),
            ),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect()
    }
}

/// The source address of connection `i`: 127.0.0.2, 127.0.0.3, … (`n` of them).
fn source(i: usize, n: usize) -> Ipv4Addr {
    let k = 2 + (i % n.max(1)) as u32;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 0)) + k)
}

/// Connections of one process, read (and so answering pings) by one task each.
struct Held {
    _tasks: Tasks,
    ended: Arc<AtomicU64>,
    frames: Arc<AtomicU64>,
    connected: usize,
    failed: usize,
    first_error: Option<String>,
    connect_secs: f64,
}

impl Held {
    /// The first report: how the connecting went.
    fn opened_json(&self) -> Value {
        json!({
            "connected": self.connected,
            "failed": self.failed,
            "first_error": self.first_error,
            "connect_secs": self.connect_secs,
        })
    }

    /// The last report: what happened while holding.
    fn closing_json(&self) -> Value {
        json!({
            "ended_early": self.ended.load(Ordering::Relaxed),
            "frames_after_sync": self.frames.load(Ordering::Relaxed),
        })
    }
}

/// Opens and syncs the slice's connections, then holds them.
async fn open(spec: &WorkerArgs) -> Held {
    let start = Instant::now();
    let results = wire::connect_many(
        &spec.addr,
        spec.target.dialect(),
        spec.jobs(),
        true,
        spec.connect_concurrency,
    )
    .await;
    let connect_secs = start.elapsed().as_secs_f64();
    let ended = Arc::new(AtomicU64::new(0));
    let frames = Arc::new(AtomicU64::new(0));
    let mut tasks = Tasks::default();
    let (mut connected, mut failed, mut first_error) = (0, 0, None);
    for r in results {
        match r {
            Ok(ws) => {
                connected += 1;
                tasks.0.push(tokio::spawn(hold(
                    ws,
                    Arc::clone(&ended),
                    Arc::clone(&frames),
                )));
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    Held {
        _tasks: tasks,
        ended,
        frames,
        connected,
        failed,
        first_error,
        connect_secs,
    }
}

/// Reads one connection until it ends; counts what arrives and whether it ended.
async fn hold(mut ws: Ws, ended: Arc<AtomicU64>, frames: Arc<AtomicU64>) {
    while let Some(m) = ws.next().await {
        match m {
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {
                frames.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    ended.fetch_add(1, Ordering::Relaxed);
}

/// The hidden `idle-worker` subcommand: connects a slice, reports, holds until told on stdin.
pub async fn worker(args: WorkerArgs) -> Res<()> {
    procstat::raise_nofile()?;
    let held = open(&args).await;
    println!("{}", held.opened_json());
    let mut line = String::new();
    // A line or end of file (the parent went away): either way, stop holding.
    let _ = BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await;
    println!("{}", held.closing_json());
    Ok(())
}

/// One worker process as the parent sees it.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Worker {
    fn spawn(spec: &WorkerArgs) -> Res<Worker> {
        let exe = std::env::current_exe().map_err(|e| format!("current executable: {e}"))?;
        let mut child = Command::new(&exe)
            .arg("idle-worker")
            .args(spec.to_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting worker {}: {e}", exe.display()))?;
        let stdin = child.stdin.take().ok_or("worker stdin not piped")?;
        let stdout = child.stdout.take().ok_or("worker stdout not piped")?;
        Ok(Worker {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// The next JSON line the worker prints, within `timeout`.
    async fn report(&mut self, timeout: Duration) -> Res<Value> {
        let line = tokio::time::timeout(timeout, self.lines.next_line())
            .await
            .map_err(|_| format!("worker: no report within {timeout:?}"))?
            .map_err(|e| format!("worker stdout: {e}"))?
            .ok_or("worker exited without a report")?;
        serde_json::from_str(&line).map_err(|e| format!("worker printed {line:?}: {e}"))
    }

    /// Tells the worker to close, reads its last report and waits for it to exit.
    async fn finish(mut self) -> Res<Value> {
        let _ = self.stdin.write_all(b"close\n").await;
        let _ = self.stdin.flush().await;
        let report = self.report(WORKER_STOP_TIMEOUT).await;
        if tokio::time::timeout(WORKER_STOP_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        report
    }
}

/// Who holds the connections: this process, or worker processes.
enum Pool {
    Local(Held),
    Workers(Vec<Worker>),
}

impl Pool {
    /// Opens every connection; returns the pool and the summed first reports.
    async fn open(
        specs: Vec<WorkerArgs>,
        in_process: bool,
        timeout: Duration,
    ) -> Res<(Pool, Value)> {
        if in_process {
            let spec = specs.first().ok_or("no connections to open")?;
            let held = tokio::time::timeout(timeout, open(spec))
                .await
                .map_err(|_| format!("connections not open within {timeout:?}"))?;
            let report = held.opened_json();
            return Ok((Pool::Local(held), report));
        }
        let mut workers = Vec::new();
        for spec in &specs {
            workers.push(Worker::spawn(spec)?);
        }
        let deadline = Instant::now() + timeout;
        let mut sum =
            json!({ "connected": 0, "failed": 0, "first_error": null, "connect_secs": 0.0 });
        for w in &mut workers {
            let r = w
                .report(deadline.saturating_duration_since(Instant::now()))
                .await?;
            add(&mut sum, &r, "connected");
            add(&mut sum, &r, "failed");
            if sum["first_error"].is_null() {
                sum["first_error"] = r["first_error"].clone();
            }
            let secs = r["connect_secs"].as_f64().unwrap_or(0.0);
            if secs > sum["connect_secs"].as_f64().unwrap_or(0.0) {
                sum["connect_secs"] = json!(secs);
            }
        }
        Ok((Pool::Workers(workers), sum))
    }

    /// Closes everything; the summed last reports.
    async fn close(self) -> Res<Value> {
        match self {
            Pool::Local(held) => Ok(held.closing_json()),
            Pool::Workers(workers) => {
                let mut sum = json!({ "ended_early": 0, "frames_after_sync": 0 });
                let mut first_err = None;
                for w in workers {
                    match w.finish().await {
                        Ok(r) => {
                            add(&mut sum, &r, "ended_early");
                            add(&mut sum, &r, "frames_after_sync");
                        }
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    }
                }
                match first_err {
                    Some(e) => Err(e),
                    None => Ok(sum),
                }
            }
        }
    }
}

/// `sum[key] += r[key]` for counts.
fn add(sum: &mut Value, r: &Value, key: &str) {
    let v = sum[key].as_u64().unwrap_or(0) + r[key].as_u64().unwrap_or(0);
    sum[key] = json!(v);
}

/// Runs the scenario against every target in turn and prints one report.
pub async fn idle(args: IdleArgs) -> Res<()> {
    if args.connections == 0 || args.rooms == 0 || args.per_process == 0 {
        return Err("need connections >= 1, rooms >= 1, per-process >= 1".into());
    }
    // Before the server starts: it inherits the raised limit.
    let nofile = procstat::raise_nofile()?;
    if args.connections as u64 + 200 > nofile {
        eprintln!(
            "warning: {} connections, but the server may hold only {nofile} open files",
            args.connections
        );
    }
    if args.connections.min(args.per_process) as u64 + 100 > nofile {
        eprintln!(
            "warning: up to {} connections in one process with an open-files limit of {nofile} \
             (lower --per-process)",
            args.connections.min(args.per_process)
        );
    }
    let mut runs = Vec::new();
    for &target in &args.targets {
        eprintln!("idle: {} ...", target.name());
        let report = peers::report_or_error(target, run_target(&args, target).await);
        runs.push(report);
    }
    let report = json!({
        "scenario": "idle",
        "connections": args.connections,
        "rooms": args.rooms,
        "window_secs": args.window.as_secs_f64(),
        "settle_secs": args.settle.as_secs_f64(),
        "open_files_limit": nofile,
        "runs": runs,
    });
    peers::emit(&report, None, args.json, print_table)
}

async fn run_target(args: &IdleArgs, target: Target) -> Res<Value> {
    // The default of 5,000 connections per room would cap few-room runs.
    let server = Server::start(
        target,
        &args.servers.tandem,
        &args.servers.peers,
        &["--max-connections-per-room", "0"],
    )
    .await?;
    let mut out = measure(args, target, &server).await;
    if let Ok(report) = &mut out {
        report["server_warnings"] = json!(server.warnings());
    }
    server.stop().await;
    out
}

async fn measure(args: &IdleArgs, target: Target, server: &Server) -> Res<Value> {
    let n = args.connections;
    let sources = if args.sources == 0 {
        n.div_ceil(5000)
    } else {
        args.sources
    };
    let in_process = n <= args.per_process;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // The connections open in two halves, with a sample after each: the second half's growth
    // divided by its connections is what one more connection costs, without what the server
    // spends once (code first run, rooms created by the first half, the connect burst's
    // buffers that the allocator keeps).
    let half = n / 2;
    let slices = |from: usize, to: usize| -> Vec<WorkerArgs> {
        let parts = if in_process {
            1
        } else {
            (to - from).div_ceil(args.per_process)
        };
        (0..parts)
            .map(|p| WorkerArgs {
                addr: server.addr.clone(),
                target,
                room_prefix: format!("loadtest-idle-{stamp}"),
                rooms: args.rooms,
                from: from + p * (to - from) / parts,
                to: from + (p + 1) * (to - from) / parts,
                sources,
                connect_concurrency: args.connect_concurrency,
            })
            .collect()
    };

    // A moment for the fresh server to finish starting up, then the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = procstat::sample(server.pid)?;
    let k_before = procstat::kernel()?;

    let (first_half, second_half) = (slices(0, half), slices(half, n));
    // Worker processes actually started (none when one process holds everything).
    let processes = if in_process {
        1
    } else {
        first_half.len() + second_half.len()
    };
    let start = Instant::now();
    let (first, opened_first) = Pool::open(first_half, in_process, args.connect_timeout).await?;
    let mut connect_secs = start.elapsed().as_secs_f64();
    tokio::time::sleep(args.settle).await;
    let mid = procstat::sample(server.pid)?;
    let start = Instant::now();
    let (second, opened_second) = Pool::open(second_half, in_process, args.connect_timeout).await?;
    connect_secs += start.elapsed().as_secs_f64();
    let connected_first = opened_first["connected"].as_u64().unwrap_or(0);
    let connected_second = opened_second["connected"].as_u64().unwrap_or(0);
    let connected = connected_first + connected_second;
    let mut opened = opened_first.clone();
    add(&mut opened, &opened_second, "failed");
    if opened["first_error"].is_null() {
        opened["first_error"] = opened_second["first_error"].clone();
    }

    tokio::time::sleep(args.settle).await;
    let after = procstat::sample(server.pid)?;
    let k_after = procstat::kernel()?;

    let t0 = Instant::now();
    let cpu0 = procstat::sample(server.pid)?;
    tokio::time::sleep(args.window).await;
    let cpu1 = procstat::sample(server.pid)?;
    let window = t0.elapsed().as_secs_f64();
    let end = procstat::sample(server.pid)?;
    let mut closed = first.close().await?;
    let closed_second = second.close().await?;
    add(&mut closed, &closed_second, "ended_early");
    add(&mut closed, &closed_second, "frames_after_sync");

    let per_conn = |x: f64| {
        if connected == 0 {
            Value::Null
        } else {
            json!(x / connected as f64)
        }
    };
    let rss_bytes = after.rss_kib.saturating_sub(before.rss_kib) as f64 * 1024.0;
    let user = cpu1.user_us.saturating_sub(cpu0.user_us);
    let sys = cpu1.sys_us.saturating_sub(cpu0.sys_us);
    let kernel = kernel_json(&k_before, &k_after, connected);
    let rss_per = per_conn(rss_bytes);
    let rss_added = if connected_second == 0 {
        Value::Null
    } else {
        let grown = after.rss_kib.saturating_sub(mid.rss_kib) as f64 * 1024.0;
        json!(grown / connected_second as f64)
    };
    // A million connections cost about a million times what one more connection costs.
    let projection = match (
        rss_added.as_f64(),
        kernel["slab_bytes_per_socket"].as_f64(),
        kernel["tcp_mem_bytes_per_socket"].as_f64(),
    ) {
        (Some(rss), Some(slab), Some(tcp)) => {
            // System-wide figures move with everything else on the machine too: a negative
            // delta is noise, counted as nothing.
            let (slab, tcp) = (slab.max(0.0), tcp.max(0.0));
            let gib = |b: f64| b * PROJECTED / (1u64 << 30) as f64;
            json!({
                "connections": PROJECTED,
                "rss_gib": gib(rss),
                "kernel_gib": gib(slab + tcp),
                "total_gib": gib(rss + slab + tcp),
                "fds": PROJECTED,
            })
        }
        _ => Value::Null,
    };
    Ok(json!({
        "target": target.name(),
        "pid": server.pid,
        "processes": processes,
        "source_addresses": sources,
        "connections_requested": n,
        "connected": connected,
        "failed": opened["failed"],
        "first_error": opened["first_error"],
        "connect_secs": connect_secs,
        "connects_per_s": connected as f64 / connect_secs.max(1e-9),
        "memory_kib": {
            "rss_before": before.rss_kib,
            "rss_half": mid.rss_kib,
            "rss_after": after.rss_kib,
            "rss_end": end.rss_kib,
            "hwm": end.hwm_kib,
        },
        "rss_bytes_per_connection": rss_per,
        "rss_bytes_per_added_connection": rss_added,
        "idle_cpu": {
            "window_secs": window,
            "user_us": user,
            "sys_us": sys,
            "cpu_percent": (user + sys) as f64 / window / 1e4,
            "us_per_connection_per_s": per_conn((user + sys) as f64 / window),
        },
        "kernel": kernel,
        "projection": projection,
        "ended_early": closed["ended_early"],
        "frames_after_sync": closed["frames_after_sync"],
    }))
}

/// The kernel's growth between two samples, for `connected` loopback connections (two sockets
/// each: the server's and the client's, both in this kernel; per-socket figures divide by 2N).
fn kernel_json(before: &Kernel, after: &Kernel, connected: u64) -> Value {
    let d = |a: u64, b: u64| a as i64 - b as i64;
    let sockets = 2 * connected;
    let per_socket = |bytes: f64| {
        if sockets == 0 {
            Value::Null
        } else {
            json!(bytes / sockets as f64)
        }
    };
    let mem_pages = d(after.tcp_mem_pages, before.tcp_mem_pages);
    let slab_kib = d(after.slab_kib, before.slab_kib);
    json!({
        "before": {
            "tcp_inuse": before.tcp_inuse,
            "tcp_alloc": before.tcp_alloc,
            "tcp_mem_pages": before.tcp_mem_pages,
            "slab_kib": before.slab_kib,
        },
        "after": {
            "tcp_inuse": after.tcp_inuse,
            "tcp_alloc": after.tcp_alloc,
            "tcp_mem_pages": after.tcp_mem_pages,
            "slab_kib": after.slab_kib,
        },
        "page_bytes": after.page_bytes,
        "tcp_inuse_delta": d(after.tcp_inuse, before.tcp_inuse),
        "tcp_mem_pages_delta": mem_pages,
        "tcp_mem_bytes_per_socket": per_socket((mem_pages * after.page_bytes as i64) as f64),
        "slab_kib_delta": slab_kib,
        "slab_bytes_per_socket": per_socket((slab_kib * 1024) as f64),
    })
}

fn print_table(r: &Value) {
    println!(
        "idle: {} connections over {} rooms, synced then silent; settle {} s, CPU window {} s",
        r["connections"], r["rooms"], r["settle_secs"], r["window_secs"]
    );
    let runs = r["runs"].as_array().cloned().unwrap_or_default();
    let f = peers::num;
    let rows: Vec<(&str, Cell<'_>)> = vec![
        (
            "connected / requested",
            Box::new(|v| format!("{}/{}", v["connected"], v["connections_requested"])),
        ),
        ("failed", Box::new(|v| v["failed"].to_string())),
        (
            "processes × sources",
            Box::new(|v| format!("{}×{}", v["processes"], v["source_addresses"])),
        ),
        ("connect s", Box::new(|v| f(&v["connect_secs"], 2))),
        ("connects / s", Box::new(|v| f(&v["connects_per_s"], 0))),
        (
            "RSS before MiB",
            Box::new(|v| peers::mib(&v["memory_kib"]["rss_before"])),
        ),
        (
            "RSS after MiB",
            Box::new(|v| peers::mib(&v["memory_kib"]["rss_after"])),
        ),
        (
            "RSS peak MiB",
            Box::new(|v| peers::mib(&v["memory_kib"]["hwm"])),
        ),
        (
            "RSS bytes / connection",
            Box::new(|v| f(&v["rss_bytes_per_connection"], 0)),
        ),
        (
            "RSS bytes / added conn",
            Box::new(|v| f(&v["rss_bytes_per_added_connection"], 0)),
        ),
        (
            "idle CPU %",
            Box::new(|v| f(&v["idle_cpu"]["cpu_percent"], 2)),
        ),
        (
            "idle CPU µs/s / conn",
            Box::new(|v| f(&v["idle_cpu"]["us_per_connection_per_s"], 3)),
        ),
        (
            "TCP inuse +",
            Box::new(|v| v["kernel"]["tcp_inuse_delta"].to_string()),
        ),
        (
            "TCP mem pages +",
            Box::new(|v| v["kernel"]["tcp_mem_pages_delta"].to_string()),
        ),
        (
            "slab KiB +",
            Box::new(|v| v["kernel"]["slab_kib_delta"].to_string()),
        ),
        (
            "kernel B / socket (slab)",
            Box::new(|v| f(&v["kernel"]["slab_bytes_per_socket"], 0)),
        ),
        (
            "kernel B / socket (tcp mem)",
            Box::new(|v| f(&v["kernel"]["tcp_mem_bytes_per_socket"], 0)),
        ),
        (
            "1M conns: RSS GiB",
            Box::new(|v| f(&v["projection"]["rss_gib"], 1)),
        ),
        (
            "1M conns: kernel GiB",
            Box::new(|v| f(&v["projection"]["kernel_gib"], 1)),
        ),
        (
            "1M conns: total GiB",
            Box::new(|v| f(&v["projection"]["total_gib"], 1)),
        ),
        ("ended early", Box::new(|v| v["ended_early"].to_string())),
        (
            "frames after sync",
            Box::new(|v| v["frames_after_sync"].to_string()),
        ),
    ];
    peers::print_comparison(&runs, &rows, &Value::Null);
    for run in &runs {
        if let Some(e) = run["first_error"].as_str() {
            println!(
                "{}: first connection error: {e}",
                run["target"].as_str().unwrap_or("?")
            );
        }
    }
}
