//! `--otlp-endpoint` (cargo feature `otlp`): a real `tandem` process exports its spans over
//! OTLP/HTTP (protobuf) to a collector stand-in in this test, and flushes them at shutdown.
//!
//! `cargo nextest run --features otlp --test otlp`
#![cfg(feature = "otlp")]

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use prost::Message as _;
use tandem_client::{Client, ClientOptions};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(20);
const NODE: &str = "otlp-node";
const ROOM: &str = "traced";

/// One POST the collector received: its content type and body.
type Received = Arc<Mutex<Vec<(String, Bytes)>>>;

/// An OTLP/HTTP collector stand-in on 127.0.0.1:0: records every POST /v1/traces and answers
/// with an empty `ExportTraceServiceResponse`.
async fn collector() -> (std::net::SocketAddr, Received) {
    async fn traces(
        State(received): State<Received>,
        headers: HeaderMap,
        body: Bytes,
    ) -> (StatusCode, [(header::HeaderName, &'static str); 1], Vec<u8>) {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        received.lock().unwrap().push((content_type, body));
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            Vec::new(),
        )
    }
    let received = Received::default();
    let app = Router::new()
        .route("/v1/traces", post(traces))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, received)
}

fn string_attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        }
    })
}

#[tokio::test]
async fn spans_are_exported_over_otlp_http_and_flushed_at_shutdown() {
    let (collector_addr, received) = collector().await;
    let data_dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["--bind", "127.0.0.1:0", "--node-id", NODE, "--data-dir"])
        .arg(data_dir.path())
        .args(["--otlp-endpoint", &format!("http://{collector_addr}")])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        // No export before shutdown: what arrives was flushed by it.
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tandem");

    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    let addr = timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            log.push(line.clone());
            if let Some(rest) = line.split("listening on ").nth(1) {
                return rest.split_whitespace().next().map(str::to_owned);
            }
        }
        None
    })
    .await
    .unwrap_or_else(|_| panic!("tandem not listening in time:\n{}", log.join("\n")))
    .unwrap_or_else(|| panic!("tandem exited before listening:\n{}", log.join("\n")));
    // Keep draining stderr (and keep it for failure messages).
    let log = Arc::new(Mutex::new(log));
    let tail = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            tail.lock().unwrap().push(line);
        }
    });

    let options = ClientOptions {
        acknowledgements: true,
        ..ClientOptions::default()
    };
    let client = Client::connect_with(&format!("ws://{addr}/{ROOM}"), options)
        .await
        .unwrap();
    client.wait_synced(WAIT).await.unwrap();
    {
        use yrs::{Text, Transact};
        let text = client.doc().get_or_insert_text("t");
        let mut txn = client.doc().transact_mut();
        text.insert(&mut txn, 0, "traced edit");
    }
    client.wait_stored(WAIT).await.unwrap();
    client.close().await.unwrap();
    assert!(
        received.lock().unwrap().is_empty(),
        "exported before shutdown despite OTEL_BSP_SCHEDULE_DELAY"
    );

    let pid = child.id().expect("tandem pid").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success(), "kill -TERM {pid}");
    let status = timeout(WAIT, child.wait())
        .await
        .expect("tandem did not exit after SIGTERM")
        .unwrap();
    let logs = || log.lock().unwrap().join("\n");
    assert!(status.success(), "tandem exited with {status}:\n{}", logs());

    let received = received.lock().unwrap().clone();
    assert!(
        !received.is_empty(),
        "the collector received nothing:\n{}",
        logs()
    );
    let mut conn_spans = Vec::new();
    let mut span_names = Vec::new();
    for (content_type, body) in &received {
        assert_eq!(content_type, "application/x-protobuf");
        let request = ExportTraceServiceRequest::decode(body.as_ref()).expect("OTLP protobuf");
        for resource_spans in &request.resource_spans {
            let resource = resource_spans.resource.as_ref().expect("resource");
            assert_eq!(
                string_attr(&resource.attributes, "service.name"),
                Some("tandem")
            );
            assert_eq!(
                string_attr(&resource.attributes, "service.instance.id"),
                Some(NODE)
            );
            for scope_spans in &resource_spans.scope_spans {
                for span in &scope_spans.spans {
                    span_names.push(span.name.clone());
                    if span.name == "conn" {
                        conn_spans.push(span.clone());
                    }
                }
            }
        }
    }
    assert_eq!(
        conn_spans.len(),
        1,
        "one `conn` span expected; spans: {span_names:?}"
    );
    let conn = &conn_spans[0];
    assert_eq!(string_attr(&conn.attributes, "room"), Some(ROOM));
    assert!(
        conn.end_time_unix_nano >= conn.start_time_unix_nano && conn.start_time_unix_nano > 0,
        "conn span times: {conn:?}"
    );
    assert!(
        span_names.iter().any(|n| n == "room"),
        "no `room` span; spans: {span_names:?}"
    );
}
