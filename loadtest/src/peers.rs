//! The servers the comparison scenarios (`rooms`, `fanout`, `idle`) measure: tandem (spawned
//! through [`crate::infra::Cluster`], one node, SQLite in a temporary directory) and the Node
//! peers in `loadtest/peers/` (the stock y-websocket server and Hocuspocus, no persistence, no
//! auth). Children are killed on drop. Also the report pieces these scenarios share: the
//! latency summary, CPU ratios against tandem and the one-column-per-target table.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};
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
    /// tandem (target/release/tandem by default), storing every update durably in SQLite.
    Tandem,
    /// tandem with its store in memory (`sqlite::memory:`): like for like with the peers, which
    /// keep nothing.
    TandemMemory,
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
            Target::TandemMemory => "tandem-memory",
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
    /// Starts `target`: tandem from `tandem` with `tandem_args` added to the harness's flags
    /// (see [`Cluster::start_with`]), the peers from the scripts in `peers`.
    pub async fn start(
        target: Target,
        tandem: &Path,
        peers: &Path,
        tandem_args: &[&str],
    ) -> Res<Server> {
        match target {
            Target::Tandem | Target::TandemMemory => {
                let store = if target == Target::Tandem {
                    Store::Sqlite
                } else {
                    Store::SqliteMemory
                };
                let cluster =
                    Cluster::start_with(tandem, "redis-server", 1, store, false, tandem_args)
                        .await?;
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

    /// The WARN and ERROR lines tandem logged so far (the latest ones); none for the peers,
    /// whose output is not parsed.
    pub fn warnings(&self) -> Vec<String> {
        match &self.handle {
            Handle::Tandem(c) => c.warnings(),
            Handle::Node(_) => Vec::new(),
        }
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

/// Summary of a latency histogram (µs) in ms: count, p50, p99, p99.9, max.
pub fn latency_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({ "count": 0 });
    }
    let ms = |v: u64| v as f64 / 1000.0;
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.5)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
    })
}

/// Peer / tandem for the per-delivery CPU figures of [`crate::procstat::cpu_json`] (how many
/// times tandem's cost a peer pays), by peer name; `null` without a successful tandem run.
pub fn cpu_ratios(runs: &[Value]) -> Value {
    let Some(base) = runs
        .iter()
        .find(|r| r["target"] == "tandem" && r.get("error").is_none())
    else {
        return Value::Null;
    };
    let mut out = serde_json::Map::new();
    for r in runs
        .iter()
        .filter(|r| r["target"] != "tandem" && r.get("error").is_none())
    {
        let q = |k: &str| match (r["cpu"][k].as_f64(), base["cpu"][k].as_f64()) {
            (Some(a), Some(b)) if b > 0.0 => json!(a / b),
            _ => Value::Null,
        };
        out.insert(
            r["target"].as_str().unwrap_or("?").to_string(),
            json!({
                "user_cpu_per_delivery": q("user_us_per_delivery"),
                "sys_cpu_per_delivery": q("sys_us_per_delivery"),
                "total_cpu_per_delivery": q("total_us_per_delivery"),
            }),
        );
    }
    Value::Object(out)
}

/// Formats one table cell from a run's report.
pub type Cell<'a> = Box<dyn Fn(&Value) -> String + 'a>;

/// A number with `p` decimals, `-` when absent.
pub fn num(v: &Value, p: usize) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.p$}"))
}

/// A KiB figure in MiB with one decimal, `-` when absent.
pub fn mib(v: &Value) -> String {
    num(&json!(v.as_f64().map(|x| x / 1024.0)), 1)
}

/// The rows of [`crate::procstat::cpu_json`] (under `cpu`): user, system and total CPU µs per
/// delivery and the server's CPU % of one core.
pub fn cpu_rows() -> Vec<(&'static str, Cell<'static>)> {
    vec![
        (
            "user CPU µs / delivery",
            Box::new(|v| num(&v["cpu"]["user_us_per_delivery"], 2)),
        ),
        (
            "sys CPU µs / delivery",
            Box::new(|v| num(&v["cpu"]["sys_us_per_delivery"], 2)),
        ),
        (
            "total CPU µs / delivery",
            Box::new(|v| num(&v["cpu"]["total_us_per_delivery"], 2)),
        ),
        (
            "server CPU %",
            Box::new(|v| num(&v["cpu"]["cpu_percent"], 1)),
        ),
    ]
}

/// Where the servers under test come from; part of every scenario's arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerPaths {
    /// The tandem binary to spawn.
    #[arg(long, default_value = "target/release/tandem")]
    pub tandem: std::path::PathBuf,
    /// The directory of the Node peers (package.json, the start scripts).
    #[arg(long, default_value = "loadtest/peers")]
    pub peers: std::path::PathBuf,
}

/// Puts out a scenario's report: with `out`, `report.json` and its charts into that folder
/// (see [`crate::charts::write`]); then the report on stdout, as JSON or as `table` prints it.
pub fn emit(
    report: &Value,
    out: Option<&std::path::Path>,
    json: bool,
    table: impl FnOnce(&Value),
) -> Res<()> {
    if let Some(dir) = out {
        for path in crate::charts::write(dir, report)? {
            eprintln!("wrote {}", path.display());
        }
    }
    if json {
        let text = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
        println!("{text}");
    } else {
        table(report);
    }
    Ok(())
}

