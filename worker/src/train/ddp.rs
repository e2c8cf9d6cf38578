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
//!
//! With `gradient_compression = "bf16"` or `"f16"` (PyTorch DDP's
//! `bf16_compress_hook` / `fp16_compress_hook`) a bucket travels as a
//! 16-bit copy of itself:
//!
//! ```text
//!   f32 gradients ──÷ world, round──▶ 16-bit bucket ──ring sum──▶ 16-bit sum
//!                    (each hop adds in f32, rounds once)               │
//!   f32 bucket ◀──────────────────── widen (exact) ◀───────────────────┘
//! ```
//!
//! The gradients are rounded straight into the 16-bit bucket as backward
//! produces them (no f32 copy first). The ring's all-gather hands every
//! rank the same 16-bit bits, so the widened f32 average is bit-identical
//! everywhere.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Instant;

use half::slice::HalfFloatSliceExt;
use ringleader_collective::{ReduceOp, Ring};
use tch::{Device, Kind, Reduction, Tensor};
use tokio::runtime::Handle;

use super::augment::{self, Augmenter};
use super::balance::{self, Balance};
use super::checkpoint::{self, Durability, Sidecar};
use super::dataset::{self, Dataset, Files, Split};
use super::metrics::{self, Counts, Evaluation, MAX_CONFUSION_CLASSES};
use super::model::Model;
use super::optim::{learning_rate, Optimizer};
use super::prepare;
use super::split::{self, Partition};
use super::{epoch_seed, Epochs, Segment, TrainError};
use crate::collective;
use ringleader_spec::job::{
    GradientCompression, Holdout, SplitSpec, MAX_RECALL_CLASSES, TEST_PREFIX, VALIDATION_PREFIX,
};
use ringleader_spec::prepare::Augment;
use ringleader_spec::shard::{FileDeal, ShardPlan};
use ringleader_spec::stopping::Plateau;

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
    /// Per member, the index of its flat buffer and its offset there.
    places: Vec<(usize, i64)>,
    /// Per flat buffer, the 16-bit buffer it travels in when gradients are
    /// compressed (`None`: it travels as it is). Empty: no compression.
    wire: Vec<Option<Tensor>>,
    /// Per member, its view in its `wire` buffer, if it has one: the
    /// member's gradient is rounded straight into it (no f32 copy first).
    wire_views: Vec<Option<Tensor>>,
    /// What compressed members are divided by as they are rounded.
    world: usize,
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
        let mut places = Vec::new();
        let mut groups = Vec::new();
        let mut close =
            |group: &mut Vec<&Tensor>, flats: &mut Vec<Tensor>, views: &mut Vec<Tensor>| {
                let Some(first) = group.first() else { return };
                let numel: i64 = group.iter().map(|t| t.numel() as i64).sum();
                let flat = Tensor::zeros([numel], (first.kind(), first.device()));
                let mut offset = 0;
                for t in group.drain(..) {
                    let n = t.numel() as i64;
                    views.push(flat.narrow(0, offset, n).view(t.size().as_slice()));
                    places.push((flats.len(), offset));
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
            places,
            groups,
            wire: Vec::new(),
            wire_views: Vec::new(),
            world: 1,
        }
    }

    /// Makes every f32 buffer travel as `compression` says from now on,
    /// averaged over `world` ranks. Buffers of other kinds (f64, or already
    /// 16-bit) travel as they are.
    fn compress(
        &mut self,
        compression: GradientCompression,
        world: usize,
    ) -> Result<(), TrainError> {
        let kind = match compression {
            GradientCompression::None => {
                self.wire.clear();
                self.wire_views.clear();
                return Ok(());
            }
            GradientCompression::Bf16 => Kind::BFloat16,
            GradientCompression::F16 => Kind::Half,
        };
        self.wire = self
            .flats
            .iter()
            .map(|flat| {
                (flat.kind() == Kind::Float)
                    .then(|| Tensor::f_empty([flat.numel() as i64], (kind, flat.device())))
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        self.wire_views = self
            .places
            .iter()
            .zip(&self.views)
            .map(|(&(flat, offset), view)| {
                let wire = self.wire[flat].as_ref()?;
                Some(
                    wire.narrow(0, offset, view.numel() as i64)
                        .view(view.size().as_slice()),
                )
            })
            .collect();
        self.world = world;
        Ok(())
    }

    /// Buffer `index` and the 16-bit buffer it travels in, if any.
    fn bucket(&self, index: usize) -> (Tensor, Option<Tensor>) {
        let wire = self.wire.get(index).and_then(Option::as_ref);
        (
            self.flats[index].shallow_clone(),
            wire.map(Tensor::shallow_clone),
        )
    }

    /// Copies `tensors` in; an undefined tensor (a parameter that got no
    /// gradient) counts as zeros.
    fn fill<T: Borrow<Tensor>>(
        &self,
        tensors: impl IntoIterator<Item = T>,
    ) -> Result<(), TrainError> {
        self.fill_members(0..self.views.len(), tensors)
    }

    /// Copies `tensors` into the members `members`; a compressed member is
    /// divided by the world and rounded into its 16-bit view instead.
    fn fill_members<T: Borrow<Tensor>>(
        &self,
        members: Range<usize>,
        tensors: impl IntoIterator<Item = T>,
    ) -> Result<(), TrainError> {
        tch::no_grad(|| {
            for (member, t) in members.zip(tensors) {
                let t = t.borrow();
                let wire = self.wire_views.get(member).and_then(Option::as_ref);
                let mut view = wire.unwrap_or(&self.views[member]).shallow_clone();
                match (t.defined(), wire.is_some()) {
                    (false, _) => {
                        let _ = view.f_zero_()?;
                    }
                    (true, true) => narrow(t, &mut view, self.world)?,
                    (true, false) => view.f_copy_(t)?,
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
    /// The last epoch's evaluations, by metric prefix (`val`, `test`), for
    /// the checkpoint sidecar.
    evaluations: BTreeMap<String, Evaluation>,
    /// Class weights and the balanced sampler.
    balance: Balance,
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
    /// Likewise for the validation set (held out of dealt training files,
    /// or a separate split whose files were dealt).
    validation_dealt: bool,
}

/// A split that is evaluated each epoch.
#[derive(Clone, Copy, Debug)]
enum Evaluated {
    Validation,
    Test,
}

impl Evaluated {
    fn prefix(self) -> &'static str {
        match self {
            Evaluated::Validation => VALIDATION_PREFIX,
            Evaluated::Test => TEST_PREFIX,
        }
    }
}

/// One rank's part of an evaluation, before the ranks add theirs up.
struct LocalEvaluation {
    /// Loss sum, examples, then per class hits, labels and predictions,
    /// then the confusion matrix row by row (when it is kept).
    sums: Vec<f64>,
    /// Two classes: each example's score (logit of 1 minus logit of 0)
    /// and label, for the exact ROC-AUC.
    scores: Vec<f64>,
    positive: Vec<f64>,
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
        for held_out in data.validation.iter_mut().chain(data.test.as_mut()) {
            to_device(held_out, segment.device)?;
        }
        if spec.dataset.augment.is_some() {
            augment::check_images(&data.train.features.size()[1..])?;
        }
        let balance = Balance::new(
            &spec.dataset,
            &data.train,
            |counts| match share.train_dealt {
                true => reduce(ring, runtime, &counts, ReduceOp::Sum),
                false => Ok(counts),
            },
            segment.device,
        )?;
        if segment.rank == 0 {
            // Before the first checkpoint: an exported model needs it.
            prepare::save(&segment.checkpoint_dir, &data.preparation)?;
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
        let mut grads = Buckets::grouped(&params, &model.stage_sizes(), BUCKET_BYTES);
        // One rank sends nothing: nothing to compress.
        if segment.world > 1 && spec.gradient_compression != GradientCompression::None {
            tracing::info!(
                rank = segment.rank,
                compression = ?spec.gradient_compression,
                "gradients travel in 16 bits"
            );
            grads.compress(spec.gradient_compression, segment.world)?;
        }
        let mut trainer = Self {
            grads,
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
            evaluations: BTreeMap::new(),
            balance,
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
        checkpoint::restore_model(&mut saved, &path, &self.model.vs)?;
        for (name, t) in self.optimizer.named_state_mut() {
            checkpoint::copy_saved(&mut saved, &path, &format!("optim.{name}"), t)?;
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
        } else if let Some(balanced) = self.balance.order(&plan, u64::from(epoch)) {
            balanced
        } else {
            plan.indices(u64::from(epoch))
        };
        let mut augmenter = spec
            .dataset
            .augment
            .filter(Augment::is_active)
            .map(|a| Augmenter::new(a, epoch_seed(spec.seed, epoch, segment.rank)));
        let indices: Vec<i64> = indices.into_iter().map(|i| i as i64).collect();
        let order = Tensor::from_slice(&indices).f_to_device(self.segment.device)?;
        let batch = i64::from(spec.batch_size.max(1));
        let total = indices.len() as i64;
        let mut loss_sum = Tensor::zeros([], (Kind::Double, self.segment.device));
        let first_step = u64::from(epoch - 1) * self.steps_per_epoch;
        let mut lr = spec.optimizer.lr;
        for (step, begin) in (first_step..).zip((0..total).step_by(batch as usize)) {
            let index = order.narrow(0, begin, batch.min(total - begin));
            let mut xs = train.features.f_index_select(0, &index)?;
            if let Some(augmenter) = &mut augmenter {
                xs = augmenter.apply(&xs)?;
            }
            let ys = train.labels.f_index_select(0, &index)?;
            let outputs = self.model.forward_stages(&xs, true)?;
            let logits = outputs.last().expect("a model has at least one stage");
            let loss = balance::loss(logits, &ys, self.balance.weights.as_ref())?;
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

    /// This rank's part of `which`: the examples it holds when the split's
    /// files were dealt, else its contiguous slice of the whole split.
    /// `None` when the job has no such split.
    fn evaluate_own(&mut self, which: Evaluated) -> Result<Option<LocalEvaluation>, TrainError> {
        let (split, dealt) = match which {
            Evaluated::Validation => (&self.data.validation, self.share.validation_dealt),
            Evaluated::Test => (&self.data.test, self.share.test_dealt),
        };
        let Some(split) = split else {
            return Ok(None);
        };
        let classes = i64::from(self.segment.spec.dataset.classes);
        let (world, rank) = (self.segment.world as i64, self.segment.rank as i64);
        let n = split.len() as i64;
        let (begin, end) = if dealt {
            (0, n)
        } else {
            (n * rank / world, n * (rank + 1) / world)
        };
        let confusion = classes <= i64::from(MAX_CONFUSION_CLASSES);
        let device = self.segment.device;
        let zeros = |len: i64| Tensor::zeros([len], (Kind::Int64, device));
        let (mut hits, mut actual, mut predicted) =
            (zeros(classes), zeros(classes), zeros(classes));
        let mut cells = zeros(if confusion { classes * classes } else { 0 });
        let mut loss_sum = 0.0;
        let (mut scores, mut positive) = (Vec::new(), Vec::new());
        let batch = i64::from(self.segment.spec.eval_batch_size.max(1));
        tch::no_grad(|| -> Result<(), TrainError> {
            for start in (begin..end).step_by(batch as usize) {
                let len = batch.min(end - start);
                let xs = split.features.narrow(0, start, len);
                let ys = split.labels.narrow(0, start, len);
                let logits = self.model.forward(&xs, false)?;
                if logits.size().get(1) != Some(&classes) {
                    return Err(TrainError::Model(format!(
                        "the model gives outputs of shape {:?} for {classes} classes",
                        logits.size()
                    )));
                }
                let loss = logits.f_log_softmax(-1, Kind::Float)?.f_nll_loss(
                    &ys,
                    None::<Tensor>,
                    Reduction::Sum,
                    -100,
                )?;
                loss_sum += loss.f_double_value(&[])?;
                let guess = logits.f_argmax(-1, false)?;
                let count = |t: &Tensor, bins: i64| t.f_bincount(None::<Tensor>, bins);
                let right = ys.f_masked_select(&guess.f_eq_tensor(&ys)?)?;
                let _ = hits.f_add_(&count(&right, classes)?)?;
                let _ = actual.f_add_(&count(&ys, classes)?)?;
                let _ = predicted.f_add_(&count(&guess, classes)?)?;
                if confusion {
                    let cell = ys.f_mul_scalar(classes)?.f_add(&guess)?;
                    let _ = cells.f_add_(&count(&cell, classes * classes)?)?;
                }
                if classes == 2 {
                    let margin = logits.f_select(1, 1)?.f_sub(&logits.f_select(1, 0)?)?;
                    scores.extend(Vec::<f64>::try_from(margin.f_to_kind(Kind::Double)?)?);
                    positive.extend(Vec::<f64>::try_from(ys.f_to_kind(Kind::Double)?)?);
                }
            }
            Ok(())
        })?;
        let mut sums = vec![loss_sum, (end - begin) as f64];
        for counts in [&hits, &actual, &predicted, &cells] {
            sums.extend(Vec::<f64>::try_from(counts.f_to_kind(Kind::Double)?)?);
        }
        Ok(Some(LocalEvaluation {
            sums,
            scores,
            positive,
        }))
    }

    /// Evaluates `which` on every rank and combines the parts: every rank
    /// gets the metrics of the whole split.
    fn evaluate(&mut self, which: Evaluated) -> Result<Option<Evaluation>, TrainError> {
        let Some(local) = self.evaluate_own(which)? else {
            return Ok(None);
        };
        let classes = self.segment.spec.dataset.classes as usize;
        let sums = self.reduce(&local.sums, ReduceOp::Sum)?;
        // Sums of whole numbers below 2^53: exact in f64.
        let whole = |range: std::ops::Range<usize>| -> Vec<u64> {
            sums[range].iter().map(|&x| x as u64).collect()
        };
        let per_class = |k: usize| whole(2 + k * classes..2 + (k + 1) * classes);
        let counts = Counts {
            loss_sum: sums[0],
            examples: sums[1] as u64,
            hits: per_class(0),
            actual: per_class(1),
            predicted: per_class(2),
        };
        let confusion = (classes <= MAX_CONFUSION_CLASSES as usize).then(|| {
            whole(2 + 3 * classes..sums.len())
                .chunks(classes)
                .map(<[u64]>::to_vec)
                .collect()
        });
        let roc_auc = if classes == 2 {
            let (scores, positive) = self.gather_scores(&local)?;
            let positive: Vec<bool> = positive.iter().map(|&p| p > 0.5).collect();
            metrics::roc_auc(&scores, &positive)
        } else {
            None
        };
        Ok(Evaluation::new(&counts, roc_auc, confusion))
    }

    /// Every rank's scores and labels, in rank order (an all-gather made of
    /// two sums: the sizes, then each rank's values at its offset).
    fn gather_scores(
        &mut self,
        local: &LocalEvaluation,
    ) -> Result<(Vec<f64>, Vec<f64>), TrainError> {
        let (world, rank) = (self.segment.world, self.segment.rank);
        let mut sizes = vec![0.0; world];
        sizes[rank] = local.scores.len() as f64;
        let sizes = self.reduce(&sizes, ReduceOp::Sum)?;
        let total = sizes.iter().sum::<f64>() as usize;
        if total == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let offset = sizes[..rank].iter().sum::<f64>() as usize;
        let mut values = vec![0.0; 2 * total];
        values[offset..offset + local.scores.len()].copy_from_slice(&local.scores);
        values[total + offset..total + offset + local.positive.len()]
            .copy_from_slice(&local.positive);
        let mut values = self.reduce(&values, ReduceOp::Sum)?;
        let positive = values.split_off(total);
        Ok((values, positive))
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
/// files dealt to it — holds out its validation examples (the `split`
/// module) or reads the validation split, agrees with the other ranks on
/// how many examples each trains on per epoch, and normalises with
/// statistics of the whole training part (validation excluded).
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
    let validation_files = match &spec.dataset.validation {
        Some(validation) => deal(validation, false)?,
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
    let validation_dealt = match spec.dataset.holdout() {
        Holdout::None => false,
        Holdout::Split(_) => {
            data.validation = dataset::load_validation(
                &spec.dataset,
                &segment.confinement.data,
                chosen(&validation_files),
                &mut data,
            )?;
            validation_files.is_some()
        }
        Holdout::Fraction(fraction) => {
            hold_out(
                &mut data,
                spec,
                split::Holdout::Fraction(fraction),
                &train_files,
            )?;
            sharded
        }
        Holdout::Fold(folds) => {
            hold_out(&mut data, spec, split::Holdout::Fold(folds), &train_files)?;
            sharded
        }
    };
    // After the hold-out: fitted on the examples the model trains on only.
    dataset::prepare_csv(&mut data)?;
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
        validation_dealt,
    };
    Ok((data, share))
}

/// Moves the `holdout` of the loaded training examples into
/// `data.validation`. `own_files`: the training files this rank holds
/// under file sharding (its examples are split alone, seeded by them).
fn hold_out(
    data: &mut Dataset,
    spec: &ringleader_spec::JobSpec,
    holdout: split::Holdout,
    own_files: &Option<Vec<usize>>,
) -> Result<(), TrainError> {
    let labels = Vec::<i64>::try_from(&data.train.labels)?;
    let (stream, place) = match own_files {
        Some(files) => (
            split::stream_of_files(files),
            format!(" in this rank's training files {files:?}"),
        ),
        None => (0, String::new()),
    };
    let Partition { train, validation } = split::partition(
        &labels,
        spec.dataset.classes,
        holdout,
        spec.seed,
        stream,
        &place,
    )
    .map_err(|e| TrainError::DatasetSpec(e.to_string()))?;
    let take = |split: &Split, positions: Vec<i64>| -> Result<Split, TrainError> {
        let index = Tensor::from_slice(&positions).f_to_device(split.labels.device())?;
        Ok(Split {
            features: split.features.f_index_select(0, &index)?,
            labels: split.labels.f_index_select(0, &index)?,
        })
    };
    data.validation = Some(take(&data.train, validation)?);
    data.train = take(&data.train, train)?;
    Ok(())
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
        let (ready, queue) = mpsc::channel::<(Tensor, Option<Tensor>)>();
        let communication = scope.spawn(move || -> Result<(), TrainError> {
            for (mut flat, wire) in queue {
                average(ring, runtime, &mut flat, wire)?;
            }
            Ok(())
        });
        // A failed send means the communication thread failed; its error
        // is the one to report.
        let differentiated = backward_by_stage(grads, params, loss, outputs, |flats| {
            flats
                .into_iter()
                .all(|i| ready.send(grads.bucket(i)).is_ok())
        });
        drop(ready);
        let communicated = communication
            .join()
            .expect("the communication thread does not panic");
        communicated.and(differentiated)
    })
}

/// Averages one gradient buffer over the ring, in place: as it is, or,
/// when it has a 16-bit `wire` buffer (which [`Buckets::fill_members`]
/// filled with the gradients divided by the world, rounded), by summing
/// that and widening the sum into `flat` (see the module's comment).
fn average(
    ring: &mut Ring,
    runtime: &Handle,
    flat: &mut Tensor,
    wire: Option<Tensor>,
) -> Result<(), TrainError> {
    let Some(mut wire) = wire else {
        runtime.block_on(collective::all_reduce(ring, flat, ReduceOp::Avg))?;
        return Ok(());
    };
    runtime.block_on(collective::all_reduce(ring, &mut wire, ReduceOp::Sum))?;
    widen(&wire, flat)
}

/// Elements converted per pass of [`narrow`]'s host loop (16 KiB of f32,
/// on the stack, in L1).
const NARROW_CHUNK: usize = 4096;

/// `wire = round(gradient / world)`, `wire` being a bf16 or f16 tensor of
/// `gradient`'s shape. Dividing before rounding, as DDP's compression hooks
/// do, keeps a sum from overflowing f16 where the average would not. A
/// contiguous CPU gradient is converted here, in loops that vectorise
/// (bf16) or with the `half` crate's slice conversions (f16: F16C where the
/// CPU has it): libtorch's dtype-converting `div` took about 6 ns an
/// element on one thread, more than the halved traffic saves. Elsewhere
/// (CUDA, strided) libtorch does it; both round to nearest, ties to even.
fn narrow(gradient: &Tensor, wire: &mut Tensor, world: usize) -> Result<(), TrainError> {
    let world = world as f32;
    if gradient.kind() != Kind::Float || !on_host(gradient) || !on_host(wire) {
        let divisor = Tensor::from(world).f_to_device(gradient.device())?;
        let _ = tch::no_grad(|| gradient.f_div_out(wire, &divisor))?;
        return Ok(());
    }
    if gradient.size() != wire.size() {
        return Err(TrainError::Torch(tch::TchError::Shape(format!(
            "a gradient of shape {:?} for a bucket view of shape {:?}",
            gradient.size(),
            wire.size()
        ))));
    }
    // SAFETY: both are contiguous CPU tensors of the kinds named and of the
    // same number of elements, in distinct storage (the gradient is
    // autograd's, the wire buffer the bucket's); the gradient is only read,
    // and the thread that calls this is the only one to use that part of
    // the wire buffer meanwhile (the communication thread takes a bucket
    // only once it is filled).
    let source: &[f32] = unsafe { host_slice(gradient) };
    match wire.kind() {
        Kind::BFloat16 => {
            for (target, &x) in unsafe { host_slice_mut::<u16>(wire) }
                .iter_mut()
                .zip(source)
            {
                *target = bf16_bits(x / world);
            }
        }
        Kind::Half => narrow_into(source, unsafe { host_slice_mut::<half::f16>(wire) }, world),
        other => unreachable!("wire buffers are 16-bit floats, not {other:?}"),
    }
    Ok(())
}

/// `x` rounded to bf16 (to nearest, ties to even; a NaN stays a NaN), as
/// bits. Branch-free, so that the loop around it vectorises (the `half`
/// crate converts bf16 one element at a time, with branches).
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16;
    let quiet_nan = (bits >> 16) | 0x40;
    (if bits & 0x7fff_ffff > 0x7f80_0000 {
        quiet_nan
    } else {
        rounded
    }) as u16
}

/// `flat = wire`, widened exactly to f32.
fn widen(wire: &Tensor, flat: &mut Tensor) -> Result<(), TrainError> {
    if !on_host(flat) || !on_host(wire) {
        tch::no_grad(|| flat.f_copy_(wire))?;
        return Ok(());
    }
    // SAFETY: both are contiguous CPU tensors of the kinds named, of the
    // same length (`Buckets::compress`), in distinct storage; the
    // communication thread that calls this holds the only handles to this
    // bucket in use until the step's reductions are joined.
    let target = unsafe { host_slice_mut::<f32>(flat) };
    match wire.kind() {
        Kind::BFloat16 => {
            let wire: &[u16] = unsafe { host_slice(wire) };
            for (target, &bits) in target.iter_mut().zip(wire) {
                *target = f32::from_bits(u32::from(bits) << 16);
            }
        }
        Kind::Half => unsafe { host_slice::<half::f16>(wire) }.convert_to_f32_slice(target),
        other => unreachable!("wire buffers are 16-bit floats, not {other:?}"),
    }
    Ok(())
}

fn narrow_into<T>(source: &[f32], target: &mut [T], world: f32)
where
    [T]: HalfFloatSliceExt,
{
    let mut scaled = [0f32; NARROW_CHUNK];
    for (source, target) in source
        .chunks(NARROW_CHUNK)
        .zip(target.chunks_mut(NARROW_CHUNK))
    {
        let scaled = &mut scaled[..source.len()];
        for (scaled, &x) in scaled.iter_mut().zip(source) {
            *scaled = x / world;
        }
        target.convert_from_f32_slice(scaled);
    }
}

fn on_host(t: &Tensor) -> bool {
    t.device() == Device::Cpu && t.is_contiguous()
}

/// The elements of a contiguous CPU tensor, to read.
///
/// SAFETY: the caller guarantees that `t` is contiguous, on the CPU and of
/// `T`'s kind, and that nothing writes its elements while the slice lives.
unsafe fn host_slice<T>(t: &Tensor) -> &[T] {
    let numel = t.numel();
    if numel == 0 {
        return &[];
    }
    // SAFETY: upheld by the caller, see above.
    unsafe { std::slice::from_raw_parts(t.data_ptr().cast::<T>(), numel) }
}

/// The elements of a contiguous CPU tensor, to write.
///
/// SAFETY: the caller guarantees that `t` is contiguous, on the CPU and of
/// `T`'s kind, and that nothing else reads or writes its elements while the
/// slice lives.
#[allow(clippy::mut_from_ref)]
unsafe fn host_slice_mut<T>(t: &Tensor) -> &mut [T] {
    let numel = t.numel();
    if numel == 0 {
        return &mut [];
    }
    // SAFETY: upheld by the caller, see above.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr().cast::<T>(), numel) }
}

/// Back-propagates `loss` one stage at a time, from the last, into `grads`
/// (grouped by stage, as `params`), calling `stage_done` with the indices
/// of a stage's buffers once they hold its gradients; it returns whether
/// to go on.
fn backward_by_stage(
    grads: &Buckets,
    params: &[Tensor],
    loss: &Tensor,
    outputs: &[Tensor],
    mut stage_done: impl FnMut(Range<usize>) -> bool,
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
        grads.fill_members(members.clone(), &gradients)?;
        if !stage_done(flats.clone()) {
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
        let mut evaluations = BTreeMap::new();
        for which in [Evaluated::Validation, Evaluated::Test] {
            if let Some(evaluation) = self.evaluate(which)? {
                evaluations.insert(which.prefix().to_string(), evaluation);
            }
        }
        let epoch_seconds = started.elapsed().as_secs_f64();
        let sums = self.reduce(&[loss_sum, steps as f64, samples as f64], ReduceOp::Sum)?;
        let times = self.reduce(&[train_seconds, epoch_seconds], ReduceOp::Max)?;
        let mut metrics = BTreeMap::from([
            ("train_loss".to_string(), sums[0] / sums[1]),
            ("samples_per_sec".to_string(), sums[2] / times[0]),
            ("epoch_seconds".to_string(), times[1]),
            ("lr".to_string(), lr),
        ]);
        let recall = self.segment.spec.dataset.classes <= MAX_RECALL_CLASSES;
        for (prefix, evaluation) in &evaluations {
            evaluation.report(prefix, recall, &mut metrics);
        }
        self.evaluations = evaluations;
        Ok(metrics)
    }

    fn checkpoint(
        &mut self,
        epoch: u32,
        metrics: &BTreeMap<String, f64>,
        plateau: Option<Plateau>,
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
                plateau,
                evaluations: self.evaluations.clone(),
                input_shape: self.data.train.features.size()[1..].to_vec(),
            };
            let started = Instant::now();
            let path = checkpoint::save(dir, &tensors, &sidecar, Durability::Synced)?;
            crate::metrics::worker().checkpoint_written(started.elapsed());
            path
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

    /// A runtime and the rings of `world` ranks over loopback.
    fn must_connect_ring(world: usize) -> (tokio::runtime::Runtime, Vec<Ring>) {
        use ringleader_collective::{ring, CollectiveService, RingOptions, RingPlan, RingSecret};
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let rings = runtime.block_on(async {
            let options = RingOptions {
                timeout: std::time::Duration::from_secs(10),
                ..Default::default()
            };
            let mut services = Vec::new();
            let mut peers = Vec::new();
            for _ in 0..world {
                let service = CollectiveService::new(options.timeout);
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                peers.push(listener.local_addr().unwrap().to_string());
                tokio::spawn(
                    ring::server_builder(&options)
                        .unwrap()
                        .add_service(service.clone())
                        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(
                            listener,
                        )),
                );
                services.push(service);
            }
            let secret = RingSecret::generate();
            let connects = services.iter().enumerate().map(|(rank, service)| {
                let plan = RingPlan {
                    successor_socket: None,
                    generation: 1,
                    rank,
                    peers: peers.clone(),
                    secret: secret.clone(),
                };
                Ring::connect(service, plan, options.clone())
            });
            futures::future::try_join_all(connects).await.unwrap()
        });
        (runtime, rings)
    }

    /// Runs `f(rank, ring, runtime)` on one thread per rank.
    fn on_every_rank<R: Send>(
        rings: &mut [Ring],
        runtime: &tokio::runtime::Runtime,
        f: impl Fn(usize, &mut Ring, &Handle) -> R + Sync,
    ) -> Vec<R> {
        std::thread::scope(|scope| {
            let ranks: Vec<_> = rings
                .iter_mut()
                .enumerate()
                .map(|(rank, ring)| {
                    let (f, handle) = (&f, runtime.handle().clone());
                    scope.spawn(move || f(rank, ring, &handle))
                })
                .collect();
            ranks.into_iter().map(|r| r.join().unwrap()).collect()
        })
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let values = Vec::<f32>::try_from(t.reshape([-1])).unwrap();
        values.into_iter().map(f32::to_bits).collect()
    }

    /// Each rank's bucket of `inputs[rank]`, averaged with `compression`.
    fn averaged(
        rings: &mut [Ring],
        runtime: &tokio::runtime::Runtime,
        inputs: &[Vec<f32>],
        compression: GradientCompression,
    ) -> Vec<Tensor> {
        on_every_rank(rings, runtime, |rank, ring, runtime| {
            let input = [Tensor::from_slice(&inputs[rank])];
            let mut buckets = Buckets::new(&input, BUCKET_BYTES);
            buckets.compress(compression, 2).unwrap();
            buckets.fill(&input).unwrap();
            let (mut flat, wire) = buckets.bucket(0);
            average(ring, runtime, &mut flat, wire).unwrap();
            flat
        })
    }

    #[test]
    fn compressed_gradients_round_to_16_bits_once_per_hop_and_agree_bit_for_bit() {
        let (runtime, mut rings) = must_connect_ring(2);
        let n = 4096;
        let values = |seed: f64| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    ((i as f64 * 0.618 + seed).sin() * 10f64.powf((i % 7) as f64 - 4.0)) as f32
                })
                .collect()
        };
        let inputs = [values(0.1), values(2.3)];
        let (a, b) = (
            Tensor::from_slice(&inputs[0]),
            Tensor::from_slice(&inputs[1]),
        );
        let exact = (&a + &b) / 2.0;
        let plain = averaged(&mut rings, &runtime, &inputs, GradientCompression::None);
        assert_eq!(
            bits(&plain[0]),
            bits(&exact),
            "uncompressed is f32's average"
        );
        for (compression, kind, precision) in [
            (GradientCompression::Bf16, Kind::BFloat16, 2f64.powi(-8)),
            (GradientCompression::F16, Kind::Half, 2f64.powi(-11)),
        ] {
            let out = averaged(&mut rings, &runtime, &inputs, compression);
            assert_eq!(bits(&out[0]), bits(&out[1]), "{compression:?}: ranks agree");
            // Each rank rounds its half; the hop adds in f32 and rounds once.
            let round = |t: &Tensor| t.to_kind(kind).to_kind(Kind::Float);
            let expected = round(&(round(&(&a / 2.0)) + round(&(&b / 2.0))));
            assert_eq!(bits(&out[0]), bits(&expected), "{compression:?}");
            assert_ne!(bits(&out[0]), bits(&exact), "{compression:?} rounds");
            // Three roundings (both halves, then their sum), each off by at
            // most `precision` relative (half an ulp), or by half of f16's
            // smallest subnormal, 2^-25, below its normal range.
            let bound = (a.abs() / 2.0 + b.abs() / 2.0 + exact.abs()) * (precision * 1.001)
                + 3.0 * 2f64.powi(-25);
            let excess = (&out[0] - &exact).abs() - bound;
            assert!(
                excess.max().double_value(&[]) <= 0.0,
                "{compression:?}: off by more than three roundings"
            );
        }
        // Dividing before rounding keeps an f16 average that f16 holds
        // finite even when the sum would overflow (65504 is f16's largest).
        let big = [
            vec![60000f32, -60000.0, 0.5],
            vec![60000f32, -60000.0, 0.25],
        ];
        let out = averaged(&mut rings, &runtime, &big, GradientCompression::F16);
        assert_eq!(
            Vec::<f32>::try_from(&out[1]).unwrap(),
            [60000.0, -60000.0, 0.375]
        );
    }

    #[test]
    fn host_conversions_round_as_libtorch_does() {
        let tie = 1.0 + 2f32.powi(-8); // halfway between two bf16 values
        let values = vec![
            0.0f32,
            -0.0,
            1.0,
            -3.75,
            tie,
            -tie,
            1.0 + 3.0 * 2f32.powi(-9),
            1.0 + 2f32.powi(-11), // an f16 tie
            1e-5,                 // an f16 subnormal
            -7e-8,                // rounds to f16's smallest subnormal
            1e-9,                 // 0 in f16
            65519.0,              // the largest that rounds to f16's largest
            65520.0 * 2.0,        // f16 infinity (after the division)
            3e38,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
        ];
        for (kind, world) in [(Kind::BFloat16, 2), (Kind::Half, 2), (Kind::BFloat16, 3)] {
            let flat = Tensor::from_slice(&values);
            let mut wire = Tensor::empty([values.len() as i64], (kind, Device::Cpu));
            narrow(&flat, &mut wire, world).unwrap();
            let expected = (&flat / world as f64).to_kind(kind);
            // Bits, but any NaN as one value (libtorch keeps x86's sign).
            let as_bits = |t: &Tensor| -> Vec<i16> {
                let bits = Vec::<i16>::try_from(t.view_dtype(Kind::Int16)).unwrap();
                let nan = Vec::<bool>::try_from(t.isnan()).unwrap();
                bits.into_iter()
                    .zip(nan)
                    .map(|(b, nan)| if nan { i16::MIN } else { b })
                    .collect()
            };
            assert_eq!(as_bits(&wire), as_bits(&expected), "{kind:?} / {world}");
            let mut back = flat.zeros_like();
            widen(&wire, &mut back).unwrap();
            let widened = Vec::<f32>::try_from(&back).unwrap();
            let libtorch = Vec::<f32>::try_from(wire.to_kind(Kind::Float)).unwrap();
            for (ours, theirs) in widened.iter().zip(&libtorch) {
                assert!(
                    ours.to_bits() == theirs.to_bits() || ours.is_nan() && theirs.is_nan(),
                    "{kind:?}: {ours} vs {theirs}"
                );
            }
        }
    }

    #[test]
    fn only_f32_buckets_are_compressed() {
        let tensors = [
            Tensor::from_slice(&[1.0f32, 2.0]),
            Tensor::from_slice(&[3.0f64]),
        ];
        let mut buckets = Buckets::new(&tensors, BUCKET_BYTES);
        assert!(buckets.wire.is_empty());
        buckets.compress(GradientCompression::Bf16, 2).unwrap();
        let kinds: Vec<Option<Kind>> = (0..2)
            .map(|i| buckets.bucket(i).1.map(|w| w.kind()))
            .collect();
        assert_eq!(kinds, [Some(Kind::BFloat16), None]);
        assert_eq!(buckets.bucket(0).1.unwrap().numel(), 2);
        buckets.compress(GradientCompression::None, 2).unwrap();
        assert!(buckets.bucket(0).1.is_none());
    }

    /// Two ranks train a small MLP (and a CNN, whose batch-norm buffers
    /// are averaged too) for two epochs with `compression`; returns each
    /// rank's parameter and buffer bits and the two epochs' train losses.
    fn train_two_ranks(
        dir: &std::path::Path,
        model: ringleader_spec::job::ModelSpec,
        compression: GradientCompression,
    ) -> Vec<(Vec<Vec<u32>>, [f64; 2])> {
        use ringleader_spec::JobSpec;
        let spec: JobSpec = serde_json::from_value(serde_json::json!({
            "name": "compressed", "workers": 2, "epochs": 2, "batch_size": 8, "seed": 7,
            "dataset": {"format": "npy", "classes": 3,
                        "train": {"features": dir.join("x.npy"), "labels": dir.join("y.npy")}},
            "model": model,
            "optimizer": {"kind": "sgd", "lr": 0.05, "momentum": 0.9},
            "gradient_compression": compression,
        }))
        .unwrap();
        let confinement = crate::confine::Confinement::new([dir], [dir]).unwrap();
        let (runtime, mut rings) = must_connect_ring(2);
        on_every_rank(&mut rings, &runtime, |rank, ring, runtime| {
            let segment = Segment {
                spec: spec.clone(),
                rank,
                world: 2,
                start_epoch: 0,
                stop_epoch: 2,
                checkpoint_dir: dir.join("checkpoints"),
                device: Device::Cpu,
                confinement: confinement.clone(),
            };
            let mut trainer = Trainer::new(&segment, ring, runtime).unwrap();
            let losses = [1, 2].map(|epoch| trainer.epoch(epoch).unwrap()["train_loss"]);
            let tensors = trainer.params.iter().chain(&trainer.buffers);
            let tensor_bits = tensors
                .filter(|t| t.kind() == Kind::Float)
                .map(bits)
                .collect();
            (tensor_bits, losses)
        })
    }

    /// 256 examples of 1×12×12 images whose class is the brightest third.
    fn write_npy_dataset(dir: &std::path::Path) {
        let npy = |descr: &str, shape: &str, data: &[u8]| {
            let mut header =
                format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({shape}), }}");
            while (10 + header.len() + 1) % 64 != 0 {
                header.push(' ');
            }
            header.push('\n');
            let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
            bytes.extend((header.len() as u16).to_le_bytes());
            bytes.extend(header.as_bytes());
            bytes.extend(data);
            bytes
        };
        let (mut features, mut labels) = (Vec::new(), Vec::new());
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..256 {
            let mut sums = [0f32; 3];
            for pixel in 0..144 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let x = (state >> 40) as f32 / (1u64 << 24) as f32;
                sums[pixel * 3 / 144] += x;
                features.extend(x.to_le_bytes());
            }
            let label = (0..3).max_by(|&i, &j| sums[i].total_cmp(&sums[j])).unwrap();
            labels.push(label as u8);
        }
        std::fs::write(dir.join("x.npy"), npy("<f4", "256, 1, 12, 12", &features)).unwrap();
        std::fs::write(dir.join("y.npy"), npy("|u1", "256,", &labels)).unwrap();
        // Two classes: the brightest third or not.
        let binary: Vec<u8> = labels.iter().map(|&l| u8::from(l == 2)).collect();
        std::fs::write(dir.join("y2.npy"), npy("|u1", "256,", &binary)).unwrap();
    }

    /// Each rank's evaluations of the validation and the test split of a
    /// job (`validation_fraction` 0.25, the same files as test) on `world`
    /// ranks, with the untrained model every rank builds from the seed.
    fn evaluate_on(
        dir: &std::path::Path,
        world: usize,
        classes: u32,
        labels: &str,
    ) -> Vec<[Evaluation; 2]> {
        use ringleader_spec::JobSpec;
        let split = serde_json::json!({"features": dir.join("x.npy"), "labels": dir.join(labels)});
        let spec: JobSpec = serde_json::from_value(serde_json::json!({
            "name": "evaluate", "workers": world, "epochs": 1, "seed": 11,
            "eval_batch_size": 7,
            "dataset": {"format": "npy", "classes": classes, "train": split, "test": split,
                        "validation_fraction": 0.25},
            "model": {"kind": "mlp", "hidden": [8]},
        }))
        .unwrap();
        let confinement = crate::confine::Confinement::new([dir], [dir]).unwrap();
        let (runtime, mut rings) = must_connect_ring(world);
        on_every_rank(&mut rings, &runtime, |rank, ring, runtime| {
            let segment = Segment {
                spec: spec.clone(),
                rank,
                world,
                start_epoch: 0,
                stop_epoch: 1,
                checkpoint_dir: dir.join("checkpoints"),
                device: Device::Cpu,
                confinement: confinement.clone(),
            };
            let mut trainer = Trainer::new(&segment, ring, runtime).unwrap();
            assert_eq!(trainer.data.validation.as_ref().unwrap().len(), 64);
            assert_eq!(trainer.data.train.len(), 192);
            [Evaluated::Validation, Evaluated::Test]
                .map(|which| trainer.evaluate(which).unwrap().expect("a split"))
        })
    }

    #[test]
    fn under_file_sharding_each_rank_holds_out_a_stratified_part_of_its_own_files() {
        use ringleader_spec::JobSpec;
        let dir = tempfile::tempdir().unwrap();
        // 4 files of 40 rows: feature 0 is the file, feature 1 the row, the
        // label row % 4 (10 of each class per file).
        let files: Vec<PathBuf> = (0..4)
            .map(|file| {
                let path = dir.path().join(format!("part-{file}.csv"));
                let rows: String = (0..40)
                    .map(|row| format!("{file},{row},{}\n", row % 4))
                    .collect();
                std::fs::write(&path, rows).unwrap();
                path
            })
            .collect();
        let spec: JobSpec = serde_json::from_value(serde_json::json!({
            "name": "sharded", "workers": 2, "epochs": 1, "seed": 3,
            "dataset": {"format": "csv", "classes": 4, "sharding": "files",
                        "train": {"files": files, "header": false},
                        "validation_fraction": 0.25},
            "model": {"kind": "mlp", "hidden": [4]},
        }))
        .unwrap();
        let confinement = crate::confine::Confinement::new([dir.path()], [dir.path()]).unwrap();
        let held_out = || {
            let (runtime, mut rings) = must_connect_ring(2);
            on_every_rank(&mut rings, &runtime, |rank, ring, runtime| {
                let segment = Segment {
                    spec: spec.clone(),
                    rank,
                    world: 2,
                    start_epoch: 0,
                    stop_epoch: 1,
                    checkpoint_dir: dir.path().join("checkpoints"),
                    device: Device::Cpu,
                    confinement: confinement.clone(),
                };
                let mut trainer = Trainer::new(&segment, ring, runtime).unwrap();
                let rows = |split: &Split| -> Vec<(i64, i64, i64)> {
                    let x = Vec::<f32>::try_from(split.features.reshape([-1])).unwrap();
                    let y = Vec::<i64>::try_from(&split.labels).unwrap();
                    x.chunks(2)
                        .zip(y)
                        .map(|(f, y)| (f[0] as i64, f[1] as i64, y))
                        .collect()
                };
                let validation = rows(trainer.data.validation.as_ref().unwrap());
                let train = rows(&trainer.data.train);
                let evaluation = trainer.evaluate(Evaluated::Validation).unwrap().unwrap();
                (validation, train, evaluation.examples)
            })
        };
        let ranks = held_out();
        let mut files_seen = Vec::new();
        for (validation, train, examples) in &ranks {
            // Its own 2 files (80 rows): 20 held out, 5 of each class.
            assert_eq!((validation.len(), train.len()), (20, 60));
            for class in 0..4 {
                assert_eq!(validation.iter().filter(|r| r.2 == class).count(), 5);
            }
            let own: std::collections::BTreeSet<i64> = train.iter().map(|r| r.0).collect();
            assert_eq!(own.len(), 2, "two files per rank");
            assert!(
                validation.iter().all(|r| own.contains(&r.0)),
                "only its own files"
            );
            assert!(
                validation.iter().all(|r| !train.contains(r)),
                "held out, not trained on"
            );
            assert_eq!(*examples, 40, "the ranks' parts together");
            files_seen.extend(own);
        }
        files_seen.sort_unstable();
        assert_eq!(files_seen, [0, 1, 2, 3], "the files are dealt disjointly");
        assert_eq!(
            held_out(),
            ranks,
            "the same seed and files, the same hold-out"
        );
    }

    #[test]
    fn a_separate_validation_split_is_read_whole_and_evaluated_by_every_rank() {
        use ringleader_spec::JobSpec;
        let dir = tempfile::tempdir().unwrap();
        write_npy_dataset(dir.path());
        let split = serde_json::json!({"features": dir.path().join("x.npy"),
                                       "labels": dir.path().join("y.npy")});
        let spec: JobSpec = serde_json::from_value(serde_json::json!({
            "name": "separate", "workers": 2, "epochs": 1, "seed": 2,
            "dataset": {"format": "npy", "classes": 3, "train": split,
                        "validation": split, "limit_train": 100},
            "model": {"kind": "mlp", "hidden": [4]},
        }))
        .unwrap();
        let confinement = crate::confine::Confinement::new([dir.path()], [dir.path()]).unwrap();
        let (runtime, mut rings) = must_connect_ring(2);
        let sizes = on_every_rank(&mut rings, &runtime, |rank, ring, runtime| {
            let segment = Segment {
                spec: spec.clone(),
                rank,
                world: 2,
                start_epoch: 0,
                stop_epoch: 1,
                checkpoint_dir: dir.path().join("checkpoints"),
                device: Device::Cpu,
                confinement: confinement.clone(),
            };
            let mut trainer = Trainer::new(&segment, ring, runtime).unwrap();
            let evaluation = trainer.evaluate(Evaluated::Validation).unwrap().unwrap();
            (
                trainer.data.train.len(),
                trainer.data.validation.as_ref().unwrap().len(),
                evaluation.examples,
            )
        });
        // limit_train cuts the training split only; each rank evaluates
        // half of the validation split and the counts add up.
        assert_eq!(sizes, [(100, 256, 256), (100, 256, 256)]);
    }

    #[test]
    fn ranks_together_evaluate_as_one_rank_does() {
        let dir = tempfile::tempdir().unwrap();
        write_npy_dataset(dir.path());
        for (classes, labels) in [(3, "y.npy"), (2, "y2.npy")] {
            let one = evaluate_on(dir.path(), 1, classes, labels).remove(0);
            let two = evaluate_on(dir.path(), 2, classes, labels);
            let three = evaluate_on(dir.path(), 3, classes, labels);
            let [validation, test] = &one;
            assert_eq!((validation.examples, test.examples), (64, 256));
            assert_eq!(validation.roc_auc.is_some(), classes == 2);
            let confusion = test.confusion.as_ref().unwrap();
            assert_eq!(confusion.len(), classes as usize);
            let labelled: Vec<u64> = confusion.iter().map(|row| row.iter().sum()).collect();
            assert_eq!(labelled.iter().sum::<u64>(), 256);
            for (world, ranks) in [(2, &two), (3, &three)] {
                for (rank, evaluations) in ranks.iter().enumerate() {
                    for (many, alone) in evaluations.iter().zip(&one) {
                        let what = format!("{classes} classes, rank {rank} of {world}");
                        // Counts, and what they give, exactly; the loss up to
                        // the order of the summation.
                        assert_eq!(many.confusion, alone.confusion, "{what}");
                        assert_eq!(many.recall, alone.recall, "{what}");
                        assert_eq!(many.accuracy, alone.accuracy, "{what}");
                        assert_eq!(many.macro_f1, alone.macro_f1, "{what}");
                        assert_eq!(many.roc_auc, alone.roc_auc, "{what}");
                        assert!((many.loss - alone.loss).abs() < 1e-5, "{what}");
                    }
                }
            }
        }
    }

    #[test]
    fn ranks_that_train_on_compressed_gradients_stay_bit_identical() {
        use ringleader_spec::job::ModelSpec;
        let dir = tempfile::tempdir().unwrap();
        write_npy_dataset(dir.path());
        let models = [
            ModelSpec::Mlp {
                hidden: vec![32],
                dropout: 0.0,
            },
            ModelSpec::Cnn {
                channels: [4, 8],
                hidden: 16,
                kernel: 3,
                dropout: 0.0,
            },
        ];
        for model in models {
            let plain = train_two_ranks(dir.path(), model.clone(), GradientCompression::None);
            assert_eq!(plain[0], plain[1], "{model:?}: f32 replicas equal");
            for compression in [GradientCompression::Bf16, GradientCompression::F16] {
                let runs = train_two_ranks(dir.path(), model.clone(), compression);
                let what = format!("{model:?} with {compression:?}");
                assert_eq!(runs[0].0, runs[1].0, "{what}: replicas differ");
                assert_eq!(runs[0].1, runs[1].1, "{what}: ranks disagree on losses");
                assert_ne!(runs[0].0, plain[0].0, "{what}: nothing was rounded");
                let [first, second] = runs[0].1;
                assert!(second < first, "{what}: loss {first} → {second}");
                let [plain_first, plain_second] = plain[0].1;
                assert!(
                    (second - plain_second).abs() < 0.05 * plain_second,
                    "{what}: loss {second}, uncompressed {plain_second} (first epoch \
                     {first} vs {plain_first})"
                );
            }
        }
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

    /// `n` examples of two Gaussian blobs 3 apart in 2-D (unit variance),
    /// a `minority` fraction of them class 1, as CSV with a header.
    fn write_blobs_csv(path: &std::path::Path, n: usize, minority: f64, mut state: u64) {
        let mut uniform = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let mut text = String::from("x,y,label\n");
        for i in 0..n {
            let class = usize::from((i as f64 + 0.5) / n as f64 > 1.0 - minority);
            let shift = 3.0 / 2f64.sqrt() * class as f64;
            let (r, angle) = (
                (-2.0 * uniform().ln()).sqrt(),
                std::f64::consts::TAU * uniform(),
            );
            let (x, y) = (r * angle.cos() + shift, r * angle.sin() + shift);
            text.push_str(&format!("{x:.5},{y:.5},{class}\n"));
        }
        std::fs::write(path, text).unwrap();
    }

    /// A 95/5 training CSV and a 50/50 test CSV (the classes as common as
    /// they are where the model is used): trained plainly, the model
    /// learns the training split's prior and misses minority examples;
    /// balanced class weights, or the balanced sampler, undo that, on two
    /// ranks that agree.
    #[test]
    fn an_imbalanced_csv_reaches_better_test_macro_f1_when_balanced() {
        use ringleader_spec::JobSpec;
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        write_blobs_csv(&dir.join("train.csv"), 2000, 0.05, 0x2545_f491_4f6c_dd1d);
        write_blobs_csv(&dir.join("test.csv"), 1000, 0.5, 0x9e37_79b9_7f4a_7c15);
        let confinement = crate::confine::Confinement::new([dir], [dir]).unwrap();
        let epochs = 6;
        let run = |extra: serde_json::Value| -> f64 {
            let mut dataset = serde_json::json!({
                "format": "csv", "classes": 2,
                "train": {"files": [dir.join("train.csv")]},
                "test": {"files": [dir.join("test.csv")]},
            });
            dataset
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let spec: JobSpec = serde_json::from_value(serde_json::json!({
                "name": "imbalanced", "workers": 2, "epochs": epochs, "batch_size": 32,
                "seed": 11, "dataset": dataset,
                "model": {"kind": "mlp", "hidden": [16]},
                "optimizer": {"kind": "sgd", "lr": 0.05, "momentum": 0.9},
            }))
            .unwrap();
            let (runtime, mut rings) = must_connect_ring(2);
            let scores = on_every_rank(&mut rings, &runtime, |rank, ring, runtime| {
                let segment = Segment {
                    spec: spec.clone(),
                    rank,
                    world: 2,
                    start_epoch: 0,
                    stop_epoch: epochs,
                    checkpoint_dir: dir.join("checkpoints"),
                    device: Device::Cpu,
                    confinement: confinement.clone(),
                };
                let mut trainer = Trainer::new(&segment, ring, runtime).unwrap();
                let metrics = (1..=epochs).map(|e| trainer.epoch(e).unwrap()).last();
                metrics.unwrap()["test_macro_f1"]
            });
            assert_eq!(scores[0], scores[1], "{extra}: ranks agree");
            scores[0]
        };
        let plain = run(serde_json::json!({}));
        let weighted = run(serde_json::json!({"class_weights": "balanced"}));
        let sampled = run(serde_json::json!({"sampler": "balanced"}));
        assert!(
            weighted > plain + 0.03 && sampled > plain + 0.03,
            "test macro-F1: plain {plain:.3}, balanced weights {weighted:.3}, \
             balanced sampler {sampled:.3}"
        );
        let written = std::fs::read(dir.join("checkpoints").join(prepare::PREPARATION_FILE));
        let preparation: serde_json::Value = serde_json::from_slice(&written.unwrap()).unwrap();
        assert!(preparation.is_object(), "rank 0 wrote {preparation}");
    }

    /// With a validation hold-out, fill values come from the examples
    /// left for training, not from the whole training split.
    #[test]
    fn csv_fill_values_are_fitted_after_the_validation_hold_out() {
        use super::prepare::FittedColumn;
        use ringleader_spec::JobSpec;
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let mut text = String::from("x,label\n");
        for i in 0..40u32 {
            // Squares: any two halves have different means.
            text.push_str(&format!("{},{}\n", i * i, i % 2));
        }
        std::fs::write(dir.join("train.csv"), text).unwrap();
        let spec: JobSpec = serde_json::from_value(serde_json::json!({
            "name": "held-out", "epochs": 1, "seed": 5,
            "dataset": {"format": "csv", "classes": 2, "validation_fraction": 0.5,
                        "train": {"files": [dir.join("train.csv")]},
                        "csv": {"missing": "mean"}},
            "model": {"kind": "mlp"},
        }))
        .unwrap();
        let (runtime, mut rings) = must_connect_ring(1);
        let segment = Segment {
            spec,
            rank: 0,
            world: 1,
            start_epoch: 0,
            stop_epoch: 1,
            checkpoint_dir: dir.join("checkpoints"),
            device: Device::Cpu,
            confinement: crate::confine::Confinement::new([dir], [dir]).unwrap(),
        };
        let (data, _) = load_share(&segment, &mut rings[0], runtime.handle()).unwrap();
        let mean = |split: &Split| split.features.mean(Kind::Double).double_value(&[]);
        let (train, validation) = (mean(&data.train), mean(data.validation.as_ref().unwrap()));
        let fit = data.preparation.csv.as_ref().unwrap();
        let FittedColumn::Numeric {
            fill: Some(fill), ..
        } = fit.columns[0]
        else {
            panic!("{fit:?}")
        };
        assert!(
            (fill - train).abs() < 1e-3,
            "fill {fill}, training part's mean {train}"
        );
        assert!(
            (train - validation).abs() > 1.0,
            "the halves differ: {train} vs {validation}"
        );
    }

    /// Augmented training replays exactly from its seed (as a resumed
    /// epoch does) and trains on other images than without augmentation.
    #[test]
    fn augmented_epochs_replay_from_the_seed() {
        use ringleader_spec::JobSpec;
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        write_npy_dataset(dir);
        let confinement = crate::confine::Confinement::new([dir], [dir]).unwrap();
        let first_epoch_loss = |augment: serde_json::Value| -> f64 {
            let spec: JobSpec = serde_json::from_value(serde_json::json!({
                "name": "augmented", "epochs": 1, "batch_size": 32, "seed": 3,
                "dataset": {"format": "npy", "classes": 3, "augment": augment,
                            "train": {"features": dir.join("x.npy"), "labels": dir.join("y.npy")}},
                "model": {"kind": "cnn", "channels": [4, 8], "hidden": 16},
                "optimizer": {"kind": "sgd", "lr": 0.05},
            }))
            .unwrap();
            let (runtime, mut rings) = must_connect_ring(1);
            let segment = Segment {
                spec,
                rank: 0,
                world: 1,
                start_epoch: 0,
                stop_epoch: 1,
                checkpoint_dir: dir.join("checkpoints"),
                device: Device::Cpu,
                confinement: confinement.clone(),
            };
            let mut trainer = Trainer::new(&segment, &mut rings[0], runtime.handle()).unwrap();
            trainer.epoch(1).unwrap()["train_loss"]
        };
        let both = serde_json::json!({"crop_padding": 2, "horizontal_flip": true});
        let augmented = first_epoch_loss(both.clone());
        assert_eq!(augmented, first_epoch_loss(both), "replayed bit for bit");
        let plain = first_epoch_loss(serde_json::json!({}));
        assert_ne!(augmented, plain, "augmentation changed the batches");
    }
}
