//! The `ringleader` command line (clap derive). Every flag can also come
//! from a `RINGLEADER_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use ringleader_client::args::{
    parse_duration, parse_optional_address, OptionalAddress, TlsArgs,
};

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ringleader",
    version,
    about = "Distributed training orchestrator"
)]
pub struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true, env = "RINGLEADER_LOG_JSON")]
    pub log_json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a coordinator: campaign for leadership through etcd and serve gRPC.
    Serve(ServeArgs),
    /// Run a whole cluster as local processes (private etcd, coordinators,
    /// workers); with `-- COMMAND`, run it against the cluster, then stop.
    Local(LocalArgs),
    /// Show the leader, the coordinators and the workers.
    Status(StatusArgs),
    /// Training jobs: one trial with fixed hyperparameters.
    #[command(subcommand)]
    Job(JobCommand),
    /// Hyperparameter sweeps.
    #[command(subcommand)]
    Sweep(SweepCommand),
    /// Trained models: export one for use outside Ringleader.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Certificates for mutual TLS between every component.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Users' bearer tokens (admins only).
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a CA, every component's certificate and a bootstrap admin
    /// token under a directory (one subdirectory per component, each with
    /// ca.crt, tls.crt and tls.key: the layout of a Kubernetes TLS Secret).
    Init(CertsInitArgs),
}

#[derive(Debug, Args)]
pub struct CertsInitArgs {
    /// Directory to create them in; an existing CA there is never
    /// overwritten.
    #[arg(long)]
    pub dir: PathBuf,

    /// Extra DNS name or IP for the coordinator and etcd certificates
    /// (what clients and etcdctl dial), beyond localhost and 127.0.0.1.
    /// Repeatable.
    #[arg(long = "host")]
    pub hosts: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; it is printed once and only its hash is stored.
    Create(TokenCreateArgs),
    /// List tokens (never their secrets).
    List(ListArgs),
    /// Revoke a token at once; its holder's next call is refused.
    Revoke(TokenRevokeArgs),
}

#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    /// Who the token is for; shown as the owner of what they submit.
    #[arg(long)]
    pub name: String,

    /// admin (everything), user (submit; see and cancel their own) or
    /// viewer (read only).
    #[arg(long)]
    pub role: ringleader_security::UserRole,
}

#[derive(Debug, Args)]
pub struct TokenRevokeArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    /// The token's id (`token list` shows them).
    pub id: String,
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Validate a job spec (TOML) and run it on the cluster.
    Submit(SubmitArgs),
    /// Show a job's state and metrics per epoch.
    Status(LookupArgs),
}

#[derive(Debug, Subcommand)]
pub enum SweepCommand {
    /// Validate a sweep spec (TOML) and start it on the cluster.
    Submit(SubmitArgs),
    /// List sweeps and jobs, oldest first.
    List(ListArgs),
    /// Show a sweep's state and its trials.
    Status(LookupArgs),
    /// The leaderboard: trials best first, with parameters and objective.
    Results(ResultsArgs),
    /// Stop a sweep's running trials and free their workers.
    Cancel(CancelArgs),
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a trial's trained model into a directory: model.pt
    /// (TorchScript, runs with PyTorch's torch.jit.load), model.safetensors
    /// (the weights) and model.json (spec, hyperparameters, input and its
    /// preparation, final metrics, lineage). See docs/MODELS.md.
    Export(ExportArgs),
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    /// The trial: SWEEP/N (trial N of a sweep, from 0), a job id (its
    /// only trial), or with --best a sweep id.
    pub target: String,

    /// Export the sweep's best completed trial by its objective.
    #[arg(long)]
    pub best: bool,

    /// Directory to write into: new, or empty. The export runs here, with
    /// `ringleader-export` from beside this binary: it reads the checkpoint
    /// under RINGLEADER_CHECKPOINT_ROOT and the data under
    /// RINGLEADER_DATA_ROOTS, as a worker does.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    /// The spec file.
    pub file: PathBuf,

    /// Follow progress until it finishes (exit status 1 if it fails).
    #[arg(long)]
    pub watch: bool,

    /// Only validate the spec (no cluster needed) and describe it.
    #[arg(long, conflicts_with = "watch")]
    pub dry_run: bool,

    /// With --watch: give up (exit status 1) once no coordinator has
    /// answered for this long. Leader failovers take seconds.
    #[arg(long, env = "RINGLEADER_WATCH_GIVE_UP_AFTER", default_value = "60s", value_parser = parse_duration)]
    pub give_up_after: Duration,
}

