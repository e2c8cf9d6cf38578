//! The data-parallel loop. Every rank holds a full replica; per step:
//!
//! ```text
//!   forward(own shard of the batch), keeping each stage's output
//!     → backward of the last stage → its grads into its flat buckets
//!        → all-reduce (average) them on the communication thread, while
//!     → backward of the stage below → … (each stage's buckets in turn)
//!     → wait for the reductions → clip by global norm
//!     → optimizer step (reads the averaged buckets)
//! ```
//!
//! Replicas start equal (rank 0's tensors are broadcast) and stay equal
//! because every rank applies the same averaged gradient.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Instant;

use ringleader_collective::{ReduceOp, Ring};
use tch::{Device, Kind, Reduction, Tensor};
use tokio::runtime::Handle;

use super::checkpoint::{self, Durability, Sidecar};
use super::dataset::{self, Dataset, Files, Split};
use super::model::Model;
use super::optim::{learning_rate, Optimizer};
use super::{epoch_seed, Epochs, Segment, TrainError};
use crate::collective;
use ringleader_spec::job::SplitSpec;
use ringleader_spec::shard::{FileDeal, ShardPlan};

/// Largest fused gradient buffer, as PyTorch DDP's `bucket_cap_mb`.
const BUCKET_BYTES: usize = 25 << 20;

/// Tensors laid out back to back in a few contiguous buffers, so that a
/// collective runs once per buffer rather than once per tensor. Members
/// come in consecutive groups (a model's stages) and no buffer spans two
/// groups, so a group's buffers can be reduced as soon as it is filled.
struct Buckets {
    flats: Vec<Tensor>,
    /// One view per member tensor, shaped like it, aliasing its flat buffer.
    views: Vec<Tensor>,
    /// Per group, the range of its members in `views` and of its buffers
    /// in `flats`.
    groups: Vec<(Range<usize>, Range<usize>)>,
}

impl Buckets {
    /// One group of all of `like`.
    fn new(like: &[Tensor], cap_bytes: usize) -> Self {
        Self::grouped(like, &[like.len()], cap_bytes)
    }

    /// Groups of `group_sizes` consecutive members of `like`.
    fn grouped(like: &[Tensor], group_sizes: &[usize], cap_bytes: usize) -> Self {
        let mut flats = Vec::new();
        let mut views = Vec::new();
        let mut groups = Vec::new();
        let close = |group: &mut Vec<&Tensor>, flats: &mut Vec<Tensor>, views: &mut Vec<Tensor>| {
            let Some(first) = group.first() else { return };
            let numel: i64 = group.iter().map(|t| t.numel() as i64).sum();
            let flat = Tensor::zeros([numel], (first.kind(), first.device()));
            let mut offset = 0;
            for t in group.drain(..) {
                let n = t.numel() as i64;
                views.push(flat.narrow(0, offset, n).view(t.size().as_slice()));
                offset += n;
            }
            flats.push(flat);
        };
        let mut members = like.iter();
        for &size in group_sizes {
            let (first_view, first_flat) = (views.len(), flats.len());
            let mut group: Vec<&Tensor> = Vec::new();
            let mut bytes = 0;
            for t in members.by_ref().take(size) {
                let size = t.numel() * t.kind().elt_size_in_bytes();
                let kind_changes = group.first().is_some_and(|g| g.kind() != t.kind());
                if kind_changes || (!group.is_empty() && bytes + size > cap_bytes) {
                    close(&mut group, &mut flats, &mut views);
                    bytes = 0;
                }
                group.push(t);
                bytes += size;
            }
            close(&mut group, &mut flats, &mut views);
            groups.push((first_view..views.len(), first_flat..flats.len()));
        }
        Self {
            flats,
            views,
            groups,
        }
    }

    /// Copies `tensors` in; an undefined tensor (a parameter that got no
    /// gradient) counts as zeros.
    fn fill<T: Borrow<Tensor>>(
        &self,
        tensors: impl IntoIterator<Item = T>,
    ) -> Result<(), TrainError> {
        Self::fill_views(&self.views, tensors)
    }

