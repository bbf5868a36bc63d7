//! The HTTP surface: health, readiness, metrics, and refusals before the upgrade.

mod common;

use common::{TestServer, WAIT};
use tandem_client::Client;

/// A plain HTTP/1.1 GET; returns the status code and the body.
async fn get(server: &TestServer, path: &str) -> (u16, String) {
    common::http_get(server.running().local_addr(), path).await
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let server = TestServer::start().await;
    assert_eq!(get(&server, "/healthz").await.0, 200);
    let (status, body) = get(&server, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""ready":true"#), "{body}");
    assert!(body.contains(r#""store":"ok""#), "{body}");
}

#[tokio::test]
async fn metrics_count_connections_and_updates() {
    let server = TestServer::start().await;
    let c = Client::connect(&server.url("metered")).await.unwrap();
    c.wait_synced(WAIT).await.unwrap();
    common::append_text(c.doc(), "t", "x");
    c.wait_stored(WAIT).await.unwrap();
    let (status, body) = get(&server, "/metrics").await;
    assert_eq!(status, 200);
    // Every sample line is `name{labels} value` with a numeric value.
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad sample line {line:?}");
    }
    let sample = |name: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no sample {name}"))
    };
    // The process-wide counters are shared by every test in this binary: at least ours.
    assert!(sample("tandem_connections_opened_total") >= 1.0);
    assert!(sample("tandem_updates_applied_total") >= 1.0);
    assert!(sample("tandem_rooms_loaded") >= 1.0);
}

#[tokio::test]
async fn rooms_may_share_a_name_with_the_http_endpoints() {
    let server = TestServer::start().await;
    let a = Client::connect(&server.url("metrics")).await.unwrap();
    let b = Client::connect(&server.url("metrics")).await.unwrap();
    a.wait_synced(WAIT).await.unwrap();
    common::append_text(a.doc(), "t", "a room, not the endpoint");
    b.wait_until(WAIT, |d| common::text(d, "t") == "a room, not the endpoint")
        .await
        .unwrap();
    assert_eq!(get(&server, "/metrics").await.0, 200);
}

#[tokio::test]
async fn bad_room_names_are_refused_before_the_upgrade() {
    let server = TestServer::start().await;
    let long = "x".repeat(600);
    let err = tokio_tungstenite::connect_async(server.url(&long))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");
}

/// Sends `head` (a request without its final blank line) and returns the status code.
async fn status_of(server: &TestServer, head: &str) -> u16 {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(server.running().local_addr())
        .await
        .unwrap();
    let mut tcp = tokio::io::BufReader::new(tcp);
    tcp.get_mut()
        .write_all(format!("{head}Host: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut line = String::new();
    tokio::time::timeout(WAIT, tcp.read_line(&mut line))
        .await
        .expect("response in time")
        .unwrap();
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line")
}

#[tokio::test]
async fn requests_that_are_not_websocket_upgrades_get_the_matching_status() {
    let server = TestServer::start().await;
    // A plain GET on a room: 426 Upgrade Required.
    assert_eq!(get(&server, "/some-room").await.0, 426);
    // Not GET: 405.
    assert_eq!(
        status_of(&server, "POST /some-room HTTP/1.1\r\n").await,
        405
    );
    // An upgrade with another WebSocket version, or without a key: 400.
    let upgrade = "GET /some-room HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    assert_eq!(
        status_of(&server, &format!("{upgrade}Sec-WebSocket-Version: 8\r\n")).await,
        400
    );
    assert_eq!(
        status_of(
            &server,
            "GET /some-room HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\n"
        )
        .await,
        400
    );
    // The server still answers a real client.
    let client = Client::connect(&server.url("some-room")).await.unwrap();
    client.wait_synced(WAIT).await.unwrap();
}
