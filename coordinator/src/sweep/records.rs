//! What etcd holds about sweeps and trials, as JSON under
//! [`crate::store::STATE_PREFIX`]. These records are the only durable state:
//! a new leader rebuilds everything else from them.
//!
//! ```text
//! /ringleader/sweeps/<sweep id>            SweepRecord
//! /ringleader/trials/<sweep id>/<000042>   TrialRecord
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

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
    /// Every trial failed (or a job's only trial did).
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
    /// "max" or "min".
    pub objective_mode: String,
    /// Trials the sweep may start (the budget).
    pub max_trials: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    Cancelled,
}

impl TrialState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TrialState::Completed
                | TrialState::Stopped
                | TrialState::Failed
                | TrialState::Cancelled
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
    pub rung_results: Vec<f64>,
    /// Epochs covered by `checkpoint`.
    pub epochs_done: u32,
    /// Failed attempts so far.
    pub failures: u32,
    pub attempts: Vec<AttemptRecord>,
    pub metrics: Vec<EpochMetrics>,
    /// The objective at the latest reported epoch.
    #[serde(default)]
    pub objective: Option<f64>,
    #[serde(default)]
    pub checkpoint: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

impl TrialRecord {
    pub fn live_attempt(&self) -> Option<&AttemptRecord> {
        self.attempts.last().filter(|a| a.is_live())
    }
}
