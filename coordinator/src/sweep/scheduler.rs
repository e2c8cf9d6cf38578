//! The leader as a sans-IO state machine: sweeps in submission order, each
//! driven by its [`Driver`], placed on gangs of idle workers.
//!
//! Every input (a registration, a heartbeat, reports, a disconnect, a
//! submission, a cancellation, a tick) goes through [`Scheduler::step`]
//! with the time it happened at, and returns [`Effects`]: the records to
//! write and the messages to send, addressed by worker and connection,
//! once they are durable. The scheduler reads no clock, holds no channel
//! and draws its ring secrets from a generator seeded by its owner, so
//! the same inputs give the same effects: the simulation in
//! [`crate::sweep::sim`] steps this very code.
//!
//! The runner (service.rs) queues the writes on the
//! [`StateWriter`](crate::store::StateWriter) while still holding the
//! scheduler's lock (so writes reach etcd in decision order), and sends the
//! messages only once they are durable: a worker never runs an attempt
//! etcd does not know about. State changes are made in memory at once;
//! if their writes are not stored, the term ends and the next one rebuilds
//! this state from etcd, so nothing that was not stored outlives its term.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use ringleader_proto::coordinator::{
    coordinator_message, Assignment, AttemptRef, CoordinatorMessage, EpochReport, Register,
    StopAttempt, TrialFinished,
};
use ringleader_spec::{JobDevice, JobSpec};
use tracing::{info, warn};

use super::driver::{Driver, Work};
use super::records::{
    sweep_key, trial_key, AttemptOutcome, FileDigest, Lineage, SweepKind, SweepRecord, SweepState,
    SweepSummary, TrialRecord,
};
use super::template::Template;
use crate::error::Error;
use crate::limits::{
    truncated, MAX_ERROR_BYTES, MAX_LINEAGE_FILES, MAX_LINEAGE_PATHS_BYTES,
    MAX_LINEAGE_VERSION_BYTES, MAX_METRICS_PER_EPOCH, MAX_METRIC_NAME_BYTES, MAX_PATH_BYTES,
};
use crate::registry::{Address, ConnectionId, DuplicateWorker, WorkerRegistry};

/// The time an input happened at: the scheduler's only clock.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    /// For heartbeat timeouts and the re-attach grace period.
    pub instant: Instant,
    /// For the times records show.
    pub unix_ms: u64,
}

impl Now {
    /// The system's clocks (the runner's, never the scheduler's).
    pub fn system() -> Self {
        Self {
            instant: Instant::now(),
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default(),
        }
    }

    /// `d` later.
    pub fn after(self, d: Duration) -> Self {
        Self {
            instant: self.instant + d,
            unix_ms: self.unix_ms + d.as_millis() as u64,
        }
    }
}

/// What a worker reports on its attach stream.
#[derive(Clone, Debug)]
pub enum Report {
    Epoch(EpochReport),
    Finished(TrialFinished),
}

/// A checked submission: its spec parsed, its caller known.
pub struct Submission {
    pub kind: SweepKind,
    pub template: Template,
    pub spec: String,
    pub origin: String,
    pub owner: String,
    /// Sweeps and jobs running or waiting at most (the cluster's limit).
    pub max_running: usize,
}

/// Everything that can happen to the leader.
pub enum Input {
    /// A worker opened an attach stream with this registration.
    Register(Box<Register>),
    Heartbeat {
        worker: String,
        connection: ConnectionId,
    },
    /// Reports that arrived together on one attach stream.
    Reports {
        worker: String,
        connection: ConnectionId,
        reports: Vec<Report>,
    },
    /// A worker's attach stream ended.
    Disconnected {
        worker: String,
        connection: ConnectionId,
    },
    Submit(Box<Submission>),
    Cancel {
        sweep: String,
    },
    /// Time passed: find silent workers, re-queue orphaned attempts, place.
    Tick,
}

/// The answer to the input's sender (the effects go to the runner).
#[derive(Debug)]
pub enum Reply {
    /// Nothing to answer.
    Done,
    /// A registration: its connection, or why the id is taken.
    Registered(Result<ConnectionId, DuplicateWorker>),
    /// Reports or a heartbeat on a stream a newer registration replaced.
    Superseded,
    /// A submission: the new sweep's id.
    Submitted(Result<String, Error>),
    /// A cancellation: how many attempts were told to stop.
    Cancelled(Result<u32, Error>),
}

/// What the caller must do after a scheduler step: write, then send.
#[derive(Default)]
pub struct Effects {
    pub writes: Vec<(String, String)>,
    pub messages: Vec<(Address, CoordinatorMessage)>,
}

impl Effects {
    fn write_trial(&mut self, trial: &TrialRecord) {
        self.writes.push((
            trial_key(&trial.sweep, trial.number),
            serde_json::to_string(trial).expect("records serialise"),
        ));
    }

    fn write_sweep(&mut self, sweep: &SweepRecord) {
        self.writes.push((
            sweep_key(&sweep.id),
            serde_json::to_string(sweep).expect("records serialise"),
        ));
    }

    fn send(&mut self, to: Option<Address>, kind: coordinator_message::Kind) {
        if let Some(to) = to {
            self.messages
                .push((to, CoordinatorMessage { kind: Some(kind) }));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.messages.is_empty()
    }

    pub fn extend(&mut self, other: Effects) {
        self.writes.extend(other.writes);
        self.messages.extend(other.messages);
    }
}

/// One sweep under way.
pub struct SweepRun {
    pub record: SweepRecord,
    pub driver: Driver,
    template: Template,
}

impl SweepRun {
    /// Its trials at a glance, as they stand.
    pub fn summary(&self) -> SweepSummary {
        SweepSummary::of(self.driver.trials().values(), self.record.objective_mode)
    }

