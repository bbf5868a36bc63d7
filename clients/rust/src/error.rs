//! Errors of the client and the record of how its connection ended.

use std::fmt;
use std::time::Duration;

use tandem_protocol::CloseCode;
use thiserror::Error;

/// What went wrong in a [`Client`](crate::Client) call.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The URL or a header could not be turned into a WebSocket request.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// An option is out of range.
    #[error("invalid option: {0}")]
    InvalidOption(&'static str),
    /// The TCP connection or the WebSocket upgrade failed.
    #[error("could not connect: {0}")]
    Connect(#[source] Box<tokio_tungstenite::tungstenite::Error>),
    /// The condition did not hold within the given time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The connection ended before the condition held.
    #[error("connection closed: {0}")]
    Closed(CloseInfo),
    /// The client stopped because of a fault; the connection is closed or closing.
    #[error(transparent)]
    Failed(#[from] Failure),
    /// [`Client::wait_stored`](crate::Client::wait_stored) was called on a client that did not
    /// ask for acknowledgements ([`ClientOptions::acknowledgements`](crate::ClientOptions) is
    /// off), so none will ever come.
    #[error("storage acknowledgements were not requested (ClientOptions::acknowledgements)")]
    AcknowledgementsOff,
}

/// Why a client stopped working. Kept in the client's status, so it is cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Failure {
    /// Local updates came faster than the socket could carry them and the outgoing queue filled
    /// up. An update could not be queued, so the client closed rather than diverge silently.
    #[error("outgoing queue full ({capacity} frames): a local update could not be sent")]
    OutboxFull {
        /// The queue's capacity in frames.
        capacity: usize,
    },
    /// The server sent something that does not parse or does not apply, or acknowledged more
    /// updates than we sent; we closed with 1007.
    #[error("server sent invalid data: {0}")]
    InvalidData(String),
    /// The server denied access to the room (y-websocket auth message).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
}

/// Who ended the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseOrigin {
    /// The server sent a close frame.
    Server,
    /// We sent the close frame: [`Client::close`](crate::Client::close), the last handle dropped, or
    /// a [`Failure`].
    Client,
    /// The connection broke without a close frame (code 1006).
    Lost,
}

/// How the connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    /// The close code; 1006 when the connection was lost, 1005 when a close frame had no code.
    pub code: u16,
    /// The close reason, or the transport error for a lost connection.
    pub reason: String,
    /// Who ended it.
    pub origin: CloseOrigin,
}

impl CloseInfo {
    /// The code as one of tandem's close codes, if it is one.
    pub fn close_code(&self) -> Option<CloseCode> {
        CloseCode::from_code(self.code)
    }

    /// Whether reconnecting makes sense: tandem's reconnectable codes and lost connections.
    pub fn is_reconnectable(&self) -> bool {
        self.origin == CloseOrigin::Lost
            || self.close_code().is_some_and(CloseCode::is_reconnectable)
    }
}

impl fmt::Display for CloseInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let by = match self.origin {
            CloseOrigin::Server => "server",
            CloseOrigin::Client => "client",
            CloseOrigin::Lost => "lost",
        };
        write!(f, "{} {:?} ({by})", self.code, self.reason)
    }
}
