//! `fanout`: one writer and N observers in one room, against one or more targets (tandem, the
//! stock y-websocket server, Hocuspocus), one after another: per-delivery latency, losses and the
//! server's CPU and memory per delivery.
//!
//! This is the `rooms` measurement ([`crate::rooms::Plan`]) with one room of N + 1 connections:
//! the writer pushes its send time (µs since the Unix epoch) into a Y.Array at W updates/s, a
//! few probes spread evenly over the join order decode every update with yrs and record latency
//! (receive − send time, one clock) in an HDR histogram corrected for coordinated omission at the
//! writer's interval; the other observers only count update messages, which gives the lost and
//! duplicated deliveries per observer. Server CPU (`/proc/PID/stat`) and memory
//! (`/proc/PID/status`) are sampled when the warmup ends and when the window ends. The report adds
//! the latency target (p99 ≤ 10 ms with 1,500 observers by default) and whether every
//! delivery arrived exactly once.

use std::time::Duration;

use serde_json::{json, Value};

use crate::peers::{self, Cell, Target};
use crate::rooms::{self, Plan};
use crate::{procstat, rounds};

type Res<T> = Result<T, String>;

/// Arguments of the `fanout` scenario.
#[derive(Debug, clap::Args)]
pub struct FanoutArgs {
    /// A server to measure; repeat to compare (the first tandem is the reference for ratios).
    #[arg(long = "target", value_enum, default_values_t = [Target::Tandem])]
    targets: Vec<Target>,
    /// Observers in the room (probes included), besides the writer.
    #[arg(long, default_value_t = 1500)]
    observers: usize,
    /// Observers that decode every update with yrs and measure latency.
    #[arg(long, default_value_t = 4)]
    probes: usize,
    /// Updates per second from the writer.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Measured window, after the warmup.
    #[arg(long, default_value = "20s", value_parser = crate::parse_secs)]
    duration: Duration,
    /// Sending before the measured window starts.
    #[arg(long, default_value = "3s", value_parser = crate::parse_secs)]
    warmup: Duration,
    /// Deadline for the last deliveries after the writer stopped.
    #[arg(long, default_value = "10s", value_parser = crate::parse_secs)]
    drain_timeout: Duration,
    /// Connections opening at once.
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// The latency target: p99 at most this many ms.
    #[arg(long, default_value_t = 10.0)]
    target_p99_ms: f64,
    /// The servers to start.
    #[command(flatten)]
    servers: peers::ServerPaths,
    /// Write a results folder: report.json and SVG charts (latency percentiles, deliveries per
    /// second).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Run the targets round-robin this many times: the table shows each target's median run
    /// (by total CPU per delivery) and the range over the rounds; the JSON has every run.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
}

/// Runs the scenario against every target in turn and prints one report.
pub async fn fanout(args: FanoutArgs) -> Res<()> {
    if args.observers == 0 || args.probes == 0 || args.probes > args.observers || args.rate <= 0.0 {
        return Err("need observers >= 1, 1 <= probes <= observers, rate > 0".into());
    }
    let nofile = procstat::raise_nofile()?;
    let conns = args.observers + 1;
    if (conns as u64) * 2 + 200 > nofile {
        eprintln!("warning: {conns} connections with an open-files limit of {nofile}");
    }
    let plan = Plan {
        rooms: 1,
        clients: conns,
        writers: 1,
        probes: args.probes,
        spread_probes: true,
        rate: args.rate,
        warmup: args.warmup,
        duration: args.duration,
        drain_timeout: args.drain_timeout,
        connect_concurrency: args.connect_concurrency,
        tandem: args.servers.tandem.clone(),
        peers: args.servers.peers.clone(),
        // The default of 5,000 connections per room would cap --observers.
        tandem_args: vec!["--max-connections-per-room", "0"],
    };
    let (plan, target_p99_ms) = (&plan, args.target_p99_ms);
    let all = rounds::round_robin(
        "fanout",
        &args.targets,
        args.rounds as usize,
        |target| async move {
            let mut report = peers::report_or_error(target, rooms::run_target(plan, target).await);
            verdict(&mut report, target_p99_ms);
            report
        },
    )
    .await;
    let runs = rounds::medians(&all);
    let mut report = json!({
        "scenario": "fanout",
        "observers": args.observers,
        "probes": args.probes,
        "rate": args.rate,
        "warmup_secs": args.warmup.as_secs_f64(),
        "window_secs": args.duration.as_secs_f64(),
        "target_p99_ms": args.target_p99_ms,
        "open_files_limit": nofile,
        "ratios_vs_tandem": peers::cpu_ratios(&runs),
        "runs": runs,
    });
    if all.len() > 1 {
        report["all_rounds"] = json!(all);
    }
    peers::emit(&report, args.out.as_deref(), args.json, print_table)
}

