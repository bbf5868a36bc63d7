//! HTTP surface: the WebSocket upgrade on `/{room}`, health, readiness and metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tandem_protocol::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use self::upgrade::{NotAnUpgrade, WsUpgrade};
use crate::auth::{token, AuthError, Authenticator};
use crate::broker::Broker;
use crate::hub::Hub;
use crate::ids::RoomId;
use crate::metrics::{Refused, METRICS};
use crate::session::limits::AddressLimiter;
use crate::session::{self, Refusal, SessionSettings};
use crate::store::writer::{StoreWriter, WriterStats};
use crate::store::DynStore;

pub mod serve;
pub mod upgrade;

/// What every request handler shares.
#[derive(Clone)]
pub struct HttpState {
    /// The node's rooms.
    pub hub: Hub,
    /// For readiness.
    pub store: DynStore,
    /// For readiness, when this node has one.
    pub broker: Option<Arc<dyn Broker>>,
    /// For readiness: whether the store writer is failing (updates wait unstored).
    pub writer: Arc<WriterStats>,
    /// For readiness: whether the bound on unstored updates is reached.
    pub unstored: StoreWriter,
    /// Per-connection limits.
    pub session: Arc<SessionSettings>,
    /// Token verification and room grants.
    pub auth: Arc<Authenticator>,
    /// Open connections per client address.
    pub addresses: AddressLimiter,
    /// Cancelled at shutdown: readiness turns false and new upgrades are refused.
    pub shutdown: CancellationToken,
    /// Tracks connection tasks so that shutdown can wait for them.
    pub connections: TaskTracker,
}

/// The router: fixed paths first, then every other path is a room.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(reserved))
        .route("/readyz", get(reserved))
        .route("/metrics", get(reserved))
        .route("/{*room}", get(upgrade))
        .with_state(state)
}

async fn index() -> &'static str {
    "tandem: connect a y-websocket provider to ws://HOST/{room}\n"
}

/// `/healthz`, `/readyz` and `/metrics` answer plain HTTP requests; a WebSocket upgrade on one
/// of them joins the room of that name, so no room name is taken away from editors.
async fn reserved(
    State(state): State<HttpState>,
    uri: Uri,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: Result<WsUpgrade, NotAnUpgrade>,
) -> Response {
    let path = uri.path();
    if let Ok(ws) = ws {
        let request = Upgrade {
            room: path.trim_start_matches('/'),
            query: uri.query(),
            headers: &headers,
            peer,
        };
        return upgrade_room(state, request, ws);
    }
    match path {
        "/healthz" => healthz().await.into_response(),
        "/readyz" => readyz(State(state)).await,
        _ => metrics().await,
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<HttpState>) -> Response {
    let store = match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => "ok".to_string(),
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => "error: timed out".to_string(),
    };
    let broker = match &state.broker {
        None => "none".to_string(),
        Some(b) => match tokio::time::timeout(Duration::from_secs(2), b.ping()).await {
            Ok(Ok(())) => "ok".to_string(),
            Ok(Err(e)) => format!("error: {e}"),
            Err(_) => "error: timed out".to_string(),
        },
    };
    let shutting_down = state.shutdown.is_cancelled();
    let writes = if state.unstored.is_full() {
        "full: the bound on unstored updates is reached, writes are refused"
    } else if state.writer.is_failing() {
        "failing: updates wait unstored"
    } else {
        "ok"
    };
    let ready =
        store == "ok" && writes == "ok" && (broker == "ok" || broker == "none") && !shutting_down;
    let body = serde_json::json!({
        "ready": ready,
        "store": store,
        "broker": broker,
        "writes": writes,
        "shutting_down": shutting_down,
        "rooms": state.hub.len(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        METRICS.render(),
    )
        .into_response()
}

async fn upgrade(
    State(state): State<HttpState>,
    Path(room): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: WsUpgrade,
) -> Response {
    let request = Upgrade {
        room: &room,
        query: uri.query(),
        headers: &headers,
        peer,
    };
    upgrade_room(state, request, ws)
}

/// What an upgrade request says about who connects where. The query string may hold a token:
/// it is never logged.
struct Upgrade<'a> {
    room: &'a str,
    query: Option<&'a str>,
    headers: &'a HeaderMap,
    peer: SocketAddr,
}

fn upgrade_room(state: HttpState, request: Upgrade<'_>, ws: WsUpgrade) -> Response {
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    let peer = request.peer;
    let room = match RoomId::new(request.room) {
        Ok(room) => room,
        Err(e) => {
            debug!(error = %e, "bad room name");
            return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response();
        }
    };
    // Cross-site WebSocket hijacking: a page from another origin is refused before the upgrade.
    if let Some(origin) = request.headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("<not text>");
        if !state.auth.origin_allowed(origin) {
            info!(%peer, %room, origin, "upgrade refused: origin not allowed");
            METRICS.refused.inc(Refused::Origin);
            return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
        }
    }
    let token = token::extract(request.headers, request.query);
    let slot = state.addresses.acquire(peer.ip());
    let verdict = match (&slot, state.auth.authorize(token.as_deref(), room.as_str())) {
        (None, _) => Err(Refusal {
            code: CloseCode::TryAgainLater,
            reason: "too many connections from this address".into(),
            auth_message: false,
            metric: Refused::AddressLimit,
        }),
        (Some(_), Ok(grant)) => Ok(grant),
        (Some(_), Err(e)) => Err(Refusal {
            code: e.close_code(),
            reason: e.to_string(),
            auth_message: true,
            metric: match e {
                AuthError::Missing => Refused::MissingToken,
                AuthError::Invalid(_) => Refused::InvalidToken,
                AuthError::Forbidden => Refused::Forbidden,
            },
        }),
    };
    let max_message = state.session.max_message_bytes;
    // One box for what the connection needs once upgraded: the closure's captures stay in the
    // connection's task for as long as it lives.
    let parts = Box::new((state, room, peer, verdict, slot));
    ws.on_upgrade(token::SUBPROTOCOL, max_message, move |socket| {
        let (state, room, peer, verdict, slot) = *parts;
        let HttpState {
            hub,
            session,
            connections,
            auth,
            ..
        } = state;
        let readonly_awareness = auth.settings().readonly_awareness;
        connections.track_future(session::serve(
            socket,
            hub,
            session,
            session::Admission {
                room,
                peer,
                verdict,
                readonly_awareness,
                slot,
            },
        ))
    })
}