    fn fill_views<T: Borrow<Tensor>>(
        views: &[Tensor],
        tensors: impl IntoIterator<Item = T>,
    ) -> Result<(), TrainError> {
        tch::no_grad(|| {
            for (view, t) in views.iter().zip(tensors) {
                let (mut view, t) = (view.shallow_clone(), t.borrow());
                if t.defined() {
                    view.f_copy_(t)?;
                } else {
                    let _ = view.f_zero_()?;
                }
            }
            Ok(())
        })
    }

    /// Copies the buckets back out into `tensors`.
    fn drain_into(&self, tensors: &[Tensor]) -> Result<(), TrainError> {
        tch::no_grad(|| {
            for (view, t) in self.views.iter().zip(tensors) {
                t.shallow_clone().f_copy_(view)?;
            }
            Ok(())
        })
    }

    fn all_reduce(
        &mut self,
        ring: &mut Ring,
        runtime: &Handle,
        op: ReduceOp,
    ) -> Result<(), TrainError> {
        for flat in &mut self.flats {
            runtime.block_on(collective::all_reduce(ring, flat, op))?;
        }
        Ok(())
    }

    fn broadcast(
        &mut self,
        ring: &mut Ring,
        runtime: &Handle,
        root: usize,
    ) -> Result<(), TrainError> {
        for flat in &mut self.flats {
            runtime.block_on(collective::broadcast(ring, flat, root))?;
        }
        Ok(())
    }

    /// Scales every bucket so that their global L2 norm is at most `max`
    /// (as `torch.nn.utils.clip_grad_norm_`).
    fn clip_norm(&mut self, max: f64) -> Result<(), TrainError> {
        let mut squares = 0.0;
        for flat in &self.flats {
            squares += flat.f_norm()?.f_double_value(&[])?.powi(2);
        }
        let coef = max / (squares.sqrt() + 1e-6);
        if coef < 1.0 {
            for flat in &mut self.flats {
                let _ = flat.f_mul_scalar_(coef)?;
            }
        }
        Ok(())
    }
}

pub(crate) struct Trainer<'a> {
    segment: &'a Segment,
    ring: &'a mut Ring,
    runtime: &'a Handle,
    data: Dataset,
    model: Model,
    params: Vec<Tensor>,
    buffers: Vec<Tensor>,
    optimizer: Optimizer,
    grads: Buckets,
    buffer_buckets: Buckets,
    share: Share,
    steps_per_epoch: u64,
}

/// How this rank's part of the data relates to the whole.
struct Share {
    /// Training examples every rank trains on per epoch.
    per_rank: u64,
    /// The training files were dealt: this rank holds only its own examples.
    train_dealt: bool,
    /// The test files were dealt: this rank evaluates all it holds (else it
    /// holds the whole test split and evaluates its contiguous slice).
    test_dealt: bool,
}

impl<'a> Trainer<'a> {
    /// Loads the data, builds the model, restores the checkpoint of
    /// `start_epoch` (if any) and makes every replica equal to rank 0's.
    pub(crate) fn new(
        segment: &'a Segment,
        ring: &'a mut Ring,
        runtime: &'a Handle,
    ) -> Result<Self, TrainError> {
        let spec = &segment.spec;
        let (mut data, share) = load_share(segment, ring, runtime)?;
        to_device(&mut data.train, segment.device)?;
        if let Some(test) = &mut data.test {
            to_device(test, segment.device)?;
        }
        let input = &data.train.features.size()[1..];
        let model = Model::build(
            &spec.model,
            &segment.confinement.data,
            input,
            spec.dataset.classes,
            segment.device,
            spec.seed,
        )?;
        let named_params = model.parameters();
        let optimizer = Optimizer::new(&spec.optimizer, &named_params);
        let params: Vec<Tensor> = named_params.into_iter().map(|(_, t)| t).collect();
        let buffers: Vec<Tensor> = model.buffers().into_iter().map(|(_, t)| t).collect();
        let mut trainer = Self {
            grads: Buckets::grouped(&params, &model.stage_sizes(), BUCKET_BYTES),
            buffer_buckets: Buckets::new(&buffers, BUCKET_BYTES),
            steps_per_epoch: share.per_rank.div_ceil(u64::from(spec.batch_size.max(1))),
            share,
            segment,
            ring,
            runtime,
            data,
            model,
            params,
            buffers,
            optimizer,
        };
        if segment.start_epoch > 0 {
            trainer.restore(segment.start_epoch)?;
        }
        trainer.broadcast_state()?;
        Ok(trainer)
    }

