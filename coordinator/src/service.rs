//! The `Coordinator` gRPC service: thin handlers over [`CoordinatorState`].

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::{FutureExt, Stream};
use ringleader_proto::coordinator::coordinator_server::Coordinator;
use std::path::PathBuf;

use ringleader_proto::coordinator::{
    coordinator_message, worker_message, CancelSweepRequest, CancelSweepResponse,
    ClusterStatusRequest, ClusterStatusResponse, CoordinatorInfo, CoordinatorMessage,
    GetSweepRequest, GetSweepResponse, HeartbeatAck, ListSweepsRequest, ListSweepsResponse,
    Register, Registered, SubmitKind, SubmitRequest, SubmitResponse, WhoIsLeaderRequest,
    WhoIsLeaderResponse, WorkerMessage,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::election::{self, LeaderTerm, Role};
use crate::error::Error;
use crate::etcd::Etcd;
use crate::registry::ConnectionId;
use crate::search::Mode;
use crate::store::StateWriter;
use crate::sweep::driver::Driver;
use crate::sweep::records::TRIALS_PREFIX;
use crate::sweep::scheduler::unix_ms;
use crate::sweep::{
    Effects, Scheduler, SweepKind, SweepRecord, SweepRun, SweepState, Template, TrialRecord,
};

/// How long a new attach stream may take to send its `Register`.
const REGISTER_DEADLINE: Duration = Duration::from_secs(5);

/// State shared by the service handlers and the leader's background tasks.
pub struct CoordinatorState {
    pub advertise: String,
    pub etcd: Etcd,
    pub role: watch::Receiver<Role>,
    pub heartbeat_interval: Duration,
    pub lost_after: Duration,
    pub checkpoint_root: PathBuf,
    scheduler: Mutex<Scheduler>,
    /// The current term's writer, once its state is loaded from etcd.
    writer: Mutex<Option<StateWriter>>,
}

impl CoordinatorState {
    pub fn new(
        advertise: String,
        etcd: Etcd,
        role: watch::Receiver<Role>,
        heartbeat_interval: Duration,
        lost_after: Duration,
        checkpoint_root: PathBuf,
    ) -> Self {
        Self {
            advertise,
            etcd,
            role,
            heartbeat_interval,
            lost_after,
            scheduler: Mutex::new(Scheduler::new(
                lost_after,
                0,
                checkpoint_root.clone(),
                Instant::now(),
            )),
            checkpoint_root,
            writer: Mutex::new(None),
        }
    }

    /// The scheduler; a poisoned lock only means a handler panicked
    /// mid-update of plain data, which stays usable.
    pub fn scheduler(&self) -> MutexGuard<'_, Scheduler> {
        self.scheduler.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn writer(&self) -> MutexGuard<'_, Option<StateWriter>> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a term: a fresh scheduler (workers re-register with it), no
    /// writer until [`CoordinatorState::loaded`].
    pub fn begin_term(&self, owner: i64, reattach_until: Instant) {
        *self.writer() = None;
        *self.scheduler() = Scheduler::new(
            self.lost_after,
            owner,
            self.checkpoint_root.clone(),
            reattach_until,
        );
    }

    /// The term's stored state is in the scheduler: accept changes.
    pub fn loaded(&self, writer: StateWriter) {
        *self.writer() = Some(writer);
    }

    /// Runs a scheduler step: its writes are queued (in decision order,
    /// under the lock) and its messages sent once the writes are durable.
    /// The returned receiver answers when that has happened.
    pub fn apply<T>(
        &self,
        step: impl FnOnce(&mut Scheduler) -> (Effects, T),
    ) -> (T, oneshot::Receiver<Result<(), String>>) {
        let (done_tx, done_rx) = oneshot::channel();
        let (effects, value, ticket) = {
            let mut scheduler = self.scheduler();
            let (effects, value) = step(&mut scheduler);
            let ticket = match (effects.writes.is_empty(), self.writer().as_ref()) {
                (true, _) => None,
                (false, Some(writer)) => Some(writer.enqueue(effects.writes.clone())),
                (false, None) => {
                    let _ = done_tx.send(Err("the leader is still loading its state".into()));
                    return (value, done_rx);
                }
            };
            (effects, value, ticket)
        };
        tokio::spawn(async move {
            let durable = match ticket {
                None => Ok(()),
                Some(ticket) => ticket
                    .await
                    .unwrap_or_else(|_| Err("the state writer stopped".into())),
            };
            if durable.is_ok() {
                for (to, message) in effects.messages {
                    let _ = to.send(Ok(message)).await;
                }
            } else if let Err(error) = &durable {
                warn!(%error, "state change not stored; its messages were not sent");
            }
            let _ = done_tx.send(durable);
        });
        (value, done_rx)
    }

    /// Waits until every state change made so far is durable in etcd, so
    /// that a read from etcd sees them.
    async fn changes_durable(&self) -> Result<(), Status> {
        let flushed = match self.writer().as_ref() {
            Some(writer) => writer.flushed(),
            None => return Err(Status::unavailable("this coordinator is not leading")),
        };
        flushed
            .await
            .unwrap_or_else(|_| Err("the state writer stopped".into()))
            .map_err(Status::unavailable)
    }

    /// Places work after an event.
    pub fn schedule(&self) {
        if self.writer().is_some() {
            let _ = self.apply(|s| (s.schedule(Instant::now()), ()));
        }
    }

    /// Whether this term's state is loaded (sweep calls need it).
    pub fn is_loaded(&self) -> bool {
        self.writer().is_some()
    }

    /// Leader with its state loaded, or the status that says why not.
    async fn require_loaded_leader(&self) -> Result<LeaderTerm, Status> {
        let term = self.require_leader().await?;
        if !self.is_loaded() {
            return Err(Status::unavailable(
                "the leader is loading its state from etcd; try again in a moment",
            ));
        }
        Ok(term)
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

/// Waits until a scheduler step's writes are durable.
async fn durable(answer: oneshot::Receiver<Result<(), String>>) -> Result<(), Status> {
    match answer.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(reason)) => Err(Status::unavailable(format!(
            "the change could not be stored: {reason}"
        ))),
        Err(_) => Err(Status::unavailable("the change could not be stored")),
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
        let (tx, rx) = mpsc::channel(64);
        let connection = {
            let mut scheduler = self.state.scheduler();
            // Until the term's sweeps are loaded, a re-registering worker's
            // running attempt would look unknown and be stopped: it must
            // wait, so that it is re-attached instead.
            if scheduler.owner() != term.create_revision || !self.state.is_loaded() {
                return Err(Status::unavailable(
                    "the leader is starting its term; retry",
                ));
            }
            let connection = scheduler
                .registry
                .register(registration.clone(), Instant::now());
            scheduler
                .registry
                .set_outbound(&worker_id, connection, tx.clone());
            connection
        };
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
        let _ = self.state.apply(|s| (s.registered(&registration), ()));
        self.state.schedule();
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
        let workers = self.state.scheduler().registry.snapshot(Instant::now());
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

    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        self.state.require_loaded_leader().await?;
        let request = request.into_inner();
        let kind = match request.kind() {
            SubmitKind::Job => SweepKind::Job,
            SubmitKind::Sweep => SweepKind::Sweep,
            SubmitKind::Unspecified => {
                return Err(Status::invalid_argument(
                    "submit: kind must be job or sweep",
                ))
            }
        };
        let origin = if request.origin.is_empty() {
            "<submitted spec>".to_string()
        } else {
            request.origin.clone()
        };
        // Parsed in full before anything is stored: a rejected spec
        // leaves no trace in etcd.
        let template =
            Template::parse(kind, &request.spec, &origin).map_err(Status::invalid_argument)?;
        let (id, answer) = self.state.apply(|s| {
            let (id, seq) = s.next_id(kind);
            let (metric, mode) = template.objective();
            let driver = match Driver::new(template.driver_config(&id)) {
                Ok(driver) => driver,
                Err(error) => return (Effects::default(), Err(error.to_string())),
            };
            let record = SweepRecord {
                id: id.clone(),
                seq,
                kind,
                name: template.name().to_string(),
                spec: request.spec.clone(),
                origin: origin.clone(),
                state: SweepState::Running,
                submitted_unix_ms: unix_ms(),
                finished_unix_ms: None,
                objective_metric: metric,
                objective_mode: mode_name(mode).into(),
                max_trials: template.max_trials(),
            };
            (s.submit(SweepRun::new(record, driver, template)), Ok(id))
        });
        let id = id.map_err(Status::invalid_argument)?;
        durable(answer).await?;
        self.state.schedule();
        Ok(Response::new(SubmitResponse { sweep_id: id }))
    }

    async fn list_sweeps(
        &self,
        _request: Request<ListSweepsRequest>,
    ) -> Result<Response<ListSweepsResponse>, Status> {
        self.state.require_loaded_leader().await?;
        let sweeps = self.state.scheduler().list();
        Ok(Response::new(ListSweepsResponse {
            sweep_json: sweeps.iter().map(to_json).collect(),
        }))
    }

    async fn get_sweep(
        &self,
        request: Request<GetSweepRequest>,
    ) -> Result<Response<GetSweepResponse>, Status> {
        self.state.require_loaded_leader().await?;
        let id = request.into_inner().sweep_id;
        let found = self.state.scheduler().get(&id);
        let Some((record, trials)) = found else {
            return Err(Status::not_found(format!("no sweep or job {id}")));
        };
        let trials = match trials {
            Some(trials) => trials,
            // Finished sweeps are not kept in memory: read their trials,
            // once the writes that finished the sweep are durable.
            None => {
                self.state.changes_durable().await?;
                load_trials(&self.state.etcd, &id).await?
            }
        };
        Ok(Response::new(GetSweepResponse {
            sweep_json: to_json(&record),
            trial_json: trials.iter().map(to_json).collect(),
        }))
    }

    async fn cancel_sweep(
        &self,
        request: Request<CancelSweepRequest>,
    ) -> Result<Response<CancelSweepResponse>, Status> {
        self.state.require_loaded_leader().await?;
        let id = request.into_inner().sweep_id;
        let (result, answer) = self.state.apply(|s| match s.cancel(&id) {
            Ok((effects, stopped)) => (effects, Ok(stopped)),
            Err(reason) => (Effects::default(), Err(reason)),
        });
        let stopped = result.map_err(Status::failed_precondition)?;
        durable(answer).await?;
        self.state.schedule();
        Ok(Response::new(CancelSweepResponse {
            stopped_attempts: stopped,
        }))
    }
}

fn to_json<T: serde::Serialize>(record: &T) -> String {
    serde_json::to_string(record).expect("records serialise")
}

pub fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Max => "max",
        Mode::Min => "min",
    }
}

