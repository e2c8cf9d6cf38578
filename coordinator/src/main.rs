//! `ringleader`: coordinator server, local cluster launcher and client CLI.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use ringleader_coordinator::cli::{
    CertsCommand, CertsInitArgs, Cli, Command, JobCommand, LocalArgs, LookupArgs, ModelCommand,
    ResultsFormat, ServeArgs, StatusArgs, SubmitArgs, SweepCommand, TokenCommand,
};
use ringleader_coordinator::client;
use ringleader_coordinator::client_config;
use ringleader_coordinator::export::{self, Target};
use ringleader_coordinator::local::{LocalCluster, LocalClusterOptions};
use ringleader_coordinator::server::{self, ServeOptions};
use ringleader_coordinator::sweep::client::{self as sweeps, SweepView};
use ringleader_coordinator::sweep::{SweepKind, SweepState};
use ringleader_coordinator::{runtime, status};
use ringleader_security::{certs, Role, TlsDir};
use tokio_util::sync::CancellationToken;

/// The leader keeps every running sweep's records in memory and rewrites
/// them on every event: glibc's malloc slows as that heap grows (the
/// leader simulation measured 5.5 µs per event at 1,000 trials and 14 µs
/// at 100,000); mimalloc stays flat (docs/BENCHMARKS.md, "The leader at
/// scale").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Grace period for children to stop on SIGTERM before they are killed.
const CHILD_GRACE: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    runtime::init_tracing(cli.log_json);
    let result = match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Local(args) => local(args).await,
        Command::Status(args) => show_status(args).await,
        Command::Job(command) => job(command).await,
        Command::Sweep(command) => sweep(command).await,
        Command::Model(command) => model(command).await,
        Command::Certs(CertsCommand::Init(args)) => certs_init(&args),
        Command::Token(command) => token(command).await,
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<ExitCode> {
    let shutdown = runtime::shutdown_on_signals()?;
    let advertise = args.advertise.unwrap_or_else(|| args.listen.to_string());
    let transport = args.tls.transport(Role::Coordinator)?;
    let etcd_tls = match &args.etcd_tls_dir {
        Some(dir) => Some(TlsDir::load(dir)?),
        None => None,
    };
    let admin_token = match &args.admin_token_file {
        Some(path) => Some(client_config::read_token_file(path)?),
        None => None,
    };
    if transport.is_tls() && admin_token.is_none() {
        tracing::warn!(
            "no --admin-token-file: only tokens already stored in etcd can call this cluster"
        );
    }
    let options = ServeOptions {
        listen: args.listen,
        advertise,
        etcd: args.etcd,
        lease_ttl: args.lease_ttl,
        etcd_timeout: args.etcd_timeout,
        heartbeat_interval: args.heartbeat_interval,
        worker_lost_after: args.worker_lost_after,
        checkpoint_dir: args
            .checkpoint_dir
            .unwrap_or_else(|| std::env::temp_dir().join("ringleader-checkpoints")),
        limits: server::SubmitLimits {
            max_trials_per_sweep: args.max_trials_per_sweep,
            max_running_sweeps: args.max_running_sweeps,
        },
        transport,
        etcd_tls,
        admin_token,
        dashboard_listen: args.dashboard_listen.0,
        metrics_listen: args.metrics_listen.0,
    };
    server::serve(options, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

async fn show_status(args: StatusArgs) -> Result<ExitCode> {
    let status = status::fetch(&args.client.connection()?).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status::to_json(&status))?
        );
    } else {
        print!("{}", status::to_table(&status));
    }
    Ok(ExitCode::SUCCESS)
}

/// How often `--watch` polls the leader.
const WATCH_EVERY: Duration = Duration::from_millis(500);

async fn job(command: JobCommand) -> Result<ExitCode> {
    match command {
        JobCommand::Submit(args) => submit(&args, SweepKind::Job).await,
        JobCommand::Status(args) => show(&args).await,
    }
}

