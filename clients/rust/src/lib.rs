//! tandem-client: an async client for tandem rooms (y-websocket protocol), used by bots, tests and
//! the load generator.
//!
//! A [`Client`] joins one room, keeps a [`yrs::Doc`] in sync with it and publishes our presence
//! (awareness). Local edits on [`Client::doc`] are sent automatically; remote updates are applied
//! in the background, and the `wait_*` methods turn that into state checks:
//!
//! ```no_run
//! # async fn demo() -> Result<(), tandem_client::ClientError> {
//! use std::time::Duration;
//! use tandem_client::Client;
//! use yrs::{GetString, Text, Transact};
//!
//! let client = Client::connect("ws://127.0.0.1:1234/notes/today").await?;
//! client.wait_synced(Duration::from_secs(5)).await?;
//! let text = client.doc().get_or_insert_text("body");
//! text.insert(&mut client.doc().transact_mut(), 0, "hello");
//! client.set_awareness(serde_json::json!({ "user": { "name": "bot" } }));
//! client
//!     .wait_until(Duration::from_secs(5), |doc| {
//!         doc.get_or_insert_text("body").get_string(&doc.transact()).contains("world")
//!     })
//!     .await?;
//! client.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Storage acknowledgements (tandem's extension, on by default:
//! [`ClientOptions::acknowledgements`]): the client asks the server to confirm when its updates
//! are durable, and [`Client::wait_stored`] waits until every edit made before the call is:
//!
//! ```no_run
//! # async fn demo(client: tandem_client::Client) -> Result<(), tandem_client::ClientError> {
//! # use std::time::Duration;
//! # use yrs::{Text, Transact};
//! let text = client.doc().get_or_insert_text("body");
//! text.insert(&mut client.doc().transact_mut(), 0, "stored before we go on");
//! client.wait_stored(Duration::from_secs(5)).await?;
//! # Ok(())
//! # }
//! ```
//!
//! Modules: [`client`] (the handle), [`awareness`] (the awareness map and its clock rules),
//! [`options`], [`error`]; the connection task is private.
//!
//! Backpressure policy: local updates go to the connection task through a bounded queue
//! ([`ClientOptions::outbox_capacity`]). The document observer cannot wait, so a full queue fails
//! the client with [`Failure::OutboxFull`] and closes the connection (1011), rather than drop an
//! update silently or buffer without bound.

#![warn(missing_docs)]

pub mod awareness;
pub mod client;
mod connection;
pub mod error;
pub mod options;

pub use client::Client;
pub use error::{ClientError, CloseInfo, CloseOrigin, Failure};
pub use options::ClientOptions;
