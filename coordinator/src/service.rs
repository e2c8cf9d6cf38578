//! The `Coordinator` gRPC service: thin handlers over [`CoordinatorState`].

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::{FutureExt, Stream};
use rand::Rng;
use ringleader_proto::coordinator::coordinator_server::Coordinator;
use std::path::PathBuf;

use ringleader_proto::coordinator::{
    coordinator_message, worker_message, CancelSweepRequest, CancelSweepResponse,
    ClusterStatusRequest, ClusterStatusResponse, CoordinatorInfo, CoordinatorMessage,
    CreateTokenRequest, CreateTokenResponse, GetSweepRequest, GetSweepResponse, HeartbeatAck,
    ListSweepsRequest, ListSweepsResponse, ListTokensRequest, ListTokensResponse, Register,
    Registered, RevokeTokenRequest, RevokeTokenResponse, SubmitKind, SubmitRequest, SubmitResponse,
    WhoIsLeaderRequest, WhoIsLeaderResponse, WorkerMessage,
};
use ringleader_security::{Token, UserRole};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{error, info, warn};

use crate::auth::{
    token_key, validate_token_name, Authenticator, Caller, TokenInfo, TokenRecord, MAX_TOKENS,
};
use crate::election::{self, LeaderTerm, Role};
use crate::error::Error;
use crate::etcd::Etcd;
use crate::limits::{
    DEFAULT_TRIALS_PER_PAGE, MAX_ADDRESS_BYTES, MAX_HOST_BYTES, MAX_PAGE_BYTES, MAX_PATH_BYTES,
    MAX_TRIALS_PER_PAGE, MAX_WORKER_ID_BYTES,
};
use crate::metrics::CoordinatorMetrics;
use crate::registry::{Address, ConnectionId};
use crate::server::{ServeOptions, SubmitLimits};
use crate::store::{durable_or_ended, load_trials, Durable, NotStored, ReadLimit, StateWriter};
use crate::sweep::scheduler::{Input, Now, Reply, Report, Submission};
use crate::sweep::{Effects, Scheduler, SweepKind, Template, TrialRecord};

/// How long a new attach stream may take to send its `Register`.
const REGISTER_DEADLINE: Duration = Duration::from_secs(5);

/// The leader's half of a worker's attach stream.
pub type Outbound = mpsc::Sender<Result<CoordinatorMessage, Status>>;

/// The current term's effect runner: its fenced writer, and the outbox that
/// sends each step's messages once that step's writes are durable.
struct TermRunner {
    writer: StateWriter,
    outbox: mpsc::UnboundedSender<Delivery>,
}

/// One step's messages, waiting for its writes.
struct Delivery {
    writes: Option<oneshot::Receiver<Durable>>,
    messages: Vec<(Address, CoordinatorMessage)>,
    done: oneshot::Sender<Durable>,
}

/// The open attach streams, by worker: where the outbox delivers.
type Streams = Mutex<HashMap<String, (ConnectionId, Outbound)>>;

/// State shared by the service handlers and the leader's background tasks.
pub struct CoordinatorState {
    pub advertise: String,
    pub etcd: Etcd,
    pub role: watch::Receiver<Role>,
    pub heartbeat_interval: Duration,
    pub lost_after: Duration,
    pub checkpoint_root: PathBuf,
    pub limits: SubmitLimits,
    pub auth: Authenticator,
    pub metrics: CoordinatorMetrics,
    scheduler: Mutex<Scheduler>,
    /// The current term's runner, once its state is loaded from etcd.
    runner: Mutex<Option<TermRunner>>,
    streams: Arc<Streams>,
}

impl CoordinatorState {
    /// The state of a coordinator serving `options`, before any term.
    pub fn new(options: &ServeOptions, etcd: Etcd, role: watch::Receiver<Role>) -> Self {
        let lost_after = options.worker_lost_after;
        let checkpoint_root = options.checkpoint_dir.clone();
        Self {
            limits: options.limits,
            auth: Authenticator::new(options.transport.clone(), options.admin_token.clone()),
            metrics: CoordinatorMetrics::default(),
            advertise: options.advertise.clone(),
            etcd,
            role,
            heartbeat_interval: options.heartbeat_interval,
            lost_after,
            scheduler: Mutex::new(Scheduler::new(
                lost_after,
                0,
                checkpoint_root.clone(),
                Instant::now(),
                rand::rng().random(),
            )),
            checkpoint_root,
            runner: Mutex::new(None),
            streams: Arc::default(),
        }
    }

