//! Test harness: a real tandem node on port 0 (shut down on drop), raw WebSocket clients for
//! hostile input, and helpers to read documents.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tandem::app::{App, Running};
use tandem::config::Config;
use tandem::store::sqlite::SqliteStore;
use tandem::store::DynStore;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use yrs::{GetString, ReadTxn, Transact};

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(15);

/// A tandem node on 127.0.0.1:0 with its own data directory.
pub struct TestServer {
    running: Option<Running>,
    addr: std::net::SocketAddr,
    config: Config,
    /// Kept so the directory outlives restarts; removed on drop.
    dir: tempfile::TempDir,
}

impl TestServer {
    /// A node with default settings and a fresh SQLite store.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A node whose configuration `tweak` adjusts.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config {
            bind: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        tweak(&mut config);
        let running = launch(config.clone()).await;
        let addr = running.local_addr();
        Self {
            running: Some(running),
            addr,
            config,
            dir,
        }
    }

    /// `ws://127.0.0.1:PORT/room`.
    pub fn url(&self, room: &str) -> String {
        format!("ws://{}/{}", self.addr, room)
    }

    /// `http://127.0.0.1:PORT/path`.
    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The running node.
    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("server running")
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Graceful shutdown, waiting until every room has flushed.
    pub async fn shutdown(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// Graceful shutdown, then a new node on the same data directory (on a new port).
    pub async fn restart(&mut self) {
        self.shutdown().await;
        let running = launch(self.config.clone()).await;
        self.addr = running.local_addr();
        self.running = Some(running);
    }

    /// Opens the node's SQLite file as a second store, to look at what is durable.
    pub async fn open_store(&self) -> DynStore {
        std::sync::Arc::new(
            SqliteStore::open(&self.dir.path().join("tandem.db"))
                .await
                .unwrap(),
        )
    }
}

async fn launch(config: Config) -> Running {
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .expect("bind");
    App::open(config)
        .await
        .expect("open store")
        .start(listener)
        .expect("start")
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(r) = &self.running {
            r.shutdown_token().cancel();
        }
    }
}

/// A raw WebSocket for sending bytes the stock clients never would.
pub type Raw = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a raw WebSocket to `url`.
pub async fn raw(url: &str) -> Raw {
    tokio_tungstenite::connect_async(url)
        .await
        .expect("connect")
        .0
}

/// Sends one binary frame.
pub async fn send_binary(ws: &mut Raw, bytes: Vec<u8>) {
    ws.send(Message::binary(bytes)).await.expect("send");
}

/// Reads until the server's close frame and returns its code and reason.
pub async fn expect_close(ws: &mut Raw) -> (u16, String) {
    let read = async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Close(Some(frame))) => {
                    return (u16::from(frame.code), frame.reason.to_string());
                }
                Ok(Message::Close(None)) => return (u16::from(WsCloseCode::Status), String::new()),
                Ok(_) => continue,
                Err(e) => panic!("socket error before a close frame: {e}"),
            }
        }
        panic!("socket ended without a close frame");
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("close frame in time")
}

/// The text of root `Y.Text` `name`.
pub fn text(doc: &yrs::Doc, name: &str) -> String {
    let t = doc.get_or_insert_text(name);
    t.get_string(&doc.transact())
}

/// Inserts `s` at the end of root `Y.Text` `name`.
pub fn append_text(doc: &yrs::Doc, name: &str, s: &str) {
    use yrs::Text;
    let t = doc.get_or_insert_text(name);
    let mut txn = doc.transact_mut();
    let len = t.len(&txn);
    t.insert(&mut txn, len, s);
}

/// The whole document as one v1 update.
pub fn full_state(doc: &yrs::Doc) -> Vec<u8> {
    doc.transact()
        .encode_state_as_update_v1(&yrs::StateVector::default())
}

/// `GET path` on `addr` over HTTP/1.1: the status code and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.expect("send request");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .expect("read response");
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Path of the built `tandem` binary.
pub fn tandem_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tandem"))
}

/// Several nodes in one process sharing one in-process bus and one store: the cross-node paths
/// without Redis.
pub struct TestCluster {
    nodes: Vec<Option<Running>>,
    addrs: Vec<std::net::SocketAddr>,
    ids: Vec<tandem::ids::NodeId>,
    bus: tandem::broker::memory::MemoryBus,
    store: DynStore,
    dir: tempfile::TempDir,
}

impl TestCluster {
    /// `n` nodes named `node-0` … on one bus and one SQLite store.
    pub async fn start(n: usize) -> Self {
        Self::start_with(n, |_| {}).await
    }

    /// Like [`TestCluster::start`], with every node's configuration adjusted by `tweak`.
    pub async fn start_with(n: usize, tweak: impl Fn(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: DynStore = std::sync::Arc::new(
            SqliteStore::open(&dir.path().join("tandem.db"))
                .await
                .unwrap(),
        );
        let bus = tandem::broker::memory::MemoryBus::new();
        let mut cluster = Self {
            nodes: Vec::new(),
            addrs: Vec::new(),
            ids: Vec::new(),
            bus,
            store,
            dir,
        };
        for i in 0..n {
            let mut config = Config {
                bind: "127.0.0.1:0".parse().unwrap(),
                data_dir: cluster.dir.path().to_path_buf(),
                node_id: tandem::ids::NodeId::new(format!("node-{i}")),
                ..Config::default()
            };
            tweak(&mut config);
            let listener = tokio::net::TcpListener::bind(config.bind).await.unwrap();
            cluster.ids.push(config.node_id.clone());
            let running = App::with_store(config, cluster.store.clone())
                .with_bus(&cluster.bus)
                .start(listener)
                .unwrap();
            cluster.addrs.push(running.local_addr());
            cluster.nodes.push(Some(running));
        }
        cluster
    }

    /// `ws://…/room` on node `i`.
    pub fn url(&self, i: usize, room: &str) -> String {
        format!("ws://{}/{}", self.addrs[i], room)
    }

    /// The shared store.
    pub fn store(&self) -> &DynStore {
        &self.store
    }

    /// Cuts node `i` off the bus (`false`) or reconnects it (`true`).
    pub fn set_connected(&self, i: usize, connected: bool) {
        self.bus.set_connected(&self.ids[i], connected);
    }

    /// Node `i`, while it runs.
    pub fn running(&self, i: usize) -> &Running {
        self.nodes[i].as_ref().expect("node running")
    }

    /// Graceful shutdown of node `i`.
    pub async fn shutdown(&mut self, i: usize) {
        if let Some(r) = self.nodes[i].take() {
            r.shutdown().await;
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for r in self.nodes.iter().flatten() {
            r.shutdown_token().cancel();
        }
    }
}
