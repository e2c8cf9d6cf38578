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
//!
//!  Running ── finished(EarlyStopped) ──▶ EarlyStopped (finished; its last
//!             value goes into the ASHA rung it was climbing, never promoted)
//! ```

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use ringleader_spec::job::FoldSpec;

use super::records::{
    best_trial, AttemptOutcome, AttemptRecord, EpochMetrics, FoldProgress, Lineage, TrialRecord,
    TrialState,
};
use crate::limits::MAX_TRIAL_RECORD_BYTES;
use ringleader_spec::search::{
    Asha, AshaError, Grid, Mode, Random, Space, Tpe, TpeOptions, TrialOutcome,
};

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
    /// Cross-validation: every trial trains this many folds, each as its
    /// own attempts (never with ASHA: the sweep spec refuses it).
    pub folds: Option<u32>,
}

/// A segment of a trial to start on a gang of workers.
#[derive(Clone, Debug, PartialEq)]
pub struct Work {
    pub trial: u64,
    pub start_epoch: u32,
    pub stop_epoch: u32,
    /// The cross-validation fold this segment trains (its job validates
    /// on it); `None` without cross-validation.
    pub fold: Option<FoldSpec>,
}

enum Configs {
    Fixed,
    Grid(Grid),
    Random(Box<Random>),
    Tpe(Box<Tpe>),
}

pub struct Driver {
    config: DriverConfig,
    trials: BTreeMap<u64, TrialRecord>,
    configs: Configs,
    /// One ASHA per bracket; empty without early stopping.
    brackets: Vec<Asha>,
    /// Trials a decision made pending: new ones, and promoted ones. Those
    /// still pending once the scheduler has placed what it could (no
    /// workers were free) are written as they are
    /// ([`Driver::take_changed`]), so that the decision, and the order it
    /// gives them, outlives a failover.
    changed: Vec<u64>,
    /// The source has no more configurations (grid done, job started).
    exhausted: bool,
    /// Trials pending or running, by number: what every event asks about,
    /// without walking a sweep of thousands of trials.
    active: BTreeMap<u64, TrialState>,
    /// The pending ones among them: what placement asks for on every event
    /// (a sweep with thousands of trials running must not walk them all).
    pending: BTreeSet<u64>,
}

