//! Collectives between Ringleader workers: ring all-reduce (sum, avg, max,
//! min over f32, f64, f16, bf16), broadcast, all-gather and barrier, over
//! long-lived tonic streams.
//!
//! ```text
//!   coordinator ──ring plan (generation, rank, peers, ring secret)──▶ worker
//!   worker: CollectiveService (serves its peer address, mutual TLS)
//!           Ring::connect ──one stream per generation──▶ successor
//!                          metadata: generation, rank, ring proof
//!           ring.all_reduce(&mut grads, Avg) …
//! ```
//!
//! [`plan`] is the pure schedule; [`ring`] drives it over the network;
//! [`service`] routes a predecessor's stream to the right ring and rejects
//! strangers and stale generations; [`auth`] is the ring proof.
//!
//! # Who may join a ring
//!
//! Two checks, both before a stream is handed to a ring or any of its
//! frames is read:
//!
//! * **Certificate** (when the ring runs over TLS, [`RingOptions::transport`]):
//!   ring ports speak mutual TLS only; the caller must present a
//!   certificate from the cluster CA naming the worker role, or the `Ring`
//!   call is refused (`PERMISSION_DENIED`; a connection without a
//!   certificate from our CA does not get that far).
//! * **Ring proof** (always): the leader makes a fresh 32-byte secret for
//!   every attempt and gives it only to the ranks it assigned
//!   ([`RingPlan::secret`]). A rank dialling its successor sends
//!   `HMAC-SHA256(secret, label ‖ generation ‖ its rank ‖ successor's
//!   rank)` in the `ringleader-ring-proof` metadata; the successor checks
//!   it in constant time against the secret of the ring it registered.
//!   Any other worker of the cluster — it has a valid certificate — and
//!   anyone on a ring without TLS is refused with `UNAUTHENTICATED`, and
//!   the ring's slot stays free for the real predecessor. The secret never
//!   crosses a ring link.
//!
//! An operator may turn ring encryption off for a trusted network
//! ([`Transport::Insecure`] for the ring only): the proof still decides who
//! joins, but frames then travel in clear text with no integrity
//! protection, so anyone on the path can read gradients and alter them in
//! flight (or replay a proof it saw to race the real sender). With TLS the
//! proof also never leaves the encrypted link.
//!
//! [`Transport::Insecure`]: ringleader_security::Transport::Insecure

pub mod auth;
pub mod buffer;
pub mod element;
pub mod error;
pub mod frame;
pub mod link;
pub mod local;
pub mod plan;
pub mod ring;
pub mod service;
pub mod stats;
pub mod wire;

pub use auth::RingSecret;
pub use buffer::RingBuffer;
pub use element::Element;
pub use error::{CollectiveError, Result};
pub use frame::{validate_frame_bytes, validate_frame_bytes_against, FrameCheck, OpHeader};
pub use local::LocalSocket;
pub use ring::{Ring, RingOptions, RingPlan};
pub use ringleader_proto::collective::ReduceOp;
pub use ringleader_security::Transport;
pub use service::{CollectiveService, InboundLink, ServiceLimits};
pub use wire::{FrameHead, Payload};
