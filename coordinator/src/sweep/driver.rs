//! One sweep's decisions, as a pure state machine over its trial records:
//! which trial runs next (a retry, an ASHA promotion or a new configuration),
//! and what each report from the workers means. No I/O and no clocks (the
//! caller passes the time), so every path is unit-tested and a new leader
//! rebuilds the same view from the records in etcd ([`Driver::restore`]).
//!
//! ```text
//!           next_work                 finished(Done), epochs < max
//!  Pending ───────────▶ Running ───────────────────────────────▶ Paused
//!     ▲                  │   │ finished(Done), epochs = max        │ promoted
//!     │ retry            │   ▼                                     │ (next_work)
//!     └── finished(Failed)  Completed      Paused at the end ──▶ Stopped
//!         (≤ max_failures)   (> max_failures ──▶ Failed)
//! ```

use std::collections::BTreeMap;

use serde_json::Value;

use super::records::{AttemptOutcome, AttemptRecord, EpochMetrics, TrialRecord, TrialState};
use crate::search::{Asha, AshaError, Grid, Mode, Random, Space, Tpe, TpeOptions};

/// Where configurations come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A job: one trial, no overrides.
    Fixed,
    Grid {
        points: usize,
    },
    Random,
    Tpe(TpeOptions),
}

/// ASHA rungs (Hyperband when `brackets` > 1: bracket b starts at
/// `min_epochs · eta^b`).
#[derive(Clone, Copy, Debug)]
pub struct Stopping {
    pub eta: u32,
    pub min_epochs: u32,
    pub brackets: u32,
}

#[derive(Clone, Debug)]
pub struct DriverConfig {
    pub sweep: String,
    pub space: Space,
    pub source: Source,
    pub stopping: Option<Stopping>,
    pub seed: u64,
    pub max_trials: u64,
    pub max_concurrent: Option<u32>,
    pub max_epochs: u32,
    pub max_failures: u32,
    pub metric: String,
    pub mode: Mode,
}

/// A segment of a trial to start on a gang of workers.
#[derive(Clone, Debug, PartialEq)]
pub struct Work {
    pub trial: u64,
    pub start_epoch: u32,
    pub stop_epoch: u32,
}

enum Configs {
    Fixed,
    Grid(Grid),
    Random(Random),
    Tpe(Box<Tpe>),
}

pub struct Driver {
    config: DriverConfig,
    trials: BTreeMap<u64, TrialRecord>,
    configs: Configs,
    /// One ASHA per bracket; empty without early stopping.
    brackets: Vec<Asha>,
    /// Promotions decided but not yet started (no workers were free).
    promoted: Vec<(u64, u32)>,
    /// The source has no more configurations (grid done, job started).
    exhausted: bool,
}

impl Driver {
    pub fn new(config: DriverConfig) -> Result<Self, AshaError> {
        let configs = match &config.source {
            Source::Fixed => Configs::Fixed,
            Source::Grid { points } => Configs::Grid(Grid::new(&config.space, *points)),
            Source::Random => Configs::Random(Random::new(config.space.clone(), config.seed)),
            Source::Tpe(options) => Configs::Tpe(Box::new(Tpe::new(
                config.space.clone(),
                config.mode,
                options.clone(),
                config.seed,
            ))),
        };
        let brackets = match config.stopping {
            None => Vec::new(),
            Some(s) => {
                let mut brackets = Vec::new();
                let mut min = s.min_epochs;
                for _ in 0..s.brackets.max(1) {
                    if min > config.max_epochs {
                        break;
                    }
                    brackets.push(Asha::new(s.eta, min, config.max_epochs, config.mode)?);
                    min = min.saturating_mul(s.eta);
                }
                brackets
            }
        };
        Ok(Self {
            config,
            trials: BTreeMap::new(),
            configs,
            brackets,
            promoted: Vec::new(),
            exhausted: false,
        })
    }