    fn restore(&mut self, epoch: u32) -> Result<(), TrainError> {
        let dir = &self.segment.checkpoint_dir;
        let sidecar = checkpoint::load_sidecar(dir, epoch)?;
        let mut saved = checkpoint::load_tensors(dir, epoch)?;
        let path = checkpoint::tensors_path(dir, epoch);
        let mut take = |name: String, target: &mut Tensor| -> Result<(), TrainError> {
            let source = saved.remove(&name).ok_or_else(|| TrainError::Checkpoint {
                path: path.clone(),
                what: format!("no tensor {name} (was it written for another model?)"),
            })?;
            // copy_ would broadcast a mismatched shape silently.
            if source.size() != target.size() {
                return Err(TrainError::Checkpoint {
                    path: path.clone(),
                    what: format!(
                        "{name} has shape {:?}, the model's is {:?}",
                        source.size(),
                        target.size()
                    ),
                });
            }
            tch::no_grad(|| target.f_copy_(&source)).map_err(|e| TrainError::Checkpoint {
                path: path.clone(),
                what: format!("{name}: {e}"),
            })
        };
        for (name, mut t) in self.model.vs.variables() {
            take(format!("model.{name}"), &mut t)?;
        }
        for (name, t) in self.optimizer.named_state_mut() {
            take(format!("optim.{name}"), t)?;
        }
        self.optimizer.step = sidecar.step;
        Ok(())
    }

    /// Rank 0's parameters and buffers to everyone.
    fn broadcast_state(&mut self) -> Result<(), TrainError> {
        let all: Vec<Tensor> = self
            .params
            .iter()
            .chain(&self.buffers)
            .map(Tensor::shallow_clone)
            .collect();
        let mut buckets = Buckets::new(&all, BUCKET_BYTES);
        buckets.fill(&all)?;
        buckets.broadcast(self.ring, self.runtime, 0)?;
        buckets.drain_into(&all)
    }

    /// One pass over this rank's share of the training split; returns the
    /// sum of step losses, the steps, the samples and the last rate.
    fn train(&mut self, epoch: u32) -> Result<(f64, u64, u64, f64), TrainError> {
        let segment = self.segment;
        let spec = &segment.spec;
        let train = &self.data.train;
        let plan = ShardPlan {
            examples: train.len() as u64,
            world: self.segment.world as u32,
            rank: self.segment.rank as u32,
            seed: spec.seed,
            shuffle: spec.dataset.shuffle,
            drop_last: spec.dataset.drop_last,
        };
        let indices = if self.share.train_dealt {
            plan.own_indices(u64::from(epoch), self.share.per_rank)
        } else {
            plan.indices(u64::from(epoch))
        };
        let indices: Vec<i64> = indices.into_iter().map(|i| i as i64).collect();
        let order = Tensor::from_slice(&indices).f_to_device(self.segment.device)?;
        let batch = i64::from(spec.batch_size.max(1));
        let total = indices.len() as i64;
        let mut loss_sum = Tensor::zeros([], (Kind::Double, self.segment.device));
        let first_step = u64::from(epoch - 1) * self.steps_per_epoch;
        let mut lr = spec.optimizer.lr;
        for (step, begin) in (first_step..).zip((0..total).step_by(batch as usize)) {
            let index = order.narrow(0, begin, batch.min(total - begin));
            let xs = train.features.f_index_select(0, &index)?;
            let ys = train.labels.f_index_select(0, &index)?;
            let outputs = self.model.forward_stages(&xs, true)?;
            let logits = outputs.last().expect("a model has at least one stage");
            let loss = logits.f_log_softmax(-1, Kind::Float)?.f_nll_loss(
                &ys,
                None::<Tensor>,
                Reduction::Mean,
                -100,
            )?;
            backward_and_average(
                &self.grads,
                &self.params,
                self.ring,
                self.runtime,
                &loss,
                &outputs,
            )?;
            if let Some(max) = spec.optimizer.grad_clip {
                self.grads.clip_norm(max)?;
            }
            lr = learning_rate(
                &spec.optimizer,
                &spec.schedule,
                step,
                self.steps_per_epoch,
                spec.epochs,
            );
            self.optimizer.step(&self.params, &self.grads.views, lr)?;
            let _ = tch::no_grad(|| loss_sum.f_add_(&loss.f_to_kind(Kind::Double)?))?;
        }
        Ok((
            loss_sum.f_double_value(&[])?,
            self.steps_per_epoch,
            total as u64,
            lr,
        ))
    }