    /// The scheduler, to read; a poisoned lock only means a handler
    /// panicked mid-update of plain data, which stays usable. Changes go
    /// through [`CoordinatorState::step`].
    pub fn scheduler(&self) -> MutexGuard<'_, Scheduler> {
        self.scheduler.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn runner(&self) -> MutexGuard<'_, Option<TermRunner>> {
        self.runner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn streams(&self) -> MutexGuard<'_, HashMap<String, (ConnectionId, Outbound)>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a term: a fresh scheduler (workers re-register with it, its
    /// ring secrets from a generator seeded by the operating system), no
    /// runner until [`CoordinatorState::loaded`].
    pub fn begin_term(&self, owner: i64, reattach_until: Instant) {
        *self.runner() = None;
        self.streams().clear();
        *self.scheduler() = Scheduler::new(
            self.lost_after,
            owner,
            self.checkpoint_root.clone(),
            reattach_until,
            rand::rng().random(),
        );
    }

    /// The term's stored state is in the scheduler: accept changes, and
    /// send each step's messages once its writes are durable. A change
    /// that is not stored ends the term (see [`deliver`]).
    pub fn loaded(&self, writer: StateWriter, term: CancellationToken) {
        let (outbox, deliveries) = mpsc::unbounded_channel();
        tokio::spawn(deliver(deliveries, self.streams.clone(), term));
        *self.runner() = Some(TermRunner { writer, outbox });
    }

    /// Gives the scheduler one input. Its writes are queued and its
    /// messages handed to the outbox under the scheduler's lock, so both
    /// keep decision order; the receiver answers once the writes are
    /// durable and the messages sent, or with why they never will be.
    pub fn step(&self, input: Input) -> (Reply, oneshot::Receiver<Durable>) {
        let mut scheduler = self.scheduler();
        let (effects, reply) = scheduler.step(Now::system(), input);
        (reply, self.run_effects(effects))
    }

    /// Queues `effects` (the caller holds the scheduler's lock).
    fn run_effects(&self, effects: Effects) -> oneshot::Receiver<Durable> {
        let (done, answer) = oneshot::channel();
        if effects.is_empty() {
            let _ = done.send(Ok(()));
            return answer;
        }
        match self.runner().as_ref() {
            Some(runner) => {
                let writes =
                    (!effects.writes.is_empty()).then(|| runner.writer.enqueue(effects.writes));
                let delivery = Delivery {
                    writes,
                    messages: effects.messages,
                    done,
                };
                if let Err(mpsc::error::SendError(lost)) = runner.outbox.send(delivery) {
                    let _ = lost.done.send(Err(NotStored::TermEnded(
                        "this coordinator's term has ended".into(),
                    )));
                }
            }
            None => {
                let _ = done.send(Err(NotStored::Loading));
            }
        }
        answer
    }

    /// Writes effects decided outside a step (sweeps set aside at load).
    pub fn commit(&self, effects: Effects) -> oneshot::Receiver<Durable> {
        let _scheduler = self.scheduler();
        self.run_effects(effects)
    }

    /// A worker's registration: its stream is where the outbox delivers
    /// from now on, and `registered` (the acknowledgement) is on it before
    /// anything the registration leads to.
    fn register(
        &self,
        registration: Register,
        outbound: &Outbound,
        registered: CoordinatorMessage,
    ) -> Result<ConnectionId, Status> {
        let mut scheduler = self.scheduler();
        let worker = registration.worker_id.clone();
        let host = registration.host.clone();
        let (effects, reply) =
            scheduler.step(Now::system(), Input::Register(Box::new(registration)));
        let connection = match reply {
            Reply::Registered(Ok(connection)) => connection,
            Reply::Registered(Err(refused)) => {
                warn!(worker = %worker, host = %host, "refused a registration: the id belongs to a live worker");
                return Err(Status::already_exists(refused.to_string()));
            }
            other => unreachable!("a registration answers Registered, not {other:?}"),
        };
        // A fresh channel: the first message always fits.
        outbound
            .try_send(Ok(registered))
            .map_err(|_| Status::cancelled("worker went away during registration"))?;
        self.streams()
            .insert(worker, (connection, outbound.clone()));
        drop(self.run_effects(effects));
        Ok(connection)
    }

