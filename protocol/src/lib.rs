//! Wire formats tandem speaks, with no async runtime and no I/O.
//!
//! - [`lib0`]: the variable-length integers and buffers every Yjs protocol is built from;
//! - [`message`]: y-websocket frames (sync step 1/2, update, awareness, auth, query awareness);
//! - [`awareness`]: the awareness update payload (client id, clock, JSON state);
//! - [`close`]: tandem's close codes, a published contract;
//! - [`update`]: the structure of a Yjs v1 update, checked before a CRDT engine sees it.
//!
//! Decoders never panic and never allocate more than their input justifies: a length prefix larger
//! than the bytes that remain is an error, not an allocation.

#![warn(missing_docs)]

pub mod awareness;
pub mod close;
pub mod edit;
pub mod lib0;
pub mod message;
pub mod update;

pub use awareness::{AwarenessEntry, AwarenessUpdate};
pub use close::CloseCode;
pub use edit::{write_delete_set, Edit, Insert};
pub use lib0::{DecodeError, Decoder};
pub use message::{Message, MessageReader, SyncMessage};
pub use update::{
    Block, BlockAt, BlockKind, Deletion, DependencyError, Id, ParentRef, ShapeError, UpdateShape,
};
