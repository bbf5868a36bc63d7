//! tandem's own WebSocket layer (src/ws/) seen from a raw TCP socket: frames cut anywhere,
//! messages sent with the upgrade request, pings, closes, and frames that break RFC 6455.

mod common;
#[path = "common/wire.rs"]
mod wire;

use common::{TestServer, WAIT};
use tandem::metrics::METRICS;
use tandem_protocol::{CloseCode, Message as YMessage, MessageReader, SyncMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Sync step 1 with an empty state vector: the server answers with its step 2 (and step 1).
fn step1() -> Vec<u8> {
    YMessage::Sync(SyncMessage::Step1(&[0])).to_frame()
}

/// Reads frames until a binary message holding a sync step 2.
async fn expect_step2(r: &mut BufReader<TcpStream>) {
    tokio::time::timeout(WAIT, async {
        loop {
            let frame = wire::read_frame(r)
                .await
                .expect("the server keeps the connection");
            if frame.opcode != 2 {
                continue;
            }
            let mut reader = MessageReader::new(&frame.payload);
            while let Some(Ok(msg)) = reader.next() {
                if matches!(msg, YMessage::Sync(SyncMessage::Step2(_))) {
                    return;
                }
            }
        }
    })
    .await
    .expect("a step 2 arrives");
}

/// Reads until the server's close frame; returns its code and reason.
async fn expect_close(r: &mut BufReader<TcpStream>) -> (u16, String) {
    tokio::time::timeout(WAIT, async {
        loop {
            let frame = wire::read_frame(r)
                .await
                .expect("a close frame before the end");
            if frame.opcode == 8 {
                let code = u16::from_be_bytes([frame.payload[0], frame.payload[1]]);
                return (
                    code,
                    String::from_utf8(frame.payload[2..].to_vec()).unwrap(),
                );
            }
        }
    })
    .await
    .expect("the server closes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_with_the_upgrade_request_is_read() {
    let server = TestServer::start().await;
    let (mut r, _) = wire::connect(&server.url("eager"), &wire::binary(&step1())).await;
    expect_step2(&mut r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_written_one_byte_at_a_time_is_read_whole() {
    let server = TestServer::start().await;
    let (mut r, _) = wire::connect(&server.url("slow"), &[]).await;
    // A 2-byte message (a query for presence) then step 1 in one frame, byte by byte.
    let mut both = YMessage::QueryAwareness.to_frame();
    both.extend(step1());
    for byte in wire::binary(&both) {
        r.get_mut().write_all(&[byte]).await.unwrap();
        r.get_mut().flush().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    expect_step2(&mut r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragmented_message_is_assembled_and_pings_between_fragments_are_answered() {
    let server = TestServer::start().await;
    let (mut r, _) = wire::connect(&server.url("frag"), &[]).await;
    let message = step1();
    let (a, b) = message.split_at(1);
    let mut bytes = wire::client_frame(0x02, a, [1, 2, 3, 4]);
    bytes.extend(wire::client_frame(0x89, b"are you there", [5, 6, 7, 8]));
    bytes.extend(wire::client_frame(0x80, b, [9, 10, 11, 12]));
    r.get_mut().write_all(&bytes).await.unwrap();
    let pong = tokio::time::timeout(WAIT, async {
        loop {
            let frame = wire::read_frame(&mut r).await.expect("open");
            if frame.opcode == 0xA {
                return frame.payload;
            }
        }
    })
    .await
    .expect("a pong");
    assert_eq!(pong, b"are you there");
    expect_step2(&mut r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_that_break_the_rfc_close_with_1002_and_a_reason() {
    let server = TestServer::start().await;
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("unmasked", vec![0x82, 0x01, 0x00], "masked"),
        (
            "reserved bits",
            wire::client_frame(0xC2, &step1(), [1, 1, 1, 1]),
            "reserved",
        ),
        (
            "stray continuation",
            wire::client_frame(0x80, b"x", [1, 1, 1, 1]),
            "continuation",
        ),
        (
            "fragmented ping",
            wire::client_frame(0x09, b"", [1, 1, 1, 1]),
            "control",
        ),
    ];
    for (name, bytes, reason_has) in cases {
        let before = METRICS.closes.get(CloseCode::ProtocolError);
        let (mut r, _) = wire::connect(&server.url("rfc"), &[]).await;
        r.get_mut().write_all(&bytes).await.unwrap();
        let (code, reason) = expect_close(&mut r).await;
        assert_eq!(code, 1002, "{name}: {reason}");
        assert!(reason.contains(reason_has), "{name}: {reason}");
        assert!(
            METRICS.closes.get(CloseCode::ProtocolError) > before,
            "{name}"
        );
    }
    // The server still serves.
    let (mut r, _) = wire::connect(&server.url("rfc"), &wire::binary(&step1())).await;
    expect_step2(&mut r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_close_is_answered_and_the_stream_ends() {
    let server = TestServer::start().await;
    let (mut r, _) = wire::connect(&server.url("bye"), &wire::binary(&step1())).await;
    expect_step2(&mut r).await;
    let mut close = 1000u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"done");
    r.get_mut()
        .write_all(&wire::client_frame(0x88, &close, [4, 3, 2, 1]))
        .await
        .unwrap();
    let (code, _) = expect_close(&mut r).await;
    assert_eq!(code, 1000);
    let mut rest = Vec::new();
    let end = tokio::time::timeout(WAIT, r.read_to_end(&mut rest)).await;
    assert!(
        matches!(end, Ok(Ok(_))),
        "the server ends the stream after its close: {end:?}"
    );
}
