//! tandem's own WebSocket layer (RFC 6455, server side, no extensions): the frame format, a
//! reader that assembles a client's messages, and a writer that anyone holding it may drive
//! without waiting. tungstenite keeps a read buffer and a write buffer in every connection, and
//! its split stream wants a task per direction; at hundreds of thousands of idle connections
//! those are most of the server's memory (docs/benchmarks.md, "idle").

pub mod frame;
pub mod inbound;
pub mod reader;
pub mod writer;

use std::sync::Arc;

use bytes::Bytes;
use tokio::net::TcpStream;

pub use inbound::{Incoming, ReadError};
pub use reader::{SocketError, WsReader};
pub use writer::{Source, Written, WsWriter, FRAGMENT_BYTES};

/// A server's WebSocket after the handshake, in its two halves over one TCP stream.
#[derive(Debug)]
pub struct WsSocket {
    /// The read half.
    pub reader: WsReader,
    /// The write half.
    pub writer: WsWriter,
}

impl WsSocket {
    /// A socket over `stream`, whose first bytes are `early` (read past the upgrade request),
    /// that refuses messages over `max_message` bytes.
    pub fn new(stream: TcpStream, early: Bytes, max_message: usize) -> Self {
        let stream = Arc::new(stream);
        Self {
            reader: WsReader::new(stream.clone(), early, max_message),
            writer: WsWriter::new(stream),
        }
    }
}
