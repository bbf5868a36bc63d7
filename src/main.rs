//! The `tandem` binary: flags (each also an env var `TANDEM_<NAME>`) -> Config -> App.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tandem::app::App;
use tandem::config::Config;
use tandem::ids::NodeId;
use tandem::telemetry::{self, TelemetryConfig};
use tracing::info;

/// tandem: a real-time collaboration server for stock Yjs clients (y-websocket protocol).
///
/// Serves `ws://BIND/{room}`; stores documents in SQLite under --data-dir unless --database-url
/// says otherwise. Logs go to stderr; RUST_LOG filters them (default `info`).
#[derive(Debug, Parser)]
#[command(name = "tandem", version, about, long_about)]
struct Args {
    /// Address for WebSocket and HTTP.
    #[arg(long, env = "TANDEM_BIND", default_value = "127.0.0.1:1234")]
    bind: SocketAddr,

    /// Directory of the embedded SQLite store (`tandem.db` inside it).
    #[arg(long, env = "TANDEM_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,

    /// `postgres://USER@HOST/DB` to store in Postgres (for several nodes), or `sqlite://PATH` to
    /// store elsewhere than the data dir.
    #[arg(long, env = "TANDEM_DATABASE_URL")]
    database_url: Option<String>,

    /// This node's name in logs and stored update origins [default: random].
    #[arg(long, env = "TANDEM_NODE_ID")]
    node_id: Option<String>,

    /// `redis://HOST:PORT` (or `redis-cluster://HOST:PORT`) enables fan-out across nodes;
    /// without it the node is alone.
    #[arg(long, env = "TANDEM_REDIS_URL")]
    redis_url: Option<String>,

    /// Use sharded pub/sub (SSUBSCRIBE/SPUBLISH, Redis 7+) for room channels: for Redis Cluster.
    #[arg(long, env = "TANDEM_REDIS_SHARDED")]
    redis_sharded: bool,

    /// Log format on stderr.
    #[arg(long, env = "TANDEM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// OpenTelemetry collector (OTLP/HTTP, `http://HOST:4318`): spans are exported in batches to
    /// URL/v1/traces. Needs a build with `--features otlp`.
    #[arg(long, env = "TANDEM_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,

    /// Largest WebSocket message accepted, in bytes; larger ones close the connection with 1009.
    #[arg(long, env = "TANDEM_MAX_MESSAGE_SIZE", default_value_t = 16 << 20)]
    max_message_size: usize,

    /// Bytes that may wait for one slow connection before it is closed with 1013.
    #[arg(long, env = "TANDEM_OUTBOX_LIMIT", default_value_t = 32 << 20)]
    outbox_limit: usize,

    /// How often connections are pinged; one silent for a whole interval is closed.
    #[arg(long, env = "TANDEM_PING_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    ping_interval: Duration,

    /// How long a room without connections stays in memory once everything is stored.
    #[arg(long, env = "TANDEM_ROOM_IDLE_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    room_idle_grace: Duration,

    /// Fold a room's update log into a snapshot once it holds this many updates.
    #[arg(long, env = "TANDEM_COMPACT_UPDATES", default_value_t = 500)]
    compact_updates: usize,

    /// ... or this many bytes.
    #[arg(long, env = "TANDEM_COMPACT_BYTES", default_value_t = 1 << 20)]
    compact_bytes: usize,

    /// How long the store writer keeps collecting updates for one commit after the first
    /// arrives, when it is idle and updates come closer together than this (while a commit
    /// runs, the next one collects anyway; an update after a quieter spell is committed at
    /// once). Longer windows put more updates in each commit and its sync, for less CPU and I/O
    /// per update, and delay acknowledgements by up to the window. At most 1 s.
    #[arg(long, env = "TANDEM_COMMIT_WINDOW", default_value = "2ms", value_parser = humantime::parse_duration)]
    commit_window: Duration,

