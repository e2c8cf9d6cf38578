//! The job spec: one training run with fixed hyperparameters.
//!
//! Field names are the TOML keys users write (see `examples/`); every table
//! rejects unknown keys so a typo is an error, not a silently ignored
//! setting. A sweep's `[sweep.params]` keys are dotted paths into this
//! structure (`optimizer.lr`, `model.channels`, `batch_size`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Document, FieldError, SpecError};
use crate::prepare::{Augment, ClassWeights, CsvPreparation, Sampler};
use crate::stopping::EarlyStopping;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Shown in listings; need not be unique.
    pub name: String,
    /// Workers that train this job together (data-parallel world size).
    #[serde(default = "one")]
    pub workers: u32,
    pub epochs: u32,
    /// Examples per step on each worker.
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Batch size for evaluation (per worker).
    #[serde(default = "default_eval_batch_size")]
    pub eval_batch_size: u32,
    #[serde(default)]
    pub seed: u64,
    /// "auto" | "cpu" | "cuda" | "cuda:N"
    #[serde(default = "default_device")]
    pub device: String,
    /// Threads libtorch may use on each worker (0: libtorch's default).
    #[serde(default)]
    pub threads: u32,
    /// Required except for synthetic models, which read no data.
    #[serde(default)]
    pub dataset: DatasetSpec,
    pub model: ModelSpec,
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    #[serde(default)]
    pub schedule: ScheduleSpec,
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    /// What a worker does when training diverges (a loss turns NaN or
    /// infinite): stop the trial at once, or keep training.
    #[serde(default)]
    pub on_divergence: OnDivergence,
    /// The precision gradients travel in when the ranks average them.
    #[serde(default)]
    pub gradient_compression: GradientCompression,
    /// Stop training once a metric stops improving (see [`EarlyStopping`]).
    #[serde(default)]
    pub early_stopping: Option<EarlyStopping>,
}

/// How gradients are sent for averaging, as PyTorch DDP's
/// `bf16_compress_hook` / `fp16_compress_hook`: each rank rounds its f32
/// gradient buckets to a 16-bit float, the ring sums them (in f32 within
/// each hop, rounded once per hop), and every rank widens the one rounded
/// average back to f32. Half the bytes on the wire, a little precision
/// lost. Parameters, batch-norm statistics and metrics are never
/// compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GradientCompression {
    /// Gradients travel as f32.
    #[default]
    None,
    /// bfloat16: f32's range, 8 bits of mantissa.
    Bf16,
    /// IEEE half: 11 bits of mantissa, largest finite value 65504.
    F16,
}

/// The job's choice when a loss turns NaN or infinite after an epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDivergence {
    /// End the trial after reporting that epoch's metrics, without retries
    /// (the attempt ends as diverged: `loss is NaN at epoch 2`).
    #[default]
    Stop,
    /// Keep training; the non-finite values are reported as they are.
    Continue,
}

/// A spec file's text; an unreadable file is an error naming it.
pub fn read_spec(path: &Path) -> Result<String, SpecError> {
    std::fs::read_to_string(path).map_err(|source| SpecError::Read {
        path: path.into(),
        source,
    })
}

impl JobSpec {
    /// Reads and checks a job file; errors name the file, line and field.
    pub fn load(path: &Path) -> Result<Self, SpecError> {
        Self::parse(&read_spec(path)?, &path.display().to_string())
    }

    /// Parses and checks a job written in TOML; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, SpecError> {
        let doc = Document::parse(text, origin)?;
        let job: Self = doc.deserialize()?;
        job.validate().map_err(|e| doc.error(e))?;
        Ok(job)
    }

    /// Deserialises and checks a job held as a TOML table (a sweep's base
    /// job with overrides). The table is not a file, so errors carry only
    /// the field path; the caller knows where the table came from.
    pub fn from_table(table: &toml::Table) -> Result<Self, FieldError> {
        // Written out and parsed again so serde's spans give field paths.
        let text = toml::to_string(table)
            .map_err(|e| FieldError::new(&[], format!("cannot write the job as TOML: {e}")))?;
        let doc = Document::parse(&text, "").map_err(|e| FieldError::new(&[], e.to_string()))?;
        let job: Self = doc.deserialize_fields().map_err(|(e, _)| e)?;
        job.validate()?;
        Ok(job)
    }

    /// Checks what the types cannot: ranges, and which keys a dataset
    /// format or model needs. Dataset files are not opened (the worker
    /// reports a missing file).
    pub fn validate(&self) -> Result<(), FieldError> {
        at_least_one(self.workers, &["workers"])?;
        at_least_one(self.epochs, &["epochs"])?;
        at_least_one(self.batch_size, &["batch_size"])?;
        at_least_one(self.eval_batch_size, &["eval_batch_size"])?;
        if let Err(problem) = self.device.parse::<JobDevice>() {
            return Err(FieldError::new(&["device"], problem));
        }
        match (&self.model, self.dataset == DatasetSpec::default()) {
            (ModelSpec::Synthetic { .. }, _) => {}
            (_, true) => {
                return Err(FieldError::new(
                    &["dataset"],
                    "required (only synthetic models read no data)",
                ))
            }
            (_, false) => self.dataset.validate(self.workers)?,
        }
        self.model.validate()?;
        self.optimizer.validate()?;
        self.schedule.validate()?;
        if let Some(early_stopping) = &self.early_stopping {
            early_stopping.validate(&self.reported_metrics())?;
        }
        at_least_one(
            self.checkpoint.interval_epochs,
            &["checkpoint", "interval_epochs"],
        )
    }
}

fn at_least_one(value: u32, path: &[&str]) -> Result<(), FieldError> {
    if value == 0 {
        return Err(FieldError::new(path, "must be at least 1"));
    }
    Ok(())
}

