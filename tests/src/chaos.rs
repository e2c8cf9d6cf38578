//! Chaos: a seeded random schedule of faults against a local cluster
//! running synthetic sweeps with multi-worker trials.
//!
//! ```text
//!  submit sweep ──▶ loop until the time or fault budget is spent:
//!                     restart members whose downtime is over
//!                     pick a fault (seeded): SIGKILL / SIGTERM a worker
//!                     (a busy one when the leader names one), SIGKILL the
//!                     leader, SIGSTOP etcd for longer than the lease TTL,
//!                     restart etcd from its data directory
//!                     measure its recovery, wait a random gap
//!                   heal everything ──▶ every sweep finishes ──▶ checks
//! ```
//!
//! Recovery of a fault: worker faults, until the trial it was running
//! runs again (a later attempt is live) or has finished; leader kill, until
//! another coordinator serves the sweep; etcd faults, from etcd answering
//! again until a leader serves the sweep.
//!
//! The same seed gives the same choices (which fault, which member, the
//! gaps); timing still varies with the machine, so a failure is replayed
//! by seed with the same odds, not step for step.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ringleader_coordinator::sweep::client as sweeps;
use ringleader_proto::coordinator::{AttemptRef, WorkerState};

use crate::sweeps::{
    client, must_finish_sweep, must_submit, overlapping_attempts, sweep_problems, worker_state,
    BraninSweep,
};
use crate::{TestCluster, LEASE_TTL};

#[derive(Clone, Debug)]
pub struct ChaosOptions {
    pub seed: u64,
    pub coordinators: usize,
    pub workers: usize,
    pub sweep: BraninSweep,
    /// Faults are injected for this long, or until `max_faults`.
    pub duration: Duration,
    pub max_faults: usize,
    /// Submit the sweep again whenever the last one finished (long runs);
    /// otherwise injection also stops when the one sweep has finished.
    pub repeat: bool,
    /// Pause between one fault's recovery and the next fault.
    pub gap_ms: (u64, u64),
    /// How long every sweep may take to finish once faults stop.
    pub finish_timeout: Duration,
}

/// The seed from `RINGLEADER_CHAOS_SEED`, or a fresh random one.
pub fn seed_from_env() -> u64 {
    std::env::var("RINGLEADER_CHAOS_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(rand::random)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    WorkerKill,
    WorkerTerm,
    LeaderKill,
    EtcdPause,
    EtcdRestart,
}

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::WorkerKill => "worker SIGKILL",
            FaultKind::WorkerTerm => "worker SIGTERM",
            FaultKind::LeaderKill => "leader SIGKILL",
            FaultKind::EtcdPause => "etcd SIGSTOP > TTL",
            FaultKind::EtcdRestart => "etcd restart",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Fault {
    pub kind: FaultKind,
    /// Seconds since the start of the run.
    pub at: f64,
    pub detail: String,
    /// `None`: nothing needed recovering (e.g. an idle worker died).
    pub recovery: Option<Duration>,
}

#[derive(Debug, Default)]
pub struct ChaosReport {
    pub seed: u64,
    pub faults: Vec<Fault>,
    pub sweeps: usize,
    pub trials_completed: usize,
    /// Trials of a finished sweep that did not complete (or never ran).
    pub trials_lost: usize,
    /// Attempts of one trial that were live at the same time.
    pub duplicate_live_attempts: usize,
    /// Every failed check, per sweep.
    pub problems: Vec<String>,
    pub elapsed: Duration,
}

impl ChaosReport {
    /// A table a person can read at a glance.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "seed {}: {} faults in {:.0} s; {} sweeps, {} trials completed, {} lost, {} duplicate live attempts",
            self.seed,
            self.faults.len(),
            self.elapsed.as_secs_f64(),
            self.sweeps,
            self.trials_completed,
            self.trials_lost,
            self.duplicate_live_attempts
        );
        let mut by_kind: BTreeMap<FaultKind, (usize, Vec<Duration>)> = BTreeMap::new();
        for f in &self.faults {
            let entry = by_kind.entry(f.kind).or_default();
            entry.0 += 1;
            entry.1.extend(f.recovery);
        }
        let _ = writeln!(
            out,
            "| fault | injected | recovered from | median recovery | max recovery |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|");
        for (kind, (count, mut times)) in by_kind {
            times.sort();
            let median = times.get(times.len() / 2).copied();
            let max = times.last().copied();
            let secs = |d: Option<Duration>| {
                d.map_or("–".to_string(), |d| format!("{:.2} s", d.as_secs_f64()))
            };
            let _ = writeln!(
                out,
                "| {} | {count} | {} | {} | {} |",
                kind.name(),
                times.len(),
                secs(median),
                secs(max)
            );
        }
        for p in &self.problems {
            let _ = writeln!(out, "PROBLEM: {p}");
        }
        out
    }
}

