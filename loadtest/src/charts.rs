//! `--out DIR`: a results folder with the report as `report.json` and SVG charts drawn from it.
//!
//! The charts read only the report, so any scenario whose runs carry these fields gets them:
//! - `latency_curve` (from [`percentile_curve`]): `latency.svg`, the HDR percentile plot (x:
//!   percentile on a log scale of 1 / (1 − p), y: ms), one line per target;
//! - `deliveries_per_second` (one count per second of the run): `throughput.svg`;
//! - `timeline` (objects with `t_secs` and the keys of [`TIMELINE_CHARTS`]): one chart per key
//!   (the server's RSS, threads, open files, CPU, tandem's gauges over the run).
//!
//! SVG only, and plotters without a font backend: labels are measured with plotters' built-in
//! estimate and rendered by whatever displays the SVG, so writing charts needs no fontconfig and
//! no font file on the machine (a bitmap would need one to rasterise the text).

use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;
use serde_json::{json, Value};

type Res<T> = Result<T, String>;

/// Chart size in pixels.
const SIZE: (u32, u32) = (960, 560);
/// Steps per halving of the distance to 100 % in [`percentile_curve`] (HdrHistogram's usual 5).
const TICKS_PER_HALF: u32 = 5;
/// The percentile axis ends at 1 / (1 − p) = this at most (99.9999 %); the maximum is drawn
/// there.
const MAX_INVERSE_TAIL: f64 = 1e6;

/// Line colours, one per target, in the order of the report's runs.
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

/// The `timeline` keys charted: (key, file name, y-axis label, factor applied to the value).
pub const TIMELINE_CHARTS: [(&str, &str, &str, f64); 7] = [
    ("rss_kib", "rss.svg", "server RSS (MiB)", 1.0 / 1024.0),
    ("threads", "threads.svg", "server threads", 1.0),
    ("fds", "fds.svg", "server open file descriptors", 1.0),
    ("cpu_percent", "cpu.svg", "server CPU (% of one core)", 1.0),
    ("clients", "clients.svg", "client connections open", 1.0),
    (
        "tandem_connections",
        "tandem_connections.svg",
        "tandem_connections (gauge)",
        1.0,
    ),
    (
        "tandem_rooms_loaded",
        "tandem_rooms_loaded.svg",
        "tandem_rooms_loaded (gauge)",
        1.0,
    ),
];

/// The HDR percentile curve of a latency histogram (µs) as `[[percentile, ms], …]`: HdrHistogram's
/// percentile iteration, which steps finer towards the tail.
pub fn percentile_curve(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!([]);
    }
    let points: Vec<Value> = h
        .iter_quantiles(TICKS_PER_HALF)
        .map(|v| {
            json!([
                v.quantile_iterated_to() * 100.0,
                v.value_iterated_to() as f64 / 1000.0
            ])
        })
        .collect();
    Value::Array(points)
}

/// Creates `dir`, writes `report.json` and every chart the report has data for; the files
/// written.
pub fn write(dir: &Path, report: &Value) -> Res<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut written = Vec::new();
    let json_path = dir.join("report.json");
    let text = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    std::fs::write(&json_path, text + "\n").map_err(|e| format!("{}: {e}", json_path.display()))?;
    written.push(json_path);
    let runs: Vec<&Value> = report["runs"]
        .as_array()
        .map(|r| r.iter().filter(|r| r.get("error").is_none()).collect())
        .unwrap_or_default();
    let scenario = report["scenario"].as_str().unwrap_or("run");

    let latency: Vec<Series> = series(&runs, |run| {
        run["latency_curve"].as_array().map(|pts| {
            pts.iter()
                .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
                // 1 / (1 − p): 0 % at 1, 90 % at 10, 99 % at 100, …; 100 % (the maximum)
                // is infinite here and drawn at the axis' end.
                .map(|(p, ms)| (100.0 / (100.0 - p), ms))
                .collect()
        })
    });
    if !latency.is_empty() {
        let path = dir.join("latency.svg");
        percentile_chart(&path, &format!("{scenario}: delivery latency"), &latency)?;
        written.push(path);
    }

    let throughput = series(&runs, |run| {
        run["deliveries_per_second"].as_array().map(|v| {
            v.iter()
                .enumerate()
                .filter_map(|(i, n)| Some((i as f64 + 1.0, n.as_f64()?)))
                .collect()
        })
    });
    if !throughput.is_empty() {
        let path = dir.join("throughput.svg");
        let title = format!("{scenario}: deliveries per second");
        line_chart(
            &path,
            &title,
            "second of the run",
            "deliveries / s",
            &throughput,
        )?;
        written.push(path);
    }

    for (key, file, label, factor) in TIMELINE_CHARTS {
        let lines = series(&runs, |run| {
            run["timeline"].as_array().map(|v| {
                v.iter()
                    .filter_map(|s| Some((s["t_secs"].as_f64()?, s[key].as_f64()? * factor)))
                    .collect()
            })
        });
        if lines.is_empty() {
            continue;
        }
        let path = dir.join(file);
        let title = format!("{scenario}: {label}");
        line_chart(
            &path,
            &title,
            "seconds since the baseline reading",
            label,
            &lines,
        )?;
        written.push(path);
    }
    Ok(written)
}

