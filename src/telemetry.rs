//! Logs and traces: the `tracing` subscriber of the binary.
//!
//! Logs go to stderr as text or JSON, filtered by `RUST_LOG` (default `info`). With the cargo
//! feature `otlp` and an endpoint, the same spans (`conn` per connection, `room` per room, with
//! their events) are also exported in batches over OTLP/HTTP (protobuf) to `ENDPOINT/v1/traces`,
//! as service `tandem` with the node id as `service.instance.id`. `RUST_LOG` decides which spans
//! exist, so it decides what is exported too. The `conn` span is at `info` when spans are
//! exported and at `debug` otherwise: kept only for log context, it would cost each idle
//! connection about 490 bytes, so a connection's own `info` and `warn` lines carry its fields.

use std::sync::atomic::{AtomicBool, Ordering};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How logs are written on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// For people.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// What the subscriber needs to know.
#[derive(Debug, Clone)]
pub struct TelemetryConfig<'a> {
    /// The log format on stderr.
    pub log_format: LogFormat,
    /// The OTLP/HTTP collector (`http://HOST:4318`), if spans are to be exported.
    pub otlp_endpoint: Option<&'a str>,
    /// This node's id: `service.instance.id` of the exported spans.
    pub node_id: &'a str,
}

/// The installed subscriber's exporter, if any: [`Telemetry::shutdown`] flushes it.
#[must_use = "call shutdown() at exit, or spans still waiting in the batch are lost"]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

/// Whether the installed subscriber exports spans (an OTLP endpoint was given).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported, so that spans kept only for log context may be made cheaper
/// when they are not: see the connection's span in `session::conn`.
pub fn exporting_spans() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Installs the global subscriber. With an OTLP endpoint it must run inside a Tokio runtime,
/// which then carries the export requests. Fails if an endpoint is given to a binary built
/// without the `otlp` feature, or if the endpoint is unusable.
pub fn init(config: &TelemetryConfig<'_>) -> anyhow::Result<Telemetry> {
    let (otlp, telemetry) = otlp_layer(config)?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // The filter is global: what it leaves out is neither logged nor exported.
    let subscriber = tracing_subscriber::registry().with(otlp).with(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => subscriber.with(fmt).try_init(),
        LogFormat::Json => subscriber.with(fmt.json()).try_init(),
    }
    .map_err(|e| anyhow::anyhow!("installing the tracing subscriber: {e}"))?;
    EXPORTING.store(config.otlp_endpoint.is_some(), Ordering::Relaxed);
    Ok(telemetry)
}

type BoxedLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

#[cfg(not(feature = "otlp"))]
fn otlp_layer(config: &TelemetryConfig<'_>) -> anyhow::Result<(Option<BoxedLayer>, Telemetry)> {
    if config.otlp_endpoint.is_some() {
        anyhow::bail!(
            "--otlp-endpoint: built without the `otlp` feature; rebuild with \
             `cargo build --features otlp`"
        );
    }
    Ok((None, Telemetry {}))
}

#[cfg(feature = "otlp")]
fn otlp_layer(config: &TelemetryConfig<'_>) -> anyhow::Result<(Option<BoxedLayer>, Telemetry)> {
    let Some(endpoint) = config.otlp_endpoint else {
        return Ok((None, Telemetry { provider: None }));
    };
    let (layer, provider) = otlp::layer(endpoint, config.node_id)?;
    Ok((
        Some(layer),
        Telemetry {
            provider: Some(provider),
        },
    ))
}

impl Telemetry {
    /// Exports the spans still waiting (up to 5 s) and stops the exporter; call it once the
    /// server has shut down. Without an exporter it does nothing.
    pub async fn shutdown(self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider {
            // Shutting down blocks until the last batch is sent, and sending it needs this
            // runtime: block a blocking-pool thread, not a worker.
            let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "OTLP exporter: spans not flushed at shutdown")
                }
                Err(e) => tracing::warn!(error = %e, "OTLP exporter: shutdown failed"),
            }
        }
    }
}

/// `ENDPOINT/v1/traces` (unless it already ends so).
pub fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

#[cfg(feature = "otlp")]
mod otlp {
    use std::time::Duration;

    use anyhow::Context;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full, Limited};
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry::KeyValue;
    use opentelemetry_http::{HttpClient, HttpError, Request, Response};
    use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use opentelemetry_sdk::Resource;
    use tracing_subscriber::Layer;

    use super::BoxedLayer;

    /// How long one export request may take, answer included.
    const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
    /// Largest collector answer read (the OTLP answer is a small protobuf).
    const MAX_RESPONSE_BYTES: usize = 1 << 20;

    pub(super) fn layer(
        endpoint: &str,
        node_id: &str,
    ) -> anyhow::Result<(BoxedLayer, SdkTracerProvider)> {
        if !endpoint.starts_with("http://") {
            anyhow::bail!(
                "--otlp-endpoint: expected http://HOST:PORT (OTLP/HTTP without TLS), got {endpoint:?}"
            );
        }
        let url = super::traces_url(endpoint);
        let runtime = tokio::runtime::Handle::try_current()
            .context("--otlp-endpoint: the exporter needs a Tokio runtime")?;
        let client = TokioHttpClient {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
            runtime,
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .context("--otlp-endpoint: building the OTLP exporter")?;
        let resource = Resource::builder()
            .with_service_name("tandem")
            .with_attribute(KeyValue::new("service.instance.id", node_id.to_owned()))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("tandem"))
            .boxed();
        Ok((layer, provider))
    }

    /// OTLP/HTTP requests over hyper (HTTP/1.1, plain TCP). The batch processor exports from its
    /// own thread outside the runtime, so each request runs as a task on the server's runtime.
    #[derive(Debug, Clone)]
    struct TokioHttpClient {
        client: Client<HttpConnector, Full<Bytes>>,
        runtime: tokio::runtime::Handle,
    }

    #[async_trait::async_trait]
    impl HttpClient for TokioHttpClient {
        async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
            let client = self.client.clone();
            let send = async move {
                let (parts, body) = request.into_parts();
                let response = client
                    .request(Request::from_parts(parts, Full::new(body)))
                    .await?;
                let (parts, body) = response.into_parts();
                let body = Limited::new(body, MAX_RESPONSE_BYTES)
                    .collect()
                    .await?
                    .to_bytes();
                Ok::<_, HttpError>(Response::from_parts(parts, body))
            };
            let task = self
                .runtime
                .spawn(async move { tokio::time::timeout(EXPORT_TIMEOUT, send).await });
            match task.await? {
                Ok(result) => result,
                Err(_) => Err(format!("no answer within {EXPORT_TIMEOUT:?}").into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::traces_url;

    #[test]
    fn traces_url_appends_the_signal_path_once() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/otlp/v1/traces"),
            "http://collector:4318/otlp/v1/traces"
        );
    }
}
