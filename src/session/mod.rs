//! One WebSocket connection speaking the y-websocket protocol, bridged to its room.
//!
//! The connection's task parses frames and checks every payload before anything reaches the
//! room. Frames go the other way through the connection's byte-bounded [`outbox`]: the room
//! writes them to the socket itself, several per write, and the task only finishes what a full
//! socket did not take.

mod conn;
mod frames;
pub mod limits;
pub mod outbox;

pub use conn::{serve, Admission, Refusal, SessionSettings};
