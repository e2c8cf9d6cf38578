//! Ringleader's wire protocol.
//!
//! The `.proto` files under `proto/` are compiled by `tonic-prost-build`;
//! this crate re-exports the generated code and the few plain conventions both
//! the coordinator and the worker rely on (metadata keys, leader redirects).

pub mod codec;

pub mod coordinator {
    //! `ringleader.coordinator.v1`: worker registration, heartbeats, status.
    tonic::include_proto!("ringleader.coordinator.v1");
}

pub mod collective {
    //! `ringleader.collective.v1`: ring all-reduce, broadcast, all-gather
    //! between workers.
    tonic::include_proto!("ringleader.collective.v1");
}

/// Metadata keys naming the ring generation and sender rank of a
/// `Collective.Ring` stream.
pub const GENERATION_METADATA_KEY: &str = "ringleader-generation";
pub const RANK_METADATA_KEY: &str = "ringleader-rank";

/// Metadata key carrying the leader's address on a `FAILED_PRECONDITION`
/// answer from a standby coordinator.
pub const LEADER_METADATA_KEY: &str = "ringleader-leader";

/// Builds the status a standby answers with: `FAILED_PRECONDITION`, the
/// leader's address (if known) in metadata so clients can follow it.
pub fn not_leader_status(leader: Option<&str>) -> tonic::Status {
    let message = match leader {
        Some(addr) => format!("this coordinator is a standby; the leader is {addr}"),
        None => "this coordinator is a standby and no leader is elected yet".to_string(),
    };
    let mut status = tonic::Status::failed_precondition(message);
    if let Some(addr) = leader {
        if let Ok(value) = addr.parse() {
            status.metadata_mut().insert(LEADER_METADATA_KEY, value);
        }
    }
    status
}

/// The leader named by a standby's answer, if the status is such an answer.
pub fn leader_from_status(status: &tonic::Status) -> Option<String> {
    if status.code() != tonic::Code::FailedPrecondition {
        return None;
    }
    status
        .metadata()
        .get(LEADER_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .filter(|s| !s.is_empty())
}

/// Normalises a user-given address (`host:port` or `http://host:port`) into
/// an endpoint URI tonic can dial.
pub fn endpoint_uri(address: &str) -> String {
    if address.starts_with("http://") || address.starts_with("https://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_round_trips_through_status_metadata() {
        let status = not_leader_status(Some("127.0.0.1:7000"));
        assert_eq!(
            leader_from_status(&status).as_deref(),
            Some("127.0.0.1:7000")
        );
        assert_eq!(leader_from_status(&not_leader_status(None)), None);
        assert_eq!(leader_from_status(&tonic::Status::unavailable("x")), None);
    }

    #[test]
    fn endpoint_uri_adds_scheme_once() {
        assert_eq!(endpoint_uri("a:1"), "http://a:1");
        assert_eq!(endpoint_uri("http://a:1"), "http://a:1");
    }
}
