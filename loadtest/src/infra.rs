//! Processes a scenario runs against: tandem nodes, a private redis-server, the store (a SQLite
//! file or a fresh Postgres database, driven through `psql`). Children are killed on drop, so an
//! early error never leaves them behind; `Cluster::stop` stops them gracefully and cleans up.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

type Res<T> = Result<T, String>;

const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

pub enum Store {
    Sqlite,
    /// SQLite in memory (`sqlite::memory:`): the same code path without durability, to compare
    /// like for like with servers that keep nothing.
    SqliteMemory,
    /// A database created for this run (dropped at the end) on the server of `admin`.
    Postgres {
        admin: String,
        db: String,
        url: String,
    },
}

impl Store {
    pub fn postgres(admin: &str) -> Res<Store> {
        let scheme_end = admin.find("://").ok_or("--postgres: not a URL")? + 3;
        let slash = admin[scheme_end..]
            .find('/')
            .map(|i| i + scheme_end)
            .ok_or("--postgres: the URL needs a database path (…/postgres)")?;
        let query = admin[slash..]
            .find('?')
            .map(|i| &admin[slash + i..])
            .unwrap_or("");
        let db = format!(
            "tandem_loadtest_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        );
        let url = format!("{}/{db}{query}", &admin[..slash]);
        psql(admin, &format!("CREATE DATABASE {db}"))?;
        Ok(Store::Postgres {
            admin: admin.to_string(),
            db,
            url,
        })
    }

    pub fn describe(&self) -> String {
        match self {
            Store::Sqlite => "sqlite (one shared file, WAL)".into(),
            Store::SqliteMemory => "sqlite in memory (not durable)".into(),
            Store::Postgres { db, .. } => format!("postgres (fresh database {db})"),
        }
    }
}

/// Runs one SQL command through `psql` and returns its unaligned, tuples-only output.
fn psql(url: &str, sql: &str) -> Res<String> {
    let out = std::process::Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .output()
        .map_err(|e| format!("running psql: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub struct Node {
    pub addr: String,
    child: Child,
    pub log: Arc<Mutex<VecDeque<String>>>,
}

impl Node {
    /// The node's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    pub store: Store,
    redis: Option<(Child, u16)>,
    dir: PathBuf,
}

fn free_port() -> Res<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

impl Cluster {
    pub async fn start(
        tandem: &Path,
        redis_server: &str,
        nodes: u8,
        store: Store,
        short_grace: bool,
    ) -> Res<Cluster> {
        Self::start_with(tandem, redis_server, nodes, store, short_grace, &[]).await
    }

    /// Like [`Cluster::start`], passing `extra_args` to every node after the harness's own flags
    /// (which they must not repeat: `--rate-messages`, `--rate-bytes`,
    /// `--max-connections-per-ip`, `--room-idle-grace`, …).
    pub async fn start_with(
        tandem: &Path,
        redis_server: &str,
        nodes: u8,
        store: Store,
        short_grace: bool,
        extra_args: &[&str],
    ) -> Res<Cluster> {
        let dir = std::env::temp_dir().join(format!(
            "tandem-loadtest-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut cluster = Cluster {
            nodes: Vec::new(),
            store,
            redis: None,
            dir,
        };
        if let Err(e) = cluster
            .spawn_all(tandem, redis_server, nodes, short_grace, extra_args)
            .await
        {
            cluster.stop().await;
            return Err(e);
        }
        Ok(cluster)
    }

    async fn spawn_all(
        &mut self,
        tandem: &Path,
        redis_server: &str,
        nodes: u8,
        short_grace: bool,
        extra_args: &[&str],
    ) -> Res<()> {
        if !tandem.exists() {
            return Err(format!(
                "{}: no such tandem binary (cargo build --release -p tandem, or --tandem PATH)",
                tandem.display()
            ));
        }
        let redis_url = if nodes > 1 {
            let port = free_port()?;
            let child = Command::new(redis_server)
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("starting {redis_server}: {e}"))?;
            self.redis = Some((child, port));
            let deadline = Instant::now() + START_TIMEOUT;
            while redis_command(port, &["PING"]).await.is_err() {
                if Instant::now() > deadline {
                    return Err("redis-server did not answer PING".into());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Some(format!("redis://127.0.0.1:{port}"))
        } else {
            None
        };
        let db_url = match &self.store {
            Store::Sqlite => format!("sqlite://{}", self.dir.join("shared.db").display()),
            Store::SqliteMemory => "sqlite::memory:".into(),
            Store::Postgres { url, .. } => url.clone(),
        };
        for i in 0..nodes {
            let name = ["a", "b"][i as usize];
            let data_dir = self.dir.join(format!("node-{name}"));
            let mut cmd = Command::new(tandem);
            cmd.args([
                "--bind",
                "127.0.0.1:0",
                "--node-id",
                &format!("loadtest-{name}"),
            ])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--database-url", &db_url])
            // A load generator is one address that sends as fast as it is asked to: the
            // per-connection rate and per-address limits would measure themselves.
            .args(["--rate-messages", "0", "--rate-bytes", "0"])
            .args(["--max-connections-per-ip", "0"]);
            if let Some(r) = &redis_url {
                cmd.args(["--redis-url", r]);
            }
            if short_grace {
                cmd.args(["--room-idle-grace", "1s"]);
            }
            cmd.args(extra_args);
            // Nothing of the caller's TANDEM_* configuration leaks into the nodes.
            for (k, _) in std::env::vars() {
                if k.starts_with("TANDEM_") {
                    cmd.env_remove(k);
                }
            }
            cmd.env(
                "RUST_LOG",
                std::env::var("LOADTEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("starting {}: {e}", tandem.display()))?;
            let stderr = child.stderr.take().expect("piped");
            let log: Arc<Mutex<VecDeque<String>>> = Arc::new(Mutex::new(VecDeque::new()));
            let (tx, rx) = tokio::sync::oneshot::channel();
            let log2 = Arc::clone(&log);
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                let mut tx = Some(tx);
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(i) = line.find("listening on") {
                        let rest = &line[i + "listening on".len()..];
                        let addr: String = rest
                            .trim_start_matches(|c: char| !c.is_ascii_digit())
                            .chars()
                            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                            .collect();
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(addr);
                        }
                    }
                    let mut l = log2.lock().unwrap();
                    if (line.contains("WARN") || line.contains("ERROR")) && l.len() >= 100 {
                        // Keep warnings: drop the oldest ordinary line instead.
                        if let Some(i) = l
                            .iter()
                            .position(|x| !x.contains("WARN") && !x.contains("ERROR"))
                        {
                            l.remove(i);
                        }
                    }
                    l.push_back(line);
                    if l.len() > 100 {
                        l.pop_front();
                    }
                }
            });
            let addr = match tokio::time::timeout(START_TIMEOUT, rx).await {
                Ok(Ok(a)) => a,
                _ => {
                    let l = log.lock().unwrap();
                    return Err(format!(
                        "node {name} did not report `listening on`:\n{}",
                        l.iter().cloned().collect::<Vec<_>>().join("\n")
                    ));
                }
            };
            self.nodes.push(Node { addr, child, log });
        }
        Ok(())
    }

    /// With Postgres: a statement trigger on `updates` that logs rows and data bytes of every
    /// INSERT into an unlogged side table (compaction deletes rows, so counting the table later
    /// would undercount). Costs one extra small insert per insert statement.
    pub async fn install_counters(&self) -> Res<()> {
        if let Store::Postgres { url, .. } = &self.store {
            psql(
                url,
                "CREATE UNLOGGED TABLE loadtest_inserts (rows bigint, bytes bigint);
                 CREATE FUNCTION loadtest_count() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                   INSERT INTO loadtest_inserts SELECT count(*), coalesce(sum(octet_length(data)), 0) FROM new_rows;
                   RETURN NULL;
                 END $$;
                 CREATE TRIGGER loadtest_count AFTER INSERT ON updates REFERENCING NEW TABLE AS new_rows
                   FOR EACH STATEMENT EXECUTE FUNCTION loadtest_count();",
            )?;
        }
        Ok(())
    }

    /// (rows, data bytes) inserted into `updates` so far, with Postgres.
    pub async fn pg_counters(&self) -> Res<Option<(u64, u64)>> {
        let Store::Postgres { url, .. } = &self.store else {
            return Ok(None);
        };
        let out = psql(
            url,
            "SELECT coalesce(sum(rows), 0) || '|' || coalesce(sum(bytes), 0) FROM loadtest_inserts",
        )?;
        let mut it = out.split('|').map(|s| s.trim().parse::<u64>());
        match (it.next(), it.next()) {
            (Some(Ok(r)), Some(Ok(b))) => Ok(Some((r, b))),
            _ => Err(format!("unexpected psql output {out:?}")),
        }
    }

    /// With Postgres: waits until the room's log has been folded (the room unloads after the
    /// clients left), vacuums, and reports the sizes.
    pub async fn compacted_sizes(&self, room: &str, timeout: Duration) -> Res<Option<Value>> {
        let Store::Postgres { url, .. } = &self.store else {
            return Ok(None);
        };
        let deadline = Instant::now() + timeout;
        let waited = Instant::now();
        let room_sql = room.replace('\'', "''");
        loop {
            let left: u64 = psql(
                url,
                &format!(
                "SELECT count(*) FROM updates WHERE room = '{room_sql}' OR room = '/{room_sql}'"
            ),
            )?
            .parse()
            .unwrap_or(u64::MAX);
            if left == 0 {
                break;
            }
            if Instant::now() > deadline {
                return Ok(Some(
                    json!({ "error": format!("{left} rows still in `updates` after {timeout:?}") }),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let waited = waited.elapsed().as_secs_f64();
        psql(url, "VACUUM updates")?;
        let out = psql(url, "SELECT pg_total_relation_size('updates') || '|' || pg_total_relation_size('snapshots') || '|' || coalesce((SELECT sum(octet_length(state)) FROM snapshots), 0)")?;
        let v: Vec<u64> = out
            .split('|')
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        Ok(Some(json!({
            "waited_secs": waited,
            "updates_total_relation_bytes": v.first(),
            "snapshots_total_relation_bytes": v.get(1),
            "snapshot_state_bytes": v.get(2),
        })))
    }

    /// The WARN and ERROR lines the nodes logged (the latest ones), prefixed by the node.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for l in n.log.lock().unwrap().iter() {
                if l.contains("WARN") || l.contains("ERROR") {
                    out.push(format!("[{}] {l}", ["a", "b"][i]));
                }
            }
        }
        out
    }

    /// The last log lines of every node, for error messages.
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            out.push_str(&format!("--- node {} ---\n", ["a", "b"][i]));
            for l in n
                .log
                .lock()
                .unwrap()
                .iter()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// PUBLISH + SPUBLISH calls the private redis-server has served so far (0 without Redis).
    pub async fn publishes(&self) -> Res<u64> {
        let Some((_, port)) = &self.redis else {
            return Ok(0);
        };
        let info = redis_command(*port, &["INFO", "commandstats"]).await?;
        let calls = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
                .and_then(|rest| rest.split(',').next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok(calls("publish") + calls("spublish"))
    }

    /// Stops the nodes (SIGTERM, then SIGKILL), Redis, drops the Postgres database and removes
    /// the temporary directory. Never fails: problems are printed.
    pub async fn stop(&mut self) {
        for node in &mut self.nodes {
            terminate(&mut node.child, STOP_TIMEOUT, "tandem").await;
        }
        if let Some((child, _)) = &mut self.redis {
            terminate(child, STOP_TIMEOUT, "redis-server").await;
        }
        if let Store::Postgres { admin, db, .. } = &self.store {
            if let Err(e) = psql(admin, &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")) {
                eprintln!("dropping {db}: {e}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn terminate(child: &mut Child, timeout: Duration, what: &str) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        if tokio::time::timeout(timeout, child.wait()).await.is_ok() {
            return;
        }
        eprintln!("{what} (pid {pid}) did not exit within {timeout:?} of SIGTERM; killing it");
    }
    let _ = child.kill().await;
}

/// One command over a fresh connection, in raw RESP; returns a bulk or simple string reply.
async fn redis_command(port: u16, args: &[&str]) -> Res<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    let mut head = String::new();
    r.read_line(&mut head).await.map_err(|e| e.to_string())?;
    match head.as_bytes().first() {
        Some(b'+') => Ok(head[1..].trim_end().to_string()),
        Some(b'$') => {
            let n: usize = head[1..]
                .trim_end()
                .parse()
                .map_err(|_| format!("bad reply {head:?}"))?;
            let mut body = vec![0; n + 2];
            r.read_exact(&mut body).await.map_err(|e| e.to_string())?;
            body.truncate(n);
            Ok(String::from_utf8_lossy(&body).into_owned())
        }
        _ => Err(format!("redis replied {head:?}")),
    }
}
