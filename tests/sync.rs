//! Document sync through a real node with the Rust client: convergence, late joiners, framing.

mod common;

use common::{append_text, raw, send_binary, text, TestServer, WAIT};
use futures_util::StreamExt;
use tandem_client::Client;
use tandem_protocol::{Message as YMessage, MessageReader, SyncMessage};
use tokio_tungstenite::tungstenite::Message;
use yrs::updates::decoder::Decode;
use yrs::{Map, Transact};

/// `n` clients connected to `url`, one after another, each synced before the next connects.
async fn synced_clients(url: &str, n: usize) -> Vec<Client> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let c = Client::connect(url).await.unwrap();
        c.wait_synced(WAIT).await.unwrap();
        clients.push(c);
    }
    clients
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_clients_edit_concurrently_and_converge() {
    let server = TestServer::start().await;
    let url = server.url("converge");
    let clients = synced_clients(&url, 10).await;
    let edits = 20;
    let mut tasks = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let doc = c.doc().clone();
        tasks.push(tokio::spawn(async move {
            for j in 0..edits {
                append_text(&doc, "t", &format!("[{i}:{j}]"));
                let map = doc.get_or_insert_map("m");
                map.insert(&mut doc.transact_mut(), format!("k{i}"), j as i64);
                tokio::task::yield_now().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let expected_len: usize = (0..10)
        .flat_map(|i| (0..edits).map(move |j| format!("[{i}:{j}]").len()))
        .sum();
    for c in &clients {
        c.wait_until(WAIT, |doc| {
            // The text first: reading it takes its own transaction.
            let text_done = text(doc, "t").len() == expected_len;
            let map = doc.get_or_insert_map("m");
            let txn = doc.transact();
            text_done
                && (0..10).all(|i| {
                    map.get(&txn, &format!("k{i}"))
                        .is_some_and(|v| v.to_string(&txn) == (edits - 1).to_string())
                })
        })
        .await
        .unwrap();
    }
    let reference = text(clients[0].doc(), "t");
    for i in 0..10 {
        for j in 0..edits {
            assert!(
                reference.contains(&format!("[{i}:{j}]")),
                "missing edit {i}:{j}"
            );
        }
    }
    for c in &clients {
        assert_eq!(text(c.doc(), "t"), reference);
        let doc = c.doc();
        let map = doc.get_or_insert_map("m");
        let txn = doc.transact();
        for i in 0..10 {
            let v = map.get(&txn, &format!("k{i}")).expect("map key");
            assert_eq!(v.to_string(&txn), (edits - 1).to_string());
        }
    }
}

/// Past 128 peers a room writes half of each update's frames itself and hands the rest to the
/// connections' tasks: every peer still gets every update, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_peer_of_a_large_room_gets_every_update_in_order() {
    let server = TestServer::start().await;
    let url = server.url("large");
    let clients = synced_clients(&url, 300).await;
    let writer = &clients[0];
    let mut expected = String::new();
    for i in 0..30 {
        let piece = format!("<{i}>");
        append_text(writer.doc(), "t", &piece);
        expected.push_str(&piece);
        tokio::task::yield_now().await;
    }
    for c in &clients {
        c.wait_until(WAIT, |doc| text(doc, "t") == expected)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn late_joiner_gets_the_full_state() {
    let server = TestServer::start().await;
    let url = server.url("late");
    let a = Client::connect(&url).await.unwrap();
    a.wait_synced(WAIT).await.unwrap();
    for i in 0..50 {
        append_text(a.doc(), "t", &format!("{i},"));
    }
    let b = Client::connect(&url).await.unwrap();
    b.wait_synced(WAIT).await.unwrap();
    let want = text(a.doc(), "t");
    b.wait_until(WAIT, |doc| text(doc, "t") == want)
        .await
        .unwrap();
    // A third client joining after everyone left still gets it (from memory or the store).
    a.close().await.unwrap();
    b.close().await.unwrap();
    let c = Client::connect(&url).await.unwrap();
    c.wait_synced(WAIT).await.unwrap();
    assert_eq!(text(c.doc(), "t"), want);
}

#[tokio::test]
async fn room_names_may_contain_slashes_and_rooms_are_isolated() {
    let server = TestServer::start().await;
    let a = Client::connect(&server.url("team/doc-1")).await.unwrap();
    let b = Client::connect(&server.url("team/doc-1")).await.unwrap();
    let other = Client::connect(&server.url("team/doc-2")).await.unwrap();
    for c in [&a, &b, &other] {
        c.wait_synced(WAIT).await.unwrap();
    }
    append_text(a.doc(), "t", "hello");
    b.wait_until(WAIT, |doc| text(doc, "t") == "hello")
        .await
        .unwrap();
    append_text(other.doc(), "t", "elsewhere");
    b.wait_until(WAIT, |doc| text(doc, "t") == "hello")
        .await
        .unwrap();
    a.wait_until(WAIT, |doc| text(doc, "t") == "hello")
        .await
        .unwrap();
    assert_eq!(text(other.doc(), "t"), "elsewhere");
}

#[tokio::test]
async fn server_greets_with_step1_and_answers_step1_with_step2() {
    let server = TestServer::start().await;
    let writer = Client::connect(&server.url("raw-handshake")).await.unwrap();
    writer.wait_synced(WAIT).await.unwrap();
    let witness = Client::connect(&server.url("raw-handshake")).await.unwrap();
    witness.wait_synced(WAIT).await.unwrap();
    append_text(writer.doc(), "t", "abc");
    // Once another client has it, the server has applied it.
    witness
        .wait_until(WAIT, |doc| text(doc, "t") == "abc")
        .await
        .unwrap();

    let mut ws = raw(&server.url("raw-handshake")).await;
    // First frame: the server's step 1.
    let first = next_binary(&mut ws).await;
    let msg = MessageReader::new(&first).next().unwrap().unwrap();
    assert!(
        matches!(msg, YMessage::Sync(SyncMessage::Step1(_))),
        "got {msg:?}"
    );
    // Empty-document step 1 (`00 00 01 00`) and query-awareness in ONE frame: both answered.
    send_binary(&mut ws, vec![0, 0, 1, 0, 3]).await;
    let mut got_step2 = None;
    for _ in 0..5 {
        let frame = next_binary(&mut ws).await;
        for m in MessageReader::new(&frame) {
            if let YMessage::Sync(SyncMessage::Step2(u)) = m.unwrap() {
                got_step2 = Some(u.to_vec());
            }
        }
        if got_step2.is_some() {
            break;
        }
    }
    let update = got_step2.expect("a step 2 answer");
    let doc = yrs::Doc::new();
    doc.transact_mut()
        .apply_update(yrs::Update::decode_v1(&update).unwrap())
        .unwrap();
    assert_eq!(text(&doc, "t"), "abc");
}

async fn next_binary(ws: &mut common::Raw) -> Vec<u8> {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("frame in time")
            .expect("open")
            .unwrap();
        if let Message::Binary(b) = msg {
            return b.to_vec();
        }
    }
}

/// The room encodes the whole document once for newcomers that hold nothing, and encodes it
/// again after any change, deletions included (which leave the state vector as it was).
#[tokio::test]
async fn newcomers_get_the_document_as_it_is_after_every_kind_of_change() {
    let server = TestServer::start().await;
    let url = server.url("full-state");
    let a = Client::connect(&url).await.unwrap();
    a.wait_synced(WAIT).await.unwrap();
    append_text(a.doc(), "t", "hello");
    let first = Client::connect(&url).await.unwrap();
    first
        .wait_until(WAIT, |d| text(d, "t") == "hello")
        .await
        .unwrap();
    // A deletion only.
    {
        use yrs::{Text, Transact};
        let t = a.doc().get_or_insert_text("t");
        let mut txn = a.doc().transact_mut();
        t.remove_range(&mut txn, 0, 1);
    }
    first
        .wait_until(WAIT, |d| text(d, "t") == "ello")
        .await
        .unwrap();
    let second = Client::connect(&url).await.unwrap();
    second.wait_synced(WAIT).await.unwrap();
    assert_eq!(text(second.doc(), "t"), "ello");
    // An insertion.
    append_text(a.doc(), "t", "!");
    first
        .wait_until(WAIT, |d| text(d, "t") == "ello!")
        .await
        .unwrap();
    let third = Client::connect(&url).await.unwrap();
    third.wait_synced(WAIT).await.unwrap();
    assert_eq!(text(third.doc(), "t"), "ello!");
}
