//! Sweeps and jobs on the cluster: what is stored ([`records`]), the pure
//! per-sweep decisions ([`driver`]), how a spec becomes trials
//! ([`template`]) and the leader's placement of trials on workers
//! ([`scheduler`]).

pub mod client;
pub mod driver;
pub mod scheduler;
pub mod sim;
pub mod template;

/// The records live in ringleader-spec, where clients read them too.
pub use ringleader_spec::records;

pub use records::{SweepKind, SweepRecord, SweepState, TrialRecord, TrialState};
pub use scheduler::{Effects, Scheduler, SweepRun};
pub use template::Template;
