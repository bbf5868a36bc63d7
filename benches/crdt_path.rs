//! CRDT-path benchmarks: the automerge-paper editing trace through yrs and through tandem's room
//! path, merged bursts, cold loads from the stores, and snapshot size. See `docs/benchmarks.md`.
//!
//! Run with `cargo bench --bench crdt_path` (about 10 minutes on 2 cores). The trace comes from
//! the registry package `loro-internal` 1.17.1 (`cargo fetch --manifest-path
//! benches/trace/Cargo.toml`, done here if needed); its sha256 is checked. When it cannot be had,
//! a seeded synthetic trace of the same size is used instead, and the output says so.
//!
//! Environment: `TANDEM_BENCH_SYNTHETIC=1` forces the synthetic trace; `TANDEM_TEST_POSTGRES_URL`
//! names a Postgres server (default `postgres://postgres@127.0.0.1:5432/postgres`) on which a
//! scratch database is created and dropped; Postgres is skipped when it does not answer.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use sqlx::{Connection, Executor};
use tandem::doc::{Applied, DecodedUpdate, YDoc, YrsFold};
use tandem::ids::RoomId;
use tandem::session::outbox::outbox;
use tandem::store::memory::MemoryStore;
use tandem::store::postgres::{PostgresOptions, PostgresStore};
use tandem::store::sqlite::SqliteStore;
use tandem::store::{Append, Fold, Store};
use tandem::ws::WsWriter;
use tandem_protocol::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::{Doc, GetString, Options, ReadTxn, StateVector, Text, Transact, Update};

/// sha256 of `benches/automerge-paper.json.gz` in `loro-internal` 1.17.1.
const TRACE_SHA256: &str = "42c0ff1720c0cad77077e190e36135c9cab9f7bbc266351c0a7fe4981c6a1546";
const TRACE_CRATE: &str = "loro-internal-1.17.1";
const TRACE_FILE: &str = "benches/automerge-paper.json.gz";
/// Size of the synthetic stand-in (the real trace's edit count).
const SYNTHETIC_EDITS: usize = 259_778;
/// Updates per `Store::append` in the room-path bench: the group-commit writer's default batch.
const LOG_BATCH: usize = 256;
/// Rows per compaction when filling the stores: the server's default compaction threshold (500
/// updates). Folding the whole stream at once is impractical: `yrs::merge_updates_v1` grows
/// quadratically with the number of updates merged (see `merge_scaling`).
const COMPACT_EVERY: usize = 500;
/// Burst sizes for the merged-burst benchmark.
const BURSTS: [usize; 2] = [100, 1_000];
/// Stream prefixes merged once each (timed with `Instant`) to show how merging scales.
const MERGE_PROBES: [usize; 4] = [5_000, 10_000, 20_000, 40_000];
const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

// ---------------------------------------------------------------------------------------------
// The trace

#[derive(Deserialize)]
struct TraceJson {
    #[serde(rename = "startContent")]
    start_content: String,
    #[serde(rename = "endContent")]
    end_content: String,
    txns: Vec<TraceTxn>,
}

#[derive(Deserialize)]
struct TraceTxn {
    /// `[position, deleted, inserted]`, in characters.
    patches: Vec<(u32, u32, String)>,
}

struct Trace {
    start: String,
    end: String,
    /// One per transaction: `(position, deleted, inserted)` patches.
    txns: Vec<Vec<(u32, u32, String)>>,
    provenance: String,
    real: bool,
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from(".cargo"))
}

/// Subdirectories of `dir` (the registries under `registry/src` or `registry/cache`).
fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs
}

/// The gzipped trace from the unpacked registry source, or from the `.crate` archive.
fn find_trace_gz() -> Option<(Vec<u8>, String)> {
    let registry = cargo_home().join("registry");
    for reg in subdirs(&registry.join("src")) {
        let path = reg.join(TRACE_CRATE).join(TRACE_FILE);
        if let Ok(bytes) = std::fs::read(&path) {
            return Some((bytes, path.display().to_string()));
        }
    }
    for reg in subdirs(&registry.join("cache")) {
        let path = reg.join(format!("{TRACE_CRATE}.crate"));
        if let Ok(archive) = std::fs::read(&path) {
            let wanted = format!("{TRACE_CRATE}/{TRACE_FILE}");
            if let Some(bytes) = untar_gz_entry(&archive, &wanted) {
                return Some((bytes, format!("{}!{wanted}", path.display())));
            }
        }
    }
    None
}

