//! HTTP surface: the WebSocket upgrade on `/{room}`, health, readiness and metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::broker::Broker;
use crate::hub::Hub;
use crate::ids::RoomId;
use crate::metrics::METRICS;
use crate::session::{self, SessionSettings};
use crate::store::writer::WriterStats;
use crate::store::DynStore;

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
    /// Per-connection limits.
    pub session: Arc<SessionSettings>,
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
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let path = uri.path();
    if let Ok(ws) = ws {
        return upgrade_room(state, path.trim_start_matches('/'), peer, ws);
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
    let writes = if state.writer.is_failing() {
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
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade_room(state, &room, peer, ws)
}

fn upgrade_room(state: HttpState, room: &str, peer: SocketAddr, ws: WebSocketUpgrade) -> Response {
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    let room = match RoomId::new(room) {
        Ok(room) => room,
        Err(e) => {
            debug!(error = %e, "bad room name");
            return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response();
        }
    };
    let s = &state.session;
    ws.read_buffer_size(s.read_buffer_bytes)
        .write_buffer_size(s.write_buffer_bytes)
        .max_message_size(s.max_message_bytes)
        .max_frame_size(s.max_message_bytes)
        .on_upgrade(move |socket| {
            let HttpState {
                hub,
                session,
                connections,
                ..
            } = state;
            connections.track_future(session::serve(socket, hub, session, room, peer))
        })
}
