//! `--commit-window` reaches the store writer: an edit after a quiet spell is stored at once, the
//! edits that follow it within the window are stored in one commit, acknowledged only once the
//! window has passed; a window over the limit is refused when the server starts.

mod common;
#[path = "common/procs.rs"]
mod procs;

use std::time::Duration;

use common::{append_text, http_get, WAIT};
use procs::TandemProcess;
use tandem_client::Client;
use tokio::time::{sleep, timeout, Instant};

/// The value of the unlabelled series `name` in a Prometheus exposition.
fn series(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {name}"))
        .trim()
        .parse()
        .expect("a number")
}

#[tokio::test]
async fn a_lone_edit_goes_at_once_and_edits_within_the_window_share_one_commit() {
    const EDITS: usize = 5;
    let window = Duration::from_secs(1);
    let node = TandemProcess::start(
        env!("CARGO_BIN_EXE_tandem").as_ref(),
        "window",
        &["--commit-window".into(), "1s".into()],
    )
    .await;
    let client = Client::connect(&node.url("window/room"))
        .await
        .expect("connect");
    client.wait_synced(WAIT).await.expect("synced");
    // The sync's own answer, if the server stores one, is committed before the edits start.
    client
        .wait_stored(WAIT + window)
        .await
        .expect("sync stored");
    let (_, before) = http_get(node.addr(), "/metrics").await;
    let groups_before = series(&before, "tandem_store_group_size_count");

    // Quiet for longer than the window: the next edit finds no company coming.
    sleep(window + Duration::from_millis(100)).await;
    let alone = Instant::now();
    append_text(client.doc(), "t", "[alone]");
    client.wait_stored(WAIT).await.expect("stored");
    assert!(
        alone.elapsed() < window / 2,
        "an edit after a quiet spell waited {:?} for company",
        alone.elapsed()
    );

    // Edits right after it: traffic is dense, so the writer waits out its window for company.
    let first = Instant::now();
    for i in 0..EDITS {
        append_text(client.doc(), "t", &format!("[{i}]"));
        sleep(Duration::from_millis(10)).await;
    }
    timeout(WAIT + window, client.wait_stored(WAIT + window))
        .await
        .expect("acknowledged in time")
        .expect("stored");
    assert!(
        first.elapsed() >= window - Duration::from_millis(100),
        "acknowledged after {:?}, within a window of {window:?}",
        first.elapsed()
    );
    let (_, after) = http_get(node.addr(), "/metrics").await;
    let groups = series(&after, "tandem_store_group_size_count") - groups_before;
    assert_eq!(
        groups,
        2.0,
        "one edit alone, then {EDITS} edits 10 ms apart in one commit:\n{}",
        node.logs(30)
    );
}

#[tokio::test]
async fn a_window_over_a_second_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "--bind",
            "127.0.0.1:0",
            "--commit-window",
            "1001ms",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .await
        .expect("run tandem");
    assert!(!out.status.success(), "started with a 1,001 ms window");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the commit window must be at most 1 s"),
        "{stderr}"
    );
}