/// In [0, 1): momentum, dropout and Adam's betas.
fn fraction(value: f64, path: &[&str]) -> Result<(), FieldError> {
    within(value, 0.0, 1.0, path)?;
    if value == 1.0 {
        return Err(FieldError::new(path, "must lie in [0, 1), got 1"));
    }
    Ok(())
}

/// Finite and in [low, high].
fn within(value: f64, low: f64, high: f64, path: &[&str]) -> Result<(), FieldError> {
    if !(low..=high).contains(&value) {
        return Err(FieldError::new(
            path,
            format!("must lie in [{low}, {high}], got {value}"),
        ));
    }
    Ok(())
}

fn non_negative(value: f64, path: &[&str]) -> Result<(), FieldError> {
    if !(value.is_finite() && value >= 0.0) {
        return Err(FieldError::new(
            path,
            format!("must be 0 or more, got {value}"),
        ));
    }
    Ok(())
}

/// Strictly positive and finite.
fn positive(value: f64, path: &[&str]) -> Result<(), FieldError> {
    if !(value.is_finite() && value > 0.0) {
        return Err(FieldError::new(
            path,
            format!("must be above 0, got {value}"),
        ));
    }
    Ok(())
}

/// Where the examples come from. `train` and `test` are read with the same
/// format; `test` may be omitted (then no evaluation metrics).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    pub format: DatasetFormat,
    pub train: SplitSpec,
    #[serde(default)]
    pub test: Option<SplitSpec>,
    /// Number of classes; labels must lie in 0..classes.
    pub classes: u32,
    #[serde(default)]
    pub normalize: Normalize,
    /// Use only the first N training examples (0: all). Handy for smoke runs.
    #[serde(default)]
    pub limit_train: u64,
    /// Use only the first N test examples (0: all).
    #[serde(default)]
    pub limit_test: u64,
    /// DistributedSampler semantics: drop the tail so every rank gets the
    /// same number of examples (true), or pad by wrapping around (false).
    #[serde(default = "yes")]
    pub drop_last: bool,
    /// Shuffle the training set every epoch (permutation from seed, epoch).
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// How the training split is divided among the workers.
    #[serde(default)]
    pub sharding: Sharding,
    /// Hold out this fraction of the training split (after `limit_train`)
    /// as the validation set, stratified by label and seeded by `seed`
    /// (see the worker's `split` module). In (0, 1).
    #[serde(default)]
    pub validation_fraction: Option<f64>,
    /// A separate validation split, read like `train` and `test`.
    #[serde(default)]
    pub validation: Option<SplitSpec>,
    /// Validate on one of k stratified, seeded folds of the training split
    /// and train on the others (one k-fold cross-validation attempt).
    #[serde(default)]
    pub folds: Option<FoldSpec>,
    /// How CSV cells become features: missing cells, categorical columns.
    #[serde(default)]
    pub csv: Option<CsvPreparation>,
    /// Weights of the classes in the training loss.
    #[serde(default)]
    pub class_weights: Option<ClassWeights>,
    /// The order of the training examples in an epoch.
    #[serde(default)]
    pub sampler: Sampler,
    /// Random crops and flips of training images.
    #[serde(default)]
    pub augment: Option<Augment>,
}

/// Fold `index` (0-based) of `count` stratified, seeded folds of the
/// training split is the validation set; the job trains on the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FoldSpec {
    pub count: u32,
    pub index: u32,
}

/// Where a job's validation examples come from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Holdout<'a> {
    /// No validation set.
    None,
    /// A stratified fraction of the training split.
    Fraction(f64),
    /// One stratified fold of the training split.
    Fold(FoldSpec),
    /// The separate split `dataset.validation`.
    Split(&'a SplitSpec),
}

/// How the ranks of a job divide a split (see `ringleader_spec::shard`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharding {
    /// `files` when the training split lists at least one file per worker
    /// (and there is more than one worker), else `examples`.
    #[default]
    Auto,
    /// Every rank reads every file and takes its interleaved share of one
    /// permutation of all examples (PyTorch's DistributedSampler).
    Examples,
    /// The files are dealt to the ranks; each opens only its own.
    Files,
}

/// No data: what a synthetic model's job may leave out.
impl Default for DatasetSpec {
    fn default() -> Self {
        Self {
            format: DatasetFormat::Csv,
            train: SplitSpec::default(),
            test: None,
            classes: 0,
            normalize: Normalize::None,
            limit_train: 0,
            limit_test: 0,
            drop_last: yes(),
            shuffle: yes(),
            sharding: Sharding::Auto,
            validation_fraction: None,
            validation: None,
            folds: None,
            csv: None,
            class_weights: None,
            sampler: Sampler::Uniform,
            augment: None,
        }
    }
}

impl DatasetSpec {
    /// Whether `workers` ranks deal the files of the splits among them
    /// rather than each reading every file.
    pub fn file_sharded(&self, workers: u32) -> bool {
        match self.sharding {
            Sharding::Examples => false,
            Sharding::Files => true,
            Sharding::Auto => workers > 1 && self.train.files.len() >= workers as usize,
        }
    }

