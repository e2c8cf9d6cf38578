//! Running the leader's assignments: one attempt at a time, as one rank of
//! a gang. Builds the ring for the attempt's generation, trains on a
//! blocking thread, reports each epoch (rank 0) and the end (every rank).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use ringleader_collective::{CollectiveService, Ring, RingOptions, RingPlan, RingSecret};
use ringleader_proto::coordinator::{
    worker_message, Assignment, AttemptOutcome, AttemptRef, EpochReport as EpochMessage,
    TrialFinished, WorkerMessage,
};
use ringleader_spec::JobSpec;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::confine::Confinement;
use crate::device;
use crate::lineage;
use crate::train::{self, Control, Segment};

/// What every attempt on this worker shares.
#[derive(Clone)]
pub struct TrialContext {
    pub collectives: CollectiveService,
    pub ring_options: RingOptions,
    /// The device this worker trains on unless a job names another.
    pub device: tch::Device,
    /// CUDA devices libtorch sees on this machine.
    pub cuda_devices: usize,
    /// Threads for jobs that leave `threads` at 0 (0: libtorch's default).
    pub threads: u32,
    /// Where attempts may read data sets and TorchScript modules, and
    /// write checkpoints (`--data-root`, `--checkpoint-root`). An attempt
    /// whose job or checkpoint directory points elsewhere fails, saying so.
    pub confinement: Confinement,
    /// This machine's id when the worker serves a Unix socket for ring
    /// partners on the same machine (`--ring-unix-socket`), else `None`.
    pub machine_id: Option<String>,
}

struct Running {
    attempt: AttemptRef,
    stop: CancellationToken,
}

/// The worker's attempts: at most one running, plus the last one finished
/// (repeated to a new leader until it assigns something else).
#[derive(Clone)]
pub struct Trials {
    context: TrialContext,
    running: Arc<Mutex<Option<Running>>>,
    last_finished: Arc<Mutex<Option<TrialFinished>>>,
    /// Reports for the leader; the agent forwards them on whichever
    /// session is up.
    reports: mpsc::UnboundedSender<WorkerMessage>,
    /// True while nothing runs.
    idle: Arc<watch::Sender<bool>>,
    /// Every report since the latest assignment started (its epochs, its
    /// end, refusals), replayed to each new leader: one that took over
    /// mid-attempt may never have stored the epochs sent to its
    /// predecessor.
    history: Arc<Mutex<Vec<WorkerMessage>>>,
    /// Set on graceful shutdown: new assignments are handed back.
    draining: Arc<std::sync::atomic::AtomicBool>,
}

impl Trials {
    pub fn new(context: TrialContext) -> (Self, mpsc::UnboundedReceiver<WorkerMessage>) {
        let (reports, rx) = mpsc::unbounded_channel();
        let trials = Self {
            context,
            running: Arc::default(),
            last_finished: Arc::default(),
            reports,
            idle: Arc::new(watch::channel(true).0),
            draining: Arc::default(),
            history: Arc::default(),
        };
        (trials, rx)
    }

    fn running(&self) -> MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn last(&self) -> MutexGuard<'_, Option<TrialFinished>> {
        self.last_finished.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The attempt running now, for a re-registration.
    pub fn current(&self) -> Option<AttemptRef> {
        self.running().as_ref().map(|r| r.attempt.clone())
    }

    pub fn last_finished(&self) -> Option<TrialFinished> {
        self.last().clone()
    }

