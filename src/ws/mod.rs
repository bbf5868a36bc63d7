//! tandem's own WebSocket layer (RFC 6455, server side, no extensions): the frame format, a
//! reader that assembles a client's messages, and a socket that one task polls for reading
//! and writing. tungstenite keeps a read buffer and a write buffer in every connection, and
//! its split stream wants a task per direction; at hundreds of thousands of idle connections
//! those are most of the server's memory (docs/benchmarks.md, "idle").

pub mod frame;
pub mod inbound;
pub mod socket;

pub use inbound::{Incoming, ReadError};
pub use socket::{SocketError, Source, Written, WsSocket, FRAGMENT_BYTES};