    /// Rebuilds the driver from stored records, replaying the searcher so
    /// later configurations follow on, and ASHA's rungs and promotions.
    pub fn restore(config: DriverConfig, records: Vec<TrialRecord>) -> Result<Self, AshaError> {
        let mut driver = Self::new(config)?;
        for record in records {
            let _ = driver.next_config();
            if record.state.is_terminal() {
                if let Some(objective) = record.objective {
                    driver.observe(&record.config, objective);
                }
            }
            if let Some(asha) = driver.brackets.get_mut(record.bracket) {
                for (rung, metric) in record.rung_results.iter().enumerate() {
                    asha.record(record.number, rung, *metric)?;
                }
                let reached = record.rung_results.len();
                let moved_on = matches!(record.state, TrialState::Running | TrialState::Completed)
                    || (record.state == TrialState::Pending && reached > 0);
                if reached > 0 && moved_on {
                    asha.mark_promoted(record.number, reached - 1);
                }
            }
            driver.trials.insert(record.number, record);
        }
        Ok(driver)
    }

    pub fn trials(&self) -> &BTreeMap<u64, TrialRecord> {
        &self.trials
    }

    pub fn trial(&self, number: u64) -> Option<&TrialRecord> {
        self.trials.get(&number)
    }

    pub fn running(&self) -> usize {
        self.count(TrialState::Running)
    }

    fn count(&self, state: TrialState) -> usize {
        self.trials.values().filter(|t| t.state == state).count()
    }

    /// May another trial start now (concurrency limit)?
    pub fn has_capacity(&self) -> bool {
        match self.config.max_concurrent {
            Some(limit) => self.running() < limit as usize,
            None => true,
        }
    }

    /// The next segment to run, in priority order: a re-queued trial, an
    /// ASHA promotion, a new configuration. `None`: nothing to do now.
    /// The trial is not marked running until [`Driver::start`].
    pub fn next_work(&mut self) -> Option<Work> {
        if !self.has_capacity() {
            return None;
        }
        if let Some(t) = self
            .trials
            .values()
            .find(|t| t.state == TrialState::Pending)
        {
            return Some(Work {
                trial: t.number,
                start_epoch: t.epochs_done,
                stop_epoch: self.target_epoch(t),
            });
        }
        if self.promoted.is_empty() {
            for asha in &mut self.brackets {
                if let Some(p) = asha.next_promotion() {
                    self.promoted.push((p.trial, p.resource));
                    break;
                }
            }
        }
        if let Some(&(trial, resource)) = self.promoted.first() {
            let start = self.trials.get(&trial).map_or(0, |t| t.epochs_done);
            return Some(Work {
                trial,
                start_epoch: start,
                stop_epoch: resource,
            });
        }
        if self.exhausted || self.trials.len() as u64 >= self.config.max_trials {
            return None;
        }
        let number = self.trials.len() as u64;
        let Some(config) = self.next_config() else {
            self.exhausted = true;
            return None;
        };
        let bracket = if self.brackets.is_empty() {
            0
        } else {
            (number % self.brackets.len() as u64) as usize
        };
        let record = TrialRecord {
            sweep: self.config.sweep.clone(),
            number,
            config,
            state: TrialState::Pending,
            bracket,
            rung_results: Vec::new(),
            epochs_done: 0,
            failures: 0,
            attempts: Vec::new(),
            metrics: Vec::new(),
            objective: None,
            checkpoint: None,
            error: None,
        };
        let stop_epoch = self.target_epoch(&record);
        self.trials.insert(number, record);
        Some(Work {
            trial: number,
            start_epoch: 0,
            stop_epoch,
        })
    }

    /// The epoch the trial's next segment trains up to: its next rung.
    fn target_epoch(&self, trial: &TrialRecord) -> u32 {
        match self.brackets.get(trial.bracket) {
            None => self.config.max_epochs,
            Some(asha) => {
                let resources = asha.resources();
                let rung = trial.rung_results.len().min(resources.len() - 1);
                resources[rung]
            }
        }
    }

