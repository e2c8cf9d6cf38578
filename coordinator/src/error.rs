//! The coordinator's error type and its mapping onto gRPC status codes.

use std::time::Duration;

/// Errors a caller of the coordinator library can act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This coordinator does not lead; `leader` is who does, when known.
    #[error("not the leader{}", .leader.as_deref().map(|l| format!(" (the leader is {l})")).unwrap_or_default())]
    NotLeader { leader: Option<String> },

    /// A fenced write found that our leader key is gone or was re-created:
    /// another coordinator may lead now, so the write was not applied.
    #[error("fenced out: this coordinator's leadership (key {key}, create revision {revision}) is no longer current; the write was not applied")]
    FencedOut { key: String, revision: i64 },

    /// etcd could not be reached or answered with an error.
    /// (the cause is shown, not chained, so one-line reports stay readable.)
    #[error("etcd at {endpoints}: {error}")]
    Etcd {
        endpoints: String,
        error: etcd_client::Error,
    },

    /// etcd did not answer within the deadline.
    #[error("etcd at {endpoints} did not answer within {timeout:?} while trying to {what}")]
    EtcdTimeout {
        endpoints: String,
        what: &'static str,
        timeout: Duration,
    },

    /// Coordinators answered, but none of them is (or names) a reachable
    /// leader: an election is under way.
    #[error("no leader among {addresses}: {reason}")]
    NoLeader { addresses: String, reason: String },

    /// A request or flag was malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The request names a sweep, job or worker that does not exist.
    #[error("{0}")]
    NotFound(String),

    /// The request is well formed but the thing it names cannot do it now
    /// (cancelling a finished sweep).
    #[error("{0}")]
    FailedPrecondition(String),

    /// A limit on what the cluster holds is reached (running sweeps).
    #[error("{0}")]
    ResourceExhausted(String),

    /// A stored record could not be read; it names the key.
    #[error("{0}")]
    Corrupt(String),

    /// The caller is not known (no token, a revoked or unknown one, no
    /// client certificate).
    #[error("{0}")]
    Unauthenticated(String),

    /// The caller is known but its role may not do this.
    #[error("{0}")]
    PermissionDenied(String),

    /// A coordinator could not be reached.
    #[error("coordinator {address} is unreachable: {reason}")]
    Unreachable { address: String, reason: String },

    /// A child process of the local launcher failed.
    #[error("{what}: {reason}")]
    Process { what: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<ringleader_client::ClientError> for Error {
    fn from(error: ringleader_client::ClientError) -> Self {
        use ringleader_client::ClientError as C;
        use tonic::Code;
        match error {
            C::NoLeader { addresses, reason } => Error::NoLeader { addresses, reason },
            C::Unreachable { address, reason } => Error::Unreachable { address, reason },
            C::InvalidArgument(message) => Error::InvalidArgument(message),
            C::Corrupt(message) => Error::Corrupt(message),
            C::Refused { code, message } => match code {
                Code::NotFound => Error::NotFound(message),
                Code::FailedPrecondition => Error::FailedPrecondition(message),
                Code::ResourceExhausted | Code::OutOfRange => Error::ResourceExhausted(message),
                Code::DataLoss => Error::Corrupt(message),
                Code::Unauthenticated => Error::Unauthenticated(message),
                Code::PermissionDenied => Error::PermissionDenied(message),
                _ => Error::InvalidArgument(message),
            },
        }
    }
}

/// A spec that does not parse is the caller's to fix.
impl From<ringleader_spec::SpecError> for Error {
    fn from(error: ringleader_spec::SpecError) -> Self {
        Error::InvalidArgument(error.to_string())
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        match err {
            Error::NotLeader { leader } => ringleader_proto::not_leader_status(leader.as_deref()),
            Error::FencedOut { .. } => ringleader_proto::not_leader_status(None),
            Error::InvalidArgument(msg) => tonic::Status::invalid_argument(msg),
            Error::NotFound(msg) => tonic::Status::not_found(msg),
            Error::FailedPrecondition(msg) => tonic::Status::failed_precondition(msg),
            Error::ResourceExhausted(msg) => tonic::Status::resource_exhausted(msg),
            Error::Corrupt(msg) => tonic::Status::data_loss(msg),
            Error::Unauthenticated(msg) => tonic::Status::unauthenticated(msg),
            Error::PermissionDenied(msg) => tonic::Status::permission_denied(msg),
            // Clients are told what happened, not where etcd lives: the
            // details (endpoints, etcd's own message) go to the leader's log.
            e @ (Error::Etcd { .. } | Error::EtcdTimeout { .. }) => {
                tracing::warn!(error = %e, "etcd call failed while serving a request");
                tonic::Status::unavailable(
                    "the leader cannot reach its state store (etcd) right now; try again",
                )
            }
            e @ (Error::Unreachable { .. } | Error::NoLeader { .. }) => {
                tonic::Status::unavailable(e.to_string())
            }
            e @ Error::Process { .. } => tonic::Status::internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_leader_maps_to_failed_precondition_with_leader_metadata() {
        let status = tonic::Status::from(Error::NotLeader {
            leader: Some("10.0.0.1:7000".into()),
        });
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            ringleader_proto::leader_from_status(&status).as_deref(),
            Some("10.0.0.1:7000")
        );
    }

    #[test]
    fn etcd_failures_reach_clients_without_etcds_address() {
        let status = tonic::Status::from(Error::EtcdTimeout {
            endpoints: "10.1.2.3:2379".into(),
            what: "read stored state",
            timeout: Duration::from_secs(2),
        });
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            !status.message().contains("10.1.2.3"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn invalid_argument_keeps_its_code() {
        let status = tonic::Status::from(Error::InvalidArgument("bad".into()));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
}
