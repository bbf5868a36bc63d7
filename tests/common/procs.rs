//! Real processes and real servers for multi-node tests: `tandem` processes (SIGKILLed when
//! dropped), private `redis-server` processes, a fresh Postgres database per test (dropped with
//! any connection left to it) and a TCP proxy whose switch cuts a node off Postgres.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::{Connection, Executor};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::{sleep, timeout, Instant};

/// How long any single wait in these helpers may take before the test fails.
pub const PROC_WAIT: Duration = Duration::from_secs(20);

const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The Postgres server tests create their databases on (`TANDEM_TEST_POSTGRES_URL`).
pub fn postgres_admin_url() -> String {
    std::env::var("TANDEM_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned())
}

/// `url` with its database name replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority..].find('/') {
        Some(slash) => &base[..authority + slash],
        None => base,
    };
    format!("{base}/{database}{query}")
}

/// `url` with its host and port replaced by `addr` (to go through a proxy).
pub fn with_host(url: &str, addr: SocketAddr) -> String {
    let authority = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[authority..];
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let hostport = &rest[..end];
    let userinfo = hostport.rfind('@').map_or("", |at| &hostport[..=at]);
    format!("{}{userinfo}{addr}{}", &url[..authority], &rest[end..])
}

/// The host and port of a `postgres://` URL (default port 5432).
pub fn postgres_addr(url: &str) -> String {
    let authority = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[authority..];
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let hostport = &rest[..end];
    let hostport = hostport
        .rfind('@')
        .map_or(hostport, |at| &hostport[at + 1..]);
    if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5432")
    }
}

/// A fresh database for one test; dropped, with any connection left to it, when this is.
pub struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let admin_url = postgres_admin_url();
        let mut admin = timeout(
            Duration::from_secs(10),
            sqlx::PgConnection::connect(&admin_url),
        )
        .await
        .map_err(|_| "timed out after 10 s".to_owned())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .unwrap_or_else(|e| {
            panic!(
                "multi-node tests need a Postgres server: cannot connect to {admin_url}: {e}\n\
                 Start one (scripts/test.sh does), or point TANDEM_TEST_POSTGRES_URL at one."
            )
        });
        let name = format!("tandem_test_{:016x}", rand::random::<u64>());
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        let _ = admin.close().await;
        let url = with_database(&admin_url, &name);
        Self {
            admin_url,
            name,
            url,
        }
    }

    /// `postgres://…/tandem_test_…`.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop cannot await, and blocking the test's runtime would panic: drop the database from
        // a thread and a runtime of our own.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let mut admin = sqlx::PgConnection::connect(&admin_url)
                    .await
                    .map_err(|e| e.to_string())?;
                admin
                    .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = admin.close().await;
                Ok::<(), String>(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            // Not a panic: this may run while a failed test unwinds.
            eprintln!(
                "warning: test database {} was not dropped: {dropped:?}",
                self.name
            );
        }
    }
}

/// A port with nothing listening on it (nor on a Redis Cluster bus port, `port + 10000`). Both
/// are below Linux's ephemeral range (32768 and up), so no outgoing connection takes them
/// meanwhile.
pub fn free_port() -> u16 {
    loop {
        let port = 10000 + rand::random::<u16>() % 12000;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10000) {
            return port;
        }
    }
}

/// A private `redis-server` (no persistence), killed (SIGKILL) when dropped.
pub struct RedisProcess {
    child: Child,
    port: u16,
}

impl RedisProcess {
    /// Starts `redis-server` on a free port, trying another one if it loses a race for it.
    pub async fn start_anywhere(dir: &Path) -> Self {
        Self::start_anywhere_with(dir, |_| Vec::new()).await
    }

    /// Like [`RedisProcess::start_anywhere`], with extra arguments for the chosen port (e.g. the
    /// cluster flags, whose config file names the port).
    pub async fn start_anywhere_with(dir: &Path, extra: impl Fn(u16) -> Vec<String>) -> Self {
        for _ in 0..5 {
            let port = free_port();
            if let Some(process) = Self::try_start(dir, port, &extra(port)).await {
                return process;
            }
        }
        panic!("redis-server did not start on any of five free ports");
    }

    /// Starts `redis-server` on `port` (after a kill: the same port again), retrying while the
    /// port is still being released.
    pub async fn start_on(dir: &Path, port: u16) -> Self {
        let deadline = Instant::now() + PROC_WAIT;
        loop {
            if let Some(process) = Self::try_start(dir, port, &[]).await {
                return process;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start again on port {port}"
            );
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// `None` if the server exits at once (its port was taken after all).
    async fn try_start(dir: &Path, port: u16, extra: &[String]) -> Option<Self> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}): install it (scripts/test.sh does)")
            });
        let mut process = Self { child, port };
        let deadline = Instant::now() + PROC_WAIT;
        while !redis_ping(port).await {
            if process
                .child
                .try_wait()
                .expect("redis-server status")
                .is_some()
            {
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {port} did not answer PING"
            );
            sleep(Duration::from_millis(20)).await;
        }
        Some(process)
    }

    /// Sends `sig` (`-STOP`, `-CONT`) to the server.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("redis-server pid").to_string();
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {pid}");
    }

    /// SIGKILL, then waits for the process to be gone.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("SIGKILL redis-server");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

