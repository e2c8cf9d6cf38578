//! Bootstrap of one coordinator: connect etcd, campaign, serve gRPC.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringleader_proto::coordinator::coordinator_server::CoordinatorServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tracing::{error, info, warn};

use ringleader_security::{TlsDir, Token, Transport};

use crate::auth::{TokenRecord, TOKENS_PREFIX};
use crate::client::Connection;
use crate::dashboard::Dashboard;
use crate::election::{Election, LeaderTerm, Role};
use crate::error::{Error, Result};
use crate::etcd::Etcd;
use crate::limits::MAX_REQUEST_BYTES;
use crate::service::{CoordinatorService, CoordinatorState};
use crate::store::{load_prefix, load_trials, FencedStore, ReadLimit, StateWriter, Unreadable};
use crate::sweep::records::SWEEPS_PREFIX;
use crate::sweep::scheduler::{Effects, Input, Now, Stored};
use crate::sweep::SweepRecord;

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
    /// Where trials checkpoint when their job names no directory.
    pub checkpoint_dir: PathBuf,
    pub limits: SubmitLimits,
    /// Mutual TLS on the API (or `--insecure`).
    pub transport: Transport,
    /// etcd's client certificate; plaintext etcd without.
    pub etcd_tls: Option<TlsDir>,
    /// The bootstrap admin's token (`--admin-token-file`).
    pub admin_token: Option<Token>,
    /// The web dashboard's address, if served.
    pub dashboard_listen: Option<SocketAddr>,
    /// Prometheus `/metrics`' address, if served.
    pub metrics_listen: Option<SocketAddr>,
}

/// The configurable bounds on what clients may submit (see
/// [`crate::limits`] for the fixed ones).
#[derive(Clone, Copy, Debug)]
pub struct SubmitLimits {
    pub max_trials_per_sweep: u64,
    pub max_running_sweeps: usize,
}

impl Default for SubmitLimits {
    fn default() -> Self {
        Self {
            max_trials_per_sweep: crate::limits::DEFAULT_MAX_TRIALS_PER_SWEEP,
            max_running_sweeps: crate::limits::DEFAULT_MAX_RUNNING_SWEEPS,
        }
    }
}

/// Runs a coordinator until `shutdown` is cancelled. Fails fast (within
/// `etcd_timeout`) when etcd is unreachable or the address is taken.
pub async fn serve(options: ServeOptions, shutdown: CancellationToken) -> Result<()> {
    let etcd = Etcd::connect(
        &options.etcd,
        options.etcd_timeout,
        options.etcd_tls.as_ref(),
    )
    .await?;
    let listener = TcpListener::bind(options.listen)
        .await
        .map_err(|e| Error::InvalidArgument(format!("cannot listen on {}: {e}", options.listen)))?;
    info!(listen = %options.listen, advertise = %options.advertise, etcd = %etcd.endpoints(), "coordinator starting");

    let election = Election::new(etcd.clone(), options.advertise.clone(), options.lease_ttl)?;
    let role = election.subscribe();
    let state = Arc::new(CoordinatorState::new(&options, etcd.clone(), role.clone()));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CoordinatorServer<CoordinatorService>>()
        .await;

    if let Some(listen) = options.metrics_listen {
        let state = state.clone();
        ringleader_client::metrics::serve_registry(
            listen,
            move || state.metrics.render(&state),
            shutdown.clone(),
        )
        .await?;
    }
    if let Some(listen) = options.dashboard_listen {
        serve_dashboard(listen, &options, shutdown.clone()).await?;
    }

    let election_task = tokio::spawn(election.run(shutdown.clone()));
    let duties_task = tokio::spawn(leader_duties(
        state.clone(),
        options.clone(),
        shutdown.clone(),
    ));

    let mut server = options
        .transport
        .server(tonic::transport::Server::builder())
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let served = server
        .add_service(health_service)
        .add_service(
            CoordinatorServer::new(CoordinatorService::new(state))
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .serve_with_incoming_shutdown(
            // TCP_NODELAY on accepted connections: without it, small answers
            // wait out the client's delayed ACK (40 ms on Linux).
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.cancelled(),
        )
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

/// Serves the dashboard on `listen`: HTTPS with the coordinator's
/// certificate, relaying browsers' tokens to the leader through this
/// coordinator's own address.
async fn serve_dashboard(
    listen: SocketAddr,
    options: &ServeOptions,
    shutdown: CancellationToken,
) -> Result<()> {
    let listener = crate::web::bind(listen, "the dashboard").await?;
    let tls = match &options.transport {
        Transport::Tls(dir) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
            dir.https_server_config()
                .map_err(|e| Error::InvalidArgument(e.to_string()))?,
        ))),
        Transport::Insecure => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    info!(url = %format!("{scheme}://{}/", listener.local_addr().unwrap_or(listen)), "dashboard");
    let dashboard = Dashboard::new(Connection {
        coordinators: vec![options.advertise.clone()],
        transport: options.transport.clone(),
        token: None,
        timeout: DASHBOARD_CALL_TIMEOUT,
    });
    let handler = move |request| dashboard.clone().handle(request);
    tokio::spawn(crate::web::serve(listener, tls, handler, shutdown));
    Ok(())
}

