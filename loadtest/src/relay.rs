//! `relay`: the floor under `rooms`' CPU per delivery on this machine. One thread relays frames
//! between loopback sockets laid out as `rooms` lays out its connections (R rooms × C
//! connections, one writer each, at a rate per room): it waits in `epoll`, reads each update from
//! the writer's socket and writes it to the room's other sockets, one `write` per delivery, and
//! does nothing else: no WebSocket framing, no CRDT, no storage, no other thread. Its user and
//! system CPU per delivery (`getrusage(RUSAGE_THREAD)`) are what any server that sends each
//! delivery on its own pays at the least, so the servers' figures in `rooms` read against it.
//!
//! The load side (the writers' sends at the rate, and the readers' reads) runs on a thread of
//! its own in this process and is not counted.
//!
//! With `--crdt` the frames are real Yjs updates (each writer pushes a number into an array, as
//! `rooms`' writers do), each preceded by its length in two bytes, and the relay thread keeps
//! one yrs document per room: it decodes each update, applies it in one transaction and encodes
//! that transaction's update, as a Yjs server's room does, before it writes the frame as it came
//! to the room's other sockets. That is the floor of a CRDT server that keeps nothing: what a
//! server with no framework, no framing and no store would pay.

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde_json::{json, Value};
use yrs::updates::decoder::Decode;
use yrs::{Doc, Transact, Update};

use crate::{parse_secs, peers, procstat, wire, Res};

/// After the window: the relay goes on relaying, unmeasured, and the load side reads until every
/// frame has arrived, for at most this long.
const DRAIN: Duration = Duration::from_secs(2);

/// Arguments of `relay`.
#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    /// Rooms.
    #[arg(long, default_value_t = 20)]
    rooms: usize,
    /// Connections per room, the writer included.
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// Updates per second per room.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Bytes per update frame (`rooms`' update messages are 30 to 40 bytes).
    #[arg(long, default_value_t = 40)]
    frame_bytes: usize,
    /// Measured window, after the warmup.
    #[arg(long, default_value = "20s", value_parser = parse_secs)]
    duration: Duration,
    /// Relaying before the measured window starts.
    #[arg(long, default_value = "2s", value_parser = parse_secs)]
    warmup: Duration,
    /// Relay real Yjs updates and apply each to the room's yrs document before relaying it
    /// (`--frame-bytes` is then ignored: the updates are as long as they are).
    #[arg(long)]
    crdt: bool,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// A writer's frames: fixed bytes, or a Yjs update each time, with its length in front.
enum Frames {
    Fixed(Vec<u8>),
    Crdt(Vec<(Doc, yrs::ArrayRef)>),
}

impl Frames {
    fn next(&mut self, room: usize) -> Vec<u8> {
        match self {
            Frames::Fixed(frame) => frame.clone(),
            Frames::Crdt(docs) => {
                let (doc, arr) = &docs[room];
                let update = wire::stamp_update(doc, arr);
                let len = u16::try_from(update.len()).expect("a one-number update is short");
                let mut frame = len.to_be_bytes().to_vec();
                frame.extend_from_slice(&update);
                frame
            }
        }
    }
}

/// The relay's per-room CRDT work: one document per room, and what was read of a frame whose
/// end has not arrived yet.
struct Crdt {
    docs: Vec<Doc>,
    partial: Vec<Vec<u8>>,
    /// Updates applied over the whole run.
    applied: u64,
}

impl Crdt {
    fn new(rooms: usize) -> Self {
        Crdt {
            docs: (0..rooms).map(|_| Doc::new()).collect(),
            partial: vec![Vec::new(); rooms],
            applied: 0,
        }
    }

    /// Takes `read` for `room`, applies every whole update in it, and returns the bytes to relay
    /// (whole frames only, as they came) and how many updates they hold.
    fn take(&mut self, room: usize, read: &[u8]) -> Res<(Vec<u8>, u64)> {
        let pending = &mut self.partial[room];
        pending.extend_from_slice(read);
        let (mut at, mut count) = (0, 0);
        while let Some(head) = pending.get(at..at + 2) {
            let len = usize::from(u16::from_be_bytes([head[0], head[1]]));
            let Some(update) = pending.get(at + 2..at + 2 + len) else {
                break;
            };
            let update = Update::decode_v1(update).map_err(|e| format!("relay decode: {e}"))?;
            let mut txn = self.docs[room].transact_mut();
            txn.apply_update(update)
                .map_err(|e| format!("relay apply: {e}"))?;
            // What a Yjs server relays: the transaction's own update, encoded once.
            std::hint::black_box(txn.encode_update_v1());
            at += 2 + len;
            count += 1;
        }
        self.applied += count;
        let whole = pending[..at].to_vec();
        pending.drain(..at);
        Ok((whole, count))
    }
}