#[derive(Debug, Args)]
pub struct LookupArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    /// Job or sweep id (as `submit` printed it).
    pub id: String,

    /// Show only this trial (numbered from 0), in full: every epoch's
    /// metrics and its lineage (docs/MODELS.md).
    #[arg(long)]
    pub trial: Option<u64>,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ResultsFormat {
    Table,
    Csv,
    Json,
}

#[derive(Debug, Args)]
pub struct ResultsArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    pub id: String,

    #[arg(long, value_enum, default_value = "table")]
    pub format: ResultsFormat,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    pub id: String,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub tls: TlsArgs,

    /// etcd client certificate directory (ca.crt of etcd's CA, tls.crt,
    /// tls.key); etcd is then reached over TLS (https:// endpoints).
    #[arg(long, env = "RINGLEADER_ETCD_TLS_DIR")]
    pub etcd_tls_dir: Option<PathBuf>,

    /// File holding the bootstrap admin token (`certs init` writes
    /// admin.token; in Kubernetes, a Secret). Its holder is the user
    /// "admin" with the admin role.
    #[arg(long, env = "RINGLEADER_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Address to serve gRPC on.
    #[arg(long, env = "RINGLEADER_LISTEN", default_value = "0.0.0.0:7400")]
    pub listen: SocketAddr,

    /// Address others reach this coordinator on (the pod IP in Kubernetes);
    /// defaults to --listen.
    #[arg(long, env = "RINGLEADER_ADVERTISE")]
    pub advertise: Option<String>,

    /// Where to serve the web dashboard and its JSON API (HTTPS with the
    /// coordinator's certificate; plain HTTP only with --insecure).
    /// "off" serves none.
    #[arg(long, env = "RINGLEADER_DASHBOARD_LISTEN", default_value = "0.0.0.0:7480", value_parser = parse_optional_address)]
    pub dashboard_listen: OptionalAddress,

    /// Where to serve Prometheus /metrics (plain HTTP, for scrapers: keep
    /// the port off public networks). "off" serves none.
    #[arg(long, env = "RINGLEADER_METRICS_LISTEN", default_value = "0.0.0.0:7490", value_parser = parse_optional_address)]
    pub metrics_listen: OptionalAddress,

    /// etcd endpoints, comma-separated.
    #[arg(long, env = "RINGLEADER_ETCD", value_delimiter = ',', required = true)]
    pub etcd: Vec<String>,

    /// TTL of the election lease: how long a dead leader can hold on.
    #[arg(long, env = "RINGLEADER_LEASE_TTL", default_value = "3s", value_parser = parse_duration)]
    pub lease_ttl: Duration,

    /// Deadline of every etcd request (and of the first connection).
    #[arg(long, env = "RINGLEADER_ETCD_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub etcd_timeout: Duration,

    /// How often workers send heartbeats.
    #[arg(long, env = "RINGLEADER_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// Silence after which a worker is declared lost.
    #[arg(long, env = "RINGLEADER_WORKER_LOST_AFTER", default_value = "5s", value_parser = parse_duration)]
    pub worker_lost_after: Duration,

    /// Where trials checkpoint when their job names no `checkpoint.dir`
    /// (must be shared by all workers; default: <tmp>/ringleader-checkpoints).
    #[arg(long, env = "RINGLEADER_CHECKPOINT_DIR")]
    pub checkpoint_dir: Option<PathBuf>,

    /// Most trials one sweep may ask for (its `max_trials`, or its grid's
    /// size); at most 999999.
    #[arg(long, env = "RINGLEADER_MAX_TRIALS_PER_SWEEP",
          default_value_t = crate::limits::DEFAULT_MAX_TRIALS_PER_SWEEP,
          value_parser = clap::value_parser!(u64).range(1..=crate::limits::MAX_TRIALS))]
    pub max_trials_per_sweep: u64,

    /// Most sweeps and jobs running or waiting at once; later submissions
    /// are refused (RESOURCE_EXHAUSTED) until one finishes.
    #[arg(long, env = "RINGLEADER_MAX_RUNNING_SWEEPS",
          default_value_t = crate::limits::DEFAULT_MAX_RUNNING_SWEEPS)]
    pub max_running_sweeps: usize,
}

#[derive(Debug, Args)]
pub struct LocalArgs {
    /// Number of worker processes.
    #[arg(long, env = "RINGLEADER_LOCAL_WORKERS", default_value_t = 2)]
    pub workers: usize,

    /// Number of coordinator processes (one leads, the rest stand by).
    #[arg(long, env = "RINGLEADER_LOCAL_COORDINATORS", default_value_t = 2)]
    pub coordinators: usize,

