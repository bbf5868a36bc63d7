//! Large messages leave the server in WebSocket fragments (so that no connection keeps a write
//! buffer as large as the largest message it was ever sent), and clients reassemble them into
//! exactly the message: read here from a raw TCP socket, frame by frame.

mod common;

use common::{append_text, TestServer, WAIT};
use tandem_client::Client;
use tandem_protocol::{Message as YMessage, MessageReader, SyncMessage};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use yrs::updates::decoder::Decode;
use yrs::{GetString, Transact};

/// One WebSocket frame as the server sent it.
struct Frame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

async fn read_frame(r: &mut BufReader<TcpStream>) -> Frame {
    let mut head = [0u8; 2];
    r.read_exact(&mut head).await.unwrap();
    assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
    let len = match head[1] & 0x7f {
        126 => u64::from(r.read_u16().await.unwrap()),
        127 => r.read_u64().await.unwrap(),
        n => u64::from(n),
    };
    let mut payload = vec![0; len as usize];
    r.read_exact(&mut payload).await.unwrap();
    Frame {
        fin: head[0] & 0x80 != 0,
        opcode: head[0] & 0x0f,
        payload,
    }
}

/// A masked binary frame from the client (mask of zeros: the payload goes as it is).
fn client_frame(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut out = vec![0x82, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    out.extend_from_slice(payload);
    out
}

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

    let addr = url.trim_start_matches("ws://").split('/').next().unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut r = BufReader::new(tcp);
    r.get_mut()
        .write_all(
            format!(
                "GET /big HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut status = String::new();
    r.read_line(&mut status).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    let mut accept = None;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line
            .to_ascii_lowercase()
            .strip_prefix("sec-websocket-accept:")
        {
            accept = Some(v.trim().to_string());
        }
    }
    assert_eq!(accept.as_deref(), Some("s3pplmbitxaq9kygzzhzrbk+xoo="));
    // Sync step 1 with an empty state vector: the answer is the whole document.
    let step1 = YMessage::Sync(SyncMessage::Step1(&[0])).to_frame();
    r.get_mut().write_all(&client_frame(&step1)).await.unwrap();

    let step2 = tokio::time::timeout(WAIT, async {
        loop {
            let first = read_frame(&mut r).await;
            assert_ne!(first.opcode, 0, "a continuation without a start");
            if first.opcode != 2 {
                continue; // ping
            }
            let mut message = first.payload;
            let mut fragments = 1;
            let mut fin = first.fin;
            while !fin {
                let next = read_frame(&mut r).await;
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
