//! The client side the scenarios share: the few frames they write and read, for the y-websocket
//! protocol (tandem and the stock Node server) and for Hocuspocus (every frame prefixed with
//! `varString(document)`), the sync handshake (optionally from a chosen source address), the
//! timestamp payload writers send and probes decode, and a guard that aborts connection tasks.
//! See /work/shared/PROTOCOLS.md and protocol/PROTOCOL.md.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use yrs::updates::decoder::Decode;
use yrs::{Array, ArrayRef, Doc, Out, Transact, Update};

type Res<T> = Result<T, String>;

/// A client WebSocket (always plain TCP on loopback).
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Deadline for one connection's upgrade and sync (and Hocuspocus auth).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Which framing a target speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// y-websocket: the room is the URL path, frames carry bare messages.
    YWebsocket,
    /// Hocuspocus: every frame starts with `varString(document)`; auth comes first.
    Hocuspocus,
}

use tandem_protocol::lib0::write_var_bytes as write_var_buf;

/// Reads a lib0 `varUint` at `*pos`, advancing it; `None` when truncated or too long.
pub fn read_var_uint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let byte = *b.get(*pos)?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
}

/// Reads `varUint(len) bytes` at `*pos`, advancing it.
pub fn read_var_buf<'a>(b: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let len = read_var_uint(b, pos)? as usize;
    let end = pos.checked_add(len)?;
    let s = b.get(*pos..end)?;
    *pos = end;
    Some(s)
}

impl Dialect {
    fn prefix(self, room: &str) -> Vec<u8> {
        let mut out = Vec::new();
        if self == Dialect::Hocuspocus {
            write_var_buf(&mut out, room.as_bytes());
        }
        out
    }

    /// Sync step 1 with the given state vector (`00 00 varBuf(sv)`).
    pub fn step1(self, room: &str, state_vector: &[u8]) -> Vec<u8> {
        let mut out = self.prefix(room);
        out.extend_from_slice(&[0, 0]);
        write_var_buf(&mut out, state_vector);
        out
    }

    /// A document update as a sync update message (`00 02 varBuf(update)`).
    pub fn update(self, room: &str, update: &[u8]) -> Vec<u8> {
        let mut out = self.prefix(room);
        out.extend_from_slice(&[0, 2]);
        write_var_buf(&mut out, update);
        out
    }

    /// An awareness message (`01 varBuf(awareness update)`).
    pub fn awareness(self, room: &str, payload: &[u8]) -> Vec<u8> {
        let mut out = self.prefix(room);
        out.push(1);
        write_var_buf(&mut out, payload);
        out
    }

    /// Hocuspocus's auth message with a token (`varString(doc) 02 00 varString(token)`); `None`
    /// for y-websocket, which has no such message.
    pub fn auth(self, room: &str, token: &str) -> Option<Vec<u8>> {
        if self != Dialect::Hocuspocus {
            return None;
        }
        let mut out = self.prefix(room);
        out.extend_from_slice(&[2, 0]);
        write_var_buf(&mut out, token.as_bytes());
        Some(out)
    }
}

/// What a received frame held, as far as the scenario cares.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Received<'a> {
    /// Sync step 2 payloads (the handshake's answer).
    pub step2: Vec<&'a [u8]>,
    /// Sync update payloads (type 0, or Hocuspocus's sync reply type 4, sub-type 2).
    pub updates: Vec<&'a [u8]>,
    /// Awareness update payloads (type 1).
    pub awareness: Vec<&'a [u8]>,
    /// Hocuspocus auth answers: the auth sub-type (2 = authenticated, 1 = permission denied).
    pub auth: Option<u64>,
}

/// Parses a frame: y-websocket frames may hold several messages back to back (tandem); a
/// Hocuspocus frame holds one message after its document name. Unknown types end the parse.
pub fn parse(dialect: Dialect, frame: &[u8]) -> Received<'_> {
    let mut r = Received::default();
    let mut pos = 0;
    if dialect == Dialect::Hocuspocus && read_var_buf(frame, &mut pos).is_none() {
        return r;
    }
    while pos < frame.len() {
        let Some(ty) = read_var_uint(frame, &mut pos) else {
            break;
        };
        match ty {
            0 | 4 => {
                let (Some(sub), Some(payload)) = (
                    read_var_uint(frame, &mut pos),
                    read_var_buf(frame, &mut pos),
                ) else {
                    break;
                };
                match sub {
                    1 => r.step2.push(payload),
                    2 => r.updates.push(payload),
                    _ => {}
                }
            }
            1 => match read_var_buf(frame, &mut pos) {
                Some(payload) => r.awareness.push(payload),
                None => break,
            },
            2 if dialect == Dialect::Hocuspocus => {
                r.auth = read_var_uint(frame, &mut pos);
                break;
            }
            3 => {}
            _ => break,
        }
        if dialect == Dialect::Hocuspocus {
            break;
        }
    }
    r
}

