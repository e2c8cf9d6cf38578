//! Sweep helpers shared by the integration tests and the chaos benchmark:
//! submit and wait, the checks every finished sweep must pass, and the
//! fault-free result a synthetic sweep must reproduce.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ringleader_coordinator::client::Connection;
use ringleader_coordinator::sweep::client::{self as sweeps, SweepView};
use ringleader_coordinator::sweep::driver::Driver;
use ringleader_coordinator::sweep::records::AttemptOutcome;
use ringleader_coordinator::sweep::{SweepKind, SweepState, Template, TrialState};
use ringleader_proto::coordinator::{WorkerInfo, WorkerState};
use serde_json::Value;

use crate::{wait_until, TestCluster};

/// A connection to every coordinator of `cluster`, as its admin.
pub fn client(cluster: &TestCluster) -> Connection {
    cluster.connection(Duration::from_secs(5))
}

/// Writes a spec file into the test's directory.
pub fn write_spec(cluster: &TestCluster, name: &str, text: &str) -> PathBuf {
    let path = cluster.dir().join(name);
    std::fs::write(&path, text).expect("write spec");
    path
}

/// Submits the sweep `text` (written to `name`); returns its id.
pub async fn must_submit(cluster: &TestCluster, name: &str, text: &str) -> String {
    let spec = write_spec(cluster, name, text);
    sweeps::submit(&client(cluster), SweepKind::Sweep, &spec)
        .await
        .unwrap_or_else(|e| panic!("submit {name}: {e}"))
}

/// Waits until sweep `id` has finished; returns it.
pub async fn must_finish_sweep(args: &Connection, id: &str, timeout: Duration) -> SweepView {
    wait_until(&format!("{id} to finish"), timeout, || async {
        match sweeps::get(args, id).await {
            Ok(view) if view.record.state.is_terminal() => Ok(view),
            Ok(view) => Err(format!(
                "{} trials, state {:?}",
                view.trials.len(),
                view.record.state
            )),
            Err(error) => Err(error.to_string()),
        }
    })
    .await
}

