//! Awareness through a real node: join, leave and expiry are seen by the others.

mod common;

use std::time::Duration;

use common::{raw, send_binary, TestServer, WAIT};
use serde_json::json;
use tandem_client::Client;
use tandem_protocol::awareness::encode_entries;
use tandem_protocol::{AwarenessEntry, Message};

#[tokio::test]
async fn awareness_join_and_leave_are_seen_by_others() {
    let server = TestServer::start().await;
    let url = server.url("presence");
    let a = Client::connect(&url).await.unwrap();
    a.wait_synced(WAIT).await.unwrap();
    a.set_awareness(json!({"user": {"name": "a"}}));
    let a_id = a.client_id();

    // A joiner gets the states that were set before it came.
    let b = Client::connect(&url).await.unwrap();
    b.wait_awareness(WAIT, |s| {
        s.get(&a_id) == Some(&json!({"user": {"name": "a"}}))
    })
    .await
    .unwrap();
    b.set_awareness(json!({"user": {"name": "b"}}));
    let b_id = b.client_id();
    a.wait_awareness(WAIT, |s| s.contains_key(&b_id))
        .await
        .unwrap();

    // Changes propagate.
    a.set_awareness(json!({"user": {"name": "a2"}}));
    b.wait_awareness(WAIT, |s| {
        s.get(&a_id) == Some(&json!({"user": {"name": "a2"}}))
    })
    .await
    .unwrap();

    // A connection that goes away without saying so: the server nulls its states.
    drop(a);
    b.wait_awareness(WAIT, |s| !s.contains_key(&a_id))
        .await
        .unwrap();
}

#[tokio::test]
async fn states_not_renewed_expire_for_everyone() {
    let server = TestServer::start_with(|c| {
        c.rooms.awareness_timeout = Duration::from_millis(1500);
        c.rooms.tick = Duration::from_millis(100);
    })
    .await;
    let url = server.url("expiry");
    let observer = Client::connect(&url).await.unwrap();
    observer.wait_synced(WAIT).await.unwrap();

    // A raw peer announces a state once and then stays silent (but connected).
    let mut ws = raw(&url).await;
    let mut payload = Vec::new();
    let entry = AwarenessEntry {
        client_id: 4242,
        clock: 1,
        state: r#"{"name":"ghost"}"#,
    };
    encode_entries(&mut payload, [entry].into_iter());
    send_binary(&mut ws, Message::Awareness(&payload).to_frame()).await;

    observer
        .wait_awareness(WAIT, |s| s.contains_key(&4242))
        .await
        .unwrap();
    observer
        .wait_awareness(WAIT, |s| !s.contains_key(&4242))
        .await
        .unwrap();

    // A joiner after the expiry does not get the stale state either.
    let late = Client::connect(&url).await.unwrap();
    late.wait_synced(WAIT).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!late.awareness().contains_key(&4242));
}

#[tokio::test]
async fn query_awareness_is_answered_with_every_state() {
    use futures_util::StreamExt;
    use tandem_protocol::{AwarenessUpdate, MessageReader};
    use tokio_tungstenite::tungstenite::Message as Ws;

    let server = TestServer::start().await;
    let url = server.url("query");
    let a = Client::connect(&url).await.unwrap();
    a.wait_synced(WAIT).await.unwrap();
    a.set_awareness(json!({"n": 1}));
    let a_id = a.client_id();
    let witness = Client::connect(&url).await.unwrap();
    witness
        .wait_awareness(WAIT, |s| s.contains_key(&a_id))
        .await
        .unwrap();

    let mut ws = raw(&url).await;
    send_binary(&mut ws, Message::QueryAwareness.to_frame()).await;
    let found = tokio::time::timeout(WAIT, async {
        // The join greeting already carries the states; the query's answer carries them again.
        let mut seen = 0;
        while let Some(Ok(msg)) = ws.next().await {
            let Ws::Binary(frame) = msg else { continue };
            for m in MessageReader::new(&frame) {
                if let Ok(Message::Awareness(p)) = m {
                    let u = AwarenessUpdate::decode(p).unwrap();
                    if u.entries
                        .iter()
                        .any(|e| e.client_id == a_id && e.state == r#"{"n":1}"#)
                    {
                        seen += 1;
                    }
                }
            }
            if seen == 2 {
                return seen;
            }
        }
        seen
    })
    .await
    .expect("answer in time");
    assert_eq!(found, 2);
}
