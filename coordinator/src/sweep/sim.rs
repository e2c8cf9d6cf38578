//! A deterministic simulation of the leader, in the style of raft-rs's
//! test harness: the real [`Scheduler`] is stepped by an in-memory store
//! and network that can drop, delay, duplicate and reorder worker traffic,
//! fail commits and change terms, all drawn from one seed.
//!
//! The simulation runs what service.rs runs: a step's writes are queued in
//! order and its messages leave only once they commit; a commit that fails
//! ends the term, and the next leader is rebuilt from the store alone, as
//! server.rs rebuilds one from etcd. Simulated workers behave like real
//! ones: they train a synthetic objective in virtual time, report epochs
//! (rank 0) and the end of their attempt (every rank), stop when told, and
//! re-register after a broken stream with what they run and last finished.
//!
//! After every step the invariants are checked (see [`Simulation::check`]);
//! a failure names the seed, so `Simulation::new(seed, ..)` replays it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ringleader_proto::coordinator::{
    coordinator_message, AttemptOutcome as WireOutcome, AttemptRef, CoordinatorMessage,
    EpochReport, Register, TrialFinished,
};
use ringleader_spec::JobSpec;

use super::records::{
    SweepKind, SweepRecord, SweepState, TrialRecord, SWEEPS_PREFIX, TRIALS_PREFIX,
};
use super::scheduler::{Effects, Input, Now, Reply, Report, Scheduler, Stored, Submission};
use super::template::Template;
use crate::registry::{Address, ConnectionId};

/// How often, in probability per event, each fault happens.
#[derive(Clone, Copy, Debug)]
pub struct Faults {
    /// A message is lost, and with it the stream it was on (gRPC streams
    /// do not lose single messages: a loss is a broken stream).
    pub drop: f64,
    /// A worker's message arrives twice.
    pub duplicate: f64,
    /// A message takes up to 200 ms longer than the ones around it.
    pub delay: f64,
    /// A commit fails (the term ends).
    pub fail_commit: f64,
    /// The leader loses its term at a random moment, per simulated 10 ms.
    pub term_change: f64,
}

impl Faults {
    pub const NONE: Faults = Faults {
        drop: 0.0,
        duplicate: 0.0,
        delay: 0.0,
        fail_commit: 0.0,
        term_change: 0.0,
    };

    /// Everything at once, often enough that a short run sees each fault.
    pub const CHAOS: Faults = Faults {
        drop: 0.01,
        duplicate: 0.05,
        delay: 0.2,
        fail_commit: 0.005,
        term_change: 0.002,
    };
}

/// What a run is made of.
#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    pub workers: usize,
    pub faults: Faults,
    /// Check every invariant after every step (tests), or only at the end
    /// (the scale benchmark).
    pub check_every_step: bool,
}

/// Virtual time per simulated epoch of training.
const EPOCH: Duration = Duration::from_millis(5);
/// How often the leader ticks and workers heartbeat.
const TICK: Duration = Duration::from_millis(250);
const HEARTBEAT: Duration = Duration::from_secs(1);
const LOST_AFTER: Duration = Duration::from_secs(5);
/// Network latency, each way.
const LATENCY_MS: u64 = 1;

/// A worker as the simulation plays it.
#[derive(Default)]
struct SimWorker {
    /// The stream it is attached on (none while (re-)registering).
    connection: Option<ConnectionId>,
    /// The attempt it trains, its rank, the job, and when it ends.
    running: Option<Running>,
    last_finished: Option<TrialFinished>,
    next_heartbeat_ms: u64,
    /// Bumped on every stream break: traffic from an older stream is lost.
    stream: u64,
}

struct Running {
    attempt: AttemptRef,
    rank: u32,
    job: JobSpec,
    start_epoch: u32,
    stop_epoch: u32,
    ends_ms: u64,
}