    pub fn new(record: SweepRecord, driver: Driver, template: Template) -> Self {
        Self {
            record,
            driver,
            template,
        }
    }
}

/// Bytes of an attempt's ring secret.
const RING_SECRET_BYTES: usize = 32;

/// A stored sweep as a new term takes it over.
pub enum Stored {
    /// Running: rebuilt with its trials, it carries on.
    Running(Box<SweepRun>),
    /// Finished: the record only.
    Finished(SweepRecord),
    /// Running, but its spec no longer parses, some of its records are
    /// unreadable, or its trials no longer replay: set aside (listed,
    /// readable, never resumed, marked failed) with what is wrong, each
    /// problem naming the etcd key.
    SetAside(SweepRecord, Vec<String>),
}

impl Stored {
    /// The first look at a stored sweep: finished, set aside because its
    /// spec no longer parses, or running with its template (its trials are
    /// read next, see [`Stored::running`]).
    pub fn take_over(record: SweepRecord) -> Result<(SweepRecord, Template), Box<Stored>> {
        if record.state.is_terminal() {
            return Err(Box::new(Stored::Finished(record)));
        }
        match Template::parse(record.kind, &record.spec, &record.origin) {
            Ok(template) => Ok((record, template)),
            Err(error) => {
                warn!(sweep = %record.id, %error, "stored spec no longer parses");
                let problem = format!(
                    "stored sweep {}: its spec no longer parses: {error}",
                    sweep_key(&record.id)
                );
                Err(Box::new(Stored::SetAside(record, vec![problem])))
            }
        }
    }

    /// A running sweep rebuilt from its trial records (in trial order), or
    /// set aside if they do not replay.
    pub fn running(record: SweepRecord, template: Template, trials: Vec<TrialRecord>) -> Stored {
        match Driver::restore(template.driver_config(&record.id), trials) {
            Ok(driver) => Stored::Running(Box::new(SweepRun::new(record, driver, template))),
            Err(error) => {
                warn!(sweep = %record.id, %error, "stored trials do not replay");
                let problem = format!(
                    "stored sweep {}: its trials do not replay: {error}",
                    sweep_key(&record.id)
                );
                Stored::SetAside(record, vec![problem])
            }
        }
    }
}

/// Everything the leader knows in memory; rebuilt from etcd each term.
pub struct Scheduler {
    registry: WorkerRegistry,
    /// Ring secrets: a CSPRNG seeded by the runner from the operating
    /// system (a simulation seeds it itself).
    secrets: ChaCha20Rng,
    /// Running sweeps by submission sequence (FIFO).
    sweeps: BTreeMap<u64, SweepRun>,
    /// Finished sweeps (records only), by id.
    finished: BTreeMap<String, SweepRecord>,
    /// The leader key's create revision: identifies the term, and orders
    /// ring generations across terms.
    owner: i64,
    generations: u64,
    next_seq: u64,
    checkpoint_root: PathBuf,
    /// Until then, live attempts whose workers have not re-attached are
    /// left alone (their workers may still be re-registering).
    reattach_until: Instant,
    /// Sweeps set aside at load because some of their records could not be
    /// read (they are not resumed), with what was wrong.
    damaged: BTreeMap<String, Vec<String>>,
    /// Stored records that could not be read at load, named by key.
    unreadable: Vec<String>,
}

impl Scheduler {
    pub fn new(
        lost_after: Duration,
        owner: i64,
        checkpoint_root: PathBuf,
        reattach_until: Instant,
        secret_seed: [u8; 32],
    ) -> Self {
        Self {
            registry: WorkerRegistry::new(lost_after),
            secrets: ChaCha20Rng::from_seed(secret_seed),
            sweeps: BTreeMap::new(),
            finished: BTreeMap::new(),
            owner,
            generations: 0,
            next_seq: 1,
            checkpoint_root,
            reattach_until,
            damaged: BTreeMap::new(),
            unreadable: Vec::new(),
        }
    }

    /// Notes a stored record that could not be read at all (not even as
    /// the sweep it belongs to).
    pub fn unreadable_record(&mut self, problem: String) {
        self.unreadable.push(problem);
    }

    /// Every stored record this term could not read.
    pub fn unreadable(&self) -> &[String] {
        &self.unreadable
    }

    /// Running (and waiting) sweeps and jobs.
    pub fn running_sweeps(&self) -> usize {
        self.sweeps.len()
    }

    /// The term this scheduler belongs to (see [`Scheduler::new`]).
    pub fn owner(&self) -> i64 {
        self.owner
    }

    /// The workers as they stand (for status and metrics).
    pub fn workers(&self, now: Instant) -> Vec<ringleader_proto::coordinator::WorkerInfo> {
        self.registry.snapshot(now)
    }

