//! `--rounds N` of the traffic scenarios: the targets run round-robin N times, and each target's
//! median run stands for it. On a machine whose load drifts, CPU figures from one run can move by
//! a fifth; round-robin spreads the drift over every target alike, and the median drops the odd
//! run without mixing figures from different runs.

use std::future::Future;

use serde_json::{json, Value};

use crate::peers::Target;

/// The figures whose range over the rounds is reported: (key in a run, label).
const SPREAD: [(&str, &str, &str); 4] = [
    ("cpu", "total_us_per_delivery", "total CPU µs / delivery"),
    ("cpu", "user_us_per_delivery", "user"),
    ("cpu", "sys_us_per_delivery", "sys"),
    ("latency", "p99_ms", "latency p99 ms"),
];

/// Runs `run` for each target in turn, `rounds` times over: every round holds one run per target,
/// in the targets' order.
pub async fn round_robin<F, Fut>(
    scenario: &str,
    targets: &[Target],
    rounds: usize,
    mut run: F,
) -> Vec<Vec<Value>>
where
    F: FnMut(Target) -> Fut,
    Fut: Future<Output = Value>,
{
    let mut all = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        let mut runs = Vec::with_capacity(targets.len());
        for &target in targets {
            if rounds > 1 {
                eprintln!(
                    "{scenario}: {} (round {round} of {rounds}) ...",
                    target.name()
                );
            } else {
                eprintln!("{scenario}: {} ...", target.name());
            }
            runs.push(run(target).await);
        }
        all.push(runs);
    }
    all
}

/// Each target's median run by total CPU per delivery, in the targets' order. With more than one
/// round, the run gains `rounds`: how many of them succeeded, which one this is, and the range of
/// [`SPREAD`]'s figures over the successful ones. A target that failed in every round is
/// represented by its first failure.
pub fn medians(rounds: &[Vec<Value>]) -> Vec<Value> {
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    if rounds.len() == 1 {
        return first.clone();
    }
    (0..first.len())
        .map(|t| {
            let runs: Vec<(usize, &Value)> = rounds
                .iter()
                .enumerate()
                .filter_map(|(i, round)| round.get(t).map(|run| (i + 1, run)))
                .collect();
            let mut ok: Vec<(usize, &Value, f64)> = runs
                .iter()
                .filter(|(_, run)| run.get("error").is_none())
                .filter_map(|&(i, run)| {
                    run["cpu"]["total_us_per_delivery"]
                        .as_f64()
                        .map(|total| (i, run, total))
                })
                .collect();
            if ok.is_empty() {
                return runs.first().map_or(Value::Null, |(_, run)| (*run).clone());
            }
            ok.sort_by(|a, b| a.2.total_cmp(&b.2));
            // The lower median for an even count: a real run either way.
            let (round, median, _) = ok[(ok.len() - 1) / 2];
            let mut spread = serde_json::Map::new();
            for (group, key, _) in SPREAD {
                let values: Vec<f64> = ok
                    .iter()
                    .filter_map(|(_, run, _)| run[group][key].as_f64())
                    .collect();
                let min = values.iter().copied().reduce(f64::min);
                let max = values.iter().copied().reduce(f64::max);
                spread.insert(format!("{group}.{key}"), json!([min, max]));
            }
            let mut median = median.clone();
            median["rounds"] = json!({
                "succeeded": ok.len(),
                "of": rounds.len(),
                "median_round": round,
                "range": spread,
            });
            median
        })
        .collect()
}

/// One line per target after the table: the rounds' range of each [`SPREAD`] figure.
pub fn print_spread(runs: &[Value]) {
    for run in runs {
        let r = &run["rounds"];
        let Some(range) = r["range"].as_object() else {
            continue;
        };
        let figures: Vec<String> = SPREAD
            .iter()
            .map(|(group, key, label)| {
                let pair = &range[&format!("{group}.{key}")];
                format!(
                    "{label} {}–{}",
                    crate::peers::num(&pair[0], 2),
                    crate::peers::num(&pair[1], 2)
                )
            })
            .collect();
        println!(
            "{}: median of {} rounds (round {}); over them: {}",
            run["target"].as_str().unwrap_or("?"),
            r["succeeded"],
            r["median_round"],
            figures.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::medians;

    fn run(target: &str, total: f64, p99: f64) -> Value {
        json!({
            "target": target,
            "cpu": { "total_us_per_delivery": total, "user_us_per_delivery": total / 2.0,
                     "sys_us_per_delivery": total / 2.0 },
            "latency": { "p99_ms": p99 },
        })
    }

    #[test]
    fn each_target_is_represented_by_its_median_run_with_the_range() {
        let rounds = vec![
            vec![run("tandem", 12.0, 1.0), run("peer", 20.0, 3.0)],
            vec![
                run("tandem", 10.0, 2.0),
                json!({ "target": "peer", "error": "boom" }),
            ],
            vec![run("tandem", 14.0, 1.5), run("peer", 22.0, 2.0)],
        ];
        let m = medians(&rounds);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0]["cpu"]["total_us_per_delivery"], 12.0);
        assert_eq!(m[0]["latency"]["p99_ms"], 1.0, "figures come from one run");
        assert_eq!(m[0]["rounds"]["median_round"], 1);
        assert_eq!(m[0]["rounds"]["succeeded"], 3);
        assert_eq!(
            m[0]["rounds"]["range"]["cpu.total_us_per_delivery"],
            json!([10.0, 14.0])
        );
        assert_eq!(m[0]["rounds"]["range"]["latency.p99_ms"], json!([1.0, 2.0]));
        // Two good runs of three: the lower one, a real run.
        assert_eq!(m[1]["cpu"]["total_us_per_delivery"], 20.0);
        assert_eq!(m[1]["rounds"]["succeeded"], 2);
    }

    #[test]
    fn one_round_is_passed_through_and_all_failures_keep_the_first() {
        let one = vec![vec![run("tandem", 12.0, 1.0)]];
        assert_eq!(medians(&one), one[0]);
        let failed = vec![
            vec![json!({ "target": "peer", "error": "first" })],
            vec![json!({ "target": "peer", "error": "second" })],
        ];
        assert_eq!(medians(&failed)[0]["error"], "first");
    }
}