async fn sweep(command: SweepCommand) -> Result<ExitCode> {
    match command {
        SweepCommand::Submit(args) => submit(&args, SweepKind::Sweep).await,
        SweepCommand::List(args) => {
            let sweeps = sweeps::list(&args.client.connection()?).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&sweeps)?);
            } else {
                print!("{}", sweeps::list_table(&sweeps));
            }
            Ok(ExitCode::SUCCESS)
        }
        SweepCommand::Status(args) => show(&args).await,
        SweepCommand::Results(args) => {
            let view = sweeps::get(&args.client.connection()?, &args.id).await?;
            match args.format {
                ResultsFormat::Table => print!("{}", sweeps::results_table(&view)),
                ResultsFormat::Csv => print!("{}", sweeps::results_csv(&view)),
                ResultsFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&sweeps::results_json(&view))?
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        SweepCommand::Cancel(args) => {
            let stopped = sweeps::cancel(&args.client.connection()?, &args.id).await?;
            println!(
                "{} cancelled; {stopped} running attempt(s) told to stop",
                args.id
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn model(command: ModelCommand) -> Result<ExitCode> {
    match command {
        ModelCommand::Export(args) => {
            let target = Target::parse(&args.target, args.best)?;
            let printed = export::export(&args.client.connection()?, &target, &args.out).await?;
            print!("{printed}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn submit(args: &SubmitArgs, kind: SweepKind) -> Result<ExitCode> {
    let (_, template) = sweeps::check(kind, &args.file)?;
    for warning in template.warnings() {
        eprintln!("warning: {warning}");
    }
    if args.dry_run {
        println!("valid: {}", sweeps::summary(&template));
        return Ok(ExitCode::SUCCESS);
    }
    let connection = args.client.connection()?;
    let id = sweeps::submit(&connection, kind, &args.file).await?;
    println!("submitted {id}");
    if !args.watch {
        return Ok(ExitCode::SUCCESS);
    }
    let view = sweeps::watch(&connection, &id, WATCH_EVERY, args.give_up_after).await?;
    print_outcome(&view);
    Ok(exit_code(&view))
}

fn print_outcome(view: &SweepView) {
    match view.record.kind {
        SweepKind::Job => {
            if let Some(metrics) = view.trials.first().and_then(|t| t.metrics.last()) {
                println!("final metrics (epoch {}):", metrics.epoch);
                for (name, value) in &metrics.metrics {
                    println!("  {name:<16} {value:.4}");
                }
            }
        }
        SweepKind::Sweep => {
            print!("{}", sweeps::results_table(view));
            if let Some(best) = view.best() {
                println!(
                    "best: trial {} with {} = {:.4}",
                    best.number,
                    view.record.objective_metric,
                    best.objective.unwrap_or(f64::NAN)
                );
            }
        }
    }
}

fn exit_code(view: &SweepView) -> ExitCode {
    if view.record.state == SweepState::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn show(args: &LookupArgs) -> Result<ExitCode> {
    let view = sweeps::get(&args.client.connection()?, &args.id).await?;
    if let Some(number) = args.trial {
        let trial = sweeps::find_trial(&view, number)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(trial)?);
        } else {
            print!("{}", sweeps::trial_text(&view, number)?);
        }
    } else if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "sweep": view.record,
                "trials": view.trials,
                "final_estimate": sweeps::final_estimate_json(&view),
            }))?
        );
    } else {
        print!("{}", sweeps::status_text(&view));
    }
    Ok(ExitCode::SUCCESS)
}

async fn local(args: LocalArgs) -> Result<ExitCode> {
    let shutdown = runtime::shutdown_on_signals()?;
    let temp;
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("ringleader-local-")
                .tempdir()
                .context("creating a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let options = LocalClusterOptions {
        workers: args.workers,
        coordinators: args.coordinators.max(1),
        etcd: args.etcd.clone(),
        lease_ttl: args.lease_ttl,
        device: args.device.clone(),
        dir: dir.clone(),
        coordinator_args: Vec::new(),
        bin_dir: None,
        secure: !args.insecure,
        data_roots: args.data_roots.clone(),
        dashboard_listen: Some(args.dashboard_listen),
    };
    if args.insecure {
        tracing::warn!("{}", ringleader_security::tls::INSECURE_WARNING);
    } else if args.etcd.is_some() {
        tracing::warn!("--etcd: your own etcd is reached without TLS; only the private etcd `ringleader local` starts runs with TLS");
    }
    eprintln!(
        "starting {} coordinator(s) and {} worker(s); logs in {}",
        options.coordinators,
        options.workers,
        dir.display()
    );
    let mut cluster = LocalCluster::start(options).await?;
    let outcome = run_cluster(&mut cluster, &args, &shutdown).await;
    eprintln!("stopping the local cluster");
    cluster.shutdown(CHILD_GRACE);
    outcome
}

