//! What etcd holds about sweeps and trials, as JSON under the leader's
//! state prefix. These records are the only durable state: a new leader
//! rebuilds everything else from them, and clients read them as the
//! leader serves them.
//!
//! ```text
//! /ringleader/sweeps/<sweep id>            SweepRecord
//! /ringleader/trials/<sweep id>/<000042>   TrialRecord
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Mode;

pub use float::Float;

pub const SWEEPS_PREFIX: &str = "/ringleader/sweeps/";
pub const TRIALS_PREFIX: &str = "/ringleader/trials/";

pub fn sweep_key(sweep: &str) -> String {
    format!("{SWEEPS_PREFIX}{sweep}")
}

pub fn trial_key(sweep: &str, trial: u64) -> String {
    format!("{TRIALS_PREFIX}{sweep}/{trial:06}")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SweepKind {
    /// One trial with fixed hyperparameters.
    Job,
    Sweep,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SweepState {
    Running,
    Completed,
    Cancelled,
    /// Every trial failed (or a job's only trial did), or a new leader
    /// could not take the sweep over (see [`SweepRecord::failure`]).
    Failed,
}

impl SweepState {
    pub fn is_terminal(self) -> bool {
        self != SweepState::Running
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepRecord {
    pub id: String,
    /// Submission order: sweeps are served first come, first served.
    pub seq: u64,
    pub kind: SweepKind,
    pub name: String,
    /// The spec file's text and name, exactly as submitted.
    pub spec: String,
    pub origin: String,
    pub state: SweepState,
    pub submitted_unix_ms: u64,
    #[serde(default)]
    pub finished_unix_ms: Option<u64>,
    pub objective_metric: String,
    pub objective_mode: Mode,
    /// Trials the sweep may start (the budget).
    pub max_trials: u64,
    /// The user who submitted it ("" for records from before owners: then
    /// only admins and viewers see it).
    #[serde(default)]
    pub owner: String,
    /// Why a leader marked the sweep failed when it could not take it over
    /// (its spec no longer parses, a trial record is unreadable, its trials
    /// do not replay), each problem naming the etcd key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Trials by state and the best so far: kept current by the leader
    /// while the sweep runs and written with the finished record, so a
    /// list of sweeps shows progress without reading every trial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<SweepSummary>,
}

/// How a state or outcome is spelled in records (`early_stopped`).
pub fn wire_name<T: Serialize>(value: T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// A sweep's trials at a glance.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SweepSummary {
    pub trials: BTreeMap<TrialState, u64>,
    /// Attempts by outcome (`running` while live).
    #[serde(default)]
    pub attempts: BTreeMap<String, u64>,
    #[serde(default)]
    pub best_trial: Option<u64>,
    #[serde(default, with = "float::option")]
    pub best_objective: Option<f64>,
}

impl SweepSummary {
    pub fn of<'a>(trials: impl Iterator<Item = &'a TrialRecord> + Clone, mode: Mode) -> Self {
        let mut counts = BTreeMap::new();
        let mut attempts = BTreeMap::new();
        for t in trials.clone() {
            *counts.entry(t.state).or_insert(0) += 1;
            for a in &t.attempts {
                let outcome = match a.outcome {
                    None => "running".to_string(),
                    Some(outcome) => wire_name(outcome),
                };
                *attempts.entry(outcome).or_insert(0) += 1;
            }
        }
        let best = best_trial(trials.filter(|t| t.state.has_result()), mode);
        Self {
            trials: counts,
            attempts,
            best_trial: best.map(|t| t.number),
            best_objective: best.and_then(|t| t.objective),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrialState {
    /// Waiting for workers (new, or re-queued after a failed attempt).
    Pending,
    Running,
    /// Reached an ASHA rung; waits for a promotion.
    Paused,
    Completed,
    /// Stopped early by the searcher.
    Stopped,
    Failed,
    /// Its loss became NaN or infinite and the job said to stop on that
    /// (`on_divergence = "stop"`): ended at once, never retried; searchers
    /// count it as the worst value.
    Diverged,
    /// The job's `early_stopping` rule ended it on a plateau: finished
    /// (never promoted), its objective the last value it reported;
    /// `stop_reason` says why.
    #[serde(rename = "early_stopped")]
    EarlyStopped,
    Cancelled,
}

impl TrialState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TrialState::Completed
                | TrialState::Stopped
                | TrialState::Failed
                | TrialState::Diverged
                | TrialState::EarlyStopped
                | TrialState::Cancelled
        )
    }

    /// Finished with a result that counts (a candidate for the best trial).
    pub fn has_result(self) -> bool {
        matches!(
            self,
            TrialState::Completed | TrialState::Stopped | TrialState::EarlyStopped
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttemptOutcome {
    /// Trained every epoch it was assigned.
    Done,
    Failed,
    /// Stopped without fault (cancel, graceful worker shutdown).
    Abandoned,
    /// The loss became non-finite and the job stops on that.
    Diverged,
    /// The job's early stopping rule ended training on a plateau.
    #[serde(rename = "early_stopped")]
    EarlyStopped,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub number: u32,
    /// Ring generation of the gang.
    pub generation: u64,
    /// Worker ids in rank order.
    pub workers: Vec<String>,
    pub start_epoch: u32,
    pub stop_epoch: u32,
    /// The cross-validation fold this attempt trains (0-based); `None`
    /// without cross-validation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fold: Option<u32>,
    pub started_unix_ms: u64,
    #[serde(default)]
    pub ended_unix_ms: Option<u64>,
    #[serde(default)]
    pub outcome: Option<AttemptOutcome>,
    #[serde(default)]
    pub error: Option<String>,
}

impl AttemptRecord {
    pub fn is_live(&self) -> bool {
        self.outcome.is_none()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: u32,
    #[serde(with = "float::map")]
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrialRecord {
    pub sweep: String,
    pub number: u64,
    /// Parameter path → value (overrides of the base job).
    pub config: BTreeMap<String, Value>,
    pub state: TrialState,
    /// Hyperband bracket (0 for plain ASHA).
    pub bracket: usize,
    /// Objective at each ASHA rung reached, bottom first.
    #[serde(with = "float::vec")]
    pub rung_results: Vec<f64>,
    /// Epochs covered by `checkpoint`.
    pub epochs_done: u32,
    /// Failed attempts so far.
    pub failures: u32,
    pub attempts: Vec<AttemptRecord>,
    pub metrics: Vec<EpochMetrics>,
    /// The objective at the latest reported epoch.
    #[serde(default, with = "float::option")]
    pub objective: Option<f64>,
    #[serde(default)]
    pub checkpoint: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    /// Why an early-stopped trial ended ("early stopped at epoch 7:
    /// val_loss did not improve by 0.001 for 3 epochs (best 0.3120 at
    /// epoch 4)").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// Cross-validation: each fold's progress, by fold index (empty
    /// without). The trial's `objective` is the mean of the folds'
    /// objectives once every fold is done, `objective_std` their spread
    /// and `metrics` the per-metric mean of their last epochs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub folds: Vec<FoldProgress>,
    /// Cross-validation: the folds' objectives' (population) standard
    /// deviation.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "float::option"
    )]
    pub objective_std: Option<f64>,
    /// Where the model came from, as the latest attempt that trained it
    /// reported (docs/MODELS.md); `started_unix_ms` is kept from the
    /// first such attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<Lineage>,
}

/// A trial's lineage: the data and code a model was trained from. Every
/// list and string is bounded where the worker's report arrives
/// (the coordinator's limits, docs/LIMITS.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    /// The job's data files (and TorchScript module) with their SHA-256.
    pub files: Vec<FileDigest>,
    /// Files the worker left out of `files` (past the limit).
    #[serde(default)]
    pub files_left_out: u32,
    /// SHA-256 of the job spec (JSON) the attempt ran.
    pub spec_sha256: String,
    pub worker_version: String,
    /// Git commit the worker binary was built from, or "unknown".
    pub worker_commit: String,
    pub seed: u64,
    pub started_unix_ms: u64,
    pub ended_unix_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

impl TrialRecord {
    /// The live attempt of a trial without folds (the last one, if live).
    pub fn live_attempt(&self) -> Option<&AttemptRecord> {
        self.attempts.last().filter(|a| a.is_live())
    }

    /// Every live attempt: one at most, or one per running fold.
    pub fn live_attempts(&self) -> impl Iterator<Item = &AttemptRecord> {
        self.attempts.iter().filter(|a| a.is_live())
    }

    /// Attempt `number`, if it is live.
    pub fn live_attempt_numbered(&self, number: u32) -> Option<&AttemptRecord> {
        self.live_attempts().find(|a| a.number == number)
    }
}

/// One cross-validation fold of a trial.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FoldProgress {
    /// Epochs covered by `checkpoint`.
    pub epochs_done: u32,
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// The objective at the fold's latest reported epoch.
    #[serde(default, with = "float::option")]
    pub objective: Option<f64>,
    /// The fold's latest epoch's metrics.
    #[serde(default, with = "float::map")]
    pub metrics: BTreeMap<String, f64>,
    /// Trained to the end (or stopped early by its job's rule).
    #[serde(default)]
    pub done: bool,
}

/// Non-finite numbers in records. JSON has no NaN or infinity, and
/// serde_json writes them as `null`, which then does not read back as a
/// number: one diverged trial made a whole sweep unreadable. Here a
/// non-finite value is written as the string `"NaN"`, `"Infinity"` or
/// `"-Infinity"` (the spelling JavaScript, Python's `json` and Jackson
/// read), finite values stay plain numbers, and `null` (what older records
/// hold) reads back as NaN. Every record therefore round-trips.
pub mod float {
    use std::collections::BTreeMap;
    use std::fmt;

    use serde::de::{self, Deserializer, Visitor};
    use serde::ser::Serializer;
    use serde::{Deserialize, Serialize};

    /// An `f64` that survives JSON whatever its value.
    #[derive(Clone, Copy, Debug, PartialEq)]
    pub struct Float(pub f64);

    impl Serialize for Float {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let v = self.0;
            if v.is_finite() {
                serializer.serialize_f64(v)
            } else if v.is_nan() {
                serializer.serialize_str("NaN")
            } else if v > 0.0 {
                serializer.serialize_str("Infinity")
            } else {
                serializer.serialize_str("-Infinity")
            }
        }
    }

    impl<'de> Deserialize<'de> for Float {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct FloatVisitor;
            impl Visitor<'_> for FloatVisitor {
                type Value = Float;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a number, \"NaN\", \"Infinity\" or \"-Infinity\"")
                }
                fn visit_f64<E: de::Error>(self, v: f64) -> Result<Float, E> {
                    Ok(Float(v))
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<Float, E> {
                    Ok(Float(v as f64))
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<Float, E> {
                    Ok(Float(v as f64))
                }
                fn visit_unit<E: de::Error>(self) -> Result<Float, E> {
                    Ok(Float(f64::NAN))
                }
                fn visit_none<E: de::Error>(self) -> Result<Float, E> {
                    Ok(Float(f64::NAN))
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Float, E> {
                    match v {
                        "NaN" => Ok(Float(f64::NAN)),
                        "Infinity" => Ok(Float(f64::INFINITY)),
                        "-Infinity" => Ok(Float(f64::NEG_INFINITY)),
                        _ => Err(E::invalid_value(de::Unexpected::Other("a string"), &self)),
                    }
                }
            }
            deserializer.deserialize_any(FloatVisitor)
        }
    }

    /// `#[serde(with = "float::option")]`: `None` is absent or `null`.
    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
            v.map(Float).serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
            Ok(Option::<Float>::deserialize(d)?.map(|f| f.0))
        }
    }

    /// `#[serde(with = "float::vec")]`.
    pub mod vec {
        use super::*;

        pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(v.iter().map(|x| Float(*x)))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
            Ok(Vec::<Float>::deserialize(d)?
                .into_iter()
                .map(|f| f.0)
                .collect())
        }
    }

    /// `#[serde(with = "float::map")]`.
    pub mod map {
        use super::*;

        pub fn serialize<S: Serializer>(
            v: &BTreeMap<String, f64>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            s.collect_map(v.iter().map(|(k, x)| (k, Float(*x))))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<BTreeMap<String, f64>, D::Error> {
            Ok(BTreeMap::<String, Float>::deserialize(d)?
                .into_iter()
                .map(|(k, f)| (k, f.0))
                .collect())
        }
    }
}

/// The trial with the best latest objective among `trials`.
pub fn best_trial<'a>(
    trials: impl Iterator<Item = &'a TrialRecord>,
    mode: Mode,
) -> Option<&'a TrialRecord> {
    trials
        .filter(|t| t.objective.is_some_and(f64::is_finite))
        .min_by(|a, b| {
            mode.best_first(
                a.objective.unwrap_or_default(),
                b.objective.unwrap_or_default(),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(objective: Option<f64>, values: &[f64]) -> TrialRecord {
        TrialRecord {
            sweep: "sweep-1".into(),
            number: 0,
            config: BTreeMap::new(),
            state: TrialState::Diverged,
            bracket: 0,
            rung_results: values.to_vec(),
            epochs_done: 2,
            failures: 0,
            attempts: Vec::new(),
            metrics: vec![EpochMetrics {
                epoch: 2,
                metrics: values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (format!("m{i}"), *v))
                    .collect(),
            }],
            objective,
            checkpoint: None,
            error: Some("diverged: loss is NaN at epoch 2".into()),
            stop_reason: None,
            folds: Vec::new(),
            objective_std: None,
            lineage: None,
        }
    }

    /// Bit patterns, so that NaN compares equal to NaN.
    fn bits(t: &TrialRecord) -> (Option<u64>, Vec<u64>, Vec<u64>) {
        (
            t.objective.map(f64::to_bits),
            t.rung_results.iter().map(|v| v.to_bits()).collect(),
            t.metrics[0].metrics.values().map(|v| v.to_bits()).collect(),
        )
    }

    #[test]
    fn non_finite_numbers_round_trip_through_json() {
        let values = [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            0.25,
            -1e300,
            0.0,
        ];
        for objective in [None, Some(f64::NAN), Some(f64::INFINITY), Some(1.5)] {
            let record = trial(objective, &values);
            let json = serde_json::to_string(&record).unwrap();
            let back: TrialRecord = serde_json::from_str(&json).unwrap();
            assert_eq!(bits(&back), bits(&record), "{json}");
            assert_eq!(serde_json::to_string(&back).unwrap(), json);
        }
        let json = serde_json::to_string(&trial(Some(f64::NAN), &values)).unwrap();
        assert!(json.contains(r#""objective":"NaN""#), "{json}");
        assert!(json.contains(r#""m1":"Infinity""#), "{json}");
        assert!(json.contains(r#""m2":"-Infinity""#), "{json}");
    }

    #[test]
    fn records_written_before_the_fix_read_back() {
        // What serde_json wrote for a NaN loss: `null`.
        let mut json = serde_json::to_value(trial(Some(1.0), &[1.0])).unwrap();
        json["metrics"][0]["metrics"]["m0"] = Value::Null;
        json["rung_results"][0] = Value::Null;
        let back: TrialRecord = serde_json::from_value(json).unwrap();
        assert!(back.metrics[0].metrics["m0"].is_nan());
        assert!(back.rung_results[0].is_nan());
    }

    #[test]
    fn other_strings_are_not_numbers() {
        let mut json = serde_json::to_value(trial(Some(1.0), &[1.0])).unwrap();
        json["objective"] = Value::String("nan".into());
        let error = serde_json::from_value::<TrialRecord>(json).unwrap_err();
        assert!(error.to_string().contains("\"NaN\""), "{error}");
    }
}
