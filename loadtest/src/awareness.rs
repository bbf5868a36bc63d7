//! `awareness`: R rooms × C clients, every client sending its cursor as an awareness update at a
//! fixed rate, against one or more targets (tandem, the stock y-websocket server, Hocuspocus),
//! one after another: delivery latency, deliveries per second, lost deliveries and the server's
//! CPU per delivered awareness update.
//!
//! Every client has its own client id and sends one awareness message (one entry: its id, a clock
//! that grows by one each time, and a JSON state holding a cursor and the send time in µs since
//! the Unix epoch) at `--rate` per second, the clients' phases spread evenly over the period. The
//! servers relay every news entry to the whole room, the sender included. Every client keeps, per
//! member of its room, the newest clock it received and how many news entries arrived; a few
//! probes per room also read the send time out of the others' states and record the latency
//! (receive − send time, one clock) in an HDR histogram corrected for coordinated omission. The
//! server's CPU (`/proc/PID/stat`, user and system apart) and memory (`/proc/PID/status`) are
//! sampled when the warmup ends and when the measured window ends, the deliveries at the same
//! instants. After the window the senders stop; the drain lasts until every client has seen every
//! other client's last clock (or its deadline), and what is still missing then is lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tandem_protocol::awareness::{encode_entries, AwarenessEntry, AwarenessUpdate};
use tokio_tungstenite::tungstenite::Message;

use crate::peers::{self, Cell, Server, Target};
use crate::wire::{self, now_us, Dialect, Tasks, Ws};
use crate::{procstat, progress};

type Res<T> = Result<T, String>;

/// The first client id; client `g` (room-major order over all rooms) is `ID_BASE + g`. Far above
/// 0 so that no id is a server's own (y-websocket's server documents have random 32-bit ids,
/// which could only collide by chance).
const ID_BASE: u64 = 1 << 40;

/// Arguments of the `awareness` scenario.
#[derive(Debug, clap::Args)]
pub struct AwarenessArgs {
    /// A server to measure; repeat to compare (the first tandem is the reference for ratios).
    #[arg(long = "target", value_enum, default_values_t = [Target::Tandem])]
    targets: Vec<Target>,
    /// Rooms.
    #[arg(long, default_value_t = 20)]
    rooms: usize,
    /// Clients per room; every one sends awareness updates.
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// Clients per room that also measure latency (read the send time in the others' states).
    #[arg(long, default_value_t = 2)]
    probes: usize,
    /// Awareness updates per second per client.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Measured window, after the warmup.
    #[arg(long, default_value = "20s", value_parser = crate::parse_secs)]
    duration: Duration,
    /// Sending before the measured window starts.
    #[arg(long, default_value = "3s", value_parser = crate::parse_secs)]
    warmup: Duration,
    /// Deadline for the last deliveries after the clients stopped sending.
    #[arg(long, default_value = "10s", value_parser = crate::parse_secs)]
    drain_timeout: Duration,
    /// Connections opening at once.
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// The servers to start.
    #[command(flatten)]
    servers: peers::ServerPaths,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs the scenario against every target in turn and prints one report.
pub async fn awareness(args: AwarenessArgs) -> Res<()> {
    if args.rooms == 0 || args.clients < 2 || args.probes > args.clients || args.rate <= 0.0 {
        return Err("need rooms >= 1, clients >= 2, probes <= clients, rate > 0".into());
    }
    let nofile = procstat::raise_nofile()?;
    let conns = args.rooms * args.clients;
    if (conns as u64) * 2 + 200 > nofile {
        eprintln!("warning: {conns} connections with an open-files limit of {nofile}");
    }
    let mut runs = Vec::new();
    for &target in &args.targets {
        eprintln!("awareness: {} ...", target.name());
        runs.push(peers::report_or_error(
            target,
            run_target(&args, target).await,
        ));
    }
    let report = json!({
        "scenario": "awareness",
        "rooms": args.rooms,
        "clients_per_room": args.clients,
        "probes_per_room": args.probes,
        "connections": conns,
        "rate_per_client": args.rate,
        "updates_per_s": args.rate * conns as f64,
        "warmup_secs": args.warmup.as_secs_f64(),
        "window_secs": args.duration.as_secs_f64(),
        "open_files_limit": nofile,
        "runs": runs,
        "ratios_vs_tandem": peers::cpu_ratios(&runs),
    });
    peers::emit(&report, None, args.json, print_table)
}

/// One client's counters, shared with the main task (which reads them for the report).
struct Member {
    /// The last clock this client sent (0: none yet).
    sent_clock: AtomicU64,
    /// Per member of its room (by index): the newest clock received from it.
    last_seen: Box<[AtomicU64]>,
    /// Per member of its room: the news entries received from it.
    received: Box<[AtomicU64]>,
}

struct Shared {
    /// Clients per room.
    clients: usize,
    /// Every client, room-major (`room * clients + index`).
    members: Vec<Member>,
    /// News entries received by all clients (own echoes included): the server's deliveries.
    delivered: AtomicU64,
    /// Entries whose clock was not newer than the one already seen (re-deliveries, reordering).
    stale: AtomicU64,
    /// Entries for a client id that is not a member of the receiver's room, or `null` states.
    foreign: AtomicU64,
    /// Awareness messages sent.
    sent: AtomicU64,
    /// Connections whose socket ended before the run did.
    dropped: AtomicU64,
    /// Latencies in µs, probes only, entries from other clients sent inside the window.
    latency: Mutex<Histogram<u64>>,
    /// The measured window in µs since the Unix epoch (send times).
    window: Mutex<(u64, u64)>,
    /// One client's sending interval, for the coordinated-omission correction.
    interval_us: u64,
}

/// Where a client sits and what it does.
#[derive(Debug, Clone, Copy)]
struct Seat {
    room: usize,
    /// Index in its room.
    index: usize,
    probe: bool,
}

impl Shared {
    fn global(&self, seat: Seat) -> usize {
        seat.room * self.clients + seat.index
    }