/// One file of a `.tar.gz` (a `.crate`), with a minimal ustar reader.
fn untar_gz_entry(archive: &[u8], wanted: &str) -> Option<Vec<u8>> {
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(archive)
        .read_to_end(&mut tar)
        .ok()?;
    let mut at = 0;
    let mut long_name: Option<String> = None;
    while at + 512 <= tar.len() {
        let header = &tar[at..at + 512];
        if header.iter().all(|&b| b == 0) {
            return None;
        }
        let field = |range: std::ops::Range<usize>| {
            let raw = &header[range];
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            String::from_utf8_lossy(&raw[..end]).into_owned()
        };
        let size = usize::from_str_radix(field(124..136).trim(), 8).ok()?;
        let kind = header[156];
        let prefix = field(345..500);
        let name = long_name.take().unwrap_or_else(|| {
            let name = field(0..100);
            if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            }
        });
        let data = tar.get(at + 512..at + 512 + size)?;
        match kind {
            b'L' => long_name = Some(String::from_utf8_lossy(data).trim_end_matches('\0').into()),
            b'0' | 0 if name == wanted => return Some(data.to_vec()),
            _ => {}
        }
        at += 512 + size.div_ceil(512) * 512;
    }
    None
}

/// Runs `cargo fetch` on the helper manifest (downloads, never builds).
fn fetch_trace_crate() -> Result<(), String> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/trace/Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .arg("fetch")
        .arg("--manifest-path")
        .arg(&manifest)
        .status()
        .map_err(|e| format!("cannot run cargo fetch: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "cargo fetch --manifest-path {} failed: {status}",
            manifest.display()
        ))
    }
}

fn real_trace() -> Result<Trace, String> {
    if std::env::var_os("TANDEM_BENCH_SYNTHETIC").is_some() {
        return Err("TANDEM_BENCH_SYNTHETIC is set".into());
    }
    let (gz, source) = match find_trace_gz() {
        Some(found) => found,
        None => {
            fetch_trace_crate()?;
            find_trace_gz()
                .ok_or_else(|| format!("{TRACE_CRATE} fetched but {TRACE_FILE} not found"))?
        }
    };
    let digest: String = Sha256::digest(&gz)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if digest != TRACE_SHA256 {
        return Err(format!(
            "{source}: sha256 {digest}, expected {TRACE_SHA256}"
        ));
    }
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut json)
        .map_err(|e| format!("{source}: gunzip: {e}"))?;
    let parsed: TraceJson =
        serde_json::from_slice(&json).map_err(|e| format!("{source}: json: {e}"))?;
    Ok(Trace {
        start: parsed.start_content,
        end: parsed.end_content,
        txns: parsed.txns.into_iter().map(|t| t.patches).collect(),
        provenance: format!(
            "automerge-paper editing trace (CC-BY 4.0, Martin Kleppmann and Alastair Beresford), \
             from {source}, sha256 {digest} verified"
        ),
        real: true,
    })
}

/// A seeded stand-in with the real trace's shape: single-character edits in runs of typing and
/// backspacing at a cursor that moves now and then to a nearby position.
fn synthetic_trace() -> Trace {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut text: Vec<u8> = Vec::new();
    let mut cursor = 0usize;
    let mut txns = Vec::with_capacity(SYNTHETIC_EDITS);
    // Runs of typing and of backspacing, like a writer: single edits alternating at random would
    // leave one tombstone between every two characters, and yrs' position search walks them all.
    let (mut typing, mut run) = (true, 0u64);
    for _ in 0..SYNTHETIC_EDITS {
        if run == 0 {
            typing = text.is_empty() || next() % 10 < 8;
            run = if typing {
                1 + next() % 30
            } else {
                1 + next() % 8
            };
            if next() % 8 == 0 {
                // Move the cursor nearby.
                let span = text.len().min(2_000) + 1;
                cursor = (cursor + (next() as usize) % span)
                    .saturating_sub(span / 2)
                    .min(text.len());
            }
        }
        run -= 1;
        if typing || cursor == 0 {
            let ch = b"abcdefghijklmnopqrstuvwxyz \n"[(next() % 28) as usize];
            text.insert(cursor, ch);
            txns.push(vec![(cursor as u32, 0, (ch as char).to_string())]);
            cursor += 1;
        } else {
            cursor -= 1;
            text.remove(cursor);
            txns.push(vec![(cursor as u32, 1, String::new())]);
        }
    }
    Trace {
        start: String::new(),
        end: String::from_utf8(text).expect("ascii"),
        txns,
        provenance:
            "SYNTHETIC seeded trace (xorshift64, 259,778 single-character edits): the real \
                     trace could not be loaded"
                .into(),
        real: false,
    }
}