    /// Takes one input at `now`: what to write and send, and the answer
    /// for whoever gave the input.
    pub fn step(&mut self, now: Now, input: Input) -> (Effects, Reply) {
        let mut effects = Effects::default();
        let reply = match input {
            Input::Register(registration) => {
                match self
                    .registry
                    .register((*registration).clone(), now.instant, now.unix_ms)
                {
                    Ok(connection) => {
                        self.registered(&registration, now, &mut effects);
                        self.place_and_finish(now, &mut effects);
                        Reply::Registered(Ok(connection))
                    }
                    Err(taken) => Reply::Registered(Err(taken)),
                }
            }
            Input::Heartbeat { worker, connection } => {
                if self.registry.is_current(&worker, connection) {
                    self.registry.heartbeat(&worker, connection, now.instant);
                    Reply::Done
                } else {
                    Reply::Superseded
                }
            }
            Input::Reports {
                worker,
                connection,
                reports,
            } => {
                if !self.registry.is_current(&worker, connection) {
                    return (effects, Reply::Superseded);
                }
                let mut ended = false;
                for report in reports {
                    match report {
                        Report::Epoch(report) => {
                            self.epoch_report(&worker, report, now, &mut effects)
                        }
                        Report::Finished(report) => {
                            self.finished_report(&worker, &report, now, &mut effects);
                            ended = true;
                        }
                    }
                }
                // The end of one attempt and the start of the next, in one
                // commit: the freed worker's next assignment waits for a
                // single etcd round trip.
                if ended {
                    self.place_and_finish(now, &mut effects);
                }
                Reply::Done
            }
            Input::Disconnected { worker, connection } => {
                if self.registry.disconnected(&worker, connection) {
                    warn!(worker = %worker, "worker disconnected");
                    self.workers_lost(std::slice::from_ref(&worker), now, &mut effects);
                    self.place_and_finish(now, &mut effects);
                }
                Reply::Done
            }
            Input::Submit(submission) => {
                let submitted = self.submit(*submission, now, &mut effects);
                if submitted.is_ok() {
                    self.place_and_finish(now, &mut effects);
                }
                Reply::Submitted(submitted)
            }
            Input::Cancel { sweep } => {
                let cancelled = self.cancel(&sweep, now, &mut effects);
                if cancelled.is_ok() {
                    self.place_and_finish(now, &mut effects);
                }
                Reply::Cancelled(cancelled)
            }
            Input::Tick => {
                let lost = self.registry.sweep(now.instant);
                for worker in &lost {
                    warn!(worker = %worker, "worker lost: missed heartbeats");
                }
                self.workers_lost(&lost, now, &mut effects);
                if now.instant >= self.reattach_until {
                    self.requeue_orphans(now, &mut effects);
                }
                self.place_and_finish(now, &mut effects);
                Reply::Done
            }
        };
        (effects, reply)
    }

    /// Loads one stored sweep (at the start of a term). One set aside is
    /// listed and readable, with its problems, never resumed, and marked
    /// failed with the problems as the reason (so `--watch` ends and later
    /// terms load it as finished): returns that write, to make once the
    /// term's writer runs.
    pub fn restore(&mut self, stored: Stored, now: Now) -> Effects {
        let mut effects = Effects::default();
        let seq = match &stored {
            Stored::Running(run) => run.record.seq,
            Stored::Finished(record) | Stored::SetAside(record, _) => record.seq,
        };
        self.next_seq = self.next_seq.max(seq + 1);
        match stored {
            Stored::Running(run) => {
                self.sweeps.insert(seq, *run);
            }
            Stored::Finished(record) => {
                self.finished.insert(record.id.clone(), record);
            }
            Stored::SetAside(mut record, problems) => {
                warn!(sweep = %record.id, ?problems, "a running sweep cannot be taken over; marked failed");
                record.state = SweepState::Failed;
                record.finished_unix_ms = Some(now.unix_ms);
                record.failure = Some(problems.join("; "));
                effects.write_sweep(&record);
                self.unreadable.extend(problems.iter().cloned());
                self.damaged.insert(record.id.clone(), problems);
                self.finished.insert(record.id.clone(), record);
            }
        }
        effects
    }

    /// Adds a submitted sweep; its record is written before anything else.
    fn submit(
        &mut self,
        submission: Submission,
        now: Now,
        effects: &mut Effects,
    ) -> Result<String, Error> {
        let Submission {
            kind,
            template,
            spec,
            origin,
            owner,
            max_running,
        } = submission;
        if self.sweeps.len() >= max_running {
            return Err(Error::ResourceExhausted(format!(
                "{max_running} sweeps and jobs are running or waiting, the most this cluster \
                 takes (ringleader serve --max-running-sweeps); submit again when one has \
                 finished"
            )));
        }
        let seq = self.next_seq;
        let prefix = match kind {
            SweepKind::Job => "job",
            SweepKind::Sweep => "sweep",
        };
        let id = format!("{prefix}-{seq}");
        let driver = Driver::new(template.driver_config(&id))
            .map_err(|error| Error::InvalidArgument(error.to_string()))?;
        self.next_seq += 1;
        let (objective_metric, objective_mode) = template.objective();
        let record = SweepRecord {
            id: id.clone(),
            seq,
            kind,
            name: template.name().to_string(),
            spec,
            origin,
            state: SweepState::Running,
            submitted_unix_ms: now.unix_ms,
            finished_unix_ms: None,
            objective_metric,
            objective_mode,
            max_trials: template.max_trials(),
            owner,
            failure: None,
            summary: None,
        };
        effects.write_sweep(&record);
        info!(sweep = %record.id, name = %record.name, "sweep submitted");
        self.sweeps
            .insert(seq, SweepRun::new(record, driver, template));
        Ok(id)
    }

    /// Sweep records, oldest first.
    pub fn list(&self) -> Vec<SweepRecord> {
        let mut all: Vec<SweepRecord> = self
            .finished
            .values()
            .cloned()
            .chain(self.sweeps.values().map(|r| {
                let mut record = r.record.clone();
                record.summary = Some(r.summary());
                record
            }))
            .collect();
        all.sort_by_key(|r| r.seq);
        all
    }

