//! The `Coordinator` gRPC service: thin handlers over [`CoordinatorState`].

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::Stream;
use ringleader_proto::coordinator::coordinator_server::Coordinator;
use ringleader_proto::coordinator::{
    coordinator_message, worker_message, ClusterStatusRequest, ClusterStatusResponse,
    CoordinatorInfo, CoordinatorMessage, HeartbeatAck, Register, Registered, WhoIsLeaderRequest,
    WhoIsLeaderResponse, WorkerMessage,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::election::{self, LeaderTerm, Role};
use crate::error::Error;
use crate::etcd::Etcd;
use crate::registry::{ConnectionId, WorkerRegistry};

/// How long a new attach stream may take to send its `Register`.
const REGISTER_DEADLINE: Duration = Duration::from_secs(5);

/// State shared by the service handlers and the leader's background tasks.
pub struct CoordinatorState {
    pub advertise: String,
    pub etcd: Etcd,
    pub role: watch::Receiver<Role>,
    pub heartbeat_interval: Duration,
    registry: Mutex<WorkerRegistry>,
}

impl CoordinatorState {
    pub fn new(
        advertise: String,
        etcd: Etcd,
        role: watch::Receiver<Role>,
        heartbeat_interval: Duration,
        lost_after: Duration,
    ) -> Self {
        Self {
            advertise,
            etcd,
            role,
            heartbeat_interval,
            registry: Mutex::new(WorkerRegistry::new(lost_after)),
        }
    }

    /// The registry; a poisoned lock only means a handler panicked mid-update
    /// of plain data, which stays usable.
    pub fn registry(&self) -> MutexGuard<'_, WorkerRegistry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops every registration: a new term starts from the workers that
    /// re-register with it.
    pub fn reset_registry(&self, lost_after: Duration) {
        *self.registry() = WorkerRegistry::new(lost_after);
    }

    /// The current term, or `NotLeader` naming the leader as etcd has it.
    pub async fn require_leader(&self) -> Result<LeaderTerm, Error> {
        if let Some(term) = self.role.borrow().term().cloned() {
            return Ok(term);
        }
        let leader = election::current_leader(&self.etcd)
            .await
            .ok()
            .flatten()
            .filter(|l| *l != self.advertise);
        Err(Error::NotLeader { leader })
    }
}

/// The gRPC face of a coordinator.
#[derive(Clone)]
pub struct CoordinatorService {
    state: Arc<CoordinatorState>,
}

impl CoordinatorService {
    pub fn new(state: Arc<CoordinatorState>) -> Self {
        Self { state }
    }
}

type AttachStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

fn validate_registration(reg: &Register) -> Result<(), Status> {
    if reg.worker_id.trim().is_empty() {
        return Err(Status::invalid_argument("register: worker_id is empty"));
    }
    if reg.peer_address.trim().is_empty() {
        return Err(Status::invalid_argument("register: peer_address is empty"));
    }
    Ok(())
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    type AttachStream = AttachStream;

    async fn attach(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let term = self.state.require_leader().await?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(REGISTER_DEADLINE, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Register message within 5s"))??;
        let registration = match first.and_then(|m| m.kind) {
            Some(worker_message::Kind::Register(reg)) => reg,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message on an attach stream must be Register",
                ))
            }
        };
        validate_registration(&registration)?;
        let worker_id = registration.worker_id.clone();
        info!(
            worker = %worker_id,
            host = %registration.host,
            peer = %registration.peer_address,
            "worker registered"
        );
        let connection = self.state.registry().register(registration, Instant::now());

        let (tx, rx) = mpsc::channel(16);
        let registered = CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Registered(Registered {
                worker_id: worker_id.clone(),
                leader_address: self.state.advertise.clone(),
                heartbeat_interval_ms: u32::try_from(self.state.heartbeat_interval.as_millis())
                    .unwrap_or(u32::MAX),
            })),
        };
        tx.send(Ok(registered))
            .await
            .map_err(|_| Status::cancelled("worker went away during registration"))?;
        tokio::spawn(serve_worker_stream(
            self.state.clone(),
            term,
            worker_id,
            connection,
            inbound,
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        self.state.require_leader().await?;
        let candidates = election::candidates(&self.state.etcd).await?;
        let coordinators = candidates
            .iter()
            .enumerate()
            .map(|(i, c)| CoordinatorInfo {
                address: c.address.clone(),
                leader: i == 0,
                lease: format!("{:x}", c.lease),
            })
            .collect();
        let workers = self.state.registry().snapshot(Instant::now());
        Ok(Response::new(ClusterStatusResponse {
            leader_address: self.state.advertise.clone(),
            coordinators,
            workers,
        }))
    }

    async fn who_is_leader(
        &self,
        _request: Request<WhoIsLeaderRequest>,
    ) -> Result<Response<WhoIsLeaderResponse>, Status> {
        let response = match self.state.require_leader().await {
            Ok(_) => WhoIsLeaderResponse {
                leader_address: self.state.advertise.clone(),
                is_leader: true,
            },
            Err(Error::NotLeader { leader }) => WhoIsLeaderResponse {
                leader_address: leader.unwrap_or_default(),
                is_leader: false,
            },
            Err(other) => return Err(other.into()),
        };
        Ok(Response::new(response))
    }
}

/// Feeds one worker's heartbeats into the registry until the stream ends or
/// this term does; on the latter the worker is told to find the new leader.
async fn serve_worker_stream(
    state: Arc<CoordinatorState>,
    term: LeaderTerm,
    worker_id: String,
    connection: ConnectionId,
    mut inbound: Streaming<WorkerMessage>,
    outbound: mpsc::Sender<Result<CoordinatorMessage, Status>>,
) {
    loop {
        tokio::select! {
            _ = term.token.cancelled() => {
                // Best effort: the worker also notices the stream ending.
                let _ = outbound.send(Err(ringleader_proto::not_leader_status(None))).await;
                return;
            }
            message = inbound.message() => match message {
                Ok(Some(WorkerMessage { kind: Some(worker_message::Kind::Heartbeat(hb)) })) => {
                    state.registry().heartbeat(&worker_id, connection, Instant::now());
                    let ack = CoordinatorMessage {
                        kind: Some(coordinator_message::Kind::HeartbeatAck(HeartbeatAck {
                            sequence: hb.sequence,
                        })),
                    };
                    if outbound.send(Ok(ack)).await.is_err() {
                        break;
                    }
                }
                Ok(Some(_)) => {
                    let _ = outbound
                        .send(Err(Status::invalid_argument("only heartbeats may follow Register")))
                        .await;
                    break;
                }
                Ok(None) => break,
                Err(status) => {
                    warn!(worker = %worker_id, %status, "worker stream failed");
                    break;
                }
            }
        }
    }
    if state.registry().disconnected(&worker_id, connection) {
        warn!(worker = %worker_id, "worker disconnected");
    }
}