/// Traffic in flight, ordered by arrival time then by sending order.
enum Traffic {
    ToWorker(Address, CoordinatorMessage),
    /// A worker's message on its stream number `stream`.
    ToLeader {
        worker: String,
        stream: u64,
        message: ToLeader,
    },
    /// A worker's attempt reaches its end.
    TrainingDone {
        worker: String,
        attempt: AttemptRef,
    },
    /// A worker whose stream broke registers again.
    Reregister {
        worker: String,
    },
}

#[derive(Clone)]
enum ToLeader {
    Heartbeat,
    Report(Box<Report>),
    /// The stream ended (seen by the leader's transport).
    Closed(ConnectionId),
}

/// One simulated cluster.
pub struct Simulation {
    options: Options,
    rng: ChaCha8Rng,
    /// etcd: key to JSON.
    store: BTreeMap<String, String>,
    leader: Scheduler,
    term: i64,
    now: Now,
    /// Steps decided and not yet committed, in order.
    uncommitted: VecDeque<Effects>,
    traffic: BinaryHeap<Reverse<(u64, u64)>>,
    in_flight: BTreeMap<u64, Traffic>,
    sent: u64,
    workers: BTreeMap<String, SimWorker>,
    /// Trials whose stored record reached a final state, with that record.
    ended: BTreeMap<String, String>,
    pub stats: Stats,
    next_tick_ms: u64,
    start: Now,
}

/// What a run did, for reports and the benchmark.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Inputs the leader took.
    pub events: u64,
    /// Time spent in the leader's steps (real time).
    pub leader_time: Duration,
    pub bytes_written: u64,
    pub puts: u64,
    pub commits: u64,
    pub failed_commits: u64,
    pub terms: u64,
    pub dropped: u64,
    pub duplicated: u64,
    /// Reports of attempts trained to their end that reached the leader.
    pub attempts_done: u64,
}

