//! The `ringleader` command line (clap derive). Every flag can also come
//! from a `RINGLEADER_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 3s, 500ms, 1m)"))
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to serve gRPC on.
    #[arg(long, env = "RINGLEADER_LISTEN", default_value = "0.0.0.0:7400")]
    pub listen: SocketAddr,

    /// Address others reach this coordinator on (the pod IP in Kubernetes);
    /// defaults to --listen.
    #[arg(long, env = "RINGLEADER_ADVERTISE")]
    pub advertise: Option<String>,

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

    /// Command to run once the cluster is ready, with RINGLEADER_COORDINATOR
    /// set; the cluster stops when it exits and its exit code is ours.
    #[arg(last = true)]
    pub run: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Coordinator addresses, comma-separated (any of them; the leader is
    /// found from there).
    #[arg(
        long,
        env = "RINGLEADER_COORDINATOR",
        value_delimiter = ',',
        default_value = "127.0.0.1:7400"
    )]
    pub coordinator: Vec<String>,

    /// Deadline for reaching the leader.
    #[arg(long, env = "RINGLEADER_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
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
