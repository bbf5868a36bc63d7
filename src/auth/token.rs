//! Where a token arrives: an `Authorization: Bearer` header (bots), a `bearer.<token>` entry in
//! `Sec-WebSocket-Protocol` (browsers, which cannot set headers), or the `token` query parameter
//! (how stock y-websocket providers pass `params`). None of these is ever logged.

use axum::http::header::{AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use axum::http::HeaderMap;

/// The subprotocol entry prefix that carries a token: `bearer.<jwt>`.
pub const SUBPROTOCOL_PREFIX: &str = "bearer.";

/// The subprotocol the server selects when a client offers it next to a `bearer.` entry
/// (browsers fail a connection whose offered protocols were all ignored).
pub const SUBPROTOCOL: &str = "tandem";

/// The request's token, looked for in the header, then the subprotocols, then the query.
pub fn extract(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let mut parts = value.trim().splitn(2, ' ');
        if let (Some(scheme), Some(token)) = (parts.next(), parts.next()) {
            if scheme.eq_ignore_ascii_case("bearer") {
                return Some(token.trim().to_string());
            }
        }
    }
    for value in headers.get_all(SEC_WEBSOCKET_PROTOCOL) {
        let Ok(value) = value.to_str() else { continue };
        for entry in value.split(',') {
            if let Some(token) = entry.trim().strip_prefix(SUBPROTOCOL_PREFIX) {
                return Some(token.to_string());
            }
        }
    }
    let query = query?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn the_query_parameter_is_found_and_decoded() {
        let h = HeaderMap::new();
        assert_eq!(
            extract(&h, Some("a=1&token=abc.def%2Eg")),
            Some("abc.def.g".into())
        );
        assert_eq!(extract(&h, Some("a=1")), None);
        assert_eq!(extract(&h, None), None);
    }

    #[test]
    fn the_bearer_header_wins_over_the_query() {
        let h = headers(&[("authorization", "Bearer  h.e.ader ")]);
        assert_eq!(extract(&h, Some("token=q")), Some("h.e.ader".into()));
        let basic = headers(&[("authorization", "Basic dXNlcg==")]);
        assert_eq!(extract(&basic, Some("token=q")), Some("q".into()));
    }

    #[test]
    fn a_bearer_subprotocol_entry_is_found() {
        let h = headers(&[("sec-websocket-protocol", "tandem, bearer.x.y.z")]);
        assert_eq!(extract(&h, None), Some("x.y.z".into()));
        let none = headers(&[("sec-websocket-protocol", "tandem")]);
        assert_eq!(extract(&none, None), None);
    }
}
