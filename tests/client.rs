//! The Rust client (`tandem-client`) against a real node: convergence, awareness, renewal and
//! expiry, and the ways the client ends a connection.
//!
//! What the client does is observed from other peers of the same room (clients or raw sockets),
//! so it is what the node made of it. Two things the client puts on the wire never come back from
//! any server: its close code and its answer to the node's sync step 1 (the node applies it and
//! tells nobody). For those, the client connects through a [`Tap`], a TCP pass-through to the node
//! that records the client's frames without changing a byte.
//!
//! The faults only a scripted server can produce (malformed or undecodable frames, several
//! messages in one frame) are tested in `clients/rust/tests/scripted_server.rs`.

mod common;

use std::io::Cursor;
use std::net::SocketAddr;
use std::time::Duration;

use common::{append_text, raw, send_binary, text, Raw, TestServer, WAIT};
use futures_util::StreamExt;
use serde_json::json;
use tandem_client::{Client, ClientError, ClientOptions, CloseOrigin, Failure};
use tandem_protocol::awareness::encode_entries;
use tandem_protocol::{AwarenessEntry, AwarenessUpdate, Message, MessageReader, SyncMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use yrs::updates::decoder::Decode;
use yrs::{Doc, Transact, Update};

/// A node whose awareness sweep never fires during a test: a state that vanishes was removed by a
/// null from its client or by its connection ending, never by the node's expiry.
async fn server_without_expiry() -> TestServer {
    TestServer::start_with(|c| c.rooms.awareness_timeout = Duration::from_secs(3600)).await
}

/// One WebSocket frame the client sent, unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sent {
    /// A binary frame: y-websocket messages.
    Binary(Vec<u8>),
    /// A close frame and its code, if it had one.
    Close(Option<u16>),
    /// Anything else (pong, text, continuation).
    Other,
}

/// A TCP pass-through from one client to the node that records every frame the client sends.
/// Bytes go through unchanged in both directions: the node's answers, its pings and its close
/// handshake reach the client as the node wrote them.
struct Tap {
    addr: SocketAddr,
    sent: mpsc::UnboundedReceiver<Sent>,
}

impl Tap {
    /// Listens on a fresh port and forwards the first connection it accepts to `server`.
    async fn to(server: &TestServer) -> Tap {
        let upstream = server.running().local_addr();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tap");
        let addr = listener.local_addr().unwrap();
        let (tx, sent) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (client, _) = listener.accept().await.expect("accept");
            let node = TcpStream::connect(upstream).await.expect("connect to node");
            let (mut from_client, mut to_client) = client.into_split();
            let (mut from_node, mut to_node) = node.into_split();
            let down = tokio::spawn(async move {
                let _ = tokio::io::copy(&mut from_node, &mut to_client).await;
                let _ = to_client.shutdown().await;
            });
            let mut parser = ClientFrames::default();
            let mut buf = vec![0u8; 16 << 10];
            loop {
                let n = match from_client.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if to_node.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                for frame in parser.push(&buf[..n]) {
                    let _ = tx.send(frame);
                }
            }
            let _ = to_node.shutdown().await;
            let _ = down.await;
        });
        Tap { addr, sent }
    }

    /// `ws://TAP/room`: the node's room `room`, through the tap.
    fn url(&self, room: &str) -> String {
        format!("ws://{}/{}", self.addr, room)
    }

    /// The next frame the client sent.
    async fn next(&mut self) -> Sent {
        tokio::time::timeout(WAIT, self.sent.recv())
            .await
            .expect("a client frame in time")
            .expect("the client connected through the tap")
    }

    /// Every binary frame up to the client's close frame, and that frame's code.
    async fn until_close(&mut self) -> (Vec<Vec<u8>>, Option<u16>) {
        let mut binary = Vec::new();
        loop {
            match self.next().await {
                Sent::Binary(frame) => binary.push(frame),
                Sent::Close(code) => return (binary, code),
                Sent::Other => {}
            }
        }
    }
}

/// Splits the client-to-node byte stream into frames: first the HTTP upgrade request, then
/// masked WebSocket frames.
#[derive(Default)]
struct ClientFrames {
    pending: Vec<u8>,
    upgraded: bool,
}