impl Simulation {
    pub fn new(options: Options) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
        let start = Now {
            instant: Instant::now(),
            unix_ms: 1_700_000_000_000,
        };
        let leader = new_leader(1, start, rng.random());
        let mut sim = Self {
            options,
            rng,
            store: BTreeMap::new(),
            leader,
            term: 1,
            now: start,
            uncommitted: VecDeque::new(),
            traffic: BinaryHeap::new(),
            in_flight: BTreeMap::new(),
            sent: 0,
            workers: BTreeMap::new(),
            ended: BTreeMap::new(),
            stats: Stats::default(),
            next_tick_ms: 0,
            start,
        };
        for i in 0..sim.options.workers {
            let id = format!("w{i:05}");
            sim.workers.insert(id.clone(), SimWorker::default());
            sim.push(0, Traffic::Reregister { worker: id });
        }
        sim
    }

    /// Virtual milliseconds since the start.
    pub fn elapsed_ms(&self) -> u64 {
        self.now.unix_ms - self.start.unix_ms
    }

    /// Submits a sweep spec (TOML) as a client does: again if the change
    /// was not stored (its term ended), until it is. Panics if the spec or
    /// the leader refuses it (the simulation's sweeps are its own).
    pub fn submit(&mut self, spec: &str) -> String {
        loop {
            let template = Template::parse(SweepKind::Sweep, spec, "sim.toml").expect("sweep spec");
            let submission = Submission {
                kind: SweepKind::Sweep,
                template,
                spec: spec.to_string(),
                origin: "sim.toml".into(),
                owner: "sim".into(),
                max_running: usize::MAX,
            };
            let id = match self.leader_step(Input::Submit(Box::new(submission))) {
                Reply::Submitted(Ok(id)) => id,
                other => panic!("seed {}: submission refused: {other:?}", self.options.seed),
            };
            self.commit();
            if self.store.contains_key(&super::records::sweep_key(&id)) {
                return id;
            }
        }
    }

    /// Whether every submitted sweep has finished, as stored.
    pub fn all_finished(&self) -> bool {
        self.uncommitted.is_empty() && self.sweeps().iter().all(|s| s.state.is_terminal())
    }

    /// Stored sweep records.
    pub fn sweeps(&self) -> Vec<SweepRecord> {
        self.store
            .range(SWEEPS_PREFIX.to_string()..)
            .take_while(|(k, _)| k.starts_with(SWEEPS_PREFIX))
            .map(|(_, v)| serde_json::from_str(v).expect("stored sweep decodes"))
            .collect()
    }

    /// Stored trial records of `sweep`, in trial order.
    pub fn trials(&self, sweep: &str) -> Vec<TrialRecord> {
        let prefix = format!("{TRIALS_PREFIX}{sweep}/");
        self.store
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| serde_json::from_str(v).expect("stored trial decodes"))
            .collect()
    }

    /// Runs until every sweep has finished or `limit_ms` of virtual time
    /// passed; returns whether they finished.
    pub fn run(&mut self, limit_ms: u64) -> bool {
        while !self.all_finished() {
            if self.elapsed_ms() > limit_ms {
                return false;
            }
            self.advance();
        }
        true
    }

    /// One event: the next message or timer that is due (virtual time
    /// moves on to it), or the leader's tick; then what that leads to is
    /// committed, and the invariants are checked.
    pub fn advance(&mut self) {
        let next = self
            .traffic
            .peek()
            .map_or(u64::MAX, |Reverse((at, _))| *at)
            .min(self.next_tick_ms)
            .max(self.elapsed_ms());
        self.now = self.start.after(Duration::from_millis(next));
        if self.rng.random_bool(self.options.faults.term_change) {
            self.change_term("the simulation took the leader's term away", false);
        }
        self.commit();
        if self.elapsed_ms() >= self.next_tick_ms {
            self.next_tick_ms = self.elapsed_ms() + TICK.as_millis() as u64;
            self.heartbeats();
            self.leader_step(Input::Tick);
        } else if let Some(Reverse((_, seq))) = self.traffic.pop() {
            let traffic = self.in_flight.remove(&seq).expect("queued traffic");
            self.deliver(traffic);
        }
        self.commit();
        if self.options.check_every_step {
            self.check();
        }
    }

    fn push(&mut self, delay_ms: u64, traffic: Traffic) {
        self.sent += 1;
        self.in_flight.insert(self.sent, traffic);
        self.traffic
            .push(Reverse((self.elapsed_ms() + delay_ms, self.sent)));
    }

    /// Network delay of one message: latency, sometimes much more.
    fn delay(&mut self) -> u64 {
        if self.rng.random_bool(self.options.faults.delay) {
            LATENCY_MS + self.rng.random_range(0..200)
        } else {
            LATENCY_MS
        }
    }

    fn leader_step(&mut self, input: Input) -> Reply {
        self.stats.events += 1;
        let started = Instant::now();
        let (effects, reply) = self.leader.step(self.now, input);
        self.stats.leader_time += started.elapsed();
        if !effects.is_empty() {
            self.uncommitted.push_back(effects);
        }
        reply
    }

    /// Commits what the leader decided, in order; a failed commit ends the
    /// term before any of its messages (or later ones) leave.
    fn commit(&mut self) {
        while let Some(effects) = self.uncommitted.pop_front() {
            if !effects.writes.is_empty() && self.rng.random_bool(self.options.faults.fail_commit) {
                self.stats.failed_commits += 1;
                self.change_term("a commit failed", true);
                return;
            }
            if !effects.writes.is_empty() {
                self.stats.commits += 1;
            }
            // As the state writer does: the last write of a key wins.
            let mut latest: BTreeMap<String, String> = BTreeMap::new();
            for (key, value) in effects.writes {
                latest.insert(key, value);
            }
            for (key, value) in latest {
                self.stats.puts += 1;
                self.stats.bytes_written += (key.len() + value.len()) as u64;
                if self.options.check_every_step {
                    self.check_write(&key, &value);
                }
                self.store.insert(key, value);
            }
            for (to, message) in effects.messages {
                if self.options.check_every_step {
                    self.check_sent(&to, &message);
                }
                let delay = self.delay();
                self.push(delay, Traffic::ToWorker(to, message));
            }
        }
    }

    /// A new term: the leader's memory is gone, what is uncommitted is
    /// lost, every stream breaks, and the new leader loads the store.
    /// `failed`: a commit failed, so the old leader is ahead of the store.
    fn change_term(&mut self, why: &str, failed: bool) {
        tracing::debug!(why, term = self.term, "term change");
        self.stats.terms += 1;
        if self.options.check_every_step && !failed && self.uncommitted.is_empty() {
            self.check_restored();
        }
        self.uncommitted.clear();
        self.term += 1;
        let seed = self.rng.random();
        let (leader, set_aside) = restore(&self.store, self.term, self.now, seed);
        assert!(
            set_aside.is_empty(),
            "seed {}: a sweep could not be taken over",
            self.options.seed
        );
        self.leader = leader;
        let ids: Vec<String> = self.workers.keys().cloned().collect();
        for id in ids {
            self.break_stream(&id);
        }
    }

    /// The worker's stream broke: it registers again after a while.
    fn break_stream(&mut self, id: &str) {
        let worker = self.workers.get_mut(id).expect("known worker");
        worker.stream += 1;
        let Some(connection) = worker.connection.take() else {
            return;
        };
        let stream = worker.stream;
        let delay = self.rng.random_range(1..50);
        self.push(
            LATENCY_MS,
            Traffic::ToLeader {
                worker: id.to_string(),
                stream,
                message: ToLeader::Closed(connection),
            },
        );
        self.push(
            delay,
            Traffic::Reregister {
                worker: id.to_string(),
            },
        );
    }

    fn heartbeats(&mut self) {
        let due: Vec<(String, u64)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.connection.is_some() && w.next_heartbeat_ms <= self.elapsed_ms())
            .map(|(id, w)| (id.clone(), w.stream))
            .collect();
        let next = self.elapsed_ms() + HEARTBEAT.as_millis() as u64;
        for (id, stream) in due {
            if let Some(w) = self.workers.get_mut(&id) {
                w.next_heartbeat_ms = next;
            }
            self.send_to_leader(&id, stream, ToLeader::Heartbeat);
        }
    }

    /// A worker's message, subject to loss (a broken stream) and
    /// duplication.
    fn send_to_leader(&mut self, id: &str, stream: u64, message: ToLeader) {
        if self.rng.random_bool(self.options.faults.drop) {
            self.stats.dropped += 1;
            self.break_stream(id);
            return;
        }
        let copies = if self.rng.random_bool(self.options.faults.duplicate) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.delay();
            self.push(
                delay,
                Traffic::ToLeader {
                    worker: id.to_string(),
                    stream,
                    message: message.clone(),
                },
            );
        }
    }

    fn deliver(&mut self, traffic: Traffic) {
        match traffic {
            Traffic::ToWorker(to, message) => self.worker_receives(to, message),
            Traffic::ToLeader {
                worker,
                stream,
                message,
            } => {
                let Some(w) = self.workers.get(&worker) else {
                    return;
                };
                // Traffic of a stream the transport already closed is gone,
                // except the close itself.
                let input = match message {
                    ToLeader::Closed(connection) => Input::Disconnected { worker, connection },
                    _ if w.stream != stream => return,
                    ToLeader::Heartbeat => {
                        let Some(connection) = w.connection else {
                            return;
                        };
                        Input::Heartbeat { worker, connection }
                    }
                    ToLeader::Report(report) => {
                        let Some(connection) = w.connection else {
                            return;
                        };
                        if let Report::Finished(f) = report.as_ref() {
                            if f.outcome() == WireOutcome::Done {
                                self.stats.attempts_done += 1;
                            }
                        }
                        Input::Reports {
                            worker,
                            connection,
                            reports: vec![*report],
                        }
                    }
                };
                self.leader_step(input);
            }
            Traffic::TrainingDone { worker, attempt } => self.training_done(&worker, &attempt),
            Traffic::Reregister { worker } => self.register(&worker),
        }
    }

    fn register(&mut self, id: &str) {
        let w = self.workers.get_mut(id).expect("known worker");
        if w.connection.is_some() {
            return;
        }
        let registration = Register {
            worker_id: id.to_string(),
            host: "sim".into(),
            peer_address: format!("{id}:1"),
            running: w.running.as_ref().map(|r| r.attempt.clone()),
            last_finished: w.last_finished.clone(),
            ..Register::default()
        };
        match self.leader_step(Input::Register(Box::new(registration))) {
            Reply::Registered(Ok(connection)) => {
                let next = self.elapsed_ms() + HEARTBEAT.as_millis() as u64;
                let w = self.workers.get_mut(id).expect("known worker");
                w.connection = Some(connection);
                w.next_heartbeat_ms = next;
            }
            // Its old stream is not closed yet, or was just declared lost:
            // try again shortly, as a real worker does.
            _ => self.push(100, Traffic::Reregister { worker: id.into() }),
        }
    }

    fn worker_receives(&mut self, to: Address, message: CoordinatorMessage) {
        let Some(w) = self.workers.get_mut(&to.worker) else {
            return;
        };
        if w.connection != Some(to.connection) {
            return; // sent on a stream that has since closed
        }
        if self.rng.random_bool(self.options.faults.drop) {
            self.stats.dropped += 1;
            let id = to.worker.clone();
            self.break_stream(&id);
            return;
        }
        let now = self.elapsed_ms();
        let w = self.workers.get_mut(&to.worker).expect("known worker");
        match message.kind {
            Some(coordinator_message::Kind::Assign(assign)) => {
                let attempt = assign.attempt.expect("assignments name their attempt");
                if w.running.is_some() {
                    // A real worker refuses a second attempt as a failure.
                    let report = finished(&attempt, WireOutcome::Failed, 0, "busy");
                    let stream = w.stream;
                    self.send_to_leader(
                        &to.worker,
                        stream,
                        ToLeader::Report(Box::new(Report::Finished(report))),
                    );
                    return;
                }
                let job: JobSpec = serde_json::from_str(&assign.job_json).expect("job decodes");
                let epochs = u64::from(assign.stop_epoch.saturating_sub(assign.start_epoch));
                let ends_ms = now + epochs * EPOCH.as_millis() as u64;
                w.last_finished = None;
                w.running = Some(Running {
                    attempt: attempt.clone(),
                    rank: assign.rank,
                    job,
                    start_epoch: assign.start_epoch,
                    stop_epoch: assign.stop_epoch,
                    ends_ms,
                });
                let delay = ends_ms - now;
                self.push(
                    delay,
                    Traffic::TrainingDone {
                        worker: to.worker,
                        attempt,
                    },
                );
            }
            Some(coordinator_message::Kind::Stop(stop)) => {
                let stopped = stop.attempt;
                if w.running.as_ref().map(|r| &r.attempt) == stopped.as_ref() {
                    let running = w.running.take().expect("checked above");
                    let report = finished(&running.attempt, WireOutcome::Failed, 0, "stopped");
                    w.last_finished = Some(report.clone());
                    let stream = w.stream;
                    self.send_to_leader(
                        &to.worker,
                        stream,
                        ToLeader::Report(Box::new(Report::Finished(report))),
                    );
                }
            }
            _ => {}
        }
    }

    /// The attempt trained to its stop epoch: rank 0 reports each epoch's
    /// objective, then every rank reports the end.
    fn training_done(&mut self, id: &str, attempt: &AttemptRef) {
        let now = self.elapsed_ms();
        let w = self.workers.get_mut(id).expect("known worker");
        let Some(running) = w.running.as_ref().filter(|r| &r.attempt == attempt) else {
            return; // stopped meanwhile
        };
        if running.ends_ms > now {
            return;
        }
        let running = w.running.take().expect("checked above");
        let stream = w.stream;
        let mut reports = Vec::new();
        if running.rank == 0 {
            for epoch in running.start_epoch + 1..=running.stop_epoch {
                let value = running
                    .job
                    .model
                    .synthetic_objective(epoch)
                    .expect("simulated jobs are synthetic");
                reports.push(Report::Epoch(EpochReport {
                    attempt: Some(attempt.clone()),
                    epoch,
                    metrics: [("objective".to_string(), value)].into_iter().collect(),
                    checkpoint: format!("/ckpt/{}/{}/{epoch}", attempt.sweep_id, attempt.trial),
                }));
            }
        }
        let report = finished(attempt, WireOutcome::Done, running.stop_epoch, "");
        let w = self.workers.get_mut(id).expect("known worker");
        w.last_finished = Some(report.clone());
        reports.push(Report::Finished(report));
        for report in reports {
            self.send_to_leader(id, stream, ToLeader::Report(Box::new(report)));
        }
    }

    /// Invariants over the leader and the store, after a step.
    pub fn check(&self) {
        for sweep in self.sweeps() {
            for t in self.trials(&sweep.id) {
                let live = t.live_attempts().count();
                assert!(
                    live <= 1,
                    "seed {}: trial {} of {} has {live} live attempts",
                    self.options.seed,
                    t.number,
                    sweep.id
                );
                if sweep.state == SweepState::Completed {
                    assert!(
                        t.state.is_terminal(),
                        "seed {}: {} completed with trial {} {:?}",
                        self.options.seed,
                        sweep.id,
                        t.number,
                        t.state
                    );
                }
            }
        }
    }

    /// Every trial ends once: a stored final record is never rewritten
    /// with anything else.
    fn check_write(&mut self, key: &str, value: &str) {
        if !key.starts_with(TRIALS_PREFIX) {
            return;
        }
        if let Some(ended) = self.ended.get(key) {
            let before: TrialRecord = serde_json::from_str(ended).expect("decodes");
            let after: TrialRecord = serde_json::from_str(value).expect("decodes");
            assert_eq!(
                (before.state, &before.objective, before.attempts.len()),
                (after.state, &after.objective, after.attempts.len()),
                "seed {}: trial {key} ended twice",
                self.options.seed
            );
            return;
        }
        let record: TrialRecord = serde_json::from_str(value).expect("decodes");
        if record.state.is_terminal() {
            self.ended.insert(key.to_string(), value.to_string());
        }
    }

    /// Written before sent: an assignment names an attempt the store
    /// already holds, live, with this worker in its gang.
    fn check_sent(&self, to: &Address, message: &CoordinatorMessage) {
        let Some(coordinator_message::Kind::Assign(assign)) = &message.kind else {
            return;
        };
        let attempt = assign.attempt.as_ref().expect("named");
        let key = super::records::trial_key(&attempt.sweep_id, attempt.trial);
        let stored: Option<TrialRecord> = self
            .store
            .get(&key)
            .map(|v| serde_json::from_str(v).expect("decodes"));
        let known = stored
            .as_ref()
            .and_then(|t| t.live_attempt_numbered(attempt.attempt))
            .is_some_and(|a| a.workers.contains(&to.worker));
        assert!(
            known,
            "seed {}: {} was sent attempt {} of trial {key} before it was stored",
            self.options.seed, to.worker, attempt.attempt
        );
    }

    /// A restored leader proposes what an uninterrupted one would: with
    /// everything the old leader decided stored, the old leader and one
    /// rebuilt from the store place the same work (sweep, trial, job,
    /// epochs) on the same fresh probe workers. (The old leader is about to
    /// be replaced, so probing it changes nothing that lasts.)
    fn check_restored(&mut self) {
        let (mut replayed, _) = restore(&self.store, self.term + 1, self.now, [7; 32]);
        let uninterrupted = probe(&mut self.leader, self.now);
        let restored = probe(&mut replayed, self.now);
        // Which sweep goes first depends on the idle workers each leader
        // has (the old one has some of its own); each sweep's work must be
        // the same, as far as both placed it.
        for (sweep, work) in &uninterrupted {
            let again = restored.get(sweep).map_or(&[][..], Vec::as_slice);
            let n = work.len().min(again.len());
            assert_eq!(
                work[..n],
                again[..n],
                "seed {}: a leader restored from the store proposes other work for {sweep} than the uninterrupted one",
                self.options.seed
            );
        }
    }
}