/// Waits until `probe` accepts the sweep as the leader reports it.
pub async fn wait_for_sweep<T>(
    args: &Connection,
    id: &str,
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut(&SweepView) -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match sweeps::get(args, id).await {
            Ok(view) => match probe(&view) {
                Ok(value) => return value,
                Err(last) => last,
            },
            Err(error) => error.to_string(),
        };
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A synthetic Branin sweep: `searcher` is "random" (seeded) or "grid";
/// `workers_per_trial` workers per trial, every epoch `epoch_ms` long.
#[derive(Clone, Debug)]
pub struct BraninSweep {
    pub searcher: &'static str,
    pub max_trials: u32,
    pub workers_per_trial: u32,
    pub max_concurrent: u32,
    pub max_epochs: u32,
    pub max_failures: u32,
    pub epoch_ms: u32,
}

impl BraninSweep {
    /// ASHA over `max_trials` instant trials (up to 9 epochs), two at a
    /// time on one worker each: a finished sweep with stopped trials and
    /// learning curves, in seconds.
    pub fn instant_asha(max_trials: u32) -> Self {
        Self {
            searcher: "asha",
            max_trials,
            workers_per_trial: 1,
            max_concurrent: 2,
            max_epochs: 9,
            max_failures: 1,
            epoch_ms: 0,
        }
    }

    pub fn spec(&self) -> String {
        let Self {
            searcher,
            max_trials,
            workers_per_trial,
            max_concurrent,
            max_epochs,
            max_failures,
            epoch_ms,
        } = self;
        format!(
            r#"
[sweep]
name = "branin-{searcher}"
searcher = "{searcher}"
seed = 3
max_trials = {max_trials}
max_concurrent_trials = {max_concurrent}
workers_per_trial = {workers_per_trial}
max_epochs = {max_epochs}
max_failures = {max_failures}
objective = {{ metric = "objective", mode = "min" }}

[sweep.params]
"model.x1" = {{ kind = "uniform", low = -5.0, high = 10.0 }}
"model.x2" = {{ kind = "uniform", low = 0.0, high = 15.0 }}

[job]
name = "branin"

[job.model]
kind = "synthetic"
function = "branin"
epoch_ms = {epoch_ms}
"#
        )
    }
}

/// The synthetic model's objective after `epoch` epochs of the trial's job.
pub fn synthetic_objective(
    template: &Template,
    config: &BTreeMap<String, Value>,
    epoch: u32,
) -> f64 {
    let job = template.job(config).expect("trial job builds");
    job.model
        .synthetic_objective(epoch)
        .expect("a synthetic job")
}

/// What a fault-free run of a synthetic sweep gives: each trial's config
/// and final objective, by trial number. Computed with the leader's own
/// pure driver, every attempt succeeding at once.
pub fn fault_free(spec: &str) -> BTreeMap<u64, (BTreeMap<String, Value>, f64)> {
    let template = Template::parse(SweepKind::Sweep, spec, "fault-free.toml").expect("spec parses");
    let mut driver = Driver::new(template.driver_config("fault-free")).expect("driver");
    let mut now = 0;
    while let Some(work) = driver.next_work() {
        now += 1;
        let attempt = driver.start(&work, now, vec!["w".into()], now);
        let config = driver.trial(work.trial).expect("started").config.clone();
        for epoch in work.start_epoch + 1..=work.stop_epoch {
            let objective = synthetic_objective(&template, &config, epoch);
            driver.epoch(
                work.trial,
                attempt.number,
                epoch,
                BTreeMap::from([("objective".to_string(), objective)]),
                Some(format!("epoch-{epoch}")),
            );
        }
        driver.finished(
            work.trial,
            attempt.number,
            AttemptOutcome::Done,
            work.stop_epoch,
            None,
            now,
        );
    }
    driver
        .trials()
        .values()
        .map(|t| {
            (
                t.number,
                (t.config.clone(), t.objective.expect("every trial reported")),
            )
        })
        .collect()
}

/// Most attempts live at one moment, from their recorded start/end times.
pub fn peak_concurrency(view: &SweepView) -> usize {
    let mut events = Vec::new();
    for t in &view.trials {
        for a in &t.attempts {
            let end = a.ended_unix_ms.expect("every attempt ended");
            events.push((a.started_unix_ms, 1i64));
            events.push((end, -1));
        }
    }
    // Ends before starts at the same millisecond: a worker freed by one
    // report is reused for the next start.
    events.sort();
    let (mut live, mut peak) = (0i64, 0i64);
    for (_, delta) in events {
        live += delta;
        peak = peak.max(live);
    }
    peak as usize
}

/// Pairs of attempts of one trial that were live at the same time (each
/// attempt must start after the previous one ended), plus attempts still
/// live in a finished sweep.
pub fn overlapping_attempts(view: &SweepView) -> Vec<String> {
    let mut found = Vec::new();
    for t in &view.trials {
        for pair in t.attempts.windows(2) {
            match pair[0].ended_unix_ms {
                Some(ended) if pair[1].started_unix_ms >= ended => {}
                _ => found.push(format!(
                    "trial {} attempt {} started before attempt {} ended",
                    t.number, pair[1].number, pair[0].number
                )),
            }
        }
        if view.record.state.is_terminal() {
            for a in t.attempts.iter().filter(|a| a.is_live()) {
                found.push(format!(
                    "trial {} attempt {} is still live in a finished sweep",
                    t.number, a.number
                ));
            }
        }
    }
    found
}

/// No trial ever had two attempts live at once.
pub fn assert_attempts_disjoint(view: &SweepView) {
    let overlaps = overlapping_attempts(view);
    assert!(overlaps.is_empty(), "{overlaps:?}");
}

/// Everything wrong with a finished synthetic sweep compared with its
/// fault-free run: missing or unfinished trials, a trial finished twice or
/// with an epoch missing, over-used retries, overlapping attempts, a
/// different configuration, objective or best result.
pub fn sweep_problems(view: &SweepView, spec: &str) -> Vec<String> {
    let expected = fault_free(spec);
    let template = Template::parse(SweepKind::Sweep, spec, "check.toml").expect("spec parses");
    let config = template.driver_config(&view.record.id);
    let mut problems = Vec::new();
    if view.record.state != SweepState::Completed {
        problems.push(format!("sweep state {:?}", view.record.state));
    }
    let numbers: Vec<u64> = view.trials.iter().map(|t| t.number).collect();
    let wanted: Vec<u64> = expected.keys().copied().collect();
    if numbers != wanted {
        problems.push(format!("trials {numbers:?}, expected {wanted:?}"));
    }
    for t in &view.trials {
        let name = format!("trial {}", t.number);
        if t.state != TrialState::Completed {
            problems.push(format!("{name}: {:?} ({:?})", t.state, t.error));
            continue;
        }
        let done: Vec<_> = t
            .attempts
            .iter()
            .filter(|a| {
                a.outcome == Some(AttemptOutcome::Done) && a.stop_epoch == config.max_epochs
            })
            .collect();
        if done.len() != 1 {
            problems.push(format!("{name}: completed by {} attempts", done.len()));
        }
        let epochs: Vec<u32> = t.metrics.iter().map(|m| m.epoch).collect();
        if epochs != (1..=config.max_epochs).collect::<Vec<_>>() {
            problems.push(format!("{name}: metrics for epochs {epochs:?}"));
        }
        if t.failures > config.max_failures {
            problems.push(format!("{name}: {} failures", t.failures));
        }
        match expected.get(&t.number) {
            Some((want_config, want)) => {
                if &t.config != want_config {
                    problems.push(format!(
                        "{name}: config {:?}, expected {want_config:?}",
                        t.config
                    ));
                }
                match t.objective {
                    Some(got) if (got - want).abs() <= 1e-9 * want.abs().max(1.0) => {}
                    got => problems.push(format!("{name}: objective {got:?}, expected {want}")),
                }
            }
            None => problems.push(format!("{name}: not in the fault-free run")),
        }
    }
    problems.extend(overlapping_attempts(view));
    let best = view.best().and_then(|t| t.objective);
    let want_best = expected
        .values()
        .map(|(_, o)| *o)
        .fold(f64::INFINITY, f64::min);
    if best.is_none_or(|b| (b - want_best).abs() > 1e-9 * want_best.abs().max(1.0)) {
        problems.push(format!("best {best:?}, fault-free best {want_best}"));
    }
    problems
}

/// A worker's state as the leader reports it.
pub fn worker_state(worker: &WorkerInfo) -> WorkerState {
    WorkerState::try_from(worker.state).unwrap_or_default()
}