/// Members that are down and when they come back.
#[derive(Default)]
struct Downtime {
    /// Worker id → restart at (killed workers).
    workers: BTreeMap<String, Instant>,
    /// Worker id → restart delay once it has exited (SIGTERM drains first).
    draining: BTreeMap<String, Duration>,
    /// Coordinator index → restart at.
    coordinators: BTreeMap<usize, Instant>,
}

/// Runs the schedule; see the module docs.
pub async fn run(options: ChaosOptions) -> ChaosReport {
    println!(
        "chaos seed {} (replay: RINGLEADER_CHAOS_SEED={})",
        options.seed, options.seed
    );
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let mut cluster = TestCluster::start(options.coordinators, options.workers).await;
    cluster.must_form(Duration::from_secs(60)).await;
    let spec = options.sweep.spec();
    let mut ids = vec![must_submit(&cluster, "chaos-1.toml", &spec).await];
    let started = Instant::now();
    let mut down = Downtime::default();
    let mut faults = Vec::new();
    while started.elapsed() < options.duration && faults.len() < options.max_faults {
        bring_back(&mut cluster, &mut down, false);
        let last = ids.last().expect("one sweep").clone();
        if let Ok(view) = sweeps::get(&client(&cluster), &last).await {
            if view.record.state.is_terminal() {
                if !options.repeat {
                    break;
                }
                let name = format!("chaos-{}.toml", ids.len() + 1);
                if let Ok(id) = try_submit(&cluster, &name, &spec).await {
                    ids.push(id);
                }
            }
        }
        let kind = pick(&mut rng, &mut cluster, &down, &options);
        let at = started.elapsed().as_secs_f64();
        let (detail, recovery) = inject(kind, &mut rng, &mut cluster, &mut down, &last).await;
        println!(
            "[{at:7.1}s] {:<18} {detail:<40} recovery {}",
            kind.name(),
            recovery.map_or("–".into(), |d| format!("{:.2}s", d.as_secs_f64()))
        );
        faults.push(Fault {
            kind,
            at,
            detail,
            recovery,
        });
        let gap = rng.random_range(options.gap_ms.0..=options.gap_ms.1);
        // The schedule's pause between faults (not a synchronisation).
        tokio::time::sleep(Duration::from_millis(gap)).await;
    }
    // Heal: everything back up, then every sweep must finish.
    bring_back(&mut cluster, &mut down, true);
    let args = client(&cluster);
    let mut report = ChaosReport {
        seed: options.seed,
        sweeps: ids.len(),
        ..ChaosReport::default()
    };
    for id in &ids {
        let view = must_finish_sweep(&args, id, options.finish_timeout).await;
        report.duplicate_live_attempts += overlapping_attempts(&view).len();
        let completed = view
            .trials
            .iter()
            .filter(|t| t.state == ringleader_coordinator::sweep::TrialState::Completed)
            .count();
        report.trials_completed += completed;
        report.trials_lost +=
            options.sweep.max_trials as usize - completed.min(options.sweep.max_trials as usize);
        report.problems.extend(
            sweep_problems(&view, &spec)
                .into_iter()
                .map(|p| format!("{id}: {p}")),
        );
    }
    report.faults = faults;
    report.elapsed = started.elapsed();
    report
}

