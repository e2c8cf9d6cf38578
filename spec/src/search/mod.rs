//! Hyperparameter search as pure state machines: no I/O, no clocks, every
//! random choice from a seeded generator, so a searcher is unit-tested
//! without a cluster and a sweep can be replayed from its seed.
//!
//! ```text
//!   Space (uniform, log_uniform, int, choice)
//!     ├─ Grid    — every combination, in order
//!     ├─ Random  — independent samples from a seed
//!     ├─ Tpe     — Parzen-estimator suggestions from past results
//!     └─ Asha    — given rung results, which paused trial to promote
//!   (the synthetic objectives workers evaluate are in crate::synthetic)
//! ```
//!
//! A sweep spec ([`crate::sweep`]) reads straight into these types: its
//! parameters into [`Param`]s, its `[sweep.tpe]` table into
//! [`TpeOptions`], its objective's mode into [`Mode`].
//!
//! The coordinator's sweep driver owns the I/O: it asks a searcher for the
//! next configuration, runs it, feeds results back, and records each
//! decision in etcd before acting on it.

pub mod asha;
pub mod space;
pub mod tpe;

pub use asha::{Asha, AshaError, Mode, Promotion};
pub use space::{DomainError, Grid, Param, Random, Space, SpaceError};
pub use tpe::{Tpe, TpeOptions, TrialOutcome};
