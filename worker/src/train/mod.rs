//! Training: one run segment of a trial on this rank, data-parallel with
//! the other ranks of its ring.
//!
//! ```text
//!   run_segment ──▶ checkpoint dir under the checkpoint root, else refused
//!               ──▶ dataset::load (this rank's files, in memory)
//!                   → hold out validation (split) → normalise
//!               ──▶ Model::build (seeded) ──▶ restore checkpoint (resume)
//!               ──▶ broadcast rank 0's tensors
//!               ──▶ per epoch: train (ddp) → average BN stats
//!                   → evaluate validation and test (metrics, all ranks' counts)
//!                   → checkpoint when due (rank 0 writes, barrier)
//!                   → on_epoch → Continue | Stop (agreed by all ranks)
//!                   → a NaN/infinite loss with on_divergence = "stop":
//!                     every rank returns `diverged` (same metrics, same call)
//!                   → early_stopping: `patience` epochs without improvement
//!                     → checkpoint, every rank returns `early_stopped`
//! ```
//!
//! A synthetic model skips all of it: it sleeps and reports its test
//! function's value, so sweeps can be exercised without data.

mod augment;
mod balance;
mod checkpoint;
pub mod dataset;
mod ddp;
mod error;
pub mod export;
mod metrics;
mod model;
mod optim;
pub mod prepare;
mod split;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ringleader_collective::Ring;
use ringleader_spec::job::{ModelSpec, OnDivergence};
use ringleader_spec::stopping::{EarlyStop, Plateau};
use ringleader_spec::JobSpec;

use crate::confine::Confinement;
use checkpoint::Durability;
pub use checkpoint::Sidecar;
pub use error::{CsvRole, Found, Position, TrainError};

