//! Ringleader's worker: the agent that keeps a training node registered
//! with the elected coordinator, and (in later modules) the collectives and
//! the libtorch training loop.
//!
//! ```text
//!   main ──▶ device (what to train on, what to report)
//!        ──▶ peer server: gRPC health + the Collective service (rings)
//!        ──▶ agent: register with the leader, heartbeat, follow failovers
//!        ──▶ train: run a trial's segment, data-parallel over a ring
//! ```

pub mod agent;
pub mod collective;
pub mod device;
pub mod train;