    /// Starts an assignment. A worker runs one attempt at a time: a second
    /// one while busy is refused with a failure report naming the first.
    pub fn start(&self, assignment: Assignment) {
        let Some(attempt) = assignment.attempt.clone() else {
            warn!("assignment without an attempt; ignored");
            return;
        };
        let stop = CancellationToken::new();
        {
            let mut running = self.running();
            // Checked under the lock `drain` takes: nothing starts after it.
            if self.draining.load(std::sync::atomic::Ordering::SeqCst) {
                // Not the trial's fault: abandoned, so it moves elsewhere
                // without counting as a failure.
                self.report(worker_message::Kind::Finished(finished(
                    &attempt,
                    AttemptOutcome::Abandoned,
                    assignment.start_epoch,
                    None,
                    "the worker is shutting down".into(),
                )));
                return;
            }
            if let Some(busy) = running.as_ref() {
                let error = format!(
                    "worker is busy with {} trial {} attempt {}",
                    busy.attempt.sweep_id, busy.attempt.trial, busy.attempt.attempt
                );
                self.report(worker_message::Kind::Finished(finished(
                    &attempt,
                    AttemptOutcome::Failed,
                    0,
                    None,
                    error,
                )));
                return;
            }
            *running = Some(Running {
                attempt: attempt.clone(),
                stop: stop.clone(),
            });
        }
        *self.last() = None;
        // The leader assigns work only once it has heard how the previous
        // attempt ended, so its reports need no replay any more.
        self.history().clear();
        self.idle.send_replace(false);
        let trials = self.clone();
        tokio::spawn(async move {
            let report = run_attempt(&trials, &assignment, &attempt, stop).await;
            info!(sweep = %attempt.sweep_id, trial = attempt.trial, attempt = attempt.attempt, outcome = ?report.outcome(), error = %report.error, "attempt finished");
            *trials.last() = Some(report.clone());
            *trials.running() = None;
            trials.report(worker_message::Kind::Finished(report));
            trials.idle.send_replace(true);
        });
    }

    /// Asks `attempt` to stop (it checkpoints at the end of its epoch).
    pub fn stop(&self, attempt: &AttemptRef) {
        if let Some(running) = self.running().as_ref().filter(|r| &r.attempt == attempt) {
            running.stop.cancel();
        }
    }

    /// Graceful shutdown: stops whatever runs (it checkpoints at the end of
    /// its epoch) and hands back any later assignment unstarted.
    pub fn drain(&self) {
        let running = self.running();
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(running) = running.as_ref() {
            running.stop.cancel();
        }
    }

    /// Waits until no attempt runs (its final report is queued by then).
    pub async fn until_idle(&self) {
        let mut idle = self.idle.subscribe();
        let _ = idle.wait_for(|idle| *idle).await;
    }

    fn history(&self) -> MutexGuard<'_, Vec<WorkerMessage>> {
        self.history.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn report(&self, message: worker_message::Kind) {
        let message = WorkerMessage {
            kind: Some(message),
        };
        let mut history = self.history();
        history.push(message.clone());
        let _ = self.reports.send(message);
    }

    /// For a new session: the reports to send after `Register`, in order.
    /// Reports still queued for the old session are dropped from `queue`
    /// (the replay holds them), so none arrives twice out of order.
    pub fn replay(&self, queue: &mut mpsc::UnboundedReceiver<WorkerMessage>) -> Vec<WorkerMessage> {
        let history = self.history();
        while queue.try_recv().is_ok() {}
        history.clone()
    }
}

fn finished(
    attempt: &AttemptRef,
    outcome: AttemptOutcome,
    epochs_done: u32,
    checkpoint: Option<PathBuf>,
    error: String,
) -> TrialFinished {
    TrialFinished {
        attempt: Some(attempt.clone()),
        outcome: outcome as i32,
        epochs_done,
        checkpoint: checkpoint
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        error,
        lineage: None,
    }
}

