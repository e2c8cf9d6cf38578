//! Specs both sides of the cluster share: the job spec (a training run), and
//! later the sweep spec and the dataset shard plan. Pure code: no I/O beyond
//! reading a spec file, no libtorch.

pub mod job;
pub mod synthetic;

pub use job::JobSpec;
