//! tandem: a real-time collaboration server.
//!
//! A WebSocket hub manages rooms and presence, merges document updates with CRDTs (yrs), and stores
//! them in an append-only log folded into snapshots (SQLite embedded by default).
//!
//! Dependencies point one way: `http`/`session` -> `hub` -> `room` -> `doc`, and `room` -> `store`.
//! `doc` and the pure parts of `room` (awareness, persistence policy) touch no sockets and no SQL.

pub mod app;
pub mod auth;
pub mod broker;
pub mod config;
pub mod doc;
mod hashing;
pub mod http;
pub mod hub;
pub mod ids;
pub mod metrics;
pub mod nodes;
pub mod room;
pub mod session;
pub mod store;
pub mod telemetry;
pub mod ws;