async fn try_submit(cluster: &TestCluster, name: &str, spec: &str) -> Result<String, String> {
    let path = crate::sweeps::write_spec(cluster, name, spec);
    sweeps::submit(
        &client(cluster),
        ringleader_coordinator::sweep::SweepKind::Sweep,
        &path,
    )
    .await
    .map_err(|e| e.to_string())
}

/// Restarts members whose downtime is over (all of them with `now`).
fn bring_back(cluster: &mut TestCluster, down: &mut Downtime, all: bool) {
    let now = Instant::now();
    let exited: Vec<(String, Duration)> = down
        .draining
        .iter()
        .filter(|(id, _)| {
            let index = cluster.worker_index(id);
            !cluster.cluster.workers()[index].process.is_running()
        })
        .map(|(id, d)| (id.clone(), *d))
        .collect();
    for (id, delay) in exited {
        down.draining.remove(&id);
        down.workers.insert(id, now + delay);
    }
    if all {
        // A draining worker that has not exited yet is restarted too
        // (restart_worker kills what is left of it).
        for id in std::mem::take(&mut down.draining).into_keys() {
            down.workers.insert(id, now);
        }
    }
    let due: Vec<String> = down
        .workers
        .iter()
        .filter(|(_, at)| all || **at <= now)
        .map(|(id, _)| id.clone())
        .collect();
    for id in due {
        down.workers.remove(&id);
        cluster.restart_worker(&id);
    }
    // A coordinator started while etcd was frozen or restarting exits at
    // once (it fails fast when etcd does not answer); like a Deployment's
    // restart policy, start it again.
    let coordinators = cluster.cluster.coordinators().len();
    for index in 0..coordinators {
        let exited = !cluster.cluster.coordinators()[index].process.is_running();
        if exited && !down.coordinators.contains_key(&index) {
            down.coordinators.insert(index, now);
        }
    }
    let due: Vec<usize> = down
        .coordinators
        .iter()
        .filter(|(_, at)| all || **at <= now)
        .map(|(i, _)| *i)
        .collect();
    for index in due {
        down.coordinators.remove(&index);
        cluster
            .cluster
            .restart_coordinator(index)
            .expect("coordinator restarts");
    }
}

/// A fault that the cluster can take now: enough workers stay up for a
/// gang, and a coordinator stays up.
fn pick(
    rng: &mut ChaCha8Rng,
    cluster: &mut TestCluster,
    down: &Downtime,
    options: &ChaosOptions,
) -> FaultKind {
    let workers_up = cluster
        .cluster
        .workers()
        .iter_mut()
        .filter_map(|w| w.process.is_running().then_some(()))
        .count()
        - down.draining.len();
    let coordinators_down = down.coordinators.len();
    loop {
        let kind = match rng.random_range(0..100) {
            0..35 => FaultKind::WorkerKill,
            35..50 => FaultKind::WorkerTerm,
            50..75 => FaultKind::LeaderKill,
            75..92 => FaultKind::EtcdPause,
            _ => FaultKind::EtcdRestart,
        };
        let ok = match kind {
            FaultKind::WorkerKill | FaultKind::WorkerTerm => {
                workers_up > options.sweep.workers_per_trial as usize
            }
            FaultKind::LeaderKill => coordinators_down + 1 < options.coordinators,
            FaultKind::EtcdPause | FaultKind::EtcdRestart => true,
        };
        if ok {
            return kind;
        }
    }
}