/// Adds `p99_met` (p99 within the target) and `exactly_once` (no loss, no duplicate, no socket
/// ended early) to a successful run.
fn verdict(run: &mut Value, target_p99_ms: f64) {
    if run.get("error").is_some() {
        return;
    }
    let p99 = run["latency"]["p99_ms"].as_f64();
    run["p99_met"] = json!(p99.map(|p| p <= target_p99_ms));
    run["exactly_once"] =
        json!(run["lost"] == 0 && run["duplicated"] == 0 && run["sockets_ended_early"] == 0);
}

fn print_table(r: &Value) {
    println!(
        "fanout: 1 writer -> {} observers ({} probes) in one room, {} updates/s, warmup {} s, window {} s; target p99 <= {} ms",
        r["observers"], r["probes"], r["rate"], r["warmup_secs"], r["window_secs"], r["target_p99_ms"]
    );
    let runs = r["runs"].as_array().cloned().unwrap_or_default();
    let f = peers::num;
    let yes_no = |v: &Value| match v.as_bool() {
        Some(true) => "yes".to_string(),
        Some(false) => "NO".to_string(),
        None => "-".to_string(),
    };
    let mut rows: Vec<(&str, Cell<'_>)> = peers::latency_rows();
    rows.push((
        "p99 within target",
        Box::new(move |v| yes_no(&v["p99_met"])),
    ));
    rows.extend(peers::cpu_rows());
    rows.extend(peers::machine_rows());
    rows.extend::<Vec<(&str, Cell<'_>)>>(vec![
        ("deliveries / s", Box::new(|v| f(&v["deliveries_per_s"], 0))),
        (
            "deliveries in window",
            Box::new(|v| v["deliveries_in_window"].to_string()),
        ),
        ("lost", Box::new(|v| v["lost"].to_string())),
        ("duplicated", Box::new(|v| v["duplicated"].to_string())),
        (
            "sockets ended early",
            Box::new(|v| v["sockets_ended_early"].to_string()),
        ),
        (
            "exactly once",
            Box::new(move |v| yes_no(&v["exactly_once"])),
        ),
        (
            "RSS idle MiB",
            Box::new(|v| peers::mib(&v["memory_kib"]["rss_idle"])),
        ),
    ]);
    rows.extend(peers::memory_rows());
    peers::print_comparison(&runs, &rows, &r["ratios_vs_tandem"]);
    peers::print_threads(&runs);
    rounds::print_spread(&runs);
    // Latency by the probe's place in the join order: a server that writes to its connections
    // one after another shows it growing along the order.
    for run in &runs {
        let Some(probes) = run["latency_per_probe"].as_array() else {
            continue;
        };
        let cells: Vec<String> = probes
            .iter()
            .map(|p| {
                format!(
                    "#{} {}/{}",
                    p["join_index"],
                    f(&p["p50_ms"], 1),
                    f(&p["p99_ms"], 1)
                )
            })
            .collect();
        println!(
            "{} p50/p99 ms by probe join index: {}",
            run["target"].as_str().unwrap_or("?"),
            cells.join(", ")
        );
    }
}