impl Driver {
    pub fn new(config: DriverConfig) -> Result<Self, AshaError> {
        let configs = match &config.source {
            Source::Fixed => Configs::Fixed,
            Source::Grid { points } => Configs::Grid(Grid::new(&config.space, *points)),
            Source::Random => {
                Configs::Random(Box::new(Random::new(config.space.clone(), config.seed)))
            }
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
            changed: Vec::new(),
            exhausted: false,
            active: BTreeMap::new(),
            pending: BTreeSet::new(),
        })
    }

    /// Rebuilds the driver from stored records, replaying the searcher so
    /// later configurations follow on, and ASHA's rungs and promotions.
    pub fn restore(config: DriverConfig, records: Vec<TrialRecord>) -> Result<Self, AshaError> {
        let mut driver = Self::new(config)?;
        for record in records {
            driver.skip_config();
            let mode = driver.config.mode;
            if let Some(asha) = driver.brackets.get_mut(record.bracket) {
                for (rung, metric) in record.rung_results.iter().enumerate() {
                    asha.record(record.number, rung, mode.ranked(*metric))?;
                }
                let reached = record.rung_results.len();
                // Every rung below the last one reached was left by a
                // promotion (without this, a trial paused at rung 1 was
                // offered for promotion out of rung 0 again after a
                // failover).
                for rung in 0..reached.saturating_sub(1) {
                    asha.mark_promoted(record.number, rung);
                }
                let moved_on = matches!(record.state, TrialState::Running | TrialState::Completed)
                    || (record.state == TrialState::Pending && reached > 0);
                if reached > 0 && moved_on {
                    asha.mark_promoted(record.number, reached - 1);
                }
            }
            let number = record.number;
            driver.trials.insert(number, record);
            driver.index(number);
        }
        Ok(driver)
    }

    pub fn trials(&self) -> &BTreeMap<u64, TrialRecord> {
        &self.trials
    }

    pub fn trial(&self, number: u64) -> Option<&TrialRecord> {
        self.trials.get(&number)
    }

    /// Trials with an attempt under way (a cross-validated trial with
    /// folds still waiting for workers is pending, yet running too).
    pub fn running(&self) -> usize {
        self.running_trials().count()
    }

    /// The trials with an attempt under way.
    pub fn running_trials(&self) -> impl Iterator<Item = &TrialRecord> {
        self.active
            .keys()
            .filter_map(|n| self.trials.get(n))
            .filter(|t| t.live_attempts().next().is_some())
    }

    /// Keeps [`Driver::active`] and the searcher in step with trial
    /// `number`'s state.
    fn index(&mut self, number: u64) {
        match self.trials.get(&number).map(|t| t.state) {
            Some(state @ (TrialState::Pending | TrialState::Running)) => {
                self.active.insert(number, state);
                if state == TrialState::Pending {
                    self.pending.insert(number);
                } else {
                    self.pending.remove(&number);
                }
            }
            _ => {
                self.active.remove(&number);
                self.pending.remove(&number);
            }
        }
        if let (Configs::Tpe(tpe), Some(t)) = (&mut self.configs, self.trials.get(&number)) {
            match searcher_outcome(t, self.config.mode) {
                Some(outcome) => tpe.observe(number, &t.config, outcome),
                None => tpe.forget(number),
            }
        }
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
        // The concurrency limit counts trials: the waiting folds of one
        // already under way may start.
        let under_way = self
            .pending()
            .filter(|t| t.live_attempts().next().is_some())
            .find_map(|t| self.pending_work(t));
        if under_way.is_some() {
            return under_way;
        }
        if !self.has_capacity() {
            return None;
        }
        if let Some(work) = self.pending().find_map(|t| self.pending_work(t)) {
            return Some(work);
        }
        if let Some(trial) = self.decide_promotion() {
            return self.trials.get(&trial).and_then(|t| self.pending_work(t));
        }
        if self.exhausted || self.trials.len() as u64 >= self.config.max_trials {
            return None;
        }
        let number = self.trials.len() as u64;
        let Some(config) = self.next_config(number) else {
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
            stop_reason: None,
            folds: vec![FoldProgress::default(); self.config.folds.unwrap_or(0) as usize],
            objective_std: None,
            lineage: None,
        };
        let work = self.pending_work(&record);
        self.trials.insert(number, record);
        self.changed.push(number);
        self.index(number);
        work
    }

    fn pending(&self) -> impl Iterator<Item = &TrialRecord> {
        self.pending.iter().filter_map(|n| self.trials.get(n))
    }

    /// The segment a pending trial runs next: from its checkpoint to its
    /// next rung, or, cross-validated, its first fold waiting for workers.
    fn pending_work(&self, t: &TrialRecord) -> Option<Work> {
        let Some(count) = self.config.folds else {
            return Some(Work {
                trial: t.number,
                start_epoch: t.epochs_done,
                stop_epoch: self.target_epoch(t),
                fold: None,
            });
        };
        let index = waiting_fold(t)?;
        Some(Work {
            trial: t.number,
            start_epoch: t.folds[index].epochs_done,
            stop_epoch: self.config.max_epochs,
            fold: Some(FoldSpec {
                count,
                index: index as u32,
            }),
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
            fold: work.fold.map(|f| f.index),
            started_unix_ms: now_ms,
            ended_unix_ms: None,
            outcome: None,
            error: None,
        };
        trial.attempts.push(attempt.clone());
        trial.state = match waiting_fold(trial) {
            Some(_) => TrialState::Pending,
            None => TrialState::Running,
        };
        self.index(work.trial);
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
        if let Some(fold) = fold_of(t, attempt) {
            let f = &mut t.folds[fold];
            f.objective = metrics.get(&metric).copied().or(f.objective);
            f.metrics = metrics;
            if let Some(path) = checkpoint {
                f.checkpoint = Some(path);
                f.epochs_done = epoch;
            }
            t.epochs_done = t.folds.iter().map(|f| f.epochs_done).min().unwrap_or(0);
            return true;
        }
        if let Some(value) = metrics.get(&metric) {
            t.objective = Some(*value);
        }
        t.metrics.retain(|m| m.epoch < epoch);
        t.metrics.push(EpochMetrics { epoch, metrics });
        if let Some(path) = checkpoint {
            t.checkpoint = Some(path);
            t.epochs_done = epoch;
        }
        keep_record_small(t);
        true
    }

    /// Records the lineage the live `attempt` reported; the first
    /// attempt's start time is kept (the model's training began then).
    pub fn lineage(&mut self, trial: u64, attempt: u32, mut lineage: Lineage) {
        let Some(t) = self.live(trial, attempt) else {
            return;
        };
        if let Some(first) = &t.lineage {
            lineage.started_unix_ms = first.started_unix_ms;
        }
        t.lineage = Some(lineage);
    }

    fn live(&mut self, trial: u64, attempt: u32) -> Option<&mut TrialRecord> {
        self.trials
            .get_mut(&trial)
            .filter(|t| !t.state.is_terminal() && t.live_attempt_numbered(attempt).is_some())
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
        let changed = self.end_attempt(trial, attempt, outcome, epochs_done, error, now_ms);
        self.index(trial);
        changed
    }

    fn end_attempt(
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
        let mode = self.config.mode;
        let Some(t) = self.live(trial, attempt) else {
            return false;
        };
        if let Some(fold) = fold_of(t, attempt) {
            return self.end_fold_attempt(
                trial,
                attempt,
                fold,
                outcome,
                epochs_done,
                error,
                now_ms,
            );
        }
        let a = t.attempts.last_mut().expect("live attempt");
        let stop_epoch = a.stop_epoch;
        t.epochs_done = t.epochs_done.max(epochs_done.min(stop_epoch));
        // A segment whose last epoch is checkpointed is done, whatever
        // happened to the attempt afterwards (unless it diverged or its
        // early stopping rule ended it there).
        let outcome = if t.epochs_done >= stop_epoch
            && t.objective.is_some()
            && !matches!(
                outcome,
                AttemptOutcome::Diverged | AttemptOutcome::EarlyStopped
            ) {
            AttemptOutcome::Done
        } else {
            outcome
        };
        a.outcome = Some(outcome);
        a.ended_unix_ms = Some(now_ms);
        a.error = error.clone();
        match outcome {
            AttemptOutcome::Abandoned => t.state = TrialState::Pending,
            AttemptOutcome::Diverged => {
                t.state = TrialState::Diverged;
                t.error = Some(format!(
                    "diverged: {}",
                    error.as_deref().unwrap_or("a loss became NaN or infinite")
                ));
                // The searchers learn that this configuration is as bad
                // as it gets; ASHA counts it in the rung it was climbing.
                let (number, bracket, rung) = (t.number, t.bracket, t.rung_results.len());
                let worst = mode.worst();
                if let Some(asha) = self.brackets.get_mut(bracket) {
                    if asha.record(number, rung, worst).is_ok() {
                        if let Some(t) = self.trials.get_mut(&number) {
                            t.rung_results.push(worst);
                        }
                    }
                }
            }
            AttemptOutcome::Failed => {
                t.failures += 1;
                if t.failures > max_failures {
                    t.state = TrialState::Failed;
                    t.error = error;
                } else {
                    t.state = TrialState::Pending;
                }
            }
            AttemptOutcome::Done | AttemptOutcome::EarlyStopped => {
                let Some(value) = t.objective.map(|v| mode.ranked(v)) else {
                    let last = match outcome {
                        AttemptOutcome::EarlyStopped => t.epochs_done,
                        _ => stop_epoch,
                    };
                    t.state = TrialState::Failed;
                    t.error = Some(format!(
                        "the objective metric `{metric}` was not reported by epoch {last}"
                    ));
                    return true;
                };
                // An early-stopped trial is finished: ASHA gets its last
                // value in the rung it was climbing (so it counts towards
                // that rung's quota, as any result there does) and the
                // driver never promotes it, as it is not paused.
                t.state = if outcome == AttemptOutcome::EarlyStopped {
                    t.stop_reason = error;
                    TrialState::EarlyStopped
                } else if stop_epoch >= max_epochs {
                    TrialState::Completed
                } else {
                    TrialState::Paused
                };
                let (number, bracket, rung) = (t.number, t.bracket, t.rung_results.len());
                if let Some(asha) = self.brackets.get_mut(bracket) {
                    let top = asha.resources().len() - 1;
                    if rung <= top && asha.record(number, rung, value).is_ok() {
                        if let Some(t) = self.trials.get_mut(&number) {
                            t.rung_results.push(value);
                        }
                    }
                }
            }
        }
        true
    }

    /// Ends attempt `attempt` of cross-validation fold `fold`. A fold that
    /// fails is retried from its checkpoint (each failure counts towards
    /// `max_failures`, as any attempt's does); one that diverges, or
    /// fails once too often, ends the trial, and its other folds' attempts
    /// with it (the caller stops their workers). Once every fold is done
    /// the trial completes with the mean of the folds' objectives.
    #[allow(clippy::too_many_arguments)]
    fn end_fold_attempt(
        &mut self,
        trial: u64,
        attempt: u32,
        fold: usize,
        outcome: AttemptOutcome,
        epochs_done: u32,
        error: Option<String>,
        now_ms: u64,
    ) -> bool {
        let max_failures = self.config.max_failures;
        let metric = self.config.metric.clone();
        let Some(t) = self.live(trial, attempt) else {
            return false;
        };
        let Some(a) = t.attempts.iter_mut().find(|a| a.number == attempt) else {
            return false;
        };
        let f = &mut t.folds[fold];
        let stop_epoch = a.stop_epoch;
        f.epochs_done = f.epochs_done.max(epochs_done.min(stop_epoch));
        // As for a whole trial: a fold whose last epoch is checkpointed is
        // done, whatever happened to the attempt afterwards.
        let outcome = if f.epochs_done >= stop_epoch
            && f.objective.is_some()
            && !matches!(
                outcome,
                AttemptOutcome::Diverged | AttemptOutcome::EarlyStopped
            ) {
            AttemptOutcome::Done
        } else {
            outcome
        };
        a.outcome = Some(outcome);
        a.ended_unix_ms = Some(now_ms);
        a.error = error.clone();
        match outcome {
            AttemptOutcome::Abandoned => {}
            AttemptOutcome::Failed => {
                t.failures += 1;
                if t.failures > max_failures {
                    t.state = TrialState::Failed;
                    t.error = error.map(|e| format!("fold {fold}: {e}"));
                }
            }
            AttemptOutcome::Diverged => {
                t.state = TrialState::Diverged;
                t.error = Some(format!(
                    "diverged in fold {fold}: {}",
                    error.as_deref().unwrap_or("a loss became NaN or infinite")
                ));
            }
            AttemptOutcome::Done | AttemptOutcome::EarlyStopped => {
                if f.objective.is_some() {
                    f.done = true;
                } else {
                    t.state = TrialState::Failed;
                    t.error = Some(format!(
                        "fold {fold}: the objective metric `{metric}` was not reported by epoch {}",
                        f.epochs_done.max(1)
                    ));
                }
            }
        }
        if t.state.is_terminal() {
            for a in t.attempts.iter_mut().filter(|a| a.is_live()) {
                a.outcome = Some(AttemptOutcome::Abandoned);
                a.ended_unix_ms = Some(now_ms);
            }
        } else if t.folds.iter().all(|f| f.done) {
            complete_cross_validated(t);
        } else {
            t.state = match waiting_fold(t) {
                Some(_) => TrialState::Pending,
                None => TrialState::Running,
            };
        }
        true
    }

    /// Fails a trial that cannot run at all (its configuration does not
    /// make a valid job): retrying would not help.
    pub fn reject(&mut self, trial: u64, error: String) {
        if let Some(t) = self.trials.get_mut(&trial) {
            t.state = TrialState::Failed;
            t.error = Some(error);
        }
        self.index(trial);
    }

    /// Cancels every trial not yet finished; returns the live attempts to
    /// stop as (trial, attempt).
    pub fn cancel(&mut self, now_ms: u64) -> Vec<(u64, AttemptRecord)> {
        let mut live = Vec::new();
        for t in self.trials.values_mut().filter(|t| !t.state.is_terminal()) {
            for a in t.attempts.iter_mut().filter(|a| a.is_live()) {
                a.outcome = Some(AttemptOutcome::Abandoned);
                a.ended_unix_ms = Some(now_ms);
                live.push((t.number, a.clone()));
            }
            t.state = TrialState::Cancelled;
        }
        self.exhausted = true;
        self.active.clear();
        self.pending.clear();
        live
    }

    /// True once nothing runs or waits and nothing new can start. Paused
    /// trials left then are stopped by [`Driver::stop_paused`].
    pub fn is_done(&mut self) -> bool {
        if !self.active.is_empty() {
            return false;
        }
        if !self.exhausted && (self.trials.len() as u64) < self.config.max_trials {
            return false;
        }
        self.decide_promotion().is_none()
    }

    /// Trials changed by decisions since the last call (see
    /// [`Driver::changed`]).
    pub fn take_changed(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.changed)
    }

    /// Asks the brackets for the next promotion of a paused trial, which
    /// becomes pending (to run to its next rung) and is noted as changed;
    /// returns its number. A diverged trial sits in its rung at the worst
    /// value and can still come out on top of a rung where every result
    /// is that bad: it is passed over (ASHA marks it promoted, so it is
    /// never offered again).
    fn decide_promotion(&mut self) -> Option<u64> {
        for b in 0..self.brackets.len() {
            while let Some(p) = self.brackets[b].next_promotion() {
                let Some(t) = self
                    .trials
                    .get_mut(&p.trial)
                    .filter(|t| t.state == TrialState::Paused)
                else {
                    continue;
                };
                t.state = TrialState::Pending;
                self.changed.push(p.trial);
                self.index(p.trial);
                return Some(p.trial);
            }
        }
        None
    }

    /// Stops the trials still paused at a rung; returns their numbers.
    /// (The searcher already knows them as pruned at that rung.)
    pub fn stop_paused(&mut self) -> Vec<u64> {
        let mut stopped = Vec::new();
        for t in self
            .trials
            .values_mut()
            .filter(|t| t.state == TrialState::Paused)
        {
            t.state = TrialState::Stopped;
            stopped.push(t.number);
        }
        stopped
    }

    /// The configuration of new trial `number`.
    fn next_config(&mut self, number: u64) -> Option<BTreeMap<String, Value>> {
        match &mut self.configs {
            Configs::Fixed => (self.trials.is_empty()).then(BTreeMap::new),
            Configs::Grid(grid) => grid.next_config(),
            Configs::Random(random) => Some(random.next_config()),
            Configs::Tpe(tpe) => Some(tpe.next_config(number)),
        }
    }

    /// Moves the source past a stored trial's configuration on restore:
    /// grid and random search draw theirs from one stream; TPE's
    /// suggestions depend on trial numbers, and the records tell it the
    /// rest (see [`Driver::index`]).
    fn skip_config(&mut self) {
        match &mut self.configs {
            Configs::Fixed | Configs::Tpe(_) => {}
            Configs::Grid(grid) => {
                grid.next_config();
            }
            Configs::Random(random) => {
                random.next_config();
            }
        }
    }

    /// The best finished-or-stopped trial by its latest objective.
    pub fn best(&self) -> Option<&TrialRecord> {
        best_trial(self.trials.values(), self.config.mode)
    }
}