    /// Loss sum, correct predictions and examples on this rank's contiguous
    /// shard of the test split.
    fn evaluate(&mut self) -> Result<[f64; 3], TrainError> {
        let Some(test) = &self.data.test else {
            return Ok([0.0; 3]);
        };
        let (world, rank) = (self.segment.world as i64, self.segment.rank as i64);
        let n = test.len() as i64;
        let (begin, end) = if self.share.test_dealt {
            (0, n)
        } else {
            (n * rank / world, n * (rank + 1) / world)
        };
        let batch = i64::from(self.segment.spec.eval_batch_size.max(1));
        let mut sums = [0.0; 3];
        tch::no_grad(|| -> Result<(), TrainError> {
            for start in (begin..end).step_by(batch as usize) {
                let len = batch.min(end - start);
                let xs = test.features.narrow(0, start, len);
                let ys = test.labels.narrow(0, start, len);
                let logits = self.model.forward(&xs, false)?;
                let loss = logits.f_log_softmax(-1, Kind::Float)?.f_nll_loss(
                    &ys,
                    None::<Tensor>,
                    Reduction::Sum,
                    -100,
                )?;
                let correct = logits
                    .f_argmax(-1, false)?
                    .f_eq_tensor(&ys)?
                    .f_sum(Kind::Int64)?;
                sums[0] += loss.f_double_value(&[])?;
                sums[1] += correct.f_double_value(&[])?;
                sums[2] += len as f64;
            }
            Ok(())
        })?;
        Ok(sums)
    }

    fn reduce(&mut self, values: &[f64], op: ReduceOp) -> Result<Vec<f64>, TrainError> {
        reduce(self.ring, self.runtime, values, op)
    }
}

/// Element-wise reduction of a few numbers across ranks.
fn reduce(
    ring: &mut Ring,
    runtime: &Handle,
    values: &[f64],
    op: ReduceOp,
) -> Result<Vec<f64>, TrainError> {
    let mut t = Tensor::from_slice(values);
    runtime.block_on(collective::all_reduce(ring, &mut t, op))?;
    Ok(Vec::<f64>::try_from(&t)?)
}