/// A target's report, or a report that says why the run failed (the other targets still run).
pub fn report_or_error(target: Target, result: Res<Value>) -> Value {
    result.unwrap_or_else(|e| json!({ "target": target.name(), "error": e }))
}

/// The rows both traffic scenarios end their table with: the server's memory at the end of the
/// window (`memory_kib`) and the connect time.
pub fn memory_rows() -> Vec<(&'static str, Cell<'static>)> {
    vec![
        (
            "RSS end MiB",
            Box::new(|v| mib(&v["memory_kib"]["rss_end"])),
        ),
        ("RSS peak MiB", Box::new(|v| mib(&v["memory_kib"]["hwm"]))),
        (
            "RSS KiB / connection",
            Box::new(|v| num(&v["memory_kib"]["rss_per_connection"], 1)),
        ),
        ("connect s", Box::new(|v| num(&v["connect_secs"], 2))),
    ]
}

/// The rows of [`crate::procstat::context_json`] (under `machine`): what the load generator and
/// everything else on the machine used during the window, in cores.
pub fn machine_rows() -> Vec<(&'static str, Cell<'static>)> {
    vec![
        (
            "load generator cores",
            Box::new(|v| num(&v["machine"]["load_generator_cores"], 2)),
        ),
        (
            "other processes' cores",
            Box::new(|v| num(&v["machine"]["others_cores"], 2)),
        ),
    ]
}

/// The rows of [`latency_json`] (under `latency`).
pub fn latency_rows() -> Vec<(&'static str, Cell<'static>)> {
    vec![
        (
            "latency p50 ms",
            Box::new(|v| num(&v["latency"]["p50_ms"], 2)),
        ),
        (
            "latency p99 ms",
            Box::new(|v| num(&v["latency"]["p99_ms"], 2)),
        ),
        (
            "latency p99.9 ms",
            Box::new(|v| num(&v["latency"]["p999_ms"], 2)),
        ),
        (
            "latency max ms",
            Box::new(|v| num(&v["latency"]["max_ms"], 2)),
        ),
        (
            "latency samples",
            Box::new(|v| v["latency"]["count"].to_string()),
        ),
    ]
}

/// Prints each run's server CPU by thread (`cpu.threads`, from [`crate::procstat::threads_json`]):
/// where a target's CPU per delivery goes, a runtime's workers apart from a store's thread.
pub fn print_threads(runs: &[Value]) {
    let mut header = false;
    for run in runs {
        let Some(threads) = run["cpu"]["threads"].as_object().filter(|t| !t.is_empty()) else {
            continue;
        };
        if !header {
            println!("server CPU by thread, µs / delivery (user / sys):");
            header = true;
        }
        let parts: Vec<String> = threads
            .iter()
            .map(|(name, t)| {
                let count = t["threads"].as_u64().unwrap_or(0);
                let many = if count > 1 {
                    format!(" ×{count}")
                } else {
                    String::new()
                };
                format!(
                    "{name}{many} {} / {}",
                    num(&t["user_us_per_delivery"], 2),
                    num(&t["sys_us_per_delivery"], 2)
                )
            })
            .collect();
        println!(
            "  {}: {}",
            run["target"].as_str().unwrap_or("?"),
            parts.join("; ")
        );
    }
}

/// Prints one column per run (target) and one line per row, then the CPU ratios of
/// [`cpu_ratios`] (if any) and the runs that failed.
pub fn print_comparison(runs: &[Value], rows: &[(&str, Cell<'_>)], ratios: &Value) {
    print!("{:<28}", "");
    for run in runs {
        print!(" {:>12}", run["target"].as_str().unwrap_or("?"));
    }
    println!();
    for (name, get) in rows {
        print!("{name:<28}");
        for run in runs {
            let s = if run.get("error").is_some() {
                "error".to_string()
            } else {
                get(run)
            };
            print!(" {s:>12}");
        }
        println!();
    }
    if let Some(m) = ratios.as_object() {
        for (peer, q) in m {
            println!(
                "{peer} / tandem, CPU per delivery: user ×{}, sys ×{}, total ×{}",
                num(&q["user_cpu_per_delivery"], 1),
                num(&q["sys_cpu_per_delivery"], 1),
                num(&q["total_cpu_per_delivery"], 1)
            );
        }
    }
    for run in runs {
        if let Some(w) = run["server_warnings"].as_array().filter(|w| !w.is_empty()) {
            println!(
                "{}: {} server warning(s); first: {}",
                run["target"].as_str().unwrap_or("?"),
                w.len(),
                w[0].as_str().unwrap_or("")
            );
        }
        if let Some(e) = run.get("error") {
            println!(
                "{}: error: {}",
                run["target"].as_str().unwrap_or("?"),
                e.as_str().unwrap_or("")
            );
        }
    }
}