    /// Where the validation set comes from ([`DatasetSpec::validate`]
    /// allows at most one source).
    pub fn holdout(&self) -> Holdout<'_> {
        match (self.validation_fraction, self.folds, &self.validation) {
            (Some(fraction), _, _) => Holdout::Fraction(fraction),
            (None, Some(folds), _) => Holdout::Fold(folds),
            (None, None, Some(split)) => Holdout::Split(split),
            (None, None, None) => Holdout::None,
        }
    }

    /// Whether the job reports `val_*` metrics.
    pub fn has_validation(&self) -> bool {
        self.holdout() != Holdout::None
    }

    /// At most one validation source, each within its range.
    fn validate_holdout(&self) -> Result<(), FieldError> {
        let given: Vec<&str> = [
            ("validation_fraction", self.validation_fraction.is_some()),
            ("validation", self.validation.is_some()),
            ("folds", self.folds.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect();
        if let [first, second, ..] = given[..] {
            return Err(FieldError::new(
                &["dataset", second],
                format!("cannot be combined with dataset.{first}: a job has one validation set"),
            ));
        }
        if let Some(fraction) = self.validation_fraction {
            if !(fraction > 0.0 && fraction < 1.0) {
                return Err(FieldError::new(
                    &["dataset", "validation_fraction"],
                    format!("must lie strictly between 0 and 1, got {fraction}"),
                ));
            }
        }
        if let Some(validation) = &self.validation {
            validation.validate(self.format, "validation")?;
        }
        if let Some(FoldSpec { count, index }) = self.folds {
            if count < 2 {
                return Err(FieldError::new(
                    &["dataset", "folds", "count"],
                    format!("must be at least 2, got {count}"),
                ));
            }
            if index >= count {
                return Err(FieldError::new(
                    &["dataset", "folds", "index"],
                    format!("must be below dataset.folds.count ({count}), got {index}"),
                ));
            }
            if self.limit_train > 0 && u64::from(count) > self.limit_train {
                return Err(FieldError::new(
                    &["dataset", "folds", "count"],
                    format!(
                        "{count} folds of {} training examples (dataset.limit_train): \
                         a fold would be empty",
                        self.limit_train
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate(&self, workers: u32) -> Result<(), FieldError> {
        if self.classes < 2 {
            return Err(FieldError::new(
                &["dataset", "classes"],
                format!("must be at least 2, got {}", self.classes),
            ));
        }
        self.train.validate(self.format, "train")?;
        if let Some(test) = &self.test {
            test.validate(self.format, "test")?;
        }
        self.validate_holdout()?;
        crate::prepare::validate(self, workers)?;
        if let Normalize::Fixed { mean, std } = self.normalize {
            if !mean.is_finite() {
                return Err(FieldError::new(
                    &["dataset", "normalize", "mean"],
                    "must be a finite number",
                ));
            }
            positive(std, &["dataset", "normalize", "std"])?;
        }
        if self.sharding == Sharding::Files && self.train.files.len() < workers as usize {
            return Err(FieldError::new(
                &["dataset", "sharding"],
                format!(
                    "`files` needs at least one training file per worker: dataset.train.files \
                     lists {} for {workers} workers",
                    self.train.files.len()
                ),
            ));
        }
        if self.file_sharded(workers) {
            for (key, limit) in [
                ("limit_train", self.limit_train),
                ("limit_test", self.limit_test),
            ] {
                if limit > 0 {
                    return Err(FieldError::new(
                        &["dataset", key],
                        "cannot be used when the files are sharded (the first N examples \
                         would need every file); set dataset.sharding = \"examples\"",
                    ));
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    /// MNIST-format IDX files, raw or gzip.
    Idx,
    /// Numeric features plus a label column, header optional.
    Csv,
    /// NumPy `.npy` arrays (features and labels).
    Npy,
    /// One safetensors file holding a features and a labels tensor.
    Safetensors,
}

/// One split's files. Which keys apply depends on the format:
/// idx: `images` + `labels`; csv: `files` (+ `label_column`, `header`);
/// npy: `features` + `labels`; safetensors: `files` + `features_key` +
/// `labels_key`. `files` may list several files (one shard each).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {
    #[serde(default)]
    pub images: Option<PathBuf>,
    #[serde(default)]
    pub labels: Option<PathBuf>,
    #[serde(default)]
    pub features: Option<PathBuf>,
    #[serde(default)]
    pub files: Vec<PathBuf>,
    /// CSV: index of the label column (negative counts from the end).
    #[serde(default = "last_column")]
    pub label_column: i64,
    /// CSV: whether the first line is a header. Unset: detected.
    #[serde(default)]
    pub header: Option<bool>,
    #[serde(default = "default_features_key")]
    pub features_key: String,
    #[serde(default = "default_labels_key")]
    pub labels_key: String,
}

impl SplitSpec {
    /// The keys `format` reads must be set; `split` is `train`, `test` or
    /// `validation`.
    fn validate(&self, format: DatasetFormat, split: &str) -> Result<(), FieldError> {
        let missing = |key: &str, why: &str| {
            FieldError::new(
                &["dataset", split, key],
                format!("{why} (format {format:?})"),
            )
        };
        let required = |value: &Option<PathBuf>, key: &str| match value {
            Some(_) => Ok(()),
            None => Err(missing(key, "required")),
        };
        match format {
            DatasetFormat::Idx => {
                required(&self.images, "images")?;
                required(&self.labels, "labels")
            }
            DatasetFormat::Npy => {
                required(&self.features, "features")?;
                required(&self.labels, "labels")
            }
            DatasetFormat::Csv | DatasetFormat::Safetensors if self.files.is_empty() => {
                Err(missing("files", "needs at least one file"))
            }
            DatasetFormat::Csv | DatasetFormat::Safetensors => Ok(()),
        }
    }
}

/// Input normalisation applied after scaling bytes to [0, 1].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Normalize {
    #[default]
    None,
    /// (x - mean) / std with the given constants.
    Fixed { mean: f64, std: f64 },
    /// Per-feature mean and std computed on the training split.
    Standard,
    /// Per-feature min-max scaling to [0, 1] computed on the training split.
    MinMax,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ModelSpec {
    Mlp {
        #[serde(default = "default_mlp_hidden")]
        hidden: Vec<u32>,
        #[serde(default)]
        dropout: f64,
    },
    /// Two conv + batch-norm + ReLU + max-pool blocks, then two linear
    /// layers. Defaults are the reference model (32, 64 channels, 128).
    Cnn {
        #[serde(default = "default_cnn_channels")]
        channels: [u32; 2],
        #[serde(default = "default_cnn_hidden")]
        hidden: u32,
        #[serde(default = "default_kernel")]
        kernel: u32,
        #[serde(default)]
        dropout: f64,
    },
    /// A user's TorchScript module, trained through tch's TrainableCModule.
    Torchscript { path: PathBuf },
    /// No training: the value of a test function, so sweeps and the control
    /// plane can be exercised without data. `epochs` simulate training: the
    /// reported value converges to the function's value as epochs grow.
    Synthetic {
        function: SyntheticFunction,
        /// Inputs: `x1`..`x6` for hartmann6 (in [0, 1]), `x1`, `x2` for
        /// branin (x1 in [-5, 10], x2 in [0, 15]).
        #[serde(default)]
        x1: f64,
        #[serde(default)]
        x2: f64,
        #[serde(default)]
        x3: f64,
        #[serde(default)]
        x4: f64,
        #[serde(default)]
        x5: f64,
        #[serde(default)]
        x6: f64,
        /// Simulated training time per epoch, in milliseconds.
        #[serde(default)]
        epoch_ms: u64,
    },
}

impl ModelSpec {
    fn validate(&self) -> Result<(), FieldError> {
        let widths = |values: &[u32], key: &str| {
            if values.contains(&0) {
                return Err(FieldError::new(&["model", key], "sizes must be above 0"));
            }
            Ok(())
        };
        match self {
            ModelSpec::Mlp { hidden, dropout } => {
                widths(hidden, "hidden")?;
                fraction(*dropout, &["model", "dropout"])
            }
            ModelSpec::Cnn {
                channels,
                hidden,
                kernel,
                dropout,
            } => {
                widths(channels, "channels")?;
                widths(&[*hidden], "hidden")?;
                widths(&[*kernel], "kernel")?;
                fraction(*dropout, &["model", "dropout"])
            }
            ModelSpec::Torchscript { path } if path.as_os_str().is_empty() => {
                Err(FieldError::new(&["model", "path"], "must not be empty"))
            }
            ModelSpec::Torchscript { .. } => Ok(()),
            ModelSpec::Synthetic { .. } => {
                let (function, [x1, x2, x3, x4, x5, x6]) =
                    self.synthetic_inputs().expect("a synthetic model");
                match function {
                    SyntheticFunction::Hartmann6 => [x1, x2, x3, x4, x5, x6]
                        .into_iter()
                        .zip(["x1", "x2", "x3", "x4", "x5", "x6"])
                        .try_for_each(|(x, key)| within(x, 0.0, 1.0, &["model", key])),
                    SyntheticFunction::Branin => {
                        within(x1, -5.0, 10.0, &["model", "x1"])?;
                        within(x2, 0.0, 15.0, &["model", "x2"])
                    }
                }
            }
        }
    }

    /// The synthetic objective's value at this model's inputs (`None` for
    /// models that train).
    pub fn synthetic_value(&self) -> Option<f64> {
        let (function, xs) = self.synthetic_inputs()?;
        Some(match function {
            SyntheticFunction::Branin => crate::synthetic::branin(xs[0], xs[1]),
            SyntheticFunction::Hartmann6 => crate::synthetic::hartmann6(&xs),
        })
    }

    /// A synthetic model's function and inputs x1…x6 (`None` for models
    /// that train).
    fn synthetic_inputs(&self) -> Option<(SyntheticFunction, [f64; 6])> {
        match *self {
            ModelSpec::Synthetic {
                function,
                x1,
                x2,
                x3,
                x4,
                x5,
                x6,
                ..
            } => Some((function, [x1, x2, x3, x4, x5, x6])),
            _ => None,
        }
    }

    /// What a synthetic model reports after `epoch` simulated epochs:
    /// f(x) + (1 + |f(x)|)·2^−epoch, converging to f(x) from above.
    pub fn synthetic_objective(&self, epoch: u32) -> Option<f64> {
        self.synthetic_value()
            .map(|value| value + (1.0 + value.abs()) * 0.5f64.powi(epoch as i32))
    }
}

/// Classes up to which every epoch report carries `*_recall_<class>`; with
/// more, per-class recall is only in the checkpoint's sidecar, so that a
/// report stays within the 64 metrics a report may hold (docs/LIMITS.md).
pub const MAX_RECALL_CLASSES: u32 = 20;

/// The prefixes of the evaluated splits' metrics.
pub const VALIDATION_PREFIX: &str = "val";
pub const TEST_PREFIX: &str = "test";

impl JobSpec {
    /// The metrics each epoch of this job reports that a sweep objective or
    /// an early stop may watch: `objective` for synthetic models; else
    /// `train_loss` and, per evaluated split (`val_` with a validation set,
    /// `test_` with a test split), `loss`, `accuracy`, `macro_f1`,
    /// `roc_auc` (2 classes only) and `recall_<class>` (for each class, up
    /// to [`MAX_RECALL_CLASSES`]).
    pub fn reported_metrics(&self) -> Vec<String> {
        if let ModelSpec::Synthetic { .. } = self.model {
            return vec!["objective".into()];
        }
        let dataset = &self.dataset;
        let splits = [
            (VALIDATION_PREFIX, dataset.has_validation()),
            (TEST_PREFIX, dataset.test.is_some()),
        ];
        let mut names = vec!["train_loss".to_string()];
        for (prefix, _) in splits.into_iter().filter(|(_, present)| *present) {
            names.extend(
                ["loss", "accuracy", "macro_f1"]
                    .into_iter()
                    .map(|m| format!("{prefix}_{m}")),
            );
            if dataset.classes == 2 {
                names.push(format!("{prefix}_roc_auc"));
            }
            if dataset.classes <= MAX_RECALL_CLASSES {
                names.extend((0..dataset.classes).map(|c| format!("{prefix}_recall_{c}")));
            }
        }
        names
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyntheticFunction {
    Branin,
    Hartmann6,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSpec {
    #[serde(default = "default_optimizer")]
    pub kind: OptimizerKind,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default)]
    pub momentum: f64,
    #[serde(default)]
    pub nesterov: bool,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Clip the global gradient norm to this value (unset: no clipping).
    #[serde(default)]
    pub grad_clip: Option<f64>,
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        Self {
            kind: default_optimizer(),
            lr: default_lr(),
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            betas: default_betas(),
            eps: default_eps(),
            grad_clip: None,
        }
    }
}

impl OptimizerSpec {
    fn validate(&self) -> Result<(), FieldError> {
        positive(self.lr, &["optimizer", "lr"])?;
        fraction(self.momentum, &["optimizer", "momentum"])?;
        if self.nesterov && self.momentum == 0.0 {
            return Err(FieldError::new(
                &["optimizer", "nesterov"],
                "nesterov needs momentum above 0",
            ));
        }
        non_negative(self.weight_decay, &["optimizer", "weight_decay"])?;
        for beta in self.betas {
            fraction(beta, &["optimizer", "betas"])?;
        }
        positive(self.eps, &["optimizer", "eps"])?;
        match self.grad_clip {
            Some(clip) => positive(clip, &["optimizer", "grad_clip"]),
            None => Ok(()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Sgd,
    Adam,
    AdamW,
}

/// Learning-rate schedule, stepped per optimiser step; `warmup_steps`
/// ramps linearly from 0 to the scheduled rate first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    #[serde(default)]
    pub kind: ScheduleKind,
    #[serde(default)]
    pub warmup_steps: u64,
    /// step: multiply by `gamma` every `step_epochs` epochs.
    #[serde(default = "one")]
    pub step_epochs: u32,
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    /// cosine: the rate it anneals to at the last epoch.
    #[serde(default)]
    pub min_lr: f64,
}

// Written out so an omitted `[schedule]` gets the same values as an empty
// one (a derived Default would make `step_epochs` and `gamma` 0).
impl Default for ScheduleSpec {
    fn default() -> Self {
        Self {
            kind: ScheduleKind::default(),
            warmup_steps: 0,
            step_epochs: one(),
            gamma: default_gamma(),
            min_lr: 0.0,
        }
    }
}

impl ScheduleSpec {
    fn validate(&self) -> Result<(), FieldError> {
        at_least_one(self.step_epochs, &["schedule", "step_epochs"])?;
        positive(self.gamma, &["schedule", "gamma"])?;
        non_negative(self.min_lr, &["schedule", "min_lr"])
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    #[default]
    Constant,
    Step,
    Cosine,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Shared directory for checkpoints (every worker of a trial must see
    /// it). Unset: the coordinator's default (`--checkpoint-dir`).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Save every N epochs (and always at the end of a run segment).
    #[serde(default = "one")]
    pub interval_epochs: u32,
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            dir: None,
            interval_epochs: 1,
        }
    }
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}
fn default_batch_size() -> u32 {
    64
}
fn default_eval_batch_size() -> u32 {
    1000
}
fn default_device() -> String {
    "auto".into()
}
fn last_column() -> i64 {
    -1
}
fn default_features_key() -> String {
    "features".into()
}
fn default_labels_key() -> String {
    "labels".into()
}
/// What a `device` string ("auto" | "cpu" | "cuda" | "cuda:N") asks for:
/// the one parser the spec check, the leader's placement and the worker
/// share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobDevice {
    /// The worker's own device.
    Auto,
    Cpu,
    /// A GPU, whichever the worker has.
    AnyCuda,
    /// GPU N.
    Cuda(u32),
}

impl JobDevice {
    /// How many GPUs a worker must have to run it.
    pub fn gpus_needed(self) -> usize {
        match self {
            Self::Auto | Self::Cpu => 0,
            Self::AnyCuda => 1,
            Self::Cuda(n) => n as usize + 1,
        }
    }
}

impl std::str::FromStr for JobDevice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::AnyCuda),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("expected auto, cpu, cuda or cuda:N, got `{other}`")),
        }
    }
}

fn default_mlp_hidden() -> Vec<u32> {
    vec![128]
}
fn default_cnn_channels() -> [u32; 2] {
    [32, 64]
}
fn default_cnn_hidden() -> u32 {
    128
}
fn default_kernel() -> u32 {
    3
}
fn default_optimizer() -> OptimizerKind {
    OptimizerKind::Sgd
}
fn default_lr() -> f64 {
    0.01
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_gamma() -> f64 {
    0.1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Location;

    const GOOD: &str = r#"name = "fmnist"
workers = 2
epochs = 1

[dataset]
format = "idx"
classes = 10
train = { images = "train-images.gz", labels = "train-labels.gz" }

[dataset.test]
images = "t10k-images.gz"
labels = "t10k-labels.gz"

[model]
kind = "cnn"

[optimizer]
kind = "sgd"
lr = 0.05
momentum = 0.9
"#;

    /// The error for GOOD with `from` replaced by `to`.
    fn error(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "{from}");
        JobSpec::parse(&GOOD.replacen(from, to, 1), "job.toml")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_good_job_parses() {
        let job = JobSpec::parse(GOOD, "job.toml").unwrap();
        assert_eq!(job.workers, 2);
        assert_eq!(job.optimizer.lr, 0.05);
        assert!(matches!(
            job.model,
            ModelSpec::Cnn {
                channels: [32, 64],
                ..
            }
        ));
        assert_eq!(job.schedule, ScheduleSpec::default());
        assert_eq!(job.schedule.step_epochs, 1);
    }

    #[test]
    fn type_errors_name_file_line_and_field() {
        for (from, to, expected) in [
            (
                "kind = \"sgd\"",
                "kind = \"adagrad\"",
                "job.toml:18:8: optimizer.kind: unknown variant `adagrad`, expected one of `sgd`, `adam`, `adamw`",
            ),
            ("lr = 0.05", "lrr = 0.05", "job.toml:19:1: optimizer.lrr: unknown field `lrr`"),
            ("epochs = 1\n", "", "job.toml:1:1: epochs: missing field `epochs`"),
            ("format = \"idx\"", "format = \"idx\"\nbogus = 1", "job.toml:7:1: dataset.bogus: unknown field"),
            (
                "labels = \"train-labels.gz\" ",
                "labels = 3 ",
                "job.toml:8:48: dataset.train.labels: invalid type: integer `3`",
            ),
            ("kind = \"cnn\"", "kind = \"cnn\"\nchannels = [1]", "job.toml:14:1: model: invalid length 1"),
            ("[optimizer]", "[optimizer", "job.toml:17:11: unclosed table"),
        ] {
            let message = error(from, to);
            assert!(message.starts_with(expected), "{message}\nexpected {expected}");
        }
    }

    #[test]
    fn errors_expose_their_location() {
        let err = JobSpec::parse(&GOOD.replace("lr = 0.05", "lr = 0.0"), "job.toml").unwrap_err();
        assert_eq!(
            err.location(),
            Some(Location {
                line: 19,
                column: 1
            })
        );
    }

    #[test]
    fn range_errors_point_at_the_field_or_its_table() {
        for (from, to, expected) in [
            (
                "workers = 2",
                "workers = 0",
                "job.toml:2:1: workers: must be at least 1",
            ),
            (
                "epochs = 1",
                "epochs = 0",
                "job.toml:3:1: epochs: must be at least 1",
            ),
            (
                "workers = 2",
                "batch_size = 0",
                "job.toml:2:1: batch_size: must be at least 1",
            ),
            (
                "workers = 2",
                "device = \"gpu\"",
                "job.toml:2:1: device: expected auto, cpu, cuda or cuda:N",
            ),
            (
                "lr = 0.05",
                "lr = -1.0",
                "job.toml:19:1: optimizer.lr: must be above 0",
            ),
            (
                "lr = 0.05",
                "lr = nan",
                "job.toml:19:1: optimizer.lr: must be above 0",
            ),
            (
                "momentum = 0.9",
                "momentum = 1.0",
                "job.toml:20:1: optimizer.momentum: must lie in [0, 1)",
            ),
            (
                "momentum = 0.9",
                "nesterov = true",
                "job.toml:20:1: optimizer.nesterov: nesterov needs momentum",
            ),
            (
                "momentum = 0.9",
                "weight_decay = -0.1",
                "job.toml:20:1: optimizer.weight_decay: must be 0 or more",
            ),
            (
                "momentum = 0.9",
                "betas = [0.9, 1.5]",
                "job.toml:20:1: optimizer.betas: must lie in [0, 1]",
            ),
            (
                "classes = 10",
                "classes = 1",
                "job.toml:7:1: dataset.classes: must be at least 2",
            ),
            (
                "kind = \"cnn\"",
                "kind = \"cnn\"\ndropout = 1.0",
                "job.toml:16:1: model.dropout: must lie in [0, 1)",
            ),
            (
                "kind = \"cnn\"",
                "kind = \"cnn\"\nchannels = [8, 0]",
                "job.toml:16:1: model.channels: sizes must be above 0",
            ),
            (
                "kind = \"cnn\"",
                "kind = \"mlp\"\nhidden = [0]",
                "job.toml:16:1: model.hidden: sizes must be above 0",
            ),
            // A key left out is reported at its table's header.
            (
                "[dataset.test]\nimages = \"t10k-images.gz\"\n",
                "[dataset.test]\n",
                "job.toml:10:10: dataset.test.images: required (format Idx)",
            ),
            (
                "format = \"idx\"",
                "format = \"csv\"",
                "job.toml:8:1: dataset.train.files: needs at least one file",
            ),
            (
                "format = \"idx\"",
                "format = \"npy\"",
                "job.toml:8:1: dataset.train.features: required (format Npy)",
            ),
            (
                "momentum = 0.9",
                "momentum = 0.9\n[checkpoint]\ninterval_epochs = 0",
                "job.toml:22:1: checkpoint.interval_epochs: must be at least 1",
            ),
        ] {
            let message = error(from, to);
            assert!(
                message.starts_with(expected),
                "{message}\nexpected {expected}"
            );
        }
    }

    #[test]
    fn file_sharding_needs_a_file_per_worker_and_no_limits() {
        let job = |dataset: &str| {
            JobSpec::parse(
                &format!(
                    "name = \"x\"\nworkers = 2\nepochs = 1\n[dataset]\nformat = \"csv\"\n\
                     classes = 3\n{dataset}\n[model]\nkind = \"mlp\"\n\
                     [optimizer]\nkind = \"sgd\"\nlr = 0.1\n"
                ),
                "job.toml",
            )
        };
        let two = "train = { files = [\"a.csv\", \"b.csv\"] }";
        let auto = job(two).unwrap().dataset;
        assert!(auto.file_sharded(2), "auto: a file per worker");
        assert!(!auto.file_sharded(3), "auto: too few files");
        assert!(!auto.file_sharded(1), "auto: one worker reads everything");
        let examples = job(&format!("sharding = \"examples\"\n{two}")).unwrap();
        assert!(!examples.dataset.file_sharded(2));
        let err = job("sharding = \"files\"\ntrain = { files = [\"a.csv\"] }")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "job.toml:7:1: dataset.sharding: `files` needs at least one training file per worker"
            ),
            "{err}"
        );
        let err = job(&format!("limit_train = 10\n{two}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "job.toml:7:1: dataset.limit_train: cannot be used when the files are sharded"
            ),
            "{err}"
        );
        job(&format!("limit_train = 10\nsharding = \"examples\"\n{two}")).unwrap();
    }

    #[test]
    fn validation_sources_parse_and_report_val_metrics() {
        let with = |line: &str| {
            JobSpec::parse(
                &GOOD.replacen("classes = 10\n", &format!("classes = 10\n{line}\n"), 1),
                "job.toml",
            )
            .unwrap()
        };
        let plain = JobSpec::parse(GOOD, "job.toml").unwrap();
        assert_eq!(plain.dataset.holdout(), Holdout::None);
        assert!(!plain
            .reported_metrics()
            .iter()
            .any(|m| m.starts_with("val_")));
        let fraction = with("validation_fraction = 0.1");
        assert_eq!(fraction.dataset.holdout(), Holdout::Fraction(0.1));
        let folds = with("folds = { count = 5, index = 4 }");
        assert_eq!(
            folds.dataset.holdout(),
            Holdout::Fold(FoldSpec { count: 5, index: 4 })
        );
        let split = with("validation = { images = \"v-images.gz\", labels = \"v-labels.gz\" }");
        assert!(matches!(split.dataset.holdout(), Holdout::Split(s) if s.images.is_some()));
        for job in [&fraction, &folds, &split] {
            let metrics = job.reported_metrics();
            for name in [
                "train_loss",
                "val_loss",
                "val_accuracy",
                "val_macro_f1",
                "val_recall_0",
            ] {
                assert!(metrics.iter().any(|m| m == name), "{name} in {metrics:?}");
            }
            assert!(metrics.iter().any(|m| m == "val_recall_9"));
            assert!(
                !metrics.iter().any(|m| m == "val_recall_10"),
                "only real classes"
            );
            assert!(
                !metrics.iter().any(|m| m.ends_with("roc_auc")),
                "10 classes"
            );
            let json = serde_json::to_string(job).unwrap();
            assert_eq!(&serde_json::from_str::<JobSpec>(&json).unwrap(), job);
        }
        let binary = JobSpec::parse(
            &GOOD.replacen(
                "classes = 10\n",
                "classes = 2\nvalidation_fraction = 0.5\n",
                1,
            ),
            "job.toml",
        )
        .unwrap();
        assert_eq!(
            binary.reported_metrics(),
            [
                "train_loss",
                "val_loss",
                "val_accuracy",
                "val_macro_f1",
                "val_roc_auc",
                "val_recall_0",
                "val_recall_1",
                "test_loss",
                "test_accuracy",
                "test_macro_f1",
                "test_roc_auc",
                "test_recall_0",
                "test_recall_1",
            ]
        );
        // Many classes: recall only in the checkpoint, the report stays small.
        let many = JobSpec::parse(
            &GOOD.replacen(
                "classes = 10\n",
                "classes = 1000\nvalidation_fraction = 0.5\n",
                1,
            ),
            "job.toml",
        )
        .unwrap();
        assert_eq!(many.reported_metrics().len(), 7);
    }

    #[test]
    fn bad_validation_settings_name_the_field_and_line() {
        for (line, expected) in [
            (
                "validation_fraction = 0.0",
                "job.toml:8:1: dataset.validation_fraction: must lie strictly between 0 and 1, got 0",
            ),
            (
                "validation_fraction = 1.0",
                "job.toml:8:1: dataset.validation_fraction: must lie strictly between 0 and 1, got 1",
            ),
            (
                "validation_fraction = -0.2",
                "job.toml:8:1: dataset.validation_fraction: must lie strictly between 0 and 1, got -0.2",
            ),
            (
                "validation_fraction = nan",
                "job.toml:8:1: dataset.validation_fraction: must lie strictly between 0 and 1, got NaN",
            ),
            (
                "validation_fraction = \"10%\"",
                "job.toml:8:23: dataset.validation_fraction: invalid type: string",
            ),
            (
                "folds = { count = 1, index = 0 }",
                "job.toml:8:11: dataset.folds.count: must be at least 2, got 1",
            ),
            (
                "folds = { count = 3, index = 3 }",
                "job.toml:8:22: dataset.folds.index: must be below dataset.folds.count (3), got 3",
            ),
            (
                "folds = { count = 3 }",
                "job.toml:8:1: dataset.folds.index: missing field `index`",
            ),
            (
                "folds = { count = 3, index = 0, seed = 1 }",
                "job.toml:8:33: dataset.folds.seed: unknown field `seed`",
            ),
            (
                "limit_train = 4\nfolds = { count = 5, index = 0 }",
                "job.toml:9:11: dataset.folds.count: 5 folds of 4 training examples",
            ),
            (
                "validation_fraction = 0.1\nfolds = { count = 5, index = 0 }",
                "job.toml:9:1: dataset.folds: cannot be combined with dataset.validation_fraction",
            ),
            (
                "validation = { images = \"v.gz\", labels = \"vl.gz\" }\nvalidation_fraction = 0.1",
                "job.toml:8:1: dataset.validation: cannot be combined with \
                 dataset.validation_fraction",
            ),
            (
                "validation = { images = \"v.gz\" }",
                "job.toml:8:1: dataset.validation.labels: required (format Idx)",
            ),
        ] {
            let message = error("classes = 10\n", &format!("classes = 10\n{line}\n"));
            assert!(
                message.starts_with(expected),
                "{message}\nexpected {expected}"
            );
        }
    }

    #[test]
    fn synthetic_inputs_must_lie_in_the_function_domain() {
        let job = |model: &str| {
            let text = format!("name = \"s\"\nepochs = 1\n[model]\n{model}");
            JobSpec::parse(&text, "s.toml")
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        job("kind = \"synthetic\"\nfunction = \"branin\"\nx1 = -5.0\nx2 = 15.0").unwrap();
        let err = job("kind = \"synthetic\"\nfunction = \"branin\"\nx2 = 16.0").unwrap_err();
        assert!(
            err.starts_with("s.toml:6:1: model.x2: must lie in [0, 15]"),
            "{err}"
        );
        let err = job("kind = \"synthetic\"\nfunction = \"hartmann6\"\nx6 = -0.1").unwrap_err();
        assert!(
            err.starts_with("s.toml:6:1: model.x6: must lie in [0, 1]"),
            "{err}"
        );
    }

    #[test]
    fn only_synthetic_models_may_omit_the_dataset() {
        let start = GOOD.find("[dataset]").unwrap();
        let end = GOOD.find("[model]").unwrap();
        let text = format!("{}{}", &GOOD[..start], &GOOD[end..]);
        let err = JobSpec::parse(&text, "job.toml").unwrap_err().to_string();
        assert!(err.starts_with("job.toml:1:1: dataset: required"), "{err}");
    }

    #[test]
    fn on_divergence_defaults_to_stop_and_parses_continue() {
        assert_eq!(
            JobSpec::parse(GOOD, "job.toml").unwrap().on_divergence,
            OnDivergence::Stop
        );
        for (value, expected) in [
            ("stop", OnDivergence::Stop),
            ("continue", OnDivergence::Continue),
        ] {
            let text = GOOD.replacen(
                "epochs = 1\n",
                &format!("epochs = 1\non_divergence = \"{value}\"\n"),
                1,
            );
            let job = JobSpec::parse(&text, "job.toml").unwrap();
            assert_eq!(job.on_divergence, expected);
            let json = serde_json::to_string(&job).unwrap();
            assert!(
                json.contains(&format!("\"on_divergence\":\"{value}\"")),
                "{json}"
            );
        }
    }

    #[test]
    fn a_bad_on_divergence_names_the_field_and_line() {
        let message = error("epochs = 1\n", "epochs = 1\non_divergence = \"retry\"\n");
        let expected = "job.toml:4:17: on_divergence: unknown variant `retry`, \
                        expected `stop` or `continue`";
        assert!(message.starts_with(expected), "{message}");
        let message = error("epochs = 1\n", "epochs = 1\non_divergence = true\n");
        assert!(
            message.starts_with("job.toml:4:17: on_divergence: wanted string or table"),
            "{message}"
        );
    }

    #[test]
    fn gradient_compression_defaults_to_none_and_parses_each_value() {
        assert_eq!(
            JobSpec::parse(GOOD, "job.toml")
                .unwrap()
                .gradient_compression,
            GradientCompression::None
        );
        for (value, expected) in [
            ("none", GradientCompression::None),
            ("bf16", GradientCompression::Bf16),
            ("f16", GradientCompression::F16),
        ] {
            let text = GOOD.replacen(
                "epochs = 1\n",
                &format!("epochs = 1\ngradient_compression = \"{value}\"\n"),
                1,
            );
            let job = JobSpec::parse(&text, "job.toml").unwrap();
            assert_eq!(job.gradient_compression, expected, "{value}");
            let json = serde_json::to_string(&job).unwrap();
            assert!(
                json.contains(&format!("\"gradient_compression\":\"{value}\"")),
                "{json}"
            );
            assert_eq!(serde_json::from_str::<JobSpec>(&json).unwrap(), job);
        }
    }

    #[test]
    fn a_bad_gradient_compression_names_the_field_line_and_choices() {
        for (value, expected) in [
            (
                "\"fp16\"",
                "job.toml:4:24: gradient_compression: unknown variant `fp16`, \
                 expected one of `none`, `bf16`, `f16`",
            ),
            (
                "\"BF16\"",
                "job.toml:4:24: gradient_compression: unknown variant `BF16`",
            ),
            (
                "true",
                "job.toml:4:24: gradient_compression: wanted string or table",
            ),
        ] {
            let message = error(
                "epochs = 1\n",
                &format!("epochs = 1\ngradient_compression = {value}\n"),
            );
            assert!(
                message.starts_with(expected),
                "{message}\nexpected {expected}"
            );
        }
        // In a sweep's base job (a table, no file) the field is still named.
        let mut table: toml::Table = toml::from_str(GOOD).unwrap();
        table.insert("gradient_compression".into(), "int8".into());
        let err = JobSpec::from_table(&table).unwrap_err();
        assert_eq!(err.path.to_string(), "gradient_compression", "{err:?}");
        assert!(err.message.starts_with("unknown variant `int8`"), "{err:?}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = JobSpec::load(Path::new("/nonexistent/job.toml")).unwrap_err();
        assert!(matches!(err, SpecError::Read { .. }));
        assert_eq!(err.location(), None);
        assert!(
            err.to_string().starts_with("/nonexistent/job.toml: "),
            "{err}"
        );
    }

    #[test]
    fn jobs_round_trip_through_json() {
        let job = JobSpec::parse(GOOD, "job.toml").unwrap();
        let json = serde_json::to_string(&job).unwrap();
        assert_eq!(serde_json::from_str::<JobSpec>(&json).unwrap(), job);
    }
}