/// Microseconds since the Unix epoch: the payload writers push and probes subtract.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// How [`handshake`] opens its socket.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnectOptions {
    /// Bind the client socket to this address (port chosen at connect time) before connecting,
    /// so that many connections to one server spread over several source addresses and do not
    /// exhaust one address's ephemeral ports. `None`: the kernel's choice.
    pub source: Option<Ipv4Addr>,
    /// A 4 KiB WebSocket read buffer instead of tungstenite's 128 KiB, for connections that
    /// receive small frames. tungstenite zero-fills the free part of its buffer before every
    /// `read`, so with 128 KiB a connection that reads one 40-byte frame at a time spends most
    /// of its time in `memset`; and a process holding thousands of connections would hold
    /// 128 KiB for each.
    pub small_buffers: bool,
}

/// Opens a TCP connection to `addr`, from `source` when given, with Nagle off.
pub(crate) async fn tcp_connect(addr: SocketAddr, source: Option<Ipv4Addr>) -> Res<TcpStream> {
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    if let Some(ip) = source {
        bind_no_port(&socket)?;
        socket
            .bind(SocketAddr::from((ip, 0)))
            .map_err(|e| format!("bind {ip}: {e}"))?;
    }
    let stream = socket
        .connect(addr)
        .await
        .map_err(|e| format!("connect {addr} from {source:?}: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    Ok(stream)
}

/// `IP_BIND_ADDRESS_NO_PORT`: a bind to `(ip, 0)` defers the port choice to `connect`, which
/// then only needs the 4-tuple to be unique (not the port among every socket bound to `ip`).
fn bind_no_port(socket: &TcpSocket) -> Res<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a pointer to an int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(format!(
            "IP_BIND_ADDRESS_NO_PORT: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Connects to `ws://{addr}/{room}` and, for Hocuspocus, authenticates (and waits for the
/// answer); no sync message is sent yet (see [`handshake`]).
pub async fn open(addr: &str, room: &str, dialect: Dialect, opts: ConnectOptions) -> Res<Ws> {
    let sock: SocketAddr = addr
        .parse()
        .map_err(|e| format!("server address {addr:?}: {e}"))?;
    let url = format!("ws://{addr}/{room}");
    let stream = tcp_connect(sock, opts.source).await?;
    let config = opts
        .small_buffers
        .then(|| WebSocketConfig::default().read_buffer_size(4096));
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(
        url.as_str(),
        MaybeTlsStream::Plain(stream),
        config,
    )
    .await
    .map_err(|e| format!("upgrade {url}: {e}"))?;
    if let Some(auth) = dialect.auth(room, "loadtest") {
        ws.send(Message::Binary(auth.into()))
            .await
            .map_err(|e| format!("send auth: {e}"))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => match parse(dialect, &b).auth {
                    Some(2) => break,
                    Some(other) => return Err(format!("auth answered with sub-type {other}")),
                    None => {}
                },
                Some(Ok(_)) => {}
                other => return Err(format!("socket ended during auth: {other:?}")),
            }
        }
    }
    Ok(ws)
}

/// Connects with [`open`] and syncs: step 1 with an empty state vector, then waits for the
/// step 2 answer.
pub async fn handshake(addr: &str, room: &str, dialect: Dialect, opts: ConnectOptions) -> Res<Ws> {
    let mut ws = open(addr, room, dialect, opts).await?;
    ws.send(Message::Binary(dialect.step1(room, &[0]).into()))
        .await
        .map_err(|e| format!("send step1: {e}"))?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                if !parse(dialect, &b).step2.is_empty() {
                    return Ok(ws);
                }
            }
            Some(Ok(_)) => {}
            other => return Err(format!("socket ended during sync: {other:?}")),
        }
    }
}

/// Opens one connection per `(room, source)` with [`handshake`], at most `concurrency` at once,
/// each within [`HANDSHAKE_TIMEOUT`]; results in the order given.
pub async fn connect_many(
    addr: &str,
    dialect: Dialect,
    jobs: Vec<(String, Option<Ipv4Addr>)>,
    small_buffers: bool,
    concurrency: usize,
) -> Vec<Res<Ws>> {
    let addr: Arc<str> = addr.into();
    connect_each(jobs, concurrency, move |room, source| {
        let addr = Arc::clone(&addr);
        async move {
            let opts = ConnectOptions {
                source,
                small_buffers,
            };
            handshake(&addr, &room, dialect, opts).await
        }
    })
    .await
}

/// Runs `connect(room, source)` for every job, at most `concurrency` at once, each within
/// [`HANDSHAKE_TIMEOUT`]; results in the order given.
pub async fn connect_each<T, F, Fut>(
    jobs: Vec<(String, Option<Ipv4Addr>)>,
    concurrency: usize,
    connect: F,
) -> Vec<Res<T>>
where
    T: Send + 'static,
    F: Fn(String, Option<Ipv4Addr>) -> Fut,
    Fut: std::future::Future<Output = Res<T>> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let handles: Vec<JoinHandle<Res<T>>> = jobs
        .into_iter()
        .map(|(room, source)| {
            let sem = Arc::clone(&sem);
            let what = format!("room {room} (from {source:?})");
            let connecting = connect(room, source);
            tokio::spawn(async move {
                let _permit = sem.acquire_owned().await;
                tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
                    .await
                    .map_err(|_| format!("{what}: no sync within {HANDSHAKE_TIMEOUT:?}"))?
            })
        })
        .collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(
            h.await
                .map_err(|e| format!("connect task: {e}"))
                .and_then(|r| r),
        );
    }
    out
}

