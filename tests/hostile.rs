//! Broken and hostile input: only the offender is closed, with a specific code; nothing of it
//! reaches other clients or the store, and the room keeps serving.

mod common;

use std::time::Duration;

use common::{append_text, expect_close, full_state, raw, send_binary, text, TestServer, WAIT};
use futures_util::SinkExt;
use tandem::ids::RoomId;
use tandem::metrics::METRICS;
use tandem_client::Client;
use tandem_protocol::{CloseCode, Message, SyncMessage};
use tokio_tungstenite::tungstenite::Message as Ws;

/// A healthy pair of clients sharing "base" in `room`, the second waiting for the first's edit.
async fn healthy_pair(server: &TestServer, room: &str) -> (Client, Client) {
    let a = Client::connect(&server.url(room)).await.unwrap();
    let b = Client::connect(&server.url(room)).await.unwrap();
    a.wait_synced(WAIT).await.unwrap();
    b.wait_synced(WAIT).await.unwrap();
    append_text(a.doc(), "t", "base");
    b.wait_until(WAIT, |d| text(d, "t") == "base")
        .await
        .unwrap();
    (a, b)
}

/// The room still relays edits and stored data is exactly what the healthy clients wrote.
async fn room_still_serves(server: &TestServer, room: &str, a: &Client, b: &Client) {
    append_text(a.doc(), "t", "+after");
    b.wait_until(WAIT, |d| text(d, "t") == "base+after")
        .await
        .unwrap();
    let late = Client::connect(&server.url(room)).await.unwrap();
    late.wait_synced(WAIT).await.unwrap();
    assert_eq!(text(late.doc(), "t"), "base+after");
}

async fn refused(frame: Vec<u8>, want: CloseCode) {
    let server = TestServer::start().await;
    let (a, b) = healthy_pair(&server, "hostile").await;
    let before = METRICS.closes.get(want);
    let mut bad = raw(&server.url("hostile")).await;
    send_binary(&mut bad, frame).await;
    let (code, reason) = expect_close(&mut bad).await;
    assert_eq!(code, want.code(), "reason: {reason}");
    assert!(!reason.is_empty());
    assert!(METRICS.closes.get(want) > before);
    room_still_serves(&server, "hostile", &a, &b).await;
}

#[tokio::test]
async fn garbage_frame_closes_only_the_sender() {
    refused(
        vec![0xde, 0xad, 0xbe, 0xef, 0x00, 0x13],
        CloseCode::InvalidData,
    )
    .await;
}

#[tokio::test]
async fn truncated_varint_is_invalid_data() {
    refused(vec![0x00, 0x02, 0xff], CloseCode::InvalidData).await;
}

#[tokio::test]
async fn unknown_message_type_is_invalid_data() {
    refused(vec![0x07, 0x00], CloseCode::InvalidData).await;
}

#[tokio::test]
async fn length_prefix_past_the_end_is_invalid_data() {
    refused(
        vec![0x00, 0x02, 0x80, 0x80, 0x04, 0x01],
        CloseCode::InvalidData,
    )
    .await;
}

#[tokio::test]
async fn update_that_does_not_decode_is_invalid_data() {
    let frame = Message::Sync(SyncMessage::Update(&[0xff, 0xff, 0xff, 0x01])).to_frame();
    refused(frame, CloseCode::InvalidData).await;
}

#[tokio::test]
async fn malformed_awareness_is_invalid_data() {
    // One entry whose state is not JSON.
    refused(
        vec![0x01, 0x05, 0x01, 0x07, 0x01, 0x02, b'{', b'x'],
        CloseCode::InvalidData,
    )
    .await;
}

#[tokio::test]
async fn truncated_real_updates_never_reach_others_or_the_store() {
    let server = TestServer::start().await;
    let (a, b) = healthy_pair(&server, "truncated").await;
    let source = yrs::Doc::with_client_id(99);
    append_text(&source, "t", "EVIL CONTENT THAT MUST NOT LAND");
    let real = full_state(&source);
    for cut in [1, real.len() / 3, real.len() / 2, real.len() - 1] {
        let mut bad = raw(&server.url("truncated")).await;
        let frame = Message::Sync(SyncMessage::Update(&real[..cut])).to_frame();
        send_binary(&mut bad, frame).await;
        // Either refused with 1007, or (a valid prefix) accepted: never a crash.
        let (code, _) = expect_close_or_alive(&mut bad).await;
        assert!(code.is_none() || code == Some(1007), "cut {cut}: {code:?}");
    }
    room_still_serves(&server, "truncated", &a, &b).await;
    let stored = server
        .open_store()
        .await
        .load(&RoomId::new("truncated").unwrap())
        .await
        .unwrap();
    let doc = yrs::Doc::new();
    for (_, u) in stored.updates {
        use yrs::updates::decoder::Decode;
        use yrs::Transact;
        doc.transact_mut()
            .apply_update(yrs::Update::decode_v1(&u).unwrap())
            .unwrap();
    }
    assert!(
        !text(&doc, "t").contains("EVIL"),
        "a truncated update reached the store"
    );
}

