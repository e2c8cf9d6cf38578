//! Collective errors: each names the peer and what went wrong, so a caller
//! can abandon the ring generation and report which rank failed.

use std::time::Duration;

use crate::auth::ProofError;

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A neighbour's stream broke or ended mid-operation.
    #[error("peer rank {rank} lost: {reason}")]
    PeerLost { rank: usize, reason: String },

    /// Nothing arrived from a neighbour within the timeout.
    #[error("no data from rank {rank} within {waited:?} (step {step}, chunk {chunk})")]
    Timeout {
        rank: usize,
        waited: Duration,
        step: u32,
        chunk: u32,
    },

    /// Ranks disagree about the operation (length, dtype, op, root, …).
    #[error("rank {rank} disagrees on {field}: ours is {ours}, theirs is {theirs}")]
    Mismatch {
        rank: usize,
        field: &'static str,
        ours: String,
        theirs: String,
    },

    /// Traffic stamped with another ring generation.
    #[error("stale ring generation {got} (current is {current})")]
    StaleGeneration { got: u64, current: u64 },

    /// An earlier operation failed; this ring can no longer be trusted.
    #[error("ring generation {generation} failed earlier; build a new ring")]
    Poisoned { generation: u64 },

    /// A frame that cannot belong to the operation under way: undecodable,
    /// a (step, chunk) the schedule does not have, or a payload whose
    /// length does not match its dtype and element range.
    #[error("invalid frame from rank {rank}: {reason}")]
    BadFrame { rank: usize, reason: String },

    /// Too many streams are already waiting for their ring on this
    /// process; see `ServiceLimits::max_waiting_streams`.
    #[error(
        "too many ring streams waiting for their ring here (limit: {limit} streams; \
         raise it with --collective-max-waiting-streams)"
    )]
    TooManyWaitingStreams { limit: usize },

    #[error("invalid ring plan: {0}")]
    InvalidPlan(String),

    /// A ring secret that is too short, too long or not hex.
    #[error("invalid ring secret: {0}")]
    InvalidSecret(String),

    /// A stream whose sender did not prove it holds the ring's secret.
    #[error("rank {rank}'s ring proof for generation {generation} is {problem}")]
    BadProof {
        rank: usize,
        generation: u64,
        problem: ProofError,
    },

    /// The ring's TLS material could not be used.
    #[error("ring transport: {0}")]
    Transport(String),

    #[error("cannot reach rank {rank} at {address}: {reason}")]
    Connect {
        rank: usize,
        address: String,
        reason: String,
    },
}

pub type Result<T, E = CollectiveError> = std::result::Result<T, E>;

impl From<CollectiveError> for tonic::Status {
    fn from(err: CollectiveError) -> Self {
        let text = err.to_string();
        match err {
            CollectiveError::StaleGeneration { .. } | CollectiveError::Poisoned { .. } => {
                tonic::Status::failed_precondition(text)
            }
            CollectiveError::Mismatch { .. }
            | CollectiveError::BadFrame { .. }
            | CollectiveError::InvalidPlan(_)
            | CollectiveError::InvalidSecret(_) => tonic::Status::invalid_argument(text),
            CollectiveError::BadProof { .. } => tonic::Status::unauthenticated(text),
            CollectiveError::Transport(_) => tonic::Status::internal(text),
            CollectiveError::Timeout { .. } => tonic::Status::deadline_exceeded(text),
            CollectiveError::TooManyWaitingStreams { .. } => {
                tonic::Status::resource_exhausted(text)
            }
            CollectiveError::PeerLost { .. } | CollectiveError::Connect { .. } => {
                tonic::Status::unavailable(text)
            }
        }
    }
}
