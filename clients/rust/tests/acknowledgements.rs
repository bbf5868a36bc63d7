//! Storage acknowledgements (tandem's message type 100) against a scripted server that the test
//! drives step by step: what the client puts on the wire, how it counts its update messages, and
//! what it makes of acknowledgements, including ones the real server never sends (more than was
//! sent, a request from the server). What the real server acknowledges, and when, is tested in
//! the workspace's `tests/acks.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tandem_client::{Client, ClientError, ClientOptions, CloseOrigin, Failure};
use tandem_protocol::{Message, MessageReader, SyncMessage};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use yrs::{Text, Transact};

const WAIT: Duration = Duration::from_secs(5);

/// Long enough for a frame to cross the loopback and be handled; used to show that a wait does
/// not end early.
const SHORT: Duration = Duration::from_millis(300);

/// The step 1 of an empty document.
const EMPTY_STEP1: [u8; 4] = [0x00, 0x00, 0x01, 0x00];

/// What the test tells the scripted server to do.
enum Cmd {
    Send(Vec<u8>),
    Close(u16),
}

/// A server that accepts one connection, reports every frame the client sends and sends what the
/// test tells it to.
struct Puppet {
    addr: SocketAddr,
    /// Binary frames from the client; a close frame arrives as its code, `None` when it had none.
    from_client: mpsc::UnboundedReceiver<Result<Vec<u8>, Option<u16>>>,
    to_client: mpsc::UnboundedSender<Cmd>,
}

impl Puppet {
    async fn start() -> Puppet {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (report, from_client) = mpsc::unbounded_channel();
        let (to_client, mut cmds) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            loop {
                tokio::select! {
                    msg = ws.next() => match msg {
                        Some(Ok(WsMessage::Binary(frame))) => {
                            let _ = report.send(Ok(frame.to_vec()));
                        }
                        Some(Ok(WsMessage::Close(frame))) => {
                            let _ = report.send(Err(frame.map(|f| u16::from(f.code))));
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break,
                    },
                    cmd = cmds.recv() => match cmd {
                        Some(Cmd::Send(frame)) => {
                            ws.send(WsMessage::Binary(Bytes::from(frame))).await.unwrap();
                        }
                        Some(Cmd::Close(code)) => {
                            let frame = CloseFrame {
                                code: WsCloseCode::from(code),
                                reason: "scripted".into(),
                            };
                            let _ = ws.close(Some(frame)).await;
                        }
                        None => break,
                    },
                }
            }
        });
        Puppet {
            addr,
            from_client,
            to_client,
        }
    }

    fn url(&self) -> String {
        format!("ws://{}/room", self.addr)
    }

    fn send(&self, msg: Message<'_>) {
        self.to_client.send(Cmd::Send(msg.to_frame())).unwrap();
    }

    /// The next binary frame the client sent.
    async fn next_frame(&mut self) -> Vec<u8> {
        match tokio::time::timeout(WAIT, self.from_client.recv()).await {
            Ok(Some(Ok(frame))) => frame,
            other => panic!("expected a binary frame from the client, got {other:?}"),
        }
    }

    /// Reads frames until one holds a sync step 2 or update; returns its sub-type.
    async fn next_update(&mut self) -> &'static str {
        loop {
            let frame = self.next_frame().await;
            match MessageReader::new(&frame).next().unwrap().unwrap() {
                Message::Sync(SyncMessage::Step2(_)) => return "step2",
                Message::Sync(SyncMessage::Update(_)) => return "update",
                _ => {}
            }
        }
    }

    /// Reads until the client's close frame and returns its code.
    async fn close_code(&mut self) -> Option<u16> {
        loop {
            match tokio::time::timeout(WAIT, self.from_client.recv()).await {
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(code))) => return code,
                other => panic!("expected the client's close frame, got {other:?}"),
            }
        }
    }
}

fn edit(client: &Client, s: &str) {
    let text = client.doc().get_or_insert_text("t");
    let mut txn = client.doc().transact_mut();
    text.insert(&mut txn, 0, s);
}