    /// Send each connection its own updates back once they are stored (y-websocket v4
    /// providers count that echo as "synced"; their sync status then means stored).
    #[arg(long, env = "TANDEM_ECHO_OWN_UPDATES")]
    echo_own_updates: bool,

    /// How long a graceful shutdown (SIGINT/SIGTERM) may take to flush and close.
    #[arg(long, env = "TANDEM_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    shutdown_timeout: Duration,

    /// Shared secret (at least 32 bytes) for HS256/HS384/HS512 tokens.
    #[arg(long, env = "TANDEM_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,

    /// PEM public key (RSA, EC P-256/P-384, Ed25519) or JWKS file; repeat for several, or
    /// separate with commas in the env var. Reloaded on SIGHUP.
    #[arg(long, env = "TANDEM_JWT_KEYS", value_delimiter = ',')]
    jwt_keys: Vec<PathBuf>,

    /// Required `iss` claim.
    #[arg(long, env = "TANDEM_JWT_ISSUER")]
    jwt_issuer: Option<String>,

    /// Required `aud` claim (the token's audience must include it).
    #[arg(long, env = "TANDEM_JWT_AUDIENCE")]
    jwt_audience: Option<String>,

    /// Serve without tokens on a non-loopback address (everyone may read and write every room).
    #[arg(long, env = "TANDEM_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,

    /// Whether read-only connections may publish presence (awareness).
    #[arg(long, env = "TANDEM_READONLY_AWARENESS", default_value_t = true, action = clap::ArgAction::Set)]
    readonly_awareness: bool,

    /// Browser origins allowed to open WebSockets (`https://app.example.com`); repeat or
    /// separate with commas. Upgrades from other origins get 403. Default: any origin.
    #[arg(long, env = "TANDEM_ALLOW_ORIGIN", value_delimiter = ',')]
    allow_origin: Vec<String>,

    /// Largest document in encoded bytes; writes past it close the writer with 1009. 0: no limit.
    #[arg(long, env = "TANDEM_MAX_DOCUMENT_SIZE", default_value_t = 64 << 20)]
    max_document_size: usize,

    /// Connections one room serves at once on this node (1013 beyond). 0: no limit.
    #[arg(long, env = "TANDEM_MAX_CONNECTIONS_PER_ROOM", default_value_t = 5000)]
    max_connections_per_room: usize,

    /// Connections open at once from one client address (1013 beyond). 0: no limit. Behind a
    /// proxy every client has the proxy's address: set 0 there and limit at the proxy.
    #[arg(long, env = "TANDEM_MAX_CONNECTIONS_PER_IP", default_value_t = 1024)]
    max_connections_per_ip: usize,

    /// Rooms loaded at once on this node (joins of new rooms get 1013 beyond). 0: no limit.
    #[arg(long, env = "TANDEM_MAX_ROOMS", default_value_t = 100_000)]
    max_rooms: usize,

    /// WebSocket messages a connection may send per second (4429 beyond; bursts of twice as
    /// many pass). 0: no limit.
    #[arg(long, env = "TANDEM_RATE_MESSAGES", default_value_t = 500)]
    rate_messages: u64,

    /// Bytes a connection may send per second (4429 beyond). 0: no limit.
    #[arg(long, env = "TANDEM_RATE_BYTES", default_value_t = 16 << 20)]
    rate_bytes: u64,

    /// Time allowed between connecting and the first valid message (1008 after it).
    #[arg(long, env = "TANDEM_FIRST_MESSAGE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    first_message_timeout: Duration,

