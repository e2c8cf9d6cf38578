//! Specs both sides of the cluster share: the job spec (a training run),
//! the sweep spec (a search over jobs) with the search spaces and searchers
//! it reads into, overrides that turn a sweep's base job into one trial's
//! job, the dataset shard plan, and the records of sweeps and trials
//! that the leader stores and clients read. Pure code: no I/O beyond reading a spec
//! file, no libtorch, no async.
//!
//! ```text
//!  job.toml ──Document::parse──▶ spans ──deserialize + validate──▶ JobSpec
//!      errors: "job.toml:12:7: optimizer.kind: unknown variant `adagrad`, …"
//!  sweep.toml ──Document::parse──▶ spans ──deserialize──▶ [sweep]  + base [job]
//!      [sweep.params] ─▶ search::Param (domain checked as read)
//!      [sweep.tpe]    ─▶ search::TpeOptions,  objective.mode ─▶ Mode
//!      each parameter at the ends of its domain ─with the base job─▶ valid?
//!      ──▶ sweep::SweepSpec   (errors as for jobs: "sweep.toml:10:1: sweep.params.…")
//!  search::Space ──▶ Grid | Random | Tpe (next config)   Asha (which trial to promote)
//!  base job table + {"optimizer.lr": 0.1} ──with_overrides──▶ JobSpec
//!  ShardPlan (examples, world, rank, seed) ──indices(epoch)──▶ this rank's examples
//!  records: SweepRecord, TrialRecord ── the JSON etcd holds, and clients read
//! ```

pub mod error;
pub mod job;
pub mod limits;
pub mod mode;
pub mod overrides;
pub mod prepare;
pub mod records;
pub mod search;
pub mod shard;
pub mod stopping;
pub mod sweep;
pub mod synthetic;

pub use error::{Document, FieldError, FieldPath, Location, SpecError};
pub use job::{JobDevice, JobSpec};
pub use mode::Mode;
pub use overrides::{apply_overrides, with_overrides};
pub use shard::{FileDeal, ShardError, ShardPlan};
/// The TOML crate whose tables [`with_overrides`] takes, so users need not
/// depend on the same version themselves.
pub use toml;