/// Reads this rank's data — every file, or under file sharding only the
/// files dealt to it — agrees with the other ranks on how many examples
/// each trains on per epoch, and normalises with statistics of the whole
/// training split.
fn load_share(
    segment: &Segment,
    ring: &mut Ring,
    runtime: &Handle,
) -> Result<(Dataset, Share), TrainError> {
    let spec = &segment.spec;
    let (world, rank) = (segment.world as u32, segment.rank as u32);
    let sharded = spec.dataset.file_sharded(world);
    // The training files are always dealt under file sharding; the test
    // files only when there are enough of them.
    let deal = |split: &SplitSpec, always: bool| -> Result<Option<Vec<usize>>, TrainError> {
        if !sharded || (!always && split.files.len() < world as usize) {
            return Ok(None);
        }
        let deal = FileDeal::new(split.files.len(), world, spec.seed, spec.dataset.shuffle)
            .map_err(|e| TrainError::DatasetSpec(e.to_string()))?;
        Ok(Some(deal.files_of(rank)))
    };
    let train_files = deal(&spec.dataset.train, true)?;
    let test_files = match &spec.dataset.test {
        Some(test) => deal(test, false)?,
        None => None,
    };
    fn chosen(files: &Option<Vec<usize>>) -> Files<'_> {
        files.as_deref().map_or(Files::All, Files::Only)
    }
    if let Some(files) = &train_files {
        tracing::info!(
            rank,
            ?files,
            "file sharding: this rank reads {} of {} training files",
            files.len(),
            spec.dataset.train.files.len()
        );
    }
    let mut data = dataset::load(
        &spec.dataset,
        &segment.confinement.data,
        chosen(&train_files),
        chosen(&test_files),
    )?;
    let own = data.train.len() as f64;
    let per_rank = if sharded {
        let extremes = reduce(ring, runtime, &[own, -own], ReduceOp::Max)?;
        let (largest, smallest) = (extremes[0] as u64, -extremes[1] as u64);
        if smallest == 0 {
            return Err(TrainError::DatasetSpec(format!(
                "with the training files dealt to {world} ranks, a rank got no examples"
            )));
        }
        if spec.dataset.drop_last {
            smallest
        } else {
            largest
        }
    } else {
        if data.train.is_empty() {
            return Err(TrainError::DatasetSpec(
                "the training split is empty".into(),
            ));
        }
        ShardPlan::per_rank(own as u64, world, spec.dataset.drop_last)
    };
    let mut statistics = dataset::statistics(&spec.dataset.normalize, &data.train)?;
    if let (true, Some((stats, op))) = (sharded, &mut statistics) {
        runtime.block_on(collective::all_reduce(ring, stats, *op))?;
    }
    dataset::normalize(
        &spec.dataset.normalize,
        statistics.as_ref().map(|(s, _)| s),
        &mut data,
    )?;
    let share = Share {
        per_rank,
        train_dealt: sharded,
        test_dealt: test_files.is_some(),
    };
    Ok((data, share))
}

/// Back-propagates one stage at a time, from the last, and hands each
/// stage's gradient buffers to a communication thread that averages
/// them over the ring while the stages below are still being
/// differentiated: PyTorch DDP's overlap of all-reduce with backward,
/// done without the autograd hooks tch does not expose. A stage's
/// gradient flows to the one below through its input: the gradient of
/// `sum(output · upstream)` with respect to the stage below is exactly
/// the chain rule's.
fn backward_and_average(
    grads: &Buckets,
    params: &[Tensor],
    ring: &mut Ring,
    runtime: &Handle,
    loss: &Tensor,
    outputs: &[Tensor],
) -> Result<(), TrainError> {
    std::thread::scope(|scope| {
        let (ready, queue) = mpsc::channel::<Tensor>();
        let communication = scope.spawn(move || -> Result<(), TrainError> {
            for mut flat in queue {
                runtime.block_on(collective::all_reduce(ring, &mut flat, ReduceOp::Avg))?;
            }
            Ok(())
        });
        // A failed send means the communication thread failed; its error
        // is the one to report.
        let differentiated = backward_by_stage(grads, params, loss, outputs, |flats| {
            flats
                .iter()
                .all(|flat| ready.send(flat.shallow_clone()).is_ok())
        });
        drop(ready);
        let communicated = communication
            .join()
            .expect("the communication thread does not panic");
        communicated.and(differentiated)
    })
}