    /// A sweep's record, whether its trials are in memory (it runs), and
    /// what is wrong with it if it was set aside at load.
    pub fn get(&self, id: &str) -> Option<(SweepRecord, bool, Vec<String>)> {
        if let Some(r) = self.finished.get(id) {
            let problems = self.damaged.get(id).cloned().unwrap_or_default();
            return Some((r.clone(), false, problems));
        }
        self.run(id).map(|r| (r.record.clone(), true, Vec::new()))
    }

    /// A running sweep's trials numbered `from` and up, in order (in
    /// memory, so pending ones show too).
    pub fn trials_from(&self, id: &str, from: u64) -> impl Iterator<Item = &TrialRecord> {
        self.run(id)
            .into_iter()
            .flat_map(move |r| r.driver.trials().range(from..).map(|(_, t)| t))
    }

    /// A worker (re-)registered: re-attach the attempt it still runs, or
    /// tell it to stop one we no longer want; apply a report it could not
    /// deliver before.
    fn registered(&mut self, registration: &Register, now: Now, effects: &mut Effects) {
        let worker = registration.worker_id.as_str();
        if let Some(report) = &registration.last_finished {
            self.finished_report(worker, report, now, effects);
        }
        if let Some(running) = &registration.running {
            let wanted = self
                .live_attempt(running)
                .is_some_and(|a| a.workers.iter().any(|w| w == worker));
            if wanted {
                info!(worker, sweep = %running.sweep_id, trial = running.trial, attempt = running.attempt, "re-attached a running attempt");
                self.registry.assign(worker, running.clone());
            } else {
                // Busy until it reports that attempt finished: an
                // assignment meanwhile would be refused as a failure.
                self.registry.assign(worker, running.clone());
                effects.send(
                    self.registry.address(worker),
                    coordinator_message::Kind::Stop(StopAttempt {
                        attempt: Some(running.clone()),
                        reason: "the attempt is no longer current".into(),
                    }),
                );
            }
        }
    }

    fn live_attempt(&self, r: &AttemptRef) -> Option<&super::records::AttemptRecord> {
        self.run(&r.sweep_id)
            .and_then(|run| run.driver.trial(r.trial))
            .filter(|t| !t.state.is_terminal())
            .and_then(|t| t.live_attempt_numbered(r.attempt))
    }

    fn run(&self, sweep: &str) -> Option<&SweepRun> {
        self.sweeps.values().find(|r| r.record.id == sweep)
    }

    fn run_mut(&mut self, sweep: &str) -> Option<&mut SweepRun> {
        self.sweeps.values_mut().find(|r| r.record.id == sweep)
    }

    /// Metrics of one epoch from rank 0 of the live attempt. A report from
    /// any other worker is refused (logged, never applied); one that
    /// breaks the limits on metrics fails the attempt, saying why.
    fn epoch_report(&mut self, worker: &str, report: EpochReport, now: Now, effects: &mut Effects) {
        let Some(attempt) = report.attempt else {
            warn!(worker, "refused an epoch report that names no attempt");
            return;
        };
        let attempt = &attempt;
        let metrics: BTreeMap<String, f64> = report.metrics.into_iter().collect();
        let checkpoint = (!report.checkpoint.is_empty()).then_some(report.checkpoint);
        let Some(live) = self.live_attempt(attempt) else {
            return;
        };
        if live.workers.first().map(String::as_str) != Some(worker) {
            warn!(worker, sweep = %attempt.sweep_id, trial = attempt.trial, attempt = attempt.attempt, "refused an epoch report from a worker that is not rank 0 of that attempt");
            return;
        }
        if let Err(problem) = check_epoch_report(&metrics, checkpoint.as_deref()) {
            warn!(worker, sweep = %attempt.sweep_id, trial = attempt.trial, %problem, "refused an epoch report");
            let epochs = self.epochs_done(attempt);
            let error = Some(format!("{worker} sent an epoch report that {problem}"));
            self.end_attempt(attempt, AttemptOutcome::Failed, epochs, error, now, effects);
            return;
        }
        if let Some(run) = self.run_mut(&attempt.sweep_id) {
            if run.driver.epoch(
                attempt.trial,
                attempt.attempt,
                report.epoch,
                metrics,
                checkpoint,
            ) {
                if let Some(t) = run.driver.trial(attempt.trial) {
                    effects.write_trial(t);
                }
            }
        }
    }

