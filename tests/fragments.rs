//! Large messages leave the server in WebSocket fragments (so that no connection keeps a write
//! buffer as large as the largest message it was ever sent), and clients reassemble them into
//! exactly the message: read here from a raw TCP socket, frame by frame.

mod common;
#[path = "common/wire.rs"]
mod wire;

use common::{append_text, TestServer, WAIT};
use tandem_client::Client;
use tandem_protocol::{Message as YMessage, MessageReader, SyncMessage};
use tokio::io::AsyncWriteExt;
use yrs::updates::decoder::Decode;
use yrs::{GetString, Transact};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_step2_leaves_in_fragments_that_reassemble_exactly() {
    let server = TestServer::start().await;
    let url = server.url("big");
    let writer = Client::connect(&url).await.unwrap();
    writer.wait_synced(WAIT).await.unwrap();
    // About 200 KB of text, in a few updates.
    let chunk = "0123456789abcdef".repeat(1024);
    for _ in 0..12 {
        append_text(writer.doc(), "t", &chunk);
    }
    let expected = chunk.repeat(12);
    let reader = Client::connect(&url).await.unwrap();
    reader
        .wait_until(WAIT, |d| common::text(d, "t").len() == expected.len())
        .await
        .expect("the room holds the document");

    let (mut r, accept) = wire::connect(&url, &[]).await;
    assert_eq!(accept.as_deref(), Some("s3pplmbitxaq9kygzzhzrbk+xoo="));
    // Sync step 1 with an empty state vector: the answer is the whole document.
    let step1 = YMessage::Sync(SyncMessage::Step1(&[0])).to_frame();
    r.get_mut().write_all(&wire::binary(&step1)).await.unwrap();

    let step2 = tokio::time::timeout(WAIT, async {
        loop {
            let first = wire::read_frame(&mut r).await.expect("open");
            assert_ne!(first.opcode, 0, "a continuation without a start");
            if first.opcode != 2 {
                continue; // ping
            }
            let mut message = first.payload;
            let mut fragments = 1;
            let mut fin = first.fin;
            while !fin {
                let next = wire::read_frame(&mut r).await.expect("open");
                assert_eq!(next.opcode, 0, "fragments continue until FIN");
                assert!(next.payload.len() <= 16 << 10, "{}", next.payload.len());
                message.extend_from_slice(&next.payload);
                fragments += 1;
                fin = next.fin;
            }
            let mut reader = MessageReader::new(&message);
            if let Some(Ok(YMessage::Sync(SyncMessage::Step2(update)))) = reader.next() {
                if update.len() > 100_000 {
                    return (update.to_vec(), fragments);
                }
            }
        }
    })
    .await
    .expect("a step 2 arrives");
    let (update, fragments) = step2;
    assert!(
        fragments >= 12,
        "{fragments} fragments for {} bytes",
        update.len()
    );
    let doc = yrs::Doc::new();
    doc.transact_mut()
        .apply_update(yrs::Update::decode_v1(&update).unwrap())
        .unwrap();
    let t = doc.get_or_insert_text("t");
    assert_eq!(t.get_string(&doc.transact()), expected);
}