/// Drops the oldest epochs' metrics while the record's JSON is over
/// [`MAX_TRIAL_RECORD_BYTES`] (a trial of very many epochs, or of many
/// metrics), so etcd always takes it; the latest epoch stays.
fn keep_record_small(t: &mut TrialRecord) {
    while t.metrics.len() > 1 {
        let size = serde_json::to_vec(&*t).map_or(0, |json| json.len());
        if size <= MAX_TRIAL_RECORD_BYTES {
            return;
        }
        let drop = (t.metrics.len() / 10).clamp(1, t.metrics.len() - 1);
        t.metrics.drain(..drop);
    }
}

/// What TPE should know of a trial, from its record: diverged trials count
/// as the worst value, paused and stopped ones as pruned at the epochs
/// they reached, pending and running ones as running; failed and cancelled
/// ones not at all.
fn searcher_outcome(t: &TrialRecord, mode: Mode) -> Option<TrialOutcome> {
    let value = t.objective.map(|v| mode.ranked(v));
    match t.state {
        TrialState::Pending | TrialState::Running => Some(TrialOutcome::Running),
        TrialState::Diverged => Some(TrialOutcome::Completed(mode.worst())),
        TrialState::Completed | TrialState::EarlyStopped => value.map(TrialOutcome::Completed),
        TrialState::Paused | TrialState::Stopped => value.map(|value| TrialOutcome::Pruned {
            epochs: t.epochs_done,
            value,
        }),
        TrialState::Failed | TrialState::Cancelled => None,
    }
}

