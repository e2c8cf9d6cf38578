//! What a client of the leader can be told, as errors it can act on.

/// Why a call to the leader did not succeed: only an unreachable or
/// unavailable leader is worth waiting for; a refusal is final.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Coordinators answered, but none of them is (or names) a reachable
    /// leader: an election is under way.
    #[error("no leader among {addresses}: {reason}")]
    NoLeader { addresses: String, reason: String },

    /// A coordinator could not be reached.
    #[error("coordinator {address} is unreachable: {reason}")]
    Unreachable { address: String, reason: String },

    /// The leader refused the call; `code` says why (not found, not
    /// allowed, a limit, bad input…), `message` how.
    #[error("{message}")]
    Refused { code: tonic::Code, message: String },

    /// The leader's answer holds records that cannot be read (it names
    /// their keys), or that this client cannot decode.
    #[error("{0}")]
    Corrupt(String),

    /// Something this side was given is malformed (an address, a flag).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;
