//! Bootstrap of one coordinator: connect etcd, campaign, serve gRPC.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringleader_proto::coordinator::coordinator_server::CoordinatorServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::election::{Election, Role};
use crate::error::{Error, Result};
use crate::etcd::Etcd;
use crate::service::{CoordinatorService, CoordinatorState};
use crate::store::FencedStore;

/// Everything `ringleader serve` needs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub advertise: String,
    pub etcd: Vec<String>,
    pub lease_ttl: Duration,
    /// Deadline for each etcd request, and for the first connection.
    pub etcd_timeout: Duration,
    pub heartbeat_interval: Duration,
    /// Silence after which a worker counts as lost.
    pub worker_lost_after: Duration,
}

/// Runs a coordinator until `shutdown` is cancelled. Fails fast (within
/// `etcd_timeout`) when etcd is unreachable or the address is taken.
pub async fn serve(options: ServeOptions, shutdown: CancellationToken) -> Result<()> {
    let etcd = Etcd::connect(&options.etcd, options.etcd_timeout).await?;
    let listener = TcpListener::bind(options.listen)
        .await
        .map_err(|e| Error::InvalidArgument(format!("cannot listen on {}: {e}", options.listen)))?;
    info!(listen = %options.listen, advertise = %options.advertise, etcd = %etcd.endpoints(), "coordinator starting");

    let election = Election::new(etcd.clone(), options.advertise.clone(), options.lease_ttl)?;
    let role = election.subscribe();
    let state = Arc::new(CoordinatorState::new(
        options.advertise.clone(),
        etcd.clone(),
        role.clone(),
        options.heartbeat_interval,
        options.worker_lost_after,
    ));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CoordinatorServer<CoordinatorService>>()
        .await;

    let election_task = tokio::spawn(election.run(shutdown.clone()));
    let duties_task = tokio::spawn(leader_duties(
        state.clone(),
        options.clone(),
        shutdown.clone(),
    ));

    let served = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(CoordinatorServer::new(CoordinatorService::new(state)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled())
        .await;
    shutdown.cancel();
    // The election resigns on shutdown so a standby takes over at once.
    let _ = election_task.await;
    let _ = duties_task.await;
    served.map_err(|e| Error::Process {
        what: "coordinator gRPC server".into(),
        reason: e.to_string(),
    })
}

/// Starts and stops the leader-only work as the role changes.
async fn leader_duties(
    state: Arc<CoordinatorState>,
    options: ServeOptions,
    shutdown: CancellationToken,
) {
    let mut role = state.role.clone();
    loop {
        let term = match &*role.borrow_and_update() {
            Role::Leader(term) => Some(term.clone()),
            Role::Candidate => None,
        };
        if let Some(term) = term {
            state.reset_registry(options.worker_lost_after);
            let store = FencedStore::new(state.etcd.clone(), &term);
            match store.begin_term().await {
                Ok(number) => info!(term = number, "leader term recorded"),
                Err(error) => warn!(%error, "could not record the leader term"),
            }
            tokio::spawn(sweep_lost_workers(
                state.clone(),
                term.token.clone(),
                options.heartbeat_interval,
            ));
        }
        tokio::select! {
            changed = role.changed() => if changed.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Declares silent workers lost while the term lasts.
async fn sweep_lost_workers(
    state: Arc<CoordinatorState>,
    term: CancellationToken,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = term.cancelled() => return,
        }
        for worker in state.registry().sweep(Instant::now()) {
            warn!(worker = %worker, "worker lost: missed heartbeats");
        }
    }
}