async fn redis_ping(port: u16) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"PING\r\n").await?;
        let mut buf = [0u8; 7];
        stream.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(&buf == b"+PONG\r\n")
    };
    matches!(timeout(Duration::from_secs(1), attempt).await, Ok(Ok(true)))
}

/// Lines of a process' stderr, the most recent ones.
#[derive(Clone, Default)]
pub struct LogTail(Arc<Mutex<VecDeque<String>>>);

impl LogTail {
    const KEEP: usize = 400;

    fn push(&self, line: String) {
        let mut lines = self.0.lock().unwrap();
        if lines.len() == Self::KEEP {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// The last `n` lines, one a line.
    pub fn last(&self, n: usize) -> String {
        let lines = self.0.lock().unwrap();
        let skip = lines.len().saturating_sub(n);
        lines
            .iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A `tandem` process on 127.0.0.1:0, SIGKILLed when dropped. Its stderr is kept in a
/// [`LogTail`] (and echoed with a prefix when `TANDEM_TEST_ECHO_LOGS` is set).
pub struct TandemProcess {
    child: Child,
    addr: SocketAddr,
    name: String,
    logs: LogTail,
    _data_dir: tempfile::TempDir,
}

impl TandemProcess {
    /// Starts `bin` as node `name` with `args` (besides `--bind`, `--data-dir`, `--node-id`) and
    /// waits for its `listening on ADDR` line.
    pub async fn start(bin: &Path, name: &str, args: &[String]) -> Self {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let mut child = Command::new(bin)
            .args(["--bind", "127.0.0.1:0", "--node-id", name, "--data-dir"])
            .arg(data_dir.path())
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("TANDEM_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn tandem");
        let stderr = child.stderr.take().expect("tandem stderr");
        let mut lines = BufReader::new(stderr).lines();
        let logs = LogTail::default();
        let echo = std::env::var_os("TANDEM_TEST_ECHO_LOGS").is_some();
        let found = timeout(PROC_WAIT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                let line = strip_ansi(&line);
                if echo {
                    eprintln!("[{name}] {line}");
                }
                logs.push(line.clone());
                if let Some(rest) = line.split("listening on ").nth(1) {
                    return rest.split_whitespace().next().map(str::to_owned);
                }
            }
            None
        })
        .await;
        let addr = match found {
            Ok(Some(addr)) => addr.parse().expect("listening address"),
            Ok(None) => panic!("tandem {name} exited before listening:\n{}", logs.last(50)),
            Err(_) => panic!("tandem {name} not listening in time:\n{}", logs.last(50)),
        };
        // Keep draining stderr so the child never blocks on a full pipe.
        let tail = logs.clone();
        let prefix = name.to_owned();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let line = strip_ansi(&line);
                if echo {
                    eprintln!("[{prefix}] {line}");
                }
                tail.push(line);
            }
        });
        Self {
            child,
            addr,
            name: name.to_owned(),
            logs,
            _data_dir: data_dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ws://ADDR/room`.
    pub fn url(&self, room: &str) -> String {
        format!("ws://{}/{}", self.addr, room)
    }

    /// The last `n` lines of its stderr.
    pub fn logs(&self, n: usize) -> String {
        self.logs.last(n)
    }

    /// SIGKILL, then waits for the process to be gone.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("SIGKILL tandem");
    }

    /// `GET path` over plain HTTP/1.1: the status code.
    pub async fn http_status(&self, path: &str) -> std::io::Result<u16> {
        http_status(self.addr, path).await
    }

    /// Sends `sig` (`HUP`, `TERM`) to the process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("tandem pid").to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {pid}");
    }
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ … final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `GET path` on `addr` with a minimal HTTP/1.1 request: the response's status code.
pub async fn http_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let head = String::from_utf8_lossy(&response);
        head.split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad HTTP response: {head:?}")))
    };
    timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("HTTP request timed out")))
}

/// A TCP proxy on 127.0.0.1:0 to `upstream`. While cut, it drops every proxied connection and
/// closes new ones as soon as they are accepted; when restored, it forwards again. Dropping it
/// stops everything.
pub struct TcpProxy {
    addr: SocketAddr,
    open: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let (open, _) = watch::channel(true);
        let switch = open.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if !*switch.borrow() {
                    drop(client); // refused: closed at once
                    continue;
                }
                let mut cut = switch.subscribe();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let forward = async {
                        let mut client = client;
                        let mut server = TcpStream::connect(&upstream).await?;
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        tokio::io::copy_bidirectional(&mut client, &mut server).await
                    };
                    tokio::select! {
                        _ = forward => {}
                        _ = cut.wait_for(|open| !*open) => {}
                    }
                    // Both sockets are dropped here: the connection is gone for both ends.
                });
            }
        });
        Self { addr, open, accept }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every proxied connection and refuses new ones until [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.open.send_replace(false);
        self.accept.abort();
    }
}