/// How a segment that returned ended: done (every assigned epoch),
/// abandoned (stopped early on request), diverged or early stopped. A
/// diverged trial ends without retries: its report carries the epoch it
/// diverged at (what a person wants to see), the newest checkpoint if any,
/// and the error `loss is NaN at epoch 2`. An early-stopped one carries
/// the epoch it stopped after, its checkpoint and the reason.
fn segment_end(
    done: train::SegmentOutcome,
    stop_epoch: u32,
) -> (AttemptOutcome, u32, Option<PathBuf>, String) {
    if let Some(diverged) = done.diverged {
        return (
            AttemptOutcome::Diverged,
            done.last_epoch,
            done.checkpoint,
            diverged.to_string(),
        );
    }
    if let Some(stopped) = done.early_stopped {
        return (
            AttemptOutcome::EarlyStopped,
            done.last_epoch,
            done.checkpoint,
            stopped.to_string(),
        );
    }
    let outcome = if done.last_epoch >= stop_epoch {
        AttemptOutcome::Done
    } else {
        AttemptOutcome::Abandoned
    };
    (outcome, done.last_epoch, done.checkpoint, String::new())
}

/// Runs one attempt to its end; the report says how it ended.
async fn run_attempt(
    trials: &Trials,
    assignment: &Assignment,
    attempt: &AttemptRef,
    stop: CancellationToken,
) -> TrialFinished {
    let start = assignment.start_epoch;
    let fail = |error: String| finished(attempt, AttemptOutcome::Failed, start, None, error);
    let mut spec: JobSpec = match serde_json::from_str(&assignment.job_json) {
        Ok(spec) => spec,
        Err(error) => return fail(format!("the assignment's job does not parse: {error}")),
    };
    if spec.threads == 0 {
        spec.threads = trials.context.threads;
    }
    // Hashed beside training, not before it: a large data set would keep
    // this rank's ring partners waiting.
    let started_unix_ms = lineage::unix_ms();
    let digests = {
        let (spec, roots) = (spec.clone(), trials.context.confinement.data.clone());
        tokio::task::spawn_blocking(move || lineage::digests(&spec, &roots))
    };
    let seed = spec.seed;
    let device = match device::for_job(
        &spec.device,
        trials.context.device,
        trials.context.cuda_devices,
    ) {
        Ok(device) => device,
        Err(error) => return fail(format!("job device: {error}")),
    };
    let secret = match RingSecret::new(assignment.ring_secret.clone()) {
        Ok(secret) => secret,
        Err(error) => return fail(format!("the assignment's ring secret: {error}")),
    };
    let plan = RingPlan {
        generation: assignment.generation,
        rank: assignment.rank as usize,
        successor_socket: successor_socket(assignment, trials.context.machine_id.as_deref()),
        peers: assignment.peers.clone(),
        secret,
    };
    let mut ring = match Ring::connect(
        &trials.context.collectives,
        plan,
        trials.context.ring_options.clone(),
    )
    .await
    {
        Ok(ring) => ring,
        Err(error) => return fail(format!("forming the ring: {error}")),
    };
    let segment = Segment {
        spec,
        rank: assignment.rank as usize,
        world: assignment.peers.len(),
        start_epoch: start,
        stop_epoch: assignment.stop_epoch,
        checkpoint_dir: PathBuf::from(&assignment.checkpoint_dir),
        device,
        confinement: trials.context.confinement.clone(),
    };
    let runtime = tokio::runtime::Handle::current();
    let reports = trials.clone();
    let reference = attempt.clone();
    let stopping = stop.clone();
    let trained = tokio::task::spawn_blocking(move || {
        let global_batch = f64::from(segment.spec.batch_size) * segment.world as f64;
        let result = train::run_segment(&segment, &mut ring, &runtime, &mut |epoch| {
            crate::metrics::worker().epoch_done(&epoch.metrics, global_batch);
            if segment.rank == 0 {
                reports.report(worker_message::Kind::Epoch(EpochMessage {
                    attempt: Some(reference.clone()),
                    epoch: epoch.epoch,
                    metrics: epoch.metrics.clone().into_iter().collect(),
                    checkpoint: epoch
                        .checkpoint
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                }));
            }
            if stopping.is_cancelled() {
                Control::Stop
            } else {
                Control::Continue
            }
        });
        let _ = runtime.block_on(ring.close());
        result
    })
    .await;
    let (outcome, epochs, checkpoint, error) = match trained {
        Ok(Ok(done)) => segment_end(done, assignment.stop_epoch),
        Ok(Err(error)) if stop.is_cancelled() => {
            (AttemptOutcome::Abandoned, start, None, error.to_string())
        }
        Ok(Err(error)) => (AttemptOutcome::Failed, start, None, error.to_string()),
        Err(panic) => (
            AttemptOutcome::Failed,
            start,
            None,
            format!("training panicked: {panic}"),
        ),
    };
    let digests = digests.await.unwrap_or_default();
    TrialFinished {
        lineage: Some(lineage::report(
            seed,
            &assignment.job_json,
            digests,
            started_unix_ms,
            lineage::unix_ms(),
        )),
        ..finished(attempt, outcome, epochs, checkpoint, error)
    }
}

