//! A progress bar on stderr while a measurement phase runs. indicatif hides it when stderr is
//! not a terminal, so logs and CI output stay clean.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often the bar and its message refresh.
const TICK: Duration = Duration::from_millis(250);

/// Waits until `deadline`, showing `phase`, the time left and what `status` reports.
pub async fn wait_until(deadline: Instant, phase: &str, status: impl Fn() -> String) {
    let start = Instant::now();
    let total = deadline.saturating_duration_since(start);
    let bar = ProgressBar::new(total.as_millis() as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix:>8} [{bar:30}] {elapsed}/{duration} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(phase.to_string());
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        bar.set_position(now.duration_since(start).as_millis() as u64);
        bar.set_message(status());
        tokio::time::sleep((deadline - now).min(TICK)).await;
    }
    bar.finish_and_clear();
}