/// What one call of [`run_segment`] trains.
#[derive(Clone, Debug)]
pub struct Segment {
    pub spec: JobSpec,
    pub rank: usize,
    pub world: usize,
    /// Epochs already done: 0 = start fresh, otherwise resume from the
    /// checkpoint written after that epoch.
    pub start_epoch: u32,
    /// Train epochs start_epoch+1 ..= stop_epoch (stop_epoch <= spec.epochs).
    pub stop_epoch: u32,
    /// This trial's checkpoint directory (shared by all ranks; rank 0 writes).
    /// It must lie under `confinement.checkpoints`.
    pub checkpoint_dir: PathBuf,
    pub device: tch::Device,
    /// Where this worker may read data and TorchScript modules, and write
    /// checkpoints.
    pub confinement: Confinement,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EpochReport {
    pub epoch: u32,
    pub metrics: BTreeMap<String, f64>,
    /// The checkpoint written after this epoch, if one was due.
    pub checkpoint: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Continue,
    Stop,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SegmentOutcome {
    /// The last epoch trained (start_epoch when none was).
    pub last_epoch: u32,
    /// Its metrics (empty when no epoch was trained).
    pub metrics: BTreeMap<String, f64>,
    /// The newest checkpoint this segment wrote.
    pub checkpoint: Option<PathBuf>,
    /// Set when the segment stopped because a loss turned non-finite and
    /// the job's `on_divergence` is `stop`: then `last_epoch` is that epoch.
    pub diverged: Option<Divergence>,
    /// Set when the job's `early_stopping` rule ended training after
    /// `last_epoch` (checkpointed): the trial is finished.
    pub early_stopped: Option<EarlyStop>,
}

/// A loss that turned NaN or infinite after an epoch. Every rank sees the
/// same (all-reduced) metrics, so every rank finds the same divergence.
/// Displays as `loss is NaN at epoch 2` (`inf`, `-inf` likewise; the test
/// loss is `test loss`, the validation loss `validation loss`).
#[derive(Clone, Debug, PartialEq)]
pub struct Divergence {
    /// The metric that is not finite (`train_loss`, `val_loss` or `test_loss`).
    pub metric: String,
    pub value: f64,
    pub epoch: u32,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.metric.as_str() {
            "train_loss" => "loss",
            "val_loss" => "validation loss",
            "test_loss" => "test loss",
            other => other,
        };
        write!(f, "{what} is {} at epoch {}", self.value, self.epoch)
    }
}

/// The loss metrics checked for divergence, in the order they are named.
const LOSS_METRICS: [&str; 3] = ["train_loss", "val_loss", "test_loss"];

/// The first loss in `metrics` that is NaN or infinite.
pub fn divergence(epoch: u32, metrics: &BTreeMap<String, f64>) -> Option<Divergence> {
    LOSS_METRICS.iter().find_map(|&metric| {
        let value = *metrics.get(metric)?;
        (!value.is_finite()).then(|| Divergence {
            metric: metric.to_string(),
            value,
            epoch,
        })
    })
}

/// Trains `segment` on this rank. Blocking; call from a blocking thread.
/// Ring operations run via `runtime.block_on`. `on_epoch` sees every
/// epoch's metrics (the same on every rank); if any rank's callback returns
/// [`Control::Stop`], every rank checkpoints and returns. When a loss turns
/// NaN or infinite and the job's `on_divergence` is `stop`, every rank
/// returns right after `on_epoch` has seen that epoch, with
/// [`SegmentOutcome::diverged`] set (and no further checkpoint). When the
/// job's `early_stopping` rule fires, every rank checkpoints that epoch and
/// returns with [`SegmentOutcome::early_stopped`] set.
///
/// Files outside the segment's [`Confinement`] are neither read nor
/// written: such a data set, module or checkpoint directory fails the
/// segment with [`TrainError::Confined`].
pub fn run_segment(
    segment: &Segment,
    ring: &mut Ring,
    runtime: &tokio::runtime::Handle,
    on_epoch: &mut dyn FnMut(&EpochReport) -> Control,
) -> Result<SegmentOutcome, TrainError> {
    check(segment)?;
    // Checkpoints are written and read in the resolved directory, and
    // reported under the directory as assigned.
    let resolved = confined_checkpoint_dir(segment)?;
    let given = &segment.checkpoint_dir;
    let as_given = |path: PathBuf| as_given(path, &resolved, given);
    let segment = &Segment {
        checkpoint_dir: resolved.clone(),
        ..segment.clone()
    };
    let on_epoch = &mut |report: &EpochReport| {
        on_epoch(&EpochReport {
            checkpoint: report.checkpoint.clone().map(as_given),
            ..report.clone()
        })
    };
    let outcome = train_segment(segment, ring, runtime, on_epoch)?;
    Ok(SegmentOutcome {
        checkpoint: outcome.checkpoint.map(as_given),
        ..outcome
    })
}

/// `path` under `resolved`, renamed to lie under `given` instead.
fn as_given(path: PathBuf, resolved: &Path, given: &Path) -> PathBuf {
    match path.strip_prefix(resolved) {
        Ok(rest) => given.join(rest),
        Err(_) => path,
    }
}

/// The segment's checkpoint directory resolved under the checkpoint root;
/// refused otherwise. The job's own `checkpoint.dir`, when set, is checked
/// first, so that a refusal names what the user wrote.
fn confined_checkpoint_dir(segment: &Segment) -> Result<PathBuf, TrainError> {
    let roots = &segment.confinement.checkpoints;
    let field = match &segment.spec.checkpoint.dir {
        Some(dir) => {
            roots.resolve("checkpoint.dir", dir)?;
            "checkpoint.dir"
        }
        None => "checkpoint directory (the coordinator's --checkpoint-dir)",
    };
    Ok(roots.resolve(field, &segment.checkpoint_dir)?)
}

fn train_segment(
    segment: &Segment,
    ring: &mut Ring,
    runtime: &tokio::runtime::Handle,
    on_epoch: &mut dyn FnMut(&EpochReport) -> Control,
) -> Result<SegmentOutcome, TrainError> {
    if let ModelSpec::Synthetic { .. } = segment.spec.model {
        if segment.start_epoch > 0 {
            // Nothing to restore, but resuming needs its checkpoint as a real model does.
            checkpoint::load_sidecar(&segment.checkpoint_dir, segment.start_epoch)?;
        }
        return drive(segment, &mut Synthetic { segment }, on_epoch);
    }
    if ring.world() != segment.world || ring.rank() != segment.rank {
        return Err(TrainError::InvalidSegment(format!(
            "rank {} of {} on a ring where it is rank {} of {}",
            segment.rank,
            segment.world,
            ring.rank(),
            ring.world()
        )));
    }
    if segment.spec.threads > 0 {
        tch::set_num_threads(segment.spec.threads as i32);
    }
    let mut trainer = ddp::Trainer::new(segment, ring, runtime)?;
    drive(segment, &mut trainer, on_epoch)
}

fn check(segment: &Segment) -> Result<(), TrainError> {
    let (start, stop, epochs) = (segment.start_epoch, segment.stop_epoch, segment.spec.epochs);
    if start > stop || stop > epochs {
        return Err(TrainError::InvalidSegment(format!(
            "epochs {start}..={stop} of a {epochs}-epoch job"
        )));
    }
    if segment.rank >= segment.world {
        return Err(TrainError::InvalidSegment(format!(
            "rank {} in a world of {}",
            segment.rank, segment.world
        )));
    }
    Ok(())
}

/// What a segment does per epoch; [`drive`] owns the loop around it.
trait Epochs {
    fn epoch(&mut self, epoch: u32) -> Result<BTreeMap<String, f64>, TrainError>;
    /// Writes (rank 0) the checkpoint after `epoch`, with early stopping's
    /// standing after it; returns once it exists.
    fn checkpoint(
        &mut self,
        epoch: u32,
        metrics: &BTreeMap<String, f64>,
        plateau: Option<Plateau>,
    ) -> Result<PathBuf, TrainError>;
    /// Whether any rank wants to stop.
    fn agree_to_stop(&mut self, stop: bool) -> Result<bool, TrainError>;
}

fn drive(
    segment: &Segment,
    run: &mut dyn Epochs,
    on_epoch: &mut dyn FnMut(&EpochReport) -> Control,
) -> Result<SegmentOutcome, TrainError> {
    let interval = segment.spec.checkpoint.interval_epochs;
    let early_stopping = segment.spec.early_stopping.as_ref();
    // A resumed trial counts on from where its checkpoint left off, so it
    // stops at the same epoch as one never interrupted.
    let mut plateau = match early_stopping {
        Some(_) if segment.start_epoch > 0 => {
            checkpoint::load_sidecar(&segment.checkpoint_dir, segment.start_epoch)?
                .plateau
                .unwrap_or_default()
        }
        _ => Plateau::default(),
    };
    let mut outcome = SegmentOutcome {
        last_epoch: segment.start_epoch,
        metrics: BTreeMap::new(),
        checkpoint: None,
        diverged: None,
        early_stopped: None,
    };
    for epoch in segment.start_epoch + 1..=segment.stop_epoch {
        let metrics = run.epoch(epoch)?;
        let diverged = match segment.spec.on_divergence {
            OnDivergence::Stop => divergence(epoch, &metrics),
            OnDivergence::Continue => None,
        };
        // Every rank holds the same (all-reduced) metrics, so every rank
        // takes the same decision: no agreement needed.
        let early_stopped = early_stopping
            .filter(|_| diverged.is_none())
            .and_then(|rule| rule.observe(&mut plateau, epoch, metrics.get(&rule.metric).copied()));
        let due = epoch == segment.stop_epoch
            || (interval > 0 && epoch % interval == 0)
            || early_stopped.is_some();
        let checkpoint = if due {
            Some(run.checkpoint(epoch, &metrics, early_stopping.map(|_| plateau))?)
        } else {
            None
        };
        let report = EpochReport {
            epoch,
            metrics,
            checkpoint,
        };
        let asked_to_stop = on_epoch(&report) == Control::Stop;
        if diverged.is_some() || early_stopped.is_some() {
            // No checkpoint of diverged weights beyond one already due.
            return Ok(SegmentOutcome {
                last_epoch: epoch,
                metrics: report.metrics,
                checkpoint: report.checkpoint.or(outcome.checkpoint),
                diverged,
                early_stopped,
            });
        }
        let stop = run.agree_to_stop(asked_to_stop)?;
        let checkpoint = match report.checkpoint {
            None if stop => {
                Some(run.checkpoint(epoch, &report.metrics, early_stopping.map(|_| plateau))?)
            }
            written => written.or(outcome.checkpoint),
        };
        outcome = SegmentOutcome {
            last_epoch: epoch,
            metrics: report.metrics,
            checkpoint,
            diverged: None,
            early_stopped: None,
        };
        if stop {
            break;
        }
    }
    Ok(outcome)
}

/// libtorch's seed for `rank` in `epoch`: dropout and the like replay
/// exactly on resume. (SplitMix64 over the three inputs.)
pub(crate) fn epoch_seed(seed: u64, epoch: u32, rank: usize) -> u64 {
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let golden = 0x9e37_79b9_7f4a_7c15_u64;
    mix(mix(mix(seed.wrapping_add(golden)) ^ u64::from(epoch)) ^ rank as u64) >> 1
}

/// The synthetic "model": each epoch takes `epoch_ms` and reports
/// `objective = f(x) + (1 + |f(x)|)·2^−epoch`, which converges to f(x) from
/// above. No data, no ring traffic; the checkpoint is the sidecar alone.
struct Synthetic<'a> {
    segment: &'a Segment,
}

