//! Ringleader's client side, shared by the CLI (in the coordinator crate)
//! and the worker, so the worker links no etcd client, launcher or CLI.
//!
//! ```text
//!   leader   find the leader from any coordinator addresses, dial it with
//!            the connection's transport and token, map its answers to
//!            ClientError
//!   args     --tls-dir / --insecure, durations, listen addresses or "off"
//!   runtime  logging and the shutdown token (SIGINT, SIGTERM)
//!   sweeps   typed sweep calls: submit, get (every trial), list, cancel
//!   web      the bounded HTTP/1.1 server behind the dashboard and /metrics
//!   metrics  a Prometheus registry served at /metrics
//!   limits   bounds both ends of a leader connection agree on
//! ```

pub mod args;
pub mod error;
pub mod leader;
pub mod limits;
pub mod metrics;
pub mod runtime;
pub mod sweeps;
pub mod web;

pub use error::{ClientError, Result};