/// Back-propagates `loss` one stage at a time, from the last, into `grads`
/// (grouped by stage, as `params`), calling `stage_done` with a stage's
/// buffers once they hold its gradients; it returns whether to go on.
fn backward_by_stage(
    grads: &Buckets,
    params: &[Tensor],
    loss: &Tensor,
    outputs: &[Tensor],
    mut stage_done: impl FnMut(&[Tensor]) -> bool,
) -> Result<(), TrainError> {
    let mut upstream: Option<Tensor> = None;
    for (stage, (members, flats)) in grads.groups.iter().enumerate().rev() {
        let objective = match &upstream {
            None => loss.shallow_clone(),
            Some(gradient) => outputs[stage]
                .f_mul(gradient)?
                .f_sum(outputs[stage].kind())?,
        };
        let below = stage
            .checked_sub(1)
            .map(|s| &outputs[s])
            .filter(|t| t.requires_grad());
        let inputs: Vec<&Tensor> = params[members.clone()].iter().chain(below).collect();
        let mut gradients = Tensor::f_run_backward(&[&objective], &inputs, false, false)?;
        upstream = below.and_then(|_| gradients.pop());
        Buckets::fill_views(&grads.views[members.clone()], &gradients)?;
        if !stage_done(&grads.flats[flats.clone()]) {
            break;
        }
    }
    Ok(())
}

fn to_device(split: &mut Split, device: Device) -> Result<(), TrainError> {
    split.features = split.features.f_to_device(device)?;
    split.labels = split.labels.f_to_device(device)?;
    Ok(())
}