impl ClientFrames {
    fn push(&mut self, bytes: &[u8]) -> Vec<Sent> {
        self.pending.extend_from_slice(bytes);
        let mut frames = Vec::new();
        if !self.upgraded {
            let Some(end) = self.pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                return frames;
            };
            self.pending.drain(..end + 4);
            self.upgraded = true;
        }
        loop {
            let mut cursor = Cursor::new(&self.pending[..]);
            let Some((header, len)) = FrameHeader::parse(&mut cursor).expect("a valid frame")
            else {
                return frames;
            };
            let start = cursor.position() as usize;
            let end = start + usize::try_from(len).unwrap();
            if self.pending.len() < end {
                return frames;
            }
            let mask = header.mask.expect("client frames are masked");
            let payload: Vec<u8> = self.pending[start..end]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            self.pending.drain(..end);
            assert!(header.is_final, "the client does not fragment messages");
            frames.push(match header.opcode {
                OpCode::Data(Data::Binary) => Sent::Binary(payload),
                OpCode::Control(Control::Close) => Sent::Close(
                    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])),
                ),
                _ => Sent::Other,
            });
        }
    }
}

/// Sends one awareness entry from a raw socket.
async fn announce(ws: &mut Raw, client_id: u64, clock: u64, state: &str) {
    let mut payload = Vec::new();
    let entry = AwarenessEntry {
        client_id,
        clock,
        state,
    };
    encode_entries(&mut payload, [entry].into_iter());
    send_binary(ws, Message::Awareness(&payload).to_frame()).await;
}

/// Reads a raw socket until the node sends an awareness entry for `client_id`; returns its clock
/// and state.
async fn next_entry_for(ws: &mut Raw, client_id: u64) -> (u64, String) {
    let read = async {
        while let Some(msg) = ws.next().await {
            let WsMessage::Binary(frame) = msg.expect("socket open") else {
                continue;
            };
            for m in MessageReader::new(&frame) {
                if let Message::Awareness(payload) = m.expect("the node sends valid messages") {
                    let update = AwarenessUpdate::decode(payload).unwrap();
                    if let Some(e) = update.entries.iter().find(|e| e.client_id == client_id) {
                        return (e.clock, e.state.to_owned());
                    }
                }
            }
        }
        panic!("socket ended before an awareness entry for {client_id}");
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("awareness entry in time")
}

/// The single message of a frame the client sent (it sends one message a frame).
fn only_message(frame: &[u8]) -> Message<'_> {
    let mut messages = MessageReader::new(frame);
    let first = messages.next().expect("one message").expect("valid");
    assert!(messages.next().is_none(), "one message a frame");
    first
}

