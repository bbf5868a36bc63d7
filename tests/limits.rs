//! Limits: each closes only the connection that breaks it, with its code and reason, counts it,
//! and leaves the other clients and the stored data alone.

mod common;

use std::time::Duration;

use futures_util::SinkExt;

use common::{append_text, expect_close, raw, send_binary, text, TestServer, WAIT};
use tandem::config::Config;
use tandem::metrics::{Refused, METRICS};
use tandem_client::Client;
use tandem_protocol::{CloseCode, Message};

/// A node with `tweak`, and a client that wrote "kept" to `room` and saw it stored.
async fn node_with_data(room: &str, tweak: impl FnOnce(&mut Config)) -> (TestServer, Client) {
    let server = TestServer::start_with(tweak).await;
    let writer = Client::connect(&server.url(room)).await.unwrap();
    writer.wait_synced(WAIT).await.unwrap();
    append_text(writer.doc(), "t", "kept");
    writer.wait_stored(WAIT).await.unwrap();
    (server, writer)
}

/// A fresh client of `room` sees exactly `want`, and the writer can still write.
async fn still_serves(server: &TestServer, room: &str, writer: &Client, want: &str) {
    let reader = Client::connect(&server.url(room)).await.unwrap();
    reader.wait_synced(WAIT).await.unwrap();
    assert_eq!(text(reader.doc(), "t"), want);
    append_text(writer.doc(), "t", "+alive");
    let expected = format!("{want}+alive");
    reader
        .wait_until(WAIT, |d| text(d, "t") == expected)
        .await
        .unwrap();
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !ok() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_flood_past_the_rate_limit_is_closed_with_4429() {
    let (server, writer) = node_with_data("flood", |c| c.session.rate_messages = 50).await;
    let before = METRICS.refused.get(Refused::RateLimit);
    let mut flood = raw(&server.url("flood")).await;
    let query = Message::QueryAwareness.to_frame();
    // Burst is twice the rate: 100 pass at once, the rest must not.
    let mut refused = None;
    for _ in 0..1000 {
        if flood
            .send(tokio_tungstenite::tungstenite::Message::binary(
                query.clone(),
            ))
            .await
            .is_err()
        {
            break;
        }
        if METRICS.refused.get(Refused::RateLimit) > before {
            refused = Some(());
            break;
        }
    }
    let (code, reason) = expect_close(&mut flood).await;
    assert_eq!(code, CloseCode::RateLimited.code(), "{reason}");
    assert!(reason.contains("messages per second"), "{reason}");
    assert!(refused.is_some() || METRICS.refused.get(Refused::RateLimit) > before);
    still_serves(&server, "flood", &writer, "kept").await;
}

#[tokio::test]
async fn a_byte_flood_past_the_rate_limit_is_closed_with_4429() {
    let (server, writer) = node_with_data("bytes", |c| {
        c.session.rate_bytes = 64 << 10;
        c.session.max_message_bytes = 64 << 10;
    })
    .await;
    let mut flood = raw(&server.url("bytes")).await;
    // Valid awareness messages of ~32 KiB: the third one in a second passes the byte budget.
    let state = format!("{{\"pad\":\"{}\"}}", "x".repeat(32 << 10));
    let mut update = Vec::new();
    tandem_protocol::lib0::write_var_uint(&mut update, 1);
    tandem_protocol::lib0::write_var_uint(&mut update, 7);
    tandem_protocol::lib0::write_var_uint(&mut update, 1);
    tandem_protocol::lib0::write_var_string(&mut update, &state);
    let frame = Message::Awareness(&update).to_frame();
    for _ in 0..8 {
        let _ = flood
            .send(tokio_tungstenite::tungstenite::Message::binary(
                frame.clone(),
            ))
            .await;
    }
    let (code, reason) = expect_close(&mut flood).await;
    assert_eq!(code, CloseCode::RateLimited.code(), "{reason}");
    assert!(reason.contains("bytes per second"), "{reason}");
    still_serves(&server, "bytes", &writer, "kept").await;
}

#[tokio::test]
async fn sockets_that_never_send_are_closed_with_1008() {
    let (server, writer) = node_with_data("silent", |c| {
        c.session.first_message_timeout = Duration::from_millis(300);
    })
    .await;
    let before = METRICS.refused.get(Refused::FirstMessageTimeout);
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(raw(&server.url("silent")).await);
    }
    for ws in &mut silent {
        let (code, reason) = expect_close(ws).await;
        assert_eq!(code, CloseCode::Policy.code(), "{reason}");
        assert!(reason.contains("no valid message"), "{reason}");
    }
    assert_eq!(
        METRICS.refused.get(Refused::FirstMessageTimeout),
        before + 20
    );
    // The writer's connection, long past the deadline, was never affected.
    still_serves(&server, "silent", &writer, "kept").await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_with_1001() {
    let server = TestServer::start_with(|c| {
        c.session.idle_timeout = Some(Duration::from_millis(400));
    })
    .await;
    let mut idle = raw(&server.url("idle")).await;
    send_binary(&mut idle, Message::QueryAwareness.to_frame()).await;
    let (code, reason) = expect_close(&mut idle).await;
    assert_eq!(code, CloseCode::GoingAway.code(), "{reason}");
    assert!(reason.contains("idle"), "{reason}");
    assert_eq!(METRICS.refused.get(Refused::IdleTimeout), 1);
}

#[tokio::test]
async fn a_full_room_refuses_the_next_connection_with_1013() {
    let (server, writer) = node_with_data("full", |c| c.rooms.max_peers = 2).await;
    let second = Client::connect(&server.url("full")).await.unwrap();
    second.wait_synced(WAIT).await.unwrap();
    let mut third = raw(&server.url("full")).await;
    let (code, reason) = expect_close(&mut third).await;
    assert_eq!(code, CloseCode::TryAgainLater.code(), "{reason}");
    assert_eq!(reason, "room is full");
    assert_eq!(METRICS.refused.get(Refused::RoomFull), 1);
    // Another room is not affected, and once someone leaves there is room again.
    let other = Client::connect(&server.url("other")).await.unwrap();
    other.wait_synced(WAIT).await.unwrap();
    second.close().await.unwrap();
    let mut again = None;
    for _ in 0..50 {
        let c = Client::connect(&server.url("full")).await.unwrap();
        if c.wait_synced(Duration::from_millis(500)).await.is_ok() {
            again = Some(c);
            break;
        }
    }
    let again = again.expect("a place freed up");
    assert_eq!(text(again.doc(), "t"), "kept");
    drop(writer);
}

#[tokio::test]
async fn too_many_connections_from_one_address_are_refused_with_1013() {
    let server = TestServer::start_with(|c| c.session.max_connections_per_address = 2).await;
    let a = Client::connect(&server.url("ip")).await.unwrap();
    a.wait_synced(WAIT).await.unwrap();
    let b = Client::connect(&server.url("ip2")).await.unwrap();
    b.wait_synced(WAIT).await.unwrap();
    let mut c = raw(&server.url("ip3")).await;
    let (code, reason) = expect_close(&mut c).await;
    assert_eq!(code, CloseCode::TryAgainLater.code(), "{reason}");
    assert!(reason.contains("this address"), "{reason}");
    assert_eq!(METRICS.refused.get(Refused::AddressLimit), 1);
    // Closing one gives its place back.
    b.close().await.unwrap();
    wait_for("a place for the address", || {
        METRICS.connections_open.get() < 2
    })
    .await;
    let d = Client::connect(&server.url("ip3")).await.unwrap();
    d.wait_synced(WAIT).await.unwrap();
    append_text(a.doc(), "t", "still here");
    a.wait_stored(WAIT).await.unwrap();
}

#[tokio::test]
async fn a_node_at_its_room_limit_refuses_new_rooms_with_1013() {
    let (server, writer) = node_with_data("only", |c| c.rooms.max_rooms = 1).await;
    let mut other = raw(&server.url("another")).await;
    let (code, reason) = expect_close(&mut other).await;
    assert_eq!(code, CloseCode::TryAgainLater.code(), "{reason}");
    assert!(reason.contains("too many rooms"), "{reason}");
    assert_eq!(METRICS.refused.get(Refused::TooManyRooms), 1);
    // The loaded room still takes newcomers.
    still_serves(&server, "only", &writer, "kept").await;
}

#[tokio::test]
async fn a_write_past_the_document_limit_is_refused_and_nothing_is_lost() {
    let (mut server, writer) = node_with_data("big", |c| c.rooms.max_document_bytes = 4096).await;
    let reader = Client::connect(&server.url("big")).await.unwrap();
    reader.wait_synced(WAIT).await.unwrap();

    let hog = Client::connect(&server.url("big")).await.unwrap();
    hog.wait_synced(WAIT).await.unwrap();
    append_text(hog.doc(), "t", &"x".repeat(8192));
    let closed = hog.wait_closed(WAIT).await.unwrap();
    assert_eq!(closed.code, CloseCode::TooBig.code(), "{closed:?}");
    assert_eq!(METRICS.refused.get(Refused::DocumentTooLarge), 1);

    // Small writes still fit, the others never saw the refused one, and the store has
    // exactly what was accepted.
    append_text(writer.doc(), "t", "+small");
    writer.wait_stored(WAIT).await.unwrap();
    reader
        .wait_until(WAIT, |d| text(d, "t") == "kept+small")
        .await
        .unwrap();
    drop((writer, reader, hog));
    server.restart().await;
    let after = Client::connect(&server.url("big")).await.unwrap();
    after.wait_synced(WAIT).await.unwrap();
    assert_eq!(text(after.doc(), "t"), "kept+small");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_writing_past_the_rate_limit_is_closed_and_told_why() {
    let server = TestServer::start_with(|c| c.session.rate_messages = 50).await;
    let bot = Client::connect(&server.url("fast")).await.unwrap();
    bot.wait_synced(WAIT).await.unwrap();
    let edits = async {
        for i in 0..3000 {
            append_text(bot.doc(), "t", &format!("{i},"));
            if bot.close_info().is_some() {
                break;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(WAIT, edits)
        .await
        .expect("edits never block");
    let closed = bot.wait_closed(WAIT).await.unwrap();
    assert_eq!(closed.code, CloseCode::RateLimited.code(), "{closed:?}");
}