fn load_trace() -> Trace {
    match real_trace() {
        Ok(trace) => trace,
        Err(why) => {
            let bar = "!".repeat(100);
            eprintln!("{bar}\n!!! USING A SYNTHETIC TRACE: {why}\n{bar}");
            synthetic_trace()
        }
    }
}

/// Replays the trace in a local yrs document, one transaction per edit, and returns the v1
/// update of each transaction and the final client document.
fn replay(trace: &Trace) -> (Vec<Bytes>, Doc) {
    let doc = Doc::with_client_id(1);
    let text = doc.get_or_insert_text("text");
    let mut updates = Vec::with_capacity(trace.txns.len() + 1);
    if !trace.start.is_empty() {
        let mut txn = doc.transact_mut();
        text.insert(&mut txn, 0, &trace.start);
        updates.push(Bytes::from(txn.encode_update_v1()));
    }
    for patches in &trace.txns {
        let mut txn = doc.transact_mut();
        for (pos, del, ins) in patches {
            if *del > 0 {
                text.remove_range(&mut txn, *pos, *del);
            }
            if !ins.is_empty() {
                text.insert(&mut txn, *pos, ins);
            }
        }
        updates.push(Bytes::from(txn.encode_update_v1()));
    }
    let result = text.get_string(&doc.transact());
    assert!(
        result == trace.end,
        "replayed text ({} bytes) differs from endContent ({} bytes)",
        result.len(),
        trace.end.len()
    );
    (updates, doc)
}

// ---------------------------------------------------------------------------------------------
// The paths measured

/// A yrs document configured like tandem's [`YDoc`] (client id 0, gc on).
fn raw_doc() -> Doc {
    Doc::with_options(Options {
        client_id: yrs::ClientID::new(0),
        skip_gc: false,
        ..Options::default()
    })
}

fn raw_apply_each(stream: &[Bytes]) -> Doc {
    let doc = raw_doc();
    for u in stream {
        let update = Update::decode_v1(u).expect("decode");
        doc.transact_mut().apply_update(update).expect("apply");
    }
    doc
}

fn raw_apply_one(update: &[u8]) -> Doc {
    let doc = raw_doc();
    let update = Update::decode_v1(update).expect("decode");
    doc.transact_mut().apply_update(update).expect("apply");
    doc
}

/// The stream in bursts of `size` updates, each merged with `yrs::merge_updates_v1` and then
/// decoded and applied in one transaction.
fn raw_apply_bursts(stream: &[Bytes], size: usize) -> Doc {
    let doc = raw_doc();
    for burst in stream.chunks(size) {
        let merged = yrs::merge_updates_v1(burst.iter().map(|b| &b[..])).expect("merge");
        let update = Update::decode_v1(&merged).expect("decode");
        doc.transact_mut().apply_update(update).expect("apply");
    }
    doc
}

/// Merges prefixes of the stream once each and prints how long each merge took.
fn merge_scaling(stream: &[Bytes]) -> Vec<(usize, f64)> {
    let mut out = Vec::new();
    for n in MERGE_PROBES {
        let n = n.min(stream.len());
        let started = std::time::Instant::now();
        let merged = yrs::merge_updates_v1(stream[..n].iter().map(|b| &b[..])).expect("merge");
        let secs = started.elapsed().as_secs_f64();
        std::hint::black_box(merged);
        println!(
            "merge_updates_v1 of the first {n} updates: {:.3} s ({:.0} ns per update)",
            secs,
            secs * 1e9 / n as f64
        );
        out.push((n, secs));
    }
    out
}

