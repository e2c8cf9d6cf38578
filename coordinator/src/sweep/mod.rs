//! Sweeps and jobs on the cluster: what is stored ([`records`]), the pure
//! per-sweep decisions ([`driver`]), how a spec becomes trials
//! ([`template`]) and the leader's placement of trials on workers
//! ([`scheduler`]).

pub mod client;
pub mod driver;
pub mod records;
pub mod scheduler;
pub mod sim;
pub mod template;

pub use records::{SweepKind, SweepRecord, SweepState, TrialRecord, TrialState};
pub use scheduler::{Effects, Scheduler, SweepRun};
pub use template::Template;