/// Probe workers registered by [`Simulation::check_restored`].
const PROBES: usize = 8;

/// Work placed: trial, the model it trains (its configuration), epochs.
type Placed = (u64, serde_json::Value, u32, u32);

/// Registers probe workers one by one and lists the work placed on them,
/// by sweep, in order.
fn probe(leader: &mut Scheduler, now: Now) -> BTreeMap<String, Vec<Placed>> {
    let mut placed: BTreeMap<String, Vec<Placed>> = BTreeMap::new();
    for i in 0..PROBES {
        let registration = Register {
            worker_id: format!("~probe{i:03}"),
            host: "probe".into(),
            ..Register::default()
        };
        let (effects, _) = leader.step(now, Input::Register(Box::new(registration)));
        for (_, message) in effects.messages {
            if let Some(coordinator_message::Kind::Assign(a)) = message.kind {
                let attempt = a.attempt.expect("named");
                if a.rank == 0 {
                    let job: serde_json::Value =
                        serde_json::from_str(&a.job_json).expect("job decodes");
                    placed.entry(attempt.sweep_id).or_default().push((
                        attempt.trial,
                        job["model"].clone(),
                        a.start_epoch,
                        a.stop_epoch,
                    ));
                }
            }
        }
    }
    placed
}

fn finished(attempt: &AttemptRef, outcome: WireOutcome, epochs: u32, error: &str) -> TrialFinished {
    TrialFinished {
        attempt: Some(attempt.clone()),
        outcome: outcome as i32,
        epochs_done: epochs,
        error: error.to_string(),
        ..TrialFinished::default()
    }
}

