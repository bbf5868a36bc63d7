//! A separate `tandem` process killed with SIGKILL keeps every committed update.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{append_text, tandem_bin, text, WAIT};
use tandem::ids::RoomId;
use tandem::store::sqlite::SqliteStore;
use tandem::store::Store;
use tandem_client::Client;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use yrs::updates::decoder::Decode;
use yrs::Transact;

/// Starts `tandem` on port 0 and returns the child and its address.
async fn spawn_tandem(data_dir: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(tandem_bin())
        .args(["--bind", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tandem");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let addr = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("listening on ").nth(1) {
                return rest.split_whitespace().next().unwrap().to_string();
            }
        }
        panic!("tandem exited before listening");
    })
    .await
    .expect("tandem listening in time");
    // Keep draining stderr so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_keeps_every_committed_update() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_tandem(dir.path()).await;
    let url = format!("ws://{addr}/crash");
    let c = Client::connect(&url).await.unwrap();
    c.wait_synced(WAIT).await.unwrap();
    let db = dir.path().join("tandem.db");
    let reader = SqliteStore::open(&db).await.unwrap();
    let room = RoomId::new("crash").unwrap();

    // Keep writing while we kill: some updates are committed, the last few may not be.
    for i in 0..200 {
        append_text(c.doc(), "t", &format!("{i},"));
        if i % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // Wait until a good part is durable, then read exactly what is committed.
    let committed = tokio::time::timeout(WAIT, async {
        loop {
            let stored = reader.load(&room).await.unwrap();
            if stored.updates.len() >= 100 {
                return stored;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("updates committed");
    let committed_doc = yrs::Doc::new();
    for (_, u) in &committed.updates {
        committed_doc
            .transact_mut()
            .apply_update(yrs::Update::decode_v1(u).unwrap())
            .unwrap();
    }
    let committed_text = text(&committed_doc, "t");
    assert!(!committed_text.is_empty());
    child.kill().await.unwrap(); // SIGKILL
    drop(c);
    reader.close().await;

    let (_child2, addr2) = spawn_tandem(dir.path()).await;
    let c2 = Client::connect(&format!("ws://{addr2}/crash"))
        .await
        .unwrap();
    c2.wait_synced(WAIT).await.unwrap();
    let restored = text(c2.doc(), "t");
    // Every committed edit is there (edits only append, so committed text is a prefix).
    assert!(
        restored.starts_with(&committed_text),
        "restored {restored:?} does not contain committed {committed_text:?}"
    );
}
