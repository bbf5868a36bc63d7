//! The WebSocket upgrade (RFC 6455 over HTTP/1.1). After the `101` answer hyper hands the
//! connection over and tandem's own WebSocket layer ([`crate::ws`]) serves it, keeping no
//! buffers while the connection is idle.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sha1::{Digest, Sha1};
use tracing::warn;

use super::serve::ServedIo;
use crate::ws::WsSocket;

/// The `Sec-WebSocket-Accept` answer to a client's key (RFC 6455, section 4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// The TCP stream itself, taken back from hyper with whatever it read past the request: the
/// room writes to it directly, without a wrapper or a wake-up. A plain function, so that none
/// of its locals stay in the connection's task.
fn take_socket(upgraded: hyper::upgrade::Upgraded, max_message: usize) -> Option<Box<WsSocket>> {
    match upgraded.downcast::<ServedIo>() {
        Ok(parts) => Some(Box::new(WsSocket::new(
            parts.io.into_inner(),
            parts.read_buf,
            max_message,
        ))),
        Err(_) => {
            warn!("an upgraded connection is not a TCP stream; dropped");
            None
        }
    }
}

/// A request to upgrade to a WebSocket, checked.
pub struct WsUpgrade {
    key: HeaderValue,
    /// The subprotocols the client offered, in its order.
    offered: Option<HeaderValue>,
    on_upgrade: hyper::upgrade::OnUpgrade,
}

/// Why a request is not a WebSocket upgrade.
#[derive(Debug, thiserror::Error)]
pub enum NotAnUpgrade {
    /// Not HTTP/1.1 (or 1.0) GET.
    #[error("a WebSocket upgrade is an HTTP/1.1 GET request")]
    Method,
    /// `Connection: upgrade` and `Upgrade: websocket` missing.
    #[error("not a WebSocket upgrade request (Connection: upgrade, Upgrade: websocket)")]
    Headers,
    /// A WebSocket version other than 13.
    #[error("Sec-WebSocket-Version must be 13")]
    Version,
    /// No `Sec-WebSocket-Key`.
    #[error("Sec-WebSocket-Key is missing")]
    Key,
    /// The connection cannot be taken over (not a hyper server connection).
    #[error("this connection cannot be upgraded")]
    NotUpgradable,
}

impl IntoResponse for NotAnUpgrade {
    fn into_response(self) -> Response {
        let status = match self {
            NotAnUpgrade::Method => StatusCode::METHOD_NOT_ALLOWED,
            NotAnUpgrade::Headers => StatusCode::UPGRADE_REQUIRED,
            NotAnUpgrade::Version | NotAnUpgrade::Key => StatusCode::BAD_REQUEST,
            NotAnUpgrade::NotUpgradable => StatusCode::UPGRADE_REQUIRED,
        };
        let mut response = (status, format!("{self}\n")).into_response();
        if status == StatusCode::UPGRADE_REQUIRED {
            response
                .headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        response
    }
}

impl<S: Send + Sync> FromRequestParts<S> for WsUpgrade {
    type Rejection = NotAnUpgrade;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, NotAnUpgrade> {
        if parts.method != Method::GET || parts.version > Version::HTTP_11 {
            return Err(NotAnUpgrade::Method);
        }
        let headers = &parts.headers;
        if !has_token(headers, header::CONNECTION, "upgrade")
            || !has_token(headers, header::UPGRADE, "websocket")
        {
            return Err(NotAnUpgrade::Headers);
        }
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(NotAnUpgrade::Version);
        }
        let key = headers
            .get(header::SEC_WEBSOCKET_KEY)
            .ok_or(NotAnUpgrade::Key)?
            .clone();
        let offered = headers.get(header::SEC_WEBSOCKET_PROTOCOL).cloned();
        let on_upgrade = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or(NotAnUpgrade::NotUpgradable)?;
        Ok(Self {
            key,
            offered,
            on_upgrade,
        })
    }
}

impl WsUpgrade {
    /// Answers `101 Switching Protocols`, selecting `protocol` if the client offered it, and runs
    /// `serve` with the socket (refusing messages over `max_message` bytes) once the client's
    /// connection is handed over.
    pub fn on_upgrade<F, Fut>(
        self,
        protocol: &'static str,
        max_message: usize,
        serve: F,
    ) -> Response
    where
        F: FnOnce(Box<WsSocket>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let selected = self
            .offered
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .is_some_and(|list| list.split(',').any(|p| p.trim() == protocol));
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            // The client went away between the answer and the hand-over: nothing to serve.
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            if let Some(socket) = take_socket(upgraded, max_message) {
                serve(socket).await;
            }
        });
        let mut response = (
            StatusCode::SWITCHING_PROTOCOLS,
            [
                (header::CONNECTION, HeaderValue::from_static("upgrade")),
                (header::UPGRADE, HeaderValue::from_static("websocket")),
            ],
        )
            .into_response();
        let accept = accept_key(self.key.as_bytes());
        let headers = response.headers_mut();
        if let Ok(accept) = HeaderValue::from_str(&accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        if selected {
            headers.insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(protocol),
            );
        }
        response
    }
}

/// Whether the comma-separated header `name` holds `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_tokens_are_matched_case_insensitively_in_lists() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(has_token(&h, header::CONNECTION, "upgrade"));
        assert!(!has_token(&h, header::CONNECTION, "close"));
    }

    #[test]
    fn the_accept_key_is_the_rfc_example() {
        // RFC 6455, section 1.3.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