/// The successor's Unix socket if it registered one on this machine.
fn successor_socket(assignment: &Assignment, machine_id: Option<&str>) -> Option<PathBuf> {
    let world = assignment.peers.len();
    let successor = (assignment.rank as usize + 1) % world.max(1);
    let ours = machine_id?;
    let theirs = assignment.machine_ids.get(successor)?;
    let socket = assignment.local_peers.get(successor)?;
    (theirs == ours && !socket.is_empty()).then(|| PathBuf::from(socket))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::train::{Divergence, SegmentOutcome};

    fn outcome(last_epoch: u32, diverged: Option<Divergence>) -> SegmentOutcome {
        SegmentOutcome {
            last_epoch,
            metrics: BTreeMap::new(),
            checkpoint: Some(PathBuf::from("epoch-00001.ot")),
            diverged,
            early_stopped: None,
        }
    }

    #[test]
    fn an_early_stopped_segment_ends_as_early_stopped_with_its_reason() {
        let stopped = ringleader_spec::stopping::EarlyStop {
            epoch: 3,
            metric: "val_loss".into(),
            min_delta: 0.0,
            patience: 1,
            best: Some(0.25),
            best_epoch: 2,
        };
        let mut done = outcome(3, None);
        done.early_stopped = Some(stopped);
        let (result, epochs, checkpoint, reason) = segment_end(done, 5);
        assert_eq!(result, AttemptOutcome::EarlyStopped);
        assert_eq!(epochs, 3);
        assert_eq!(checkpoint, Some(PathBuf::from("epoch-00001.ot")));
        assert_eq!(
            reason,
            "early stopped at epoch 3: val_loss did not improve by 0 for 1 epoch \
             (best 0.2500 at epoch 2)"
        );
    }

    #[test]
    fn a_diverged_segment_ends_as_diverged_with_where_it_happened() {
        let diverged = Divergence {
            metric: "train_loss".into(),
            value: f64::NAN,
            epoch: 2,
        };
        let (result, epochs, checkpoint, error) = segment_end(outcome(2, Some(diverged)), 5);
        assert_eq!(result, AttemptOutcome::Diverged);
        assert_eq!(epochs, 2);
        assert_eq!(checkpoint, Some(PathBuf::from("epoch-00001.ot")));
        assert_eq!(error, "loss is NaN at epoch 2");
        let infinite = Divergence {
            metric: "test_loss".into(),
            value: f64::NEG_INFINITY,
            epoch: 3,
        };
        assert_eq!(
            segment_end(outcome(3, Some(infinite)), 3).3,
            "test loss is -inf at epoch 3"
        );
    }

    #[test]
    fn a_finished_segment_is_done_and_an_early_one_abandoned() {
        assert_eq!(segment_end(outcome(5, None), 5).0, AttemptOutcome::Done);
        assert_eq!(
            segment_end(outcome(3, None), 5).0,
            AttemptOutcome::Abandoned
        );
        assert_eq!(segment_end(outcome(3, None), 5).3, "");
    }
}