    /// Waits until every state change made so far is durable in etcd, so
    /// that a read from etcd sees them.
    async fn changes_durable(&self) -> Result<(), Status> {
        let flushed = match self.runner().as_ref() {
            Some(runner) => runner.writer.flushed(),
            None => return Err(Status::unavailable("this coordinator is not leading")),
        };
        Ok(durable_or_ended(flushed.await)?)
    }

    /// Whether this term's state is loaded (sweep calls need it).
    pub fn is_loaded(&self) -> bool {
        self.runner().is_some()
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

/// The outbox of one term: each step's messages go out once its writes are
/// durable, in step order. A change that is not stored ends the term: the
/// in-memory state ran ahead of etcd, so the next term (here or on another
/// coordinator) rebuilds it from what etcd holds, and nothing decided after
/// it is sent either, as it may rest on the change that was lost.
async fn deliver(
    mut deliveries: mpsc::UnboundedReceiver<Delivery>,
    streams: Arc<Streams>,
    term: CancellationToken,
) {
    let mut failed: Option<NotStored> = None;
    while let Some(delivery) = deliveries.recv().await {
        let durable = match (&failed, delivery.writes) {
            (Some(earlier), _) => Err(NotStored::TermEnded(format!(
                "an earlier change was not stored ({earlier})"
            ))),
            (None, None) => Ok(()),
            (None, Some(writes)) => durable_or_ended(writes.await),
        };
        match &durable {
            Ok(()) => {
                let streams = streams.lock().unwrap_or_else(|p| p.into_inner());
                for (to, message) in delivery.messages {
                    send(&streams, to, message);
                }
            }
            Err(error) if failed.is_none() => {
                error!(%error, "a state change was not stored: its messages are not sent, and this leadership term ends so that the next one starts from what etcd holds");
                failed = Some(error.clone());
                term.cancel();
            }
            Err(_) => {}
        }
        let _ = delivery.done.send(durable);
    }
}

/// Sends `message` on the stream it was decided for, if that stream is
/// still the worker's. A full channel (a worker not reading) does not hold
/// up the outbox: that one message waits in its own task.
fn send(
    streams: &HashMap<String, (ConnectionId, Outbound)>,
    to: Address,
    message: CoordinatorMessage,
) {
    let Some((connection, outbound)) = streams.get(&to.worker) else {
        return;
    };
    if *connection != to.connection {
        return;
    }
    if let Err(mpsc::error::TrySendError::Full(message)) = outbound.try_send(Ok(message)) {
        let outbound = outbound.clone();
        tokio::spawn(async move {
            let _ = outbound.send(message).await;
        });
    }
}

impl CoordinatorState {
    /// Writes a token record through the term's fenced writer, then makes
    /// it the one the authenticator uses.
    async fn store_token(&self, record: &TokenRecord) -> Result<(), Status> {
        let ticket = match self.runner().as_ref() {
            Some(runner) => runner
                .writer
                .enqueue(vec![(token_key(&record.id), to_json(record))]),
            None => return Err(Status::unavailable("this coordinator is not leading")),
        };
        durable(ticket).await?;
        self.auth
            .tokens_mut()
            .insert(record.id.clone(), record.clone());
        Ok(())
    }
}

/// One audit line per change a user makes (target `ringleader::audit`).
fn audit(caller: &Caller, action: &str, what: &str) {
    info!(target: "ringleader::audit", user = %caller.user, role = %caller.role, action, what, "audit");
}

/// PERMISSION_DENIED for someone else's sweep.
fn not_yours(caller: &Caller, id: &str, verb: &str) -> Status {
    Status::permission_denied(format!(
        "{id} belongs to another user; {} (a {}) may {verb} only their own",
        caller.user, caller.role
    ))
}

/// Waits until a scheduler step's writes are durable: a change etcd
/// refused is RESOURCE_EXHAUSTED (final), one a term ended under is
/// UNAVAILABLE (the next leader may take it).
async fn durable(answer: oneshot::Receiver<Durable>) -> Result<(), Status> {
    Ok(durable_or_ended(answer.await)?)
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

    /// The user behind a client call, once this coordinator leads with its
    /// state (tokens included) loaded.
    async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        self.state.require_loaded_leader().await?;
        self.state.auth.user(request)
    }
}

type AttachStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

/// Most GPUs a worker may list, and the longest device or GPU name.
const MAX_GPUS: usize = 64;
const MAX_DEVICE_NAME_BYTES: usize = 256;

fn validate_registration(reg: &Register) -> Result<(), Status> {
    if reg.worker_id.trim().is_empty() {
        return Err(Status::invalid_argument("register: worker_id is empty"));
    }
    if reg.peer_address.trim().is_empty() {
        return Err(Status::invalid_argument("register: peer_address is empty"));
    }
    let too_long = |field: &str, len: usize, max: usize| {
        Status::invalid_argument(format!(
            "register: {field} is {len} bytes; at most {max} are accepted"
        ))
    };
    for (field, value, max) in [
        ("worker_id", &reg.worker_id, MAX_WORKER_ID_BYTES),
        ("host", &reg.host, MAX_HOST_BYTES),
        ("peer_address", &reg.peer_address, MAX_ADDRESS_BYTES),
        (
            "local_peer_address",
            &reg.local_peer_address,
            MAX_ADDRESS_BYTES,
        ),
        ("machine_id", &reg.machine_id, MAX_HOST_BYTES),
    ] {
        if value.len() > max {
            return Err(too_long(field, value.len(), max));
        }
    }
    if reg.worker_id.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "register: worker_id contains control characters",
        ));
    }
    if let Some(resources) = &reg.resources {
        if resources.gpus.len() > MAX_GPUS {
            return Err(Status::invalid_argument(format!(
                "register: {} GPUs listed; at most {MAX_GPUS} are accepted",
                resources.gpus.len()
            )));
        }
        if resources.device.len() > MAX_DEVICE_NAME_BYTES {
            return Err(too_long(
                "resources.device",
                resources.device.len(),
                MAX_DEVICE_NAME_BYTES,
            ));
        }
        if let Some(gpu) = resources
            .gpus
            .iter()
            .find(|g| g.name.len() > MAX_DEVICE_NAME_BYTES)
        {
            return Err(too_long(
                "resources.gpus.name",
                gpu.name.len(),
                MAX_DEVICE_NAME_BYTES,
            ));
        }
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
        self.state.auth.worker(&request)?;
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
        let (tx, rx) = mpsc::channel(64);
        // Until the term's sweeps are loaded, a re-registering worker's
        // running attempt would look unknown and be stopped: it must wait,
        // so that it is re-attached instead.
        if self.state.scheduler().owner() != term.create_revision || !self.state.is_loaded() {
            return Err(Status::unavailable(
                "the leader is starting its term; retry",
            ));
        }
        info!(
            worker = %worker_id,
            host = %registration.host,
            peer = %registration.peer_address,
            "worker registered"
        );
        let registered = CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Registered(Registered {
                worker_id: worker_id.clone(),
                leader_address: self.state.advertise.clone(),
                heartbeat_interval_ms: u32::try_from(self.state.heartbeat_interval.as_millis())
                    .unwrap_or(u32::MAX),
            })),
        };
        let connection = self.state.register(registration, &tx, registered)?;
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
        request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        self.caller(&request).await?;
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
        let workers = self.state.scheduler().workers(Instant::now());
        Ok(Response::new(ClusterStatusResponse {
            leader_address: self.state.advertise.clone(),
            coordinators,
            workers,
        }))
    }

    async fn who_is_leader(
        &self,
        request: Request<WhoIsLeaderRequest>,
    ) -> Result<Response<WhoIsLeaderResponse>, Status> {
        self.state.auth.component(&request)?;
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
        let caller = self.caller(&request).await?;
        caller.require(UserRole::User, "submitting")?;
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
        if request.origin.len() > MAX_PATH_BYTES {
            return Err(Status::invalid_argument(format!(
                "submit: origin is {} bytes; at most {MAX_PATH_BYTES} are accepted",
                request.origin.len()
            )));
        }
        let origin = if request.origin.is_empty() {
            "<submitted spec>".to_string()
        } else {
            request.origin.clone()
        };
        // Parsed in full before anything is stored: a rejected spec
        // leaves no trace in etcd.
        let template = Template::parse(kind, &request.spec, &origin)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let limits = self.state.limits;
        if template.max_trials() > limits.max_trials_per_sweep {
            return Err(Status::invalid_argument(format!(
                "{origin}: the sweep asks for {} trials; this cluster runs at most {} per sweep \
                 (ringleader serve --max-trials-per-sweep)",
                template.max_trials(),
                limits.max_trials_per_sweep
            )));
        }
        let submission = Submission {
            kind,
            template,
            spec: request.spec,
            origin,
            owner: caller.user.clone(),
            max_running: limits.max_running_sweeps,
        };
        let (reply, answer) = self.state.step(Input::Submit(Box::new(submission)));
        let id = match reply {
            Reply::Submitted(submitted) => submitted.map_err(Status::from),
            other => unreachable!("a submission answers Submitted, not {other:?}"),
        };
        let id = id?;
        durable(answer).await?;
        audit(&caller, "submit", &id);
        Ok(Response::new(SubmitResponse { sweep_id: id }))
    }

    async fn list_sweeps(
        &self,
        request: Request<ListSweepsRequest>,
    ) -> Result<Response<ListSweepsResponse>, Status> {
        let caller = self.caller(&request).await?;
        let include_spec = request.into_inner().include_spec;
        let (sweeps, unreadable) = {
            let scheduler = self.state.scheduler();
            (scheduler.list(), scheduler.unreadable().to_vec())
        };
        let sweep_json = sweeps
            .into_iter()
            .filter(|sweep| caller.may_read(&sweep.owner))
            .map(|mut sweep| {
                if !include_spec {
                    sweep.spec.clear();
                }
                to_json(&sweep)
            })
            .collect();
        Ok(Response::new(ListSweepsResponse {
            sweep_json,
            unreadable,
        }))
    }

    async fn get_sweep(
        &self,
        request: Request<GetSweepRequest>,
    ) -> Result<Response<GetSweepResponse>, Status> {
        let caller = self.caller(&request).await?;
        let request = request.into_inner();
        let id = request.sweep_id;
        let limit = match request.trials_limit {
            0 => DEFAULT_TRIALS_PER_PAGE,
            n => n.min(MAX_TRIALS_PER_PAGE),
        } as usize;
        let from = request.trials_from;
        let found = self.state.scheduler().get(&id);
        let Some((record, running, mut problems)) = found else {
            return Err(Status::not_found(format!("no sweep or job {id}")));
        };
        if !caller.may_read(&record.owner) {
            return Err(not_yours(&caller, &id, "see"));
        }
        let page = if running {
            let scheduler = self.state.scheduler();
            TrialPage::of(scheduler.trials_from(&id, from), limit, false)
        } else {
            // Finished sweeps are not kept in memory: read their trials,
            // once the writes that finished the sweep are durable.
            self.state.changes_durable().await?;
            let read = ReadLimit {
                records: limit,
                bytes: MAX_PAGE_BYTES,
            };
            let loaded = load_trials(&self.state.etcd, &id, from, read).await?;
            problems.extend(loaded.unreadable.iter().map(ToString::to_string));
            TrialPage::of(loaded.records.iter(), limit, loaded.more)
        };
        problems.dedup();
        Ok(Response::new(GetSweepResponse {
            sweep_json: to_json(&record),
            trial_json: page.json,
            more_trials: page.next.is_some(),
            next_trials_from: page.next.unwrap_or_default(),
            unreadable: problems,
        }))
    }

    async fn cancel_sweep(
        &self,
        request: Request<CancelSweepRequest>,
    ) -> Result<Response<CancelSweepResponse>, Status> {
        let caller = self.caller(&request).await?;
        let id = request.into_inner().sweep_id;
        caller.require(UserRole::User, "cancelling")?;
        let owner = self
            .state
            .scheduler()
            .get(&id)
            .map(|(record, ..)| record.owner);
        if let Some(owner) = owner {
            if !caller.may_change(&owner) {
                return Err(not_yours(&caller, &id, "cancel"));
            }
        }
        let (reply, answer) = self.state.step(Input::Cancel { sweep: id.clone() });
        let stopped = match reply {
            Reply::Cancelled(cancelled) => cancelled?,
            other => unreachable!("a cancellation answers Cancelled, not {other:?}"),
        };
        durable(answer).await?;
        audit(&caller, "cancel", &id);
        Ok(Response::new(CancelSweepResponse {
            stopped_attempts: stopped,
        }))
    }

    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let caller = self.caller(&request).await?;
        caller.require(UserRole::Admin, "creating tokens")?;
        let request = request.into_inner();
        validate_token_name(&request.name)?;
        let role: UserRole =
            request
                .role
                .parse()
                .map_err(|e: ringleader_security::SecurityError| {
                    Status::invalid_argument(e.to_string())
                })?;
        if self.state.auth.tokens().len() >= MAX_TOKENS {
            return Err(Status::resource_exhausted(format!(
                "this cluster already holds {MAX_TOKENS} tokens, the most it keeps"
            )));
        }
        let token = Token::generate();
        let record = TokenRecord {
            id: token.id.clone(),
            name: request.name,
            role,
            secret_sha256: token.secret_hash(),
            created_unix_ms: Now::system().unix_ms,
            created_by: caller.user.clone(),
            revoked_unix_ms: None,
        };
        self.state.store_token(&record).await?;
        audit(
            &caller,
            "token create",
            &format!("{} ({}, {})", record.id, record.name, record.role),
        );
        Ok(Response::new(CreateTokenResponse {
            id: token.id.clone(),
            token: token.reveal(),
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let caller = self.caller(&request).await?;
        caller.require(UserRole::Admin, "listing tokens")?;
        let mut tokens: Vec<TokenInfo> = self
            .state
            .auth
            .tokens()
            .values()
            .map(TokenInfo::from)
            .collect();
        tokens.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        Ok(Response::new(ListTokensResponse {
            token_json: tokens.iter().map(to_json).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let caller = self.caller(&request).await?;
        caller.require(UserRole::Admin, "revoking tokens")?;
        let id = request.into_inner().id;
        let record = {
            let mut tokens = self.state.auth.tokens_mut();
            let Some(record) = tokens.get_mut(&id) else {
                return Err(Status::not_found(format!("no token {id}")));
            };
            // Refused from now on, even before the record is durable.
            record.revoked_unix_ms.get_or_insert(Now::system().unix_ms);
            record.clone()
        };
        self.state.store_token(&record).await?;
        audit(
            &caller,
            "token revoke",
            &format!("{} ({})", record.id, record.name),
        );
        Ok(Response::new(RevokeTokenResponse {}))
    }
}

/// One page of trials as JSON, within the page's count and byte bounds.
struct TrialPage {
    json: Vec<String>,
    /// The number to continue from, when there are more.
    next: Option<u64>,
}

impl TrialPage {
    /// Takes trials in order up to `limit` of them or [`MAX_PAGE_BYTES`]
    /// (at least one); `more_after`: the source itself stopped early.
    fn of<'a>(
        trials: impl Iterator<Item = &'a TrialRecord>,
        limit: usize,
        more_after: bool,
    ) -> Self {
        let mut json = Vec::new();
        let mut bytes = 0;
        let mut last = None;
        let mut trials = trials.peekable();
        while let Some(trial) = trials.peek() {
            if json.len() >= limit || (!json.is_empty() && bytes >= MAX_PAGE_BYTES) {
                break;
            }
            let text = to_json(*trial);
            bytes += text.len();
            json.push(text);
            last = Some(trial.number);
            trials.next();
        }
        let more = trials.peek().is_some() || more_after;
        Self {
            json,
            next: if more { last.map(|n| n + 1) } else { None },
        }
    }
}

fn to_json<T: serde::Serialize>(record: &T) -> String {
    serde_json::to_string(record).expect("records serialise")
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
    {
        let mut streams = state.streams();
        if streams
            .get(&worker_id)
            .is_some_and(|(c, _)| *c == connection)
        {
            streams.remove(&worker_id);
        }
    }
    // A change not stored ends the term (see `deliver`): nothing to do here.
    let _ = state.step(Input::Disconnected {
        worker: worker_id,
        connection,
    });
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
    // A stream superseded by a newer registration (after this one was
    // declared lost) no longer speaks for the worker: ending it makes a
    // worker that is still alive register again, instead of heartbeating
    // into a void.
    let superseded = || {
        Status::aborted(
            "this attach stream was replaced by a newer registration of the same worker id; register again",
        )
    };
    let mut reports = Vec::new();
    for kind in batch {
        match kind {
            worker_message::Kind::Heartbeat(hb) => {
                let heartbeat = Input::Heartbeat {
                    worker: worker_id.to_string(),
                    connection,
                };
                if let (Reply::Superseded, _) = state.step(heartbeat) {
                    return Err(superseded());
                }
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
            worker_message::Kind::Epoch(report) => reports.push(Report::Epoch(report)),
            worker_message::Kind::Finished(report) => reports.push(Report::Finished(report)),
        }
    }
    if reports.is_empty() {
        return Ok(());
    }
    // A change not stored ends the term (see `deliver`): nothing to do here.
    let (reply, _) = state.step(Input::Reports {
        worker: worker_id.to_string(),
        connection,
        reports,
    });
    match reply {
        Reply::Superseded => Err(superseded()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(sequence: u64) -> CoordinatorMessage {
        CoordinatorMessage {
            kind: Some(coordinator_message::Kind::HeartbeatAck(HeartbeatAck {
                sequence,
            })),
        }
    }

    /// A step whose writes answer `stored`, with one message for `w1`.
    fn step(stored: Durable, sequence: u64) -> (Delivery, oneshot::Receiver<Durable>) {
        let (writes_done, writes) = oneshot::channel();
        writes_done.send(stored).unwrap();
        let (done, answer) = oneshot::channel();
        let to = Address {
            worker: "w1".into(),
            connection: 1,
        };
        let delivery = Delivery {
            writes: Some(writes),
            messages: vec![(to, message(sequence))],
            done,
        };
        (delivery, answer)
    }

    #[tokio::test]
    async fn a_change_not_stored_ends_the_term_and_nothing_after_it_is_sent() {
        let (outbound, mut inbox) = mpsc::channel(8);
        let streams: Arc<Streams> = Arc::default();
        streams.lock().unwrap().insert("w1".into(), (1, outbound));
        let term = CancellationToken::new();
        let (outbox, deliveries) = mpsc::unbounded_channel();
        let runner = tokio::spawn(deliver(deliveries, streams, term.clone()));
        let (first, stored) = step(Ok(()), 1);
        let refused = NotStored::Refused("request is too large".into());
        let (second, not_stored) = step(Err(refused.clone()), 2);
        let (third, after) = step(Ok(()), 3);
        for delivery in [first, second, third] {
            outbox.send(delivery).unwrap();
        }
        drop(outbox);
        runner.await.unwrap();
        assert_eq!(stored.await.unwrap(), Ok(()));
        assert_eq!(not_stored.await.unwrap(), Err(refused));
        let after = after.await.unwrap().unwrap_err();
        assert!(
            after
                .to_string()
                .contains("an earlier change was not stored"),
            "{after}"
        );
        assert!(term.is_cancelled(), "the term must end");
        // Only the stored step's message reached the worker.
        let sent = inbox.recv().await.unwrap().unwrap();
        assert_eq!(sent, message(1));
        assert!(inbox.try_recv().is_err(), "nothing after the failed change");
    }

    #[tokio::test]
    async fn messages_for_a_replaced_stream_are_not_delivered() {
        let (outbound, mut inbox) = mpsc::channel(8);
        let streams: Arc<Streams> = Arc::default();
        // w1 registered again: its current stream is connection 2.
        streams.lock().unwrap().insert("w1".into(), (2, outbound));
        let (outbox, deliveries) = mpsc::unbounded_channel();
        let runner = tokio::spawn(deliver(deliveries, streams, CancellationToken::new()));
        let (delivery, answer) = step(Ok(()), 1);
        outbox.send(delivery).unwrap();
        drop(outbox);
        runner.await.unwrap();
        assert_eq!(answer.await.unwrap(), Ok(()));
        assert!(inbox.try_recv().is_err());
    }
}