    /// Use this etcd (comma-separated endpoints) instead of a private one.
    #[arg(long, env = "RINGLEADER_ETCD", value_delimiter = ',')]
    pub etcd: Option<Vec<String>>,

    /// Election lease TTL for the coordinators.
    #[arg(long, env = "RINGLEADER_LEASE_TTL", default_value = "3s", value_parser = parse_duration)]
    pub lease_ttl: Duration,

    /// Device for every worker: auto, cpu, cuda or cuda:N.
    #[arg(long, env = "RINGLEADER_DEVICE", default_value = "cpu")]
    pub device: String,

    /// Directory for etcd's data and the logs (default: a temporary one,
    /// removed at exit).
    #[arg(long, env = "RINGLEADER_LOCAL_DIR")]
    pub dir: Option<PathBuf>,

    /// How long to wait for the cluster to form.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub ready_timeout: Duration,

    /// Run the cluster without TLS and authentication (a warning is logged
    /// at every start). By default everything runs with mutual TLS, and
    /// clients need the config file the cluster prints.
    #[arg(long, env = "RINGLEADER_INSECURE")]
    pub insecure: bool,

    /// Where the first coordinator serves the web dashboard (the others
    /// take free ports; every coordinator's shows the leader's view).
    #[arg(
        long,
        env = "RINGLEADER_DASHBOARD_LISTEN",
        default_value = "127.0.0.1:7480"
    )]
    pub dashboard_listen: SocketAddr,

    /// After the command ends, keep the cluster (and its dashboard) running
    /// until Ctrl-C; the exit status is still the command's.
    #[arg(long, env = "RINGLEADER_LOCAL_KEEP_RUNNING")]
    pub keep_running: bool,

    /// Directory the workers may read data sets and TorchScript modules
    /// from; repeatable (default: the worker's own defaults).
    #[arg(
        long = "data-root",
        env = "RINGLEADER_DATA_ROOTS",
        value_delimiter = ','
    )]
    pub data_roots: Vec<PathBuf>,

    /// Command to run once the cluster is ready, with RINGLEADER_COORDINATOR
    /// set; the cluster stops when it exits and its exit code is ours.
    #[arg(last = true)]
    pub run: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Coordinator addresses, comma-separated (any of them; the leader is
    /// found from there). Default: the config's, else 127.0.0.1:7400.
    #[arg(long, env = "RINGLEADER_COORDINATOR", value_delimiter = ',')]
    pub coordinator: Vec<String>,

    /// Deadline for reaching the leader.
    #[arg(long, env = "RINGLEADER_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Client config file (coordinators, TLS directory, token file), as
    /// `ringleader local` writes it; flags override it.
    #[arg(long, env = "RINGLEADER_CONFIG")]
    pub config: Option<PathBuf>,

    /// Directory with ca.crt and a client certificate (tls.crt, tls.key).
    #[arg(long, env = "RINGLEADER_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,

    /// Bearer token (`ringleader token create`).
    #[arg(long, env = "RINGLEADER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// File holding the bearer token.
    #[arg(long, env = "RINGLEADER_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,

    /// Talk plaintext, without TLS or a token, to a cluster started with
    /// --insecure.
    #[arg(long, env = "RINGLEADER_INSECURE")]
    pub insecure: bool,
}

impl ClientArgs {
    /// Where and how to reach the cluster: flags, then the config file,
    /// then defaults.
    pub fn connection(&self) -> crate::Result<crate::client::Connection> {
        crate::client_config::resolve(self)
    }
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_reads_flags_and_defaults() {
        let cli = Cli::try_parse_from([
            "ringleader",
            "serve",
            "--insecure",
            "--listen=127.0.0.1:1",
            "--etcd=http://a:1,http://b:2",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.etcd, ["http://a:1", "http://b:2"]);
        assert_eq!(args.lease_ttl, Duration::from_secs(3));
    }

    #[test]
    fn bad_duration_is_rejected() {
        let err = Cli::try_parse_from(["ringleader", "serve", "--etcd=x", "--lease-ttl=soon"])
            .unwrap_err();
        assert!(err.to_string().contains("--lease-ttl"), "{err}");
    }

    #[test]
    fn local_takes_a_trailing_command() {
        let cli = Cli::try_parse_from([
            "ringleader",
            "local",
            "--workers=3",
            "--",
            "ringleader",
            "status",
        ])
        .unwrap();
        let Command::Local(args) = cli.command else {
            panic!("not local")
        };
        assert_eq!(args.workers, 3);
        assert_eq!(args.run, ["ringleader", "status"]);
    }
}