/// Waits briefly for a close frame; `None` if the socket is still open and quiet.
async fn expect_close_or_alive(ws: &mut common::Raw) -> (Option<u16>, String) {
    use futures_util::StreamExt;
    let deadline = tokio::time::sleep(Duration::from_millis(500));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => return (None, String::new()),
            msg = ws.next() => match msg {
                Some(Ok(Ws::Close(Some(f)))) => return (Some(u16::from(f.code)), f.reason.to_string()),
                Some(Ok(_)) => continue,
                _ => return (None, String::new()),
            }
        }
    }
}

#[tokio::test]
async fn text_frames_are_invalid_data() {
    let server = TestServer::start().await;
    let (a, b) = healthy_pair(&server, "text").await;
    let mut bad = raw(&server.url("text")).await;
    bad.send(Ws::text("hello")).await.unwrap();
    let (code, _) = expect_close(&mut bad).await;
    assert_eq!(code, CloseCode::InvalidData.code());
    room_still_serves(&server, "text", &a, &b).await;
}

#[tokio::test]
async fn oversize_message_is_too_big() {
    let server = TestServer::start_with(|c| {
        c.session.max_message_bytes = 64 << 10;
        c.session.outbox_bytes = 1 << 20;
    })
    .await;
    let (a, b) = healthy_pair(&server, "big").await;
    let before = METRICS.closes.get(CloseCode::TooBig);
    let mut bad = raw(&server.url("big")).await;
    let _ = bad.send(Ws::binary(vec![0u8; 200 << 10])).await;
    let (code, _) = expect_close(&mut bad).await;
    assert_eq!(code, CloseCode::TooBig.code());
    assert!(METRICS.closes.get(CloseCode::TooBig) > before);
    room_still_serves(&server, "big", &a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_while_others_keep_receiving() {
    let server = TestServer::start_with(|c| {
        c.session.outbox_bytes = 256 << 10;
        c.session.max_message_bytes = 256 << 10;
        // The writer goes as fast as it can, and the sleeper must be closed for not reading,
        // not for its silence or the writer for its rate.
        c.session.rate_messages = 0;
        c.session.rate_bytes = 0;
        c.session.first_message_timeout = Duration::from_secs(3600);
    })
    .await;
    let url = server.url("slow");
    let writer = Client::connect(&url).await.unwrap();
    let reader = Client::connect(&url).await.unwrap();
    writer.wait_synced(WAIT).await.unwrap();
    reader.wait_synced(WAIT).await.unwrap();
    // Connects and then never reads a byte.
    let sleeper = raw(&url).await;
    let before = METRICS.closes.get(CloseCode::TryAgainLater);
    let chunk = "x".repeat(16 << 10);
    let mut written = 0;
    // Enough to fill the kernel's socket buffers and then the outbox budget.
    for _ in 0..2000 {
        append_text(writer.doc(), "t", &chunk);
        written += chunk.len();
        if METRICS.closes.get(CloseCode::TryAgainLater) > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        METRICS.closes.get(CloseCode::TryAgainLater) > before,
        "slow reader never closed"
    );
    reader
        .wait_until(WAIT, |d| text(d, "t").len() == written)
        .await
        .unwrap();
    append_text(writer.doc(), "t", "!");
    reader
        .wait_until(WAIT, |d| text(d, "t").ends_with('!'))
        .await
        .unwrap();
    drop(sleeper);
}

/// An update the room refuses takes its sender out of the room at once: the messages after it in
/// the same frame (already on their way to the room) are not applied either.
#[tokio::test]
async fn messages_after_a_refused_update_in_the_same_frame_are_not_applied() {
    use yrs::{ReadTxn, Transact};
    // Client 66 typed "b" after client 65's "a", which the room has never seen: refused.
    let a65 = yrs::Doc::with_client_id(65);
    append_text(&a65, "t", "a");
    let b66 = yrs::Doc::with_client_id(66);
    {
        use yrs::updates::decoder::Decode;
        b66.transact_mut()
            .apply_update(yrs::Update::decode_v1(&full_state(&a65)).unwrap())
            .unwrap();
    }
    let before = b66.transact().state_vector();
    append_text(&b66, "t", "b");
    let only_b = b66.transact().encode_diff_v1(&before);
    // Client 77's "x" on its own would apply.
    let x77 = yrs::Doc::with_client_id(77);
    append_text(&x77, "t", "x");
    let mut frame = Message::Sync(SyncMessage::Update(&only_b)).to_frame();
    frame.extend(Message::Sync(SyncMessage::Update(&full_state(&x77))).to_frame());

    let server = TestServer::start().await;
    let (a, b) = healthy_pair(&server, "same-frame").await;
    let mut bad = raw(&server.url("same-frame")).await;
    send_binary(&mut bad, frame).await;
    let (code, reason) = expect_close(&mut bad).await;
    assert_eq!(code, CloseCode::InvalidData.code(), "reason: {reason}");
    // Neither "b" nor "x" is in the room: everyone, newcomers too, holds exactly the healthy
    // clients' text.
    room_still_serves(&server, "same-frame", &a, &b).await;
}
