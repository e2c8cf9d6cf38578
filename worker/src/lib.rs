//! Ringleader's worker: the agent that keeps a training node registered
//! with the elected coordinator, runs its assignments, and trains with
//! libtorch over ring collectives.
//!
//! ```text
//!   main ──▶ device (what to train on, what to report)
//!        ──▶ peer server: gRPC health + the Collective service (rings)
//!        ──▶ agent: register with the leader, heartbeat, follow failovers
//!        ──▶ trial: run assignments (a ring per attempt) through train
//!        ──▶ train: run a trial's segment, data-parallel over a ring,
//!                   reading and writing only under the confined roots
//! ```

pub mod agent;
pub mod collective;
pub mod confine;
pub mod device;
pub mod lineage;
pub mod metrics;
pub mod train;
pub mod trial;
