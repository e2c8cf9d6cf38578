//! Finding and dialling the leader from a list of coordinator addresses.
//!
//! Any coordinator answers `WhoIsLeader`; a standby names the leader, which
//! we then dial. Clients (CLI, workers) therefore only need *some* addresses.

use std::collections::VecDeque;
use std::time::Duration;

use ringleader_proto::coordinator::coordinator_client::CoordinatorClient;
use ringleader_proto::coordinator::WhoIsLeaderRequest;
use ringleader_security::{Role, Token, Transport};
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;

use crate::error::{ClientError as Error, Result};
use crate::limits::MAX_RESPONSE_BYTES;

/// How to reach a cluster's leader: where, over what, and as whom.
#[derive(Clone, Debug)]
pub struct Connection {
    /// Any coordinators of the cluster.
    pub coordinators: Vec<String>,
    pub transport: Transport,
    /// The user's bearer token (clients); workers have none.
    pub token: Option<Token>,
    /// Deadline for connecting and for each unary call.
    pub timeout: Duration,
}

impl Connection {
    /// The coordinator addresses, with blanks dropped.
    pub fn addresses(&self) -> Vec<String> {
        split_addresses(&self.coordinators)
    }
}

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Credentials(Option<AsciiMetadataValue>);

impl Credentials {
    fn new(token: Option<&Token>) -> Self {
        Self(token.and_then(|token| {
            let mut value =
                AsciiMetadataValue::try_from(format!("Bearer {}", token.reveal())).ok()?;
            value.set_sensitive(true);
            Some(value)
        }))
    }
}

impl Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A client of one coordinator that presents the connection's credentials.
pub type LeaderClient = CoordinatorClient<InterceptedService<Channel, Credentials>>;

/// A client on `channel` that presents `token` with every call.
pub fn authorized(channel: Channel, token: Option<&Token>) -> LeaderClient {
    CoordinatorClient::with_interceptor(channel, Credentials::new(token))
        .max_decoding_message_size(MAX_RESPONSE_BYTES)
}

/// Dials one coordinator; every call on the channel is bounded by the
/// connection's timeout except streams, which callers bound themselves.
pub async fn dial(connection: &Connection, address: &str) -> Result<Channel> {
    let timeout = connection.timeout;
    let endpoint = connection
        .transport
        .endpoint(address, Role::Coordinator)
        .map_err(|e| Error::InvalidArgument(format!("coordinator {address}: {e}")))?
        .connect_timeout(timeout)
        .tcp_nodelay(true);
    tokio::time::timeout(timeout, endpoint.connect())
        .await
        .map_err(|_| Error::Unreachable {
            address: address.to_string(),
            reason: format!("no connection within {timeout:?}"),
        })?
        .map_err(|e| Error::Unreachable {
            address: address.to_string(),
            reason: error_chain(&e),
        })
}

/// [`dial`], presenting the connection's token.
pub async fn connect(connection: &Connection, address: &str) -> Result<LeaderClient> {
    Ok(authorized(
        dial(connection, address).await?,
        connection.token.as_ref(),
    ))
}

/// Asks the connection's coordinators (and whoever they name) for the leader and
/// returns its address and a client for it.
pub async fn find_leader(connection: &Connection) -> Result<(String, LeaderClient)> {
    let (address, channel) = find_leader_channel(connection).await?;
    Ok((address, authorized(channel, connection.token.as_ref())))
}

/// [`find_leader`], returning the channel itself, for callers that present
/// a different token on each call (the dashboard relays its browsers').
pub async fn find_leader_channel(connection: &Connection) -> Result<(String, Channel)> {
    let addresses = &connection.addresses();
    let timeout = connection.timeout;
    let mut queue: VecDeque<String> = addresses.iter().cloned().collect();
    let mut tried: Vec<String> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut any_answered = false;
    while let Some(address) = queue.pop_front() {
        if tried.contains(&address) {
            continue;
        }
        tried.push(address.clone());
        let channel = match dial(connection, &address).await {
            Ok(channel) => channel,
            Err(error) => {
                failures.push(error.to_string());
                continue;
            }
        };
        let mut client = authorized(channel.clone(), connection.token.as_ref());
        let answer =
            tokio::time::timeout(timeout, client.who_is_leader(WhoIsLeaderRequest {})).await;
        match answer {
            Ok(Ok(response)) => {
                any_answered = true;
                let response = response.into_inner();
                if response.is_leader {
                    return Ok((address, channel));
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

/// The leader's answer as an error a caller can act on: an unreachable or
/// unavailable leader is worth waiting for, anything else is a refusal.
pub fn status_error(what: &str, status: tonic::Status) -> Error {
    use tonic::Code;
    let message = format!("{what}: {}", status.message());
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => {
            Error::Unreachable {
                address: "the leader".into(),
                reason: message,
            }
        }
        code => Error::Refused { code, message },
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