    /// A worker's report that it stopped running an attempt.
    fn finished_report(
        &mut self,
        worker: &str,
        report: &TrialFinished,
        now: Now,
        effects: &mut Effects,
    ) {
        let Some(attempt) = report.attempt.clone() else {
            return;
        };
        self.registry.release(worker, &attempt);
        let Some(live) = self.live_attempt(&attempt).cloned() else {
            return;
        };
        if !live.workers.iter().any(|w| w == worker) {
            warn!(worker, sweep = %attempt.sweep_id, trial = attempt.trial, attempt = attempt.attempt, "refused an end-of-attempt report from a worker outside that attempt's gang");
            return;
        }
        let outcome = match report.outcome() {
            ringleader_proto::coordinator::AttemptOutcome::Done => AttemptOutcome::Done,
            ringleader_proto::coordinator::AttemptOutcome::Abandoned => AttemptOutcome::Abandoned,
            ringleader_proto::coordinator::AttemptOutcome::Diverged => AttemptOutcome::Diverged,
            ringleader_proto::coordinator::AttemptOutcome::EarlyStopped => {
                AttemptOutcome::EarlyStopped
            }
            _ => AttemptOutcome::Failed,
        };
        // We only stop attempts after ending them, so a live attempt that
        // comes back abandoned was stopped by its worker: it is shutting
        // down (SIGTERM) and must not be given the trial, or anything, again.
        if outcome == AttemptOutcome::Abandoned {
            self.registry.drain(worker);
        }
        // Rank 0 speaks for a finished gang (its epoch report with the
        // last checkpoint comes first); any rank's failure ends it.
        let rank0 = live.workers.first().map(String::as_str) == Some(worker);
        if matches!(outcome, AttemptOutcome::Done | AttemptOutcome::EarlyStopped) && !rank0 {
            return;
        }
        // Only rank 0 writes checkpoints: another rank's epoch count may be
        // ahead of what exists on disk, and resuming from it would fail.
        let epochs_done = if rank0 { report.epochs_done } else { 0 };
        // A divergence is the trial's (every rank sees the same loss); a
        // failure names the worker it happened on.
        let reported = truncated(&report.error, MAX_ERROR_BYTES);
        let mut error = (!reported.is_empty()).then(|| match outcome {
            AttemptOutcome::Diverged | AttemptOutcome::EarlyStopped => reported,
            _ => format!("{worker}: {reported}"),
        });
        let mut outcome = outcome;
        if let Some(reported) = &report.lineage {
            match lineage_of(reported) {
                Ok(lineage) => {
                    if let Some(run) = self.run_mut(&attempt.sweep_id) {
                        run.driver.lineage(attempt.trial, attempt.attempt, lineage);
                    }
                }
                Err(problem) => {
                    warn!(worker, sweep = %attempt.sweep_id, trial = attempt.trial, %problem, "refused a lineage");
                    outcome = AttemptOutcome::Failed;
                    error = Some(format!("{worker} sent a lineage that {problem}"));
                }
            }
        }
        self.end_attempt(&attempt, outcome, epochs_done, error, now, effects);
    }

    /// Ends a live attempt, stops the rest of its gang and records it.
    fn end_attempt(
        &mut self,
        attempt: &AttemptRef,
        outcome: AttemptOutcome,
        epochs_done: u32,
        error: Option<String>,
        now: Now,
        effects: &mut Effects,
    ) {
        let Some(run) = self
            .sweeps
            .values_mut()
            .find(|r| r.record.id == attempt.sweep_id)
        else {
            return;
        };
        // The trial's live attempts: ending one may end the others (a
        // cross-validated trial's folds end with it).
        let live_before: Vec<(u32, Vec<String>)> = run
            .driver
            .trial(attempt.trial)
            .map(|t| {
                t.live_attempts()
                    .map(|a| (a.number, a.workers.clone()))
                    .collect()
            })
            .unwrap_or_default();
        if !run.driver.finished(
            attempt.trial,
            attempt.attempt,
            outcome,
            epochs_done,
            error.clone(),
            now.unix_ms,
        ) {
            return;
        }
        let mut ended = Vec::new();
        if let Some(t) = run.driver.trial(attempt.trial) {
            info!(sweep = %attempt.sweep_id, trial = attempt.trial, attempt = attempt.attempt, ?outcome, state = ?t.state, error = error.as_deref().unwrap_or(""), "attempt ended");
            effects.write_trial(t);
            ended = live_before
                .into_iter()
                .filter(|(number, _)| t.live_attempt_numbered(*number).is_none())
                .collect();
        }
        // The gang stays busy until each rank reports the attempt finished
        // (or re-registers): it still trains until the end of its epoch,
        // and would refuse a new assignment as a failure.
        for (number, workers) in ended {
            let reference = AttemptRef {
                attempt: number,
                ..attempt.clone()
            };
            for worker in workers {
                if self.registry.running(&worker) == Some(&reference) {
                    effects.send(
                        self.registry.address(&worker),
                        coordinator_message::Kind::Stop(StopAttempt {
                            attempt: Some(reference.clone()),
                            reason: format!("the attempt ended ({outcome:?})"),
                        }),
                    );
                }
            }
        }
    }

    /// Workers declared lost: their attempts fail (and are re-queued).
    fn workers_lost(&mut self, workers: &[String], now: Now, effects: &mut Effects) {
        for worker in workers {
            // The lost worker stays booked to its attempt and is told to
            // stop it: one that was only frozen (SIGSTOP, a long pause) and
            // comes back must not go on training a trial that now runs
            // elsewhere, nor take new work before it has reported.
            if let Some(attempt) = self.registry.running(worker).cloned() {
                let epochs = self.epochs_done(&attempt);
                self.end_attempt(
                    &attempt,
                    AttemptOutcome::Failed,
                    epochs,
                    Some(format!("worker {worker} was lost")),
                    now,
                    effects,
                );
            }
        }
    }

    fn epochs_done(&self, attempt: &AttemptRef) -> u32 {
        self.run(&attempt.sweep_id)
            .and_then(|r| r.driver.trial(attempt.trial))
            .map_or(0, |t| t.epochs_done)
    }

