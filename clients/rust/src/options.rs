//! [`ClientOptions`]: how a [`Client`](crate::Client) connects and behaves.

use std::time::Duration;

/// Default for [`ClientOptions::awareness_timeout`], y-protocols' `outdatedTimeout`.
pub const DEFAULT_AWARENESS_TIMEOUT: Duration = Duration::from_secs(30);

/// Default for [`ClientOptions::outbox_capacity`].
pub const DEFAULT_OUTBOX_CAPACITY: usize = 4096;

/// Default for [`ClientOptions::close_timeout`].
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a [`Client`](crate::Client) connects and behaves. Build it with struct update syntax:
/// `ClientOptions { client_id: Some(7), ..Default::default() }`.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Yjs client id of the local document, also used as our awareness id. `None` picks a random
    /// 53-bit id. Must be below 2^53 (JavaScript peers cannot represent more).
    pub client_id: Option<u64>,
    /// Sent as `Authorization: Bearer <token>` with the WebSocket upgrade request.
    pub bearer_token: Option<String>,
    /// Extra headers for the upgrade request, as (name, value) pairs.
    pub headers: Vec<(String, String)>,
    /// Remote awareness states not renewed within this long are dropped; our own state is renewed
    /// every half of it (y-protocols: 30 s and 15 s).
    pub awareness_timeout: Duration,
    /// An awareness state to announce right after step 1, as part of the handshake.
    pub initial_awareness: Option<serde_json::Value>,
    /// Capacity, in frames, of the queue between local edits and the socket. When it is full the
    /// client fails with [`Failure::OutboxFull`](crate::Failure::OutboxFull): an update is never
    /// dropped silently and never queued without bound.
    pub outbox_capacity: usize,
    /// How long [`Client::close`](crate::Client::close) waits for the server to answer our close
    /// frame before it drops the connection.
    pub close_timeout: Duration,
    /// Ask the server for storage acknowledgements (tandem's protocol extension, message type
    /// 100): the client opens with an acknowledgement request, counts the sync step 2 and update
    /// messages it sends, and [`Client::wait_stored`](crate::Client::wait_stored) waits until the
    /// server says they are durable. On by default: bots usually want to know that an edit is
    /// stored. Turn it off against servers other than tandem, which do not know the extension
    /// (a stock y-websocket server ignores the request and never acknowledges anything).
    pub acknowledgements: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            client_id: None,
            bearer_token: None,
            headers: Vec::new(),
            awareness_timeout: DEFAULT_AWARENESS_TIMEOUT,
            initial_awareness: None,
            outbox_capacity: DEFAULT_OUTBOX_CAPACITY,
            close_timeout: DEFAULT_CLOSE_TIMEOUT,
            acknowledgements: true,
        }
    }
}
