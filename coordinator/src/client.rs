//! Finding and dialling the leader from a list of coordinator addresses.
//!
//! Any coordinator answers `WhoIsLeader`; a standby names the leader, which
//! we then dial. Clients (CLI, workers) therefore only need *some* addresses.

use std::collections::VecDeque;
use std::time::Duration;

use ringleader_proto::coordinator::coordinator_client::CoordinatorClient;
use ringleader_proto::coordinator::WhoIsLeaderRequest;
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};
use crate::limits::MAX_RESPONSE_BYTES;

/// Dials one coordinator; every call on the channel is bounded by `timeout`
/// except streams, which callers bound themselves.
pub async fn connect(address: &str, timeout: Duration) -> Result<CoordinatorClient<Channel>> {
    let endpoint = Endpoint::from_shared(ringleader_proto::endpoint_uri(address))
        .map_err(|e| Error::InvalidArgument(format!("bad coordinator address {address:?}: {e}")))?
        .connect_timeout(timeout)
        .tcp_nodelay(true);
    let channel = tokio::time::timeout(timeout, endpoint.connect())
        .await
        .map_err(|_| Error::Unreachable {
            address: address.to_string(),
            reason: format!("no connection within {timeout:?}"),
        })?
        .map_err(|e| Error::Unreachable {
            address: address.to_string(),
            reason: error_chain(&e),
        })?;
    Ok(CoordinatorClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES))
}

/// Asks the given coordinators (and whoever they name) for the leader and
/// returns its address and a client for it.
pub async fn find_leader(
    addresses: &[String],
    timeout: Duration,
) -> Result<(String, CoordinatorClient<Channel>)> {
    let mut queue: VecDeque<String> = addresses.iter().cloned().collect();
    let mut tried: Vec<String> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut any_answered = false;
    while let Some(address) = queue.pop_front() {
        if tried.contains(&address) {
            continue;
        }
        tried.push(address.clone());
        let mut client = match connect(&address, timeout).await {
            Ok(client) => client,
            Err(error) => {
                failures.push(error.to_string());
                continue;
            }
        };
        let answer =
            tokio::time::timeout(timeout, client.who_is_leader(WhoIsLeaderRequest {})).await;
        match answer {
            Ok(Ok(response)) => {
                any_answered = true;
                let response = response.into_inner();
                if response.is_leader {
                    return Ok((address, client));
                }
                if response.leader_address.is_empty() {
                    failures.push(format!("{address}: standby, no leader elected yet"));
                } else {
                    failures.push(format!(
                        "{address}: standby, names {} as leader",
                        response.leader_address
                    ));
                    queue.push_front(response.leader_address);
                }
            }
            Ok(Err(status)) => failures.push(format!("{address}: {}", status.message())),
            Err(_) => failures.push(format!("{address}: no answer within {timeout:?}")),
        }
    }
    let reason = failures.join("; ");
    if any_answered {
        Err(Error::NoLeader {
            addresses: addresses.join(","),
            reason,
        })
    } else {
        Err(Error::Unreachable {
            address: addresses.join(","),
            reason,
        })
    }
}

/// Splits `a,b , c` into addresses, dropping blanks.
pub fn split_addresses(list: &[String]) -> Vec<String> {
    list.iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// An error and its causes on one line: transport errors hide the useful
/// part ("connection refused") in their source chain.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_addresses_accepts_commas_and_repeats() {
        let got = split_addresses(&["a:1, b:2".into(), "".into(), "c:3".into()]);
        assert_eq!(got, ["a:1", "b:2", "c:3"]);
    }
}
