//! The raw protocol client the counting connections use: just enough WebSocket (RFC 6455) to
//! open a connection, join a room (Hocuspocus's auth, then sync step 1 and its step 2), answer
//! the server's pings and hand every received message's payload to the caller, reading into one
//! small buffer that is never zero-filled.
//!
//! `rooms` and `fanout` hold hundreds to thousands of connections that only count update
//! messages. Through tungstenite each received frame cost a task wake-up shared by two halves
//! of a split stream, a buffer split and an owned message; here it costs a `read` and a parse
//! in place, so that the load generator takes as little of the machine as it can while the
//! server under test fans out.

use std::net::{Ipv4Addr, SocketAddr};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::wire::{self, Dialect};

type Res<T> = Result<T, String>;

/// The largest response head to an upgrade request.
const MAX_HEAD: usize = 16 << 10;
/// The largest message accepted (a joined room's document comes in step 2).
const MAX_MESSAGE: usize = 64 << 20;
/// Read at least this much room into the buffer per `read`.
const READ_CHUNK: usize = 4 << 10;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// One joined connection.
pub struct RawConn {
    stream: TcpStream,
    /// Received bytes; `buf[start..]` are not parsed yet.
    buf: Vec<u8>,
    start: usize,
    /// A fragmented message being put together: its opcode and payload so far.
    fragments: Option<(u8, Vec<u8>)>,
    /// The state of the masking keys' generator (any key is valid; they need not be secret).
    mask: u32,
}

/// What the caller's handler says after each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Read on.
    More,
    /// Return from [`RawConn::read_messages`].
    Stop,
}

/// A frame's header, parsed.
struct Head {
    fin: bool,
    opcode: u8,
    /// Where the payload starts and ends in the buffer.
    payload: std::ops::Range<usize>,
}

/// Opens `ws://{addr}/{room}` from `source` (when given) and joins: Hocuspocus's auth first,
/// then sync step 1 with an empty state vector, until the step 2 answer has arrived.
pub async fn join(
    addr: SocketAddr,
    room: &str,
    dialect: Dialect,
    source: Option<Ipv4Addr>,
) -> Res<RawConn> {
    let stream = wire::tcp_connect(addr, source).await?;
    let mut conn = RawConn {
        stream,
        buf: Vec::with_capacity(READ_CHUNK),
        start: 0,
        fragments: None,
        mask: u32::from(addr.port()) ^ 0x9e37_79b9,
    };
    conn.upgrade(addr, room).await?;
    if let Some(auth) = dialect.auth(room, "loadtest") {
        conn.send(&auth).await?;
        let mut answer = None;
        conn.read_messages(|m| match wire::parse(dialect, m).auth {
            Some(a) => {
                answer = Some(a);
                Next::Stop
            }
            None => Next::More,
        })
        .await
        .map_err(|e| format!("{room}: during auth: {e}"))?;
        if answer != Some(2) {
            return Err(format!("{room}: auth answered with sub-type {answer:?}"));
        }
    }
    conn.send(&dialect.step1(room, &[0])).await?;
    conn.read_messages(|m| {
        if wire::parse(dialect, m).step2.is_empty() {
            Next::More
        } else {
            Next::Stop
        }
    })
    .await
    .map_err(|e| format!("{room}: during sync: {e}"))?;
    Ok(conn)
}

/// Joins one connection per `(room, source)` with [`join`], at most `concurrency` at once; all
/// or nothing.
pub async fn join_all(
    addr: &str,
    dialect: Dialect,
    jobs: Vec<(String, Option<Ipv4Addr>)>,
    concurrency: usize,
) -> Res<Vec<RawConn>> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| format!("server address {addr:?}: {e}"))?;
    let joined = wire::connect_each(jobs, concurrency, move |room, source| async move {
        join(addr, &room, dialect, source).await
    })
    .await;
    wire::all_or_nothing(joined)
}