/// Runs the relay and its load, and prints the report.
pub async fn relay(args: RelayArgs) -> Res<()> {
    if args.rooms == 0 || args.clients < 2 || args.rate <= 0.0 {
        return Err("need rooms >= 1, clients >= 2 and rate > 0".into());
    }
    if !args.crdt && (args.frame_bytes == 0 || args.frame_bytes > 4096) {
        return Err("need 1 <= frame-bytes <= 4096".into());
    }
    // Both ends of every connection live in this process.
    let need = 2 * args.rooms * args.clients + 64;
    let limit = procstat::raise_nofile()?;
    if (limit as usize) < need {
        return Err(format!(
            "{need} open files needed, the limit is {limit}: use fewer rooms or clients"
        ));
    }
    let json = args.json;
    let report = tokio::task::spawn_blocking(move || run(&args))
        .await
        .map_err(|e| format!("relay task: {e}"))??;
    peers::emit(&report, None, json, print_table)
}

/// The relay thread's CPU seconds so far, user and system.
fn thread_cpu() -> (f64, f64) {
    // SAFETY: getrusage fills the zeroed struct it is given and reads nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(usage.ru_utime), secs(usage.ru_stime))
}

/// `count` connected loopback pairs: (the load's end, the relay's end), both non-blocking.
fn pairs(count: usize) -> Res<Vec<(TcpStream, TcpStream)>> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    (0..count)
        .map(|_| {
            let load = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
            let (relay, _) = listener.accept().map_err(|e| e.to_string())?;
            for s in [&load, &relay] {
                s.set_nodelay(true).map_err(|e| e.to_string())?;
                s.set_nonblocking(true).map_err(|e| e.to_string())?;
            }
            Ok((TcpStream::from_std(load), TcpStream::from_std(relay)))
        })
        .collect()
}

/// What the relay thread reports: deliveries and CPU over the measured window.
struct Measured {
    deliveries: u64,
    seconds: f64,
    user_s: f64,
    sys_s: f64,
    short_writes: u64,
    /// With `--crdt`: updates the relay applied over the whole run.
    applied: Option<u64>,
}