    /// Marks `work` as running on `workers` and returns its attempt.
    pub fn start(
        &mut self,
        work: &Work,
        generation: u64,
        workers: Vec<String>,
        now_ms: u64,
    ) -> AttemptRecord {
        self.promoted.retain(|(t, _)| *t != work.trial);
        let trial = self
            .trials
            .get_mut(&work.trial)
            .expect("work names a trial");
        let attempt = AttemptRecord {
            number: trial.attempts.len() as u32 + 1,
            generation,
            workers,
            start_epoch: work.start_epoch,
            stop_epoch: work.stop_epoch,
            started_unix_ms: now_ms,
            ended_unix_ms: None,
            outcome: None,
            error: None,
        };
        trial.state = TrialState::Running;
        trial.attempts.push(attempt.clone());
        attempt
    }

    /// Records an epoch's metrics from the live `attempt`; stale reports
    /// (an older attempt) are ignored. Returns whether anything changed.
    pub fn epoch(
        &mut self,
        trial: u64,
        attempt: u32,
        epoch: u32,
        metrics: BTreeMap<String, f64>,
        checkpoint: Option<String>,
    ) -> bool {
        let metric = self.config.metric.clone();
        let Some(t) = self.live(trial, attempt) else {
            return false;
        };
        if let Some(value) = metrics.get(&metric) {
            t.objective = Some(*value);
        }
        t.metrics.retain(|m| m.epoch < epoch);
        t.metrics.push(EpochMetrics { epoch, metrics });
        if let Some(path) = checkpoint {
            t.checkpoint = Some(path);
            t.epochs_done = epoch;
        }
        true
    }

    fn live(&mut self, trial: u64, attempt: u32) -> Option<&mut TrialRecord> {
        self.trials.get_mut(&trial).filter(|t| {
            t.state == TrialState::Running && t.live_attempt().is_some_and(|a| a.number == attempt)
        })
    }

    /// Ends the live `attempt` of `trial`. Returns whether anything changed
    /// (false for a stale or repeated report).
    pub fn finished(
        &mut self,
        trial: u64,
        attempt: u32,
        outcome: AttemptOutcome,
        epochs_done: u32,
        error: Option<String>,
        now_ms: u64,
    ) -> bool {
        let max_epochs = self.config.max_epochs;
        let max_failures = self.config.max_failures;
        let metric = self.config.metric.clone();
        let Some(t) = self.live(trial, attempt) else {
            return false;
        };
        let a = t.attempts.last_mut().expect("live attempt");
        let stop_epoch = a.stop_epoch;
        t.epochs_done = t.epochs_done.max(epochs_done.min(stop_epoch));
        // A segment whose last epoch is checkpointed is done, whatever
        // happened to the attempt afterwards.
        let outcome = if t.epochs_done >= stop_epoch && t.objective.is_some() {
            AttemptOutcome::Done
        } else {
            outcome
        };
        a.outcome = Some(outcome);
        a.ended_unix_ms = Some(now_ms);
        a.error = error.clone();
        match outcome {
            AttemptOutcome::Abandoned => t.state = TrialState::Pending,
            AttemptOutcome::Failed => {
                t.failures += 1;
                if t.failures > max_failures {
                    t.state = TrialState::Failed;
                    t.error = error;
                } else {
                    t.state = TrialState::Pending;
                }
            }
            AttemptOutcome::Done => {
                let objective = t.objective;
                let Some(value) = objective.filter(|v| !v.is_nan()) else {
                    t.state = TrialState::Failed;
                    t.error = Some(format!(
                        "the objective metric `{metric}` was not reported by epoch {stop_epoch}"
                    ));
                    return true;
                };
                if stop_epoch >= max_epochs {
                    t.state = TrialState::Completed;
                } else {
                    t.state = TrialState::Paused;
                }
                let (number, bracket, rung, config) =
                    (t.number, t.bracket, t.rung_results.len(), t.config.clone());
                if let Some(asha) = self.brackets.get_mut(bracket) {
                    let top = asha.resources().len() - 1;
                    if rung <= top && asha.record(number, rung, value).is_ok() {
                        if let Some(t) = self.trials.get_mut(&number) {
                            t.rung_results.push(value);
                        }
                    }
                }
                if self.trials[&number].state == TrialState::Completed {
                    self.observe(&config, value);
                }
            }
        }
        true
    }

