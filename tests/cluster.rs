//! Several nodes in one process on the in-process bus: clients on different nodes converge,
//! presence crosses nodes, lost envelopes heal through the state exchange, and a node's death
//! or departure removes its clients' presence elsewhere.

mod common;

use std::time::Duration;

use common::{append_text, text, TestCluster, WAIT};
use serde_json::json;
use tandem_client::Client;

async fn client(url: &str) -> Client {
    let c = Client::connect(url).await.unwrap();
    c.wait_synced(WAIT).await.unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_three_nodes_converge() {
    let cluster = TestCluster::start(3).await;
    let mut clients = Vec::new();
    for node in 0..3 {
        for _ in 0..2 {
            clients.push(client(&cluster.url(node, "shared")).await);
        }
    }
    for round in 0..20 {
        for (i, c) in clients.iter().enumerate() {
            append_text(c.doc(), "t", &format!("<{i}.{round}>"));
        }
    }
    let expected: usize = (0..clients.len())
        .flat_map(|i| (0..20).map(move |r| format!("<{i}.{r}>").len()))
        .sum();
    for c in &clients {
        c.wait_until(WAIT, |d| text(d, "t").len() == expected)
            .await
            .unwrap();
    }
    let reference = text(clients[0].doc(), "t");
    for c in &clients {
        assert_eq!(text(c.doc(), "t"), reference);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_on_a_third_node_gets_everything() {
    let cluster = TestCluster::start(3).await;
    let a = client(&cluster.url(0, "late")).await;
    let b = client(&cluster.url(1, "late")).await;
    for i in 0..30 {
        append_text(a.doc(), "t", &format!("a{i};"));
        append_text(b.doc(), "t", &format!("b{i};"));
    }
    let want_len: usize = (0..30)
        .map(|i| format!("a{i};").len() + format!("b{i};").len())
        .sum();
    a.wait_until(WAIT, |d| text(d, "t").len() == want_len)
        .await
        .unwrap();
    b.wait_until(WAIT, |d| text(d, "t").len() == want_len)
        .await
        .unwrap();
    let c = client(&cluster.url(2, "late")).await;
    let want = text(a.doc(), "t");
    c.wait_until(WAIT, |d| text(d, "t") == want).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_crosses_nodes_and_leaves_with_its_connection() {
    let cluster = TestCluster::start(2).await;
    let a = client(&cluster.url(0, "presence")).await;
    let b = client(&cluster.url(1, "presence")).await;
    a.set_awareness(json!({"name": "a"}));
    let a_id = a.client_id();
    b.wait_awareness(WAIT, |s| s.get(&a_id) == Some(&json!({"name": "a"})))
        .await
        .unwrap();
    // A joiner on the other node gets a's state although a never spoke to its node.
    let c = client(&cluster.url(1, "presence")).await;
    c.wait_awareness(WAIT, |s| s.contains_key(&a_id))
        .await
        .unwrap();
    drop(a);
    b.wait_awareness(WAIT, |s| !s.contains_key(&a_id))
        .await
        .unwrap();
    c.wait_awareness(WAIT, |s| !s.contains_key(&a_id))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_envelopes_heal_through_the_state_exchange() {
    let cluster = TestCluster::start(2).await;
    let a = client(&cluster.url(0, "heal")).await;
    let b = client(&cluster.url(1, "heal")).await;
    append_text(a.doc(), "t", "before;");
    b.wait_until(WAIT, |d| text(d, "t") == "before;")
        .await
        .unwrap();

    // Node 1 is cut off: edits on both sides are lost in transit, deletions included.
    cluster.set_connected(1, false);
    append_text(a.doc(), "t", "from-a;");
    append_text(b.doc(), "t", "from-b;");
    {
        use yrs::{Text, Transact};
        let t = b.doc().get_or_insert_text("t");
        t.remove_range(&mut b.doc().transact_mut(), 0, 7); // "before;"
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !text(b.doc(), "t").contains("from-a"),
        "the cut must lose traffic"
    );

    cluster.set_connected(1, true);
    a.wait_until(WAIT, |d| {
        text(d, "t").contains("from-b") && !text(d, "t").contains("before")
    })
    .await
    .unwrap();
    b.wait_until(WAIT, |d| text(d, "t").contains("from-a"))
        .await
        .unwrap();
    assert_eq!(text(a.doc(), "t"), text(b.doc(), "t"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_loses_its_clients_presence_within_15_seconds() {
    let cluster = TestCluster::start(2).await;
    let a = client(&cluster.url(0, "dead")).await;
    let b = client(&cluster.url(1, "dead")).await;
    b.set_awareness(json!({"name": "b"}));
    let b_id = b.client_id();
    a.wait_awareness(WAIT, |s| s.contains_key(&b_id))
        .await
        .unwrap();
    // Let node 0 hear node 1's heartbeats first, then silence node 1 for good.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    cluster.set_connected(1, false);
    // The contract: other nodes drop a dead node's presence within 15 s.
    a.wait_awareness(Duration::from_secs(15), |s| !s.contains_key(&b_id))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_shutting_down_says_so_and_its_presence_goes_at_once() {
    let mut cluster = TestCluster::start(2).await;
    let a = client(&cluster.url(0, "bye")).await;
    let b = client(&cluster.url(1, "bye")).await;
    b.set_awareness(json!({"name": "b"}));
    let b_id = b.client_id();
    a.wait_awareness(WAIT, |s| s.contains_key(&b_id))
        .await
        .unwrap();
    cluster.shutdown(1).await;
    a.wait_awareness(Duration::from_secs(5), |s| !s.contains_key(&b_id))
        .await
        .unwrap();
}