fn run(args: &RelayArgs) -> Res<Value> {
    let (mut load, relay_ends): (Vec<TcpStream>, Vec<TcpStream>) =
        pairs(args.rooms * args.clients)?.into_iter().unzip();
    let (rooms, clients) = (args.rooms, args.clients);
    let (warmup, duration) = (args.warmup, args.duration);
    let start = Instant::now();
    let stop = start + warmup + duration;
    let crdt = args.crdt.then(|| Crdt::new(rooms));
    let relay = std::thread::Builder::new()
        .name("relay".into())
        .spawn(move || relay_thread(relay_ends, crdt, rooms, clients, start + warmup, stop))
        .map_err(|e| e.to_string())?;

    // The load: each room's writer sends in turn, readers are drained as they become readable.
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    for (i, s) in load.iter_mut().enumerate() {
        if i % clients != 0 {
            poll.registry()
                .register(s, Token(i), Interest::READABLE)
                .map_err(|e| e.to_string())?;
        }
    }
    let mut frames = if args.crdt {
        Frames::Crdt(
            (0..rooms)
                .map(|_| {
                    let doc = Doc::new();
                    let arr = doc.get_or_insert_array("ts0");
                    (doc, arr)
                })
                .collect(),
        )
    } else {
        Frames::Fixed(vec![0x5a_u8; args.frame_bytes])
    };
    let mut sent_bytes: u64 = 0;
    let period = Duration::from_secs_f64(1.0 / (args.rate * rooms as f64));
    let mut next = Instant::now();
    let mut room = 0;
    let mut sent: u64 = 0;
    let mut received_bytes: u64 = 0;
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0_u8; 1 << 16];
    let expected = |sent_bytes: u64| sent_bytes * (clients as u64 - 1);
    let drain_until = stop + DRAIN;
    loop {
        let now = Instant::now();
        // After `stop`, only reads: until every relayed frame is in, or the deadline.
        if now >= stop && (received_bytes >= expected(sent_bytes) || now >= drain_until) {
            break;
        }
        if now >= next && now < stop {
            let frame = frames.next(room);
            if load[room * clients]
                .write(&frame)
                .map_err(|e| e.to_string())?
                != frame.len()
            {
                return Err("a writer's frame did not fit its socket buffer".into());
            }
            sent += 1;
            sent_bytes += frame.len() as u64;
            room = (room + 1) % rooms;
            next += period;
            continue;
        }
        let wake = if now < stop { next } else { drain_until };
        poll.poll(&mut events, Some(wake.saturating_duration_since(now)))
            .map_err(|e| e.to_string())?;
        for event in events.iter() {
            let socket = &mut load[event.token().0];
            loop {
                match socket.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => received_bytes += n as u64,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("reader: {e}")),
                }
            }
        }
    }
    let m = relay
        .join()
        .map_err(|_| "the relay thread panicked".to_string())??;
    let per = |s: f64| s * 1e6 / m.deliveries.max(1) as f64;
    Ok(json!({
        "scenario": "relay",
        "rooms": rooms,
        "clients_per_room": clients,
        "rate_per_room": args.rate,
        "frame_bytes": if args.crdt { Value::Null } else { json!(args.frame_bytes) },
        "crdt": args.crdt,
        "updates_sent": sent,
        "bytes_expected": expected(sent_bytes),
        "bytes_received": received_bytes,
        "window_s": m.seconds,
        "deliveries": m.deliveries,
        "deliveries_per_s": m.deliveries as f64 / m.seconds.max(f64::EPSILON),
        "short_writes": m.short_writes,
        "updates_applied": m.applied,
        "relay_cpu_us_per_delivery": {
            "user": per(m.user_s),
            "sys": per(m.sys_s),
            "total": per(m.user_s + m.sys_s),
        },
    }))
}

/// Relays until [`DRAIN`] after `stop`; measures from `measure_from` to `stop`.
fn relay_thread(
    mut socks: Vec<TcpStream>,
    mut crdt: Option<Crdt>,
    rooms: usize,
    clients: usize,
    measure_from: Instant,
    stop: Instant,
) -> Res<Measured> {
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    for r in 0..rooms {
        poll.registry()
            .register(&mut socks[r * clients], Token(r), Interest::READABLE)
            .map_err(|e| e.to_string())?;
    }
    let mut events = Events::with_capacity(64);
    let mut buf = [0_u8; 4096];
    let mut deliveries: u64 = 0;
    let mut short_writes: u64 = 0;
    let mut window: Option<(Instant, (f64, f64), u64)> = None;
    let mut end: Option<(Instant, (f64, f64), u64)> = None;
    loop {
        let now = Instant::now();
        if window.is_none() && now >= measure_from {
            window = Some((now, thread_cpu(), deliveries));
        }
        if end.is_none() && now >= stop {
            end = Some((now, thread_cpu(), deliveries));
        }
        if now >= stop + DRAIN {
            break;
        }
        let wake = match (&window, &end) {
            (None, _) => measure_from,
            (Some(_), None) => stop,
            (Some(_), Some(_)) => stop + DRAIN,
        };
        poll.poll(&mut events, Some(wake.saturating_duration_since(now)))
            .map_err(|e| e.to_string())?;
        for event in events.iter() {
            let room = event.token().0;
            loop {
                let n = match socks[room * clients].read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("relay read: {e}")),
                };
                let whole;
                let (out, updates) = match crdt.as_mut() {
                    Some(crdt) => {
                        let count;
                        (whole, count) = crdt.take(room, &buf[..n])?;
                        (&whole[..], count)
                    }
                    None => (&buf[..n], 1),
                };
                if out.is_empty() {
                    continue;
                }
                for peer in &mut socks[room * clients + 1..(room + 1) * clients] {
                    match peer.write(out) {
                        Ok(w) if w == out.len() => deliveries += updates,
                        Ok(_) | Err(_) => short_writes += 1,
                    }
                }
            }
        }
    }
    let ((from, (user0, sys0), before), (to, (user1, sys1), after)) = window
        .zip(end)
        .ok_or_else(|| "the run ended before its measured window".to_string())?;
    Ok(Measured {
        deliveries: after - before,
        seconds: (to - from).as_secs_f64(),
        user_s: user1 - user0,
        sys_s: sys1 - sys0,
        short_writes,
        applied: crdt.map(|c| c.applied),
    })
}