/// A sweep's stored trials, by number.
pub async fn load_trials(etcd: &Etcd, sweep: &str) -> Result<Vec<TrialRecord>, Error> {
    let prefix = format!("{TRIALS_PREFIX}{sweep}/");
    let mut trials: Vec<TrialRecord> = load_prefix(etcd, &prefix).await?;
    trials.sort_by_key(|t| t.number);
    Ok(trials)
}

/// Every JSON record under `prefix`; a record that does not parse is an
/// error naming its key (nothing is silently dropped).
pub async fn load_prefix<T: serde::de::DeserializeOwned>(
    etcd: &Etcd,
    prefix: &str,
) -> Result<Vec<T>, Error> {
    let key = prefix.to_string();
    let response = etcd
        .call("read stored state", |mut c| {
            let key = key.clone();
            async move {
                c.get(key, Some(etcd_client::GetOptions::new().with_prefix()))
                    .await
            }
        })
        .await?;
    response
        .kvs()
        .iter()
        .map(|kv| {
            serde_json::from_slice(kv.value()).map_err(|e| {
                Error::InvalidArgument(format!(
                    "stored record {} is not valid: {e}",
                    String::from_utf8_lossy(kv.key())
                ))
            })
        })
        .collect()
}

/// Feeds one worker's messages into the scheduler until the stream ends or
/// this term does; on the latter the worker is told to find the new leader.
/// Messages that have already arrived are handled together, so an
/// attempt's last epoch report, its end and the worker's next assignment
/// share one etcd commit.
async fn serve_worker_stream(
    state: Arc<CoordinatorState>,
    term: LeaderTerm,
    worker_id: String,
    connection: ConnectionId,
    mut inbound: Streaming<WorkerMessage>,
    outbound: mpsc::Sender<Result<CoordinatorMessage, Status>>,
) {
    loop {
        let first = tokio::select! {
            _ = term.token.cancelled() => {
                // Best effort: the worker also notices the stream ending.
                let _ = outbound.send(Err(ringleader_proto::not_leader_status(None))).await;
                return;
            }
            message = inbound.message() => message,
        };
        let mut batch = Vec::new();
        let mut ended = false;
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Ok(Some(WorkerMessage { kind: Some(kind) })) => batch.push(kind),
                Ok(Some(WorkerMessage { kind: None })) => {}
                Ok(None) => ended = true,
                Err(status) => {
                    warn!(worker = %worker_id, %status, "worker stream failed");
                    ended = true;
                }
            }
            if !ended && batch.len() < MAX_BATCH {
                next = inbound.message().now_or_never();
            }
        }
        // What arrived before the stream ended still counts.
        if let Err(status) =
            handle_worker_messages(&state, &worker_id, connection, batch, &outbound).await
        {
            let _ = outbound.send(Err(status)).await;
            break;
        }
        if ended {
            break;
        }
    }
    let lost = state
        .scheduler()
        .registry
        .disconnected(&worker_id, connection);
    if lost {
        warn!(worker = %worker_id, "worker disconnected");
        let _ = state.apply(|s| (s.workers_lost(std::slice::from_ref(&worker_id)), ()));
        state.schedule();
    }
}

