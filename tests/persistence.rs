//! Persistence through a real node: restarts, graceful shutdown, unloading and compaction.

mod common;

use std::time::Duration;

use common::{append_text, text, TestServer, WAIT};
use tandem::ids::RoomId;
use tandem_client::Client;
use tandem_protocol::CloseCode;

#[tokio::test]
async fn restart_restores_every_room() {
    let mut server = TestServer::start().await;
    for room in ["one", "two/nested", "three"] {
        let c = Client::connect(&server.url(room)).await.unwrap();
        c.wait_synced(WAIT).await.unwrap();
        append_text(c.doc(), "t", &format!("content of {room}"));
        let witness = Client::connect(&server.url(room)).await.unwrap();
        witness
            .wait_until(WAIT, |d| text(d, "t") == format!("content of {room}"))
            .await
            .unwrap();
    }
    server.restart().await;
    for room in ["one", "two/nested", "three"] {
        let c = Client::connect(&server.url(room)).await.unwrap();
        c.wait_synced(WAIT).await.unwrap();
        assert_eq!(text(c.doc(), "t"), format!("content of {room}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_loses_nothing_and_says_restarting() {
    let mut server = TestServer::start().await;
    let url = server.url("graceful");
    let writers: Vec<Client> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            let c = Client::connect(&url).await.unwrap();
            c.wait_synced(WAIT).await.unwrap();
            v.push(c);
        }
        v
    };
    let observer = Client::connect(&url).await.unwrap();
    observer.wait_synced(WAIT).await.unwrap();
    for round in 0..50 {
        for (i, w) in writers.iter().enumerate() {
            append_text(w.doc(), "t", &format!("<{i}.{round}>"));
        }
    }
    // Everything the observer has seen was applied by the server; shutdown must store it all.
    let expected: usize = (0..4)
        .flat_map(|i| (0..50).map(move |r| format!("<{i}.{r}>").len()))
        .sum();
    observer
        .wait_until(WAIT, |d| text(d, "t").len() == expected)
        .await
        .unwrap();
    let seen = text(observer.doc(), "t");

    server.shutdown().await;
    let info = observer.wait_closed(WAIT).await.unwrap();
    assert_eq!(info.code, CloseCode::Restarting.code());

    server.restart().await;
    let c = Client::connect(&server.url("graceful")).await.unwrap();
    c.wait_synced(WAIT).await.unwrap();
    assert_eq!(text(c.doc(), "t"), seen);
}

#[tokio::test]
async fn idle_rooms_unload_after_the_grace_and_reload_from_the_store() {
    let server = TestServer::start_with(|c| {
        c.rooms.idle_grace = Duration::from_millis(300);
        c.rooms.tick = Duration::from_millis(50);
    })
    .await;
    let room = RoomId::new("idle").unwrap();
    let c = Client::connect(&server.url("idle")).await.unwrap();
    c.wait_synced(WAIT).await.unwrap();
    append_text(c.doc(), "t", "kept");
    let w = Client::connect(&server.url("idle")).await.unwrap();
    w.wait_until(WAIT, |d| text(d, "t") == "kept")
        .await
        .unwrap();
    assert!(server.running().hub().is_loaded(&room));
    c.close().await.unwrap();
    w.close().await.unwrap();
    tokio::time::timeout(WAIT, async {
        while server.running().hub().is_loaded(&room) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("room unloaded");
    // Unloading folded the log into a snapshot.
    let stored = server.open_store().await.load(&room).await.unwrap();
    assert!(stored.snapshot.is_some());
    assert!(stored.updates.is_empty());
    let again = Client::connect(&server.url("idle")).await.unwrap();
    again.wait_synced(WAIT).await.unwrap();
    assert_eq!(text(again.doc(), "t"), "kept");
}

#[tokio::test]
async fn long_logs_are_compacted_while_the_room_is_busy() {
    let server = TestServer::start_with(|c| {
        c.rooms.compaction.max_updates = 20;
        c.rooms.tick = Duration::from_millis(50);
    })
    .await;
    let room = RoomId::new("busy").unwrap();
    let c = Client::connect(&server.url("busy")).await.unwrap();
    c.wait_synced(WAIT).await.unwrap();
    let store = server.open_store().await;
    for i in 0..100 {
        append_text(c.doc(), "t", &format!("{i};"));
    }
    let want = text(c.doc(), "t");
    tokio::time::timeout(WAIT, async {
        loop {
            let s = store.load(&room).await.unwrap();
            if s.snapshot.is_some() && s.updates.len() < 20 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("log compacted");
    // The client stays connected; a new joiner (snapshot + tail in memory) sees everything.
    let other = Client::connect(&server.url("busy")).await.unwrap();
    other
        .wait_until(WAIT, |d| text(d, "t") == want)
        .await
        .unwrap();
}
