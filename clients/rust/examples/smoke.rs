//! A smoke check against a running server: two clients join a room, edit, see each other's
//! edits and presence, and leave.
//!
//! `cargo run -p tandem-client --example smoke -- ws://127.0.0.1:1234/smoke/room`

use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;
use tandem_client::{Client, ClientError, ClientOptions};
use yrs::{GetString, Text, Transact};

const WAIT: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> ExitCode {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "ws://127.0.0.1:1234/smoke".into());
    match run(&url).await {
        Ok(()) => {
            println!("ok: {url}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(url: &str) -> Result<(), ClientError> {
    let a = Client::connect_with(
        url,
        ClientOptions {
            initial_awareness: Some(json!({"name": "a"})),
            ..Default::default()
        },
    )
    .await?;
    let b = Client::connect(url).await?;
    a.wait_synced(WAIT).await?;
    b.wait_synced(WAIT).await?;
    println!("synced: a={} b={}", a.client_id(), b.client_id());

    let marker = format!("[{}]", a.client_id());
    let text = a.doc().get_or_insert_text("smoke");
    text.insert(&mut a.doc().transact_mut(), 0, &marker);
    b.wait_until(WAIT, |doc| {
        doc.get_or_insert_text("smoke")
            .get_string(&doc.transact())
            .contains(&marker)
    })
    .await?;
    println!("b sees a's edit");

    b.set_awareness(json!({"name": "b"}));
    let (ida, idb) = (a.client_id(), b.client_id());
    a.wait_awareness(WAIT, |m| m.contains_key(&idb)).await?;
    b.wait_awareness(WAIT, |m| m.contains_key(&ida)).await?;
    println!("presence: a sees {:?}", a.awareness());

    a.close().await?;
    b.wait_awareness(WAIT, |m| !m.contains_key(&ida)).await?;
    println!("b saw a leave");
    b.close().await?;
    Ok(())
}