/// Worker messages handled in one scheduler step at most.
const MAX_BATCH: usize = 64;

/// Heartbeats are acknowledged; trial reports go to the scheduler in one
/// step, followed by placement when an attempt ended.
async fn handle_worker_messages(
    state: &CoordinatorState,
    worker_id: &str,
    connection: ConnectionId,
    batch: Vec<worker_message::Kind>,
    outbound: &mpsc::Sender<Result<CoordinatorMessage, Status>>,
) -> Result<(), Status> {
    let mut reports = Vec::new();
    for kind in batch {
        match kind {
            worker_message::Kind::Heartbeat(hb) => {
                state
                    .scheduler()
                    .registry
                    .heartbeat(worker_id, connection, Instant::now());
                let ack = CoordinatorMessage {
                    kind: Some(coordinator_message::Kind::HeartbeatAck(HeartbeatAck {
                        sequence: hb.sequence,
                    })),
                };
                outbound
                    .send(Ok(ack))
                    .await
                    .map_err(|_| Status::cancelled("worker went away"))?;
            }
            worker_message::Kind::Epoch(report) if report.attempt.is_none() => {
                return Err(Status::invalid_argument("epoch report without an attempt"));
            }
            worker_message::Kind::Register(_) => {
                return Err(Status::invalid_argument(
                    "Register may only be the first message",
                ));
            }
            report => reports.push(report),
        }
    }
    if reports.is_empty() {
        return Ok(());
    }
    let _ = state.apply(|s| {
        let mut effects = Effects::default();
        let mut ended = false;
        for report in reports {
            match report {
                worker_message::Kind::Epoch(report) => {
                    let attempt = report.attempt.expect("checked above");
                    let metrics = report.metrics.into_iter().collect();
                    let checkpoint = (!report.checkpoint.is_empty()).then_some(report.checkpoint);
                    effects.extend(s.epoch_report(&attempt, report.epoch, metrics, checkpoint));
                }
                worker_message::Kind::Finished(report) => {
                    effects.extend(s.finished_report(worker_id, &report));
                    ended = true;
                }
                _ => unreachable!("only reports are collected"),
            }
        }
        // The end of one attempt and the start of the next, in one commit:
        // the freed worker's next assignment waits for a single etcd round
        // trip.
        if ended {
            effects.extend(s.schedule(Instant::now()));
        }
        (effects, ())
    });
    Ok(())
}