/// Waits for the cluster, then for the user's command, a signal, or a member
/// dying, whichever comes first.
async fn run_cluster(
    cluster: &mut LocalCluster,
    args: &LocalArgs,
    shutdown: &CancellationToken,
) -> Result<ExitCode> {
    let ready = tokio::select! {
        r = cluster.wait_ready(args.ready_timeout) => r?,
        _ = shutdown.cancelled() => return Ok(ExitCode::SUCCESS),
    };
    let addresses = cluster.coordinator_addresses().join(",");
    let config = cluster.client_config_path();
    println!("cluster ready");
    println!("  etcd:        {}", cluster.etcd_endpoints().join(","));
    println!("  leader:      {}", ready.leader_address);
    println!("  coordinators: {addresses}");
    for worker in &ready.workers {
        println!(
            "  worker:      {} at {}",
            worker.worker_id, worker.peer_address
        );
    }
    println!(
        "  security:    {}",
        if cluster.certs().is_some() {
            "mutual TLS everywhere (etcd included), admin token"
        } else {
            "NONE (--insecure)"
        }
    );
    if let Some(url) = cluster.dashboard_url() {
        println!("  dashboard:   {url}");
        if cluster.certs().is_some() {
            println!(
                "               (signed by the cluster's own CA, {}: import it, or accept the browser's warning once)",
                cluster.ca_certificate_path().display()
            );
        }
    }
    println!("to use it from another shell:");
    println!("  export RINGLEADER_CONFIG={}", config.display());

    let mut command = match args.run.split_first() {
        Some((program, rest)) => {
            let mut command = tokio::process::Command::new(program);
            command
                .args(rest)
                .env("RINGLEADER_CONFIG", &config)
                .env("RINGLEADER_COORDINATOR", &addresses);
            if let Ok(exe) = std::env::current_exe() {
                if let Some(bin_dir) = exe.parent() {
                    let path = std::env::var_os("PATH").unwrap_or_default();
                    let mut dirs = vec![bin_dir.to_path_buf()];
                    dirs.extend(std::env::split_paths(&path));
                    command.env("PATH", std::env::join_paths(dirs)?);
                }
            }
            command.kill_on_drop(true);
            Some(
                command
                    .spawn()
                    .with_context(|| format!("running {program}"))?,
            )
        }
        None => {
            println!("press Ctrl-C to stop");
            None
        }
    };

    let mut poll = tokio::time::interval(Duration::from_millis(200));
    let mut exit = ExitCode::SUCCESS;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(exit),
            status = async { command.as_mut().expect("guarded").wait().await }, if command.is_some() => {
                let status = status.context("waiting for the command")?;
                let code = status.code().and_then(|c| u8::try_from(c).ok()).unwrap_or(1);
                if !args.keep_running {
                    return Ok(ExitCode::from(code));
                }
                command = None;
                exit = ExitCode::from(code);
                println!("the command ended ({status}); the cluster keeps running (--keep-running): press Ctrl-C to stop");
                if let Some(url) = cluster.dashboard_url() {
                    println!("  dashboard:   {url}");
                }
            }
            _ = poll.tick() => {
                if let Some(dead) = cluster.first_dead_member() {
                    return Err(dead.into());
                }
            }
        }
    }
}

fn certs_init(args: &CertsInitArgs) -> Result<ExitCode> {
    let written = certs::init(
        &args.dir,
        &certs::InitOptions {
            hosts: args.hosts.clone(),
        },
    )?;
    println!("wrote certificates under {}:", written.dir.display());
    for role in Role::ALL {
        println!(
            "  {:<12} {}",
            role.as_str(),
            written.tls_dir(role).display()
        );
    }
    println!(
        "  {:<12} {}",
        "etcd server",
        written.dir.join(certs::ETCD_SERVER_DIR).display()
    );
    println!(
        "  {:<12} {}",
        "etcd client",
        written.dir.join(certs::ETCD_CLIENT_DIR).display()
    );
    println!(
        "  {:<12} {} (bootstrap admin token: ringleader serve --admin-token-file)",
        "admin token",
        written.dir.join(certs::ADMIN_TOKEN_FILE).display()
    );
    println!(
        "keep {} offline: it can issue certificates",
        written.dir.join("ca").display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn token(command: TokenCommand) -> Result<ExitCode> {
    use ringleader_coordinator::auth::TokenInfo;
    use ringleader_proto::coordinator::{
        CreateTokenRequest, ListTokensRequest, RevokeTokenRequest,
    };
    match command {
        TokenCommand::Create(args) => {
            let connection = args.client.connection()?;
            let (_, mut leader) = client::find_leader(&connection).await?;
            let created = leader
                .create_token(CreateTokenRequest {
                    name: args.name.clone(),
                    role: args.role.to_string(),
                })
                .await
                .map_err(|s| client::status_error("token create", s))?
                .into_inner();
            eprintln!(
                "created token {} for {} ({}); it is shown once, here:",
                created.id, args.name, args.role
            );
            println!("{}", created.token);
        }
        TokenCommand::List(args) => {
            let connection = args.client.connection()?;
            let (_, mut leader) = client::find_leader(&connection).await?;
            let listed = leader
                .list_tokens(ListTokensRequest {})
                .await
                .map_err(|s| client::status_error("token list", s))?
                .into_inner();
            let tokens = listed
                .token_json
                .iter()
                .map(|json| serde_json::from_str::<TokenInfo>(json))
                .collect::<Result<Vec<_>, _>>()
                .context("the leader sent a token record we cannot read")?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&tokens)?);
            } else {
                println!(
                    "{:<14} {:<24} {:<7} {:<16} state",
                    "id", "name", "role", "created by"
                );
                for token in &tokens {
                    let state = if token.revoked_unix_ms.is_some() {
                        "revoked"
                    } else {
                        "active"
                    };
                    println!(
                        "{:<14} {:<24} {:<7} {:<16} {state}",
                        token.id,
                        token.name,
                        token.role.as_str(),
                        token.created_by
                    );
                }
            }
        }
        TokenCommand::Revoke(args) => {
            let connection = args.client.connection()?;
            let (_, mut leader) = client::find_leader(&connection).await?;
            leader
                .revoke_token(RevokeTokenRequest {
                    id: args.id.clone(),
                })
                .await
                .map_err(|s| client::status_error("token revoke", s))?;
            println!("revoked token {}", args.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}
