//! The client against scripted servers: each test accepts one connection and sends what the real
//! tandem server never sends, to check how the client copes.
//!
//! These are fault injection, not stand-ins for the server. The real server only sends
//! well-formed frames with updates that decode, and one message a frame, so a malformed frame, an
//! undecodable update or several messages in one frame (legal y-websocket, and what other servers
//! may send) can only come from a script. Everything the real server can do is tested against
//! it, in the workspace's `tests/client.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tandem_client::{Client, ClientError, CloseOrigin, Failure};
use tandem_protocol::{Message, SyncMessage};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use yrs::{Doc, GetString, ReadTxn, StateVector, Text, Transact};

const WAIT: Duration = Duration::from_secs(5);

/// A server that accepts one connection and hands its socket to `script`.
async fn scripted<F, Fut>(script: F) -> SocketAddr
where
    F: FnOnce(tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        script(tokio_tungstenite::accept_async(tcp).await.unwrap()).await;
    });
    addr
}

fn text(doc: &Doc) -> String {
    doc.get_or_insert_text("t").get_string(&doc.transact())
}

#[tokio::test]
async fn malformed_server_frame_closes_with_1007() {
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
    let addr = scripted(|mut ws| async move {
        ws.send(WsMessage::Binary(Bytes::from_static(&[0x09, 0x00])))
            .await
            .unwrap();
        while let Some(Ok(msg)) = ws.next().await {
            if let WsMessage::Close(frame) = msg {
                let _ = seen_tx.send(frame.map(|f| u16::from(f.code)));
                break;
            }
        }
    })
    .await;
    let client = Client::connect(&format!("ws://{addr}/r")).await.unwrap();
    let info = client.wait_closed(WAIT).await.unwrap();
    assert_eq!((info.code, info.origin), (1007, CloseOrigin::Client));
    assert_eq!(
        seen_rx.await.unwrap(),
        Some(1007),
        "the server saw our 1007"
    );
    assert!(matches!(
        client.wait_synced(WAIT).await,
        Err(ClientError::Failed(Failure::InvalidData(_)))
    ));
}

#[tokio::test]
async fn undecodable_update_closes_with_1007() {
    let addr = scripted(|mut ws| async move {
        let bad = Message::Sync(SyncMessage::Update(&[0xff, 0xff, 0xff])).to_frame();
        ws.send(WsMessage::Binary(Bytes::from(bad))).await.unwrap();
        while ws.next().await.is_some() {}
    })
    .await;
    let client = Client::connect(&format!("ws://{addr}/r")).await.unwrap();
    assert_eq!(client.wait_closed(WAIT).await.unwrap().code, 1007);
}

#[tokio::test]
async fn several_messages_in_one_frame_are_all_handled() {
    let addr = scripted(|mut ws| async move {
        let source = Doc::with_client_id(99);
        source
            .get_or_insert_text("t")
            .insert(&mut source.transact_mut(), 0, "multi");
        let update = source
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        let mut awareness = Vec::new();
        tandem_protocol::awareness::encode_entries(
            &mut awareness,
            [tandem_protocol::AwarenessEntry {
                client_id: 99,
                clock: 1,
                state: "{\"n\":1}",
            }]
            .into_iter(),
        );
        let mut frame = Message::Sync(SyncMessage::Step2(&update)).to_frame();
        Message::Awareness(&awareness).encode(&mut frame);
        ws.send(WsMessage::Binary(Bytes::from(frame)))
            .await
            .unwrap();
        while ws.next().await.is_some() {}
    })
    .await;
    let client = Client::connect(&format!("ws://{addr}/r")).await.unwrap();
    client.wait_synced(WAIT).await.unwrap();
    assert_eq!(text(client.doc()), "multi");
    client
        .wait_awareness(WAIT, |m| m.get(&99) == Some(&json!({"n": 1})))
        .await
        .unwrap();
}