    /// Cancels a sweep: its live attempts are told to stop.
    fn cancel(&mut self, id: &str, now: Now, effects: &mut Effects) -> Result<u32, Error> {
        let Some(seq) = self
            .sweeps
            .iter()
            .find(|(_, r)| r.record.id == id)
            .map(|(s, _)| *s)
        else {
            return match self.finished.get(id) {
                Some(r) => Err(Error::FailedPrecondition(format!(
                    "{id} has already finished ({:?})",
                    r.state
                ))),
                None => Err(Error::NotFound(format!("no sweep or job {id}"))),
            };
        };
        let mut run = self.sweeps.remove(&seq).expect("found above");
        let live = run.driver.cancel(now.unix_ms);
        let stopped = live.len() as u32;
        for (trial, attempt) in live {
            let reference = AttemptRef {
                sweep_id: id.to_string(),
                trial,
                attempt: attempt.number,
            };
            for worker in &attempt.workers {
                effects.send(
                    self.registry.address(worker),
                    coordinator_message::Kind::Stop(StopAttempt {
                        attempt: Some(reference.clone()),
                        reason: "the sweep was cancelled".into(),
                    }),
                );
                // Busy until it reports the attempt finished (see end_attempt).
            }
        }
        for t in run.driver.trials().values() {
            effects.write_trial(t);
        }
        run.record.state = SweepState::Cancelled;
        run.record.finished_unix_ms = Some(now.unix_ms);
        run.record.summary = Some(run.summary());
        effects.write_sweep(&run.record);
        info!(sweep = id, stopped, "sweep cancelled");
        self.finished.insert(id.to_string(), run.record);
        Ok(stopped)
    }

    /// After every event: place work on idle workers, finish sweeps that
    /// are done.
    fn place_and_finish(&mut self, now: Now, effects: &mut Effects) {
        self.place(now, effects);
        self.finish_done(now, effects);
        for run in self.sweeps.values_mut() {
            // Those that started were written then.
            for number in run.driver.take_changed() {
                if let Some(t) = run
                    .driver
                    .trial(number)
                    .filter(|t| t.state == super::records::TrialState::Pending)
                {
                    effects.write_trial(t);
                }
            }
        }
    }

    /// Live attempts with a worker that is not running them any more (it
    /// never re-attached after a failover, or was lost before we led).
    fn requeue_orphans(&mut self, now: Now, effects: &mut Effects) {
        let mut orphans = Vec::new();
        for run in self.sweeps.values() {
            for t in run.driver.running_trials() {
                for a in t.live_attempts() {
                    let reference = AttemptRef {
                        sweep_id: run.record.id.clone(),
                        trial: t.number,
                        attempt: a.number,
                    };
                    if a.workers
                        .iter()
                        .any(|w| self.registry.running(w) != Some(&reference))
                    {
                        orphans.push((reference, t.epochs_done));
                    }
                }
            }
        }
        for (reference, epochs) in orphans {
            warn!(sweep = %reference.sweep_id, trial = reference.trial, attempt = reference.attempt, "attempt lost its workers; re-queued");
            self.end_attempt(
                &reference,
                AttemptOutcome::Abandoned,
                epochs,
                Some("its workers did not re-attach after a leader change".into()),
                now,
                effects,
            );
        }
    }

    fn place(&mut self, now: Now, effects: &mut Effects) {
        if self.registry.idle().next().is_none() {
            return;
        }
        let alive = self.registry.alive();
        let seqs: Vec<u64> = self.sweeps.keys().copied().collect();
        'sweeps: for seq in seqs {
            loop {
                let run = self.sweeps.get_mut(&seq).expect("listed above");
                let Some(work) = run.driver.next_work() else {
                    break;
                };
                let config = run
                    .driver
                    .trial(work.trial)
                    .map(|t| t.config.clone())
                    .unwrap_or_default();
                let job = match run.template.job(&config) {
                    // A fold's job validates on its fold (the spec was
                    // checked with fold 0 in place).
                    Ok(mut job) => {
                        job.dataset.folds = work.fold.or(job.dataset.folds);
                        job
                    }
                    Err(error) => {
                        warn!(sweep = %run.record.id, trial = work.trial, %error, "trial cannot be built");
                        run.driver.reject(work.trial, error.to_string());
                        if let Some(t) = run.driver.trial(work.trial) {
                            effects.write_trial(t);
                        }
                        continue;
                    }
                };
                let need = job.workers as usize;
                let gang = pick_gang(&self.registry, need, &job.device);
                let Some(gang) = gang else {
                    // First come, first served: a sweep that could run with
                    // the workers we have waits for them; later sweeps may
                    // only use workers it could never use.
                    if need <= alive {
                        break 'sweeps;
                    }
                    break;
                };
                self.generations += 1;
                let generation = ((self.owner as u64) << 24) | self.generations;
                let dir = checkpoint_dir(&self.checkpoint_root, &job, &run.record.id, &work);
                let attempt = run
                    .driver
                    .start(&work, generation, gang.clone(), now.unix_ms);
                let trial = run.driver.trial(work.trial).expect("started above");
                effects.write_trial(trial);
                let reference = AttemptRef {
                    sweep_id: run.record.id.clone(),
                    trial: work.trial,
                    attempt: attempt.number,
                };
                let registered = |field: fn(&Register) -> &String| -> Vec<String> {
                    gang.iter()
                        .map(|w| self.registry.registration(w).map(field).cloned())
                        .map(Option::unwrap_or_default)
                        .collect()
                };
                let peers = registered(|r| &r.peer_address);
                let local_peers = registered(|r| &r.local_peer_address);
                let machine_ids = registered(|r| &r.machine_id);
                let job_json = serde_json::to_string(&job).expect("job serialises");
                let mut ring_secret = vec![0u8; RING_SECRET_BYTES];
                self.secrets.fill_bytes(&mut ring_secret);
                for (rank, worker) in gang.iter().enumerate() {
                    self.registry.assign(worker, reference.clone());
                    effects.send(
                        self.registry.address(worker),
                        coordinator_message::Kind::Assign(Assignment {
                            attempt: Some(reference.clone()),
                            generation,
                            rank: rank as u32,
                            peers: peers.clone(),
                            job_json: job_json.clone(),
                            start_epoch: work.start_epoch,
                            stop_epoch: work.stop_epoch,
                            checkpoint_dir: dir.display().to_string(),
                            ring_secret: ring_secret.clone(),
                            local_peers: local_peers.clone(),
                            machine_ids: machine_ids.clone(),
                        }),
                    );
                }
                log_start(&reference, &work, &gang);
            }
        }
    }

