//! Collectives between Ringleader workers: ring all-reduce (sum, avg, max,
//! min over f32, f64, f16, bf16), broadcast, all-gather and barrier, over
//! long-lived tonic streams.
//!
//! ```text
//!   coordinator ──ring plan (generation, rank, peers)──▶ worker
//!   worker: CollectiveService (serves its peer address)
//!           Ring::connect ──one stream per generation──▶ successor
//!           ring.all_reduce(&mut grads, Avg) …
//! ```
//!
//! [`plan`] is the pure schedule; [`ring`] drives it over the network;
//! [`service`] routes a predecessor's stream to the right ring and rejects
//! stale generations.

pub mod element;
pub mod error;
pub mod frame;
pub mod plan;
pub mod ring;
pub mod service;

pub use element::Element;
pub use error::{CollectiveError, Result};
pub use frame::{validate_frame_bytes, validate_frame_bytes_against, FrameCheck, OpHeader};
pub use ring::{Ring, RingOptions, RingPlan};
pub use ringleader_proto::collective::ReduceOp;
pub use service::{CollectiveService, ServiceLimits};