    /// A connection that sends nothing for this long is closed with 1001. `0s`: never.
    #[arg(long, env = "TANDEM_IDLE_TIMEOUT", default_value = "15m", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

impl Args {
    fn into_config(self) -> Config {
        let mut c = Config {
            bind: self.bind,
            data_dir: self.data_dir,
            database_url: self.database_url,
            node_id: self.node_id.map_or_else(NodeId::random, NodeId::new),
            redis_url: self.redis_url,
            redis_sharded: self.redis_sharded,
            shutdown_timeout: self.shutdown_timeout,
            ..Config::default()
        };
        c.session.max_message_bytes = self.max_message_size;
        c.session.outbox_bytes = self.outbox_limit;
        c.session.ping_interval = self.ping_interval;
        c.session.first_message_timeout = self.first_message_timeout;
        c.session.idle_timeout = (!self.idle_timeout.is_zero()).then_some(self.idle_timeout);
        c.session.rate_messages = self.rate_messages;
        c.session.rate_bytes = self.rate_bytes;
        c.session.max_connections_per_address = self.max_connections_per_ip;
        c.rooms.max_peers = self.max_connections_per_room;
        c.rooms.max_rooms = self.max_rooms;
        c.rooms.max_document_bytes = self.max_document_size;
        c.auth.keys.secret = self.jwt_secret;
        c.auth.keys.files = self.jwt_keys;
        c.auth.issuer = self.jwt_issuer;
        c.auth.audience = self.jwt_audience;
        c.auth.insecure_no_auth = self.insecure_no_auth;
        c.auth.readonly_awareness = self.readonly_awareness;
        c.auth.allowed_origins = self.allow_origin;
        c.rooms.idle_grace = self.room_idle_grace;
        c.rooms.echo_own_updates = self.echo_own_updates;
        c.writer.window = self.commit_window;
        c.rooms.compaction.max_updates = self.compact_updates;
        c.rooms.compaction.max_bytes = self.compact_bytes;
        c
    }
}

fn init_telemetry(
    format: LogFormat,
    otlp_endpoint: Option<&str>,
    node_id: &NodeId,
) -> anyhow::Result<telemetry::Telemetry> {
    telemetry::init(&TelemetryConfig {
        log_format: match format {
            LogFormat::Text => telemetry::LogFormat::Text,
            LogFormat::Json => telemetry::LogFormat::Json,
        },
        otlp_endpoint,
        node_id: node_id.as_str(),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    return_large_buffers_to_the_os();
    let args = Args::parse();
    let (log_format, otlp_endpoint) = (args.log_format, args.otlp_endpoint.clone());
    let config = args.into_config();
    let telemetry = init_telemetry(log_format, otlp_endpoint.as_deref(), &config.node_id)?;
    config.validate().context("invalid configuration")?;
    let bind = config.bind;
    let app = App::open(config).await.context("opening the store")?;
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .with_context(|| format!("binding {bind}"))?;
    let running = app.start(listener).context("starting the server")?;
    #[cfg(unix)]
    reload_keys_on_sighup(running.authenticator())?;
    let token = running.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("signal received");
        token.cancel();
    });
    running.wait().await;
    // After the graceful shutdown: its spans are the last ones exported.
    telemetry.shutdown().await;
    Ok(())
}

/// SIGHUP reads the JWT key files again; a file that fails to load keeps the old keys.
#[cfg(unix)]
fn reload_keys_on_sighup(auth: std::sync::Arc<tandem::auth::Authenticator>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            if !auth.enabled() {
                info!("SIGHUP: no JWT keys configured, nothing to reload");
                continue;
            }
            match auth.reload() {
                Ok(n) => info!(keys = n, "SIGHUP: JWT keys reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: JWT keys not reloaded; the old keys stay in use")
                }
            }
        }
    });
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Makes glibc serve every allocation of 256 KiB or more with its own mapping, unmapped when
/// freed. Its default threshold rises to the size of the largest block freed (up to 32 MiB), after
/// which such blocks come from the heap and stay in the process: a join storm on a 1 MB document
/// (a connection's write buffer grows to the largest message it sends) left 905 MiB resident after
/// every client had gone (docs/benchmarks.md).
fn return_large_buffers_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter, under glibc's own lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}