/// The first cross-validation fold of `t` that is neither done nor
/// training.
fn waiting_fold(t: &TrialRecord) -> Option<usize> {
    (0..t.folds.len())
        .find(|&i| !t.folds[i].done && !t.live_attempts().any(|a| a.fold == Some(i as u32)))
}

/// The cross-validation fold live attempt `attempt` of `t` trains.
fn fold_of(t: &TrialRecord, attempt: u32) -> Option<usize> {
    let fold = t.live_attempt_numbered(attempt)?.fold? as usize;
    (fold < t.folds.len()).then_some(fold)
}

/// Completes a cross-validated trial whose folds are all done: its
/// objective is the mean of the folds' objectives, `objective_std` their
/// population standard deviation, and its metrics the mean of each metric
/// every fold reported at its last epoch.
fn complete_cross_validated(t: &mut TrialRecord) {
    let values: Vec<f64> = t.folds.iter().filter_map(|f| f.objective).collect();
    let (mean, std) = mean_and_std(&values);
    let mut metrics = BTreeMap::new();
    if let Some((first, rest)) = t.folds.split_first() {
        for name in first.metrics.keys() {
            let each: Option<Vec<f64>> = std::iter::once(first)
                .chain(rest)
                .map(|f| f.metrics.get(name).copied())
                .collect();
            if let Some(each) = each {
                metrics.insert(name.clone(), mean_and_std(&each).0);
            }
        }
    }
    let epoch = t.folds.iter().map(|f| f.epochs_done).max().unwrap_or(0);
    t.objective = Some(mean);
    t.objective_std = Some(std);
    t.metrics = vec![EpochMetrics { epoch, metrics }];
    t.epochs_done = epoch;
    t.state = TrialState::Completed;
}