    fn finish_done(&mut self, now: Now, effects: &mut Effects) {
        let done: Vec<u64> = self
            .sweeps
            .iter_mut()
            .filter_map(|(seq, run)| run.driver.is_done().then_some(*seq))
            .collect();
        for seq in done {
            let mut run = self.sweeps.remove(&seq).expect("listed above");
            for number in run.driver.stop_paused() {
                if let Some(t) = run.driver.trial(number) {
                    effects.write_trial(t);
                }
            }
            let trials = run.driver.trials();
            let any_good = trials.values().any(|t| t.state.has_result());
            run.record.state = if any_good || trials.is_empty() {
                SweepState::Completed
            } else {
                SweepState::Failed
            };
            run.record.finished_unix_ms = Some(now.unix_ms);
            run.record.summary = Some(run.summary());
            effects.write_sweep(&run.record);
            info!(sweep = %run.record.id, state = ?run.record.state, trials = run.driver.trials().len(), "sweep finished");
            self.finished.insert(run.record.id.clone(), run.record);
        }
    }
}

fn log_start(reference: &AttemptRef, work: &Work, gang: &[String]) {
    info!(
        sweep = %reference.sweep_id,
        trial = reference.trial,
        attempt = reference.attempt,
        epochs = format!("{}..={}", work.start_epoch + 1, work.stop_epoch),
        workers = gang.join(","),
        "attempt started"
    );
}

/// What is wrong with an epoch report, if anything breaks the limits.
fn check_epoch_report(
    metrics: &BTreeMap<String, f64>,
    checkpoint: Option<&str>,
) -> Result<(), String> {
    if metrics.len() > MAX_METRICS_PER_EPOCH {
        return Err(format!(
            "has {} metrics; at most {MAX_METRICS_PER_EPOCH} are accepted",
            metrics.len()
        ));
    }
    if let Some(name) = metrics.keys().find(|n| n.len() > MAX_METRIC_NAME_BYTES) {
        return Err(format!(
            "names a metric of {} bytes; at most {MAX_METRIC_NAME_BYTES} are accepted",
            name.len()
        ));
    }
    if let Some(path) = checkpoint.filter(|p| p.len() > MAX_PATH_BYTES) {
        return Err(format!(
            "names a checkpoint path of {} bytes; at most {MAX_PATH_BYTES} are accepted",
            path.len()
        ));
    }
    Ok(())
}