impl Epochs for Trainer<'_> {
    fn epoch(&mut self, epoch: u32) -> Result<BTreeMap<String, f64>, TrainError> {
        // Under the lock so that it cannot land in the middle of a model
        // being built (and seeded) on another thread of this process.
        {
            let _rng = super::model::TORCH_RNG
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            tch::manual_seed(epoch_seed(self.segment.spec.seed, epoch, self.segment.rank) as i64);
        }
        let started = Instant::now();
        let (loss_sum, steps, samples, lr) = self.train(epoch)?;
        let train_seconds = started.elapsed().as_secs_f64();
        // Batch-norm statistics differ per rank (each saw its own shard):
        // evaluate, and checkpoint, with their average.
        if self.segment.world > 1 && !self.buffers.is_empty() {
            self.buffer_buckets.fill(&self.buffers)?;
            self.buffer_buckets
                .all_reduce(self.ring, self.runtime, ReduceOp::Avg)?;
            self.buffer_buckets.drain_into(&self.buffers)?;
        }
        let [test_loss, correct, count] = self.evaluate()?;
        let epoch_seconds = started.elapsed().as_secs_f64();
        let sums = self.reduce(
            &[
                loss_sum,
                steps as f64,
                samples as f64,
                test_loss,
                correct,
                count,
            ],
            ReduceOp::Sum,
        )?;
        let times = self.reduce(&[train_seconds, epoch_seconds], ReduceOp::Max)?;
        let mut metrics = BTreeMap::from([
            ("train_loss".to_string(), sums[0] / sums[1]),
            ("samples_per_sec".to_string(), sums[2] / times[0]),
            ("epoch_seconds".to_string(), times[1]),
            ("lr".to_string(), lr),
        ]);
        if self.data.test.is_some() && sums[5] > 0.0 {
            metrics.insert("test_loss".into(), sums[3] / sums[5]);
            metrics.insert("test_accuracy".into(), sums[4] / sums[5]);
        }
        Ok(metrics)
    }

    fn checkpoint(
        &mut self,
        epoch: u32,
        metrics: &BTreeMap<String, f64>,
    ) -> Result<PathBuf, TrainError> {
        let dir = &self.segment.checkpoint_dir;
        let path = if self.segment.rank == 0 {
            let vars = self.model.vs.variables();
            let mut tensors: Vec<(String, &Tensor)> = vars
                .iter()
                .map(|(name, t)| (format!("model.{name}"), t))
                .collect();
            tensors.extend(
                self.optimizer
                    .named_state()
                    .map(|(name, t)| (format!("optim.{name}"), t)),
            );
            let seed = self.segment.spec.seed;
            let sidecar = Sidecar {
                epoch,
                step: self.optimizer.step,
                seed,
                rng_seed: epoch_seed(seed, epoch + 1, 0),
                world: self.segment.world,
                metrics: metrics.clone(),
            };
            checkpoint::save(dir, &tensors, &sidecar, Durability::Synced)?
        } else {
            checkpoint::tensors_path(dir, epoch)
        };
        // Nobody may go on (and perhaps resume elsewhere) before it exists.
        self.runtime.block_on(self.ring.barrier())?;
        Ok(path)
    }

    fn agree_to_stop(&mut self, stop: bool) -> Result<bool, TrainError> {
        Ok(self.reduce(&[f64::from(u8::from(stop))], ReduceOp::Max)?[0] > 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_split_at_the_cap_and_round_trip_their_tensors() {
        let tensors = [
            Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]),
            Tensor::from_slice(&[5.0f32, 6.0]),
            Tensor::from_slice(&[7.0f64]),
        ];
        // 16 + 8 bytes of f32 exceed a 20-byte cap; the f64 needs its own.
        let buckets = Buckets::new(&tensors, 20);
        let sizes: Vec<i64> = buckets.flats.iter().map(|f| f.numel() as i64).collect();
        assert_eq!(sizes, [4, 2, 1]);
        buckets.fill(&tensors).unwrap();
        assert_eq!(buckets.views[0].size(), [2, 2]);
        let copies: Vec<Tensor> = tensors.iter().map(Tensor::zeros_like).collect();
        buckets.drain_into(&copies).unwrap();
        for (a, b) in tensors.iter().zip(&copies) {
            assert!(a.equal(b));
        }
        let together = Buckets::new(&tensors[..2], BUCKET_BYTES);
        assert_eq!(together.flats.len(), 1);
        let apart = Buckets::grouped(&tensors[..2], &[1, 1], BUCKET_BYTES);
        assert_eq!(apart.flats.len(), 2, "no buffer spans two groups");
        assert_eq!(apart.groups, [(0..1, 0..1), (1..2, 1..2)]);
    }

    #[test]
    fn stage_by_stage_gradients_equal_one_backward_pass() {
        use ringleader_spec::job::ModelSpec;
        let spec = ModelSpec::Cnn {
            channels: [4, 8],
            hidden: 16,
            kernel: 3,
            dropout: 0.0,
        };
        let roots = crate::confine::PathRoots::none(crate::confine::RootKind::Data);
        let mut model = Model::build(&spec, &roots, &[1, 12, 12], 10, Device::Cpu, 3).unwrap();
        let params: Vec<Tensor> = model.parameters().into_iter().map(|(_, t)| t).collect();
        assert_eq!(
            model.stage_sizes(),
            [8, 4],
            "conv and BN, then the classifier"
        );
        let xs = Tensor::randn([6, 1, 12, 12], (Kind::Float, Device::Cpu));
        let ys = Tensor::from_slice(&[0i64, 3, 9, 1, 1, 7]);
        let loss = |outputs: &[Tensor]| {
            outputs
                .last()
                .unwrap()
                .log_softmax(-1, Kind::Float)
                .nll_loss(&ys)
        };
        let outputs = model.forward_stages(&xs, true).unwrap();
        let whole = Tensor::run_backward(&[loss(&outputs)], &params, false, false);

        let grads = Buckets::grouped(&params, &model.stage_sizes(), BUCKET_BYTES);
        let outputs = model.forward_stages(&xs, true).unwrap();
        let mut finished = Vec::new();
        backward_by_stage(&grads, &params, &loss(&outputs), &outputs, |flats| {
            finished.push(flats.len());
            true
        })
        .unwrap();
        assert_eq!(finished, [1, 1], "the classifier first, then the blocks");
        for (staged, whole) in grads.views.iter().zip(&whole) {
            assert!(staged.equal(whole), "stage by stage is bit-equal");
        }
    }
}