#[tokio::test]
async fn two_clients_converge() {
    let server = TestServer::start().await;
    let url = server.url("converge");
    let a = Client::connect(&url).await.unwrap();
    a.wait_synced(WAIT).await.unwrap();
    append_text(a.doc(), "t", "hello");

    let b = Client::connect(&url).await.unwrap();
    b.wait_synced(WAIT).await.unwrap();
    b.wait_until(WAIT, |doc| text(doc, "t") == "hello")
        .await
        .unwrap();

    append_text(b.doc(), "t", " world");
    a.wait_until(WAIT, |doc| text(doc, "t") == "hello world")
        .await
        .unwrap();
    assert_eq!(text(b.doc(), "t"), "hello world");
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn edits_made_before_sync_reach_the_room() {
    let server = TestServer::start().await;
    let url = server.url("early");
    let a = Client::connect(&url).await.unwrap();
    // This runtime has one thread and nothing has yielded since `connect` returned: the
    // connection task has not read the node's step 1 or step 2 yet.
    append_text(a.doc(), "t", "early");
    let b = Client::connect(&url).await.unwrap();
    b.wait_until(WAIT, |doc| text(doc, "t") == "early")
        .await
        .unwrap();
    a.wait_synced(WAIT).await.unwrap();
    assert_eq!(text(a.doc(), "t"), "early");
}

#[tokio::test]
async fn awareness_reaches_peers_and_null_removes_it() {
    let server = server_without_expiry().await;
    let url = server.url("presence");
    let a = Client::connect_with(
        &url,
        ClientOptions {
            client_id: Some(11),
            initial_awareness: Some(json!({"name": "a"})),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let b = Client::connect_with(
        &url,
        ClientOptions {
            client_id: Some(22),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(a.client_id(), 11);
    b.wait_awareness(WAIT, |m| m.get(&11) == Some(&json!({"name": "a"})))
        .await
        .unwrap();

    b.set_awareness(json!({"name": "b"}));
    a.wait_awareness(WAIT, |m| m.get(&22) == Some(&json!({"name": "b"})))
        .await
        .unwrap();
    assert_eq!(
        b.awareness().get(&22),
        Some(&json!({"name": "b"})),
        "own state is listed"
    );

    a.clear_awareness();
    b.wait_awareness(WAIT, |m| !m.contains_key(&11))
        .await
        .unwrap();
    assert!(!a.awareness().contains_key(&11));
    // Removed by a's null, not by a leaving: a is still connected and still hears b.
    assert_eq!(a.close_info(), None);
    b.set_awareness(json!({"name": "b2"}));
    a.wait_awareness(WAIT, |m| m.get(&22) == Some(&json!({"name": "b2"})))
        .await
        .unwrap();
}

#[tokio::test]
async fn close_sends_null_awareness_and_ends_with_1000() {
    let server = server_without_expiry().await;
    let mut tap = Tap::to(&server).await;
    let a = Client::connect_with(
        &tap.url("leave"),
        ClientOptions {
            client_id: Some(1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    a.set_awareness(json!("here"));

    // The node attributes a state to the connection that last announced it (a client that
    // reconnects keeps its id), and when a connection ends it nulls only the states attributed to
    // it. A raw peer announces id 1 with a newer clock, so a's connection ending alone would
    // leave id 1 in the room: only a null from a itself removes it.
    let mut peer = raw(&server.url("leave")).await;
    assert_eq!(next_entry_for(&mut peer, 1).await, (1, "\"here\"".into()));
    announce(&mut peer, 1, 2, "\"taken\"").await;
    assert_eq!(next_entry_for(&mut peer, 1).await, (2, "\"taken\"".into()));
    a.wait_awareness(WAIT, |m| m.get(&1) == Some(&json!("taken")))
        .await
        .unwrap();

    let watcher = a.clone();
    a.close().await.unwrap();
    let info = watcher.close_info().expect("closed");
    assert_eq!((info.code, info.origin), (1000, CloseOrigin::Client));

    // The peer hears, through the node, that id 1 left, with a clock past the one it set.
    assert_eq!(next_entry_for(&mut peer, 1).await, (3, "null".into()));

    // On the wire: the null state, then the close frame with 1000.
    let (frames, code) = tap.until_close().await;
    let last = frames.last().expect("frames before the close");
    let Message::Awareness(payload) = only_message(last) else {
        panic!("the last frame before the close is not awareness: {last:?}");
    };
    let entries: Vec<(u64, u64, String)> = AwarenessUpdate::decode(payload)
        .unwrap()
        .entries
        .iter()
        .map(|e| (e.client_id, e.clock, e.state.to_owned()))
        .collect();
    assert_eq!(entries, vec![(1, 3, "null".to_owned())]);
    assert_eq!(code, Some(1000));
}

#[tokio::test]
async fn server_close_code_and_reason_are_reported() {
    let mut server = TestServer::start().await;
    let client = Client::connect(&server.url("restart")).await.unwrap();
    client.wait_synced(WAIT).await.unwrap();

    // A graceful shutdown closes every connection with 1012 and a reason.
    server.shutdown().await;
    let info = client.wait_closed(WAIT).await.unwrap();
    assert_eq!(info.code, 1012);
    assert_eq!(info.reason, "server restarting");
    assert_eq!(info.origin, CloseOrigin::Server);
    assert!(info.is_reconnectable());
    match client
        .wait_until(WAIT, |doc| text(doc, "t") == "never")
        .await
    {
        Err(ClientError::Closed(closed)) => assert_eq!(closed, info),
        other => panic!("expected Closed, got {other:?}"),
    }
}

#[tokio::test]
async fn server_step1_is_answered_with_our_state() {
    let server = TestServer::start().await;
    let mut tap = Tap::to(&server).await;
    let client = Client::connect(&tap.url("answer")).await.unwrap();
    // Made before the connection task reads the node's step 1 (one thread, nothing has yielded
    // since `connect` returned). The node sent that step 1 when we joined, with the state vector
    // of an empty room, so the step 2 answering it must hold the edit.
    append_text(client.doc(), "t", "mine");

    // Acknowledgements are on by default: the request comes first.
    assert_eq!(
        tap.next().await,
        Sent::Binary(Message::AckRequest.to_frame())
    );
    assert_eq!(tap.next().await, Sent::Binary(handshake_step1()));
    let step2 = loop {
        let Sent::Binary(frame) = tap.next().await else {
            panic!("the client closed without answering the node's step 1");
        };
        if let Message::Sync(SyncMessage::Step2(update)) = only_message(&frame) {
            break update.to_vec();
        }
    };
    let doc = Doc::new();
    doc.transact_mut()
        .apply_update(Update::decode_v1(&step2).unwrap())
        .unwrap();
    assert_eq!(text(&doc, "t"), "mine");
    client.wait_synced(WAIT).await.unwrap();
}

/// The step 1 a fresh client opens with: an empty state vector.
fn handshake_step1() -> Vec<u8> {
    use yrs::updates::encoder::Encode;
    let sv = yrs::StateVector::default().encode_v1();
    Message::Sync(SyncMessage::Step1(&sv)).to_frame()
}

#[tokio::test]
async fn full_outbox_fails_the_client_instead_of_dropping_an_update() {
    let server = TestServer::start().await;
    let mut tap = Tap::to(&server).await;
    let client = Client::connect_with(
        &tap.url("outbox"),
        ClientOptions {
            outbox_capacity: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // A current-thread runtime: the connection task cannot drain the outbox between these edits.
    append_text(client.doc(), "t", "a");
    append_text(client.doc(), "t", "b");
    let info = client.wait_closed(WAIT).await.unwrap();
    assert_eq!((info.code, info.origin), (1011, CloseOrigin::Client));
    assert!(matches!(
        client
            .wait_until(WAIT, |doc| text(doc, "t") == "never")
            .await,
        Err(ClientError::Failed(Failure::OutboxFull { capacity: 1 }))
    ));
    let (_, code) = tap.until_close().await;
    assert_eq!(code, Some(1011), "the node was told why");
}

#[tokio::test]
async fn dropping_the_last_handle_closes_the_connection() {
    let server = server_without_expiry().await;
    let mut tap = Tap::to(&server).await;
    let a = Client::connect_with(
        &tap.url("drop"),
        ClientOptions {
            client_id: Some(7),
            initial_awareness: Some(json!("a")),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let b = Client::connect(&server.url("drop")).await.unwrap();
    b.wait_awareness(WAIT, |m| m.get(&7) == Some(&json!("a")))
        .await
        .unwrap();

    // One handle of two dropped: still connected.
    let clone = a.clone();
    drop(a);
    clone.set_awareness(json!("a2"));
    b.wait_awareness(WAIT, |m| m.get(&7) == Some(&json!("a2")))
        .await
        .unwrap();

    // The last one dropped: the node sees the connection end and nulls 7 for the others (its own
    // expiry is off, and dropping sends no null state).
    drop(clone);
    b.wait_awareness(WAIT, |m| !m.contains_key(&7))
        .await
        .unwrap();
    let (_, code) = tap.until_close().await;
    assert_eq!(code, Some(1000));
}

#[tokio::test]
async fn own_state_is_renewed_and_silent_peers_expire() {
    let server = server_without_expiry().await;
    let url = server.url("renewal");
    // A raw peer announces client 5 once, then stays connected and silent.
    let mut peer = raw(&url).await;
    announce(&mut peer, 5, 1, "\"peer\"").await;
    assert_eq!(next_entry_for(&mut peer, 5).await, (1, "\"peer\"".into()));

    let started = Instant::now();
    let client = Client::connect_with(
        &url,
        ClientOptions {
            client_id: Some(3),
            initial_awareness: Some(json!("me")),
            // Real time, scaled down from y-protocols' 30 s (renewal at half, checks every tenth).
            awareness_timeout: Duration::from_millis(600),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    client
        .wait_awareness(WAIT, |m| m.contains_key(&5))
        .await
        .unwrap();

    // The node relays our state to the room: the handshake's, then a renewal with a bumped clock.
    assert_eq!(
        next_entry_for(&mut peer, 3).await,
        (1, "\"me\"".into()),
        "handshake awareness"
    );
    assert_eq!(
        next_entry_for(&mut peer, 3).await,
        (2, "\"me\"".into()),
        "renewed with a bumped clock"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "not before half the timeout"
    );

    client
        .wait_awareness(WAIT, |m| !m.contains_key(&5))
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "not before the timeout"
    );
    assert!(
        client.awareness().contains_key(&3),
        "our own state never expires"
    );

    // The client expired 5 on its own: the node still holds it (its expiry is off and the peer is
    // still connected), so a newcomer gets it.
    let late = Client::connect(&url).await.unwrap();
    late.wait_awareness(WAIT, |m| m.get(&5) == Some(&json!("peer")))
        .await
        .unwrap();
}

#[tokio::test]
async fn renewals_keep_our_state_alive_on_the_node() {
    let timeout = Duration::from_millis(1500);
    let server = TestServer::start_with(|c| {
        c.rooms.awareness_timeout = timeout;
        c.rooms.tick = Duration::from_millis(50);
    })
    .await;
    let url = server.url("alive");
    let mut peer = raw(&url).await;
    let client = Client::connect_with(
        &url,
        ClientOptions {
            client_id: Some(9),
            initial_awareness: Some(json!("on")),
            awareness_timeout: timeout,
            ..Default::default()
        },
    )
    .await
    .unwrap();

    // Three of the node's timeouts: every entry the room hears for 9 is a renewal, never the
    // node's null.
    let until = Instant::now() + timeout * 3;
    let mut clocks = Vec::new();
    while Instant::now() < until {
        let (clock, state) = next_entry_for(&mut peer, 9).await;
        assert_eq!(state, "\"on\"", "the node expired a renewed state");
        clocks.push(clock);
    }
    assert!(clocks.len() >= 4, "renewed every half timeout: {clocks:?}");
    assert!(clocks.windows(2).all(|w| w[1] > w[0]), "{clocks:?}");
    client.close().await.unwrap();
}