/// A worker's lineage report as a record, or what breaks the limits.
fn lineage_of(reported: &ringleader_proto::coordinator::Lineage) -> Result<Lineage, String> {
    if reported.files.len() > MAX_LINEAGE_FILES {
        return Err(format!(
            "lists {} files; at most {MAX_LINEAGE_FILES} are accepted",
            reported.files.len()
        ));
    }
    let paths: usize = reported.files.iter().map(|f| f.path.len()).sum();
    if paths > MAX_LINEAGE_PATHS_BYTES {
        return Err(format!(
            "has {paths} bytes of paths; at most {MAX_LINEAGE_PATHS_BYTES} are accepted"
        ));
    }
    if let Some(path) = reported
        .files
        .iter()
        .find(|f| f.path.len() > MAX_PATH_BYTES)
    {
        return Err(format!(
            "names a path of {} bytes; at most {MAX_PATH_BYTES} are accepted",
            path.path.len()
        ));
    }
    let is_sha256 = |text: &str| {
        text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    if let Some(file) = reported.files.iter().find(|f| !is_sha256(&f.sha256)) {
        return Err(format!(
            "gives {} a digest that is not 64 lowercase hex digits",
            file.path
        ));
    }
    if !is_sha256(&reported.spec_sha256) {
        return Err("gives a spec digest that is not 64 lowercase hex digits".into());
    }
    for (name, text) in [
        ("worker version", &reported.worker_version),
        ("worker commit", &reported.worker_commit),
    ] {
        if text.len() > MAX_LINEAGE_VERSION_BYTES {
            return Err(format!(
                "has a {name} of {} bytes; at most {MAX_LINEAGE_VERSION_BYTES} are accepted",
                text.len()
            ));
        }
    }
    Ok(Lineage {
        files: reported
            .files
            .iter()
            .map(|f| FileDigest {
                path: f.path.clone(),
                bytes: f.bytes,
                sha256: f.sha256.clone(),
            })
            .collect(),
        files_left_out: reported.files_left_out,
        spec_sha256: reported.spec_sha256.clone(),
        worker_version: reported.worker_version.clone(),
        worker_commit: reported.worker_commit.clone(),
        seed: reported.seed,
        started_unix_ms: reported.started_unix_ms,
        ended_unix_ms: reported.ended_unix_ms,
    })
}

/// A trial's checkpoint directory (a fold's: `fold-N` within it): under
/// the job's `checkpoint.dir`, or the coordinator's default root.
fn checkpoint_dir(root: &Path, job: &JobSpec, sweep: &str, work: &Work) -> PathBuf {
    let trial = job
        .checkpoint
        .dir
        .as_deref()
        .unwrap_or(root)
        .join(sweep)
        .join(format!("trial-{:06}", work.trial));
    match work.fold {
        Some(fold) => trial.join(format!("fold-{}", fold.index)),
        None => trial,
    }
}

/// `need` idle workers able to run on `device`, or `None`: `cuda` needs a
/// worker with a GPU, `cuda:N` one with N + 1 GPUs at least; `cpu` and
/// `auto` take any.
fn pick_gang(workers: &WorkerRegistry, need: usize, device: &str) -> Option<Vec<String>> {
    let gpus_needed = device
        .parse::<JobDevice>()
        .map_or(usize::MAX, JobDevice::gpus_needed);
    let fit: Vec<String> = workers
        .idle()
        .filter(|id| workers.gpus(id) >= gpus_needed)
        .map(str::to_string)
        .take(need)
        .collect();
    (need > 0 && fit.len() == need).then_some(fit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_jobs_go_only_to_workers_with_enough_gpus() {
        use ringleader_proto::coordinator::{GpuInfo, WorkerResources};
        let mut idle = WorkerRegistry::new(Duration::from_secs(5));
        for (id, gpus) in [("a-cpu", 0), ("b-one", 1), ("c-two", 2), ("d-cpu", 0)] {
            let registration = Register {
                worker_id: id.into(),
                resources: Some(WorkerResources {
                    gpus: vec![GpuInfo::default(); gpus],
                    ..WorkerResources::default()
                }),
                ..Register::default()
            };
            idle.register(registration, Instant::now(), 0).unwrap();
        }
        let pick = |need, device| pick_gang(&idle, need, device);
        assert_eq!(pick(2, "cpu"), Some(vec!["a-cpu".into(), "b-one".into()]));
        assert_eq!(pick(4, "auto").map(|g| g.len()), Some(4));
        assert_eq!(pick(2, "cuda"), Some(vec!["b-one".into(), "c-two".into()]));
        assert_eq!(pick(3, "cuda"), None, "two GPU workers only");
        assert_eq!(pick(1, "cuda:0"), Some(vec!["b-one".into()]));
        assert_eq!(pick(1, "cuda:1"), Some(vec!["c-two".into()]));
        assert_eq!(pick(2, "cuda:1"), None);
        assert_eq!(pick(1, "cuda:2"), None);
        assert_eq!(pick(1, "cuda:x"), None, "never valid (the spec refuses it)");
        assert_eq!(pick(0, "cpu"), None);
    }

    fn metrics(count: usize, name_bytes: usize) -> BTreeMap<String, f64> {
        (0..count)
            .map(|i| (format!("{i:0>name_bytes$}"), 0.5))
            .collect()
    }

    #[test]
    fn lineages_over_the_limits_are_refused_naming_the_limit() {
        use ringleader_proto::coordinator::{FileDigest, Lineage};
        let digest = "ab".repeat(32);
        let file = |path: String| FileDigest {
            path,
            bytes: 1,
            sha256: digest.clone(),
        };
        let lineage = |files: Vec<FileDigest>| Lineage {
            files,
            spec_sha256: digest.clone(),
            worker_version: "0.1.0".into(),
            worker_commit: "unknown".into(),
            ..Lineage::default()
        };
        let fine = lineage_of(&lineage(vec![file("/data/a.csv".into())])).unwrap();
        assert_eq!(fine.files[0].sha256, digest);
        let many = lineage((0..129).map(|i| file(format!("/d/{i}"))).collect());
        assert_eq!(
            lineage_of(&many).unwrap_err(),
            "lists 129 files; at most 128 are accepted"
        );
        let long = lineage(vec![file("p".repeat(MAX_PATH_BYTES + 1))]);
        assert!(lineage_of(&long)
            .unwrap_err()
            .contains("path of 4097 bytes"));
        let wide = lineage((0..17).map(|i| file(format!("{i:0>4000}"))).collect());
        assert!(lineage_of(&wide).unwrap_err().contains("bytes of paths"));
        let mut upper = lineage(vec![file("/a".into())]);
        upper.files[0].sha256 = digest.to_uppercase();
        assert!(lineage_of(&upper).unwrap_err().contains("/a a digest"));
        let mut version = lineage(Vec::new());
        version.worker_commit = "c".repeat(129);
        assert!(lineage_of(&version)
            .unwrap_err()
            .contains("worker commit of 129"));
        let mut spec = lineage(Vec::new());
        spec.spec_sha256 = String::new();
        assert!(lineage_of(&spec).unwrap_err().contains("spec digest"));
    }

    #[test]
    fn epoch_reports_over_the_limits_are_refused_naming_the_limit() {
        assert_eq!(check_epoch_report(&metrics(64, 64), Some("/ckpt")), Ok(()));
        let error = check_epoch_report(&metrics(65, 8), None).unwrap_err();
        assert_eq!(error, "has 65 metrics; at most 64 are accepted");
        let error = check_epoch_report(&metrics(1, 65), None).unwrap_err();
        assert_eq!(error, "names a metric of 65 bytes; at most 64 are accepted");
        let long_path = "p".repeat(MAX_PATH_BYTES + 1);
        let error = check_epoch_report(&metrics(1, 8), Some(&long_path)).unwrap_err();
        assert!(error.contains("checkpoint path of 4097 bytes"), "{error}");
    }
}
