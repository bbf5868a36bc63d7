//! tandem's WebSocket close codes: a published contract (see `protocol/PROTOCOL.md`).

use std::fmt;

/// Why tandem closes a connection. Each code has a fixed number, a short reason sent in the close
/// frame, and says whether a client should reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000: the exchange is over.
    Normal,
    /// 1001: the server is going away (the room or node is shutting down).
    GoingAway,
    /// 1002: the peer broke the WebSocket protocol itself (framing, masking). Frames that are valid
    /// WebSocket but not valid tandem messages, text frames included, close with
    /// [`CloseCode::InvalidData`].
    ProtocolError,
    /// 1007: a frame did not parse or an update did not decode.
    InvalidData,
    /// 1008: a policy was broken (e.g. no valid message in time).
    Policy,
    /// 1009: a message was larger than the limit.
    TooBig,
    /// 1011: the server hit an internal error while serving this connection.
    InternalError,
    /// 1012: the server is restarting; reconnect.
    Restarting,
    /// 1013: try again later: the connection fell behind (slow consumer) or the server is overloaded.
    TryAgainLater,
    /// 4401: no valid credentials.
    Unauthorized,
    /// 4403: credentials do not grant this room.
    Forbidden,
    /// 4429: the connection sent faster than its rate limit.
    RateLimited,
}

impl CloseCode {
    /// The numeric close code.
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::InvalidData => 1007,
            CloseCode::Policy => 1008,
            CloseCode::TooBig => 1009,
            CloseCode::InternalError => 1011,
            CloseCode::Restarting => 1012,
            CloseCode::TryAgainLater => 1013,
            CloseCode::Unauthorized => 4401,
            CloseCode::Forbidden => 4403,
            CloseCode::RateLimited => 4429,
        }
    }

    /// The code for a number, if tandem defines it.
    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.code() == code)
    }

    /// Whether a client should reconnect after this close.
    pub fn is_reconnectable(self) -> bool {
        matches!(
            self,
            CloseCode::GoingAway
                | CloseCode::InternalError
                | CloseCode::Restarting
                | CloseCode::TryAgainLater
        )
    }

    /// The short human reason sent in the close frame when nothing more specific is known (well
    /// under the 123 bytes a close frame allows).
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal closure",
            CloseCode::GoingAway => "going away",
            CloseCode::ProtocolError => "websocket protocol error",
            CloseCode::InvalidData => "invalid message",
            CloseCode::Policy => "policy violation",
            CloseCode::TooBig => "message too big",
            CloseCode::InternalError => "internal error",
            CloseCode::Restarting => "server restarting",
            CloseCode::TryAgainLater => "try again later",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::Forbidden => "forbidden",
            CloseCode::RateLimited => "rate limited",
        }
    }

    /// A stable, metric-friendly name (`slow_consumer` style, no spaces).
    pub fn as_str(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal",
            CloseCode::GoingAway => "going_away",
            CloseCode::ProtocolError => "protocol_error",
            CloseCode::InvalidData => "invalid_data",
            CloseCode::Policy => "policy",
            CloseCode::TooBig => "too_big",
            CloseCode::InternalError => "internal_error",
            CloseCode::Restarting => "restarting",
            CloseCode::TryAgainLater => "try_again_later",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::Forbidden => "forbidden",
            CloseCode::RateLimited => "rate_limited",
        }
    }

    /// Every code tandem defines.
    pub const ALL: [CloseCode; 12] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::ProtocolError,
        CloseCode::InvalidData,
        CloseCode::Policy,
        CloseCode::TooBig,
        CloseCode::InternalError,
        CloseCode::Restarting,
        CloseCode::TryAgainLater,
        CloseCode::Unauthorized,
        CloseCode::Forbidden,
        CloseCode::RateLimited,
    ];
}

impl fmt::Display for CloseCode {
    /// `1013 try_again_later`: the number and the stable name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code(), self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn from_code_inverts_code_for_every_code() {
        for c in CloseCode::ALL {
            assert_eq!(CloseCode::from_code(c.code()), Some(c), "{c:?}");
        }
    }

    #[test]
    fn numbers_names_and_reasons_are_unique() {
        let codes: HashSet<u16> = CloseCode::ALL.iter().map(|c| c.code()).collect();
        let names: HashSet<&str> = CloseCode::ALL.iter().map(|c| c.as_str()).collect();
        let reasons: HashSet<&str> = CloseCode::ALL.iter().map(|c| c.reason()).collect();
        assert_eq!(codes.len(), CloseCode::ALL.len());
        assert_eq!(names.len(), CloseCode::ALL.len());
        assert_eq!(reasons.len(), CloseCode::ALL.len());
    }

    #[test]
    fn undefined_numbers_are_none() {
        for n in [
            0, 999, 1003, 1004, 1005, 1006, 1010, 1014, 1015, 3000, 4000, 4400, 65535,
        ] {
            assert_eq!(CloseCode::from_code(n), None, "{n}");
        }
    }

    #[test]
    fn reasons_fit_a_close_frame_and_names_are_metric_safe() {
        for c in CloseCode::ALL {
            assert!(!c.reason().is_empty() && c.reason().len() <= 123, "{c:?}");
            assert!(
                c.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{c:?}"
            );
        }
    }

    #[test]
    fn contract_numbers_are_fixed() {
        let table = [
            (CloseCode::Normal, 1000),
            (CloseCode::GoingAway, 1001),
            (CloseCode::ProtocolError, 1002),
            (CloseCode::InvalidData, 1007),
            (CloseCode::Policy, 1008),
            (CloseCode::TooBig, 1009),
            (CloseCode::InternalError, 1011),
            (CloseCode::Restarting, 1012),
            (CloseCode::TryAgainLater, 1013),
            (CloseCode::Unauthorized, 4401),
            (CloseCode::Forbidden, 4403),
            (CloseCode::RateLimited, 4429),
        ];
        for (c, n) in table {
            assert_eq!(c.code(), n);
        }
    }

    #[test]
    fn overload_and_restart_are_reconnectable_while_client_faults_are_terminal() {
        for c in [
            CloseCode::GoingAway,
            CloseCode::InternalError,
            CloseCode::Restarting,
            CloseCode::TryAgainLater,
        ] {
            assert!(c.is_reconnectable(), "{c:?}");
        }
        for c in [
            CloseCode::Normal,
            CloseCode::InvalidData,
            CloseCode::Policy,
            CloseCode::TooBig,
            CloseCode::Unauthorized,
            CloseCode::Forbidden,
            CloseCode::RateLimited,
            CloseCode::ProtocolError,
        ] {
            assert!(!c.is_reconnectable(), "{c:?}");
        }
    }

    #[test]
    fn display_shows_number_and_name() {
        assert_eq!(CloseCode::TryAgainLater.to_string(), "1013 try_again_later");
    }
}