/// One line of a chart: the target's name and its points.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

/// The runs' lines for one chart: those for which `points` finds at least one point.
fn series(runs: &[&Value], points: impl Fn(&Value) -> Option<Vec<(f64, f64)>>) -> Vec<Series> {
    runs.iter()
        .filter_map(|run| {
            let p = points(run)?;
            (!p.is_empty()).then(|| Series {
                name: run["target"].as_str().unwrap_or("?").to_string(),
                points: p,
            })
        })
        .collect()
}

/// The largest y (at least a small positive number, so that an all-zero line still draws) with
/// 5 % headroom.
fn y_top(lines: &[Series]) -> f64 {
    let max = lines
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|y| y.is_finite())
        .fold(0.0f64, f64::max);
    if max > 0.0 {
        max * 1.15
    } else {
        1.0
    }
}

/// x from 0 (or the smallest x, if negative) to the largest x.
fn x_range(lines: &[Series]) -> std::ops::Range<f64> {
    let xs = lines.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (lo, hi) = xs.fold((0.0f64, 0.0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
    lo..hi.max(lo + 1.0)
}

/// A plain line chart, one line per series.
fn line_chart(path: &Path, title: &str, x_desc: &str, y_desc: &str, lines: &[Series]) -> Res<()> {
    draw(
        path,
        title,
        x_range(lines),
        0.0..y_top(lines),
        (x_desc, y_desc),
        &|x: &f64| format!("{x}"),
        lines,
    )
}

/// The HDR percentile plot: x is 1 / (1 − p) on a log scale, labelled as percentiles.
fn percentile_chart(path: &Path, title: &str, lines: &[Series]) -> Res<()> {
    let x_max = lines
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .filter(|x| x.is_finite())
        .fold(100.0f64, f64::max);
    // Up to the next power of ten, so that the last label is a round percentile.
    let x_max = 10f64.powf(x_max.log10().ceil()).min(MAX_INVERSE_TAIL);
    let lines: Vec<Series> = lines
        .iter()
        .map(|s| Series {
            name: s.name.clone(),
            points: s.points.iter().map(|&(x, y)| (x.min(x_max), y)).collect(),
        })
        .collect();
    let lines = &lines;
    draw(
        path,
        title,
        (1.0..x_max).log_scale(),
        0.0..y_top(lines),
        ("percentile", "latency (ms)"),
        &|x: &f64| percentile_label(*x),
        lines,
    )
}

/// 1 / (1 − p) as a percentile: 1 → "0%", 10 → "90%", 1000 → "99.9%".
fn percentile_label(inverse_tail: f64) -> String {
    let p = 100.0 * (1.0 - 1.0 / inverse_tail.max(1.0));
    let s = format!("{p:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

/// Draws `lines` into an SVG file at `path` over the given axes.
fn draw<X>(
    path: &Path,
    title: &str,
    x: X,
    y: std::ops::Range<f64>,
    (x_desc, y_desc): (&str, &str),
    x_label: &dyn Fn(&f64) -> String,
    lines: &[Series],
) -> Res<()>
where
    X: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
{
    let err = |e: &dyn std::fmt::Display| format!("chart {}: {e}", path.display());
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .margin_right(48)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x, y)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(x_label)
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in lines.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                colour.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_labels_read_as_percentiles() {
        assert_eq!(percentile_label(1.0), "0%");
        assert_eq!(percentile_label(10.0), "90%");
        assert_eq!(percentile_label(200.0), "99.5%");
        assert_eq!(percentile_label(1000.0), "99.9%");
    }

    #[test]
    fn report_with_curves_gets_charts() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
        for v in 1..=1000u64 {
            h.record(v * 10).unwrap();
        }
        let report = json!({
            "scenario": "test",
            "runs": [
                {
                    "target": "tandem",
                    "latency_curve": percentile_curve(&h),
                    "deliveries_per_second": [10, 20, 15],
                    "timeline": [{"t_secs": 0.0, "rss_kib": 1024}, {"t_secs": 1.0, "rss_kib": 2048}],
                },
                { "target": "hocuspocus", "error": "did not start" },
            ],
        });
        let dir = std::env::temp_dir().join(format!("tandem-charts-test-{}", std::process::id()));
        let files = write(&dir, &report).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["report.json", "latency.svg", "throughput.svg", "rss.svg"]
        );
        let svg = std::fs::read_to_string(dir.join("latency.svg")).unwrap();
        assert!(svg.contains("99%") && svg.contains("tandem"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