    /// Fails a trial that cannot run at all (its configuration does not
    /// make a valid job): retrying would not help.
    pub fn reject(&mut self, trial: u64, error: String) {
        self.promoted.retain(|(t, _)| *t != trial);
        if let Some(t) = self.trials.get_mut(&trial) {
            t.state = TrialState::Failed;
            t.error = Some(error);
        }
    }

    /// Cancels every trial not yet finished; returns the live attempts to
    /// stop as (trial, attempt).
    pub fn cancel(&mut self, now_ms: u64) -> Vec<(u64, AttemptRecord)> {
        let mut live = Vec::new();
        for t in self.trials.values_mut().filter(|t| !t.state.is_terminal()) {
            if let Some(a) = t.attempts.last_mut().filter(|a| a.is_live()) {
                a.outcome = Some(AttemptOutcome::Abandoned);
                a.ended_unix_ms = Some(now_ms);
                live.push((t.number, a.clone()));
            }
            t.state = TrialState::Cancelled;
        }
        self.promoted.clear();
        self.exhausted = true;
        live
    }

    /// True once nothing runs or waits and nothing new can start. Paused
    /// trials left then are stopped by [`Driver::stop_paused`].
    pub fn is_done(&mut self) -> bool {
        if self
            .trials
            .values()
            .any(|t| matches!(t.state, TrialState::Pending | TrialState::Running))
            || !self.promoted.is_empty()
        {
            return false;
        }
        if !self.exhausted && (self.trials.len() as u64) < self.config.max_trials {
            return false;
        }
        for asha in &mut self.brackets {
            if let Some(p) = asha.next_promotion() {
                self.promoted.push((p.trial, p.resource));
                return false;
            }
        }
        true
    }

    /// Stops the trials still paused at a rung; returns their numbers.
    pub fn stop_paused(&mut self) -> Vec<u64> {
        let mut stopped = Vec::new();
        let mut observed = Vec::new();
        for t in self
            .trials
            .values_mut()
            .filter(|t| t.state == TrialState::Paused)
        {
            t.state = TrialState::Stopped;
            stopped.push(t.number);
            if let Some(v) = t.objective {
                observed.push((t.config.clone(), v));
            }
        }
        for (config, v) in observed {
            self.observe(&config, v);
        }
        stopped
    }

    fn next_config(&mut self) -> Option<BTreeMap<String, Value>> {
        match &mut self.configs {
            Configs::Fixed => (self.trials.is_empty()).then(BTreeMap::new),
            Configs::Grid(grid) => grid.next_config(),
            Configs::Random(random) => Some(random.next_config()),
            Configs::Tpe(tpe) => Some(tpe.next_config()),
        }
    }

    fn observe(&mut self, config: &BTreeMap<String, Value>, objective: f64) {
        if let Configs::Tpe(tpe) = &mut self.configs {
            tpe.observe(config.clone(), objective);
        }
    }

    /// The best finished-or-stopped trial by its latest objective.
    pub fn best(&self) -> Option<&TrialRecord> {
        best_trial(self.trials.values(), self.config.mode)
    }
}

/// The trial with the best latest objective among `trials`.
pub fn best_trial<'a>(
    trials: impl Iterator<Item = &'a TrialRecord>,
    mode: Mode,
) -> Option<&'a TrialRecord> {
    trials
        .filter(|t| t.objective.is_some_and(|v| !v.is_nan()))
        .min_by(|a, b| {
            let (x, y) = (
                a.objective.unwrap_or_default(),
                b.objective.unwrap_or_default(),
            );
            let order = x.total_cmp(&y);
            if mode == Mode::Max {
                order.reverse()
            } else {
                order
            }
        })
}
