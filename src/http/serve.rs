//! The accept loop: every TCP connection served by hyper's HTTP/1.1 server, with upgrades.
//!
//! Ours rather than `axum::serve`, whose connection sniffs for HTTP/2 behind a wrapper that
//! hyper then hands to the upgrade: with the plain TCP stream underneath, the WebSocket layer
//! gets the socket itself back ([`super::upgrade`]) and the room writes to it directly.

use std::io;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;
use tracing::{debug, warn};

/// What the HTTP server runs on: the TCP stream, wrapped for hyper. An upgraded connection is
/// taken back as this type.
pub type ServedIo = TokioIo<TcpStream>;

/// How long a client may take to send a request's head (slow clients hold a socket each).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `router` on `listener` until `shutdown`, then waits up to `grace` for requests in
/// progress (upgraded connections are no longer hyper's and are not waited for here).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let open = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    on_accept_error(&e).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // Frames leave as soon as they are written: without TCP_NODELAY, Nagle's algorithm holds
        // a small frame back while an earlier one is unacknowledged (up to the client's delayed
        // ACK, tens of milliseconds).
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(error = %e, "TCP_NODELAY not set");
        }
        let router = router.clone();
        let service = service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let mut router = router.clone();
            async move { router.call(req).await }
        });
        let conn = http
            .serve_connection(TokioIo::new(tcp), service)
            .with_upgrades();
        let shutdown = shutdown.clone();
        open.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                () = shutdown.cancelled() => {
                    // Finishes the request in progress, then closes (an idle keep-alive
                    // connection closes at once).
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    open.close();
    if tokio::time::timeout(grace, open.wait()).await.is_err() {
        warn!("some HTTP requests did not finish before the shutdown deadline");
    }
}

/// A failed accept: the connection's own failure is skipped; anything else (out of file
/// descriptors, say) is logged and the loop pauses, rather than spinning on it.
async fn on_accept_error(e: &io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    warn!(error = %e, "accept failed; pausing 100 ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