/// How long the dashboard waits for the leader on a browser's behalf.
const DASHBOARD_CALL_TIMEOUT: Duration = Duration::from_secs(5);

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
            // Workers of running attempts get one loss timeout to re-attach
            // before their attempts are re-queued.
            state.begin_term(
                term.create_revision,
                Instant::now() + options.worker_lost_after,
            );
            state.metrics.terms_won.inc();
            tokio::spawn(lead(state.clone(), term, options.clone()));
        }
        tokio::select! {
            changed = role.changed() => if changed.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// One leadership term: load the stored sweeps, then keep scheduling and
/// watching for lost workers until the term ends.
async fn lead(state: Arc<CoordinatorState>, term: LeaderTerm, options: ServeOptions) {
    let store = FencedStore::new(state.etcd.clone(), &term)
        .timed(state.metrics.etcd_commit_seconds.clone());
    match store.begin_term().await {
        Ok(number) => info!(term = number, "leader term recorded"),
        Err(error) => warn!(%error, "could not record the leader term"),
    }
    let runs = loop {
        let loaded = async {
            load_tokens(&state).await?;
            load_state(&state).await
        };
        match loaded.await {
            Ok(runs) => break runs,
            Err(error) => {
                warn!(%error, "cannot load the stored sweeps; retrying");
                tokio::select! {
                    _ = term.token.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    };
    let set_aside = {
        let (sweeps, unreadable) = runs;
        let mut scheduler = state.scheduler();
        info!(
            sweeps = sweeps.len(),
            unreadable = unreadable.len(),
            "stored state loaded"
        );
        for bad in unreadable {
            scheduler.unreadable_record(bad.to_string());
        }
        let mut writes = Effects::default();
        let now = Now::system();
        for sweep in sweeps {
            writes.extend(scheduler.restore(sweep, now));
        }
        writes
    };
    state.loaded(
        StateWriter::spawn(store, term.token.clone()),
        term.token.clone(),
    );
    if !set_aside.is_empty() {
        let durable = state.commit(set_aside);
        tokio::spawn(async move {
            if let Ok(Err(error)) = durable.await {
                error!(%error, "could not mark the sweeps that cannot be taken over failed");
            }
        });
    }
    let mut tick = tokio::time::interval(SCHEDULE_EVERY.min(options.heartbeat_interval));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = term.token.cancelled() => return,
        }
        // A change not stored ends the term (see service.rs's `deliver`).
        let _ = state.step(Input::Tick);
    }
}

/// Loads the stored tokens into the authenticator. A token record that
/// does not decode is left out (its holder is refused), and named.
async fn load_tokens(state: &CoordinatorState) -> Result<()> {
    let loaded = load_prefix::<TokenRecord>(&state.etcd, TOKENS_PREFIX).await?;
    for bad in &loaded.unreadable {
        error!(key = %bad.key, reason = %bad.reason, "a stored token is unreadable; its holder will be refused");
    }
    info!(tokens = loaded.records.len(), "tokens loaded");
    state.auth.load_tokens(loaded.records);
    Ok(())
}

/// How often the leader re-checks placement without an event.
const SCHEDULE_EVERY: Duration = Duration::from_millis(250);

/// Every stored sweep, and the keys of the records that could not be read
/// at all. One bad record never stops the rest from loading: it is named
/// and set aside.
async fn load_state(state: &CoordinatorState) -> Result<(Vec<Stored>, Vec<Unreadable>)> {
    let loaded = load_prefix::<SweepRecord>(&state.etcd, SWEEPS_PREFIX).await?;
    for bad in &loaded.unreadable {
        error!(key = %bad.key, reason = %bad.reason, "a stored sweep record is unreadable; it is left out");
    }
    let mut sweeps = Vec::new();
    for record in loaded.records {
        let (record, template) = match Stored::take_over(record) {
            Ok(running) => running,
            Err(stored) => {
                sweeps.push(*stored);
                continue;
            }
        };
        let trials = load_trials(&state.etcd, &record.id, 0, ReadLimit::ALL).await?;
        if !trials.unreadable.is_empty() {
            for bad in &trials.unreadable {
                error!(sweep = %record.id, key = %bad.key, reason = %bad.reason, "a stored trial record is unreadable; its sweep is set aside");
            }
            let problems = trials.unreadable.iter().map(ToString::to_string).collect();
            sweeps.push(Stored::SetAside(record, problems));
            continue;
        }
        sweeps.push(Stored::running(record, template, trials.records));
    }
    Ok((sweeps, loaded.unreadable))
}
