//! Ringleader's coordinator: the control plane of a training cluster.
//!
//! ```text
//!  CLI ──gRPC──▶ coordinator (leader) ◀──gRPC── coordinator (standby)…
//!                    │  ▲                            │
//!     fenced txn     │  │ election / key watch       │ campaign
//!                    ▼  │                            ▼
//!                   etcd (all durable state, election ringleader/leader)
//!                    ▲
//!  worker ◀── attach stream: register, heartbeats, assignments ──▶ leader
//! ```
//!
//! * [`election`] campaigns with an explicitly kept-alive lease and turns
//!   leadership into a [`election::Role`] whose term token is cancelled the
//!   moment leadership ends.
//! * [`store`] is the only path for writes: transactions fenced on the
//!   leader key's create revision.
//! * [`registry`] is the leader's pure view of its workers; [`service`] is
//!   the gRPC face; [`server`] wires them up (`serve`).
//! * [`sweep`] drives sweeps: the pure searchers (search spaces, grid,
//!   random, TPE, ASHA) and the sweep spec they are built from live in
//!   `ringleader_spec::search` and `ringleader_spec::sweep`.
//! * [`local`] and [`process`] run a whole cluster as child processes, for
//!   `ringleader local` and the integration tests.

pub mod auth;
pub mod cli;
pub mod client_config;
pub mod dashboard;
pub mod election;
pub mod error;
pub mod etcd;
pub mod export;
pub mod limits;
pub mod local;
pub mod metrics;
pub mod process;
pub mod registry;
pub mod server;
pub mod service;
pub mod status;
pub mod store;
pub mod sweep;

pub use error::{Error, Result};
/// The client side lives in `ringleader-client` (the worker shares it);
/// these keep its modules where the coordinator's code looks for them.
pub use ringleader_client::{leader as client, runtime, web};