fn new_leader(term: i64, now: Now, seed: [u8; 32]) -> Scheduler {
    Scheduler::new(
        LOST_AFTER,
        term,
        PathBuf::from("/ckpt"),
        now.instant + LOST_AFTER,
        seed,
    )
}

/// A leader for `term` rebuilt from `store` as server.rs rebuilds one from
/// etcd, with the problems of any sweep it had to set aside.
fn restore(
    store: &BTreeMap<String, String>,
    term: i64,
    now: Now,
    seed: [u8; 32],
) -> (Scheduler, Vec<String>) {
    let mut leader = new_leader(term, now, seed);
    let mut problems = Vec::new();
    let records = store
        .range(SWEEPS_PREFIX.to_string()..)
        .take_while(|(k, _)| k.starts_with(SWEEPS_PREFIX));
    for (_, value) in records {
        let record: SweepRecord = serde_json::from_str(value).expect("stored sweep decodes");
        let stored = match Stored::take_over(record) {
            Err(stored) => *stored,
            Ok((record, template)) => {
                let prefix = format!("{TRIALS_PREFIX}{}/", record.id);
                let trials = store
                    .range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(&prefix))
                    .map(|(_, v)| serde_json::from_str(v).expect("stored trial decodes"))
                    .collect();
                Stored::running(record, template, trials)
            }
        };
        if let Stored::SetAside(_, why) = &stored {
            problems.extend(why.iter().cloned());
        }
        let _ = leader.restore(stored, now);
    }
    (leader, problems)
}