async fn inject(
    kind: FaultKind,
    rng: &mut ChaCha8Rng,
    cluster: &mut TestCluster,
    down: &mut Downtime,
    sweep: &str,
) -> (String, Option<Duration>) {
    let args = client(cluster);
    match kind {
        FaultKind::WorkerKill | FaultKind::WorkerTerm => {
            let (id, running) = choose_worker(rng, cluster, down).await;
            let index = cluster.worker_index(&id);
            let hit = Instant::now();
            let process = &mut cluster.cluster.workers()[index].process;
            let downtime = Duration::from_millis(rng.random_range(500..3000));
            if kind == FaultKind::WorkerKill {
                process.kill();
                down.workers.insert(id.clone(), hit + downtime);
            } else {
                process.signal(libc::SIGTERM);
                down.draining.insert(id.clone(), downtime);
            }
            let detail = match &running {
                Some(a) => format!("{id} (trial {} attempt {})", a.trial, a.attempt),
                None => format!("{id} (idle)"),
            };
            let recovery = match running {
                Some(a) => runs_again(&args, &a, hit).await,
                None => None,
            };
            (detail, recovery)
        }
        FaultKind::LeaderKill => {
            let leaders = cluster.claimed_leaders().await;
            let Some(leader) = leaders.first().cloned() else {
                return ("no leader to kill".into(), None);
            };
            let index = cluster
                .cluster
                .coordinator_addresses()
                .iter()
                .position(|a| *a == leader)
                .expect("a coordinator of ours");
            let hit = Instant::now();
            cluster.cluster.coordinators()[index].process.kill();
            down.coordinators.insert(
                index,
                hit + Duration::from_millis(rng.random_range(500..3000)),
            );
            let recovery = served(&args, sweep, hit).await;
            (format!("coordinator {index} ({leader})"), recovery)
        }
        FaultKind::EtcdPause => {
            let hold = LEASE_TTL + Duration::from_millis(rng.random_range(500..2000));
            cluster
                .etcd()
                .process()
                .freeze(Duration::from_secs(10))
                .expect("etcd stops");
            // The fault itself: etcd stays frozen for `hold`.
            tokio::time::sleep(hold).await;
            cluster.etcd().process().signal(libc::SIGCONT);
            let resumed = Instant::now();
            let recovery = served(&args, sweep, resumed).await;
            (format!("frozen {:.1} s", hold.as_secs_f64()), recovery)
        }
        FaultKind::EtcdRestart => {
            let hit = Instant::now();
            cluster.etcd().process().kill();
            cluster.must_restart_etcd().await;
            let recovery = served(&args, sweep, hit).await;
            ("same data dir".into(), recovery)
        }
    }
}

/// A live worker, preferably a busy one as the leader reports it, and
/// the attempt it runs.
async fn choose_worker(
    rng: &mut ChaCha8Rng,
    cluster: &mut TestCluster,
    down: &Downtime,
) -> (String, Option<AttemptRef>) {
    let mut up: Vec<String> = Vec::new();
    for w in cluster.cluster.workers().iter_mut() {
        if w.process.is_running() && !down.draining.contains_key(&w.id) {
            up.push(w.id.clone());
        }
    }
    let busy: Vec<(String, AttemptRef)> = match cluster.cluster.status(Duration::from_secs(2)).await
    {
        Ok(status) => status
            .workers
            .into_iter()
            .filter(|w| worker_state(w) == WorkerState::Busy && up.contains(&w.worker_id))
            .filter_map(|w| w.running.map(|r| (w.worker_id, r)))
            .collect(),
        Err(_) => Vec::new(),
    };
    if busy.is_empty() {
        let id = up[rng.random_range(0..up.len())].clone();
        (id, None)
    } else {
        let (id, attempt) = busy[rng.random_range(0..busy.len())].clone();
        (id, Some(attempt))
    }
}

/// Time from `since` until `attempt`'s trial has a later attempt live or
/// has finished; `None` if that takes over a minute.
async fn runs_again(
    args: &ringleader_coordinator::client::Connection,
    attempt: &AttemptRef,
    since: Instant,
) -> Option<Duration> {
    let deadline = since + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(view) = sweeps::get(args, &attempt.sweep_id).await {
            if let Some(t) = view.trials.iter().find(|t| t.number == attempt.trial) {
                let later_live = t
                    .attempts
                    .last()
                    .is_some_and(|a| a.number > attempt.attempt && a.is_live());
                if later_live || t.state.is_terminal() {
                    return Some(since.elapsed());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Time from `since` until a leader serves `sweep` (its state loaded).
async fn served(
    args: &ringleader_coordinator::client::Connection,
    sweep: &str,
    since: Instant,
) -> Option<Duration> {
    let deadline = since + Duration::from_secs(60);
    let args = ringleader_coordinator::client::Connection {
        timeout: Duration::from_secs(1),
        ..args.clone()
    };
    while Instant::now() < deadline {
        if sweeps::get(&args, sweep).await.is_ok() {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}