impl Epochs for Synthetic<'_> {
    fn epoch(&mut self, epoch: u32) -> Result<BTreeMap<String, f64>, TrainError> {
        let started = Instant::now();
        if let ModelSpec::Synthetic { epoch_ms, .. } = self.segment.spec.model {
            std::thread::sleep(Duration::from_millis(epoch_ms));
        }
        let objective = self
            .segment
            .spec
            .model
            .synthetic_objective(epoch)
            .expect("only built for synthetic models");
        Ok(BTreeMap::from([
            ("objective".to_string(), objective),
            ("epoch_seconds".to_string(), started.elapsed().as_secs_f64()),
        ]))
    }

    fn checkpoint(
        &mut self,
        epoch: u32,
        metrics: &BTreeMap<String, f64>,
        plateau: Option<Plateau>,
    ) -> Result<PathBuf, TrainError> {
        let dir = &self.segment.checkpoint_dir;
        if self.segment.rank != 0 {
            return Ok(checkpoint::sidecar_path(dir, epoch));
        }
        let seed = self.segment.spec.seed;
        let sidecar = Sidecar {
            epoch,
            step: u64::from(epoch),
            seed,
            rng_seed: epoch_seed(seed, epoch + 1, 0),
            world: self.segment.world,
            metrics: metrics.clone(),
            plateau,
            evaluations: BTreeMap::new(),
            input_shape: Vec::new(),
        };
        checkpoint::save(dir, &[], &sidecar, Durability::Cached)
    }

    fn agree_to_stop(&mut self, stop: bool) -> Result<bool, TrainError> {
        Ok(stop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reports `val_loss` from a script (epoch n → `losses[n - 1]`) and
    /// writes sidecar-only checkpoints, as the synthetic model does.
    struct Scripted<'a> {
        segment: &'a Segment,
        losses: &'a [f64],
        checkpoints: Vec<u32>,
    }

    impl Epochs for Scripted<'_> {
        fn epoch(&mut self, epoch: u32) -> Result<BTreeMap<String, f64>, TrainError> {
            let loss = self.losses[epoch as usize - 1];
            Ok(BTreeMap::from([("val_loss".to_string(), loss)]))
        }

        fn checkpoint(
            &mut self,
            epoch: u32,
            metrics: &BTreeMap<String, f64>,
            plateau: Option<Plateau>,
        ) -> Result<PathBuf, TrainError> {
            self.checkpoints.push(epoch);
            let sidecar = Sidecar {
                epoch,
                step: 0,
                seed: 0,
                rng_seed: 0,
                world: 1,
                metrics: metrics.clone(),
                plateau,
                evaluations: BTreeMap::new(),
                input_shape: Vec::new(),
            };
            checkpoint::save(
                &self.segment.checkpoint_dir,
                &[],
                &sidecar,
                Durability::Cached,
            )
        }

        fn agree_to_stop(&mut self, stop: bool) -> Result<bool, TrainError> {
            Ok(stop)
        }
    }

    fn scripted_segment(dir: &Path, start_epoch: u32, stop_epoch: u32) -> Segment {
        let spec: JobSpec = serde_json::from_value(serde_json::json!({
            "name": "scripted", "epochs": 12,
            "model": {"kind": "synthetic", "function": "branin"},
            "checkpoint": {"interval_epochs": 4},
            "early_stopping": {"metric": "val_loss", "mode": "min", "patience": 3, "min_delta": 0.01},
        }))
        .unwrap();
        Segment {
            spec,
            rank: 0,
            world: 1,
            start_epoch,
            stop_epoch,
            checkpoint_dir: dir.to_path_buf(),
            device: tch::Device::Cpu,
            confinement: crate::confine::Confinement::new([dir], [dir]).unwrap(),
        }
    }

    /// Best 0.5 at epoch 3; epochs 4 (better by less than min_delta), 5
    /// and 6 do not improve on it: training stops after epoch 6.
    const LOSSES: [f64; 12] = [
        1.0, 0.7, 0.5, 0.495, 0.6, 0.55, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1,
    ];

    fn run_scripted(segment: &Segment) -> (SegmentOutcome, Vec<u32>, Vec<u32>) {
        let mut run = Scripted {
            segment,
            losses: &LOSSES,
            checkpoints: Vec::new(),
        };
        let mut reported = Vec::new();
        let outcome = drive(segment, &mut run, &mut |r| {
            reported.push(r.epoch);
            Control::Continue
        })
        .unwrap();
        (outcome, reported, run.checkpoints)
    }

    #[test]
    fn early_stopping_ends_the_segment_at_the_plateau_with_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (outcome, reported, checkpoints) = run_scripted(&scripted_segment(dir.path(), 0, 12));
        assert_eq!(reported, [1, 2, 3, 4, 5, 6]);
        assert_eq!(
            checkpoints,
            [4, 6],
            "the interval's, then the stopping epoch's"
        );
        assert_eq!(outcome.last_epoch, 6);
        assert_eq!(
            outcome.checkpoint,
            Some(checkpoint::sidecar_path(dir.path(), 6))
        );
        assert_eq!(
            outcome.early_stopped.unwrap().to_string(),
            "early stopped at epoch 6: val_loss did not improve by 0.01 for 3 epochs \
             (best 0.5000 at epoch 3)"
        );
    }

    #[test]
    fn a_trial_resumed_from_its_checkpoint_stops_at_the_same_epoch() {
        let dir = tempfile::tempdir().unwrap();
        // First segment: epochs 1..=4 (as ASHA's rung, or a failover after
        // the checkpoint of epoch 4); the plateau is one stale epoch in.
        let (first, _, _) = run_scripted(&scripted_segment(dir.path(), 0, 4));
        assert_eq!((first.last_epoch, first.early_stopped), (4, None));
        let saved = checkpoint::load_sidecar(dir.path(), 4).unwrap().plateau;
        assert_eq!(
            saved,
            Some(Plateau {
                best: Some(0.5),
                best_epoch: 3,
                stale_epochs: 1
            })
        );
        let (resumed, reported, _) = run_scripted(&scripted_segment(dir.path(), 4, 12));
        assert_eq!(reported, [5, 6]);
        assert_eq!(resumed.early_stopped.map(|s| s.epoch), Some(6));
    }

    #[test]
    fn divergence_is_the_first_non_finite_loss() {
        let metrics = |pairs: &[(&str, f64)]| -> BTreeMap<String, f64> {
            pairs.iter().map(|&(k, v)| (k.to_string(), v)).collect()
        };
        let finite = metrics(&[("train_loss", 1.0), ("test_loss", 2.0), ("lr", f64::NAN)]);
        assert_eq!(divergence(1, &finite), None, "lr is not a loss");
        let both = metrics(&[("train_loss", f64::INFINITY), ("test_loss", f64::NAN)]);
        assert_eq!(
            divergence(4, &both).unwrap().to_string(),
            "loss is inf at epoch 4"
        );
        let validation = metrics(&[("val_loss", f64::NEG_INFINITY), ("test_loss", f64::NAN)]);
        assert_eq!(
            divergence(3, &validation).unwrap().to_string(),
            "validation loss is -inf at epoch 3"
        );
        let test = metrics(&[("train_loss", 0.5), ("test_loss", f64::NAN)]);
        assert_eq!(
            divergence(2, &test).unwrap().to_string(),
            "test loss is NaN at epoch 2"
        );
        let objective = metrics(&[("objective", f64::NAN)]);
        assert_eq!(
            divergence(1, &objective),
            None,
            "synthetic objectives are not losses"
        );
    }
}
