//! What a client of the leader can be told, as errors it can act on.

/// Why a call to the leader did not succeed: refusals (bad input, unknown
/// id, a limit, who the caller is) are final; only an unreachable or
/// unavailable leader is worth waiting for.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Coordinators answered, but none of them is (or names) a reachable
    /// leader: an election is under way.
    #[error("no leader among {addresses}: {reason}")]
    NoLeader { addresses: String, reason: String },

    /// A coordinator could not be reached.
    #[error("coordinator {address} is unreachable: {reason}")]
    Unreachable { address: String, reason: String },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("{0}")]
    NotFound(String),

    #[error("{0}")]
    FailedPrecondition(String),

    #[error("{0}")]
    ResourceExhausted(String),

    /// A stored record could not be read; it names the key.
    #[error("{0}")]
    Corrupt(String),

    #[error("{0}")]
    Unauthenticated(String),

    #[error("{0}")]
    PermissionDenied(String),
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;