/// Waits until `cond` holds for the client, polling.
async fn eventually(client: &Client, what: &str, cond: impl Fn(&Client) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond(client) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not in time ({client:?})"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn the_request_is_the_first_frame_and_only_when_asked_for() {
    let mut server = Puppet::start().await;
    let _client = Client::connect(&server.url()).await.unwrap();
    assert_eq!(server.next_frame().await, [0x64, 0x00], "AckRequest first");
    assert_eq!(server.next_frame().await, EMPTY_STEP1, "then our step 1");

    let mut server = Puppet::start().await;
    let quiet = Client::connect_with(
        &server.url(),
        ClientOptions {
            acknowledgements: false,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(server.next_frame().await, EMPTY_STEP1, "no request");
    edit(&quiet, "x");
    assert!(matches!(
        quiet.wait_stored(WAIT).await,
        Err(ClientError::AcknowledgementsOff)
    ));
}

#[tokio::test]
async fn step2_and_updates_are_counted_and_acknowledged_cumulatively() {
    let mut server = Puppet::start().await;
    let client = Client::connect(&server.url()).await.unwrap();
    // The server's step 1 makes the client answer with a step 2: update message 1.
    server.send(Message::Sync(SyncMessage::Step1(&[0])));
    assert_eq!(server.next_update().await, "step2");
    edit(&client, "a");
    assert_eq!(server.next_update().await, "update");
    eventually(&client, "two sent", |c| c.sent_updates() == 2).await;
    assert_eq!(client.stored(), 0);

    // Only the step 2 is stored: the edit is not.
    server.send(Message::Stored(1));
    eventually(&client, "one stored", |c| c.stored() == 1).await;
    assert!(matches!(
        client.wait_stored(SHORT).await,
        Err(ClientError::Timeout(_))
    ));

    server.send(Message::Stored(2));
    client.wait_stored(WAIT).await.unwrap();
    assert_eq!(client.stored(), 2);
    // An older acknowledgement changes nothing.
    server.send(Message::Stored(1));
    edit(&client, "b");
    assert_eq!(server.next_update().await, "update");
    assert_eq!(client.stored(), 2);
    server.send(Message::Stored(3));
    client.wait_stored(WAIT).await.unwrap();
    assert_eq!((client.stored(), client.sent_updates()), (3, 3));
}

#[tokio::test]
async fn wait_stored_covers_edits_still_in_the_outbox() {
    let mut server = Puppet::start().await;
    let client = Client::connect(&server.url()).await.unwrap();
    // A current-thread runtime: nothing has yielded since the edit, so its frame is still in the
    // outbox, not sent, when the wait starts. It must still be waited for.
    edit(&client, "queued");
    assert_eq!(client.sent_updates(), 0, "the edit is not on the wire yet");
    assert!(matches!(
        client.wait_stored(SHORT).await,
        Err(ClientError::Timeout(_))
    ));
    assert_eq!(server.next_update().await, "update");
    server.send(Message::Stored(1));
    client.wait_stored(WAIT).await.unwrap();

    // Nothing new since: resolves at once.
    client.wait_stored(Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn acknowledging_more_than_was_sent_closes_with_1007() {
    let mut server = Puppet::start().await;
    let client = Client::connect(&server.url()).await.unwrap();
    edit(&client, "one");
    assert_eq!(server.next_update().await, "update");
    server.send(Message::Stored(2));
    let info = client.wait_closed(WAIT).await.unwrap();
    assert_eq!((info.code, info.origin), (1007, CloseOrigin::Client));
    assert_eq!(server.close_code().await, Some(1007));
    assert!(matches!(
        client.wait_stored(WAIT).await,
        Err(ClientError::Failed(Failure::InvalidData(_)))
    ));
    assert_eq!(
        client.stored(),
        0,
        "the bogus acknowledgement was not taken"
    );
}

#[tokio::test]
async fn an_acknowledgement_request_from_the_server_closes_with_1007() {
    let mut server = Puppet::start().await;
    let client = Client::connect(&server.url()).await.unwrap();
    server.send(Message::AckRequest);
    assert_eq!(client.wait_closed(WAIT).await.unwrap().code, 1007);
    assert_eq!(server.close_code().await, Some(1007));
}

#[tokio::test]
async fn wait_stored_fails_when_the_connection_closes_first() {
    let mut server = Puppet::start().await;
    let client = Client::connect(&server.url()).await.unwrap();
    edit(&client, "lost?");
    assert_eq!(server.next_update().await, "update");
    server.to_client.send(Cmd::Close(1013)).unwrap();
    match client.wait_stored(WAIT).await {
        Err(ClientError::Closed(info)) => {
            assert_eq!((info.code, info.origin), (1013, CloseOrigin::Server))
        }
        other => panic!("expected Closed, got {other:?}"),
    }
}

#[tokio::test]
async fn a_burst_longer_than_one_write_batch_is_sent_whole() {
    const EDITS: u64 = 600;
    let mut server = Puppet::start().await;
    let client = Client::connect(&server.url()).await.unwrap();
    // Nothing yields in between: every frame is queued before the connection task runs, and it
    // writes them in batches.
    for i in 0..EDITS {
        edit(&client, &i.to_string());
    }
    for _ in 0..EDITS {
        assert_eq!(server.next_update().await, "update");
    }
    eventually(&client, "all counted", |c| c.sent_updates() == EDITS).await;
    server.send(Message::Stored(EDITS));
    client.wait_stored(WAIT).await.unwrap();
}