impl RawConn {
    /// Sends the upgrade request and checks the answer: 101 with the key's accept value.
    async fn upgrade(&mut self, addr: SocketAddr, room: &str) -> Res<()> {
        let key = generate_key();
        let request = format!(
            "GET /{room} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        self.stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("{room}: send upgrade: {e}"))?;
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(format!("{room}: upgrade answer over {MAX_HEAD} bytes"));
            }
            if !self.read_more().await? {
                return Err(format!("{room}: socket ended during the upgrade"));
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        let status = head.lines().next().unwrap_or_default();
        if !status.starts_with("HTTP/1.1 101") {
            return Err(format!("{room}: upgrade answered {status:?}"));
        }
        let accept = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-accept")
                .then(|| value.trim())
        });
        if accept != Some(derive_accept_key(key.as_bytes()).as_str()) {
            return Err(format!("{room}: wrong Sec-WebSocket-Accept {accept:?}"));
        }
        self.start = end;
        Ok(())
    }

    /// Sends `payload` as one masked binary message.
    pub async fn send(&mut self, payload: &[u8]) -> Res<()> {
        let frame = frame(&mut self.mask, OP_BINARY, payload);
        self.stream
            .write_all(&frame)
            .await
            .map_err(|e| format!("send: {e}"))
    }

    /// Reads more bytes into the buffer, after dropping what was parsed; `false` at the end of
    /// the stream.
    async fn read_more(&mut self) -> Res<bool> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.reserve(READ_CHUNK);
        loop {
            self.stream
                .readable()
                .await
                .map_err(|e| format!("read: {e}"))?;
            match self.stream.try_read_buf(&mut self.buf) {
                Ok(n) => return Ok(n > 0),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// The next whole frame's header in `buf[start..]`, if it has arrived; an error for what a
    /// server must not send.
    fn next_head(&self) -> Res<Option<Head>> {
        let b = &self.buf[self.start..];
        let [b0, b1, ..] = *b else {
            return Ok(None);
        };
        if b0 & 0x70 != 0 {
            return Err(format!("reserved bits set in frame header {b0:#04x}"));
        }
        if b1 & 0x80 != 0 {
            return Err("a masked frame from the server".into());
        }
        let (len, at) = match b1 & 0x7f {
            126 => match b.get(2..4) {
                Some(l) => (u64::from(u16::from_be_bytes([l[0], l[1]])), 4),
                None => return Ok(None),
            },
            127 => match b.get(2..10) {
                Some(l) => (u64::from_be_bytes(l.try_into().expect("8 bytes")), 10),
                None => return Ok(None),
            },
            n => (u64::from(n), 2),
        };
        if len > MAX_MESSAGE as u64 {
            return Err(format!("a frame of {len} bytes"));
        }
        let len = len as usize;
        if b.len() < at + len {
            return Ok(None);
        }
        let from = self.start + at;
        Ok(Some(Head {
            fin: b0 & 0x80 != 0,
            opcode: b0 & 0x0f,
            payload: from..from + len,
        }))
    }

    /// Hands each received message's payload (binary or text) to `on_message` until it says
    /// [`Next::Stop`]; answers pings on the way. An error when the stream ends, the server
    /// closes or breaks the protocol.
    pub async fn read_messages(&mut self, mut on_message: impl FnMut(&[u8]) -> Next) -> Res<()> {
        loop {
            while let Some(head) = self.next_head()? {
                self.start = head.payload.end;
                let payload = head.payload;
                match (head.opcode, head.fin, &mut self.fragments) {
                    (OP_BINARY | OP_TEXT, true, None) => {
                        if on_message(&self.buf[payload]) == Next::Stop {
                            return Ok(());
                        }
                    }
                    (op @ (OP_BINARY | OP_TEXT), false, f @ None) => {
                        *f = Some((op, self.buf[payload].to_vec()));
                    }
                    (OP_CONTINUATION, fin, Some((_, so_far))) => {
                        if so_far.len() + payload.len() > MAX_MESSAGE {
                            return Err(format!("a message over {MAX_MESSAGE} bytes"));
                        }
                        so_far.extend_from_slice(&self.buf[payload]);
                        if fin {
                            let (_, whole) = self.fragments.take().expect("fragments");
                            if on_message(&whole) == Next::Stop {
                                return Ok(());
                            }
                        }
                    }
                    (OP_PING, true, _) => {
                        let pong = frame(&mut self.mask, OP_PONG, &self.buf[payload]);
                        self.stream
                            .write_all(&pong)
                            .await
                            .map_err(|e| format!("send pong: {e}"))?;
                    }
                    (OP_PONG, true, _) => {}
                    (OP_CLOSE, true, _) => {
                        let p = &self.buf[payload];
                        let code = p.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
                        let reason = String::from_utf8_lossy(p.get(2..).unwrap_or_default());
                        return Err(format!("closed by the server: {code:?} {reason:?}"));
                    }
                    (op, fin, f) => {
                        return Err(format!(
                            "unexpected frame: opcode {op:#x}, fin {fin}, mid-message {}",
                            f.is_some()
                        ))
                    }
                }
            }
            if !self.read_more().await? {
                return Err("the socket ended".into());
            }
        }
    }
}

/// A client frame (FIN set, masked with a key from `mask`, which it advances) with `payload`.
fn frame(mask: &mut u32, opcode: u8, payload: &[u8]) -> Vec<u8> {
    // xorshift32: a new key per frame.
    *mask ^= *mask << 13;
    *mask ^= *mask >> 17;
    *mask ^= *mask << 5;
    let key = mask.to_be_bytes();
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server frame (unmasked).
    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n <= 0xffff => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    /// A connected pair: a `RawConn` already past the upgrade, and the server's end.
    async fn pair() -> (RawConn, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr);
        let (client, server) = tokio::join!(client, listener.accept());
        let conn = RawConn {
            stream: client.unwrap(),
            buf: Vec::new(),
            start: 0,
            fragments: None,
            mask: 1,
        };
        (conn, server.unwrap().0)
    }

    #[tokio::test]
    async fn messages_whole_split_fragmented_and_pings_answered() {
        use tokio::io::AsyncReadExt;
        let (mut conn, mut server) = pair().await;
        let big = vec![7u8; 70_000];
        let mut bytes = server_frame(true, OP_BINARY, b"one");
        bytes.extend(server_frame(true, OP_PING, b"hi"));
        bytes.extend(server_frame(false, OP_BINARY, b"tw"));
        bytes.extend(server_frame(false, OP_CONTINUATION, b"o"));
        bytes.extend(server_frame(true, OP_CONTINUATION, b"!"));
        bytes.extend(server_frame(true, OP_BINARY, &big));
        bytes.extend(server_frame(
            true,
            OP_CLOSE,
            &[0x03, 0xe8, b'b', b'y', b'e'],
        ));
        // Byte by byte at first: headers and payloads cut anywhere.
        let writer = tokio::spawn(async move {
            for chunk in bytes.chunks(1).take(40) {
                server.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
            server.write_all(&bytes[40..]).await.unwrap();
            let mut pong = [0u8; 8];
            server.read_exact(&mut pong).await.unwrap();
            server
        });
        let mut got = Vec::new();
        let end = conn
            .read_messages(|m| {
                got.push(m.to_vec());
                Next::More
            })
            .await;
        assert_eq!(got, vec![b"one".to_vec(), b"two!".to_vec(), big]);
        assert_eq!(end.unwrap_err(), "closed by the server: Some(1000) \"bye\"");
        let _server = writer.await.unwrap();
    }

    #[tokio::test]
    async fn pong_is_masked_and_carries_the_ping_payload() {
        use tokio::io::AsyncReadExt;
        let (mut conn, mut server) = pair().await;
        server
            .write_all(&server_frame(true, OP_PING, b"abc"))
            .await
            .unwrap();
        server
            .write_all(&server_frame(true, OP_BINARY, b"x"))
            .await
            .unwrap();
        conn.read_messages(|_| Next::Stop).await.unwrap();
        let mut pong = [0u8; 9];
        server.read_exact(&mut pong).await.unwrap();
        assert_eq!(pong[0], 0x80 | OP_PONG);
        assert_eq!(pong[1], 0x80 | 3, "masked, 3 bytes");
        let key = &pong[2..6];
        let unmasked: Vec<u8> = pong[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        assert_eq!(unmasked, b"abc");
    }

    /// The next message, which must be binary.
    async fn next_binary(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>) -> Vec<u8> {
        use futures_util::StreamExt;
        match ws.next().await {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(b))) => b.to_vec(),
            other => panic!("expected a binary message, got {other:?}"),
        }
    }

    /// A tungstenite server that plays the target's part in a join, then sends one update
    /// message; it checks that what the client sent was masked and well formed (tungstenite
    /// refuses unmasked client frames) and what the messages were.
    async fn serve_one_join(dialect: Dialect) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            let room = "r1";
            // What the target sends: `body` after Hocuspocus's document name.
            let framed = |body: &[u8]| {
                let mut out = Vec::new();
                if dialect == Dialect::Hocuspocus {
                    out.push(room.len() as u8);
                    out.extend_from_slice(room.as_bytes());
                }
                out.extend_from_slice(body);
                Message::Binary(out.into())
            };
            if let Some(auth) = dialect.auth(room, "loadtest") {
                assert_eq!(next_binary(&mut ws).await, auth);
                ws.send(framed(&[2, 2])).await.unwrap();
            } else {
                let step1 = dialect.step1(room, &[0]);
                ws.send(Message::Binary(step1.into())).await.unwrap();
            }
            assert_eq!(next_binary(&mut ws).await, dialect.step1(room, &[0]));
            // Step 2 with an empty update.
            ws.send(framed(&[0, 1, 2, 0, 0])).await.unwrap();
            ws.send(Message::Ping(b"p".to_vec().into())).await.unwrap();
            ws.send(Message::Binary(dialect.update(room, &[9, 9]).into()))
                .await
                .unwrap();
            match ws.next().await {
                Some(Ok(Message::Pong(p))) => assert_eq!(&p[..], b"p"),
                other => panic!("expected the pong, got {other:?}"),
            }
            ws.close(None).await.unwrap();
        });
        (addr, server)
    }

    #[tokio::test]
    async fn joins_a_websocket_server_in_both_dialects_and_reads_on() {
        for dialect in [Dialect::YWebsocket, Dialect::Hocuspocus] {
            let (addr, server) = serve_one_join(dialect).await;
            let mut conn = join(addr, "r1", dialect, None).await.unwrap();
            let mut updates = Vec::new();
            let end = conn
                .read_messages(|m| {
                    updates.extend(wire::parse(dialect, m).updates.iter().map(|u| u.to_vec()));
                    Next::More
                })
                .await;
            assert_eq!(updates, vec![vec![9u8, 9]], "{dialect:?}");
            assert!(
                end.unwrap_err().contains("closed by the server"),
                "{dialect:?}"
            );
            server.await.unwrap();
        }
    }

    #[tokio::test]
    async fn protocol_errors_are_errors() {
        for (bytes, want) in [
            (vec![0x82 | 0x40, 0], "reserved bits"),
            (vec![0x82, 0x81, 1, 2, 3, 4, 0], "masked frame"),
            (
                server_frame(true, OP_CONTINUATION, b"x"),
                "unexpected frame",
            ),
            (
                vec![0x82, 127, 0, 0, 0, 0, 0x10, 0, 0, 0],
                "a frame of 268435456 bytes",
            ),
            (vec![], "the socket ended"),
        ] {
            let (mut conn, mut server) = pair().await;
            server.write_all(&bytes).await.unwrap();
            drop(server);
            let err = conn.read_messages(|_| Next::More).await.unwrap_err();
            assert!(err.contains(want), "{err:?} should say {want:?}");
        }
    }
}
