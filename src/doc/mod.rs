//! Document engines: CRDT state with no sockets, no runtime and no SQL.
//!
//! Only Yjs documents (yrs) exist today: [`YDoc`] is the engine the room actor drives, and
//! [`YrsFold`] merges stored updates when the store compacts a room's log. Every entry point that
//! reads client or stored bytes is panic-contained: yrs must never take the room or the server
//! down on hostile input.

mod burst;
mod fold;
mod places;
#[cfg(test)]
mod testutil;
mod ydoc;

pub use fold::YrsFold;
pub use places::Misplaced;
pub use ydoc::{check_state_vector, Applied, Comparison, DecodedUpdate, DocError, YDoc};
