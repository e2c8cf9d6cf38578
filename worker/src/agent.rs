//! The worker's link to the leader: register, heartbeat, take assignments,
//! report, re-register.
//!
//! ```text
//!   find leader (any coordinator names it) ──▶ Attach stream: Register
//!        ▲                                     (running attempt, last report)
//!        │ backoff (capped) on failure              │ Registered
//!        │                                          ▼
//!        └──── stream ends / errors / acks stop ◀── heartbeats every interval,
//!                                                   assignments ▼ reports ▲
//! ```
//!
//! Attempts outlive sessions: a failover does not stop training; the next
//! Register tells the new leader what runs here.

use std::time::{Duration, Instant};

use ringleader_client::leader::{self as client, Connection};
use ringleader_proto::coordinator::{
    coordinator_message, worker_message, Heartbeat, Register, WorkerMessage,
};

use crate::trial::Trials;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How the agent reaches the leader.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// The coordinators, and the worker's certificate to reach them with;
    /// its timeout bounds connecting and each unary call.
    pub connection: Connection,
    pub registration: Register,
    /// First retry delay after a failure; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

/// Why an attached session ended.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Coordinator(#[from] ringleader_client::ClientError),
    #[error("leader {leader} refused the attach: {status}")]
    Refused {
        leader: String,
        status: tonic::Status,
    },
    #[error("leader {leader}: {reason}")]
    SessionLost { leader: String, reason: String },
}

/// Keeps the worker registered with whoever leads until `shutdown`,
/// running what it is assigned and forwarding `reports` from its attempts.
pub async fn run(
    options: AgentOptions,
    trials: Trials,
    mut reports: mpsc::UnboundedReceiver<WorkerMessage>,
    shutdown: CancellationToken,
) {
    let mut backoff = options.min_backoff;
    while !shutdown.is_cancelled() {
        let error = match attach_once(&options, &trials, &mut reports, &shutdown).await {
            Ok(()) => return,
            Err(error) => error,
        };
        // A session that was up and then broke (failover) retries at once;
        // while coordinators answer but an election is still under way, poll
        // at the minimum interval; unreachable coordinators back off.
        match error {
            AgentError::SessionLost { .. } => {
                warn!(%error, "lost the leader; re-registering");
                backoff = options.min_backoff;
                continue;
            }
            AgentError::Coordinator(ringleader_client::ClientError::NoLeader { .. }) => {
                debug!(%error, "waiting for an election");
                backoff = options.min_backoff;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
                continue;
            }
            _ => {}
        }
        warn!(%error, retry_in = ?backoff, "cannot register with the leader");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(options.max_backoff);
    }
}

/// One registration and the heartbeats that follow it. `Ok` only on
/// shutdown.
async fn attach_once(
    options: &AgentOptions,
    trials: &Trials,
    reports: &mut mpsc::UnboundedReceiver<WorkerMessage>,
    shutdown: &CancellationToken,
) -> Result<(), AgentError> {
    let (leader, mut client) = client::find_leader(&options.connection).await?;
    let rpc_timeout = options.connection.timeout;
    // How the last attempt ended goes in the replay below, after its
    // epochs, rather than in `last_finished`: the leader would otherwise
    // end the attempt before hearing the epochs it may have missed.
    let registration = Register {
        running: trials.current(),
        last_finished: None,
        ..options.registration.clone()
    };
    let register = WorkerMessage {
        kind: Some(worker_message::Kind::Register(registration)),
    };
    let (tx, rx) = mpsc::channel(64);
    // The channel is empty and ours: this cannot fail.
    let _ = tx.send(register).await;
    let replay = trials.replay(reports);
    let refused = |status: tonic::Status| AgentError::Refused {
        leader: leader.clone(),
        status,
    };
    let response = tokio::time::timeout(rpc_timeout, client.attach(ReceiverStream::new(rx)))
        .await
        .map_err(|_| refused(tonic::Status::deadline_exceeded("attach timed out")))?
        .map_err(refused)?;
    let mut inbound = response.into_inner();
    let first = tokio::time::timeout(rpc_timeout, inbound.message())
        .await
        .map_err(|_| refused(tonic::Status::deadline_exceeded("no Registered answer")))?
        .map_err(refused)?;
    let interval = match first.and_then(|m| m.kind) {
        Some(coordinator_message::Kind::Registered(r)) => {
            Duration::from_millis(u64::from(r.heartbeat_interval_ms.max(50)))
        }
        _ => return Err(refused(tonic::Status::internal("expected Registered"))),
    };
    info!(%leader, worker = %options.registration.worker_id, "registered");
    for report in replay {
        if tx.send(report).await.is_err() {
            return Err(AgentError::SessionLost {
                leader: leader.clone(),
                reason: "stream closed".into(),
            });
        }
    }

    let lost = |reason: String| AgentError::SessionLost {
        leader: leader.clone(),
        reason,
    };
    // Silence this long means the leader is gone even if TCP has not noticed.
    let silence_limit = interval * 3 + rpc_timeout;
    let mut tick = tokio::time::interval(interval);
    let mut sequence = 0u64;
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                // Deliver what the attempts reported before we go.
                while let Ok(report) = reports.try_recv() {
                    let _ = tx.send(report).await;
                }
                // Close our side and wait for the leader to close its own:
                // it has then handled every report (an abandoned attempt
                // must not look like a lost worker's failure).
                drop(tx);
                let _ = tokio::time::timeout(rpc_timeout, async {
                    while let Ok(Some(_)) = inbound.message().await {}
                })
                .await;
                return Ok(());
            }
            _ = tick.tick() => {
                if last_heard.elapsed() > silence_limit {
                    return Err(lost(format!("no answer for {silence_limit:?}")));
                }
                sequence += 1;
                let heartbeat = WorkerMessage {
                    kind: Some(worker_message::Kind::Heartbeat(Heartbeat { sequence })),
                };
                if tx.send(heartbeat).await.is_err() {
                    return Err(lost("stream closed".into()));
                }
            }
            Some(report) = reports.recv() => {
                if tx.send(report).await.is_err() {
                    return Err(lost("stream closed".into()));
                }
            }
            message = inbound.message() => match message {
                Ok(Some(message)) => {
                    last_heard = Instant::now();
                    crate::metrics::worker().heard_from_leader();
                    match message.kind {
                        Some(coordinator_message::Kind::Assign(assignment)) => trials.start(assignment),
                        Some(coordinator_message::Kind::Stop(stop)) => {
                            if let Some(attempt) = &stop.attempt {
                                info!(sweep = %attempt.sweep_id, trial = attempt.trial, reason = %stop.reason, "told to stop");
                                trials.stop(attempt);
                            }
                        }
                        _ => {}
                    }
                }
                Ok(None) => return Err(lost("stream closed".into())),
                Err(status) => return Err(lost(status.message().to_string())),
            }
        }
    }
}