/// What `room::actor`'s `apply` does with a client update, minus the parts that need a running
/// room (size limit, acknowledgements, metrics, broker): decode, apply, encode the outgoing frame
/// once, push it to one peer's outbox (drained as it goes), and append to the log in batches of
/// [`LOG_BATCH`] through the store (the group-commit writer's batching, without its task).
fn room_path(stream: &[Bytes], rt: &tokio::runtime::Runtime) -> YDoc {
    let room = RoomId::new("bench").expect("room id");
    let origin: Arc<str> = Arc::from("bench-node");
    let store = MemoryStore::new();
    let (out, mut rx) = outbox(32 << 20, 16 << 10, WsWriter::detached());
    let mut doc = YDoc::new();
    let mut batch: Vec<Append> = Vec::with_capacity(LOG_BATCH);
    rt.block_on(async {
        for raw in stream {
            let update = DecodedUpdate::decode(raw.clone()).expect("decode");
            let Applied::Changed { effective, .. } = doc.apply_checked(update).expect("apply")
            else {
                panic!("every trace update changes the document");
            };
            let frame = Bytes::from(Message::Sync(SyncMessage::Update(&effective)).to_frame());
            out.push(frame).expect("outbox");
            while rx.take().is_some() {}
            batch.push(Append {
                room: room.clone(),
                data: effective,
                origin: origin.clone(),
            });
            if batch.len() == LOG_BATCH {
                store.append(&batch).await.expect("append");
                batch.clear();
            }
        }
        store.append(&batch).await.expect("append");
    });
    doc
}

// ---------------------------------------------------------------------------------------------
// Stores

/// `url` with its database name replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
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

/// A scratch Postgres database, or why there is none.
async fn scratch_postgres() -> Result<(String, String), String> {
    let admin = std::env::var("TANDEM_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned());
    let mut conn =
        tokio::time::timeout(Duration::from_secs(3), sqlx::PgConnection::connect(&admin))
            .await
            .map_err(|_| format!("{admin}: connect timed out"))?
            .map_err(|e| format!("{admin}: {e}"))?;
    let name = format!("tandem_bench_{}", std::process::id());
    conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await
        .map_err(|e| e.to_string())?;
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .map_err(|e| e.to_string())?;
    let _ = conn.close().await;
    Ok((admin, name))
}

/// `VACUUM` of the database at `url`, as autovacuum would do a while after the edits.
async fn vacuum_postgres(url: &str) {
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    conn.execute("VACUUM").await.expect("VACUUM");
    let _ = conn.close().await;
}

async fn drop_postgres(admin: &str, name: &str) {
    if let Ok(mut conn) = sqlx::PgConnection::connect(admin).await {
        let _ = conn
            .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
            .await;
        let _ = conn.close().await;
    }
}

/// Appends the stream to `store` and compacts after every [`COMPACT_EVERY`] rows, as the server
/// does with its default threshold, so the room ends as one snapshot and an empty log.
async fn fill_and_compact(store: &dyn Store, room: &RoomId, stream: &[Bytes]) -> Bytes {
    let origin: Arc<str> = Arc::from("bench-node");
    let mut folded = 0;
    for chunk in stream.chunks(COMPACT_EVERY) {
        let batch: Vec<Append> = chunk
            .iter()
            .map(|data| Append {
                room: room.clone(),
                data: data.clone(),
                origin: origin.clone(),
            })
            .collect();
        store.append(&batch).await.expect("append");
        folded += store.compact(room, &YrsFold).await.expect("compact").rows;
    }
    assert_eq!(folded, stream.len());
    let loaded = store.load(room).await.expect("load");
    assert!(loaded.updates.is_empty());
    loaded.snapshot.expect("a snapshot").state
}

/// A cold load as the room does it: the store's `load`, then `YDoc::load`.
fn cold_load(store: &dyn Store, room: &RoomId, rt: &tokio::runtime::Runtime) -> YDoc {
    let stored = rt.block_on(store.load(room)).expect("load");
    let tail: Vec<Bytes> = stored.updates.into_iter().map(|(_, data)| data).collect();
    let snapshot = stored.snapshot.map(|s| s.state);
    YDoc::load(snapshot.as_deref(), &tail).expect("YDoc::load")
}

fn text_of(doc: &Doc) -> String {
    doc.get_or_insert_text("text").get_string(&doc.transact())
}

fn whole_stream_group<'a>(
    c: &'a mut Criterion,
    name: &str,
    elements: usize,
) -> BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8))
        .throughput(Throughput::Elements(elements as u64));
    group
}

// ---------------------------------------------------------------------------------------------
// Summary: ratios from criterion's own estimates

fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("criterion")
}

/// When this process started: estimates written before are another run's (a filtered run).
static STARTED: std::sync::OnceLock<std::time::SystemTime> = std::sync::OnceLock::new();