fn print_table(r: &Value) {
    let cpu = &r["relay_cpu_us_per_delivery"];
    let f = |k: &str| cpu[k].as_f64().unwrap_or(f64::NAN);
    let frames = match r["frame_bytes"].as_u64() {
        Some(n) => format!("{n}-byte frames"),
        None => "Yjs updates applied to a yrs document per room".into(),
    };
    println!(
        "relay: {} rooms × {} connections, {} updates/s per room, {frames}, window {:.1} s",
        r["rooms"],
        r["clients_per_room"],
        r["rate_per_room"],
        r["window_s"].as_f64().unwrap_or(f64::NAN)
    );
    let bytes = |k: &str| r[k].as_u64().unwrap_or(0);
    let lost = bytes("bytes_expected").saturating_sub(bytes("bytes_received"));
    println!(
        "deliveries in window {} ({:.0}/s); short or failed writes {}; bytes not received {}",
        r["deliveries"],
        r["deliveries_per_s"].as_f64().unwrap_or(f64::NAN),
        r["short_writes"],
        lost
    );
    if let Some(applied) = r["updates_applied"].as_u64() {
        println!(
            "updates applied by the relay {applied} of {} sent",
            r["updates_sent"]
        );
    }
    println!(
        "relay thread CPU µs / delivery: user {:.3}, sys {:.3}, total {:.3}",
        f("user"),
        f("sys"),
        f("total")
    );
}

#[cfg(test)]
mod tests {
    use super::{run, RelayArgs};
    use std::time::Duration;

    #[test]
    fn every_frame_sent_is_relayed_to_every_other_connection_of_its_room() {
        let args = RelayArgs {
            rooms: 3,
            clients: 4,
            rate: 40.0,
            frame_bytes: 37,
            duration: Duration::from_millis(500),
            warmup: Duration::from_millis(100),
            crdt: false,
            json: true,
        };
        let r = run(&args).expect("relay run");
        let sent = r["updates_sent"].as_u64().expect("sent");
        assert!(sent >= 30, "{r}");
        assert!(r["updates_applied"].is_null(), "{r}");
        assert_eq!(r["bytes_expected"].as_u64(), Some(sent * 3 * 37), "{r}");
        assert_eq!(r["bytes_received"], r["bytes_expected"], "{r}");
        assert_eq!(r["short_writes"].as_u64(), Some(0), "{r}");
        let deliveries = r["deliveries"].as_u64().expect("deliveries");
        assert!(deliveries > 0 && deliveries <= sent * 3, "{r}");
        let total = r["relay_cpu_us_per_delivery"]["total"]
            .as_f64()
            .expect("cpu");
        assert!(total.is_finite() && total >= 0.0, "{r}");
    }

    #[test]
    fn with_crdt_every_update_is_applied_and_relayed_whole() {
        let args = RelayArgs {
            rooms: 2,
            clients: 3,
            rate: 50.0,
            frame_bytes: 40,
            duration: Duration::from_millis(500),
            warmup: Duration::from_millis(100),
            crdt: true,
            json: true,
        };
        let r = run(&args).expect("relay run");
        let sent = r["updates_sent"].as_u64().expect("sent");
        assert!(sent >= 40, "{r}");
        assert_eq!(r["updates_applied"].as_u64(), Some(sent), "{r}");
        // Frames are updates of varying length: more than a two-byte length each.
        let expected = r["bytes_expected"].as_u64().expect("expected");
        assert!(expected > sent * 2 * 3, "{r}");
        assert_eq!(r["bytes_received"], r["bytes_expected"], "{r}");
        assert_eq!(r["short_writes"].as_u64(), Some(0), "{r}");
        let deliveries = r["deliveries"].as_u64().expect("deliveries");
        assert!(deliveries > 0 && deliveries <= sent * 2, "{r}");
    }
}
