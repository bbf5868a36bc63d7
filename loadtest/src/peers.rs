//! The servers the `rooms` scenario compares: tandem (spawned through [`crate::infra::Cluster`],
//! one node, SQLite in a temporary directory) and the Node peers in `loadtest/peers/` (the stock
//! y-websocket server and Hocuspocus, no persistence, no auth). Children are killed on drop.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::infra::{Cluster, Store};
use crate::wire::Dialect;

type Res<T> = Result<T, String>;

const START_TIMEOUT: Duration = Duration::from_secs(20);
const NPM_TIMEOUT: Duration = Duration::from_secs(300);

/// A server implementation to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// tandem (target/release/tandem by default).
    Tandem,
    /// The stock Node y-websocket server (@y/websocket-server).
    YWebsocket,
    /// Hocuspocus (@hocuspocus/server).
    Hocuspocus,
}

impl Target {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Target::Tandem => "tandem",
            Target::YWebsocket => "y-websocket",
            Target::Hocuspocus => "hocuspocus",
        }
    }

    /// The framing its clients speak.
    pub fn dialect(self) -> Dialect {
        match self {
            Target::Hocuspocus => Dialect::Hocuspocus,
            _ => Dialect::YWebsocket,
        }
    }
}

enum Handle {
    Tandem(Cluster),
    Node(Child),
}

/// A running server: its address and process id.
pub struct Server {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The process whose CPU and memory are measured.
    pub pid: u32,
    handle: Handle,
}

impl Server {
    /// Starts `target`: tandem from `tandem`, the peers from the scripts in `peers`.
    pub async fn start(target: Target, tandem: &Path, peers: &Path) -> Res<Server> {
        match target {
            Target::Tandem => {
                let cluster =
                    Cluster::start(tandem, "redis-server", 1, Store::Sqlite, false).await?;
                let node = &cluster.nodes[0];
                let (addr, pid) = (node.addr.clone(), node.pid().ok_or("tandem exited")?);
                Ok(Server {
                    addr,
                    pid,
                    handle: Handle::Tandem(cluster),
                })
            }
            Target::YWebsocket => Self::node(peers, "y-websocket.mjs").await,
            Target::Hocuspocus => Self::node(peers, "hocuspocus.mjs").await,
        }
    }

    async fn node(peers: &Path, script: &str) -> Res<Server> {
        ensure_installed(peers).await?;
        let mut child = Command::new("node")
            .arg(peers.join(script))
            .arg("0")
            .env("NODE_ENV", "production")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting node {script}: {e}"))?;
        let pid = child.id().ok_or("node exited")?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(START_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(a) = line.strip_prefix("listening on ") {
                    return Some(a.trim().to_string());
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| format!("node {script} did not print `listening on`"))?;
        // Keep draining its stdout so that it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Server {
            addr,
            pid,
            handle: Handle::Node(child),
        })
    }

    /// Stops the server (SIGTERM, then SIGKILL) and removes its temporary files.
    pub async fn stop(self) {
        match self.handle {
            Handle::Tandem(mut c) => c.stop().await,
            Handle::Node(mut child) => {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &self.pid.to_string()])
                    .status();
                if tokio::time::timeout(Duration::from_secs(5), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
            }
        }
    }
}

/// Runs `npm ci` in `peers` when its node_modules is missing.
async fn ensure_installed(peers: &Path) -> Res<()> {
    if peers.join("node_modules").is_dir() {
        return Ok(());
    }
    if !peers.join("package-lock.json").is_file() {
        return Err(format!(
            "{}: no package-lock.json (pass --peers loadtest/peers from the repository root)",
            peers.display()
        ));
    }
    eprintln!(
        "{}: node_modules missing, running `npm ci`",
        peers.display()
    );
    let status = tokio::time::timeout(
        NPM_TIMEOUT,
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(peers)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .status(),
    )
    .await
    .map_err(|_| "npm ci timed out".to_string())?
    .map_err(|e| format!("running npm: {e}"))?;
    if !status.success() {
        return Err(format!(
            "npm ci failed in {}; run `cd {} && npm ci` by hand",
            peers.display(),
            peers.display()
        ));
    }
    Ok(())
}