/// The median of one benchmark's run in this process, in ns per iteration.
fn median_ns(id: &str) -> Option<f64> {
    let path = criterion_dir().join(id).join("new/estimates.json");
    let modified = std::fs::metadata(&path).ok()?.modified().ok()?;
    if modified < *STARTED.get()? {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    json["median"]["point_estimate"].as_f64()
}

struct Sizes {
    updates: usize,
    update_bytes: usize,
    snapshot: usize,
    state_as_update: usize,
    client_state_as_update: usize,
    end_chars: usize,
}

fn print_summary(trace: &Trace, sizes: &Sizes, probes: &[(usize, f64)], postgres: Option<&str>) {
    let n = sizes.updates as f64;
    let per = |id: &str| median_ns(id).map(|ns| ns / n);
    let fmt = |v: Option<f64>, unit: &str| v.map_or("n/a".into(), |v| format!("{v:.1} {unit}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}x", a / b),
        _ => "n/a".into(),
    };
    let ms = |id: &str| median_ns(id).map(|ns| ns / 1e6);
    println!("\n================ crdt_path summary (criterion medians) ================");
    println!("(n/a: not run in this process, e.g. filtered out)");
    println!("trace: {}", trace.provenance);
    println!(
        "stream: {} updates, {} bytes of v1 updates; final text {} chars",
        sizes.updates, sizes.update_bytes, sizes.end_chars
    );
    let raw = per("one_at_a_time/raw_yrs");
    let room = per("one_at_a_time/room_path");
    println!(
        "per update: raw yrs {} | room path {} | room/raw {} (target <= 1.5x)",
        fmt(raw, "ns"),
        fmt(room, "ns"),
        ratio(room, raw)
    );
    let fold = per("merged_burst/tandem_fold_whole_stream");
    println!(
        "whole stream as one burst, tandem's fold (keystroke runs merged, one encode): {} per update; one-at-a-time/burst {} (target >= 3x)",
        fmt(fold, "ns"),
        ratio(raw, fold)
    );
    for size in BURSTS {
        let burst = per(&format!("merged_burst/raw_bursts_of_{size}"));
        println!(
            "merged bursts of {size}: {} per update; one-at-a-time/burst {} (target >= 3x)",
            fmt(burst, "ns"),
            ratio(raw, burst)
        );
    }
    for (count, secs) in probes {
        println!(
            "one merge_updates_v1 of {count} updates: {secs:.3} s ({:.0} ns per update)",
            secs * 1e9 / *count as f64
        );
    }
    let yrs_load = ms("cold_load/raw_yrs_state_as_update");
    let ydoc_snap = ms("cold_load/ydoc_load_snapshot_bytes");
    let sqlite = ms("cold_load/sqlite");
    println!(
        "cold load: raw yrs {} | YDoc::load(snapshot bytes) {} ({}) | SQLite load+YDoc::load {} ({}) (target <= 2x)",
        fmt(yrs_load, "ms"),
        fmt(ydoc_snap, "ms"),
        ratio(ydoc_snap, yrs_load),
        fmt(sqlite, "ms"),
        ratio(sqlite, yrs_load)
    );
    match postgres {
        None => {
            let pg = ms("cold_load/postgres");
            let vacuumed = ms("cold_load/postgres_vacuumed");
            println!(
                "           Postgres load+YDoc::load {} ({}) right after the edits; {} ({}) once vacuumed",
                fmt(pg, "ms"),
                ratio(pg, yrs_load),
                fmt(vacuumed, "ms"),
                ratio(vacuumed, yrs_load)
            );
        }
        Some(why) => println!("           Postgres skipped: {why}"),
    }
    println!(
        "snapshot: compacted {} bytes vs encode_state_as_update_v1 {} bytes (room doc) = {:.3}x (target <= 1.05x); client doc's state {} bytes",
        sizes.snapshot,
        sizes.state_as_update,
        sizes.snapshot as f64 / sizes.state_as_update as f64,
        sizes.client_state_as_update
    );
    if !trace.real {
        println!("!!! SYNTHETIC TRACE: these figures are not the automerge-paper trace's !!!");
    }
    println!("=======================================================================");
}

// ---------------------------------------------------------------------------------------------

fn main() {
    STARTED.get_or_init(std::time::SystemTime::now);
    let mut c = Criterion::default().configure_from_args();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let trace = load_trace();
    println!("trace: {}", trace.provenance);
    let (stream, client) = replay(&trace);
    let n = stream.len();
    let update_bytes: usize = stream.iter().map(Bytes::len).sum();
    println!(
        "replayed {} edits into {n} v1 updates ({update_bytes} bytes); final text matches endContent ({} chars)",
        trace.txns.len(),
        trace.end.len()
    );

    // Correctness of each path before timing it.
    assert_eq!(text_of(&raw_apply_each(&stream)), trace.end);
    let room_doc = room_path(&stream, &rt);
    assert_eq!(text_of(room_doc.doc()), trace.end);
    for size in BURSTS {
        assert_eq!(text_of(&raw_apply_bursts(&stream, size)), trace.end);
    }
    let probes = merge_scaling(&stream);

    // 1 and 2: one update at a time.
    {
        let mut group = whole_stream_group(&mut c, "one_at_a_time", n);
        group.bench_function("raw_yrs", |b| b.iter(|| raw_apply_each(&stream)));
        group.bench_function("room_path", |b| b.iter(|| room_path(&stream, &rt)));
        group.finish();
    }

    // 3: the whole stream as one merged burst.
    {
        let folded = YrsFold.fold(None, &stream).expect("fold the whole stream");
        let refolded = YDoc::load(Some(&folded.state), &[]).expect("load the fold");
        assert_eq!(text_of(refolded.doc()), trace.end);
        let mut group = whole_stream_group(&mut c, "merged_burst", n);
        // tandem's own merge (compaction, and a load with a log tail): runs of keystrokes merged
        // into one block each and integrated together, other updates in transactions of 32,
        // the state encoded once. Linear, unlike `merge_updates_v1`.
        group.bench_function("tandem_fold_whole_stream", |b| {
            b.iter(|| YrsFold.fold(None, &stream).expect("fold"))
        });
        for size in BURSTS {
            group.bench_function(format!("raw_bursts_of_{size}"), |b| {
                b.iter(|| raw_apply_bursts(&stream, size))
            });
        }
        group.finish();
    }

    // 4 and 5: cold loads and snapshot size.
    let room = RoomId::new("bench").expect("room id");
    let state_as_update = room_doc
        .doc()
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    let client_state = client
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    let dir = tempfile::tempdir().expect("temp dir");
    let sqlite = rt
        .block_on(SqliteStore::open(&dir.path().join("bench.db")))
        .expect("open SQLite");
    let snapshot = rt.block_on(fill_and_compact(&sqlite, &room, &stream));
    assert_eq!(text_of(cold_load(&sqlite, &room, &rt).doc()), trace.end);
    let postgres = rt.block_on(async {
        let (admin, name) = scratch_postgres().await?;
        let url = with_database(&admin, &name);
        let options = PostgresOptions {
            max_connections: 2,
            ..PostgresOptions::default()
        };
        match PostgresStore::connect_with(&url, options).await {
            Ok(store) => {
                let pg_snapshot = fill_and_compact(&store, &room, &stream).await;
                assert_eq!(pg_snapshot, snapshot, "both stores fold the same way");
                Ok((store, admin, name))
            }
            Err(e) => {
                drop_postgres(&admin, &name).await;
                Err(e.to_string())
            }
        }
    });
    if let Err(why) = &postgres {
        println!("NOTICE: Postgres cold load skipped ({why})");
    }
    {
        let mut group = c.benchmark_group("cold_load");
        group
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(5));
        group.bench_function("raw_yrs_state_as_update", |b| {
            b.iter(|| raw_apply_one(&state_as_update))
        });
        group.bench_function("ydoc_load_snapshot_bytes", |b| {
            b.iter(|| YDoc::load(Some(&snapshot), &[]).expect("load"))
        });
        group.bench_function("sqlite", |b| b.iter(|| cold_load(&sqlite, &room, &rt)));
        if let Ok((store, admin, name)) = &postgres {
            assert_eq!(text_of(cold_load(store, &room, &rt).doc()), trace.end);
            group.bench_function("postgres", |b| b.iter(|| cold_load(store, &room, &rt)));
            // The same after autovacuum's work: the folded rows' dead index entries are gone.
            rt.block_on(vacuum_postgres(&with_database(admin, name)));
            group.bench_function("postgres_vacuumed", |b| {
                b.iter(|| cold_load(store, &room, &rt))
            });
        }
        group.finish();
    }
    rt.block_on(sqlite.close());
    if let Ok((store, admin, name)) = &postgres {
        rt.block_on(async {
            store.close().await;
            drop_postgres(admin, name).await;
        });
    }

    c.final_summary();
    let sizes = Sizes {
        updates: n,
        update_bytes,
        snapshot: snapshot.len(),
        state_as_update: state_as_update.len(),
        client_state_as_update: client_state.len(),
        end_chars: trace.end.chars().count(),
    };
    print_summary(
        &trace,
        &sizes,
        &probes,
        postgres.as_ref().err().map(String::as_str),
    );
}
