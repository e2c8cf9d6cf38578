//! What the dashboard's JSON API answers, made from what the leader
//! reports. Pure: the HTTP side fetches a [`SweepView`] and renders it
//! here, so each answer is unit-tested without a cluster.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::importance;
use crate::error::{Error, Result};
use crate::sweep::client::{find_trial, results_json, SweepView};
use crate::sweep::records::Float;
use crate::sweep::SweepRecord;

/// `GET /api/v1/sweeps`: the records (specs left out) with their summaries.
pub fn sweeps(records: &[SweepRecord], unreadable: &[String]) -> Value {
    json!({ "sweeps": records, "unreadable": unreadable })
}

/// `GET /api/v1/sweeps/{id}`: exactly what `sweep results --format json`
/// prints, plus every trial in number order (for the optimisation
/// history), the parameter names and their importance.
pub fn sweep(view: &SweepView) -> Value {
    let mut answer = results_json(view);
    let params: BTreeSet<&String> = view.trials.iter().flat_map(|t| t.config.keys()).collect();
    let trials: Vec<Value> = view
        .trials
        .iter()
        .map(|t| {
            json!({
                "trial": t.number,
                "state": t.state,
                "objective": t.objective.map(Float),
                "config": t.config,
                "epochs_done": t.epochs_done,
                "started_unix_ms": t.attempts.first().map(|a| a.started_unix_ms),
                "ended_unix_ms": t.attempts.last().and_then(|a| a.ended_unix_ms),
            })
        })
        .collect();
    answer["trials"] = Value::Array(trials);
    answer["params"] = json!(params);
    answer["importance"] = importance::of(view);
    answer
}

/// `GET /api/v1/sweeps/{id}/curves?metric=M`: one metric per epoch for
/// every trial (the objective metric when `metric` is `None`), and the
/// names of all metrics reported.
pub fn curves(view: &SweepView, metric: Option<&str>) -> Value {
    let metric = metric.unwrap_or(&view.record.objective_metric);
    let names: BTreeSet<&String> = view
        .trials
        .iter()
        .flat_map(|t| t.metrics.iter().flat_map(|m| m.metrics.keys()))
        .collect();
    let trials: Vec<Value> = view
        .trials
        .iter()
        .map(|t| {
            let (epochs, values): (Vec<u32>, Vec<Float>) = t
                .metrics
                .iter()
                .filter_map(|m| m.metrics.get(metric).map(|v| (m.epoch, Float(*v))))
                .unzip();
            json!({
                "trial": t.number,
                "state": t.state,
                "epochs": epochs,
                "values": values,
                "stop_reason": t.stop_reason,
            })
        })
        .collect();
    json!({ "metric": metric, "metrics": names, "trials": trials })
}

/// `GET /api/v1/sweeps/{id}/trials/{n}`: the trial record as stored.
pub fn trial(view: &SweepView, number: u64) -> Result<Value> {
    let record = find_trial(view, number)?;
    serde_json::to_value(record).map_err(|e| Error::Corrupt(format!("trial {number}: {e}")))
}

/// Metric names a query may ask for: what workers report (letters,
/// digits, `_`, `-`, `.`), bounded.
pub fn valid_metric_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= crate::limits::MAX_METRIC_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sweep::records::{EpochMetrics, SweepKind, SweepState, TrialRecord, TrialState};

    pub fn record(trials: u64) -> SweepRecord {
        SweepRecord {
            id: "sweep-1".into(),
            seq: 1,
            kind: SweepKind::Sweep,
            name: "demo".into(),
            spec: String::new(),
            origin: "demo.toml".into(),
            state: SweepState::Running,
            submitted_unix_ms: 1,
            finished_unix_ms: None,
            objective_metric: "val_accuracy".into(),
            objective_mode: ringleader_spec::Mode::Max,
            max_trials: trials,
            owner: "alice".into(),
            failure: None,
            summary: None,
        }
    }

    pub fn trial_with(number: u64, state: TrialState, lr: f64, values: &[f64]) -> TrialRecord {
        TrialRecord {
            sweep: "sweep-1".into(),
            number,
            config: [("optimizer.lr".to_string(), json!(lr))].into(),
            state,
            bracket: 0,
            rung_results: Vec::new(),
            epochs_done: values.len() as u32,
            failures: 0,
            attempts: Vec::new(),
            metrics: values
                .iter()
                .enumerate()
                .map(|(i, v)| EpochMetrics {
                    epoch: i as u32 + 1,
                    metrics: [
                        ("val_accuracy".to_string(), *v),
                        ("train_loss".to_string(), 1.0 - v),
                    ]
                    .into(),
                })
                .collect(),
            objective: values.last().copied(),
            checkpoint: None,
            error: None,
            stop_reason: None,
            folds: Vec::new(),
            objective_std: None,
            lineage: None,
        }
    }

    fn view() -> SweepView {
        SweepView {
            record: record(3),
            trials: vec![
                trial_with(0, TrialState::Stopped, 0.1, &[0.5]),
                trial_with(1, TrialState::Completed, 0.01, &[0.6, 0.8]),
                trial_with(2, TrialState::Diverged, 1.0, &[f64::NAN]),
            ],
        }
    }

    #[test]
    fn the_sweep_answer_is_the_results_json_plus_trials_in_order() {
        let view = view();
        let answer = sweep(&view);
        let results = results_json(&view);
        for key in ["sweep", "final_estimate", "leaderboard"] {
            assert_eq!(answer[key], results[key], "{key}");
        }
        let numbers: Vec<u64> = answer["trials"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["trial"].as_u64().unwrap())
            .collect();
        assert_eq!(numbers, [0, 1, 2]);
        assert_eq!(answer["trials"][2]["objective"], "NaN");
        assert_eq!(answer["params"], json!(["optimizer.lr"]));
    }

    #[test]
    fn curves_follow_the_asked_metric_and_stop_where_trials_stopped() {
        let view = view();
        let objective = curves(&view, None);
        assert_eq!(objective["metric"], "val_accuracy");
        assert_eq!(objective["trials"][0]["epochs"], json!([1]));
        assert_eq!(objective["trials"][1]["values"], json!([0.6, 0.8]));
        assert_eq!(objective["metrics"], json!(["train_loss", "val_accuracy"]));
        let loss = curves(&view, Some("train_loss"));
        assert_eq!(loss["trials"][1]["values"][1].as_f64().unwrap(), 1.0 - 0.8);
        let unknown = curves(&view, Some("nope"));
        assert_eq!(unknown["trials"][0]["epochs"], json!([]));
    }

    #[test]
    fn trials_are_found_by_number_or_named_missing() {
        let view = view();
        assert_eq!(trial(&view, 1).unwrap()["number"], 1);
        assert!(matches!(trial(&view, 9), Err(Error::NotFound(_))));
    }

    #[test]
    fn metric_names_are_plain_and_bounded() {
        assert!(valid_metric_name("val_accuracy"));
        assert!(!valid_metric_name(""));
        assert!(!valid_metric_name("a b"));
        assert!(!valid_metric_name("<script>"));
        assert!(!valid_metric_name(&"x".repeat(10_000)));
    }
}