/// Mean and population standard deviation (NaN when any value is, or
/// when there are none).
fn mean_and_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, variance.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringleader_spec::search::Param;

    fn config(source: Source, stopping: Option<Stopping>, max_trials: u64) -> DriverConfig {
        let params = BTreeMap::from([(
            "model.x1".to_string(),
            Param::Uniform {
                low: 0.0,
                high: 1.0,
            },
        )]);
        DriverConfig {
            sweep: "sweep-1".into(),
            space: Space::new(params).unwrap(),
            source,
            stopping,
            seed: 7,
            max_trials,
            max_concurrent: None,
            max_epochs: 9,
            max_failures: 1,
            metric: "objective".into(),
            mode: Mode::Max,
            folds: None,
        }
    }

    /// Starts `work`, reports `value` at its stop epoch and finishes it.
    fn run(driver: &mut Driver, work: &Work, value: f64) {
        let attempt = driver.start(work, 1, vec!["w".into()], 0);
        let metrics = BTreeMap::from([("objective".to_string(), value)]);
        assert!(driver.epoch(
            work.trial,
            attempt.number,
            work.stop_epoch,
            metrics,
            Some("ckpt".into())
        ));
        assert!(driver.finished(
            work.trial,
            attempt.number,
            AttemptOutcome::Done,
            work.stop_epoch,
            None,
            0
        ));
    }

    #[test]
    fn random_sweep_runs_every_trial_to_the_end_once() {
        let mut driver = Driver::new(config(Source::Random, None, 5)).unwrap();
        let mut seen = Vec::new();
        while let Some(work) = driver.next_work() {
            assert_eq!((work.start_epoch, work.stop_epoch), (0, 9));
            seen.push(work.trial);
            run(&mut driver, &work, work.trial as f64);
        }
        assert_eq!(seen, [0, 1, 2, 3, 4]);
        assert!(driver.is_done());
        assert!(driver
            .trials()
            .values()
            .all(|t| t.state == TrialState::Completed));
        let configs: std::collections::BTreeSet<String> = driver
            .trials()
            .values()
            .map(|t| t.config["model.x1"].to_string())
            .collect();
        assert_eq!(configs.len(), 5, "configurations differ");
    }

    /// Nine random trials under successive halving (eta 3, rungs from 1 to
    /// 9 epochs, `brackets` brackets) where trial n scores n at every rung
    /// (the higher, the better): the driver once nothing is left to run,
    /// and every segment it handed out as (trial, start, stop epoch).
    fn halving_run(brackets: u32) -> (Driver, Vec<(u64, u32, u32)>) {
        let stopping = Stopping {
            eta: 3,
            min_epochs: 1,
            brackets,
        };
        let mut driver = Driver::new(config(Source::Random, Some(stopping), 9)).unwrap();
        let mut segments = Vec::new();
        while let Some(work) = driver.next_work() {
            segments.push((work.trial, work.start_epoch, work.stop_epoch));
            run(&mut driver, &work, work.trial as f64);
        }
        (driver, segments)
    }

    #[test]
    fn asha_promotes_the_top_third_and_stops_the_rest() {
        let (mut driver, segments) = halving_run(1);
        assert!(driver.is_done() || driver.next_work().is_none());
        // Hand-worked: rung 0 results arrive in order 0,1,2 → quota 1 → 2
        // promoted to rung 1 (epochs 1..3); then 3,4,5 → 5 is promoted;
        // 6,7,8 → 8; rung 1 then holds 2, 5, 8 → 8 goes to 9 epochs.
        let promotions: Vec<_> = segments
            .iter()
            .filter(|(_, s, _)| *s > 0)
            .copied()
            .collect();
        assert!(promotions.contains(&(2, 1, 3)), "{segments:?}");
        assert!(promotions.contains(&(5, 1, 3)), "{segments:?}");
        assert!(promotions.contains(&(8, 1, 3)), "{segments:?}");
        assert!(promotions.contains(&(8, 3, 9)), "{segments:?}");
        while !driver.is_done() {
            let work = driver.next_work().expect("promotion pending");
            run(&mut driver, &work, work.trial as f64);
        }
        let stopped = driver.stop_paused();
        assert!(!stopped.is_empty());
        let state = |n: u64| driver.trial(n).unwrap().state;
        assert_eq!(state(8), TrialState::Completed);
        assert_eq!(state(0), TrialState::Stopped);
        assert_eq!(driver.best().unwrap().number, 8);
    }

    /// Starts `work`, reports a NaN loss in its first epoch and ends the
    /// attempt as diverged.
    fn diverge(driver: &mut Driver, work: &Work) {
        let attempt = driver.start(work, 1, vec!["w".into()], 0);
        let metrics = BTreeMap::from([("objective".to_string(), f64::NAN)]);
        assert!(driver.epoch(
            work.trial,
            attempt.number,
            work.start_epoch + 1,
            metrics,
            None
        ));
        let error = Some("loss is NaN at epoch 1".to_string());
        assert!(driver.finished(
            work.trial,
            attempt.number,
            AttemptOutcome::Diverged,
            0,
            error,
            0
        ));
    }

    #[test]
    fn a_diverged_trial_ends_at_once_ranks_worst_and_is_never_promoted() {
        let stopping = Stopping {
            eta: 3,
            min_epochs: 1,
            brackets: 1,
        };
        // Trials 0–2 diverge, so rung 0 is all worst values: ASHA's quota
        // would promote one of them, and the driver must pass it over.
        let mut driver = Driver::new(config(Source::Random, Some(stopping), 6)).unwrap();
        let mut segments = Vec::new();
        while let Some(work) = driver.next_work() {
            segments.push((work.trial, work.start_epoch));
            if work.trial < 3 {
                diverge(&mut driver, &work);
            } else {
                run(&mut driver, &work, work.trial as f64);
            }
        }
        while !driver.is_done() {
            let work = driver.next_work().expect("promotion pending");
            segments.push((work.trial, work.start_epoch));
            run(&mut driver, &work, work.trial as f64);
        }
        assert!(
            segments.iter().all(|(t, start)| *t >= 3 || *start == 0),
            "a diverged trial ran again: {segments:?}"
        );
        for n in 0..3 {
            let t = driver.trial(n).unwrap();
            assert_eq!(t.state, TrialState::Diverged);
            assert_eq!(t.error.as_deref(), Some("diverged: loss is NaN at epoch 1"));
            assert_eq!(t.attempts.len(), 1, "never retried");
            assert_eq!(
                t.rung_results,
                [f64::NEG_INFINITY],
                "worst in its rung (max)"
            );
        }
        assert_eq!(driver.best().unwrap().number, 5);
        // A new leader replays the same rungs: still nothing to promote
        // among the diverged.
        let records: Vec<TrialRecord> = driver.trials().values().cloned().collect();
        let mut restored =
            Driver::restore(config(Source::Random, Some(stopping), 6), records).unwrap();
        assert!(restored.is_done());
        assert!(restored.next_work().is_none());
    }

    fn cross_validated(folds: u32, max_trials: u64) -> DriverConfig {
        DriverConfig {
            folds: Some(folds),
            ..config(Source::Random, None, max_trials)
        }
    }

    /// Reports fold values at the attempt's stop epoch (with a checkpoint)
    /// and ends it as done.
    fn finish_fold(driver: &mut Driver, work: &Work, attempt: u32, value: f64) -> bool {
        let metrics = BTreeMap::from([
            ("objective".to_string(), value),
            ("val_loss".to_string(), 1.0 - value),
        ]);
        driver.epoch(
            work.trial,
            attempt,
            work.stop_epoch,
            metrics,
            Some("ckpt".into()),
        );
        driver.finished(
            work.trial,
            attempt,
            AttemptOutcome::Done,
            work.stop_epoch,
            None,
            0,
        )
    }

    #[test]
    fn a_cross_validated_trial_runs_its_folds_at_once_and_scores_their_mean() {
        let mut driver = Driver::new(cross_validated(3, 1)).unwrap();
        let (mut works, mut attempts) = (Vec::new(), Vec::new());
        for gang in ["a", "b", "c"] {
            let work = driver.next_work().unwrap();
            attempts.push(driver.start(&work, 1, vec![gang.into()], 0).number);
            works.push(work);
        }
        let folds: Vec<_> = works
            .iter()
            .map(|w| (w.trial, w.fold, w.start_epoch, w.stop_epoch))
            .collect();
        let fold = |index| Some(FoldSpec { count: 3, index });
        assert_eq!(
            folds,
            [(0, fold(0), 0, 9), (0, fold(1), 0, 9), (0, fold(2), 0, 9)]
        );
        // Every fold runs: nothing waits, and the one trial was the budget.
        assert_eq!(driver.next_work(), None);
        let t = driver.trial(0).unwrap();
        assert_eq!(t.state, TrialState::Running);
        assert_eq!(t.live_attempts().count(), 3);
        assert_eq!(driver.running(), 1, "one trial");
        let values = [0.8, 0.9, 0.7];
        for (i, (work, attempt)) in works.iter().zip(&attempts).enumerate() {
            assert!(finish_fold(&mut driver, work, *attempt, values[i]));
            let t = driver.trial(0).unwrap();
            if i < 2 {
                assert_eq!(
                    (t.state, t.objective),
                    (TrialState::Running, None),
                    "fold {i}"
                );
            }
        }
        let t = driver.trial(0).unwrap();
        assert_eq!(t.state, TrialState::Completed);
        let mean = (0.8 + 0.9 + 0.7) / 3.0;
        assert_eq!(t.objective, Some(mean));
        let std = (((0.8 - mean) * (0.8 - mean)
            + (0.9 - mean) * (0.9 - mean)
            + (0.7 - mean) * (0.7 - mean))
            / 3.0f64)
            .sqrt();
        assert!(
            (t.objective_std.unwrap() - std).abs() < 1e-12,
            "{:?}",
            t.objective_std
        );
        assert!((std - 0.0816).abs() < 1e-4);
        let per_fold: Vec<Option<f64>> = t.folds.iter().map(|f| f.objective).collect();
        assert_eq!(per_fold, values.map(Some));
        assert_eq!(t.metrics.len(), 1);
        assert!((t.metrics[0].metrics["val_loss"] - (1.0 - mean)).abs() < 1e-12);
        assert_eq!(t.epochs_done, 9);
        assert!(driver.is_done());
    }

    #[test]
    fn folds_of_a_started_trial_start_whatever_the_concurrency_limit() {
        let mut cfg = cross_validated(3, 4);
        cfg.max_concurrent = Some(1);
        let mut driver = Driver::new(cfg).unwrap();
        for index in 0..3 {
            let work = driver.next_work().unwrap();
            assert_eq!((work.trial, work.fold.map(|f| f.index)), (0, Some(index)));
            driver.start(&work, 1, vec![], 0);
        }
        assert_eq!(driver.next_work(), None, "a second trial waits");
    }

    #[test]
    fn a_restored_cross_validated_trial_runs_only_its_missing_folds() {
        let mut driver = Driver::new(cross_validated(3, 1)).unwrap();
        let first = driver.next_work().unwrap();
        let a0 = driver.start(&first, 1, vec!["a".into()], 0).number;
        assert!(finish_fold(&mut driver, &first, a0, 0.5));
        let second = driver.next_work().unwrap();
        let a1 = driver.start(&second, 2, vec!["b".into()], 0).number;
        // Fold 1 checkpointed epoch 4, fold 2 never started: the leader dies.
        let metrics = BTreeMap::from([("objective".to_string(), 0.25)]);
        driver.epoch(0, a1, 4, metrics, Some("fold-1/epoch-4".into()));
        assert_eq!(driver.trial(0).unwrap().state, TrialState::Pending);
        let records: Vec<TrialRecord> = driver.trials().values().cloned().collect();
        let mut restored = Driver::restore(cross_validated(3, 1), records).unwrap();
        assert_eq!(restored.running(), 1);
        let third = restored.next_work().unwrap();
        assert_eq!((third.fold.unwrap().index, third.start_epoch), (2, 0));
        let a2 = restored.start(&third, 3, vec!["c".into()], 0).number;
        assert_eq!(restored.next_work(), None);
        // Fold 1's attempt was re-attached; it and fold 2 finish.
        assert!(finish_fold(&mut restored, &second, a1, 0.75));
        assert!(finish_fold(&mut restored, &third, a2, 1.0));
        let t = restored.trial(0).unwrap();
        assert_eq!(t.state, TrialState::Completed);
        assert_eq!(t.objective, Some(0.75));
        assert_eq!(t.attempts.len(), 3, "no fold ran twice");
    }

    #[test]
    fn an_early_stopped_fold_is_done_and_a_diverged_fold_ends_the_trial() {
        let mut driver = Driver::new(cross_validated(2, 1)).unwrap();
        let fold0 = driver.next_work().unwrap();
        let a0 = driver.start(&fold0, 1, vec!["a".into()], 0).number;
        let fold1 = driver.next_work().unwrap();
        let a1 = driver.start(&fold1, 2, vec!["b".into()], 0).number;
        let metrics = BTreeMap::from([("objective".to_string(), 0.5)]);
        driver.epoch(0, a0, 3, metrics, Some("fold-0/epoch-3".into()));
        let reason = Some("early stopped at epoch 3".to_string());
        assert!(driver.finished(0, a0, AttemptOutcome::EarlyStopped, 3, reason, 0));
        let t = driver.trial(0).unwrap();
        assert!(t.folds[0].done);
        assert_eq!((t.state, t.folds[0].epochs_done), (TrialState::Running, 3));
        let metrics = BTreeMap::from([("objective".to_string(), f64::NAN)]);
        driver.epoch(0, a1, 1, metrics, None);
        let error = Some("loss is NaN at epoch 1".to_string());
        assert!(driver.finished(0, a1, AttemptOutcome::Diverged, 1, error, 0));
        let t = driver.trial(0).unwrap();
        assert_eq!(t.state, TrialState::Diverged);
        assert_eq!(
            t.error.as_deref(),
            Some("diverged in fold 1: loss is NaN at epoch 1")
        );
        assert!(driver.is_done());
    }

    #[test]
    fn a_failed_fold_resumes_and_counts_towards_max_failures() {
        let mut driver = Driver::new(cross_validated(2, 1)).unwrap();
        let fold0 = driver.next_work().unwrap();
        let a0 = driver.start(&fold0, 1, vec!["a".into()], 0).number;
        let fold1 = driver.next_work().unwrap();
        let a1 = driver.start(&fold1, 2, vec!["b".into()], 0).number;
        let metrics = BTreeMap::from([("objective".to_string(), 0.5)]);
        driver.epoch(0, a1, 4, metrics, Some("fold-1/epoch-4".into()));
        assert!(driver.finished(0, a1, AttemptOutcome::Failed, 4, Some("boom".into()), 0));
        let t = driver.trial(0).unwrap();
        assert_eq!((t.state, t.failures), (TrialState::Pending, 1));
        let retry = driver.next_work().unwrap();
        assert_eq!((retry.fold.unwrap().index, retry.start_epoch), (1, 4));
        let a2 = driver.start(&retry, 3, vec!["b".into()], 0).number;
        // max_failures = 1: a second failure fails the trial, and fold 0's
        // attempt ends with it.
        assert!(driver.finished(0, a2, AttemptOutcome::Failed, 4, Some("boom".into()), 0));
        let t = driver.trial(0).unwrap();
        assert_eq!(t.state, TrialState::Failed);
        assert_eq!(t.error.as_deref(), Some("fold 1: boom"));
        assert_eq!(t.live_attempts().count(), 0);
        assert_eq!(t.attempts[0].outcome, Some(AttemptOutcome::Abandoned));
        assert!(
            !finish_fold(&mut driver, &fold0, a0, 0.9),
            "a stale fold report"
        );
        assert!(driver.is_done());
    }

    /// Starts `work`, reports `value` at `epoch` (with its checkpoint) and
    /// ends the attempt as early stopped there.
    fn early_stop(driver: &mut Driver, work: &Work, epoch: u32, value: f64) {
        let attempt = driver.start(work, 1, vec!["w".into()], 0);
        let metrics = BTreeMap::from([("objective".to_string(), value)]);
        assert!(driver.epoch(
            work.trial,
            attempt.number,
            epoch,
            metrics,
            Some("ckpt".into())
        ));
        let reason = format!("early stopped at epoch {epoch}: objective did not improve");
        assert!(driver.finished(
            work.trial,
            attempt.number,
            AttemptOutcome::EarlyStopped,
            epoch,
            Some(reason),
            0
        ));
    }

    #[test]
    fn an_early_stopped_trial_is_finished_with_its_last_value_and_reason() {
        let mut driver = Driver::new(config(Source::Random, None, 2)).unwrap();
        let work = driver.next_work().unwrap();
        assert_eq!(work.stop_epoch, 9);
        early_stop(&mut driver, &work, 4, 0.75);
        let t = driver.trial(work.trial).unwrap();
        assert_eq!(t.state, TrialState::EarlyStopped);
        assert_eq!((t.epochs_done, t.objective), (4, Some(0.75)));
        assert_eq!(
            t.stop_reason.as_deref(),
            Some("early stopped at epoch 4: objective did not improve")
        );
        assert_eq!(t.error, None, "not a failure");
        assert_eq!(t.attempts[0].outcome, Some(AttemptOutcome::EarlyStopped));
        // Stopping on the segment's last epoch is still early stopping,
        // not a finished segment.
        let work = driver.next_work().unwrap();
        early_stop(&mut driver, &work, 9, 0.5);
        assert_eq!(
            driver.trial(work.trial).unwrap().state,
            TrialState::EarlyStopped
        );
        assert!(driver.is_done());
        assert_eq!(driver.best().unwrap().number, 0);
    }

    #[test]
    fn with_asha_an_early_stopped_trial_counts_in_its_rung_and_is_never_promoted() {
        let stopping = Stopping {
            eta: 3,
            min_epochs: 1,
            brackets: 1,
        };
        // Trial 0 stops early at the best value of rung 0; ASHA's quota
        // would promote it first, and the driver must pass it over.
        let mut driver = Driver::new(config(Source::Random, Some(stopping), 6)).unwrap();
        let mut segments = Vec::new();
        while let Some(work) = driver.next_work() {
            segments.push((work.trial, work.start_epoch));
            if work.trial == 0 {
                early_stop(&mut driver, &work, 1, 100.0);
            } else {
                run(&mut driver, &work, work.trial as f64);
            }
        }
        while !driver.is_done() {
            let work = driver.next_work().expect("promotion pending");
            segments.push((work.trial, work.start_epoch));
            run(&mut driver, &work, work.trial as f64);
        }
        assert!(
            segments.iter().all(|(t, start)| *t != 0 || *start == 0),
            "an early-stopped trial ran again: {segments:?}"
        );
        let t = driver.trial(0).unwrap();
        assert_eq!(t.state, TrialState::EarlyStopped);
        assert_eq!(t.rung_results, [100.0], "its last value, in rung 0");
        // Rung 0 holds 100, 1, 2, 3, 4, 5: a quota of two, the first taken
        // by trial 0 (never run), the second promotes 5.
        assert!(segments.contains(&(5, 1)), "{segments:?}");
        assert!(
            !segments.iter().any(|(t, s)| *s > 0 && *t != 5),
            "{segments:?}"
        );
        driver.stop_paused();
        assert_eq!(driver.best().unwrap().number, 0, "ranked by its last value");
        // A new leader replays the rungs: still nothing to run.
        let records: Vec<TrialRecord> = driver.trials().values().cloned().collect();
        let mut restored =
            Driver::restore(config(Source::Random, Some(stopping), 6), records).unwrap();
        assert!(restored.next_work().is_none());
        assert!(restored.is_done());
    }

    #[test]
    fn a_trial_record_stays_under_the_size_etcd_takes() {
        let mut driver = Driver::new(config(Source::Random, None, 1)).unwrap();
        let work = driver.next_work().unwrap();
        let attempt = driver.start(&work, 1, vec!["w".into()], 0);
        // 64 metrics of 64-byte names an epoch: about 6 KB of JSON each.
        let metrics: BTreeMap<String, f64> = (0..64)
            .map(|i| (format!("{i:0>64}"), 0.5))
            .chain([("objective".to_string(), 1.0)])
            .collect();
        for epoch in 1..=400 {
            assert!(driver.epoch(0, attempt.number, epoch, metrics.clone(), None));
        }
        let t = driver.trial(0).unwrap();
        let size = serde_json::to_vec(t).unwrap().len();
        assert!(size <= MAX_TRIAL_RECORD_BYTES, "{size} bytes");
        assert!(t.metrics.len() < 400, "older epochs were dropped");
        assert_eq!(t.metrics.last().unwrap().epoch, 400, "the latest stays");
        assert_eq!(t.objective, Some(1.0));
    }

    #[test]
    fn a_nan_objective_counts_as_the_worst_value_not_a_missing_one() {
        let mut driver = Driver::new(config(Source::Random, None, 2)).unwrap();
        let work = driver.next_work().unwrap();
        run(&mut driver, &work, f64::NAN);
        let t = driver.trial(work.trial).unwrap();
        assert_eq!(t.state, TrialState::Completed, "{:?}", t.error);
        assert!(t.objective.unwrap().is_nan(), "recorded faithfully");
        let work = driver.next_work().unwrap();
        run(&mut driver, &work, -1e300);
        assert_eq!(driver.best().unwrap().number, work.trial);
    }

    #[test]
    fn failed_attempts_are_retried_from_their_checkpoint_until_max_failures() {
        let mut driver = Driver::new(config(Source::Random, None, 1)).unwrap();
        let work = driver.next_work().unwrap();
        let a1 = driver.start(&work, 1, vec!["w".into()], 0);
        let metrics = BTreeMap::from([("objective".to_string(), 0.5)]);
        driver.epoch(0, a1.number, 4, metrics, Some("epoch-4".into()));
        assert!(driver.finished(
            0,
            a1.number,
            AttemptOutcome::Failed,
            0,
            Some("boom".into()),
            0
        ));
        assert_eq!(driver.trial(0).unwrap().state, TrialState::Pending);
        let retry = driver.next_work().unwrap();
        assert_eq!(
            (retry.trial, retry.start_epoch, retry.stop_epoch),
            (0, 4, 9)
        );
        let a2 = driver.start(&retry, 2, vec!["w".into()], 0);
        // A report from the dead first attempt changes nothing.
        assert!(!driver.finished(0, a1.number, AttemptOutcome::Done, 9, None, 0));
        assert!(driver.finished(
            0,
            a2.number,
            AttemptOutcome::Failed,
            4,
            Some("boom".into()),
            0
        ));
        let t = driver.trial(0).unwrap();
        assert_eq!(t.state, TrialState::Failed);
        assert_eq!(t.failures, 2);
        assert!(driver.is_done());
    }

    #[test]
    fn abandoned_attempts_do_not_count_as_failures() {
        let mut driver = Driver::new(config(Source::Random, None, 1)).unwrap();
        let work = driver.next_work().unwrap();
        for generation in 1..=3 {
            let a = driver.start(&work, generation, vec!["w".into()], 0);
            driver.finished(0, a.number, AttemptOutcome::Abandoned, 0, None, 0);
        }
        let t = driver.trial(0).unwrap();
        assert_eq!(
            (t.state, t.failures, t.attempts.len()),
            (TrialState::Pending, 0, 3)
        );
    }

    #[test]
    fn concurrency_limit_holds_back_new_trials() {
        let mut cfg = config(Source::Random, None, 10);
        cfg.max_concurrent = Some(2);
        let mut driver = Driver::new(cfg).unwrap();
        let a = driver.next_work().unwrap();
        driver.start(&a, 1, vec![], 0);
        let b = driver.next_work().unwrap();
        driver.start(&b, 2, vec![], 0);
        assert_eq!(driver.next_work(), None);
        assert_eq!(driver.running(), 2);
    }

    #[test]
    fn restored_driver_continues_without_repeating_trials() {
        let stopping = Stopping {
            eta: 3,
            min_epochs: 1,
            brackets: 1,
        };
        let mut driver = Driver::new(config(Source::Random, Some(stopping), 12)).unwrap();
        for _ in 0..5 {
            let work = driver.next_work().unwrap();
            run(&mut driver, &work, work.trial as f64);
        }
        // One running when the leader dies: rung 0 now holds trials 0-3, so
        // the best of them, 3, is promoted; no fifth trial exists yet.
        let running = driver.next_work().unwrap();
        driver.start(&running, 9, vec!["w".into()], 0);
        let records: Vec<TrialRecord> = driver.trials().values().cloned().collect();
        let mut restored =
            Driver::restore(config(Source::Random, Some(stopping), 12), records).unwrap();
        assert_eq!(restored.trials().len(), 4);
        assert_eq!(restored.running(), 1);
        // The running attempt ends (its workers re-attached and finished).
        let attempt = restored
            .trial(running.trial)
            .unwrap()
            .live_attempt()
            .unwrap()
            .number;
        let metrics = BTreeMap::from([("objective".to_string(), 1.0)]);
        restored.epoch(
            running.trial,
            attempt,
            running.stop_epoch,
            metrics,
            Some("c".into()),
        );
        restored.finished(
            running.trial,
            attempt,
            AttemptOutcome::Done,
            running.stop_epoch,
            None,
            0,
        );
        while let Some(work) = restored.next_work() {
            run(&mut restored, &work, work.trial as f64);
        }
        assert!(restored.is_done() || restored.next_work().is_none());
        let numbers: Vec<u64> = restored.trials().keys().copied().collect();
        assert_eq!(numbers, (0..12).collect::<Vec<_>>());
        // The same configurations as an uninterrupted random search.
        let mut fresh = Driver::new(config(Source::Random, None, 12)).unwrap();
        for n in 0..12 {
            let work = fresh.next_work().unwrap();
            assert_eq!(
                fresh.trial(work.trial).unwrap().config,
                restored.trial(n).unwrap().config
            );
            fresh.start(&work, 1, vec![], 0);
        }
    }

    /// A value for `work`'s configuration that grows with the epochs
    /// trained, so rungs and pruned trials carry information.
    fn bowl(driver: &Driver, work: &Work) -> f64 {
        let x = driver.trial(work.trial).unwrap().config["model.x1"]
            .as_f64()
            .unwrap();
        1.0 - (x - 0.3).powi(2) + 0.01 * f64::from(work.stop_epoch)
    }

    #[test]
    fn a_restored_tpe_sweep_under_asha_proposes_what_an_uninterrupted_one_would() {
        let stopping = Stopping {
            eta: 3,
            min_epochs: 1,
            brackets: 1,
        };
        let options = ringleader_spec::search::TpeOptions {
            startup_trials: 3,
            ..Default::default()
        };
        let tpe = || config(Source::Tpe(options.clone()), Some(stopping), 24);
        let mut uninterrupted = Driver::new(tpe()).unwrap();
        for _ in 0..10 {
            let work = uninterrupted.next_work().unwrap();
            let value = bowl(&uninterrupted, &work);
            run(&mut uninterrupted, &work, value);
        }
        // The leader dies with one trial running: the rest are completed,
        // paused at a rung (pruned, to TPE) or promoted.
        let running = uninterrupted.next_work().unwrap();
        uninterrupted.start(&running, 9, vec!["w".into()], 0);
        let records: Vec<TrialRecord> = uninterrupted.trials().values().cloned().collect();
        assert!(
            records.iter().any(|t| t.state == TrialState::Paused),
            "some trial waits at a rung"
        );
        let mut restored = Driver::restore(tpe(), records).unwrap();
        for driver in [&mut uninterrupted, &mut restored] {
            let attempt = driver
                .trial(running.trial)
                .unwrap()
                .live_attempt()
                .unwrap()
                .number;
            let value = bowl(driver, &running);
            let metrics = BTreeMap::from([("objective".to_string(), value)]);
            assert!(driver.epoch(running.trial, attempt, running.stop_epoch, metrics, None));
            assert!(driver.finished(
                running.trial,
                attempt,
                AttemptOutcome::Done,
                running.stop_epoch,
                None,
                0
            ));
            while let Some(work) = driver.next_work() {
                let value = bowl(driver, &work);
                run(driver, &work, value);
            }
            assert!(driver.is_done());
        }
        let configs =
            |d: &Driver| -> Vec<_> { d.trials().values().map(|t| t.config.clone()).collect() };
        assert_eq!(configs(&restored).len(), 24);
        assert_eq!(configs(&restored), configs(&uninterrupted));
    }

    #[test]
    fn hyperband_brackets_start_at_growing_resources() {
        let stopping = Stopping {
            eta: 3,
            min_epochs: 1,
            brackets: 3,
        };
        let mut driver = Driver::new(config(Source::Random, Some(stopping), 3)).unwrap();
        let stops: Vec<u32> = (0..3)
            .map(|_| {
                let w = driver.next_work().unwrap();
                driver.start(&w, 1, vec![], 0);
                w.stop_epoch
            })
            .collect();
        assert_eq!(stops, [1, 3, 9]);
    }

    #[test]
    fn hyperband_promotes_within_each_bracket_only() {
        let (mut driver, segments) = halving_run(3);
        let brackets: Vec<usize> = driver.trials().values().map(|t| t.bracket).collect();
        assert_eq!(brackets, [0, 1, 2, 0, 1, 2, 0, 1, 2], "dealt in turn");
        // Hand-worked: bracket 0 (rungs at 1, 3, 9 epochs) ranks 0, 3, 6 at
        // epoch 1 and promotes 6; bracket 1 (rungs at 3, 9) ranks 1, 4, 7
        // and promotes 7 to the end; bracket 2 trains 2, 5, 8 to 9 epochs.
        // Trial 8 beats 6 and 7 but is in another bracket: no rung mixes
        // brackets.
        let promotions: Vec<_> = segments
            .iter()
            .filter(|(_, s, _)| *s > 0)
            .copied()
            .collect();
        assert_eq!(promotions, [(6, 1, 3), (7, 3, 9)], "{segments:?}");
        let first: Vec<_> = segments
            .iter()
            .filter(|(_, s, _)| *s == 0)
            .map(|(t, _, e)| (*t, *e))
            .collect();
        assert_eq!(
            first,
            [
                (0, 1),
                (1, 3),
                (2, 9),
                (3, 1),
                (4, 3),
                (5, 9),
                (6, 1),
                (7, 3),
                (8, 9)
            ]
        );
        // Rung 1 of bracket 0 holds 6 alone: ⌊1/3⌋ = 0 go on.
        assert!(driver.is_done());
        let stopped = driver.stop_paused();
        assert_eq!(stopped, [0, 1, 3, 4, 6]);
        let trial = |n: u64| {
            let t = driver.trial(n).unwrap();
            (t.state, t.epochs_done)
        };
        assert_eq!(trial(6), (TrialState::Stopped, 3));
        assert_eq!(trial(7), (TrialState::Completed, 9));
        assert_eq!(trial(2), (TrialState::Completed, 9));
        assert_eq!(driver.best().unwrap().number, 8);
    }
}