/// A Branin sweep on the synthetic model (trains in virtual time).
pub fn branin_spec(
    searcher: &str,
    max_trials: u32,
    workers_per_trial: u32,
    concurrent: u32,
) -> String {
    format!(
        r#"
[sweep]
name = "branin-{searcher}"
searcher = "{searcher}"
seed = 3
max_trials = {max_trials}
max_concurrent_trials = {concurrent}
workers_per_trial = {workers_per_trial}
max_epochs = 9
max_failures = 1000
objective = {{ metric = "objective", mode = "min" }}

[sweep.params]
"model.x1" = {{ kind = "uniform", low = -5.0, high = 10.0 }}
"model.x2" = {{ kind = "uniform", low = 0.0, high = 15.0 }}

[job]
name = "branin"

[job.model]
kind = "synthetic"
function = "branin"
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeds each test run; `RINGLEADER_SIM_SEEDS` runs more.
    fn seeds() -> std::ops::Range<u64> {
        let count = std::env::var("RINGLEADER_SIM_SEEDS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(64);
        0..count
    }

    fn chaos(seed: u64, workers: usize) -> Simulation {
        Simulation::new(Options {
            seed,
            workers,
            faults: Faults::CHAOS,
            check_every_step: true,
        })
    }

    /// Trial configurations by number, as stored.
    fn configs(sim: &Simulation, sweep: &str) -> Vec<String> {
        sim.trials(sweep)
            .iter()
            .map(|t| serde_json::to_string(&t.config).unwrap())
            .collect()
    }

    fn finish(sim: &mut Simulation, seed: u64) {
        assert!(
            sim.run(600_000),
            "seed {seed}: the sweeps did not finish: {:?}",
            sim.stats
        );
        sim.check();
    }

    #[test]
    fn every_trial_ends_once_under_loss_duplication_delay_failed_commits_and_failovers() {
        let mut seen = Stats::default();
        for seed in seeds() {
            let mut sim = chaos(seed, 6);
            let ids = [
                sim.submit(&branin_spec("random", 12, 1, 3)),
                sim.submit(&branin_spec("asha", 12, 2, 0)),
                sim.submit(&branin_spec("tpe", 10, 1, 2)),
            ];
            finish(&mut sim, seed);
            for (id, trials) in ids.iter().zip([12, 12, 10]) {
                let sweep = sim.sweeps().into_iter().find(|s| &s.id == id).unwrap();
                assert_eq!(sweep.state, SweepState::Completed, "seed {seed}: {id}");
                let stored = sim.trials(id);
                assert_eq!(stored.len(), trials, "seed {seed}: {id}");
                assert!(stored.iter().all(|t| t.state.is_terminal()), "seed {seed}");
            }
            seen.terms += sim.stats.terms;
            seen.failed_commits += sim.stats.failed_commits;
            seen.dropped += sim.stats.dropped;
            seen.duplicated += sim.stats.duplicated;
        }
        // The faults happened: the seeds above are not a quiet run.
        assert!(seen.terms > 0 && seen.failed_commits > 0, "{seen:?}");
        assert!(seen.dropped > 0 && seen.duplicated > 0, "{seen:?}");
    }

    #[test]
    fn faults_change_no_trials_configuration() {
        for seed in seeds().take(8) {
            let mut quiet = Simulation::new(Options {
                seed,
                workers: 4,
                faults: Faults::NONE,
                check_every_step: true,
            });
            let mut noisy = chaos(seed, 4);
            let spec = branin_spec("random", 16, 1, 0);
            let (a, b) = (quiet.submit(&spec), noisy.submit(&spec));
            finish(&mut quiet, seed);
            finish(&mut noisy, seed);
            assert_eq!(configs(&quiet, &a), configs(&noisy, &b), "seed {seed}");
        }
    }

    /// The scheduler reads no clock and draws nothing unseeded: the same
    /// seed stores the same bytes, times included.
    #[test]
    fn the_same_seed_replays_the_same_run() {
        let run = |seed| {
            let mut sim = chaos(seed, 5);
            sim.submit(&branin_spec("tpe", 10, 1, 2));
            sim.submit(&branin_spec("asha", 9, 2, 0));
            finish(&mut sim, seed);
            (sim.store.clone(), sim.stats.events, sim.stats.terms)
        };
        let (first, events, terms) = run(11);
        assert!(terms > 0, "a run with a failover");
        assert_eq!((first, events, terms), run(11));
    }
}
