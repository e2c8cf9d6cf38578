//! `ringleader-worker`: one training node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use ringleader_client::args::{parse_duration, parse_optional_address, OptionalAddress, TlsArgs};
use ringleader_client::leader::{self as client, Connection};
use ringleader_client::runtime;
use ringleader_collective::ring;
use ringleader_collective::{CollectiveService, LocalSocket, RingOptions};
use ringleader_proto::coordinator::Register;
use ringleader_security::{Role, Transport};
use ringleader_worker::agent::{self, AgentOptions};
use ringleader_worker::confine::RootArgs;
use ringleader_worker::device::{self, DeviceRequest};
use ringleader_worker::metrics;
use ringleader_worker::trial::{TrialContext, Trials};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Ring chunks are large, short-lived buffers: glibc serves them with fresh
/// mmaps (page faults, zeroing) every time; mimalloc reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "ringleader-worker",
    version,
    about = "Ringleader training worker"
)]
struct Args {
    /// Coordinator addresses, comma-separated (any of them; the leader is
    /// found from there).
    #[arg(
        long,
        env = "RINGLEADER_COORDINATOR",
        value_delimiter = ',',
        required = true
    )]
    coordinator: Vec<String>,

    /// Address to serve the peer (collective) service on.
    #[arg(long, env = "RINGLEADER_LISTEN", default_value = "0.0.0.0:7500")]
    listen: SocketAddr,

    /// Address other workers reach this one on (the pod IP in Kubernetes);
    /// defaults to --listen.
    #[arg(long, env = "RINGLEADER_ADVERTISE")]
    advertise: Option<String>,

    /// What to train on: auto, cpu, cuda or cuda:N.
    #[arg(long, env = "RINGLEADER_DEVICE", default_value = "auto")]
    device: DeviceRequest,

    /// Declare this many GPUs to the leader instead of detecting them
    /// (hosts without NVML; tests of placement). Jobs still train on the
    /// CUDA devices libtorch sees: a job on a GPU this machine lacks fails,
    /// saying so. Without it a worker offers the GPUs libtorch sees, or
    /// none with `--device cpu`. At most 64, the most the leader accepts.
    #[arg(long, env = "RINGLEADER_GPUS", value_parser = clap::value_parser!(u32).range(0..=64))]
    gpus: Option<u32>,

    /// Stable worker id (the pod name in Kubernetes); defaults to
    /// <hostname>-<advertised port>.
    #[arg(long, env = "RINGLEADER_WORKER_ID")]
    id: Option<String>,

    /// Deadline for reaching a coordinator.
    #[arg(long, env = "RINGLEADER_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    timeout: Duration,

    /// Longest wait between registration attempts.
    #[arg(long, env = "RINGLEADER_MAX_BACKOFF", default_value = "1s", value_parser = parse_duration)]
    max_backoff: Duration,

    /// Longest a collective waits on a peer before failing.
    #[arg(long, env = "RINGLEADER_COLLECTIVE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    collective_timeout: Duration,

    /// Most ring streams that may wait on the collective port for their
    /// ring to be built here; more are refused with RESOURCE_EXHAUSTED.
    /// Each waiting stream can make the worker buffer up to one stream
    /// window (--collective-stream-window) before it is read.
    #[arg(
        long,
        env = "RINGLEADER_COLLECTIVE_MAX_WAITING_STREAMS",
        default_value_t = ringleader_collective::service::DEFAULT_MAX_WAITING_STREAMS as u64,
        value_parser = clap::value_parser!(u64).range(1..=4096)
    )]
    collective_max_waiting_streams: u64,

    /// HTTP/2 stream window of the collective port, in bytes: what any one
    /// inbound stream can make the worker buffer before it is read (the
    /// connection window is twice this). 1 MiB keeps all-reduce bandwidth;
    /// 2–3 MiB measured slower.
    #[arg(
        long,
        env = "RINGLEADER_COLLECTIVE_STREAM_WINDOW",
        default_value_t = ringleader_collective::ring::DEFAULT_STREAM_WINDOW,
        value_parser = clap::value_parser!(u32).range(65_535..=(1 << 30))
    )]
    collective_stream_window: u32,

    /// Ring chunk size in bytes (pipelining granularity). It also caps
    /// every ring message (a chunk plus 128 bytes of header) and all-gather
    /// payloads. Every worker of a cluster must use the same value.
    #[arg(
        long,
        env = "RINGLEADER_COLLECTIVE_CHUNK_BYTES",
        default_value_t = RingOptions::default().chunk_bytes as u64,
        value_parser = clap::value_parser!(u64).range(1024..=(64 << 20))
    )]
    collective_chunk_bytes: u64,

    /// Connections per ring link; frames take them in turn. More than one
    /// can help on real NICs where one TCP stream does not fill the link
    /// (on loopback it does not: docs/BENCHMARKS.md). Every worker of a
    /// cluster must use the same value.
    #[arg(
        long,
        env = "RINGLEADER_COLLECTIVE_STRIPES",
        default_value_t = 1,
        value_parser = clap::value_parser!(u64).range(1..=16)
    )]
    collective_stripes: u64,

    /// libtorch threads per attempt when the job does not set `threads`
    /// (0: libtorch's default, one per core). Workers sharing a machine
    /// should split its cores (`ringleader local` does).
    #[arg(long, env = "RINGLEADER_THREADS", default_value_t = 0)]
    threads: u32,

    /// On SIGTERM, how long the running attempt may take to checkpoint and
    /// stop before the worker exits anyway.
    #[arg(long, env = "RINGLEADER_DRAIN_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    drain_timeout: Duration,

    #[command(flatten)]
    roots: RootArgs,

    #[command(flatten)]
    tls: TlsArgs,

    /// Encrypt ring traffic with the worker certificates' mutual TLS (on),
    /// or send it in plaintext (off: for a trusted network only; joining a
    /// ring still takes the attempt's secret). Every worker of a cluster
    /// must use the same value.
    #[arg(
        long,
        env = "RINGLEADER_RING_ENCRYPTION",
        value_enum,
        default_value = "on"
    )]
    ring_encryption: RingEncryption,

    /// How ring partners on this machine reach this worker: `unix` (a Unix
    /// socket in a private directory, used automatically by a rank whose
    /// successor shares its machine: no TCP, no TLS, the ring secret still
    /// checked) or `tcp` (always the peer address).
    #[arg(
        long,
        env = "RINGLEADER_CO_LOCATED_RINGS",
        value_enum,
        default_value = "unix"
    )]
    co_located_rings: CoLocatedRings,

    /// Where the Unix socket's private directory is made (default: the
    /// system's temporary directory).
    #[arg(long, env = "RINGLEADER_RING_SOCKET_DIR")]
    ring_socket_dir: Option<PathBuf>,

    /// Log as JSON lines.
    #[arg(long, env = "RINGLEADER_LOG_JSON")]
    log_json: bool,

    /// Where to serve Prometheus /metrics (plain HTTP, for scrapers: keep
    /// the port off public networks). "off" serves none.
    #[arg(long, env = "RINGLEADER_METRICS_LISTEN", default_value = "0.0.0.0:7590", value_parser = parse_optional_address)]
    metrics_listen: OptionalAddress,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum RingEncryption {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum CoLocatedRings {
    Unix,
    Tcp,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    runtime::init_tracing(args.log_json);
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let shutdown = runtime::shutdown_on_signals()?;
    let transport = args.tls.transport(Role::Worker)?;
    let ring_transport = match args.ring_encryption {
        RingEncryption::On => transport.clone(),
        RingEncryption::Off => {
            if transport.is_tls() {
                warn!("ring encryption is off (--ring-encryption=off): gradients cross the network in plaintext; joining a ring still takes the attempt's secret");
            }
            Transport::Insecure
        }
    };
    let cuda_devices = device::cuda_device_count();
    let device = args.device.resolve(cuda_devices)?;
    let gpus = match args.gpus {
        Some(declared) => {
            if declared as usize != cuda_devices {
                warn!(declared, cuda_devices, "--gpus declares {declared} GPU(s) but libtorch sees {cuda_devices}: jobs placed on a GPU this machine lacks will fail");
            }
            device::declared_gpus(declared)
        }
        // A worker told to train on the CPU offers no GPU to the leader.
        None if device == tch::Device::Cpu => Vec::new(),
        None => device::detect_gpus(cuda_devices),
    };
    let advertise = args.advertise.unwrap_or_else(|| args.listen.to_string());
    let host = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    let port = advertise.rsplit(':').next().unwrap_or("0").to_string();
    let worker_id = args.id.unwrap_or_else(|| format!("{host}-{port}"));
    let resources = device::resources(device, gpus);
    info!(
        worker = %worker_id,
        device = %resources.device,
        cpu_cores = resources.cpu_cores,
        gpus = resources.gpus.len(),
        "worker starting"
    );

    if let OptionalAddress(Some(listen)) = args.metrics_listen {
        ringleader_client::metrics::serve_registry(
            listen,
            || metrics::worker().render(),
            shutdown.clone(),
        )
        .await?;
    }

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let (_health_reporter, health_service) = tonic_health::server::health_reporter();
    let ring_options = RingOptions {
        timeout: args.collective_timeout,
        chunk_bytes: args.collective_chunk_bytes as usize,
        frame_bytes: ring::frame_bytes_for(args.collective_chunk_bytes as usize),
        stream_window: args.collective_stream_window,
        connection_window: args.collective_stream_window.saturating_mul(2),
        max_waiting_streams: args.collective_max_waiting_streams as usize,
        transport: ring_transport,
        stripes: args.collective_stripes as usize,
        ..RingOptions::default()
    };
    // Rings built from coordinator plans register here.
    let collectives = CollectiveService::for_rings(&ring_options);
    // The peer server outlives the signal: ring partners still need it
    // while the running attempt winds down.
    let server_stop = CancellationToken::new();
    let server_shutdown = server_stop.clone();
    let peer_server = tokio::spawn(
        ring::server_builder(&ring_options)?
            .add_service(health_service)
            .add_service(collectives.clone())
            .serve_with_incoming_shutdown(
                ring::incoming(listener),
                server_shutdown.cancelled_owned(),
            ),
    );

    // Ring partners on this machine: a Unix socket, served until the same
    // stop as the TCP port.
    let (local_peer_address, machine_id, local_server) = match (
        args.co_located_rings,
        ringleader_collective::local::machine_id(),
    ) {
        (CoLocatedRings::Unix, Some(machine_id)) => {
            let parent = args
                .ring_socket_dir
                .clone()
                .unwrap_or_else(std::env::temp_dir);
            let mut socket = LocalSocket::bind(&parent)?;
            let path = socket.path().display().to_string();
            info!(socket = %path, "ring partners on this machine connect over a Unix socket");
            let (service, options, stop) = (
                collectives.clone(),
                ring_options.clone(),
                server_stop.clone(),
            );
            let server = tokio::spawn(async move {
                socket
                    .serve(&service, &options, stop.cancelled_owned())
                    .await
            });
            (path, Some(machine_id), Some(server))
        }
        (CoLocatedRings::Unix, None) => {
            warn!("this kernel gives no boot id: ring partners on this machine use TCP");
            (String::new(), None, None)
        }
        (CoLocatedRings::Tcp, _) => (String::new(), None, None),
    };

    let options = AgentOptions {
        connection: Connection {
            coordinators: client::split_addresses(&args.coordinator),
            transport: transport.clone(),
            token: None,
            timeout: args.timeout,
        },
        registration: Register {
            worker_id,
            host,
            peer_address: advertise,
            resources: Some(resources),
            local_peer_address,
            machine_id: machine_id.clone().unwrap_or_default(),
            ..Register::default()
        },
        min_backoff: Duration::from_millis(100),
        max_backoff: args.max_backoff,
    };
    let confinement = args.roots.confinement()?;
    info!(
        data_roots = ?confinement.data.roots(),
        checkpoint_root = ?confinement.checkpoints.roots(),
        "jobs read and write only under these roots"
    );
    let (trials, reports) = Trials::new(TrialContext {
        collectives: collectives.clone(),
        ring_options: ring_options.clone(),
        device,
        cuda_devices,
        threads: args.threads,
        confinement,
        machine_id,
    });
    let agent_stop = CancellationToken::new();
    let agent = tokio::spawn(agent::run(
        options,
        trials.clone(),
        reports,
        agent_stop.clone(),
    ));
    shutdown.cancelled().await;
    // Graceful: the running attempt checkpoints at the end of its epoch and
    // is reported abandoned (not failed), so the leader moves it elsewhere.
    trials.drain();
    if tokio::time::timeout(args.drain_timeout, trials.until_idle())
        .await
        .is_err()
    {
        warn!(timeout = ?args.drain_timeout, "the running attempt did not stop in time");
    }
    agent_stop.cancel();
    let _ = agent.await;
    server_stop.cancel();
    peer_server.await?.context("peer server")?;
    if let Some(server) = local_server {
        server.await?.context("peer server on the Unix socket")?;
    }
    Ok(())
}
