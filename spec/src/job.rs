//! The job spec: one training run with fixed hyperparameters.
//!
//! Field names are the TOML keys users write (see `examples/`); every table
//! rejects unknown keys so a typo is an error, not a silently ignored
//! setting. A sweep's `[search.params]` keys are dotted paths into this
//! structure (`optimizer.lr`, `model.channels`, `batch_size`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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
    pub dataset: DatasetSpec,
    pub model: ModelSpec,
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    #[serde(default)]
    pub schedule: ScheduleSpec,
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Sgd,
    Adam,
    AdamW,
}

/// Learning-rate schedule, stepped per optimiser step; `warmup_steps`
/// ramps linearly from 0 to the scheduled rate first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
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
