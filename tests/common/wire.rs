//! A WebSocket client written byte by byte over a raw TCP socket, for tests that look at frames
//! themselves: what tungstenite would hide or refuse to send.
#![allow(dead_code)]

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One WebSocket frame as the server sent it.
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

/// The upgrade request for `path` (with the RFC's sample key).
pub fn upgrade_request(addr: &str, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

/// Connects to `url` (`ws://host:port/path`) and sends the upgrade request followed by `then`
/// in the same write; returns the stream after the `101` answer and its accept key.
pub async fn connect(url: &str, then: &[u8]) -> (BufReader<TcpStream>, Option<String>) {
    let rest = url.trim_start_matches("ws://");
    let (addr, path) = rest.split_at(rest.find('/').unwrap());
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut r = BufReader::new(tcp);
    let mut request = upgrade_request(addr, path).into_bytes();
    request.extend_from_slice(then);
    r.get_mut().write_all(&request).await.unwrap();
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
    (r, accept)
}

/// Reads one frame; `None` when the server closed the stream.
pub async fn read_frame(r: &mut BufReader<TcpStream>) -> Option<Frame> {
    let mut head = [0u8; 2];
    r.read_exact(&mut head).await.ok()?;
    assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
    let len = match head[1] & 0x7f {
        126 => u64::from(r.read_u16().await.ok()?),
        127 => r.read_u64().await.ok()?,
        n => u64::from(n),
    };
    let mut payload = vec![0; len as usize];
    r.read_exact(&mut payload).await.ok()?;
    Some(Frame {
        fin: head[0] & 0x80 != 0,
        opcode: head[0] & 0x0f,
        payload,
    })
}

/// A client frame: `first` is the first header byte (FIN, opcode), the payload masked with
/// `mask`.
pub fn client_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![first];
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// A whole binary message from the client.
pub fn binary(payload: &[u8]) -> Vec<u8> {
    client_frame(0x82, payload, [0x37, 0xfa, 0x21, 0x3d])
}
