//! One WebSocket connection speaking the y-websocket protocol, bridged to its room.
//!
//! The reader parses frames and checks every payload before anything reaches the room; the
//! writer drains the connection's byte-bounded [`outbox`], coalescing frames into few writes.

mod conn;
pub mod limits;
pub mod outbox;

pub use conn::{serve, Admission, Refusal, SessionSettings};