/// Like [`connect_many`] with small read buffers (the scenarios that call it exchange small
/// frames), but all or nothing: the first error, with how many failed.
pub async fn connect_all(
    addr: &str,
    dialect: Dialect,
    jobs: Vec<(String, Option<Ipv4Addr>)>,
    concurrency: usize,
) -> Res<Vec<Ws>> {
    all_or_nothing(connect_many(addr, dialect, jobs, true, concurrency).await)
}

/// Every connection, or the first error with how many failed.
pub fn all_or_nothing<T>(results: Vec<Res<T>>) -> Res<Vec<T>> {
    let total = results.len();
    let mut ok = Vec::with_capacity(total);
    let mut first_err = None;
    for r in results {
        match r {
            Ok(c) => ok.push(c),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(format!(
            "{} of {total} connections failed; first: {e}",
            total - ok.len()
        )),
        None => Ok(ok),
    }
}

/// Pushes the current time ([`now_us`]) into `arr` and returns the update as v1 bytes.
pub fn stamp_update(doc: &Doc, arr: &ArrayRef) -> Vec<u8> {
    let mut txn = doc.transact_mut();
    arr.push_back(&mut txn, now_us() as i64);
    txn.encode_update_v1()
}

/// Writer `w`'s paced sends: from `start + offset`, one update every `period` until `end`, each
/// pushing its send time into array `ts{w}` ([`stamp_update`]); `sent` is called after each.
/// Returns when the schedule ends or the socket fails.
pub async fn send_stamped<S>(
    sink: &mut S,
    dialect: Dialect,
    room: &str,
    w: usize,
    (start, offset, period, end): (std::time::Instant, Duration, Duration, std::time::Instant),
    mut sent: impl FnMut(),
) where
    S: futures_util::Sink<Message> + Unpin,
{
    let doc = Doc::new();
    let arr = doc.get_or_insert_array(format!("ts{w}").as_str());
    let mut k: u32 = 0;
    loop {
        let due = start + offset + period * k;
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let frame = dialect.update(room, &stamp_update(&doc, &arr));
        if sink.send(Message::Binary(frame.into())).await.is_err() {
            break;
        }
        sent();
        k += 1;
    }
}

/// A probe's document: per writer array (`ts{w}`) and how many elements were read already.
pub struct ProbeDoc {
    doc: Doc,
    arrays: Vec<ArrayRef>,
    seen: Vec<u32>,
}

impl ProbeDoc {
    /// A document reading the arrays of `writers` writers.
    pub fn new(writers: usize) -> ProbeDoc {
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

    /// Applies an update and returns the send times it brought (empty: a re-delivery); `None`
    /// if it did not decode.
    pub fn apply(&mut self, update: &[u8]) -> Option<Vec<u64>> {
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

/// Aborts the connection tasks when dropped, so that no early return leaves them running (and
/// their sockets open).
#[derive(Default)]
pub struct Tasks(pub Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_protocol::lib0::write_var_uint;

    #[test]
    fn var_uint_round_trip() {
        for v in [0u64, 127, 128, 300, 1 << 40] {
            let mut b = Vec::new();
            write_var_uint(&mut b, v);
            assert_eq!(read_var_uint(&b, &mut 0), Some(v));
        }
        let mut b = Vec::new();
        write_var_uint(&mut b, 300);
        assert_eq!(b, [0xac, 0x02]);
    }

    #[test]
    fn hocuspocus_frames() {
        let h = Dialect::Hocuspocus;
        assert_eq!(h.auth("ab", "").unwrap(), [2, b'a', b'b', 2, 0, 0]);
        assert_eq!(h.step1("ab", &[0]), [2, b'a', b'b', 0, 0, 1, 0]);
        assert_eq!(h.update("ab", &[7, 8]), [2, b'a', b'b', 0, 2, 2, 7, 8]);
        let reply = [2, b'a', b'b', 4, 2, 1, 9];
        assert_eq!(parse(h, &reply).updates, vec![&[9u8][..]]);
        assert_eq!(parse(h, &[2, b'a', b'b', 2, 2]).auth, Some(2));
        assert_eq!(h.awareness("ab", &[0]), [2, b'a', b'b', 1, 1, 0]);
        assert_eq!(
            parse(h, &h.awareness("ab", &[0])).awareness,
            vec![&[0u8][..]]
        );
    }

    #[test]
    fn y_websocket_frames() {
        let y = Dialect::YWebsocket;
        assert_eq!(y.step1("r", &[0]), [0, 0, 1, 0]);
        assert_eq!(y.auth("r", ""), None);
        // Two messages in one frame: an awareness message, then an update.
        let frame = [1, 1, 0, 0, 2, 1, 5];
        let r = parse(y, &frame);
        assert_eq!(r.updates, vec![&[5u8][..]]);
        assert_eq!(r.awareness, vec![&[0u8][..]]);
        assert!(r.step2.is_empty());
    }
}
