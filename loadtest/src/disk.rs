//! `disk`: how long the disk takes to make a small write durable (`fdatasync`), under a steady
//! trickle of writes like a store's group commits. A database's commit waits for exactly this, so
//! an acknowledgement tail in `hop` that this also shows is the machine's, not the server's.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{histogram, parse_secs, peers, us, Res};

/// Arguments of `disk`.
#[derive(Debug, clap::Args)]
pub struct DiskArgs {
    /// Directory to write the probe file in (use the database's file system). Default: the
    /// system's temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Durable writes per second.
    #[arg(long, default_value_t = 300.0)]
    rate: f64,
    /// Bytes per write.
    #[arg(long, default_value_t = 16384)]
    size: usize,
    /// How long to probe.
    #[arg(long, default_value = "20s", value_parser = parse_secs)]
    duration: Duration,
    /// A sync slower than this is listed as a stall, with when it happened.
    #[arg(long, default_value = "20ms", value_parser = parse_millis)]
    stall: Duration,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_millis(s: &str) -> Result<Duration, String> {
    s.trim_end_matches("ms")
        .parse::<f64>()
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .map_err(|e| e.to_string())
}

/// Runs the probe and prints the report.
pub async fn disk(args: DiskArgs) -> Res<()> {
    if args.rate <= 0.0 || args.size == 0 {
        return Err("need rate > 0 and size > 0".into());
    }
    let json = args.json;
    let report = tokio::task::spawn_blocking(move || probe(&args))
        .await
        .map_err(|e| format!("probe task: {e}"))??;
    peers::emit(&report, None, json, print_table)
}

fn probe(args: &DiskArgs) -> Res<Value> {
    let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("tandem-disk-probe-{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    let result = (|| {
        // Write the whole area once, so that the probe measures overwrites (as a database's
        // recycled log does), not block allocation.
        const AREA: u64 = 16 << 20;
        let buf = vec![0x5a_u8; args.size];
        let chunk = vec![0_u8; 1 << 20];
        for _ in 0..AREA / chunk.len() as u64 {
            file.write_all(&chunk).map_err(|e| e.to_string())?;
        }
        file.sync_all().map_err(|e| e.to_string())?;

        let slots = (AREA / args.size as u64).max(1);
        let period = Duration::from_secs_f64(1.0 / args.rate);
        let mut hist = histogram();
        let mut stalls = Vec::new();
        let start = Instant::now();
        let mut n: u64 = 0;
        while start.elapsed() < args.duration {
            file.write_all_at(&buf, (n % slots) * args.size as u64)
                .map_err(|e| e.to_string())?;
            let t = Instant::now();
            file.sync_data().map_err(|e| e.to_string())?;
            let took = t.elapsed();
            hist.record(us(took)).map_err(|e| e.to_string())?;
            if took > args.stall {
                stalls.push(json!({
                    "at_s": (t - start).as_secs_f64(),
                    "ms": took.as_secs_f64() * 1e3,
                }));
            }
            n += 1;
            if let Some(wait) = (start + period * n as u32).checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        Ok(json!({
            "scenario": "disk",
            "dir": dir.display().to_string(),
            "writes": n,
            "write_bytes": args.size,
            "target_rate_per_s": args.rate,
            "seconds": start.elapsed().as_secs_f64(),
            "sync_ms": {
                "p50": ms(0.5),
                "p99": ms(0.99),
                "p999": ms(0.999),
                "max": hist.max() as f64 / 1000.0,
            },
            "stall_threshold_ms": args.stall.as_secs_f64() * 1e3,
            "stalls": stalls,
        }))
    })();
    let _ = std::fs::remove_file(&path);
    result
}

fn print_table(r: &Value) {
    let s = &r["sync_ms"];
    let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "disk: {} writes of {} bytes at {}/s in {} over {:.1} s",
        r["writes"],
        r["write_bytes"],
        r["target_rate_per_s"],
        r["dir"].as_str().unwrap_or("?"),
        r["seconds"].as_f64().unwrap_or(0.0)
    );
    println!(
        "fdatasync ms: p50 {:.3}, p99 {:.3}, p99.9 {:.3}, max {:.3}",
        f("p50"),
        f("p99"),
        f("p999"),
        f("max")
    );
    let stalls = r["stalls"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let list: Vec<String> = stalls
        .iter()
        .map(|v| {
            format!(
                "{:.0} ms at {:.2} s",
                v["ms"].as_f64().unwrap_or(f64::NAN),
                v["at_s"].as_f64().unwrap_or(f64::NAN)
            )
        })
        .collect();
    println!(
        "stalls over {} ms: {}{}",
        r["stall_threshold_ms"],
        stalls.len(),
        if list.is_empty() {
            String::new()
        } else {
            format!(" ({})", list.join(", "))
        }
    );
}