    /// Folds an awareness payload into `seat`'s counters (and latency, for probes).
    fn receive(&self, seat: Seat, payload: &[u8], now: u64) {
        let Ok(update) = AwarenessUpdate::decode(payload) else {
            self.foreign.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let me = &self.members[self.global(seat)];
        let room_base = ID_BASE + (seat.room * self.clients) as u64;
        for e in &update.entries {
            let slot = e.client_id.wrapping_sub(room_base) as usize;
            if e.client_id < room_base || slot >= self.clients || e.is_removal() {
                self.foreign.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if e.clock <= me.last_seen[slot].load(Ordering::Relaxed) {
                self.stale.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            me.last_seen[slot].store(e.clock, Ordering::Relaxed);
            me.received[slot].fetch_add(1, Ordering::Relaxed);
            self.delivered.fetch_add(1, Ordering::Relaxed);
            if seat.probe && slot != seat.index {
                let sent = serde_json::from_str::<Value>(e.state)
                    .ok()
                    .and_then(|v| v["t"].as_u64());
                let (from, to) = *self.window.lock().unwrap();
                if let Some(t) = sent.filter(|t| *t >= from && *t < to) {
                    let _ = self
                        .latency
                        .lock()
                        .unwrap()
                        .record_correct(now.saturating_sub(t).max(1), self.interval_us);
                }
            }
        }
    }
}

/// A client: sends its state from `start + offset` every `period` until `end`, and reads what
/// the room relays until the caller aborts it.
async fn client(
    ws: Ws,
    dialect: Dialect,
    room_name: String,
    seat: Seat,
    times: (Instant, Duration, Duration, Instant),
    shared: Arc<Shared>,
) {
    let (start, offset, period, end) = times;
    let (mut sink, mut stream) = ws.split();
    let g = shared.global(seat);
    // Both halves in this one task, so that aborting it closes the socket.
    let read = async {
        while let Some(msg) = stream.next().await {
            match msg {
                Ok(Message::Binary(b)) => {
                    let now = now_us();
                    for payload in wire::parse(dialect, &b).awareness {
                        shared.receive(seat, payload, now);
                    }
                }
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        shared.dropped.fetch_add(1, Ordering::Relaxed);
    };
    let send = async {
        let client_id = ID_BASE + g as u64;
        let mut payload = Vec::new();
        let mut k: u32 = 0;
        loop {
            let due = start + offset + period * k;
            if due >= end {
                break;
            }
            tokio::time::sleep_until(due.into()).await;
            let clock = u64::from(k) + 1;
            // A cursor that moves a little every time, and the send time.
            let (anchor, head) = (clock * 7 % 5000, clock * 7 % 5000 + clock % 3);
            let state = format!(
                r##"{{"user":{{"name":"client {g}","color":"#30bced"}},"cursor":{{"anchor":{anchor},"head":{head}}},"t":{}}}"##,
                now_us()
            );
            payload.clear();
            encode_entries(
                &mut payload,
                std::iter::once(AwarenessEntry {
                    client_id,
                    clock,
                    state: &state,
                }),
            );
            if sink
                .send(Message::Binary(
                    dialect.awareness(&room_name, &payload).into(),
                ))
                .await
                .is_err()
            {
                break;
            }
            shared.members[g].sent_clock.store(clock, Ordering::Relaxed);
            shared.sent.fetch_add(1, Ordering::Relaxed);
            k += 1;
        }
        // Keep the socket open (and read) until the run ends: the caller aborts this task.
        std::future::pending::<()>().await;
    };
    tokio::join!(read, send);
}

/// Starts `target`, runs the scenario against it and stops it; the run's report.
async fn run_target(args: &AwarenessArgs, target: Target) -> Res<Value> {
    let server = Server::start(target, &args.servers.tandem, &args.servers.peers, &[]).await?;
    let mut out = measure(args, target, &server).await;
    if let Ok(report) = &mut out {
        report["server_warnings"] = json!(server.warnings());
    }
    server.stop().await;
    out
}

/// What the drain leaves missing: (members whose last clock some other member lacks, as
/// receiver-sender pairs; intermediate updates never received from others; own echoes missing).
fn missing(shared: &Shared) -> (u64, u64, u64) {
    let (mut pairs, mut skipped, mut echoes) = (0, 0, 0);
    for (g, me) in shared.members.iter().enumerate() {
        let room = g / shared.clients * shared.clients;
        for s in 0..shared.clients {
            let last = shared.members[room + s].sent_clock.load(Ordering::Relaxed);
            let got = me.received[s].load(Ordering::Relaxed);
            if room + s == g {
                echoes += last.saturating_sub(got);
                continue;
            }
            if me.last_seen[s].load(Ordering::Relaxed) < last {
                pairs += 1;
            }
            skipped += last.saturating_sub(got);
        }
    }
    (pairs, skipped, echoes)
}

async fn measure(args: &AwarenessArgs, target: Target, server: &Server) -> Res<Value> {
    let dialect = target.dialect();
    let idle = procstat::sample(server.pid)?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let room_names: Vec<String> = (0..args.rooms)
        .map(|r| format!("loadtest-awareness-{stamp}-{r}"))
        .collect();
    let c = args.clients;
    let total = args.rooms * c;
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let counters = |_| (0..c).map(|_| AtomicU64::new(0)).collect::<Box<[_]>>();
    let shared = Arc::new(Shared {
        clients: c,
        members: (0..total)
            .map(|g| Member {
                sent_clock: AtomicU64::new(0),
                last_seen: counters(g),
                received: counters(g),
            })
            .collect(),
        delivered: AtomicU64::new(0),
        stale: AtomicU64::new(0),
        foreign: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        latency: Mutex::new(
            Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds"),
        ),
        window: Mutex::new((u64::MAX, u64::MAX)),
        interval_us: period.as_micros() as u64,
    });

    let connect_start = Instant::now();
    let mut seats = Vec::with_capacity(total);
    let mut jobs = Vec::with_capacity(total);
    for (room, name) in room_names.iter().enumerate() {
        for index in 0..c {
            // Probes spread over the join order, the last member to join being one.
            let probe = (1..=args.probes).any(|p| p * c / args.probes == index + 1);
            seats.push(Seat { room, index, probe });
            jobs.push((name.clone(), None));
        }
    }
    let sockets = wire::connect_all(&server.addr, dialect, jobs, args.connect_concurrency).await?;
    let connect_secs = connect_start.elapsed().as_secs_f64();
    let connected = procstat::sample(server.pid)?;

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
    let mut tasks = Tasks::default();
    for (g, (seat, ws)) in seats.into_iter().zip(sockets).enumerate() {
        let offset = period.mul_f64(g as f64 / total as f64);
        tasks.0.push(tokio::spawn(client(
            ws,
            dialect,
            room_names[seat.room].clone(),
            seat,
            (start, offset, period, end),
            Arc::clone(&shared),
        )));
    }

    let status = || {
        format!(
            "{} sent, {} delivered",
            shared.sent.load(Ordering::Relaxed),
            shared.delivered.load(Ordering::Relaxed)
        )
    };
    progress::wait_until(window_start, "warmup", status).await;
    let (me0, m0) = (procstat::sample(std::process::id())?, procstat::machine()?);
    let (cpu0, threads0, del0, sent0, t0) = (
        procstat::sample(server.pid)?,
        procstat::thread_samples(server.pid)?,
        shared.delivered.load(Ordering::Relaxed),
        shared.sent.load(Ordering::Relaxed),
        Instant::now(),
    );
    progress::wait_until(end, "measure", status).await;
    let (cpu1, threads1, del1, sent1, t1) = (
        procstat::sample(server.pid)?,
        procstat::thread_samples(server.pid)?,
        shared.delivered.load(Ordering::Relaxed),
        shared.sent.load(Ordering::Relaxed),
        Instant::now(),
    );
    let (me1, m1) = (procstat::sample(std::process::id())?, procstat::machine()?);

    // Drain: until every client has every other client's last clock, or the deadline.
    let drain_end = Instant::now() + args.drain_timeout;
    while missing(&shared).0 > 0 && Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_secs = (Instant::now() - end).as_secs_f64();
    let last = procstat::sample(server.pid)?;
    let dropped = shared.dropped.load(Ordering::Relaxed);
    drop(tasks);

    let (lost_pairs, skipped, echoes_missing) = missing(&shared);
    let window = (t1 - t0).as_secs_f64();
    let deliveries = del1 - del0;
    let sent_in_window = sent1 - sent0;
    let mut cpu = procstat::cpu_json(&cpu0, &cpu1, window, deliveries);
    cpu["threads"] = procstat::threads_json(&threads0, &threads1, deliveries);
    if sent_in_window > 0 {
        let us = (cpu1.user_us + cpu1.sys_us).saturating_sub(cpu0.user_us + cpu0.sys_us);
        cpu["total_us_per_update_sent"] = json!(us as f64 / sent_in_window as f64);
    }
    let sent_total = shared.sent.load(Ordering::Relaxed);
    Ok(json!({
        "target": target.name(),
        "pid": server.pid,
        "connect_secs": connect_secs,
        "window_secs": window,
        "updates_sent_in_window": sent_in_window,
        "updates_sent_per_s": sent_in_window as f64 / window,
        "deliveries_in_window": deliveries,
        "deliveries_per_s": deliveries as f64 / window,
        "cpu": cpu,
        "latency": peers::latency_json(&shared.latency.lock().unwrap()),
        "machine": procstat::context_json(&m0, &m1, (&cpu0, &cpu1), (&me0, &me1), window),
        "updates_sent": sent_total,
        "expected_deliveries": sent_total * c as u64,
        "received_deliveries": shared.delivered.load(Ordering::Relaxed),
        "lost_pairs": lost_pairs,
        "pairs": (total * (c - 1)) as u64,
        "skipped_updates": skipped,
        "own_echoes_missing": echoes_missing,
        "stale_entries": shared.stale.load(Ordering::Relaxed),
        "foreign_entries": shared.foreign.load(Ordering::Relaxed),
        "sockets_ended_early": dropped,
        "drain_secs": drain_secs,
        "memory_kib": {
            "rss_idle": idle.rss_kib,
            "rss_connected": connected.rss_kib,
            "rss_end": last.rss_kib,
            "hwm": last.hwm_kib,
            "rss_per_connection": last.rss_kib.saturating_sub(idle.rss_kib) as f64 / total as f64,
        },
    }))
}

fn print_table(r: &Value) {
    println!(
        "awareness: {} rooms × {} clients ({} connections, {} probes per room), {} awareness updates/s per client ({} /s in all), warmup {} s, window {} s",
        r["rooms"], r["clients_per_room"], r["connections"], r["probes_per_room"],
        r["rate_per_client"], r["updates_per_s"], r["warmup_secs"], r["window_secs"]
    );
    let runs = r["runs"].as_array().cloned().unwrap_or_default();
    let f = peers::num;
    let mut rows: Vec<(&str, Cell<'_>)> = peers::cpu_rows();
    rows.push((
        "total CPU µs / update sent",
        Box::new(|v| f(&v["cpu"]["total_us_per_update_sent"], 1)),
    ));
    rows.extend(peers::machine_rows());
    rows.extend::<Vec<(&str, Cell<'_>)>>(vec![
        (
            "updates sent / s",
            Box::new(|v| f(&v["updates_sent_per_s"], 0)),
        ),
        ("deliveries / s", Box::new(|v| f(&v["deliveries_per_s"], 0))),
    ]);
    rows.extend(peers::latency_rows());
    rows.extend::<Vec<(&str, Cell<'_>)>>(vec![
        (
            "lost (last clock unseen)",
            Box::new(|v| v["lost_pairs"].to_string()),
        ),
        (
            "skipped updates",
            Box::new(|v| v["skipped_updates"].to_string()),
        ),
        (
            "own echoes missing",
            Box::new(|v| v["own_echoes_missing"].to_string()),
        ),
        (
            "stale entries",
            Box::new(|v| v["stale_entries"].to_string()),
        ),
        (
            "sockets ended early",
            Box::new(|v| v["sockets_ended_early"].to_string()),
        ),
    ]);
    rows.extend(peers::memory_rows());
    peers::print_comparison(&runs, &rows, &r["ratios_vs_tandem"]);
    peers::print_threads(&runs);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(rooms: usize, clients: usize) -> Shared {
        Shared {
            clients,
            members: (0..rooms * clients)
                .map(|_| Member {
                    sent_clock: AtomicU64::new(0),
                    last_seen: (0..clients).map(|_| AtomicU64::new(0)).collect(),
                    received: (0..clients).map(|_| AtomicU64::new(0)).collect(),
                })
                .collect(),
            delivered: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            latency: Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).unwrap()),
            window: Mutex::new((0, u64::MAX)),
            interval_us: 1_000_000,
        }
    }

    fn payload(client_id: u64, clock: u64, state: &str) -> Vec<u8> {
        let mut out = Vec::new();
        encode_entries(
            &mut out,
            std::iter::once(AwarenessEntry {
                client_id,
                clock,
                state,
            }),
        );
        out
    }

    #[test]
    fn a_missed_last_clock_is_lost_and_a_repeat_is_stale() {
        let sh = shared(2, 2);
        let probe = Seat {
            room: 1,
            index: 0,
            probe: true,
        };
        // Client 3 (room 1, index 1) sent clocks 1 and 2; the probe got only 1, twice.
        sh.members[3].sent_clock.store(2, Ordering::Relaxed);
        let one = payload(ID_BASE + 3, 1, r#"{"t":1000}"#);
        sh.receive(probe, &one, 3000);
        sh.receive(probe, &one, 3000);
        // An entry of room 0's client and a removal are not counted as deliveries.
        sh.receive(probe, &payload(ID_BASE, 5, "{}"), 3000);
        sh.receive(probe, &payload(ID_BASE + 3, 9, "null"), 3000);
        assert_eq!(sh.delivered.load(Ordering::Relaxed), 1);
        assert_eq!(sh.stale.load(Ordering::Relaxed), 1);
        assert_eq!(sh.foreign.load(Ordering::Relaxed), 2);
        assert_eq!(sh.latency.lock().unwrap().max(), 2000);
        // Room 1: probe lacks 3's last clock (one pair, one skipped update); 3 lacks nothing
        // from the probe, which sent nothing; 3 misses its own two echoes.
        assert_eq!(missing(&sh), (1, 1, 2));
        sh.receive(probe, &payload(ID_BASE + 3, 2, "{}"), 3000);
        assert_eq!(missing(&sh), (0, 0, 2));
    }
}
